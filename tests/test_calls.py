"""Calls in the chain, key presses, and the reply words pass and list."""

import json
import threading
import time
import xml.etree.ElementTree as ElementTree

import pytest
from conftest import (
    BACKUP,
    CUSTOMER,
    LINE,
    OTHER_CUSTOMER,
    SERGIO,
    TOKEN,
    RelayProcess,
    barrier,
    logged_events,
    msid,
    wait_until,
)
from freezegun import freeze_time

import relay

pytestmark = pytest.mark.both_stores  # the shared behaviour suite: run on each store

SERGIO_CALL = relay.Contact("Sergio", SERGIO, 120, via="call")
SERGIO_BOTH = relay.Contact("Sergio", SERGIO, 120, via="sms+call")
BACKUP_C = relay.Contact("Backup", BACKUP, 300)
CALL_SID = "CA" + "1" * 32


@pytest.fixture
def clock():
    with freeze_time("2026-11-27 12:00:00") as frozen:
        yield frozen


def start(first=SERGIO_CALL, body="hi", sender=CUSTOMER, sid=None) -> relay.Conversation:
    line = relay.Line("QDN", LINE, (first, BACKUP_C))
    config = relay.Config(lines=(line,))
    return relay.start_conversation(line, config, sid or msid(sender), sender, body, "1", time.time())


def kinds_to(conv, phone) -> list[str]:
    return [p.kind for p in conv.pages if p.to == phone]


# -- the rules -------------------------------------------------------------------------------------


def test_a_call_step_calls_and_an_sms_and_call_step_does_both(clock):
    assert kinds_to(start(SERGIO_CALL), SERGIO) == ["call"]
    assert kinds_to(start(SERGIO_BOTH), SERGIO) == ["page", "call"]


@pytest.mark.parametrize("status", ["no-answer", "busy", "failed", "canceled", "completed"])
def test_a_call_not_taken_moves_the_chain_on_at_once(clock, status):
    conv = start()
    relay.record_sent(conv, 0, CALL_SID, time.time())
    assert relay.call_progress(conv, 0, status, "", CALL_SID, time.time()) == "escalated"
    assert kinds_to(conv, BACKUP) == ["page"] and conv.pages[0].state == "not_taken"


@pytest.mark.parametrize("answered_by", ["machine_start", "machine_end_beep", "fax"])
def test_a_call_answered_by_a_machine_moves_on_and_is_ended(clock, answered_by):
    conv = start()
    relay.record_sent(conv, 0, CALL_SID, time.time())
    assert relay.call_progress(conv, 0, "in-progress", answered_by, CALL_SID, time.time()) == "escalated"
    assert [(p.kind, p.body) for p in conv.pages if p.kind == "end_call"] == [("end_call", CALL_SID)]


def test_a_machine_verdict_reported_before_the_rest_answer_ends_the_call_it_names(clock):
    conv = start()  # the call's page is still pending: Twilio's REST answer has not been stored
    assert relay.call_progress(conv, 0, "in-progress", "machine_start", CALL_SID, time.time()) == "escalated"
    assert [(p.kind, p.body) for p in conv.pages if p.kind == "end_call"] == [("end_call", CALL_SID)]


def test_a_machine_verdict_on_a_call_already_over_ends_nothing(clock):
    conv = start()
    relay.record_sent(conv, 0, CALL_SID, time.time())
    assert relay.call_progress(conv, 0, "completed", "machine_end_beep", CALL_SID, time.time()) == "escalated"
    assert kinds_to(conv, SERGIO) == ["call"]


def test_ringing_and_a_person_answering_do_not_move_the_chain(clock):
    conv = start()
    relay.record_sent(conv, 0, CALL_SID, time.time())
    for status, answered_by in (("ringing", ""), ("in-progress", "human"), ("in-progress", "unknown")):
        assert relay.call_progress(conv, 0, status, answered_by, CALL_SID, time.time()) is None
    assert conv.step == 0 and conv.pages[0].call_status == "in-progress"


