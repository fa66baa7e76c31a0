"""Rotations: members take turns, overrides by text or command line, and a reminder before each shift."""

import datetime
import re
import subprocess
import time
import tomllib
import zoneinfo

import pytest
from conftest import BACKUP, CUSTOMER, LINE, SERGIO, msid, wait_until

import relay

ANA = "+16195550122"
LUIS = "+16195550133"
LA = zoneinfo.ZoneInfo("America/Los_Angeles")
SERGIO_M, ANA_M, LUIS_M = relay.Member("Sergio", SERGIO), relay.Member("Ana", ANA), relay.Member("Luis", LUIS)


def rotation(start="2026-12-07 08:00", shift=7 * 86400, members=(SERGIO_M, ANA_M), remind_before=None):
    begin = datetime.datetime.fromisoformat(start)
    return relay.Rotation("deck", "America/Los_Angeles", begin, shift, tuple(members), remind_before)


def la(text: str) -> float:
    return datetime.datetime.fromisoformat(text).replace(tzinfo=LA).timestamp()


def override(name, phone, start, end, made, oid="o1"):
    return relay.Override(oid, "deck", name, phone, start, end, "Sergio", made)


def rotation_config(start: str, shift: str, remind_before: str | None = None, repeat=0, wait="2m") -> str:
    remind = f'remind_before = "{remind_before}"' if remind_before else ""
    return f"""
[relay]
wait = "5m"
repeat = {repeat}

[[rotations]]
name = "deck"
timezone = "America/Los_Angeles"
start = "{start}"
shift = "{shift}"
{remind}
members = [
  {{ name = "Sergio", phone = "{SERGIO}" }},
  {{ name = "Ana", phone = "{ANA}" }},
]

[[lines]]
name = "QDN"
number = "{LINE}"
chain = [
  {{ rotation = "deck", wait = "{wait}" }},
  {{ name = "Backup", phone = "{BACKUP}" }},
]
"""


def local_now(offset: float = 0.0) -> str:
    return datetime.datetime.fromtimestamp(time.time() + offset, LA).strftime("%Y-%m-%d %H:%M:%S")


