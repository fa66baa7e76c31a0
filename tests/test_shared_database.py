"""Many relays on one PostgreSQL database (DATABASE_URL): each text handled once, each step taken
once, each page sent by one relay, and a killed relay's work taken up by another."""

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from conftest import (
    BACKUP,
    CUSTOMER,
    LINE,
    PUBLIC_URL,
    SERGIO,
    TOKEN,
    Postgres,
    RecordingGateway,
    RelayProcess,
    RunAtOnce,
    barrier,
    clock_shim,
    config_text,
    free_port,
    msid,
    wait_until,
)

import relay


@pytest.fixture
def store_kind() -> str:
    return "postgresql"


@pytest.fixture
def two_relays(start_relay):
    def start(config: str, env=None):
        return start_relay(config, env=env, name="a"), start_relay(config, env=env, name="b")

    return start


def opened_store(database_url: str) -> relay.PgStore:
    store = relay.PgStore(database_url)
    store.open()
    return store


def taken(store: relay.PgStore, sid: str) -> str | None:
    """Take a MessageSid, as a contact's text takes it (in a transaction); what it was answered before."""
    return store.arrival(sid, "QDN", SERGIO, store.clock(), customer=False).answered


def codes_paged(fake, to=SERGIO) -> list[str]:
    return [re.match(r"QDN #(\w+) ", m["Body"])[1] for m in fake.delivered(to) if re.match(r"QDN #\w+ from", m["Body"])]


def test_two_relays_on_one_database_both_start_and_relay_what_each_is_sent(two_relays, fake_twilio):
    a, b = two_relays(config_text())
    assert a.inbound(CUSTOMER, "to a")[0] == 200 and b.inbound("+15551230002", "to b")[0] == 200
    wait_until(lambda: len(fake_twilio.delivered(SERGIO)) == 2)
    assert sorted(codes_paged(fake_twilio)) == ["1", "2"]


def test_a_message_sid_retried_to_the_other_relay_changes_nothing_and_gets_the_same_answer(two_relays, fake_twilio):
    a, b = two_relays(config_text())
    a.inbound(CUSTOMER, "hello")
    wait_until(lambda: fake_twilio.delivered(SERGIO))
    reply = {"MessageSid": msid("ack"), "From": SERGIO, "To": LINE, "Body": "#1 on it"}
    first = a.post_form("/api/sms/inbound", reply)
    again = b.post_form("/api/sms/inbound", reply)
    assert first == again and "Nobody else is paged" in first[1]
    assert len(a.events("acknowledged") + b.events("acknowledged")) == 1
    assert len(b.events("inbound_duplicate")) == 1


