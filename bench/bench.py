"""Benchmark: the relay against bare Bottle+waitress, end-to-end latency, escalation lateness, scale, memory.

    python bench/bench.py [--seconds 8] [--connections 8] [--only PART ...] [--fixed-seconds 5]
    python bench/bench.py --only throughput burst   # 200 backups due at once, beside the bare app

Everything runs on 127.0.0.1: the relay and the bare app as subprocesses, a
fast fake Twilio REST API in a child process, and a load generator of several
processes sending unique, correctly signed inbound texts over keep-alive
connections. Prints a table and a summary line and writes both as JSON under
bench/results/.
"""

import argparse
import http.client
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import psycopg  # noqa: E402
from conftest import BACKUP, LINE, SERGIO, TOKEN, FakeTwilio, Postgres, config_text, free_port, wait_until  # noqa: E402
from twilio.request_validator import RequestValidator  # noqa: E402

import relay  # noqa: E402

# The cost caps guard a real line against floods; a benchmark is one on purpose.
NO_CAPS = "sender_hourly_cap = 100000000\noutbound_hourly_cap = 100000000"
TARGETS = {
    "throughput_ratio": 0.8,  # relay rps / bare rps, at least
    "p99_ratio": 1.5,  # relay p99 / bare p99, at most
    "e2e_p99_ms": 50,
    "lateness_p99_ms": 100,
    "scale_start_s": 2.0,
    "scale_rss_mb": 100,
    "idle_rss_mb": 60,
    # PostgreSQL store (DATABASE_URL), measured in the same run on the same load:
    "db_p99_ratio": 2.0,  # webhook p99 at FIXED_RATE, PostgreSQL / JSON files, at most
    "db_e2e_p99_ms": 100,
    "db_lateness_p99_ms": 250,  # with two relays
    "db_idle_rss_mb": 70,  # per relay
}


# -- processes ----------------------------------------------------------------


def serve_fake_twilio(port: int, latency: float = 0.0, hang: str | None = None) -> None:
    fake = FakeTwilio(port)
    fake.latency = latency  # every answer this late
    if hang:
        fake.stalls[hang] = "hang"  # every text to this phone hangs until the relay cuts it off
    fake.server.serve_forever()


def start_fake_twilio(latency: float = 0.0, hang: str | None = None) -> tuple[multiprocessing.Process, str]:
    port = free_port()
    proc = multiprocessing.Process(target=serve_fake_twilio, args=(port, latency, hang), daemon=True)
    proc.start()
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: reachable(url + "/_received"), timeout=10)
    return proc, url


def received(fake_url: str) -> list[dict]:
    with urllib.request.urlopen(fake_url + "/_received", timeout=30) as response:
        return json.loads(response.read())


def reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


class Server:
    """The relay or the bare app as a subprocess on a free port."""

    def __init__(self, args: list[str], env: dict, workdir: Path):
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(workdir / f"server-{self.port}.log", "wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, *args], cwd=workdir, env={**env, "PORT": str(self.port)}, stdout=self.log, stderr=self.log
        )

    def wait_ready(self, path: str) -> float:
        """Seconds from start until `path` answers 200."""
        wait_until(lambda: reachable(self.url + path), timeout=60, interval=0.01)
        return time.monotonic() - self.started

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        raise KeyError(name)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.log.close()


def relay_env(workdir: Path, fake_url: str, config: str) -> dict:
    (workdir / "config.toml").write_text(config)
    return {
        "PATH": os.environ.get("PATH", ""),
        "RELAY_CONFIG": str(workdir / "config.toml"),
        "RELAY_STATE_DIR": str(workdir / "state"),
        "TWILIO_ACCOUNT_SID": "AC" + "1" * 32,
        "TWILIO_AUTH_TOKEN": TOKEN,
        "TWILIO_API_BASE_URL": fake_url,
    }


