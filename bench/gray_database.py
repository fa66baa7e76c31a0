"""The shared database failing gray, measured from outside: a hang, slow writes, too few connection slots.

Starts real relay processes against a fake Twilio and a throwaway PostgreSQL (loopback only), puts a
TCP proxy in front of the database where a hang is needed, and prints one JSON line per scenario:

    python bench/gray_database.py                    # this checkout's relay.py
    python bench/gray_database.py --relay OLD.py     # another relay.py (e.g. from `git show REV:relay.py`)

- hang: the proxy forwards nothing for 8 s; seconds to answer a text and /healthz during it, and
  seconds until a text is answered 200 again after it;
- slow: every write to the relay's tables takes 300 ms; two relays take 20 texts at once; texts
  answered 503, duplicate pages, backup lateness (its page's time minus the relay's accepted time + wait);
- slots: three relays on a server with max_connections = 12 take 24 texts at once; answered 200,
  of those paged within 20 s, and relays still answering 503 10 s later;
- frozen / cut off: two relays take 20 texts (writes as fast as they go, then taking 200 ms, so that a
  sweep holds its locks a while); as the backups fall due one relay is frozen (SIGSTOP) for 8 s, or
  its database connections forward nothing for 8 s; backups missing, duplicate pages, backup lateness.
"""

import argparse
import datetime
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import BACKUP, CUSTOMER, SERGIO, FakeTwilio, Postgres, RelayProcess, config_text, msid  # noqa: E402
from test_gray_database import Proxy, slow_every_write  # noqa: E402

WAIT = 4.0


def relay_at(workdir: Path, fake, config: str, env: dict, relay_py: Path) -> RelayProcess:
    workdir.mkdir(parents=True)
    process = RelayProcess(workdir, fake, config, env=env)
    process.command = lambda *args: [sys.executable, str(relay_py), *args]
    return process.start()


def timed(call):
    began = time.monotonic()
    try:
        result = call()
    except OSError as e:
        result = (type(e).__name__, "")
    return result[0], round(time.monotonic() - began, 2)


def hang(cluster, fake, workdir, relay_py) -> dict:
    proxy = Proxy(cluster.port)
    try:
        url = proxy.url(cluster.new_database())
        relay = relay_at(workdir / "hang", fake, config_text(), {"DATABASE_URL": url}, relay_py)
        relay.inbound(CUSTOMER, "before")
        proxy.hanging = True
        hung = time.monotonic()
        text = timed(lambda: relay.inbound(CUSTOMER, "during"))
        health = timed(lambda: relay.get("/healthz"))
        time.sleep(max(0.0, 8 - (time.monotonic() - hung)))
        proxy.hanging = False
        back = time.monotonic()
        while time.monotonic() - back < 30:
            if relay.inbound(CUSTOMER, f"after {time.monotonic()}")[0] == 200:
                break
            time.sleep(0.1)
        relay.stop()
        return {
            "scenario": "hang 8 s",
            "text_during": text,
            "healthz_during": health,
            "answered_200_again_after_s": round(time.monotonic() - back, 2),
        }
    finally:
        proxy.close()


def slow(cluster, fake, workdir, relay_py, texts: int = 20) -> dict:
    url = cluster.new_database()
    config = config_text(primary_wait=f"{WAIT:g}s", backup_wait="1h")
    relays = [relay_at(workdir / f"slow{n}", fake, config, {"DATABASE_URL": url}, relay_py) for n in range(2)]
    slow_every_write(url, 0.3)
    fake.requests.clear()

    def text(i):
        return relays[i % 2].inbound(f"+1555123{i:04d}", f"text {i}", sid=msid(f"slow {i}"))[0]

    with ThreadPoolExecutor(texts) as pool:
        answers = list(pool.map(text, range(texts)))
    taken = [i for i, status in enumerate(answers) if status == 200]
    time.sleep(WAIT + 15)
    accepted = {e["message_sid"]: e["ts"] for r in relays for e in r.events("inbound_accepted")}

    def pages(to, i):
        return [r for r in fake.requests if r["form"]["To"] == to and f": text {i}\n" in r["form"]["Body"]]

    late = []
    for i in taken:
        if pages(BACKUP, i) and msid(f"slow {i}") in accepted:
            due = datetime.datetime.fromisoformat(accepted[msid(f"slow {i}")]).timestamp() + WAIT
            late.append(pages(BACKUP, i)[0]["at"] - due)
    for relay in relays:
        relay.stop()
    return {
        "scenario": f"writes 300 ms, 2 relays, {texts} texts",
        "answered_200": len(taken),
        "answered_other": sorted(str(a) for a in answers if a != 200),
        "backups_missing": sum(1 for i in taken if not pages(BACKUP, i)),
        "duplicate_primary": sum(max(0, len(pages(SERGIO, i)) - 1) for i in taken),
        "duplicate_backup": sum(max(0, len(pages(BACKUP, i)) - 1) for i in taken),
        "backup_late_p50_s": round(statistics.median(late), 2) if late else None,
        "backup_late_max_s": round(max(late), 2) if late else None,
        "backup_late_s": sorted(round(x, 2) for x in late),
    }