def test_reply_codes_stay_unique_while_texts_arrive_at_two_relays_at_once(two_relays, fake_twilio):
    a, b = two_relays(config_text())
    senders = [f"+1555200{n:04d}" for n in range(24)]
    threads = [threading.Thread(target=(a, b)[n % 2].inbound, args=(s, f"text {n}")) for n, s in enumerate(senders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wait_until(lambda: len(fake_twilio.delivered(SERGIO)) == 24)
    assert sorted(map(int, codes_paged(fake_twilio))) == list(range(1, 25))


def test_two_texts_of_one_new_customer_at_two_relays_at_once_open_one_conversation(two_relays, fake_twilio):
    a, b = two_relays(config_text())
    for attempt in range(5):  # five customers, each texting both relays at the same moment
        sender = f"+1555400{attempt:04d}"
        threads = [threading.Thread(target=r.inbound, args=(sender, f"from {r.port}")) for r in (a, b)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert len(a.events("inbound_accepted") + b.events("inbound_accepted")) == 5
    assert len(a.events("inbound_joined") + b.events("inbound_joined")) == 5


def test_retention_deletes_finished_conversations_and_their_texts_from_the_database(database_url):
    store = opened_store(database_url)
    line = relay.Line("QDN", LINE, (relay.Contact("Sergio", SERGIO, 60),))
    now = store.clock()
    for sid, finished in ((msid("old"), now - 8 * 86400), (msid("recent"), now - 3600)):
        with store.transaction():
            assert taken(store, sid) is None
            conv = relay.start_conversation(line, relay.Config(lines=(line,)), sid, CUSTOMER, "hi", "1", finished)
            conv.status, conv.finished_at, conv.pages[0].state = "unanswered", finished, "sent"
            store.save(conv)
    assert store.tidy(now, 7 * 86400) == 1
    assert not store.knows(msid("old")) and store.knows(msid("recent"))
    with store.transaction():
        assert store.get(msid("old")) is None and store.get(msid("recent")) is not None


def whole_table_reads(admin: psycopg.Connection) -> dict[str, int]:
    """Sequential scans of the tables that grow with traffic, once every other session has ended
    (a session's counts reach the statistics when it ends)."""
    admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid()"
    )
    others = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    wait_until(lambda: admin.execute(others).fetchone()[0] == 0)
    admin.execute("SELECT pg_stat_clear_snapshot()")
    rows = admin.execute(
        "SELECT relname, seq_scan FROM pg_stat_user_tables WHERE relname IN ('relay_messages', 'relay_conversations')"
    )
    return dict(rows.fetchall())


def test_texts_and_lease_renewals_read_no_table_whole_however_many_texts_are_remembered(tmp_path, database_url):
    # A week of texts is tens of thousands of rows. A statement that joins the rows it changes with a
    # list it is given may be planned as a read of the whole table, for every text. Nested loops are
    # turned off here so that the planner shows such a join at once, not only once its statistics lag.
    opened_store(database_url)
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute(
            "INSERT INTO relay_messages (sid, conversation, at) SELECT 'SMold' || g, 'old' || g, 0 "
            "FROM generate_series(1, 20000) AS g"
        )
        admin.execute(
            "INSERT INTO relay_conversations "
            "(id, line, sender, code, status, created, finished_at, two_way, held, doc) "
            "SELECT 'old' || g, 'QDN', '+1555' || g, g::text, 'unanswered', 0, 0, false, false, '{}' "
            "FROM generate_series(1, 20000) AS g"
        )
        admin.execute("ANALYZE")
        admin.execute(
            psycopg.sql.SQL("ALTER DATABASE {} SET enable_nestloop = off").format(
                psycopg.sql.Identifier(admin.info.dbname)
            )
        )
        before = whole_table_reads(admin)
        config = relay.Config(
            lines=(relay.Line("QDN", LINE, (relay.Contact("Sergio", SERGIO, 60),)),), public_url=PUBLIC_URL
        )
        settings = relay.Settings.from_env({"TWILIO_AUTH_TOKEN": TOKEN, "RELAY_STATE_DIR": str(tmp_path)})
        store = opened_store(database_url)
        service = relay.Relay(settings, config, store, RecordingGateway())
        service.outbox.senders = RunAtOnce()
        for n in range(8):  # past the fifth, psycopg prepares each statement and the server may cache a plan
            service.receive(
                relay.read_inbound({"MessageSid": msid(n), "From": f"+1555123{n:04d}", "To": LINE, "Body": "hi"})
            )
            store.renew({msid(n): {0}}, service.id)
        assert len(service.gateway.sent) == 8
        assert whole_table_reads(admin) == before


def test_a_reply_without_a_code_finds_its_conversation_behind_a_full_batch_of_newer_ones(database_url):
    # The newest open conversations are read a batch at a time: a full batch with none paged to the
    # contact means read on, not "none".
    store = opened_store(database_url)
    backup_first = relay.Line("QDN", LINE, (relay.Contact("Backup", BACKUP, 60),))
    sergio_first = relay.Line("QDN", LINE, (relay.Contact("Sergio", SERGIO, 60),))
    now = store.clock()
    for n, line in enumerate([backup_first] + [sergio_first] * relay.PgStore.NEWEST_BATCH):
        with store.transaction():
            taken(store, msid(n))
            config = relay.Config(lines=(line,))
            store.save(relay.start_conversation(line, config, msid(n), f"+1555000{n:04d}", "hi", str(n), now + n))
    with store.transaction():
        found = store.newest_paged("QDN", BACKUP)
    assert found is not None and found.id == msid(0)


def test_the_sweeper_is_told_when_the_next_deadline_falls(database_url):
    # So it looks then, not only at its next poll.
    store = opened_store(database_url)
    line = relay.Line("QDN", LINE, (relay.Contact("Sergio", SERGIO, 60), relay.Contact("Backup", BACKUP, 60)))
    now = store.clock()
    for n, started in enumerate((now - 30, now - 10)):
        conv = relay.start_conversation(
            line, relay.Config(lines=(line,)), msid(n), f"+1555000{n:04d}", "hi", str(n), started
        )
        conv.pages[0].state = "sent"
        with store.transaction():
            taken(store, msid(n))
            store.save(conv)
    with store.transaction(reading=True):
        assert store.next_due() == pytest.approx(now + 30, abs=0.01)  # the first one's backup


def test_the_database_clock_is_read_again_while_the_relay_runs(database_url, monkeypatch):
    # Read at start, then moved on by this process's own clock: if that clock runs off (a suspended
    # machine's stops, a faulty one drifts), the next read puts the deadlines back on the database's.
    store = opened_store(database_url)
    own_clock = time.monotonic
    monkeypatch.setattr(relay.time, "monotonic", lambda: own_clock() + 3600)
    store.tidy(store.clock(), 7 * 86400)
    with psycopg.connect(database_url) as conn:
        (database_now,) = conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()
    assert abs(store.clock() - database_now) < 1


def test_pages_one_relay_gives_up_wake_the_other_relays_at_once(database_url):
    giver, listener = opened_store(database_url), opened_store(database_url)
    line = relay.Line("QDN", LINE, (relay.Contact("Sergio", SERGIO, 60),))
    conv = relay.start_conversation(line, relay.Config(lines=(line,)), msid("q"), CUSTOMER, "hi", "1", giver.clock())
    conv.pages[0].holder = "giver"
    with giver.transaction():
        taken(giver, msid("q"))
        giver.save(conv, in_flight={0})
    wakes, stop = [], threading.Event()
    listening = threading.Thread(target=listener.listen, args=(lambda: wakes.append("woken"), stop))
    listening.start()
    try:
        wait_until(lambda: wakes)  # one on connecting: what was given up while nobody listened
        giver.give_up({conv.id: {0}}, "giver")
        wait_until(lambda: len(wakes) == 2, timeout=5)  # the listener's only other wake: a notification
    finally:
        stop.set()
        listening.join()


def test_a_running_relay_listens_for_the_pages_other_relays_give_up(start_relay, database_url):
    start_relay(config_text())
    listening = """SELECT count(*) FROM pg_stat_activity
                   WHERE datname = current_database() AND state = 'idle' AND query = %s"""
    with psycopg.connect(database_url, autocommit=True) as conn:
        wait_until(lambda: conn.execute(listening, (f"LISTEN {relay.PgStore.CHANNEL}",)).fetchone()[0] == 1)


def take(store: relay.PgStore, key: str, limit: int, at: float) -> bool:
    with store.transaction():
        return store.take(key, limit, at)


def test_a_cap_counted_in_the_database_allows_again_as_its_uses_leave_the_hour(database_url):
    store = opened_store(database_url)
    start = store.clock()
    assert [take(store, "outbound:texts", 2, start + s) for s in (0, 10, 20)] == [True, True, False]
    assert not take(store, "outbound:texts", 2, start + 3599)
    assert take(store, "outbound:texts", 2, start + 3600.5)  # the first use has left the hour
    assert not take(store, "outbound:texts", 2, start + 3601)
    assert take(store, "outbound:texts", 2, start + 3611)


def slow_cap_uses(database_url: str, seconds: float) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            f"""CREATE FUNCTION slow_use() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN PERFORM pg_sleep({seconds}); RETURN NEW; END $$"""
        )
        conn.execute(
            "CREATE TRIGGER slow BEFORE INSERT OR UPDATE ON relay_cap_uses FOR EACH ROW EXECUTE FUNCTION slow_use()"
        )


def test_takes_of_one_cap_racing_on_a_slow_database_allow_exactly_its_limit(database_url):
    stores = [opened_store(database_url) for _ in range(8)]
    slow_cap_uses(database_url, 0.2)
    together = threading.Barrier(8)  # all eight write their uses at once, and count as they finish

    def take_together(store):
        together.wait()
        return take(store, "outbound:texts", 3, store.clock())

    with ThreadPoolExecutor(8) as pool:
        allowed = list(pool.map(take_together, stores))
    assert allowed.count(True) == 3
    with psycopg.connect(database_url, autocommit=True) as conn:  # the refused takes left no use behind
        assert conn.execute("SELECT count(*) FROM relay_cap_uses").fetchone()[0] == 3


def test_a_take_of_a_cap_is_not_held_up_by_another_takes_slow_write(database_url):
    stores = [opened_store(database_url) for _ in range(4)]
    slow_cap_uses(database_url, 0.5)
    began = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(lambda store: take(store, "outbound:texts", 100, store.clock()), stores))
    # Side by side they take one write's time; one after another, behind the cap's lock, four.
    assert time.monotonic() - began < 1.5


