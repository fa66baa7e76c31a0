"""The console: sign-in by a texted code, sessions, the pages and their actions, seen over HTTP."""

import http.client
import io
import re
import urllib.parse
import wsgiref.util

import pytest
from conftest import (
    BACKUP,
    CUSTOMER,
    LINE,
    OTHER_CUSTOMER,
    SERGIO,
    RunAtOnce,
    config_text,
    make_relay,
    msid,
    wait_until,
)
from freezegun import freeze_time

import relay

pytestmark = pytest.mark.both_stores


class Browser:
    """Talks to a relay as a browser would, without following redirects: one session cookie."""

    def __init__(self, service, client: str | None = None):
        self.service = service
        self.cookie: str | None = None
        self.client = client  # the address a platform router would append to X-Forwarded-For

    def request(self, method: str, path: str, fields: dict | None = None, headers: dict | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.service.port, timeout=10)
        sent = dict(headers or {})
        if self.cookie:
            sent["Cookie"] = self.cookie
        if self.client:
            sent["X-Forwarded-For"] = self.client
        body = None
        if fields is not None:
            body = urllib.parse.urlencode(fields).encode()
            sent["Content-Type"] = "application/x-www-form-urlencoded"
        conn.request(method, path, body=body, headers=sent)
        response = conn.getresponse()
        text = response.read().decode()
        conn.close()
        if cookie := response.getheader("Set-Cookie"):
            self.cookie = cookie.split(";")[0] if "relay_session=" in cookie and "=;" not in cookie else None
        return response.status, text, response

    def get(self, path: str):
        return self.request("GET", path)

    def post(self, path: str, fields: dict, **headers):
        return self.request("POST", path, fields, headers)

    def csrf(self, path: str = "/") -> str:
        return re.search(r'name="csrf" value="([^"]+)"', self.get(path)[1])[1]

    def sign_in_by_link(self, phone: str) -> None:
        done = self.service.run("login-link", phone)
        assert done.returncode == 0, done.stderr
        url = urllib.parse.urlsplit(done.stdout.strip())
        status, _, _ = self.get(f"{url.path}?{url.query}")
        assert status == 303 and self.cookie


def codes_texted(fake, phone: str) -> list[str]:
    return [re.search(r"code is (\d{6})", m["Body"])[1] for m in fake.delivered(phone) if "sign-in code" in m["Body"]]


def sign_in_by_code(service, fake, phone: str = SERGIO) -> Browser:
    browser = Browser(service)
    status, page, _ = browser.post("/signin", {"phone": phone})
    assert status == 200 and 'name="code"' in page
    wait_until(lambda: codes_texted(fake, phone))
    status, _, response = browser.post("/signin", {"phone": phone, "code": codes_texted(fake, phone)[-1]})
    assert status == 303 and response.getheader("Location").endswith("/")
    return browser


def open_conversation(service, fake, body="boat leaking") -> str:
    service.inbound(CUSTOMER, body)
    wait_until(lambda: any(body in m["Body"] for m in fake.delivered(SERGIO)))
    browser = Browser(service)
    browser.sign_in_by_link(BACKUP)
    return re.search(r'href="/c/([A-Za-z0-9]+)"', browser.get("/")[1])[1]


# -- sign-in -------------------------------------------------------------------


@pytest.mark.json_only  # the same on both stores: nothing here is stored differently
def test_without_a_session_the_page_asks_for_a_phone_and_sends_the_security_headers(start_relay, fake_twilio):
    service = start_relay(config_text())
    status, page, response = Browser(service).get("/")
    assert status == 200 and 'name="phone"' in page
    assert "default-src 'none'" in response.getheader("Content-Security-Policy")
    assert response.getheader("X-Frame-Options") == "DENY"
    assert response.getheader("Referrer-Policy") == "no-referrer"


def test_a_contact_signs_in_with_a_code_texted_from_the_lines_number(start_relay, fake_twilio):
    service = start_relay(config_text())
    browser = sign_in_by_code(service, fake_twilio)
    (text,) = [m for m in fake_twilio.delivered(SERGIO) if "sign-in code" in m["Body"]]
    assert text["From"] == LINE
    status, page, _ = browser.get("/")
    assert status == 200 and "Sign out" in page and "Sergio" in page


