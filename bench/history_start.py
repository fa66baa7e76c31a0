"""How long a relay takes to start, and how much memory it holds, on a long history.

Writes N finished conversations (default 100,000) spread over the past `--days` days into a
JSON state directory's archive files, starts `relay.py serve --dry-run` on it with that
retention, and reports the seconds until /healthz answers 200, the relay's RSS then, and the
seconds the console's history page takes to answer (signed in with a login-link URL).

    python bench/history_start.py [--conversations 100000] [--days 90] [--relay relay.py]

Everything runs on 127.0.0.1; the relay is stopped at the end.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import relay  # noqa: E402

LINE, SERGIO = "+16195550100", "+16195550111"
CONFIG = f"""
[relay]
retention = "{{days}}d"
[[lines]]
name = "QDN"
number = "{LINE}"
chain = [{{{{ name = "Sergio", phone = "{SERGIO}" }}}}]
"""


def write_history(state: Path, count: int, days: int) -> None:
    state.mkdir(mode=0o700, parents=True)
    line = relay.Line("QDN", LINE, (relay.Contact("Sergio", SERGIO, 120),))
    config, now = relay.Config(lines=(line,)), time.time()
    by_day: dict[str, list[str]] = {}
    for n in range(count):
        created = now - (n + 1) * days * 86400 / (count + 1)
        sid = f"SM{n:032x}"
        conv = relay.start_conversation(line, config, sid, f"+1555{n % 10_000_000:07d}", f"text {n}", "1", created)
        relay.acknowledge(
            conv,
            line.chain[0],
            {"sid": f"SM{n + count:032x}", "from": SERGIO, "body": "ok", "at": created + 60},
            created + 60,
        )
        day = time.strftime("%Y-%m-%d", time.gmtime(conv.finished_at))
        record = {"sids": conv.sids(), "conversation": conv.to_dict()}
        by_day.setdefault(day, []).append(json.dumps(record, ensure_ascii=False))
    for day, lines in by_day.items():
        path = state / f"archive-{day}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o600)


def get(port: int, path: str, cookie: str | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path, headers={"Cookie": cookie} if cookie else {})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, dict(response.getheaders()), body


def rss_mb(pid: int) -> float:
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        if row.startswith("VmRSS:"):
            return int(row.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conversations", type=int, default=100_000)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--relay", default=str(ROOT / "relay.py"))
    parser.add_argument("--port", type=int, default=18190)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        began = time.monotonic()
        write_history(work / "state", args.conversations, args.days)
        print(f"wrote {args.conversations} finished conversations in {time.monotonic() - began:.1f} s")
        (work / "config.toml").write_text(CONFIG.format(days=args.days))
        env = {**os.environ, "PORT": str(args.port), "RELAY_STATE_DIR": str(work / "state"), "HOST": "127.0.0.1"}
        env["RELAY_CONFIG"] = str(work / "config.toml")
        started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, args.relay, "serve", "--dry-run"], cwd=work, env=env, stdout=subprocess.DEVNULL
        )
        try:
            while True:
                try:
                    if get(args.port, "/healthz")[0] == 200:
                        break
                except OSError:
                    pass
                if proc.poll() is not None or time.monotonic() - started > 120:
                    print("the relay did not come up")
                    return 1
                time.sleep(0.05)
            up = time.monotonic() - started
            rss = rss_mb(proc.pid)
            link = subprocess.run(
                [sys.executable, args.relay, "login-link", SERGIO], cwd=work, env=env, capture_output=True, text=True
            ).stdout.strip()
            target = urllib.parse.urlsplit(link)
            cookie = get(args.port, f"{target.path}?{target.query}")[1]["Set-Cookie"].split(";")[0]
            asked = time.monotonic()
            status, _, page = get(args.port, "/history", cookie)
            history = time.monotonic() - asked
            print(
                json.dumps(
                    {
                        "conversations": args.conversations,
                        "days": args.days,
                        "start_s": round(up, 2),
                        "rss_mb": round(rss, 1),
                        "history_status": status,
                        "history_s": round(history, 2),
                        "history_bytes": len(page),
                        "rss_after_history_mb": round(rss_mb(proc.pid), 1),
                    }
                )
            )
        finally:
            proc.terminate()
            proc.wait(timeout=15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
