"""The WSGI app in-process: health, and hostile or broken input thrown at every route."""

import contextlib
import dataclasses
import inspect
import io
import json
import shutil
import sys
import threading
import time
import urllib.parse
import wsgiref.util

import pytest
from conftest import CUSTOMER, LINE, PUBLIC_URL, SERGIO, TOKEN, RunAtOnce, make_relay, msid, sign, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import relay

FORM = "application/x-www-form-urlencoded"


def call(app, method, path, body=b"", headers=None, content_length=None):
    """One request through the WSGI app; returns (status code, body text)."""
    target = urllib.parse.urlsplit(path)
    environ = {
        "REQUEST_METHOD": method,
        "PATH_INFO": target.path,
        "QUERY_STRING": target.query,
        "wsgi.input": io.BytesIO(body),
        "CONTENT_LENGTH": str(len(body)) if content_length is None else content_length,
    }
    for key, value in (headers or {}).items():
        name = key.upper().replace("-", "_")
        environ[name if name == "CONTENT_TYPE" else f"HTTP_{name}"] = value
    wsgiref.util.setup_testing_defaults(environ)
    answer = {}

    def start_response(status, response_headers, exc_info=None):
        answer["status"] = int(status.split()[0])

    text = b"".join(app(environ, start_response)).decode("utf-8", "replace")
    return answer["status"], text


def signed_post(app, path, params, token=TOKEN, content_type=FORM):
    body = urllib.parse.urlencode(params).encode()
    headers = {"Content-Type": content_type, "X-Twilio-Signature": sign(PUBLIC_URL + path, params, token)}
    return call(app, "POST", path, body, headers)


@pytest.fixture
def service(tmp_path):
    service = make_relay(tmp_path / "state")
    yield service
    service.outbox.senders.shutdown(wait=True)


def test_healthz_is_503_when_the_sweep_loop_has_stalled(service):
    service.sweeper.last_sweep = time.time() - 60
    status, body = call(relay.make_app(service), "GET", "/healthz")
    assert status == 503 and "sweep loop" in json.loads(body)["reason"]


def test_healthz_is_200_when_the_sweep_loop_runs(service):
    service.sweeper.sweep()
    status, body = call(relay.make_app(service), "GET", "/healthz")
    assert status == 200 and json.loads(body)["ok"] is True


def test_healthz_is_503_when_the_state_directory_cannot_be_written(service):
    service.sweeper.sweep()
    shutil.rmtree(service.store.dir)
    status, body = call(relay.make_app(service), "GET", "/healthz")
    assert status == 503 and "not writable" in json.loads(body)["reason"]


def test_inbound_is_refused_with_503_when_the_journal_cannot_be_written(service):
    service.store.journal.failure = OSError(28, "No space left on device")
    params = {"MessageSid": msid("1"), "From": CUSTOMER, "To": LINE, "Body": "hi"}
    status, body = signed_post(relay.make_app(service), "/api/sms/inbound", params)
    assert status == 503 and "No space left" in body


def test_accepted_text_is_on_disk_before_the_answer(service):
    params = {"MessageSid": msid("durable"), "From": CUSTOMER, "To": LINE, "Body": "hi"}
    assert signed_post(relay.make_app(service), "/api/sms/inbound", params)[0] == 200
    reread = relay.JsonStore(service.store.dir)
    reread.load()
    assert msid("durable") in reread.conversations


def test_body_over_64_kib_gets_413(service):
    body = b"Body=" + b"x" * (64 * 1024)
    headers = {"Content-Type": FORM, "X-Twilio-Signature": "x"}
    assert call(relay.make_app(service), "POST", "/api/sms/inbound", body, headers)[0] == 413


def test_signed_json_body_gets_415(service):
    body = json.dumps({"MessageSid": msid("1"), "From": CUSTOMER, "To": LINE}).encode()
    headers = {"Content-Type": "application/json", "X-Twilio-Signature": sign(PUBLIC_URL + "/api/sms/inbound", {})}
    assert call(relay.make_app(service), "POST", "/api/sms/inbound", body, headers)[0] == 415


