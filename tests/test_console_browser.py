"""The console in a real browser (Debian's Chromium), at a phone's width: sign in, act, sign out."""

import os
import re
import shutil

import pytest
from conftest import BACKUP, CUSTOMER, OTHER_CUSTOMER, SERGIO, config_text, wait_until
from playwright.sync_api import sync_playwright

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PHONE_WIDTH = 390
THIRD_CUSTOMER = "+15551230003"
LONG_WORD = "https://example.com/" + "a" * 300  # an unbroken link longer than the screen is wide


@pytest.fixture
def phone_browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": PHONE_WIDTH, "height": 844}, java_script_enabled=False)
        page = context.new_page()
        page.set_default_timeout(10_000)
        yield page
        browser.close()


def fits_the_screen(page) -> bool:
    width = page.evaluate("() => document.documentElement.scrollWidth")
    return width <= PHONE_WIDTH


def test_a_contact_signs_in_takes_a_text_and_signs_out_on_a_phone_sized_screen(start_relay, fake_twilio, phone_browser):
    service = start_relay(config_text(primary_wait="1h"))
    service.inbound(CUSTOMER, f"the boat is leaking, see {LONG_WORD}")
    wait_until(lambda: fake_twilio.delivered(SERGIO))
    page = phone_browser

    page.goto(service.url + "/")
    page.fill("input[name=phone]", SERGIO)
    page.click("text=Text me a code")
    wait_until(lambda: any("sign-in code" in m["Body"] for m in fake_twilio.delivered(SERGIO)))
    code = re.search(r"code is (\d{6})", fake_twilio.delivered(SERGIO)[-1]["Body"])[1]
    page.fill("input[name=code]", code)
    page.click("button:text('Sign in')")

    assert page.is_visible("text=Sign out") and page.is_visible("text=#1")
    assert fits_the_screen(page)
    page.click("text=#1")
    assert page.is_visible("button:text('Take')") and fits_the_screen(page)
    page.click("button:text('Take')")
    assert page.is_visible("text=take on the console by Sergio")
    assert [e["way"] for e in service.events("acknowledged")] == ["console"]

    page.click("nav >> text=History")
    assert page.is_visible("text=Download CSV") and page.is_visible("text=#1") and fits_the_screen(page)
    page.click("nav >> text=Schedule")
    assert page.is_visible("h1:text('Schedule')") and fits_the_screen(page)

    page.click("button:text('Sign out')")
    assert page.is_visible("input[name=phone]")
    assert not any("leaking" in m["Body"] for m in fake_twilio.delivered(BACKUP))


def sign_in_by_link(service, page, phone: str = SERGIO) -> None:
    done = service.run("login-link", phone)
    assert done.returncode == 0, done.stderr
    page.goto(done.stdout.strip())
    assert page.is_visible("text=Sign out")


def test_the_overview_shows_open_taken_and_unanswered_texts_and_a_timeline_shows_a_failed_delivery(
    start_relay, fake_twilio, phone_browser
):
    service = start_relay(config_text(primary_wait="1h"))
    service.inbound(CUSTOMER, "<script>alert(1)</script> no one will take this")
    wait_until(lambda: fake_twilio.delivered(SERGIO))
    service.inbound(SERGIO, "#1 pass")
    wait_until(lambda: fake_twilio.delivered(BACKUP))
    service.inbound(BACKUP, "#1 pass")  # the last contact passes: unanswered
    service.inbound(OTHER_CUSTOMER, "kayaks at nine?")
    wait_until(lambda: any("kayaks" in m["Body"] for m in fake_twilio.delivered(SERGIO)))
    service.inbound(SERGIO, "#2 yes")
    fake_twilio.faults.append((400, 21211, {}))  # the next page fails for good
    service.inbound(THIRD_CUSTOMER, "engine will not start")
    wait_until(lambda: any("engine" in m["Body"] for m in fake_twilio.delivered(BACKUP)))
    page = phone_browser
    sign_in_by_link(service, page)

    overview = page.inner_text("main")
    assert "<script>alert(1)</script> no one will take this" in overview  # shown as text, not run
    assert "unanswered" in overview and "taken by Sergio" in overview and "engine will not start" in overview
    assert fits_the_screen(page)
    shoot(page, "console-overview.png")
    page.click("text=#3")
    timeline = page.inner_text("main")
    assert "failed" in timeline and "21211" in timeline and "page to Backup (step 2)" in timeline
    assert fits_the_screen(page)
    shoot(page, "console-conversation.png")


def test_history_search_csv_a_restart_an_override_and_sign_out_in_the_browser(start_relay, fake_twilio, phone_browser):
    from test_rotations import local_now, rotation_config

    service = start_relay(rotation_config(local_now(-600), "1h"))
    service.inbound(CUSTOMER, "kayak booking for four")
    wait_until(lambda: fake_twilio.delivered(SERGIO))
    service.inbound(SERGIO, "#1 yes")
    page = phone_browser
    sign_in_by_link(service, page)

    page.click("nav >> text=History")
    page.fill("input[name=q]", "kayak")
    page.click("button:text('Search')")
    assert page.is_visible("text=#1") and fits_the_screen(page)
    with page.expect_download() as download:
        page.click("text=Download CSV")
    rows = open(download.value.path(), encoding="utf-8").read().splitlines()
    assert len(rows) == 2 and ",acknowledged,Sergio," in rows[1]
    page.fill("input[name=q]", "nothing like it")
    page.click("button:text('Search')")
    assert not page.is_visible("text=#1")

    service.stop()
    service.start()
    page.click("nav >> text=Schedule")  # the session outlived the restart
    page.select_option("select[name=member]", label="Ana")
    page.fill("input[name=end]", local_now(1800).replace(" ", "T"))
    page.click("button:text('Add override')")
    assert page.is_visible("text=Ana is on call for deck until")
    assert "rotation deck: Ana" in service.run("oncall").stdout

    page.click("button:text('Sign out')")
    assert page.is_visible("input[name=phone]")
    page.goto(service.url + "/history")
    assert page.is_visible("input[name=phone]")


def shoot(page, name: str) -> None:
    """With RELAY_SCREENSHOTS set to a folder, keep a screenshot there (the README's come from here)."""
    if folder := os.environ.get("RELAY_SCREENSHOTS"):
        page.screenshot(path=os.path.join(folder, name), full_page=True)
