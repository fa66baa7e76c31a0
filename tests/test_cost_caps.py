"""Cost guards: texts over a cap are held and go out as the cap allows; nothing is dropped."""

import sys

import pytest
from conftest import ALARM, CUSTOMER, LINE, SERGIO, RunAtOnce, make_relay, msid
from freezegun import freeze_time

import relay

QDN = relay.Line("QDN", LINE, (relay.Contact("Sergio", SERGIO, 60),))
FLOODER = "+15550000009"


@pytest.fixture
def clock():
    with freeze_time("2026-11-27 12:00:00") as frozen:
        yield frozen


def capped_relay(tmp_path, sender_cap=100, outbound_cap=100, alarm=ALARM, line=QDN) -> relay.Relay:
    config = relay.Config(
        lines=(line,), sender_hourly_cap=sender_cap, outbound_hourly_cap=outbound_cap, alarm_phone=alarm
    )
    service = make_relay(tmp_path / "state", config)
    service.outbox.senders = RunAtOnce()
    return service


def text(service: relay.Relay, sender: str, n: int, body: str | None = None) -> str:
    sid = msid(f"{sender}-{n}")
    service.receive(relay.read_inbound({"MessageSid": sid, "From": sender, "To": LINE, "Body": body or f"text {n}"}))
    service.sweeper.sweep()
    return sid


def an_hour_later(service: relay.Relay, clock) -> None:
    clock.tick(3601)
    service.housekeeping()
    for _ in range(100):  # pass after pass, as the sweeper's thread runs them, until one is not full
        if service.sweeper.sweep() != service.sweeper.last_sweep:
            return


def sent_to(service: relay.Relay, phone: str) -> list[str]:
    return [body for _, to, body in service.gateway.sent if to == phone]


def cap_alarms(service: relay.Relay) -> list[str]:
    return [body for body in sent_to(service, ALARM) if "cap of" in body]


def acknowledge(service: relay.Relay, body: str = "ok") -> None:
    service.receive(relay.read_inbound({"MessageSid": msid(f"ack {body}"), "From": SERGIO, "To": LINE, "Body": body}))
    service.sweeper.sweep()


def held_after_a_first_text_was_taken(tmp_path) -> tuple[relay.Relay, relay.Conversation]:
    """With a sender cap of 1: the flooder's first text, taken by Sergio, then a second one, held."""
    service = capped_relay(tmp_path, sender_cap=1)
    text(service, FLOODER, 0)
    acknowledge(service)
    return service, service.store.conversations[text(service, FLOODER, 1)]


def test_a_text_over_the_sender_cap_is_held_not_sent(tmp_path, clock):
    service, held = held_after_a_first_text_was_taken(tmp_path)
    assert held.status == "held" and held.pages[0].state == "held" and held.pages[0].error == "sender cap"
    assert sent_to(service, SERGIO) == [service.gateway.sent[0][2]]


def test_a_held_text_is_paged_as_soon_as_the_sender_cap_allows(tmp_path, clock):
    service, held = held_after_a_first_text_was_taken(tmp_path)
    an_hour_later(service, clock)
    assert held.status == "open" and held.pages[0].state == "sent"
    assert "text 1" in sent_to(service, SERGIO)[-1]


def test_a_released_chain_waits_its_full_step_from_the_release(tmp_path, clock):
    service, held = held_after_a_first_text_was_taken(tmp_path)
    an_hour_later(service, clock)
    assert held.step_started == relay.time.time() and held.deadline == relay.time.time() + 60


def test_held_texts_of_one_customer_go_out_joined_in_one_page(tmp_path, clock):
    service = capped_relay(tmp_path, sender_cap=1)
    text(service, FLOODER, 0)
    acknowledge(service)
    text(service, FLOODER, 1, "first held")
    text(service, FLOODER, 2, "second held")
    before = len(sent_to(service, SERGIO))
    an_hour_later(service, clock)
    pages = sent_to(service, SERGIO)[before:]
    assert len(pages) == 1 and "first held" in pages[0] and "second held" in pages[0]