def test_signed_invalid_utf8_gets_400(service):
    body = b"MessageSid=SM1&From=%2B15551230001&To=%2B16195550100&Body=\xff\xfe"
    params = dict(urllib.parse.parse_qsl(body.decode("utf-8", "replace")))
    headers = {"Content-Type": FORM, "X-Twilio-Signature": sign(PUBLIC_URL + "/api/sms/inbound", params)}
    assert call(relay.make_app(service), "POST", "/api/sms/inbound", body, headers)[0] == 400


def test_absurdly_long_from_gets_400(service):
    params = {"MessageSid": msid("1"), "From": "+1" * 5000, "To": LINE, "Body": "hi"}
    assert signed_post(relay.make_app(service), "/api/sms/inbound", params)[0] == 400


@pytest.mark.parametrize("path", ["/api/sms/status", "/api/voice/gather", "/api/voice/status"])
@pytest.mark.parametrize("query", ["p=0", "c={conv}&p=x", "c={conv}"], ids=["no-c", "p-not-a-number", "no-p"])
def test_a_callback_that_does_not_name_its_conversation_and_page_gets_400_and_changes_nothing(service, path, query):
    app = relay.make_app(service)
    signed_post(app, "/api/sms/inbound", {"MessageSid": msid("1"), "From": CUSTOMER, "To": LINE, "Body": "hi"})
    # As Twilio reports a failed text or an unanswered call: either would end this one-contact chain.
    report = {"MessageSid": msid("x"), "MessageStatus": "failed", "CallSid": "CA" + "1" * 32, "CallStatus": "busy"}
    status, _ = signed_post(app, f"{path}?{query.format(conv=msid('1'))}", report | {"Digits": "2"})
    assert status == 400
    assert service.store.conversations[msid("1")].is_open


def test_reply_naming_a_closed_code_says_who_took_it(service):
    app = relay.make_app(service)
    signed_post(app, "/api/sms/inbound", {"MessageSid": msid("1"), "From": CUSTOMER, "To": LINE, "Body": "hi"})
    signed_post(app, "/api/sms/inbound", {"MessageSid": msid("2"), "From": SERGIO, "To": LINE, "Body": "#1 ok"})
    _, twiml = signed_post(app, "/api/sms/inbound", {"MessageSid": msid("3"), "From": SERGIO, "To": LINE, "Body": "#1"})
    assert "#1 was already taken by Sergio" in twiml


def test_stop_from_a_contact_acknowledges_nothing(service):
    app = relay.make_app(service)
    signed_post(app, "/api/sms/inbound", {"MessageSid": msid("1"), "From": CUSTOMER, "To": LINE, "Body": "hi"})
    _, twiml = signed_post(
        app, "/api/sms/inbound", {"MessageSid": msid("2"), "From": SERGIO, "To": LINE, "Body": "STOP"}
    )
    assert "<Message>" not in twiml
    assert service.store.conversations[msid("1")].is_open


def test_dry_run_still_checks_signatures_with_the_dry_run_token(tmp_path):
    service = make_relay(tmp_path / "state")
    service.settings = relay.Settings.from_env({"RELAY_STATE_DIR": str(tmp_path / "state")}, dry_run=True)
    app = relay.make_app(service)
    params = {"MessageSid": msid("1"), "From": CUSTOMER, "To": LINE, "Body": "hi"}
    assert signed_post(app, "/api/sms/inbound", params, token=TOKEN)[0] == 403
    assert signed_post(app, "/api/sms/inbound", params, token="dry-run")[0] == 200


def test_a_texts_page_is_sent_from_its_own_webhook_with_no_sweep_pass(service):
    service.outbox.senders = RunAtOnce()  # no sweeper runs here: only the webhook can have sent it
    params = {"MessageSid": msid("direct"), "From": CUSTOMER, "To": LINE, "Body": "hi"}
    assert signed_post(relay.make_app(service), "/api/sms/inbound", params)[0] == 200
    assert [to for _, to, _ in service.gateway.sent] == [SERGIO]


