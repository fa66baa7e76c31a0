"""The store interface, in-process: every test runs on the JSON files and on PostgreSQL alike, through
the interface alone, as the relay service uses it."""

import pytest
from conftest import CUSTOMER, LINE, SERGIO, TOKEN, RecordingGateway, msid

import relay

QDN = relay.Line("QDN", LINE, (relay.Contact("Sergio", SERGIO, 60), relay.Contact("Backup", "+18583354807", 60)))
CONFIG = relay.Config(lines=(QDN,))
ANA = relay.Member("Ana", "+16195550122")


@pytest.fixture(params=["json", "postgresql"])
def store(request, tmp_path):
    if request.param == "json":
        opened = relay.JsonStore(tmp_path / "state")
    else:
        opened = relay.PgStore(request.getfixturevalue("database_url"))
    opened.open()
    return opened


def stored(store, sender=CUSTOMER, tag="1", body="hello", at=None) -> relay.Conversation:
    """A customer's new text, stored as the webhook stores it."""
    with store.transaction(f"QDN {sender}"):
        now = store.clock() if at is None else at
        arrival = store.arrival(msid(tag), "QDN", sender, now, customer=True)
        conv = relay.start_conversation(QDN, CONFIG, msid(tag), sender, body, arrival.code, now)
        ticket = store.save(conv)
    store.wait(ticket)
    return conv


def test_a_stored_text_is_known_and_a_retry_finds_it_answered(store):
    conv = stored(store)
    with store.transaction():
        again = store.arrival(msid("1"), "QDN", CUSTOMER, store.clock(), customer=True)
        assert store.knows(msid("1")) and again.answered == "" and store.get(conv.id).code == conv.code


def test_a_customers_second_text_joins_the_open_conversation(store):
    conv = stored(store)
    with store.transaction():
        arrival = store.arrival(msid("2"), "QDN", CUSTOMER, store.clock(), customer=True)
    assert arrival.answered is None and arrival.joins.id == conv.id


def test_codes_differ_among_a_lines_open_conversations(store):
    codes = {stored(store, f"+1555000{n:04d}", f"c{n}").code for n in range(5)}
    assert len(codes) == 5


def test_a_text_that_joined_nothing_is_remembered_with_its_answer(store):
    with store.transaction():
        store.arrival(msid("stray"), "QDN", SERGIO, store.clock(), customer=False)
        ticket = store.save_stray(msid("stray"), "QDN: nothing is waiting for you.", store.clock())
    store.wait(ticket)
    with store.transaction():
        again = store.arrival(msid("stray"), "QDN", SERGIO, store.clock(), customer=False)
    assert again.answered == "QDN: nothing is waiting for you."


def test_open_conversations_are_listed_oldest_first_and_found_by_code_and_by_who_was_paged(store):
    now = store.clock()
    newer = stored(store, "+15550000002", "newer", at=now)
    older = stored(store, "+15550000001", "older", at=now - 60)
    with store.transaction(reading=True):
        assert [c.id for c in store.open_on("QDN")] == [older.id, newer.id]
        assert store.holding_code("QDN", older.code).id == older.id
        assert store.newest_paged("QDN", SERGIO).id == newer.id
        assert store.newest_paged("QDN", "+18583354807") is None  # the backup was paged nothing yet
        assert store.open_count() == 2


def test_a_conversation_falls_due_at_its_deadline_and_not_before(store):
    conv = stored(store)
    relay.record_sent(conv, 0, "SM" + "1" * 32, conv.created)
    with store.transaction():
        ticket = store.save(conv)
    store.wait(ticket)
    with store.transaction():
        assert store.next_due() <= conv.deadline  # the sweeper looks by then at the latest
        assert store.due(conv.deadline - 1, {}, 100) == []
    with store.transaction():
        assert [c.id for c in store.due(conv.deadline, {}, 100)] == [conv.id]


def test_a_due_conversation_a_sweep_pass_cannot_take_is_stepped_by_the_next(store, tmp_path, monkeypatch):
    # However slow the store, every conversation due is stepped in the end: a pass that ran out of time
    # leaves the rest due (once, the JSON store lost them, and PostgreSQL's passes stepped none).
    monkeypatch.setattr(relay, "SWEEP_BATCH_SECONDS", 0.0)
    past = store.clock() - 3 * 60
    convs = [stored(store, sender=f"+1555123000{n}", tag=str(n), at=past + n) for n in range(3)]
    for conv in convs:
        relay.record_sent(conv, 0, "SM" + "1" * 32, conv.created)
        with store.transaction():
            ticket = store.save(conv)
        store.wait(ticket)
    settings = relay.Settings.from_env({"TWILIO_AUTH_TOKEN": TOKEN, "RELAY_STATE_DIR": str(tmp_path)})
    service = relay.Relay(settings, CONFIG, store, RecordingGateway())
    for _ in range(4):
        service.sweeper.sweep()
    with store.transaction():
        assert [store.get(c.id).step for c in convs] == [1, 1, 1]  # each went on to the backup


def test_a_cap_allows_its_limit_in_an_hour_and_then_no_more(store):
    now = store.clock()
    with store.transaction():
        allowed = [store.take("sender:QDN:x", 3, now + n) for n in range(4)]
    with store.transaction():
        later = store.take("sender:QDN:x", 3, now + 3601)
    assert allowed == [True, True, True, False] and later


def test_once_every_says_yes_once_a_period(store):
    now = store.clock()
    with store.transaction():
        said = [store.once_every("bundle:QDN", 600, now), store.once_every("bundle:QDN", 600, now + 599)]
    with store.transaction():
        said.append(store.once_every("bundle:QDN", 600, now + 601))
    assert said == [True, False, True]


def test_an_override_is_kept_until_deleted(store):
    now = store.clock()
    override = relay.Override("ab12cd", "deck", *ANA, now, now + 3600, "Sergio", now)
    store.add_override(override)
    assert [o.id for o in store.overrides(now)] == ["ab12cd"]
    assert store.delete_override("ab12cd", now).id == "ab12cd"
    assert store.overrides(now) == [] and store.delete_override("ab12cd", now) is None


def test_a_shifts_reminder_is_granted_once(store):
    now = store.clock()
    assert [store.remind_once("deck 100.000", now), store.remind_once("deck 100.000", now + 1)] == [True, False]


def test_a_console_record_is_kept_until_it_expires_or_is_dropped(store):
    now = store.clock()
    store.keep_console_record("session:abc", {"phone": SERGIO}, now + 60)
    assert store.console_record("session:abc", now)["phone"] == SERGIO
    assert store.console_record("session:abc", now + 61) is None
    store.keep_console_record("session:abc", None, now)
    assert store.console_record("session:abc", now) is None


def test_history_lists_finished_conversations_newest_first(store):
    now = store.clock()
    for n in range(3):
        conv = stored(store, f"+1555000{n:04d}", f"h{n}", at=now + n)
        relay.acknowledge(conv, QDN.chain[0], None, now + n)
        with store.transaction():
            ticket = store.save(conv)
        store.wait(ticket)
    assert [c.id for c in store.history(now - 1, 2)] == [msid("h2"), msid("h1")]


def test_the_last_catch_up_pass_is_remembered(store):
    assert store.last_catch_up() is None
    store.note_catch_up(123.0, True)
    assert store.last_catch_up() == (123.0, True)


def test_a_fresh_store_has_no_damage_to_report(store):
    assert store.damage_report() == []
