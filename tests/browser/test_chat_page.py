"""The chat page in Chromium against the real app (`serve_app`): streaming, history restored
after a reload, model and parameters reaching the stored history, stop, rename, export,
delete, errors with retry, and that nothing in a prompt or an answer can run script.

Screenshots (desktop and phone, light and dark) go to test-artifacts/screenshots/."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect

from tests.browser.pages import (
    ANSWER_TIMEOUT_MS,
    DESKTOP,
    PHONE,
    STREAMING,
    current_id,
    new_conversation,
    open_page,
    screenshot,
    send,
    set_parameters,
    sign_in,
    wait_for_answer,
)

pytestmark = pytest.mark.slow

SMOL = "SmolLM2-135M-Instruct"
TINY = "tiny-random"
NARROW = "tiny-narrow"  # the third test model (tests/conftest.py)
INJECTION = "<img src=x onerror=window.__pwned=1> and <script>window.__pwned=1</script> end"


@pytest.fixture
def page(browser, serve_app):
    page = open_page(browser, serve_app.url)
    yield page
    errors = page.page_errors
    page.context.close()
    assert errors == [], f"the page raised: {errors}"


def stored(serve_app, conversation_id: int) -> dict:
    response = httpx.get(f"{serve_app.url}/conversations/{conversation_id}", timeout=30)
    response.raise_for_status()
    return response.json()


def end_answer_elsewhere(serve_app, conversation_id: int) -> None:
    """Stops the streaming answer through the API, as another tab would: the page sees its end
    without any click that could close what the test has open."""
    response = httpx.post(f"{serve_app.url}/conversations/{conversation_id}/stop", timeout=30)
    response.raise_for_status()
    assert response.json()["stopped"], "the answer had already ended: the test proves nothing"


def test_answer_streams_in_and_conversation_survives_reload(page, serve_app):
    new_conversation(page)
    # Long enough to be seen growing: 48 tokens once streamed in under two 150 ms samples.
    set_parameters(page, sample_len=128, temperature=0, seed=None)
    # Shift+Enter is a new line, not a send.
    prompt_input = page.get_by_test_id("prompt-input")
    prompt_input.fill("Explain in two sentences what a GPU is.")
    prompt_input.press("Shift+Enter")
    expect(prompt_input).to_have_value("Explain in two sentences what a GPU is.\n")
    expect(page.locator('[data-testid="message"]')).to_have_count(0)
    prompt_input.press("Enter")

    answer = page.locator('[data-testid="message"][data-role="assistant"]').last
    expect(page.get_by_test_id("stop-button")).to_be_visible()
    lengths = []
    deadline = time.monotonic() + ANSWER_TIMEOUT_MS / 1000
    while time.monotonic() < deadline:
        is_streaming = "streaming" in (answer.get_attribute("class") or "")
        lengths.append(len(answer.get_by_test_id("message-content").inner_text()))
        if not is_streaming:
            break
        page.wait_for_timeout(50)
    growing = sorted(set(length for length in lengths if length > 0))
    assert len(growing) >= 3, f"the answer did not grow over time: {lengths}"
    wait_for_answer(page)
    answer_text = answer.get_by_test_id("message-content").inner_text()
    assert answer_text.strip()

    conversation_id = current_id(page)
    conversation = stored(serve_app, conversation_id)
    assert [m["role"] for m in conversation["messages"]] == ["user", "assistant"]
    assert conversation["messages"][0]["content"] == "Explain in two sentences what a GPU is."
    assert conversation["messages"][1]["status"] == "complete"
    item = page.locator(f'[data-testid="conversation-item"][data-id="{conversation_id}"]')
    expect(item.get_by_test_id("conversation-title")).to_contain_text("Explain in two sentences")
    expect(page.get_by_test_id("chat-title")).to_contain_text("Explain in two sentences")

    page.reload()
    expect(page.locator('[data-testid="message"]')).to_have_count(2)
    expect(page.locator('[data-testid="message"][data-role="user"] [data-testid="message-content"]')).to_have_text(
        "Explain in two sentences what a GPU is."
    )
    restored = page.locator('[data-testid="message"][data-role="assistant"] [data-testid="message-content"]')
    assert restored.inner_text() == answer_text
    expect(item).to_have_class("conversation active")


def test_model_and_parameters_reach_the_stored_history(page, serve_app):
    new_conversation(page)
    page.get_by_test_id("model-select").select_option(TINY)
    parameters = {"sample_len": 12, "temperature": 0.3, "top_p": 0.8, "repeat_penalty": 1.3, "repeat_last_n": 32, "seed": 7}
    set_parameters(page, **parameters)
    send(page, "hello tiny model")
    answer = wait_for_answer(page)
    expect(answer.locator(".message-author")).to_have_text(TINY)

    (_, stored_answer) = stored(serve_app, current_id(page))["messages"]
    assert stored_answer["model"] == TINY
    assert stored_answer["parameters"] == {**parameters, "model": TINY, "revision": "main"}

    # Both the model and the parameters are remembered across visits, until reset.
    page.reload()
    expect(page.get_by_test_id("model-select")).to_have_value(TINY)
    page.get_by_test_id("params-toggle").click()
    expect(page.get_by_test_id("param-top_p")).to_have_value("0.8")
    expect(page.get_by_test_id("param-seed")).to_have_value("7")
    page.get_by_test_id("params-reset").click()
    expect(page.get_by_test_id("param-sample_len")).to_have_value("256")
    expect(page.get_by_test_id("param-temperature")).to_have_value("0.7")
    expect(page.get_by_test_id("param-seed")).to_have_value("")
    # An out-of-range value is flagged and blocks sending instead of reaching the server as a 422.
    page.get_by_test_id("param-temperature").fill("9")
    expect(page.get_by_test_id("params-error")).to_contain_text("Temperature")
    send(page, "this must not be sent")
    expect(page.get_by_test_id("error-message")).to_contain_text("Fix the parameters")
    expect(page.get_by_test_id("prompt-input")).to_have_value("this must not be sent")
    assert len(stored(serve_app, current_id(page))["messages"]) == 2


def test_stop_keeps_the_partial_answer(page, serve_app):
    new_conversation(page)
    set_parameters(page, sample_len=2000, temperature=0.8)
    send(page, "Write a very long story about a lighthouse keeper.")
    answer = page.locator('[data-testid="message"][data-role="assistant"]').last
    expect(answer.get_by_test_id("message-content")).not_to_be_empty(timeout=ANSWER_TIMEOUT_MS)
    page.get_by_test_id("stop-button").click()

    expect(answer).to_have_attribute("data-status", "stopped")
    expect(answer.get_by_test_id("message-status")).to_have_text("Stopped")
    screenshot(page, "desktop-light-stopped")
    expect(page.get_by_test_id("send-button")).to_be_visible()
    conversation_id = current_id(page)
    deadline = time.monotonic() + 30
    while (messages := stored(serve_app, conversation_id)["messages"])[-1].get("status") != "stopped":
        assert time.monotonic() < deadline, f"the server did not store a stopped answer: {messages}"
        time.sleep(0.5)
    assert messages[-1]["role"] == "assistant" and messages[-1]["content"].strip()
    assert len(messages[-1]["content"]) < 2000 * 8

    page.reload()
    expect(page.locator('[data-testid="message"][data-role="assistant"]').last).to_have_attribute("data-status", "stopped")


def test_rename_export_and_delete_with_confirmation(page, serve_app):
    page.get_by_test_id("model-select").select_option(TINY)
    new_conversation(page)
    set_parameters(page, sample_len=4)
    send(page, "a conversation to rename")
    wait_for_answer(page)
    conversation_id = current_id(page)
    item = page.locator(f'[data-testid="conversation-item"][data-id="{conversation_id}"]')
    # Newest first.
    expect(page.get_by_test_id("conversation-item").first).to_have_attribute("data-id", str(conversation_id))

    item.get_by_test_id("rename-conversation").click()
    page.get_by_test_id("rename-input").fill("Renamed by the browser test")
    page.get_by_test_id("rename-input").press("Enter")
    expect(item.get_by_test_id("conversation-title")).to_have_text("Renamed by the browser test")
    assert stored(serve_app, conversation_id)["title"] == "Renamed by the browser test"

    item.get_by_test_id("export-conversation").click()
    with page.expect_download() as download_info:
        item.get_by_test_id("export-json").click()
    download = download_info.value
    assert download.suggested_filename == f"conversation-{conversation_id}.json"
    exported = json.loads(Path(download.path()).read_text())
    assert exported["title"] == "Renamed by the browser test"
    assert [m["role"] for m in exported["messages"]] == ["user", "assistant"]
    markdown_href = item.get_by_test_id("export-markdown").get_attribute("href")
    assert markdown_href == f"/conversations/{conversation_id}/export?format=markdown"

    # Cancelling the confirmation keeps the conversation; confirming deletes it.
    item.get_by_test_id("delete-conversation").click()
    expect(page.get_by_test_id("confirm-delete-dialog")).to_be_visible()
    expect(page.get_by_test_id("confirm-delete-dialog")).to_contain_text("Renamed by the browser test")
    page.get_by_test_id("cancel-delete").click()
    expect(item).to_be_visible()
    assert stored(serve_app, conversation_id)["id"] == conversation_id

    item.get_by_test_id("delete-conversation").click()
    page.get_by_test_id("confirm-delete").click()
    expect(item).to_have_count(0)
    expect(page.get_by_test_id("welcome")).to_be_visible()
    assert httpx.get(f"{serve_app.url}/conversations/{conversation_id}").status_code == 404


def test_rename_typed_while_an_answer_streams_survives_its_end(page, serve_app):
    """The answer's end re-renders the sidebar; the title being typed must stay, focused."""
    new_conversation(page)
    set_parameters(page, sample_len=4, temperature=0, seed=None)
    send(page, "Hi")
    wait_for_answer(page)
    conversation_id = current_id(page)
    item = page.locator(f'[data-testid="conversation-item"][data-id="{conversation_id}"]')

    # Greedy, this prompt runs to the length asked (2,000 tokens) rather than to an early EOS.
    set_parameters(page, sample_len=2000)
    send(page, "Write a very long story about a lighthouse keeper.")
    expect(page.get_by_test_id("stop-button")).to_be_visible()
    item.get_by_test_id("rename-conversation").click()
    page.get_by_test_id("rename-input").fill("Typed while streaming")
    # The answer is ended from outside the page, so its end (and its re-render) surely comes
    # after the typing, however fast the model is.
    end_answer_elsewhere(serve_app, conversation_id)
    wait_for_answer(page)

    rename_input = page.get_by_test_id("rename-input")
    expect(rename_input).to_have_value("Typed while streaming")
    expect(rename_input).to_be_focused()
    rename_input.type(", then finished")
    rename_input.press("Enter")
    expect(item.get_by_test_id("conversation-title")).to_have_text("Typed while streaming, then finished")
    assert stored(serve_app, conversation_id)["title"] == "Typed while streaming, then finished"


