"""Promise-level mutants: bugs a developer would really write, each breaking one promise of the contract.

Random operator mutants (mutmut, see docs/testing.md) mostly land where tests already look. These are
written by hand, each against one bullet of ../shared/CONTRACT.md seen from outside, with the tests
meant to catch it. Each is applied to a copy of the project and only its tests are run: a mutant
they do not fail "survives".

    python bench/promise_mutants.py              # every mutant (about an hour), after a baseline run
    python bench/promise_mutants.py -k carrier   # those whose bullet or promise mentions "carrier"
    python bench/promise_mutants.py --coverage   # each contract bullet and how many mutants break it
    python bench/promise_mutants.py --table R... # the audit table of docs/testing.md from results files

A mutant whose text is no longer in its file is reported as stale (the code moved: rewrite it).
Results go to bench/results/promise-DATE.jsonl.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

# The contract's promises, section by section, in CONTRACT.md's order: each must be broken by at least one mutant.
BULLETS = {
    "Commands: serve": "serve exits non-zero with a one-line reason (bad config, another relay on the state)",
    "Commands: dry-run": "dry-run sends nothing, logs and appends each text to outbox.jsonl; signatures checked",
    "Commands: send": "send posts a correctly signed text and prints the status and TwiML",
    "Commands: check": "check validates config and environment and exits 0 or 1",
    "Commands: status": "status lists open conversations: who was paged when, the next escalation",
    "Commands: setup": "setup shows or sets each number's webhook; check --live asks without changing",
    "Commands: import-state": "import-state copies a JSON state directory into the database, twice changes nothing",
    "Commands: oncall": "oncall [--at] says who is on call, until when, and the next handoffs",
    "Commands: override": "override makes, lists and deletes overrides, printing each ID first",
    "Commands: login-link": "login-link prints a one-time sign-in URL; exits 1 for a phone on no line",
    "Commands: --help": "every command's --help explains every flag",
    "Environment: TWILIO_ACCOUNT_SID": "required outside dry-run",
    "Environment: TWILIO_API_KEY": "an API key and secret are preferred for REST calls",
    "Environment: RELAY_PUBLIC_URL": "signatures and callbacks use it; it wins over public_url",
    "Environment: RELAY_CONFIG": "the config's path",
    "Environment: RELAY_STATE_DIR": "the state's path",
    "Environment: TWILIO_API_BASE_URL": "every Twilio REST host maps to it, path unchanged",
    "Environment: PORT": "the listen port",
    "Environment: .env": ".env is loaded without overriding; one readable by others is refused",
    "Config: durations": "durations are seconds or strings like 90s, 5m, 1h",
    "Config: phones": "phones are E.164",
    "Config: a line's own number": "a contact equal to any line's own number is refused",
    "Config: one phone twice": "one phone twice in a chain or a rotation is refused",
    "Config: unknown key": "an unknown key is refused, a misspelt one with the right one suggested",
    "Config: public URL": "a public URL that is not absolute http(s) is refused",
    "Config: placeholders": "credentials holding .env.example's placeholders are refused",
    "Config: line timezone": "a line's own time zone is used for its hours",
    "Config: live edits": "edits are picked up while running; an invalid one keeps the last good config",
    "HTTP: signature": "a missing or wrong X-Twilio-Signature gives 403 and changes nothing",
    "HTTP: required fields": "MessageSid, From and To are required (400)",
    "HTTP: status callback": "the status callback is signed like the webhook",
    "HTTP: healthz": "200 when the sweep is alive and the state writable, else 503 with the reason",
    "HTTP: metrics": "Prometheus text format",
    "HTTP: 413": "bodies over 64 KiB get 413",
    "HTTP: non-ASCII": "non-ASCII and emoji text is relayed intact",
    "Behaviour 1: dedup": "stored before the 200; the same MessageSid again changes and sends nothing",
    "Behaviour 2: relayed text": "the page names the line, the code, the sender and the body",
    "Behaviour 2: codes": "codes are unique among the line's open conversations and never run out",
    "Behaviour 2: 1,600 characters": "a page is never over 1,600 characters",
    "Behaviour 3: wait from the step's start": "a step's wait counts from its first attempt",
    "Behaviour 3: repeat": "after the last contact the chain starts over repeat times",
    "Behaviour 3: unanswered": "then it is unanswered: logged as an error and reported to alarm_phone",
    "Behaviour 3: pass at the last step": "a contact who passes the last step is told so",
    "Behaviour 4: failed delivery": "a permanent error or a failed/undelivered callback moves on at once",
    "Behaviour 4: transient errors": "429, 5xx and timeouts are retried with backoff, honouring Retry-After",
    "Behaviour 5: reply acknowledges": "a reply acknowledges the conversation its code names, else the newest paged",
    "Behaviour 5: logs": "every acknowledgement logs acknowledged with contact and way",
    "Behaviour 5: keywords": "STOP/HELP-style keywords are not acknowledgements",
    "Behaviour 6: follow-ups": "further texts join the open conversation and reach the contacts already paged",
    "Behaviour 7: no line": "a text to no configured line gets empty TwiML and a warning",
    "State: atomic files": "files written atomically (temp, fsync, rename)",
    "State: modes": "files 0600, directories 0700",
    "State: SIGKILL": "a page the store records as sent is never sent again",
    "State: retention": "finished conversations are pruned after retention",
    "Calls: placing": "a call step places a call from the line's number",
    "Calls: content": "the call says the line, the sender's number and the text",
    "Calls: prompt twice": "the prompt is said once more if nothing is pressed",
    "Calls: keys": "1 acknowledges while open; 2 passes only for the contact holding the step",
    "Calls: other keys": "any other key, or none, repeats the prompt once",
    "Calls: not taken": "no-answer, busy, failed, canceled, a machine or an end without a key moves on",
    "Calls: sms+call": "on sms+call one failed channel moves on only when the other failed too",
    "Calls: ringing ended": "once acknowledged, a call still ringing is ended",
    "Calls: pass word": "pass / no / can't (any apostrophe) passes",
    "Calls: list": "list / ? answers one line per open conversation paged to that contact",
    "Calls: bare codes": "a bare code counts only if all digits; a reply word wins over a letter code",
    "Calls: call cap": "calls have their own hourly cap",
    "Faults 1: caps defer": "a text held by a cap is sent as soon as the cap allows",
    "Faults 1: bundle": "the contact on duty gets a bundle at most every 10 minutes",
    "Faults 1: alarms never held": "alarm texts and bundles are never held",
    "Faults 1: no starvation": "a flood from a few numbers cannot starve other customers",
    "Faults 1: two-way never cut off": "a live two-way conversation is never cut off by the sender cap",
    "Faults 2: idle connections": "an idle connection is closed after at most 30 s",
    "Faults 3: storage heals": "a failed write answers 503; the relay heals within 5 s",
    "Faults 3: damaged files": "a damaged file is moved aside, logged, reported; the rest runs on",
    "Faults 4: REST deadline": "every REST call has a total deadline",
    "Faults 4: 2xx counts as sent": "a 2xx with an odd body counts as sent",
    "Faults 5: wall clock": "a step of the wall clock neither delays nor hastens escalation",
    "Faults 6: acknowledged means nobody else": "no page not yet with Twilio is sent; those with it get the taken-by text",
    "Faults 7: MessageSid form": "every MessageSid is remembered; one not of Twilio's form gets 400",
    "Faults 8: health checks harmless": "a GET writes nothing lasting",
    "Faults 9: SIGTERM drains": "stop accepting, answer what was read, hand back sends, exit 0",
    "Faults 10: log lines": "no log line over 2 KiB; URLs without passwords or query",
    "Faults 10: memory": "memory follows what is open",
    "Catch-up: every catch_up": "at start and every catch_up; 0 turns it off",
    "Catch-up: not in dry-run": "never in dry-run",
    "Catch-up: window": "nothing older than catch_up_window is ever caught up",
    "Catch-up: reads back": "each pass reads back to a little before the previous began, every page of the list",
    "Catch-up: only inbound": "only inbound texts to the line are handled",
    "Catch-up: media": "photos are passed on as Twilio's media URLs",
    "Catch-up: logged and counted": "logged inbound_caught_up and counted as caught_up",
    "Catch-up: page says how long ago": "the page says how long ago the text arrived",
    "Catch-up: replies by SMS": "a contact's reply caught up gets its confirmation by SMS",
    "Catch-up: failures": "a failed list call is logged and what it missed is read at the next pass",
    "Database: schema": "tables created and versioned, an older schema upgraded, a newer one refused",
    "Database: many relays": "a retry to any relay gets the same TwiML; each step taken by one relay",
    "Database: clock": "deadlines are taken from the database's clock",
    "Database: unreachable at start": "serve logs one line, answers 503, carries on once it is there",
    "Database gray: deadlines": "every round trip has a deadline on the relay's side",
    "Database gray: frozen relay": "a frozen relay's sessions cannot keep rows locked",
    "Database gray: steps after locks": "a step never begins with its deadline past",
    "Database gray: lapsed claims": "a relay whose claim has lapsed never sends that page",
    "Database gray: connections": "each relay opens at most database_connections",
    "Database gray: damaged schema": "missing functions are recreated; a missing table is named",
    "Database gray: password": "a password never appears in any output",
    "Database gray: slow writes": "with writes at 300 ms nothing lost, nothing resent but in flight, backups on time",
    "Database: status reads it": "status reads the database",
    "Schedules: turns": "members[k mod n]; whole days hand off at the local clock time",
    "Schedules: rotation step": "a rotation step pages whoever is on shift; the conversation keeps whom",
    "Schedules: take refused": "take from a contact in none of the rotations is refused",
    "Schedules: take notice": "the member replaced is told by SMS",
    "Schedules: TIME": "TIME is local to the rotation's zone, or ISO 8601 with an offset",
    "Schedules: overrides are state": "overrides survive restarts and are shared on one database",
    "Schedules: overrides end": "overrides end by themselves",
    "Schedules: reminders": "one reminder per shift naming start and end, never twice",
    "Schedules: oncall": "check and oncall say who is on call now and until when",
    "Console: off": "console = false: / answers 404",
    "Console: sign-in": "only a crew phone is texted a code; others get the same page",
    "Console: code valid 10 minutes": "a code is valid 10 minutes",
    "Console: code single use": "a code works once",
    "Console: rate limits": "3 codes per phone and 10 per client address an hour",
    "Console: wrong tries": "5 wrong tries void the code",
    "Console: session cookie": "HttpOnly, SameSite=Lax, Secure on https",
    "Console: session expiry": "a session ends after 12 hours without use",
    "Console: sign-out": "sign-out ends the session",
    "Console: form token": "a POST without the session's form token gets 403",
    "Console: origin": "a POST from another site gets 403",
    "Console: headers": "CSP, X-Frame-Options and Referrer-Policy are sent",
    "Console: escaping": "every text from outside is escaped",
    "Console: overview": "on call, open conversations, health; refreshes at least every 15 s",
    "Console: take": "Take acknowledges and logs acknowledged with way console",
    "Console: close": "Close ends it without paging anyone",
    "Console: reply": "Reply texts the customer, on a two-way line",
    "Console: act only as a contact": "only a contact of the line acts on its conversations",
    "Console: history": "history is searchable by number or words",
    "Console: history CSV": "a CSV download of the same rows",
    "Console: schedule": "the schedule page adds and deletes overrides",
    "Console: phone width": "nothing scrolls sideways 390 CSS px wide",
    "Heartbeat: ping while healthy": "GET the URL every heartbeat_every while healthy",
    "Heartbeat: fail with the reason": "POST URL/fail with the reason when not",
    "Heartbeat: once a period": "a failed ping is not retried in a loop",
    "Fallback: flow": "one Send Message per phone, each reached on sent and failed",
    "Fallback: SmsFallbackUrl": "setup --apply points SmsFallbackUrl at the flow",
    "Fallback: check --live": "check --live exits 1 when the flow or fallback URL does not match",
    "Fallback: fallback = false": "fallback = false installs nothing",
    "Fallback: mark": "a text caught up while the flow ran says the crew had it",
    "Carriers: check --live": "check --live names the registration state, exits 1 unless carried",
    "Carriers: a blocked page becomes a call": "with call_when_blocked, a blocked page calls that contact",
    "Carriers: run time": "carrier_blocked logged and counted; healthz names it; the alarm goes by call",
    "Logs: bodies": "message bodies are not logged unless log_bodies",
    "Logs: secrets": "secrets never appear",
}


class Mutant(NamedTuple):
    bullet: str  # a key of BULLETS
    promise: str
    old: str  # exactly once in `path`
    new: str
    tests: str  # pytest arguments: the tests meant to catch it
    path: str = "relay.py"


MUTANTS = [
    Mutant(
        "Faults 10: log lines",
        "the 2 KiB log-line cap counts bytes, not characters",
        "        if len(line.encode()) <= MAX_LOG_LINE:",
        "        if len(line) <= MAX_LOG_LINE:",
        "tests/test_web.py tests/test_faults.py",
    ),
    Mutant(
        "Behaviour 4: transient errors",
        "a page's retry honours Twilio's Retry-After",
        "        page.retry_at = now + retry_delay(page.attempts, error.retry_after, jitter)",
        "        page.retry_at = now + retry_delay(page.attempts, None, jitter)",
        "tests/test_delivery.py tests/test_rules.py",
    ),
    Mutant(
        "Commands: check",
        "check refuses missing credentials outside dry-run",
        '        if not self.account_sid or not self.account_sid.startswith("AC"):',
        "        if False:",
        "tests/test_config.py tests/test_dry_run.py",
    ),
    Mutant(
        "Commands: setup",
        "setup notices a webhook whose method is GET",
        """            if (record.sms_url or "").split("#")[0] == want and (record.sms_method or "POST") == "POST":""",
        """            if (record.sms_url or "").split("#")[0] == want:""",
        "tests/test_setup.py",
    ),
    Mutant(
        "Faults 9: SIGTERM drains",
        "SIGTERM closes the listening socket during the drain",
        "        server.close()  # no new connections; those open keep being served until answered",
        "        pass",
        "tests/test_faults.py tests/test_end_to_end.py",
    ),
    Mutant(
        "Catch-up: window",
        "catch-up never reads past catch_up_window",
        "            done = catch_up_pass(relay, max(since, oldest))",
        "            done = catch_up_pass(relay, since)",
        "tests/test_catch_up.py",
    ),
    Mutant(
        "Catch-up: every catch_up",
        "a live edit to catch_up = 0 stops catch-up",
        "    while not stop.is_set() and relay.config.catch_up:",
        "    while not stop.is_set():",
        "tests/test_catch_up.py",
    ),
    Mutant(
        "Config: a line's own number",
        "a contact whose phone is another line's number is refused",
        "            if contact.phone in numbers:",
        "            if contact.phone == line.number:",
        "tests/test_config.py",
    ),
    Mutant(
        "Database: schema",
        "a schema upgrade records its new version",
        '                conn.execute("UPDATE relay_schema SET version = %s", (SCHEMA_VERSION,))',
        "                pass",
        "tests/test_shared_database.py",
    ),
    Mutant(
        "Faults 1: bundle",
        "the held-texts bundle goes to the contact on duty",
        "                    duty = first_on_duty(line, self.relay.roster, now)",
        "                    duty = on_call(line.chain[0], self.relay.roster, now)",
        "tests/test_cost_caps.py",
    ),
    Mutant(
        "Heartbeat: fail with the reason",
        "the heartbeat reports trouble to the monitor",
        "        ping(relay.settings.heartbeat_url, trouble)",
        "        ping(relay.settings.heartbeat_url, None)",
        "tests/test_heartbeat.py",
    ),
    Mutant(
        "Heartbeat: fail with the reason",
        "Twilio refusing the credentials is trouble for the heartbeat",
        "            self.refused = response.status_code",
        "            pass",
        "tests/test_heartbeat.py",
    ),
    Mutant(
        "Heartbeat: once a period",
        "the heartbeat pings once a period, not in a loop",
        "        stop.wait(max(0.0, began + relay.config.heartbeat_every - time.monotonic()))",
        "        stop.wait(0.1)",
        "tests/test_heartbeat.py",
    ),
    Mutant(
        "Fallback: flow",
        "setup updates a fallback flow that no longer matches the config",
        "    if shape == wanted_shape:\n        return None",
        "    return None",
        "tests/test_fallback.py",
    ),
    Mutant(
        "Fallback: flow",
        "each fallback text is reached whether the one before was sent or failed",
        '"transitions": [{"event": "sent", **after}, {"event": "failed", **after}]',
        '"transitions": [{"event": "sent", **after}, {"event": "failed"}]',
        "tests/test_fallback.py",
    ),
    Mutant(
        "Fallback: SmsFallbackUrl",
        "setup points SmsFallbackUrl at the flow",
        "        gateway.point_sms_fallback(record.sid, url)\n",
        "        pass\n",
        "tests/test_fallback.py",
    ),
    Mutant(
        "Fallback: check --live",
        "check --live fails a fallback URL asked for by GET",
        """    if record.sms_fallback_url == url and (record.sms_fallback_method or "POST") == "POST":""",
        "    if record.sms_fallback_url == url:",
        "tests/test_fallback.py",
    ),
    Mutant(
        "Fallback: mark",
        "a text caught up while the fallback flow ran says the crew had it",
        '        return bool(record and STUDIO_WEBHOOK.search(record.sms_fallback_url or ""))',
        "        return bool(record)",
        "tests/test_fallback.py",
    ),
    Mutant(
        "Carriers: a blocked page becomes a call",
        "a blocked page calls that contact",
        "        if call_when_blocked and error_code in CARRIER_BLOCK_CODES and call_instead(conv, index, now):",
        "        if False:",
        "tests/test_carriers.py",
    ),
    Mutant(
        "Database gray: deadlines",
        "a hanging database round trip is cut on the relay's side",
        "                        sock.shutdown(socket.SHUT_RDWR)",
        "                        pass",
        "tests/test_gray_database.py",
    ),
    Mutant(
        "Database gray: frozen relay",
        "a frozen relay's session cannot keep rows locked",
        '            f"-c idle_in_transaction_session_timeout={self.IDLE_IN_TRANSACTION_MS}",',
        '            "",',
        "tests/test_gray_database.py",
    ),
    Mutant(
        "Database gray: lapsed claims",
        "a relay never sends a page another relay claimed since",
        '        if page is None or page.state != "pending" or not self.store.claimed_by(page, self.relay.id):',
        '        if page is None or page.state != "pending":',
        "tests/test_gray_database.py",
    ),
    Mutant(
        "Database gray: slow writes",
        "takes of one cap are not queued behind another take's slow write",
        """            INSERT INTO relay_cap_uses (key, at) VALUES (cap, at_time);
            PERFORM pg_advisory_xact_lock(hashtext(cap));""",
        """            PERFORM pg_advisory_xact_lock(hashtext(cap));
            INSERT INTO relay_cap_uses (key, at) VALUES (cap, at_time);""",
        "tests/test_shared_database.py::test_a_take_of_a_cap_is_not_held_up_by_another_takes_slow_write",
    ),
    Mutant(
        "Database gray: slow writes",
        "takes of one cap racing on a slow database allow exactly its limit",
        """            INSERT INTO relay_cap_uses (key, at) VALUES (cap, at_time);
            PERFORM pg_advisory_xact_lock(hashtext(cap));""",
        """            INSERT INTO relay_cap_uses (key, at) VALUES (cap, at_time);""",
        "tests/test_shared_database.py::test_takes_of_one_cap_racing_on_a_slow_database_allow_exactly_its_limit",
    ),
    Mutant(
        "Database gray: lapsed claims",
        "a claim that lapsed while the page was counted is looked at again before Twilio",
        "        if page is not None and not self.store.claimed_by(page, self.relay.id, self.clock()):\n"
        "            conv = self.store.change(",
        "        if False:\n            conv = self.store.change(",
        "tests/test_gray_database.py::test_a_page_whose_claim_lapsed_while_it_was_counted_and_another_relay_took_is_never_sent",
    ),
    Mutant(
        "Database gray: steps after locks",
        "a step begun after a slow wait for its lock gets all its wait",
        "                    now = self.clock()\n                    deadline, changed = conv.deadline, False",
        "                    deadline, changed = conv.deadline, False",
        "tests/test_gray_database.py",
    ),
    Mutant(
        "Database gray: damaged schema",
        "a dropped function is created again",
        "            conn.execute(SCHEMA_FUNCTIONS[name])",
        "            pass",
        "tests/test_gray_database.py",
    ),
    Mutant(
        "Database gray: password",
        "no character of a database password is shown",
        "    return f\"postgresql://{user}{parts.get('host', 'localhost')}{port}/{parts.get('dbname', '')}\"",
        "    return url",
        "tests/test_gray_database.py tests/test_dry_run.py",
    ),
]


MUTANTS += [
    Mutant(
        "Calls: keys",
        "a key press 1 after the conversation was taken does not take it again",
        '            if digits == "1" and conv.is_takeable:',
        '            if digits == "1":',
        "tests/test_calls.py",
    ),
    Mutant(
        "Calls: keys",
        "a key press 2 from a caller who no longer holds the step passes nothing on",
        "    if conv.is_open and contact_at(conv, conv.step).phone == contact.phone:",
        "    if conv.is_open:",
        "tests/test_calls.py tests/test_rules.py",
    ),
    Mutant(
        "Calls: list",
        "list names only the conversations paged to the contact who asks",
        "            mine = [c for c in self.store.open_on(line.name) if contact.phone in reached_phones(c)]",
        "            mine = list(self.store.open_on(line.name))",
        "tests/test_calls.py tests/test_unanswered.py",
    ),
    Mutant(
        "Catch-up: failures",
        "after a failed list call the next catch-up pass still reads what it should have read",
        "        if done:\n            since = began - CATCH_UP_OVERLAP",
        "        if True:\n            since = began - CATCH_UP_OVERLAP",
        "tests/test_catch_up.py",
    ),
    Mutant(
        "Catch-up: reads back",
        "a catch-up pass reads every page of the list",
        "        for message in self.messages.stream(to=number, date_sent_after=after, page_size=CATCH_UP_PAGE):",
        "        for message in self.messages.stream(to=number, date_sent_after=after, limit=CATCH_UP_PAGE):",
        "tests/test_catch_up.py",
    ),
    Mutant(
        "Config: line timezone",
        "a new conversation takes its line's time zone for contacts' hours",
        "        timezone=line.timezone,",
        '        timezone="UTC",',
        "tests/test_business_line.py tests/test_rules.py",
    ),
    Mutant(
        "Catch-up: replies by SMS",
        "a contact's reply found only by catch-up that matched nothing gets its answer by SMS",
        "                confirm = said if received_at is not None and contact is not None else None",
        "                confirm = None",
        "tests/test_catch_up.py",
    ),
    Mutant(
        "Commands: import-state",
        "import-state brings the archive's texts, so a late retry of one pages nobody",
        '        return sorted(self.dir.glob("archive-*.jsonl"), reverse=newest_first)',
        '        return sorted(self.dir.glob("archive-*.none"), reverse=newest_first)',
        "tests/test_shared_database.py",
    ),
    Mutant(
        "Database: many relays",
        "on PostgreSQL, a retry of a contact's unmatched reply gets the same answer again",
        '        self.db.q("UPDATE relay_messages SET answer = %s WHERE sid = %s", (answer, sid))',
        "        pass",
        "tests/test_shared_database.py tests/test_end_to_end.py tests/test_unanswered.py",
    ),
]


MUTANTS += [
    Mutant(
        "Commands: serve",
        "serve refuses a second relay on the same state directory",
        '            raise StateLocked(f"{self.path}: another relay is running on this state directory") from None',
        "            pass",
        "tests/test_end_to_end.py tests/test_store.py",
    ),
    Mutant(
        "Commands: serve",
        "serve refuses an invalid config in one line instead of starting",
        '            raise ConfigError(f"{_at(where, key)}: missing (a rotation needs name, timezone, start, shift, members)")',
        "            raise KeyError(key)",
        "tests/test_rotations.py tests/test_config.py",
    ),
    Mutant(
        "Commands: dry-run",
        "dry-run appends each outbound text to outbox.jsonl",
        '        append_durably(self.outbox, (json.dumps(record, ensure_ascii=False) + "\\n").encode())',
        "        pass",
        "tests/test_dry_run.py",
    ),
    Mutant(
        "Commands: dry-run",
        "dry-run still checks signatures",
        "        if not RequestValidator(relay.settings.signing_token).validate(url, params, signature, algorithm):",
        "        if not relay.settings.dry_run and not RequestValidator(relay.settings.signing_token).validate(url, params, signature, algorithm):",
        "tests/test_dry_run.py tests/test_web.py",
    ),
    Mutant(
        "Commands: send",
        "send signs for the public URL when one is set",
        '    signed_url = (public_url + parts.path + (f"?{parts.query}" if parts.query else "")) if public_url else url',
        "    signed_url = url",
        "tests/test_dry_run.py",
    ),
    Mutant(
        "Commands: send",
        "send exits non-zero when the relay does not answer 200",
        "    return 0 if status == 200 else 1\n\n\ndef cmd_press",
        "    return 0\n\n\ndef cmd_press",
        "tests/test_dry_run.py",
    ),
    Mutant(
        "Commands: check",
        "check exits 1 when the database does not connect",
        '        print(f"database: cannot connect: {first_line(e)}")\n        return False',
        '        print(f"database: cannot connect: {first_line(e)}")\n        return True',
        "tests/test_dry_run.py tests/test_shared_database.py",
    ),
    Mutant(
        "Commands: status",
        "status lists open conversations with the next step and when",
        '            f"step {conv.step + 1} since {when(conv.step_started)}; next: {nxt} at {when(conv.deadline)}"',
        '            f"step {conv.step + 1} since {when(conv.step_started)}"',
        "tests/test_dry_run.py tests/test_end_to_end.py tests/test_unanswered.py",
    ),
    Mutant(
        "Commands: status",
        "status lists unanswered conversations until someone takes them",
        "        if conv.status == UNANSWERED_STATUS:\n            print(",
        "        if conv.status == UNANSWERED_STATUS:\n            continue\n            print(",
        "tests/test_unanswered.py",
    ),
    Mutant(
        "Commands: setup",
        "setup --apply points a wrong webhook at the relay",
        "                gateway.point_sms_webhook(record.sid, want)\n",
        "                pass\n",
        "tests/test_setup.py",
    ),
    Mutant(
        "Commands: setup",
        "check --live exits 1 when the webhook is elsewhere",
        '                    "run `python relay.py setup --apply` to point them at it."\n                )\n                all_well = False',
        '                    "run `python relay.py setup --apply` to point them at it."\n                )',
        "tests/test_setup.py",
    ),
    Mutant(
        "Commands: import-state",
        "import-state run twice changes nothing",
        "        if override.id not in known:",
        "        if True:",
        "tests/test_shared_database.py tests/test_rotations.py",
    ),
    Mutant(
        "Commands: oncall",
        "oncall --at answers for that time, not now",
        '    at = functools.partial(parse_when, args.at, flag="--at") if args.at else lambda timezone: now',
        "    at = lambda timezone: now  # noqa: E731",
        "tests/test_rotations.py",
    ),
    Mutant(
        "Commands: override",
        "override refuses an end before its start",
        '    if end <= max(start, now):\n        raise ConfigError("--until: must be after --from and after now")',
        "    if False:\n        pass",
        "tests/test_rotations.py",
    ),
    Mutant(
        "Commands: override",
        "override --delete removes the override",
        "        gone = schedule.delete_override(args.delete, now)",
        "        gone = next((o for o in schedule.overrides(now) if o.id == args.delete), None)",
        "tests/test_rotations.py",
    ),
    Mutant(
        "Commands: login-link",
        "login-link refuses a phone on no line",
        '    found = crew_member(config, phone)\n    if found is None:\n        raise ConfigError(f"login-link:',
        '    found = crew_member(config, phone) or (config.lines[0], config.lines[0].chain[0])\n    if found is None:\n        raise ConfigError(f"login-link:',
        "tests/test_console.py",
    ),
    Mutant(
        "Commands: login-link",
        "a login link works once",
        '            self.store.keep_console_record(key, None, now)\n            found = crew_member(self.relay.config, record["phone"])',
        '            found = crew_member(self.relay.config, record["phone"])',
        "tests/test_console.py",
    ),
    Mutant(
        "Environment: TWILIO_ACCOUNT_SID",
        "outside dry-run, an account SID that is not an AC... SID is refused",
        '        if not self.account_sid or not self.account_sid.startswith("AC"):\n            raise',
        "        if not self.account_sid:\n            raise",
        "tests/test_config.py",
    ),
    Mutant(
        "Environment: TWILIO_API_KEY",
        "an API key is used for REST calls when set",
        "            self.client = Client(settings.api_key, settings.api_secret, settings.account_sid, http_client=self.http)",
        "            self.client = Client(settings.account_sid, settings.auth_token, http_client=self.http)",
        "tests/test_delivery.py tests/test_config.py",
    ),
    Mutant(
        "Environment: RELAY_PUBLIC_URL",
        "signatures are checked against the public URL",
        '        base = relay.public_url or f"{request.urlparts.scheme}://{request.urlparts.netloc}"\n        url = base',
        '        base = f"{request.urlparts.scheme}://{request.urlparts.netloc}"\n        url = base',
        "tests/test_web.py tests/test_end_to_end.py",
    ),
    Mutant(
        "Environment: RELAY_PUBLIC_URL",
        "RELAY_PUBLIC_URL wins over the config's public_url",
        "        return self.public_url or config.public_url",
        "        return config.public_url or self.public_url",
        "tests/test_config.py tests/test_web.py tests/test_dry_run.py",
    ),
    Mutant(
        "Environment: TWILIO_API_BASE_URL",
        "every Twilio host maps to TWILIO_API_BASE_URL with the path unchanged",
        '            api_base_url=(get("TWILIO_API_BASE_URL") or "https://api.twilio.com").rstrip("/"),',
        '            api_base_url="https://api.twilio.com",',
        "tests/test_delivery.py",
    ),
    Mutant(
        "Environment: PORT",
        "a PORT that is no port number is refused in one line",
        "        if not port.isdigit() or not 0 < int(port) < 65536:",
        "        if not port.isdigit():",
        "tests/test_config.py tests/test_dry_run.py",
    ),
    Mutant(
        "Environment: .env",
        ".env does not override the environment",
        "    dotenv.load_dotenv(path, override=False)",
        "    dotenv.load_dotenv(path, override=True)",
        "tests/test_config.py tests/test_dry_run.py",
    ),
    Mutant(
        "Environment: .env",
        "a .env readable by others is refused",
        "    if path.stat().st_mode & 0o077:",
        "    if path.stat().st_mode & 0o007:",
        "tests/test_config.py",
    ),
    Mutant(
        "Config: durations",
        "durations take strings like 5m",
        "    elif isinstance(value, str) and (m := DURATION.fullmatch(value.strip())) and any(m.groups()):",
        "    elif isinstance(value, str) and (m := DURATION.fullmatch(value.strip())) and all(m.groups()):",
        "tests/test_config.py",
    ),
    Mutant(
        "Config: phones",
        "a phone that is not E.164 is refused",
        "    if not isinstance(value, str) or not E164.fullmatch(value):",
        "    if not isinstance(value, str):",
        "tests/test_config.py",
    ),
    Mutant(
        "Config: one phone twice",
        "a phone twice in a chain is refused",
        '    _refuse_twice((c for c in line.chain if not c.rotation), where, "chain")',
        "    pass",
        "tests/test_config.py",
    ),
    Mutant(
        "Config: unknown key",
        "a misspelt key is refused with the right one suggested",
        "            meant = difflib.get_close_matches(str(key), known, n=1)",
        "            meant = []",
        "tests/test_config.py",
    ),
    Mutant(
        "Config: public URL",
        "a public URL that is not absolute http(s) is refused",
        '    if parts.scheme not in ("http", "https") or not parts.hostname or any(ch.isspace() for ch in value):',
        "    if not parts.hostname:",
        "tests/test_config.py",
    ),
    Mutant(
        "Config: placeholders",
        "credentials holding .env.example's placeholders are refused",
        '            if value and (value.startswith("your_") or PLACEHOLDER_RUN in value.lower()):',
        '            if value and value.startswith("your_"):',
        "tests/test_config.py",
    ),
    Mutant(
        "Config: line timezone",
        "a line's own time zone is used for its hours",
        '    if "timezone" in raw:\n        options["timezone"] = _timezone(raw["timezone"], _at(where, "timezone"))',
        '    if "timezone" in raw:\n        _timezone(raw["timezone"], _at(where, "timezone"))',
        "tests/test_business_line.py tests/test_config.py",
    ),
    Mutant(
        "Config: live edits",
        "an invalid live edit is logged, and the last good config stays",
        '                log("error", "config_rejected", reason=str(e))',
        "                pass",
        "tests/test_delivery.py tests/test_config.py",
    ),
    Mutant(
        "HTTP: signature",
        "a text without a signature gets 403, not its page",
        '        if not signature:\n            return refuse(403, "no_signature", "missing X-Twilio-Signature")',
        '        if not signature:\n            return FormParams(urllib.parse.parse_qsl(raw.decode("utf-8", "replace")))',
        "tests/test_web.py",
    ),
    Mutant(
        "HTTP: signature",
        "a wrong signature gets 403 and changes nothing",
        "        if not RequestValidator(relay.settings.signing_token).validate(url, params, signature, algorithm):",
        "        if not signature:",
        "tests/test_web.py",
    ),
    Mutant(
        "HTTP: required fields",
        "MessageSid, From and To are required (400)",
        '    if missing:\n        raise BadRequest(400, "missing_fields"',
        '    if len(missing) == 3:\n        raise BadRequest(400, "missing_fields"',
        "tests/test_web.py",
    ),
    Mutant(
        "HTTP: status callback",
        "the status callback is signed like the webhook",
        '    @app.post("/api/sms/status")\n    @twilio_webhook',
        '    @app.post("/api/sms/status")\n    @lambda handle: lambda: handle(FormParams(bottle.request.forms.allitems()))',
        "tests/test_web.py tests/test_delivery.py",
    ),
    Mutant(
        "HTTP: healthz",
        "healthz answers 503 with the reason when the sweep stalls",
        "        if problem is None and (stalled := self.clock() - self.sweeper.last_sweep) > SWEEP_STALL:",
        "        if False and (stalled := self.clock() - self.sweeper.last_sweep) > SWEEP_STALL:",
        "tests/test_web.py tests/test_faults.py",
    ),
    Mutant(
        "HTTP: metrics",
        "metrics count inbound texts",
        '            INBOUND.labels(event.removeprefix("inbound_")).inc()',
        "            pass",
        "tests/test_web.py tests/test_end_to_end.py",
    ),
    Mutant(
        "HTTP: 413",
        "a body over 64 KiB gets 413",
        '        if int(length) > MAX_BODY_BYTES:\n            return refuse(413, "too_large", "body over 64 KiB")',
        '        if int(length) > 64 * MAX_BODY_BYTES:\n            return refuse(413, "too_large", "body over 64 KiB")',
        "tests/test_web.py",
    ),
    Mutant(
        "HTTP: non-ASCII",
        "non-ASCII and emoji are relayed intact",
        '        text = raw.decode("utf-8", errors="replace") if is_form else ""',
        '        text = raw.decode("latin-1") if is_form else ""',
        "tests/test_web.py tests/test_end_to_end.py",
    ),
    Mutant(
        "Behaviour 1: dedup",
        "the same MessageSid again sends nothing",
        '                if arrival.answered is not None:\n                    INBOUND.labels("duplicate").inc()',
        '                if False:\n                    INBOUND.labels("duplicate").inc()',
        "tests/test_web.py tests/test_end_to_end.py",
    ),
    Mutant(
        "Behaviour 2: relayed text",
        "the relayed text names the sender",
        '        f"{conv.line} #{conv.code} from {conv.sender}{late}{media}: {bodies}\\nReply #{conv.code} to take it."',
        '        f"{conv.line} #{conv.code}{late}{media}: {bodies}\\nReply #{conv.code} to take it."',
        "tests/test_rules.py tests/test_end_to_end.py",
    ),
    Mutant(
        "Behaviour 2: codes",
        "codes are unique among the line's open conversations",
        "        if str(n) not in used:",
        "        if True:",
        "tests/test_rules.py tests/test_store.py",
    ),
    Mutant(
        "Behaviour 2: 1,600 characters",
        "a relayed text is never over 1,600 characters",
        "    if utf16_len(text) <= limit:\n        return text",
        "    if True:\n        return text",
        "tests/test_rules.py",
    ),
    Mutant(
        "Behaviour 3: wait from the step's start",
        "a step's wait counts from its first attempt, not a send",
        "    conv.step, conv.step_started, conv.deadline = step, now, now + contact.wait",
        "    conv.step, conv.step_started, conv.deadline = step, now, now + contact.wait + 1",
        "tests/test_rules.py tests/test_end_to_end.py",
    ),
    Mutant(
        "Behaviour 3: repeat",
        "after the last contact the chain starts over repeat times",
        "        rounds=config.repeat + 1,",
        "        rounds=1,",
        "tests/test_rules.py tests/test_end_to_end.py",
    ),
    Mutant(
        "Behaviour 3: unanswered",
        "an unanswered chain is reported to alarm_phone",
        "    return conv.alarm_phone or on_call(conv.chain[0], roster, now).phone or",
        "    return on_call(conv.chain[0], roster, now).phone or conv.alarm_phone or",
        "tests/test_rules.py tests/test_unanswered.py",
    ),
    Mutant(
        "Behaviour 3: unanswered",
        "an unanswered chain is logged as an error",
        '            log("error", "unanswered", **conv_ids(conv, sender=conv.sender), **fields)',
        '            log("warning", "unanswered", **conv_ids(conv, sender=conv.sender), **fields)',
        "tests/test_delivery.py tests/test_unanswered.py",
    ),
    Mutant(
        "Behaviour 3: pass at the last step",
        "a contact who passes the last step is told so",
        '        return f"nobody else is left to page: it is listed as unanswered and {told} is told"',
        '        return f"{told} is told"',
        "tests/test_unanswered.py tests/test_calls.py",
    ),
    Mutant(
        "Behaviour 4: failed delivery",
        "a permanent REST error moves to the next contact at once",
        '    page.state = "failed"\n    return delivery_failed(conv, index, now, roster) or "failed"',
        '    page.state = "failed"\n    return "failed"',
        "tests/test_rules.py tests/test_delivery.py",
    ),
    Mutant(
        "Behaviour 4: failed delivery",
        "a callback of undelivered moves on at once",
        '    elif status in ("failed", "undelivered"):\n        page.state, page.error',
        '    elif status == "failed":\n        page.state, page.error',
        "tests/test_rules.py tests/test_delivery.py",
    ),
    Mutant(
        "Behaviour 4: transient errors",
        "HTTP 429 and 5xx are retried, not taken as permanent",
        "    if status is None or status == 429 or status >= 500 or status in ACCOUNT_STATUSES:",
        "    if status is None or status in ACCOUNT_STATUSES:",
        "tests/test_rules.py tests/test_delivery.py",
    ),
    Mutant(
        "Behaviour 5: reply acknowledges",
        "a reply with a code acknowledges that conversation",
        "        named=code is not None and (CODE_IN_TEXT.search(body) is not None or code.isdigit()),",
        "        named=code is not None and code.isdigit(),",
        "tests/test_rules.py tests/test_end_to_end.py",
    ),
    Mutant(
        "Behaviour 5: reply acknowledges",
        "a codeless reply takes the newest paged to that contact",
        "    return max(paged or mine, key=lambda c: c.created, default=None), None",
        "    return min(paged or mine, key=lambda c: c.created, default=None), None",
        "tests/test_rules.py tests/test_end_to_end.py",
    ),
    Mutant(
        "Behaviour 5: logs",
        "every acknowledgement logs contact and way",
        '        return conv, event, conv_ids(conv, contact=contact.name, way="sms" if event == "acknowledged" else None)',
        "        return conv, event, conv_ids(conv, contact=contact.name)",
        "tests/test_unanswered.py tests/test_calls.py",
    ),
    Mutant(
        "Behaviour 5: keywords",
        "STOP and HELP are not acknowledgements",
        '        if reply.keyword:\n            return None, "reply_keyword", fields',
        '        if False:\n            return None, "reply_keyword", fields',
        "tests/test_calls.py tests/test_rules.py",
    ),
    Mutant(
        "Behaviour 6: follow-ups",
        "a further text joins its open conversation and reaches those paged",
        "    phones = reached_phones(conv) if conv.is_open else [conv.acknowledged_phone]",
        "    phones = [conv.acknowledged_phone]",
        "tests/test_rules.py tests/test_end_to_end.py",
    ),
    Mutant(
        "Behaviour 7: no line",
        "a text to no configured line gets empty TwiML and pages nobody",
        '            log("warning", "inbound_no_line", message_sid=sid, to=to)\n            return str(MessagingResponse())',
        '            log("warning", "inbound_no_line", message_sid=sid, to=to)\n            line = config.lines[0]',
        "tests/test_web.py tests/test_end_to_end.py",
    ),
    Mutant(
        "State: atomic files",
        "state files are written atomically with fsync",
        "        os.replace(tmp, path)",
        "        os.rename(tmp, path); tmp.write_bytes(b'')",
        "tests/test_store.py tests/test_faults.py",
    ),
    Mutant(
        "State: modes",
        "state directories are tightened to 0700 at start",
        "        os.chmod(self.path, 0o700)",
        "        pass",
        "tests/test_store.py tests/test_end_to_end.py",
    ),
    Mutant(
        "State: SIGKILL",
        "a page stored as sent is never sent again",
        '    page.state, page.sid, page.error, page.sent_at = "sent", sid, None, now',
        "    page.sid, page.error, page.sent_at = sid, None, now",
        "tests/test_faults.py tests/test_delivery.py",
    ),
    Mutant(
        "State: retention",
        "finished conversations are pruned after retention",
        '        cutoff = time.strftime("%Y-%m-%d", time.gmtime(now - retention - 86400))',
        '        cutoff = "0000-00-00"',
        "tests/test_store.py tests/test_end_to_end.py",
    ),
    Mutant(
        "Calls: placing",
        "a call step places a call from the line's number",
        'CHANNELS = {"sms": ("page",), "call": ("call",), "sms+call": ("page", "call")}',
        'CHANNELS = {"sms": ("page",), "call": ("page",), "sms+call": ("page", "call")}',
        "tests/test_calls.py",
    ),
    Mutant(
        "Calls: content",
        "the call says the sender's number and the text",
        '        said = f"Message on the {conv.line} line from {spoken_number(conv.sender)}. {sentence(text)} {PROMPT}"',
        '        said = f"Message on the {conv.line} line. {PROMPT}"',
        "tests/test_calls.py",
    ),
    Mutant(
        "Calls: prompt twice",
        "the prompt is said once more if nothing is pressed",
        '        ask(response, gather_url, said, f"Again: {PROMPT}")',
        "        ask(response, gather_url, said)",
        "tests/test_calls.py",
    ),
    Mutant(
        "Calls: other keys",
        "any other key repeats the prompt once",
        "                if repeated:  # the call ends without 1 or 2: Twilio's report of it moves the chain on",
        "                if True:",
        "tests/test_calls.py",
    ),
    Mutant(
        "Calls: not taken",
        "an answering machine moves the chain on",
        '    machine = answered_by.startswith("machine_") or answered_by == "fax"',
        '    machine = answered_by == "fax"',
        "tests/test_calls.py tests/test_rules.py",
    ),
    Mutant(
        "Calls: not taken",
        "a call that ends without 1 or 2 moves the chain on",
        '    if machine or status in NOT_TAKEN_STATUSES or status == "completed":',
        "    if machine or status in NOT_TAKEN_STATUSES:",
        "tests/test_calls.py tests/test_rules.py",
    ),
    Mutant(
        "Calls: sms+call",
        "on sms+call, one failed channel alone does not move on",
        "    if all(p.state in FAILED_STATES for p in step_pages):",
        "    if any(p.state in FAILED_STATES for p in step_pages):",
        "tests/test_calls.py tests/test_rules.py",
    ),
    Mutant(
        "Calls: ringing ended",
        "a call still ringing is ended once acknowledged",
        '        if page.kind == "call" and page.state == "sent" and page.to != taker:',
        "        if False:",
        "tests/test_calls.py tests/test_rules.py",
    ),
    Mutant(
        "Calls: pass word",
        "pass with an apostrophe variant passes",
        '    word = text.strip().strip(".!").lower().translate(APOSTROPHES)',
        '    word = text.strip().strip(".!").lower()',
        "tests/test_rules.py tests/test_calls.py",
    ),
    Mutant(
        "Calls: list",
        "list answers one line per open conversation paged to that contact",
        '            answer.message(listing(f"{line.name}: {len(mine)} open for you", mine, holder=True))',
        '            answer.message(f"{line.name}: {len(mine)} open for you")',
        "tests/test_calls.py tests/test_unanswered.py",
    ),
    Mutant(
        "Calls: bare codes",
        "a bare code counts only if it is all digits; a reply word wins",
        '    if word == "list":',
        '    if word == "list" and code_candidate(body) is None:',
        "tests/test_rules.py tests/test_calls.py",
    ),
    Mutant(
        "Calls: call cap",
        "calls have their own hourly cap",
        '            return self.store.take("outbound:calls", self.relay.config.call_hourly_cap, now)',
        '            return self.store.take("outbound:calls", self.relay.config.outbound_hourly_cap, now)',
        "tests/test_calls.py tests/test_cost_caps.py",
    ),
    Mutant(
        "Faults 1: caps defer",
        "a text held by the outbound cap goes out as soon as the cap allows",
        "                    if allowed:\n                        release(conv, index, now)",
        "                    if allowed and False:\n                        release(conv, index, now)",
        "tests/test_cost_caps.py",
    ),
    Mutant(
        "Faults 1: alarms never held",
        "alarm texts and bundles are never held by a cap",
        'NEVER_HELD = {"alarm", "cap_alarm", "bundle", "end_call", "confirmation"}',
        'NEVER_HELD = {"end_call", "confirmation"}',
        "tests/test_cost_caps.py",
    ),
    Mutant(
        "Faults 1: bundle",
        "the bundle goes at most every 10 minutes",
        "BUNDLE_EVERY = 600.0",
        "BUNDLE_EVERY = 0.0",
        "tests/test_cost_caps.py",
    ),
    Mutant(
        "Faults 1: two-way never cut off",
        "a live two-way conversation is never cut off by the sender cap",
        "                    elif conv.is_live_two_way(now) or self.store.take(",
        "                    elif self.store.take(",
        "tests/test_cost_caps.py tests/test_business_line.py",
    ),
    Mutant(
        "Faults 1: no starvation",
        "follow-ups cannot use the whole outbound cap",
        "FOLLOWUP_SHARE = 0.75",
        "FOLLOWUP_SHARE = 1.0",
        "tests/test_cost_caps.py",
    ),
    Mutant(
        "Faults 2: idle connections",
        "an idle connection is closed after at most 30 s",
        "        channel_timeout=IDLE_CONNECTION_SECONDS,",
        "        channel_timeout=300,",
        "tests/test_faults.py",
    ),
    Mutant(
        "Faults 3: storage heals",
        "a failed write answers 503, never 200",
        '            except StoreFailure as e:\n                return refuse(503, "state_unwritable", str(e), message_sid=params.get("MessageSid"))',
        "            except StoreFailure as e:\n                return str(MessagingResponse())",
        "tests/test_faults.py tests/test_store.py",
    ),
    Mutant(
        "Faults 3: damaged files",
        "a damaged file is moved aside and the alarm phone told",
        "                os.replace(path, aside)",
        "                shutil_copy = None",
        "tests/test_faults.py tests/test_store.py",
    ),
    Mutant(
        "Faults 4: REST deadline",
        "every REST call has a total deadline",
        "        watchdog = threading.Timer(REST_DEADLINE, call.cut_off)",
        "        watchdog = threading.Timer(REST_DEADLINE * 100, call.cut_off)",
        "tests/test_delivery.py tests/test_faults.py",
    ),
    Mutant(
        "Faults 4: 2xx counts as sent",
        "a 2xx with an odd body counts as sent",
        "            if 200 <= (RestCall.current.call.status or 0) < 300:",
        "            if False:",
        "tests/test_faults.py tests/test_delivery.py",
    ),
    Mutant(
        "Faults 5: wall clock",
        "a step of the wall clock does not move escalations",
        "    return lambda: wall + (time.monotonic() - mono)",
        "    return time.time",
        "tests/test_faults.py",
    ),
    Mutant(
        "Faults 6: acknowledged means nobody else",
        "a page overtaken by an acknowledgement gets the taken-by text",
        '    if overtaken and conv.status == "acknowledged":',
        "    if False:",
        "tests/test_rules.py tests/test_delivery.py",
    ),
    Mutant(
        "Faults 7: MessageSid form",
        "a MessageSid not of Twilio's form gets 400",
        "    if not MESSAGE_SID.fullmatch(sid):",
        "    if not sid:",
        "tests/test_faults.py tests/test_web.py",
    ),
    Mutant(
        "Faults 8: health checks harmless",
        "a health check writes nothing",
        "        problem = self.store.writable()",
        "        problem = self.store.writable() or self.store.save_stray('SM' + '0' * 32, None, self.clock()) and None",
        "tests/test_web.py tests/test_store.py",
    ),
    Mutant(
        "Faults 9: SIGTERM drains",
        "SIGTERM hands back sends not yet started",
        "    handed_back = relay.outbox.hand_back()",
        "    handed_back = 0",
        "tests/test_faults.py tests/test_shared_database.py",
    ),
    Mutant(
        "Faults 10: log lines",
        "URLs are logged without passwords or query",
        '    host = parts.netloc.rpartition("@")[2]',
        "    host = parts.netloc",
        "tests/test_web.py tests/test_faults.py",
    ),
    Mutant(
        "Faults 10: memory",
        "idle cap keys are forgotten so memory follows what is open",
        "        self.times = {k: t for k, t in self.times.items() if t and t[-1] > now - HOUR}",
        "        pass",
        "tests/test_cost_caps.py tests/test_store.py",
    ),
    Mutant(
        "Catch-up: not in dry-run",
        "catch-up never runs in dry-run",
        "    if not settings.dry_run and config.catch_up:",
        "    if config.catch_up:",
        "tests/test_catch_up.py tests/test_dry_run.py",
    ),
    Mutant(
        "Catch-up: reads back",
        "a pass stops reading at texts older than its start",
        "            if when is not None and when.timestamp() < since:\n                return",
        "            if when is not None and when.timestamp() < since - 86400 * 30:\n                return",
        "tests/test_catch_up.py",
    ),
    Mutant(
        "Catch-up: only inbound",
        "catch-up handles only inbound texts to the line",
        '            if message.direction != "inbound" or message.to != number:',
        "            if False:",
        "tests/test_catch_up.py",
    ),
    Mutant(
        "Catch-up: media",
        "a caught-up photo is passed on as Twilio's media URL",
        '                        f"/Messages/{message.sid}/Media/{item.sid}"',
        '                        f"/Media/{item.sid}"',
        "tests/test_catch_up.py",
    ),
    Mutant(
        "Catch-up: logged and counted",
        "a text caught up is counted as caught_up",
        '            INBOUND.labels("caught_up").inc()',
        "            pass",
        "tests/test_catch_up.py",
    ),
    Mutant(
        "Catch-up: page says how long ago",
        "a caught-up text's page says how long ago it arrived",
        '        late = f" (received {ago(conv.created - conv.received_at)}{also})"',
        '        late = ""',
        "tests/test_catch_up.py tests/test_rules.py",
    ),
    Mutant(
        "Catch-up: failures",
        "a failed list call is logged and tried again",
        "            CATCH_UP_FAILURES.inc()",
        "            raise",
        "tests/test_catch_up.py",
    ),
    Mutant(
        "Database: schema",
        "a newer schema is refused in one line",
        "            if version > SCHEMA_VERSION:\n                raise SchemaRefused(",
        "            if version > SCHEMA_VERSION + 1:\n                raise SchemaRefused(",
        "tests/test_shared_database.py",
    ),
    Mutant(
        "Database: clock",
        "deadlines are taken from the database's clock",
        "        return time.monotonic() + self.offset",
        "        return time.time()",
        "tests/test_shared_database.py",
    ),
    Mutant(
        "Database: unreachable at start",
        "serve with the database unreachable logs one line and carries on",
        '            log("error", "database_unreachable", reason=str(e), detail="answering 503 until it is back")',
        "            raise",
        "tests/test_shared_database.py",
    ),
    Mutant(
        "Database: status reads it",
        "status reads the database",
        "    if settings.database_url:\n        store = reachable_database(settings.database_url)\n    else:\n        store = read_state_while_running(settings.state_dir)",
        "    store = read_state_while_running(settings.state_dir)",
        "tests/test_shared_database.py",
    ),
    Mutant(
        "Schedules: turns",
        "k counts whole shifts since start",
        "        k = int((t - first) // rotation.shift)",
        "        k = int((t - first) // rotation.shift) + 1",
        "tests/test_rotations.py",
    ),
    Mutant(
        "Schedules: overrides end",
        "an override ends by itself",
        "        return self.start <= t < self.end",
        "        return self.start <= t",
        "tests/test_rotations.py",
    ),
    Mutant(
        "Schedules: take refused",
        "take from a contact in no rotation is refused and changes nothing",
        "        theirs = [r for r in line.rotations if r.member(contact.phone)]",
        "        theirs = list(line.rotations)",
        "tests/test_rotations.py",
    ),
    Mutant(
        "Schedules: take notice",
        "the member replaced is told by SMS",
        "            if holder.phone != contact.phone:\n                said.append(",
        "            if holder.phone != contact.phone and False:\n                said.append(",
        "tests/test_rotations.py",
    ),
    Mutant(
        "Schedules: TIME",
        "TIME is taken in the rotation's time zone",
        "    return (when if when.tzinfo else when.replace(tzinfo=zoneinfo.ZoneInfo(timezone))).timestamp()",
        "    return (when if when.tzinfo else when.replace(tzinfo=datetime.UTC)).timestamp()",
        "tests/test_rotations.py",
    ),
    Mutant(
        "Schedules: reminders",
        "a reminder names the start and the end",
        '                    f"and ends {local_time(end, tz)}."',
        '                    "."',
        "tests/test_rotations.py",
    ),
    Mutant(
        "Schedules: oncall",
        "oncall names each rotation's holder until when",
        '            + (f" until {local_time(until, tz)}" if until else ", and nobody else is on the rotation")',
        '            + ""',
        "tests/test_rotations.py",
    ),
    Mutant(
        "Console: off",
        "console = false answers 404 at /",
        "    if relay.config.console:\n        Console(relay).routes(app)",
        "    Console(relay).routes(app)",
        "tests/test_console.py",
    ),
    Mutant(
        "Console: sign-in",
        "only a crew phone is texted a code",
        "        if (found := crew_member(self.relay.config, phone)) is not None:",
        "        if (found := crew_member(self.relay.config, phone) or (self.relay.config.lines[0], None)) is not None and phone:",
        "tests/test_console.py",
    ),
    Mutant(
        "Console: code valid 10 minutes",
        "a sign-in code expires after 10 minutes",
        'record = {"hash": digest(f"{phone} {code}"), "tries": 0, "expires": now + CODE_VALID}',
        'record = {"hash": digest(f"{phone} {code}"), "tries": 0, "expires": now + 100 * CODE_VALID}',
        "tests/test_console.py",
    ),
    Mutant(
        "Console: code single use",
        "a sign-in code works once",
        "            self.store.keep_console_record(key, None, now)  # once only",
        "            pass",
        "tests/test_console.py",
    ),
    Mutant(
        "Console: rate limits",
        "at most 3 codes per phone an hour",
        "CODES_PER_PHONE = 3  # an hour",
        "CODES_PER_PHONE = 30  # an hour",
        "tests/test_console.py",
    ),
    Mutant(
        "Console: rate limits",
        "at most 10 codes per client address an hour",
        "CODES_PER_CLIENT = 10  # an hour",
        "CODES_PER_CLIENT = 100  # an hour",
        "tests/test_console.py",
    ),
    Mutant(
        "Console: rate limits",
        "the client address behind a router is the one appended last",
        '                return forwarded.split(",")[-1].strip()[:64] or peer',
        '                return forwarded.split(",")[0].strip()[:64] or peer',
        "tests/test_console.py",
    ),
    Mutant(
        "Console: wrong tries",
        "5 wrong tries void the code",
        '            voided = record["tries"] >= CODE_TRIES',
        "            voided = False",
        "tests/test_console.py",
    ),
    Mutant(
        "Console: session cookie",
        "the session cookie is HttpOnly",
        '            SESSION_COOKIE, token, path="/", httponly=True,',
        '            SESSION_COOKIE, token, path="/", httponly=False,',
        "tests/test_console.py",
    ),
    Mutant(
        "Console: session cookie",
        "the session cookie is Secure on an https public URL",
        '        secure = (self.relay.public_url or "").startswith("https://")',
        "        secure = False",
        "tests/test_console.py",
    ),
    Mutant(
        "Console: session expiry",
        "a session ends after 12 hours without use",
        "SESSION_IDLE = 12 * 3600.0",
        "SESSION_IDLE = 120 * 3600.0",
        "tests/test_console.py",
    ),
    Mutant(
        "Console: sign-out",
        "sign-out ends the session on the server",
        "            self.store.keep_console_record(self.session()[0], None, self.relay.clock())",
        "            pass",
        "tests/test_console.py tests/test_console_browser.py",
    ),
    Mutant(
        "Console: form token",
        "a POST with another session's form token gets 403",
        '                if form and not hmac.compare_digest(form.get("csrf", ""), session["csrf"]):',
        '                if form and not form.get("csrf"):',
        "tests/test_console.py",
    ),
    Mutant(
        "Console: origin",
        "a POST whose Origin names another site gets 403",
        '        return not origin or origin == "null" or origin == self.own_origin()',
        "        return True",
        "tests/test_console.py",
    ),
    Mutant(
        "Console: headers",
        "console responses send Content-Security-Policy and X-Frame-Options",
        "                for name, value in CONSOLE_HEADERS.items():\n                    bottle.response.set_header(name, value)",
        "                pass",
        "tests/test_console.py",
    ),
    Mutant(
        "Console: overview",
        "the overview lists open conversations",
        "            mine = [c for c in convs if c.line == line.name]",
        "            mine = [c for c in convs if c.line == line.name and c.is_open and False]",
        "tests/test_console.py",
    ),
    Mutant(
        "Console: overview",
        "the overview counts texts held by caps",
        '            "texts held by caps": str(sum(len(held_pages(c)) for c in convs)),',
        '            "texts held by caps": "0",',
        "tests/test_console.py",
    ),
    Mutant(
        "Console: take",
        "Take on the console logs acknowledged with way console",
        '            log("info", "acknowledged", **conv_ids(conv, contact=contact.name, way="console"))',
        "            pass",
        "tests/test_console.py",
    ),
    Mutant(
        "Console: close",
        "Close ends it without paging anyone",
        '                elif action == "close" and conv.is_takeable:\n                    close(conv, now)',
        '                elif action == "close" and conv.is_takeable:\n                    acknowledge(conv, contact, None, now)',
        "tests/test_console.py",
    ),
    Mutant(
        "Console: reply",
        "Reply texts the customer only on a two-way line",
        '                elif action == "reply" and conv.two_way and text.strip():',
        '                elif action == "reply" and text.strip():',
        "tests/test_console.py",
    ),
    Mutant(
        "Console: act only as a contact",
        "someone of another line cannot act on a conversation",
        '            raise bottle.HTTPError(403, "you are no contact of this conversation\'s line")',
        "            contact = Contact(session['name'], session['phone'], 0, None, 'sms', None)",
        "tests/test_console.py",
    ),
    Mutant(
        "Console: history",
        "history searches by number or words",
        '            convs = [c for c in convs if words in c.sender or any(words in m["body"].lower() for m in c.messages)]',
        "            pass",
        "tests/test_console.py",
    ),
    Mutant(
        "Console: history CSV",
        "the CSV keeps a cell from being read as a formula",
        '    return f"\'{text}" if text[:1] in ("=", "+", "-", "@", "\\t", "\\r") else text',
        "    return text",
        "tests/test_console.py",
    ),
    Mutant(
        "Console: schedule",
        "an override from the schedule page is stored",
        "        override = new_override(relay.roster, rotation, member, start, end, now)\n        self.store.add_override(override)",
        "        override = new_override(relay.roster, rotation, member, start, end, now)",
        "tests/test_console.py",
    ),
    Mutant(
        "Heartbeat: ping while healthy",
        "a healthy relay GETs the ping URL",
        "            response = requests.get(url, timeout=HEARTBEAT_TIMEOUT)",
        '            response = requests.post(url, data=b"", timeout=HEARTBEAT_TIMEOUT)',
        "tests/test_heartbeat.py",
    ),
    Mutant(
        "Fallback: flow",
        "the flow texts every phone of the line, rotation members too",
        "    members = [m.phone for rotation in line.rotations for m in rotation.members]",
        "    members = []",
        "tests/test_fallback.py",
    ),
    Mutant(
        "Fallback: fallback = false",
        "with fallback = false setup installs nothing",
        "            if config.fallback:\n                all_well = check_fallback(gateway, line, record, apply) and all_well",
        "            if True:\n                all_well = check_fallback(gateway, line, record, apply) and all_well",
        "tests/test_fallback.py",
    ),
    Mutant(
        "Carriers: check --live",
        "check --live fails a toll-free number not TWILIO_APPROVED",
        '        if status == "TWILIO_APPROVED":',
        "        if status:",
        "tests/test_setup.py tests/test_carriers.py",
    ),
    Mutant(
        "Carriers: check --live",
        "check --live fails a campaign not VERIFIED",
        '    if status == "VERIFIED":',
        "    if status:",
        "tests/test_setup.py tests/test_carriers.py",
    ),
    Mutant(
        "Carriers: check --live",
        "numbers outside +1 are skipped and said so",
        '    if not line.number.startswith("+1"):',
        "    if False:",
        "tests/test_setup.py tests/test_carriers.py",
    ),
    Mutant(
        "Carriers: run time",
        "a blocked page is counted in relay_carrier_blocked_total",
        "            CARRIER_BLOCKED.inc()",
        "            pass",
        "tests/test_carriers.py",
    ),
    Mutant(
        "Carriers: run time",
        "healthz names a carrier block",
        "        if relay.carrier_blocked:  # the relay works; the carriers do not carry its texts",
        "        if False:",
        "tests/test_carriers.py",
    ),
    Mutant(
        "Carriers: run time",
        "from a block on, the alarm goes by call too",
        '        if page.kind == "alarm" and page.attempts == 1 and conv.line in self.relay.carrier_blocked:',
        "        if False:",
        "tests/test_carriers.py",
    ),
    Mutant(
        "Logs: bodies",
        "message bodies stay out of the logs unless log_bodies",
        "        return body if self.config.log_bodies else None",
        "        return body",
        "tests/test_web.py tests/test_end_to_end.py",
    ),
    Mutant(
        "Logs: secrets",
        "a URL's query, which may carry a secret, is not logged",
        '    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))',
        '    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query, ""))',
        "tests/test_faults.py tests/test_web.py",
    ),
    Mutant(
        "Environment: RELAY_CONFIG",
        "RELAY_CONFIG names the config file",
        '            config_path=Path(get("RELAY_CONFIG") or "config.toml"),',
        '            config_path=Path("config.toml"),',
        "tests/test_dry_run.py tests/test_config.py",
    ),
    Mutant(
        "Environment: RELAY_STATE_DIR",
        "RELAY_STATE_DIR names the state directory",
        '            state_dir=Path(get("RELAY_STATE_DIR") or "state"),',
        '            state_dir=Path("state"),',
        "tests/test_dry_run.py tests/test_end_to_end.py",
    ),
    Mutant(
        "Commands: --help",
        "every command's --help explains every flag",
        '    serve.add_argument("--dry-run", action="store_true", help="send nothing; log texts and append to outbox.jsonl")',
        '    serve.add_argument("--dry-run", action="store_true")',
        "tests/test_dry_run.py",
    ),
    Mutant(
        "Database: many relays",
        "each due step is taken by exactly one relay",
        '            "SELECT doc FROM relay_conversations WHERE wake_at <= %s ORDER BY wake_at LIMIT 100 FOR UPDATE SKIP LOCKED",',
        '            "SELECT doc FROM relay_conversations WHERE wake_at <= %s ORDER BY wake_at LIMIT 100",',
        "tests/test_shared_database.py",
    ),
    Mutant(
        "Database gray: connections",
        "a relay opens at most database_connections connections",
        "        self.budget = self.most = max(1, connections - 1)",
        "        self.budget = self.most = max(1, connections + 5)",
        "tests/test_gray_database.py",
    ),
    Mutant(
        "Schedules: rotation step",
        "a conversation keeps the person a rotation's step paged",
        "            conv.shifts[str(step)] = list(member)",
        "            pass",
        "tests/test_rotations.py",
    ),
    Mutant(
        "Schedules: turns",
        "whole-day shifts hand off at the same local clock time across DST",
        "    if rotation.shift % 86400:",
        "    if True:",
        "tests/test_rotations.py",
    ),
    Mutant(
        "Schedules: reminders",
        "a reminder is sent once per shift whatever restarts",
        "            if key in self.reminded:\n                return False",
        "            if False:\n                return False",
        "tests/test_rotations.py",
    ),
    Mutant(
        "Schedules: overrides are state",
        "overrides survive restarts and are shared by every relay on a database",
        '                f"INSERT INTO relay_overrides ({OVERRIDE_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",\n                dataclasses.astuple(override),',
        '                "SELECT %s, %s, %s, %s, %s, %s, %s, %s",\n                dataclasses.astuple(override),',
        "tests/test_rotations.py tests/test_store.py",
    ),
    Mutant(
        "Console: overview",
        "the overview refreshes by itself at least every 15 s",
        "refresh=15)",
        "refresh=0)",
        "tests/test_console.py",
        "views/overview.tpl",
    ),
    Mutant(
        "Console: phone width",
        "nothing scrolls sideways at 390 px, even long words",
        "overflow-wrap: anywhere; ",
        "",
        "tests/test_console_browser.py",
        "views/console.css",
    ),
    Mutant(
        "Console: escaping",
        "every text from outside is escaped",
        "  <blockquote>{{e['text']}}</blockquote>",
        "  <blockquote>{{!e['text']}}</blockquote>",
        "tests/test_console.py",
        "views/conversation.tpl",
    ),
]


def run(mutant: Mutant, workdir: Path) -> str:
    """Apply one mutant to the copy (taken at the start, so the tree can change meanwhile), run its tests."""
    source = (workdir / mutant.path).read_text()
    if source.count(mutant.old) != 1:
        return "stale"
    (workdir / mutant.path).write_text(source.replace(mutant.old, mutant.new))
    try:
        return "killed" if pytest(workdir, mutant.tests.split(), first_failure=True) else "survived"
    finally:
        (workdir / mutant.path).write_text(source)


def pytest(workdir: Path, tests: list[str], first_failure: bool = False) -> bool:
    """True when the tests fail (or hang past 15 minutes)."""
    args = [sys.executable, "-m", "pytest", "-q", "-n", "4", "-p", "no:cacheprovider", *tests]
    try:
        result = subprocess.run(args + ["-x"] * first_failure, cwd=workdir, capture_output=True, timeout=900)
    except subprocess.TimeoutExpired:
        return True
    return result.returncode != 0


def coverage() -> int:
    counts = collections.Counter(m.bullet for m in MUTANTS)
    unknown = sorted(set(counts) - set(BULLETS))
    for bullet, promise in BULLETS.items():
        print(f"{counts[bullet]:3}  {bullet}: {promise}")
    missing = [b for b in BULLETS if not counts[b]]
    print(f"{len(MUTANTS)} mutants over {len(BULLETS) - len(missing)} of {len(BULLETS)} bullets")
    for name in missing:
        print(f"no mutant: {name}")
    for name in unknown:
        print(f"not a bullet: {name}")
    return 1 if missing or unknown else 0


def table(paths: list[Path]) -> int:
    """The audit table, one row per mutant, from results files (a later file's outcome wins)."""
    outcomes = {}
    for path in paths:
        outcomes |= {r["promise"]: r["outcome"] for r in map(json.loads, path.read_text().splitlines())}
    print("| contract bullet | the bug | caught by | outcome |\n| --- | --- | --- | --- |")
    for m in MUTANTS:
        tests = ", ".join(f"`{t.removeprefix('tests/')}`" for t in m.tests.split())
        print(f"| {m.bullet} | {m.promise} | {tests} | {outcomes.get(m.promise, 'not run')} |")
    counts = collections.Counter(outcomes.get(m.promise, "not run") for m in MUTANTS)
    print(f"\n{counts['killed']} of {len(MUTANTS)} killed; {dict(counts)}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-k", default="", help="only mutants whose bullet or promise holds this text")
    parser.add_argument("--first", type=int, default=0, help="skip the mutants before this index (from 0)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run of the chosen tests unmutated")
    parser.add_argument("--skip-done", type=Path, metavar="RESULTS", help="leave out the mutants a results file has")
    parser.add_argument("--again", type=Path, metavar="RESULTS", help="only the mutants a results file has not killed")
    parser.add_argument("--out", type=Path, help="where the results go (default bench/results/promise-DATE.jsonl)")
    parser.add_argument("--coverage", action="store_true", help="each bullet and its mutants; exit 1 if one has none")
    parser.add_argument("--table", type=Path, nargs="+", metavar="RESULTS", help="the audit table from results files")
    args = parser.parse_args()
    if args.coverage:
        return coverage()
    if args.table:
        return table(args.table)
    chosen = [m for m in MUTANTS[args.first :] if args.k.lower() in f"{m.bullet} {m.promise}".lower()]
    if args.again:  # what that run did not kill: its survivors, its stale ones, and mutants new since
        records = [json.loads(line) for line in args.again.read_text().splitlines()]
        killed = {r["promise"] for r in records if r["outcome"] == "killed"}
        chosen = [m for m in chosen if m.promise not in killed]
    if args.skip_done:
        done = {json.loads(line)["promise"] for line in args.skip_done.read_text().splitlines()}
        chosen = [m for m in chosen if m.promise not in done]
    workdir = Path(tempfile.mkdtemp(prefix="relay-promise-")) / "main"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:
        (workdir / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, workdir / name)
    if (ROOT / ".prism").exists():
        (workdir / ".prism").symlink_to(ROOT / ".prism")
    # A test that fails unmutated would "kill" every mutant aimed at it: such a run proves nothing.
    files = sorted({t for m in chosen for t in m.tests.split()})
    if not args.no_baseline and pytest(workdir, files):
        print(f"the chosen tests fail without any mutant: {' '.join(files)}", file=sys.stderr)
        return 2
    out = args.out or RESULTS / f"promise-{datetime.date.today():%Y%m%d}.jsonl"
    outcomes: collections.Counter = collections.Counter()
    began = time.monotonic()
    for mutant in chosen:
        start = time.monotonic()
        outcome = run(mutant, workdir)
        outcomes[outcome] += 1
        print(f"{outcome:8} {mutant.bullet}: {mutant.promise}", flush=True)
        record = {"bullet": mutant.bullet, "promise": mutant.promise, "outcome": outcome}
        with out.open("a") as f:
            f.write(json.dumps(record | {"seconds": round(time.monotonic() - start, 1)}) + "\n")
    killed = outcomes["killed"]
    print(f"{killed} of {len(chosen)} killed; {dict(outcomes)} in {time.monotonic() - began:.0f}s; results in {out}")
    shutil.rmtree(workdir.parent, ignore_errors=True)
    return 0 if killed == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
