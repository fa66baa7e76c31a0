"""Texts carriers will not carry: a blocked page becomes a call, and the operator hears of it."""

import json
import time
import xml.etree.ElementTree as ElementTree

import pytest
from conftest import ALARM, BACKUP, CUSTOMER, LINE, SERGIO, config_text, msid, sign, wait_until

pytestmark = pytest.mark.both_stores  # the shared behaviour suite: run on each store


def report(process, page: dict, status: str, code: str | None = None) -> None:
    """Twilio's status callback for a text the relay sent."""
    callback = page["StatusCallback"]
    params = {"MessageSid": msid(callback), "MessageStatus": status, "To": page["To"]}
    if code:
        params["ErrorCode"] = code
    assert process.post_form(callback.removeprefix(process.url), params, signature=sign(callback, params))[0] == 200


def call_report(process, call: dict, status: str) -> None:
    callback = call["StatusCallback"]
    params = {"CallSid": call["sid"], "CallStatus": status}
    assert process.post_form(callback.removeprefix(process.url), params, signature=sign(callback, params))[0] == 200


# Every code on the JSON files; the store only keeps the outcome, so PostgreSQL runs one of them.
@pytest.mark.parametrize(
    ("store_kind", "code"),
    [("json", "30034"), ("json", "30032"), ("json", "30007"), ("postgresql", "30034")],
)
def test_a_blocked_page_calls_that_contact_at_once_and_the_backup_waits(start_relay, fake_twilio, code):
    process = start_relay(config_text(primary_wait="3s"))
    process.inbound(CUSTOMER, "engine will not start")
    page = wait_until(lambda: fake_twilio.delivered(SERGIO))[0]
    reported = time.time()
    report(process, page, "undelivered", code)
    call = wait_until(lambda: fake_twilio.calls, timeout=2)[0]
    assert time.time() - reported < 1
    assert call["To"] == SERGIO and call["From"] == LINE
    assert "engine will not start" in ElementTree.fromstring(call["Twiml"]).find("Gather").find("Say").text
    assert fake_twilio.delivered(BACKUP) == []  # the step and its wait go on
    blocked = process.events("carrier_blocked")
    assert [(e["error_code"], e["to"], e["calling_instead"]) for e in blocked] == [(code, SERGIO, True)]
    assert "relay_carrier_blocked_total 1.0" in process.get("/metrics")[1]
    wait_until(lambda: fake_twilio.delivered(BACKUP), timeout=5)  # when the wait runs out, as usual


def test_a_blocked_page_whose_call_fails_too_moves_on_at_once(start_relay, fake_twilio):
    process = start_relay(config_text(primary_wait="1h"))
    process.inbound(CUSTOMER, "engine will not start")
    report(process, wait_until(lambda: fake_twilio.delivered(SERGIO))[0], "undelivered", "30034")
    call = wait_until(lambda: fake_twilio.calls)[0]
    failed = time.time()
    call_report(process, call, "no-answer")
    wait_until(lambda: fake_twilio.delivered(BACKUP), timeout=2)
    assert time.time() - failed < 1.5


def test_without_call_when_blocked_a_blocked_page_moves_on_at_once_with_no_call(start_relay, fake_twilio):
    process = start_relay(config_text(primary_wait="1h", extra_relay="call_when_blocked = false"))
    process.inbound(CUSTOMER, "engine will not start")
    report(process, wait_until(lambda: fake_twilio.delivered(SERGIO))[0], "undelivered", "30034")
    wait_until(lambda: fake_twilio.delivered(BACKUP), timeout=2)
    assert fake_twilio.calls == []
    assert process.events("carrier_blocked")[0]["calling_instead"] is False


def test_another_failure_code_is_no_block_and_places_no_call(start_relay, fake_twilio):
    process = start_relay(config_text(primary_wait="1h"))
    process.inbound(CUSTOMER, "engine will not start")
    report(process, wait_until(lambda: fake_twilio.delivered(SERGIO))[0], "undelivered", "30003")
    wait_until(lambda: fake_twilio.delivered(BACKUP), timeout=2)
    assert fake_twilio.calls == [] and process.events("carrier_blocked") == []


def test_while_blocked_healthz_answers_200_naming_it_until_a_text_is_delivered(start_relay, fake_twilio):
    process = start_relay(config_text(primary_wait="1h"))
    process.inbound(CUSTOMER, "engine will not start")
    page = wait_until(lambda: fake_twilio.delivered(SERGIO))[0]
    report(process, page, "undelivered", "30034")
    status, body = process.get("/healthz")
    assert status == 200 and "30034" in json.loads(body)["carrier_blocked"]["QDN"]
    process.inbound("+15551230009", "second customer")
    second = wait_until(lambda: [m for m in fake_twilio.delivered(SERGIO) if "second customer" in m["Body"]])[0]
    report(process, second, "delivered")
    assert "carrier_blocked" not in json.loads(process.get("/healthz")[1])


def test_while_blocked_the_alarm_goes_by_call_too(start_relay, fake_twilio):
    process = start_relay(config_text(primary_wait="1s", backup_wait="1h", alarm=ALARM))
    process.inbound(CUSTOMER, "engine will not start")
    report(process, wait_until(lambda: fake_twilio.delivered(SERGIO))[0], "undelivered", "30034")
    sergio_call = wait_until(lambda: fake_twilio.calls)[0]
    call_report(process, sergio_call, "no-answer")
    backup_page = wait_until(lambda: fake_twilio.delivered(BACKUP))[0]
    report(process, backup_page, "undelivered", "30034")
    backup_call = wait_until(lambda: [c for c in fake_twilio.calls if c["To"] == BACKUP])[0]
    call_report(process, backup_call, "busy")
    alarm_call = wait_until(lambda: [c for c in fake_twilio.calls if c["To"] == ALARM], timeout=5)[0]
    assert "UNANSWERED" in alarm_call["Twiml"] and alarm_call["From"] == LINE
    assert any("UNANSWERED" in m["Body"] for m in fake_twilio.delivered(ALARM))  # the text is tried as well


def test_the_alarm_is_not_called_while_the_line_is_not_blocked(start_relay, fake_twilio):
    process = start_relay(config_text(primary_wait="1s", backup_wait="1s", alarm=ALARM))
    process.inbound(CUSTOMER, "engine will not start")
    wait_until(lambda: fake_twilio.delivered(ALARM), timeout=5)
    assert fake_twilio.calls == []