def test_a_held_text_acknowledged_meanwhile_is_never_sent(tmp_path, clock):
    service, held = held_after_a_first_text_was_taken(tmp_path)
    acknowledge(service, f"#{held.code}")
    before = len(sent_to(service, SERGIO))
    an_hour_later(service, clock)
    assert held.status == "acknowledged" and held.pages[0].state == "cancelled"
    assert len(sent_to(service, SERGIO)) == before


def test_follow_ups_over_the_sender_cap_are_held_then_relayed(tmp_path, clock):
    service = capped_relay(tmp_path, sender_cap=2)
    for n in range(4):
        text(service, FLOODER, n)
    assert len(sent_to(service, SERGIO)) == 2
    an_hour_later(service, clock)
    relayed = sent_to(service, SERGIO)
    assert len(relayed) == 4 and "text 2" in relayed[2] and "text 3" in relayed[3]


def test_other_senders_are_relayed_while_one_is_over_its_cap(tmp_path, clock):
    service = capped_relay(tmp_path, sender_cap=1)
    text(service, FLOODER, 0)
    text(service, FLOODER, 1)
    text(service, CUSTOMER, 2)
    assert any(CUSTOMER in body for body in sent_to(service, SERGIO))


def test_pages_over_the_outbound_cap_are_held_then_sent_oldest_first(tmp_path, clock):
    service = capped_relay(tmp_path, outbound_cap=2)
    senders = ["+15550000001", "+15550000002", "+15550000003", "+15550000004"]
    sids = []
    for n, sender in enumerate(senders):
        sids.append(text(service, sender, n))
        clock.tick(1)
    pages = [body for body in sent_to(service, SERGIO) if "held by a cost cap" not in body]
    assert len(pages) == 2
    held = service.store.conversations[sids[2]]
    assert held.pages[0].state == "held" and held.pages[0].error == "outbound cap"
    an_hour_later(service, clock)
    pages = [body for body in sent_to(service, SERGIO) if "held by a cost cap" not in body]
    assert [senders.index(next(s for s in senders if s in body)) for body in pages] == [0, 1, 2, 3]


def test_a_flood_of_follow_ups_leaves_room_for_a_new_customers_first_page(tmp_path, clock):
    service = capped_relay(tmp_path, outbound_cap=8)
    for n in range(12):
        text(service, FLOODER, n)
    followups = [body for body in sent_to(service, SERGIO) if "(more)" in body]
    assert len(followups) == 8 * relay.FOLLOWUP_SHARE - 1  # the share, less the flood's own first page
    text(service, CUSTOMER, 99, "my engine is on fire")
    assert any("my engine is on fire" in body for body in sent_to(service, SERGIO))


def test_the_cap_alarm_goes_out_even_when_the_outbound_cap_is_spent(tmp_path, clock):
    service = capped_relay(tmp_path, outbound_cap=1)
    text(service, "+15550000001", 0)
    text(service, "+15550000002", 1)
    assert len(cap_alarms(service)) == 1


def test_the_contact_on_duty_gets_a_bundle_of_held_texts_at_most_every_ten_minutes(tmp_path, clock):
    service = capped_relay(tmp_path, outbound_cap=1)
    text(service, "+15550000001", 0)
    text(service, "+15550000002", 1, "mooring line snapped")
    text(service, "+15550000003", 2, "fuel dock closed")
    service.housekeeping()
    service.sweeper.sweep()
    bundles = [body for body in sent_to(service, SERGIO) if "held by a cost cap" in body]
    assert len(bundles) == 1
    assert "#2 +15550000002 mooring line snapped" in bundles[0] and "#3 +15550000003 fuel dock" in bundles[0]
    clock.tick(599)
    service.housekeeping()
    service.sweeper.sweep()
    assert len([body for body in sent_to(service, SERGIO) if "held by a cost cap" in body]) == 1
    clock.tick(1)
    service.housekeeping()
    service.sweeper.sweep()
    assert len([body for body in sent_to(service, SERGIO) if "held by a cost cap" in body]) == 2


