"""The shared database failing gray: it hangs without closing, runs out of connection slots, or
keeps a frozen relay's rows locked. Relays stay honest: a quick 503 rather than a late 200, and
nobody's work held up for long."""

import datetime
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from conftest import BACKUP, CUSTOMER, SERGIO, Postgres, config_text, msid, wait_until

import relay as relay_module


class Proxy:
    """A TCP proxy on 127.0.0.1 in front of PostgreSQL. While `hanging`, it keeps every connection
    open, acknowledges what it is sent, and forwards nothing either way: a stuck pooler."""

    def __init__(self, port: int):
        self.target = port
        self.hanging = False
        self.sockets: list[socket.socket] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, database_url: str) -> str:
        return database_url.replace(f":{self.target}/", f":{self.port}/")

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.sockets.append(client)
            if self.hanging:
                threading.Thread(target=self._pump, args=(client, None), daemon=True).start()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.sockets.append(upstream)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source, sink):
        try:
            while data := source.recv(65536):
                if sink is not None and not self.hanging:
                    sink.sendall(data)
        except OSError:
            pass

    def close(self):
        self.listener.close()
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def proxied(postgres, database_url):
    proxy = Proxy(postgres.port)
    yield proxy, proxy.url(database_url)
    proxy.close()


def timed(call):
    began = time.monotonic()
    result = call()
    return result, time.monotonic() - began


def test_while_the_database_hangs_a_text_is_answered_503_within_5s_and_healthz_within_2s(start_relay, proxied):
    proxy, url = proxied
    relay = start_relay(config_text(), env={"DATABASE_URL": url})
    assert relay.inbound(CUSTOMER, "before")[0] == 200
    proxy.hanging = True
    (status, _), took = timed(lambda: relay.inbound(CUSTOMER, "engine will not start"))
    assert status == 503 and took < 5, (status, took)
    (status, _), took = timed(lambda: relay.get("/healthz"))
    assert status == 503 and took < 2, (status, took)


def test_once_a_hang_ends_the_relay_carries_on_by_itself_within_5s(start_relay, fake_twilio, proxied):
    proxy, url = proxied
    relay = start_relay(config_text(), env={"DATABASE_URL": url})
    proxy.hanging = True
    assert relay.inbound(CUSTOMER, "during")[0] == 503
    proxy.hanging = False
    back = time.monotonic()
    wait_until(relay.healthy, timeout=5)
    assert time.monotonic() - back < 5
    assert relay.inbound(CUSTOMER, "after")[0] == 200
    wait_until(lambda: fake_twilio.delivered(SERGIO))


def test_a_session_left_idle_in_a_transaction_is_ended_by_the_server_and_its_locks_freed(database_url):
    store = relay_module.PgStore(database_url)
    store.open()
    frozen = store.db.connect()  # a relay's session, as it connects every one
    frozen.execute("BEGIN")
    frozen.execute("SELECT pg_advisory_xact_lock(42)")
    began = time.monotonic()
    with psycopg.connect(database_url, autocommit=True) as other:
        wait_until(lambda: other.execute("SELECT pg_try_advisory_lock(42)").fetchone()[0], timeout=6)
    assert time.monotonic() - began <= relay_module.PgSessions.IDLE_IN_TRANSACTION_MS / 1000 + 1
    frozen.close()


def relay_sessions(database_url: str) -> int:
    with psycopg.connect(database_url, autocommit=True) as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'relay' AND datname = current_database()"
        ).fetchone()[0]


def test_a_relay_opens_at_most_database_connections_its_listener_included(start_relay, fake_twilio, database_url):
    relay = start_relay(config_text(extra_relay="database_connections = 3"), env={"DATABASE_URL": database_url})
    most = 0
    with ThreadPoolExecutor(12) as pool:
        answers = pool.map(lambda i: relay.inbound(f"+1555123{i:04d}", "flood")[0], range(40))
        while not pool._work_queue.empty():
            most = max(most, relay_sessions(database_url))
        assert set(answers) <= {200, 503}
    most = max(most, relay_sessions(database_url))
    assert 1 <= most <= 3