def test_cap_uses_that_left_the_hour_are_forgotten_and_the_cap_counts_afresh(database_url):
    store = opened_store(database_url)
    start = store.clock()
    assert take(store, "sender:QDN:+15551230001", 1, start) and take(store, "busy", 5, start + 3000)
    store.tidy(start + 3600, 7 * 86400)  # its one use has just left the hour
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert [key for (key,) in conn.execute("SELECT key FROM relay_cap_uses")] == ["busy"]
    assert take(store, "sender:QDN:+15551230001", 1, start + 3602)
    assert not take(store, "sender:QDN:+15551230001", 1, start + 3603)


def test_each_due_step_is_taken_by_exactly_one_relay(two_relays, fake_twilio):
    a, b = two_relays(config_text(primary_wait="2s"))
    for n in range(6):
        (a, b)[n % 2].inbound(f"+1555300{n:04d}", f"boat {n}")
    wait_until(lambda: len(fake_twilio.delivered(BACKUP)) == 6, timeout=15)
    time.sleep(1.5)  # a second relay's duplicate would come now, if at all
    assert len(fake_twilio.delivered(BACKUP)) == 6 and len(fake_twilio.delivered(SERGIO)) == 6
    assert len(a.events("escalated") + b.events("escalated")) == 6


def test_a_killed_relays_timer_fires_on_the_other_within_two_seconds_of_its_deadline(two_relays, fake_twilio):
    a, b = two_relays(config_text(primary_wait="3s"))
    before = time.time()
    a.inbound(CUSTOMER, "hello")
    wait_until(lambda: a.events("relay_sent"))
    a.kill()
    backup = wait_until(lambda: [r for r in fake_twilio.requests if r["form"]["To"] == BACKUP], timeout=10)
    assert backup[0]["at"] < before + 3 + 2
    assert b.events("escalated")


