"""Delivery you can trust: API faults, delivery reports, kills, repeat and alarms, live config edits."""

import base64
import time
import urllib.parse

import pytest
from conftest import (
    ACCOUNT,
    ALARM,
    BACKUP,
    CUSTOMER,
    LINE,
    SERGIO,
    RunAtOnce,
    barrier,
    config_text,
    make_relay,
    msid,
    sign,
    wait_until,
)

import relay as relay_module

pytestmark = pytest.mark.both_stores  # the shared behaviour suite: run on each store


def test_transient_errors_are_retried_until_exactly_one_relay_is_delivered(start_relay, fake_twilio):
    fake_twilio.faults.extend([(500, 20500, {}), (500, 20500, {}), (429, 20429, {"Retry-After": "1"})])
    relay = start_relay(config_text())
    relay.inbound(CUSTOMER, "hello")
    wait_until(lambda: fake_twilio.delivered(SERGIO), timeout=15)
    barrier(relay, fake_twilio)
    assert fake_twilio.attempts(SERGIO) == 5  # four tries of the page, then the barrier's
    assert len(fake_twilio.delivered(SERGIO)) == 2
    assert fake_twilio.delivered(BACKUP) == []
    assert [e["result"] for e in relay.events("send_failed")] == ["retry"] * 3


def test_connection_errors_are_retried(start_relay, fake_twilio):
    fake_twilio.faults.append(("drop",))
    relay = start_relay(config_text())
    relay.inbound(CUSTOMER, "hello")
    wait_until(lambda: fake_twilio.delivered(SERGIO), timeout=10)
    assert fake_twilio.attempts(SERGIO) == 2


def test_permanent_error_for_the_primary_pages_the_backup_at_once(start_relay, fake_twilio):
    fake_twilio.faults.append((400, 21211, {}))
    relay = start_relay(config_text(primary_wait="1h"))
    relay.inbound(CUSTOMER, "hello")
    backup = wait_until(lambda: fake_twilio.delivered(BACKUP), timeout=5)
    assert backup[0]["From"] == LINE
    failed_at = fake_twilio.requests[0]["at"]
    assert fake_twilio.requests[1]["at"] - failed_at < 1.0
    assert fake_twilio.attempts(SERGIO) == 1
    assert relay.events("send_failed")[0]["error_code"] == 21211
    assert [e["to"] for e in wait_until(lambda: relay.events("escalated"))] == [BACKUP]


def test_failed_delivery_report_pages_the_backup_at_once(start_relay, fake_twilio):
    relay = start_relay(config_text(primary_wait="1h"))
    relay.inbound(CUSTOMER, "hello")
    page = wait_until(lambda: fake_twilio.delivered(SERGIO))[0]
    callback = page["StatusCallback"]
    params = {"MessageSid": msid("x"), "MessageStatus": "undelivered", "ErrorCode": "30003", "To": SERGIO}
    path = callback.removeprefix(relay.url)
    reported = time.time()
    assert relay.post_form(path, params, signature=sign(callback, params))[0] == 200
    wait_until(lambda: fake_twilio.delivered(BACKUP), timeout=5)
    assert time.time() - reported < 1.5


def test_forged_delivery_report_changes_nothing(start_relay, fake_twilio):
    relay = start_relay(config_text(primary_wait="1h"))
    relay.inbound(CUSTOMER, "hello")
    callback = wait_until(lambda: fake_twilio.delivered(SERGIO))[0]["StatusCallback"]
    params = {"MessageSid": msid("x"), "MessageStatus": "failed"}
    assert relay.post_form(callback.removeprefix(relay.url), params, signature="Zm9yZ2Vk")[0] == 403
    assert relay.run("status").stdout.count("paged: Sergio") == 1
    assert fake_twilio.delivered(BACKUP) == []


def test_callback_for_an_unknown_conversation_is_ignored(start_relay, fake_twilio):
    relay = start_relay(config_text())
    path = "/api/sms/status?" + urllib.parse.urlencode({"c": msid("none"), "p": 0})
    params = {"MessageSid": msid("x"), "MessageStatus": "failed"}
    assert relay.post_form(path, params)[0] == 200
    assert wait_until(lambda: relay.events("status_unknown"))