@pytest.fixture
def crowded_postgres():
    """A cluster with room for 12 connections in all."""
    cluster = Postgres(settings="-c max_connections=12 -c superuser_reserved_connections=0").start()
    yield cluster
    cluster.close()


def test_three_relays_on_a_server_with_max_connections_12_all_serve_and_page_every_text_they_took(
    start_relay, fake_twilio, crowded_postgres
):
    url = crowded_postgres.new_database()
    relays = [start_relay(config_text(), env={"DATABASE_URL": url}, name=name) for name in ("a", "b", "c")]
    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda i: (i, relays[i % 3].inbound(f"+1555123{i:04d}", f"text {i}")[0]), range(24)))
    taken = [i for i, status in answers if status == 200]
    assert len(taken) >= 12, answers
    for i in taken:
        wait_until(lambda i=i: any(f"text {i}" in m["Body"] for m in fake_twilio.delivered(SERGIO)), timeout=10)
    for relay in relays:  # each still serves: none left answering 503
        assert wait_until(lambda relay=relay: relay.inbound(CUSTOMER, "still there?")[0] == 200, timeout=5)
    assert fake_twilio.delivered(BACKUP) == []


class Queued:
    """Stands in for the sender threads: a submitted send waits until the test runs it."""

    def __init__(self):
        self.waiting = []

    def submit(self, fn, *args):
        self.waiting.append((fn, args))

    def run(self):
        while self.waiting:
            fn, args = self.waiting.pop(0)
            fn(*args)


def relay_on(store, tmp_path) -> relay_module.Relay:
    from conftest import LINE, PUBLIC_URL, TOKEN, RecordingGateway

    chain = (relay_module.Contact("Sergio", SERGIO, 60), relay_module.Contact("Backup", BACKUP, 60))
    config = relay_module.Config(lines=(relay_module.Line("QDN", LINE, chain),), public_url=PUBLIC_URL)
    settings = relay_module.Settings.from_env({"TWILIO_AUTH_TOKEN": TOKEN, "RELAY_STATE_DIR": str(tmp_path)})
    service = relay_module.Relay(settings, config, store, RecordingGateway())
    service.outbox.senders = Queued()
    return service


def test_a_page_whose_claim_another_relay_took_over_is_never_sent(database_url, tmp_path):
    from conftest import LINE, msid

    store = relay_module.PgStore(database_url)
    store.open()
    frozen = relay_on(store, tmp_path)
    frozen.receive(
        relay_module.read_inbound({"MessageSid": msid("claimed"), "From": CUSTOMER, "To": LINE, "Body": "hi"})
    )
    with psycopg.connect(database_url, autocommit=True) as conn:  # its lease lapsed; another relay claimed it
        conn.execute(
            """UPDATE relay_conversations SET doc = jsonb_set(doc::jsonb, '{pages,0,holder}', '"another"')::json"""
        )
    frozen.outbox.senders.run()
    assert frozen.gateway.sent == []


def test_a_page_whose_claim_lapsed_while_it_was_counted_and_another_relay_took_is_never_sent(
    database_url, tmp_path, monkeypatch
):
    from conftest import LINE, msid

    store = relay_module.PgStore(database_url)
    store.open()
    frozen = relay_on(store, tmp_path)
    frozen.receive(
        relay_module.read_inbound({"MessageSid": msid("counted"), "From": CUSTOMER, "To": LINE, "Body": "hi"})
    )
    take = frozen.caps.take_outbound

    def frozen_while_counting(page, now):
        store.offset += store.MAX_LEASE + 1  # the relay froze here; its claim lapsed, and another took it
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(
                """UPDATE relay_conversations SET doc = jsonb_set(doc::jsonb, '{pages,0,holder}', '"another"')::json"""
            )
        return take(page, now)

    monkeypatch.setattr(frozen.caps, "take_outbound", frozen_while_counting)
    frozen.outbox.senders.run()
    assert frozen.gateway.sent == []