def test_an_open_export_menu_stays_open_when_an_answer_ends(page, serve_app):
    new_conversation(page)
    # Greedy, this prompt runs to the length asked (2,000 tokens) rather than to an early EOS.
    set_parameters(page, sample_len=2000, temperature=0, seed=None)
    send(page, "Write a very long story about a lighthouse keeper.")
    item = page.locator('[data-testid="conversation-item"].active')
    # The title arrives with the first text (one re-render); the answer's end re-renders again.
    expect(item.get_by_test_id("conversation-title")).to_have_text("Write a very long story about a lighthouse keeper.")
    item.get_by_test_id("export-conversation").click()
    expect(item.get_by_test_id("export-json")).to_be_visible()
    end_answer_elsewhere(serve_app, current_id(page))
    wait_for_answer(page)
    expect(item.get_by_test_id("export-json")).to_be_visible()


def assert_nothing_ran(page: Page) -> None:
    assert page.evaluate("typeof window.__pwned") == "undefined"
    message_list = page.get_by_test_id("message-list")
    assert message_list.locator("img, script, iframe, svg image").count() == 0
    assert message_list.locator("[onerror], [onload], a[href^='javascript']").count() == 0


def test_html_in_prompts_and_answers_stays_inert(page, serve_app):
    page.get_by_test_id("model-select").select_option(TINY)
    new_conversation(page)
    set_parameters(page, sample_len=4)
    send(page, INJECTION)
    wait_for_answer(page)
    prompt = page.locator('[data-testid="message"][data-role="user"] [data-testid="message-content"]')
    expect(prompt).to_have_text(INJECTION)
    assert_nothing_ran(page)
    page.reload()
    expect(prompt).to_have_text(INJECTION)
    assert_nothing_ran(page)

    # A test-controlled answer: raw HTML and dangerous Markdown from the "model".
    hostile_answer = (
        "Here is **bold** and a list:\n\n- one\n- two\n\n"
        "<img src=x onerror=window.__pwned=1>\n<script>window.__pwned=1</script>\n"
        '<a href="javascript:window.__pwned=1">click</a> [also](javascript:window.__pwned=1) '
        "![pixel](http://example.invalid/p.png)\n\n```python\nprint('<b>hi</b>')\n```\n"
    )
    page.route(
        "**/conversations/*/generate",
        lambda route: route.fulfill(status=200, content_type="text/plain; charset=utf-8", body=hostile_answer),
    )
    send(page, "answer with some HTML please")
    answer = wait_for_answer(page)
    content = answer.get_by_test_id("message-content")
    expect(content.locator("strong")).to_have_text("bold")
    expect(content.locator("li")).to_have_count(2)
    expect(content).to_contain_text("<img src=x onerror=window.__pwned=1>")
    expect(content).to_contain_text("<script>window.__pwned=1</script>")
    expect(content.locator(".code-block pre")).to_have_text("print('<b>hi</b>')")
    assert_nothing_ran(page)

    # Copy gives the answer's Markdown source, not the rendered text.
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    answer.get_by_test_id("copy-message").click()
    expect(answer.get_by_test_id("copy-message")).to_contain_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == hostile_answer
    page.unroute("**/conversations/*/generate")


