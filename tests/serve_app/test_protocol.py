from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from deployments.engine.sampling_params import Constraint, SamplingParams
from serve_app.protocol import (
    MAX_SEED,
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    RegenerateRequest,
    ResponsesRequest,
)


def test_only_prompt_is_required_and_defaults_fill_the_rest():
    params = GenerateRequest(prompt="hi").to_sampling_params()
    assert params == SamplingParams(max_tokens=256, temperature=0.7, top_p=0.9, repeat_penalty=1.1, repeat_last_n=64, seed=None)


def test_explicit_nulls_from_old_clients_mean_defaults():
    body = GenerateRequest.model_validate_json(
        '{"prompt": "hi", "sample_len": null, "temperature": null, "top_p": null, "repeat_penalty": null,'
        ' "repeat_last_n": null, "model": null, "revision": null, "seed": null, "unknown_field": 1}'
    )
    assert body.to_sampling_params() == GenerateRequest(prompt="hi").to_sampling_params()


def test_zero_values_are_kept_not_replaced_by_defaults():
    params = GenerateRequest(prompt="hi", temperature=0, repeat_last_n=0, seed=0).to_sampling_params()
    assert (params.temperature, params.repeat_last_n, params.seed, params.is_greedy) == (0.0, 0, 0, True)


def test_stored_parameters_record_what_was_used():
    stored = GenerateRequest(prompt="hi", temperature=0.2).stored_parameters("m", "main")
    assert stored == {
        "sample_len": 256,
        "temperature": 0.2,
        "top_p": 0.9,
        "repeat_penalty": 1.1,
        "repeat_last_n": 64,
        "seed": None,
        "model": "m",
        "revision": "main",
    }


@pytest.mark.parametrize(
    "fields",
    [
        {"prompt": ""},
        {"prompt": "hi", "temperature": -1},
        {"prompt": "hi", "top_p": 0},
        {"prompt": "hi", "top_p": 1.01},
        {"prompt": "hi", "sample_len": 0},
        {"prompt": "hi", "repeat_penalty": 0},
        {"prompt": "hi", "repeat_last_n": -1},
        {"prompt": "hi", "seed": -5},
        {"prompt": "hi", "sample_len": "many"},
        {},
    ],
)
def test_out_of_range_values_are_rejected(fields):
    with pytest.raises(ValidationError):
        GenerateRequest(**fields)


@pytest.mark.parametrize(
    ("model", "body", "loc"),
    [
        (GenerateRequest, {"prompt": "hi", "model": "a\ud800"}, ("model",)),
        (RegenerateRequest, {"revision": "\udfff"}, ("revision",)),
        (CompletionRequest, {"model": "m", "prompt": ["a\ud800"]}, ("prompt",)),
        (CompletionRequest, {"model": "m", "prompt": "a", "stop": ["x", "\ud800"]}, ("stop",)),
        (ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "\ud800"}]}, ("messages", 0, "content")),
    ],
)
def test_strings_holding_a_lone_surrogate_are_refused_naming_the_field(model, body, loc):
    # JSON may escape one ("\ud800"); the tokenizer and SQLite cannot encode it (a 503, a 500).
    with pytest.raises(ValidationError) as caught:
        model.model_validate(body)
    assert caught.value.errors()[0]["loc"] == loc
    assert "lone surrogate" in caught.value.errors()[0]["msg"]


def test_text_beyond_ascii_is_kept():
    assert GenerateRequest(prompt="café 😀", model="модель").prompt == "café 😀"


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "m", "prompt": "hi"}


def test_openais_presence_and_frequency_penalties_reach_the_sampling_params_and_null_is_off():
    params = ChatCompletionRequest.model_validate(
        {**CHAT, "presence_penalty": 0.5, "frequency_penalty": -1.0}
    ).to_sampling_params()
    assert (params.presence_penalty, params.frequency_penalty, params.penalizes_occurrences) == (0.5, -1.0, True)
    nulls = CompletionRequest.model_validate({**COMPLETION, "presence_penalty": None, "frequency_penalty": None})
    params = nulls.to_sampling_params()
    assert not params.penalizes_repeats and not params.penalizes_occurrences
    for field, value in [("presence_penalty", 2.01), ("frequency_penalty", -2.01)]:
        with pytest.raises(ValidationError) as caught:
            ChatCompletionRequest.model_validate({**CHAT, field: value})
        assert caught.value.errors()[0]["loc"] == (field,)


