"""The WSGI app in-process: health, and hostile or broken input thrown at every route."""

import io
import json
import shutil
import time
import urllib.parse
import wsgiref.util

import pytest
from conftest import CUSTOMER, LINE, PUBLIC_URL, SERGIO, TOKEN, make_relay, msid, sign
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
    service.senders.shutdown(wait=True)


def test_healthz_is_503_when_the_sweep_loop_has_stalled(service):
    service.last_sweep = time.time() - 60
    status, body = call(relay.make_app(service), "GET", "/healthz")
    assert status == 503 and "sweep loop" in json.loads(body)["reason"]


def test_healthz_is_200_when_the_sweep_loop_runs(service):
    service.sweep()
    status, body = call(relay.make_app(service), "GET", "/healthz")
    assert status == 200 and json.loads(body)["ok"] is True


def test_healthz_is_503_when_the_state_directory_cannot_be_written(service):
    service.sweep()
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
    reread = relay.Store(service.store.dir)
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


# -- thousands of malformed requests ---------------------------------------

MALFORMED_EXAMPLES = 2500
PATHS = ["/api/sms/inbound", "/api/sms/status", "/api/sms/status?c=SM1&p=0", "/healthz", "/metrics", "/", "/x/../api"]
CONTENT_TYPES = [FORM, f"{FORM}; charset=utf-8", "application/json", "text/plain", "multipart/form-data", "", "\x00"]
FIELDS = ["MessageSid", "From", "To", "Body", "NumMedia", "AccountSid", "MessageStatus"]
field_values = st.one_of(
    st.text(max_size=50), st.sampled_from([LINE, SERGIO, CUSTOMER, "+16195559999", ""]), st.text(min_size=500)
)
forms = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=10), field_values, max_size=6)


def incomplete(form: dict) -> bool:
    """Signed forms that must still change nothing: a required field missing or blank, or no line."""
    return not all(form.get(k, "").strip() for k in ("MessageSid", "From", "To")) or form.get("To") != LINE


@st.composite
def malformed_requests(draw):
    method = draw(st.sampled_from(["POST", "POST", "GET", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"]))
    path = draw(st.sampled_from(PATHS) | st.text(max_size=30).map(lambda t: "/" + urllib.parse.quote(t)))
    content_type = draw(st.sampled_from(CONTENT_TYPES))
    form = draw(forms.filter(incomplete))
    body = draw(
        st.one_of(
            st.just(urllib.parse.urlencode(form).encode()),
            st.binary(max_size=300),
            st.just(json.dumps(form).encode()),
            st.just(b"Body=" + b"%FF" * draw(st.integers(0, 30000))),
        )
    )
    signature = draw(st.sampled_from(["valid", "none", "garbage", "other-token"]))
    headers = {"Content-Type": content_type}
    if signature != "none":
        url = PUBLIC_URL + path
        token = {"valid": TOKEN, "other-token": "nope"}.get(signature, TOKEN)
        headers["X-Twilio-Signature"] = sign(url, form, token) if signature != "garbage" else draw(st.text(max_size=40))
    content_length = draw(st.sampled_from([None, None, None, "abc", "-5", "99999999", ""]))
    return method, path, body, headers, content_length


@pytest.fixture(scope="module")
def hostile_target(tmp_path_factory):
    service = make_relay(tmp_path_factory.mktemp("hostile") / "state")
    service.sweep()
    yield service, relay.make_app(service)
    service.senders.shutdown(wait=True)


@settings(max_examples=MALFORMED_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=malformed_requests())
def test_malformed_requests_get_a_clear_4xx_and_change_nothing(hostile_target, request):
    service, app = hostile_target
    method, path, body, headers, content_length = request
    service.sweep()  # as the sweep loop would, so /healthz has no stall to report
    status, text = call(app, method, path, body, headers, content_length)
    assert status < 500, (status, text)
    assert "Traceback" not in text
    if path.startswith("/api/") and status != 200:
        assert 400 <= status < 500
    assert service.store.conversations == {}
    assert service.gateway.sent == []