@pytest.mark.json_only  # the same on both stores: nothing here is stored differently
def test_the_session_cookie_is_httponly_and_samesite_lax(start_relay, fake_twilio):
    service = start_relay(config_text())
    browser = Browser(service)
    browser.post("/signin", {"phone": SERGIO})
    wait_until(lambda: codes_texted(fake_twilio, SERGIO))
    _, _, response = browser.post("/signin", {"phone": SERGIO, "code": codes_texted(fake_twilio, SERGIO)[0]})
    cookie = response.getheader("Set-Cookie").lower()
    assert "httponly" in cookie and "samesite=lax" in cookie and "secure" not in cookie  # the URL is http here


@pytest.mark.json_only  # the same on both stores: nothing here is stored differently
def test_a_phone_on_no_line_gets_the_same_page_and_no_text(start_relay, fake_twilio):
    service = start_relay(config_text())
    stranger, known = Browser(service), Browser(service)
    status_s, page_s, _ = stranger.post("/signin", {"phone": "+15559990000"})
    status_k, page_k, _ = known.post("/signin", {"phone": BACKUP})
    assert status_s == status_k == 200
    assert page_s.replace("+15559990000", "PHONE") == page_k.replace(BACKUP, "PHONE")
    wait_until(lambda: codes_texted(fake_twilio, BACKUP))
    assert fake_twilio.delivered("+15559990000") == []


def test_a_code_works_once(start_relay, fake_twilio):
    service = start_relay(config_text())
    sign_in_by_code(service, fake_twilio)
    again = Browser(service)
    status, _, _ = again.post("/signin", {"phone": SERGIO, "code": codes_texted(fake_twilio, SERGIO)[0]})
    assert status == 403 and again.cookie is None


def test_five_wrong_codes_void_the_code(start_relay, fake_twilio):
    service = start_relay(config_text())
    browser = Browser(service)
    browser.post("/signin", {"phone": SERGIO})
    wait_until(lambda: codes_texted(fake_twilio, SERGIO))
    right = codes_texted(fake_twilio, SERGIO)[0]
    wrong = "000000" if right != "000000" else "111111"
    for _ in range(5):
        assert browser.post("/signin", {"phone": SERGIO, "code": wrong})[0] == 403
    assert browser.post("/signin", {"phone": SERGIO, "code": right})[0] == 403 and browser.cookie is None


def test_a_phone_gets_at_most_three_codes_an_hour(start_relay, fake_twilio):
    service = start_relay(config_text())
    statuses = [Browser(service, client=f"203.0.113.{n}").post("/signin", {"phone": SERGIO})[0] for n in range(4)]
    assert statuses == [200, 200, 200, 429]
    wait_until(lambda: len(codes_texted(fake_twilio, SERGIO)) == 3)


def test_a_client_address_gets_at_most_ten_codes_an_hour_whatever_the_phones(start_relay, fake_twilio):
    service = start_relay(config_text())
    phones = [f"+1555888{n:04d}" for n in range(11)]
    statuses = [Browser(service, client="198.51.100.7").post("/signin", {"phone": p})[0] for p in phones]
    assert statuses == [200] * 10 + [429]
    assert Browser(service, client="198.51.100.8").post("/signin", {"phone": phones[0]})[0] == 200


def test_no_code_or_token_appears_in_the_log(start_relay, fake_twilio):
    service = start_relay(config_text())
    browser = sign_in_by_code(service, fake_twilio)
    link = service.run("login-link", SERGIO).stdout.strip()
    log = service.log_path.read_text()
    token = browser.cookie.split("=", 1)[1]
    assert codes_texted(fake_twilio, SERGIO)[0] not in log and token not in log
    assert link.split("t=")[1] not in log


def test_login_link_signs_in_once_and_refuses_a_phone_on_no_line(start_relay, fake_twilio):
    service = start_relay(config_text())
    url = urllib.parse.urlsplit(service.run("login-link", SERGIO).stdout.strip())
    first, second = Browser(service), Browser(service)
    assert first.get(f"{url.path}?{url.query}")[0] == 303 and first.cookie
    assert second.get(f"{url.path}?{url.query}")[0] == 403 and second.cookie is None
    refused = service.run("login-link", "+15559990000")
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1