def test_n_gives_a_seeded_request_one_seed_per_choice_each_a_seed_a_request_may_send():
    seeds = [params.seed for params in CompletionRequest.model_validate({**COMPLETION, "n": 3, "seed": 7}).choices_params()]
    assert seeds == [7, 8, 9]
    last = ChatCompletionRequest.model_validate({**CHAT, "n": 3, "seed": MAX_SEED}).choices_params()
    assert [params.seed for params in last] == [MAX_SEED, 0, 1]
    unseeded = ChatCompletionRequest.model_validate({**CHAT, "n": 2}).choices_params()
    assert [params.seed for params in unseeded] == [None, None]
    for bad in (0, 17):
        with pytest.raises(ValidationError) as caught:
            CompletionRequest.model_validate({**COMPLETION, "n": bad})
        assert caught.value.errors()[0]["loc"] == ("n",)


def test_logit_bias_keys_become_token_ids_and_bad_ones_are_refused_naming_the_field():
    body = {**COMPLETION, "logit_bias": {"0": 2.5, "49151": -100}}
    assert CompletionRequest.model_validate(body).to_sampling_params().logit_bias == ((0, 2.5), (49151, -100.0))
    assert ChatCompletionRequest.model_validate({**CHAT, "logit_bias": {}}).to_sampling_params().logit_bias == ()
    for bad, message in [
        ({"05": 1}, "key '05' is not a token id"),  # "5" too: two keys for one token
        ({"-1": 1}, "key '-1' is not a token id"),
        ({"7": 100.5}, "less than or equal to 100"),
        ({str(token): 1 for token in range(301)}, "at most 300 items"),
    ]:
        with pytest.raises(ValidationError) as caught:
            ChatCompletionRequest.model_validate({**CHAT, "logit_bias": bad})
        assert caught.value.errors()[0]["loc"][0] == "logit_bias" and message in caught.value.errors()[0]["msg"]


@pytest.mark.parametrize(
    ("base", "field", "asks_for_nothing", "asks_for_something"),
    [
        (CHAT, "functions", [], [{"name": "f"}]),
        (CHAT, "function_call", "auto", {"name": "f"}),
        (COMPLETION, "best_of", 1, 2),
        (COMPLETION, "suffix", "", "}"),
    ],
)
def test_openai_features_not_implemented_are_refused_naming_the_field_unless_nothing_is_asked(
    base, field, asks_for_nothing, asks_for_something
):
    request = ChatCompletionRequest if base is CHAT else CompletionRequest
    for nothing in (asks_for_nothing, None):
        assert (
            request.model_validate({**base, field: nothing}).to_sampling_params()
            == request.model_validate(base).to_sampling_params()
        )
    with pytest.raises(ValidationError) as caught:
        request.model_validate({**base, field: asks_for_something})
    assert caught.value.errors()[0]["loc"] == (field,)
    assert "is not supported by this server" in caught.value.errors()[0]["msg"]


def test_a_responses_input_becomes_the_chat_messages_it_means():
    body = ResponsesRequest.model_validate(
        {
            "model": "m",
            "instructions": "Be brief.",
            "max_output_tokens": 9,
            "temperature": 0,
            "input": [
                {"role": "developer", "content": "Use French."},
                {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "Capital "}, {"type": "input_text", "text": "of Italy?"}],
                },
                {"role": "assistant", "content": [{"type": "output_text", "text": "Rome."}]},
                {"role": "user", "content": "And France?"},
            ],
        }
    )
    assert body.chat_messages() == [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "Use French."},
        {"role": "user", "content": "Capital of Italy?"},
        {"role": "assistant", "content": "Rome."},
        {"role": "user", "content": "And France?"},
    ]
    assert (body.to_sampling_params().max_tokens, body.to_sampling_params().temperature) == (9, 0.0)
    assert ResponsesRequest.model_validate({"model": "m", "input": "Hi"}).chat_messages() == [{"role": "user", "content": "Hi"}]
    with pytest.raises(ValidationError) as caught:
        ResponsesRequest.model_validate(
            {"model": "m", "input": [{"type": "reasoning", "summary": []}]}  # an item kind not taken
        )
    assert caught.value.errors()[0]["loc"][0] == "input"