def test_backup_is_paged_on_the_original_deadline_after_a_kill(start_relay, fake_twilio):
    relay = start_relay(config_text(primary_wait="3s", backup_wait="1h"))
    before = time.time()
    relay.inbound(CUSTOMER, "hello")
    after = time.time()  # the conversation began in between: its step's deadline is 3 s later
    wait_until(lambda: relay.events("relay_sent"))  # stored as sent, so never sent again
    relay.kill()
    relay.start()
    backup = wait_until(lambda: [r for r in fake_twilio.requests if r["form"]["To"] == BACKUP], timeout=10)
    assert before + 3 <= backup[0]["at"] < after + 3 + 1.0
    assert fake_twilio.attempts(SERGIO) == 1


def relay_with_page_in_flight(start_relay, fake_twilio, hang: float):
    """A relay whose page to the primary has reached the fake Twilio, which answers `hang` s later."""
    fake_twilio.faults.append(("hang", hang))
    relay = start_relay(config_text())
    relay.inbound(CUSTOMER, "hello")
    wait_until(lambda: fake_twilio.attempts(SERGIO) == 1)
    return relay


def test_page_in_flight_at_a_kill_is_sent_again_after_restart(start_relay, fake_twilio):
    relay = relay_with_page_in_flight(start_relay, fake_twilio, hang=3)
    relay.kill()
    relay.start()
    wait_until(lambda: fake_twilio.delivered(SERGIO), timeout=10)
    assert fake_twilio.attempts(SERGIO) == 2


def test_text_answered_200_just_before_a_kill_still_pages_the_primary(start_relay, fake_twilio):
    relay = start_relay(config_text())
    assert relay.inbound(CUSTOMER, "hello")[0] == 200
    relay.kill()
    relay.start()
    wait_until(lambda: fake_twilio.delivered(SERGIO), timeout=10)
    assert "1 open" in relay.run("status").stdout


def test_repeat_goes_round_the_chain_again_then_tells_the_alarm_phone(start_relay, fake_twilio):
    relay = start_relay(config_text(primary_wait="1s", backup_wait="1s", repeat=1, alarm=ALARM))
    relay.inbound(CUSTOMER, "hello")
    alarm = wait_until(lambda: fake_twilio.delivered(ALARM), timeout=10)
    assert [r["To"] for r in fake_twilio.delivered()] == [SERGIO, BACKUP, SERGIO, BACKUP, ALARM]
    assert "UNANSWERED" in alarm[0]["Body"]
    assert relay.events("unanswered")[0]["level"] == "error"


def test_config_edits_are_picked_up_while_running(start_relay, fake_twilio):
    relay = start_relay(config_text())
    (relay.workdir / "config.toml").write_text(config_text().replace(SERGIO, "+16195550122"))
    wait_until(lambda: relay.events("config_reloaded"), timeout=5)
    relay.inbound(CUSTOMER, "hello")
    wait_until(lambda: fake_twilio.delivered("+16195550122"))


def test_invalid_config_edit_keeps_the_last_good_config(start_relay, fake_twilio):
    relay = start_relay(config_text())
    (relay.workdir / "config.toml").write_text(config_text().replace(SERGIO, "555"))
    rejected = wait_until(lambda: relay.events("config_rejected"), timeout=5)
    assert 'line "QDN", contact "Sergio", phone' in rejected[0]["reason"]
    relay.inbound(CUSTOMER, "hello")
    wait_until(lambda: fake_twilio.delivered(SERGIO))


def test_sigterm_lets_a_send_in_flight_finish_so_a_restart_does_not_repeat_it(start_relay, fake_twilio):
    relay = relay_with_page_in_flight(start_relay, fake_twilio, hang=1.5)
    relay.stop()
    assert relay.proc.returncode == 0
    assert relay.events("stopping")[0]["signal"] == "SIGTERM"
    relay.start()
    barrier(relay, fake_twilio)
    assert fake_twilio.attempts(SERGIO) == 2  # the page once, then the barrier's


def test_open_conversations_keep_the_chain_they_started_with(start_relay, fake_twilio):
    relay = start_relay(config_text(primary_wait="2s"))
    relay.inbound(CUSTOMER, "hello")
    wait_until(lambda: fake_twilio.delivered(SERGIO))
    (relay.workdir / "config.toml").write_text(config_text(primary_wait="2s").replace(BACKUP, "+16195550122"))
    wait_until(lambda: relay.events("config_reloaded"), timeout=5)
    wait_until(lambda: fake_twilio.delivered(BACKUP), timeout=5)
    assert fake_twilio.delivered("+16195550122") == []