def test_a_conversation_with_tool_turns_shows_the_calls_and_the_results(page, serve_app):
    """A chat with tools stored through /v1 (`conversation_id`), then opened in the page."""
    conversation_id = httpx.get(f"{serve_app.url}/conversations/start", timeout=30).json()
    weather = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": weather}}]
    ask = {"model": SMOL, "tools": tools, "temperature": 0, "max_tokens": 48, "conversation_id": conversation_id}
    v1 = f"{serve_app.url}/v1/chat/completions"
    question = [{"role": "user", "content": "What is the weather in Oslo?"}]
    called = httpx.post(v1, json={**ask, "messages": question, "tool_choice": "required"}, timeout=120).json()
    [call, *_] = called["choices"][0]["message"]["tool_calls"]
    result = [{"role": "tool", "tool_call_id": call["id"], "content": "Snow, -3 C."}]
    httpx.post(v1, json={**ask, "messages": result}, timeout=120).raise_for_status()

    page.goto(f"{serve_app.url}/#/c/{conversation_id}")
    page.reload()  # the sidebar lists it too
    messages = page.get_by_test_id("message")
    expect(messages).to_have_count(4)
    expect(messages.nth(1).locator(".message-call").first).to_have_text(
        f"{call['function']['name']}({call['function']['arguments']})"
    )
    expect(messages.nth(2).locator(".message-author")).to_have_text("Tool result")
    expect(messages.nth(2).get_by_test_id("message-content")).to_have_text("Snow, -3 C.")
    screenshot(page, "desktop-light-tool-turns")


