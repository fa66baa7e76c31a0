"""Kill test: texts keep arriving while the relay is SIGKILLed and restarted, again and again.

Counts texts answered 200, texts lost (answered 200 but never paged to the
primary, or never escalated to the backup), and duplicate pages (a contact
paged more than once for the same conversation). Everything runs on 127.0.0.1.

    python bench/kill_test.py [--kills 20] [--rate 40]
"""

import argparse
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

from conftest import BACKUP, SERGIO, FakeTwilio, RelayProcess, config_text, wait_until  # noqa: E402

SENDER = re.compile(r"from (\+1555[0-9]{7})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--rate", type=float, default=40.0, help="texts per second")
    parser.add_argument("--uptime", type=float, default=1.0, help="seconds between restart and kill")
    args = parser.parse_args()

    fake = FakeTwilio()
    workdir = Path(tempfile.mkdtemp(prefix="relay-kill-"))
    relay = RelayProcess(workdir, fake, config_text(primary_wait="2s", backup_wait="1h"))
    relay.start()
    accepted: list[str] = []
    stop = threading.Event()

    def customers():
        n = 0
        while not stop.is_set():
            n += 1
            sender = f"+1555{n:07d}"
            try:
                if relay.inbound(sender, f"text {n}", sid=f"SM{0xC0FFEE:08x}{n:024x}")[0] == 200:
                    accepted.append(sender)
            except OSError:
                pass  # the relay is down right now; Twilio would retry
            time.sleep(1 / args.rate)

    sender_thread = threading.Thread(target=customers)
    sender_thread.start()
    for _ in range(args.kills):
        time.sleep(args.uptime)
        relay.kill()
        relay.start()
    stop.set()
    sender_thread.join()
    expected = set(accepted)

    def paged(phone):
        return Counter(m[1] for f in fake.delivered(phone) if (m := SENDER.search(f["Body"])))

    wait_until(lambda: expected <= set(paged(BACKUP)), timeout=60, interval=0.5)
    time.sleep(3)  # let anything left over arrive, so duplicates are counted
    relay.stop()

    primary, backup = paged(SERGIO), paged(BACKUP)
    unreadable = []
    for path in relay.state_dir.glob("*.json*"):
        try:
            lines = path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]
            for line in lines:
                json.loads(line)
        except ValueError:
            unreadable.append(path.name)
    result = {
        "kills": args.kills,
        "accepted": len(expected),
        "lost_primary": len(expected - set(primary)),
        "lost_backup": len(expected - set(backup)),
        "duplicate_primary_pages": sum(c - 1 for c in primary.values() if c > 1),
        "duplicate_backup_pages": sum(c - 1 for c in backup.values() if c > 1),
        "unreadable_files": unreadable,
    }
    print(json.dumps(result))
    fake.close()
    return 0 if not (result["lost_primary"] or result["lost_backup"] or unreadable) else 1


if __name__ == "__main__":
    sys.exit(main())