def test_a_page_whose_claim_lapsed_is_claimed_anew_before_it_is_sent_once(database_url, tmp_path):
    from conftest import LINE, msid

    store = relay_module.PgStore(database_url)
    store.open()
    slow = relay_on(store, tmp_path)
    slow.receive(relay_module.read_inbound({"MessageSid": msid("lapsed"), "From": CUSTOMER, "To": LINE, "Body": "hi"}))
    store.offset += store.LEASE  # storing the claim took as long as the claim lasts
    sending = slow.gateway.send

    def send_seeing_the_claim(*args):
        with store.transaction(reading=True):
            page = store.get(msid("lapsed")).pages[0]
        assert page.holder == slow.id and page.lease > store.clock()  # renewed before it went out
        return sending(*args)

    slow.gateway.send = send_seeing_the_claim
    slow.outbox.senders.run()
    assert len(slow.gateway.sent) == 1


def test_a_step_begun_after_a_slow_wait_for_its_lock_gets_all_its_wait(database_url, tmp_path, monkeypatch):
    from conftest import LINE, msid

    store = relay_module.PgStore(database_url)
    store.open()
    service = relay_on(store, tmp_path)
    service.receive(relay_module.read_inbound({"MessageSid": msid("slow"), "From": CUSTOMER, "To": LINE, "Body": "hi"}))
    service.outbox.senders.run()
    store.offset += 61  # Sergio's wait has run out
    due = store.due

    def slow_due(now, in_flight, most):
        found = due(now, in_flight, most)
        store.offset += 8  # the locks took eight seconds to come
        return found

    monkeypatch.setattr(store, "due", slow_due)
    service.sweeper.sweep()
    with store.transaction(reading=True):
        conv = store.get(msid("slow"))
    assert conv.step == 1 and conv.deadline - store.clock() == pytest.approx(60, abs=0.5)


def slow_every_write(database_url: str, seconds: float) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            f"""CREATE FUNCTION slow_write() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN PERFORM pg_sleep({seconds}); RETURN NEW; END $$"""
        )
        tables = conn.execute("SELECT tablename FROM pg_tables WHERE tablename LIKE 'relay%'").fetchall()
        for (table,) in tables:
            conn.execute(
                f"CREATE TRIGGER slow BEFORE INSERT OR UPDATE ON {table} FOR EACH ROW EXECUTE FUNCTION slow_write()"
            )


def test_with_writes_slowed_to_300ms_two_relays_lose_nothing_resend_only_what_was_in_flight_and_page_backups_on_time(
    start_relay, fake_twilio, database_url
):
    config = config_text(primary_wait="4s", backup_wait="60s")
    first = start_relay(config, env={"DATABASE_URL": database_url}, name="a")
    second = start_relay(config, env={"DATABASE_URL": database_url}, name="b")
    slow_every_write(database_url, 0.3)
    relays = (first, second)
    with ThreadPoolExecutor(10) as pool:
        answers = list(
            pool.map(
                lambda i: relays[i % 2].inbound(f"+1555123{i:04d}", f"text {i}", sid=msid(f"slow {i}"))[0], range(10)
            )
        )
    taken = [i for i, status in enumerate(answers) if status == 200]
    assert len(taken) >= 5, answers

    def pages(to, i):
        return [r for r in fake_twilio.requests if r["form"]["To"] == to and f": text {i}\n" in r["form"]["Body"]]

    for i in taken:
        wait_until(lambda i=i: pages(BACKUP, i), timeout=20)
    accepted = {e["message_sid"]: e for r in relays for e in r.events("inbound_accepted")}
    stored = [e for r in relays for e in r.events("relay_sent")]
    resent = 0
    for i in taken:
        text = accepted[msid(f"slow {i}")]
        for phone in (SERGIO, BACKUP):
            copies = sorted(page["at"] for page in pages(phone, i))
            if len(copies) > 1:
                # Sent again only while the first was in flight: with Twilio, its outcome not yet stored
                # (the second relay's look and count, 300 ms writes, come between its claim and its send).
                outcome = min(at(e) for e in stored if e["code"] == text["code"] and e["to"] == phone)
                assert len(copies) == 2 and copies[1] - outcome < 1.5, (i, phone, copies, outcome)
                resent += 1
        due = at(text) + 4
        # Within 2 s of its deadline plus the database's own delay: the 300 ms writes of the steps
        # and sends before it (eight chains reach their backups at once, two relays share them).
        assert pages(BACKUP, i)[0]["at"] - due < 2 + 2.5, (i, pages(BACKUP, i)[0]["at"] - due)
    assert resent <= 2  # a claim lapsing in flight is the exception, not the rule


