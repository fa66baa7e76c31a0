"""`setup` and `check --live`: the Twilio side of a line, against the fake Twilio API."""

from conftest import LINE, RelayProcess, config_text


def relay_for(tmp_path, fake) -> RelayProcess:
    return RelayProcess(tmp_path, fake, config_text())


def test_setup_shows_a_webhook_pointing_elsewhere_and_changes_nothing(tmp_path, fake_twilio):
    fake_twilio.add_number(LINE, sms_url="https://demo.twilio.com/welcome/sms/reply")
    relay = relay_for(tmp_path, fake_twilio)
    result = relay.run("setup")
    assert result.returncode == 1
    assert "texts go to POST https://demo.twilio.com/welcome/sms/reply, not to the relay" in result.stdout
    assert fake_twilio.number_updates == []


def test_setup_apply_points_the_number_at_the_relay(tmp_path, fake_twilio):
    fake_twilio.add_number(LINE, sms_url="https://demo.twilio.com/welcome/sms/reply")
    relay = relay_for(tmp_path, fake_twilio)
    result = relay.run("setup", "--apply")
    assert result.returncode == 0, result.stdout
    assert fake_twilio.number_updates == [{"SmsUrl": relay.url + "/api/sms/inbound", "SmsMethod": "POST"}]
    assert "changed from POST https://demo.twilio.com/welcome/sms/reply" in result.stdout
    assert relay.run("check", "--live").returncode == 0


def test_check_live_reports_a_number_not_on_the_account(tmp_path, fake_twilio):
    relay = relay_for(tmp_path, fake_twilio)
    result = relay.run("check", "--live")
    assert result.returncode == 1
    assert f"QDN {LINE}: not a number on Twilio account" in result.stdout


def test_check_live_reports_rejected_credentials(tmp_path, fake_twilio):
    fake_twilio.reject_credentials = True
    result = relay_for(tmp_path, fake_twilio).run("check", "--live")
    assert result.returncode == 1
    assert "Twilio refused the credentials" in result.stdout


def test_setup_needs_a_public_url(tmp_path, fake_twilio):
    fake_twilio.add_number(LINE)
    relay = relay_for(tmp_path, fake_twilio)
    relay.env.pop("RELAY_PUBLIC_URL")
    result = relay.run("setup", "--apply")
    assert result.returncode == 1 and "RELAY_PUBLIC_URL is not set" in result.stdout
    assert fake_twilio.number_updates == []


def test_connection_overrides_on_the_webhook_are_left_alone(tmp_path, fake_twilio):
    relay = relay_for(tmp_path, fake_twilio)
    fake_twilio.add_number(LINE, sms_url=relay.url + "/api/sms/inbound#rc=3&rp=all")
    result = relay.run("setup", "--apply")
    assert result.returncode == 0 and "ok, texts go to" in result.stdout
    assert fake_twilio.number_updates == []
