"""Kill test: texts keep arriving while relays are SIGKILLed and restarted, again and again.

Counts texts answered 200, texts lost (answered 200 but never paged to the
primary, or never escalated to the backup), duplicate pages (a contact paged
more than once for the same conversation), and how late each backup page was
against its deadline (measured from before the text was posted, so an upper
bound). Everything runs on 127.0.0.1.

On a database, duplicates are set against the sends in flight at the kills:
right after each SIGKILL, the pages the database holds as claimed and not yet
sent that the fake Twilio has already taken. Each is a page Twilio had whose
"sent" was never stored, so another relay sends it again (at least once).

    python bench/kill_test.py [--kills 20] [--rate 40]          one relay, JSON files
    python bench/kill_test.py --relays 2 [--kills 20]           two relays on one PostgreSQL
    python bench/kill_test.py --relays 2 --scenario rolling     SIGTERM and restart each in turn
    python bench/kill_test.py --relays 2 --scenario outage      PostgreSQL stopped for 10 s
    python bench/kill_test.py ... --twilio-latency 1.5 --rate 2  a slow Twilio: sends in flight at each stop

With --relays 2, texts go alternately to the two relays (to the other when
one is down, as a router would), and the one killed alternates too; the
database is a throwaway cluster started for the run.
"""

import argparse
import http.client
import itertools
import json
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import psycopg  # noqa: E402
from conftest import BACKUP, SERGIO, FakeTwilio, Postgres, RelayProcess, config_text, wait_until  # noqa: E402

SENDER = re.compile(r"from (\+1555[0-9]{7})")
PRIMARY_WAIT = 2.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="kills (or, for rolling, restarts of each relay)")
    parser.add_argument("--rate", type=float, default=40.0, help="texts per second")
    parser.add_argument("--uptime", type=float, default=1.0, help="seconds between restart and kill")
    parser.add_argument("--relays", type=int, default=1, help="2 or more: relays sharing one PostgreSQL")
    parser.add_argument("--scenario", choices=["kill", "rolling", "outage"], default="kill")
    parser.add_argument("--outage", type=float, default=10.0, help="seconds the database is down (outage)")
    parser.add_argument("--twilio-latency", type=float, default=0.0, help="seconds the fake Twilio takes to answer")
    args = parser.parse_args()
    if args.scenario != "kill" and args.relays < 2:
        parser.error("--scenario rolling and outage need --relays 2 (a database)")

    fake = FakeTwilio()
    fake.latency = args.twilio_latency
    cluster = Postgres().start() if args.relays > 1 else None
    relays: list[RelayProcess] = []
    try:
        return run(args, fake, cluster, relays)
    finally:  # whatever happened, nothing is left running
        for relay in relays:
            relay.stop()
        fake.close()
        if cluster:
            cluster.close()


