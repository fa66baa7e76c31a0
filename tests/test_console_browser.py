"""The console in a real browser (Debian's Chromium), at a phone's width: sign in, act, sign out."""

import re
import shutil

import pytest
from conftest import BACKUP, CUSTOMER, SERGIO, config_text, wait_until
from playwright.sync_api import sync_playwright

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PHONE_WIDTH = 390
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
