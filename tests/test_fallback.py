"""Twilio's own fallback: `setup --apply` installs a Studio flow per line that texts the whole crew,
and points the number's SmsFallbackUrl at it, so a text still reaches someone while the relay is down."""

import pytest
from conftest import ACCOUNT, BACKUP, CUSTOMER, LINE, SERGIO, RelayProcess, config_text, wait_until

FIRST_MATE = "+16195550133"
DOCK_LINE = "+16195550200"
DOCK_SKIPPER = "+16195550144"

TWO_LINES = (
    config_text()
    + f"""
[[lines]]
name = "Dock"
number = "{DOCK_LINE}"
chain = [{{ name = "Skipper", phone = "{DOCK_SKIPPER}" }}]
"""
)


def relay_with_numbers(tmp_path, fake, config: str = TWO_LINES) -> RelayProcess:
    """A relay whose lines' numbers are on the account, their webhooks already pointing at it."""
    relay = RelayProcess(tmp_path, fake, config)
    for number in (LINE, DOCK_LINE):
        fake.add_number(number, sms_url=relay.url + "/api/sms/inbound")
    return relay


def sends(flow: dict) -> list[dict]:
    """The flow's Send Message widgets in the order an incoming text reaches them, each checked to be
    reached from the one before whether that one was sent or failed."""
    states = {state["name"]: state for state in flow["definition"]["states"]}
    trigger = states[flow["definition"]["initial_state"]]
    assert trigger["type"] == "trigger"
    following = {t["event"]: t.get("next") for t in trigger["transitions"]}["incomingMessage"]
    found = []
    while following is not None:
        state = states[following]
        assert state["type"] == "send-message"
        found.append(state["properties"])
        after = {t["event"]: t.get("next") for t in state["transitions"]}
        assert after["sent"] == after["failed"]
        following = after["sent"]
    return found


def test_setup_apply_creates_one_published_flow_per_line_named_for_it(tmp_path, fake_twilio):
    result = relay_with_numbers(tmp_path, fake_twilio).run("setup", "--apply")
    assert result.returncode == 0, result.stdout
    names = sorted(flow["friendly_name"] for flow in fake_twilio.flows.values())
    assert names == ["relay fallback: Dock", "relay fallback: QDN"]
    assert {flow["status"] for flow in fake_twilio.flows.values()} == {"published"}


def test_the_flow_texts_every_phone_of_the_line_from_its_number_with_the_sender_and_the_text(tmp_path, fake_twilio):
    relay_with_numbers(tmp_path, fake_twilio).run("setup", "--apply")
    texts = sends(fake_twilio.flow_named("relay fallback: QDN"))
    assert [text["to"] for text in texts] == [SERGIO, BACKUP]
    assert {text["from"] for text in texts} == {LINE}
    assert {text["body"] for text in texts} == {
        "QDN (relay down) from {{trigger.message.From}}: {{trigger.message.Body}}"
    }
    assert [text["to"] for text in sends(fake_twilio.flow_named("relay fallback: Dock"))] == [DOCK_SKIPPER]


def test_setup_apply_sets_the_fallback_url_to_the_flow_and_leaves_the_webhook_on_the_relay(tmp_path, fake_twilio):
    relay = relay_with_numbers(tmp_path, fake_twilio)
    relay.run("setup", "--apply")
    number = fake_twilio.numbers[LINE]
    assert number["sms_fallback_url"] == fake_twilio.flow_named("relay fallback: QDN")["webhook_url"]
    assert number["sms_fallback_method"] == "POST"
    assert number["sms_url"] == relay.url + "/api/sms/inbound"


def test_a_second_setup_apply_changes_nothing(tmp_path, fake_twilio):
    relay = relay_with_numbers(tmp_path, fake_twilio)
    relay.run("setup", "--apply")
    changes = len(fake_twilio.number_updates), [r for r in fake_twilio.studio_requests if r.startswith("POST")]
    result = relay.run("setup", "--apply")
    assert result.returncode == 0, result.stdout
    assert (
        len(fake_twilio.number_updates),
        [r for r in fake_twilio.studio_requests if r.startswith("POST")],
    ) == changes
    assert len(fake_twilio.flows) == 2


def test_a_contact_added_to_the_config_is_in_the_same_flow_after_the_next_setup_apply(tmp_path, fake_twilio):
    relay = relay_with_numbers(tmp_path, fake_twilio)
    relay.run("setup", "--apply")
    sid = fake_twilio.flow_named("relay fallback: QDN")["sid"]
    grown = TWO_LINES.replace(
        f'{{ name = "Backup", phone = "{BACKUP}", wait = "5m" }},',
        f'{{ name = "Backup", phone = "{BACKUP}", wait = "5m" }},\n  {{ name = "Mate", phone = "{FIRST_MATE}" }},',
    )
    (tmp_path / "config.toml").write_text(grown)
    result = relay.run("setup", "--apply")
    assert result.returncode == 0, result.stdout
    assert f"QDN {LINE}: updated fallback" in result.stdout
    flow = fake_twilio.flow_named("relay fallback: QDN")
    assert flow["sid"] == sid and len(fake_twilio.flows) == 2
    assert [text["to"] for text in sends(flow)] == [SERGIO, BACKUP, FIRST_MATE]


