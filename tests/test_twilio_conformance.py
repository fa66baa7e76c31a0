"""Every REST request the relay makes is one Twilio's own API description accepts.

Prism serves a mock built from ../shared/twilio-oai/twilio_api_v2010.json and
answers 422 to a request that does not match it (a missing or misnamed field),
401 without credentials. `.ci/run` installs Prism into `.prism/`.
"""

import os
import socket
import subprocess
import time

import pytest
from conftest import (
    ALARM,
    BACKUP,
    CUSTOMER,
    OTHER_CUSTOMER,
    ROOT,
    SERGIO,
    TOKEN,
    RelayProcess,
    config_text,
    free_port,
    wait_until,
)

PRISM = ROOT / ".prism" / "node_modules" / ".bin" / "prism"
DESCRIPTIONS = ROOT.parent / "shared" / "twilio-oai"


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def prism_serving(description: str, tmp_path_factory):
    """A Prism mock of one of Twilio's API descriptions, for a module's tests; yields its base URL."""
    spec = DESCRIPTIONS / description
    if not PRISM.exists() or not spec.exists():
        if os.environ.get("CI"):
            pytest.fail(f"Prism ({PRISM}) or the API description ({spec}) is missing in CI")
        pytest.skip("Prism is not installed here (.ci/run installs it)")
    port = free_port()
    log = open(tmp_path_factory.mktemp("prism") / "prism.log", "wb")
    proc = subprocess.Popen([str(PRISM), "mock", "-h", "127.0.0.1", "-p", str(port), str(spec)], stdout=log, stderr=log)
    try:
        wait_until(lambda: listening(port), timeout=90, interval=0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def prism_url(tmp_path_factory):
    yield from prism_serving("twilio_api_v2010.json", tmp_path_factory)


@pytest.fixture(scope="module")
def prism_messaging_url(tmp_path_factory):
    yield from prism_serving("twilio_messaging_v1.json", tmp_path_factory)


def gateway_on(url: str):
    import relay as relay_module

    settings = relay_module.Settings.from_env(
        {"TWILIO_ACCOUNT_SID": "AC" + "a" * 32, "TWILIO_AUTH_TOKEN": TOKEN, "TWILIO_API_BASE_URL": url}
    )
    return relay_module.TwilioGateway(settings)


SCENARIO_SENDS = 7  # page, follow-up, escalation, notice; then page, escalation, alarm


def run_scenario(tmp_path, prism_url: str, env: dict) -> RelayProcess:
    """One conversation acknowledged by the backup, one that nobody answers."""
    relay = RelayProcess(tmp_path, None, config_text(primary_wait="2s", backup_wait="1s", alarm=ALARM), env=env)
    relay.env["TWILIO_API_BASE_URL"] = prism_url
    relay.start()
    try:
        relay.inbound(CUSTOMER, "Is the boat out at 9? ¿Sí? 🚤")
        wait_until(lambda: relay.events("relay_sent"))
        relay.inbound(CUSTOMER, "also two kayaks")
        wait_until(lambda: [e for e in relay.events("relay_sent") if e["to"] == BACKUP], timeout=10)
        relay.inbound(BACKUP, "#1 got it")
        relay.inbound(OTHER_CUSTOMER, "hello?")
        wait_until(lambda: [e for e in relay.events("relay_sent") if e["to"] == ALARM], timeout=15)
        wait_until(lambda: len(relay.events("relay_sent")) >= SCENARIO_SENDS, timeout=10)
        time.sleep(0.5)
    finally:
        relay.stop()
    return relay


def test_every_request_is_accepted_by_twilios_api_description(tmp_path, prism_url):
    relay = run_scenario(tmp_path, prism_url, {"TWILIO_ACCOUNT_SID": "AC" + "a" * 32, "TWILIO_AUTH_TOKEN": TOKEN})
    assert relay.events("send_failed") == [] and relay.events("catch_up_failed") == []
    sent = relay.events("relay_sent")
    assert len(sent) == SCENARIO_SENDS
    assert {e["kind"] for e in sent} == {"page", "followup", "notice", "alarm"}
    assert {e["to"] for e in sent} == {SERGIO, BACKUP, ALARM}


def test_requests_with_an_api_key_are_accepted_too(tmp_path, prism_url):
    env = {
        "TWILIO_ACCOUNT_SID": "AC" + "b" * 32,
        "TWILIO_AUTH_TOKEN": TOKEN,
        "TWILIO_API_KEY": "SK" + "c" * 32,
        "TWILIO_API_SECRET": "secret",
    }
    relay = run_scenario(tmp_path, prism_url, env)
    assert relay.events("send_failed") == []
    assert len(relay.events("relay_sent")) == SCENARIO_SENDS


def test_prism_refuses_a_request_without_a_recipient(prism_url):
    """The guard itself works: a message with no `To` is refused, and the relay calls that permanent."""
    import relay as relay_module

    settings = relay_module.Settings.from_env(
        {"TWILIO_ACCOUNT_SID": "AC" + "a" * 32, "TWILIO_AUTH_TOKEN": TOKEN, "TWILIO_API_BASE_URL": prism_url}
    )
    gateway = relay_module.TwilioGateway(settings)
    with pytest.raises(relay_module.SendError) as refused:
        gateway.send("+16195550100", None, "hi", None)
    assert refused.value.permanent and "422" in refused.value.reason


def test_setup_requests_are_accepted_by_twilios_api_description(prism_url):
    """`setup` looks a number up (GET IncomingPhoneNumbers) and points its webhook (POST ...PN....json)."""
    import relay as relay_module

    settings = relay_module.Settings.from_env(
        {"TWILIO_ACCOUNT_SID": "AC" + "a" * 32, "TWILIO_AUTH_TOKEN": TOKEN, "TWILIO_API_BASE_URL": prism_url}
    )
    gateway = relay_module.TwilioGateway(settings)
    gateway.find_number("+16195550100")
    updated = gateway.point_sms_webhook("PN" + "b" * 32, "https://relay.example.com/api/sms/inbound")
    assert updated.sid.startswith("PN")


def test_catch_up_list_calls_are_accepted_by_twilios_api_description(prism_url):
    """Catch-up lists a line's received texts (GET Messages.json, To and DateSent>) and a text's Media."""
    import relay as relay_module

    settings = relay_module.Settings.from_env(
        {"TWILIO_ACCOUNT_SID": "AC" + "a" * 32, "TWILIO_AUTH_TOKEN": TOKEN, "TWILIO_API_BASE_URL": prism_url}
    )
    gateway = relay_module.TwilioGateway(settings)
    list(gateway.received("+16195550100", time.time() - 3600))
    gateway.client.messages("MM" + "a" * 32).media.list(limit=10)


def test_call_requests_are_accepted_by_twilios_api_description(prism_url):
    """A call step places a call (POST Calls.json with inline TwiML and AMD) and may end it (POST Calls/CA....json)."""
    import relay as relay_module

    settings = relay_module.Settings.from_env(
        {"TWILIO_ACCOUNT_SID": "AC" + "a" * 32, "TWILIO_AUTH_TOKEN": TOKEN, "TWILIO_API_BASE_URL": prism_url}
    )
    gateway = relay_module.TwilioGateway(settings)
    qdn = relay_module.Line("QDN", "+16195550100", (relay_module.Contact("Sergio", SERGIO, 60, via="call"),))
    conv = relay_module.start_conversation(
        qdn, relay_module.Config(lines=(qdn,)), "SM" + "a" * 32, CUSTOMER, "¿Sí? 🚤", "1", time.time()
    )
    twiml = relay_module.call_twiml(conv, "https://relay.example.com/api/voice/gather?c=x&p=0")
    sid = gateway.call("+16195550100", SERGIO, twiml, "https://relay.example.com/api/voice/status?c=x&p=0")
    assert sid.startswith("CA")
    gateway.end_call("CA" + "b" * 32, "canceled")


def test_registration_requests_are_accepted_by_twilios_messaging_description(prism_messaging_url):
    """`check --live` lists Messaging Services, their numbers and A2P campaigns, and toll-free verifications."""
    gateway = gateway_on(prism_messaging_url)
    gateway.campaign_holding("+16195550100")
    gateway.client.messaging.v1.services("MG" + "a" * 32).us_app_to_person.list(limit=1)
    gateway.tollfree_verification("PN" + "b" * 32)


@pytest.fixture(scope="module")
def prism_studio_url(tmp_path_factory):
    yield from prism_serving("twilio_studio_v2.json", tmp_path_factory)


def test_fallback_flow_requests_are_accepted_by_twilios_studio_description(prism_studio_url):
    """`setup --apply` finds a line's flow by name (list, fetch), then creates or updates it, published."""
    import relay as relay_module

    gateway = gateway_on(prism_studio_url)
    qdn = relay_module.Line("QDN", "+16195550100", (relay_module.Contact("Sergio", SERGIO, 60),))
    definition = relay_module.fallback_definition(qdn)
    gateway.flow_named("relay fallback: QDN")
    gateway.client.studio.v2.flows("FW" + "a" * 32).fetch()
    created = gateway.create_flow("relay fallback: QDN", definition)
    assert created.sid.startswith("FW") and created.webhook_url
    gateway.update_flow("FW" + "a" * 32, "relay fallback: QDN", definition)


def test_prism_refuses_a_flow_without_its_definition(prism_studio_url):
    """The check above can fail: Studio's description requires a Definition."""
    from twilio.base.exceptions import TwilioRestException

    gateway = gateway_on(prism_studio_url)
    with pytest.raises(TwilioRestException) as refused:
        gateway.client.studio.v2.flows.create(friendly_name="relay fallback: QDN", status="published", definition=None)
    assert refused.value.status == 422


def test_the_fallback_url_request_is_accepted_by_twilios_api_description(prism_url):
    """`setup --apply` points a number's SmsFallbackUrl at the flow (POST ...PN....json)."""
    gateway = gateway_on(prism_url)
    url = "https://webhooks.twilio.com/v1/Accounts/AC" + "a" * 32 + "/Flows/FW" + "a" * 32
    assert gateway.point_sms_fallback("PN" + "b" * 32, url).sid.startswith("PN")