def test_errors_are_explained_and_retry_works(page, serve_app):
    page.get_by_test_id("model-select").select_option(TINY)
    new_conversation(page)
    set_parameters(page, sample_len=4)

    page.route(
        "**/conversations/*/generate",
        lambda route: route.fulfill(
            status=503,
            headers={"Retry-After": "5"},
            content_type="application/json",
            body=json.dumps({"detail": "the model is overloaded"}),
        ),
    )
    send(page, "first try is refused")
    expect(page.get_by_test_id("error-banner")).to_be_visible()
    expect(page.get_by_test_id("error-message")).to_contain_text("The model is overloaded")
    expect(page.get_by_test_id("error-message")).to_contain_text("Retry in 5 s")
    expect(page.get_by_test_id("prompt-input")).to_have_value("first try is refused")
    screenshot(page, "desktop-light-error")
    expect(page.locator('[data-testid="message"]')).to_have_count(0)

    page.unroute("**/conversations/*/generate")
    page.route("**/conversations/*/generate", lambda route: route.abort("internetdisconnected"))
    page.get_by_test_id("retry-button").click()
    expect(page.get_by_test_id("error-message")).to_contain_text("Can't reach the server")

    page.unroute("**/conversations/*/generate")
    page.get_by_test_id("retry-button").click()
    wait_for_answer(page)
    expect(page.get_by_test_id("error-banner")).to_be_hidden()
    messages = stored(serve_app, current_id(page))["messages"]
    assert [(m["role"], m["status"]) for m in messages] == [("user", "complete"), ("assistant", "complete")]
    assert messages[0]["content"] == "first try is refused"

    # Regenerate answers the last prompt again; the new answer replaces the old one.
    page.locator('[data-testid="message"][data-role="assistant"]').last.get_by_test_id("regenerate").click()
    wait_for_answer(page)
    expect(page.locator('[data-testid="message"]')).to_have_count(2)
    regenerated = stored(serve_app, current_id(page))["messages"]
    assert [(m["role"], m["status"]) for m in regenerated] == [("user", "complete"), ("assistant", "complete")]
    assert regenerated[1]["created_at"] > messages[1]["created_at"]