def start_relay(fake_url: str, config: str, prefill=None, database_url: str | None = None) -> Server:
    workdir = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    env = relay_env(workdir, fake_url, config) | ({"DATABASE_URL": database_url} if database_url else {})
    if prefill:
        prefill(workdir / "state")
    return Server([str(ROOT / "relay.py")], env, workdir)


# -- load ---------------------------------------------------------------------


def signed_requests(url: str, start: int, count: int, sender_base: int = 0) -> list[tuple[int, bytes, str]]:
    validator = RequestValidator(TOKEN)
    out = []
    for n in range(start, start + count):
        params = {
            "MessageSid": f"SM{n:032x}",
            "From": f"+1555{(sender_base + n) % 10_000_000:07d}",
            "To": LINE,
            "Body": f"bench text {n}",
        }
        out.append((n, urllib.parse.urlencode(params).encode(), validator.compute_signature(url, params)))
    return out


def load_worker(port: int, requests: list, seconds: float, pace: float, queue) -> None:
    """Send requests in a closed loop (or one per `pace` seconds); report (n, answered at, latency, status)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    results = []
    end = time.monotonic() + seconds
    for n, body, signature in requests:
        if time.monotonic() >= end:
            break
        headers = {"Content-Type": "application/x-www-form-urlencoded", "X-Twilio-Signature": signature}
        began, wall = time.perf_counter(), time.time()
        conn.request("POST", "/api/sms/inbound", body, headers)
        response = conn.getresponse()
        response.read()
        latency = time.perf_counter() - began
        results.append((n, wall + latency, latency, response.status))
        if pace:
            time.sleep(max(0.0, pace - (time.perf_counter() - began)))
    queue.put(results)


def run_load(port, connections: int, seconds: float, per_worker: int, pace: float = 0.0, offset: int = 0):
    """`port`: one server's, or a list of servers' that the connections are spread over."""
    ports = port if isinstance(port, list) else [port]
    queue = multiprocessing.Queue()
    workers = []
    for i in range(connections):
        to = ports[i % len(ports)]
        url = f"http://127.0.0.1:{to}/api/sms/inbound"
        batch = signed_requests(url, offset + i * per_worker, per_worker, sender_base=offset)
        workers.append(multiprocessing.Process(target=load_worker, args=(to, batch, seconds, pace, queue)))
    for w in workers:
        w.start()
    results = [r for _ in workers for r in queue.get()]
    for w in workers:
        w.join()
    return results


def summarise(results: list, seconds: float) -> dict:
    latencies = sorted(r[2] for r in results)
    ok = sum(1 for r in results if r[3] == 200)
    return {
        "requests": len(results),
        "ok": ok,
        "rps": round(ok / seconds, 1),
        "p50_ms": round(percentile(latencies, 50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 99) * 1000, 2),
        "not_ok": dict(Counter(str(r[3]) for r in results if r[3] != 200)),
    }


def percentile(sorted_values: list, p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


# -- the measurements -----------------------------------------------------------


FIXED_RATE = 100  # texts/s offered to both servers for the like-for-like latency comparison


def bench_throughput(fake_url: str, seconds: float, connections: int) -> dict:
    """Closed-loop load (as fast as each server answers), then the same fixed rate to both."""
    per_worker = int(seconds * 2500)
    out = {}
    workdir = Path(tempfile.mkdtemp(prefix="relay-bare-"))
    servers = {
        "bare": lambda: Server([str(ROOT / "bench" / "bare_app.py")], {"PATH": os.environ.get("PATH", "")}, workdir),
        "relay": lambda: start_relay(fake_url, config_text(primary_wait="1h", backup_wait="1h", extra_relay=NO_CAPS)),
    }
    for offset, (name, start) in enumerate(servers.items()):
        base = 10_000_000 * (offset + 1)
        server = ready(start())
        out[name] = summarise(run_load(server.port, connections, seconds, per_worker, offset=base), seconds)
        server.stop()
        server = ready(start())  # a fresh one: no backlog of sends from the run before
        fixed = run_load(server.port, 4, 5, 5 * FIXED_RATE, pace=4 / FIXED_RATE, offset=base + 5_000_000)
        out[f"{name}_fixed_rate"] = summarise(fixed, 5)
        server.stop()
    out["throughput_ratio"] = round(out["relay"]["rps"] / out["bare"]["rps"], 3)
    out["p99_ratio_saturated"] = round(out["relay"]["p99_ms"] / out["bare"]["p99_ms"], 3)
    out["p99_ratio"] = round(out["relay_fixed_rate"]["p99_ms"] / out["bare_fixed_rate"]["p99_ms"], 3)
    return out


def ready(server: Server) -> Server:
    wait_until(lambda: reachable_post(server.url) or reachable(server.url + "/healthz"), timeout=30)
    return server


def reachable_post(url: str) -> bool:
    try:
        request = urllib.request.Request(url + "/api/sms/inbound", data=b"x=1")
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def bench_end_to_end(fake_url: str, rate: float = 50, seconds: float = 5, database_url=None, offset=90_000_000) -> dict:
    """Time from the 200 to the fake Twilio receiving the page to the primary, at a steady rate."""
    config = config_text(primary_wait="1h", backup_wait="1h", extra_relay=NO_CAPS)
    server = start_relay(fake_url, config, database_url=database_url)
    server.wait_ready("/healthz")
    # `offset`: numbers no other part uses, since pages are matched to texts by them
    results = run_load(server.port, 2, seconds, int(rate * seconds), pace=2 / rate, offset=offset)
    time.sleep(1)
    server.stop()
    answered_at = {n: at for n, at, _, status in results if status == 200}
    delays = []
    for page in received(fake_url):
        if page["to"] == SERGIO and "bench text " in page["body"]:
            n = int(page["body"].split("bench text ", 1)[1].split()[0])
            if n in answered_at:
                delays.append(page["at"] - answered_at[n])
    delays.sort()
    return {
        "texts": len(results),
        "paged": len(delays),
        "p50_ms": round(percentile(delays, 50) * 1000, 2),
        "p99_ms": round(percentile(delays, 99) * 1000, 2),
    }


def bench_lateness(
    fake_url: str,
    conversations: int = 300,
    wait: int = 2,
    database_url=None,
    relays=1,
    offset=30_000_000,
    connections=2,
    pace=0.01,
    settle=1.5,
) -> dict:
    """(time the backup's page arrives) - (the primary's deadline), over many short waits."""
    config = config_text(primary_wait=f"{wait}s", backup_wait="1h", extra_relay=NO_CAPS)
    servers = [start_relay(fake_url, config, database_url=database_url) for _ in range(relays)]
    for server in servers:
        server.wait_ready("/healthz")
    run_load([s.port for s in servers], connections, 3, conversations // connections, pace=pace, offset=offset)
    time.sleep(wait + settle)
    for server in servers:
        server.stop()
    if database_url:
        with psycopg.connect(database_url) as conn:
            rows = conn.execute("SELECT sender, created FROM relay_conversations").fetchall()
        deadline = {sender: created + wait for sender, created in rows}
    else:
        store = relay.JsonStore(servers[0].workdir / "state")
        store.load()
        deadline = {c.sender: c.created + c.chain[0].wait for c in store.conversations.values()}
    late = sorted(
        page["at"] - deadline[sender]
        for page in received(fake_url)
        if page["to"] == BACKUP and (sender := page["body"].split(" from ", 1)[1].split(":", 1)[0]) in deadline
    )
    return {
        "conversations": len(deadline),
        "escalated": len(late),
        "p50_ms": round(percentile(late, 50) * 1000, 2),
        "p99_ms": round(percentile(late, 99) * 1000, 2),
        "max_ms": round(max(late, default=float("nan")) * 1000, 2),
    }


def bench_burst(latency: float = 0.0, hang: str | None = None) -> dict:
    """200 texts as fast as they come, so 200 backups fall due at once to one contact: their lateness
    at a fake Twilio that answers at once, after `latency`, or that hangs every page to `hang`."""
    proc, url = start_fake_twilio(latency, hang)
    try:
        return bench_lateness(url, 200, wait=2, offset=50_000_000, connections=8, pace=0.0, settle=4.0)
    finally:
        proc.terminate()


def prefill(finished: int, open_: int):
    """A state directory as months of use leave it: archived conversations and open ones."""

    def fill(state_dir: Path) -> None:
        state_dir.mkdir(mode=0o700)
        line = relay.Line("QDN", LINE, (relay.Contact("Sergio", SERGIO, 3600), relay.Contact("Backup", BACKUP, 3600)))
        config = relay.Config(lines=(line,))
        now = time.time()
        days: dict[str, list[str]] = {}
        for n in range(finished):
            conv = relay.start_conversation(line, config, f"SMold{n:029d}", f"+1555{n:07d}", "an old text", "1", now)
            relay.record_sent(conv, 0, f"SMpage{n:028d}", time.time())
            relay.acknowledge(conv, line.chain[0], {"sid": f"SMack{n:029d}", "answer": "ok"}, now - n % 3 * 86400)
            day = time.strftime("%Y-%m-%d", time.gmtime(conv.finished_at))
            days.setdefault(day, []).append(json.dumps({"sids": conv.sids(), "conversation": conv.to_dict()}))
        for day, lines in days.items():
            (state_dir / f"archive-{day}.jsonl").write_text("\n".join(lines) + "\n")
        convs = []
        for n in range(open_):
            code = str(n % 9999 + 1)
            conv = relay.start_conversation(line, config, f"SMopen{n:028d}", f"+1556{n:07d}", "an open text", code, now)
            relay.record_sent(conv, 0, f"SMpage{n:028d}", time.time())
            convs.append(conv.to_dict())
        lines = [json.dumps({"generation": 1}), *map(json.dumps, convs)]
        (state_dir / relay.JsonStore.SNAPSHOT).write_text("\n".join(lines) + "\n")

    return fill


def bench_scale(fake_url: str, finished: int = 100_000, open_: int = 10_000) -> dict:
    out = {}
    for label, done in (("with_finished", finished), ("without_finished", 0)):
        server = start_relay(fake_url, config_text(extra_relay=NO_CAPS), prefill=prefill(done, open_))
        ready = server.wait_ready("/healthz")
        time.sleep(3)  # a few idle sweep passes
        sweeps = []
        for _ in range(5):
            sweeps.append(server.metric("relay_sweep_seconds"))
            time.sleep(0.2)
        out[label] = {
            "finished": done,
            "open": open_,
            "start_s": round(ready, 3),
            "rss_mb": round(server.rss_mb(), 1),
            "sweep_pass_ms": round(statistics.mean(sweeps) * 1000, 3),
        }
        server.stop()
    return out


def bench_idle(fake_url: str, database_url=None) -> dict:
    server = start_relay(fake_url, config_text(), database_url=database_url)
    server.wait_ready("/healthz")
    time.sleep(2)
    rss = server.rss_mb()
    server.stop()
    return {"rss_mb": round(rss, 1)}


def bench_database(fake_url: str, seconds: float) -> dict:
    """The PostgreSQL store beside the JSON files, on the same load: one relay, then two on one database.

    The cluster is a throwaway one with fsync on, as a real database would be. `seconds` at the fixed
    rate: at 5 s a p99 is the fifth slowest of 500 texts, and whether one of this machine's slow
    windows (bench/host_noise.py) falls in a store's stretch decides it: the ratio swung from 0.4x
    to 2.0x in four runs of the same code. At 20 s each store meets a dozen windows.
    """
    cluster = Postgres(fsync=True).start()
    try:
        config = config_text(primary_wait="1h", backup_wait="1h", extra_relay=NO_CAPS)
        fixed = {}
        for offset, (name, relays) in enumerate([("json", 1), ("postgresql", 1), ("postgresql_2_relays", 2)]):
            url = cluster.new_database() if name != "json" else None
            servers = [ready(start_relay(fake_url, config, database_url=url)) for _ in range(relays)]
            base = 50_000_000 + offset * 1_000_000
            load = run_load(
                [s.port for s in servers], 4, seconds, int(seconds * FIXED_RATE), pace=4 / FIXED_RATE, offset=base
            )
            fixed[name] = summarise(load, seconds)
            for server in servers:
                server.stop()
        return {
            "fixed_rate": fixed,
            "p99_ratio": round(fixed["postgresql"]["p99_ms"] / fixed["json"]["p99_ms"], 3),
            "end_to_end": bench_end_to_end(fake_url, database_url=cluster.new_database(), offset=91_000_000),
            "lateness_2_relays": bench_lateness(
                fake_url, database_url=cluster.new_database(), relays=2, offset=31_000_000
            ),
            "idle": bench_idle(fake_url, database_url=cluster.new_database()),
        }
    finally:
        cluster.close()


def verdicts(r: dict) -> dict:
    t, scale = r["throughput"], r["scale"]["with_finished"]
    return {
        "throughput_ratio": t["throughput_ratio"] >= TARGETS["throughput_ratio"],
        "p99_ratio": t["p99_ratio"] <= TARGETS["p99_ratio"],
        "e2e_p99_ms": r["end_to_end"]["p99_ms"] <= TARGETS["e2e_p99_ms"],
        "lateness_p99_ms": r["lateness"]["p99_ms"] <= TARGETS["lateness_p99_ms"],
        "scale_start_s": scale["start_s"] <= TARGETS["scale_start_s"],
        "scale_rss_mb": scale["rss_mb"] <= TARGETS["scale_rss_mb"],
        "idle_rss_mb": r["idle"]["rss_mb"] <= TARGETS["idle_rss_mb"],
        "db_p99_ratio": r["database"]["p99_ratio"] <= TARGETS["db_p99_ratio"],
        "db_e2e_p99_ms": r["database"]["end_to_end"]["p99_ms"] <= TARGETS["db_e2e_p99_ms"],
        "db_lateness_p99_ms": r["database"]["lateness_2_relays"]["p99_ms"] <= TARGETS["db_lateness_p99_ms"],
        "db_idle_rss_mb": r["database"]["idle"]["rss_mb"] <= TARGETS["db_idle_rss_mb"],
    }


def report(r: dict) -> str:
    t, e, la, sc, idle = r["throughput"], r["end_to_end"], r["lateness"], r["scale"], r["idle"]
    rows = [
        (
            "webhook, bare waitress",
            f"{t['bare']['rps']} req/s",
            f"p50 {t['bare']['p50_ms']} ms, p99 {t['bare']['p99_ms']} ms",
        ),
        (
            "webhook, relay",
            f"{t['relay']['rps']} req/s",
            f"p50 {t['relay']['p50_ms']} ms, p99 {t['relay']['p99_ms']} ms",
        ),
        ("relay / bare, saturated", f"{t['throughput_ratio']}x rps", f"{t['p99_ratio_saturated']}x p99"),
        (
            f"bare at {FIXED_RATE}/s",
            "",
            f"p50 {t['bare_fixed_rate']['p50_ms']} ms, p99 {t['bare_fixed_rate']['p99_ms']} ms",
        ),
        (
            f"relay at {FIXED_RATE}/s",
            f"{t['p99_ratio']}x bare p99",
            f"p50 {t['relay_fixed_rate']['p50_ms']} ms, p99 {t['relay_fixed_rate']['p99_ms']} ms",
        ),
        ("200 -> page at Twilio", f"{e['paged']} texts", f"p50 {e['p50_ms']} ms, p99 {e['p99_ms']} ms"),
        (
            "escalation lateness",
            f"{la['escalated']} backups",
            f"p50 {la['p50_ms']}, p99 {la['p99_ms']}, max {la['max_ms']} ms",
        ),
    ]
    for s in sc.values():
        rows.append(
            (
                f"start, {s['finished']} done + {s['open']} open",
                f"{s['start_s']} s",
                f"RSS {s['rss_mb']} MB, sweep pass {s['sweep_pass_ms']} ms",
            )
        )
    rows.append(("idle", f"RSS {idle['rss_mb']} MB", ""))
    db = r["database"]
    for name, label in [("json", "JSON files"), ("postgresql", "PostgreSQL"), ("postgresql_2_relays", "PostgreSQL x2")]:
        f = db["fixed_rate"][name]
        rows.append((f"{label} at {FIXED_RATE}/s", f"{f['ok']} ok", f"p50 {f['p50_ms']} ms, p99 {f['p99_ms']} ms"))
    de, dl = db["end_to_end"], db["lateness_2_relays"]
    rows.append(("PostgreSQL / JSON p99", f"{db['p99_ratio']}x", ""))
    rows.append(("PostgreSQL 200 -> page", f"{de['paged']} texts", f"p50 {de['p50_ms']} ms, p99 {de['p99_ms']} ms"))
    rows.append(
        (
            "PostgreSQL x2 lateness",
            f"{dl['escalated']} backups",
            f"p50 {dl['p50_ms']}, p99 {dl['p99_ms']}, max {dl['max_ms']} ms",
        )
    )
    rows.append(("PostgreSQL idle", f"RSS {db['idle']['rss_mb']} MB", ""))
    width = max(len(row[0]) for row in rows)
    lines = [f"{a:<{width}}  {b:<18}  {c}" for a, b, c in rows]
    lines.append("targets: " + ", ".join(f"{k} {'met' if ok else 'MISSED'}" for k, ok in r["verdicts"].items()))
    return "\n".join(lines)


def summary(r: dict) -> str:
    t, sc = r["throughput"], r["scale"]["with_finished"]
    met = sum(r["verdicts"].values())
    return (
        f"summary: relay {t['relay']['rps']} req/s = {t['throughput_ratio']}x bare; "
        f"p99 at {FIXED_RATE}/s {t['p99_ratio']}x bare; "
        f"e2e p99 {r['end_to_end']['p99_ms']} ms; lateness p99 {r['lateness']['p99_ms']} ms; "
        f"start {sc['start_s']} s at {sc['rss_mb']} MB; idle {r['idle']['rss_mb']} MB; "
        f"PostgreSQL p99 {r['database']['p99_ratio']}x JSON, e2e p99 {r['database']['end_to_end']['p99_ms']} ms, "
        f"lateness p99 x2 {r['database']['lateness_2_relays']['p99_ms']} ms; "
        f"{met}/{len(r['verdicts'])} targets met"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument(
        "--only",
        nargs="+",
        choices=["throughput", "end_to_end", "lateness", "burst", "scale", "idle", "database"],
        help="these parts alone, printed as JSON (with throughput: the bare app in the same run)",
    )
    parser.add_argument("--fixed-seconds", type=float, default=20.0, help="the database rows' time at the fixed rate")
    args = parser.parse_args()
    parts = {
        "throughput": lambda url: bench_throughput(url, args.seconds, args.connections),
        "end_to_end": bench_end_to_end,
        "lateness": bench_lateness,
        "burst": lambda url: {
            "at_once": bench_burst(),
            "twilio_250ms": bench_burst(latency=0.25),
            "primary_hanging": bench_burst(hang=SERGIO),
        },
        "scale": bench_scale,
        "idle": bench_idle,
        "database": lambda url: bench_database(url, args.fixed_seconds),
    }
    fake_proc, fake_url = start_fake_twilio()
    try:
        results = {name: part(fake_url) for name, part in parts.items() if not args.only or name in args.only}
    finally:
        fake_proc.terminate()
    if args.only:
        print(json.dumps(results, indent=2))
        return 0
    results |= {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": {"cpus": os.cpu_count()}}
    results["verdicts"] = verdicts(results)
    results["summary"] = summary(results)
    print(report(results))
    print(results["summary"])
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(exist_ok=True)
    path = out_dir / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written: {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
