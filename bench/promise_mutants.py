"""Promise-level mutants: bugs a developer would really write, each breaking one promise of the contract.

Random operator mutants (bench/mutate.py) mostly land where tests already look. These are written by
hand, each against one promise seen from outside, with the tests meant to catch it. Each is applied
to a copy of the project and only its tests are run: a mutant they do not fail "survives".

    python bench/promise_mutants.py            # every mutant
    python bench/promise_mutants.py -k carrier # those whose promise mentions "carrier"

A mutant whose text is no longer in relay.py is reported as stale (the code moved: rewrite it).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent


class Mutant(NamedTuple):
    promise: str
    old: str  # exactly once in relay.py
    new: str
    tests: str  # pytest arguments: the tests meant to catch it


MUTANTS = [
    Mutant(
        "the 2 KiB log-line cap counts bytes, not characters",
        "        if len(line.encode()) <= MAX_LOG_LINE:",
        "        if len(line) <= MAX_LOG_LINE:",
        "tests/test_web.py tests/test_faults.py",
    ),
    Mutant(
        "a page's retry honours Twilio's Retry-After",
        "        page.retry_at = now + retry_delay(page.attempts, error.retry_after, jitter)",
        "        page.retry_at = now + retry_delay(page.attempts, None, jitter)",
        "tests/test_delivery.py tests/test_rules.py",
    ),
    Mutant(
        "check refuses missing credentials outside dry-run",
        '        if not self.account_sid or not self.account_sid.startswith("AC"):',
        "        if False:",
        "tests/test_config.py tests/test_dry_run.py",
    ),
    Mutant(
        "setup notices a webhook whose method is GET",
        """            if (record.sms_url or "").split("#")[0] == want and (record.sms_method or "POST") == "POST":""",
        """            if (record.sms_url or "").split("#")[0] == want:""",
        "tests/test_setup.py",
    ),
    Mutant(
        "SIGTERM closes the listening socket during the drain",
        "        server.close()  # no new connections; those open keep being served until answered",
        "        pass",
        "tests/test_faults.py tests/test_end_to_end.py",
    ),
    Mutant(
        "catch-up never reads past catch_up_window",
        "            done = catch_up_pass(relay, max(since, oldest))",
        "            done = catch_up_pass(relay, since)",
        "tests/test_catch_up.py",
    ),
    Mutant(
        "a live edit to catch_up = 0 stops catch-up",
        "    while not stop.is_set() and relay.config.catch_up:",
        "    while not stop.is_set():",
        "tests/test_catch_up.py",
    ),
    Mutant(
        "a contact whose phone is another line's number is refused",
        "            if contact.phone in numbers:",
        "            if contact.phone == line.number:",
        "tests/test_config.py",
    ),
    Mutant(
        "a schema upgrade records its new version",
        '                conn.execute("UPDATE relay_schema SET version = %s", (SCHEMA_VERSION,))',
        "                pass",
        "tests/test_shared_database.py",
    ),
    Mutant(
        "the held-texts bundle goes to the contact on duty",
        "                    duty = next((c for c in line.chain if on_duty(c, line.timezone, now)), line.chain[-1])",
        "                    duty = line.chain[0]",
        "tests/test_cost_caps.py",
    ),
    Mutant(
        "the heartbeat reports trouble to the monitor",
        "        ping(relay.settings.heartbeat_url, trouble)",
        "        ping(relay.settings.heartbeat_url, None)",
        "tests/test_heartbeat.py",
    ),
    Mutant(
        "Twilio refusing the credentials is trouble for the heartbeat",
        "            self.refused = response.status_code",
        "            pass",
        "tests/test_heartbeat.py",
    ),
    Mutant(
        "the heartbeat pings once a period, not in a loop",
        "        stop.wait(max(0.0, began + relay.config.heartbeat_every - time.monotonic()))",
        "        stop.wait(0.1)",
        "tests/test_heartbeat.py",
    ),
    Mutant(
        "setup updates a fallback flow that no longer matches the config",
        "    if shape == wanted_shape:\n        return None",
        "    return None",
        "tests/test_fallback.py",
    ),
    Mutant(
        "each fallback text is reached whether the one before was sent or failed",
        '"transitions": [{"event": "sent", **after}, {"event": "failed", **after}]',
        '"transitions": [{"event": "sent", **after}, {"event": "failed"}]',
        "tests/test_fallback.py",
    ),
    Mutant(
        "setup points SmsFallbackUrl at the flow",
        "        gateway.point_sms_fallback(record.sid, url)\n",
        "        pass\n",
        "tests/test_fallback.py",
    ),
    Mutant(
        "check --live fails a fallback URL asked for by GET",
        """    if record.sms_fallback_url == url and (record.sms_fallback_method or "POST") == "POST":""",
        "    if record.sms_fallback_url == url:",
        "tests/test_fallback.py",
    ),
    Mutant(
        "a text caught up while the fallback flow ran says the crew had it",
        '        return bool(record and STUDIO_WEBHOOK.search(record.sms_fallback_url or ""))',
        "        return bool(record)",
        "tests/test_fallback.py",
    ),
    Mutant(
        "a blocked page calls that contact",
        "        if call_when_blocked and error_code in CARRIER_BLOCK_CODES and call_instead(conv, index, now):",
        "        if False:",
        "tests/test_carriers.py",
    ),
    Mutant(
        "a hanging database round trip is cut on the relay's side",
        "                        sock.shutdown(socket.SHUT_RDWR)",
        "                        pass",
        "tests/test_gray_database.py",
    ),
    Mutant(
        "a frozen relay's session cannot keep rows locked",
        '            f"-c idle_in_transaction_session_timeout={self.IDLE_IN_TRANSACTION_MS}",',
        '            "",',
        "tests/test_gray_database.py",
    ),
    Mutant(
        "a relay never sends a page another relay claimed since",
        '        if page is None or page.state != "pending" or (self.store.LEASE and page.holder != self.id):',
        '        if page is None or page.state != "pending":',
        "tests/test_gray_database.py",
    ),
    Mutant(
        "a step begun after a slow wait for its lock gets all its wait",
        "                    now = self.clock()\n                    deadline, changed = conv.deadline, False",
        "                    deadline, changed = conv.deadline, False",
        "tests/test_gray_database.py",
    ),
    Mutant(
        "a dropped function is created again",
        "            conn.execute(SCHEMA_FUNCTIONS[name])",
        "            pass",
        "tests/test_gray_database.py",
    ),
    Mutant(
        "no character of a database password is shown",
        "    return f\"postgresql://{user}{parts.get('host', 'localhost')}{port}/{parts.get('dbname', '')}\"",
        "    return url",
        "tests/test_gray_database.py tests/test_dry_run.py",
    ),
]


MUTANTS += [
    Mutant(
        "a key press 1 after the conversation was taken does not take it again",
        '            if digits == "1" and conv.is_takeable:',
        '            if digits == "1":',
        "tests/test_calls.py",
    ),
    Mutant(
        "a key press 2 from a caller who no longer holds the step passes nothing on",
        "    if conv.is_open and contact_at(conv, conv.step).phone == contact.phone:",
        "    if conv.is_open:",
        "tests/test_calls.py tests/test_rules.py",
    ),
    Mutant(
        "list names only the conversations paged to the contact who asks",
        "            mine = [c for c in self.store.open_on(line.name) if contact.phone in reached_phones(c)]",
        "            mine = list(self.store.open_on(line.name))",
        "tests/test_calls.py tests/test_unanswered.py",
    ),
    Mutant(
        "after a failed list call the next catch-up pass still reads what it should have read",
        "        if done:\n            since = began - CATCH_UP_OVERLAP",
        "        if True:\n            since = began - CATCH_UP_OVERLAP",
        "tests/test_catch_up.py",
    ),
    Mutant(
        "a catch-up pass reads every page of the list",
        "        for message in self.messages.stream(to=number, date_sent_after=after, page_size=CATCH_UP_PAGE):",
        "        for message in self.messages.stream(to=number, date_sent_after=after, limit=CATCH_UP_PAGE):",
        "tests/test_catch_up.py",
    ),
    Mutant(
        "a new conversation takes its line's time zone for contacts' hours",
        "        timezone=line.timezone,",
        '        timezone="UTC",',
        "tests/test_business_line.py tests/test_rules.py",
    ),
    Mutant(
        "a contact's reply found only by catch-up that matched nothing gets its answer by SMS",
        "                confirm = said if received_at is not None and contact is not None else None",
        "                confirm = None",
        "tests/test_catch_up.py",
    ),
    Mutant(
        "import-state brings the archive's texts, so a late retry of one pages nobody",
        '    for path in sorted(directory.glob("archive-*.jsonl")):',
        '    for path in sorted(directory.glob("archive-*.none")):',
        "tests/test_shared_database.py",
    ),
    Mutant(
        "on PostgreSQL, a retry of a contact's unmatched reply gets the same answer again",
        '        self._q("UPDATE relay_messages SET answer = %s WHERE sid = %s", (answer, sid))',
        "        pass",
        "tests/test_shared_database.py tests/test_end_to_end.py tests/test_unanswered.py",
    ),
]


def run(mutant: Mutant, source: str, workdir: Path) -> str:
    if source.count(mutant.old) != 1:
        return "stale"
    (workdir / "relay.py").write_text(source.replace(mutant.old, mutant.new))
    args = [sys.executable, "-m", "pytest", "-q", "-x", "-n", "4", "-p", "no:cacheprovider", *mutant.tests.split()]
    result = subprocess.run(args, cwd=workdir, capture_output=True, text=True, timeout=900)
    return "killed" if result.returncode != 0 else "survived"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-k", default="", help="only mutants whose promise holds this text")
    parser.add_argument("--first", type=int, default=0, help="skip the mutants before this index (from 0)")
    args = parser.parse_args()
    source = (ROOT / "relay.py").read_text()
    workdir = Path(tempfile.mkdtemp(prefix="relay-promise-")) / "main"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:
        (workdir / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, workdir / name)
    if (ROOT / ".prism").exists():
        (workdir / ".prism").symlink_to(ROOT / ".prism")
    chosen = [m for m in MUTANTS[args.first :] if args.k in m.promise]
    outcomes: dict[str, int] = {}
    began = time.monotonic()
    for mutant in chosen:
        outcome = run(mutant, source, workdir)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        print(f"{outcome:8} {mutant.promise}", flush=True)
    killed = outcomes.get("killed", 0)
    print(f"{killed} of {len(chosen)} killed; {outcomes} in {time.monotonic() - began:.0f}s")
    shutil.rmtree(workdir.parent, ignore_errors=True)
    return 0 if killed == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