def test_model_states_come_from_readyz(browser, serve_app):
    context = browser.new_context(viewport=DESKTOP)
    page = context.new_page()
    states = {"detail": "models not ready", "models": {SMOL: "loading", TINY: "failed"}}
    page.route("**/readyz", lambda route: route.fulfill(status=503, content_type="application/json", body=json.dumps(states)))
    page.goto(serve_app.url)
    expect(page.get_by_test_id("model-state")).to_have_attribute("data-state", "loading")
    expect(page.get_by_test_id("model-state")).to_contain_text("loading")
    expect(page.get_by_test_id("model-select").locator("option")).to_have_text([f"{SMOL} (loading)", f"{TINY} (failed)", NARROW])
    send(page, "are you there?")
    expect(page.get_by_test_id("error-message")).to_contain_text(f"{SMOL} is still loading")
    expect(page.get_by_test_id("prompt-input")).to_have_value("are you there?")

    page.unroute("**/readyz")  # the page polls every few seconds while a model is not ready
    expect(page.get_by_test_id("model-state")).to_have_attribute("data-state", "ready", timeout=15_000)
    expect(page.get_by_test_id("model-select").locator("option")).to_have_text([SMOL, TINY, NARROW])
    context.close()


UNLABELLED_CONTROLS = """() => [...document.querySelectorAll("button, input, select, textarea, summary, a[href]")]
    .filter((el) => el.getClientRects().length > 0)
    .filter((el) => !(el.getAttribute("aria-label") || (el.id && document.querySelector(`label[for="${el.id}"]`))
                      || el.textContent.trim()))
    .map((el) => el.outerHTML.slice(0, 80))"""


