"""The OpenAI-compatible API, driven by the official `openai` SDK against the real app."""

from __future__ import annotations

import sqlite3
from collections import Counter

import openai
import pytest

from deployments.model_loader import load_model
from deployments.model_registry import ModelConfig

pytestmark = pytest.mark.slow

SMOL = "SmolLM2-135M-Instruct"
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def tokenizer():
    return load_model(ModelConfig(name=SMOL)).tokenizer


def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def chat_prompt_tokens(tokenizer, messages) -> int:
    return count_tokens(tokenizer, tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))


def test_models_are_listed_with_their_state(sdk):
    models = sdk.models.list().data
    assert [m.id for m in models] == [SMOL, "tiny-random", "tiny-narrow"]
    assert {m.model_extra["state"] for m in models} == {"ready"}
    assert models[0].model_extra["aliases"] == ["smollm2"]


def test_chat_completion_answers_and_counts_tokens_exactly(sdk, tokenizer):
    completion = sdk.chat.completions.create(model=SMOL, messages=CAPITAL, temperature=0, max_tokens=48)
    (choice,) = completion.choices
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant" and choice.finish_reason == "stop"
    assert completion.model == SMOL and completion.object == "chat.completion"
    assert completion.usage.prompt_tokens == chat_prompt_tokens(tokenizer, CAPITAL)
    assert completion.usage.completion_tokens == count_tokens(tokenizer, choice.message.content)
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


def test_streamed_chat_equals_the_whole_answer_and_reports_usage(sdk, tokenizer):
    whole = sdk.chat.completions.create(model="smollm2", messages=CAPITAL, temperature=0, max_tokens=48)
    stream = sdk.chat.completions.create(
        model="smollm2", messages=CAPITAL, temperature=0, max_tokens=48, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1
    assert "".join(pieces) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage == whole.usage


def test_max_tokens_ends_with_length(sdk):
    completion = sdk.chat.completions.create(
        model=SMOL, messages=[{"role": "user", "content": "Write a long poem about the sea."}], max_tokens=5, seed=1
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 5


def test_text_completion_whole_and_streamed(sdk, tokenizer):
    prompt = "The capital of France is"
    whole = sdk.completions.create(model=SMOL, prompt=prompt, temperature=0, max_tokens=8)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason == "length"
    assert whole.usage.prompt_tokens == len(tokenizer(prompt)["input_ids"]) and whole.usage.completion_tokens == 8
    streamed = "".join(
        c.choices[0].text
        for c in sdk.completions.create(model=SMOL, prompt=prompt, temperature=0, max_tokens=8, stream=True)
        if c.choices
    )
    assert streamed == whole.choices[0].text


def test_seeded_sampling_is_reproducible(sdk):
    ask = dict(model=SMOL, messages=[{"role": "user", "content": "Name a colour."}], temperature=1.0, seed=1234, max_tokens=16)
    assert (
        sdk.chat.completions.create(**ask).choices[0].message.content
        == sdk.chat.completions.create(**ask).choices[0].message.content
    )


def test_unknown_model_is_not_found(sdk):
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.chat.completions.create(model="gpt-9", messages=CAPITAL)
    assert "available models: SmolLM2-135M-Instruct, tiny-random, tiny-narrow" in caught.value.message


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"temperature": 3}, "temperature"),
        ({"n": 17}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        # Not implemented: refused rather than answered without.
        ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        # Refused by the model's replica, which compiles the schema: still a 400 naming the field.
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
            "response_format",
        ),
        ({"response_format": {"type": "xml"}}, "response_format"),
    ],
)
def test_bad_parameters_are_bad_requests_naming_the_field(sdk, extra, field):
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(model=SMOL, messages=CAPITAL, **extra)
    assert caught.value.body["param"] == field
    assert field in caught.value.message


def test_logit_bias_bans_a_token_and_a_token_id_beyond_the_vocabulary_is_a_bad_request(sdk, tokenizer):
    ask = dict(model=SMOL, messages=CAPITAL, temperature=0, max_tokens=8)
    plain = sdk.chat.completions.create(**ask).choices[0].message.content
    first = tokenizer(plain)["input_ids"][0]
    banned = sdk.chat.completions.create(**ask, logit_bias={str(first): -100}).choices[0].message.content
    assert tokenizer(banned)["input_ids"][0] != first, (plain, banned)
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(**ask, logit_bias={str(len(tokenizer)): 1})
    assert f"logit_bias: token id {len(tokenizer)} is not among the model's" in caught.value.message


def test_presence_and_frequency_penalties_turn_a_greedy_answer_from_repeating_itself(sdk, tokenizer):
    def most_repeated_token(**penalties) -> int:
        answer = sdk.completions.create(model=SMOL, prompt="hello hello hello hello", temperature=0, max_tokens=24, **penalties)
        return max(Counter(tokenizer(answer.choices[0].text)["input_ids"]).values())

    assert most_repeated_token() > most_repeated_token(presence_penalty=1.5, frequency_penalty=1.0)


def test_chat_with_a_conversation_id_reads_and_writes_history(sdk, serve_app):
    import httpx

    conversation_id = httpx.get(f"{serve_app.url}/conversations/start").json()
    first = sdk.chat.completions.create(
        model=SMOL, messages=CAPITAL, temperature=0, max_tokens=32, extra_body={"conversation_id": conversation_id}
    )
    follow_up = [{"role": "user", "content": "And of Italy?"}]
    second = sdk.chat.completions.create(
        model=SMOL, messages=follow_up, temperature=0, max_tokens=32, extra_headers={"X-Conversation-Id": str(conversation_id)}
    )
    # The history (the first turn) went before the new prompt.
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + first.usage.completion_tokens
    stored = httpx.get(f"{serve_app.url}/conversations/{conversation_id}").json()["messages"]
    assert [(m["role"], m["content"]) for m in stored] == [
        ("user", CAPITAL[0]["content"]),
        ("assistant", first.choices[0].message.content),
        ("user", "And of Italy?"),
        ("assistant", second.choices[0].message.content),
    ]