def test_a_page_a_killed_relay_had_claimed_is_sent_by_the_other_within_two_seconds(two_relays, fake_twilio):
    a, b = two_relays(config_text())
    fake_twilio.faults.append(("hang", 30))  # the first send to Twilio never comes back
    a.inbound(CUSTOMER, "hello")
    wait_until(lambda: fake_twilio.attempts(SERGIO) == 1)
    killed = time.time()
    a.kill()
    wait_until(lambda: fake_twilio.delivered(SERGIO), timeout=10)
    sent = [r["at"] for r in fake_twilio.requests if r["form"]["To"] == SERGIO and not r["fault"]]
    assert sent[0] - killed < 2.0
    assert [e["to"] for e in wait_until(lambda: b.events("relay_sent"))] == [SERGIO]


def test_a_slow_send_keeps_its_claim_so_the_other_relay_never_sends_it_too(two_relays, fake_twilio):
    a, b = two_relays(config_text())
    fake_twilio.faults.append(("hang", 4))  # Twilio takes 4 s to answer: longer than a claim lasts unrenewed
    a.inbound(CUSTOMER, "hello")
    wait_until(lambda: a.events("relay_sent"), timeout=10)
    time.sleep(0.5)
    assert fake_twilio.attempts(SERGIO) == 1 and not b.events("relay_sent")


@pytest.fixture
def queued_behind_a_slow_send(two_relays, fake_twilio):
    """Relays a and b. At a, Sergio's first page is with Twilio for 2 s (longer than a claim lasts
    unrenewed), and the second page waits behind it."""
    a, b = two_relays(config_text())
    fake_twilio.faults.append(("hang", 2))
    a.inbound(CUSTOMER, "first")
    wait_until(lambda: fake_twilio.attempts(SERGIO) == 1)
    a.inbound("+15551230002", "second")
    return a, b


def test_a_page_queued_behind_a_slow_send_keeps_its_claim_so_the_other_relay_never_sends_it(
    queued_behind_a_slow_send, fake_twilio
):
    a, b = queued_behind_a_slow_send
    wait_until(lambda: len(a.events("relay_sent")) == 2, timeout=10)
    assert fake_twilio.attempts(SERGIO) == 2 and not b.events("relay_sent")


