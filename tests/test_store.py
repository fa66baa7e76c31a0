"""The state directory: durable before the 200, readable after any crash, held by one relay."""

import json
import os
import stat
import time

import pytest
from conftest import CUSTOMER, LINE, SERGIO, msid
from freezegun import freeze_time

import relay

QDN = relay.Line("QDN", LINE, (relay.Contact("Sergio", SERGIO, 60),))
CONFIG = relay.Config(lines=(QDN,), retention=7 * 86400)


def conversation(sid: str, now: float) -> relay.Conversation:
    return relay.start_conversation(QDN, CONFIG, sid, CUSTOMER, "hello", "1", now)


def opened(directory) -> relay.JsonStore:
    store = relay.JsonStore(directory)
    store.open()
    return store


def reopen(store: relay.JsonStore) -> relay.JsonStore:
    """What a restart after SIGKILL sees: the files only."""
    os.close(store.lock_fd)
    return opened(store.dir)


def test_saved_conversation_survives_a_restart(tmp_path):
    store = opened(tmp_path)
    store.wait(store.save(conversation(msid("1"), time.time())))
    again = reopen(store)
    assert again.conversations[msid("1")].messages[0]["body"] == "hello"
    assert again.knows(msid("1"))


def test_last_saved_state_of_a_conversation_wins(tmp_path):
    store = opened(tmp_path)
    conv = conversation(msid("1"), time.time())
    store.save(conv)
    relay.record_sent(conv, 0, msid("sent"), time.time())
    store.wait(store.save(conv))
    assert reopen(store).conversations[msid("1")].pages[0].state == "sent"


def test_torn_last_journal_line_is_skipped(tmp_path):
    store = opened(tmp_path)
    store.wait(store.save(conversation(msid("1"), time.time())))
    with open(store.journal.path, "ab") as f:
        f.write(b'{"id": "SM2", "line": "Q')
    again = reopen(store)
    assert set(again.conversations) == {msid("1")}
    for path in tmp_path.glob("*.jsonl"):
        assert path.read_bytes().endswith(b"\n") or not path.read_bytes()  # the torn tail is cut off
        for line in path.read_text().splitlines():
            json.loads(line)


def test_second_store_on_the_same_directory_is_refused(tmp_path):
    opened(tmp_path)
    with pytest.raises(relay.StateLocked):
        opened(tmp_path)


def test_files_are_0600_and_the_directory_0700(tmp_path):
    directory = tmp_path / "state"
    directory.mkdir(mode=0o755)
    (directory / "old.json").write_text("{}")
    os.chmod(directory / "old.json", 0o644)
    store = opened(directory)
    store.wait(store.save(conversation(msid("1"), time.time())))
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for path in directory.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name


def test_files_a_fold_writes_are_0600(tmp_path):
    store = opened(tmp_path)
    done = conversation(msid("1"), time.time())
    relay.acknowledge(done, QDN.chain[0], {"sid": msid("1r")}, time.time())
    store.wait(store.save(done))
    store.fold()
    assert list(tmp_path.glob("archive-*.jsonl"))
    for path in tmp_path.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name