def test_controls_are_labelled_and_work_from_the_keyboard(page, serve_app):
    page.get_by_test_id("params-toggle").click()
    page.get_by_test_id("model-select").select_option(TINY)
    set_parameters(page, sample_len=4)
    send(page, "labelled?")
    wait_for_answer(page)
    page.get_by_test_id("params-toggle").click()
    assert page.evaluate(UNLABELLED_CONTROLS) == []

    # Escape closes the parameters and gives focus back to their button; Enter opens them again.
    page.keyboard.press("Escape")
    expect(page.get_by_test_id("params-panel")).to_be_hidden()
    expect(page.get_by_test_id("params-toggle")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.get_by_test_id("params-panel")).to_be_visible()
    expect(page.get_by_test_id("param-sample_len")).to_be_focused()
    page.keyboard.press("Escape")
    # The conversation's own actions are reachable with Tab from its link.
    conversation = page.locator(f'[data-testid="conversation-item"][data-id="{current_id(page)}"]')
    conversation.get_by_test_id("conversation-link").focus()
    page.keyboard.press("Tab")
    expect(conversation.get_by_test_id("rename-conversation")).to_be_focused()


AT_BOTTOM = """() => {
    const list = document.querySelector('[data-testid=message-list]');
    return list.scrollHeight - list.scrollTop - list.clientHeight < 48;
}"""


def test_autoscroll_follows_until_the_user_scrolls_up(browser, serve_app):
    page = open_page(browser, serve_app.url, viewport=PHONE)
    new_conversation(page)
    # Fill the screen first with a canned answer, then stream a real one below it.
    long_answer = "\n\n".join(f"Paragraph {i}: " + "words " * 30 for i in range(20))
    page.route("**/conversations/*/generate", lambda route: route.fulfill(status=200, body=long_answer))
    send(page, "long please")
    wait_for_answer(page)
    assert page.evaluate(AT_BOTTOM)
    page.unroute("**/conversations/*/generate")

    set_parameters(page, sample_len=1000, temperature=0.8)
    send(page, "Tell me a long story about a dragon.")
    answer = page.locator('[data-testid="message"][data-role="assistant"]').last
    content = answer.get_by_test_id("message-content")
    expect(content).not_to_be_empty(timeout=ANSWER_TIMEOUT_MS)
    page.wait_for_timeout(500)
    assert page.evaluate(AT_BOTTOM), "the list did not follow the streaming answer"

    page.get_by_test_id("message-list").evaluate("list => list.scrollTo(0, 0)")
    length_when_scrolled = len(content.inner_text())
    deadline = time.monotonic() + 60
    while len(content.inner_text()) < length_when_scrolled + 40 and STREAMING.search(answer.get_attribute("class")):
        assert time.monotonic() < deadline
        page.wait_for_timeout(200)
    assert page.get_by_test_id("message-list").evaluate("list => list.scrollTop") == 0
    expect(page.get_by_test_id("jump-latest")).to_be_visible()
    page.get_by_test_id("jump-latest").click()
    page.wait_for_timeout(300)
    assert page.evaluate(AT_BOTTOM)
    if page.get_by_test_id("stop-button").is_visible():
        page.get_by_test_id("stop-button").click()
    page.context.close()


SCREENSHOT_ANSWER = """Sure! Here is a function that reverses a string:

```python
def reverse(text: str) -> str:
    return text[::-1]
```

It uses **slicing** with a step of `-1`:

1. `text[::-1]` walks the string backwards,
2. and builds a new string — the original is left unchanged.
"""


