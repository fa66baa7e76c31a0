"""Memory after a flood: 100,000 distinct senders, then the cap window passes; RSS must come back.

    python bench/flood_memory.py [--senders 100000]

The relay runs as a subprocess against a fake Twilio in a child process, all on
127.0.0.1, with caps lifted (the flood is the point) and one contact with a
one-minute wait. Its monotonic clock is moved on by a `sitecustomize` shim
instead of waiting: an hour later every chain has ended unanswered, the
senders' hour has passed, and the hourly fold has archived the conversations.
Prints RSS before, at the peak and after, and writes bench/results/flood-*.json.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import LINE, SERGIO, clock_shim, wait_until  # noqa: E402

from bench import NO_CAPS, Server, relay_env, run_load, start_fake_twilio  # noqa: E402

CONFIG = f"""
[relay]
catch_up = 0
{NO_CAPS}

[[lines]]
name = "QDN"
number = "{LINE}"
chain = [{{ name = "Sergio", phone = "{SERGIO}", wait = "1m" }}]
"""


def folded(state: Path) -> bool:
    """The journal is a fresh, empty one: the fold has run (a fold may be between files when asked)."""
    try:
        return any(path.stat().st_size == 0 for path in state.glob("journal-*.jsonl"))
    except FileNotFoundError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--senders", type=int, default=100_000)
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args()

    fake, fake_url = start_fake_twilio()
    workdir = Path(tempfile.mkdtemp(prefix="relay-flood-"))
    shifted, offset = clock_shim(workdir, "monotonic")
    env = relay_env(workdir, fake_url, CONFIG) | shifted
    server = Server([str(ROOT / "relay.py")], env, workdir)
    try:
        server.wait_ready("/healthz")
        # Warm up first, so "before" is a relay that has paged: the REST client and threads are in it.
        warm = run_load(server.port, 2, 60, 100, offset=4_000_000)  # senders +15558000000...
        wait_until(lambda: server.metric('relay_sends_total{result="sent"}') >= len(warm), timeout=60)
        time.sleep(2)
        before = server.rss_mb()
        started = time.monotonic()
        per_worker = args.senders // args.connections
        results = run_load(server.port, args.connections, 3600, per_worker)
        accepted = sum(1 for r in results if r[3] == 200)
        flood_s = time.monotonic() - started
        sent = accepted + len(warm)
        wait_until(lambda: server.metric('relay_sends_total{result="sent"}') >= sent, timeout=1800, interval=1)
        peak = server.rss_mb()
        print(json.dumps({"accepted": accepted, "flood_s": round(flood_s, 1), "before": before, "peak": peak}))
        offset.write_text(str(3700))  # every one-minute wait, and the senders' hour, have run out
        opened = server.metric('relay_inbound_total{kind="accepted"}')
        wait_until(lambda: server.metric("relay_unanswered_total") >= opened, timeout=1800, interval=1)
        offset.write_text(str(2 * 3700))  # and the hourly fold is due: finished conversations go to the archive
        wait_until(lambda: server.metric("relay_open_conversations") == 0, timeout=600, interval=1)
        wait_until(lambda: folded(workdir / "state"), timeout=600)
        time.sleep(3)
        after = server.rss_mb()
    finally:
        server.stop()
        fake.terminate()
    result = {
        "senders": args.senders,
        "accepted": accepted,
        "flood_s": round(flood_s, 1),
        "rss_before_mb": round(before, 1),
        "rss_peak_mb": round(peak, 1),
        "rss_after_mb": round(after, 1),
        "back_within_mb": round(after - before, 1),
        "target_mb": 20,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(json.dumps(result))
    out = ROOT / "bench" / "results" / f"flood-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
