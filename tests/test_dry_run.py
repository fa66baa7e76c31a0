"""The newcomer's walk-through in dry-run: no Twilio account, everything visible."""

import json
import socket

from conftest import BACKUP, CUSTOMER, LINE, SERGIO, RelayProcess, config_text, free_port, wait_until

import relay as relay_module


def outbox(relay: RelayProcess) -> list[dict]:
    path = relay.state_dir / "outbox.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def dry_run_relay(tmp_path, config: str) -> RelayProcess:
    relay = RelayProcess(tmp_path, None, config, dry_run=True)
    relay.env.pop("RELAY_PUBLIC_URL")
    return relay.start()


def test_dry_run_relays_a_customer_text_and_a_reply_acknowledges_it(tmp_path):
    relay = dry_run_relay(tmp_path, config_text())
    try:
        sent = relay.run(
            "send", "--from", CUSTOMER, "--to", LINE, "--body", "Boat at 9?", "--url", relay.url + "/api/sms/inbound"
        )
        assert sent.returncode == 0 and sent.stdout.startswith("200")
        page = wait_until(lambda: outbox(relay))[0]
        assert page["to"] == SERGIO and page["from"] == LINE and "Boat at 9?" in page["body"]
        assert relay.events("dry_run_sms")[0]["to"] == SERGIO
        assert "QDN #1" in relay.run("status").stdout
        reply = relay.run(
            "send", "--from", SERGIO, "--to", LINE, "--body", "#1 yes", "--url", relay.url + "/api/sms/inbound"
        )
        assert "<Message>" in reply.stdout and "#1" in reply.stdout
        assert relay.run("status").stdout.startswith("0 open")
    finally:
        relay.stop()


def test_dry_run_pages_the_backup_when_nobody_answers(tmp_path):
    relay = dry_run_relay(tmp_path, config_text(primary_wait="1s"))
    try:
        url = relay.url + "/api/sms/inbound"
        assert relay.run("send", "--from", CUSTOMER, "--to", LINE, "--body", "hello", "--url", url).returncode == 0
        pages = wait_until(lambda: len(outbox(relay)) == 2 and outbox(relay), timeout=5)
        assert [p["to"] for p in pages] == [SERGIO, BACKUP]
    finally:
        relay.stop()


def test_check_describes_the_chain_and_accepts_the_shipped_config(tmp_path):
    relay = RelayProcess(tmp_path, None, config_text(), dry_run=True)
    result = relay.run("check", "--dry-run")
    assert result.returncode == 0
    assert "Sergio +16195550111 (by sms, wait 2m) -> Backup +18583354807 (by sms, wait 5m)" in result.stdout


def test_check_fails_with_one_line_reason_on_a_bad_config(tmp_path):
    relay = RelayProcess(tmp_path, None, config_text().replace(SERGIO, LINE), dry_run=True)
    result = relay.run("check", "--dry-run")
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and "loop" in result.stderr


def test_serve_without_credentials_exits_with_a_reason(tmp_path):
    relay = RelayProcess(tmp_path, None, config_text())
    result = relay.run("serve")
    assert result.returncode == 1 and "TWILIO_ACCOUNT_SID" in result.stderr


def test_serve_on_a_port_in_use_exits_with_a_reason(tmp_path):
    relay = RelayProcess(tmp_path, None, config_text(), dry_run=True)
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", relay.port))
        taken.listen()
        result = relay.run("serve", "--dry-run")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"relay: PORT: cannot listen on 0.0.0.0:{relay.port}: Address already in use"
    ]


def test_serve_warns_at_start_when_the_platform_discards_its_files(start_relay):
    relay = start_relay(config_text(), dry_run=True, env={"DYNO": "web.1"})
    warnings = [e["detail"] for e in relay.logs() if e["event"] == "startup" and e["level"] == "warning"]
    assert any("DYNO is set" in w and "every restart" in w for w in warnings)


def test_serve_says_nothing_of_lost_files_on_heroku_with_a_database(start_relay, database_url):
    relay = start_relay(config_text(), dry_run=True, env={"DYNO": "web.1", "DATABASE_URL": database_url})
    assert not [e for e in relay.logs() if e["event"] == "startup" and e["level"] == "warning"]


def test_serve_says_nothing_of_lost_files_off_heroku(start_relay):
    relay = start_relay(config_text(), dry_run=True)
    assert not [e for e in relay.logs() if e["event"] == "startup" and e["level"] == "warning"]


def test_check_says_the_json_store_is_in_use_without_a_database_url(tmp_path):
    relay = RelayProcess(tmp_path, None, config_text(), dry_run=True)
    assert "store: JSON files under" in relay.run("check", "--dry-run").stdout


def test_check_says_the_database_connects_and_which_schema_it_holds(tmp_path, database_url):
    relay = RelayProcess(tmp_path, None, config_text(), dry_run=True, env={"DATABASE_URL": database_url})
    out = relay.run("check", "--dry-run").stdout
    assert "store: PostgreSQL at postgresql://postgres@127.0.0.1" in out
    assert "no relay tables yet" in out and out.rstrip().endswith("ok")
    relay.start()
    try:
        assert f"relay schema version {relay_module.SCHEMA_VERSION}" in relay.run("check", "--dry-run").stdout
    finally:
        relay.stop()


