"""Catch-up, measured: texts arrive while the relay is down; after its restart each is paged once.

    python bench/catch_up_run.py [--texts 20]

A fake Twilio on 127.0.0.1 keeps the texts the relay missed (as Twilio does);
the relay runs as a real process. Prints, for each text, whether it was paged
once and how many seconds after the restart its page reached the fake Twilio.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import LINE, SERGIO, FakeTwilio, RelayProcess, config_text, wait_until  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, default=20)
    args = parser.parse_args()
    fake = FakeTwilio()
    config = config_text(extra_relay='catch_up = "1s"')
    relay = RelayProcess(Path(tempfile.mkdtemp(prefix="relay-catch-up-")), fake, config)
    try:
        relay.start()
        relay.inbound("+15550001000", "before the stop")
        wait_until(lambda: fake.delivered(SERGIO))
        relay.stop()
        customers = [f"+155500020{n:02d}" for n in range(args.texts)]
        for n, number in enumerate(customers):  # arriving while the relay is down: no webhook reaches it
            fake.receive(number, LINE, f"missed text {n}", ago=args.texts - n)
        restarted, listed = time.time(), len(fake.list_requests)
        relay.start()
        wait_until(lambda: len(fake.delivered(SERGIO)) >= args.texts + 1, timeout=60)
        wait_until(lambda: len(fake.list_requests) >= listed + 3, timeout=10)  # more passes: still paged once
        rows = []
        for number in customers:
            pages = [r for r in fake.requests if r["form"]["To"] == SERGIO and number in r["form"]["Body"]]
            rows.append({"from": number, "pages": len(pages), "seconds": round(pages[0]["at"] - restarted, 2)})
    finally:
        relay.stop()
        fake.close()
    result = {
        "texts": args.texts,
        "paged_once": sum(r["pages"] == 1 for r in rows),
        "max_seconds_after_restart": max(r["seconds"] for r in rows),
        "per_text": rows,
    }
    print(json.dumps(result))
    return 0 if result["paged_once"] == args.texts else 1


if __name__ == "__main__":
    sys.exit(main())