def test_a_send_still_with_twilio_when_its_relay_is_stopped_keeps_its_claim(two_relays, fake_twilio):
    a, b = two_relays(config_text())
    fake_twilio.faults.append(("hang", 2))  # longer than a claim lasts unrenewed
    a.inbound(CUSTOMER, "hello")
    wait_until(lambda: fake_twilio.attempts(SERGIO) == 1)
    a.stop()  # SIGTERM: the send is finished, and its claim kept meanwhile
    assert a.events("relay_sent") and fake_twilio.attempts(SERGIO) == 1
    b.inbound("+15551230002", "barrier")  # pages to one contact go out in order
    wait_until(lambda: b.events("relay_sent"))
    assert fake_twilio.attempts(SERGIO) == 2 and len(b.events("relay_sent")) == 1


def test_a_page_queued_when_its_relay_is_stopped_is_sent_by_the_other_at_once(queued_behind_a_slow_send, fake_twilio):
    a, b = queued_behind_a_slow_send
    stopped = time.monotonic()
    threading.Thread(target=a.stop).start()  # SIGTERM: a hands the queued page back
    wait_until(lambda: b.events("relay_sent"), timeout=10)
    assert time.monotonic() - stopped < 0.7  # not a lapsed claim (0.8 to 1.45 s) taken up by the poll
    wait_until(lambda: a.proc.poll() is not None)
    assert fake_twilio.attempts(SERGIO) == 2 and [e["code"] for e in b.events("relay_sent")] == ["2"]


def test_an_acknowledgement_made_while_its_page_is_with_twilio_outlasts_the_send_s_outcome(
    two_relays, fake_twilio, database_url
):
    a, b = two_relays(config_text())
    fake_twilio.faults.append(("hang", 2))  # Sergio's page takes 2 s to be taken
    a.inbound(CUSTOMER, "hello")
    wait_until(lambda: fake_twilio.attempts(SERGIO) == 1)
    assert "Nobody else is paged" in b.inbound(SERGIO, "#1 on it")[1]
    wait_until(lambda: a.events("relay_sent"), timeout=10)  # logged once the outcome is stored
    with psycopg.connect(database_url, autocommit=True) as conn:
        (doc,) = conn.execute("SELECT doc FROM relay_conversations").fetchone()
    assert doc["status"] == "acknowledged" and doc["pages"][0]["state"] == "sent"


@pytest.fixture
def an_older_conversation_held(start_relay, fake_twilio, database_url):
    """A relay with two conversations paged to Sergio (#1, #2), and #1's row locked by another
    transaction, as a change to it would hold it. A reply that read every open conversation of the
    line under lock would wait for it (for the 5 s statement timeout, then 503)."""
    relay_ = start_relay(config_text())
    relay_.inbound(CUSTOMER, "first")
    relay_.inbound("+15551230002", "second")
    wait_until(lambda: len(fake_twilio.delivered(SERGIO)) == 2)
    with psycopg.connect(database_url) as conn:
        conn.execute("SELECT 1 FROM relay_conversations WHERE code = '1' FOR UPDATE")
        yield relay_
        conn.rollback()


@pytest.mark.parametrize("reply", ["#2 on it", "2", "on it"])
def test_a_reply_waits_for_no_other_open_conversation(an_older_conversation_held, reply):
    began = time.monotonic()
    status, answer = an_older_conversation_held.inbound(SERGIO, reply)
    assert status == 200 and "QDN #2 from +15551230002 is yours" in answer
    assert time.monotonic() - began < 2


def test_a_list_reply_waits_for_no_open_conversation_it_lists(an_older_conversation_held):
    began = time.monotonic()
    status, answer = an_older_conversation_held.inbound(SERGIO, "list")
    assert status == 200 and "2 open for you" in answer and "#1 " in answer and "#2 " in answer
    assert time.monotonic() - began < 2


def test_the_sender_cap_counts_across_relays(two_relays, fake_twilio):
    a, b = two_relays(config_text(extra_relay="sender_hourly_cap = 2"))
    for n in range(3):
        (a, b)[n % 2].inbound(CUSTOMER, f"text {n}")
    assert len(a.events("inbound_held") + b.events("inbound_held")) == 1


