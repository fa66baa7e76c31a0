"""The heartbeat: an outside monitor hears from each relay every period while it can page, and /fail
with the reason while it cannot, so someone is told when the relay itself is down."""

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import BACKUP, CUSTOMER, SERGIO, Postgres, config_text, wait_until

EVERY_SECOND = 'heartbeat_every = "1s"'


class Monitor:
    """A push monitor on 127.0.0.1 (Healthchecks.io's convention): records each ping; `hang` holds each
    one unanswered until the test ends, `refuse` answers each with 500."""

    def __init__(self, hang=False, refuse=False):
        self.pings: list[tuple[float, str, str, str]] = []  # (when, method, path, body)
        self.released = threading.Event()
        monitor = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _ping(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                monitor.pings.append((time.monotonic(), self.command, self.path, body))
                if hang:
                    monitor.released.wait()
                    return
                self.send_response(500 if refuse else 200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"OK")

            do_GET = do_POST = _ping

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/ping/3f1c"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def of(self, method: str, path: str = "/ping/3f1c") -> list[tuple[float, str, str, str]]:
        return [p for p in self.pings if p[1] == method and p[2] == path]

    def close(self):
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def monitor():
    found = Monitor()
    yield found
    found.close()


def with_heartbeat(monitor: Monitor, extra: str = EVERY_SECOND, **config) -> tuple[str, dict]:
    return config_text(extra_relay=extra, **config), {"RELAY_HEARTBEAT_URL": monitor.url}


def test_a_healthy_relay_pings_the_monitor_once_every_period(start_relay, monitor):
    config, env = with_heartbeat(monitor)
    start_relay(config, env=env)
    wait_until(lambda: len(monitor.of("GET")) >= 4)
    times = [p[0] for p in monitor.of("GET")]
    assert all(0.8 <= later - earlier <= 1.5 for earlier, later in zip(times, times[1:], strict=False))
    assert monitor.of("POST", "/ping/3f1c/fail") == []


def test_without_a_heartbeat_url_nothing_is_pinged(start_relay, monitor):
    relay = start_relay(config_text(extra_relay=EVERY_SECOND))
    time.sleep(1.5)  # a period and a half in which a ping would have come
    assert monitor.pings == []
    assert "heartbeat: off" in relay.run("check").stdout


def test_a_heartbeat_url_that_is_not_a_url_is_refused_in_one_line(start_relay, tmp_path):
    from conftest import RelayProcess

    relay = RelayProcess(tmp_path, None, config_text(), dry_run=True, env={"RELAY_HEARTBEAT_URL": "hc-ping.com/x"})
    result = relay.run("check", "--dry-run")
    assert result.returncode != 0
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith(
            "RELAY_HEARTBEAT_URL: 'hc-ping.com/x' is not an absolute URL like https://hc-ping.com/your-check-uuid"
        )
    )


@pytest.fixture
def own_postgres():
    """A cluster this test may stop and start again, apart from the suite's."""
    cluster = Postgres().start()
    yield cluster
    cluster.close()


def test_the_monitor_hears_fail_with_the_reason_while_the_database_is_down_and_pings_again_once_back(
    start_relay, monitor, own_postgres, tmp_path
):
    config, env = with_heartbeat(monitor)
    start_relay(config, env=env | {"DATABASE_URL": own_postgres.new_database()})
    wait_until(lambda: monitor.of("GET"))
    own_postgres.stop()
    stopped = time.monotonic()
    (when, _, _, reason) = wait_until(lambda: monitor.of("POST", "/ping/3f1c/fail"), timeout=10)[0]
    assert when - stopped <= 1 + 5  # within one period and 5 s of the trouble
    assert "database" in reason.lower() or "connection" in reason.lower(), reason
    own_postgres.restart()
    back = time.monotonic()
    wait_until(lambda: any(p[0] > back for p in monitor.of("GET")), timeout=10)
    assert next(p[0] for p in monitor.of("GET") if p[0] > back) - back <= 5


def test_twilio_refusing_the_credentials_is_reported_to_the_monitor(start_relay, fake_twilio, monitor):
    config, env = with_heartbeat(monitor)
    relay = start_relay(config, env=env)
    fake_twilio.faults.extend([(401, 20003, {})] * 3)
    relay.inbound(CUSTOMER, "engine will not start")
    (_, _, _, reason) = wait_until(lambda: monitor.of("POST", "/ping/3f1c/fail"), timeout=10)[0]
    assert reason.startswith("Twilio refuses the credentials (HTTP 401)")
    wait_until(lambda: fake_twilio.delivered(SERGIO), timeout=20)  # a retry went through: healthy again
    sent = time.monotonic()
    wait_until(lambda: any(p[0] > sent for p in monitor.of("GET")), timeout=5)


def test_a_hanging_monitor_delays_no_page_and_no_escalation(start_relay, fake_twilio):
    hanging = Monitor(hang=True)
    try:
        config, env = with_heartbeat(hanging, primary_wait="2s")
        relay = start_relay(config, env=env)
        wait_until(lambda: hanging.pings)  # the heartbeat thread is now stuck in its ping
        sent = time.time()
        relay.inbound(CUSTOMER, "engine will not start")
        wait_until(lambda: fake_twilio.delivered(SERGIO), timeout=5)
        paged = next(r["at"] for r in fake_twilio.requests if r["form"]["To"] == SERGIO)
        assert paged - sent < 1
        wait_until(lambda: fake_twilio.delivered(BACKUP), timeout=6)
        backup = next(r["at"] for r in fake_twilio.requests if r["form"]["To"] == BACKUP)
        assert backup - paged < 2 + 1
    finally:
        hanging.close()


def test_a_monitor_that_refuses_is_logged_once_a_period_not_in_a_loop(start_relay):
    refusing = Monitor(refuse=True)
    try:
        config, env = with_heartbeat(refusing)
        relay = start_relay(config, env=env)
        wait_until(lambda: len(refusing.pings) >= 3)
        started = refusing.pings[0][0]
        time.sleep(0.5)  # the log line of the last ping seen
        failed = relay.events("heartbeat_failed")
        assert 3 <= len(failed) <= int(time.monotonic() - started) + 2
        assert failed[0]["status"] == 500 and failed[0]["level"] == "warning"
        assert "3f1c" not in relay.log_path.read_text()  # the monitor's secret part of its URL is never logged
    finally:
        refusing.close()


def test_a_relay_deployed_with_a_wrong_auth_token_tells_the_monitor_at_its_first_catch_up(
    start_relay, fake_twilio, monitor
):
    fake_twilio.reject_credentials = True
    config, env = with_heartbeat(monitor)
    start_relay(config, env=env)
    (_, _, _, reason) = wait_until(lambda: monitor.of("POST", "/ping/3f1c/fail"), timeout=5)[0]
    assert reason.startswith("Twilio refuses the credentials (HTTP 401)")
