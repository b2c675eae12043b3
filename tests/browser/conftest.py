"""The browser the page tests drive: the system's Chromium, one per test module."""

from __future__ import annotations

import pytest
from playwright.sync_api import Browser, sync_playwright

from tests.browser.pages import CHROMIUM, CHROMIUM_ARGS


@pytest.fixture(scope="module")
def browser() -> Browser:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()