def test_a_session_outlives_a_restart_and_ends_at_sign_out(start_relay, fake_twilio):
    service = start_relay(config_text())
    browser = Browser(service)
    browser.sign_in_by_link(SERGIO)
    service.stop()
    service.start()
    csrf = browser.csrf()
    kept = browser.cookie
    status, _, _ = browser.post("/signout", {"csrf": csrf})
    assert status == 303
    browser.cookie = kept  # the old cookie no longer opens anything
    assert 'name="phone"' in browser.get("/")[1]


# -- forms that change something -------------------------------------------------


@pytest.mark.json_only  # the same on both stores: nothing here is stored differently
def test_a_post_without_the_sessions_token_or_from_another_site_is_refused_and_changes_nothing(
    start_relay, fake_twilio
):
    service = start_relay(config_text())
    conv_id = open_conversation(service, fake_twilio)
    browser = Browser(service)
    browser.sign_in_by_link(SERGIO)
    csrf = browser.csrf()
    assert browser.post(f"/c/{conv_id}/take", {})[0] == 403
    assert browser.post(f"/c/{conv_id}/take", {"csrf": "not-the-token"})[0] == 403
    assert browser.post(f"/c/{conv_id}/take", {"csrf": csrf}, Origin="https://evil.example")[0] == 403
    assert browser.post(f"/c/{conv_id}/take", {"csrf": csrf}, **{"Sec-Fetch-Site": "cross-site"})[0] == 403
    assert "open" in browser.get(f"/c/{conv_id}")[1] and service.events("acknowledged") == []


def test_take_on_the_console_acknowledges_logs_it_and_shows_in_the_timeline(start_relay, fake_twilio):
    service = start_relay(config_text(primary_wait="1h"))
    conv_id = open_conversation(service, fake_twilio)
    browser = Browser(service)
    browser.sign_in_by_link(SERGIO)
    status, page, _ = browser.post(f"/c/{conv_id}/take", {"csrf": browser.csrf()}, Origin="null")
    assert status == 200 and "is yours" in page and "take on the console by Sergio" in page
    (ack,) = service.events("acknowledged")
    assert (ack["contact"], ack["way"]) == ("Sergio", "console")
    assert [(e["contact"], e["action"]) for e in service.events("console_action")] == [("Sergio", "take")]


def test_close_ends_a_conversation_without_paging_anyone(start_relay, fake_twilio):
    service = start_relay(config_text(primary_wait="6s"))
    conv_id = open_conversation(service, fake_twilio)
    browser = Browser(service)
    browser.sign_in_by_link(BACKUP)
    status, page, _ = browser.post(f"/c/{conv_id}/close", {"csrf": browser.csrf()})
    assert status == 200 and "closed" in page
    # A text sent after the close reaches the backup later than the closed one would have.
    service.inbound(CUSTOMER.replace("1", "2", 1), "later text")
    wait_until(lambda: any("later text" in m["Body"] for m in fake_twilio.delivered(BACKUP)), timeout=15)
    assert not any("boat leaking" in m["Body"] for m in fake_twilio.delivered(BACKUP))
    assert not any("was taken by" in m["Body"] for m in fake_twilio.delivered(SERGIO))  # closed, not taken


@pytest.mark.json_only  # the same on both stores: nothing here is stored differently
def test_pass_on_the_console_pages_the_next_contact_at_once(start_relay, fake_twilio):
    service = start_relay(config_text())
    conv_id = open_conversation(service, fake_twilio)
    browser = Browser(service)
    browser.sign_in_by_link(SERGIO)
    status, page, _ = browser.post(f"/c/{conv_id}/pass", {"csrf": browser.csrf()})
    assert status == 200 and "passed on" in page
    wait_until(lambda: any("boat leaking" in m["Body"] for m in fake_twilio.delivered(BACKUP)))