def test_the_journal_is_written_and_synced_before_the_answer(service, monkeypatch):
    order = []
    real_fsync, real_write = relay.os.fsync, relay.write_all
    journal_fd = service.store.journal.fd
    monkeypatch.setattr(service.outbox.senders, "submit", lambda *args: None)  # the page's send would write too
    monkeypatch.setattr(relay.os, "fsync", lambda fd: (order.append(("fsync", fd)), real_fsync(fd))[1])
    monkeypatch.setattr(relay, "write_all", lambda fd, data: (order.append(("write", fd)), real_write(fd, data))[1])
    params = {"MessageSid": msid("synced"), "From": CUSTOMER, "To": LINE, "Body": "hi"}
    assert signed_post(relay.make_app(service), "/api/sms/inbound", params)[0] == 200
    order.append(("answered", None))
    assert order == [("write", journal_fd), ("fsync", journal_fd), ("answered", None)]


def test_message_bodies_stay_out_of_the_logs_unless_asked_for(tmp_path, capsys):
    for log_bodies in (False, True):
        config = relay.Config(lines=(relay.Line("QDN", LINE, (relay.Contact("Sergio", SERGIO, 60),)),))
        service = make_relay(tmp_path / f"state-{log_bodies}", dataclasses.replace(config, log_bodies=log_bodies))
        service.receive(
            relay.read_inbound(
                {"MessageSid": msid(log_bodies), "From": CUSTOMER, "To": LINE, "Body": "my card is 4111"}
            )
        )
        assert ("my card is 4111" in capsys.readouterr().out) is log_bodies


def test_a_from_of_65_characters_gets_400(service):
    app = relay.make_app(service)
    status, _ = signed_post(app, "/api/sms/inbound", {"MessageSid": msid("1"), "From": "+1" * 32 + "5", "To": LINE})
    assert status == 400 and service.store.conversations == {}


@pytest.mark.parametrize("field", ["MessageSid", "From", "To"])
def test_a_text_missing_one_required_field_gets_400_and_changes_nothing(service, field):
    params = {"MessageSid": msid("1"), "From": CUSTOMER, "To": LINE, "Body": "hi"}
    del params[field]
    status, _ = signed_post(relay.make_app(service), "/api/sms/inbound", params)
    assert status == 400 and service.store.conversations == {} and service.gateway.sent == []


def duplicates_counted(app) -> float:
    _, text = call(app, "GET", "/metrics")
    found = [line.split()[1] for line in text.splitlines() if line.startswith('relay_inbound_total{kind="duplicate"}')]
    return float(found[0]) if found else 0.0


def test_a_retried_text_is_counted_as_a_duplicate(service):
    app = relay.make_app(service)
    params = {"MessageSid": msid("1"), "From": CUSTOMER, "To": LINE, "Body": "hi"}
    signed_post(app, "/api/sms/inbound", params)
    before = duplicates_counted(app)
    signed_post(app, "/api/sms/inbound", params)
    assert duplicates_counted(app) == before + 1


def test_metrics_show_the_cpu_time_of_the_last_sweep(service):
    relay.SWEEP_SECONDS.set(-1)
    service.sweeper.sweep()
    _, text = call(relay.make_app(service), "GET", "/metrics")
    assert float(next(line.split()[1] for line in text.splitlines() if line.startswith("relay_sweep_seconds "))) >= 0


def test_a_duplicate_is_known_after_its_conversation_was_archived(service):
    app = relay.make_app(service)
    signed_post(app, "/api/sms/inbound", {"MessageSid": msid("1"), "From": CUSTOMER, "To": LINE, "Body": "hi"})
    signed_post(app, "/api/sms/inbound", {"MessageSid": msid("2"), "From": SERGIO, "To": LINE, "Body": "#1 ok"})
    with service.store.transaction():
        service.store.fold()
    assert msid("1") not in service.store.conversations
    signed_post(app, "/api/sms/inbound", {"MessageSid": msid("1"), "From": CUSTOMER, "To": LINE, "Body": "hi"})
    assert service.store.conversations == {} and service.store.open_by_sender == {}


def test_texts_never_seen_are_relayed_after_others_were_archived(service):
    app = relay.make_app(service)
    for n in range(3):  # archived conversations, whose texts are then known by their hashes only
        signed_post(app, "/api/sms/inbound", {"MessageSid": msid(n), "From": CUSTOMER, "To": LINE, "Body": "hi"})
        signed_post(app, "/api/sms/inbound", {"MessageSid": msid(f"ok {n}"), "From": SERGIO, "To": LINE, "Body": "ok"})
    with service.store.transaction():
        service.store.fold()
    assert service.store.conversations == {}
    new = [msid(f"new {n}") for n in range(30)]
    for n, sid in enumerate(new):
        signed_post(app, "/api/sms/inbound", {"MessageSid": sid, "From": f"+1555987{n:04d}", "To": LINE, "Body": "hi"})
    assert sorted(service.store.conversations) == sorted(new)