def held_work(cluster, fake, workdir, relay_py, how: str, write_s: float) -> dict:
    """One of two relays stops answering the database as the backups fall due, while it may hold their locks."""
    proxy = Proxy(cluster.port)
    try:
        url = cluster.new_database()
        config = config_text(primary_wait=f"{WAIT:g}s", backup_wait="1h")
        frozen = relay_at(workdir / f"{how}-{write_s:g}-0", fake, config, {"DATABASE_URL": proxy.url(url)}, relay_py)
        other = relay_at(workdir / f"{how}-{write_s:g}-1", fake, config, {"DATABASE_URL": url}, relay_py)
        if write_s:
            slow_every_write(url, write_s)
        fake.requests.clear()
        relays = (frozen, other)
        with ThreadPoolExecutor(20) as pool:
            answers = list(
                pool.map(
                    lambda i: relays[i % 2].inbound(f"+1555124{i:04d}", f"held {i}", sid=msid(f"{how} {i}"))[0],
                    range(20),
                )
            )
        taken = [i for i, status in enumerate(answers) if status == 200]
        accepted = {e["message_sid"]: e["ts"] for r in relays for e in r.events("inbound_accepted")}
        first_due = min(datetime.datetime.fromisoformat(t).timestamp() for t in accepted.values()) + WAIT
        time.sleep(max(0.0, first_due + 0.3 - time.time()))  # its sweep has begun on them
        if how == "frozen":
            os.kill(frozen.proc.pid, signal.SIGSTOP)
        else:
            proxy.hanging = True
        time.sleep(8)
        if how == "frozen":
            os.kill(frozen.proc.pid, signal.SIGCONT)
        else:
            proxy.hanging = False
        time.sleep(WAIT + 8)
        accepted = {e["message_sid"]: e["ts"] for r in relays for e in r.events("inbound_accepted")}

        def pages(to, i):
            return [r for r in fake.requests if r["form"]["To"] == to and f": held {i}\n" in r["form"]["Body"]]

        late = [
            pages(BACKUP, i)[0]["at"]
            - (datetime.datetime.fromisoformat(accepted[msid(f"{how} {i}")]).timestamp() + WAIT)
            for i in taken
            if pages(BACKUP, i) and msid(f"{how} {i}") in accepted
        ]
        for relay in relays:
            relay.stop()
        return {
            "scenario": f"{how} 8 s as the backups fall due, writes {write_s * 1000:g} ms, 2 relays, 20 texts",
            "answered_200": len(taken),
            "backups_missing": sum(1 for i in taken if not pages(BACKUP, i)),
            "duplicate_primary": sum(max(0, len(pages(SERGIO, i)) - 1) for i in taken),
            "duplicate_backup": sum(max(0, len(pages(BACKUP, i)) - 1) for i in taken),
            "backup_late_p50_s": round(statistics.median(late), 2) if late else None,
            "backup_late_max_s": round(max(late), 2) if late else None,
        }
    finally:
        proxy.close()


def slots(fake, workdir, relay_py) -> dict:
    cluster = Postgres(settings="-c max_connections=12 -c superuser_reserved_connections=0").start()
    try:
        url = cluster.new_database()
        relays = [
            relay_at(workdir / f"slots{n}", fake, config_text(), {"DATABASE_URL": url}, relay_py) for n in range(3)
        ]
        fake.requests.clear()
        with ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(lambda i: relays[i % 3].inbound(f"+1555123{i:04d}", f"text {i}")[0], range(24)))
        taken = [i for i, status in enumerate(answers) if status == 200]
        time.sleep(20)
        paged = [i for i in taken if any(f": text {i}\n" in r["form"]["Body"] for r in fake.requests)]
        time.sleep(10)
        still_503 = sum(1 for r in relays if r.inbound(CUSTOMER, "still there?")[0] != 200)
        for relay in relays:
            relay.stop()
        return {
            "scenario": "3 relays, max_connections 12, 24 texts",
            "answered_200": len(taken),
            "answered_200_not_paged_in_20s": len(taken) - len(paged),
            "relays_not_answering_200_30s_later": still_503,
        }
    finally:
        cluster.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--relay", type=Path, default=ROOT / "relay.py", help="the relay.py to run")
    parser.add_argument(
        "--only", choices=["hang", "slow", "held", "slots"], nargs="+", help="only these scenarios (default: all)"
    )
    parser.add_argument("--texts", type=int, default=20, help="texts at once in the slow-writes scenario")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="relay-gray-"))
    fake = FakeTwilio()
    cluster = Postgres().start()
    try:
        only, relay_py = args.only or ["hang", "slow", "held", "slots"], args.relay.resolve()
        if "hang" in only:
            print(json.dumps(hang(cluster, fake, workdir, relay_py)), flush=True)
        if "slow" in only:
            print(json.dumps(slow(cluster, fake, workdir, relay_py, args.texts)), flush=True)
        for how in ("frozen", "cut_off") if "held" in only else ():
            for write_s in (0.0, 0.2):
                print(json.dumps(held_work(cluster, fake, workdir, relay_py, how, write_s)), flush=True)
        if "slots" in only:
            print(json.dumps(slots(fake, workdir, relay_py)), flush=True)
    finally:
        fake.close()
        cluster.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
