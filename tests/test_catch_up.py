"""Catch-up: texts Twilio received that never reached the webhook are found by listing them, and handled once."""

import time

import pytest
from conftest import (
    ACCOUNT,
    BACKUP,
    CUSTOMER,
    LINE,
    OTHER_CUSTOMER,
    SERGIO,
    TOKEN,
    RelayProcess,
    barrier,
    config_text,
    wait_until,
)
from freezegun import freeze_time

import relay as relay_module

pytestmark = pytest.mark.both_stores  # the shared behaviour suite: run on each store

EVERY_SECOND = 'catch_up = "1s"'


def pages_with(fake, phone: str, text: str) -> list[dict]:
    return [m for m in fake.delivered(phone) if text in m["Body"]]


def test_texts_that_arrived_while_the_relay_was_down_are_paged_once_when_it_starts(start_relay, fake_twilio):
    fake_twilio.receive(CUSTOMER, LINE, "engine won't start", ago=120)
    fake_twilio.receive(OTHER_CUSTOMER, LINE, "can I book for 9?", ago=30)
    relay = start_relay(config_text(extra_relay=EVERY_SECOND))
    wait_until(lambda: len(fake_twilio.delivered(SERGIO)) == 2)
    (late,) = pages_with(fake_twilio, SERGIO, "engine won't start")
    assert f"from {CUSTOMER} (received 2 min ago)" in late["Body"]
    wait_until(lambda: len(fake_twilio.list_requests) >= 3)  # more passes: each text still paged once
    barrier(relay, fake_twilio)
    assert len(fake_twilio.delivered(SERGIO)) == 3  # the two, then the barrier's
    assert [e["handled_as"] for e in relay.events("inbound_caught_up")] == ["inbound_accepted"] * 2


def test_a_text_both_posted_and_listed_is_paged_once(start_relay, fake_twilio):
    relay = start_relay(config_text(extra_relay=EVERY_SECOND))
    sid = fake_twilio.receive(CUSTOMER, LINE, "dock 3 please")
    assert relay.inbound(CUSTOMER, "dock 3 please", sid=sid)[0] == 200
    asked = len(fake_twilio.list_requests)
    wait_until(lambda: len(fake_twilio.list_requests) >= asked + 2)
    barrier(relay, fake_twilio)
    assert len(pages_with(fake_twilio, SERGIO, "dock 3 please")) == 1
    # Handled once, by whichever came first (a pass may start before the webhook's post arrives).
    handled = relay.events("inbound_caught_up") + relay.events("inbound_accepted")
    assert [e["message_sid"] for e in handled].count(sid) == 1


def test_a_known_text_does_not_end_the_pass_before_an_older_one_it_missed(start_relay, fake_twilio):
    relay = start_relay(config_text(extra_relay=EVERY_SECOND))
    wait_until(lambda: fake_twilio.list_requests)  # the first pass is over
    fake_twilio.receive(CUSTOMER, LINE, "older, missed by the webhook", ago=30)
    newer = fake_twilio.receive(OTHER_CUSTOMER, LINE, "newer, posted")
    relay.inbound(OTHER_CUSTOMER, "newer, posted", sid=newer)
    wait_until(lambda: pages_with(fake_twilio, SERGIO, "older, missed by the webhook"))


def test_a_contacts_reply_found_only_by_catch_up_acknowledges_and_is_confirmed_by_sms(start_relay, fake_twilio):
    relay = start_relay(config_text(primary_wait="1h", extra_relay=EVERY_SECOND))
    relay.inbound(CUSTOMER, "need fuel")
    wait_until(lambda: fake_twilio.delivered(SERGIO))
    fake_twilio.receive(SERGIO, LINE, "#1 on it")
    confirmation = wait_until(lambda: pages_with(fake_twilio, SERGIO, "Thanks Sergio"))
    assert "Nobody else is paged" in confirmation[0]["Body"]
    assert relay.run("status").stdout.startswith("0 open")


def test_photos_of_a_caught_up_text_are_passed_on_as_the_webhook_would_give_them(start_relay, fake_twilio):
    sid = fake_twilio.receive(CUSTOMER, LINE, "look at this hull", media=2)
    start_relay(config_text())
    (page,) = wait_until(lambda: fake_twilio.delivered(SERGIO))
    media = [m["form"].get("MediaUrl") for m in fake_twilio.requests if m["form"]["To"] == SERGIO]
    base = f"https://api.twilio.com/2010-04-01/Accounts/{ACCOUNT}/Messages/{sid}/Media/ME"
    assert media[0].startswith(base) and "[2 photos]" in page["Body"]


