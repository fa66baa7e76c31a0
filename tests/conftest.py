"""Shared test helpers: phone numbers, a fake Twilio REST API, and a relay run as a real process."""

from __future__ import annotations

import calendar
import email.utils
import glob
import hashlib
import itertools
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import freezegun
import psycopg
import pytest
from twilio.request_validator import RequestValidator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import relay  # noqa: E402

# freezegun would otherwise freeze pytest's own timer, and `--durations` would report years.
freezegun.configure(extend_ignore_list=["_pytest.timing"])

LINE = "+16195550100"
SERGIO = "+16195550111"
BACKUP = "+18583354807"
ALARM = "+16195550199"
CUSTOMER = "+15551230001"
OTHER_CUSTOMER = "+15551230002"
TOKEN = "test-auth-token"
PUBLIC_URL = "https://relay.example.com"
ACCOUNT = "AC" + "1" * 32


def config_text(primary_wait="2m", backup_wait="5m", repeat=0, alarm=None, extra_relay="") -> str:
    alarm_line = f'alarm_phone = "{alarm}"' if alarm else ""
    return f"""
[relay]
wait = "5m"
repeat = {repeat}
{alarm_line}
{extra_relay}

[[lines]]
name = "QDN"
number = "{LINE}"
chain = [
  {{ name = "Sergio", phone = "{SERGIO}", wait = "{primary_wait}" }},
  {{ name = "Backup", phone = "{BACKUP}", wait = "{backup_wait}" }},
]
"""


def msid(tag: object) -> str:
    """A MessageSid in Twilio's form (SM and 32 hex digits), the same for the same tag."""
    return "SM" + hashlib.md5(str(tag).encode()).hexdigest()


def _port_block() -> range:
    """This worker's own share of the ports below the kernel's ephemeral range.

    A port the kernel hands out for binding to 0 is in the ephemeral range, where any outgoing
    connection (to PostgreSQL, to the fake Twilio) may take it as its local port between the test
    choosing it and the relay listening on it: CI once saw "Address already in use" that way.
    Below the range only a listener takes a port, and each xdist worker has a block of its own.
    """
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    size = (ephemeral_low - 20000) // workers
    return range(20000 + worker * size, 20000 + (worker + 1) * size)


PORT_BLOCK = _port_block()
# Each port of the block in turn, so this process never hands out one it handed out lately. The
# turn starts anywhere: another test run on the machine, starting where this one did, would
# otherwise choose the same ports at the same moments.
_start = random.SystemRandom().randrange(len(PORT_BLOCK))
_next_port = itertools.cycle([*PORT_BLOCK[_start:], *PORT_BLOCK[:_start]])


def free_port() -> int:
    """A port no other worker hands out and nothing listens on (tried as the relay binds it)."""
    for _ in PORT_BLOCK:
        port = next(_next_port)
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise AssertionError(f"every port in {PORT_BLOCK} is taken")


def logged_events(capsys, name: str) -> list[dict]:
    """The log records of this name written in this test's own process (a relay's: RelayProcess.events)."""
    return [r for r in map(json.loads, capsys.readouterr().out.splitlines()) if r["event"] == name]


_real_monotonic = time.monotonic  # taken before any test freezes time, so waits run out under freezegun too


def wait_until(predicate, timeout=10.0, interval=0.05):
    """Poll until predicate() is truthy; returns its value, or fails the test at the timeout."""
    deadline = _real_monotonic() + timeout
    while _real_monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


CLOCK_SHIM = """
import os, time
_real = getattr(time, os.environ["RELAY_SHIFTED_CLOCK"])
_offset_file = os.environ["RELAY_CLOCK_OFFSET_FILE"]

def _shifted():
    try:
        with open(_offset_file) as f:
            return _real() + float(f.read() or 0)
    except (OSError, ValueError):
        return _real()

setattr(time, os.environ["RELAY_SHIFTED_CLOCK"], _shifted)
"""