def test_a_bundle_fits_one_sms_and_counts_what_it_could_not_name(clock):
    convs = [
        relay.start_conversation(QDN, relay.Config(lines=(QDN,)), msid(n), f"+1555000{n:04d}", "x" * 60, str(n), 0)
        for n in range(100)
    ]
    body = relay.bundle_text("QDN", convs)
    named = [row for row in body.split("\n") if row.startswith("#")]
    assert relay.utf16_len(body) <= 1600 and 0 < len(named) < 100
    assert body.endswith(f"... and {100 - len(named)} more")


def test_operator_is_told_once_not_once_per_held_text(tmp_path, clock):
    service = capped_relay(tmp_path, sender_cap=1)
    for n in range(5):
        text(service, FLOODER, n)
    alarms = cap_alarms(service)
    assert len(alarms) == 1 and "sender cap of 1" in alarms[0]


def test_operator_is_told_again_once_an_hour_has_passed(tmp_path, clock):
    service = capped_relay(tmp_path, sender_cap=1)
    text(service, FLOODER, 0)
    text(service, FLOODER, 1)
    clock.tick(3600)
    text(service, FLOODER, 2)
    text(service, FLOODER, 3)
    assert len(cap_alarms(service)) == 2


def test_sender_cap_counts_only_the_past_hour(tmp_path, clock):
    service = capped_relay(tmp_path, sender_cap=1)
    text(service, FLOODER, 0)
    clock.tick(3601)
    text(service, FLOODER, 1)
    assert len(sent_to(service, SERGIO)) == 2


def test_a_live_two_way_conversation_is_never_cut_off_by_the_sender_cap(tmp_path, clock):
    two_way = relay.Line("QDN", LINE, QDN.chain, reply_to_sender=True)
    service = capped_relay(tmp_path, sender_cap=2, line=two_way)
    text(service, CUSTOMER, 0)
    acknowledge(service, "On my way, which slip?")
    for n in range(1, 6):
        text(service, CUSTOMER, n, f"slip {n}")
    assert sum("slip" in body for body in sent_to(service, SERGIO)) == 5


def test_a_live_two_way_conversation_survives_a_fold(tmp_path, clock):
    two_way = relay.Line("QDN", LINE, QDN.chain, reply_to_sender=True)
    service = capped_relay(tmp_path, line=two_way)
    text(service, CUSTOMER, 0)
    acknowledge(service, "On my way, which slip?")
    service.store.folded_at -= 2 * 3600  # the hourly fold is due
    service.housekeeping()
    text(service, CUSTOMER, 1, "slip 12")
    assert len(service.store.conversations) == 1 and sent_to(service, SERGIO)[-1].endswith("slip 12")


def test_quiet_senders_are_forgotten_once_their_hour_has_passed(tmp_path, clock):
    service = capped_relay(tmp_path)
    for n in range(50):
        text(service, f"+1555100{n:04d}", n)
    assert len([key for key in service.store.caps.times if key.startswith("sender:")]) == 50
    an_hour_later(service, clock)
    assert service.store.caps.times == {}


def test_look_ups_shrink_back_once_a_flood_of_senders_is_archived_and_forgotten(tmp_path, clock):
    service = capped_relay(tmp_path, outbound_cap=10_000)
    empty, listed = sys.getsizeof({}), sys.getsizeof(dict.fromkeys(range(relay.UNANSWERED_LISTED)))
    for n in range(600):  # 600 conversations archived and 600 senders forgotten: over the 1,000 that trims
        text(service, f"+1555100{n:04d}", n)
    assert sys.getsizeof(service.store.open_by_sender) > 10 * empty
    an_hour_later(service, clock)  # every chain has ended unanswered
    an_hour_later(service, clock)  # archived but the newest unanswered, and the senders' hour is over
    assert len(service.store.conversations) == relay.UNANSWERED_LISTED
    assert sys.getsizeof(service.store.open_by_sender) == empty
    assert sys.getsizeof(service.store.conversations) <= listed