def test_on_an_sms_and_call_step_one_failed_channel_alone_does_not_move_on(clock):
    conv = start(SERGIO_BOTH)
    relay.record_sent(conv, 0, msid("sms"), time.time())
    relay.record_sent(conv, 1, CALL_SID, time.time())
    assert relay.call_progress(conv, 1, "no-answer", "", CALL_SID, time.time()) is None
    assert relay.record_status(conv, 0, "undelivered", "30003", time.time()) == "escalated"


def test_on_an_sms_and_call_step_a_failed_text_alone_does_not_move_on(clock):
    conv = start(SERGIO_BOTH)
    relay.record_sent(conv, 1, CALL_SID, time.time())
    assert relay.record_status(conv, 0, "failed", "30003", time.time()) is None
    assert relay.call_progress(conv, 1, "busy", "", CALL_SID, time.time()) == "escalated"


def test_pass_moves_on_only_for_the_contact_holding_the_step(clock):
    conv = start()
    assert relay.pass_on(conv, BACKUP_C, time.time()) is None and conv.step == 0
    assert relay.pass_on(conv, SERGIO_CALL, time.time()) == "escalated" and conv.step == 1
    assert relay.pass_on(conv, SERGIO_CALL, time.time()) is None and conv.step == 1


def test_taking_it_ends_a_call_still_ringing_someone_else(clock):
    conv = start(relay.Contact("Sergio", SERGIO, 120))
    clock.tick(120)
    relay.expire(conv, time.time())
    line = relay.Line(
        "QDN", LINE, (relay.Contact("Sergio", SERGIO, 120), relay.Contact("Backup", BACKUP, 300, via="call"))
    )
    conv.chain = list(line.chain)
    conv.pages[-1].kind = "call"
    relay.record_sent(conv, len(conv.pages) - 1, "CA" + "2" * 32, time.time())
    relay.acknowledge(conv, line.chain[0], {"sid": msid("ack")}, time.time())
    assert [(p.to, p.body) for p in conv.pages if p.kind == "end_call"] == [(BACKUP, "CA" + "2" * 32)]


def test_a_call_placed_while_it_was_taken_is_ended_when_twilio_answers(clock):
    conv = start()
    relay.acknowledge(relay_conv := conv, relay.Contact("Backup", BACKUP, 300), {"sid": msid("a")}, time.time())
    relay.record_sent(relay_conv, 0, "CA" + "3" * 32, time.time())
    assert [(p.kind, p.body) for p in conv.pages if p.kind == "end_call"] == [("end_call", "CA" + "3" * 32)]


def test_the_call_says_the_line_the_sender_digit_by_digit_the_text_and_the_prompt_twice(clock):
    twiml = relay.call_twiml(start(body="engine won't start"), "https://relay.example.com/api/voice/gather?c=x&p=0")
    root = ElementTree.fromstring(twiml)
    gathers = root.findall("Gather")
    assert len(gathers) == 2 and all(g.get("numDigits") == "1" for g in gathers)
    first = gathers[0].find("Say").text
    assert "QDN" in first and "plus 1 5 5 5 1 2 3 0 0 0 1" in first and "engine won't start" in first
    assert "Press 1 to take it. Press 2 to pass it on." in first and "Press 1" in gathers[1].find("Say").text


@pytest.mark.parametrize(("body", "said"), [("room for 6 people?", "6 people? Press 1"), ("tow me", "tow me. Press 1")])
def test_the_call_ends_the_text_with_one_stop_before_the_prompt(clock, body, said):
    twiml = relay.call_twiml(start(body=body), "https://relay.example.com/api/voice/gather?c=x&p=0")
    first = ElementTree.fromstring(twiml).find("Gather").find("Say").text
    assert said in first and "?." not in first