def test_openai_answers_left_unbounded_run_until_the_context_ends_keeping_the_usual_room():
    chat = ChatCompletionRequest.model_validate(CHAT).to_sampling_params()
    response = ResponsesRequest.model_validate({"model": "m", "input": "hi"}).to_sampling_params()
    for unbounded in (chat, response):
        assert (unbounded.max_tokens, unbounded.answer_room) == (8192, 256)
    bounded = ChatCompletionRequest.model_validate({**CHAT, "max_completion_tokens": 5000}).to_sampling_params()
    assert (bounded.max_tokens, bounded.answer_room) == (5000, 5000)
    assert CompletionRequest.model_validate(COMPLETION).to_sampling_params().answer_room == 16  # OpenAI's default there
    assert GenerateRequest(prompt="hi").to_sampling_params().answer_room == 256  # the original API's sample_len


def test_a_response_format_becomes_the_constraint_its_answer_follows():
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
    json_schema = {"type": "json_schema", "json_schema": {"name": "pair", "schema": schema, "strict": True}}
    for request, body in ((ChatCompletionRequest, CHAT), (CompletionRequest, COMPLETION)):
        assert request.model_validate({**body, "response_format": {"type": "text"}}).to_sampling_params().constraint is None
        json_object = request.model_validate({**body, "response_format": {"type": "json_object"}}).to_sampling_params()
        assert json_object.constraint == Constraint(json_schema='{"type": "object"}', field="response_format")
        constraint = request.model_validate({**body, "response_format": json_schema}).to_sampling_params().constraint
        assert constraint is not None and json.loads(constraint.json_schema) == schema
        assert list(json.loads(constraint.json_schema)["properties"]) == ["b", "a"]  # the order the answer's keys take
    text = {"format": {"type": "json_schema", "name": "pair", "schema": schema}}
    response = ResponsesRequest.model_validate({"model": "m", "input": "hi", "text": text}).to_sampling_params()
    assert response.constraint is not None and response.constraint.field == "text.format"
    for bad in ({"type": "xml"}, {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}, {"type": "json_schema"}):
        with pytest.raises(ValidationError) as caught:
            ChatCompletionRequest.model_validate({**CHAT, "response_format": bad})
        assert caught.value.errors()[0]["loc"][0] == "response_format"


def test_a_responses_input_with_calls_and_their_outputs_becomes_chat_messages_with_tool_calls():
    body = ResponsesRequest.model_validate(
        {
            "model": "m",
            "instructions": "Use the tools.",
            "input": [
                {"role": "user", "content": "Weather and time in Paris?"},
                {"type": "function_call", "call_id": "a", "name": "get_weather", "arguments": '{"city": "Paris"}'},
                {"type": "function_call", "call_id": "b", "name": "get_time", "arguments": "{}", "status": "completed"},
                {"type": "function_call_output", "call_id": "a", "output": "Sunny"},
                {"type": "function_call_output", "call_id": "b", "output": "noon"},
            ],
            "tools": [
                {"type": "function", "name": "get_weather", "parameters": {"type": "object"}},
                {"type": "function", "name": "get_time"},
            ],
            "tool_choice": {"type": "function", "name": "get_time"},
        }
    )
    calls = [
        {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"id": "b", "type": "function", "function": {"name": "get_time", "arguments": {}}},
    ]
    assert body.chat_messages() == [
        {"role": "system", "content": "Use the tools."},
        {"role": "user", "content": "Weather and time in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": calls},  # consecutive calls: one message
        {"role": "tool", "content": "Sunny", "tool_call_id": "a"},
        {"role": "tool", "content": "noon", "tool_call_id": "b"},
    ]
    assert [tool["function"]["name"] for tool in body.tool_definitions or []] == ["get_weather", "get_time"]
    assert json.loads(body.to_sampling_params().constraint.json_schema)["properties"]["name"] == {"const": "get_time"}
    assert ResponsesRequest.model_validate({**body.model_dump(), "tool_choice": "none"}).tool_definitions is None