def relay_command(workdir, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`relay.py ARGS` run in `workdir` (its config.toml, its state), as an operator runs it."""
    return subprocess.run(
        [relay.sys.executable, str(relay.Path(relay.__file__)), *args],
        cwd=workdir,
        env={"PATH": "/usr/bin:/bin", "RELAY_STATE_DIR": str(workdir / "state"), **env},
        capture_output=True,
        text=True,
        timeout=20,
    )


# -- who is on shift ------------------------------------------------------------


def test_members_take_turns_a_shift_each_and_wrap_around():
    week = rotation(members=(SERGIO_M, ANA_M, LUIS_M))
    roster = relay.Roster([week])
    on = [roster.on_shift("deck", la(f"2026-12-{7 + 7 * k:02d} 09:00")).name for k in range(4)]
    assert on == ["Sergio", "Ana", "Luis", "Sergio"]


def test_a_shift_hands_off_at_its_start_time_not_at_midnight():
    roster = relay.Roster([rotation()])
    assert roster.on_shift("deck", la("2026-12-14 07:59:59")).name == "Sergio"
    assert roster.on_shift("deck", la("2026-12-14 08:00:00")).name == "Ana"


def test_before_its_start_the_first_member_is_on_call():
    roster = relay.Roster([rotation(members=(ANA_M, SERGIO_M))])
    assert roster.on_shift("deck", la("2026-11-01 12:00")).name == "Ana"
    assert roster.until("deck", la("2026-11-01 12:00")) == la("2026-12-14 08:00")


def test_a_whole_day_shift_hands_off_at_the_same_local_time_across_daylight_saving():
    daily = rotation(start="2026-03-06 08:00", shift=86400)
    roster = relay.Roster([daily])
    # 2026-03-08: clocks go forward at 02:00 in Los Angeles; the handoff stays at 08:00 local.
    handoffs = [t for t, _ in roster.handoffs("deck", la("2026-03-07 09:00"), 3)]
    assert [datetime.datetime.fromtimestamp(t, LA).strftime("%m-%d %H:%M") for t in handoffs] == [
        "03-08 08:00",
        "03-09 08:00",
        "03-10 08:00",
    ]
    assert handoffs[1] - handoffs[0] == 86400 and handoffs[0] - la("2026-03-07 08:00") == 23 * 3600


def test_a_shift_of_hours_is_exact_across_daylight_saving():
    halves = rotation(start="2026-03-07 20:00", shift=12 * 3600)
    k, start, end = relay.shift_at(halves, la("2026-03-08 09:00"))
    assert (k, end - start) == (1, 12 * 3600)
    assert datetime.datetime.fromtimestamp(end, LA).strftime("%H:%M") == "21:00"  # 12 h after 08:00 PST


def test_the_newest_override_covering_a_moment_wins():
    t = la("2026-12-08 12:00")
    roster = relay.Roster(
        [rotation(members=(SERGIO_M, ANA_M, LUIS_M))],
        [override("Ana", ANA, t - 3600, t + 3600, made=1, oid="a"), override("Luis", LUIS, t - 60, t + 60, made=2)],
    )
    assert roster.on_shift("deck", t).name == "Luis"
    assert roster.on_shift("deck", t + 120).name == "Ana"


def test_an_override_ends_by_itself():
    t = la("2026-12-08 12:00")
    roster = relay.Roster([rotation()], [override("Ana", ANA, t, t + 3600, made=t)])
    assert roster.on_shift("deck", t + 3599).name == "Ana"
    assert roster.on_shift("deck", t + 3600).name == "Sergio"
    assert roster.until("deck", t) == t + 3600


# -- rotation steps in a conversation ---------------------------------------------


def rotation_line() -> relay.Line:
    week = rotation(start="2026-12-07 08:00", shift=60)
    step = relay.Contact("deck", "", 120, rotation="deck")
    return relay.Line("QDN", LINE, (step, relay.Contact("Backup", BACKUP, 300)), rotations=(week,))


def test_a_rotation_step_pages_whoever_is_on_shift_when_it_begins():
    line, t0 = rotation_line(), la("2026-12-07 09:00:00")
    roster = relay.Roster(line.rotations)
    conv = relay.start_conversation(line, relay.Config(lines=(line,)), msid(1), CUSTOMER, "hi", "1", t0, roster=roster)
    assert [p.to for p in conv.pages] == [SERGIO]


def test_a_handoff_between_two_steps_pages_the_new_member_and_keeps_whom_the_earlier_step_paged():
    line, t0 = rotation_line(), la("2026-12-07 09:00:00")  # one-minute shifts: Sergio until 09:01, then Ana
    roster = relay.Roster(line.rotations)
    config = relay.Config(lines=(line,), repeat=1)
    conv = relay.start_conversation(line, config, msid(1), CUSTOMER, "hi", "1", t0, roster=roster)
    relay.expire(conv, t0 + 120, roster)  # to Backup
    relay.expire(conv, t0 + 420, roster)  # round two: the rotation again, now Ana's shift
    assert [p.to for p in conv.pages if p.kind == "page"] == [SERGIO, BACKUP, ANA]
    assert relay.contact_at(conv, 0).name == "Sergio" and relay.contact_at(conv, 2).name == "Ana"


def test_the_member_a_rotation_step_paged_can_pass_it_on_and_no_other_member_can():
    line, t0 = rotation_line(), la("2026-12-07 09:00:00")
    roster = relay.Roster(line.rotations)
    conv = relay.start_conversation(line, relay.Config(lines=(line,)), msid(1), CUSTOMER, "hi", "1", t0, roster=roster)
    assert relay.pass_on(conv, line.contact(ANA), t0 + 1, roster) is None
    assert relay.pass_on(conv, line.contact(SERGIO), t0 + 1, roster) == "escalated"
    assert conv.pages[-1].to == BACKUP


def test_a_chain_that_runs_out_tells_whoever_is_on_shift_when_no_alarm_phone_is_set():
    line, t0 = rotation_line(), la("2026-12-07 09:00:00")
    roster = relay.Roster(line.rotations)
    conv = relay.start_conversation(line, relay.Config(lines=(line,)), msid(1), CUSTOMER, "hi", "1", t0, roster=roster)
    relay.expire(conv, t0 + 120, roster)
    assert relay.expire(conv, t0 + 420, roster) == "unanswered"
    (alarm,) = [p for p in conv.pages if p.kind == "alarm"]
    assert alarm.to == ANA  # 09:07: an odd minute, Ana's


def test_a_shifts_reminder_falls_due_remind_before_it_starts_and_not_once_it_has_begun():
    week = rotation(remind_before=12 * 3600)
    roster = relay.Roster([week])
    assert roster.reminders_due(week, la("2026-12-13 19:59:59")) == []
    ((start, end, member),) = roster.reminders_due(week, la("2026-12-13 20:00:00"))
    assert (start, end, member.name) == (la("2026-12-14 08:00"), la("2026-12-21 08:00"), "Ana")
    assert roster.reminders_due(week, la("2026-12-14 08:00:00")) == []  # begun: too late, and the next not yet due
    assert roster.next_reminder(la("2026-12-14 08:00:00")) == la("2026-12-20 20:00")


def test_a_reminder_goes_to_whoever_an_override_puts_on_the_shift():
    week = rotation(remind_before=3600)
    start = la("2026-12-14 08:00")
    roster = relay.Roster([week], [override("Sergio", SERGIO, start, start + 86400, made=1)])
    ((_, _, member),) = roster.reminders_due(week, start - 60)
    assert member.name == "Sergio"


@pytest.mark.parametrize(
    "body, expected", [("take", 0), ("TAKE 3h", 10800), (" take 2d ", 172800), ("take soon", "soon"), ("taken", None)]
)
def test_take_is_read_with_or_without_a_duration(body, expected):
    assert relay.take_request(body) == expected


# -- config ---------------------------------------------------------------------


GOOD = rotation_config("2026-12-07 08:00", "7d")
MEMBERS = re.search(r"members = \[.*?\]\n", GOOD, flags=re.S)[0]
ROTATION_ERRORS = [
    (
        '{ rotation = "deck"',
        '{ rotation = "dek"',
        'chain step 1, rotation: "dek" is no [[rotations]] name (did you mean deck?)',
    ),
    (MEMBERS, "members = []\n", 'rotation "deck", members: the rotation has no members'),
    (
        MEMBERS,
        f'members = [{{ name = "A", phone = "{ANA}" }}, {{ name = "B", phone = "{ANA}" }}]\n',
        'member "B", phone',
    ),
    (MEMBERS, f'members = [{{ name = "A", phone = "{LINE}" }}]\n', "is a line's own number"),
    ("America/Los_Angeles", "Mars/Olympus", 'rotation "deck", timezone'),
    ("2026-12-07 08:00", "next monday", 'rotation "deck", start'),
    ("2026-12-07 08:00", "2026-13-01 08:00", 'rotation "deck", start'),
    ('shift = "7d"', 'shift = "a week"', 'rotation "deck", shift'),
    ('shift = "7d"', "shift = 0", 'rotation "deck", shift'),
    ('shift = "7d"', 'shift = "7d"\nremind_befor = "1h"', "did you mean remind_before?"),
    ('timezone = "America/Los_Angeles"\n', "", 'rotation "deck", timezone: missing'),
]


@pytest.mark.parametrize("was, edit, said", ROTATION_ERRORS)
def test_a_doubtful_rotation_is_refused_in_one_line_naming_it(was, edit, said):
    with pytest.raises(relay.ConfigError) as refused:
        relay.parse_config(tomllib.loads(GOOD.replace(was, edit, 1)))
    assert said in str(refused.value) and "\n" not in str(refused.value)


def test_a_rotations_member_is_a_contact_of_the_line_for_replies():
    (line,) = relay.parse_config(tomllib.loads(GOOD)).lines
    assert line.contact(ANA).name == "Ana" and line.contact(CUSTOMER) is None


def test_the_shipped_configs_commented_rotation_parses_once_uncommented():
    shipped = (relay.Path(__file__).parent.parent / "config.toml").read_text()
    head, marker, block = shipped.partition("# [[rotations]]")
    step = re.search(r"^#\s+(\{ rotation = .*\},)$", head, flags=re.M)[1]
    chain_start = head.index("chain = [\n") + len("chain = [\n")
    head = head[:chain_start] + f"  {step}\n" + head[head.index("\n", chain_start) + 1 :]
    uncommented = head + "\n".join(line.removeprefix("# ") for line in (marker + block).splitlines())
    config = relay.parse_config(tomllib.loads(uncommented))
    assert config.rotations[0].name == config.lines[0].chain[0].rotation


# -- overrides and reminders, end to end ------------------------------------------


def shift_end(answer: str) -> float:
    """The time an answer gives after "until", read back in Los Angeles."""
    said = re.search(r"until (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) P[SD]T", answer)[1]
    return la(said)


@pytest.mark.both_stores
def test_a_member_who_texts_take_is_on_call_until_the_shift_ends_and_the_one_replaced_is_told(start_relay, fake_twilio):
    began = time.time() - 600
    service = start_relay(rotation_config(local_now(-600), "1h"))
    status, answer = service.inbound(ANA, "take")
    assert status == 200 and "QDN: you are on call for deck until" in answer and "replacing Sergio" in answer
    assert abs(shift_end(answer) - (began + 3600)) < 2
    wait_until(lambda: fake_twilio.delivered(SERGIO))
    (notice,) = fake_twilio.delivered(SERGIO)
    assert notice["Body"].startswith("QDN: Ana covers deck for you until") and notice["From"] == LINE
    service.inbound(CUSTOMER, "boat leaking")
    wait_until(lambda: any("boat leaking" in m["Body"] for m in fake_twilio.delivered(ANA)))
    assert [m for m in fake_twilio.delivered(SERGIO) if "boat leaking" in m["Body"]] == []


@pytest.mark.both_stores
def test_take_with_a_duration_covers_that_long(start_relay, fake_twilio):
    service = start_relay(rotation_config(local_now(-600), "1d"))
    asked = time.time()
    status, answer = service.inbound(ANA, "take 2h")
    assert status == 200 and abs(shift_end(answer) - (asked + 7200)) < 2
    listed = service.run("override", "--list").stdout.splitlines()
    assert len(listed) == 2 and re.match(r"[0-9a-f]{6} deck: Ana \+16195550122 from ", listed[0])


@pytest.mark.both_stores
def test_take_from_a_contact_in_no_rotation_is_refused_and_changes_nothing(start_relay, fake_twilio):
    service = start_relay(rotation_config(local_now(-600), "1h"))
    status, answer = service.inbound(BACKUP, "take")
    assert status == 200 and "take is for members of the line's rotations (deck); you are in none" in answer
    assert "no overrides" in service.run("override", "--list").stdout
    assert service.events("reply_take_refused")


def test_take_from_a_customer_is_an_ordinary_text(start_relay, fake_twilio):
    service = start_relay(rotation_config(local_now(-600), "1h"))
    service.inbound(CUSTOMER, "take")
    wait_until(lambda: any("take" in m["Body"] for m in fake_twilio.delivered(SERGIO)))
    assert service.events("inbound_accepted")


@pytest.mark.both_stores
def test_an_override_from_the_command_line_reaches_a_running_relay_within_2s(start_relay, fake_twilio):
    service = start_relay(rotation_config(local_now(-600), "1h"))
    made = service.run("override", "deck", "ana", "--until", local_now(3600))
    assert made.returncode == 0, made.stderr
    oid = made.stdout.split()[0]
    picked_up = time.monotonic()
    wait_until(lambda: any(oid in e["ids"] for e in service.events("overrides_changed")), timeout=5)
    assert time.monotonic() - picked_up < 2
    service.inbound(CUSTOMER, "anyone there")
    wait_until(lambda: any("anyone there" in m["Body"] for m in fake_twilio.delivered(ANA)))


@pytest.mark.both_stores
def test_an_override_outlives_a_restart(start_relay, fake_twilio):
    service = start_relay(rotation_config(local_now(-600), "1h"))
    service.inbound(ANA, "take")
    service.stop()
    service.start()
    service.inbound(CUSTOMER, "after the restart")
    wait_until(lambda: any("after the restart" in m["Body"] for m in fake_twilio.delivered(ANA)))


def test_override_delete_ends_it_and_an_unknown_id_is_refused_in_one_line(start_relay, fake_twilio):
    service = start_relay(rotation_config(local_now(-600), "1h"))
    oid = service.run("override", "deck", "Ana", "--until", local_now(3600)).stdout.split()[0]
    deleted = service.run("override", "--delete", oid)
    assert deleted.returncode == 0 and deleted.stdout.startswith(f"deleted {oid} deck: Ana")
    assert "no overrides" in service.run("override", "--list").stdout
    again = service.run("override", "--delete", oid)
    assert again.returncode == 1 and again.stderr.count("\n") == 1 and "no override" in again.stderr


@pytest.mark.parametrize(
    "args, said",
    [
        (["deck", "Nobody", "--until", "2030-01-01 00:00"], "'Nobody' is not a member of deck (members: Sergio, Ana)"),
        (["dock", "Ana", "--until", "2030-01-01 00:00"], "'dock' is no rotation (known: deck)"),
        (["deck", "Ana", "--until", "tomorrow"], "--until: 'tomorrow' is not a time"),
        (["deck", "Ana", "--until", "2020-01-01 00:00"], "--until: must be after --from and after now"),
    ],
)
def test_a_doubtful_override_is_refused_in_one_line(tmp_path, args, said):
    (tmp_path / "config.toml").write_text(rotation_config("2026-12-07 08:00", "7d"))
    done = relay_command(tmp_path, "override", *args)
    assert done.returncode == 1 and said in done.stderr and done.stderr.count("\n") == 1


def test_oncall_names_each_rotations_holder_first_then_the_next_handoffs_in_its_time_zone(tmp_path):
    (tmp_path / "config.toml").write_text(rotation_config("2026-12-07 08:00", "7d"))
    done = relay_command(tmp_path, "oncall", "--at", "2026-12-15 12:00")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[:3] == [
        "rotation deck: Ana +16195550122 is on call now until 2026-12-21 08:00:00 PST",
        "  then Sergio +16195550111 from 2026-12-21 08:00:00 PST",
        "  then Ana +16195550122 from 2026-12-28 08:00:00 PST",
    ]
    assert "line QDN first step: Ana +16195550122 (deck, until 2026-12-21 08:00:00 PST)" in done.stdout


@pytest.mark.both_stores
def test_each_shift_gets_exactly_one_reminder_across_a_kill_and_restart(start_relay, fake_twilio):
    # Four-second shifts, each reminded eight seconds before it starts, the first starting in twelve:
    # a relay killed just after a reminder and started again before that shift begins must not
    # send it again.
    service = start_relay(rotation_config(local_now(12), "4s", remind_before="8s", wait="1h"))
    wait_until(lambda: reminders(fake_twilio), timeout=12)
    service.kill()
    service.start()
    assert time.time() < shift_starts(fake_twilio)[0]  # back while that reminder was still due
    wait_until(lambda: len(reminders(fake_twilio)) >= 2, timeout=10)
    starts = shift_starts(fake_twilio)
    assert starts[1] - starts[0] == 4, starts  # the next shift's, and none twice


def shift_starts(fake) -> list[float]:
    return [la(re.search(r"starts (.*?) P[SD]T and", m["Body"])[1]) for m in reminders(fake)]


def reminders(fake) -> list[dict]:
    return [m for m in fake.delivered() if "reminder: your deck shift" in m["Body"]]


def test_import_state_brings_the_overrides_once(tmp_path, database_url):
    (tmp_path / "config.toml").write_text(rotation_config("2026-12-07 08:00", "7d"))
    files = relay.ScheduleFile(tmp_path / "files" / relay.SCHEDULE_FILE)
    files.add_override(override("Ana", ANA, time.time(), time.time() + 3600, made=time.time(), oid="abc123"))

    def run(*args: str) -> str:
        done = relay_command(tmp_path, *args, DATABASE_URL=database_url)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "1 of 1 override(s)" in run("import-state", str(tmp_path / "files"))
    assert "0 of 1 override(s)" in run("import-state", str(tmp_path / "files"))
    assert run("override", "--list").startswith("abc123 deck: Ana")


@pytest.mark.parametrize("store_kind", ["postgresql"])
def test_a_take_on_one_relay_moves_the_pages_of_another_on_the_same_database(start_relay, fake_twilio):
    config = rotation_config(local_now(-600), "1h")
    one, two = start_relay(config), start_relay(config, name="two")
    one.inbound(ANA, "take")
    wait_until(lambda: two.events("overrides_changed"), timeout=3)
    two.inbound(CUSTOMER, "to the second relay")
    wait_until(lambda: any("to the second relay" in m["Body"] for m in fake_twilio.delivered(ANA)))


def test_times_on_the_command_line_are_local_to_the_rotation_or_carry_their_offset():
    assert relay.parse_when("2026-12-07 08:00", "America/Los_Angeles", flag="--at") == la("2026-12-07 08:00")
    assert relay.parse_when("2026-12-07 08:00:30", "America/Los_Angeles", flag="--at") == la("2026-12-07 08:00:30")
    assert relay.parse_when("2026-12-07T16:00+00:00", "America/Los_Angeles", flag="--at") == la("2026-12-07 08:00")


def test_check_says_who_is_on_call_now_and_until_when(tmp_path):
    (tmp_path / "config.toml").write_text(rotation_config(local_now(-600), "1h"))
    done = relay_command(tmp_path, "check", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert re.search(r"^rotation deck: Sergio \+16195550111 is on call now until .* P[SD]T$", done.stdout, re.M)
