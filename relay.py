"""relay: an SMS relay with an escalation chain, for a phone line on Twilio.

Twilio posts every text that arrives on a line to ``/api/sms/inbound``. The
relay stores it durably, answers Twilio at once, and then texts it on from the
line's own number to the first contact of the line's chain. If nobody
acknowledges within that contact's wait, the next contact is paged, and so on
down the chain (and round it again ``repeat`` times). A contact acknowledges by
replying to the page; that stops the escalation.

The file reads top to bottom, each section using only those above it:

    settings and config -> schedules -> logs and metrics -> conversations
    -> store interface -> JSON files -> PostgreSQL -> Twilio gateway
    -> escalation rules (texts, chains, calls, replies, caps, delivery)
    -> the relay service (Relay; its Outbox, CostCaps and Sweeper)
    -> web routes -> console -> sweeper, catch-up and heartbeat -> process -> CLI

The escalation rules are pure: a conversation and ``now`` go in, the changed
conversation (with the texts it wants sent, as pending pages) comes out. All
I/O lives around them. Run ``python relay.py --help`` for the commands.

Glossary (one word per idea, in code, logs and docs):

    line          a Twilio number customers text, with its chain
    contact       a person a line pages: a chain step's, or a rotation's member
    chain, step   a line's contacts in order; a step is one place in it, counted
                  over every round (``rounds`` = the config's ``repeat`` + 1)
    rotation      members taking turns by shift; an override puts one on call
                  for a while; the roster is the rotations with their overrides
    conversation  one customer's text and all that followed it
    page          anything sent for a conversation, a text or a call; its
                  ``kind`` says what (a step's own text is kind "page")
    via           how a step pages its contact: "sms", "call" or "sms+call"
    acknowledge   a contact takes a conversation: its escalation stops
    two-way       a line with ``reply_to_sender``: replies reach the customer
    held          waiting for a cost cap: a page (state) or a conversation
                  whose chain has not begun (status); nothing else
    due           when something must happen: a step's ``deadline``, a page's
                  ``retry_at``; ``next_wakeup`` is the earliest of a conversation's
    claim         a relay's lease on a page it is sending, so no other relay
                  sends it too; a text's MessageSid is "taken", never claimed
    sweep         one pass over the conversations due; housekeeping is the
                  sweeper's other work (config edits, held texts, tidy, heal)
    catch-up      asking Twilio for texts the webhook never brought
"""

from __future__ import annotations

import abc
import argparse
import array
import bisect
import contextlib
import csv
import ctypes
import dataclasses
import datetime
import difflib
import errno
import fcntl
import functools
import gc
import hashlib
import heapq
import hmac
import html
import io
import ipaddress
import itertools
import json
import logging
import math
import os
import random
import re
import resource
import secrets
import signal
import socket
import stat
import struct
import sys
import termios
import threading
import time
import tomllib
import typing
import urllib.error
import urllib.parse
import urllib.request
import zoneinfo
from collections import deque
from collections.abc import Callable, Container, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import bottle
import dotenv
import prometheus_client
import requests
import requests.adapters
import urllib3
import waitress
import waitress.channel
from twilio.base.exceptions import TwilioException
from twilio.http.http_client import TwilioHttpClient
from twilio.request_validator import RequestValidator, get_signature_algorithm
from twilio.rest import Client
from twilio.twiml.messaging_response import MessagingResponse
from twilio.twiml.voice_response import VoiceResponse

# ---------------------------------------------------------------------------
# Settings and config
#
# What the environment says (Settings: secrets live there and nowhere else) and what
# config.toml says (Config: lines, chains, rotations), each refused in one line when doubtful.
# ---------------------------------------------------------------------------


DEFAULT_PORT = 8080
DRY_RUN_TOKEN = "dry-run"
MAX_BODY_BYTES = 64 * 1024
MAX_SMS_CHARS = 1600
E164 = re.compile(r"\+[1-9][0-9]{6,14}")
MESSAGE_SID = re.compile(r"(SM|MM)[0-9a-f]{32}")
# "90", "90s", "5m", "2m30s", "1h30m", "1d": days, hours, minutes, seconds, each at most once, in that order.
DURATION = re.compile(r"(?:([0-9]+)\s*d)?\s*(?:([0-9]+)\s*h)?\s*(?:([0-9]+)\s*m)?\s*(?:([0-9]+)\s*s?)?")
DURATION_UNITS = (86400, 3600, 60, 1)


# .env.example's placeholders: "ACxxxx...", "SKxxxx...", "your_auth_token", "your_api_secret".
PLACEHOLDER_RUN = "xxxxxxxx"


class ConfigError(Exception):
    """The config or the environment cannot be used; the message says why."""


@dataclass(frozen=True, slots=True)
class Contact:
    """A chain step, and who it pages. A rotation's step names the rotation until it begins, and then
    whoever was on shift (see contact_at)."""

    name: str
    phone: str  # "" for a rotation's step that has not begun
    wait: int
    hours: str | None = None  # "07:00-22:00" in the line's time zone; None is always
    via: str = "sms"  # "sms", "call" or "sms+call": how a step pages this contact
    rotation: str | None = None  # the rotation this step pages whoever is on shift of


class Member(typing.NamedTuple):
    name: str
    phone: str


@dataclass(frozen=True)
class Rotation:
    """People taking turns: members[k mod n] holds the k-th shift since `start` (see Roster)."""

    name: str
    timezone: str
    start: datetime.datetime  # local wall time of the first handoff, in `timezone` (naive)
    shift: int  # seconds; whole days hand off at the same local clock time across DST
    members: tuple[Member, ...]
    remind_before: int | None = None  # each shift's person is texted this long before it starts

    def member(self, phone: str) -> Member | None:
        return next((m for m in self.members if m.phone == phone), None)


@dataclass(frozen=True)
class Line:
    name: str
    number: str
    chain: tuple[Contact, ...]
    timezone: str = "UTC"
    reply_to_sender: bool = False  # two-way: contacts' replies go on to the customer
    received_text: str | None = None  # answered at once to a customer's first text
    acknowledged_text: str | None = None  # texted to the customer when a contact takes it
    unanswered_text: str | None = None  # texted to the customer when nobody did
    rotations: tuple[Rotation, ...] = ()  # those its chain names, in chain order

    def contact(self, phone: str) -> Contact | None:
        """The line's contact or rotation member with this phone: their texts are replies."""
        if found := next((c for c in self.chain if c.phone == phone), None):
            return found
        member = next((m for r in self.rotations if (m := r.member(phone))), None)
        return Contact(member.name, member.phone, 0) if member else None


@dataclass(frozen=True)
class Config:
    lines: tuple[Line, ...]
    public_url: str | None = None
    wait: int = 300
    repeat: int = 0
    alarm_phone: str | None = None
    retention: int = 7 * 86400
    log_bodies: bool = False
    sender_hourly_cap: int = 20
    outbound_hourly_cap: int = 200
    call_hourly_cap: int = 30  # calls cost more than texts: their own cap
    catch_up: int = 60  # seconds between asking Twilio for texts the webhook missed; 0 = never
    catch_up_window: int = 24 * 3600  # how far back the first pass looks, and the most any pass does
    call_when_blocked: bool = True  # a page carriers block (30034, 30032, 30007) becomes a call
    heartbeat_every: int = 60  # seconds between pings of RELAY_HEARTBEAT_URL
    fallback: bool = True  # `setup --apply` also installs Twilio's own fallback (a Studio flow per line)
    database_connections: int = 5  # with DATABASE_URL: at most this many per relay, its listener included
    console: bool = True  # the web page at / for the crew, signed in by a texted code
    rotations: tuple[Rotation, ...] = ()

    def rotation(self, name: str) -> Rotation | None:
        return next((r for r in self.rotations if r.name == name), None)

    def line_for(self, number: str) -> Line | None:
        return next((line for line in self.lines if line.number == number), None)


RELAY_KEYS = {f.name for f in dataclasses.fields(Config)} - {"lines", "rotations"}
LINE_KEYS = {f.name for f in dataclasses.fields(Line)} - {"rotations"}
CONTACT_KEYS = {f.name for f in dataclasses.fields(Contact)}
ROTATION_KEYS = {f.name for f in dataclasses.fields(Rotation)}
MEMBER_KEYS = set(Member._fields)
LOCAL_TIME_FORMATS = ("%Y-%m-%d %H:%M", "%Y-%m-%d %H:%M:%S")
HOURS = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])-([01][0-9]|2[0-4]):([0-5][0-9])")
TEMPLATE_FIELDS = {"line": "QDN", "contact": "Sergio"}
CHANNELS = {"sms": ("page",), "call": ("call",), "sms+call": ("page", "call")}  # via -> kinds of page


def parse_duration(value: object, key: str, zero: bool = False) -> int:
    """Seconds from an integer or a string such as "90s", "5m", "1h" (0 only where `zero` allows it)."""
    if isinstance(value, int) and not isinstance(value, bool):
        seconds = value
    elif isinstance(value, str) and (m := DURATION.fullmatch(value.strip())) and any(m.groups()):
        seconds = sum(int(part or 0) * unit for part, unit in zip(m.groups(), DURATION_UNITS, strict=True))
    else:
        raise ConfigError(f'{key}: {value!r} is not a duration like 90, "90s", "5m", "2m30s" or "1h"')
    if seconds < 0 or seconds == 0 and not zero:
        raise ConfigError(f"{key}: a duration must be more than 0 seconds")
    return seconds


def say_duration(seconds: int) -> str:
    """Seconds as the config writes them: 90 -> "1m30s", 86400 -> "1d"."""
    parts = []
    for unit, size in zip("dhms", DURATION_UNITS, strict=True):
        if count := seconds // size:
            parts.append(f"{count}{unit}")
            seconds -= count * size
    return "".join(parts) or "0s"


def _phone(value: object, key: str) -> str:
    if not isinstance(value, str) or not E164.fullmatch(value):
        raise ConfigError(f"{key}: {value!r} is not an E.164 number like +16195550100")
    return value


def _text(value: object, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: must be a non-empty string")
    return value.strip()


def _count(value: object, key: str, least: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ConfigError(f"{key}: must be a whole number of at least {least}")
    return value


def _hours(value: object, key: str) -> str:
    if not isinstance(value, str) or not HOURS.fullmatch(value.strip()):
        raise ConfigError(f'{key}: {value!r} is not a time range like "07:00-22:00"')
    return value.strip()


def _timezone(value: object, key: str) -> str:
    # A folder of the zone database ("Pacific") is no zone, and opening it is an OSError, not a lookup miss.
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, TypeError, OSError):
        raise ConfigError(f"{key}: {value!r} is not a time zone name like America/Los_Angeles") from None
    return value


def _template(value: object, key: str) -> str:
    text = _text(value, key)
    try:
        text.format(**TEMPLATE_FIELDS)
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"{key}: only {{line}} and {{contact}} can be filled in ({e})") from None
    return text