@pytest.mark.parametrize("body", ["x" * 5000, "🚤" * 3000, "bad\x00control\x1bchars\ud800 and <xml> & 'quotes'"])
def test_the_call_twiml_stays_within_4000_characters_and_is_valid_xml_whatever_the_text(clock, body):
    twiml = relay.call_twiml(start(body=body), "https://relay.example.com/api/voice/gather?c=x&p=0")
    assert len(twiml.encode("utf-16-le", "surrogatepass")) // 2 <= 4000
    said = ElementTree.fromstring(twiml).find("Gather/Say").text
    if "quotes" not in body:
        assert relay.CUT_MARK.strip() in said
    else:
        assert "<xml> & 'quotes'" in said


@pytest.mark.parametrize("over", [0, 1, 2, 40])
def test_a_call_text_that_just_fits_the_twiml_limit_is_kept_whole_and_any_longer_is_cut_to_fit(clock, over):
    def call_for(length: int) -> str:
        return relay.call_twiml(start(body="x" * length), "https://relay.example.com/api/voice/gather?c=x&p=0")

    def units(twiml: str) -> int:
        return len(twiml.encode("utf-16-le")) // 2

    room = 4000 - (units(call_for(1)) - 1)  # the characters of text that fit beside all else the call says
    twiml = call_for(room + over)
    assert units(twiml) <= 4000 and (over > 0 or units(twiml) == 4000)
    assert (relay.CUT_MARK.strip() in ElementTree.fromstring(twiml).find("Gather/Say").text) is (over > 0)


@pytest.mark.parametrize(
    ("body", "word"),
    [("pass", "pass"), ("No", "no"), ("can't", "pass"), ("can’t", "pass"), ("CANT!", "pass"), ("#7 pass", "pass")]
    + [("list", "list"), ("?", "list"), ("#12 List", "list"), ("no way", None), ("passing by", None)],
)
def test_reply_words_are_the_whole_reply_apart_from_a_code(body, word):
    assert relay.read_reply(body).word == {"no": "pass"}.get(word, word)


# -- in the relay service --------------------------------------------------------------------------


def service_with(tmp_path, first=SERGIO_CALL):
    from conftest import RunAtOnce, make_relay

    line = relay.Line("QDN", LINE, (first, BACKUP_C))
    service = make_relay(tmp_path / "state", relay.Config(lines=(line,), public_url="https://relay.example.com"))
    service.outbox.senders = RunAtOnce()
    return service


@pytest.mark.parametrize("keyword", ["STOP", "help", "Start"])
def test_a_carrier_keyword_from_a_contact_takes_nothing(tmp_path, clock, keyword):
    service = service_with(tmp_path, relay.Contact("Sergio", SERGIO, 120))
    service.receive(relay.read_inbound({"MessageSid": msid(1), "From": CUSTOMER, "To": LINE, "Body": "fuel?"}))
    service.receive(relay.read_inbound({"MessageSid": msid(2), "From": SERGIO, "To": LINE, "Body": keyword}))
    assert service.store.get(msid(1)).is_open and service.store.get(msid(1)).replies == []


def test_list_by_sms_names_each_open_conversation_paged_to_that_contact(tmp_path, clock):
    service = service_with(tmp_path, relay.Contact("Sergio", SERGIO, 120))
    for n, sender in enumerate([CUSTOMER, OTHER_CUSTOMER]):
        service.receive(
            relay.read_inbound(
                {"MessageSid": msid(n), "From": sender, "To": LINE, "Body": f"boat {n} needs fuel now please"}
            )
        )
    service.sweeper.sweep()
    twiml = service.receive(
        relay.read_inbound({"MessageSid": msid("list"), "From": SERGIO, "To": LINE, "Body": "list"})
    )
    assert f"#1 {CUSTOMER} boat 0 needs fuel now" in twiml and f"#2 {OTHER_CUSTOMER} boat 1 needs fuel now" in twiml
    assert all(c.is_open for c in service.store.conversations.values())


def test_list_by_sms_names_the_oldest_conversation_first(tmp_path, clock):
    service = service_with(tmp_path, relay.Contact("Sergio", SERGIO, 120))
    for n, sender in enumerate([CUSTOMER, OTHER_CUSTOMER]):
        service.receive(relay.read_inbound({"MessageSid": msid(n), "From": sender, "To": LINE, "Body": f"boat {n}"}))
        clock.tick(-2)  # the second text is stored second, but is the older
    twiml = service.receive(
        relay.read_inbound({"MessageSid": msid("list"), "From": SERGIO, "To": LINE, "Body": "list"})
    )
    assert twiml.index(f"#2 {OTHER_CUSTOMER}") < twiml.index(f"#1 {CUSTOMER}")


