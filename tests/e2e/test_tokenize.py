"""vLLM's /tokenize and /detokenize against the real app: counts equal what a generation uses."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.slow

SMOL = "SmolLM2-135M-Instruct"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def http(serve_app):
    with httpx.Client(base_url=serve_app.url, timeout=120) as client:
        yield client


def test_a_count_is_the_prompt_tokens_a_generation_is_charged(http, sdk):
    for tools in (None, TOOLS):
        counted = http.post("/tokenize", json={"model": SMOL, "messages": CHAT, "tools": tools}).json()
        extra = {"tools": tools} if tools else {}
        usage = sdk.chat.completions.create(model=SMOL, messages=CHAT, max_tokens=1, **extra).usage
        assert counted["count"] == len(counted["tokens"]) == usage.prompt_tokens
        assert counted["max_model_len"] == 2048
    prompt = http.post("/tokenize", json={"model": "smollm2", "prompt": "Paris is"}).json()
    assert prompt["count"] == sdk.completions.create(model=SMOL, prompt="Paris is", max_tokens=1).usage.prompt_tokens
    assert http.post("/detokenize", json={"model": SMOL, "tokens": prompt["tokens"]}).json() == {"prompt": "Paris is"}


def test_tokenize_refuses_what_it_cannot_count_naming_the_field(http):
    both = http.post("/tokenize", json={"model": SMOL, "prompt": "a", "messages": CHAT})
    assert both.status_code == 422 and "prompt" in both.text
    beyond = http.post("/detokenize", json={"model": SMOL, "tokens": [1, 10**9]})
    assert beyond.status_code == 400 and beyond.json()["detail"].startswith("tokens: 1000000000 is not among")
    assert http.post("/tokenize", json={"model": "nope", "prompt": "a"}).status_code == 404