@pytest.mark.json_only  # the pass's reading window is the relay's own: no store keeps it differently
def test_list_faults_are_logged_and_survived(start_relay, fake_twilio):
    fake_twilio.list_faults.extend([(500, 20500), (429, 20429), (401, 20003)])
    fake_twilio.receive(CUSTOMER, LINE, "still there?")
    relay = start_relay(config_text(extra_relay=EVERY_SECOND))
    wait_until(lambda: pages_with(fake_twilio, SERGIO, "still there?"), timeout=15)
    assert [e["status"] for e in relay.events("catch_up_failed")] == [500, 429, 401]
    assert [e["level"] for e in relay.events("catch_up_failed")] == ["warning", "warning", "error"]
    assert relay.get("/healthz")[0] == 200
    assert "relay_catch_up_failures_total 3.0" in relay.get("/metrics")[1]


def test_status_says_the_last_catch_up_pass_failed(start_relay, fake_twilio):
    fake_twilio.list_faults.extend([(500, 20500)] * 100)
    relay = start_relay(config_text(extra_relay=EVERY_SECOND))
    # A pass is noted after its failure is logged: once the second has failed, the first is noted.
    wait_until(lambda: len(relay.events("catch_up_failed")) >= 2)
    assert "failed (tried again at the next pass)" in relay.run("status").stdout


def test_status_says_when_no_catch_up_pass_has_run(start_relay, fake_twilio):
    relay = start_relay(config_text(extra_relay="catch_up = 0"))
    assert "last catch-up: none yet" in relay.run("status").stdout


def test_catch_up_zero_makes_no_list_call(start_relay, fake_twilio):
    fake_twilio.receive(CUSTOMER, LINE, "missed text")
    relay = start_relay(config_text(extra_relay="catch_up = 0"))
    barrier(relay, fake_twilio)
    assert fake_twilio.list_requests == []
    assert pages_with(fake_twilio, SERGIO, "missed text") == []


def test_dry_run_makes_no_list_call(start_relay, fake_twilio):
    relay = start_relay(config_text(), dry_run=True, env={"TWILIO_API_BASE_URL": fake_twilio.url})
    assert relay.inbound(CUSTOMER, "hello")[0] == 200
    wait_until(lambda: (relay.state_dir / "outbox.jsonl").exists())
    assert fake_twilio.list_requests == [] and relay.events("catch_up_failed") == []