class CallsHangUntilReleased:
    def __init__(self):
        self.texts, self.calls, self.released = [], [], threading.Event()

    def send(self, from_, to, body, status_callback, media=(), secret=False):
        self.texts.append(to)
        return "SM" + "1" * 32

    def call(self, from_, to, twiml, status_callback):
        self.calls.append(to)
        self.released.wait(10)
        return CALL_SID


def test_a_call_still_in_flight_is_not_placed_again_when_its_text_went_first(tmp_path, clock):
    service = service_with(tmp_path, SERGIO_BOTH)
    service.gateway = gateway = CallsHangUntilReleased()
    service.outbox.senders = relay.SendThreads()
    service.receive(relay.read_inbound({"MessageSid": msid(1), "From": CUSTOMER, "To": LINE, "Body": "tow please"}))
    service.sweeper.sweep()
    wait_until(lambda: len(gateway.texts) == 1 and gateway.calls and len(service.outbox.senders.active) == 1)
    # A second customer's text queues more sends to Sergio, and so more workers for his queue.
    service.receive(
        relay.read_inbound({"MessageSid": msid(2), "From": OTHER_CUSTOMER, "To": LINE, "Body": "fuel please"})
    )
    service.sweeper.sweep()
    outbox = service.outbox
    wait_until(lambda: len(gateway.calls) > 2 or (not outbox.queues.get(SERGIO) and len(outbox.senders.active) == 2))
    assert len(gateway.calls) == 2  # one for each conversation
    gateway.released.set()
    assert service.outbox.senders.shutdown(timeout=10) == 0
    assert gateway.calls == [SERGIO, SERGIO]


def test_a_key_pressed_on_a_call_is_logged_with_the_key(tmp_path, clock, capsys):
    service = service_with(tmp_path)
    service.gateway = gateway = CallsHangUntilReleased()
    gateway.released.set()
    service.receive(relay.read_inbound({"MessageSid": msid(1), "From": CUSTOMER, "To": LINE, "Body": "tow please"}))
    service.sweeper.sweep()
    conv = next(iter(service.store.conversations.values()))
    service.key_pressed(conv.id, 0, {"Digits": "1", "CallSid": CALL_SID}, repeated=False)
    assert [(e["to"], e["digits"]) for e in logged_events(capsys, "call_key")] == [(SERGIO, "1")]


def test_a_take_by_key_press_logs_acknowledged_with_the_contact_and_the_way(tmp_path, clock, capsys):
    service = service_with(tmp_path)
    service.gateway = gateway = CallsHangUntilReleased()
    gateway.released.set()
    service.receive(relay.read_inbound({"MessageSid": msid(1), "From": CUSTOMER, "To": LINE, "Body": "tow please"}))
    service.sweeper.sweep()
    conv = next(iter(service.store.conversations.values()))
    service.key_pressed(conv.id, 0, {"Digits": "1", "CallSid": CALL_SID}, repeated=False)
    acks = logged_events(capsys, "acknowledged")
    assert [(e["contact"], e["way"], e["code"]) for e in acks] == [("Sergio", "call", conv.code)]


def test_pass_by_sms_pages_the_next_contact_at_once(tmp_path, clock):
    service = service_with(tmp_path, relay.Contact("Sergio", SERGIO, 120))
    service.receive(relay.read_inbound({"MessageSid": msid(1), "From": CUSTOMER, "To": LINE, "Body": "tow please"}))
    service.sweeper.sweep()
    twiml = service.receive(
        relay.read_inbound({"MessageSid": msid("pass"), "From": SERGIO, "To": LINE, "Body": "can't"})
    )
    service.sweeper.sweep()
    assert "passed on; Backup is paged now" in twiml
    assert [to for _, to, _ in service.gateway.sent] == [SERGIO, BACKUP]


