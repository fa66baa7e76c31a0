"""The relay as a real process over HTTP, with a fake Twilio REST API on 127.0.0.1."""

import re

import pytest
from conftest import BACKUP, CUSTOMER, LINE, OTHER_CUSTOMER, SERGIO, barrier, config_text, msid, wait_until

pytestmark = pytest.mark.both_stores  # the shared behaviour suite: run on each store


def test_forged_signature_is_refused_and_sends_nothing(start_relay, fake_twilio):
    relay = start_relay(config_text())
    status, body = relay.inbound(CUSTOMER, "hello", signature="Zm9yZ2Vk")
    assert status == 403
    assert "signature" in body
    barrier(relay, fake_twilio)
    assert len(fake_twilio.requests) == 1  # the barrier's page only
    assert CUSTOMER not in relay.run("status").stdout


def test_signature_made_with_another_token_is_refused(start_relay, fake_twilio):
    relay = start_relay(config_text())
    status, _ = relay.inbound(CUSTOMER, "hello", token="not-the-token")
    assert status == 403


def test_missing_signature_is_refused(start_relay, fake_twilio):
    relay = start_relay(config_text())
    status, _ = relay.inbound(CUSTOMER, "hello", signature="")
    assert status == 403
    barrier(relay, fake_twilio)
    assert len(fake_twilio.requests) == 1  # the barrier's page only


def test_refused_request_log_names_the_url_checked(start_relay):
    relay = start_relay(config_text())
    relay.inbound(CUSTOMER, "hello", signature="Zm9yZ2Vk")
    rejected = wait_until(lambda: relay.events("rejected"))
    assert rejected[0]["checked_url"] == relay.url + "/api/sms/inbound"
    assert "test-auth-token" not in relay.log_path.read_text()


def test_missing_fields_get_400(start_relay, fake_twilio):
    relay = start_relay(config_text())
    status, body = relay.post_form("/api/sms/inbound", {"From": CUSTOMER, "To": LINE, "Body": "x"})
    assert status == 400
    assert "MessageSid" in body


def test_primary_is_paged_from_the_line_number(start_relay, fake_twilio):
    relay = start_relay(config_text())
    status, twiml = relay.inbound(CUSTOMER, "Is the boat out today?")
    assert status == 200
    assert twiml.startswith("<?xml") and "<Response" in twiml
    page = wait_until(lambda: fake_twilio.delivered(SERGIO))[0]
    assert page["From"] == LINE
    assert "QDN" in page["Body"] and "#1" in page["Body"] and CUSTOMER in page["Body"]
    assert "Is the boat out today?" in page["Body"]
    assert page["StatusCallback"].startswith(relay.url + "/api/sms/status?")


def test_a_reply_naming_a_code_no_longer_open_is_told_who_took_it(start_relay, fake_twilio):
    relay = start_relay(config_text())
    relay.inbound(CUSTOMER, "hello")
    wait_until(lambda: fake_twilio.delivered(SERGIO))
    relay.inbound(SERGIO, "#1 on it")
    assert "#1 was already taken by Sergio" in relay.inbound(SERGIO, "#1 again")[1]
    assert "no open message #7" in relay.inbound(SERGIO, "#7 on it")[1]


def test_non_ascii_and_emoji_body_arrives_intact(start_relay, fake_twilio):
    relay = start_relay(config_text())
    text = "¿Mañana a las 9? 🚤⚓ Привет 你好"
    assert relay.inbound(CUSTOMER, text)[0] == 200
    page = wait_until(lambda: fake_twilio.delivered(SERGIO))[0]
    assert text in page["Body"]


def test_duplicate_message_sid_sends_once(start_relay, fake_twilio):
    relay = start_relay(config_text())
    assert relay.inbound(CUSTOMER, "hello", sid="SM" + "d" * 32)[0] == 200
    assert relay.inbound(CUSTOMER, "hello", sid="SM" + "d" * 32)[0] == 200
    barrier(relay, fake_twilio)
    assert len(fake_twilio.requests) == 2  # the page once, then the barrier's
    assert len(relay.events("inbound_duplicate")) == 1


def test_text_to_a_number_that_is_no_line_relays_nothing(start_relay, fake_twilio):
    relay = start_relay(config_text())
    status, twiml = relay.inbound(CUSTOMER, "hello", to="+16195559999")
    assert status == 200
    assert "<Message>" not in twiml
    assert wait_until(lambda: relay.events("inbound_no_line"))
    barrier(relay, fake_twilio)
    assert len(fake_twilio.requests) == 1  # the barrier's page only


def test_backup_is_paged_when_primary_stays_silent(start_relay, fake_twilio):
    relay = start_relay(config_text(primary_wait="1s", backup_wait="1h"))
    relay.inbound(CUSTOMER, "anyone there?")
    first = wait_until(lambda: fake_twilio.delivered(SERGIO))
    backup = wait_until(lambda: fake_twilio.delivered(BACKUP), timeout=5)
    assert "anyone there?" in backup[0]["Body"]
    assert len(first) == 1


def test_reply_from_primary_stops_the_escalation(start_relay, fake_twilio):
    relay = start_relay(config_text(primary_wait="2s"))
    relay.inbound(CUSTOMER, "need a ride")
    relay.inbound(OTHER_CUSTOMER, "me too")  # not taken: its backup page shows the deadline has passed
    wait_until(lambda: len(fake_twilio.delivered(SERGIO)) == 2)
    status, twiml = relay.inbound(SERGIO, "#1 on it")
    assert status == 200
    assert "<Message>" in twiml and "#1" in twiml
    backup = wait_until(lambda: fake_twilio.delivered(BACKUP), timeout=5)
    assert [OTHER_CUSTOMER in m["Body"] for m in backup] == [True]
    assert relay.events("acknowledged")[0]["contact"] == "Sergio"