def test_a_flood_that_ran_out_unanswered_keeps_only_the_newest_listed(tmp_path, clock):
    service = capped_relay(tmp_path, outbound_cap=10_000)
    for n in range(relay.UNANSWERED_LISTED + 5):
        text(service, f"+1555100{n:04d}", n)
        clock.tick(1)
    an_hour_later(service, clock)
    an_hour_later(service, clock)
    kept = sorted(c.sender for c in service.store.unfinished())
    assert kept == [f"+1555100{n:04d}" for n in range(5, relay.UNANSWERED_LISTED + 5)]


def test_held_texts_are_listed_by_status(tmp_path, clock, capsys, monkeypatch):
    service, _ = held_after_a_first_text_was_taken(tmp_path)
    monkeypatch.setenv("RELAY_STATE_DIR", str(service.store.dir))
    assert relay.main(["status"]) == 0
    out = capsys.readouterr().out
    assert "0 open" in out and f"#2 from {FLOODER}" in out and "1 text(s) HELD" in out


def test_retries_are_not_counted_against_the_outbound_cap(tmp_path, clock):
    service = capped_relay(tmp_path, outbound_cap=2)
    recorder, failures = service.gateway, [relay.SendError("twilio 503", permanent=False)] * 3

    def flaky_send(*args, **kwargs):
        if failures:
            raise failures.pop()
        return recorder.send(*args, **kwargs)

    service.gateway = type("Flaky", (), {"send": staticmethod(flaky_send)})()
    service.gateway.sent = recorder.sent
    text(service, "+15550000001", 0)
    for _ in range(3):
        clock.tick(5)
        service.sweeper.sweep()
    text(service, "+15550000002", 1)
    assert [to for _, to, _ in recorder.sent] == [SERGIO, SERGIO] and cap_alarms(service) == []


def test_a_send_that_crashes_leaves_the_recipients_later_pages_going(tmp_path, clock):
    service = capped_relay(tmp_path)
    real_send, crashes = service.outbox._send, [RuntimeError("a bug in one send")]

    def crashing_once(conv_id, index):
        if crashes:
            raise crashes.pop()
        return real_send(conv_id, index)

    service.outbox._send = crashing_once
    text(service, "+15550000001", 0)  # its page crashes...
    text(service, "+15550000002", 1)  # ...and the next for the same contact still goes
    clock.tick(2)
    service.sweeper.sweep()  # the crashed one is tried again after a backoff
    assert sorted(body.split(":")[0] for body in sent_to(service, SERGIO)) == [
        "QDN #1 from +15550000001",
        "QDN #2 from +15550000002",
    ]


def test_the_bundle_goes_to_the_contact_on_duty_not_the_first_while_his_hours_say_he_is_off(tmp_path, clock):
    from conftest import BACKUP

    day_only = relay.Line(
        "QDN", LINE, (relay.Contact("Sergio", SERGIO, 60, hours="06:00-10:00"), relay.Contact("Backup", BACKUP, 60))
    )
    service = capped_relay(tmp_path, outbound_cap=1, line=day_only)  # at 12:00 UTC Sergio is off
    text(service, "+15550000001", 0)
    text(service, "+15550000002", 1, "mooring line snapped")
    service.housekeeping()
    service.sweeper.sweep()
    assert any("held by a cost cap" in body for body in sent_to(service, BACKUP))
    assert not any("held by a cost cap" in body for body in sent_to(service, SERGIO))
