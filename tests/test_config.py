"""config.toml and the environment: what is accepted and how refusals read."""

import os
import tomllib

import pytest
from conftest import LINE, ROOT

import relay


def parse(text: str) -> relay.Config:
    return relay.parse_config(tomllib.loads(text))


BASE = f"""
[[lines]]
name = "QDN"
number = "{LINE}"
chain = [{{ name = "Sergio", phone = "+16195550111" }}]
"""


def refusal(text: str) -> str:
    with pytest.raises(relay.ConfigError) as caught:
        parse(text)
    return str(caught.value)


def test_shipped_config_is_the_qdn_line_primary_then_backup():
    config = relay.load_config(ROOT / "config.toml")
    (line,) = config.lines
    assert line.name == "QDN"
    assert [c.name for c in line.chain] == ["Sergio", "Backup"]
    assert [c.wait for c in line.chain] == [120, 300]


@pytest.mark.parametrize(
    ("value", "seconds"), [(90, 90), ('"90s"', 90), ('"5m"', 300), ('"1h"', 3600), ('"2d"', 172800)]
)
def test_durations_are_seconds_or_suffixed_strings(value, seconds):
    assert parse(f"[relay]\nwait = {value}\n" + BASE).wait == seconds


@pytest.mark.parametrize("value", ['"soon"', "0", '"5 minutes"', "-3", "true"])
def test_bad_durations_are_refused_with_the_key(value):
    assert refusal(f"[relay]\nwait = {value}\n" + BASE).startswith("relay.wait:")


def test_contact_without_wait_uses_the_default_wait():
    config = parse('[relay]\nwait = "7m"\n' + BASE)
    assert config.lines[0].chain[0].wait == 420


def test_number_that_is_not_e164_is_refused():
    message = refusal(BASE.replace("+16195550111", "619-555-0111"))
    assert message.startswith("lines[0].chain[0].phone:") and "E.164" in message


def test_contact_equal_to_a_line_number_is_refused_as_a_loop():
    message = refusal(BASE.replace("+16195550111", LINE))
    assert message.startswith("lines[0].chain[0].phone:") and "loop" in message


def test_empty_chain_is_refused():
    assert refusal(f'[[lines]]\nname = "QDN"\nnumber = "{LINE}"\nchain = []\n').startswith("lines[0].chain:")


def test_unknown_keys_are_refused():
    assert refusal("[relay]\nwiat = 5\n" + BASE).startswith("relay.wiat: unknown key")
    assert "chain[0].pone: unknown key" in refusal(BASE.replace("phone", "pone"))


def test_no_lines_is_refused():
    assert refusal("[relay]\nwait = 5\n").startswith("lines:")


def test_two_lines_with_the_same_number_are_refused():
    assert "already used" in refusal(BASE + BASE.replace('"QDN"', '"Other"'))


def test_load_config_names_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[relay]\nrepeat = -1\n" + BASE)
    with pytest.raises(relay.ConfigError, match=r"bad\.toml: relay\.repeat:"):
        relay.load_config(path)


def test_invalid_toml_is_refused_with_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[relay\n")
    with pytest.raises(relay.ConfigError, match=r"broken\.toml: not valid TOML"):
        relay.load_config(path)


def test_credentials_are_required_outside_dry_run():
    with pytest.raises(relay.ConfigError, match="TWILIO_ACCOUNT_SID"):
        relay.Settings.from_env({}).require_credentials()


def test_dry_run_needs_no_credentials_and_signs_with_dry_run_token():
    settings = relay.Settings.from_env({"RELAY_DRY_RUN": "1"})
    settings.require_credentials()
    assert settings.signing_token == "dry-run"


def test_env_public_url_wins_over_config():
    config = parse('[relay]\npublic_url = "https://a.example.com/"\n' + BASE)
    assert relay.Settings.from_env({}).public_url_for(config) == "https://a.example.com"
    assert (
        relay.Settings.from_env({"RELAY_PUBLIC_URL": "https://b.example"}).public_url_for(config) == "https://b.example"
    )


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o644])
def test_dotenv_readable_or_writable_by_group_or_others_is_refused(tmp_path, mode):
    path = tmp_path / ".env"
    path.write_text("TWILIO_AUTH_TOKEN=x\n")
    os.chmod(path, mode)
    with pytest.raises(relay.ConfigError, match="chmod 600"):
        relay.load_dotenv_file(path)


def test_dotenv_does_not_override_the_environment(tmp_path, monkeypatch):
    path = tmp_path / ".env"
    path.write_text("RELAY_TEST_VALUE=from-file\nRELAY_TEST_OTHER=from-file\n")
    os.chmod(path, 0o600)
    monkeypatch.setenv("RELAY_TEST_VALUE", "from-env")
    monkeypatch.delenv("RELAY_TEST_OTHER", raising=False)
    relay.load_dotenv_file(path)
    assert os.environ["RELAY_TEST_VALUE"] == "from-env"
    assert os.environ["RELAY_TEST_OTHER"] == "from-file"
    monkeypatch.delenv("RELAY_TEST_OTHER")


@pytest.mark.parametrize("port", ["0", "65536", "http", "-1"])
def test_a_port_out_of_range_is_refused(port):
    with pytest.raises(relay.ConfigError, match="PORT"):
        relay.Settings.from_env({"PORT": port})


def test_the_highest_port_is_accepted():
    assert relay.Settings.from_env({"PORT": "65535"}).port == 65535