@pytest.mark.parametrize("color_scheme", ["light", "dark"])
@pytest.mark.parametrize("device", ["desktop", "phone"])
def test_screenshots(browser, serve_app, device, color_scheme):
    """Looks, for people: a titled conversation with Markdown and a code block, the parameters
    (desktop) or the conversation drawer (phone), and the empty page."""
    created = httpx.post(f"{serve_app.url}/conversations", timeout=30).json()
    httpx.patch(f"{serve_app.url}/conversations/{created['id']}", json={"title": "Reverse a string in Python"}, timeout=30)
    viewport = DESKTOP if device == "desktop" else PHONE
    page = open_page(browser, f"{serve_app.url}/#/c/{created['id']}", viewport=viewport, color_scheme=color_scheme)
    expect(page.get_by_test_id("chat-title")).to_have_text("Reverse a string in Python")
    page.route("**/conversations/*/generate", lambda route: route.fulfill(status=200, body=SCREENSHOT_ANSWER))
    send(page, "Write a Python function that reverses a string.")
    wait_for_answer(page)
    page.get_by_test_id("prompt-input").blur()
    screenshot(page, f"{device}-{color_scheme}-conversation")
    if device == "desktop":
        page.get_by_test_id("params-toggle").click()
        screenshot(page, f"{device}-{color_scheme}-parameters")
    else:
        page.get_by_test_id("open-sidebar").click()
        page.wait_for_timeout(300)  # the drawer slides in
        screenshot(page, f"{device}-{color_scheme}-sidebar")
    page.goto(serve_app.url)
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    new_conversation(page)
    screenshot(page, f"{device}-{color_scheme}-welcome")
    assert page.page_errors == []
    page.context.close()


def test_a_server_that_wants_an_api_key_gets_it_from_the_page(browser, serve_app):
    """The server side of the key is tested in tests/serve_app/test_ingress.py; here the page
    meets a server that answers 401 without `Authorization: Bearer <key>` (played by a route
    in front of the real app) and must ask for the key once, keep it, and send it everywhere."""
    key = "browser-test-key-1"
    seen_without_key = []
    context = browser.new_context(viewport=DESKTOP, accept_downloads=True)
    page = context.new_page()

    def require_key(route):
        path = route.request.url.removeprefix(serve_app.url).split("?")[0]
        is_open = path in ("/", "/readyz") or path.startswith("/static/")
        if not is_open and route.request.headers.get("authorization") != f"Bearer {key}":
            seen_without_key.append(path)
            route.fulfill(status=401, json={"detail": "missing or wrong API key"}, headers={"WWW-Authenticate": "Bearer"})
        else:
            route.continue_()

    page.route(f"{serve_app.url}/**", require_key)
    page.goto(serve_app.url)
    sign_in(page, key)
    expect(page.get_by_test_id("model-state")).to_have_attribute("data-state", "ready")
    assert page.evaluate("localStorage.getItem('ray-chat.apiKey')") == key
    expect(page.get_by_test_id("account-name")).to_have_text("Signed in with a key")  # no users: no name

    page.get_by_test_id("model-select").select_option(TINY)
    set_parameters(page, sample_len=4)
    send(page, "with a key")
    wait_for_answer(page)
    conversation_id = current_id(page)
    item = page.locator(f'[data-testid="conversation-item"][data-id="{conversation_id}"]')
    # The sidebar re-renders once the answer's title arrives; open the menu after that.
    expect(item.get_by_test_id("conversation-title")).to_have_text("with a key")
    item.get_by_test_id("export-conversation").click()
    expect(item.get_by_test_id("export-json")).to_be_visible()
    with page.expect_download() as download_info:
        item.get_by_test_id("export-json").click()
    assert download_info.value.suggested_filename == f"conversation-{conversation_id}.json"
    assert json.loads(Path(download_info.value.path()).read_text())["messages"][0]["content"] == "with a key"
    # Only the API calls made before the key was given went without it; the page asked once.
    assert seen_without_key and set(seen_without_key) <= {"/models", "/conversations"}, seen_without_key
    expect(page.get_by_test_id("sign-in-dialog")).to_be_hidden()
    context.close()