def clock_shim(directory: Path, clock: str) -> tuple[dict, Path]:
    """Environment for a relay whose `time.<clock>` runs ahead by the seconds written to the returned file."""
    (directory / "shim").mkdir()
    (directory / "shim" / "sitecustomize.py").write_text(CLOCK_SHIM)
    offset = directory / f"{clock}-offset"
    offset.write_text("0")
    env = {"PYTHONPATH": str(directory / "shim"), "RELAY_SHIFTED_CLOCK": clock, "RELAY_CLOCK_OFFSET_FILE": str(offset)}
    return env, offset


BARRIER_SENDER = "+15550009999"


def barrier(relay_process, fake, sender: str = BARRIER_SENDER) -> None:
    """Send a text and wait for its page: whatever the relay was given before has been handled by then.

    Pages to one recipient go out in order, so this shows that nothing else is on its way either.
    """
    relay_process.inbound(sender, "barrier")
    wait_until(lambda: any(sender in m["Body"] for m in fake.delivered()))


def sign(url: str, params: dict, token: str = TOKEN) -> str:
    return RequestValidator(token).compute_signature(url, params)


# ---------------------------------------------------------------------------
# The relay service in-process, with a gateway that records what it is given
# ---------------------------------------------------------------------------


class RecordingGateway:
    def __init__(self):
        self.sent = []
        self.media = []

    def send(self, from_, to, body, status_callback, media=(), secret=False):
        self.sent.append((from_, to, body))
        self.media.append(list(media))
        return f"SM{len(self.sent):032d}"


class RunAtOnce:
    """Stands in for the sender threads: a submitted send runs before submit returns."""

    def submit(self, fn, *args):
        fn(*args)

    def shutdown(self, wait=True):
        pass


def make_relay(state_dir, config: relay.Config | None = None) -> relay.Relay:
    config = config or relay.Config(
        lines=(relay.Line("QDN", LINE, (relay.Contact("Sergio", SERGIO, 60),)),), public_url=PUBLIC_URL
    )
    settings = relay.Settings.from_env({"TWILIO_AUTH_TOKEN": TOKEN, "RELAY_STATE_DIR": str(state_dir)})
    store = relay.JsonStore(state_dir)
    store.open()
    return relay.Relay(settings, config, store, RecordingGateway())


# ---------------------------------------------------------------------------
# A fake Twilio REST API on 127.0.0.1 that records what it is sent
# ---------------------------------------------------------------------------

MESSAGES_PATH = re.compile(r"/2010-04-01/Accounts/(AC[0-9a-f]{32})/Messages\.json")
CALLS_PATH = re.compile(r"/2010-04-01/Accounts/(AC[0-9a-f]{32})/Calls(?:/(CA[0-9a-f]{32}))?\.json")
MEDIA_PATH = re.compile(r"/2010-04-01/Accounts/(AC[0-9a-f]{32})/Messages/((?:SM|MM)[0-9a-f]{32})/Media\.json")
NUMBERS_PATH = re.compile(r"/2010-04-01/Accounts/(AC[0-9a-f]{32})/IncomingPhoneNumbers(?:/(PN[0-9a-f]{32}))?\.json")
SERVICES_PATH = re.compile(r"/v1/Services(?:/(MG[0-9a-f]{32})/(PhoneNumbers|Compliance/Usa2p))?")
TOLLFREE_PATH = re.compile(r"/v1/Tollfree/Verifications")
FLOWS_PATH = re.compile(r"/v2/Flows(?:/(FW[0-9a-f]{32}))?")
NUMBER_FIELDS = {"SmsUrl": "sms_url", "SmsMethod": "sms_method"} | {
    "SmsFallbackUrl": "sms_fallback_url",
    "SmsFallbackMethod": "sms_fallback_method",
}