@pytest.mark.json_only  # the same on both stores: nothing here is stored differently
def test_reply_on_a_two_way_line_texts_the_customer_from_the_lines_number(start_relay, fake_twilio):
    service = start_relay(config_text().replace('number = "', 'reply_to_sender = true\nnumber = "', 1))
    conv_id = open_conversation(service, fake_twilio)
    browser = Browser(service)
    browser.sign_in_by_link(SERGIO)
    csrf = browser.csrf()
    browser.post(f"/c/{conv_id}/take", {"csrf": csrf})
    browser.post(f"/c/{conv_id}/reply", {"csrf": csrf, "text": "on my way 🚤"})
    wait_until(lambda: any(m["Body"] == "on my way 🚤" for m in fake_twilio.delivered(CUSTOMER)))
    assert [m["From"] for m in fake_twilio.delivered(CUSTOMER) if m["Body"] == "on my way 🚤"] == [LINE]


@pytest.mark.json_only  # the same on both stores: nothing here is stored differently
def test_text_from_outside_is_escaped(start_relay, fake_twilio):
    service = start_relay(config_text())
    conv_id = open_conversation(service, fake_twilio, body="<script>alert(1)</script>")
    browser = Browser(service)
    browser.sign_in_by_link(SERGIO)
    for path in ("/", f"/c/{conv_id}"):
        page = browser.get(path)[1]
        assert "<script>" not in page and "&lt;script&gt;" in page


# -- history and schedule ---------------------------------------------------------


def test_history_lists_finished_conversations_with_time_to_acknowledge_and_a_csv(start_relay, fake_twilio):
    service = start_relay(config_text())
    conv_id = open_conversation(service, fake_twilio)
    service.inbound(SERGIO, "#1 got it")
    browser = Browser(service)
    browser.sign_in_by_link(SERGIO)
    status, page, _ = browser.get("/history")
    assert status == 200 and f'href="/c/{conv_id}"' in page and "Download CSV" in page and "90th percentile" in page
    assert f'href="/c/{conv_id}"' not in browser.get("/history?q=nothing+like+it")[1]
    assert f'href="/c/{conv_id}"' in browser.get("/history?q=LEAKING")[1]
    status, csv_text, response = browser.get("/history.csv")
    assert status == 200 and response.getheader("Content-Type").startswith("text/csv")
    header, row = csv_text.splitlines()[:2]
    assert header.startswith("arrived_utc,line,code,sender,status,taken_by,time_to_acknowledge_s")
    assert f",{CUSTOMER},acknowledged,Sergio," in row


def test_an_override_added_and_deleted_on_the_schedule_page(start_relay, fake_twilio):
    from test_rotations import ANA, local_now, rotation_config

    service = start_relay(rotation_config(local_now(-600), "1h"))
    browser = Browser(service)
    browser.sign_in_by_link(SERGIO)
    fields = {"csrf": browser.csrf("/schedule"), "rotation": "deck", "member": ANA, "end": local_now(1800)}
    status, page, _ = browser.post("/schedule/override", fields)
    assert status == 200 and "Ana is on call for deck until" in page
    listed = service.run("override", "--list").stdout
    oid = listed.split()[0]
    assert listed.startswith(f"{oid} deck: Ana")
    browser.post(f"/schedule/override/{oid}/delete", {"csrf": browser.csrf("/schedule")})
    assert "no overrides" in service.run("override", "--list").stdout
    assert [e["action"] for e in service.events("console_action")] == ["override", "override"]


@pytest.mark.json_only  # the same on both stores: nothing here is stored differently
def test_console_false_turns_the_page_off(start_relay, fake_twilio):
    service = start_relay(config_text(extra_relay="console = false"))
    assert Browser(service).get("/")[0] == 404


@pytest.mark.json_only  # the same on both stores: nothing here is stored differently
def test_the_sign_in_form_posts_only_to_this_relay(start_relay, fake_twilio):
    service = start_relay(config_text())
    assert relay.CONSOLE_HEADERS["Content-Security-Policy"].count("form-action 'self'") == 1
    assert Browser(service).post("/signin", {"phone": SERGIO}, Origin="https://evil.example")[0] == 403


# -- time: sessions and codes expire (in-process, with freezegun) ------------------