def test_pass_from_a_contact_not_holding_the_step_changes_nothing(tmp_path, clock):
    service = service_with(tmp_path, relay.Contact("Sergio", SERGIO, 120))
    service.receive(relay.read_inbound({"MessageSid": msid(1), "From": CUSTOMER, "To": LINE, "Body": "tow please"}))
    clock.tick(120)
    service.sweeper.sweep()  # the backup holds the step now
    twiml = service.receive(
        relay.read_inbound({"MessageSid": msid("pass"), "From": SERGIO, "To": LINE, "Body": "#1 pass"})
    )
    assert "is with Backup now; nothing changed" in twiml
    assert service.store.conversations[msid(1)].step == 1


# -- end to end ------------------------------------------------------------------------------------


def call_config(sergio_via="call", primary_wait="1h") -> str:
    return f"""
[relay]
wait = "5m"

[[lines]]
name = "QDN"
number = "{LINE}"
chain = [
  {{ name = "Sergio", phone = "{SERGIO}", wait = "{primary_wait}", via = "{sergio_via}" }},
  {{ name = "Backup", phone = "{BACKUP}" }},
]
"""


def call_callbacks(fake) -> tuple[str, str]:
    """The status callback and the gather action of the first call, as paths on the relay."""
    call = wait_until(lambda: fake.calls)[0]
    gather = ElementTree.fromstring(call["Twiml"]).find("Gather").get("action")
    return call["StatusCallback"].split("://", 1)[1].split("/", 1)[1], gather.split("://", 1)[1].split("/", 1)[1]


def test_an_unanswered_call_pages_the_backup_at_once(start_relay, fake_twilio):
    process = start_relay(call_config())
    process.inbound(CUSTOMER, "anyone?")
    status, _ = call_callbacks(fake_twilio)
    call = fake_twilio.calls[0]
    assert call["From"] == LINE and call["To"] == SERGIO and call["MachineDetection"] == "Enable"
    reported = time.time()
    assert process.post_form("/" + status, {"CallSid": call["sid"], "CallStatus": "no-answer"})[0] == 200
    wait_until(lambda: fake_twilio.delivered(BACKUP), timeout=2)
    assert next(r["at"] for r in fake_twilio.requests if r["form"]["To"] == BACKUP) - reported < 1


@pytest.fixture
def call_answered_late(start_relay, fake_twilio):
    """A call placed whose REST answer Twilio holds back 1.5 s, so that its status callback can come
    first: the relay, the call's status callback (a path on the relay) and its sid."""
    fake_twilio.latency = 1.5
    process = start_relay(call_config())
    process.inbound(CUSTOMER, "anyone?")
    status, _ = call_callbacks(fake_twilio)
    return process, status, fake_twilio.calls[0]["sid"]


def test_a_call_reported_unanswered_before_its_rest_answer_still_pages_the_backup_at_once(
    call_answered_late, fake_twilio
):
    process, status, sid = call_answered_late
    reported = time.time()
    assert process.post_form("/" + status, {"CallSid": sid, "CallStatus": "no-answer"})[0] == 200
    backup = wait_until(lambda: [r for r in fake_twilio.requests if r["form"]["To"] == BACKUP], timeout=5)
    assert backup[0]["at"] - reported < 1
    sent = wait_until(lambda: process.events("relay_sent"), timeout=5)  # the REST answer, stored after it
    assert [e["kind"] for e in sent if e["to"] == SERGIO] == ["call"] and len(fake_twilio.calls) == 1
    assert f"{SERGIO} call not_taken" in process.run("status").stdout  # the REST answer did not undo the report


def test_voicemail_counts_as_unanswered_and_the_call_is_ended(start_relay, fake_twilio):
    process = start_relay(call_config())
    process.inbound(CUSTOMER, "anyone?")
    status, _ = call_callbacks(fake_twilio)
    sid = fake_twilio.calls[0]["sid"]
    process.post_form("/" + status, {"CallSid": sid, "AnsweredBy": "machine_end_beep", "CallStatus": "in-progress"})
    wait_until(lambda: fake_twilio.delivered(BACKUP), timeout=2)
    assert wait_until(lambda: fake_twilio.call_updates)[0] == {"sid": sid, "Status": "completed"}


