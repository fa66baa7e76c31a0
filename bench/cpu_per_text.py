"""CPU per text on each store, in-process: the relay's own and, on PostgreSQL, the database's.

    python bench/cpu_per_text.py [--texts 2000] [--rounds 3]

Each round hands `--texts` new customers' texts to a Relay object, one after another, on the JSON
files and then on a fresh PostgreSQL database (fsync off): no HTTP, and sends go to a recording
gateway at once. It prints, per text, this process's CPU time and wall time, and the CPU time that
PostgreSQL's processes used meanwhile (read from /proc). CPU time does not depend on how busy the
machine is as much as latency does, so this shows what a change to a text's path costs; the
machine's own slow windows (bench/host_noise.py) still move it by some tenths.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import LINE, PUBLIC_URL, SERGIO, TOKEN, Postgres, RecordingGateway, RunAtOnce  # noqa: E402

import relay  # noqa: E402

WARM_UP = 100


def database_cpu() -> float:
    """CPU seconds used so far by every process named postgres (so run this with no other busy)."""
    used = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() != "postgres":
                continue
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        used += int(fields[11]) + int(fields[12])  # utime, stime
    return used / os.sysconf("SC_CLK_TCK")


def per_text(store: relay.Store, state_dir: str, first: int, texts: int) -> dict:
    config = relay.Config(
        lines=(relay.Line("QDN", LINE, (relay.Contact("Sergio", SERGIO, 3600),)),),
        public_url=PUBLIC_URL,
        outbound_hourly_cap=10**8,
        sender_hourly_cap=10**8,
    )
    settings = relay.Settings.from_env({"TWILIO_AUTH_TOKEN": TOKEN, "RELAY_STATE_DIR": state_dir})
    store.open()
    service = relay.Relay(settings, config, store, RecordingGateway())
    service.senders = RunAtOnce()

    def receive(n: int) -> None:
        service.receive({"MessageSid": f"SM{n:032x}", "From": f"+1555{n:07d}", "To": LINE, "Body": f"text {n}"})

    for n in range(first, first + WARM_UP):
        receive(n)
    cpu, wall, database = time.process_time(), time.perf_counter(), database_cpu()
    for n in range(first + WARM_UP, first + WARM_UP + texts):
        receive(n)
    return {
        "relay_cpu_ms": (time.process_time() - cpu) / texts * 1000,
        "wall_ms": (time.perf_counter() - wall) / texts * 1000,
        "database_cpu_ms": (database_cpu() - database) / texts * 1000,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    relay.log = lambda *args, **fields: None  # the same on both stores, and not what is compared
    cluster = Postgres(fsync=False).start()
    try:
        for round_ in range(args.rounds):
            first = round_ * 1_000_000
            files = tempfile.mkdtemp(prefix="relay-cpu-")
            json_store = per_text(relay.JsonStore(Path(files)), files, first, args.texts)
            pg_store = per_text(relay.PgStore(cluster.new_database()), tempfile.mkdtemp(), first, args.texts)
            print(
                f"JSON files: relay CPU {json_store['relay_cpu_ms']:.3f} ms, wall {json_store['wall_ms']:.3f} ms | "
                f"PostgreSQL: relay CPU {pg_store['relay_cpu_ms']:.3f} ms, wall {pg_store['wall_ms']:.3f} ms, "
                f"database CPU {pg_store['database_cpu_ms']:.3f} ms (per text)",
                flush=True,
            )
    finally:
        cluster.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
