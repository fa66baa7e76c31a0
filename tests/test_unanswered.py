"""A chain that runs out: somebody is told, the text stays listed, and it can still be taken."""

import time

import pytest
from conftest import BACKUP, CUSTOMER, SERGIO, config_text, msid, wait_until
from freezegun import freeze_time

import relay

pytestmark = pytest.mark.both_stores  # the shared behaviour suite: run on each store

SERGIO_C = relay.Contact("Sergio", SERGIO, 120)
BACKUP_C = relay.Contact("Backup", BACKUP, 300)
QDN = relay.Line("QDN", "+16195550100", (SERGIO_C, BACKUP_C))


@pytest.fixture
def clock():
    with freeze_time("2026-11-27 12:00:00") as frozen:
        yield frozen


def ran_out(alarm=None) -> relay.Conversation:
    conv = relay.start_conversation(QDN, relay.Config(lines=(QDN,), alarm_phone=alarm), msid(1), CUSTOMER, "hi", "1", 0)
    relay.escalate(conv, 120)
    relay.escalate(conv, 420)
    return conv


def test_a_chain_that_runs_out_without_an_alarm_phone_tells_the_chains_first_contact():
    conv = ran_out()
    assert [p.to for p in conv.pages if p.kind == "alarm"] == [SERGIO]


def test_a_chain_that_runs_out_with_an_alarm_phone_tells_only_the_alarm_phone():
    conv = ran_out(alarm="+16195550199")
    assert [p.to for p in conv.pages if p.kind == "alarm"] == ["+16195550199"]


def test_the_alarm_says_how_to_take_it():
    assert "Reply #1 to take it" in next(p.body for p in ran_out().pages if p.kind == "alarm")


def test_an_unanswered_conversation_stays_out_of_the_archive_until_the_retention_has_passed():
    conv = ran_out()
    for page in conv.pages:
        page.state = "sent"
    assert not conv.is_settled(420 + 86400, retention=7 * 86400)
    assert conv.is_settled(420 + 7 * 86400, retention=7 * 86400)


def status_of(process) -> str:
    result = process.run("status")
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_last_contacts_pass_is_answered_unanswered_listed_and_told_to_the_first_contact(start_relay, fake_twilio):
    process = start_relay(config_text(primary_wait="1s", backup_wait="1h"))
    process.inbound(CUSTOMER, "engine will not start")
    wait_until(lambda: fake_twilio.delivered(BACKUP))
    status, twiml = process.inbound(BACKUP, "pass")
    assert status == 200
    assert "nobody else is left to page" in twiml and "listed as unanswered and Sergio is told" in twiml
    wait_until(lambda: any("UNANSWERED" in m["Body"] for m in fake_twilio.delivered(SERGIO)))
    assert "#1 from " + CUSTOMER in status_of(process) and "UNANSWERED" in status_of(process)


def test_an_unanswered_text_is_taken_by_its_code_and_then_leaves_status(start_relay, fake_twilio):
    process = start_relay(config_text(primary_wait="1s", backup_wait="1s"))
    process.inbound(CUSTOMER, "engine will not start")
    wait_until(lambda: any("UNANSWERED" in m["Body"] for m in fake_twilio.delivered(SERGIO)))
    status, twiml = process.inbound(SERGIO, "#1 mine")
    assert status == 200 and "Thanks Sergio" in twiml and "is yours" in twiml
    assert "UNANSWERED" not in status_of(process)
    acks = process.events("acknowledged")
    assert [(a["contact"], a["way"]) for a in acks] == [("Sergio", "sms")]


def test_a_take_tells_the_taker_who_else_was_paged(start_relay, fake_twilio):
    process = start_relay(config_text(primary_wait="1s", backup_wait="1h"))
    process.inbound(CUSTOMER, "engine will not start")
    wait_until(lambda: fake_twilio.delivered(BACKUP))
    _, twiml = process.inbound(BACKUP, "#1")
    assert "Sergio was paged too and is told you took it" in twiml
    wait_until(lambda: any("taken by Backup" in m["Body"] for m in fake_twilio.delivered(SERGIO)))


def test_a_take_with_nobody_else_paged_says_so(start_relay, fake_twilio):
    process = start_relay(config_text())
    process.inbound(CUSTOMER, "engine will not start")
    wait_until(lambda: fake_twilio.delivered(SERGIO))
    _, twiml = process.inbound(SERGIO, "#1")
    assert "Nobody else is paged." in twiml and "paged too" not in twiml


def test_escalations_log_their_step_counted_from_one(start_relay, fake_twilio):
    process = start_relay(config_text(primary_wait="1s"))
    process.inbound(CUSTOMER, "engine will not start")
    wait_until(lambda: process.events("escalated"))
    assert process.events("escalated")[0]["step"] == 2


def test_a_refused_pass_names_who_holds_it(start_relay, fake_twilio):
    process = start_relay(config_text(primary_wait="1s"))
    process.inbound(CUSTOMER, "engine will not start")
    wait_until(lambda: fake_twilio.delivered(BACKUP))
    _, twiml = process.inbound(SERGIO, "#1 pass")
    assert "#1 is with Backup now; nothing changed" in twiml


def test_list_names_who_holds_each_conversation(start_relay, fake_twilio):
    process = start_relay(config_text(primary_wait="1s"))
    process.inbound(CUSTOMER, "engine will not start")
    wait_until(lambda: fake_twilio.delivered(BACKUP))
    _, twiml = process.inbound(SERGIO, "list")
    assert f"#1 {CUSTOMER} engine will not start (with Backup)" in twiml


def test_an_unanswered_conversation_waits_in_memory_until_taken(tmp_path, clock):
    from conftest import RunAtOnce, make_relay

    service = make_relay(tmp_path / "state", relay.Config(lines=(QDN,)))
    service.outbox.senders = RunAtOnce()
    service.receive(relay.read_inbound({"MessageSid": msid(1), "From": CUSTOMER, "To": QDN.number, "Body": "hi"}))
    clock.tick(120)
    service.sweeper.sweep()
    clock.tick(300)
    service.sweeper.sweep()
    clock.tick(3 * 3600)
    service.store.tidy(time.time(), 7 * 86400)
    service.store.fold()
    assert [c.status for c in service.store.unfinished()] == ["unanswered"]