class FakeTwilio:
    """Answers Messages.json like Twilio; `faults` is a queue of answers to give first.

    A fault is (status, twilio_error_code, headers) or ("hang", seconds) or ("drop",).
    `stalls` maps a recipient to how every text to it goes wrong: "hang" (no answer until the
    test ends), "trickle" (the status line a byte a second) or "odd" (200 with a body
    that is not JSON). `latency` delays every answer.
    """

    def __init__(self, port: int = 0):
        self.requests: list[dict] = []  # every Messages POST, faulted or not
        self.numbers: dict[str, dict] = {}  # phone -> incoming number record, for `setup`
        self.number_updates: list[dict] = []
        self.reject_credentials = False
        self.faults: deque = deque()
        self.stalls: dict[str, str] = {}
        self.latency = 0.0
        self.released = threading.Event()  # ends every stall, at close
        self.inbox: list[dict] = []  # texts Twilio received, for catch-up to list (add with `receive`)
        self.list_requests: list[dict] = []  # the query of every Messages list call
        self.list_faults: deque = deque()  # (status, code) answers to give list calls first
        self.calls: list[dict] = []  # every call placed (the Calls.json form), in order
        # Messaging v1: service sid -> {"name", "numbers": [phone], "campaign": A2P campaign status or None},
        # and toll-free number sid -> verification status (add with add_service, add_tollfree_verification)
        self.services: dict[str, dict] = {}
        self.tollfree: dict[str, str] = {}
        self.messaging_requests: list[str] = []  # method and path of every Messaging v1 request
        self.flows: dict[str, dict] = {}  # Studio v2: flow sid -> the flow as Twilio answers it
        self.studio_requests: list[str] = []  # method and path of every Studio request
        self.call_updates: list[dict] = []  # every change to a call, with its "sid"
        self.lock = threading.Lock()
        self.count = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as Twilio does
            disable_nagle_algorithm = True

            def log_message(self, *args):
                pass

            def do_GET(self):
                """/_received: what was delivered, for a benchmark in another process; or a numbers list."""
                target = urllib.parse.urlsplit(self.path)
                if MESSAGES_PATH.fullmatch(target.path):
                    return self._list_messages(dict(urllib.parse.parse_qsl(target.query)))
                if m := MEDIA_PATH.fullmatch(target.path):
                    return self._list_media(m[2])
                if m := SERVICES_PATH.fullmatch(target.path):
                    return self._messaging(m[1], m[2])
                if m := FLOWS_PATH.fullmatch(target.path):
                    fake.studio_requests.append(f"GET {target.path}")
                    if m[1] is None:
                        rows = [{k: v for k, v in f.items() if k != "definition"} for f in fake.flows.values()]
                        return self._answer(200, self._v1_page("flows", rows, target.path))
                    if m[1] not in fake.flows:
                        return self._answer(404, {"code": 20404, "message": "not found", "status": 404})
                    return self._answer(200, fake.flows[m[1]])
                if TOLLFREE_PATH.fullmatch(target.path):
                    wanted = dict(urllib.parse.parse_qsl(target.query)).get("TollfreePhoneNumberSid")
                    fake.messaging_requests.append(f"GET {target.path}")
                    found = [
                        {"sid": f"HH{n:032x}", "tollfree_phone_number_sid": number, "status": status}
                        for n, (number, status) in enumerate(fake.tollfree.items())
                        if wanted in (None, number)
                    ]
                    return self._answer(200, self._v1_page("verifications", found, target.path))
                if NUMBERS_PATH.fullmatch(target.path):
                    if fake.reject_credentials:
                        return self._answer(401, {"code": 20003, "message": "Authenticate", "status": 401})
                    wanted = dict(urllib.parse.parse_qsl(target.query)).get("PhoneNumber")
                    found = [n for phone, n in fake.numbers.items() if wanted in (None, phone)]
                    return self._answer(200, {"incoming_phone_numbers": found, "next_page_uri": None, "page": 0})
                with fake.lock:
                    received = [
                        {"to": r["form"]["To"], "body": r["form"]["Body"], "at": r["at"]} for r in fake.requests
                    ]
                self._answer(200, received)

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if len(raw) < length:
                    return  # the client died mid-request: Twilio would have received nothing
                form = dict(urllib.parse.parse_qsl(raw.decode()))
                if m := NUMBERS_PATH.fullmatch(self.path):
                    number = next((n for n in fake.numbers.values() if n["sid"] == m[2]), None)
                    if number is None:
                        return self._answer(404, {"code": 20404, "message": "not found", "status": 404})
                    number.update({NUMBER_FIELDS[key]: value for key, value in form.items() if key in NUMBER_FIELDS})
                    fake.number_updates.append(form)
                    return self._answer(200, number)
                if m := CALLS_PATH.fullmatch(self.path):
                    return self._call(m[2], form)
                if m := FLOWS_PATH.fullmatch(self.path):
                    return self._flow(m[1], form)
                if not MESSAGES_PATH.fullmatch(self.path):
                    return self._answer(404, {"code": 20404, "message": "not found", "status": 404})
                if not self.headers.get("Authorization"):
                    return self._answer(401, {"code": 20003, "message": "Authenticate", "status": 401})
                with fake.lock:
                    fault = fake.faults.popleft() if fake.faults else None
                    fake.count += 1
                    sid = f"SM{fake.count:032x}"
                    record = {"form": form, "at": time.time(), "sid": sid, "fault": fault}
                    record["auth"] = self.headers.get("Authorization")
                    fake.requests.append(record)
                stall = fake.stalls.get(form.get("To"))
                if stall == "hang":
                    fake.released.wait()
                    return
                if stall == "trickle":
                    for byte in b"HTTP/1.1 201 Created\r\n":
                        if fake.released.wait(1.0):
                            return
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                    return
                if stall == "odd":
                    return self._raw_answer(200, b"<html>queued, probably</html>", "text/html")
                time.sleep(fake.latency)
                if fault and fault[0] == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault and fault[0] == "hang":
                    time.sleep(fault[1])
                    fault = None
                if fault:
                    status, code, headers = fault
                    body = {"code": code, "message": "fault", "more_info": "", "status": status}
                    return self._answer(status, body, headers)
                body = {"sid": sid, "status": "queued", "to": form.get("To"), "from": form.get("From")}
                self._answer(201, body)

            def _call(self, sid, form):
                with fake.lock:
                    if sid:
                        fake.call_updates.append({"sid": sid, **form})
                    else:
                        sid = f"CA{len(fake.calls) + 1:032x}"
                        fake.calls.append({"sid": sid, "at": time.time(), **form})
                time.sleep(fake.latency)
                self._answer(201 if not form.get("Status") else 200, {"sid": sid, "status": "queued"})

            def _flow(self, sid, form):
                """Create (no sid) or update a Studio flow, as Twilio does: a new revision each time."""
                fake.studio_requests.append(f"POST {self.path}")
                with fake.lock:
                    if sid is None:
                        sid = f"FW{len(fake.flows) + 1:032x}"
                        fake.flows[sid] = {
                            "sid": sid,
                            "account_sid": ACCOUNT,
                            "revision": 0,
                            "webhook_url": f"https://webhooks.twilio.com/v1/Accounts/{ACCOUNT}/Flows/{sid}",
                            "url": f"https://studio.twilio.com/v2/Flows/{sid}",
                        }
                    elif sid not in fake.flows:
                        return self._answer(404, {"code": 20404, "message": "not found", "status": 404})
                    flow = fake.flows[sid]
                    flow["revision"] += 1
                    flow["friendly_name"] = form.get("FriendlyName", flow.get("friendly_name"))
                    flow["status"] = form["Status"]
                    if "Definition" in form:
                        flow["definition"] = json.loads(form["Definition"])
                return self._answer(201 if flow["revision"] == 1 else 200, flow)

            def _list_messages(self, query):
                fake.list_requests.append(query)
                if not self.headers.get("Authorization") or fake.reject_credentials:
                    return self._answer(401, {"code": 20003, "message": "Authenticate", "status": 401})
                with fake.lock:
                    fault = fake.list_faults.popleft() if fake.list_faults else None
                if fault:
                    return self._answer(fault[0], {"code": fault[1], "message": "fault", "status": fault[0]})
                # Twilio filters DateSent> by the day (its API description): the rest is the relay's to skip.
                since = query.get("DateSent>")
                since = calendar.timegm(time.strptime(since[:10], "%Y-%m-%d")) if since else 0
                found = sorted(
                    (m for m in fake.inbox if m["to"] == query.get("To") and m["date_sent"] >= since),
                    key=lambda m: -m["date_sent"],
                )
                size, page = int(query.get("PageSize", 50)), int(query.get("Page", 0))
                rows = found[page * size : (page + 1) * size]
                next_uri = None
                if (page + 1) * size < len(found):
                    rest = urllib.parse.urlencode({**query, "Page": page + 1, "PageToken": f"PA{page + 1}"})
                    next_uri = f"{self.path.split('?')[0]}?{rest}"
                body = {
                    "messages": [fake.message_json(m) for m in rows],
                    "next_page_uri": next_uri,
                    "page": page,
                    "page_size": size,
                    "uri": self.path,
                }
                self._answer(200, body)

            def _messaging(self, service, below):
                fake.messaging_requests.append(f"GET {self.path.split('?')[0]}")
                if service is None:
                    rows = [{"sid": sid, "friendly_name": s["name"]} for sid, s in fake.services.items()]
                    return self._answer(200, self._v1_page("services", rows, self.path))
                found = fake.services.get(service)
                if found is None:
                    return self._answer(404, {"code": 20404, "message": "not found", "status": 404})
                if below == "PhoneNumbers":
                    rows = [
                        {"sid": f"PN{abs(hash(p)):032x}"[:34], "service_sid": service, "phone_number": p}
                        for p in found["numbers"]
                    ]
                    return self._answer(200, self._v1_page("phone_numbers", rows, self.path))
                rows = (
                    []
                    if found["campaign"] is None
                    else [
                        {"sid": "QE" + "0" * 32, "messaging_service_sid": service, "campaign_status": found["campaign"]}
                    ]
                )
                return self._answer(200, self._v1_page("compliance", rows, self.path))

            @staticmethod
            def _v1_page(key, rows, path):
                meta = {
                    "page": 0,
                    "page_size": 50,
                    "first_page_url": path,
                    "previous_page_url": None,
                    "url": path,
                    "next_page_url": None,
                    "key": key,
                }
                return {key: rows, "meta": meta}

            def _list_media(self, sid):
                message = next((m for m in fake.inbox if m["sid"] == sid), None)
                media = [{"sid": media_sid, "parent_sid": sid} for media_sid in (message or {}).get("media", [])]
                self._answer(200, {"media_list": media, "next_page_uri": None, "page": 0, "page_size": 50})

            def _answer(self, status, body, headers=None):
                self._raw_answer(status, json.dumps(body).encode(), "application/json", headers)

            def _raw_answer(self, status, data, content_type, headers=None):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, address: None  # a client killed mid-request is expected here
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        # shutdown() waits out one poll: the default half second, at every test's end, adds up
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def receive(self, sender: str, to: str, body: str, ago: float = 0.0, media: int = 0, direction="inbound") -> str:
        """A text Twilio got `ago` seconds back (whether or not any webhook was called); returns its sid."""
        sid = msid(f"inbox {len(self.inbox)} {sender} {body}")
        media_sids = [f"ME{hashlib.md5(f'{sid}{i}'.encode()).hexdigest()}" for i in range(media)]
        self.inbox.append(
            {"sid": sid, "from": sender, "to": to, "body": body, "date_sent": time.time() - ago}
            | {"direction": direction, "media": media_sids}
        )
        return sid

    @staticmethod
    def message_json(m: dict) -> dict:
        stamp = email.utils.formatdate(m["date_sent"], usegmt=True)
        return {
            "sid": m["sid"],
            "account_sid": ACCOUNT,
            "from": m["from"],
            "to": m["to"],
            "body": m["body"],
            "direction": m["direction"],
            "status": "received",
            "num_media": str(len(m["media"])),
            "num_segments": "1",
            "date_sent": stamp,
            "date_created": stamp,
            "date_updated": stamp,
            "api_version": "2010-04-01",
            "uri": f"/2010-04-01/Accounts/{ACCOUNT}/Messages/{m['sid']}.json",
            "subresource_uris": {"media": f"/2010-04-01/Accounts/{ACCOUNT}/Messages/{m['sid']}/Media.json"},
        }

    def add_service(self, name: str, numbers: list[str], campaign: str | None) -> str:
        """A Messaging Service holding `numbers`, with an A2P campaign of that status (None: no campaign)."""
        sid = f"MG{len(self.services) + 1:032x}"
        self.services[sid] = {"name": name, "numbers": numbers, "campaign": campaign}
        return sid

    def add_tollfree_verification(self, phone: str, status: str) -> None:
        self.tollfree[self.numbers[phone]["sid"]] = status

    def add_number(self, phone: str, sms_url: str | None = None) -> dict:
        sid = f"PN{len(self.numbers) + 1:032x}"
        self.numbers[phone] = {"sid": sid, "phone_number": phone, "sms_url": sms_url, "sms_method": "POST"} | {
            "sms_fallback_url": None,
            "sms_fallback_method": "POST",
        }
        return self.numbers[phone]

    def flow_named(self, name: str) -> dict | None:
        return next((flow for flow in self.flows.values() if flow.get("friendly_name") == name), None)

    def delivered(self, to: str | None = None) -> list[dict]:
        """The messages answered 201, optionally only those to one number."""
        with self.lock:
            return [r["form"] for r in self.requests if not r["fault"] and (to is None or r["form"]["To"] == to)]

    def attempts(self, to: str) -> int:
        with self.lock:
            return sum(1 for r in self.requests if r["form"].get("To") == to)

    def close(self):
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_twilio():
    fake = FakeTwilio()
    yield fake
    fake.close()


