"""What the browser tests do with the chat page: open it, send, wait for answers, sign in,
take screenshots (into test-artifacts/screenshots/)."""

from __future__ import annotations

import re
from pathlib import Path

from playwright.sync_api import Browser, Page, expect

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
ANSWER_TIMEOUT_MS = 180_000  # SmolLM2 on a busy 2-core machine
STREAMING = re.compile(r"\bstreaming\b")


def open_page(browser: Browser, url: str, viewport=DESKTOP, color_scheme="light") -> Page:
    context = browser.new_context(viewport=viewport, color_scheme=color_scheme)
    page = context.new_page()
    page.page_errors = []
    page.on("pageerror", lambda error: page.page_errors.append(str(error)))
    page.goto(url)
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    expect(page.get_by_test_id("model-state")).to_have_attribute("data-state", "ready")
    return page


def current_id(page: Page) -> int:
    return int(page.evaluate("location.hash").removeprefix("#/c/"))


def new_conversation(page: Page) -> None:
    if page.get_by_test_id("open-sidebar").is_visible():  # phones: the list is a drawer
        page.get_by_test_id("open-sidebar").click()
    page.get_by_test_id("new-conversation").click()
    expect(page.get_by_test_id("welcome")).to_be_visible()


def set_parameters(page: Page, **values) -> None:
    if page.get_by_test_id("params-panel").is_hidden():
        page.get_by_test_id("params-toggle").click()
    for name, value in values.items():
        page.get_by_test_id(f"param-{name}").fill("" if value is None else str(value))
    page.get_by_test_id("params-toggle").click()
    expect(page.get_by_test_id("params-panel")).to_be_hidden()


def send(page: Page, prompt: str) -> None:
    page.get_by_test_id("prompt-input").fill(prompt)
    page.get_by_test_id("prompt-input").press("Enter")


def wait_for_answer(page: Page):
    """The last assistant message, once it has finished streaming."""
    answer = page.locator('[data-testid="message"][data-role="assistant"]').last
    expect(answer).not_to_have_class(STREAMING, timeout=ANSWER_TIMEOUT_MS)
    expect(page.get_by_test_id("send-button")).to_be_visible()
    return answer


def sign_in(page: Page, key: str, rejected: bool = False, accepted: bool = True) -> None:
    """Answers the page's sign-in dialog with `key` (`rejected`: the dialog says the last key
    was not accepted; `accepted`: this one is, and the dialog closes)."""
    dialog, error = page.get_by_test_id("sign-in-dialog"), page.get_by_test_id("sign-in-error")
    expect(dialog).to_be_visible()
    if rejected:
        expect(error).to_be_visible()
    else:
        expect(error).to_be_hidden()
    page.get_by_test_id("sign-in-key").fill(key)
    page.get_by_test_id("sign-in-submit").click()
    if accepted:
        expect(dialog).to_be_hidden()


def screenshot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))