def test_nothing_older_than_the_window_is_caught_up(start_relay, fake_twilio):
    fake_twilio.receive(CUSTOMER, LINE, "two hours ago", ago=7200)
    fake_twilio.receive(OTHER_CUSTOMER, LINE, "half an hour ago", ago=1800)
    relay = start_relay(config_text(extra_relay='catch_up_window = "1h"'))
    wait_until(lambda: pages_with(fake_twilio, SERGIO, "half an hour ago"))
    barrier(relay, fake_twilio)
    assert pages_with(fake_twilio, SERGIO, "two hours ago") == []
    first = fake_twilio.list_requests[0]["DateSent>"]
    looked_back = time.time() - (time.mktime(time.strptime(first, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone)
    assert 3600 <= looked_back < 3600 + 60


@pytest.mark.json_only  # the pass's reading window is the relay's own: no store keeps it differently
def test_each_pass_reads_back_only_a_little_before_the_previous_began(start_relay, fake_twilio):
    start_relay(config_text(extra_relay=EVERY_SECOND))
    wait_until(lambda: len(fake_twilio.list_requests) >= 2)
    first, second = (r["DateSent>"] for r in fake_twilio.list_requests[:2])
    seconds = [time.mktime(time.strptime(s, "%Y-%m-%dT%H:%M:%SZ")) for s in (first, second)]
    assert seconds[1] - seconds[0] >= 24 * 3600 - relay_module.CATCH_UP_OVERLAP - 5


def test_outbound_messages_to_the_line_and_texts_to_other_numbers_are_ignored(start_relay, fake_twilio):
    fake_twilio.receive(SERGIO, LINE, "an outbound text to the line", direction="outbound-api")
    fake_twilio.receive(CUSTOMER, "+16195559999", "to another number of the account")
    relay = start_relay(config_text())
    wait_until(lambda: fake_twilio.list_requests)
    barrier(relay, fake_twilio)
    assert len(fake_twilio.delivered()) == 1  # the barrier's page only
    assert relay.events("inbound_caught_up") == []


def test_a_caught_up_text_is_counted_and_status_shows_the_last_pass(start_relay, fake_twilio):
    fake_twilio.receive(CUSTOMER, LINE, "late one")
    relay = start_relay(config_text(extra_relay=EVERY_SECOND))
    wait_until(lambda: pages_with(fake_twilio, SERGIO, "late one"))
    assert 'relay_inbound_total{kind="caught_up"} 1.0' in relay.get("/metrics")[1]
    assert "last catch-up: " in relay.run("status").stdout and ", ok" in relay.run("status").stdout


def test_the_chain_of_a_caught_up_text_starts_when_it_is_caught_up(start_relay, fake_twilio):
    fake_twilio.receive(CUSTOMER, LINE, "hours ago", ago=3 * 3600)
    start_relay(config_text(primary_wait="2s"))
    wait_until(lambda: fake_twilio.delivered(SERGIO))
    paged = next(r["at"] for r in fake_twilio.requests if r["form"]["To"] == SERGIO)
    wait_until(lambda: fake_twilio.delivered(BACKUP), timeout=6)
    backup = next(r["at"] for r in fake_twilio.requests if r["form"]["To"] == BACKUP)
    assert 1 <= backup - paged <= 3


@pytest.mark.parametrize(("late", "said"), [(59, "1 min ago"), (12 * 60, "12 min ago"), (3 * 3600 + 300, "3 h 5 min")])
def test_a_caught_up_page_says_how_long_ago_the_text_arrived(late, said):
    qdn = relay_module.Line("QDN", LINE, (relay_module.Contact("Sergio", SERGIO, 60),))
    with freeze_time("2026-11-28 12:00:00"):
        now = time.time()
        conv = relay_module.start_conversation(
            qdn, relay_module.Config(lines=(qdn,)), "SM" + "a" * 32, CUSTOMER, "hi", "1", now, received_at=now - late
        )
    assert f"(received {said}" in conv.pages[0].body


def test_check_live_says_whether_the_credentials_may_list_texts(tmp_path, fake_twilio):
    fake_twilio.add_number(LINE, "http://127.0.0.1/api/sms/inbound")
    process = RelayProcess(tmp_path, fake_twilio, config_text(), env={"TWILIO_AUTH_TOKEN": TOKEN})
    out = process.run("check", "--live").stdout
    assert "may list received texts" in out


@pytest.mark.json_only  # the pass's reading window is the relay's own: no store keeps it differently
def test_catch_up_never_reads_past_its_window_even_after_list_calls_failed_for_longer(start_relay, fake_twilio):
    fake_twilio.list_faults.extend([(500, 20500)] * 4)  # four passes, a second apart: twice the window
    start_relay(config_text(extra_relay=f'{EVERY_SECOND}\ncatch_up_window = "2s"'))
    wait_until(lambda: len(fake_twilio.list_requests) >= 5, timeout=10)
    read_from = fake_twilio.list_requests[4]["DateSent>"]
    since = time.mktime(time.strptime(read_from, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    assert time.time() - since <= 2 + 1.5


@pytest.mark.json_only  # the pass's reading window is the relay's own: no store keeps it differently
def test_a_live_edit_to_catch_up_0_stops_catch_up(start_relay, fake_twilio):
    relay = start_relay(config_text(extra_relay=EVERY_SECOND))
    wait_until(lambda: len(fake_twilio.list_requests) >= 2)
    (relay.workdir / "config.toml").write_text(config_text(extra_relay="catch_up = 0"))
    wait_until(lambda: relay.events("config_reloaded"), timeout=5)
    time.sleep(1.1)  # a pass already waiting ends
    asked = len(fake_twilio.list_requests)
    time.sleep(1.5)  # a period and a half of the old setting
    assert len(fake_twilio.list_requests) == asked


@pytest.mark.json_only  # the pass's reading window is the relay's own: no store keeps it differently
def test_after_a_failed_list_call_the_next_pass_reads_back_as_far_as_the_failed_one_would_have(
    start_relay, fake_twilio
):
    start_relay(config_text(extra_relay=EVERY_SECOND))
    wait_until(lambda: len(fake_twilio.list_requests) >= 2)  # passes that went through
    fake_twilio.list_faults.extend([(500, 20500)] * 3)
    failed_from = len(fake_twilio.list_requests)
    wait_until(lambda: len(fake_twilio.list_requests) >= failed_from + 4, timeout=8)
    read_from = [q["DateSent>"] for q in fake_twilio.list_requests[failed_from : failed_from + 4]]
    assert len(set(read_from)) == 1  # each retry, and the pass that went through, read from the same time


def test_a_pass_reads_every_page_of_the_list_back_to_the_last(start_relay, fake_twilio):
    for n in range(relay_module.CATCH_UP_PAGE + 5):  # more than one page, all missed by the webhook
        fake_twilio.receive(f"+1555{n:07d}", LINE, f"text {n}", ago=60 - n * 0.5)
    start_relay(config_text(extra_relay=EVERY_SECOND))
    wait_until(lambda: len(fake_twilio.delivered(SERGIO)) == relay_module.CATCH_UP_PAGE + 5, timeout=15)
