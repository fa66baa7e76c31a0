"""config.toml and the environment: what is accepted and how refusals read."""

import os
import subprocess
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


def shipped_config() -> str:
    """config.toml as the project ships it, whatever the operator has since made of their copy."""
    shipped = subprocess.run(["git", "show", "HEAD:config.toml"], cwd=ROOT, capture_output=True, text=True)
    return shipped.stdout if shipped.returncode == 0 else (ROOT / "config.toml").read_text()


def test_shipped_config_is_the_qdn_line_primary_then_backup():
    config = parse(shipped_config())
    (line,) = config.lines
    assert line.name == "QDN"
    assert [c.name for c in line.chain] == ["Sergio", "Backup"]
    assert [c.wait for c in line.chain] == [120, 300]


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(90, 90), ('"90"', 90), ('"90s"', 90), ('"5m"', 300), ('"1h"', 3600), ('"2d"', 172800), ('"2m30s"', 150)]
    + [('"1h30m"', 5400), ('"1d 2h"', 93600)],
)
def test_durations_are_seconds_or_suffixed_strings(value, seconds):
    assert parse(f"[relay]\nwait = {value}\n" + BASE).wait == seconds


@pytest.mark.parametrize("value", ['"soon"', "0", '"5 minutes"', "-3", "true", '""', '"30s2m"', '"1h1h"', '"m"'])
def test_bad_durations_are_refused_with_the_key(value):
    assert refusal(f"[relay]\nwait = {value}\n" + BASE).startswith("relay.wait:")


def test_contact_without_wait_uses_the_default_wait():
    config = parse('[relay]\nwait = "7m"\n' + BASE)
    assert config.lines[0].chain[0].wait == 420


def test_number_that_is_not_e164_is_refused():
    message = refusal(BASE.replace("+16195550111", "619-555-0111"))
    assert message.startswith('line "QDN", contact "Sergio", phone:') and "E.164" in message


def test_contact_equal_to_a_line_number_is_refused_as_a_loop():
    message = refusal(BASE.replace("+16195550111", LINE))
    assert message.startswith('line "QDN", contact "Sergio", phone:') and "loop" in message


def test_contact_equal_to_another_lines_number_is_refused_as_a_loop():
    other = BASE.replace('"QDN"', '"Other"').replace(LINE, "+16195550999")
    message = refusal(BASE.replace("+16195550111", "+16195550999") + other)
    assert message.startswith('line "QDN", contact "Sergio", phone:') and "loop" in message


def test_empty_chain_is_refused():
    assert refusal(f'[[lines]]\nname = "QDN"\nnumber = "{LINE}"\nchain = []\n').startswith('line "QDN", chain:')


def test_unknown_keys_are_refused():
    assert refusal("[relay]\nwiat = 5\n" + BASE).startswith("relay.wiat: unknown key")
    assert refusal(BASE.replace("phone", "pone")).startswith('line "QDN", contact "Sergio", pone: unknown key')


def test_a_misspelt_key_is_refused_with_the_key_meant():
    assert "did you mean phone?" in refusal(BASE.replace("phone", "phnoe"))
    assert "did you mean wait?" in refusal("[relay]\nwiat = 5\n" + BASE)


def test_a_contact_without_a_name_is_named_by_its_step():
    message = refusal(BASE.replace('name = "Sergio", ', ""))
    assert message.startswith('line "QDN", chain step 1, name:')


@pytest.mark.parametrize("zone", ["Pacific", "America", "PST", "Mars/Olympus", "", "../etc"])
def test_a_time_zone_that_is_no_zone_is_refused_in_one_line(zone):
    message = refusal(BASE.replace("chain =", f'timezone = "{zone}"\nchain ='))
    assert message.startswith('line "QDN", timezone:') and "time zone name" in message


def test_a_time_zone_folder_in_a_live_edit_keeps_the_last_good_config(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(BASE.replace("chain =", 'timezone = "Pacific"\nchain ='))
    with pytest.raises(relay.ConfigError, match="timezone"):
        relay.load_config(path)


def test_one_phone_twice_in_a_chain_is_refused_naming_both_contacts():
    twice = BASE.replace("}]", '}, { name = "Maria", phone = "+16195550111" }]')
    message = refusal(twice)
    assert message.startswith('line "QDN", contact "Maria", phone:')
    assert '"Sergio" and "Maria"' in message


def test_one_contact_listed_twice_in_a_chain_is_refused():
    twice = BASE.replace("}]", '}, { name = "Sergio", phone = "+16195550111" }]')
    assert '"Sergio" twice' in refusal(twice)


@pytest.mark.parametrize("url", ["relay.example.com", "https://", "ftp://relay.example.com", "https://a b.example"])
def test_a_public_url_that_is_not_absolute_http_is_refused_in_config(url):
    assert refusal(f'[relay]\npublic_url = "{url}"\n' + BASE).startswith("relay.public_url:")


@pytest.mark.parametrize("url", ["relay.example.com", "//relay.example.com", "https://"])
def test_a_public_url_that_is_not_absolute_http_is_refused_in_the_environment(url):
    with pytest.raises(relay.ConfigError, match="^RELAY_PUBLIC_URL:"):
        relay.Settings.from_env({"RELAY_PUBLIC_URL": url})


def example_env(commented: bool = False) -> dict:
    """.env.example's settings as an operator who copied it unchanged has them (and, with `commented`,
    the optional ones too, uncommented)."""
    lines = (ROOT / ".env.example").read_text().splitlines()
    if commented:
        lines = [line.removeprefix("# ") for line in lines]
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


@pytest.mark.parametrize("name", ["TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "TWILIO_API_KEY", "TWILIO_API_SECRET"])
def test_a_credential_left_as_the_example_placeholder_is_refused(name):
    env = {"TWILIO_ACCOUNT_SID": "AC" + "1" * 32, "TWILIO_AUTH_TOKEN": "a" * 32}
    if name.startswith("TWILIO_API"):
        env |= {"TWILIO_API_KEY": "SK" + "2" * 32, "TWILIO_API_SECRET": "b" * 32}
    env[name] = example_env(commented=True)[name]
    with pytest.raises(relay.ConfigError, match=f"^{name}: still the placeholder"):
        relay.Settings.from_env(env).require_credentials()


def test_the_example_env_unchanged_is_refused_and_real_looking_credentials_pass():
    with pytest.raises(relay.ConfigError, match="placeholder"):
        relay.Settings.from_env(example_env()).require_credentials()
    relay.Settings.from_env(
        {"TWILIO_ACCOUNT_SID": "AC" + "1" * 32, "TWILIO_AUTH_TOKEN": "a" * 32}
    ).require_credentials()


def test_the_example_env_is_fine_in_dry_run():
    relay.Settings.from_env({**example_env(), "RELAY_DRY_RUN": "1"}).require_credentials()


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


def test_an_account_sid_that_is_not_an_ac_sid_is_refused_outside_dry_run():
    settings = relay.Settings.from_env({"TWILIO_ACCOUNT_SID": "SK" + "1" * 32, "TWILIO_AUTH_TOKEN": "token"})
    with pytest.raises(relay.ConfigError, match="TWILIO_ACCOUNT_SID"):
        settings.require_credentials()


def test_a_lines_own_time_zone_is_kept_for_its_hours():
    config = parse(BASE.replace('number = "', 'timezone = "America/Los_Angeles"\nnumber = "'))
    assert config.lines[0].timezone == "America/Los_Angeles"
