"""Logprobs through the official `openai` SDK against the real app and the packaged model."""

from __future__ import annotations

import openai
import pytest

pytestmark = pytest.mark.slow

SMOL = "SmolLM2-135M-Instruct"
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_logprobs_list_each_token_with_its_most_likely_alternatives_whole_and_streamed(sdk):
    asked = dict(model=SMOL, messages=CAPITAL, temperature=0, max_tokens=32, logprobs=True, top_logprobs=5)
    whole = sdk.chat.completions.create(**asked)
    choice = whole.choices[0]
    entries = choice.logprobs.content
    assert "Paris" in choice.message.content
    assert "".join(entry.token for entry in entries) == choice.message.content
    assert len(entries) == whole.usage.completion_tokens
    for entry in entries:
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode())
        values = [top.logprob for top in entry.top_logprobs]
        assert len(values) == 5 and values == sorted(values, reverse=True)
        assert values[0] == pytest.approx(entry.logprob)  # greedy: the chosen token is the most likely
    streamed = [
        entry
        for chunk in sdk.chat.completions.create(**asked, stream=True)
        if chunk.choices and chunk.choices[0].logprobs
        for entry in chunk.choices[0].logprobs.content
    ]
    assert [e.token for e in streamed] == [e.token for e in entries]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in entries], abs=1e-5)
    plain = sdk.chat.completions.create(model=SMOL, messages=CAPITAL, temperature=0, max_tokens=32)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == choice.message.content


def test_completion_logprobs_in_the_legacy_shape(sdk):
    completion = sdk.completions.create(model=SMOL, prompt="The capital of France is", max_tokens=8, temperature=0, logprobs=3)
    choice = completion.choices[0]
    logprobs = choice.logprobs
    assert "".join(logprobs.tokens) == choice.text and len(logprobs.tokens) == completion.usage.completion_tokens
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))]
    assert all(len(top) <= 3 for top in logprobs.top_logprobs)
    assert all(max(top.values()) == pytest.approx(lp) for top, lp in zip(logprobs.top_logprobs, logprobs.token_logprobs))
    streamed = [
        token
        for chunk in sdk.completions.create(
            model=SMOL, prompt="The capital of France is", max_tokens=8, temperature=0, logprobs=3, stream=True
        )
        if chunk.choices and chunk.choices[0].logprobs
        for token in chunk.choices[0].logprobs.tokens
    ]
    assert streamed == logprobs.tokens


def test_echo_scores_the_prompt_as_evaluation_harnesses_read_it(sdk):
    def scored(text: str, **stream):
        return sdk.completions.create(model=SMOL, prompt=text, max_tokens=1, temperature=0, logprobs=1, echo=True, **stream)

    completion = scored("The capital of France is Paris")
    choice, usage = completion.choices[0], completion.usage
    logprobs = choice.logprobs
    assert choice.text.startswith("The capital of France is Paris") and "".join(logprobs.tokens) == choice.text
    assert len(logprobs.tokens) == usage.prompt_tokens + usage.completion_tokens
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None  # nothing predicts the first token
    assert all(lp <= 0 for lp in logprobs.token_logprobs[1:])
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))]
    # A harness's log-likelihood of a continuation: the model knows its capitals.
    right, wrong = (
        sum(scored(f"The capital of France is {city}").choices[0].logprobs.token_logprobs[1:-1]) for city in ("Paris", "Banana")
    )
    assert right > wrong
    streamed = [chunk.choices[0] for chunk in scored("The capital of France is Paris", stream=True) if chunk.choices]
    assert "".join(c.text for c in streamed) == choice.text
    assert [t for c in streamed if c.logprobs for t in c.logprobs.tokens] == logprobs.tokens
    plain = sdk.completions.create(model=SMOL, prompt="The capital of France is", max_tokens=4, temperature=0)
    echoed = sdk.completions.create(model=SMOL, prompt="The capital of France is", max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text == "The capital of France is" + plain.choices[0].text
    assert echoed.choices[0].logprobs is None


def test_responses_give_the_logprobs_chat_completions_give_whole_and_streamed(sdk):
    asked = dict(model=SMOL, input=CAPITAL[0]["content"], temperature=0, max_output_tokens=32)
    ask = asked | dict(include=["message.output_text.logprobs"], top_logprobs=3)
    text = sdk.responses.create(**ask).output[0].content[0]
    chat = sdk.chat.completions.create(model=SMOL, messages=CAPITAL, temperature=0, max_tokens=32, logprobs=True, top_logprobs=3)
    expected = chat.choices[0].logprobs.content
    assert text.text == chat.choices[0].message.content == "".join(entry.token for entry in text.logprobs)
    assert [e.token for e in text.logprobs] == [e.token for e in expected]
    assert [e.logprob for e in text.logprobs] == pytest.approx([e.logprob for e in expected], abs=1e-5)
    for entry in text.logprobs:
        values = [top.logprob for top in entry.top_logprobs]
        assert len(values) == 3 and values == sorted(values, reverse=True) and values[0] == pytest.approx(entry.logprob)
    events = list(sdk.responses.create(**ask, stream=True))
    streamed = [entry for e in events if e.type == "response.output_text.delta" for entry in e.logprobs]
    assert [e.token for e in streamed] == [e.token for e in text.logprobs]
    (done,) = [e for e in events if e.type == "response.output_text.done"]
    assert [e.token for e in done.logprobs] == [e.token for e in text.logprobs]
    assert sdk.responses.create(**asked).output[0].content[0].logprobs == []  # not asked: none
    for extra, field in [
        (dict(include=["reasoning.encrypted_content"]), "include.0"),
        (dict(include=["message.output_text.logprobs"], tools=[{"type": "function", "name": "f"}]), "include"),
        (dict(top_logprobs=21), "top_logprobs"),
    ]:
        with pytest.raises(openai.BadRequestError) as caught:
            sdk.responses.create(**asked, **extra)
        assert caught.value.body["param"] == field, caught.value.message
