"""`setup` and `check --live`: the Twilio side of a line, against the fake Twilio API."""

import pytest
from conftest import LINE, RelayProcess, config_text

TOLL_FREE = "+18885550100"
LONDON = "+442071838750"


def relay_for(tmp_path, fake) -> RelayProcess:
    """A relay whose `setup` sees to the webhook alone (Twilio's own fallback: test_fallback.py)."""
    return RelayProcess(tmp_path, fake, config_text(extra_relay="fallback = false"))


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
    fake_twilio.add_service("QDN pages", [LINE], "VERIFIED")
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


def live_check(tmp_path, fake, number=LINE):
    """`check --live` for a line on `number`, whose webhook already points at the relay."""
    relay = RelayProcess(tmp_path, fake, config_text(extra_relay="fallback = false").replace(LINE, number))
    fake.add_number(number, sms_url=relay.url + "/api/sms/inbound")
    return relay


def said_of(result, number=LINE) -> str:
    """What `check --live` said of whether carriers carry the number's texts."""
    lines = result.stdout.splitlines()
    return next(s for s in lines if s.startswith(f"QDN {number}: ") and ("A2P" in s or "toll-free" in s))


def test_check_live_passes_a_number_in_a_verified_a2p_campaign(tmp_path, fake_twilio):
    relay = live_check(tmp_path, fake_twilio)
    fake_twilio.add_service("Marketing", ["+16195550999"], None)
    fake_twilio.add_service("QDN pages", [LINE], "VERIFIED")
    result = relay.run("check", "--live")
    assert result.returncode == 0, result.stdout
    assert "in Messaging Service QDN pages (MG" in said_of(result) and "campaign VERIFIED" in said_of(result)
    assert all(request.startswith("GET ") for request in fake_twilio.messaging_requests)


@pytest.mark.parametrize("status", ["PENDING", "IN_PROGRESS", "FAILED"])
def test_check_live_fails_a_number_whose_campaign_is_not_verified_yet(tmp_path, fake_twilio, status):
    relay = live_check(tmp_path, fake_twilio)
    fake_twilio.add_service("QDN pages", [LINE], status)
    result = relay.run("check", "--live")
    assert result.returncode == 1
    assert f"its A2P 10DLC campaign is {status}" in said_of(result) and "error 30034" in said_of(result)


def test_check_live_fails_a_number_in_no_messaging_service(tmp_path, fake_twilio):
    relay = live_check(tmp_path, fake_twilio)
    fake_twilio.add_service("Other", ["+16195550999"], "VERIFIED")
    result = relay.run("check", "--live")
    assert result.returncode == 1
    assert "no Messaging Service with an A2P 10DLC campaign holds this 10-digit number" in said_of(result)
    assert "register a brand and a campaign" in said_of(result)


def test_check_live_fails_a_number_whose_service_has_no_campaign(tmp_path, fake_twilio):
    relay = live_check(tmp_path, fake_twilio)
    fake_twilio.add_service("QDN pages", [LINE], None)
    result = relay.run("check", "--live")
    assert result.returncode == 1 and "that service has no A2P 10DLC campaign" in said_of(result)


def test_check_live_passes_an_approved_toll_free_number(tmp_path, fake_twilio):
    relay = live_check(tmp_path, fake_twilio, TOLL_FREE)
    fake_twilio.add_tollfree_verification(TOLL_FREE, "TWILIO_APPROVED")
    result = relay.run("check", "--live")
    assert result.returncode == 0, result.stdout
    assert "toll-free, verified (TWILIO_APPROVED)" in said_of(result, TOLL_FREE)
    assert not any("Services" in request for request in fake_twilio.messaging_requests)


@pytest.mark.parametrize("status", ["PENDING_REVIEW", "IN_REVIEW", "TWILIO_REJECTED"])
def test_check_live_fails_a_toll_free_number_not_yet_approved(tmp_path, fake_twilio, status):
    relay = live_check(tmp_path, fake_twilio, TOLL_FREE)
    fake_twilio.add_tollfree_verification(TOLL_FREE, status)
    result = relay.run("check", "--live")
    assert result.returncode == 1
    assert f"its verification is {status}" in said_of(result, TOLL_FREE) and "30032" in said_of(result, TOLL_FREE)


def test_check_live_fails_a_toll_free_number_never_submitted_for_verification(tmp_path, fake_twilio):
    relay = live_check(tmp_path, fake_twilio, TOLL_FREE)
    result = relay.run("check", "--live")
    assert result.returncode == 1 and "it has no toll-free verification" in said_of(result, TOLL_FREE)


def test_check_live_skips_a_number_outside_the_us_and_says_so(tmp_path, fake_twilio):
    relay = live_check(tmp_path, fake_twilio, LONDON)
    result = relay.run("check", "--live")
    assert result.returncode == 0, result.stdout
    assert "not a US (+1) number" in said_of(result, LONDON) and fake_twilio.messaging_requests == []


def test_setup_notices_a_webhook_asked_for_by_get_and_apply_makes_it_post(tmp_path, fake_twilio):
    relay = relay_for(tmp_path, fake_twilio)
    fake_twilio.add_number(LINE, sms_url=relay.url + "/api/sms/inbound")["sms_method"] = "GET"
    result = relay.run("setup")
    assert result.returncode == 1 and f"texts go to GET {relay.url}/api/sms/inbound, not to the relay" in result.stdout
    assert relay.run("setup", "--apply").returncode == 0
    assert fake_twilio.numbers[LINE]["sms_method"] == "POST"


def test_check_live_fails_a_carried_number_whose_texts_go_elsewhere(tmp_path, fake_twilio):
    relay = RelayProcess(tmp_path, fake_twilio, config_text(extra_relay="fallback = false"))
    fake_twilio.add_number(LINE, sms_url="https://demo.twilio.com/welcome/sms/reply")
    fake_twilio.add_service("QDN pages", [LINE], "VERIFIED")
    result = relay.run("check", "--live")
    assert result.returncode == 1 and "not to the relay" in result.stdout and "ok" not in result.stdout.splitlines()