@contextlib.contextmanager
def fold_between_journals(service, monkeypatch, moment):
    """A fold in a thread of its own, held between journals: just after it closed the old one
    (`moment` "closed"), or after it wrote the snapshot ("snapshot"). Yields the event that lets it finish."""
    reached, finish = threading.Event(), threading.Event()
    owner, name = (relay.Journal, "close") if moment == "closed" else (relay, "write_atomically")
    original = getattr(owner, name)

    def held(*args, **kwargs):
        original(*args, **kwargs)
        if moment == "closed" or args[0].name == relay.JsonStore.SNAPSHOT:
            reached.set()
            finish.wait(10)

    def fold():
        with service.store.transaction():
            service.store.fold()

    monkeypatch.setattr(owner, name, held)
    folder = threading.Thread(target=fold)
    folder.start()
    try:
        assert reached.wait(10)
        yield finish
    finally:
        finish.set()
        folder.join(10)


def waiting_for_its_transaction(thread) -> bool:
    """The thread's webhook is past its checks, at the line that opens its transaction."""
    source, first = inspect.getsourcelines(relay.Relay.receive)
    line = first + next(n for n, text in enumerate(source) if "self.store.transaction(" in text)
    frame = sys._current_frames().get(thread.ident)
    while frame is not None:
        if frame.f_code is relay.Relay.receive.__code__:
            return frame.f_lineno == line
        frame = frame.f_back
    return False


@pytest.mark.parametrize("moment", ["closed", "snapshot"])
def test_a_health_check_during_a_fold_answers_200(service, monkeypatch, moment):
    app = relay.make_app(service)
    service.sweeper.last_sweep = service.clock()
    with fold_between_journals(service, monkeypatch, moment):
        status, body = call(app, "GET", "/healthz")
    assert status == 200, body


@pytest.mark.parametrize("moment", ["closed", "snapshot"])
def test_a_text_that_comes_during_a_fold_waits_for_it_and_is_answered_200(service, monkeypatch, moment):
    app = relay.make_app(service)
    params = {"MessageSid": msid("1"), "From": CUSTOMER, "To": LINE, "Body": "hi"}
    answers = []
    with fold_between_journals(service, monkeypatch, moment) as finish:
        webhook = threading.Thread(target=lambda: answers.append(signed_post(app, "/api/sms/inbound", params)))
        webhook.start()
        wait_until(lambda: answers or waiting_for_its_transaction(webhook))
        finish.set()
        webhook.join(10)
    assert answers[0][0] == 200, answers
    assert service.store.knows(msid("1"))


# -- thousands of malformed requests ---------------------------------------

MALFORMED_EXAMPLES = 1500
PATHS = ["/api/sms/inbound", "/api/sms/status", "/api/sms/status?c=SM1&p=0", "/healthz", "/metrics", "/", "/x/../api"]
PATHS += ["/signin", "/signout", "/c/SM1/take", "/schedule/override", "/history?q=%FF%FE", "/signin/link?t=x"]
CONTENT_TYPES = [FORM, f"{FORM}; charset=utf-8", "application/json", "text/plain", "multipart/form-data", "", "\x00"]
FIELDS = ["MessageSid", "From", "To", "Body", "NumMedia", "AccountSid", "MessageStatus"]
field_values = st.one_of(
    st.text(max_size=50),
    st.sampled_from([LINE, SERGIO, CUSTOMER, "+16195559999", ""]),
    # long values from a short drawn piece: drawing 500 characters one by one costs more than the request
    st.tuples(st.text(min_size=1, max_size=8), st.integers(100, 2000)).map(lambda piece: piece[0] * piece[1]),
)
forms = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=10), field_values, max_size=6)


def incomplete(form: dict) -> bool:
    """Signed forms that must still change nothing: a required field missing or blank, or no line."""
    return not all(form.get(k, "").strip() for k in ("MessageSid", "From", "To")) or form.get("To") != LINE