def test_with_fallback_false_setup_apply_makes_no_studio_call_and_says_so(tmp_path, fake_twilio):
    relay = relay_with_numbers(tmp_path, fake_twilio, config_text(extra_relay="fallback = false"))
    fake_twilio.numbers[LINE]["sms_fallback_url"] = "https://example.com/own-fallback"
    result = relay.run("setup", "--apply")
    assert result.returncode == 0, result.stdout
    assert fake_twilio.studio_requests == [] and fake_twilio.number_updates == []
    assert "fallback = false: no Studio flow is installed" in result.stdout


def test_setup_without_apply_shows_the_flow_it_would_install_and_changes_nothing(tmp_path, fake_twilio):
    result = relay_with_numbers(tmp_path, fake_twilio).run("setup")
    assert result.returncode == 1
    said = next(s for s in result.stdout.splitlines() if s.startswith(f"QDN {LINE}: fallback"))
    assert '"relay fallback: QDN", texting "QDN (relay down) from' in said and f"to {SERGIO}, {BACKUP} at once" in said
    assert "missing; run `python relay.py setup --apply`" in said
    assert [r for r in fake_twilio.studio_requests if r.startswith("POST")] == [] and fake_twilio.number_updates == []


def test_check_live_passes_once_the_fallback_is_in_place(tmp_path, fake_twilio):
    relay = relay_with_numbers(tmp_path, fake_twilio, config_text())
    fake_twilio.add_service("QDN pages", [LINE], "VERIFIED")
    assert relay.run("check", "--live").returncode == 1
    relay.run("setup", "--apply")
    result = relay.run("check", "--live")
    assert result.returncode == 0, result.stdout
    assert f"QDN {LINE}: ok, fallback Studio flow" in result.stdout


def test_check_live_fails_a_flow_that_no_longer_matches_the_config_naming_the_difference(tmp_path, fake_twilio):
    relay = relay_with_numbers(tmp_path, fake_twilio, config_text())
    fake_twilio.add_service("QDN pages", [LINE], "VERIFIED")
    relay.run("setup", "--apply")
    (tmp_path / "config.toml").write_text(config_text().replace(BACKUP, FIRST_MATE))
    result = relay.run("check", "--live")
    assert result.returncode == 1
    assert f"it does not text {FIRST_MATE}; still texts {BACKUP}" in result.stdout


def test_check_live_fails_a_fallback_url_pointing_elsewhere(tmp_path, fake_twilio):
    relay = relay_with_numbers(tmp_path, fake_twilio, config_text())
    fake_twilio.add_service("QDN pages", [LINE], "VERIFIED")
    relay.run("setup", "--apply")
    fake_twilio.numbers[LINE]["sms_fallback_method"] = "GET"
    result = relay.run("check", "--live")
    assert result.returncode == 1
    assert "SmsFallbackUrl is GET https://webhooks.twilio.com/" in result.stdout


FLOW_URL = f"https://webhooks.twilio.com/v1/Accounts/{ACCOUNT}/Flows/FW{'a' * 32}"


@pytest.mark.both_stores
def test_a_text_caught_up_while_the_fallback_flow_was_in_place_says_the_crew_had_it(start_relay, fake_twilio):
    fake_twilio.add_number(LINE)["sms_fallback_url"] = FLOW_URL
    fake_twilio.receive(CUSTOMER, LINE, "engine won't start", ago=180)
    start_relay(config_text())
    (page,) = wait_until(lambda: fake_twilio.delivered(SERGIO))
    assert "(received 3 min ago; the crew also had it from the fallback while the relay was down)" in page["Body"]


@pytest.mark.both_stores
def test_a_text_caught_up_with_no_fallback_flow_in_place_says_nothing_of_one(start_relay, fake_twilio):
    fake_twilio.add_number(LINE)["sms_fallback_url"] = "https://example.com/twiml-bin"
    fake_twilio.receive(CUSTOMER, LINE, "engine won't start", ago=180)
    start_relay(config_text())
    (page,) = wait_until(lambda: fake_twilio.delivered(SERGIO))
    assert "(received 3 min ago)" in page["Body"] and "fallback" not in page["Body"]


def test_a_text_the_webhook_brought_says_nothing_of_the_fallback(start_relay, fake_twilio):
    fake_twilio.add_number(LINE)["sms_fallback_url"] = FLOW_URL
    relay = start_relay(config_text())
    relay.inbound(CUSTOMER, "engine won't start")
    (page,) = wait_until(lambda: fake_twilio.delivered(SERGIO))
    assert "received" not in page["Body"] and "fallback" not in page["Body"]


def test_the_flow_texts_a_rotations_members_too(tmp_path, fake_twilio):
    from test_rotations import ANA, rotation_config

    relay = relay_with_numbers(tmp_path, fake_twilio, rotation_config("2026-12-07 08:00", "7d"))
    relay.run("setup", "--apply")
    assert ANA in [text["to"] for text in sends(fake_twilio.flow_named("relay fallback: QDN"))]