def wsgi_get(app, path: str, cookie: str | None = None) -> tuple[int, str, dict]:
    target = urllib.parse.urlsplit(path)
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": target.path, "QUERY_STRING": target.query}
    if cookie:
        environ["HTTP_COOKIE"] = cookie
    wsgiref.util.setup_testing_defaults(environ)
    answer = {}

    def start_response(status, headers, exc_info=None):
        answer["status"], answer["headers"] = int(status.split()[0]), dict(headers)

    text = b"".join(app(environ, start_response)).decode()
    return answer["status"], text, answer["headers"]


@pytest.mark.json_only  # the expiry is the console's; both stores keep the record's end
def test_a_session_ends_after_12_hours_unused_and_use_keeps_it(tmp_path):
    with freeze_time("2026-12-07 12:00:00") as clock:
        service = make_relay(tmp_path / "state")
        app = relay.make_app(service)
        url = urllib.parse.urlsplit(relay.login_link(service.store, "http://x", SERGIO, service.clock()))
        status, _, headers = wsgi_get(app, f"{url.path}?{url.query}")
        cookie = headers["Set-Cookie"].split(";")[0]
        clock.tick(11 * 3600)
        assert "Sign out" in wsgi_get(app, "/", cookie)[1]  # used: 12 hours from now again
        clock.tick(11 * 3600)
        assert "Sign out" in wsgi_get(app, "/", cookie)[1]
        clock.tick(12 * 3600 + 1)
        assert 'name="phone"' in wsgi_get(app, "/", cookie)[1]


@pytest.mark.json_only
def test_a_login_link_expires_after_10_minutes(tmp_path):
    with freeze_time("2026-12-07 12:00:00") as clock:
        service = make_relay(tmp_path / "state")
        app = relay.make_app(service)
        url = urllib.parse.urlsplit(relay.login_link(service.store, "http://x", SERGIO, service.clock()))
        clock.tick(601)
        assert wsgi_get(app, f"{url.path}?{url.query}")[0] == 403


def wsgi_post(app, path: str, fields: dict) -> tuple[int, str]:
    body = urllib.parse.urlencode(fields).encode()
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": path,
        "CONTENT_TYPE": "application/x-www-form-urlencoded",
        "CONTENT_LENGTH": str(len(body)),
    }
    wsgiref.util.setup_testing_defaults(environ)
    environ["wsgi.input"] = io.BytesIO(body)
    answer = {}

    def start_response(status, headers, exc_info=None):
        answer["status"] = int(status.split()[0])

    text = b"".join(app(environ, start_response)).decode()
    return answer["status"], text


@pytest.mark.json_only
def test_a_sign_in_code_expires_after_10_minutes(tmp_path):
    with freeze_time("2026-12-07 12:00:00") as clock:
        service = make_relay(tmp_path / "state")
        service.outbox.senders = RunAtOnce()
        app = relay.make_app(service)
        wsgi_post(app, "/signin", {"phone": SERGIO})
        code = re.search(r"code is (\d{6})", service.gateway.sent[-1][2])[1]
        clock.tick(601)
        assert wsgi_post(app, "/signin", {"phone": SERGIO, "code": code})[0] == 403


@pytest.mark.json_only  # the same on both stores: nothing here is stored differently
def test_behind_a_router_the_address_it_appended_last_is_counted(start_relay, fake_twilio):
    service = start_relay(config_text())
    # What the client put in X-Forwarded-For varies; the address the router appended last does not.
    clients = [f"10.9.8.{n}, 198.51.100.9" for n in range(11)]
    phones = [f"+1555777{n:04d}" for n in range(11)]
    pairs = zip(clients, phones, strict=True)
    statuses = [Browser(service, client=c).post("/signin", {"phone": p})[0] for c, p in pairs]
    assert statuses == [200] * 10 + [429]


@pytest.mark.json_only  # the same on both stores: nothing here is stored differently
def test_the_session_cookie_is_secure_when_the_public_url_is_https(start_relay, fake_twilio):
    service = start_relay(config_text(), env={"RELAY_PUBLIC_URL": "https://relay.example.com"})
    done = service.run("login-link", SERGIO)
    url = urllib.parse.urlsplit(done.stdout.strip())
    _, _, response = Browser(service).get(f"{url.path}?{url.query}")
    assert "secure" in response.getheader("Set-Cookie").lower()