def test_the_outbound_cap_holds_across_relays_under_concurrent_texts(two_relays, fake_twilio, database_url):
    a, b = two_relays(config_text(extra_relay="outbound_hourly_cap = 5"))
    with psycopg.connect(database_url, autocommit=True) as conn:  # each page counted takes 0.1 s: a race shows
        conn.execute(
            """CREATE FUNCTION slowly() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
               IF NEW.key LIKE 'outbound:%' THEN PERFORM pg_sleep(0.1); END IF; RETURN NEW; END $$"""
        )
        conn.execute("CREATE TRIGGER slowly BEFORE INSERT ON relay_cap_uses FOR EACH ROW EXECUTE FUNCTION slowly()")
    threads = [
        threading.Thread(target=(a, b)[n % 2].inbound, args=(f"+1555300{n:04d}", f"text {n}")) for n in range(20)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wait_until(lambda: len(a.events("inbound_accepted") + b.events("inbound_accepted")) == 20)
    wait_until(lambda: len(codes_paged(fake_twilio)) >= 5)
    time.sleep(1)  # a page over the cap would be on its way by now
    assert len(codes_paged(fake_twilio)) == 5


def test_deadlines_follow_the_database_clock_when_the_relays_clocks_disagree(start_relay, fake_twilio, tmp_path):
    env, offset = clock_shim(tmp_path, "time")
    offset.write_text(str(-1800))  # this relay's wall clock is half an hour behind the other's
    behind = start_relay(config_text(primary_wait="3s"), env=env, name="behind")
    start_relay(config_text(primary_wait="3s"), name="on_time")
    before = time.time()
    behind.inbound(CUSTOMER, "hello")
    backup = wait_until(lambda: [r for r in fake_twilio.requests if r["form"]["To"] == BACKUP], timeout=10)
    assert before + 3 <= backup[0]["at"] < before + 3 + 1.5


def test_webhooks_answer_503_while_the_database_is_down_and_carry_on_by_themselves(tmp_path, fake_twilio):
    cluster = Postgres().start()
    relay = RelayProcess(tmp_path, fake_twilio, config_text(), env={"DATABASE_URL": cluster.new_database()})
    try:
        relay.start()
        cluster.stop()
        assert wait_until(lambda: relay.get("/healthz")[0] == 503, timeout=5)
        assert "database unreachable" in relay.get("/healthz")[1]
        assert relay.inbound(CUSTOMER, "while down")[0] == 503
        cluster.restart()
        back = time.monotonic()
        wait_until(lambda: relay.get("/healthz")[0] == 200, timeout=10)
        assert time.monotonic() - back < 5
        assert relay.inbound(CUSTOMER, "after")[0] == 200
        wait_until(lambda: fake_twilio.delivered(SERGIO))
        (page,) = fake_twilio.delivered(SERGIO)
        assert "after" in page["Body"] and "while down" not in page["Body"]
    finally:
        relay.stop()
        cluster.close()


def test_a_text_answered_200_outlives_a_crash_of_the_database_itself(tmp_path, fake_twilio):
    # A webhook's commit waits for its log record to be written out; the relay's other commits need
    # not (their work is done again). Here the log writer waits 10 s between rounds, so a commit
    # that did not wait would still be in the database's memory when it is killed, and lost.
    cluster = Postgres(settings="-c wal_writer_delay=10000").start()
    relay = RelayProcess(tmp_path, fake_twilio, config_text(), env={"DATABASE_URL": cluster.new_database()})
    try:
        relay.start()
        assert relay.inbound(CUSTOMER, "before the crash", sid=msid("kept"))[0] == 200
        cluster.stop()  # at once, as a crash: nothing is written out on the way down
        cluster.restart()
        with psycopg.connect(relay.env["DATABASE_URL"]) as db:
            stored = db.execute("SELECT conversation FROM relay_messages WHERE sid = %s", (msid("kept"),)).fetchall()
        assert stored == [(msid("kept"),)]
    finally:
        relay.stop()
        cluster.close()


def test_a_transaction_cut_half_way_stores_nothing_of_the_text_and_its_retry_is_relayed(
    start_relay, fake_twilio, database_url
):
    relay_ = start_relay(config_text())
    sid, answers = msid("cut"), []
    with psycopg.connect(database_url, autocommit=True) as db:
        # Held here, the webhook's transaction has claimed the MessageSid and drawn a code: it waits
        # for the sender cap's lock, and its connection is cut while it waits.
        cap_lock = (relay.sender_cap("QDN", CUSTOMER),)
        db.execute("SELECT pg_advisory_lock(hashtext(%s))", cap_lock)
        post = threading.Thread(target=lambda: answers.append(relay_.inbound(CUSTOMER, "cut", sid=sid)))
        post.start()
        waiting = "SELECT pid FROM pg_stat_activity WHERE application_name = 'relay' AND wait_event = 'advisory'"
        (pid,) = wait_until(lambda: db.execute(waiting).fetchone())
        db.execute("SELECT pg_terminate_backend(%s)", (pid,))
        post.join(10)
        assert answers[0][0] == 503
        assert db.execute("SELECT count(*) FROM relay_messages").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM relay_conversations").fetchone() == (0,)
        db.execute("SELECT pg_advisory_unlock(hashtext(%s))", cap_lock)
    wait_until(lambda: relay_.get("/healthz")[0] == 200, timeout=5)
    assert relay_.inbound(CUSTOMER, "cut", sid=sid)[0] == 200  # Twilio's fallback, or a retry
    (page,) = wait_until(lambda: fake_twilio.delivered(SERGIO))
    assert "cut" in page["Body"]


def test_serve_says_in_one_line_that_the_database_is_unreachable_and_starts_once_it_is_there(tmp_path, fake_twilio):
    cluster = Postgres()
    url = f"postgresql://postgres@127.0.0.1:{cluster.port}/postgres"
    relay = RelayProcess(tmp_path, fake_twilio, config_text(), env={"DATABASE_URL": url})
    try:
        relay.start(wait=False)
        wait_until(lambda: relay.events("listening"), timeout=10)
        assert len(relay.events("database_unreachable")) == 1 and relay.get("/healthz")[0] == 503
        assert relay.inbound(CUSTOMER, "too early")[0] == 503
        assert "Traceback" not in relay.log_path.read_text()
        cluster.start()
        wait_until(lambda: relay.get("/healthz")[0] == 200, timeout=5)
        assert relay.inbound(CUSTOMER, "hello")[0] == 200
        wait_until(lambda: fake_twilio.delivered(SERGIO))
    finally:
        relay.stop()
        cluster.close()


def test_a_database_with_a_newer_schema_is_refused_in_one_line(tmp_path, database_url):
    relay = RelayProcess(tmp_path, None, config_text(), dry_run=True, env={"DATABASE_URL": database_url})
    relay.start()
    relay.stop()
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE relay_schema SET version = version + 1")
    result = relay.run("serve", "--dry-run")
    assert result.returncode == 1
    assert "newer than this relay's" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_database_with_an_older_schema_is_upgraded_and_its_caps_count_on(tmp_path, fake_twilio, database_url):
    with psycopg.connect(database_url, autocommit=True) as conn:  # as the first version of the relay left it
        for statement in relay.SCHEMA[1]:
            conn.execute(statement)
        conn.execute("CREATE TABLE relay_schema (version integer NOT NULL)")
        conn.execute("INSERT INTO relay_schema VALUES (1)")
        conn.execute("INSERT INTO relay_cap_uses (key, at) VALUES ('outbound:texts', extract(epoch FROM now()))")
    upgraded = RelayProcess(tmp_path, fake_twilio, config_text(extra_relay="outbound_hourly_cap = 2"))
    upgraded.env["DATABASE_URL"] = database_url
    try:
        upgraded.start()
        assert [(e["from_version"], e["to_version"]) for e in upgraded.events("schema_upgraded")] == [
            (1, relay.SCHEMA_VERSION)
        ]
        upgraded.inbound(CUSTOMER, "first")
        upgraded.inbound("+15551230002", "second")  # the use the old schema counted leaves room for one
        assert [e["cap"] for e in wait_until(lambda: upgraded.events("cap_reached"))] == ["outbound"]
        wait_until(lambda: fake_twilio.delivered(SERGIO))
    finally:
        upgraded.stop()


@pytest.mark.parametrize(
    ("command", "said"),
    [(("check", "--dry-run"), "database: connects"), (("import-state", "files"), "imported 0 of 0 conversation(s)")],
)
def test_the_database_commands_find_database_url_in_the_dotenv_file(tmp_path, database_url, command, said):
    relay = RelayProcess(tmp_path, None, config_text(), dry_run=True)
    dotenv = tmp_path / ".env"
    dotenv.write_text(f"DATABASE_URL={database_url}\n")
    dotenv.chmod(0o600)
    (tmp_path / "files").mkdir()
    done = relay.run(*command)
    assert done.returncode == 0 and said in done.stdout, done.stdout + done.stderr


def test_import_state_copies_a_state_directory_and_a_second_run_changes_nothing(tmp_path, fake_twilio, database_url):
    (tmp_path / "files").mkdir()
    (tmp_path / "db").mkdir()
    files = RelayProcess(tmp_path / "files", fake_twilio, config_text(primary_wait="2s"))
    files.start()
    files.inbound(CUSTOMER, "stored in files", sid=msid("old"))
    wait_until(lambda: fake_twilio.delivered(SERGIO))
    files.inbound(BACKUP, "#9 matches nothing")  # remembered as a text of no conversation
    files.stop()
    database = RelayProcess(tmp_path / "db", fake_twilio, config_text(primary_wait="2s"))
    database.env["DATABASE_URL"] = database_url
    first = database.run("import-state", str(files.state_dir))
    assert first.returncode == 0 and "imported 1 of 1 conversation(s), 1 of 1 other text(s)" in first.stdout
    again = database.run("import-state", str(files.state_dir)).stdout
    assert "imported 0 of 1 conversation(s), 0 of 1 other text(s)" in again
    assert "from +15551230001" in database.run("status").stdout
    try:
        database.start()
        assert database.inbound(CUSTOMER, "stored in files", sid=msid("old"))[0] == 200
        wait_until(lambda: fake_twilio.delivered(BACKUP), timeout=10)  # its timer carried on from the files
        assert len(fake_twilio.delivered(SERGIO)) == 1 and database.events("inbound_duplicate")
    finally:
        database.stop()


def test_a_second_relay_on_the_same_database_is_not_refused(start_relay, database_url, tmp_path):
    first = start_relay(config_text(), name="a")
    (tmp_path / "b").mkdir()
    second = RelayProcess(tmp_path / "b", None, config_text(), env=first.env | {"PORT": str(free_port())})
    assert second.run("check", "--dry-run").returncode == 0


def test_a_schema_upgrade_records_its_version_so_the_next_start_runs_it_no_more(database_url):
    with psycopg.connect(database_url, autocommit=True) as conn:  # as the first version of the relay left it
        for statement in relay.SCHEMA[1]:
            conn.execute(statement)
        conn.execute("CREATE TABLE relay_schema (version integer NOT NULL)")
        conn.execute("INSERT INTO relay_schema VALUES (1)")
    opened_store(database_url)
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert conn.execute("SELECT version FROM relay_schema").fetchall() == [(relay.SCHEMA_VERSION,)]
    opened_store(database_url)  # a second start: nothing to upgrade, nothing refused


def test_import_state_brings_the_archives_texts_so_a_retry_of_one_pages_nobody(tmp_path, fake_twilio, database_url):
    state = tmp_path / "files" / "state"
    state.mkdir(parents=True)
    line = relay.Line("QDN", LINE, (relay.Contact("Sergio", SERGIO, 120),))
    now = time.time()
    done = relay.start_conversation(line, relay.Config(lines=(line,)), msid("archived"), CUSTOMER, "hi", "7", now)
    relay.acknowledge(done, line.chain[0], {"sid": msid("took it"), "from": SERGIO, "body": "ok", "at": now}, now)
    (state / "archive-2026-12-07.jsonl").write_text(json.dumps({"conversation": done.to_dict()}) + "\n")
    (tmp_path / "db").mkdir()
    database = RelayProcess(tmp_path / "db", fake_twilio, config_text())
    database.env["DATABASE_URL"] = database_url
    assert "imported 1 of 1 conversation(s)" in database.run("import-state", str(state)).stdout
    try:
        database.start()
        assert database.inbound(CUSTOMER, "hi", sid=msid("archived"))[0] == 200  # Twilio's retry, late
        barrier(database, fake_twilio)
        assert database.events("inbound_duplicate") and fake_twilio.delivered(SERGIO)[:-1] == []
    finally:
        database.stop()