def test_voicemail_reported_before_the_rest_answer_still_ends_the_call(call_answered_late, fake_twilio):
    process, status, sid = call_answered_late
    process.post_form("/" + status, {"CallSid": sid, "AnsweredBy": "machine_end_beep", "CallStatus": "in-progress"})
    assert wait_until(lambda: fake_twilio.call_updates)[0] == {"sid": sid, "Status": "completed"}


def test_pressing_1_takes_it_and_nobody_else_is_paged(start_relay, fake_twilio):
    process = start_relay(call_config(primary_wait="2s"))
    process.inbound(CUSTOMER, "need a tow")
    _, gather = call_callbacks(fake_twilio)
    status, twiml = process.post_form("/" + gather, {"CallSid": fake_twilio.calls[0]["sid"], "Digits": "1"})
    assert status == 200 and "It is yours. Nobody else is paged." in twiml and "<Hangup" in twiml
    process.inbound(OTHER_CUSTOMER, "me too")  # not taken: its backup page shows the deadline passed
    wait_until(lambda: fake_twilio.delivered(BACKUP), timeout=5)
    assert [OTHER_CUSTOMER in m["Body"] for m in fake_twilio.delivered(BACKUP)] == [True]


def test_pressing_2_passes_it_to_the_backup_at_once(start_relay, fake_twilio):
    process = start_relay(call_config())
    process.inbound(CUSTOMER, "need a tow")
    _, gather = call_callbacks(fake_twilio)
    status, twiml = process.post_form("/" + gather, {"CallSid": fake_twilio.calls[0]["sid"], "Digits": "2"})
    assert status == 200 and "Passed on" in twiml
    wait_until(lambda: fake_twilio.delivered(BACKUP), timeout=2)


def test_another_key_hears_the_prompt_once_more_then_the_call_ends(start_relay, fake_twilio):
    process = start_relay(call_config())
    process.inbound(CUSTOMER, "need a tow")
    _, gather = call_callbacks(fake_twilio)
    _, again = process.post_form("/" + gather, {"CallSid": fake_twilio.calls[0]["sid"], "Digits": "7"})
    action = ElementTree.fromstring(again).find("Gather").get("action")
    assert "Press 1 to take it" in again and "r=1" in action
    _, last = process.post_form("/" + action.split("://", 1)[1].split("/", 1)[1], {"Digits": "9"})
    assert "<Gather" not in last and "<Hangup" in last


def test_a_forged_key_press_is_refused(start_relay, fake_twilio):
    process = start_relay(call_config())
    process.inbound(CUSTOMER, "need a tow")
    _, gather = call_callbacks(fake_twilio)
    params = {"CallSid": fake_twilio.calls[0]["sid"], "Digits": "1"}
    assert process.post_form("/" + gather, params, signature="Zm9yZ2Vk")[0] == 403
    assert process.post_form("/" + gather, params, token="not-the-token")[0] == 403
    assert "1 open conversation" in process.run("status").stdout


def test_an_sms_and_call_step_texts_and_calls(start_relay, fake_twilio):
    process = start_relay(call_config(sergio_via="sms+call"))
    process.inbound(CUSTOMER, "need a tow")
    wait_until(lambda: fake_twilio.delivered(SERGIO) and fake_twilio.calls)
    assert "call sent" in process.run("status").stdout


def test_pass_and_list_by_sms_end_to_end(start_relay, fake_twilio):
    process = start_relay(call_config(sergio_via="sms"))
    process.inbound(CUSTOMER, "need a tow")
    wait_until(lambda: fake_twilio.delivered(SERGIO))
    assert f"#1 {CUSTOMER} need a tow" in process.inbound(SERGIO, "?")[1]
    assert "passed on" in process.inbound(SERGIO, "pass")[1]
    wait_until(lambda: fake_twilio.delivered(BACKUP), timeout=2)
    barrier(process, fake_twilio)


