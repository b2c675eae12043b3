"""Signing in and out of the page, in Chromium, against the real service with `auth: users`
(started as `RAY_CHAT_AUTH=users make serve` starts it): a key asked for in the page's own
dialog, kept across a reload, forgotten on sign-out; each user sees only their own sidebar; a
limit's 429 said in words."""

from __future__ import annotations

import pytest
from playwright.sync_api import Browser, Page, expect

from loadtests.service import free_port, running_service
from tests.browser.pages import DESKTOP, screenshot, send, set_parameters, sign_in, wait_for_answer
from tests.support import users_cli

pytestmark = pytest.mark.slow

TINY = "tiny-random"
MODELS = [{"name": TINY, "source": {"kind": "tiny_random"}, "num_cpus": 0.2, "torch_threads": 1}]
QUOTAS = {"users": {"bob": {"requests_per_minute": 1}}}


@pytest.fixture(scope="module")
def service():
    with running_service(MODELS, free_port(), app_args={"quotas": QUOTAS}, env={"RAY_CHAT_AUTH": "users"}) as running:
        yield running


def fresh_page(browser: Browser, url: str) -> Page:
    page = browser.new_context(viewport=DESKTOP).new_page()
    page.page_errors = []
    page.on("pageerror", lambda error: page.page_errors.append(str(error)))
    page.goto(url)
    return page


def ready(page: Page) -> None:
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    expect(page.get_by_test_id("model-state")).to_have_attribute("data-state", "ready")


def test_sign_in_chat_reload_sign_out_and_the_next_user_sees_only_their_own(browser, service):
    alice, bob = users_cli(service.database, "add", "alice"), users_cli(service.database, "add", "bob")
    page = fresh_page(browser, service.url)
    expect(page.get_by_test_id("sign-in-dialog")).to_be_visible()
    screenshot(page, "sign-in")
    sign_in(page, "rc-not-a-key", accepted=False)
    sign_in(page, alice, rejected=True)  # asked again, saying why
    ready(page)
    expect(page.get_by_test_id("account-name")).to_have_text("Signed in as alice")
    assert page.evaluate("localStorage.getItem('ray-chat.apiKey')") == alice

    set_parameters(page, sample_len=4)
    send(page, "alice's question")
    wait_for_answer(page)
    titles = page.get_by_test_id("conversation-title")
    expect(titles).to_have_text(["alice's question"])

    page.reload()  # still signed in: no dialog, the same sidebar
    ready(page)
    expect(page.get_by_test_id("sign-in-dialog")).to_be_hidden()
    expect(page.get_by_test_id("account-name")).to_have_text("Signed in as alice")
    expect(titles).to_have_text(["alice's question"])
    screenshot(page, "signed-in")

    page.get_by_test_id("sign-out").click()
    sign_in(page, bob)  # the page forgot alice's key and asks again
    ready(page)
    assert page.evaluate("localStorage.getItem('ray-chat.apiKey')") == bob
    expect(page.get_by_test_id("account-name")).to_have_text("Signed in as bob")
    expect(titles).to_have_count(0)
    expect(page.locator("#conversation-empty")).to_be_visible()
    expect(page.get_by_test_id("message")).to_have_count(0)

    # bob may start one generation a minute: the second is refused, and the page says which limit.
    set_parameters(page, sample_len=4)
    send(page, "bob's first")
    wait_for_answer(page)
    send(page, "bob's second")
    banner = page.get_by_test_id("error-banner")
    expect(banner).to_be_visible()
    expect(banner).to_contain_text("Rate limit reached: requests per minute, at most 1 per user (`requests_per_minute`)")
    screenshot(page, "rate-limited")
    expect(page.get_by_test_id("prompt-input")).to_have_value("bob's second")  # kept, to send later
    expect(titles).to_have_text(["bob's first"])
    assert page.page_errors == []
    page.context.close()