def test_chat_without_a_conversation_id_stores_nothing(sdk, serve_app):
    def message_count() -> int:
        with sqlite3.connect(serve_app.database_path) as db:
            return db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]

    before = message_count()
    sdk.chat.completions.create(model=SMOL, messages=CAPITAL, max_tokens=4)
    assert message_count() == before


def test_openapi_schema_lists_every_route(serve_app):
    import httpx

    schema = httpx.get(f"{serve_app.url}/openapi.json").json()
    assert set(schema["paths"]) >= {
        "/conversations",
        "/conversations/start",
        "/conversations/{conversation_id}",
        "/conversations/{conversation_id}/generate",
        "/conversations/{conversation_id}/export",
        "/v1/models",
        "/v1/chat/completions",
        "/v1/completions",
        "/healthz",
        "/readyz",
        "/models",
        "/tokenize",
        "/detokenize",
    }


def test_responses_answer_as_chat_completions_do_whole_and_streamed(sdk):
    """The Responses API on the same model: `instructions` and `input` messages become the same
    prompt as chat messages, so greedy answers match; the stream holds OpenAI's event sequence,
    which the SDK's own stream helper accepts."""
    conversation = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ]
    system = "Answer in one sentence."
    chat = sdk.chat.completions.create(
        model=SMOL, messages=[{"role": "system", "content": system}, *conversation], temperature=0, max_tokens=64
    )
    ask = dict(model=SMOL, instructions=system, input=conversation, temperature=0, max_output_tokens=64)
    whole = sdk.responses.create(**ask)
    assert whole.object == "response" and whole.status == "completed" and chat.choices[0].finish_reason == "stop"
    assert whole.output_text == chat.choices[0].message.content
    assert (whole.usage.input_tokens, whole.usage.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)

    events = list(sdk.responses.create(**ask, stream=True))
    kinds = [event.type for event in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert "".join(event.delta for event in events[4:-4]) == whole.output_text == events[-1].response.output_text
    with sdk.responses.stream(**ask) as stream:
        assert stream.get_final_response().output_text == whole.output_text


def test_a_response_cut_by_max_output_tokens_is_incomplete(sdk):
    ask = dict(model=SMOL, input="Tell me a long story.", temperature=0, max_output_tokens=5)
    whole = sdk.responses.create(**ask)
    assert (whole.status, whole.incomplete_details.reason, whole.usage.output_tokens) == ("incomplete", "max_output_tokens", 5)
    events = list(sdk.responses.create(**ask, stream=True))
    assert events[-1].type == "response.incomplete" and events[-1].response.output_text == whole.output_text


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"tools": [{"type": "function", "name": "w", "parameters": {"type": "objectx"}}], "tool_choice": "required"}, "tools"),
        ({"tools": [{"type": "web_search"}]}, "tools.0.type"),  # hosted tools: not here
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "objectx"}}}}, "text.format"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
    ],
)
def test_responses_refuse_what_they_cannot_do_naming_the_field(sdk, extra, field):
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.responses.create(model=SMOL, input="Hi", **extra)
    assert caught.value.body["param"] == field


def test_n_choices_are_the_answers_of_seeds_in_a_row_whole_and_streamed(sdk):
    """Choice i of a request seeded s is what a one-choice request seeded s + i answers; the
    stream carries every choice's text and finish under its index; usage counts the prompt once."""
    ask = dict(model=SMOL, messages=CAPITAL, temperature=1.0, seed=7, max_tokens=12)
    alone = [sdk.chat.completions.create(**ask | {"seed": 7 + i}) for i in range(3)]
    whole = sdk.chat.completions.create(**ask, n=3)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert [c.message.content for c in whole.choices] == [a.choices[0].message.content for a in alone]
    assert len({c.message.content for c in whole.choices}) > 1
    assert whole.usage.prompt_tokens == alone[0].usage.prompt_tokens
    assert whole.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)

    texts, finishes, usage = ["", "", ""], [None, None, None], None
    for chunk in sdk.chat.completions.create(**ask, n=3, stream=True, stream_options={"include_usage": True}):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            finishes[choice.index] = choice.finish_reason or finishes[choice.index]
        usage = chunk.usage or usage
    assert texts == [c.message.content for c in whole.choices]
    assert finishes == [c.finish_reason for c in whole.choices]
    assert usage.completion_tokens == whole.usage.completion_tokens

    greedy = sdk.completions.create(model=SMOL, prompt="The capital of France is", temperature=0, max_tokens=6, n=2)
    assert [c.index for c in greedy.choices] == [0, 1] and greedy.choices[0].text == greedy.choices[1].text


def test_n_choices_cannot_be_stored_in_a_conversation(sdk, serve_app):
    import httpx

    conversation_id = httpx.get(f"{serve_app.url}/conversations/start").json()
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(model=SMOL, messages=CAPITAL, n=2, extra_body={"conversation_id": conversation_id})
    assert "n: a conversation stores one answer a turn" in caught.value.message
    assert httpx.get(f"{serve_app.url}/conversations/{conversation_id}").json()["messages"] == []


def test_a_chat_answer_without_max_tokens_runs_until_the_context_ends(sdk):
    # As OpenAI, vLLM and Ollama: no cap of the server's own (tiny-random's context is 512 tokens).
    answer = sdk.chat.completions.create(model="tiny-random", messages=CAPITAL, temperature=0, extra_body={"ignore_eos": True})
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.prompt_tokens + answer.usage.completion_tokens == 512