def _flag(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: must be true or false")
    return value


def _at(where: str, key: str) -> str:
    """Where a key is, in words: `relay.wait`, or `line "QDN", contact "Backup", phone`."""
    return key if not where else f"{where}.{key}" if where == "relay" else f"{where}, {key}"


def _refuse_unknown(table: dict, known: set[str], where: str) -> None:
    for key in table:
        if key not in known:
            meant = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {meant[0]}?" if meant else f"known: {', '.join(sorted(known))}"
            raise ConfigError(f"{_at(where, key)}: unknown key ({hint})")


def _table(value: object, known: set[str], where: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must be a table like {{ name = ..., ... }}")
    _refuse_unknown(value, known, where)
    return value


def _named(raw: object, kind: str, fallback: str) -> str:
    """How a refusal names a table: by its `name` when it has a usable one."""
    name = raw.get("name") if isinstance(raw, dict) else None
    return f'{kind} "{name.strip()}"' if isinstance(name, str) and name.strip() else fallback


def _parse_step(raw: object, line_where: str, step: int, default_wait: int, rotations: dict) -> Contact:
    """A chain step: a contact (`name`, `phone`) or a rotation (`rotation`), with its wait, via and hours."""
    if isinstance(raw, dict) and "rotation" in raw:
        where = f"{line_where}, chain step {step}"
        raw = _table(raw, CONTACT_KEYS - {"name", "phone"}, where)
        name = _text(raw["rotation"], _at(where, "rotation"))
        if name not in rotations:
            meant = difflib.get_close_matches(name, rotations, n=1)
            hint = f"did you mean {meant[0]}?" if meant else f"known: {', '.join(rotations) or 'none'}"
            raise ConfigError(f'{_at(where, "rotation")}: "{name}" is no [[rotations]] name ({hint})')
        person = Member(name, "")
    else:
        where = f"{line_where}, {_named(raw, 'contact', f'chain step {step}')}"
        raw = _table(raw, CONTACT_KEYS - {"rotation"}, where)
        name = None
        person = Member(_text(raw.get("name"), _at(where, "name")), _phone(raw.get("phone"), _at(where, "phone")))
    return Contact(
        *person,
        parse_duration(raw["wait"], _at(where, "wait")) if "wait" in raw else default_wait,
        _hours(raw["hours"], _at(where, "hours")) if "hours" in raw else None,
        _via(raw["via"], _at(where, "via")) if "via" in raw else "sms",
        name,
    )


def _local_time(value: object, key: str) -> datetime.datetime:
    for form in LOCAL_TIME_FORMATS:
        with contextlib.suppress(TypeError, ValueError):
            return datetime.datetime.strptime(value.strip(), form)
    raise ConfigError(f'{key}: {value!r} is not a local time like "2026-12-07 08:00" or "2026-12-07 08:00:30"')


def _parse_rotation(raw: object, index: int) -> Rotation:
    where = _named(raw, "rotation", f"rotations[{index}]")
    raw = _table(raw, ROTATION_KEYS, where)
    for key in ("timezone", "start", "shift"):
        if key not in raw:
            raise ConfigError(f"{_at(where, key)}: missing (a rotation needs name, timezone, start, shift, members)")
    members = raw.get("members")
    if not isinstance(members, list) or not members:
        raise ConfigError(f"{_at(where, 'members')}: the rotation has no members; list at least one")
    people = []
    for j, entry in enumerate(members):
        at = f"{where}, {_named(entry, 'member', f'member {j + 1}')}"
        entry = _table(entry, MEMBER_KEYS, at)
        people.append(Member(_text(entry.get("name"), _at(at, "name")), _phone(entry.get("phone"), _at(at, "phone"))))
    rotation = Rotation(
        _text(raw.get("name"), _at(where, "name")),
        _timezone(raw["timezone"], _at(where, "timezone")),
        _local_time(raw["start"], _at(where, "start")),
        parse_duration(raw["shift"], _at(where, "shift")),
        tuple(people),
        parse_duration(raw["remind_before"], _at(where, "remind_before")) if "remind_before" in raw else None,
    )
    _refuse_twice(rotation.members, where, "rotation")
    return rotation


def _refuse_twice(people: Iterable, where: str, among: str) -> None:
    first: dict = {}
    for person in people:
        if (twin := first.setdefault(person.phone, person)) is not person:
            both = f'"{twin.name}" and "{person.name}"' if twin.name != person.name else f'"{twin.name}" twice'
            kind = "contact" if among == "chain" else "member"
            raise ConfigError(
                f'{where}, {kind} "{person.name}", phone: {person.phone} is in the {among} for {both}; '
                "a phone paged twice gives no extra cover (list each person once)"
            )


def _via(value: object, key: str) -> str:
    if value not in CHANNELS:
        raise ConfigError(f'{key}: {value!r} is not one of "sms", "call" or "sms+call"')
    return value


def _parse_line(raw: object, index: int, default_wait: int, rotations: dict) -> Line:
    where = _named(raw, "line", f"lines[{index}]")
    raw = _table(raw, LINE_KEYS, where)
    chain = raw.get("chain")
    if not isinstance(chain, list) or not chain:
        raise ConfigError(f"{_at(where, 'chain')}: the chain is empty; name at least one contact")
    options: dict = {}
    if "timezone" in raw:
        options["timezone"] = _timezone(raw["timezone"], _at(where, "timezone"))
    if "reply_to_sender" in raw:
        options["reply_to_sender"] = _flag(raw["reply_to_sender"], _at(where, "reply_to_sender"))
    for key in ("received_text", "acknowledged_text", "unanswered_text"):
        if key in raw:
            options[key] = _template(raw[key], _at(where, key))
    steps = tuple(_parse_step(c, where, j + 1, default_wait, rotations) for j, c in enumerate(chain))
    named = dict.fromkeys(c.rotation for c in steps if c.rotation)
    line = Line(
        _text(raw.get("name"), _at(where, "name")),
        _phone(raw.get("number"), _at(where, "number")),
        steps,
        **options,
        rotations=tuple(rotations[name] for name in named),
    )
    _refuse_twice((c for c in line.chain if not c.rotation), where, "chain")
    return line


def parse_config(data: dict) -> Config:
    """Build a Config from parsed TOML, refusing anything doubtful with the key and why."""
    _refuse_unknown(data, {"relay", "lines", "rotations"}, "")
    relay = _table(data.get("relay", {}), RELAY_KEYS, "relay")
    options: dict = {}
    if "public_url" in relay:
        options["public_url"] = _public_url(_text(relay["public_url"], "relay.public_url"), "relay.public_url")
    for key in ("wait", "retention", "catch_up", "catch_up_window", "heartbeat_every"):
        if key in relay:
            options[key] = parse_duration(relay[key], f"relay.{key}", zero=key == "catch_up")
    for key, least in (
        ("repeat", 0),
        ("sender_hourly_cap", 1),
        ("outbound_hourly_cap", 1),
        ("call_hourly_cap", 1),
        ("database_connections", 2),  # the listener's, and one for transactions
    ):
        if key in relay:
            options[key] = _count(relay[key], f"relay.{key}", least)
    if "alarm_phone" in relay:
        options["alarm_phone"] = _phone(relay["alarm_phone"], "relay.alarm_phone")
    for key in ("log_bodies", "call_when_blocked", "fallback", "console"):
        if key in relay:
            options[key] = _flag(relay[key], f"relay.{key}")

    raw_rotations = data.get("rotations", [])
    if not isinstance(raw_rotations, list):
        raise ConfigError("rotations: must be [[rotations]] tables")
    rotations: dict[str, Rotation] = {}
    for i, raw in enumerate(raw_rotations):
        rotation = _parse_rotation(raw, i)
        if rotations.setdefault(rotation.name, rotation) is not rotation:
            raise ConfigError(f'rotation "{rotation.name}", name: already used by another rotation')
    raw_lines = data.get("lines")
    if not isinstance(raw_lines, list) or not raw_lines:
        raise ConfigError("lines: at least one [[lines]] table is needed")
    default_wait = options.get("wait", Config.wait)
    lines = [_parse_line(raw, i, default_wait, rotations) for i, raw in enumerate(raw_lines)]

    numbers = [line.number for line in lines]
    for i, line in enumerate(lines):
        if numbers.index(line.number) != i:
            raise ConfigError(f'line "{line.name}", number: {line.number} is already used by another line')
        if [x.name for x in lines].index(line.name) != i:
            raise ConfigError(f'line "{line.name}", name: already used by another line')
        for contact in line.chain:
            if contact.phone in numbers:
                raise ConfigError(
                    f'line "{line.name}", contact "{contact.name}", phone: {contact.phone} is a line\'s own '
                    "number; paging it would loop back into the relay"
                )
    for rotation in rotations.values():
        for member in rotation.members:
            if member.phone in numbers:
                raise ConfigError(
                    f'rotation "{rotation.name}", member "{member.name}", phone: {member.phone} is a line\'s '
                    "own number; paging it would loop back into the relay"
                )
    if options.get("alarm_phone") in numbers:
        raise ConfigError("relay.alarm_phone: is a line's own number; it would loop back into the relay")
    return Config(lines=tuple(lines), rotations=tuple(rotations.values()), **options)


def _public_url(value: str, key: str, like: str = "https://relay.example.com") -> str:
    """An absolute http(s) URL with a host, without its trailing slash: what Twilio is told to call."""
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or any(ch.isspace() for ch in value):
        raise ConfigError(f"{key}: {value!r} is not an absolute URL like {like}")
    return value.rstrip("/")


def load_config(path: Path) -> Config:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (set RELAY_CONFIG or create it)") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    try:
        return parse_config(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


@dataclass(frozen=True)
class Settings:
    """What the environment says; secrets live here and nowhere else."""

    config_path: Path
    state_dir: Path
    port: int
    dry_run: bool
    public_url: str | None
    api_base_url: str
    account_sid: str | None
    auth_token: str | None
    api_key: str | None
    api_secret: str | None
    database_url: str | None = None  # state in PostgreSQL, shared by any number of relays, instead of files
    files_do_not_last: bool = False  # on Heroku (DYNO is set), whose dynos lose their files at each restart
    host: str = "0.0.0.0"  # HOST: where `serve` listens; 127.0.0.1 keeps a trial off the network
    heartbeat_url: str | None = None  # an outside monitor's ping URL (Healthchecks.io and the like)

    @classmethod
    def from_env(cls, env: dict, dry_run: bool = False) -> Settings:
        def get(name: str) -> str | None:
            return env.get(name, "").strip() or None

        port = get("PORT") or str(DEFAULT_PORT)
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"PORT: {port!r} is not a port number")
        return cls(
            config_path=Path(get("RELAY_CONFIG") or "config.toml"),
            state_dir=Path(get("RELAY_STATE_DIR") or "state"),
            port=int(port),
            host=get("HOST") or "0.0.0.0",
            dry_run=dry_run or (get("RELAY_DRY_RUN") or "0").lower() not in ("0", "false", "no"),
            public_url=_public_url(url, "RELAY_PUBLIC_URL") if (url := get("RELAY_PUBLIC_URL")) else None,
            api_base_url=(get("TWILIO_API_BASE_URL") or "https://api.twilio.com").rstrip("/"),
            account_sid=get("TWILIO_ACCOUNT_SID"),
            auth_token=get("TWILIO_AUTH_TOKEN"),
            api_key=get("TWILIO_API_KEY"),
            api_secret=get("TWILIO_API_SECRET"),
            database_url=_database_url(url) if (url := get("DATABASE_URL")) else None,
            files_do_not_last=bool(get("DYNO")),
            heartbeat_url=_public_url(url, "RELAY_HEARTBEAT_URL", "https://hc-ping.com/your-check-uuid")
            if (url := get("RELAY_HEARTBEAT_URL"))
            else None,
        )

    @property
    def signing_token(self) -> str | None:
        return self.auth_token or (DRY_RUN_TOKEN if self.dry_run else None)

    def require_credentials(self) -> None:
        if self.dry_run:
            return
        for name, value in (
            ("TWILIO_ACCOUNT_SID", self.account_sid),
            ("TWILIO_AUTH_TOKEN", self.auth_token),
            ("TWILIO_API_KEY", self.api_key),
            ("TWILIO_API_SECRET", self.api_secret),
        ):
            if value and (value.startswith("your_") or PLACEHOLDER_RUN in value.lower()):
                raise ConfigError(
                    f"{name}: still the placeholder from .env.example; put in your own from the Twilio "
                    "console (or use --dry-run)"
                )
        if not self.account_sid or not self.account_sid.startswith("AC"):
            raise ConfigError("TWILIO_ACCOUNT_SID: missing or not an AC... account SID (or use --dry-run)")
        if not self.auth_token:
            raise ConfigError("TWILIO_AUTH_TOKEN: missing; it is needed to check Twilio's signatures")
        if bool(self.api_key) != bool(self.api_secret):
            raise ConfigError("TWILIO_API_KEY and TWILIO_API_SECRET: set both or neither")

    def public_url_for(self, config: Config) -> str | None:
        return self.public_url or config.public_url


def _database_url(value: str) -> str:
    """Only a URL: libpq's key=value strings put a password where nothing marks it, and a refusal
    here never repeats the value."""
    if not value.startswith(("postgres://", "postgresql://")):
        raise ConfigError("DATABASE_URL: not a postgres:// or postgresql:// URL (key=value strings are not taken)")
    if shown_database(value).startswith("postgresql://("):  # else libpq's errors could quote the password
        raise ConfigError(
            "DATABASE_URL: libpq cannot tell its user and password apart; percent-encode the password's "
            "special characters (/ as %2F, @ as %40)"
        )
    return value


def load_dotenv_file(path: Path = Path(".env")) -> None:
    """Load .env without overriding the environment; refuse one others can read."""
    if not path.exists():
        return
    if path.stat().st_mode & 0o077:
        raise ConfigError(f"{path}: readable by group or others; run: chmod 600 {path}")
    dotenv.load_dotenv(path, override=False)


# ---------------------------------------------------------------------------
# Schedules: who is on shift
#
# A rotation hands its shifts round its members from `start`; an override puts
# another member on for a while (the newest covering a moment wins). All of it
# is pure: rotations, overrides and a moment in, a person out.
# ---------------------------------------------------------------------------

MAX_TAKE = 31 * 86400  # the longest `take DURATION` (an override from the command line has no limit)
HANDOFFS_LOOKED_AT = 500  # shifts walked to find when someone's time on call ends


@dataclass(frozen=True)
class Override:
    """A member on call for a rotation from `start` to `end`, whoever the rotation says."""

    id: str
    rotation: str
    name: str
    phone: str
    start: float
    end: float
    replaces: str  # who was on shift when it was made, by name
    made: float

    def covers(self, t: float) -> bool:
        return self.start <= t < self.end


def new_override(roster: Roster, rotation: Rotation, member: Member, start: float, end: float, now: float) -> Override:
    """An override putting `member` on call from `start` to `end`, naming whom it replaces then."""
    replaces = roster.on_shift(rotation.name, start)
    return Override(secrets.token_hex(3), rotation.name, *member, start, end, replaces.name, now)


def local_time(ts: float, timezone: str) -> str:
    """A time as an operator reads it: in the line's or rotation's time zone, saying which."""
    return datetime.datetime.fromtimestamp(ts, zoneinfo.ZoneInfo(timezone)).strftime("%Y-%m-%d %H:%M:%S %Z")


def _epoch(local: datetime.datetime, timezone: str) -> float:
    return local.replace(tzinfo=zoneinfo.ZoneInfo(timezone)).timestamp()


def shift_at(rotation: Rotation, t: float) -> tuple[int, float, float]:
    """Which shift holds moment `t` (k counts whole shifts since `start`), with its start and end.
    Before `start` it is shift -1, ending at `start`. Whole days hand off at the local clock time."""
    first = _epoch(rotation.start, rotation.timezone)
    if t < first:
        return -1, -math.inf, first
    if rotation.shift % 86400:
        k = int((t - first) // rotation.shift)
        return k, first + k * rotation.shift, first + (k + 1) * rotation.shift
    days = rotation.shift // 86400

    def handoff(i: int) -> float:
        return _epoch(rotation.start + datetime.timedelta(days=i * days), rotation.timezone)

    local = datetime.datetime.fromtimestamp(t, zoneinfo.ZoneInfo(rotation.timezone)).replace(tzinfo=None)
    k = (local.date() - rotation.start.date()).days // days
    while k > 0 and handoff(k) > t:
        k -= 1
    while handoff(k + 1) <= t:
        k += 1
    return k, handoff(k), handoff(k + 1)


def scheduled(rotation: Rotation, k: int) -> Member:
    """The member the rotation gives shift k (before the first: the first member)."""
    return rotation.members[max(k, 0) % len(rotation.members)]


class Roster:
    """The rotations with their overrides: who is on shift when."""

    def __init__(self, rotations: Iterable[Rotation] = (), overrides: Iterable[Override] = ()):
        self.rotations = {r.name: r for r in rotations}
        self.overrides = sorted(overrides, key=lambda o: (o.made, o.id), reverse=True)  # newest first

    def on_shift(self, name: str, t: float) -> Member | None:
        """Who is on call for the rotation at `t`: the newest override covering it, else its turn."""
        rotation = self.rotations.get(name)
        if rotation is None:
            return None
        covering = next((o for o in self.overrides if o.rotation == name and o.covers(t)), None)
        return Member(covering.name, covering.phone) if covering else scheduled(rotation, shift_at(rotation, t)[0])

    def _next_change(self, name: str, t: float) -> float:
        """The next moment after `t` at which who is on call could change."""
        edges = [shift_at(self.rotations[name], t)[2]]
        edges += [e for o in self.overrides if o.rotation == name for e in (o.start, o.end) if e > t]
        return min(edges)

    def handoffs(self, name: str, t: float, count: int) -> list[tuple[float, Member]]:
        """The next `count` times after `t` when someone else goes on call, and who."""
        found, holder = [], self.on_shift(name, t)
        for _ in range(HANDOFFS_LOOKED_AT):
            if len(found) == count:
                break
            t = self._next_change(name, t)
            if (now_on := self.on_shift(name, t)) != holder:
                found.append((t, now_on))
                holder = now_on
        return found

    def until(self, name: str, t: float) -> float | None:
        """When whoever is on call at `t` hands over (None: nobody else comes within the shifts looked at)."""
        ahead = self.handoffs(name, t, 1)
        return ahead[0][0] if ahead else None

    def reminders_due(self, rotation: Rotation, now: float) -> list[tuple[float, float, Member]]:
        """Shifts not yet begun whose reminder is due by `now`: (start, end, who holds it then)."""
        if not rotation.remind_before:
            return []
        due, start = [], shift_at(rotation, now)[2]
        while start - rotation.remind_before <= now and len(due) < HANDOFFS_LOOKED_AT:
            end = shift_at(rotation, start)[2]
            due.append((start, end, self.on_shift(rotation.name, start)))
            start = end
        return due

    def next_reminder(self, now: float) -> float:
        """When the next reminder falls due, after those due by `now`."""
        upcoming = [math.inf]
        for rotation in self.rotations.values():
            if rotation.remind_before:
                starts = [start for start, _, _ in self.reminders_due(rotation, now)]
                start = shift_at(rotation, starts[-1])[2] if starts else shift_at(rotation, now)[2]
                upcoming.append(start - rotation.remind_before)
        return min(upcoming)


# ---------------------------------------------------------------------------
# Logs and metrics
# ---------------------------------------------------------------------------

_log_lock = threading.Lock()


MAX_LOG_LINE = 2048  # bytes: whatever a client sends, it cannot make the log grow faster than this a request
LOG_FIELD_CHARS = (300, 60)  # a long field is cut to the first; if the line is still too long, to the second


def _cut(value: object, chars: int) -> object:
    if isinstance(value, str) and len(value) > chars:
        return value[:chars] + "…"
    if isinstance(value, list | tuple | dict) and len(text := json.dumps(value, ensure_ascii=False)) > chars:
        return text[:chars] + "…"
    return value


def log(level: str, event: str, **fields: object) -> None:
    """One JSON object per line on stdout, never over MAX_LOG_LINE bytes."""
    now = datetime.datetime.now(datetime.UTC)
    head = {"ts": now.isoformat(timespec="milliseconds"), "level": level, "event": _cut(event, 60)}
    present = {k: v for k, v in fields.items() if v is not None}
    for chars in LOG_FIELD_CHARS:
        record = head | {_cut(k, 40): _cut(v, chars) for k, v in present.items()}
        line = json.dumps(record, ensure_ascii=False) + "\n"
        if len(line.encode()) <= MAX_LOG_LINE:
            break
    else:
        line = json.dumps(head | {"truncated": len(present)}, ensure_ascii=False) + "\n"
    with _log_lock:
        sys.stdout.write(line)
        sys.stdout.flush()


def loggable_url(url: str) -> str:
    """A URL without user, password, query or fragment: what may be logged of it."""
    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


class JsonLogHandler(logging.Handler):
    """Routes the libraries' own logging (waitress, twilio) into our JSON lines."""

    def emit(self, record: logging.LogRecord) -> None:
        log(record.levelname.lower(), record.name, message=record.getMessage())


def tame_library_logging() -> None:
    root = logging.getLogger()
    root.handlers[:] = [JsonLogHandler()]
    root.setLevel(logging.WARNING)
    # Under load waitress warns about every queued request; that is not news.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)


prometheus_client.disable_created_metrics()  # the *_created series only add noise here
METRICS = prometheus_client.CollectorRegistry()
INBOUND = prometheus_client.Counter("relay_inbound_total", "Inbound texts accepted", ["kind"], registry=METRICS)
REJECTED = prometheus_client.Counter("relay_rejected_total", "Requests refused", ["reason"], registry=METRICS)
SENDS = prometheus_client.Counter("relay_sends_total", "Outbound SMS attempts", ["result"], registry=METRICS)
ESCALATIONS = prometheus_client.Counter("relay_escalations_total", "Pages moved to the next contact", registry=METRICS)
ACKS = prometheus_client.Counter("relay_acknowledgements_total", "Conversations acknowledged", registry=METRICS)
UNANSWERED = prometheus_client.Counter("relay_unanswered_total", "Conversations nobody answered", registry=METRICS)
CARRIER_BLOCKED = prometheus_client.Counter(
    "relay_carrier_blocked",
    "Pages carriers blocked (unregistered 10DLC, unverified toll-free, filtered)",
    registry=METRICS,
)
OPEN = prometheus_client.Gauge("relay_open_conversations", "Conversations waiting for a contact", registry=METRICS)
HELD = prometheus_client.Counter("relay_held_total", "Texts held by a cost cap", ["cap"], registry=METRICS)
SWEEP_SECONDS = prometheus_client.Gauge("relay_sweep_seconds", "CPU time of the last sweep pass", registry=METRICS)
SWEEP_LAG = prometheus_client.Gauge("relay_sweep_lag_seconds", "How late the last due deadline fired", registry=METRICS)
CATCH_UP_FAILURES = prometheus_client.Counter(
    "relay_catch_up_failures_total", "Catch-up list calls that failed", registry=METRICS
)


# ---------------------------------------------------------------------------
# Conversations
#
# A conversation is one customer's text and what followed: the chain it pages, its pages
# (each text or call to send, with its state), the replies. Its status is open, held (its
# chain waits for a cost cap), acknowledged, unanswered or closed. The rules here are the ones
# both stores ask when they index, save and wake conversations.
# ---------------------------------------------------------------------------


OPEN_STATUS = "open"
HELD_STATUS = "held"
CLOSED_STATUS = "closed"  # ended on the console without anyone taking it
UNANSWERED_STATUS = "unanswered"  # the chain ran out: listed, and takeable, until taken or past retention
# The newest unanswered conversations of a line kept listed in memory: a crew acts on these, and a flood
# that ran out unanswered does not keep its thousands in memory for the retention (older ones are archived).
UNANSWERED_LISTED = 100
MAX_CODE = 999_999  # six digits: codes never run out while fewer conversations than this are open
TWO_WAY_WINDOW = 24 * 3600.0


STEP_KINDS = ("page", "call")  # what a chain step sends its contact
FAILED_STATES = {"failed", "undelivered", "not_taken"}


@dataclass(slots=True)
class Page:
    """One outbound text and where it stands."""

    to: str
    body: str
    kind: str  # "page" (a chain step), "followup", "notice", "alarm", "cap_alarm", or "customer_..." to the sender
    step: int | None = None
    state: str = "pending"  # pending -> sent -> delivered | failed | undelivered; or cancelled, held
    attempts: int = 0
    retry_at: float = 0.0
    sid: str | None = None
    error: str | None = None
    media: list[str] = field(default_factory=list)  # MMS media URLs passed on
    sent_at: float | None = None  # when Twilio took it
    counted: bool = False  # counted against the outbound cap (once, whatever the retries)
    call_status: str | None = None  # a call's last progress report from Twilio (ringing, in-progress...)
    lease: float = 0.0  # shared store: until when one relay has claimed it to send (0: unclaimed)
    holder: str | None = None  # shared store: which relay claimed it last (Relay.id), so a lapsed claim sends nothing


@dataclass(slots=True)
class Conversation:
    """A customer's text and everything the relay did about it."""

    id: str  # the MessageSid of the text that opened it
    line: str
    number: str  # the line's number: pages go out from it
    code: str
    sender: str
    chain: list[Contact]  # frozen when the conversation opened
    rounds: int  # 1 + repeat
    alarm_phone: str | None
    created: float
    step: int
    step_started: float
    deadline: float
    messages: list[dict] = field(default_factory=list)  # {"sid", "body", "at"}
    replies: list[dict] = field(default_factory=list)  # {"sid", "from", "body", "at", "answer"}
    pages: list[Page] = field(default_factory=list)
    status: str = OPEN_STATUS  # open | acknowledged | unanswered | held (over a cost cap)
    finished_at: float | None = None
    acknowledged_by: str | None = None
    acknowledged_phone: str | None = None
    timezone: str = "UTC"
    two_way: bool = False
    customer_texts: dict = field(default_factory=dict)  # "acknowledged"/"unanswered" -> template
    received_at: float | None = None  # when Twilio got the text, if the relay heard of it only later
    forwarded: bool = False  # heard of only later, while Twilio's fallback flow had texted it to the crew
    shifts: dict = field(default_factory=dict)  # a rotation's step begun -> [name, phone] of whom it paged
    actions: list = field(default_factory=list)  # done on the console: {"at", "by", "action", "text"}

    def to_dict(self) -> dict:
        # dataclasses.asdict deep-copies every value; this is ten times faster and the same JSON.
        return {**_fields(self), "chain": [_fields(c) for c in self.chain], "pages": [_fields(p) for p in self.pages]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"))

    def written_mark(self) -> tuple[int, int, list[int]]:
        """What a journal record has of the conversation: its texts, its replies, each page's state."""
        return len(self.messages), len(self.replies), [page_mark(p) for p in self.pages]

    def delta_json(self, mark: tuple[int, int, list[int]]) -> str:
        """Only what changed since `mark`: a long conversation costs each write its news, not its length."""
        messages, replies, pages = mark
        changed = {str(i): _fields(p) for i, p in enumerate(self.pages) if i >= len(pages) or page_mark(p) != pages[i]}
        record = {
            "delta": self.id,
            "set": {k: getattr(self, k) for k in self.__slots__ if k not in LISTED_FIELDS},
            "messages": self.messages[messages:],
            "replies": self.replies[replies:],
            "pages": changed,
        }
        return json.dumps(record, ensure_ascii=False, separators=(",", ":"))

    def apply_delta(self, record: dict) -> None:
        for key, value in record["set"].items():
            if key in LISTED_FIELDS or key not in self.__slots__:
                raise ValueError(f"not a field a delta sets: {key}")
            setattr(self, key, value)
        self.messages.extend(record["messages"])
        self.replies.extend(record["replies"])
        for index, page in sorted(record["pages"].items(), key=lambda item: int(item[0])):
            if int(index) < len(self.pages):
                self.pages[int(index)] = Page(**page)
            elif int(index) == len(self.pages):
                self.pages.append(Page(**page))
            else:
                raise ValueError(f"page {index} follows no page {len(self.pages)}")

    @classmethod
    def from_json(cls, data: dict) -> Conversation:
        data = dict(data)
        data["chain"] = [shared_contact(**c) for c in data["chain"]]
        data["pages"] = [Page(**p) for p in data["pages"]]
        return cls(**data)

    @property
    def is_open(self) -> bool:
        return self.status == OPEN_STATUS

    @property
    def is_takeable(self) -> bool:
        """Nobody has it yet: open, held by a cap, or unanswered."""
        return self.status in (OPEN_STATUS, HELD_STATUS, UNANSWERED_STATUS)

    def is_live_two_way(self, now: float) -> bool:
        """Acknowledged on a two-way line recently: the customer and the contact can still talk."""
        return self.two_way and self.status == "acknowledged" and now - self.finished_at < TWO_WAY_WINDOW

    def is_settled(self, now: float, retention: float) -> bool:
        """Finished, with nothing left to send or say: ready for the archive.

        An unanswered one stays listed for somebody to take until the retention has passed.
        """
        if self.status in (OPEN_STATUS, HELD_STATUS) or self.is_live_two_way(now):
            return False
        if self.status == UNANSWERED_STATUS and now - self.finished_at < retention:
            return False
        return not any(p.state in ("pending", "held") for p in self.pages)

    def sids(self) -> list[str]:
        return [m["sid"] for m in self.messages] + [r["sid"] for r in self.replies]


def _fields(obj) -> dict:
    return {name: getattr(obj, name) for name in obj.__slots__}


LISTED_FIELDS = {"chain", "messages", "replies", "pages", "customer_texts"}  # what a delta never sets whole


def page_mark(page: Page) -> int:
    return hash((page.state, page.attempts, page.retry_at, page.sid, page.error, page.sent_at, page.counted, page.body))


@functools.cache
def shared_contact(
    name: str, phone: str, wait: int, hours: str | None = None, via: str = "sms", rotation: str | None = None
) -> Contact:
    """One Contact object for all the conversations that froze the same chain."""
    return Contact(name, phone, wait, hours, via, rotation)


def reached_phones(conv: Conversation, delivered_only: bool = False) -> list[str]:
    """Contacts paged so far, by text or call (whose page has not failed), in the order they were paged."""
    states = ("sent", "delivered") if delivered_only else ("pending", "sent", "delivered")
    return list(dict.fromkeys(p.to for p in conv.pages if p.kind in STEP_KINDS and p.state in states))


def held_pages(conv: Conversation) -> list[int]:
    return [i for i, p in enumerate(conv.pages) if p.state == "held"]


def next_wakeup(conv: Conversation, in_flight: set[int] = frozenset()) -> float | None:
    """When the conversation next needs attention: a pending page's retry or the step's deadline."""
    times = [max(p.retry_at, p.lease) for i, p in enumerate(conv.pages) if p.state == "pending" and i not in in_flight]
    if conv.is_open:
        times.append(conv.deadline)
    return min(times, default=None)


def unanswered_beyond_listing(convs: Iterable[Conversation], now: float) -> set[str]:
    """Unanswered conversations older than each line's newest UNANSWERED_LISTED, with nothing left to send:
    the archive takes them, so a flood that ran out does not hold memory for the whole retention."""
    by_line: dict[str, list[Conversation]] = {}
    for conv in convs:
        if conv.status == UNANSWERED_STATUS and conv.is_settled(now, 0):
            by_line.setdefault(conv.line, []).append(conv)
    return {
        conv.id
        for listed in by_line.values()
        for conv in sorted(listed, key=lambda c: c.finished_at, reverse=True)[UNANSWERED_LISTED:]
    }


def next_code(used: Container[str], last: int) -> tuple[str, int]:
    """The next number after `last` (1-999999, wrapping) that no open conversation of the line holds."""
    n = last
    for _ in range(MAX_CODE):
        n = n % MAX_CODE + 1
        if str(n) not in used:
            return str(n), n
    raise RuntimeError(f"all {MAX_CODE} reply codes are in use on this line")


# ---------------------------------------------------------------------------
# Store interface
#
# Everything the relay keeps goes through Store: a transaction around each change, look-ups
# by what a text or a reply needs, claims on pages to send, and housekeeping. Two stores meet it:
# JSON files (one relay) and PostgreSQL (any number of relays).
# ---------------------------------------------------------------------------


class StateLocked(Exception):
    """Another relay holds the state directory."""


class StoreFailure(Exception):
    """The state directory could not be written; nothing is acknowledged as stored."""


class Arrival(typing.NamedTuple):
    """What a store found as it took a text's MessageSid (Store.arrival)."""

    answered: str | None  # not None: the MessageSid was taken before, and answered this ("": nothing)
    joins: Conversation | None  # a customer's new text: the conversation it joins, if any
    code: str | None  # and if none: the reply code for the new one


class Store(abc.ABC):
    """Where the relay keeps its conversations: the relay service talks only to this.

    Two places implement it, side by side below: JSON files under the state directory (JsonStore,
    the default: one relay, everything in memory and journalled) and PostgreSQL (PgStore: the
    database is the truth, and any number of relays share it). A change is made inside
    `transaction()`: read with the look-ups, change with the pure rules, `save`. A save returns a
    ticket; once `wait(ticket)` returns, the change is durable and may be acted on outside.
    """

    SHARED = False  # other relays may take this relay's work: claims are leased, renewed and given up
    RENEW_EVERY: float | None = None  # how often claims are renewed, where they are
    POLL = 1.0  # the sweeper looks at least this often, for work that other relays made due

    clock: Callable[[], float]  # now, for the rules and everything stored (PgStore: the database's clock)

    @abc.abstractmethod
    def open(self) -> None:
        """Get ready to read and write, or raise OSError / StoreFailure saying why not."""

    @abc.abstractmethod
    def heal(self) -> None:
        """After a failure: start again from what is stored, or raise StoreFailure."""

    @property
    @abc.abstractmethod
    def failure(self) -> str | None:
        """Why nothing can be stored now, or None."""

    @abc.abstractmethod
    def writable(self) -> str | None:
        """None when state can be written, else the reason; cheap, and writes nothing."""

    @abc.abstractmethod
    def transaction(self, key: str | None = None, reading: bool = False, redone: bool = False, prompt: bool = False):
        """A context for one change; with `key`, no other change with that key runs meanwhile.
        `reading`: it only looks, and saves nothing. `redone`: nobody is answered on the strength
        of it, so if the store itself crashes and loses it, the work is simply done again (a
        page sent twice at worst); the store need not wait for the disk before it returns.
        `prompt`: somebody waits for its outcome (a text's webhook): a store that cannot do it
        within a few seconds raises StoreFailure rather than make them wait."""

    @abc.abstractmethod
    def arrival(self, sid: str, line: str, sender: str, now: float, customer: bool) -> Arrival:
        """A text's MessageSid taken by this change, unless it was taken before; for a customer's text,
        the conversation it joins (open, held, or still talking on a two-way line), held for this
        change, or else a reply code that no open conversation of the line holds."""

    @abc.abstractmethod
    def knows(self, sid: str) -> bool:
        """Whether the MessageSid was handled already."""

    @abc.abstractmethod
    def get(self, conv_id: str) -> Conversation | None:
        """The conversation, held for this change."""

    @abc.abstractmethod
    def open_on(self, line: str) -> list[Conversation]:
        """The line's open and held conversations, oldest first, to look at only (none is held)."""

    @abc.abstractmethod
    def holding_code(self, line: str, code: str) -> Conversation | None:
        """The line's open or held conversation with this code, held for this change."""

    @abc.abstractmethod
    def newest_paged(self, line: str, phone: str) -> Conversation | None:
        """The line's newest open or held conversation paged to `phone` (see reached_phones)."""

    @abc.abstractmethod
    def talking(self, line: str, now: float) -> list[Conversation]:
        """The line's acknowledged two-way conversations still within their window."""

    @abc.abstractmethod
    def latest_with_code(self, line: str, code: str) -> Conversation | None:
        """The newest conversation, finished or not, that had this code on the line."""

    @abc.abstractmethod
    def take(self, key: str, limit: int, now: float) -> bool:
        """Count one use of a cost cap, unless `limit` were counted in the past hour."""

    @abc.abstractmethod
    def once_every(self, key: str, seconds: float, now: float) -> bool:
        """True (and remembered) if `key` was not marked in the past `seconds`."""

    @abc.abstractmethod
    def save(self, conv: Conversation, in_flight: Container[int] = frozenset(), changed: bool = True):
        """Store the conversation (only its next wake-up when not `changed`); `in_flight`: pages
        this relay is sending now. Returns a ticket for `wait`."""

    @abc.abstractmethod
    def change(
        self,
        conv_id: str,
        apply: Callable[[Conversation], bool],
        in_flight: Callable[[], Container[int]],
        afterwards: bool = False,
    ) -> Conversation | None:
        """A redone change of one conversation, a transaction of its own: `apply` changes it (False:
        nothing to store), then `in_flight()` says which of its pages this relay is sending. Returns
        it once durable. `apply` may run twice, each time on a fresh copy: it changes only the copy.
        `afterwards`: it stores what was done (a send's outcome), and may wait for work on its way."""

    # -- claims: where other relays share the store, each page being sent is this relay's for a
    # short lease, renewed while the send is in flight, so another takes it up if this one dies.

    def claim(self, page: Page, holder: str, now: float) -> bool:
        """Make `page` `holder`'s to send from `now`, where other relays could send it; whether the
        page changed (a store no other relay shares has nothing to mark)."""
        return False

    def claimed_by(self, page: Page, holder: str, now: float | None = None) -> bool:
        """Whether `page` is still `holder`'s to send: no other relay claimed it since (and, given
        `now`, the claim has not lapsed by then)."""
        return True

    def renew(self, in_flight: dict[str, set[int]], holder: str) -> None:
        """Keep `holder`'s claims on the pages it is sending or has queued (conversation id -> page
        indexes); a page another relay has claimed since is left alone."""
        return  # a store no other relay shares has no claims

    def give_up(self, in_flight: dict[str, set[int]], holder: str) -> None:
        """`holder` stops: its claims on these pages end now, and the other relays' sweeps wake."""
        return  # a store no other relay shares has no claims

    def damage_report(self) -> list[tuple[str, int]]:
        """The state files moved aside as damaged since last asked: (name, unreadable records)."""
        return []

    def listen(self, wake: Callable[[], None], stop: threading.Event) -> None:
        """Until `stop`: call `wake` when another relay gives up pages for the others to send."""
        return  # a store no other relay shares has nobody to hear from

    @abc.abstractmethod
    def save_stray(self, sid: str, answer: str | None, now: float):
        """Remember a text that joined no conversation, with its answer. Returns a ticket."""

    @abc.abstractmethod
    def wait(self, ticket) -> None:
        """Return once the change behind the ticket is durable; raise StoreFailure if it never will be."""

    @abc.abstractmethod
    def due(self, now: float, in_flight: dict[str, set[int]], most: int) -> list[Conversation]:
        """At most `most` conversations with a deadline or a page due by `now`, soonest first, each held
        for this change, which saves each of them (the rest stay due for the next)."""

    @abc.abstractmethod
    def next_due(self) -> float | None:
        """When the next conversation falls due."""

    @abc.abstractmethod
    def held(self) -> list[Conversation]:
        """Conversations with texts held by a cost cap, oldest first, each held for this change."""

    @abc.abstractmethod
    def unfinished(self) -> list[Conversation]:
        """Open, held and unanswered conversations, and any with held texts, oldest first (for `status`)."""

    @abc.abstractmethod
    def described(self) -> str:
        """Which store this is, and how many relays run on it now if that can be told (for `status`)."""

    @abc.abstractmethod
    def open_count(self) -> int:
        """How many conversations are open or held."""

    @abc.abstractmethod
    def tidy(self, now: float, retention: int) -> int:
        """Housekeeping: what is finished leaves, after `retention`; returns how much was pruned."""

    @abc.abstractmethod
    def overrides(self, now: float) -> list[Override]:
        """The overrides not yet ended, as every relay on this state sees them."""

    @abc.abstractmethod
    def add_override(self, override: Override) -> None:
        """Keep an override (durable when it returns); within a transaction, part of it."""

    @abc.abstractmethod
    def delete_override(self, override_id: str, now: float) -> Override | None:
        """Delete the override not yet ended with this ID; returns it, or None if there was none."""

    @abc.abstractmethod
    def remind_once(self, key: str, now: float) -> bool:
        """True the first time ever for `key` (a shift's reminder), whatever restarts or relays."""

    @abc.abstractmethod
    def console_record(self, key: str, now: float) -> dict | None:
        """A console sign-in code, link or session kept under `key`, unless it has expired."""

    @abc.abstractmethod
    def keep_console_record(self, key: str, record: dict | None, expires: float) -> None:
        """Keep a console record until `expires` (None drops it); durable when it returns."""

    @abc.abstractmethod
    def history(self, since: float, most: int) -> list[Conversation]:
        """Conversations no longer open or held that arrived since `since`, archived ones too, newest
        first, at most `most`."""

    @abc.abstractmethod
    def note_catch_up(self, began: float, ok: bool) -> None:
        """For `status`: when the last catch-up pass began and whether it went through."""

    @abc.abstractmethod
    def last_catch_up(self) -> tuple[float, bool] | None:
        """What note_catch_up noted last, if anything."""


# ---------------------------------------------------------------------------
# JSON files
#
# Every change to a conversation is appended, as the whole conversation, to a
# journal of JSON lines; the last line for a conversation wins. Appends that
# arrive together share one fsync (group commit), so a webhook is durable
# before its 200 without paying a whole fsync each. Now and then the journal
# is folded into a snapshot written atomically, and finished conversations are
# moved to per-day archive files, which retention deletes whole.
# ---------------------------------------------------------------------------

HOUR = 3600.0


class HourlyWindow:
    """Counts, per key, what happened in the last hour."""

    def __init__(self):
        # Plain lists, oldest first: a flood brings a key per sender, and a deque costs 600 bytes empty.
        self.times: dict[object, list[float]] = {}

    def take(self, key: object, limit: int, now: float) -> bool:
        """Count one more unless `limit` were already counted this past hour."""
        times = self.times.setdefault(key, [])
        del times[: bisect.bisect_right(times, now - HOUR)]
        if len(times) >= limit:
            return False
        times.append(now)
        return True

    def forget_idle(self, now: float) -> int:
        """Drop the keys with nothing in the past hour, so memory follows what is recent; how many."""
        before = len(self.times)
        self.times = {k: t for k, t in self.times.items() if t and t[-1] > now - HOUR}
        return before - len(self.times)


def steady_clock():
    """Wall time as it was at start, moved on by the monotonic clock.

    A step of the wall clock (an NTP jump, an operator's `date -s`) then moves no timer of a
    running relay; stored times stay close to wall time, and a restart takes up the wall clock.
    """
    wall, mono = time.time(), time.monotonic()
    return lambda: wall + (time.monotonic() - mono)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


WRITE_CHUNK = 1024 * 1024


def write_lines(fd: int, lines: Iterable[str]) -> None:
    """Write lines as they come, a megabyte at a time: a fold of a flood is never all in memory at once."""
    buffer = bytearray()
    for line in lines:
        buffer += line.encode()
        buffer += b"\n"
        if len(buffer) >= WRITE_CHUNK:
            write_all(fd, buffer)
            buffer.clear()
    write_all(fd, buffer)


def _write_synced(path: Path, data: bytes | Iterable[str], mode: int) -> None:
    """Write (bytes, or lines) and fsync; a write that fails is undone, so no half line is left for the
    next one to follow."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | mode, 0o600)
    try:
        size = os.fstat(fd).st_size
        try:
            if isinstance(data, bytes):
                write_all(fd, data)
            else:
                write_lines(fd, data)
            os.fsync(fd)
        except OSError:
            _truncate_quietly(fd, size)
            raise
    finally:
        os.close(fd)


def _truncate_quietly(fd: int, size: int) -> None:
    try:
        os.ftruncate(fd, size)
    except OSError:
        pass  # what is past `size` is a torn line, and reading skips it


def write_atomically(path: Path, data: bytes | Iterable[str]) -> None:
    """Temp file, fsync, rename, fsync the directory: the file is the old one or the new, never half."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        _write_synced(tmp, data, os.O_TRUNC)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def append_durably(path: Path, data: bytes | Iterable[str]) -> None:
    _write_synced(path, data, os.O_APPEND)


def json_lines(path: Path) -> Iterator[dict | None]:
    """Each complete line of a JSON-lines file, decoded, or None for one that cannot be read.

    One at a time, so a large file is never all in memory at once. A torn last line (a crash
    mid-append) is no damage: it was never acknowledged.
    """
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            try:
                record = json.loads(raw)
            except ValueError:
                record = None
            yield record if isinstance(record, dict) else None


def cut_torn_tail(path: Path, chunk: int = 4096) -> None:
    """Cut a torn last line (a crash mid-append) off a JSON-lines file; it was never acknowledged."""
    with open(path, "r+b") as f:
        end = f.seek(0, os.SEEK_END)
        keep = end
        while keep > 0:
            start = max(0, keep - chunk)
            f.seek(start)
            tail = f.read(keep - start)
            if (newline := tail.rfind(b"\n")) >= 0:
                keep = start + newline + 1
                break
            keep = start
        if keep < end:
            f.truncate(keep)
            os.fsync(f.fileno())


def read_json_lines(path: Path) -> list[dict]:
    """The readable lines of a (small) JSON-lines file."""
    return [record for record in json_lines(path) if record is not None]


def archived_sids(path: Path):
    """The message sids of an archive file, reading only each line's leading `"sids"` list."""
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            try:
                yield from json.loads(raw[: raw.find(b"]") + 1] + b"}")["sids"]
            except ValueError:  # a sid with a "]" in it: read the whole line
                try:
                    yield from json.loads(raw)["sids"]
                except ValueError:
                    log("error", "state_line_unreadable", file=path.name)


def file_version(path: Path) -> tuple | None:
    """What tells a file rewritten or appended to since it was read: its inode, size and mtime."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


@contextlib.contextmanager
def locked_file(path: Path) -> Iterator[int]:
    """The file (created if need be) open for appending under an flock, which every writer of it
    takes; a file replaced meanwhile (rewritten whole by another) is opened anew."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        os.close(fd)
    try:
        yield fd
    finally:
        os.close(fd)


class ConsoleFile:
    """The console's sign-in codes, links and sessions (keys hashed), with the Store's methods for
    them: one JSON file rewritten whole under locked_file, since `relay.py login-link` writes it too."""

    def __init__(self, path: Path, clock: Callable[[], float]):
        self.path = path
        self.clock = clock
        self.seen: tuple | None = None
        self.records: dict[str, dict] = {}  # key -> {"record", "expires"}

    def _load(self) -> None:
        version = file_version(self.path)
        if version is None:
            self.seen, self.records = None, {}
        elif version != self.seen:
            try:
                records = json.loads(self.path.read_bytes() or b"{}")
            except ValueError:
                records = {}  # a damaged file signs everyone out, and nothing else
            self.seen, self.records = version, records

    def console_record(self, key: str, now: float) -> dict | None:
        self._load()
        kept = self.records.get(key)
        return dict(kept["record"]) if kept and kept["expires"] > now else None

    def keep_console_record(self, key: str, record: dict | None, expires: float) -> None:
        try:
            with locked_file(self.path):
                self._load()
                now = self.clock()
                records = {k: v for k, v in self.records.items() if v["expires"] > now and k != key}
                if record is not None:
                    records[key] = {"record": record, "expires": expires}
                write_atomically(self.path, json.dumps(records).encode())
                self.seen, self.records = None, records
        except OSError as e:
            raise StoreFailure(f"{self.path}: {e.strerror}") from None


SCHEDULE_FILE = "schedule.jsonl"
CONSOLE_FILE = "console.json"  # the console's sign-in codes and sessions (hashed), rewritten whole


class ScheduleFile:
    """Overrides and the reminders sent, as JSON lines, with the Store's methods for them.

    `relay.py override` appends to it while the relay runs. Every writer appends under an flock of
    the file; the relay rewrites it without what has ended under the same lock, and a writer that
    then finds the file replaced opens it anew."""

    def __init__(self, path: Path):
        self.path = path
        self.seen: tuple | None = None  # the file's identity and size when last read
        self.made: dict[str, Override] = {}  # by ID, ended ones too until tidied
        self.reminded: dict[str, float] = {}

    @contextlib.contextmanager
    def _locked(self) -> Iterator[int]:
        with locked_file(self.path) as fd:
            self.load()
            yield fd

    def load(self) -> None:
        """Read the file again if it changed; a torn or garbled line (a crash mid-append) is skipped."""
        version = file_version(self.path)
        if version is None:
            self.seen, self.made, self.reminded = None, {}, {}
            return
        if version == self.seen:
            return
        overrides, reminded = {}, {}
        for record in json_lines(self.path):
            with contextlib.suppress(TypeError, KeyError, AttributeError):
                if "override" in record:
                    override = Override(**record["override"])
                    overrides[override.id] = override
                elif "deleted" in record:
                    overrides.pop(record["deleted"], None)
                elif "reminded" in record:
                    reminded[record["reminded"]] = float(record["at"])
        self.seen, self.made, self.reminded = version, overrides, reminded

    def _append(self, fd: int, record: dict) -> None:
        try:
            write_all(fd, (json.dumps(record, ensure_ascii=False) + "\n").encode())
            os.fsync(fd)
        except OSError as e:
            raise StoreFailure(f"{self.path}: {e.strerror}") from None
        self.seen = None  # read again next time, with what others appended

    def add_override(self, override: Override) -> None:
        with self._locked() as fd:
            self._append(fd, {"override": dataclasses.asdict(override)})
        self.made[override.id] = override

    def delete_override(self, override_id: str, now: float) -> Override | None:
        with self._locked() as fd:
            override = self.made.get(override_id)
            if override is None or override.end <= now:
                return None
            self._append(fd, {"deleted": override_id})
        return self.made.pop(override_id)

    def remind_once(self, key: str, now: float) -> bool:
        with self._locked() as fd:
            if key in self.reminded:
                return False
            self._append(fd, {"reminded": key, "at": now})
        self.reminded[key] = now
        return True

    def overrides(self, now: float) -> list[Override]:
        self.load()
        return [o for o in self.made.values() if o.end > now]

    def tidy(self, now: float, retention: int) -> None:
        """Rewrite the file without what ended more than `retention` ago, when there is any."""
        if not self.path.exists():
            return
        with self._locked():
            cutoff = now - retention
            if all(o.end > cutoff for o in self.made.values()) and all(at > cutoff for at in self.reminded.values()):
                return
            kept = [{"override": dataclasses.asdict(o)} for o in self.made.values() if o.end > cutoff]
            kept += [{"reminded": key, "at": at} for key, at in self.reminded.items() if at > cutoff]
            write_atomically(self.path, (json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
            self.seen = None


class Journal:
    """An append-only file of lines; appends waiting together share one fsync."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.size = os.fstat(self.fd).st_size
        if not self.size:  # a new file: its name must last as its lines do
            _fsync_dir(path.parent)
        self.cv = threading.Condition()
        self.queued: list[bytes] = []
        self.enqueued = 0
        self.durable = 0
        self.flushing = False
        self.failure: OSError | None = None

    def append(self, line: bytes) -> int:
        with self.cv:
            self.queued.append(line)
            self.enqueued += 1
            return self.enqueued

    def wait(self, ticket: int) -> None:
        """Return once the line with this ticket is on disk; the first waiter writes for all.

        After a failed write the journal takes nothing more: the store is reopened from disk.
        """
        with self.cv:
            while self.durable < ticket and not self.failure:
                if self.flushing:
                    self.cv.wait()
                    continue
                self.flushing, batch, self.queued = True, self.queued, []
                upto = self.enqueued
                self.cv.release()
                try:
                    data = b"".join(batch)
                    write_all(self.fd, data)
                    os.fsync(self.fd)
                except OSError as e:
                    failure: OSError | None = e
                    _truncate_quietly(self.fd, self.size)
                else:
                    failure = None
                finally:
                    self.cv.acquire()
                self.flushing = False
                self.failure = failure
                if not failure:
                    self.durable = upto
                    self.size += len(data)
                self.cv.notify_all()
            if self.durable < ticket:  # a line already on disk stays acknowledged, even once the journal closed
                raise StoreFailure(f"cannot write {self.path.name}: {self.failure.strerror}")

    def close(self, flush: bool = True) -> None:
        """Flush (unless told not to) and close; the descriptor is never used again, even if reused."""
        try:
            if flush:
                self.wait(self.enqueued)
        finally:
            with self.cv:
                if self.fd >= 0:
                    os.close(self.fd)
                    self.fd = -1
                    self.failure = self.failure or OSError(errno.EBADF, "journal closed")


class StateDirectory:
    """The JSON store's directory: held by one relay at a time (an OS lock on `relay.lock`), 0700
    with its files 0600."""

    LOCK = "relay.lock"

    def __init__(self, path: Path):
        self.path = path

    def acquire(self) -> int:
        """Lock it for this relay (the lock's descriptor), tighten its modes, drop cut-short writes."""
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)
        fd = os.open(self.path / self.LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateLocked(f"{self.path}: another relay is running on this state directory") from None
        for path in self.path.iterdir():
            if path.is_file() and stat.S_IMODE(path.stat().st_mode) & 0o077:
                os.chmod(path, 0o600)
            if path.name.endswith(".tmp"):  # a write cut short by a kill: never renamed into place
                path.unlink()
        return fd

    def running(self) -> str:
        """Whether a relay runs on it now, in words (for `status`)."""
        try:
            lock = (self.path / self.LOCK).stat()
            with open("/proc/locks") as locks:  # asked, not taken: a relay starting meanwhile must not be refused
                held = any(f":{lock.st_ino} " in row and "FLOCK" in row for row in locks)
            return "a relay is running on it" if held else "no relay is running on it"
        except FileNotFoundError:
            return "no relay has run on it yet"
        except OSError:
            return "whether a relay runs on it cannot be told here"

    def unwritable(self) -> str | None:
        """Why nothing can be written there now, or None. Writes nothing."""
        if not os.access(self.path, os.W_OK):
            return f"state directory {self.path} is not writable"
        if os.statvfs(self.path).f_bavail == 0:
            return f"state directory {self.path} is full"
        return None


class ArchiveFiles:
    """Finished conversations, one JSON-lines file a day (`archive-YYYY-MM-DD.jsonl`), deleted whole
    once the day is past the retention. Only the hashes of their texts' MessageSids stay in memory,
    so a retry of an archived text is known without reading it back."""

    def __init__(self, directory: Path):
        self.dir = directory
        # Each day's MessageSids as a sorted array of their hash() values: 8 bytes a text, no Python
        # object each (so a flood's leftovers do not pin freed memory), and a chance of about 1e-14
        # per new text of being taken for a duplicate.
        self.days: dict[str, array.array] = {}

    def paths(self, newest_first: bool = False) -> list[Path]:
        return sorted(self.dir.glob("archive-*.jsonl"), reverse=newest_first)

    def load(self) -> None:
        for path in self.paths():
            day = path.name[len("archive-") : -len(".jsonl")]
            self.days[day] = array.array("q", sorted(hash(sid) for sid in archived_sids(path)))

    def knows(self, sid: str) -> bool:
        key = hash(sid)
        for hashes in self.days.values():
            at = bisect.bisect_left(hashes, key)
            if at < len(hashes) and hashes[at] == key:
                return True
        return False

    def add(self, settled: list[tuple[Conversation, str, list[str]]]) -> None:
        """Append each (conversation, the day it ended, its MessageSids) to its day's file, durably."""
        for day in sorted({day for _, day, _ in settled}):
            lines = (
                json.dumps({"sids": sids, "conversation": conv.to_dict()}, ensure_ascii=False)
                for conv, settled_on, sids in settled
                if settled_on == day
            )
            append_durably(self.dir / f"archive-{day}.jsonl", lines)
        hashes: dict[str, list[int]] = {}
        for _, day, sids in settled:
            hashes.setdefault(day, []).extend(map(hash, sids))
        for day, more in hashes.items():
            self.days[day] = array.array("q", sorted([*self.days.get(day, ()), *more]))

    def prune(self, now: float, retention: int) -> int:
        """Delete the days wholly older than the retention; returns how many."""
        cutoff = time.strftime("%Y-%m-%d", time.gmtime(now - retention - 86400))
        pruned = 0
        for day in sorted(self.days):
            if day <= cutoff:
                (self.dir / f"archive-{day}.jsonl").unlink(missing_ok=True)
                del self.days[day]
                pruned += 1
        return pruned

    def conversations(self, newest_first: bool = False) -> Iterator[Conversation]:
        """Every archived conversation, day by day (unreadable lines and vanished files passed over)."""
        for path in self.paths(newest_first):
            with contextlib.suppress(OSError):
                for record in json_lines(path):
                    if record and "conversation" in record:
                        yield Conversation.from_json(record["conversation"])


class JsonStore(Store):
    """Conversations on disk under one directory, held by one relay at a time, and all in memory.

    Its own lock guards it: a transaction is holding that lock.
    """

    SNAPSHOT = "conversations.jsonl"
    CATCH_UP = "catch_up.json"
    FOLD_BYTES = 4 * 1024 * 1024
    FOLD_EVERY = 3600.0  # so a quiet line's finished conversations still reach the archive and retention
    FOLD_MARGIN = 64 * 1024  # room kept beyond the snapshot's size, for the journal's next lines

    def __init__(self, directory: Path):
        self.dir = directory
        self.lock_fd: int | None = None
        self.journal: Journal | None = None
        self.failed: str | None = "state not open"  # why the state cannot be written, until it is (re)opened
        self.lock = threading.RLock()  # everything is memory: a change holds it from first read to save
        self.clock = steady_clock()
        self.caps = HourlyWindow()  # cost caps: what was sent this past hour, per cap
        self.marks: dict[str, float] = {}  # once_every's keys, when last marked
        self.schedule = ScheduleFile(directory / SCHEDULE_FILE)
        self.console = ConsoleFile(directory / CONSOLE_FILE, self.clock)
        self.codes: dict[str, int] = {}  # line -> the last reply code given
        self.retention = Config.retention  # as tidy was last told: how long unanswered ones stay listed
        self.fold_waiting = False  # a fold is due but the disk has no room for it (said once)
        self.forgotten = 0  # conversations archived and senders forgotten since memory was last given back
        self._forget()

    def _forget(self) -> None:
        self.conversations: dict[str, Conversation] = {}  # all not yet archived
        self.written: dict[str, tuple] = {}  # conversation id -> what the journal has of it (see delta_json)
        self.seen: dict[str, str] = {}  # message sid -> conversation id, for those above
        # Texts that belong to no conversation (a contact's reply that matched nothing, a keyword):
        # remembered with their answer, so a retry of one changes nothing and gets the same answer.
        self.strays: dict[str, dict] = {}
        self.archive = ArchiveFiles(self.dir)
        self.generation = 0
        self.folded_at = time.monotonic()
        self.damaged: list[tuple[str, int]] = []  # (file moved aside, records it could not read)
        self._index_all()

    # -- opening ----------------------------------------------------------

    def acquire(self) -> None:
        self.lock_fd = StateDirectory(self.dir).acquire()

    def export(self, now: float) -> tuple[list[Conversation], list[dict], list[Override]]:
        """Everything another store needs to take this one's place: its conversations (archived
        ones too, so a late retry of their texts pages nobody), the other texts it remembers, and
        the overrides now or to come."""
        convs = [*self.conversations.values(), *self.archive.conversations()]
        return convs, list(self.strays.values()), self.schedule.overrides(now)

    def load(self, archive: bool = True, quarantine: bool = False) -> None:
        """Read snapshot, journals and (unless told not to) the archive; safe without the lock.

        With `quarantine` (with the directory locked), a file with unreadable records is moved aside, kept,
        and listed in `damaged`; everything readable in it is kept.
        """
        snapshot_path = self.dir / self.SNAPSHOT
        first_journal = 0
        if snapshot_path.exists():  # a header line (with how many records follow), then one record a line
            records = json_lines(snapshot_path)
            header = next(records, None)
            if header is not None and "generation" in header:
                first_journal, damaged, expected = header["generation"], 0, header.get("records")
            else:  # no header: a damaged file, and the first line may be a record
                records, damaged, expected = itertools.chain([header] if header else [], records), 1, None
            self._read_records(snapshot_path, records, damaged, quarantine, expected)
        self.generation = first_journal
        for gen, path in self._journals():
            self.generation = max(self.generation, gen)
            if gen >= first_journal:
                self._read_records(path, json_lines(path), 0, quarantine)
        if archive:
            self.archive.load()

    def _read_records(
        self, path: Path, records: Iterator[dict | None], damaged: int, quarantine: bool, expected: int | None = None
    ) -> None:
        """Read records into memory, counting what cannot be read; a file that said how many it holds
        and holds fewer lines (whole lines lost) counts the missing ones as damaged too."""
        lines = 0
        for data in records:
            lines += 1
            if data is None:
                damaged += 1
                continue
            try:
                if "stray" in data:
                    self.strays[data["stray"]["sid"]] = data["stray"]
                elif "delta" in data:
                    conv = self.conversations[data["delta"]]
                    conv.apply_delta(data)
                    self._remember(conv)
                else:
                    self._remember(Conversation.from_json(data))
            except (KeyError, TypeError, ValueError, AttributeError):
                damaged += 1
        if isinstance(expected, int) and lines < expected:
            damaged += expected - lines
        if damaged:
            aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d%H%M%S')}")
            log("error", "state_file_damaged", file=path.name, unreadable_records=damaged, moved_to=aside.name)
            if quarantine:
                os.replace(path, aside)
                self.damaged.append((aside.name, damaged))

    def open(self) -> None:
        """Take the lock, read everything, and get ready to write (or raise OSError saying why not)."""
        self.acquire()
        self._start()

    def _start(self) -> None:
        self.load(quarantine=True)
        self._index_all()
        self.written = {cid: conv.written_mark() for cid, conv in self.conversations.items()}
        # A probe first: a full disk is said plainly here, not found at the first text.
        write_atomically(self.dir / ".probe", b"x" * 4096)
        (self.dir / ".probe").unlink()
        if self.damaged:  # what was read of a file moved aside is only in memory: write it out now
            self.fold()
        else:
            # A fresh journal after the last, with no fold: a start or heal on a nearly full disk needs
            # room for a line, not for a new snapshot beside the old (the fold waits until there is room).
            journals = self._journals()
            for _, path in journals:
                cut_torn_tail(path)
            fresh = journals[-1][0] + 1 if journals and journals[-1][1].stat().st_size else self.generation
            self.generation = max(self.generation, fresh)
            self.journal = Journal(self.dir / f"journal-{self.generation:08d}.jsonl")
        self.failed = None

    def heal(self) -> None:
        """After a failed write: forget what is in memory and start again from what is on disk."""
        with self.lock:
            self._heal()

    def _heal(self) -> None:
        self._close_journal(flush=False)
        self._forget()
        try:
            self._start()
        except OSError as e:
            self.failed = f"cannot write {self.dir}: {e.strerror}"
            raise StoreFailure(self.failed) from None

    def _close_journal(self, flush: bool) -> None:
        """Take the journal out, then close it: closed and still in place, it would read as failed
        to a text or health check that looks without the lock (see `failure`)."""
        journal, self.journal = self.journal, None
        if journal:
            journal.close(flush=flush)

    def _journals(self) -> list[tuple[int, Path]]:
        found = []
        for path in self.dir.glob("journal-*.jsonl"):
            number = path.name[len("journal-") : -len(".jsonl")]
            if number.isdigit():
                found.append((int(number), path))
        return sorted(found)

    # -- look-ups (in a transaction) -------------------------------------

    def _index_all(self) -> None:
        """Build look-ups and timers afresh from the conversations."""
        self.timers: list[tuple[float, str]] = []
        self.open_by_sender: dict[tuple[str, str], str] = {}  # open or held, by customer
        self.open_codes: dict[str, dict[str, str]] = {}  # line -> code -> conversation id (open or held)
        self.two_way: dict[tuple[str, str], str] = {}  # two-way conversations acknowledged, by customer
        self.holding: set[str] = set()  # conversations with pages held by a cap
        for conv in self.conversations.values():
            self._index(conv, frozenset())
            if conv.code.isdigit():
                self.codes[conv.line] = max(self.codes.get(conv.line, 0), int(conv.code))

    def _index(self, conv: Conversation, in_flight: Container[int]) -> None:
        """Keep look-ups and timers in step with the conversation's state."""
        key = (conv.line, conv.sender)
        codes = self.open_codes.setdefault(conv.line, {})
        if conv.status in (OPEN_STATUS, HELD_STATUS):
            self.open_by_sender[key] = conv.id
            codes[conv.code] = conv.id
        else:
            if self.open_by_sender.get(key) == conv.id:
                del self.open_by_sender[key]
            if codes.get(conv.code) == conv.id:
                del codes[conv.code]
            if conv.two_way and conv.status == "acknowledged":
                self.two_way[key] = conv.id
        if held_pages(conv):
            self.holding.add(conv.id)
        else:
            self.holding.discard(conv.id)
        when = next_wakeup(conv, in_flight)
        if when is not None:
            heapq.heappush(self.timers, (when, conv.id))

    def transaction(self, key: str | None = None, reading: bool = False, redone: bool = False, prompt: bool = False):
        return self.lock

    def arrival(self, sid: str, line: str, sender: str, now: float, customer: bool) -> Arrival:
        answered = self.answer_to(sid)
        if answered is not None or not customer:
            return Arrival(answered, None, None)
        joins = self.live(line, sender, now)
        return Arrival(None, joins, None if joins else self.new_code(line))

    def answer_to(self, sid: str) -> str | None:
        """None for a MessageSid never seen (now taken by this change), else the answer it got ("" none)."""
        if not self.knows(sid):
            return None
        if sid in self.strays:
            return self.strays[sid]["answer"] or ""
        conv = self.conversations.get(self.seen.get(sid, ""))
        said = [*conv.messages, *conv.replies] if conv else []
        return next((m.get("answer") for m in said if m["sid"] == sid), None) or ""

    def knows(self, sid: str) -> bool:
        return sid in self.seen or sid in self.strays or self.archive.knows(sid)

    def get(self, conv_id: str) -> Conversation | None:
        return self.conversations.get(conv_id)

    def live(self, line: str, sender: str, now: float) -> Conversation | None:
        for index in (self.open_by_sender, self.two_way):
            conv = self.conversations.get(index.get((line, sender), ""))
            if conv and (conv.status in (OPEN_STATUS, HELD_STATUS) or conv.is_live_two_way(now)):
                return conv
        return None

    def _open(self, line: str) -> Iterator[Conversation]:
        return (self.conversations[cid] for cid in self.open_codes.get(line, {}).values())

    def open_on(self, line: str) -> list[Conversation]:
        return sorted(self._open(line), key=lambda c: c.created)

    def holding_code(self, line: str, code: str) -> Conversation | None:
        return self.conversations.get(self.open_codes.get(line, {}).get(code, ""))

    def newest_paged(self, line: str, phone: str) -> Conversation | None:
        paged = (c for c in self._open(line) if phone in reached_phones(c))
        return max(paged, key=lambda c: c.created, default=None)

    def talking(self, line: str, now: float) -> list[Conversation]:
        return [
            conv
            for cid in self.two_way.values()
            if (conv := self.conversations.get(cid)) and conv.line == line and conv.is_live_two_way(now)
        ]

    def latest_with_code(self, line: str, code: str) -> Conversation | None:
        had = [c for c in self.conversations.values() if c.line == line and c.code == code]
        return max(had, key=lambda c: c.created, default=None)

    def new_code(self, line: str) -> str:
        code, self.codes[line] = next_code(self.open_codes.get(line, {}), self.codes.get(line, 0))
        return code

    def take(self, key: str, limit: int, now: float) -> bool:
        return self.caps.take(key, limit, now)

    def once_every(self, key: str, seconds: float, now: float) -> bool:
        if now - self.marks.get(key, -seconds) < seconds:
            return False
        self.marks[key] = now
        return True

    def due(self, now: float, in_flight: dict[str, set[int]], most: int) -> list[Conversation]:
        found: dict[str, Conversation] = {}
        while self.timers and self.timers[0][0] <= now and len(found) < most:
            _, conv_id = heapq.heappop(self.timers)
            conv = self.conversations.get(conv_id)
            due = next_wakeup(conv, in_flight.get(conv_id, frozenset())) if conv else None
            if due is not None and due <= now:  # else a stale timer: the conversation has its own entry
                found[conv_id] = conv
        return list(found.values())

    def next_due(self) -> float | None:
        return self.timers[0][0] if self.timers else None

    def held(self) -> list[Conversation]:
        return sorted((self.conversations[cid] for cid in self.holding), key=lambda c: c.created)

    def unfinished(self) -> list[Conversation]:
        return sorted(
            (c for c in self.conversations.values() if c.is_takeable or held_pages(c)),
            key=lambda c: c.created,
        )

    def open_count(self) -> int:
        return len(self.open_by_sender)

    def described(self) -> str:
        return f"JSON files under {self.dir}; {StateDirectory(self.dir).running()}"

    # -- writing ----------------------------------------------------------

    def _remember(self, conv: Conversation) -> None:
        self.conversations[conv.id] = conv
        for sid in conv.sids():
            self.seen[sid] = conv.id

    def _append(self, record: str) -> tuple[Journal, int]:
        if self.failure:
            raise StoreFailure(self.failure)
        return self.journal, self.journal.append((record + "\n").encode())

    def save(self, conv: Conversation, in_flight: Container[int] = frozenset(), changed: bool = True):
        self._index(conv, in_flight)
        if not changed:
            return None
        self._remember(conv)
        mark = self.written.get(conv.id)
        ticket = self._append(conv.to_json() if mark is None else conv.delta_json(mark))
        self.written[conv.id] = conv.written_mark()
        return ticket

    def change(self, conv_id, apply, in_flight, afterwards=False) -> Conversation | None:
        with self.lock:
            conv = self.get(conv_id)
            if conv is None or not apply(conv):
                return conv
            ticket = self.save(conv, in_flight())
        self.wait(ticket)
        return conv

    def save_stray(self, sid: str, answer: str | None, now: float) -> tuple[Journal, int]:
        self.strays[sid] = stray = {"sid": sid, "answer": answer, "at": now}
        return self._append(json.dumps({"stray": stray}, ensure_ascii=False))

    def wait(self, ticket: tuple[Journal, int] | None) -> None:
        if ticket is not None:
            journal, number = ticket
            journal.wait(number)

    @property
    def failure(self) -> str | None:
        # Read without the lock: a fold or a heal may be between journals, and a text or a health
        # check that comes then waits for the lock (or finds `failed` set), never "no journal".
        if self.failed:
            return self.failed
        journal = self.journal
        if journal is not None and journal.failure:
            return f"cannot write {journal.path.name}: {journal.failure.strerror}"
        return None

    def damage_report(self) -> list[tuple[str, int]]:
        report, self.damaged = self.damaged, []
        return report

    def needs_fold(self) -> bool:
        if self.journal.size > self.FOLD_BYTES:
            return True
        return self.journal.size > 0 and time.monotonic() - self.folded_at > self.FOLD_EVERY

    def room_to_fold(self) -> bool:
        """A new snapshot fits beside the files it replaces (it is never bigger than they are together)."""
        files = [self.dir / self.SNAPSHOT, *(path for _, path in self._journals())]
        needed = sum(path.stat().st_size for path in files if path.exists()) + self.FOLD_MARGIN
        disk = os.statvfs(self.dir)
        if disk.f_bavail * disk.f_frsize >= needed:
            self.fold_waiting = False
            return True
        if not self.fold_waiting:
            self.fold_waiting = True
            log("warning", "fold_waits_for_room", needed_bytes=needed, free_bytes=disk.f_bavail * disk.f_frsize)
        return False

    def fold(self) -> None:
        """Move settled conversations to the archive and fold the journal into a snapshot.

        The caller is in a transaction, so nothing is appended meanwhile. A fold that fails
        leaves the store failed (and the files as they were, or the new snapshot complete).
        """
        try:
            self._fold()
        except (OSError, StoreFailure) as e:
            self.failed = f"cannot fold {self.dir}: {getattr(e, 'strerror', None) or e}"
            raise StoreFailure(self.failed) from None

    def tidy(self, now: float, retention: int) -> int:
        """Fold when due, prune past retention, forget idle cap keys; shrink memory after a flood."""
        with self.lock:
            return self._tidy(now, retention)

    def overrides(self, now: float) -> list[Override]:
        return self.schedule.overrides(now)

    def add_override(self, override: Override) -> None:
        self.schedule.add_override(override)

    def delete_override(self, override_id: str, now: float) -> Override | None:
        return self.schedule.delete_override(override_id, now)

    def remind_once(self, key: str, now: float) -> bool:
        return self.schedule.remind_once(key, now)

    def console_record(self, key: str, now: float) -> dict | None:
        return self.console.console_record(key, now)

    def keep_console_record(self, key: str, record: dict | None, expires: float) -> None:
        self.console.keep_console_record(key, record, expires)

    def history(self, since: float, most: int) -> list[Conversation]:
        with self.lock:
            found = {c.id: c for c in self.conversations.values() if not c.is_open and c.status != HELD_STATUS}
        # Newest day first, whole days, until `most` are found: a long retention's archives are not
        # all read into memory for one page of history.
        for conv in self.archive.conversations(newest_first=True):
            if len(found) >= most:
                break
            if conv.created >= since:
                found.setdefault(conv.id, conv)
        kept = sorted((c for c in found.values() if c.created >= since), key=lambda c: c.created, reverse=True)
        return kept[:most]

    def _tidy(self, now: float, retention: int) -> int:
        self.retention = retention
        with contextlib.suppress(OSError):  # tried again at the next tidy; what it would drop has ended
            self.schedule.tidy(now, retention)
        if self.needs_fold() and self.room_to_fold():
            before = len(self.conversations)
            self.fold()
            self.two_way = {k: v for k, v in self.two_way.items() if v in self.conversations}
            self.forgotten += before - len(self.conversations)
        pruned = self.prune(now, retention)
        self.forgotten += self.caps.forget_idle(now)
        if self.forgotten > 1000:
            # A dict keeps the size of its busiest moment: rebuilt, the look-ups shrink to what is open.
            self.forgotten = 0
            self.conversations = dict(self.conversations)
            self.seen = dict(self.seen)
            self.strays = dict(self.strays)
            self._index_all()
            give_memory_back()
        return pruned

    def _fold(self) -> None:
        self._close_journal(flush=True)
        self.folded_at = time.monotonic()
        now = self.clock()
        unlisted = unanswered_beyond_listing(self.conversations.values(), now)
        settled = [
            (conv, time.strftime("%Y-%m-%d", time.gmtime(conv.finished_at)), conv.sids())
            for conv in self.conversations.values()
            if conv.is_settled(now, self.retention) or conv.id in unlisted
        ]
        self.archive.add(settled)
        # Only once the archive is on disk do the conversations leave the snapshot.
        for conv, _, sids in settled:
            for sid in sids:
                self.seen.pop(sid, None)
            del self.conversations[conv.id]
            self.written.pop(conv.id, None)
        lines = itertools.chain(
            [json.dumps({"generation": self.generation + 1, "records": len(self.conversations) + len(self.strays)})],
            (c.to_json() for c in self.conversations.values()),
            (json.dumps({"stray": stray}, ensure_ascii=False) for stray in self.strays.values()),
        )
        write_atomically(self.dir / self.SNAPSHOT, lines)
        self.written = {cid: conv.written_mark() for cid, conv in self.conversations.items()}
        self.generation += 1
        for gen, path in self._journals():
            if gen < self.generation:
                path.unlink()
        self.journal = Journal(self.dir / f"journal-{self.generation:08d}.jsonl")

    def prune(self, now: float, retention: int) -> int:
        """Delete archive days wholly older than the retention; returns how many."""
        pruned = self.archive.prune(now, retention)
        # Strays leave memory now and the snapshot at the next fold.
        self.strays = {sid: s for sid, s in self.strays.items() if s["at"] > now - retention}
        return pruned

    def note_catch_up(self, began: float, ok: bool) -> None:
        write_atomically(self.dir / self.CATCH_UP, json.dumps({"last_pass": began, "ok": ok}).encode())

    def last_catch_up(self) -> tuple[float, bool] | None:
        try:
            last = json.loads((self.dir / self.CATCH_UP).read_text())
            return last["last_pass"], last["ok"]
        except (OSError, ValueError, KeyError):
            return None

    def writable(self) -> str | None:
        """None when the state can be written, else the reason. Writes nothing."""
        return self.failure or StateDirectory(self.dir).unwritable()


def read_state_while_running(directory: Path, tries: int = 5) -> JsonStore:
    """The state a running relay may be folding meanwhile (for `status` and `import-state`):
    read again if the snapshot changed as it was read."""
    snapshot = directory / JsonStore.SNAPSHOT

    def version():
        return (snapshot.stat().st_ino, snapshot.stat().st_mtime_ns) if snapshot.exists() else None

    for _ in range(tries):
        store, before = JsonStore(directory), version()
        try:
            if directory.exists():
                store.load(archive=False)
        except FileNotFoundError:  # a journal folded away as we read
            continue
        if version() == before:
            break
    return store


# ---------------------------------------------------------------------------
# PostgreSQL
#
# The database is the truth: each change is one transaction that reads its rows under a
# lock, runs the same rules, and writes them back. Due work is taken with SKIP LOCKED, pages
# to send are claimed under short leases, and every round trip has a deadline of its own.
# ---------------------------------------------------------------------------

psycopg = Json = None  # set by import_psycopg(), where a database is used


def import_psycopg() -> None:
    """psycopg, imported only where a database is used: it costs 13 MB a relay on files never uses."""
    global psycopg, Json
    import psycopg
    from psycopg.types.json import Json


class SchemaRefused(Exception):
    """The database holds a schema from a newer relay than this one, or one the relay cannot mend."""


OPEN_SQL = "status IN ('open', 'held')"
# A conversation saved: its columns (PgStore._identity, then PgStore._changing), or only those that change
INSERT_CONVERSATION = """INSERT INTO relay_conversations
    (id, line, sender, code, created, two_way, status, finished_at, held, wake_at, doc)
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
    ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status, finished_at = EXCLUDED.finished_at,
    held = EXCLUDED.held, wake_at = EXCLUDED.wake_at, doc = EXCLUDED.doc"""
UPDATE_CONVERSATION = (
    "UPDATE relay_conversations SET status = %s, finished_at = %s, held = %s, wake_at = %s, doc = %s WHERE id = %s"
)
OVERRIDE_COLUMNS = "id, rotation, name, phone, start_at, end_at, replaces, made"

# Each version's statements bring the schema from the version before it. Times are seconds since the
# epoch on the database's clock (PgStore.clock), as the JSON store keeps them on the local one.
SCHEMA = {
    1: [
        """CREATE TABLE relay_conversations (
            id text PRIMARY KEY,
            line text NOT NULL,
            sender text NOT NULL,
            code text NOT NULL,
            status text NOT NULL,
            created double precision NOT NULL,
            finished_at double precision,
            two_way boolean NOT NULL,
            held boolean NOT NULL,
            wake_at double precision,
            doc json NOT NULL
        )""",
        "CREATE INDEX relay_conversations_wake ON relay_conversations (wake_at) WHERE wake_at IS NOT NULL",
        "CREATE INDEX relay_conversations_sender ON relay_conversations (line, sender)",
        "CREATE INDEX relay_conversations_code ON relay_conversations (line, code, created)",
        # Codes come from the relay_codes sequence, skipping open ones; this makes a slip impossible to store.
        """CREATE UNIQUE INDEX relay_conversations_open_code ON relay_conversations (line, code)
            WHERE status IN ('open', 'held')""",
        "CREATE INDEX relay_conversations_held ON relay_conversations (created) WHERE held",
        "CREATE INDEX relay_conversations_finished ON relay_conversations (finished_at)",
        """CREATE TABLE relay_messages (
            sid text PRIMARY KEY,
            conversation text,
            answer text,
            at double precision NOT NULL
        )""",
        "CREATE INDEX relay_messages_at ON relay_messages (at)",
        "CREATE INDEX relay_messages_conversation ON relay_messages (conversation)",  # retention
        f"CREATE SEQUENCE relay_codes MAXVALUE {MAX_CODE} CYCLE",
        "CREATE TABLE relay_cap_uses (key text NOT NULL, at double precision NOT NULL)",
        "CREATE INDEX relay_cap_uses_key ON relay_cap_uses (key, at)",
        "CREATE TABLE relay_marks (key text PRIMARY KEY, at double precision NOT NULL)",
    ],
    2: [
        # Each of these runs in the caller's transaction, in one round trip. Every statement in a
        # volatile function sees what was committed before it began: after a lock, the last holder's work.
        f"""CREATE FUNCTION relay_new_code(on_line text) RETURNS text LANGUAGE plpgsql AS $$
            DECLARE
                candidate text;
            BEGIN
                FOR i IN 1..{MAX_CODE} LOOP
                    candidate := nextval('relay_codes')::text;
                    IF NOT EXISTS (SELECT FROM relay_conversations
                                   WHERE line = on_line AND code = candidate AND {OPEN_SQL}) THEN
                        RETURN candidate;
                    END IF;
                END LOOP;
                RAISE 'all {MAX_CODE} reply codes are in use on line %', on_line;
            END $$""",
        # A cap's uses in the past hour are counted beside them, so a take costs the same however many
        # the hour holds (thousands, with caps lifted). Its rows are touched only under its lock, which
        # a take waits for and a clean-up only tries: neither ever waits for the other.
        "CREATE TABLE relay_caps (key text PRIMARY KEY, used bigint NOT NULL, last_at double precision NOT NULL)",
        "CREATE INDEX relay_caps_last ON relay_caps (last_at)",
        "INSERT INTO relay_caps SELECT key, count(*), max(at) FROM relay_cap_uses GROUP BY key",
        f"""CREATE FUNCTION relay_take(cap text, cap_limit bigint, at_time double precision) RETURNS boolean
            LANGUAGE plpgsql AS $$
            DECLARE
                expired bigint;
                in_use bigint;
            BEGIN
                PERFORM pg_advisory_xact_lock(hashtext(cap));
                DELETE FROM relay_cap_uses WHERE key = cap AND at <= at_time - {HOUR};
                GET DIAGNOSTICS expired = ROW_COUNT;
                UPDATE relay_caps SET used = used - expired WHERE key = cap RETURNING used INTO in_use;
                IF coalesce(in_use, 0) >= cap_limit THEN
                    RETURN false;
                END IF;
                INSERT INTO relay_cap_uses (key, at) VALUES (cap, at_time);
                INSERT INTO relay_caps (key, used, last_at) VALUES (cap, 1, at_time) ON CONFLICT (key)
                    DO UPDATE SET used = relay_caps.used + 1, last_at = greatest(relay_caps.last_at, at_time);
                RETURN true;
            END $$""",
        # Caps with no use in the past hour (a sender's, long after their texts), a batch at a time.
        """CREATE FUNCTION relay_forget_caps(cutoff double precision, batch integer) RETURNS integer
            LANGUAGE plpgsql AS $$
            DECLARE
                cap text;
                forgotten integer := 0;
            BEGIN
                FOR cap IN SELECT key FROM relay_caps WHERE last_at <= cutoff ORDER BY last_at LIMIT batch LOOP
                    CONTINUE WHEN NOT pg_try_advisory_xact_lock(hashtext(cap));  -- in use: next time
                    DELETE FROM relay_caps WHERE key = cap AND last_at <= cutoff;
                    IF FOUND THEN
                        DELETE FROM relay_cap_uses WHERE key = cap;
                        forgotten := forgotten + 1;
                    END IF;
                END LOOP;
                RETURN forgotten;
            END $$""",
    ],
    3: [
        # A text's arrival in one round trip (see Store.arrival), as the claim, the look-up of the
        # customer's conversation and the new code were before, each a round trip of its own.
        f"""CREATE FUNCTION relay_arrival(text_sid text, at_time double precision, on_line text,
                from_sender text, customer boolean, talking_since double precision)
            RETURNS TABLE (answered text, joins json, code_for_new text) LANGUAGE plpgsql AS $$
            BEGIN
                -- A customer's text is its own conversation's (its id), unless the save says it joined
                -- another: a new customer's text is then written once, not written and updated.
                INSERT INTO relay_messages (sid, at, conversation)
                    VALUES (text_sid, at_time, CASE WHEN customer THEN text_sid END) ON CONFLICT DO NOTHING;
                IF NOT FOUND THEN
                    RETURN QUERY SELECT coalesce(answer, ''), NULL::json, NULL::text
                        FROM relay_messages WHERE sid = text_sid;
                ELSIF customer THEN
                    RETURN QUERY SELECT NULL::text, doc, NULL::text FROM relay_conversations
                        WHERE line = on_line AND sender = from_sender
                        AND ({OPEN_SQL} OR (two_way AND status = 'acknowledged' AND finished_at > talking_since))
                        ORDER BY {OPEN_SQL} DESC, created DESC LIMIT 1 FOR UPDATE;
                    IF NOT FOUND THEN
                        RETURN QUERY SELECT NULL::text, NULL::json, relay_new_code(on_line);
                    END IF;
                ELSE
                    RETURN QUERY SELECT NULL::text, NULL::json, NULL::text;
                END IF;
            END $$""",
    ],
}
SCHEMA[4] = [
    """CREATE TABLE relay_overrides (
        id text PRIMARY KEY,
        rotation text NOT NULL,
        name text NOT NULL,
        phone text NOT NULL,
        start_at double precision NOT NULL,
        end_at double precision NOT NULL,
        replaces text NOT NULL,
        made double precision NOT NULL
    )""",
    "CREATE TABLE relay_console (key text PRIMARY KEY, record json NOT NULL, expires double precision NOT NULL)",
]
SCHEMA[5] = [
    # A cap's use is written before its lock is taken, and the lock is held only to count: a database
    # slow to write then holds up no other take of the cap (the outbound cap is every send's). The count
    # runs after the lock, so it sees every use the takes before this one committed, and this one's; a
    # take over the limit undoes its use. It reads at most the limit's worth of the hour's uses.
    f"""CREATE OR REPLACE FUNCTION relay_take(cap text, cap_limit bigint, at_time double precision)
        RETURNS boolean LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO relay_cap_uses (key, at) VALUES (cap, at_time);
            PERFORM pg_advisory_xact_lock(hashtext(cap));
            IF (SELECT count(*) FROM (SELECT FROM relay_cap_uses WHERE key = cap AND at > at_time - {HOUR}
                                      LIMIT cap_limit + 1) AS used) > cap_limit THEN
                RAISE SQLSTATE 'RLCAP';
            END IF;
            RETURN true;
        EXCEPTION WHEN SQLSTATE 'RLCAP' THEN
            RETURN false;  -- its use is undone with the block
        END $$""",
    # Uses that have left the hour count for nothing: deleted a batch at a time, with no lock.
    """CREATE OR REPLACE FUNCTION relay_forget_caps(cutoff double precision, batch integer) RETURNS integer
        LANGUAGE sql AS $$
            WITH gone AS (DELETE FROM relay_cap_uses WHERE ctid = ANY(ARRAY(
                SELECT ctid FROM relay_cap_uses WHERE at <= cutoff LIMIT batch)) RETURNING 1)
            SELECT count(*)::integer FROM gone
        $$""",
    "DROP TABLE relay_caps",
    SCHEMA[3][0].replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1),  # as written there now
]
SCHEMA_VERSION = max(SCHEMA)
SCHEMA_LOST = {"42P01", "42883"}  # undefined_table, undefined_function
# What the schema holds, looked for at every start and heal: tables (and the sequence) hold data, so a
# missing one is refused, never recreated; functions hold none, and are created again as written.
SCHEMA_RELATIONS = (
    "relay_conversations",
    "relay_messages",
    "relay_codes",
    "relay_cap_uses",
    "relay_marks",
    "relay_overrides",
    "relay_console",
)
FUNCTION_NAMED = re.compile(r"CREATE (?:OR REPLACE )?FUNCTION (\w+)")
SCHEMA_FUNCTIONS = {  # each as its latest version defines it
    FUNCTION_NAMED.match(statement)[1]: re.sub(r"^CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", statement)
    for statements in SCHEMA.values()
    for statement in statements
    if FUNCTION_NAMED.match(statement)
}
SCHEMA_LOCK = 7_301_001  # transaction-level advisory locks (they work through PgBouncer too)
TIDY_LOCK = 7_301_002


def is_refused_for_slots(error: Exception) -> bool:
    """The server refused a connection for want of slots (max_connections, or a role's limit)."""
    said = str(error)
    return getattr(error, "sqlstate", None) == "53300" or "too many" in said or "slots are reserved" in said


def database_dsn(url: str) -> str:
    """Heroku's `postgres://` is libpq's `postgresql://`."""
    return "postgresql://" + url.removeprefix("postgres://") if url.startswith("postgres://") else url


def shown_database(url: str) -> str:
    """What may be shown of DATABASE_URL: its user, host, port and database as libpq reads them (a URL
    parser reads a password holding # or ? differently, and would show part of it), never the password."""
    import_psycopg()
    try:
        parts = psycopg.conninfo.conninfo_to_dict(database_dsn(url))
    except psycopg.Error:
        parts = {}
    if not parts or ("@" in url and not parts.get("user")):  # its user and password were not told apart
        return "postgresql://(a URL libpq cannot read: percent-encode the special characters in the password)"
    user = f"{parts['user']}@" if parts.get("user") else ""
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{user}{parts.get('host', 'localhost')}{port}/{parts.get('dbname', '')}"


def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def schema_missing(conn) -> tuple[list[str], list[str]]:
    """The relay's tables, then its functions, that the database does not hold."""

    def held(kind: str, name: str) -> bool:
        return conn.execute(f"SELECT to_{kind}(%s)", (name,)).fetchone()[0] is not None

    tables = [name for name in SCHEMA_RELATIONS if not held("regclass", name)]
    return tables, [name for name in SCHEMA_FUNCTIONS if not held("regproc", name)]


def schema_version(conn) -> int:
    """The schema version the database holds (0: none yet)."""
    if conn.execute("SELECT to_regclass('relay_schema')").fetchone()[0] is None:
        return 0
    row = conn.execute("SELECT version FROM relay_schema").fetchone()
    return row[0] if row else 0


class PgSessions:
    """The relay's sessions with PostgreSQL: at most `connections` (the listener's included), each
    round trip with a deadline on this side, and one transaction at a time per thread.

    A connection per transaction in progress is kept idle between them: the webhook, the sweep and
    the sends each run their own, so none waits behind another's round trips. After the server
    refused one, the relay keeps to what it holds for a while: that is no dead database.
    """

    CONNECT_SECONDS = 2
    STATEMENT_MS = 5000
    # A round trip with no answer by then is cut on this side: a database that hangs (a stuck pooler,
    # a proxy forwarding nothing) acknowledges every byte, so neither keepalives nor the server's own
    # timeouts ever fire. A server that is only slow answers within its statement_timeout, if only
    # with an error, so it is never taken for a hung one.
    ROUND_TRIP_SECONDS = STATEMENT_MS / 1000 + 1
    # A text's webhook is answered within 5 s, Twilio waiting: its statements have shorter limits.
    PROMPT_STATEMENT_MS = 3000
    PROMPT_SECONDS = PROMPT_STATEMENT_MS / 1000 + 0.5
    PROMPT_CHECKOUT_SECONDS = 2.5  # waiting for a connection ends at once if the database is found gone
    WATCH_EVERY = 0.1
    # A session left idle inside a transaction (its relay frozen, or cut off mid-way) is ended by the
    # server after this, so the rows it locked go to the other relays' sweeps.
    IDLE_IN_TRANSACTION_MS = 2500
    REFUSED_RETRY = 30.0  # after the server refused a connection, this relay keeps to what it holds so long

    def __init__(self, url: str, connections: int):
        self.dsn = database_dsn(url)
        self.failed: str | None = "database not connected yet"
        self.idle: list[psycopg.Connection] = []
        self.opened = 0  # open for transactions, idle or in use
        self.background: set[int] = set()  # the connections in use by work nobody waits on (id)
        self.waiting = [0, 0, 0, 0]  # checkouts waiting, by rank
        self.budget = self.most = max(1, connections - 1)
        self.refused_until = -math.inf
        self.pool = threading.Condition()
        self.watched: dict[int, tuple[float, psycopg.Connection]] = {}  # round trips under way: their deadlines
        self.watch_lock = threading.Lock()
        self.watchdog: threading.Thread | None = None
        self.local = threading.local()  # this thread's transaction: its connection and the sids it took
        self.slowest_write = (0.0, -math.inf)  # the slowest recent transaction that wrote: seconds, when

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(
            self.dsn,
            autocommit=True,
            connect_timeout=self.CONNECT_SECONDS,
            options=f"-c statement_timeout={self.STATEMENT_MS} -c synchronous_commit=off "
            f"-c idle_in_transaction_session_timeout={self.IDLE_IN_TRANSACTION_MS}",
            application_name="relay",
            keepalives=1,
            keepalives_idle=5,
            keepalives_interval=1,
            keepalives_count=3,
            tcp_user_timeout=self.STATEMENT_MS,
        )

    SLOW_WRITE_MEMORY = 30.0  # how long the slowest write is remembered, unless a slower one comes

    def write_seconds(self) -> float:
        """How long the slowest transaction that wrote took, lately."""
        seconds, at = self.slowest_write
        return seconds if time.monotonic() - at < self.SLOW_WRITE_MEMORY else 0.0

    def drop_idle(self) -> None:
        with self.pool:
            idle, self.idle = self.idle, []
            self.opened -= len(idle)
            self.pool.notify_all()
        for conn in idle:
            conn.close()

    # Who goes first when connections are short (a database slow to write): the renewal of claims
    # (CLAIMS: short, and what keeps another relay from sending a page again), texts' webhooks and
    # health checks (PROMPT), then work on a page's way (AHEAD: the sweep, a send up to Twilio), then
    # the outcomes of what was done (BEHIND). Work nobody waits on leaves one connection for the first two.
    CLAIMS, PROMPT, AHEAD, BEHIND = range(4)
    BEHIND_CHECKOUT_SECONDS = 60.0

    def checkout(self, deadline: float, healing: bool = False, rank: int = PROMPT) -> psycopg.Connection:
        """An idle connection, else a new one within this relay's budget, else the first one handed back."""
        with self.pool:
            self.waiting[rank] += 1
            try:
                while True:
                    if self.failed and not healing:  # found gone meanwhile: answered now, not at the deadline
                        raise StoreFailure(self.failed)
                    if time.monotonic() >= self.refused_until:
                        self.most = self.budget
                    if self._may_take(rank):
                        if self.idle:
                            conn = self.idle.pop()
                            break
                        if self.opened < self.most:
                            self.opened += 1
                            conn = None
                            break
                    if not self.pool.wait(deadline - time.monotonic()):
                        raise StoreFailure(f"database: all {self.opened} connection(s) of this relay are busy")
            finally:
                self.waiting[rank] -= 1
                self.pool.notify_all()  # one waiting behind this one may go now
        try:
            conn = conn or self.connect()
        except psycopg.Error as e:
            with self.pool:
                self.opened -= 1
                refused = is_refused_for_slots(e) and self.opened > 0
                if refused:  # not a dead database: serve on the connections this relay has
                    if self.most > self.opened:
                        log("warning", "database_connection_limit", holding=self.opened, reason=first_line(e))
                    self.most, self.refused_until = self.opened, time.monotonic() + self.REFUSED_RETRY
                self.pool.notify_all()
            if refused:
                return self.checkout(deadline, healing, rank)
            raise
        if rank > self.PROMPT:
            with self.pool:
                self.background.add(id(conn))
        return conn

    def _may_take(self, rank: int) -> bool:
        """(with the pool locked)"""
        if any(self.waiting[:rank]):
            return False  # one before it in rank waits
        return rank <= self.PROMPT or len(self.background) < self.most - 1 or self.most == 1

    def checkin(self, conn: psycopg.Connection) -> None:
        keep = not (conn.broken or conn.closed)
        keep = keep and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        if not keep:
            conn.close()
        with self.pool:
            self.background.discard(id(conn))
            if keep:
                self.idle.append(conn)
            else:
                self.opened -= 1
            self.pool.notify_all()  # the first in rank goes

    def watch(self, conn: psycopg.Connection, seconds: float) -> None:
        with self.watch_lock:
            self.watched[id(conn)] = (time.monotonic() + seconds, conn)
            if self.watchdog is None:
                self.watchdog = threading.Thread(target=self._cut_hung, name="db-watchdog", daemon=True)
                self.watchdog.start()

    def unwatch(self, conn: psycopg.Connection) -> None:
        with self.watch_lock:
            self.watched.pop(id(conn), None)

    def _cut_hung(self) -> None:
        """Shut the socket of a round trip past its deadline: the waiting call then fails at once."""
        while True:
            time.sleep(self.WATCH_EVERY)
            now = time.monotonic()
            with self.watch_lock:
                hung = [conn for deadline, conn in self.watched.values() if deadline <= now]
                for conn in hung:
                    del self.watched[id(conn)]
            for conn in hung:
                with contextlib.suppress(OSError, psycopg.Error):
                    with socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock:
                        sock.shutdown(socket.SHUT_RDWR)

    @contextlib.contextmanager
    def transaction(
        self,
        key: str | None = None,
        reading: bool = False,
        redone: bool = False,
        prompt: bool = False,
        patience: float | None = None,
        rank: int | None = None,
    ):
        """(`patience`: how long a round trip may take before it is cut, and a connection be waited for, if
        not as `prompt` says: a health check's. `rank`: who goes first when connections are short, if
        not as `prompt` and `patience` say.)"""
        if getattr(self.local, "conn", None) is not None:  # inside one already: part of it
            yield
            return
        if self.failed:
            raise StoreFailure(self.failed)
        conn, began = None, time.monotonic()  # a write's time counts its wait for a connection
        try:
            # A text's webhook and a health check are answered 503 soon; other work waits its turn.
            if rank is None:
                rank = self.PROMPT if prompt or patience is not None else self.AHEAD
            waiting = self.PROMPT_CHECKOUT_SECONDS if prompt else patience or self.ROUND_TRIP_SECONDS
            if rank == self.BEHIND:  # what was done waits as long as it takes: given up, it is done again
                waiting = self.BEHIND_CHECKOUT_SECONDS
            conn = self.checkout(time.monotonic() + waiting, rank=rank)
            # `claimed`: the texts this transaction took, each with the conversation it was written with
            self.local.conn, self.local.claimed, self.local.reading, self.local.opening = conn, {}, reading, None
            self.local.loaded = set()  # the ids of the conversations read: saved with an UPDATE
            self.local.patience = patience or (self.PROMPT_SECONDS if prompt else self.ROUND_TRIP_SECONDS)
            self.local.cursor = conn.cursor()  # one for the transaction: a cursor per statement costs CPU
            if reading:  # only looking: each statement on its own, with no BEGIN, COMMIT or row lock
                yield
            else:
                self.local.opening = self._opening(key, redone, prompt)  # sent with the first statement
                try:
                    yield
                except BaseException:
                    if self.local.opening is None:
                        with contextlib.suppress(psycopg.Error):  # else the connection is closed at check-in
                            conn.execute("ROLLBACK")
                    raise
                if self.local.opening is None:  # else nothing was begun, and nothing is to commit
                    self.watch(conn, self.local.patience)
                    conn.execute("COMMIT")
                    self.unwatch(conn)
                    if (took := time.monotonic() - began) >= self.write_seconds():
                        self.slowest_write = (took, time.monotonic())
        except psycopg.Error as e:
            # Whatever the statement, nothing of the transaction is stored. A cut connection (a
            # commit's outcome unknown included) is answered 503: a retry finds the MessageSid.
            if conn is None or conn.broken or conn.closed:
                self.failed = f"database unreachable: {first_line(e)}"
                self.drop_idle()
                raise StoreFailure(self.failed) from None
            if getattr(e, "sqlstate", None) in SCHEMA_LOST:  # a table or function dropped: mended or named
                self.failed = f"database: the relay's schema is damaged: {first_line(e)}"
                raise StoreFailure(self.failed) from None
            raise StoreFailure(f"database: {first_line(e)}") from None
        finally:
            self.local.conn = self.local.cursor = self.local.opening = None
            if conn is not None:
                self.unwatch(conn)
                self.checkin(conn)

    @staticmethod
    def _opening(key: str | None, redone: bool, prompt: bool) -> tuple[str, tuple]:
        """BEGIN, and what comes with it, sent with the transaction's first statement.

        A change that can be redone (the connection's default) commits without waiting for its WAL
        record to reach the disk: it is as visible to every relay at once, and outlives any relay's
        death; only a crash of the database itself could lose it (its last 0.6 s or so). So a text
        waits for one fsync, its webhook's, not for the sweep's and the send's queued before it.
        Any commit that waits writes all the log before it too.
        """
        opening = ["BEGIN"]
        if not redone:
            opening.append("SET LOCAL synchronous_commit TO on")
        if prompt:
            opening.append(f"SET LOCAL statement_timeout TO {PgSessions.PROMPT_STATEMENT_MS}")
        if key is not None:
            opening.append("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))")
        return "; ".join(opening), (key,) if key is not None else ()

    def q(self, sql: str, params: tuple = ()):
        cursor, opening = self.local.cursor, self.local.opening
        self.watch(cursor.connection, self.local.patience)
        try:
            if opening is None:
                return cursor.execute(sql, params)
            # The transaction's opening and its first statement in one round trip (a round trip costs
            # the relay and the database CPU, besides the wait), their values written in. The
            # statement's result is the last one.
            (opening_sql, opening_params), self.local.opening = opening, None
            cursor.execute(
                psycopg.ClientCursor(cursor.connection).mogrify(f"{opening_sql}; {sql}", (*opening_params, *params))
            )
            while cursor.nextset():
                pass
            return cursor
        finally:
            self.unwatch(cursor.connection)

    def docs(self, sql: str, params: tuple = ()) -> list[Conversation]:
        found = [Conversation.from_json(doc) for (doc,) in self.q(sql, params)]
        self.local.loaded.update(conv.id for conv in found)
        return found


class PgStore(Store):
    """Conversations in PostgreSQL, shared by any number of relays; the database is the truth.

    Nothing is cached between transactions: each change reads the conversations it needs under row
    locks (and a customer's texts are taken one at a time under an advisory lock on line and sender),
    due work is claimed with SKIP LOCKED, and a page to send is claimed under a short lease, renewed
    while the send is in flight, so another relay takes it up if this one dies.
    """

    SHARED = True
    LEASE = 1.2  # the least a claim lasts; longer while the database is slow to write (renew)
    MAX_LEASE = 4.0  # the most, however slow the database: a frozen or dead relay's pages wait no longer
    RENEW_EVERY = LEASE / 3
    POLL = 0.25
    COUNT_SECONDS = 1.0
    HEAL_SECONDS = 10.0  # a heal may create or upgrade the schema: many statements
    LISTEN_RETRY = 1.0
    CHANNEL = "relay_pages_given_up"
    CLOCK_SYNC_EVERY = 10.0
    RETENTION_EVERY = 60.0
    NEWEST_BATCH = 20
    FORGET_USES = 10_000  # cap uses that left the hour, forgotten a minute at most: retention stays short

    def __init__(self, url: str, connections: int = 5):
        import_psycopg()
        self.db = PgSessions(url, connections)
        self.lock = threading.RLock()
        self.offset = 0.0  # the database's clock minus this process's monotonic clock
        self.open_now = 0
        self.synced_at = self.retained_at = -math.inf
        self.heal_lock = threading.Lock()

    def clock(self) -> float:
        """The database's clock, read now and then and moved on by the monotonic clock between."""
        return time.monotonic() + self.offset

    # -- connecting ---------------------------------------------------------

    def open(self) -> None:
        """Connect, create or upgrade the tables; raise StoreFailure (unreachable) or SchemaRefused."""
        self.heal()

    def heal(self) -> None:
        with self.heal_lock:
            self.db.drop_idle()  # they may be from before the failure; closed first, their slots are free
            conn = None
            try:
                conn = self.db.checkout(time.monotonic() + self.db.CONNECT_SECONDS, healing=True)
                self.db.watch(conn, self.HEAL_SECONDS)
                self._migrate(conn)
                self._sync_clock(conn)
            except psycopg.Error as e:
                self.db.failed = f"database unreachable: {first_line(e)}"
                raise StoreFailure(self.db.failed) from None
            except SchemaRefused as e:
                self.db.failed = str(e).removeprefix("DATABASE_URL: ")
                raise
            finally:
                if conn is not None:
                    self.db.unwatch(conn)
                    self.db.checkin(conn)
            self.db.failed = None

    def _migrate(self, conn: psycopg.Connection) -> None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            version = schema_version(conn)
            if version > SCHEMA_VERSION:
                raise SchemaRefused(
                    f"DATABASE_URL: the database has relay schema version {version}, newer than this "
                    f"relay's {SCHEMA_VERSION}: run the newer relay"
                )
            if version == 0 and conn.execute("SELECT to_regclass('relay_schema')").fetchone()[0] is not None:
                raise SchemaRefused(
                    "DATABASE_URL: the relay_schema table has lost its version row; if the relay's tables "
                    f"are whole, put it back: INSERT INTO relay_schema VALUES ({SCHEMA_VERSION})"
                )
            if version == 0 and (found := conn.execute("SELECT to_regclass('relay_conversations')").fetchone()[0]):
                raise SchemaRefused(f"DATABASE_URL: {found} exists but relay_schema does not; restore it from a backup")
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in SCHEMA[step]:
                    conn.execute(statement)
            self._mend(conn)
            if version == 0:
                conn.execute("CREATE TABLE relay_schema (version integer NOT NULL)")
                conn.execute("INSERT INTO relay_schema VALUES (%s)", (SCHEMA_VERSION,))
            elif version < SCHEMA_VERSION:
                conn.execute("UPDATE relay_schema SET version = %s", (SCHEMA_VERSION,))
            if version < SCHEMA_VERSION:
                log("info", "schema_upgraded", from_version=version, to_version=SCHEMA_VERSION)

    @staticmethod
    def _mend(conn: psycopg.Connection) -> None:
        """Refuse a schema missing a table; create again any function missing (in the migration's lock)."""
        tables, functions = schema_missing(conn)
        if tables:
            raise SchemaRefused(
                f"DATABASE_URL: the relay's table {tables[0]} is missing; restore it from a backup "
                "(the relay does not create it again over the data it held)"
            )
        for name in functions:
            conn.execute(SCHEMA_FUNCTIONS[name])
            log("warning", "schema_mended", function=name)

    def _sync_clock(self, conn: psycopg.Connection) -> None:
        before = time.monotonic()
        (now,) = conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()
        after = time.monotonic()
        self.offset, self.synced_at = now - (before + after) / 2, after

    def transaction(self, key: str | None = None, reading: bool = False, redone: bool = False, prompt: bool = False):
        return self.db.transaction(key, reading, redone, prompt)

    @property
    def failure(self) -> str | None:
        return self.db.failed

    def writable(self) -> str | None:
        return self.db.failed

    # -- look-ups (in a transaction) ------------------------------------------

    def arrival(self, sid: str, line: str, sender: str, now: float, customer: bool) -> Arrival:
        # In one round trip, with the transaction's opening (so with the customer's lock): inserted
        # first, a second relay handling the same sid waits here until this one commits.
        answered, joins, code = self.db.q(
            "SELECT * FROM relay_arrival(%s, %s, %s, %s, %s, %s)",
            (sid, now, line, sender, customer, now - TWO_WAY_WINDOW),
        ).fetchone()
        if answered is None:
            self.db.local.claimed[sid] = sid if customer else None
        if joins is not None:
            joins = Conversation.from_json(joins)
            self.db.local.loaded.add(joins.id)
        return Arrival(answered, joins, code)

    def knows(self, sid: str) -> bool:
        with self.transaction(reading=True):
            return self.db.q("SELECT 1 FROM relay_messages WHERE sid = %s", (sid,)).fetchone() is not None

    def get(self, conv_id: str) -> Conversation | None:
        if not self.db.local.reading:
            found = self.db.docs("SELECT doc FROM relay_conversations WHERE id = %s FOR UPDATE", (conv_id,))
            return found[0] if found else None
        # Only looking: remembered with its row version, for a `change` that may follow.
        row = self.db.q("SELECT doc, xmin::text FROM relay_conversations WHERE id = %s", (conv_id,)).fetchone()
        conv = Conversation.from_json(row[0]) if row else None
        self.db.local.seen = (conv_id, row[1], conv) if row else None
        return conv

    def open_on(self, line: str) -> list[Conversation]:
        return self.db.docs(
            f"SELECT doc FROM relay_conversations WHERE line = %s AND {OPEN_SQL} ORDER BY created", (line,)
        )

    def holding_code(self, line: str, code: str) -> Conversation | None:
        found = self.db.docs(
            f"SELECT doc FROM relay_conversations WHERE line = %s AND code = %s AND {OPEN_SQL} FOR UPDATE", (line, code)
        )
        return found[0] if found else None

    def newest_paged(self, line: str, phone: str) -> Conversation | None:
        # Looked for newest first, a few at a time and without locks; only the one found is held.
        # A flood may have left thousands open, and a contact's reply reads and holds none of them.
        for offset in itertools.count(0, self.NEWEST_BATCH):
            batch = self.db.docs(
                f"""SELECT doc FROM relay_conversations WHERE line = %s AND {OPEN_SQL}
                    ORDER BY created DESC, id LIMIT %s OFFSET %s""",
                (line, self.NEWEST_BATCH, offset),
            )
            for conv in batch:
                if phone in reached_phones(conv) and (held := self.get(conv.id)):
                    if held.status in (OPEN_STATUS, HELD_STATUS) and phone in reached_phones(held):
                        return held  # still as it was read, now held for this change
            if len(batch) < self.NEWEST_BATCH:
                return None

    def talking(self, line: str, now: float) -> list[Conversation]:
        return self.db.docs(
            """SELECT doc FROM relay_conversations WHERE line = %s AND two_way AND status = 'acknowledged'
               AND finished_at > %s ORDER BY created FOR UPDATE""",
            (line, now - TWO_WAY_WINDOW),
        )

    def latest_with_code(self, line: str, code: str) -> Conversation | None:
        found = self.db.docs(
            """SELECT doc FROM relay_conversations WHERE line = %s AND code = %s
                ORDER BY created DESC LIMIT 1 FOR UPDATE""",
            (line, code),
        )
        return found[0] if found else None

    def new_code(self, line: str) -> str:
        # A sequence hands each number out once, to one transaction, without a lock: two relays never
        # get the same one. Past 999,999 it starts again, skipping codes still open on the line.
        return self.db.q("SELECT relay_new_code(%s)", (line,)).fetchone()[0]

    def take(self, key: str, limit: int, now: float) -> bool:
        return self.db.q("SELECT relay_take(%s, %s, %s)", (key, limit, now)).fetchone()[0]

    def once_every(self, key: str, seconds: float, now: float) -> bool:
        marked = self.db.q(
            """INSERT INTO relay_marks (key, at) VALUES (%s, %s)
               ON CONFLICT (key) DO UPDATE SET at = EXCLUDED.at WHERE relay_marks.at <= %s RETURNING key""",
            (key, now, now - seconds),
        ).fetchone()
        return marked is not None

    def due(self, now: float, in_flight: dict[str, set[int]], most: int) -> list[Conversation]:
        return self.db.docs(
            "SELECT doc FROM relay_conversations WHERE wake_at <= %s ORDER BY wake_at LIMIT %s FOR UPDATE SKIP LOCKED",
            (now, most),
        )

    def next_due(self) -> float | None:
        return self.db.q("SELECT min(wake_at) FROM relay_conversations WHERE wake_at IS NOT NULL").fetchone()[0]

    def held(self) -> list[Conversation]:
        return self.db.docs("SELECT doc FROM relay_conversations WHERE held ORDER BY created FOR UPDATE SKIP LOCKED")

    def unfinished(self) -> list[Conversation]:
        with self.transaction(reading=True):
            return self.db.docs(
                f"""SELECT doc FROM relay_conversations WHERE {OPEN_SQL} OR status = 'unanswered' OR held
                    ORDER BY created"""
            )

    def described(self) -> str:
        with self.transaction(reading=True):
            (listening,) = self.db.q(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'relay' AND query = %s",
                (f"LISTEN {self.CHANNEL}",),
            ).fetchone()
        return f"PostgreSQL at {shown_database(self.db.dsn)}; {listening} relay(s) running on it"

    def open_count(self) -> int:
        # Counted afresh (other relays change it too); the last count stands while the database is away.
        # /healthz asks: it must answer within a second or two even while the database hangs.
        with contextlib.suppress(StoreFailure), self.db.transaction(reading=True, patience=self.COUNT_SECONDS):
            (self.open_now,) = self.db.q(f"SELECT count(*) FROM relay_conversations WHERE {OPEN_SQL}").fetchone()
        return self.open_now

    # -- writing (in a transaction; the commit at its end is the durable point) -----

    def save(self, conv: Conversation, in_flight: Container[int] = frozenset(), changed: bool = True):
        # The wake-up counts the leases, not this relay's own sends: if it dies, another takes them up.
        if not changed:
            self.db.q("UPDATE relay_conversations SET wake_at = %s WHERE id = %s", (next_wakeup(conv), conv.id))
            return None
        said = {m["sid"]: m.get("answer") for m in [*conv.messages, *conv.replies]}
        # Claimed in this transaction, and not already written as they are (relay_arrival)
        claimed = self.db.local.claimed
        texts = [sid for sid in claimed if sid in said and (claimed[sid] != conv.id or said[sid] is not None)]
        # One read here is updated, not upserted: an upsert is an insert tried first, and a write
        # that is slow (a trigger, a slow disk) is then paid for twice.
        known = conv.id in self.db.local.loaded
        statement = UPDATE_CONVERSATION if known else INSERT_CONVERSATION
        if texts:  # in the same statement, the texts it took are marked as its own, with their answers
            # (Found by `= ANY`, which a cached plan looks up in the index: a join with their list
            # may be planned as a read of every text remembered, for each text saved.)
            statement = f"""WITH saved AS ({statement})
                UPDATE relay_messages SET conversation = %s, answer = %s::json ->> sid WHERE sid = ANY(%s)"""
        columns = (*self._changing(conv), conv.id) if known else (*self._identity(conv), *self._changing(conv))
        self.db.q(statement, (*columns, *((conv.id, Json({sid: said[sid] for sid in texts}), texts) if texts else ())))
        return None

    @staticmethod
    def _identity(conv: Conversation) -> tuple:
        """The columns a conversation keeps: id, line, sender, code, created, two_way."""
        return conv.id, conv.line, conv.sender, conv.code, conv.created, conv.two_way

    @staticmethod
    def _changing(conv: Conversation) -> tuple:
        """The columns a save may change: status, finished_at, held, wake_at, doc."""
        return conv.status, conv.finished_at, bool(held_pages(conv)), next_wakeup(conv), Json(conv.to_dict())

    def change(self, conv_id, apply, in_flight, afterwards=False) -> Conversation | None:
        rank = PgSessions.BEHIND if afterwards else PgSessions.AHEAD
        seen, self.db.local.seen = getattr(self.db.local, "seen", None), None
        if seen and seen[0] == conv_id:
            # Read just before (for a send): stored if nobody changed it since, in one statement
            # that commits as it runs, without a lock held across a round trip.
            _, version, conv = seen
            if not apply(conv):
                return conv
            with self.db.transaction(reading=True, rank=rank):
                stored = self.db.q(
                    f"{UPDATE_CONVERSATION} AND xmin = %s::xid RETURNING 1",
                    (*self._changing(conv), conv_id, version),
                ).fetchone()
            if stored:
                return conv
        with self.db.transaction(redone=True, rank=rank):
            conv = self.get(conv_id)
            if conv is None or not apply(conv):
                return conv
            self.save(conv)
        return conv

    def claim(self, page: Page, holder: str, now: float) -> bool:
        # From this moment, not the transaction's `now`: a slow transaction has used some of it up.
        page.lease, page.holder = max(now, self.clock()) + self.lease, holder
        return True

    def claimed_by(self, page: Page, holder: str, now: float | None = None) -> bool:
        return page.holder == holder and (now is None or page.lease > now)

    @property
    def lease(self) -> float:
        """How long a claim lasts now: three times the slowest recent write, so that a database slow
        to write does not let claims lapse while they are stored or renewed (and another relay send
        the page too); never less than LEASE, nor more than MAX_LEASE."""
        return min(self.MAX_LEASE, max(self.LEASE, 3 * self.db.write_seconds()))

    def renew(self, in_flight: dict[str, set[int]], holder: str) -> None:
        # Only the claims that would lapse before two more renewals: while the database is slow to
        # write, claims last longer, and most sends finish inside their first one.
        now = self.clock()
        self._set_leases(in_flight, now + self.lease, holder, lapsing_by=now + self.lease * 2 / 3)

    def give_up(self, in_flight: dict[str, set[int]], holder: str) -> None:
        self._set_leases(in_flight, 0.0, holder)

    def _set_leases(
        self, in_flight: dict[str, set[int]], until: float, holder: str, lapsing_by: float = math.inf
    ) -> None:
        """Set `holder`'s claims on these pages that lapse by `lapsing_by` to last until `until` (0:
        given up, and the other relays' sweeps woken). Two statements however many pages are queued (a
        flood's, with the caps lifted). A conversation another change holds now is left for the next
        renewal."""
        with self.db.transaction(redone=True, rank=PgSessions.CLAIMS):
            # Only those with a claim to renew are locked: a slow write of some holds up no change of
            # the others (a send's outcome, say).
            found = self.db.docs(
                """SELECT doc FROM relay_conversations WHERE id = ANY(%s) AND EXISTS (
                       SELECT FROM json_array_elements(doc -> 'pages') AS p WHERE p ->> 'holder' = %s
                       AND p ->> 'state' = 'pending' AND (p ->> 'lease')::float8 <= %s)
                   FOR UPDATE SKIP LOCKED""",
                (list(in_flight), holder, lapsing_by),
            )
            convs = []
            for conv in found:
                pages = [conv.pages[i] for i in in_flight[conv.id] if i < len(conv.pages)]
                pages = [p for p in pages if p.state == "pending" and p.holder == holder and p.lease <= lapsing_by]
                for page in pages:
                    page.lease = until
                if pages:
                    convs.append(conv)
            if not convs:
                return
            self.db.q(  # `c.id = ANY`: else the join may be planned as a read of the whole table
                """UPDATE relay_conversations AS c SET wake_at = t.wake_at, doc = t.doc
                   FROM json_to_recordset(%s) AS t (id text, wake_at float8, doc json)
                   WHERE c.id = t.id AND c.id = ANY(%s)""",
                (
                    Json([{"id": c.id, "wake_at": next_wakeup(c), "doc": c.to_dict()} for c in convs]),
                    [c.id for c in convs],
                ),
            )
            if not until:
                self.db.q(f"NOTIFY {self.CHANNEL}")  # delivered at the commit, to every relay listening

    def listen(self, wake: Callable[[], None], stop: threading.Event) -> None:
        # The poll finds given-up pages too, within POLL: this only saves that wait. It needs a session
        # of its own, which a pooler in transaction mode (PgBouncer's) does not keep; there nothing
        # arrives, and the poll does it all. A database that is down is tried again, quietly: the
        # transactions already report it.
        while not stop.is_set():
            try:
                with self.db.connect() as conn:
                    conn.execute(f"LISTEN {self.CHANNEL}")
                    wake()  # what was given up while nobody here listened
                    while not stop.is_set():
                        for _ in conn.notifies(timeout=self.LISTEN_RETRY):
                            wake()
            except psycopg.Error:
                stop.wait(self.LISTEN_RETRY)

    def save_stray(self, sid: str, answer: str | None, now: float):
        self.db.q("UPDATE relay_messages SET answer = %s WHERE sid = %s", (answer, sid))
        return None

    def wait(self, ticket) -> None:
        pass  # the transaction's commit made it durable

    def note_catch_up(self, began: float, ok: bool) -> None:
        with self.transaction():
            self.db.q("DELETE FROM relay_marks WHERE key LIKE 'catch_up:%%'")
            self.db.q(
                "INSERT INTO relay_marks (key, at) VALUES (%s, %s)", (f"catch_up:{'ok' if ok else 'failed'}", began)
            )

    def last_catch_up(self) -> tuple[float, bool] | None:
        with self.transaction(reading=True):
            row = self.db.q("SELECT key, at FROM relay_marks WHERE key LIKE 'catch_up:%%' ORDER BY at DESC").fetchone()
        return (row[1], row[0] == "catch_up:ok") if row else None

    def overrides(self, now: float) -> list[Override]:
        with self.transaction(reading=True):
            rows = self.db.q(f"SELECT {OVERRIDE_COLUMNS} FROM relay_overrides WHERE end_at > %s", (now,)).fetchall()
        return [Override(*row) for row in rows]

    def add_override(self, override: Override) -> None:
        with self.transaction():
            self.db.q(
                f"INSERT INTO relay_overrides ({OVERRIDE_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                dataclasses.astuple(override),
            )

    def delete_override(self, override_id: str, now: float) -> Override | None:
        with self.transaction():
            row = self.db.q(
                f"DELETE FROM relay_overrides WHERE id = %s AND end_at > %s RETURNING {OVERRIDE_COLUMNS}",
                (override_id, now),
            ).fetchone()
        return Override(*row) if row else None

    def remind_once(self, key: str, now: float) -> bool:
        with self.transaction():
            return self.once_every(f"remind:{key}", math.inf, now)

    def console_record(self, key: str, now: float) -> dict | None:
        with self.transaction(reading=True):
            row = self.db.q("SELECT record FROM relay_console WHERE key = %s AND expires > %s", (key, now)).fetchone()
        return row[0] if row else None

    def keep_console_record(self, key: str, record: dict | None, expires: float) -> None:
        with self.transaction():
            if record is None:
                self.db.q("DELETE FROM relay_console WHERE key = %s", (key,))
            else:
                self.db.q(
                    """INSERT INTO relay_console (key, record, expires) VALUES (%s, %s, %s)
                       ON CONFLICT (key) DO UPDATE SET record = EXCLUDED.record, expires = EXCLUDED.expires""",
                    (key, Json(record), expires),
                )

    def history(self, since: float, most: int) -> list[Conversation]:
        with self.transaction(reading=True):
            return self.db.docs(
                f"SELECT doc FROM relay_conversations WHERE NOT ({OPEN_SQL}) AND created >= %s "
                "ORDER BY created DESC LIMIT %s",
                (since, most),
            )

    def import_state(self, convs: list[Conversation], strays: list[dict]) -> tuple[int, int]:
        """Add conversations and remembered texts not yet here; returns how many of each were new."""
        added = added_strays = 0
        with self.transaction():
            for conv in convs:
                if self.db.q("SELECT 1 FROM relay_conversations WHERE id = %s", (conv.id,)).fetchone():
                    continue
                clash = (
                    conv.status in (OPEN_STATUS, HELD_STATUS)
                    and self.db.q(
                        f"SELECT 1 FROM relay_conversations WHERE line = %s AND code = %s AND {OPEN_SQL}",
                        (conv.line, conv.code),
                    ).fetchone()
                )
                if clash:  # an open code already taken here: the imported one gets a new code
                    conv.code = self.new_code(conv.line)
                said = {m["sid"]: (m.get("answer"), m["at"]) for m in [*conv.messages, *conv.replies]}
                for sid, (answer, at) in said.items():
                    self.db.q(
                        "INSERT INTO relay_messages (sid, conversation, answer, at) VALUES (%s, %s, %s, %s) "
                        "ON CONFLICT DO NOTHING",
                        (sid, conv.id, answer, at),
                    )
                self.save(conv)
                added += 1
                if conv.code.isdigit():  # new codes follow the imported ones
                    self.db.q(
                        "SELECT setval('relay_codes', greatest(last_value, %s)) FROM relay_codes",
                        (min(int(conv.code), MAX_CODE),),
                    )
            for stray in strays:
                added_strays += self.db.q(
                    "INSERT INTO relay_messages (sid, answer, at) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                    (stray["sid"], stray["answer"], stray["at"]),
                ).rowcount
        return added, added_strays

    def tidy(self, now: float, retention: int) -> int:
        """Keep the clock in step, and (one relay at a time) apply retention."""
        pruned = 0
        with self.transaction(redone=True):
            if time.monotonic() - self.synced_at > self.CLOCK_SYNC_EVERY:
                self._sync_clock(self.db.local.conn)
            if time.monotonic() - self.retained_at > self.RETENTION_EVERY:
                self.retained_at = time.monotonic()
                if self.db.q("SELECT pg_try_advisory_xact_lock(%s)", (TIDY_LOCK,)).fetchone()[0]:
                    # A conversation leaves with its texts; a text that joined none, by its own age.
                    (pruned,) = self.db.q(
                        f"""WITH gone AS (DELETE FROM relay_conversations WHERE NOT ({OPEN_SQL}) AND NOT held
                                AND wake_at IS NULL AND finished_at < %s RETURNING id),
                            texts AS (DELETE FROM relay_messages WHERE conversation IN (SELECT id FROM gone))
                            SELECT count(*) FROM gone""",
                        (now - retention,),
                    ).fetchone()
                    self.db.q("DELETE FROM relay_messages WHERE conversation IS NULL AND at < %s", (now - retention,))
                    self.db.q("DELETE FROM relay_overrides WHERE end_at < %s", (now - retention,))
                    self.db.q("DELETE FROM relay_console WHERE expires < %s", (now,))
                    self.db.q("DELETE FROM relay_marks WHERE key LIKE 'remind:%%' AND at < %s", (now - retention,))
                    self.db.q("SELECT relay_forget_caps(%s, %s)", (now - HOUR, self.FORGET_USES))
        return pruned


# ---------------------------------------------------------------------------
# Twilio gateway
#
# What the relay asks of Twilio: send a text, place or end a call, list received texts.
# TwilioGateway does it over REST with a deadline on every call; DryRunGateway writes it to
# the outbox instead. Both meet Gateway.
# ---------------------------------------------------------------------------


REST_READ_TIMEOUT = 10.0  # per read, and for the connect
REST_DEADLINE = 12.0  # for the whole call, however slowly the answer trickles in
# Errors that say this recipient can never get this text: move on to the next contact.
PERMANENT_CODES = {21211, 21408, 21610, 21612, 21614, 21635, 21608, 21606, 21660, 30003, 30005, 30006, 30007}
# Errors about our own account: no recipient does better, so keep retrying and shout.
ACCOUNT_STATUSES = {401, 403}


class SendError(Exception):
    """A send that did not go through: `permanent` for that recipient, or worth retrying."""

    def __init__(self, reason: str, permanent: bool, code: int | None = None, retry_after: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent
        self.code = code
        self.retry_after = retry_after


def classify_twilio_error(status: int | None, code: int | None) -> bool:
    """True when the error is permanent for the recipient."""
    if code in PERMANENT_CODES:
        return True
    if status is None or status == 429 or status >= 500 or status in ACCOUNT_STATUSES:
        return False
    return 400 <= status < 500


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            when = datetime.datetime.strptime(value, "%a, %d %b %Y %H:%M:%S GMT")
        except ValueError:
            return None
        return max(0.0, when.replace(tzinfo=datetime.UTC).timestamp() - time.time())


class RestCall:
    """One REST call in progress on this thread: its connection, so a watchdog can cut it, and its status."""

    current = threading.local()

    def __init__(self):
        self.connection = None
        self.status: int | None = None
        self.retry_after: float | None = None
        self.cut = False

    def cut_off(self) -> None:
        self.cut = True
        sock = getattr(self.connection, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # the blocked read returns at once
            except OSError:
                pass


class _WatchedConnection:
    """Tells the call on this thread which connection it uses, and the status as soon as it is read."""

    def request(self, *args, **kwargs):
        call = getattr(RestCall.current, "call", None)
        if call is not None:
            call.connection = self
        return super().request(*args, **kwargs)

    def getresponse(self, *args, **kwargs):
        response = super().getresponse(*args, **kwargs)
        call = getattr(RestCall.current, "call", None)
        if call is not None:
            call.status = response.status
        return response


class _WatchedHTTPConnection(_WatchedConnection, urllib3.connection.HTTPConnection):
    pass


class _WatchedHTTPSConnection(_WatchedConnection, urllib3.connection.HTTPSConnection):
    pass


class _WatchedHTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


class WatchedAdapter(requests.adapters.HTTPAdapter):
    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


class BaseUrlHttpClient(TwilioHttpClient):
    """Sends the twilio package's requests to TWILIO_API_BASE_URL, each under a total deadline.

    The twilio client's own timeout is per read: an answer trickled a byte at a time would hold a
    call for ever. A watchdog cuts the connection at REST_DEADLINE instead.
    """

    def __init__(self, base_url: str):
        super().__init__(timeout=REST_READ_TIMEOUT)
        self.base = urllib.parse.urlsplit(base_url)
        self.refused: int | None = None  # Twilio's last answer was 401 or 403: until one goes through
        for prefix in ("http://", "https://"):
            self.session.mount(prefix, WatchedAdapter(pool_maxsize=32))

    def request(self, method, url, *args, **kwargs):
        parts = urllib.parse.urlsplit(url)
        url = urllib.parse.urlunsplit(
            (self.base.scheme, self.base.netloc, self.base.path.rstrip("/") + parts.path, parts.query, "")
        )
        call = RestCall.current.call = RestCall()
        watchdog = threading.Timer(REST_DEADLINE, call.cut_off)
        watchdog.daemon = True
        watchdog.start()
        try:
            response = super().request(method, url, *args, **kwargs)
        except requests.RequestException as e:
            if call.cut:
                raise requests.Timeout(f"no full answer within {REST_DEADLINE:.0f}s") from e
            raise
        finally:
            watchdog.cancel()
        call.retry_after = parse_retry_after(response.headers.get("Retry-After"))
        if response.status_code in ACCOUNT_STATUSES:
            self.refused = response.status_code
        elif response.ok:
            self.refused = None
        return response


# A Studio flow's webhook_url, as SmsFallbackUrl holds it when Twilio's own fallback is in place.
STUDIO_WEBHOOK = re.compile(r"^https://webhooks\.twilio\.com/v1/Accounts/AC[0-9a-f]{32}/Flows/FW[0-9a-f]{32}$")


class Gateway(typing.Protocol):
    """What the relay service asks of Twilio: TwilioGateway does it, DryRunGateway only writes it down.
    (Catch-up, never run in dry-run, also lists received texts: TwilioGateway.received.)"""

    refusal: str | None  # why Twilio turns this relay away (its credentials), or None

    def send(
        self, from_: str, to: str, body: str, status_callback: str | None, media: list[str] = (), secret=False
    ) -> str | None:
        """Send a text; Twilio's sid for it (None: taken, but the answer was odd). Raises SendError."""

    def call(self, from_: str, to: str, twiml: str, status_callback: str | None) -> str | None:
        """Place a call that speaks `twiml`; its sid, as `send` gives. Raises SendError."""

    def end_call(self, sid: str, status: str) -> None:
        """Hang up a call: "canceled" while it rings, "completed" once answered."""


class TwilioGateway:
    def __init__(self, settings: Settings):
        self.http = BaseUrlHttpClient(settings.api_base_url)
        if settings.api_key:
            self.client = Client(settings.api_key, settings.api_secret, settings.account_sid, http_client=self.http)
        else:
            self.client = Client(settings.account_sid, settings.auth_token, http_client=self.http)
        # Built now, not at the first page: the twilio package imports its API modules lazily (~0.1 s).
        self.messages = self.client.messages
        self.calls = self.client.calls

    @property
    def refusal(self) -> str | None:
        """Why Twilio turns this relay away, or None: its last request was refused for the credentials."""
        if self.http.refused is None:
            return None
        return f"Twilio refuses the credentials (HTTP {self.http.refused}): check TWILIO_AUTH_TOKEN"

    def send(
        self, from_: str, to: str, body: str, status_callback: str | None, media: list[str] = (), secret=False
    ) -> str | None:
        """Twilio's sid for the text, or None when Twilio took it (2xx) but its answer was odd.
        (`secret`: a sign-in code; no body is ever logged here.)"""
        options = {"status_callback": status_callback} if status_callback else {}
        if media:
            options["media_url"] = list(media)
        return self._create(lambda: self.messages.create(to=to, from_=from_, body=body, **options), to)

    def call(self, from_: str, to: str, twiml: str, status_callback: str | None) -> str | None:
        """Place a call that speaks `twiml`; Twilio's sid for it, as `send` gives for a text.

        Answering-machine detection runs beside the call (AsyncAmd), so a voicemail is reported to
        the status callback within seconds, while a person hears the message at once. Twilio's
        default callback, at the end of the call, carries the outcomes that move the chain on
        (no-answer, busy, failed, canceled, completed).
        """
        options = {}
        if status_callback:
            options = {
                "status_callback": status_callback,
                "machine_detection": "Enable",
                "async_amd": "true",
                "async_amd_status_callback": status_callback,
            }
        return self._create(lambda: self.calls.create(to=to, from_=from_, twiml=twiml, **options), to)

    def end_call(self, sid: str, status: str) -> None:
        """Hang up a call: "canceled" for one still ringing, "completed" for one in progress."""
        self._create(lambda: self.calls(sid).update(status=status), sid)

    def _create(self, request, to: str) -> str | None:
        try:
            sid = request().sid
        except TwilioException as e:
            status, code = getattr(e, "status", None), getattr(e, "code", None)
            reason = f"twilio {status} {code or ''}".strip()
            retry_after = RestCall.current.call.retry_after
            raise SendError(reason, classify_twilio_error(status, code), code, retry_after) from None
        except Exception as e:
            # A 2xx means Twilio has the text, whatever followed: sending it again would page twice.
            if 200 <= (RestCall.current.call.status or 0) < 300:
                log("warning", "send_odd_answer", to=to, status=RestCall.current.call.status, error=type(e).__name__)
                return None
            if isinstance(e, requests.RequestException):
                raise SendError(f"network: {type(e).__name__}", permanent=False) from None
            raise
        if not isinstance(sid, str) or not sid:
            log("warning", "send_odd_answer", to=to, status=RestCall.current.call.status, error="no sid")
            return None
        return sid

    def received(self, number: str, since: float):
        """Texts Twilio received on `number` since `since`, newest first, as webhook parameters.

        Only the pages reaching back to `since` are read. Each comes with Twilio's time for it.
        """
        after = datetime.datetime.fromtimestamp(since, datetime.UTC)
        for message in self.messages.stream(to=number, date_sent_after=after, page_size=CATCH_UP_PAGE):
            when = message.date_sent or message.date_created
            if when is not None and when.timestamp() < since:
                return  # newest first: the rest is older still
            if message.direction != "inbound" or message.to != number:
                continue
            params = {"MessageSid": message.sid, "From": message.from_, "To": message.to, "Body": message.body or ""}
            count = int(message.num_media or 0)
            if count:
                media = self.client.messages(message.sid).media.list(limit=MAX_MEDIA)
                params["NumMedia"] = str(len(media))
                for i, item in enumerate(media):
                    params[f"MediaUrl{i}"] = (
                        f"https://api.twilio.com/2010-04-01/Accounts/{message.account_sid}"
                        f"/Messages/{message.sid}/Media/{item.sid}"
                    )
            yield params, (when.timestamp() if when is not None else None)

    def find_number(self, number: str):
        """The account's record of an incoming number (its sid, sms_url...), or None."""
        found = self.client.incoming_phone_numbers.list(phone_number=number, limit=1)
        return found[0] if found else None

    def tollfree_verification(self, number_sid: str) -> str | None:
        """The status of a toll-free number's verification (TWILIO_APPROVED...), or None if none was asked for."""
        found = self.client.messaging.v1.tollfree_verifications.list(tollfree_phone_number_sid=number_sid, limit=1)
        return found[0].status if found else None

    def campaign_holding(self, number: str) -> tuple[str, str | None] | None:
        """The Messaging Service holding a number, by name, and its A2P 10DLC campaign's status (None:
        the service has no campaign); None when no Messaging Service holds the number."""
        services = self.client.messaging.v1.services
        for service in services.list():
            if any(n.phone_number == number for n in services(service.sid).phone_numbers.list()):
                campaigns = services(service.sid).us_app_to_person.list(limit=1)
                return f"{service.friendly_name} ({service.sid})", campaigns[0].campaign_status if campaigns else None
        return None

    def point_sms_webhook(self, number_sid: str, url: str):
        return self.client.incoming_phone_numbers(number_sid).update(sms_url=url, sms_method="POST")

    def falls_back_to_a_flow(self, number: str) -> bool:
        """Whether Twilio hands the number's texts to a Studio flow when the relay cannot take them."""
        try:
            record = self.find_number(number)
        except (TwilioException, requests.RequestException):
            return False  # not known, so not said
        return bool(record and STUDIO_WEBHOOK.search(record.sms_fallback_url or ""))

    def point_sms_fallback(self, number_sid: str, url: str):
        return self.client.incoming_phone_numbers(number_sid).update(sms_fallback_url=url, sms_fallback_method="POST")

    def flow_named(self, name: str):
        """The Studio flow of that name, with its definition (a list leaves it out), or None."""
        flows = self.client.studio.v2.flows
        found = next((flow for flow in flows.list() if flow.friendly_name == name), None)
        return flows(found.sid).fetch() if found else None

    def create_flow(self, name: str, definition: dict):
        return self.client.studio.v2.flows.create(friendly_name=name, status="published", definition=definition)

    def update_flow(self, sid: str, name: str, definition: dict):
        return self.client.studio.v2.flows(sid).update(
            status="published", friendly_name=name, definition=definition, commit_message="relay setup --apply"
        )


class DryRunGateway:
    """Sends nothing: logs each text and appends it to <state>/outbox.jsonl."""

    def __init__(self, state_dir: Path):
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # with a database, it holds only this
        self.outbox = state_dir / "outbox.jsonl"
        self.count = 0
        self.lock = threading.Lock()

    def send(
        self, from_: str, to: str, body: str, status_callback: str | None, media: list[str] = (), secret=False
    ) -> str:
        """`secret`: the body is a sign-in code, which stays out of the log (the outbox has it)."""
        return self._record("SMdryrun", "dry_run_sms", from_, to, body=body, media=list(media), secret=secret)

    def call(self, from_: str, to: str, twiml: str, status_callback: str | None) -> str:
        return self._record("CA", "dry_run_call", from_, to, kind="call", twiml=twiml, status_callback=status_callback)

    def _record(self, sid_prefix: str, event: str, from_: str, to: str, **what) -> str:
        """Append what would have been sent to the outbox and log it; a made-up sid of Twilio's length."""
        with self.lock:
            self.count += 1
            sid = sid_prefix + hashlib.sha1(f"{time.time()}{self.count}".encode()).hexdigest()[: 34 - len(sid_prefix)]
        secret = what.pop("secret", False)
        record = {"ts": time.time(), "sid": sid, "from": from_, "to": to, **what}
        append_durably(self.outbox, (json.dumps(record, ensure_ascii=False) + "\n").encode())
        shown = {k: "(withheld: a sign-in code)" if secret else v for k, v in what.items() if k in ("body", "twiml")}
        log("info", event, sid=sid, to=to, from_number=from_, **shown)
        return sid

    def end_call(self, sid: str, status: str) -> None:
        log("info", "dry_run_call_ended", sid=sid, status=status)

    refusal = None  # nothing is asked of Twilio


# ---------------------------------------------------------------------------
# Escalation rules: pure functions of a conversation and `now`
#
# A conversation and the time go in; the changed conversation comes out, with what it
# wants sent as pending pages. Nothing here reads a clock, a file or the network.
# ---------------------------------------------------------------------------

# -- texts: what a page says -------------------------------------------------------------------


def utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def fit_sms(text: str, limit: int = MAX_SMS_CHARS) -> str:
    """Cut text to Twilio's limit (counted in UTF-16 units, as Twilio does), marking the cut."""
    if utf16_len(text) <= limit:
        return text
    while utf16_len(text) > limit - 1:
        text = text[: len(text) - max(1, (utf16_len(text) - limit) // 2)]
    return text + "…"


MAX_MEDIA = 10  # Twilio's limit per message


def photos(count: int) -> str:
    return f" [{count} photo{'s' if count > 1 else ''}]" if count else ""


def relay_text(conv: Conversation) -> str:
    bodies = " / ".join(m["body"] for m in conv.messages)
    media = photos(sum(len(m.get("media", ())) for m in conv.messages))
    late = ""
    if conv.received_at is not None:
        also = "; the crew also had it from the fallback while the relay was down" if conv.forwarded else ""
        late = f" (received {ago(conv.created - conv.received_at)}{also})"
    return fit_sms(
        f"{conv.line} #{conv.code} from {conv.sender}{late}{media}: {bodies}\nReply #{conv.code} to take it."
    )


def ago(seconds: float) -> str:
    minutes = max(0, round(seconds / 60))
    if minutes < 120:
        return f"{minutes} min ago"
    return f"{minutes // 60} h {minutes % 60} min ago"


def followup_text(conv: Conversation, body: str, media: list[str]) -> str:
    return fit_sms(f"{conv.line} #{conv.code} from {conv.sender} (more){photos(len(media))}: {body}")


def all_media(conv: Conversation) -> list[str]:
    return [url for m in conv.messages for url in m.get("media", ())][:MAX_MEDIA]


def alarm_text(conv: Conversation) -> str:
    names = ", ".join(dict.fromkeys(c.name for c in people(conv)))
    first = conv.messages[0]["body"]
    return fit_sms(
        f"UNANSWERED {conv.line} #{conv.code} from {conv.sender}; nobody of {names} took it. "
        f"Reply #{conv.code} to take it: {first}"
    )


def listing(head: str, convs: list[Conversation], holder: bool = False) -> str:
    """A head, then one row per conversation (code, sender, first words, and with `holder` who has
    the step now) as far as one SMS takes, counting the rest."""
    text = head
    for shown, conv in enumerate(convs):
        entry = f"\n#{conv.code} {conv.sender} {first_words(conv.messages[0]['body'])}"
        if holder and conv.is_open:
            entry += f" (with {contact_at(conv, conv.step).name})"
        rest = f"\n... and {len(convs) - shown} more"
        # Room is kept to count the rest: any later count is no longer than this one.
        if utf16_len(text + entry) + len(rest) > MAX_SMS_CHARS:
            return text + rest
        text += entry
    return text


def first_words(body: str, words: int = 5, chars: int = 40) -> str:
    return " ".join(body.split()[:words])[:chars]


def taken_text(conv: Conversation) -> str:
    return f"{conv.line} #{conv.code} from {conv.sender} was taken by {conv.acknowledged_by}."


# -- chains: steps, escalation, acknowledgement ------------------------------------------------


def contact_at(conv: Conversation, step: int) -> Contact:
    """Who the step pages: its contact, or for a rotation's step once begun, whoever was on shift."""
    contact = conv.chain[step % len(conv.chain)]
    if contact.rotation and (paged := conv.shifts.get(str(step))):
        return shared_contact(*paged, contact.wait, contact.hours, contact.via, contact.rotation)
    return contact


def step_name(contact: Contact) -> str:
    """A step as people read it: its contact, or a rotation's step not yet begun."""
    return f"whoever is on shift of {contact.rotation}" if contact.rotation and not contact.phone else contact.name


def people(conv: Conversation) -> list[Contact]:
    """Everyone the conversation's chain names or has paged, each once."""
    fixed = [c for c in conv.chain if not c.rotation]
    return fixed + [contact_at(conv, int(step)) for step in conv.shifts]


def on_duty(contact: Contact, timezone: str, now: float) -> bool:
    if contact.hours is None:
        return True
    local = datetime.datetime.fromtimestamp(now, zoneinfo.ZoneInfo(timezone))
    minute = local.hour * 60 + local.minute
    start_h, start_m, end_h, end_m = map(int, HOURS.fullmatch(contact.hours).groups())
    start, end = start_h * 60 + start_m, end_h * 60 + end_m
    if start == end:
        return True
    return start <= minute < end if start < end else minute >= start or minute < end


def on_call(step: Contact, roster: Roster | None, now: float) -> Contact:
    """The step as it would page now: a rotation's step as whoever is on shift (left as it is when
    nobody is: its rotation has left the config)."""
    member = roster.on_shift(step.rotation, now) if step.rotation and roster else None
    return shared_contact(*member, step.wait, step.hours, step.via, step.rotation) if member else step


def first_on_duty(line: Line, roster: Roster, now: float) -> Contact:
    """Whom the line's chain would page first now: its first step on duty (else its last)."""
    return on_call(next((c for c in line.chain if on_duty(c, line.timezone, now)), line.chain[-1]), roster, now)


def _begin_step(conv: Conversation, step: int, now: float, roster: Roster | None) -> None:
    """Page the first contact from `step` on who is on duty; if nobody is, the last one anyway.
    A rotation's step pages whoever is on shift now (one whose rotation has left the config: nobody)."""
    last = len(conv.chain) * conv.rounds - 1
    step = next((s for s in range(step, last + 1) if on_duty(contact_at(conv, s), conv.timezone, now)), last)
    if (rotation := contact_at(conv, step).rotation) is not None:
        if roster is None:
            raise ValueError("a rotation's step begins only with the roster")
        if member := roster.on_shift(rotation, now):
            conv.shifts[str(step)] = list(member)
    contact = contact_at(conv, step)
    conv.step, conv.step_started, conv.deadline = step, now, now + contact.wait
    for kind in CHANNELS[contact.via] if contact.phone else ():
        media = all_media(conv) if kind == "page" else []
        page = Page(to=contact.phone, body=relay_text(conv), kind=kind, step=step, retry_at=now, media=media)
        conv.pages.append(page)


def tell_customer(conv: Conversation, event: str, now: float, contact: str = "") -> None:
    """The line's optional text to the customer for this event, at most once per conversation."""
    template, kind = conv.customer_texts.get(event), f"customer_{event}"
    if template and not any(p.kind == kind for p in conv.pages):
        body = fit_sms(template.format(line=conv.line, contact=contact))
        conv.pages.append(Page(to=conv.sender, body=body, kind=kind, retry_at=now))


def start_conversation(
    line: Line,
    config: Config,
    sid: str,
    sender: str,
    body: str,
    code: str,
    now: float,
    media: list[str] = (),
    received_at: float | None = None,
    forwarded: bool = False,
    roster: Roster | None = None,
) -> Conversation:
    conv = Conversation(
        id=sid,
        line=line.name,
        number=line.number,
        code=code,
        sender=sender,
        chain=list(line.chain),
        rounds=config.repeat + 1,
        alarm_phone=config.alarm_phone,
        created=now,
        step=0,
        step_started=now,
        deadline=now,
        messages=[message(sid, body, now, media)],
        timezone=line.timezone,
        two_way=line.reply_to_sender,
        customer_texts={
            event: text
            for event, text in (("acknowledged", line.acknowledged_text), ("unanswered", line.unanswered_text))
            if text
        },
        received_at=received_at,
        forwarded=forwarded,
    )
    _begin_step(conv, 0, now, roster)
    return conv


def message(sid: str, body: str, now: float, media: list[str] = ()) -> dict:
    return {"sid": sid, "body": body, "at": now, **({"media": list(media)} if media else {})}


def escalate(conv: Conversation, now: float, roster: Roster | None = None) -> str:
    """Move to the next contact, or end the conversation unanswered; says which."""
    if conv.step + 1 < len(conv.chain) * conv.rounds:
        _begin_step(conv, conv.step + 1, now, roster)
        return "escalated"
    conv.status, conv.finished_at = UNANSWERED_STATUS, now
    conv.pages.append(Page(to=alarm_phone(conv, now, roster), body=alarm_text(conv), kind="alarm", retry_at=now))
    tell_customer(conv, "unanswered", now)
    return "unanswered"


def alarm_phone(conv: Conversation, now: float, roster: Roster | None) -> str:
    """Who hears of a chain that ran out: the alarm phone, else the chain's first contact (for a
    rotation: whoever is on shift now, else whom its step paged)."""
    return conv.alarm_phone or on_call(conv.chain[0], roster, now).phone or next((c.phone for c in people(conv)), "")


def alarm_page(conv: Conversation) -> Page | None:
    return next((p for p in reversed(conv.pages) if p.kind == "alarm"), None)


def expire(conv: Conversation, now: float, roster: Roster | None = None) -> str | None:
    """Escalate when the current step's wait has run out."""
    if conv.is_open and now >= conv.deadline:
        return escalate(conv, now, roster)
    return None


def acknowledge(conv: Conversation, contact: Contact, reply: dict | None, now: float) -> None:
    """Stop the escalation; everyone else who got the page is told who took it. `reply`: the text
    that took it (None: taken on the console)."""
    conv.status, conv.finished_at, conv.acknowledged_by = "acknowledged", now, contact.name
    conv.acknowledged_phone = contact.phone
    if reply:
        conv.replies.append(reply)
    told = [phone for phone in reached_phones(conv, delivered_only=True) if phone != contact.phone]
    _stop_paging(conv, now, contact.phone)
    conv.pages.extend(Page(to=phone, body=taken_text(conv), kind="notice", retry_at=now) for phone in told)
    tell_customer(conv, "acknowledged", now, contact.name)


def close(conv: Conversation, now: float) -> None:
    """End it without paging anyone (on the console): nothing still to send to the crew is sent."""
    conv.status, conv.finished_at = CLOSED_STATUS, now
    _stop_paging(conv, now)


def _stop_paging(conv: Conversation, now: float, taker: str | None = None) -> None:
    for page in conv.pages:
        # Pages not yet with Twilio, and follow-ups still held by a cap, have nobody left to tell.
        unsent = page.state in ("pending", "held") if page.kind in STEP_KINDS else page.state == "held"
        if unsent and page.kind in (*STEP_KINDS, "followup"):
            page.state = "cancelled"
        if page.kind == "call" and page.state == "sent" and page.to != taker:
            # Still ringing someone else: end it. What a call ends with says which way to hang up.
            conv.pages.append(Page(to=page.to, body=page.sid or "", kind="end_call", retry_at=now))


def pass_on(conv: Conversation, contact: Contact, now: float, roster: Roster | None = None) -> str | None:
    """A contact says "not me": the next contact is paged at once, if this one holds the current step."""
    if conv.is_open and contact_at(conv, conv.step).phone == contact.phone:
        return escalate(conv, now, roster)
    return None


def others_told(conv: Conversation) -> str:
    """For the contact who took it: who else was paged and is told, or that nobody was."""
    names = {c.phone: c.name for c in people(conv)}
    others = [names[phone] for phone in reached_phones(conv, delivered_only=True) if phone != conv.acknowledged_phone]
    if not others:
        return "Nobody else is paged."
    were, are = ("was", "is") if len(others) == 1 else ("were", "are")
    return f"Nobody else is paged; {', '.join(others)} {were} paged too and {are} told you took it."


def holder_words(conv: Conversation) -> str:
    """Where a conversation stands, for a contact it is not with."""
    if conv.is_open:
        return f"is with {contact_at(conv, conv.step).name} now"
    if conv.status == UNANSWERED_STATUS:
        return "ended with nobody answering and is listed as unanswered"
    if conv.status == HELD_STATUS:
        return "is held by a cost cap and pages nobody yet"
    if conv.status == CLOSED_STATUS:
        return "was closed on the console"
    return f"was taken by {conv.acknowledged_by}"


def join(conv: Conversation, sid: str, body: str, now: float, held: str | None = None, media: list[str] = ()) -> None:
    """A further text from the customer: relay it to everyone already paged, or hold it for a cap.

    On a two-way line after an acknowledgement it goes to the contact who took it. A conversation
    whose chain waits for a cap gains the text, and its first page will carry it.
    """
    conv.messages.append(message(sid, body, now, media))
    if conv.status == HELD_STATUS:
        return
    phones = reached_phones(conv) if conv.is_open else [conv.acknowledged_phone]
    text = followup_text(conv, body, list(media))
    for phone in phones:
        page = Page(to=phone, body=text, kind="followup", retry_at=now, media=list(media)[:MAX_MEDIA])
        if held:
            hold_page(page, held)
        conv.pages.append(page)


# -- calls -------------------------------------------------------------------------------------


MAX_TWIML = 4000  # Twilio's limit on inline TwiML
PROMPT = "Press 1 to take it. Press 2 to pass it on."
CUT_MARK = " ... The message is cut here; the rest is in your texts."
GATHER_SECONDS = 6


def spoken(text: str) -> str:
    """Text a voice can read: no control characters, no lone surrogates; emoji pass through."""
    text = "".join(ch if ch.isprintable() or ch == " " else " " for ch in text)
    return text.encode("utf-8", "replace").decode("utf-8")


def sentence(text: str) -> str:
    """The text as a sentence: a full stop added only where it does not end in one already."""
    text = text.rstrip()
    return text if text.endswith((".", "!", "?", "…")) else f"{text}."


def spoken_number(phone: str) -> str:
    return " ".join("plus" if ch == "+" else ch for ch in phone)


def call_twiml(conv: Conversation, gather_url: str) -> str:
    """The call: whose line, who texted, the text (cut with a mark if long), then the prompt, twice.

    Inline TwiML may be 4,000 characters (counted here in UTF-16 units, as for texts, to be safe).
    """
    bodies = spoken(" ... ".join(m["body"] for m in conv.messages))
    keep = len(bodies)
    while True:
        text = bodies if keep >= len(bodies) else bodies[:keep] + CUT_MARK
        said = f"Message on the {conv.line} line from {spoken_number(conv.sender)}. {sentence(text)} {PROMPT}"
        response = VoiceResponse()
        ask(response, gather_url, said, f"Again: {PROMPT}")
        twiml = str(response)
        over = utf16_len(twiml) - MAX_TWIML
        if over <= 0 or keep == 0:
            return twiml
        keep = max(0, min(keep, len(bodies)) - over)  # each character cut shortens it by a unit at least


def key_twiml(words: str, gather_url: str | None = None) -> str:
    """The answer to a key press: words, then either the prompt once more or the end of the call."""
    response = VoiceResponse()
    if gather_url:
        ask(response, gather_url, words)
    else:
        response.say(words)
    response.hangup()
    return str(response)


def ask(response: VoiceResponse, gather_url: str, *prompts: str) -> None:
    """Each prompt waiting for one key, sent to `gather_url`; the goodbye once none was pressed."""
    for words in prompts:
        response.gather(num_digits=1, action=gather_url, method="POST", timeout=GATHER_SECONDS).say(words)
    response.say("Nothing was pressed. Goodbye.")


NOT_TAKEN_STATUSES = {"no-answer", "busy", "failed", "canceled"}


def call_progress(
    conv: Conversation, index: int, status: str, answered_by: str, sid: str, now: float, roster: Roster | None = None
) -> str | None:
    """Twilio's report on a call: one not taken (or taken by a machine) moves the chain on at once."""
    page = conv.pages[index]
    page.call_status = status or ("in-progress" if answered_by else page.call_status)  # a verdict means answered
    machine = answered_by.startswith("machine_") or answered_by == "fax"
    if page.state == "pending":  # reported on before its REST answer was stored: Twilio placed it all the same
        page.state, page.sid = "sent", sid
    if page.state != "sent":
        return None  # already taken, passed or given up
    if machine or status in NOT_TAKEN_STATUSES or status == "completed":
        page.state, page.error = "not_taken", f"call {answered_by if machine else status}"
        if machine and status not in ("completed", *NOT_TAKEN_STATUSES):
            conv.pages.append(Page(to=page.to, body=page.sid or "", kind="end_call", retry_at=now))
        return delivery_failed(conv, index, now, roster)
    return None


# -- replies: what a contact's text says -------------------------------------------------------


CODE_IN_TEXT = re.compile(r"#([A-Za-z0-9]{1,6})\b")
BARE_CODE = re.compile(r"#?([A-Za-z0-9]{1,6})[.!]?")
# Carrier and Twilio keywords (opt-out, help, opt-in): never an acknowledgement.
KEYWORDS = {"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT"}
KEYWORDS |= {"HELP", "INFO", "START", "UNSTOP"}


ACK_WORDS = {"ok", "okay", "k", "kk", "yes", "y", "yep", "got it", "on it", "mine", "thanks", "thank you", "ack"}
ACK_WORDS |= {"will do", "roger", "sure", "done", "👍", "👌", "✅"}


PASS_WORDS = {"pass", "no", "can't", "cant", "cannot"}
LIST_WORDS = {"list", "?"}
APOSTROPHES = str.maketrans({"’": "'", "‘": "'", "ʼ": "'", "`": "'", "´": "'"})


TAKE = re.compile(r"take(?:\s+(\S.*))?", re.IGNORECASE)


def without_code(body: str) -> str:
    return CODE_IN_TEXT.sub("", body).strip()


def is_bare_ack(text: str) -> bool:
    """A reply (its code taken out) that only acknowledges (`#7`, `ok`, `7 👍`), with nothing for the
    customer to read."""
    if (m := BARE_CODE.match(text)) and m.group(0).strip(".!").isdigit():
        text = text[m.end() :]
    return text.strip(" .!,;:-").lower() in ACK_WORDS | {""}


def reply_to_customer(conv: Conversation, reply: Reply, now: float) -> bool:
    """On a two-way line, pass a contact's real answer on to the customer, without the code."""
    if not conv.two_way or reply.bare_ack:
        return False
    conv.pages.append(Page(to=conv.sender, body=fit_sms(reply.text), kind="customer_reply", retry_at=now))
    return True


def take_request(body: str) -> int | str | None:
    """`take` (0: until the shift ends) or `take DURATION` (its seconds); the words when they are no
    duration (a string); None when the text is no take."""
    found = TAKE.fullmatch(body.strip())
    if found is None:
        return None
    if found[1] is None:
        return 0
    try:
        seconds = parse_duration(found[1], "take")
    except ConfigError:
        return found[1]
    return seconds if seconds <= MAX_TAKE else found[1]


def reply_word(text: str) -> str | None:
    """ "pass" or "list" when that is the whole reply (its code taken out), else None."""
    word = text.strip().strip(".!").lower().translate(APOSTROPHES)
    if word in PASS_WORDS:
        return "pass"
    if word in LIST_WORDS:
        return "list"
    return None


def code_candidate(body: str) -> str | None:
    """What a reply could name as a code: `#7` in it, or the whole reply one bare word (`7`, `ok`)."""
    if m := CODE_IN_TEXT.search(body):
        return m[1].upper()
    m = BARE_CODE.fullmatch(body.strip())
    return m[1].upper() if m else None


class Reply(typing.NamedTuple):
    """A contact's text, read once as it arrives: what it asks of the relay."""

    keyword: bool  # STOP, HELP and the like: Twilio's, never an acknowledgement
    take: int | str | None  # a `take` (see take_request), else None
    word: str | None  # "pass" or "list" when that is the whole reply, its code apart
    code: str | None  # what it could name as a code: `#7` in it, or the whole reply one bare word
    named: bool  # written as a code (with `#`, or all digits): a bare word is one only while open
    text: str  # the reply without its code, as a two-way line's customer reads it
    bare_ack: bool  # it only acknowledges (`#7`, `ok`, `7 👍`): nothing for the customer


def read_reply(body: str) -> Reply:
    text, code = without_code(body), code_candidate(body)
    return Reply(
        keyword=body.strip().strip(".!").upper() in KEYWORDS,
        take=take_request(body),
        word=reply_word(text),
        code=code,
        named=code is not None and (CODE_IN_TEXT.search(body) is not None or code.isdigit()),
        text=text,
        bare_ack=is_bare_ack(text),
    )


def named_code(reply: Reply, open_codes: set[str]) -> str | None:
    """The code a reply names: `#7 on it`, or a bare `7` (codes are numbers), or a bare word that is open."""
    return reply.code if reply.code is not None and (reply.named or reply.code in open_codes) else None


def choose_acknowledged(
    open_convs: list[Conversation], phone: str, reply: Reply, talking: list[Conversation] = ()
) -> tuple[Conversation | None, str | None]:
    """Which conversation a contact's reply is about, and the code it named if any.

    A named code picks among the open ones and those still `talking` (two-way, acknowledged);
    no code picks the newest open one paged to that contact, else the newest it is talking in.
    """
    by_code = {c.code: c for c in [*talking, *open_convs]}
    code = named_code(reply, set(by_code))
    if code is not None:
        return by_code.get(code), code
    paged = [c for c in open_convs if phone in reached_phones(c)]
    mine = [c for c in talking if c.acknowledged_phone == phone]
    return max(paged or mine, key=lambda c: c.created, default=None), None


# -- caps: held texts --------------------------------------------------------------------------


# The operator must hear of trouble even over a cap; ending a call and answering a contact cost nothing.
NEVER_HELD = {"alarm", "cap_alarm", "bundle", "end_call", "confirmation"}
# Follow-ups and texts to customers may use this share of the outbound cap; the rest is kept for
# the chains' own pages, so a flood of follow-ups cannot keep a new customer's first page waiting.
FOLLOWUP_SHARE = 0.75
BUNDLE_EVERY = 600.0


def sender_cap(line: str, sender: str) -> str:
    """The key a customer's texts are counted under, for the sender cap."""
    return f"sender:{line}:{sender}"


def hold_page(page: Page, reason: str) -> None:
    page.state, page.error = "held", reason


def hold(conv: Conversation, reason: str, now: float) -> None:
    """Over the sender cap: the conversation is stored and listed, and its chain waits for the cap."""
    for page in conv.pages:
        if page.state == "pending" and page.kind not in NEVER_HELD:
            hold_page(page, reason)
    if conv.is_open:
        conv.status = HELD_STATUS


def release(conv: Conversation, index: int, now: float) -> None:
    """The cap allows a held page now. A held conversation's chain starts here, with every text so far."""
    page = conv.pages[index]
    page.state, page.error, page.retry_at = "pending", None, now
    if conv.status == HELD_STATUS:
        conv.status = OPEN_STATUS
        conv.step_started, conv.deadline = now, now + contact_at(conv, conv.step).wait
        if page.kind == "page":
            page.body, page.media = relay_text(conv), all_media(conv)


def bundle_text(line: str, held: list[Conversation]) -> str:
    return listing(f"{line}: {len(held)} text(s) held by a cost cap; they go out as the cap allows:", held)


# -- delivery: Twilio's answers and reports ----------------------------------------------------


RETRY_BASE = 1.0
RETRY_CAP = 60.0
RETRY_AFTER_CAP = 300.0
# About three hours of tries at the 60 s cap: a Twilio outage delays pages (the escalation timers run on
# meanwhile) but does not drop them. Past that the page counts as failed and the chain moves on.
MAX_ATTEMPTS = 200


def retry_delay(attempts: int, retry_after: float | None, jitter: float) -> float:
    """Exponential backoff with jitter (jitter in [0, 1)), never sooner than Retry-After."""
    backoff = min(RETRY_CAP, RETRY_BASE * 2 ** (attempts - 1))
    delay = backoff / 2 + jitter * backoff / 2
    if retry_after is not None:
        delay = max(delay, min(retry_after, RETRY_AFTER_CAP))
    return delay


def record_sent(conv: Conversation, index: int, sid: str | None, now: float) -> None:
    """Twilio took the page. One taken meanwhile by somebody else gets its contact the "taken by" text,
    and a call placed meanwhile is ended."""
    page = conv.pages[index]
    if page.state not in ("pending", "cancelled"):  # a report came first and moved it on: it stands
        page.sid, page.sent_at = page.sid or sid, page.sent_at or now
        return
    overtaken = page.state == "cancelled" and page.kind in STEP_KINDS and page.to != conv.acknowledged_phone
    page.state, page.sid, page.error, page.sent_at = "sent", sid, None, now
    if overtaken and conv.status == "acknowledged":
        conv.pages.append(Page(to=page.to, body=taken_text(conv), kind="notice", retry_at=now))
        if page.kind == "call":
            conv.pages.append(Page(to=page.to, body=sid or "", kind="end_call", retry_at=now))


def record_send_error(
    conv: Conversation, index: int, error: SendError, now: float, jitter: float, roster: Roster | None = None
) -> str:
    """Retry a transient failure; a permanent one (or too many) moves the chain on at once."""
    page = conv.pages[index]
    page.error = error.reason
    if not error.permanent and page.attempts < MAX_ATTEMPTS:
        page.retry_at = now + retry_delay(page.attempts, error.retry_after, jitter)
        return "retry"
    page.state = "failed"
    return delivery_failed(conv, index, now, roster) or "failed"


def delivery_failed(conv: Conversation, index: int, now: float, roster: Roster | None = None) -> str | None:
    """The page to the contact on duty will never reach them: do not wait out the timer.

    On an sms+call step that holds only when the other channel has failed too.
    """
    page = conv.pages[index]
    if page.kind not in STEP_KINDS or not conv.is_open or page.step != conv.step:
        return None
    step_pages = [p for p in conv.pages if p.kind in STEP_KINDS and p.step == page.step]
    if all(p.state in FAILED_STATES for p in step_pages):
        return escalate(conv, now, roster)
    return None


# Twilio's errors for texts carriers will not carry: unverified toll-free, unregistered 10DLC, filtered.
CARRIER_BLOCK_CODES = {"30032", "30034", "30007"}


def record_status(
    conv: Conversation,
    index: int,
    status: str,
    error_code: str | None,
    now: float,
    call_when_blocked: bool = False,
    roster: Roster | None = None,
) -> str | None:
    page = conv.pages[index]
    if status in ("delivered", "read"):
        page.state = "delivered"
    elif status in ("failed", "undelivered"):
        page.state, page.error = status, f"callback {status} {error_code or ''}".strip()
        if call_when_blocked and error_code in CARRIER_BLOCK_CODES and call_instead(conv, index, now):
            return None
        return delivery_failed(conv, index, now, roster)
    return None


def call_instead(conv: Conversation, index: int, now: float) -> bool:
    """A step's text carriers blocked: call that contact within the same step and its wait (calls need
    no A2P registration). Not when the step calls them already, nor once the step has moved on."""
    page = conv.pages[index]
    if page.kind != "page" or not conv.is_open or page.step != conv.step:
        return False
    if any(p.kind == "call" and p.step == page.step and p.to == page.to for p in conv.pages):
        return False
    conv.pages.append(Page(to=page.to, body=page.body, kind="call", step=page.step, retry_at=now))
    return True


# ---------------------------------------------------------------------------
# The relay service
#
# Relay puts the rules, the store and the gateway together: each webhook, key press, report
# and console action is one store transaction running the rules, and the pages it claims are
# sent once it is stored.
# ---------------------------------------------------------------------------


class BadRequest(Exception):
    """A request refused with `status`; `label` names the kind for metrics, `reason` says it to people."""

    def __init__(self, status: int, label: str, reason: str):
        super().__init__(reason)
        self.status, self.label, self.reason = status, label, reason


# A flood of pages to one contact goes out this many at a time, started in order: enough that their
# stores' fsyncs and Twilio's answers overlap, so a burst of backups all due at once reaches Twilio on
# time; few enough that a recipient whose sends hang leaves threads and connections for the others.
SENDS_PER_RECIPIENT = 64


class SendThreads:
    """A thread per send in flight: one recipient's stalled send never holds up another's page.

    The threads are started by a starter thread of their own. `Thread.start` waits until the new
    thread runs, so a webhook that started one would hand it the interpreter lock, and the send's
    own work, before its answer went out.
    """

    IDLE_SECONDS = 5.0  # the starter leaves after this long with nothing to start

    def __init__(self):
        self.active: set[threading.Thread] = set()
        self.waiting: deque[tuple[Callable, tuple]] = deque()
        self.lock = threading.Lock()
        self.ready = threading.Condition(self.lock)
        self.starter: threading.Thread | None = None

    def submit(self, fn, *args) -> None:
        with self.lock:
            self.waiting.append((fn, args))
            self.ready.notify()
            if self.starter is not None:
                return
            self.starter = threading.Thread(target=self._start_waiting, name="send-starter", daemon=True)
        self.starter.start()

    def _start_waiting(self) -> None:
        while True:
            with self.lock:
                if not self.waiting:
                    self.ready.wait(self.IDLE_SECONDS)
                if not self.waiting:
                    self.starter = None
                    return
                fn, args = self.waiting.popleft()
                thread = threading.Thread(target=self._run, args=(fn, args), name="send", daemon=True)
                self.active.add(thread)
                thread.start()  # under the lock: what shutdown finds in `active` can be joined

    def _run(self, fn, args) -> None:
        try:
            fn(*args)
        except Exception as e:  # the page stays pending on disk and is tried again after a restart
            log("error", "send_crashed", error=repr(e))
        finally:
            with self.lock:
                self.active.discard(threading.current_thread())

    def shutdown(self, wait: bool = True, timeout: float | None = None) -> int:
        """Wait for the sends in flight (up to `timeout`); returns how many were still going."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while wait:
            with self.lock:
                threads, waiting = list(self.active), bool(self.waiting)
            if not threads and not waiting:
                break
            for thread in threads:
                thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if not threads:
                time.sleep(0.01)  # the starter is starting what waits
            if deadline is not None and time.monotonic() >= deadline:
                break
        with self.lock:
            return len(self.active) + len(self.waiting)


def conv_ids(conv: Conversation, **more) -> dict:
    """The ids a log line about a conversation carries, and `more`."""
    return {"line": conv.line, "code": conv.code, **more}


class Outbox:
    """Sends the pages the relay claims, each once it is stored: a queue per recipient, drained in order
    by up to SENDS_PER_RECIPIENT threads of its own, so a recipient whose sends stall holds up nobody
    else. Keeps the claims of what is in flight, and hands back what was not started when stopping."""

    def __init__(self, relay: Relay):
        self.relay = relay
        self.store, self.clock = relay.store, relay.clock
        self.lock = threading.Lock()  # guards what follows
        self.in_flight: dict[str, set[int]] = {}  # conversation id -> pages queued or being sent now
        self.queues: dict[str, deque[tuple[str, int]]] = {}  # recipient -> (conversation id, page) in order
        self.workers: dict[str, int] = {}  # recipient -> threads draining its queue
        self.stopping = False
        self.senders = SendThreads()
        self.random = random.Random()
        self.renewed = 0.0  # when this relay's claims were last renewed

    def in_flight_of(self, conv_id: str) -> set[int]:
        with self.lock:
            return set(self.in_flight.get(conv_id, ()))

    def tidy(self) -> None:
        with self.lock:
            if not self.in_flight:  # a dict keeps the table of its busiest moment, a flood's queue
                self.in_flight = {}

    def text(self, from_: str, to: str, body: str, secret: bool = False) -> None:
        """A text about no conversation, sent on a thread of its own (`secret`: a sign-in code)."""
        self.senders.submit(self._text_now, from_, to, body, secret)

    def call(self, from_: str, to: str, text: str) -> None:
        """A call about no conversation that reads `text` out, placed on a thread of its own."""
        self.senders.submit(self._call_now, from_, to, text)

    def callback_url(self, route: str, conv: Conversation, index: int, **more) -> str | None:
        """A URL on the public URL for Twilio to call back about one page (None without a public URL).

        In dry-run without one, the relay's own address, so `press` can walk a call through.
        """
        settings = self.relay.settings
        base = self.relay.public_url or (f"http://127.0.0.1:{settings.port}" if settings.dry_run else None)
        if not base:
            return None
        return f"{base}{route}?{urllib.parse.urlencode({'c': conv.id, 'p': index, **more})}"

    def _done(self, conv_id: str, index: int) -> None:
        """(with the outbox locked)"""
        sending = self.in_flight.get(conv_id, set())
        sending.discard(index)
        if not sending:
            self.in_flight.pop(conv_id, None)

    def _drain(self, to: str) -> None:
        """Runs on one of the recipient's threads: its queued pages, oldest first, until none is left."""
        while True:
            with self.lock:
                queue = self.queues.get(to)
                if not queue or self.stopping:  # when stopping, what is left stays pending for the next start
                    for conv_id, index in queue or ():
                        self._done(conv_id, index)
                    self.workers[to] -= 1
                    if not self.workers[to]:
                        del self.workers[to]
                        self.queues.pop(to, None)
                    return
                conv_id, index = queue.popleft()
            try:
                self._send(conv_id, index)
            except Exception as e:  # the page stays pending, tried again after a backoff
                log("error", "send_crashed", to=to, error=repr(e))
                with self.lock:
                    self._done(conv_id, index)
                try:
                    with self.store.transaction(redone=True):
                        if (conv := self.store.get(conv_id)) and index < len(conv.pages):
                            page = conv.pages[index]
                            page.retry_at = self.clock() + retry_delay(
                                max(1, page.attempts), None, self.random.random()
                            )
                            self.relay.save(conv, changed=False)
                except StoreFailure:
                    pass  # the healed store has the page pending, and the sweep takes it up
                self.relay.sweeper.wake()

    def _send(self, conv_id: str, index: int) -> None:
        """One attempt at one page, its outcome stored before anything else."""
        with self.store.transaction(reading=True):
            conv = self.store.get(conv_id)
            page = self._still_to_send(conv, index)
        counting = page is not None and not page.counted and page.kind not in NEVER_HELD
        if counting:  # counted now, by itself: the cap's lock is held for the count alone
            with self.store.transaction(reading=True):
                counted = self.relay.caps.take_outbound(page, self.clock())
            if not counted:
                self._hold_over_cap(conv_id, index)
                page = None
        # Looked at last, just before Twilio: a claim that lapsed meanwhile (a slow database, or this
        # relay frozen) is renewed first, unless another relay claimed the page since (then it was
        # counted for nothing, and the cap errs on the side of fewer texts).
        if page is not None and not self.store.claimed_by(page, self.relay.id, self.clock()):
            conv = self.store.change(conv_id, functools.partial(self._reclaim, index=index), lambda: ())
            page = self._still_to_send(conv, index)
        if page is not None:
            request = self._request(conv, index)
        else:  # a page not yet with Twilio stays unsent
            with self.lock:
                self._done(conv_id, index)
            return
        try:
            outcome: SendError | str | None = request()
        except SendError as e:
            outcome = e
        except Exception as e:  # a bug or an unexpected library error must not lose the page
            outcome = SendError(f"unexpected {type(e).__name__}", permanent=False)
        event = result = None

        def record(conv: Conversation) -> bool:
            nonlocal event, result
            event = result = None
            if index >= len(conv.pages):  # the store was reloaded and has no such page
                return False
            page = conv.pages[index]
            page.attempts += 1
            page.lease = 0.0
            page.counted = page.counted or counting
            if isinstance(outcome, SendError):
                self.relay.twilio_errors.append(self.clock())
                event = record_send_error(conv, index, outcome, self.clock(), self.random.random(), self.relay.roster)
                result = "retry" if event == "retry" else "failed"
            else:
                record_sent(conv, index, outcome, self.clock())
                event, result = None, "sent"
            return True

        # In flight until its outcome is stored (so its claim is renewed meanwhile), but not for its
        # own next look: a retry is due at its retry time.
        try:
            conv = self.store.change(conv_id, record, lambda: self.in_flight_of(conv_id) - {index}, afterwards=True)
        finally:
            with self.lock:
                self._done(conv_id, index)
        if conv is None or result is None:  # the store was reloaded and has no such page
            return
        page = conv.pages[index]
        SENDS.labels(result).inc()
        ids = conv_ids(conv, to=page.to, kind=page.kind, attempt=page.attempts)
        if page.kind == "alarm" and page.attempts == 1 and conv.line in self.relay.carrier_blocked:
            # The alarm text may be blocked like the pages were: the alarm phone is called as well.
            self.call(conv.number, page.to, page.body)
        if result == "sent":
            log("info", "relay_sent", twilio_sid=outcome, **ids)
        else:
            level = "warning" if result == "retry" else "error"
            log(level, "send_failed", result=result, reason=outcome.reason, error_code=outcome.code, **ids)
            if event != "retry":
                self.relay.after_change(conv, event, reason=outcome.reason)
        self.relay.wake_for(conv)

    def _hold_over_cap(self, conv_id: str, index: int) -> None:
        """The outbound cap is spent: the page waits, held, for the hour to make room (release_held)."""
        with self.store.transaction(redone=True):
            conv = self.store.get(conv_id)
            if self._still_to_send(conv, index) is None:
                return
            hold_page(conv.pages[index], "outbound cap")
            self.relay.caps.reached("outbound", conv, self.clock())
            ticket = self.relay.save(conv)
        self.store.wait(ticket)
        self.relay.wake_for(conv)  # the cap's alarm, if one was added

    def _still_to_send(self, conv: Conversation | None, index: int) -> Page | None:
        """The page, if it is still this relay's to send: not taken, reloaded or sent since it was
        claimed, nor claimed by another relay since this one's claim lapsed (cut off or frozen)."""
        page = conv.pages[index] if conv and index < len(conv.pages) else None
        if page is None or page.state != "pending" or not self.store.claimed_by(page, self.relay.id):
            return None
        return page

    def _reclaim(self, conv: Conversation, index: int) -> bool:
        """Renew this relay's lapsed claim on a page, if no other relay has claimed it since."""
        if self._still_to_send(conv, index) is None:
            return False
        return self.store.claim(conv.pages[index], self.relay.id, self.clock())

    def _request(self, conv: Conversation, index: int) -> Callable[[], str | None]:
        """The call to Twilio that sends the page."""
        page = conv.pages[index]
        if page.kind == "call":
            gather = self.callback_url("/api/voice/gather", conv, index) or ""
            twiml = call_twiml(conv, gather)
            status = self.callback_url("/api/voice/status", conv, index)
            return functools.partial(self.relay.gateway.call, conv.number, page.to, twiml, status)
        if page.kind == "end_call":
            hang_up = "completed" if self._call_status(conv, page.body) == "in-progress" else "canceled"
            return functools.partial(self.relay.gateway.end_call, page.body, hang_up)
        callback = self.callback_url("/api/sms/status", conv, index)
        return functools.partial(self.relay.gateway.send, conv.number, page.to, page.body, callback, page.media)

    def claim(self, conv: Conversation, now: float, to_send: list) -> bool:
        """Claim the conversation's pages due now for this relay to send (in a transaction).

        Each is leased where other relays could take it, marked in flight, and added to `to_send`
        (the outbound cap counts it when its send begins); returns whether the conversation changed.
        """
        changed, claimed = False, set()
        sending = self.in_flight_of(conv.id)  # only this conversation's: a flood's outbox may hold thousands
        for index, page in enumerate(conv.pages):
            if page.state != "pending" or max(page.retry_at, page.lease) > now or index in sending:
                continue
            changed = self.store.claim(page, self.relay.id, now) or changed  # no other relay sends it meanwhile
            claimed.add(index)
            to_send.append((conv.id, index, page.to))
        if claimed:
            with self.lock:
                self.in_flight.setdefault(conv.id, set()).update(claimed)
        return changed

    @contextlib.contextmanager
    def sending_once_stored(self, to_send: list):
        """Queue the pages claimed into `to_send` once what claimed them is stored; if it is not,
        none is sent and each stays pending in the store, for the sweep of a healed store."""
        try:
            yield
        except BaseException:
            with self.lock:
                for conv_id, index, _ in to_send:
                    self._done(conv_id, index)
            raise
        with self.lock:
            workers = []
            for conv_id, index, to in to_send:
                self.queues.setdefault(to, deque()).append((conv_id, index))
                if self.workers.get(to, 0) < min(SENDS_PER_RECIPIENT, len(self.queues[to])):
                    self.workers[to] = self.workers.get(to, 0) + 1
                    workers.append(to)
        for to in workers:
            self.senders.submit(self._drain, to)

    def hand_back(self) -> int:
        """Stopping: give up the pages queued here and not yet started; returns how many. Where other
        relays could send them, they are told at once (their claims cleared), not when claims lapse."""
        given_up: dict[str, set[int]] = {}
        with self.lock:
            self.stopping = True
            for queue in self.queues.values():
                while queue:
                    conv_id, index = queue.popleft()
                    self._done(conv_id, index)
                    given_up.setdefault(conv_id, set()).add(index)
        if given_up and self.store.SHARED and not self.store.failure:
            with contextlib.suppress(StoreFailure):
                self.store.give_up(given_up, self.relay.id)
        return sum(map(len, given_up.values()))

    def renew(self) -> None:
        """Where other relays could take them: keep this relay's claim on the pages it is sending."""
        if not self.store.SHARED or time.monotonic() - self.renewed < self.store.RENEW_EVERY:
            return  # the drain asks more often than that
        with self.lock:
            in_flight = {conv_id: set(pages) for conv_id, pages in self.in_flight.items()}
        if in_flight and not self.store.failure:  # a failed store: the claims lapse, and are taken anew
            self.renewed = time.monotonic()
            self.store.renew(in_flight, self.relay.id)

    @staticmethod
    def _call_status(conv: Conversation, call_sid: str) -> str | None:
        return next((p.call_status for p in conv.pages if p.kind == "call" and p.sid == call_sid), None)

    def _call_now(self, from_: str, to: str, text: str) -> None:
        """A call that reads a text out twice, about no conversation: placed once, not stored."""
        response = VoiceResponse()
        response.say(spoken(text))
        twiml = str(response)
        response.pause(length=1)
        response.say(f"Again: {spoken(text)}")
        if utf16_len(str(response)) <= MAX_TWIML:  # twice when twice fits Twilio's limit
            twiml = str(response)
        try:
            sid = self.relay.gateway.call(from_, to, twiml, None)
        except SendError as e:
            log("error", "direct_call_failed", to=to, reason=e.reason)
        else:
            log("info", "direct_called", to=to, twilio_sid=sid)

    def _text_now(self, from_: str, to: str, text: str, secret: bool = False) -> None:
        """A text about no conversation, sent with a few retries and not stored."""
        for attempt in range(1, 6):
            try:
                sid = self.relay.gateway.send(from_, to, text, None, secret=secret)
            except SendError as e:
                log("warning", "direct_send_failed", to=to, reason=e.reason, attempt=attempt)
                if e.permanent:
                    return
                time.sleep(retry_delay(attempt, e.retry_after, self.random.random()))
            else:
                log("info", "direct_sent", to=to, twilio_sid=sid)
                return


class CostCaps:
    """The hourly caps on what is sent: a page over one is held, not dropped, and released oldest first
    as the cap allows; the operator is told once an hour, and the contact on duty gets a bundle."""

    def __init__(self, relay: Relay):
        self.relay, self.store = relay, relay.store

    def reached(self, cap: str, conv: Conversation, now: float) -> None:
        """A text was held by a cost cap: tell the operator once an hour, not once a text (in a transaction)."""
        HELD.labels(cap).inc()
        if not self.store.once_every(f"cap_told:{cap}", HOUR, now):
            return
        limit = self.relay.config.sender_hourly_cap if cap == "sender" else self.relay.config.outbound_hourly_cap
        log("error", "cap_reached", cap=cap, limit=limit, **conv_ids(conv, sender=conv.sender))
        if self.relay.config.alarm_phone:
            text = (
                f"relay: the {cap} cap of {limit} texts an hour was reached on {conv.line} (latest from "
                f"{conv.sender}). Texts over it are held and go out as the cap allows; see `relay.py status`."
            )
            conv.pages.append(Page(to=self.relay.config.alarm_phone, body=text, kind="cap_alarm", retry_at=now))

    def take_outbound(self, page: Page, now: float) -> bool:
        if page.kind == "call":
            return self.store.take("outbound:calls", self.relay.config.call_hourly_cap, now)
        cap = self.relay.config.outbound_hourly_cap
        limit = cap if page.kind in ("page", "notice") else max(1, int(cap * FOLLOWUP_SHARE))
        return self.store.take("outbound:texts", limit, now)

    def release_held(self, now: float) -> None:
        """Release what the caps allow now, oldest first, and bundle the rest for the contact on duty."""
        tickets = []
        with self.store.transaction(redone=True):
            still = []
            for conv in self.store.held():
                changed = False
                for index in held_pages(conv):
                    page = conv.pages[index]
                    if page.error == "sender cap":
                        allowed = self.store.take(
                            sender_cap(conv.line, conv.sender), self.relay.config.sender_hourly_cap, now
                        )
                    else:
                        allowed = page.counted = self.take_outbound(page, now)
                    if allowed:
                        release(conv, index, now)
                        changed = True
                if changed:
                    tickets.append(self.relay.save(conv))
                if held_pages(conv):
                    still.append(conv)
            for line in self.relay.config.lines:
                held = [c for c in still if c.line == line.name]
                if held and self.store.once_every(f"bundle:{line.name}", BUNDLE_EVERY, now):
                    newest = max(held, key=lambda c: c.created)
                    duty = first_on_duty(line, self.relay.roster, now)
                    body = bundle_text(line.name, sorted(held, key=lambda c: c.created))
                    newest.pages.append(Page(to=duty.phone, body=body, kind="bundle", retry_at=now))
                    tickets.append(self.relay.save(newest))
                    log("warning", "held_bundle", line=line.name, to=duty.phone, held=len(held))
        for ticket in tickets:
            self.store.wait(ticket)
        if tickets:
            self.relay.sweeper.wake()


class Sweeper:
    """Takes what falls due: sleeps until the next deadline or retry, or until new work wakes it (never
    a fixed tick), then runs the rules on each conversation due and queues what they want sent."""

    def __init__(self, relay: Relay):
        self.relay, self.store, self.clock = relay, relay.store, relay.clock
        self.lock = threading.Lock()
        self.woken = threading.Condition(self.lock)
        self.last_sweep = 0.0
        self.sweep_at = math.inf  # when the sweep looks next (inf: it is looking now)
        self.most = SWEEP_MOST  # how many due conversations a pass takes

    def run(self, stop: threading.Event) -> None:
        """The sweeper's thread: a sweep, housekeeping about once a second, reminders; then sleep."""
        relay, next_housekeeping = self.relay, 0.0
        while not stop.is_set():
            with self.lock:
                self.sweep_at = math.inf
            try:
                next_at = self.sweep()
                if time.monotonic() >= next_housekeeping:
                    relay.housekeeping()
                    next_housekeeping = time.monotonic() + HOUSEKEEPING_EVERY
                if not self.store.failure:
                    relay.shifts.remind()
            except Exception as e:  # keep paging whatever one pass hit; /healthz shows a stall
                log("error", "sweep_failed", error=repr(e))
                next_at = None
            with self.lock:
                timeout = min(
                    HOUSEKEEPING_EVERY if next_at is None else next_at - self.clock(),
                    relay.shifts.reminder_at - self.clock(),
                    self.store.POLL,
                )
                if timeout > 0 and self.sweep_at == math.inf:  # else it was asked to look again meanwhile
                    self.sweep_at = self.clock() + timeout
                    self.woken.wait(timeout)

    def sweep(self) -> float | None:
        """Fire what is due; returns when next to look. Sends are queued on their recipient's thread."""
        if self.store.failure:
            return None
        started, began = time.thread_time(), time.monotonic()
        events, to_send, tickets, lag = [], [], [], 0.0
        with self.relay.outbox.sending_once_stored(to_send):
            with self.store.transaction(redone=True):
                due = self.store.due(self.clock(), self.relay.outbox.in_flight, self.most)
                for conv in due:
                    # Read after its lock was taken and the writes before it: a step begun now gets
                    # all its wait, and a claim made now starts whole, however slow the database.
                    now = self.clock()
                    deadline, changed = conv.deadline, False
                    if event := expire(conv, now, self.relay.roster):
                        lag = max(lag, now - deadline)
                        events.append((conv, event))
                        changed = True
                    changed |= self.relay.outbox.claim(conv, now, to_send)
                    tickets.append(self.relay.save(conv, changed))
                self.last_sweep = self.clock()
                SWEEP_LAG.set(lag)
                next_at = self.last_sweep if len(due) == self.most else self.store.next_due()
            # Next time, as many as it can step in SWEEP_BATCH_SECONDS: on a slow database (or disk)
            # a pass then holds few conversations, briefly, and sends their pages before the next.
            took = (time.monotonic() - began) / max(1, len(due))
            self.most = max(1, min(SWEEP_MOST, int(SWEEP_BATCH_SECONDS / max(took, 1e-6))))
            for ticket in tickets:
                self.store.wait(ticket)
        for conv, event in events:
            self.relay.after_change(conv, event, reason="wait ran out")
        SWEEP_SECONDS.set(time.thread_time() - started)
        return next_at

    def wake(self, at: float | None = -math.inf) -> None:
        """Have the sweep look again by `at` (at once, by default), if it would not anyway (a text's
        page is sent with no sweep at all; on a shared database each needless pass is a transaction)."""
        with self.lock:
            if at is not None and at < self.sweep_at:
                self.sweep_at = -math.inf  # a sweep under way looks again before it sleeps
                self.woken.notify()


class Shifts:
    """Who is on call: the roster (the rotations and the store's overrides, read again each second and
    after a `take`), each shift's reminder, and overrides taken by text."""

    def __init__(self, relay: Relay):
        self.relay = relay
        self.roster = Roster(relay.config.rotations)  # with the store's overrides once read (refresh)
        self.reminder_at = -math.inf  # when the next shift's reminder falls due

    def new_config(self, config: Config) -> None:
        """The rotations of an edited config, with the overrides as they were; reminders looked at anew."""
        self.roster = Roster(config.rotations, self.roster.overrides)
        self.reminder_at = -math.inf

    def refresh(self) -> None:
        """Overrides as the store has them now: made by text on any relay, or from the command line."""
        overrides = self.relay.store.overrides(self.relay.clock())
        if {o.id for o in overrides} != {o.id for o in self.roster.overrides}:
            log("info", "overrides_changed", ids=sorted(o.id for o in overrides))
        self.roster = Roster(self.relay.config.rotations, overrides)

    def remind(self) -> None:
        """Text each shift's person `remind_before` it starts, once whatever restarts or relays."""
        now = self.relay.clock()
        if now < self.reminder_at:
            return
        for rotation in self.relay.config.rotations:
            for start, end, member in self.roster.reminders_due(rotation, now):
                if not self.relay.store.remind_once(f"{rotation.name} {start:.3f}", now):
                    continue
                line = next((x for x in self.relay.config.lines if rotation in x.rotations), self.relay.config.lines[0])
                tz = rotation.timezone
                text = (
                    f"{line.name}: reminder: your {rotation.name} shift starts {local_time(start, tz)} "
                    f"and ends {local_time(end, tz)}."
                )
                log("info", "shift_reminder", rotation=rotation.name, contact=member.name, to=member.phone)
                self.relay.outbox.text(line.number, member.phone, text)
        self.reminder_at = self.roster.next_reminder(now)

    def take(
        self, line: Line, contact: Contact, duration: int | str | None, now: float, later: list
    ) -> tuple[str, str]:
        """A member's `take`: an override of each of the line's rotations they are in (in a transaction).
        Returns the answer and the event to log."""
        theirs = [r for r in line.rotations if r.member(contact.phone)]
        if not theirs:
            names = ", ".join(r.name for r in line.rotations) or "none"
            refusal = f"take is for members of the line's rotations ({names}); you are in none"
            return f"{line.name}: {refusal}. Nothing changed.", "reply_take_refused"
        if isinstance(duration, str):
            refusal = f"{duration!r} is no duration; text take, take 3h or take 2d (at most {say_duration(MAX_TAKE)})"
            return f"{line.name}: {refusal}. Nothing changed.", "reply_take_refused"
        said = []
        for rotation in theirs:
            tz = rotation.timezone
            end = now + duration if duration else shift_at(rotation, now)[2]
            holder, until = self.roster.on_shift(rotation.name, now), self.roster.until(rotation.name, now)
            if holder.phone == contact.phone and (until or math.inf) >= end:
                said.append(
                    f"you are on call for {rotation.name} already"
                    + (f", until {local_time(until, tz)}" if until else "")
                )
                continue
            override = new_override(self.roster, rotation, Member(contact.name, contact.phone), now, end, now)
            self.relay.store.add_override(override)
            log(
                "info",
                "override_made",
                id=override.id,
                rotation=rotation.name,
                contact=contact.name,
                replaces=holder.name,
                way="sms",
            )
            if holder.phone != contact.phone:
                said.append(f"you are on call for {rotation.name} until {local_time(end, tz)}, replacing {holder.name}")
                later.append(
                    (
                        line.number,
                        holder.phone,
                        f"{line.name}: {contact.name} covers {rotation.name} for you until {local_time(end, tz)}.",
                    )
                )
            else:
                said.append(f"you are on call for {rotation.name} until {local_time(end, tz)}")
        return f"{line.name}: {'; '.join(said)}.", "reply_take"


class Relay:
    """The relay service: each webhook, key press, delivery report and console action is one store
    transaction running the escalation rules; what they want sent goes to the outbox once stored.
    The outbox sends, the cost caps hold and release, the sweeper takes what falls due."""

    def __init__(self, settings: Settings, config: Config, store: Store, gateway: Gateway):
        self.settings = settings
        self.config = config
        self.config_mtime = self._config_mtime()
        self.store = store
        self.gateway = gateway
        self.clock = store.clock
        self.id = os.urandom(6).hex()  # this relay process, as the holder of the pages it claims
        self.heal_failed: str | None = None  # why the store's last heal failed, as logged
        # Lines whose texts carriers block, since when and why, until one of their texts is delivered
        # again (as this relay has heard): alarms then go by call too, and /healthz names it.
        self.carrier_blocked: dict[str, dict] = {}
        self.last_webhook: float | None = None  # when Twilio last brought a text here (for the console)
        self.twilio_errors: deque[float] = deque(maxlen=10_000)  # when sends failed, for the console's hour
        self.outbox, self.caps, self.sweeper, self.shifts = Outbox(self), CostCaps(self), Sweeper(self), Shifts(self)

    # -- bookkeeping ---------------------------------------------------------

    @property
    def roster(self) -> Roster:
        return self.shifts.roster

    @property
    def public_url(self) -> str | None:
        return self.settings.public_url_for(self.config)

    def trouble(self) -> str | None:
        """Why this relay cannot page now, or None: its store takes no writes or its sweep has stalled.

        Writes nothing: any number of health checks at once leave no trace.
        """
        problem = self.store.writable()
        if problem is None and (stalled := self.clock() - self.sweeper.last_sweep) > SWEEP_STALL:
            problem = f"sweep loop last ran {stalled:.1f}s ago"
        return problem

    def _config_mtime(self) -> float | None:
        try:
            return self.settings.config_path.stat().st_mtime
        except OSError:
            return None

    def save(self, conv: Conversation, changed: bool = True):
        """(in a transaction)"""
        return self.store.save(conv, self.outbox.in_flight_of(conv.id), changed)

    def _body(self, body: str) -> str | None:
        return body if self.config.log_bodies else None

    # -- inbound -------------------------------------------------------------

    def receive(self, text: Inbound, received_at: float | None = None, forwarded: bool = False) -> str:
        """Handle an inbound text; returns the TwiML answer once the outcome is durable.

        `received_at` is set for a text found by catch-up: when Twilio got it. Its page says how long
        ago that was, and a contact's reply gets its answer by SMS, since no webhook waits for it.
        `forwarded`: Twilio's fallback flow texted it to the crew meanwhile; its page says so.
        """
        sid, sender, to, body, media = text
        config = self.config
        if received_at is None:
            self.last_webhook = self.clock()
        line = config.line_for(to)
        if line is None:
            INBOUND.labels("no_line").inc()
            log("warning", "inbound_no_line", message_sid=sid, to=to)
            return str(MessagingResponse())
        now = self.clock()
        answer = MessagingResponse()
        if self.store.failure:
            raise BadRequest(503, "state_unwritable", self.store.failure)
        to_send: list = []
        later: list[tuple[str, str, str]] = []  # (from, to, text) sent on their own once stored
        with self.outbox.sending_once_stored(to_send):
            with self.store.transaction(f"{line.name} {sender}", prompt=True):
                contact = line.contact(sender)
                arrival = self.store.arrival(sid, line.name, sender, now, customer=contact is None)
                if arrival.answered is not None:
                    INBOUND.labels("duplicate").inc()
                    log("info", "inbound_duplicate", message_sid=sid, line=line.name)
                    if arrival.answered:
                        answer.message(arrival.answered)
                    return str(answer)
                if contact is not None:
                    conv, event, fields = self._reply(line, contact, sid, body, now, answer, later)
                elif (conv := arrival.joins) is not None:
                    event, fields = "inbound_joined", conv_ids(conv)
                    # A customer talking with a contact on a two-way line is never cut off by the sender cap.
                    if conv.status == HELD_STATUS:
                        held = "sender cap"
                    elif conv.is_live_two_way(now) or self.store.take(
                        sender_cap(line.name, sender), config.sender_hourly_cap, now
                    ):
                        held = None
                    else:
                        held = "sender cap"
                        self.caps.reached("sender", conv, now)
                    join(conv, sid, body, now, held, media)
                    if held:
                        event = "inbound_held"
                else:
                    conv = start_conversation(
                        line, config, sid, sender, body, arrival.code, now, media, received_at, forwarded, self.roster
                    )
                    event, fields = "inbound_accepted", conv_ids(conv, media=len(media) or None)
                    if not self.store.take(sender_cap(line.name, sender), config.sender_hourly_cap, now):
                        hold(conv, "sender cap", now)
                        self.caps.reached("sender", conv, now)
                        event = "inbound_held"
                    elif line.received_text:
                        conv.messages[0]["answer"] = fit_sms(line.received_text.format(line=line.name, contact=""))
                        answer.message(conv.messages[0]["answer"])
                    if conv.step:
                        fields["skipped_off_duty"] = conv.step
                said = answer.verbs[0].value if answer.verbs else None
                confirm = said if received_at is not None and contact is not None else None
                if conv is not None:
                    if confirm:
                        conv.pages.append(Page(to=sender, body=confirm, kind="confirmation", retry_at=now))
                        confirm = None
                    self.outbox.claim(conv, now, to_send)  # sent at once, with no sweep between
                    ticket = self.save(conv)
                else:  # remembered all the same, so a retry of it is known and answered alike
                    ticket = self.store.save_stray(sid, said, now)
            self.store.wait(ticket)
        if conv is not None:
            self.wake_for(conv)
        if confirm:  # a caught-up reply that matched nothing: no conversation to carry the answer
            later.append((line.number, sender, confirm))
        for text in later:
            self.outbox.text(*text)
        if event == "reply_take":
            with contextlib.suppress(StoreFailure):  # else the next housekeeping reads it
                self.shifts.refresh()
        if received_at is not None:
            INBOUND.labels("caught_up").inc()
            log(
                "info",
                "inbound_caught_up",
                message_sid=sid,
                **fields,
                handled_as=event,
                late_s=round(now - received_at),
            )
        else:
            INBOUND.labels(event.removeprefix("inbound_")).inc()
            log("info", event, message_sid=sid, **fields, body=self._body(body))
        return str(answer)

    def _reply(
        self, line: Line, contact: Contact, sid: str, body: str, now: float, answer: MessagingResponse, later: list
    ):
        """A text from one of the line's contacts (in a transaction). `later`: texts to send once it is stored."""
        fields = {"line": line.name, "to": None, "contact": contact.name}
        reply = read_reply(body)
        if reply.keyword:
            return None, "reply_keyword", fields
        if (taking := reply.take) is not None:
            text, event = self.shifts.take(line, contact, taking, now, later)
            answer.message(text)
            return None, event, fields
        talking = self.store.talking(line.name, now)
        word = reply.word
        if word == "list":
            mine = [c for c in self.store.open_on(line.name) if contact.phone in reached_phones(c)]
            answer.message(listing(f"{line.name}: {len(mine)} open for you", mine, holder=True))
            return None, "reply_list", fields
        if word == "pass":
            talking = []  # only an open conversation can be passed on
        conv, code = choose_acknowledged(self._open_for_reply(line, contact, reply), contact.phone, reply, talking)
        if conv is None:
            answer.message(self._unmatched_reply_text(line, code))
            return None, "reply_unmatched", {**fields, "code": code}
        record = {"sid": sid, "from": contact.phone, "body": body, "at": now}
        if word == "pass":
            conv.replies.append(record)
            if event := pass_on(conv, contact, now, self.roster):
                self.after_change(conv, event, reason=f"passed on by {contact.name}")
                record["answer"] = f"{line.name} #{conv.code}: passed on; {self._next_paged(conv)}."
            else:
                record["answer"] = f"{line.name} #{conv.code} {holder_words(conv)}; nothing changed."
            answer.message(record["answer"])
            return conv, "reply_pass" if event else "reply_pass_refused", conv_ids(conv, contact=contact.name)
        if conv.is_takeable:
            acknowledge(conv, contact, record, now)
            ACKS.inc()
            event, text = (
                "acknowledged",
                f"Thanks {contact.name}: {line.name} #{conv.code} from {conv.sender} is yours.",
            )
        else:
            conv.replies.append(record)
            event, text = "reply", f"{line.name} #{conv.code}:"
        if reply_to_customer(conv, reply, now):
            text += " Your reply goes to the customer."
        elif event == "acknowledged":
            text += f" {others_told(conv)}"
        else:
            text += " nothing was sent to the customer (a bare acknowledgement)."
        record["answer"] = text
        answer.message(text)
        return conv, event, conv_ids(conv, contact=contact.name, way="sms" if event == "acknowledged" else None)

    def console_act(self, conv_id: str, contact: Contact, action: str, text: str = "") -> str:
        """Take, pass, close or reply to a conversation from the console; returns what happened."""
        now, to_send = self.clock(), []
        with self.outbox.sending_once_stored(to_send):
            with self.store.transaction():
                conv = self.store.get(conv_id)
                if conv is None:
                    raise BadRequest(404, "no_conversation", "no such open conversation")
                event = None
                if action == "take" and conv.is_takeable:
                    acknowledge(conv, contact, None, now)
                    event, said = "acknowledged", f"#{conv.code} is yours. {others_told(conv)}"
                elif action == "pass" and (event := pass_on(conv, contact, now, self.roster)):
                    said = f"#{conv.code} passed on; {self._next_paged(conv)}"
                elif action == "close" and conv.is_takeable:
                    close(conv, now)
                    event, said = "closed", f"#{conv.code} closed; nobody else is paged"
                elif action == "reply" and conv.two_way and text.strip():
                    body = fit_sms(text.strip())
                    conv.pages.append(Page(to=conv.sender, body=body, kind="customer_reply", retry_at=now))
                    event, said = "replied", f"texted to {conv.sender}"
                else:
                    return f"#{conv.code} {holder_words(conv)}; nothing changed"
                conv.actions.append({"at": now, "by": contact.name, "action": action, "text": text.strip()})
                self.outbox.claim(conv, now, to_send)
                ticket = self.save(conv)
            self.store.wait(ticket)
        self.wake_for(conv)
        log("info", "console_action", **conv_ids(conv, contact=contact.name, action=action))
        if event == "acknowledged":
            ACKS.inc()
            log("info", "acknowledged", **conv_ids(conv, contact=contact.name, way="console"))
        elif event in ("escalated", "unanswered"):
            self.after_change(conv, event, reason=f"passed on by {contact.name} on the console")
        return said

    def _open_for_reply(self, line: Line, contact: Contact, reply: Reply) -> list[Conversation]:
        """The open conversations a reply may be about: the one holding the code it names, else the
        newest paged to its sender. Not all the line's open ones: a flood may have left thousands."""
        if reply.code is not None:
            holding = self.store.holding_code(line.name, reply.code)
            if holding is None and reply.named:  # named as a code: unanswered, maybe
                latest = self.store.latest_with_code(line.name, reply.code)
                holding = latest if latest is not None and latest.status == UNANSWERED_STATUS else None
            if holding or reply.named:  # named as a code, open or not
                return [holding] if holding else []
        newest = self.store.newest_paged(line.name, contact.phone)
        return [newest] if newest else []

    def _next_paged(self, conv: Conversation) -> str:
        if conv.is_open:
            return f"{contact_at(conv, conv.step).name} is paged now"
        page = alarm_page(conv)
        told = next((c.name for c in people(conv) if page and c.phone == page.to), "the alarm phone")
        return f"nobody else is left to page: it is listed as unanswered and {told} is told"

    # -- calls ---------------------------------------------------------------

    def _call_page(self, conv_id: str, index: int) -> tuple[Conversation | None, Page | None]:
        """(in a transaction)"""
        conv = self.store.get(conv_id)
        if conv is None or not 0 <= index < len(conv.pages) or conv.pages[index].kind != "call":
            return None, None
        return conv, conv.pages[index]

    def key_pressed(self, conv_id: str, index: int, params: dict[str, str], repeated: bool) -> str:
        """A key pressed on a call: 1 takes it, 2 passes it on; anything else hears the prompt once more."""
        digits, now, event = params.get("Digits", "").strip(), self.clock(), None
        with self.store.transaction():
            conv, page = self._call_page(conv_id, index)
            if page is None:
                return key_twiml("This message is no longer waiting. Goodbye.")
            contact = next(c for c in people(conv) if c.phone == page.to)
            page.call_status = "in-progress"  # someone is there to press keys
            if digits not in ("1", "2"):
                if repeated:  # the call ends without 1 or 2: Twilio's report of it moves the chain on
                    return key_twiml("Nothing was taken. Goodbye.")
                return key_twiml(f"Again: {PROMPT}", self.outbox.callback_url("/api/voice/gather", conv, index, r=1))
            if digits == "1" and conv.is_takeable:
                call_sid = params.get("CallSid") or f"call-{conv_id}-{index}"
                acknowledge(conv, contact, {"sid": call_sid, "from": contact.phone, "body": "1", "at": now}, now)
                page.state = "taken"
                ACKS.inc()
                event = "acknowledged"
                words = f"Thank you, {contact.name}. It is yours. {others_told(conv)}"
            elif digits == "1":
                words = f"It was already taken by {conv.acknowledged_by}." if conv.acknowledged_by else "It has ended."
            elif event := pass_on(conv, contact, now, self.roster):
                page.state = "passed"
                words = f"Passed on. {self._next_paged(conv).capitalize()}."
            else:
                words = "It is no longer with you. Nothing changed."
            ticket = self.save(conv)
        self.store.wait(ticket)
        log("info", "call_key", **conv_ids(conv, to=contact.phone, digits=digits))
        if event == "acknowledged":
            log("info", "acknowledged", **conv_ids(conv, contact=contact.name, way="call"))
        elif event:
            self.after_change(conv, event, reason=f"passed on by {contact.name}")
        self.sweeper.wake()
        return key_twiml(words + " Goodbye.")

    def call_report(self, conv_id: str, index: int, params: dict[str, str]) -> None:
        """Twilio's progress report on a call (and its answering-machine verdict)."""
        status, answered_by, sid = params.get("CallStatus", ""), params.get("AnsweredBy", ""), params.get("CallSid", "")
        with self.store.transaction():
            conv, page = self._call_page(conv_id, index)
            if page is None:
                log("warning", "call_status_unknown", conversation=conv_id, page=index, status=status)
                return
            event = call_progress(conv, index, status, answered_by, sid, self.clock(), self.roster)
            ticket = self.save(conv)
        self.store.wait(ticket)
        log("info", "call_status", **conv_ids(conv, to=page.to, status=status, answered_by=answered_by or None))
        if event:
            self.after_change(conv, event, reason=f"call {answered_by or status}")
        self.sweeper.wake()

    def _unmatched_reply_text(self, line: Line, code: str | None) -> str:
        if code is None:
            return f"{line.name}: nothing is waiting for you."
        conv = self.store.latest_with_code(line.name, code)
        if conv is None:
            return f"{line.name}: no open message #{code}."
        if conv.status == "acknowledged":
            return f"{line.name} #{code} was already taken by {conv.acknowledged_by}."
        return f"{line.name} #{code} ended with nobody answering; text {conv.sender} directly."

    # -- delivery reports ----------------------------------------------------

    def delivery_status(self, conv_id: str, index: int, params: dict[str, str]) -> None:
        status = params.get("MessageStatus") or params.get("SmsStatus") or ""
        with self.store.transaction():
            conv = self.store.get(conv_id)
            if conv is None or not 0 <= index < len(conv.pages):
                log("warning", "status_unknown", conversation=conv_id, page=index, status=status)
                return
            code = params.get("ErrorCode")
            pages_before = len(conv.pages)
            event = record_status(conv, index, status, code, self.clock(), self.config.call_when_blocked, self.roster)
            ticket = self.save(conv)
            to = conv.pages[index].to
        self.store.wait(ticket)
        ids = conv_ids(conv, to=to, twilio_sid=params.get("MessageSid"))
        log("info", "status_callback", **ids, status=status, error_code=code)
        if status in ("failed", "undelivered") and code in CARRIER_BLOCK_CODES:
            CARRIER_BLOCKED.inc()
            self.carrier_blocked[conv.line] = {"error_code": int(code), "since": self.clock()}
            called = any(p.kind == "call" and p.to == to for p in conv.pages[pages_before:])
            log("error", "carrier_blocked", **ids, error_code=code, calling_instead=called)
        elif status in ("delivered", "read") and self.carrier_blocked.pop(conv.line, None):
            log("info", "carrier_unblocked", line=conv.line)
        if event:
            self.after_change(conv, event, reason=f"delivery {status}")
        self.wake_for(conv)

    def after_change(self, conv: Conversation, event: str, **fields) -> None:
        """Log and count an escalation or an unanswered end, and wake the sweeper."""
        if event == "escalated":
            ESCALATIONS.inc()
            to = contact_at(conv, conv.step).phone
            log("warning", "escalated", **conv_ids(conv, to=to, step=conv.step + 1), **fields)
        elif event == "unanswered":
            UNANSWERED.inc()
            log("error", "unanswered", **conv_ids(conv, sender=conv.sender), **fields)
        self.sweeper.wake()

    def wake_for(self, conv: Conversation) -> None:
        """Have the sweep look by when `conv` next needs it (its pages in flight left aside)."""
        self.sweeper.wake(next_wakeup(conv, self.outbox.in_flight_of(conv.id)))

    def housekeeping(self) -> None:
        """Cheap checks done about once a second: config edits, held texts, tidying, healing."""
        self.outbox.tidy()
        mtime = self._config_mtime()
        if mtime != self.config_mtime:
            self.config_mtime = mtime
            try:
                self.config = load_config(self.settings.config_path)
            except ConfigError as e:
                log("error", "config_rejected", reason=str(e))
            else:
                log("info", "config_reloaded", lines=[line.name for line in self.config.lines])
                self.shifts.new_config(self.config)
        if self.store.failure:
            self.heal()
            return
        self.shifts.refresh()
        now = self.clock()
        self.caps.release_held(now)
        pruned = self.store.tidy(now, self.config.retention)
        if pruned:
            log("info", "pruned", days=pruned)

    def heal(self) -> None:
        """After a failure to store: once the store takes writes again, carry on from what it holds."""
        reason = self.store.failure
        try:
            self.store.heal()
        except (StoreFailure, SchemaRefused) as e:
            if str(e) != self.heal_failed:  # tried every second: said once, and again when it changes
                log("error", "state_unwritable", reason=str(e))
                self.heal_failed = str(e)
            return
        self.heal_failed = None
        self.sweeper.wake()
        log("warning", "state_writable_again", after=reason, open_conversations=self.store.open_count())
        self.tell_about_damage()

    def tell_about_damage(self) -> None:
        """Each damaged state file moved aside is reported to the alarm phone (once, from memory)."""
        for name, count in self.store.damage_report():
            text = (
                f"relay: state file {name} was damaged ({count} unreadable record(s)); it was moved aside "
                "and the relay runs on with everything readable."
            )
            if self.config.alarm_phone:
                self.outbox.text(self.config.lines[0].number, self.config.alarm_phone, text)


# ---------------------------------------------------------------------------
# Web routes
#
# Twilio's webhooks (each signed), /healthz and /metrics.
# ---------------------------------------------------------------------------


FORM_TYPE = "application/x-www-form-urlencoded"


class FormParams(dict):
    """Form fields, keeping every value of a repeated field for the signature."""

    def __init__(self, pairs: list[tuple[str, str]]):
        super().__init__(pairs)
        self.all: dict[str, list[str]] = {}
        for key, value in pairs:
            self.all.setdefault(key, []).append(value)

    def getlist(self, key: str) -> list[str]:
        return self.all[key]


def media_urls(params: dict[str, str]) -> list[str]:
    """The photos of an MMS (MediaUrl0...), as far as they look like Twilio's media links."""
    count = params.get("NumMedia", "0").strip()
    count = min(int(count), MAX_MEDIA) if count.isdigit() else 0
    urls = (params.get(f"MediaUrl{i}", "").strip() for i in range(count))
    return [url for url in urls if url.startswith("https://") and len(url) <= 2048]


class Inbound(typing.NamedTuple):
    """A text as Twilio brings it (by webhook or to catch-up), read and checked once, at the edge."""

    sid: str
    sender: str
    to: str
    body: str
    media: list[str]


def read_inbound(params: dict[str, str]) -> Inbound:
    """An inbound text's form fields as an Inbound; BadRequest (400) when one is missing or malformed."""
    sid, sender, to = (params.get(k, "").strip() for k in ("MessageSid", "From", "To"))
    missing = [k for k, v in (("MessageSid", sid), ("From", sender), ("To", to)) if not v]
    if missing:
        raise BadRequest(400, "missing_fields", f"missing {', '.join(missing)}")
    if not MESSAGE_SID.fullmatch(sid):
        raise BadRequest(400, "bad_message_sid", "MessageSid is not SM or MM and 32 hex digits")
    if len(sender) > 64 or len(to) > 64:
        raise BadRequest(400, "field_too_long", "From or To is too long")
    # A lone surrogate (a JSON escape in a listed text) cannot be written as UTF-8: it becomes "?".
    body = params.get("Body", "").encode("utf-8", "replace").decode("utf-8")
    return Inbound(sid, sender, to, body, media_urls(params))


def make_app(relay: Relay) -> bottle.Bottle:
    app = bottle.Bottle()

    def refuse(status: int, label: str, reason: str, **fields) -> str:
        REJECTED.labels(label).inc()
        log("warning", "rejected", status=status, reason=reason, path=bottle.request.path, **fields)
        bottle.response.status = status
        bottle.response.content_type = "application/json"
        return json.dumps({"error": reason})

    def verified_form() -> FormParams | str:
        """The request's form fields, or a refusal already written to the response."""
        request = bottle.request
        length = request.environ.get("CONTENT_LENGTH") or "0"
        if not length.isdigit():
            return refuse(400, "bad_length", "Content-Length is not a number")
        if int(length) > MAX_BODY_BYTES:
            return refuse(413, "too_large", "body over 64 KiB")
        raw = request.environ["wsgi.input"].read(int(length))
        # Raw WSGI values: Bottle's header access decodes as UTF-8 and raises on stray bytes.
        signature = request.environ.get("HTTP_X_TWILIO_SIGNATURE")
        if not signature:
            return refuse(403, "no_signature", "missing X-Twilio-Signature")
        is_form = request.content_type.split(";")[0].strip().lower() == FORM_TYPE
        text = raw.decode("utf-8", errors="replace") if is_form else ""
        params = FormParams(urllib.parse.parse_qsl(text, keep_blank_values=True))
        base = relay.public_url or f"{request.urlparts.scheme}://{request.urlparts.netloc}"
        url = base + request.path + (f"?{request.query_string}" if request.query_string else "")
        algorithm = get_signature_algorithm(request.environ.get("HTTP_X_TWILIO_WEBHOOKS_SIGNATURE_SETTINGS"))
        if not RequestValidator(relay.settings.signing_token).validate(url, params, signature, algorithm):
            return refuse(403, "bad_signature", "bad signature", checked_url=loggable_url(url))
        if not is_form:
            return refuse(415, "content_type", f"content type must be {FORM_TYPE}")
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return refuse(400, "not_utf8", "body is not UTF-8")
        return params

    def twilio_webhook(handle):
        """A route Twilio signs: verify the request, then `handle(params)` answers with TwiML."""

        @functools.wraps(handle)
        def route():
            params = verified_form()
            if isinstance(params, str):
                return params
            try:
                twiml = handle(params)
            except BadRequest as e:
                return refuse(e.status, e.label, e.reason, message_sid=params.get("MessageSid"))
            except StoreFailure as e:
                return refuse(503, "state_unwritable", str(e), message_sid=params.get("MessageSid"))
            bottle.response.content_type = "text/xml; charset=utf-8"
            return twiml

        return route

    @app.post("/api/sms/inbound")
    @twilio_webhook
    def inbound(params):
        return relay.receive(read_inbound(params))

    def callback_page(kind: str) -> tuple[str, int]:
        """The conversation and page that the relay wrote into a callback's URL."""
        conv_id, index = bottle.request.query.get("c", ""), bottle.request.query.get("p", "")
        if not conv_id or not index.isdigit():
            raise BadRequest(400, "bad_callback", f"{kind} callback without c and p")
        return conv_id, int(index)

    @app.post("/api/sms/status")
    @twilio_webhook
    def status_callback(params):
        relay.delivery_status(*callback_page("status"), params)
        return str(MessagingResponse())

    @app.post("/api/voice/gather")
    @twilio_webhook
    def voice_gather(params):
        return relay.key_pressed(*callback_page("call"), params, repeated=bottle.request.query.get("r") == "1")

    @app.post("/api/voice/status")
    @twilio_webhook
    def voice_status(params):
        relay.call_report(*callback_page("call"), params)
        return str(VoiceResponse())

    @app.get("/healthz")
    def healthz():
        problem = relay.trouble()
        bottle.response.content_type = "application/json"
        body = {
            "ok": problem is None,
            "open_conversations": relay.store.open_count(),
            "last_sweep": relay.sweeper.last_sweep,
            "dry_run": relay.settings.dry_run,
        }
        if relay.carrier_blocked:  # the relay works; the carriers do not carry its texts
            body["carrier_blocked"] = {
                line: f"texts from {line} blocked by carriers (Twilio error {blocked['error_code']}) since "
                f"{local_time(blocked['since'], 'UTC')}; pages go by call; register the number (check --live)"
                for line, blocked in relay.carrier_blocked.items()
            }
        if problem:
            bottle.response.status = 503
            body["reason"] = problem
        return json.dumps(body)

    @app.get("/metrics")
    def metrics():
        bottle.response.content_type = prometheus_client.CONTENT_TYPE_LATEST
        OPEN.set(relay.store.open_count())  # the store's count, which other relays' changes move too
        return prometheus_client.generate_latest(METRICS)

    if relay.config.console:
        Console(relay).routes(app)

    @app.error(404)
    @app.error(405)
    def not_here(error):
        bottle.response.content_type = "application/json"
        return json.dumps({"error": f"{error.status_line}"})

    @app.error(500)
    def crashed(error):
        log("error", "internal_error", path=bottle.request.path, error=repr(error.exception))
        bottle.response.content_type = "application/json"
        return json.dumps({"error": "internal error"})

    return app


# ---------------------------------------------------------------------------
# Console: the crew's web page
#
# A contact signs in with a code texted to the phone the relay already pages.
# A session is a random token in a cookie, kept hashed in the store, so any
# relay serves it and a restart signs nobody out. Pages are Bottle's
# SimpleTemplate views (views/), which escape whatever came from outside. A
# form that changes something carries its session's own token, and a request
# another site made changes nothing.
# ---------------------------------------------------------------------------

VIEWS = Path(__file__).resolve().parent / "views"
SESSION_COOKIE = "relay_session"
SESSION_IDLE = 12 * 3600.0
SESSION_TOUCH = 60.0  # a session's last use is written at most this often
CODE_VALID = 600.0
CODES_PER_PHONE = 3  # an hour
CODES_PER_CLIENT = 10  # an hour
CODE_TRIES = 5
HISTORY_DAYS = 30
HISTORY_MOST = 10_000  # conversations a history page reads at most (the newest), searches and figures included
HISTORY_PAGE = 50
TAKEN_SHOWN = 24 * 3600.0  # the overview lists what was taken this long ago, with who took it
SCHEDULE_DAYS = 14
CONSOLE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}
FAILED_PAGE_STATES = {"failed", "undelivered", "not_taken"}


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def crew_member(config: Config, phone: str) -> tuple[Line, Contact] | None:
    """The first line that has this phone as a contact or rotation member, and who they are there."""
    return next(((line, c) for line in config.lines if (c := line.contact(phone))), None)


def typed_phone(text: str) -> str:
    """A phone as people type it ("+1 619-555-0111") in E.164, or "" when it is none."""
    phone = re.sub(r"[\s().-]", "", text)
    return phone if E164.fullmatch(phone) else ""


def percentile(values: list[float], share: float) -> float | None:
    """The value below which `share` of them lie (nearest rank), or None for none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def time_to_acknowledge(conv: Conversation) -> float | None:
    return conv.finished_at - conv.created if conv.status == "acknowledged" else None


def ack_figures(convs: list[Conversation], now: float) -> list[dict]:
    """Median and 90th percentile time to acknowledge over 7 and 30 days, overall and per contact."""
    rows = []
    for days in (7, 30):
        recent = [c for c in convs if c.created >= now - days * 86400 and time_to_acknowledge(c) is not None]
        for who in [None, *sorted({c.acknowledged_by for c in recent})]:
            times = [time_to_acknowledge(c) for c in recent if who is None or c.acknowledged_by == who]
            rows.append(
                {"days": days, "who": who or "everyone", "count": len(times)}
                | {"median": percentile(times, 0.5), "p90": percentile(times, 0.9)}
            )
    return rows


def timeline(conv: Conversation) -> list[dict]:
    """Everything that happened to a conversation, oldest first: {"at", "what", "text", "status"}."""
    names = {c.phone: c.name for c in people(conv)}
    entries = [
        {"at": m["at"], "what": f"text from {conv.sender}", "text": m["body"], "status": ""} for m in conv.messages
    ]
    for page in conv.pages:
        if page.kind == "end_call":
            continue
        who = names.get(page.to, page.to)
        what = {
            "page": f"page to {who} (step {(page.step or 0) + 1})",
            "call": f"call to {who} (step {(page.step or 0) + 1})",
        }.get(page.kind, f"{page.kind.replace('_', ' ')} to {who}")
        status = page.state + (f" ({page.error})" if page.error else "") + (f" {page.sid}" if page.sid else "")
        entries.append({"at": page.sent_at or page.retry_at, "what": what, "text": page.body, "status": status})
    for reply in conv.replies:
        who = names.get(reply["from"], reply["from"])
        entries.append({"at": reply["at"], "what": f"reply from {who}", "text": reply["body"], "status": ""})
    for action in conv.actions:
        what = f"{action['action']} on the console by {action['by']}"
        entries.append({"at": action["at"], "what": what, "text": action.get("text", ""), "status": ""})
    return sorted(entries, key=lambda e: e["at"])


def shifts_ahead(roster: Roster, rotation: Rotation, now: float, days: int) -> list[dict]:
    """Who is on call for the rotation from now for `days`: {"start", "end", "who", "override"}."""
    horizon, t, rows = now + days * 86400, now, []
    while t < horizon and len(rows) < HANDOFFS_LOOKED_AT:
        who = roster.on_shift(rotation.name, t)
        covering = next((o for o in roster.overrides if o.rotation == rotation.name and o.covers(t)), None)
        ahead = roster.handoffs(rotation.name, t, 1)
        end = min(ahead[0][0] if ahead else horizon, horizon)
        rows.append({"start": t, "end": end, "who": who, "override": covering})
        t = end
    return rows


class Console:
    """The console's pages and actions; `routes` puts them on the app."""

    def __init__(self, relay: Relay):
        self.relay = relay
        self.store = relay.store

    # -- requests ---------------------------------------------------------------

    @staticmethod
    def form() -> dict[str, str]:
        """The form's fields, from the raw body decoded as UTF-8 (Bottle's own forms are latin-1)."""
        request = bottle.request
        length = request.environ.get("CONTENT_LENGTH") or "0"
        if not length.isdigit():
            raise bottle.HTTPError(400, "Content-Length is not a number")
        if int(length) > MAX_BODY_BYTES:
            raise bottle.HTTPError(413, "form too large")
        raw = request.environ["wsgi.input"].read(int(length)).decode("utf-8", "replace")
        return dict(urllib.parse.parse_qsl(raw, keep_blank_values=True))

    def client(self) -> str:
        """The client's address: the peer's, or behind a platform router on the same network, the one
        it appended last to X-Forwarded-For."""
        peer = bottle.request.environ.get("REMOTE_ADDR", "")
        forwarded = bottle.request.environ.get("HTTP_X_FORWARDED_FOR", "")
        with contextlib.suppress(ValueError):
            if forwarded and ipaddress.ip_address(peer).is_private:
                return forwarded.split(",")[-1].strip()[:64] or peer
        return peer

    def own_origin(self) -> str:
        base = self.relay.public_url or f"{bottle.request.urlparts.scheme}://{bottle.request.urlparts.netloc}"
        parts = urllib.parse.urlsplit(base)
        return f"{parts.scheme}://{parts.netloc}".lower()

    def same_site(self) -> bool:
        """Not sent by another site: its Origin, when it names one, is ours, and the browser does not
        call it cross-site. `Origin: null` (sent under no-referrer) is left to the form's token."""
        environ = bottle.request.environ
        if environ.get("HTTP_SEC_FETCH_SITE", "").lower() == "cross-site":
            return False
        origin = environ.get("HTTP_ORIGIN", "").strip().lower()
        return not origin or origin == "null" or origin == self.own_origin()

    def session(self) -> tuple[str, dict] | None:
        """The signed-in session's key and record, its last use written now and then."""
        token = bottle.request.get_cookie(SESSION_COOKIE)
        if not token or len(token) > 128:
            return None
        key, now = f"session:{digest(token)}", self.relay.clock()
        record = self.store.console_record(key, now)
        if record is None:
            return None
        if now - record["used"] > SESSION_TOUCH:
            record["used"] = now
            self.store.keep_console_record(key, record, now + SESSION_IDLE)
        return key, record

    def start_session(self, phone: str, name: str) -> None:
        token, now = secrets.token_urlsafe(32), self.relay.clock()
        record = {"phone": phone, "name": name, "csrf": secrets.token_urlsafe(24), "used": now}
        self.store.keep_console_record(f"session:{digest(token)}", record, now + SESSION_IDLE)
        secure = (self.relay.public_url or "").startswith("https://")
        bottle.response.set_cookie(
            SESSION_COOKIE, token, path="/", httponly=True, samesite="lax", secure=secure, max_age=int(SESSION_IDLE)
        )
        log("info", "console_signed_in", contact=name)

    def page(self, view: str, status: int = 200, **values) -> str:
        bottle.response.status = status
        return bottle.template(view, template_lookup=[str(VIEWS)], shown=local_time, **values)

    def signed_in_page(self, view: str, session: dict, **values) -> str:
        return self.page(view, me=session["name"], csrf=session["csrf"], **values)

    # -- sign-in ---------------------------------------------------------------

    def ask_code(self, typed: str) -> str:
        """Text a code to a crew phone; any other phone gets the same page and no text."""
        phone, now = typed_phone(typed), self.relay.clock()
        shown = phone or typed.strip()[:32]
        with self.store.transaction():  # every request counts, whoever's phone it names
            allowed = self.store.take(f"signin phone {phone or shown}", CODES_PER_PHONE, now)
            allowed = self.store.take(f"signin client {self.client()}", CODES_PER_CLIENT, now) and allowed
        if not allowed:
            return self.page("signin", 429, phone=shown, asked=False, said="Too many codes asked for; try again later.")
        if (found := crew_member(self.relay.config, phone)) is not None:
            line, contact = found
            code = f"{secrets.randbelow(10**6):06d}"
            record = {"hash": digest(f"{phone} {code}"), "tries": 0, "expires": now + CODE_VALID}
            self.store.keep_console_record(f"code:{phone}", record, record["expires"])
            text = f"{line.name}: your console sign-in code is {code}. It works once, for 10 minutes."
            self.relay.outbox.text(line.number, phone, text, secret=True)
            log("info", "console_code_sent", contact=contact.name, to=phone)
        said = f"If {shown} is on a line's chain, a 6-digit code is on its way to it."
        return self.page("signin", phone=shown, asked=True, said=said)

    def check_code(self, typed: str, code: str) -> str | None:
        """Sign in with a texted code; the page to show again when it is wrong, else None."""
        phone, now = typed_phone(typed), self.relay.clock()
        key = f"code:{phone}"
        record = self.store.console_record(key, now) if phone else None
        if record is not None and hmac.compare_digest(record["hash"], digest(f"{phone} {code.strip()}")):
            self.store.keep_console_record(key, None, now)  # once only
            found = crew_member(self.relay.config, phone)
            if found:
                self.start_session(phone, found[1].name)
                return None
        elif record is not None:
            record["tries"] += 1
            voided = record["tries"] >= CODE_TRIES
            self.store.keep_console_record(key, None if voided else record, record["expires"])
        said = "That code is wrong, used or expired. Ask for a new one."
        return self.page("signin", 403, phone=phone or typed.strip()[:32], asked=True, said=said)

    # -- pages -------------------------------------------------------------------

    def overview(self, session: dict) -> str:
        relay, now = self.relay, self.relay.clock()
        convs = self.store.unfinished()
        taken = [c for c in self.store.history(now - TAKEN_SHOWN, HISTORY_PAGE) if c.status == "acknowledged"]
        lines = []
        for line in relay.config.lines:
            duty = first_on_duty(line, relay.roster, now)
            until = relay.roster.until(duty.rotation, now) if duty.rotation else None
            zone = relay.roster.rotations[duty.rotation].timezone if duty.rotation else line.timezone
            mine = [c for c in convs if c.line == line.name]
            recent = [c for c in taken if c.line == line.name]
            lines.append({"line": line, "duty": duty, "until": until, "zone": zone, "convs": mine, "taken": recent})
        last = self.store.last_catch_up()
        health = {
            "store": self.store.failure or self.store.described(),
            "last webhook": local_time(relay.last_webhook, "UTC") if relay.last_webhook else "none since start",
            "last catch-up": f"{local_time(last[0], 'UTC')}, {'ok' if last[1] else 'failed'}" if last else "none yet",
            "Twilio errors, last hour": str(sum(1 for t in relay.twilio_errors if t > now - HOUR)),
            "texts held by caps": str(sum(len(held_pages(c)) for c in convs)),
        }
        return self.signed_in_page("overview", session, lines=lines, health=health, now=now, contact_at=contact_at)

    def find(self, conv_id: str) -> Conversation | None:
        with self.store.transaction(reading=True):
            conv = self.store.get(conv_id)
        if conv is None:
            conv = next((c for c in self.store.history(-math.inf, HISTORY_MOST) if c.id == conv_id), None)
        return conv

    def conversation(self, session: dict, conv_id: str, said: str = "") -> str:
        conv = self.find(conv_id)
        if conv is None:
            raise bottle.HTTPError(404, "no such conversation")
        return self.signed_in_page(
            "conversation", session, conv=conv, entries=timeline(conv), said=said, step_name=step_name
        )

    def act(self, session: dict, conv_id: str, action: str, text: str) -> str:
        conv = self.find(conv_id)
        line = self.relay.config.line_for(conv.number) if conv else None
        contact = line.contact(session["phone"]) if line else None
        if contact is None:
            raise bottle.HTTPError(403, "you are no contact of this conversation's line")
        try:
            said = self.relay.console_act(conv_id, contact, action, text)
        except BadRequest:
            said = "it is no longer open; nothing changed"
        return self.conversation(session, conv_id, said)

    def history_rows(self, query: str) -> tuple[list[Conversation], list[dict], list[dict]]:
        now = self.relay.clock()
        convs = self.store.history(now - HISTORY_DAYS * 86400, HISTORY_MOST)
        figures = ack_figures(convs, now)
        words = query.strip().lower()
        if words:
            convs = [c for c in convs if words in c.sender or any(words in m["body"].lower() for m in c.messages)]
        failed = [
            {"conv": c, "page": p}
            for c in convs
            for p in c.pages
            if p.state in FAILED_PAGE_STATES and p.kind in STEP_KINDS
        ]
        return convs, figures, failed

    def history(self, session: dict, query: str, page: int) -> str:
        convs, figures, failed = self.history_rows(query)
        pages = max(1, math.ceil(len(convs) / HISTORY_PAGE))
        page = min(max(page, 1), pages)
        shown = convs[(page - 1) * HISTORY_PAGE : page * HISTORY_PAGE]
        return self.signed_in_page(
            "history",
            session,
            convs=shown,
            figures=figures,
            failed=failed[:HISTORY_PAGE],
            query=query,
            page=page,
            pages=pages,
            tta=time_to_acknowledge,
            say=lambda s: "-" if s is None else say_duration(round(s)),
        )

    def history_csv(self, query: str) -> str:
        convs, _, _ = self.history_rows(query)
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(
            ["arrived_utc", "line", "code", "sender", "status", "taken_by", "time_to_acknowledge_s", "text"]
        )
        for c in convs:
            tta = time_to_acknowledge(c)
            writer.writerow(
                [
                    local_time(c.created, "UTC"),
                    c.line,
                    c.code,
                    c.sender,
                    c.status,
                    c.acknowledged_by or "",
                    "" if tta is None else round(tta),
                    csv_safe(c.messages[0]["body"]),
                ]
            )
        bottle.response.content_type = "text/csv; charset=utf-8"
        bottle.response.set_header("Content-Disposition", 'attachment; filename="relay-history.csv"')
        return out.getvalue()

    def schedule(self, session: dict, said: str = "") -> str:
        relay, now = self.relay, self.relay.clock()
        rotations = [
            {"rotation": r, "shifts": shifts_ahead(relay.roster, r, now, SCHEDULE_DAYS)} for r in relay.config.rotations
        ]
        overrides = sorted(relay.roster.overrides, key=lambda o: o.start)
        return self.signed_in_page("schedule", session, rotations=rotations, overrides=overrides, said=said)

    def add_override(self, session: dict, form: dict[str, str]) -> str:
        relay, now = self.relay, self.relay.clock()
        rotation = relay.config.rotation(form.get("rotation", ""))
        member = next((m for m in rotation.members if m.phone == form.get("member")), None) if rotation else None
        if rotation is None or member is None:
            return self.schedule(session, "Choose a rotation and one of its members.")
        try:
            start = parse_when(form["start"], rotation.timezone, flag="from") if form.get("start") else now
            end = parse_when(form.get("end", ""), rotation.timezone, flag="until")
        except ConfigError as e:
            return self.schedule(session, str(e))
        if end <= max(start, now):
            return self.schedule(session, "The end must be after the start and after now.")
        override = new_override(relay.roster, rotation, member, start, end, now)
        self.store.add_override(override)
        relay.shifts.refresh()
        log(
            "info", "console_action", contact=session["name"], action="override", id=override.id, rotation=rotation.name
        )
        return self.schedule(
            session, f"{member.name} is on call for {rotation.name} until {local_time(end, rotation.timezone)}."
        )

    def delete_override(self, session: dict, override_id: str) -> str:
        gone = self.store.delete_override(override_id, self.relay.clock())
        self.relay.shifts.refresh()
        if gone:
            log("info", "console_action", contact=session["name"], action="override", id=gone.id, deleted=True)
        return self.schedule(session, f"Override {override_id} deleted." if gone else "No such override now.")

    # -- routes ------------------------------------------------------------------

    def routes(self, app: bottle.Bottle) -> None:
        def console(handler):
            """A console route: its headers, and a page saying so when the store cannot answer."""

            @functools.wraps(handler)
            def route(*args, **kwargs):
                for name, value in CONSOLE_HEADERS.items():
                    bottle.response.set_header(name, value)
                if bottle.request.method == "POST" and not self.same_site():
                    return self.page("message", 403, said="This form came from another site; nothing changed.")
                try:
                    return handler(*args, **kwargs)
                except StoreFailure as e:
                    return self.page("message", 503, said=f"The relay cannot read its state now: {e}")

            return route

        def signed_in(handler):
            """A route for a signed-in contact; a POST must carry the session's own form token."""

            @functools.wraps(handler)
            def route(*args, **kwargs):
                found = self.session()
                if found is None:
                    if bottle.request.method == "POST":
                        return self.page("message", 403, said="Your session has ended; sign in again.")
                    return self.page("signin", phone="", asked=False, said="")
                key, session = found
                form = self.form() if bottle.request.method == "POST" else {}
                if form and not hmac.compare_digest(form.get("csrf", ""), session["csrf"]):
                    return self.page("message", 403, said="This form is stale or not yours; nothing changed.")
                if bottle.request.method == "POST" and not form:
                    return self.page("message", 403, said="This form is stale or not yours; nothing changed.")
                return handler(session, form, *args, **kwargs)

            return route

        @app.get("/")
        @console
        @signed_in
        def overview(session, form):
            return self.overview(session)

        @app.get("/console.css")
        def stylesheet():
            return bottle.static_file("console.css", root=str(VIEWS), mimetype="text/css")

        @app.post("/signin")
        @console
        def signin():
            form = self.form()
            if "code" in form:
                return self.check_code(form.get("phone", ""), form["code"]) or bottle.redirect("/", 303)
            return self.ask_code(form.get("phone", ""))

        @app.get("/signin/link")
        @console
        def signin_link():
            token, now = bottle.request.query.get("t", ""), self.relay.clock()
            key = f"link:{digest(token)}"
            record = self.store.console_record(key, now) if token else None
            if record is None:
                return self.page("message", 403, said="This sign-in link is used or expired; ask for a new one.")
            self.store.keep_console_record(key, None, now)
            found = crew_member(self.relay.config, record["phone"])
            if found is None:
                return self.page("message", 403, said="That phone is no longer on any line.")
            self.start_session(record["phone"], found[1].name)
            bottle.redirect("/", 303)

        @app.post("/signout")
        @console
        @signed_in
        def signout(session, form):
            self.store.keep_console_record(self.session()[0], None, self.relay.clock())
            bottle.response.delete_cookie(SESSION_COOKIE, path="/")
            log("info", "console_signed_out", contact=session["name"])
            bottle.redirect("/", 303)

        @app.get("/c/<conv_id>")
        @console
        @signed_in
        def conversation(session, form, conv_id):
            return self.conversation(session, conv_id)

        @app.post("/c/<conv_id>/<action:re:take|pass|close|reply>")
        @console
        @signed_in
        def act(session, form, conv_id, action):
            return self.act(session, conv_id, action, form.get("text", "")[:MAX_SMS_CHARS])

        @app.get("/history")
        @console
        @signed_in
        def history(session, form):
            page = bottle.request.query.get("page", "1")
            return self.history(
                session, bottle.request.query.getunicode("q", "") or "", int(page) if page.isdigit() else 1
            )

        @app.get("/history.csv")
        @console
        @signed_in
        def history_csv(session, form):
            return self.history_csv(bottle.request.query.getunicode("q", "") or "")

        @app.get("/schedule")
        @console
        @signed_in
        def schedule(session, form):
            return self.schedule(session)

        @app.post("/schedule/override")
        @console
        @signed_in
        def add_override(session, form):
            return self.add_override(session, form)

        @app.post("/schedule/override/<override_id>/delete")
        @console
        @signed_in
        def delete_override(session, form, override_id):
            return self.delete_override(session, override_id)


def csv_safe(text: str) -> str:
    """A cell a spreadsheet shows as text: one starting like a formula gets a leading quote."""
    return f"'{text}" if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def login_link(store: Store | ConsoleFile, public_url: str, phone: str, now: float) -> str:
    """A one-time sign-in URL for the phone, valid CODE_VALID."""
    token = secrets.token_urlsafe(32)
    store.keep_console_record(f"link:{digest(token)}", {"phone": phone}, now + CODE_VALID)
    return f"{public_url}/signin/link?t={token}"


# ---------------------------------------------------------------------------
# Sweeper, catch-up and heartbeat: the loops beside the web server
#
# The sweeper wakes for the next deadline or retry and does housekeeping; catch-up asks
# Twilio for texts the webhook never brought; the heartbeat tells an outside monitor that
# this relay can page. Each runs on a thread of its own.
# ---------------------------------------------------------------------------

# -- sweeper -----------------------------------------------------------------------------------


HOUSEKEEPING_EVERY = 1.0
# A pass of the sweep takes as many due conversations as it can step in about this long, commits, and
# sends what it claimed; the rest are taken at once by the next: a slow database then delays each page
# by its own writes, not by all of them, and a pass holds no conversation long.
SWEEP_BATCH_SECONDS = 0.5
SWEEP_MOST = 100
SWEEP_STALL = 10.0


def run_renewer(relay: Relay, stop: threading.Event) -> None:
    """Keep this relay's claims on the pages it is sending, on a thread of its own: a sweep slowed by
    the database must not let them lapse, or another relay would send them too."""
    while not stop.wait(relay.store.RENEW_EVERY):
        try:
            relay.outbox.renew()
        except StoreFailure:
            pass  # the claims lapse, and are taken anew: the webhook and the sweep report the store
        except Exception as e:
            log("error", "renew_failed", error=repr(e))


# -- catch-up ----------------------------------------------------------------------------------
#
# Twilio does not retry a failed SMS webhook, but it keeps every text. So each line's received
# texts are listed now and then, and any MessageSid the relay has not seen is handled exactly as
# the webhook would have. The MessageSid dedup makes the webhook and the catch-up safe to race.


CATCH_UP_PAGE = 50
CATCH_UP_OVERLAP = 300.0  # each pass reads back this far before the previous one began: clocks differ


def catch_up_pass(relay: Relay, since: float) -> bool:
    """One pass over every line; True when every list call went through."""
    all_well = True
    for line in relay.config.lines:
        forwarded = None  # asked of Twilio once a pass finds a text the webhook missed
        try:
            for params, received_at in relay.gateway.received(line.number, since):
                if relay.store.knows(params["MessageSid"]):
                    continue  # the usual case: the webhook brought it
                if forwarded is None:  # the webhook failed it, so Twilio handed it to the fallback URL
                    forwarded = relay.gateway.falls_back_to_a_flow(line.number)
                try:
                    text = read_inbound(params)
                    relay.receive(text, received_at=received_at or relay.clock(), forwarded=forwarded)
                except (BadRequest, StoreFailure) as e:  # tried again at the next pass
                    log("warning", "catch_up_text_failed", message_sid=params["MessageSid"], reason=str(e))
                    all_well = False
        except (TwilioException, requests.RequestException) as e:
            CATCH_UP_FAILURES.inc()
            status = getattr(e, "status", None) or getattr(e.args[-1] if e.args else None, "status_code", None)
            level = "error" if status in ACCOUNT_STATUSES else "warning"
            log(level, "catch_up_failed", line=line.name, status=status, reason=type(e).__name__)
            all_well = False
    return all_well


def run_catch_up(relay: Relay, stop: threading.Event) -> None:
    """At start and then every `catch_up`: each pass reads back to a little before the previous began."""
    since = relay.clock() - relay.config.catch_up_window
    while not stop.is_set() and relay.config.catch_up:
        began = relay.clock()
        oldest = began - relay.config.catch_up_window  # nothing older is ever caught up
        try:
            done = catch_up_pass(relay, max(since, oldest))
        except Exception as e:  # never let a surprise stop the catch-up for good
            log("error", "catch_up_failed", reason=repr(e))
            done = False
        if done:
            since = began - CATCH_UP_OVERLAP
        try:
            relay.store.note_catch_up(began, done)
        except (OSError, StoreFailure) as e:
            log("warning", "catch_up_not_recorded", reason=getattr(e, "strerror", None) or str(e))
        stop.wait(relay.config.catch_up)


# -- heartbeat: pings while this relay can page, /fail with the reason while it cannot ---------


HEARTBEAT_TIMEOUT = 10.0


def heartbeat_trouble(relay: Relay) -> str | None:
    """Why the monitor should hear of trouble, or None: what /healthz says, or Twilio refusing the relay."""
    return relay.trouble() or relay.gateway.refusal


def ping(url: str, trouble: str | None) -> None:
    """One ping, never retried: the next period's ping is the retry. A failed one is logged."""
    try:
        if trouble is None:
            response = requests.get(url, timeout=HEARTBEAT_TIMEOUT)
        else:
            plain = {"Content-Type": "text/plain; charset=utf-8"}
            response = requests.post(f"{url}/fail", data=trouble.encode(), headers=plain, timeout=HEARTBEAT_TIMEOUT)
        response.raise_for_status()
    except requests.RequestException as e:
        status = e.response.status_code if e.response is not None else None
        log("warning", "heartbeat_failed", reason=type(e).__name__, status=status)


def run_heartbeat(relay: Relay, stop: threading.Event) -> None:
    """A ping every period on this thread alone, so a monitor that hangs holds up nothing else."""
    stop.wait(min(1.0, relay.config.heartbeat_every))  # the sweep's first pass, so a new relay starts healthy
    reported = None
    while not stop.is_set():
        began = time.monotonic()
        trouble = heartbeat_trouble(relay)
        if trouble != reported:
            if trouble:
                log("warning", "heartbeat_trouble", reason=trouble)
            else:
                log("info", "heartbeat_healthy_again")
            reported = trouble
        ping(relay.settings.heartbeat_url, trouble)
        stop.wait(max(0.0, began + relay.config.heartbeat_every - time.monotonic()))


# ---------------------------------------------------------------------------
# Process: memory, the server, signals
#
# How `serve` runs: glibc settings that hand a flood's memory back, waitress set for a
# public port, and the drain after SIGTERM.
# ---------------------------------------------------------------------------

# What lets a flood's memory go back to the system once it is over. CPython's own allocator frees an
# arena only when every object in it has gone, and a few survivors pin most of them; glibc keeps an
# arena per thread and raises its trim threshold as it goes. So the server runs its objects on
# malloc, in two arenas, with fixed thresholds, and malloc_trim can then return every free page.
# Nor does glibc keep a per-thread cache of freed chunks: a long-lived thread's cached chunks count
# as in use, so they neither merge with their free neighbours nor let malloc_trim return their
# pages (measured after a flood of 20,000 senders: 20 MB kept with the cache, 13 MB without).
RETURNABLE_MEMORY = {
    "PYTHONMALLOC": "malloc",
    "MALLOC_ARENA_MAX": "2",
    "MALLOC_TRIM_THRESHOLD_": str(1024 * 1024),
    "MALLOC_MMAP_THRESHOLD_": str(256 * 1024),
    "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0",
}


def run_with_returnable_memory() -> None:
    """Start again, as the same process, with RETURNABLE_MEMORY (which only works from the start)."""
    missing = {name: value for name, value in RETURNABLE_MEMORY.items() if name not in os.environ}
    if missing and sys.platform == "linux":
        os.execve(sys.executable, sys.orig_argv, {**os.environ, **missing})


def give_memory_back() -> None:
    """After many conversations left memory: collect, and hand freed heap pages back to the system."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the memory is reused, only not returned
        pass


IDLE_CONNECTION_SECONDS = 25  # closed by waitress's cleanup within IDLE + CLEANUP seconds: under 30
CLEANUP_EVERY = 2
DRAIN_SECONDS = 8.0  # SIGTERM: answer what was read and finish sends, then exit, well within 10 s
DRAIN_RENEW_EVERY = 0.2  # how often the drain looks to renew claims (renew_leases keeps its own pace)


def open_files_allowed() -> int:
    """Raise the soft limit on open files to the hard one (up to 16384): idle sockets must not starve us."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 16384 if hard == resource.RLIM_INFINITY else min(hard, 16384)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def create_server(app, host: str, port: int):
    """waitress set for a public port: many connections at once, idle ones closed, poll() not select()."""
    connections = max(100, min(10_000, open_files_allowed() - 256))
    return waitress.create_server(
        app,
        host=host,
        port=port,
        threads=8,
        max_request_body_size=MAX_BODY_BYTES,
        max_request_header_size=32 * 1024,
        connection_limit=connections,
        channel_timeout=IDLE_CONNECTION_SECONDS,
        cleanup_interval=CLEANUP_EVERY,
        asyncore_use_poll=True,
        backlog=1024,
        # X-Forwarded-For is passed on as sent: the console reads it only from a peer on a private
        # network, where a platform's router is (Console.client); nothing else reads it.
        clear_untrusted_proxy_headers=False,
    )


def requests_in_progress(server) -> int:
    """Requests waitress has, or has waiting unread on its sockets, and has not yet answered in full."""
    return sum(
        1
        for channel in list(server._map.values())
        if isinstance(channel, waitress.channel.HTTPChannel)
        and (channel.requests or channel.total_outbufs_len or unread_bytes(channel.socket))
    )


def unread_bytes(sock: socket.socket) -> int:
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:  # closed meanwhile
        return 0


def drain_and_exit(server, relay: Relay, sweeper: threading.Thread) -> None:
    """After SIGTERM: answer what was read, let sends in flight finish (the rest stay pending), exit 0."""
    deadline = time.monotonic() + DRAIN_SECONDS
    relay.sweeper.wake()  # from its sleep, to see the stop: the queued pages are handed back after it
    sweeper.join(timeout=2)
    handed_back = relay.outbox.hand_back()
    while requests_in_progress(server) and time.monotonic() < deadline:
        time.sleep(0.02)
    while True:  # the sends in flight keep their claims while they finish, so no other relay sends them too
        left = deadline - time.monotonic()
        unfinished = relay.outbox.senders.shutdown(wait=True, timeout=max(0.0, min(left, DRAIN_RENEW_EVERY)))
        if not unfinished or left <= DRAIN_RENEW_EVERY:
            break
        relay.outbox.renew()
    log(
        "info",
        "stopped",
        requests_unanswered=requests_in_progress(server),
        sends_handed_back=handed_back + unfinished,
    )
    os._exit(0)


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def prepare(dry_run: bool) -> tuple[Settings, Config]:
    load_dotenv_file()
    settings = Settings.from_env(dict(os.environ), dry_run=dry_run)
    return settings, load_config(settings.config_path)


def describe(settings: Settings, config: Config) -> list[str]:
    """What the relay would do, in words (for `check` and the startup log)."""
    out = []
    for line in config.lines:
        steps = " -> ".join(
            f"{step_name(c)}{'' if c.rotation else f' {c.phone}'} "
            f"(by {c.via}, wait {say_duration(c.wait)}{f', on duty {c.hours} {line.timezone}' if c.hours else ''})"
            for c in line.chain
        )
        out.append(f"line {line.name} {line.number}: {steps}; repeat {config.repeat}")
        if line.reply_to_sender:
            out.append(f"line {line.name}: two-way; contacts' replies are texted on to the customer")
        told = [e for e in ("received", "acknowledged", "unanswered") if getattr(line, f"{e}_text")]
        if told:
            out.append(f"line {line.name}: the customer is told when a text is {', '.join(told)}")
    firsts = ", ".join(f"{step_name(line.chain[0])} for {line.name}" for line in config.lines)
    out.append(
        f"alarm: {config.alarm_phone or f'none set; a chain that runs out is told to its first contact ({firsts})'}"
    )
    public_url = settings.public_url_for(config)
    if public_url:
        public_url = loggable_url(public_url)
        out.append(f"webhook: {public_url}/api/sms/inbound; delivery reports: {public_url}/api/sms/status")
    else:
        out.append(
            ("" if settings.dry_run else "WARNING: ")
            + "public URL: not set (RELAY_PUBLIC_URL); signatures are checked against the URL the request "
            "arrived on, and no delivery reports are asked for"
        )
    out.append("mode: dry-run, nothing is sent" if settings.dry_run else f"REST: {settings.api_base_url}")
    if settings.database_url:
        out.append(f"store: PostgreSQL at {shown_database(settings.database_url)} (DATABASE_URL)")
    else:
        out.append(f"store: JSON files under {settings.state_dir}")
    if settings.files_do_not_last and not settings.database_url:
        out.append(
            "WARNING: DYNO is set: this platform discards the dyno's files at every restart (at least daily), "
            "and with them every open conversation, timer and MessageSid; run the relay on a VM or with a "
            "volume (README, Deploy)"
        )
    if settings.heartbeat_url:
        out.append(
            f"heartbeat: every {say_duration(config.heartbeat_every)} to the monitor at "
            f"{urllib.parse.urlsplit(settings.heartbeat_url).hostname} (RELAY_HEARTBEAT_URL); /fail while in trouble"
        )
    else:
        out.append("heartbeat: off (RELAY_HEARTBEAT_URL is not set; nobody is told if this relay stops)")
    if settings.dry_run or not config.catch_up:
        out.append("catch-up: off (texts the webhook misses are not looked for)")
    else:
        out.append(
            f"catch-up: every {say_duration(config.catch_up)}, Twilio is asked for texts the webhook missed "
            f"(the first pass looks back {say_duration(config.catch_up_window)})"
        )
    if not config.console:
        out.append("console: off (console = false)")
    elif not (VIEWS / "layout.tpl").exists():
        out.append(f"WARNING: console: its pages are missing ({VIEWS}); deploy the views/ folder beside relay.py")
    else:
        where = f"{public_url}/" if public_url else "at / on this relay"
        out.append(f"console: {where} (sign-in by a code texted to a contact's phone; login-link for a URL)")
    return out


def cmd_serve(args) -> int:
    run_with_returnable_memory()
    tame_library_logging()
    settings, config = prepare(args.dry_run)
    settings.require_credentials()
    store = open_store(settings, config)
    gateway = DryRunGateway(settings.state_dir) if settings.dry_run else TwilioGateway(settings)
    relay = Relay(settings, config, store, gateway)
    for text in describe(settings, config):
        log("warning" if text.startswith("WARNING") else "info", "startup", detail=text)
    try:
        server = create_server(make_app(relay), settings.host, settings.port)
    except OSError as e:
        where = f"{settings.host}:{settings.port}"
        raise ConfigError(f"PORT: cannot listen on {where}: {e.strerror or e}") from None
    log("info", "listening", host=settings.host, port=settings.port, open_conversations=store.open_count())
    relay.tell_about_damage()
    stop = threading.Event()
    sweeper = threading.Thread(target=relay.sweeper.run, args=(stop,), name="sweeper", daemon=True)

    def stop_gracefully(signum, frame):
        if stop.is_set():
            return
        log("info", "stopping", signal=signal.Signals(signum).name)
        stop.set()
        relay.outbox.stopping = True  # sends not yet started stay pending on disk for the next start
        server.close()  # no new connections; those open keep being served until answered
        threading.Thread(target=drain_and_exit, args=(server, relay, sweeper), name="drain").start()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop_gracefully)
    sweeper.start()
    threading.Thread(target=store.listen, args=(relay.sweeper.wake, stop), name="listener", daemon=True).start()
    if store.SHARED:
        threading.Thread(target=run_renewer, args=(relay, stop), name="renewer", daemon=True).start()
    if not settings.dry_run and config.catch_up:
        threading.Thread(target=run_catch_up, args=(relay, stop), name="catch-up", daemon=True).start()
    if settings.heartbeat_url:
        threading.Thread(target=run_heartbeat, args=(relay, stop), name="heartbeat", daemon=True).start()
    server.run()
    return 0


def open_store(settings: Settings, config: Config) -> Store:
    """The store `serve` runs on. An unreachable database is said in one line and tried again after."""
    if settings.database_url:
        store = PgStore(settings.database_url, config.database_connections)
        try:
            store.open()
        except SchemaRefused as e:
            raise ConfigError(str(e)) from None
        except StoreFailure as e:
            log("error", "database_unreachable", reason=str(e), detail="answering 503 until it is back")
        return store
    store = JsonStore(settings.state_dir)
    try:
        store.open()
    except OSError as e:
        raise ConfigError(f"{settings.state_dir}: cannot write the state directory: {e.strerror}") from None
    return store


def cmd_send(args) -> int:
    load_dotenv_file()
    settings = Settings.from_env(dict(os.environ), dry_run=True)
    url = inbound_url(args.url or f"http://127.0.0.1:{settings.port}")
    with contextlib.suppress(ConfigError):
        config = load_config(settings.config_path)
        if config.line_for(args.to) is None:
            lines = ", ".join(f"{line.name} {line.number}" for line in config.lines)
            print(
                f"relay: no line in {settings.config_path} has the number {args.to} (lines: {lines})", file=sys.stderr
            )
    params = {
        "MessageSid": "SM" + hashlib.sha1(f"{time.time()}{os.getpid()}".encode()).hexdigest()[:32],
        "AccountSid": settings.account_sid or "AC" + "0" * 32,
        "From": args.from_,
        "To": args.to,
        "Body": args.body,
        "NumMedia": "0",
    }
    return post_signed(settings, url, params)


def inbound_url(url: str) -> str:
    """The webhook's URL from a relay's base URL (or the whole URL, as given)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--url: {url!r} is not a URL like http://127.0.0.1:8080")
    return url if parts.path.strip("/") else f"{url.rstrip('/')}/api/sms/inbound"


def post_signed(settings: Settings, url: str, params: dict) -> int:
    """POST a form to a running relay, signed as Twilio would sign it for the public URL (if any).

    Prints the HTTP status and the answer; returns the command's exit status.
    """
    try:
        public_url = settings.public_url_for(load_config(settings.config_path))
    except ConfigError:
        public_url = settings.public_url
    parts = urllib.parse.urlsplit(url)
    signed_url = (public_url + parts.path + (f"?{parts.query}" if parts.query else "")) if public_url else url
    signature = RequestValidator(settings.signing_token).compute_signature(signed_url, params)
    request = urllib.request.Request(
        url,
        data=urllib.parse.urlencode(params).encode(),
        headers={"X-Twilio-Signature": signature, "Content-Type": FORM_TYPE},
    )
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            status, answer = response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        status, answer = e.code, e.read().decode()
    except (urllib.error.URLError, OSError) as e:
        print(f"relay: cannot reach {url}: {getattr(e, 'reason', e)}", file=sys.stderr)
        return 1
    print(status)
    print(answer)
    return 0 if status == 200 else 1


def cmd_press(args) -> int:
    """Press a key on a dry-run call: what Twilio would post when the person called presses it."""
    load_dotenv_file()
    settings = Settings.from_env(dict(os.environ), dry_run=True)
    outbox = settings.state_dir / "outbox.jsonl"
    calls = [r for r in read_json_lines(outbox) if r.get("kind") == "call"] if outbox.exists() else []
    call = next((r for r in reversed(calls) if args.call in (None, r["sid"])), None)
    if call is None:
        which = f"call {args.call}" if args.call else "call"
        print(f"relay: no {which} in {outbox}; a dry-run call step writes one there", file=sys.stderr)
        return 1
    gather = html.unescape(re.search(r'action="([^"]*)"', call["twiml"])[1])
    parts = urllib.parse.urlsplit(gather)
    url = f"http://127.0.0.1:{settings.port}{parts.path}?{parts.query}"
    params = {"CallSid": call["sid"], "Digits": args.digits, "From": call["from"], "To": call["to"]}
    return post_signed(settings, url, params)


def cmd_check(args) -> int:
    settings, config = prepare(args.dry_run)
    settings.require_credentials()
    described = describe(settings, config)
    for text in described:
        print(text)
    if settings.database_url and not check_database(settings.database_url):
        return 1
    if config.rotations:
        now = time.time()
        roster = Roster(config.rotations, schedule_of(settings).overrides(now))
        for text in oncall_report(config, roster, lambda timezone: now, handoffs=1):
            print(text)
    if args.live and not check_numbers(settings, config, apply=False):
        return 1
    warnings = sum(text.startswith("WARNING") for text in described)
    print(f"ok, but read the {warnings} WARNING line(s) above" if warnings else "ok")
    return 0


def check_database(url: str) -> bool:
    """Connect (changing nothing) and say which relay schema the database holds."""
    import_psycopg()
    try:
        with psycopg.connect(database_dsn(url), connect_timeout=PgSessions.CONNECT_SECONDS) as conn:
            version = schema_version(conn)
            server = conn.info.parameter_status("server_version")
            tables, functions = schema_missing(conn)
            found = conn.execute("SELECT to_regclass('relay_schema'), to_regclass('relay_conversations')").fetchone()
    except psycopg.Error as e:
        print(f"database: cannot connect: {first_line(e)}")
        return False
    if version > SCHEMA_VERSION:
        print(f"database: connects (PostgreSQL {server}); schema version {version} is newer than this relay's")
        return False
    if version == 0 and any(found):
        print(f"database: connects (PostgreSQL {server}); the relay's tables are there but its version row is not")
        return False
    if version and tables:
        print(f"database: connects (PostgreSQL {server}); the relay's table {tables[0]} is missing: restore it")
        return False
    held = f"relay schema version {version}" if version else "no relay tables yet (created at the first start)"
    mended = f"; missing function(s) {', '.join(functions)}, created again at start" if version and functions else ""
    print(f"database: connects (PostgreSQL {server}); {held}; this relay uses version {SCHEMA_VERSION}{mended}")
    return True


def check_numbers(settings: Settings, config: Config, apply: bool) -> bool:
    """Look up each line's number on the Twilio account and its messaging webhook; with `apply`, fix it.

    Prints one line per line, in words an operator can act on; True when all is well.
    """
    public_url = settings.public_url_for(config)
    if not public_url:
        print("RELAY_PUBLIC_URL is not set: set it to the address Twilio can reach, e.g. https://relay.example.com")
        return False
    want = f"{public_url}/api/sms/inbound"
    gateway = TwilioGateway(settings)
    all_well = True
    for line in config.lines:
        try:
            gateway.messages.list(to=line.number, limit=1)
            print(f"{line.name} {line.number}: ok, the credentials may list received texts (for catch-up)")
            record = gateway.find_number(line.number)
            if record is None:
                print(
                    f"{line.name} {line.number}: not a number on Twilio account {settings.account_sid}; "
                    "buy or port it there, or correct `number` in the config."
                )
                all_well = False
                continue
            if not apply:  # `check --live`: can the number text at all (setup changes nothing of this)
                carried, said = can_text_us_phones(gateway, line, record.sid)
                print(said)
                all_well = all_well and carried
            current = f"{record.sms_method or 'POST'} {record.sms_url or '(nothing)'}"
            # A fragment (Twilio's connection overrides, e.g. #rc=3) is the operator's own setting: keep it.
            if (record.sms_url or "").split("#")[0] == want and (record.sms_method or "POST") == "POST":
                print(f"{line.name} {line.number}: ok, texts go to POST {want}")
            elif apply:
                gateway.point_sms_webhook(record.sid, want)
                print(f"{line.name} {line.number}: changed from {current} to POST {want}")
            else:
                print(
                    f"{line.name} {line.number}: texts go to {current}, not to the relay; "
                    "run `python relay.py setup --apply` to point them at it."
                )
                all_well = False
            if config.fallback:
                all_well = check_fallback(gateway, line, record, apply) and all_well
            else:
                print(
                    f"{line.name} {line.number}: fallback = false: no Studio flow is installed; an existing one "
                    "and the number's SmsFallbackUrl are left as they are"
                )
        except TwilioException as e:
            # A list request fails as TwilioException("Unable to fetch page", response): no .status of its own.
            status = getattr(e, "status", None) or getattr(e.args[-1] if e.args else None, "status_code", None)
            if status in ACCOUNT_STATUSES:
                print(
                    "Twilio refused the credentials: check TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN "
                    "(or TWILIO_API_KEY and TWILIO_API_SECRET)."
                )
            else:
                print(f"{line.name} {line.number}: Twilio answered HTTP {status}: {e}")
            return False
        except requests.RequestException as e:
            print(f"cannot reach Twilio at {settings.api_base_url}: {type(e).__name__}")
            return False
    return all_well


# -- Twilio's own fallback: a Studio flow per line that texts the whole crew at once --------------


def fallback_flow_name(line: Line) -> str:
    return f"relay fallback: {line.name}"


def fallback_text(line: Line) -> str:
    """What the flow texts (Liquid: Studio fills in the sender and the text)."""
    return f"{line.name} (relay down) from {{{{trigger.message.From}}}}: {{{{trigger.message.Body}}}}"


def line_phones(line: Line) -> list[str]:
    """Every phone the line pages, each once."""
    members = [m.phone for rotation in line.rotations for m in rotation.members]
    return list(dict.fromkeys([*(c.phone for c in line.chain if not c.rotation), *members]))


def fallback_definition(line: Line) -> dict:
    """The Studio flow: on an incoming text, one Send Message per phone, each reached whether the one
    before was sent or failed, so one bad phone stops nobody after it."""
    phones = line_phones(line)
    names = [f"text_{i + 1}" for i in range(len(phones))]
    trigger = {
        "name": "Trigger",
        "type": "trigger",
        "transitions": [
            {"event": "incomingMessage", "next": names[0]},
            {"event": "incomingCall"},
            {"event": "incomingConversationMessage"},
            {"event": "incomingRequest"},
            {"event": "incomingParent"},
        ],
        "properties": {"offset": {"x": 0, "y": 0}},
    }
    states = [trigger]
    for i, phone in enumerate(phones):
        after = {"next": names[i + 1]} if i + 1 < len(names) else {}
        states.append(
            {
                "name": names[i],
                "type": "send-message",
                "transitions": [{"event": "sent", **after}, {"event": "failed", **after}],
                "properties": {
                    "offset": {"x": 0, "y": 200 * (i + 1)},
                    "service": "{{trigger.message.InstanceSid}}",
                    "channel": "{{trigger.message.ChannelSid}}",
                    "from": line.number,
                    "to": phone,
                    "body": fallback_text(line),
                },
            }
        )
    return {"description": fallback_flow_name(line), "states": states, "initial_state": "Trigger", "flags": {}}


def flow_shape(definition: object) -> list:
    """What a flow does, without where its widgets are drawn: each state's kind, transitions and text."""
    if isinstance(definition, str):
        definition = json.loads(definition)
    states = definition.get("states", []) if isinstance(definition, dict) else []
    return sorted(
        (
            str(state.get("name")),
            str(state.get("type")),
            sorted((str(t.get("event")), str(t.get("next"))) for t in state.get("transitions", [])),
            [str(state.get("properties", {}).get(key)) for key in ("from", "to", "body")],
        )
        for state in states
    )


def flow_differences(status: str, definition: object, wanted: dict) -> str | None:
    """How an installed flow differs from the wanted one, in words, or None."""
    if status != "published":
        return f"it is {status}, not published"
    shape, wanted_shape = flow_shape(definition), flow_shape(wanted)
    if shape == wanted_shape:
        return None
    texted = {state[3][1] for state in shape if state[1] == "send-message"}
    wanted_texted = {state[3][1] for state in wanted_shape if state[1] == "send-message"}
    if texted != wanted_texted:
        missing, extra = sorted(wanted_texted - texted), sorted(texted - wanted_texted)
        return "it " + "; ".join(
            part
            for part in (
                f"does not text {', '.join(missing)}" if missing else "",
                f"still texts {', '.join(extra)}" if extra else "",
            )
            if part
        )
    return "its steps or text differ from the config"


def check_fallback(gateway: TwilioGateway, line: Line, record, apply: bool) -> bool:
    """Twilio's own fallback for the line: its Studio flow, and the number's SmsFallbackUrl pointing at it.

    Prints one line for each; with `apply`, creates or updates what is missing or out of date.
    """
    head, name, wanted = f"{line.name} {line.number}", fallback_flow_name(line), fallback_definition(line)
    said = f'Studio flow "{name}", texting "{fallback_text(line)}" to {", ".join(line_phones(line))} at once'
    flow = gateway.flow_named(name)
    differs = "missing" if flow is None else flow_differences(flow.status, flow.definition, wanted)
    all_well = True
    if differs is None:
        print(f"{head}: ok, fallback {said} ({flow.sid})")
    elif apply:
        flow = gateway.update_flow(flow.sid, name, wanted) if flow else gateway.create_flow(name, wanted)
        print(f"{head}: {'created' if differs == 'missing' else 'updated'} fallback {said} ({flow.sid})")
    else:
        print(f"{head}: fallback {said}: {differs}; run `python relay.py setup --apply` to install it")
        all_well = False
    url = flow.webhook_url if flow is not None else "(the flow's webhook_url)"
    current = f"{record.sms_fallback_method or 'POST'} {record.sms_fallback_url or '(nothing)'}"
    if record.sms_fallback_url == url and (record.sms_fallback_method or "POST") == "POST":
        print(f"{head}: ok, if the relay cannot take a text, Twilio hands it to the flow at POST {url}")
    elif apply:
        gateway.point_sms_fallback(record.sid, url)
        print(f"{head}: SmsFallbackUrl changed from {current} to POST {url}")
    else:
        print(f"{head}: SmsFallbackUrl is {current}, not POST {url}; run `python relay.py setup --apply`")
        all_well = False
    return all_well


TOLL_FREE_PREFIXES = ("+1800", "+1833", "+1844", "+1855", "+1866", "+1877", "+1888")


def can_text_us_phones(gateway: TwilioGateway, line: Line, number_sid: str) -> tuple[bool, str]:
    """Whether carriers carry the line's texts to US phones, in one line an operator can act on."""
    head = f"{line.name} {line.number}"
    if not line.number.startswith("+1"):
        return True, f"{head}: not a US (+1) number; A2P 10DLC and toll-free verification were not asked about"
    if line.number.startswith(TOLL_FREE_PREFIXES):
        status = gateway.tollfree_verification(number_sid)
        if status == "TWILIO_APPROVED":
            return True, f"{head}: toll-free, verified (TWILIO_APPROVED); carriers carry its texts"
        said = f"its verification is {status}" if status else "it has no toll-free verification"
        return False, (
            f"{head}: toll-free, and {said}: carriers block its texts (error 30032) until Twilio approves it; "
            "submit or finish it in the Twilio console, Messaging > Regulatory compliance > Toll-free verifications"
        )
    held = gateway.campaign_holding(line.number)
    if held is None:
        return False, (
            f"{head}: no Messaging Service with an A2P 10DLC campaign holds this 10-digit number: carriers block "
            "its texts (error 30034); register a brand and a campaign, then add the number to the campaign's "
            "Messaging Service (Twilio console, Messaging > Regulatory compliance > A2P 10DLC)"
        )
    service, status = held
    if status == "VERIFIED":
        return True, f"{head}: in Messaging Service {service}, A2P 10DLC campaign VERIFIED; carriers carry its texts"
    said = f"its A2P 10DLC campaign is {status}" if status else "that service has no A2P 10DLC campaign"
    return False, (
        f"{head}: in Messaging Service {service}, but {said}: carriers block its texts (error 30034) until the "
        "campaign is VERIFIED (Twilio console, Messaging > Regulatory compliance > A2P 10DLC)"
    )


def cmd_setup(args) -> int:
    settings, config = prepare(dry_run=False)
    settings.require_credentials()
    return 0 if check_numbers(settings, config, apply=args.apply) else 1


def reachable_database(url: str) -> PgStore:
    store = PgStore(url)
    try:
        store.open()
    except (StoreFailure, SchemaRefused) as e:
        raise ConfigError(str(e)) from None
    return store


def schedule_of(settings: Settings) -> Store | ScheduleFile:
    """Where overrides are kept, for the commands: beside a running relay's, which acts on them."""
    if settings.database_url:
        return reachable_database(settings.database_url)
    return ScheduleFile(settings.state_dir / SCHEDULE_FILE)


def parse_when(value: str, timezone: str, *, flag: str) -> float:
    """`YYYY-MM-DD HH:MM[:SS]` in `timezone`, or ISO 8601 with an offset."""
    try:
        when = datetime.datetime.fromisoformat(value.strip())
    except ValueError:
        raise ConfigError(
            f'{flag}: {value!r} is not a time like "2026-12-07 08:00" ({timezone}) or 2026-12-07T08:00-08:00'
        ) from None
    return (when if when.tzinfo else when.replace(tzinfo=zoneinfo.ZoneInfo(timezone))).timestamp()


def oncall_report(config: Config, roster: Roster, at: Callable[[str], float], handoffs: int = 3) -> list[str]:
    """Who is on call for each rotation, until when and the next handoffs; and each line's first step.
    `at`: the moment asked about, given a time zone (a local time means a moment in each zone)."""
    out = []
    for rotation in config.rotations:
        tz, name = rotation.timezone, rotation.name
        now = at(tz)
        holder, until = roster.on_shift(name, now), roster.until(name, now)
        covering = next((o for o in roster.overrides if o.rotation == name and o.covers(now)), None)
        out.append(
            f"rotation {name}: {holder.name} {holder.phone} is on call now"
            + (f" until {local_time(until, tz)}" if until else ", and nobody else is on the rotation")
            + (f" (override {covering.id}, for {covering.replaces})" if covering else "")
        )
        out += [f"  then {m.name} {m.phone} from {local_time(t, tz)}" for t, m in roster.handoffs(name, now, handoffs)]
    for line in config.lines:
        first = line.chain[0]
        if first.rotation:
            tz = roster.rotations[first.rotation].timezone
            now = at(tz)
            holder, until = roster.on_shift(first.rotation, now), roster.until(first.rotation, now)
            when = f"until {local_time(until, tz)}" if until else "for now"
            out.append(f"line {line.name} first step: {holder.name} {holder.phone} ({first.rotation}, {when})")
        else:
            hours = f", on duty {first.hours} {line.timezone}" if first.hours else ""
            out.append(f"line {line.name} first step: {first.name} {first.phone}{hours}")
    return out


def cmd_oncall(args) -> int:
    settings, config = prepare(dry_run=True)
    now = time.time()
    at = functools.partial(parse_when, args.at, flag="--at") if args.at else lambda timezone: now
    at("UTC")  # a malformed --at is refused before anything is read
    if not config.rotations:
        print("no [[rotations]] in the config; each line's chain names fixed contacts")
    roster = Roster(config.rotations, schedule_of(settings).overrides(-math.inf) if config.rotations else ())
    for text in oncall_report(config, roster, at):
        print(text)
    return 0


def shown_override(override: Override, rotation: Rotation | None) -> str:
    tz = rotation.timezone if rotation else "UTC"
    return (
        f"{override.id} {override.rotation}: {override.name} {override.phone} from {local_time(override.start, tz)} "
        f"until {local_time(override.end, tz)}, for {override.replaces}"
    )


def cmd_override(args) -> int:
    settings, config = prepare(dry_run=True)
    schedule, now = schedule_of(settings), time.time()
    if args.list:
        overrides = sorted(schedule.overrides(now), key=lambda o: o.start)
        for override in overrides:
            print(shown_override(override, config.rotation(override.rotation)))
        print(f"{len(overrides)} override(s)" if overrides else "no overrides now or to come")
        return 0
    if args.delete:
        gone = schedule.delete_override(args.delete, now)
        if gone is None:
            raise ConfigError(f"--delete: no override {args.delete!r} now or to come (see override --list)")
        print(f"deleted {shown_override(gone, config.rotation(gone.rotation))}")
        return 0
    if not args.rotation or not args.name or not args.until:
        raise ConfigError("override: give ROTATION NAME --until TIME (or --list, or --delete ID)")
    rotation = config.rotation(args.rotation)
    if rotation is None:
        known = ", ".join(r.name for r in config.rotations) or "none in the config"
        raise ConfigError(f"override: {args.rotation!r} is no rotation (known: {known})")
    member = next((m for m in rotation.members if m.name.lower() == args.name.strip().lower()), None)
    if member is None:
        known = ", ".join(m.name for m in rotation.members)
        raise ConfigError(f"override: {args.name!r} is not a member of {rotation.name} (members: {known})")
    start = parse_when(args.from_, rotation.timezone, flag="--from") if args.from_ else now
    end = parse_when(args.until, rotation.timezone, flag="--until")
    if end <= max(start, now):
        raise ConfigError("--until: must be after --from and after now")
    override = new_override(Roster(config.rotations, schedule.overrides(now)), rotation, member, start, end, now)
    schedule.add_override(override)
    print(shown_override(override, rotation))
    return 0


def cmd_login_link(args) -> int:
    settings, config = prepare(dry_run=True)
    phone = typed_phone(args.phone)
    found = crew_member(config, phone)
    if found is None:
        raise ConfigError(f"login-link: {args.phone!r} is no contact or rotation member of any line")
    if settings.database_url:
        store = reachable_database(settings.database_url)
    else:
        store = ConsoleFile(settings.state_dir / CONSOLE_FILE, time.time)
    public_url = settings.public_url_for(config) or f"http://127.0.0.1:{settings.port}"
    print(login_link(store, public_url, phone, time.time()))
    print(f"for {found[1].name}; it works once, for {say_duration(int(CODE_VALID))}", file=sys.stderr)
    return 0


def cmd_status(args) -> int:
    load_dotenv_file()
    settings = Settings.from_env(dict(os.environ))
    if settings.database_url:
        store = reachable_database(settings.database_url)
    else:
        store = read_state_while_running(settings.state_dir)
    convs = store.unfinished()
    print(
        f"{sum(c.is_open for c in convs)} open conversation(s), "
        f"{sum(c.status == UNANSWERED_STATUS for c in convs)} unanswered"
    )
    print(f"store: {store.described()}")
    if last := store.last_catch_up():
        began, ok = last
        print(f"last catch-up: {local_time(began, 'UTC')}, {'ok' if ok else 'failed (tried again at the next pass)'}")
    else:
        print("last catch-up: none yet (there is none in dry-run, nor with catch_up = 0)")
    for conv in convs:
        held = len(held_pages(conv))

        when = functools.partial(lambda tz, ts: local_time(ts, tz), conv.timezone)

        head = f"{conv.line} #{conv.code} from {conv.sender}"
        if conv.status == UNANSWERED_STATUS:
            print(
                f"{head} since {when(conv.created)}: UNANSWERED since {when(conv.finished_at)}; "
                f"a reply #{conv.code} from a contact takes it"
            )
            continue
        if not conv.is_open:
            print(
                f"{head} at {when(conv.created)}: {held} text(s) HELD by a cost cap ({conv.status}); "
                "they go out as the cap allows"
            )
            continue
        paged = ", ".join(
            f"{contact_at(conv, p.step).name} {p.to} {'call ' if p.kind == 'call' else ''}{p.state}"
            f"{f' at {when(p.sent_at)}' if p.sent_at else ''}{f' ({p.error})' if p.kind == 'call' and p.error else ''}"
            for p in conv.pages
            if p.kind in STEP_KINDS
        )
        nxt = (
            step_name(contact_at(conv, conv.step + 1))
            if conv.step + 1 < len(conv.chain) * conv.rounds
            else "unanswered"
        )
        print(
            f"{head} since {when(conv.created)}; paged: {paged}; "
            f"step {conv.step + 1} since {when(conv.step_started)}; next: {nxt} at {when(conv.deadline)}"
            + (f"; {held} text(s) HELD by a cost cap" if held else "")
        )
    return 0


def cmd_import_state(args) -> int:
    """Copy a JSON state directory into the database; what is there already is left as it is."""
    load_dotenv_file()
    settings = Settings.from_env(dict(os.environ))
    if not settings.database_url:
        raise ConfigError("DATABASE_URL: not set; import-state copies a state directory into the database")
    directory = Path(args.directory) if args.directory else settings.state_dir
    if not directory.is_dir():
        raise ConfigError(f"{directory}: no such state directory")
    convs, strays, overrides = read_state_while_running(directory).export(time.time())
    store = reachable_database(settings.database_url)
    added, added_strays = store.import_state(convs, strays)
    known = {o.id for o in store.overrides(time.time())}
    for override in overrides:
        if override.id not in known:
            store.add_override(override)
    print(
        f"imported {added} of {len(convs)} conversation(s), {added_strays} of {len(strays)} other "
        f"text(s) and {len(set(o.id for o in overrides) - known)} of {len(overrides)} override(s) from "
        f"{directory}; the rest were already in the database"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="relay.py", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command")
    serve = commands.add_parser("serve", help="serve the webhook and relay texts (the default)")
    serve.add_argument("--dry-run", action="store_true", help="send nothing; log texts and append to outbox.jsonl")
    send = commands.add_parser("send", help="post a signed inbound text to a running relay")
    send.add_argument(
        "--from", dest="from_", required=True, metavar="NUMBER", help="who texts: a customer or a contact"
    )
    send.add_argument("--to", required=True, metavar="NUMBER", help="the line's number the text arrives on")
    send.add_argument("--body", required=True, metavar="TEXT", help="the text")
    send.add_argument(
        "--url",
        help="the relay's base URL (default http://127.0.0.1:$PORT); a URL with a path is posted to as it is",
    )
    check = commands.add_parser("check", help="validate config and environment")
    check.add_argument("--dry-run", action="store_true", help="check as `serve --dry-run` runs: no credentials needed")
    check.add_argument("--live", action="store_true", help="also ask Twilio about each line's number (changes nothing)")
    setup = commands.add_parser("setup", help="point each line's number at this relay on Twilio")
    setup.add_argument("--apply", action="store_true", help="change the webhook (without it, only show)")
    commands.add_parser("status", help="list open conversations")
    import_state = commands.add_parser("import-state", help="copy a JSON state directory into DATABASE_URL")
    import_state.add_argument("directory", nargs="?", help="the state directory (default: RELAY_STATE_DIR)")
    press = commands.add_parser("press", help="press a key on a dry-run call (the newest, or --call SID)")
    press.add_argument("digits", choices=[*"0123456789*#"], metavar="KEY", help="one key: 1 takes it, 2 passes it on")
    press.add_argument("--call", help="the call's sid, as outbox.jsonl has it")
    oncall = commands.add_parser("oncall", help="who is on call now for each rotation, and the next handoffs")
    oncall.add_argument(
        "--at",
        metavar="TIME",
        help='instead of now: "YYYY-MM-DD HH:MM[:SS]" in each rotation\'s time zone, or ISO 8601',
    )
    override = commands.add_parser("override", help="put a member on call for a rotation for a while")
    override.add_argument("rotation", nargs="?", metavar="ROTATION", help="the rotation's name")
    override.add_argument("name", nargs="?", metavar="NAME", help="the member who covers, by name")
    override.add_argument(
        "--from",
        dest="from_",
        metavar="TIME",
        help='start (default now): "YYYY-MM-DD HH:MM[:SS]" in the rotation\'s time zone, or ISO 8601 with an offset',
    )
    override.add_argument("--until", metavar="TIME", help="end, written as --from is (needed to add one)")
    override.add_argument("--list", action="store_true", help="list the overrides now or to come, each ID first")
    override.add_argument("--delete", metavar="ID", help="delete the override with this ID")
    link = commands.add_parser("login-link", help="print a one-time console sign-in URL for a contact")
    link.add_argument("phone", metavar="PHONE", help="the contact's or rotation member's phone, E.164")
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["serve", *(argv if argv is not None else sys.argv[1:])])
    commands_by_name = {
        "serve": cmd_serve,
        "send": cmd_send,
        "press": cmd_press,
        "check": cmd_check,
        "setup": cmd_setup,
        "import-state": cmd_import_state,
        "oncall": cmd_oncall,
        "override": cmd_override,
        "login-link": cmd_login_link,
    }
    handler = {**commands_by_name, "status": cmd_status}[args.command]
    try:
        return handler(args)
    except (ConfigError, StateLocked) as e:
        print(f"relay: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