def test_retry_after_from_twilio_reaches_the_retry(fake_twilio):
    fake_twilio.faults.append((429, 20429, {"Retry-After": "7"}))
    settings = relay_module.Settings.from_env(
        {"TWILIO_ACCOUNT_SID": ACCOUNT, "TWILIO_AUTH_TOKEN": "x", "TWILIO_API_BASE_URL": fake_twilio.url}
    )
    with pytest.raises(relay_module.SendError) as refused:
        relay_module.TwilioGateway(settings).send(LINE, SERGIO, "hi", None)
    assert refused.value.retry_after == 7 and not refused.value.permanent


class BusyThenFine:
    """Refuses the first two texts as Twilio does when busy, then takes them."""

    def __init__(self):
        self.tries = 0

    def send(self, from_, to, body, status_callback, media=(), secret=False):
        self.tries += 1
        if self.tries <= 2:
            raise relay_module.SendError("twilio 503", permanent=False, retry_after=3.0)
        return "SM" + "1" * 32


def test_a_text_to_the_operator_is_retried_after_twilio_s_wait_and_logged_once_sent(tmp_path, monkeypatch, capsys):
    service = make_relay(tmp_path / "state")
    service.gateway = BusyThenFine()
    waits = []
    monkeypatch.setattr(relay_module.time, "sleep", waits.append)
    service.outbox.senders = RunAtOnce()
    service.outbox.text(LINE, ALARM, "a state file was damaged")
    assert len(waits) == 2 and min(waits) >= 3.0 and service.gateway.tries == 3
    assert '"event": "direct_sent"' in capsys.readouterr().out


class HeldSends:
    """Sender threads that start nothing until `run()`: what was queued meanwhile then goes in order."""

    def __init__(self):
        self.queued = []

    def submit(self, fn, *args):
        self.queued.append((fn, args))

    def run(self):
        while self.queued:
            fn, args = self.queued.pop(0)
            fn(*args)

    def shutdown(self, wait=True):
        pass


def test_a_page_acknowledged_before_its_send_starts_is_never_sent_and_leaves_no_claim(tmp_path):
    service = make_relay(tmp_path / "state")
    service.outbox.senders = held = HeldSends()
    service.receive(
        relay_module.read_inbound({"MessageSid": msid("text"), "From": CUSTOMER, "To": LINE, "Body": "need a tow"})
    )
    assert service.outbox.in_flight  # the page is claimed for its send
    service.receive(
        relay_module.read_inbound({"MessageSid": msid("reply"), "From": SERGIO, "To": LINE, "Body": "#1 on it"})
    )
    held.run()
    assert service.gateway.sent == []
    assert service.outbox.in_flight == {}  # else it stays this relay's, as long as the relay runs


def test_a_page_refused_with_retry_after_is_tried_again_no_sooner_than_twilio_asked():
    qdn = relay_module.Line("QDN", LINE, (relay_module.Contact("Sergio", SERGIO, 60),))
    conv = relay_module.start_conversation(
        qdn, relay_module.Config(lines=(qdn,)), "SM" + "a" * 32, "+15551230001", "hi", "1", 1000.0
    )
    conv.pages[0].attempts = 1
    busy = relay_module.SendError("twilio 429 20429", permanent=False, retry_after=30.0)
    assert relay_module.record_send_error(conv, 0, busy, 1000.0, jitter=0.0) == "retry"
    assert conv.pages[0].retry_at >= 1030.0


def test_an_api_key_signs_the_rest_calls_when_one_is_set(start_relay, fake_twilio):
    key, secret = "SK" + "5" * 32, "the-key-secret"
    relay = start_relay(config_text(), env={"TWILIO_API_KEY": key, "TWILIO_API_SECRET": secret})
    relay.inbound(CUSTOMER, "hello")
    page = wait_until(lambda: [r for r in fake_twilio.requests if r["form"].get("To") == SERGIO])[0]
    assert page["auth"] == "Basic " + base64.b64encode(f"{key}:{secret}".encode()).decode()