# ---------------------------------------------------------------------------
# A throwaway PostgreSQL on 127.0.0.1, started by the suite itself
# ---------------------------------------------------------------------------

INSTALL_POSTGRESQL = "PostgreSQL not found: install it (Debian: apt-get install postgresql) to run the database tests"


def postgres_bin() -> Path | None:
    """Where initdb and pg_ctl are: on PATH, or Debian's versioned directory."""
    if found := shutil.which("initdb"):
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(versions[-1]).parent if versions else None


class Postgres:
    """A cluster of our own on a free port: initdb, pg_ctl start, and stopped by its pid.

    PostgreSQL refuses to run as root, so as root it runs as the `postgres` user, in a directory
    that user owns. fsync is off unless asked for: a test may kill the database's processes, never the
    machine under them, so what they wrote to the kernel survives.
    """

    def __init__(self, fsync: bool = False, settings: str = ""):
        self.fsync = fsync
        self.settings = settings  # more `-c name=value` for the server
        self.bin = postgres_bin()
        if self.bin is None:
            if os.environ.get("CI"):
                pytest.fail(INSTALL_POSTGRESQL)
            pytest.skip(INSTALL_POSTGRESQL)
        self.dir = Path(tempfile.mkdtemp(prefix="relay-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.dir, "postgres")
        self.names = itertools.count(1)
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def run(self, *args: str) -> None:
        subprocess.run([*self.as_user, *args], check=True, capture_output=True, timeout=60)

    def start(self) -> Postgres:
        self.run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync")
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.dir} "
            f"-c fsync={'on' if self.fsync else 'off'} -c shared_buffers=16MB -c max_connections=60 {self.settings}"
        )
        self.options = options
        self.restart()
        return self

    @property
    def pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def stop(self) -> None:
        """Stopped at once, by its pid, like a database that goes away."""
        pid = self.pid
        os.kill(pid, signal.SIGQUIT)
        wait_until(lambda: not _alive(pid), timeout=15)

    def restart(self) -> None:
        log = str(self.dir / "log")
        self.run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", self.options, "-l", log, "-w", "start")

    def new_database(self) -> str:
        name = f"relay_{next(self.names)}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url.rsplit("/", 1)[0] + f"/{name}"

    def close(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="session")