def at(event: dict) -> float:
    return datetime.datetime.fromisoformat(event["ts"]).timestamp()


def drop(database_url: str, statement: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(statement)


def test_a_dropped_function_is_created_again_and_texts_are_paged(start_relay, fake_twilio, database_url):
    relay = start_relay(config_text(), env={"DATABASE_URL": database_url})
    drop(database_url, "DROP FUNCTION relay_arrival")
    relay.inbound(CUSTOMER, "first after the drop")  # finds it missing: the relay mends it
    wait_until(lambda: relay.events("schema_mended"), timeout=5)
    assert relay.events("schema_mended")[0]["function"] == "relay_arrival"
    assert wait_until(lambda: relay.inbound(CUSTOMER, "engine will not start")[0] == 200, timeout=5)
    wait_until(lambda: any("engine will not start" in m["Body"] for m in fake_twilio.delivered(SERGIO)))


def test_a_dropped_table_is_named_by_healthz_check_and_status_with_no_traceback(start_relay, database_url):
    relay = start_relay(config_text(), env={"DATABASE_URL": database_url})
    drop(database_url, "DROP TABLE relay_messages")
    assert relay.inbound(CUSTOMER, "engine will not start")[0] == 503
    said = wait_until(lambda: (found := relay.get("/healthz"))[0] == 503 and "is missing" in found[1] and found[1])
    assert "the relay's table relay_messages is missing; restore it from a backup" in said
    time.sleep(2)  # two more heals
    assert len(relay.events("state_unwritable")) == 1  # said once, not every second
    for command in ("check", "status"):
        result = relay.run(command)
        assert result.returncode == 1, command
        said = result.stdout + result.stderr
        assert "relay_messages is missing" in said and "Traceback" not in said, said


def test_a_lost_version_row_is_refused_in_one_line_at_start(start_relay, database_url, tmp_path):
    relay = start_relay(config_text(), env={"DATABASE_URL": database_url})
    relay.stop()
    drop(database_url, "DELETE FROM relay_schema")
    result = relay.run("serve", timeout=10)
    assert result.returncode != 0
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith(
            f"the relay_schema table has lost its version row; if the relay's tables are whole, put it back: "
            f"INSERT INTO relay_schema VALUES ({relay_module.SCHEMA_VERSION})"
        )
    )
    assert "relay_conversations" in relay.run("check").stdout or relay.run("check").returncode == 1


PASSWORD = "p#ss?w:rd%2F%40x!"  # URL delimiters, the two libpq needs encoded percent-encoded


def test_a_password_full_of_url_delimiters_never_appears_in_any_output(start_relay, postgres, database_url):
    url = database_url.replace("postgres@", f"postgres:{PASSWORD}@")
    relay = start_relay(config_text(), env={"DATABASE_URL": url})
    assert relay.inbound(CUSTOMER, "engine will not start")[0] == 200
    outputs = [relay.run(command) for command in ("check", "status")]
    assert all(result.returncode == 0 for result in outputs), outputs
    seen = relay.log_path.read_text() + "".join(result.stdout + result.stderr for result in outputs)
    assert "postgresql://postgres@127.0.0.1" in seen
    for piece in ("p#ss", "?w:rd", "%2F", "%40x"):
        assert piece not in seen


def test_a_key_value_database_string_is_refused_in_one_line_without_repeating_it(tmp_path):
    from conftest import RelayProcess

    url = "host=127.0.0.1 dbname=relay password=hunter2"
    relay = RelayProcess(tmp_path, None, config_text(), dry_run=True, env={"DATABASE_URL": url})
    result = relay.run("check", "--dry-run")
    assert result.returncode != 0 and "hunter2" not in result.stdout + result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith("DATABASE_URL: not a postgres:// or postgresql:// URL (key=value strings are not taken)")
    )