def test_check_fails_in_one_line_when_the_database_cannot_be_reached_and_shows_no_password(tmp_path):
    url = f"postgres://relay:secret@127.0.0.1:{free_port()}/relay"
    relay = RelayProcess(tmp_path, None, config_text(), dry_run=True, env={"DATABASE_URL": url})
    result = relay.run("check", "--dry-run")
    assert result.returncode == 1 and "database: cannot connect: " in result.stdout
    assert "Traceback" not in result.stderr and "secret" not in result.stdout + result.stderr


def test_send_takes_the_relays_base_url(tmp_path):
    relay = dry_run_relay(tmp_path, config_text())
    sent = relay.run("send", "--from", CUSTOMER, "--to", LINE, "--body", "Boat at 9?", "--url", relay.url)
    assert sent.returncode == 0 and sent.stdout.startswith("200")
    assert wait_until(lambda: outbox(relay))[0]["to"] == SERGIO


def test_send_to_a_number_no_line_has_says_so(tmp_path):
    relay = dry_run_relay(tmp_path, config_text())
    sent = relay.run("send", "--from", CUSTOMER, "--to", "+16195550999", "--body", "hello", "--url", relay.url)
    assert f"no line in {relay.workdir / 'config.toml'} has the number +16195550999 (lines: QDN {LINE})" in sent.stderr


def test_send_refuses_a_url_that_is_no_url(tmp_path):
    relay = RelayProcess(tmp_path, None, config_text(), dry_run=True)
    sent = relay.run("send", "--from", CUSTOMER, "--to", LINE, "--body", "hello", "--url", "127.0.0.1:8080")
    assert sent.returncode == 1 and sent.stderr.startswith("relay: --url:") and "Traceback" not in sent.stderr


def test_press_takes_one_key_only(tmp_path):
    relay = RelayProcess(tmp_path, None, config_text(), dry_run=True)
    for key in ("12", "x"):
        pressed = relay.run("press", key)
        assert pressed.returncode == 2 and "invalid choice" in pressed.stderr


def test_press_without_a_call_says_so_plainly(tmp_path):
    relay = RelayProcess(tmp_path, None, config_text(), dry_run=True)
    pressed = relay.run("press", "1")
    assert pressed.returncode == 1 and pressed.stderr.startswith("relay: no call in ")


def test_every_flag_of_serve_send_and_check_is_explained_by_help(tmp_path):
    relay = RelayProcess(tmp_path, None, config_text(), dry_run=True)
    send = ("send", ("--from", "--to", "--body", "--url"))
    for command, flags in (("serve", ("--dry-run",)), send, ("check", ("--dry-run", "--live"))):
        lines = relay.run(command, "--help").stdout.splitlines()
        for flag in flags:
            described = next(line for line in lines if line.strip().startswith(flag))
            assert len(described.split()) > 2, described


def test_check_outside_dry_run_refuses_placeholder_credentials(tmp_path):
    env = {"TWILIO_ACCOUNT_SID": "AC" + "x" * 32, "TWILIO_AUTH_TOKEN": "your_auth_token"}
    relay = RelayProcess(tmp_path, None, config_text(), env=env)
    result = relay.run("check")
    assert result.returncode == 1 and "placeholder" in result.stderr and "ok" not in result.stdout


def test_check_without_a_public_url_outside_dry_run_does_not_just_say_ok(tmp_path):
    env = {"TWILIO_ACCOUNT_SID": "AC" + "1" * 32, "TWILIO_AUTH_TOKEN": "a" * 32}
    relay = RelayProcess(tmp_path, None, config_text(), env=env)
    relay.env.pop("RELAY_PUBLIC_URL")
    out = relay.run("check").stdout
    assert "WARNING: public URL: not set" in out and out.splitlines()[-1] == "ok, but read the 1 WARNING line(s) above"


def test_serve_listens_where_host_says(tmp_path):
    relay = RelayProcess(tmp_path, None, config_text(), dry_run=True, env={"HOST": "127.0.0.1"}).start()
    try:
        assert relay.events("listening")[0]["host"] == "127.0.0.1"
    finally:
        relay.stop()


def test_send_signs_for_the_public_url_the_relay_checks_against(tmp_path):
    relay = RelayProcess(tmp_path, None, config_text(), dry_run=True)
    relay.env["RELAY_PUBLIC_URL"] = "https://relay.example.com"  # behind a proxy, as deployed
    relay.start()
    try:
        sent = relay.run("send", "--from", CUSTOMER, "--to", LINE, "--body", "Boat at 9?", "--url", relay.url)
        assert sent.returncode == 0 and sent.stdout.startswith("200")
    finally:
        relay.stop()


def test_send_exits_1_when_the_relay_refuses_the_text(tmp_path):
    relay = dry_run_relay(tmp_path, config_text())
    try:
        relay.env["TWILIO_AUTH_TOKEN"] = "another-token"  # signed with a token the relay does not hold
        sent = relay.run("send", "--from", CUSTOMER, "--to", LINE, "--body", "hello", "--url", relay.url)
        assert sent.returncode == 1 and sent.stdout.startswith("403")
    finally:
        relay.stop()


def test_the_state_goes_where_relay_state_dir_says(tmp_path):
    relay = RelayProcess(tmp_path, None, config_text(), dry_run=True)
    relay.env["RELAY_STATE_DIR"] = str(tmp_path / "elsewhere")
    relay.start()
    try:
        sent = relay.run("send", "--from", CUSTOMER, "--to", LINE, "--body", "hello", "--url", relay.url)
        assert sent.returncode == 0
        wait_until(lambda: (tmp_path / "elsewhere" / "outbox.jsonl").exists())
        assert not (tmp_path / "state").exists()
    finally:
        relay.stop()