def postgres():
    cluster = Postgres().start()
    yield cluster
    cluster.close()


@pytest.fixture
def database_url(postgres) -> str:
    """A fresh, empty database in the suite's cluster."""
    return postgres.new_database()


@pytest.fixture
def store_kind() -> str:
    """The store the relay under test runs on; `both_stores` tests are run with each."""
    return "json"


def pytest_generate_tests(metafunc):
    marked = metafunc.definition.get_closest_marker
    chosen = any("store_kind" in str(m.args[0]) for m in metafunc.definition.iter_markers("parametrize"))
    if marked("both_stores") and not marked("json_only") and not chosen and "store_kind" in metafunc.fixturenames:
        metafunc.parametrize("store_kind", ["json", "postgresql"])


# ---------------------------------------------------------------------------
# The relay as a real process, talking HTTP
# ---------------------------------------------------------------------------


class RelayProcess:
    started: list[RelayProcess] = []  # every one started, so none outlives its test (see stop_every_relay)

    def __init__(self, workdir: Path, fake: FakeTwilio | None, config: str, dry_run=False, env=None):
        self.workdir = workdir
        self.state_dir = workdir / "state"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "relay.log"
        (workdir / "config.toml").write_text(config)
        self.env = {
            "PATH": os.environ.get("PATH", ""),
            "PORT": str(self.port),
            "RELAY_CONFIG": str(workdir / "config.toml"),
            "RELAY_STATE_DIR": str(self.state_dir),
            "RELAY_PUBLIC_URL": self.url,
            "PYTHONUNBUFFERED": "1",
        }
        if fake is not None:
            self.env |= {"TWILIO_ACCOUNT_SID": ACCOUNT, "TWILIO_AUTH_TOKEN": TOKEN, "TWILIO_API_BASE_URL": fake.url}
        self.env |= env or {}
        self.dry_run = dry_run
        self.proc: subprocess.Popen | None = None
        self.sent = 0

    def command(self, *args: str) -> list[str]:
        return [sys.executable, str(ROOT / "relay.py"), *args]

    def start(self, wait=True) -> RelayProcess:
        args = ["serve", "--dry-run"] if self.dry_run else ["serve"]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(*args), cwd=self.workdir, env=self.env, stdout=log, stderr=log)
        RelayProcess.started.append(self)
        log.close()
        if wait:
            wait_until(self.healthy, timeout=15)
        return self

    def healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"relay exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
        try:
            return self.get("/healthz")[0] == 200
        except OSError:
            return False

    def run(self, *args: str, timeout=20) -> subprocess.CompletedProcess:
        """Run another relay.py command with the same environment."""
        return subprocess.run(
            self.command(*args), cwd=self.workdir, env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def request(self, method: str, path: str, data: bytes | None = None, headers=None) -> tuple[int, str]:
        req = urllib.request.Request(self.url + path, data=data, headers=headers or {}, method=method)
        try:
            with urllib.request.urlopen(req, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def get(self, path: str) -> tuple[int, str]:
        return self.request("GET", path)

    def post_form(self, path: str, params: dict, signature: str | None = None, token=TOKEN) -> tuple[int, str]:
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if signature is None:
            signature = sign(self.url + path, params, token)
        if signature:
            headers["X-Twilio-Signature"] = signature
        return self.request("POST", path, urllib.parse.urlencode(params).encode(), headers)

    def inbound(self, sender: str, body: str, sid: str | None = None, to: str = LINE, **kw) -> tuple[int, str]:
        self.sent += 1
        params = {"MessageSid": sid or msid(f"{self.port}-{self.sent}"), "From": sender, "To": to, "Body": body}
        return self.post_form("/api/sms/inbound", params, **kw)

    def logs(self) -> list[dict]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.startswith("{")]

    def events(self, name: str) -> list[dict]:
        return [r for r in self.logs() if r["event"] == name]

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(autouse=True)
def stop_every_relay():
    """Whatever a test started and did not stop is stopped when it ends, pass or fail."""
    yield
    while RelayProcess.started:
        RelayProcess.started.pop().stop()


@pytest.fixture
def start_relay(tmp_path, fake_twilio, request, store_kind):
    """Start a relay process against the fake Twilio API: start_relay(config_text(...)).

    In the shared behaviour suite (marked `both_stores`) each test runs once on the JSON files and
    once on a fresh PostgreSQL database.
    """
    started = []
    store_env = {"DATABASE_URL": request.getfixturevalue("database_url")} if store_kind == "postgresql" else {}

    def start(config: str, dry_run=False, env=None, fake=fake_twilio, name=None) -> RelayProcess:
        """`name`: a relay of its own (directory, log) beside the first, e.g. a second on one database."""
        workdir = tmp_path / name if name else tmp_path
        workdir.mkdir(exist_ok=True)
        process = RelayProcess(workdir, fake, config, dry_run=dry_run, env=store_env | (env or {})).start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()