def test_an_archive_write_that_fails_half_way_leaves_the_archive_as_it_was(tmp_path, monkeypatch):
    archive = tmp_path / "archive-2026-11-01.jsonl"
    relay.append_durably(archive, b'{"sids": []}\n')
    real_write = relay.write_all

    def write_half_then_fail(fd, data):
        real_write(fd, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(relay, "write_all", write_half_then_fail)
    with pytest.raises(OSError):
        relay.append_durably(archive, b'{"sids": ["SM1"], "conversation": {}}\n')
    assert archive.read_bytes() == b'{"sids": []}\n'


def test_folding_moves_settled_conversations_to_the_archive(tmp_path):
    store = opened(tmp_path)
    done = conversation(msid("1"), time.time())
    relay.acknowledge(done, QDN.chain[0], {"sid": msid("1r")}, time.time())
    still_open = conversation(msid("2"), time.time())
    store.save(done)
    store.wait(store.save(still_open))
    store.fold()
    assert set(store.conversations) == {msid("2")}
    assert store.knows(msid("1")) and store.knows(msid("1r"))
    again = reopen(store)
    assert set(again.conversations) == {msid("2")}
    assert again.knows(msid("1")) and again.knows(msid("1r"))


def test_pruning_deletes_old_finished_conversations_and_keeps_open_ones(tmp_path):
    with freeze_time("2026-11-01 12:00:00") as clock:
        store = opened(tmp_path)
        done = conversation(msid("1"), time.time())
        relay.acknowledge(done, QDN.chain[0], {"sid": msid("1r")}, time.time())
        store.save(done)
        store.wait(store.save(conversation(msid("2"), time.time())))
        store.fold()
        clock.tick(6 * 86400)
        assert store.prune(time.time(), CONFIG.retention) == 0
        clock.tick(3 * 86400)
        assert store.prune(time.time(), CONFIG.retention) == 1
        assert not store.knows(msid("1"))
        assert list(tmp_path.glob("archive-*")) == []
        assert set(reopen(store).conversations) == {msid("2")}


def test_archive_sids_with_odd_characters_are_still_known_after_restart(tmp_path):
    store = opened(tmp_path)
    done = conversation(msid("1"), time.time())
    relay.acknowledge(done, QDN.chain[0], {"sid": 'SM]odd"sid'}, time.time())
    store.wait(store.save(done))
    store.fold()
    assert reopen(store).knows('SM]odd"sid')


def test_restart_with_only_a_snapshot_does_not_rewrite_it(tmp_path):
    store = opened(tmp_path)
    store.wait(store.save(conversation(msid("1"), time.time())))
    store.fold()
    store.journal.close()
    store.journal.path.unlink()
    written = (tmp_path / "conversations.jsonl").stat().st_mtime_ns
    again = reopen(store)
    assert (tmp_path / "conversations.jsonl").stat().st_mtime_ns == written
    assert set(again.conversations) == {msid("1")}
    again.wait(again.save(conversation(msid("2"), time.time())))
    assert set(reopen(again).conversations) == {msid("1"), msid("2")}


def test_a_quiet_journal_is_still_folded_every_hour(tmp_path):
    with freeze_time("2026-11-01 12:00:00") as clock:
        store = opened(tmp_path)
        store.wait(store.save(conversation(msid("1"), time.time())))
        assert not store.needs_fold()
        clock.tick(3601)
        assert store.needs_fold()


def test_a_journal_past_its_size_limit_is_folded_at_once(tmp_path):
    with freeze_time("2026-11-01 12:00:00"):
        store = opened(tmp_path)
        store.FOLD_BYTES = 2000
        store.wait(store.save(conversation(msid("1"), time.time())))
        assert store.journal.size < 2000 and not store.needs_fold()
        for n in range(2, 6):
            store.wait(store.save(conversation(msid(n), time.time())))
        assert store.journal.size > 2000 and store.needs_fold()


def test_an_empty_journal_needs_no_fold(tmp_path):
    with freeze_time("2026-11-01 12:00:00") as clock:
        store = opened(tmp_path)
        clock.tick(7200)
        assert not store.needs_fold()


def test_a_finished_conversation_with_texts_still_to_send_is_not_archived(tmp_path):
    store = opened(tmp_path)
    config = relay.Config(lines=(QDN,), alarm_phone="+16195550199")
    conv = relay.start_conversation(QDN, config, msid("1"), CUSTOMER, "hello", "1", time.time())
    relay.record_sent(conv, 0, msid("p"), time.time())
    assert relay.escalate(conv, time.time()) == "unanswered"  # the alarm text is still to send
    store.wait(store.save(conv))
    store.fold()
    assert msid("1") in store.conversations and list(tmp_path.glob("archive-*")) == []


def test_an_archive_day_is_kept_until_the_whole_day_is_older_than_the_retention(tmp_path):
    with freeze_time("2026-11-01 23:00:00") as clock:
        store = opened(tmp_path)
        done = conversation(msid("1"), time.time())
        relay.acknowledge(done, QDN.chain[0], {"sid": msid("1r")}, time.time())
        store.wait(store.save(done))
        store.fold()
        clock.move_to("2026-11-08 23:59:00")  # the last text of that day is not yet 7 days old
        assert store.prune(time.time(), CONFIG.retention) == 0 and store.knows(msid("1"))
        clock.move_to("2026-11-09 00:01:00")
        assert store.prune(time.time(), CONFIG.retention) == 1 and not store.knows(msid("1"))


def test_a_text_that_joined_no_conversation_is_still_known_after_a_restart(tmp_path):
    store = opened(tmp_path)
    store.wait(store.save_stray(msid("stray"), "QDN: nothing is waiting for you.", time.time()))
    store.fold()
    again = reopen(store)
    assert again.knows(msid("stray")) and again.answer_to(msid("stray")) == "QDN: nothing is waiting for you."


def test_a_damaged_snapshot_is_moved_aside_and_the_rest_is_read(tmp_path):
    store = opened(tmp_path)
    store.wait(store.save(conversation(msid("1"), time.time())))
    store.wait(store.save(conversation(msid("2"), time.time())))
    store.fold()
    snapshot = tmp_path / "conversations.jsonl"
    lines = snapshot.read_bytes().splitlines(keepends=True)
    snapshot.write_bytes(lines[0] + b"{not json\n" + b"".join(lines[2:]))
    again = reopen(store)
    assert set(again.conversations) == {msid("2")}
    (aside,) = tmp_path.glob("conversations.jsonl.damaged-*")
    assert b"{not json" in aside.read_bytes() and again.damage_report() == [(aside.name, 1)]
    assert set(reopen(again).conversations) == {msid("2")}  # what could be read is written anew


def test_whole_lines_missing_from_a_snapshot_are_reported_as_damage(tmp_path):
    store = opened(tmp_path)
    for n in range(10):
        store.wait(store.save(conversation(msid(n), time.time())))
    store.fold()
    snapshot = tmp_path / "conversations.jsonl"
    lines = snapshot.read_bytes().splitlines(keepends=True)
    snapshot.write_bytes(b"".join(lines[:-3]))
    again = reopen(store)
    assert len(again.conversations) == 7
    (aside,) = tmp_path.glob("conversations.jsonl.damaged-*")
    assert again.damage_report() == [(aside.name, 3)]


def test_a_snapshot_says_how_many_records_it_holds(tmp_path):
    store = opened(tmp_path)
    for n in range(4):
        store.wait(store.save(conversation(msid(n), time.time())))
    store.wait(store.save_stray(msid("stray"), None, time.time()))
    store.fold()
    header = json.loads((tmp_path / "conversations.jsonl").read_text().splitlines()[0])
    assert header["records"] == 5


def test_a_start_appends_to_a_fresh_journal_without_rewriting_the_snapshot(tmp_path):
    store = opened(tmp_path)
    store.wait(store.save(conversation(msid(1), time.time())))
    store.fold()
    store.wait(store.save(conversation(msid(2), time.time())))
    snapshot = (tmp_path / "conversations.jsonl").stat()
    again = reopen(store)
    assert (tmp_path / "conversations.jsonl").stat().st_ino == snapshot.st_ino
    again.wait(again.save(conversation(msid(3), time.time())))
    assert set(reopen(again).conversations) == {msid(1), msid(2), msid(3)}


def test_a_fold_waits_until_the_disk_has_room_for_it(tmp_path, monkeypatch):
    store = opened(tmp_path)
    store.wait(store.save(conversation(msid(1), time.time())))
    real = os.statvfs
    monkeypatch.setattr(os, "statvfs", lambda path: os.statvfs_result((4096, 4096, 1, 1, 0, 1, 1, 1, 0, 255)))
    assert not store.room_to_fold()
    monkeypatch.setattr(os, "statvfs", real)
    assert store.room_to_fold()


def test_a_failed_write_leaves_no_half_line_for_the_next_one_to_follow(tmp_path, monkeypatch):
    store = opened(tmp_path)
    store.wait(store.save(conversation(msid("1"), time.time())))
    real_write = relay.write_all

    def write_half_then_fail(fd, data):
        real_write(fd, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(relay, "write_all", write_half_then_fail)
    with pytest.raises(relay.StoreFailure):
        store.wait(store.save(conversation(msid("2"), time.time())))
    monkeypatch.setattr(relay, "write_all", real_write)
    store.heal()
    store.wait(store.save(conversation(msid("3"), time.time())))
    again = reopen(store)
    assert set(again.conversations) == {msid("1"), msid("3")} and again.damage_report() == []


def test_a_closed_journal_never_writes_to_its_old_descriptor(tmp_path):
    store = opened(tmp_path)
    journal = store.journal
    journal.close()
    other = os.open(tmp_path / "unrelated", os.O_WRONLY | os.O_CREAT)  # may reuse the number
    with pytest.raises(relay.StoreFailure):
        journal.wait(journal.append(b"{}\n"))
    os.close(other)
    assert (tmp_path / "unrelated").read_bytes() == b""


def journal_bytes_for_a_conversation_of(texts: int, directory) -> int:
    store = opened(directory)
    conv = conversation(msid("long"), time.time())
    relay.record_sent(conv, 0, msid("p"), time.time())
    store.wait(store.save(conv))
    for n in range(texts):
        relay.join(conv, msid(f"more {n}"), f"and another thing, number {n}", time.time())
        store.wait(store.save(conv))
        relay.record_sent(conv, len(conv.pages) - 1, msid(f"sent {n}"), time.time())
        store.wait(store.save(conv))
    return store.journal.size


def test_a_long_conversation_costs_journal_writes_in_proportion_to_its_texts(tmp_path):
    hundred = journal_bytes_for_a_conversation_of(100, tmp_path / "a")
    two_hundred = journal_bytes_for_a_conversation_of(200, tmp_path / "b")
    assert two_hundred < 2.2 * hundred


def test_a_conversation_written_as_changes_reads_back_whole(tmp_path):
    store = opened(tmp_path)
    conv = conversation(msid("1"), time.time())
    store.wait(store.save(conv))
    relay.join(conv, msid("2"), "second", time.time())
    relay.record_sent(conv, 0, msid("p"), time.time())
    store.wait(store.save(conv))
    relay.acknowledge(conv, QDN.chain[0], {"sid": msid("3"), "answer": "yours"}, time.time())
    store.wait(store.save(conv))
    assert reopen(store).conversations[msid("1")].to_dict() == conv.to_dict()


def test_a_change_whose_conversation_was_lost_counts_as_damage(tmp_path):
    store = opened(tmp_path)
    conv = conversation(msid("1"), time.time())
    store.wait(store.save(conv))
    relay.join(conv, msid("2"), "second", time.time())
    store.wait(store.save(conv))
    journal = store.journal.path
    journal.write_bytes(b"".join(journal.read_bytes().splitlines(keepends=True)[1:]))  # the whole record lost
    again = reopen(store)
    assert again.conversations == {} and again.damage_report()[0][1] == 1


def test_a_state_directory_with_missing_parents_is_created_0700(tmp_path):
    store = opened(tmp_path / "a" / "b" / "state")
    assert stat.S_IMODE(os.stat(store.dir).st_mode) == 0o700


def test_a_temp_file_left_by_a_kill_is_removed_at_start(tmp_path):
    store = opened(tmp_path)
    store.wait(store.save(conversation(msid("1"), time.time())))
    (tmp_path / "catch_up.json.tmp").write_bytes(b'{"last_pa')  # no fold writes this one over
    again = reopen(store)
    assert not (tmp_path / "catch_up.json.tmp").exists() and set(again.conversations) == {msid("1")}


def test_a_line_on_disk_stays_acknowledged_when_a_fold_closes_its_journal(tmp_path):
    store = opened(tmp_path)
    ticket = store.save(conversation(msid("1"), time.time()))
    store.fold()  # closes the journal the ticket is in, after writing it
    store.wait(ticket)  # must not raise: the line is durable
    assert msid("1") in reopen(store).conversations