def run(args, fake: FakeTwilio, cluster, relays: list) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="relay-kill-"))
    env = {"DATABASE_URL": cluster.new_database()} if cluster else {}
    for n in range(args.relays):
        (workdir / str(n)).mkdir()
        caps = "outbound_hourly_cap = 100000"  # the run sends thousands; the caps are another test's matter
        config = config_text(primary_wait=f"{PRIMARY_WAIT:g}s", backup_wait="1h", extra_relay=caps)
        relays.append(RelayProcess(workdir / str(n), fake, config, env=env).start())
    in_flight_at_kills = 0
    posted_at: dict[str, float] = {}  # sender -> when its text was posted (the deadline counts from after)
    accepted: list[str] = []
    refused = Counter()
    stop = threading.Event()

    def customers():
        for n in itertools.count(1):
            if stop.is_set():
                return
            sender = f"+1555{n:07d}"
            posted_at[sender] = time.time()
            # Like a router in front of several relays: a relay that is down is passed over for the next.
            for relay in relays[n % len(relays) :] + relays[: n % len(relays)]:
                try:
                    status = relay.inbound(sender, f"text {n}", sid=f"SM{0xC0FFEE:08x}{n:024x}")[0]
                except (OSError, http.client.HTTPException):  # killed before or while answering
                    status = "down"  # nobody answered in full: Twilio's fallback URL would take it
                if status == 200:
                    break
            if status == 200:
                accepted.append(sender)
            else:
                refused[str(status)] += 1
            time.sleep(1 / args.rate)

    sender_thread = threading.Thread(target=customers)
    sender_thread.start()
    started = time.monotonic()
    if args.scenario == "kill":
        for n in range(args.kills):
            time.sleep(args.uptime)
            victim = relays[n % len(relays)]
            victim.kill()
            if cluster:
                in_flight_at_kills += len(with_twilio_not_stored(env["DATABASE_URL"], fake))
            victim.start()
    elif args.scenario == "rolling":
        for n in range(args.kills * len(relays)):
            time.sleep(args.uptime)
            relays[n % len(relays)].stop()  # SIGTERM: drains, then exits 0
            relays[n % len(relays)].start()
    else:
        time.sleep(args.uptime)
        cluster.stop()
        time.sleep(args.outage)
        cluster.restart()
        back = time.monotonic()
        wait_until(lambda: all(r.healthy() for r in relays), timeout=30)
        recovered_s = time.monotonic() - back
        time.sleep(args.uptime)
    stop.set()
    sender_thread.join()
    ran_s = time.monotonic() - started
    expected = set(accepted)

    def paged(phone):
        return Counter(m[1] for f in fake.delivered(phone) if (m := SENDER.search(f["Body"])))

    try:
        wait_until(lambda: expected <= set(paged(BACKUP)), timeout=60, interval=0.5)
    except AssertionError:
        pass  # counted as lost below
    time.sleep(3)  # let anything left over arrive, so duplicates are counted
    for relay in relays:
        relay.stop()

    primary, backup = paged(SERGIO), paged(BACKUP)
    first_backup = {}
    for request in fake.requests:
        if request["form"]["To"] == BACKUP and not request["fault"] and (m := SENDER.search(request["form"]["Body"])):
            first_backup.setdefault(m[1], request["at"])
    late = sorted(first_backup[s] - (posted_at[s] + PRIMARY_WAIT) for s in expected if s in first_backup)
    unreadable = []
    for relay in relays if not cluster else ():
        for path in relay.state_dir.glob("*.json*"):
            try:
                lines = path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]
                for line in lines:
                    json.loads(line)
            except ValueError:
                unreadable.append(path.name)
    result = {
        "relays": args.relays,
        "store": "postgresql" if cluster else "json",
        "scenario": args.scenario,
        "twilio_latency_s": args.twilio_latency,
        "kills" if args.scenario == "kill" else "restarts" if args.scenario == "rolling" else "outage_s": (
            args.kills
            if args.scenario == "kill"
            else args.kills * len(relays)
            if args.scenario == "rolling"
            else args.outage
        ),
        "seconds": round(ran_s, 1),
        "accepted": len(expected),
        "refused": dict(refused),
        "lost_primary": len(expected - set(primary)),
        "lost_backup": len(expected - set(backup)),
        "duplicate_primary_pages": sum(c - 1 for c in primary.values() if c > 1),
        "duplicate_backup_pages": sum(c - 1 for c in backup.values() if c > 1),
        "sends_in_flight_at_kills": in_flight_at_kills if cluster and args.scenario == "kill" else None,
        "backup_late_p50_s": round(late[len(late) // 2], 3) if late else None,
        "backup_late_p99_s": round(late[int(len(late) * 0.99)], 3) if late else None,
        "backup_late_max_s": round(late[-1], 3) if late else None,
        "unreadable_files": unreadable,
    }
    if args.scenario == "outage":
        result["recovered_after_s"] = round(recovered_s, 2)
    result["lost_senders"] = sorted(expected - set(backup))[:10]
    print(json.dumps(result))
    return 0 if not (result["lost_primary"] or result["lost_backup"] or unreadable) else 1


def with_twilio_not_stored(database_url: str, fake: FakeTwilio) -> set[tuple[str, str]]:
    """(recipient, customer) of the pages claimed and not stored as sent that Twilio has already taken."""
    with psycopg.connect(database_url, autocommit=True) as db:
        claimed = db.execute(
            """SELECT p->>'to', p->>'body' FROM relay_conversations, json_array_elements(doc->'pages') AS p
               WHERE p->>'state' = 'pending' AND (p->>'lease')::float8 > 0"""
        ).fetchall()
    taken = {(form["To"], form["Body"]) for form in fake.delivered()}
    return {(to, SENDER.search(body)[1]) for to, body in claimed if (to, body) in taken and SENDER.search(body)}


if __name__ == "__main__":
    sys.exit(main())
