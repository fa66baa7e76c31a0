"""Cost guards: floods and toll fraud are stored, not relayed, and the operator is told once."""

import pytest
from conftest import ALARM, LINE, SERGIO, RunAtOnce, make_relay
from freezegun import freeze_time

import relay

QDN = relay.Line("QDN", LINE, (relay.Contact("Sergio", SERGIO, 60),))


@pytest.fixture
def clock():
    with freeze_time("2026-11-27 12:00:00") as frozen:
        yield frozen


def capped_relay(tmp_path, sender_cap=100, outbound_cap=100, alarm=ALARM) -> relay.Relay:
    config = relay.Config(
        lines=(QDN,), sender_hourly_cap=sender_cap, outbound_hourly_cap=outbound_cap, alarm_phone=alarm
    )
    service = make_relay(tmp_path / "state", config)
    service.senders = RunAtOnce()
    return service


def text(service: relay.Relay, sender: str, n: int) -> None:
    service.receive({"MessageSid": f"SM{sender[-4:]}{n:04d}", "From": sender, "To": LINE, "Body": f"text {n}"})
    service.sweep()


def sent_to(service: relay.Relay, phone: str) -> list[str]:
    return [body for _, to, body in service.gateway.sent if to == phone]


def cap_alarms(service: relay.Relay) -> list[str]:
    return [body for body in sent_to(service, ALARM) if "cap of" in body]


def acknowledge_all(service: relay.Relay) -> None:
    service.receive({"MessageSid": "SMack", "From": SERGIO, "To": LINE, "Body": "ok"})


def test_new_texts_over_the_sender_cap_are_stored_but_not_relayed(tmp_path, clock):
    service = capped_relay(tmp_path, sender_cap=1)
    text(service, "+15550000009", 0)
    acknowledge_all(service)
    text(service, "+15550000009", 1)
    held = service.store.conversations["SM00090001"]
    assert held.status == "held" and held.messages[0]["body"] == "text 1"
    assert held.pages[0].state == "held"
    assert len(sent_to(service, SERGIO)) == 1


def test_other_senders_are_relayed_while_one_is_over_its_cap(tmp_path, clock):
    service = capped_relay(tmp_path, sender_cap=1)
    text(service, "+15550000009", 0)
    text(service, "+15550000009", 1)
    text(service, "+15550000001", 2)
    assert any("+15550000001" in body for body in sent_to(service, SERGIO))


def test_follow_ups_over_the_sender_cap_join_without_being_relayed(tmp_path, clock):
    service = capped_relay(tmp_path, sender_cap=2)
    for n in range(4):
        text(service, "+15550000009", n)
    conv = service.store.conversations["SM00090000"]
    assert [m["body"] for m in conv.messages] == ["text 0", "text 1", "text 2", "text 3"]
    assert len(sent_to(service, SERGIO)) == 2


def test_operator_is_told_once_not_once_per_held_text(tmp_path, clock):
    service = capped_relay(tmp_path, sender_cap=1)
    for n in range(5):
        text(service, "+15550000009", n)
    alarms = cap_alarms(service)
    assert len(alarms) == 1 and "sender cap of 1" in alarms[0]


def test_operator_is_told_again_after_an_hour(tmp_path, clock):
    service = capped_relay(tmp_path, sender_cap=1)
    text(service, "+15550000009", 0)
    text(service, "+15550000009", 1)
    clock.tick(3601)
    text(service, "+15550000009", 2)
    text(service, "+15550000009", 3)
    assert len(cap_alarms(service)) == 2


def test_sender_cap_counts_only_the_past_hour(tmp_path, clock):
    service = capped_relay(tmp_path, sender_cap=1)
    text(service, "+15550000009", 0)
    clock.tick(3601)
    text(service, "+15550000009", 1)
    assert len(sent_to(service, SERGIO)) == 2


def test_pages_over_the_outbound_cap_are_held(tmp_path, clock):
    service = capped_relay(tmp_path, outbound_cap=2)
    for n, sender in enumerate(["+15550000001", "+15550000002", "+15550000003", "+15550000004"]):
        text(service, sender, n)
    assert len(sent_to(service, SERGIO)) == 2
    held = service.store.conversations["SM00030002"]
    assert held.pages[0].state == "held" and held.pages[0].error == "outbound cap"
    assert len(cap_alarms(service)) == 1


def test_held_texts_are_listed_by_status(tmp_path, clock, capsys, monkeypatch):
    service = capped_relay(tmp_path, sender_cap=1)
    text(service, "+15550000009", 0)
    acknowledge_all(service)
    text(service, "+15550000009", 1)
    monkeypatch.setenv("RELAY_STATE_DIR", str(service.store.dir))
    assert relay.main(["status"]) == 0
    out = capsys.readouterr().out
    assert "0 open" in out and "#2 from +15550000009" in out and "HELD" in out