def test_a_reply_without_a_code_acknowledges_the_newest_conversation_paged_to_that_contact(start_relay, fake_twilio):
    relay = start_relay(config_text())
    relay.inbound(CUSTOMER, "need a ride")
    relay.inbound(OTHER_CUSTOMER, "me too")
    wait_until(lambda: len(fake_twilio.delivered(SERGIO)) == 2)
    status, twiml = relay.inbound(SERGIO, "on it")
    assert status == 200 and f"QDN #2 from {OTHER_CUSTOMER} is yours" in twiml


def test_follow_up_from_customer_joins_the_open_conversation(start_relay, fake_twilio):
    relay = start_relay(config_text())
    relay.inbound(CUSTOMER, "first")
    wait_until(lambda: fake_twilio.delivered(SERGIO))
    relay.inbound(CUSTOMER, "second")
    pages = wait_until(lambda: len(fake_twilio.delivered(SERGIO)) == 2 and fake_twilio.delivered(SERGIO))
    assert "second" in pages[1]["Body"] and "#1" in pages[1]["Body"]
    assert "1 open" in relay.run("status").stdout


@pytest.mark.json_only
def test_second_relay_on_the_same_state_directory_refuses_to_start(start_relay, tmp_path):
    relay = start_relay(config_text())
    second = relay.run("serve", timeout=20)
    assert second.returncode != 0
    assert "another relay" in second.stderr


def test_healthz_and_metrics_answer(start_relay, fake_twilio):
    relay = start_relay(config_text())
    relay.inbound(CUSTOMER, "hello")
    wait_until(lambda: fake_twilio.delivered(SERGIO))
    status, body = relay.get("/healthz")
    assert status == 200 and '"open_conversations": 1' in body
    status, metrics = relay.get("/metrics")
    assert status == 200
    assert 'relay_inbound_total{kind="accepted"} 1.0' in metrics
    assert wait_until(lambda: 'relay_sends_total{result="sent"} 1.0' in relay.get("/metrics")[1])


def test_metrics_count_the_open_conversations(start_relay, fake_twilio):
    relay = start_relay(config_text())
    relay.inbound(CUSTOMER, "hello")
    relay.inbound("+15551230002", "hi")
    wait_until(lambda: len(fake_twilio.delivered(SERGIO)) == 2)
    assert "relay_open_conversations 2.0" in relay.get("/metrics")[1]


def test_status_lists_who_was_paged_when_and_the_next_escalation(start_relay, fake_twilio):
    relay = start_relay(config_text())
    relay.inbound(CUSTOMER, "hello")
    wait_until(lambda: relay.events("relay_sent"))
    out = relay.run("status").stdout
    assert out.startswith("1 open conversation(s)")
    assert f"QDN #1 from {CUSTOMER}" in out
    assert f"paged: Sergio {SERGIO} sent at " in out
    assert "next: Backup at " in out


def test_status_says_which_store_it_read_and_that_a_relay_runs_on_it(start_relay, fake_twilio, store_kind):
    relay = start_relay(config_text())
    first = relay.run("status").stdout.splitlines()[1]
    if store_kind == "json":
        assert first.startswith("store: JSON files under ") and first.endswith("a relay is running on it")
    else:
        assert first.startswith("store: PostgreSQL at ") and first.endswith("1 relay(s) running on it")
    relay.stop()
    after = relay.run("status").stdout.splitlines()[1]
    assert after.endswith("no relay is running on it" if store_kind == "json" else "0 relay(s) running on it")


def test_status_shows_times_in_the_lines_time_zone_and_says_which(start_relay, fake_twilio):
    relay = start_relay(config_text().replace('name = "QDN"', 'name = "QDN"\ntimezone = "America/Los_Angeles"'))
    relay.inbound(CUSTOMER, "hello")
    wait_until(lambda: relay.events("relay_sent"))
    out = relay.run("status").stdout
    assert re.search(r"since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d P[SD]T; paged", out), out


def test_a_text_held_by_the_sender_cap_goes_out_once_a_live_edit_raises_the_cap(start_relay, fake_twilio, tmp_path):
    relay = start_relay(config_text(extra_relay="sender_hourly_cap = 1"))
    relay.inbound(CUSTOMER, "engine will not start")
    relay.inbound(CUSTOMER, "and the bilge alarm is on")
    wait_until(lambda: relay.events("inbound_held"))
    assert len(wait_until(lambda: fake_twilio.delivered(SERGIO))) == 1
    (relay.workdir / "config.toml").write_text(config_text(extra_relay="sender_hourly_cap = 5"))
    wait_until(lambda: any("bilge alarm" in m["Body"] for m in fake_twilio.delivered(SERGIO)), timeout=5)


def test_a_retry_of_a_contacts_reply_that_matched_nothing_gets_the_same_answer(start_relay):
    relay = start_relay(config_text())
    first = relay.inbound(SERGIO, "ok", sid=msid("nothing open"))
    again = relay.inbound(SERGIO, "ok", sid=msid("nothing open"))  # Twilio's retry of the same text
    assert first[0] == again[0] == 200
    assert "<Message>" in first[1] and again[1] == first[1]