# Built once: a strategy made inside the composite is validated again at every draw, which costs
# more than the request it draws.
# Mostly POSTs to the relay's own paths, where the parsing that could break is.
methods = st.sampled_from(["POST"] * 6 + ["GET", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"])
random_paths = st.text(max_size=30).map(lambda t: "/" + urllib.parse.quote(t))
paths = st.sampled_from(PATHS * 4 + [None]).flatmap(lambda path: st.just(path) if path else random_paths)
content_types = st.sampled_from(CONTENT_TYPES)
signed_forms = forms.filter(incomplete)
body_kinds = st.sampled_from(["form", "binary", "json", "bad-percent"])
binary_bodies, percent_runs, garbage_signatures = st.binary(max_size=300), st.integers(0, 30000), st.text(max_size=40)
content_lengths = st.sampled_from([None, None, None, "abc", "-5", "99999999", ""])
signature_kinds = st.sampled_from(["valid", "none", "garbage", "other-token"])


@st.composite
def malformed_requests(draw):
    method, path, content_type, form = (
        draw(methods),
        draw(paths),
        draw(content_types),
        draw(signed_forms),
    )
    body = {
        "form": lambda: urllib.parse.urlencode(form).encode(),
        "binary": lambda: draw(binary_bodies),
        "json": lambda: json.dumps(form).encode(),
        "bad-percent": lambda: b"Body=" + b"%FF" * draw(percent_runs),
    }[draw(body_kinds)]()
    signature = draw(signature_kinds)
    headers = {"Content-Type": content_type}
    if signature != "none":
        url = PUBLIC_URL + path
        token = {"valid": TOKEN, "other-token": "nope"}.get(signature, TOKEN)
        headers["X-Twilio-Signature"] = sign(url, form, token) if signature != "garbage" else draw(garbage_signatures)
    return method, path, body, headers, draw(content_lengths)


@pytest.fixture(scope="module")
def hostile_target(tmp_path_factory):
    service = make_relay(tmp_path_factory.mktemp("hostile") / "state")
    service.sweeper.sweep()
    yield service, relay.make_app(service)
    service.outbox.senders.shutdown(wait=True)


@settings(max_examples=MALFORMED_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=malformed_requests())
def test_malformed_requests_get_a_clear_4xx_and_change_nothing(hostile_target, request):
    service, app = hostile_target
    method, path, body, headers, content_length = request
    service.sweeper.sweep()  # as the sweep loop would, so /healthz has no stall to report
    status, text = call(app, method, path, body, headers, content_length)
    assert status < 500, (status, text)
    assert "Traceback" not in text
    if path.startswith("/api/") and status != 200:
        assert 400 <= status < 500
    assert service.store.conversations == {}
    assert service.gateway.sent == []


complete_forms = st.fixed_dictionaries(
    {"MessageSid": st.sampled_from([msid(n) for n in range(5)]), "From": st.sampled_from([CUSTOMER, SERGIO])},
    optional={"Body": st.text(max_size=40), "NumMedia": st.sampled_from(["0", "1"])},
).map(lambda form: {**form, "To": LINE})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    form=complete_forms,
    signature=st.sampled_from(["none", "garbage", "other-token", "other-url", "other-form"]),
    garbage=st.text(max_size=40),
)
def test_a_complete_text_without_a_valid_signature_gets_403_and_changes_nothing(
    hostile_target, form, signature, garbage
):
    service, app = hostile_target
    headers = {"Content-Type": FORM}
    if signature == "garbage":
        headers["X-Twilio-Signature"] = garbage or "x"
    elif signature == "other-token":
        headers["X-Twilio-Signature"] = sign(PUBLIC_URL + "/api/sms/inbound", form, "not-the-token")
    elif signature == "other-url":
        headers["X-Twilio-Signature"] = sign("https://evil.example/api/sms/inbound", form)
    elif signature == "other-form":
        headers["X-Twilio-Signature"] = sign(
            PUBLIC_URL + "/api/sms/inbound", {**form, "Body": form.get("Body", "") + "!"}
        )
    status, _ = call(app, "POST", "/api/sms/inbound", urllib.parse.urlencode(form).encode(), headers)
    assert status == 403
    assert service.store.conversations == {} and service.store.strays == {}
    assert service.gateway.sent == []