@pytest.mark.json_only  # the console's own rule, whatever the store
def test_reply_is_refused_on_a_line_that_is_not_two_way(start_relay, fake_twilio):
    service = start_relay(config_text())
    conv_id = open_conversation(service, fake_twilio)
    browser = Browser(service)
    browser.sign_in_by_link(SERGIO)
    csrf = browser.csrf()
    browser.post(f"/c/{conv_id}/take", {"csrf": csrf})
    status, page, _ = browser.post(f"/c/{conv_id}/reply", {"csrf": csrf, "text": "on my way"})
    barrier_text = "barrier after the reply"
    service.inbound(OTHER_CUSTOMER, barrier_text)
    wait_until(lambda: any(barrier_text in m["Body"] for m in fake_twilio.delivered(SERGIO)))
    assert status == 200 and "nothing changed" in page and fake_twilio.delivered(CUSTOMER) == []


@pytest.mark.json_only  # the console's own rule, whatever the store
def test_a_contact_of_another_line_cannot_act_on_a_conversation(start_relay, fake_twilio):
    other_line = config_text().split("[[lines]]")[1].replace('"QDN"', '"Dock"').replace(LINE, "+16195550177")
    other_line = other_line.replace(SERGIO, "+16195550133").replace(BACKUP, "+16195550144")
    service = start_relay(config_text() + "\n[[lines]]" + other_line)
    conv_id = open_conversation(service, fake_twilio)
    browser = Browser(service)
    browser.sign_in_by_link("+16195550133")
    status, _, _ = browser.post(f"/c/{conv_id}/take", {"csrf": browser.csrf()})
    assert status == 403 and "QDN #1" in service.run("status").stdout  # still open


@pytest.mark.json_only  # the console's own rule, whatever the store
def test_the_csv_keeps_a_text_from_being_read_as_a_formula(tmp_path):
    service = make_relay(tmp_path / "state")
    service.outbox.senders = RunAtOnce()
    service.receive(relay.read_inbound({"MessageSid": msid(1), "From": CUSTOMER, "To": LINE, "Body": "=1+1"}))
    service.receive(relay.read_inbound({"MessageSid": msid(2), "From": SERGIO, "To": LINE, "Body": "#1 ok"}))
    app = relay.make_app(service)
    url = urllib.parse.urlsplit(relay.login_link(service.store, "http://x", SERGIO, service.clock()))
    cookie = wsgi_get(app, f"{url.path}?{url.query}")[2]["Set-Cookie"].split(";")[0]
    row = wsgi_get(app, "/history.csv", cookie)[1].splitlines()[1]
    assert ",'=1+1" in row


@pytest.mark.json_only  # the console's own figure, whatever the store
def test_the_overview_counts_the_texts_held_by_caps(tmp_path):
    config = relay.Config(lines=(relay.Line("QDN", LINE, (relay.Contact("Sergio", SERGIO, 60),)),), sender_hourly_cap=1)
    service = make_relay(tmp_path / "state", config)
    service.outbox.senders = RunAtOnce()
    for n in range(3):  # the first goes out; the next two wait for the sender cap
        service.receive(relay.read_inbound({"MessageSid": msid(n), "From": CUSTOMER, "To": LINE, "Body": f"t{n}"}))
    app = relay.make_app(service)
    url = urllib.parse.urlsplit(relay.login_link(service.store, "http://x", SERGIO, service.clock()))
    cookie = wsgi_get(app, f"{url.path}?{url.query}")[2]["Set-Cookie"].split(";")[0]
    assert "<dt>texts held by caps</dt><dd>2</dd>" in wsgi_get(app, "/", cookie)[1]


@pytest.mark.json_only  # the page's own, whatever the store
def test_the_overview_refreshes_by_itself_at_least_every_15_seconds(tmp_path):
    service = make_relay(tmp_path / "state")
    app = relay.make_app(service)
    url = urllib.parse.urlsplit(relay.login_link(service.store, "http://x", SERGIO, service.clock()))
    cookie = wsgi_get(app, f"{url.path}?{url.query}")[2]["Set-Cookie"].split(";")[0]
    every = re.search(r'<meta http-equiv="refresh" content="(\d+)">', wsgi_get(app, "/", cookie)[1])
    assert every and 0 < int(every[1]) <= 15