def test_the_dry_run_walk_through_of_a_call(tmp_path):
    process = RelayProcess(tmp_path, None, call_config(), dry_run=True, env={"TWILIO_AUTH_TOKEN": TOKEN})
    process.env.pop("RELAY_PUBLIC_URL")
    process.start()
    try:
        sent = process.run("send", "--from", CUSTOMER, "--to", LINE, "--body", "dock 4, engine dead")
        assert sent.returncode == 0, sent.stderr
        outbox = process.state_dir / "outbox.jsonl"
        call = wait_until(lambda: outbox.exists() and [json.loads(x) for x in outbox.read_text().splitlines()])[0]
        assert call["kind"] == "call" and "dock 4, engine dead" in call["twiml"]
        pressed = process.run("press", "1")
        assert pressed.returncode == 0 and "It is yours" in pressed.stdout, pressed.stderr
        assert process.run("status").stdout.startswith("0 open")
    finally:
        process.stop()


def test_calls_have_their_own_hourly_cap_and_a_held_call_goes_out_later(tmp_path, clock):
    from conftest import RunAtOnce, make_relay

    line = relay.Line("QDN", LINE, (SERGIO_CALL, BACKUP_C))
    config = relay.Config(lines=(line,), public_url="https://relay.example.com", call_hourly_cap=1)
    service = make_relay(tmp_path / "state", config)
    service.outbox.senders = RunAtOnce()
    calls = []
    service.gateway.call = lambda from_, to, twiml, callback: calls.append(to) or "CA" + "9" * 32
    for n, sender in enumerate([CUSTOMER, OTHER_CUSTOMER]):
        service.receive(relay.read_inbound({"MessageSid": msid(n), "From": sender, "To": LINE, "Body": "help"}))
    service.sweeper.sweep()
    first_pages = sorted((c.pages[0].state, c.pages[0].error) for c in service.store.conversations.values())
    assert calls == [SERGIO] and first_pages == [("held", "outbound cap"), ("sent", None)]
    clock.tick(3601)
    service.housekeeping()
    service.sweeper.sweep()
    assert calls == [SERGIO, SERGIO]


def test_a_key_press_1_after_another_contact_took_it_leaves_it_theirs(tmp_path, clock):
    service = service_with(tmp_path)
    service.gateway = gateway = CallsHangUntilReleased()
    gateway.released.set()
    service.receive(relay.read_inbound({"MessageSid": msid(1), "From": CUSTOMER, "To": LINE, "Body": "tow please"}))
    service.sweeper.sweep()
    clock.tick(120)
    service.sweeper.sweep()  # the backup is paged, and takes it
    service.receive(relay.read_inbound({"MessageSid": msid("take"), "From": BACKUP, "To": LINE, "Body": "ok"}))
    words = service.key_pressed(msid(1), 0, {"Digits": "1", "CallSid": CALL_SID}, repeated=False)
    assert "It was already taken by Backup." in words
    assert service.store.conversations[msid(1)].acknowledged_by == "Backup"


def test_list_names_only_the_conversations_paged_to_the_contact_who_asks(tmp_path, clock):
    service = service_with(tmp_path, relay.Contact("Sergio", SERGIO, 120))
    service.receive(relay.read_inbound({"MessageSid": msid(1), "From": CUSTOMER, "To": LINE, "Body": "tow please"}))
    clock.tick(120)
    service.sweeper.sweep()  # this one has reached the backup too
    service.receive(
        relay.read_inbound({"MessageSid": msid(2), "From": OTHER_CUSTOMER, "To": LINE, "Body": "fuel please"})
    )
    service.sweeper.sweep()  # this one only Sergio
    listed = service.receive(
        relay.read_inbound({"MessageSid": msid("list"), "From": BACKUP, "To": LINE, "Body": "list"})
    )
    assert "1 open for you" in listed and CUSTOMER in listed and OTHER_CUSTOMER not in listed
