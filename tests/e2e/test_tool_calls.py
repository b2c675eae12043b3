"""Tool calls through the official `openai` SDK and LangChain against the real app and the
packaged model (whose chat template has no tools: the Hermes-format fallback)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Literal

import httpx
import openai
import pydantic
import pytest
from langchain_openai import ChatOpenAI

pytestmark = pytest.mark.slow

SMOL = "SmolLM2-135M-Instruct"
ASK = [{"role": "user", "content": "What is the weather like in Paris today, in celsius?"}]


class WeatherArguments(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    city: Annotated[str, pydantic.Field(max_length=40)]
    unit: Literal["celsius", "fahrenheit"]


class TimeArguments(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    timezone: Annotated[str, pydantic.Field(max_length=40)]


def tool(name: str, description: str, arguments: type[pydantic.BaseModel]) -> dict:
    return {
        "type": "function",
        "function": {"name": name, "description": description, "parameters": arguments.model_json_schema()},
    }


TOOLS = [
    tool("get_weather", "The current weather in a city.", WeatherArguments),
    tool("get_time", "The current time in a timezone.", TimeArguments),
]
VALIDATORS = {"get_weather": WeatherArguments, "get_time": TimeArguments}


def valid_calls(calls) -> list[tuple[str, pydantic.BaseModel]]:
    """Each call's name and its arguments, validated against its tool's schema (raises if not)."""
    return [(call.function.name, VALIDATORS[call.function.name].model_validate_json(call.function.arguments)) for call in calls]


def test_a_required_call_always_names_a_tool_and_its_arguments_validate(sdk):
    def ask(seed: int):
        return sdk.chat.completions.create(
            model=SMOL, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0.8, seed=seed
        ).choices[0]

    with ThreadPoolExecutor(8) as pool:
        choices = list(pool.map(ask, range(10)))
    for choice in choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert valid_calls(choice.message.tool_calls)
        assert all(call.id.startswith("call_") and call.type == "function" for call in choice.message.tool_calls)


def test_a_streamed_call_reassembles_into_the_whole_one(sdk):
    asked = dict(model=SMOL, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0.8, seed=4)
    whole = sdk.chat.completions.create(**asked).choices[0].message.tool_calls
    calls: dict[int, dict] = {}
    finish = None
    for chunk in sdk.chat.completions.create(**asked, stream=True):
        for delta in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        (c.function.name, json.loads(c.function.arguments)) for c in whole
    ]


def test_n_choices_each_make_their_calls_whole_and_streamed_alike(sdk):
    asked = dict(model=SMOL, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0.8, seed=11, n=3)
    whole = sdk.chat.completions.create(**asked)
    assert [choice.index for choice in whole.choices] == [0, 1, 2]
    for choice in whole.choices:
        assert choice.finish_reason == "tool_calls" and valid_calls(choice.message.tool_calls)
    # Choice i is what a one-choice request seeded 11 + i calls.
    alone = sdk.chat.completions.create(**asked | {"n": 1, "seed": 12}).choices[0].message.tool_calls
    assert [(c.function.name, c.function.arguments) for c in whole.choices[1].message.tool_calls] == [
        (c.function.name, c.function.arguments) for c in alone
    ]
    calls: dict[tuple[int, int], dict] = {}
    finishes = {}
    for chunk in sdk.chat.completions.create(**asked, stream=True):
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault((choice.index, delta.index), {"name": "", "arguments": ""})
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
            finishes[choice.index] = choice.finish_reason or finishes.get(choice.index)
    assert finishes == {0: "tool_calls", 1: "tool_calls", 2: "tool_calls"}
    for choice in whole.choices:
        streamed = [call for (index, _), call in sorted(calls.items()) if index == choice.index]
        assert [(c["name"], c["arguments"]) for c in streamed] == [
            (c.function.name, c.function.arguments) for c in choice.message.tool_calls
        ]


def test_a_named_function_is_the_one_called_and_one_call_without_parallel_calls(sdk):
    named = {"type": "function", "function": {"name": "get_time"}}
    choice = sdk.chat.completions.create(
        model=SMOL, messages=ASK, tools=TOOLS, tool_choice=named, temperature=0.8, seed=1
    ).choices[0]
    [(name, arguments)] = valid_calls(choice.message.tool_calls)
    assert name == "get_time" and isinstance(arguments, TimeArguments)
    single = sdk.chat.completions.create(
        model=SMOL, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, temperature=0
    ).choices[0]
    assert len(valid_calls(single.message.tool_calls)) == 1


def test_a_tool_round_trip_answers_from_the_tools_result(sdk):
    first = sdk.chat.completions.create(model=SMOL, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0)
    message = first.choices[0].message
    result = {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "Sunny, 21 degrees celsius."}
    history = [*ASK, message.model_dump(exclude_none=True), result]
    second = sdk.chat.completions.create(model=SMOL, messages=history, tools=TOOLS, temperature=0, max_tokens=64)
    answer = second.choices[0]
    assert answer.finish_reason in ("stop", "length") and answer.message.tool_calls is None
    assert "21" in answer.message.content  # it read the result
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


def streamed_calls(stream) -> tuple[list[dict], str | None]:
    """The calls of a streamed answer, reassembled from its deltas, and its finish reason."""
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for delta in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
            call["id"] += delta.id or ""
            call["function"]["name"] += delta.function.name or ""
            call["function"]["arguments"] += delta.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return list(calls.values()), finish


def test_a_tool_round_trip_in_a_stored_conversation_keeps_its_calls_and_results(sdk, serve_app):
    conversation_id = httpx.get(f"{serve_app.url}/conversations/start").json()
    stored_in = {"extra_body": {"conversation_id": conversation_id}}
    calls, finish = streamed_calls(
        sdk.chat.completions.create(
            model=SMOL, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, stream=True, **stored_in
        )
    )
    assert finish == "tool_calls" and calls
    results = [{"role": "tool", "tool_call_id": call["id"], "content": "Sunny, 21 degrees celsius."} for call in calls]
    with pytest.raises(openai.BadRequestError) as caught:  # a result for a call the conversation never made
        sdk.chat.completions.create(model=SMOL, messages=[{**results[0], "tool_call_id": "call_nope"}], **stored_in)
    assert caught.value.body["param"] == "messages.0.tool_call_id", caught.value.message
    # Only the results are sent: the conversation holds the question and the calls.
    answer = sdk.chat.completions.create(model=SMOL, messages=results, tools=TOOLS, temperature=0, max_tokens=64, **stored_in)
    assert answer.choices[0].finish_reason in ("stop", "length") and "21" in answer.choices[0].message.content
    stored = httpx.get(f"{serve_app.url}/conversations/{conversation_id}").json()["messages"]
    assert [(m["role"], m["tool_calls"], m["tool_call_id"]) for m in stored] == [
        ("user", None, None),
        ("assistant", calls, None),
        *[("tool", None, call["id"]) for call in calls],
        ("assistant", None, None),
    ]
    assert stored[-1]["content"] == answer.choices[0].message.content
    # The stored history is what the model read: the same chat sent whole answers alike.
    whole = [*ASK, {"role": "assistant", "tool_calls": calls}, *results]
    stateless = sdk.chat.completions.create(model=SMOL, messages=whole, tools=TOOLS, temperature=0, max_tokens=64)
    assert stateless.choices[0].message.content == answer.choices[0].message.content
    assert stateless.usage.prompt_tokens == answer.usage.prompt_tokens


def test_tool_requests_that_cannot_run_are_bad_requests_naming_the_field(sdk):
    cases = [
        (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
        (dict(tool_choice="required"), "tool_choice"),
        (dict(tools=[TOOLS[0], TOOLS[0]]), "tools"),
        (
            dict(
                tools=[tool("bad", "", WeatherArguments) | {"function": {"name": "bad", "parameters": {"type": "objectx"}}}],
                tool_choice="required",
            ),
            "tools",
        ),
    ]
    for extra, field in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            sdk.chat.completions.create(model=SMOL, messages=ASK, **extra)
        assert caught.value.body["param"] == field, caught.value.message


def test_langchain_gets_structured_output_and_tool_calls(serve_app):
    chat = ChatOpenAI(model=SMOL, base_url=f"{serve_app.url}/v1", api_key="unused", temperature=0, max_retries=0)

    class City(pydantic.BaseModel):
        name: Annotated[str, pydantic.Field(max_length=40)]
        country: Annotated[str, pydantic.Field(max_length=40)]

    city = chat.with_structured_output(City, method="json_schema").invoke("Name a city in France.")
    assert isinstance(city, City)
    message = chat.bind_tools(TOOLS, tool_choice="get_weather").invoke(ASK[0]["content"])
    [call] = message.tool_calls
    assert call["name"] == "get_weather" and WeatherArguments.model_validate(call["args"])


def test_auto_gives_the_models_call_or_its_text_whole_and_streamed_alike(sdk, report):
    # The packaged 135M model answers this in words (its template has no tools, and it was not
    # trained on calls); reading calls out of text is tested in tests/serve_app/test_tool_calls.py.
    asked = dict(model=SMOL, messages=ASK, tools=TOOLS, temperature=0, max_tokens=96)
    whole = sdk.chat.completions.create(**asked).choices[0]
    streamed_text, calls, finish = "", {}, None
    for chunk in sdk.chat.completions.create(**asked, stream=True):
        delta = chunk.choices[0].delta
        streamed_text += delta.content or ""
        for call in delta.tool_calls or []:
            calls[call.index] = (call.function.name, json.loads(call.function.arguments))
        finish = chunk.choices[0].finish_reason or finish
    assert finish == whole.finish_reason and streamed_text == (whole.message.content or "")
    assert list(calls.values()) == [(c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls or []]
    assert (finish == "tool_calls") == bool(calls)
    assert "<tool_call>" not in streamed_text or not calls  # a call read out of the text is not also text
    report(f"auto: finish {finish}, calls {list(calls.values())}, text {streamed_text[:80]!r}")


# The Responses API's function tools: chat completions' `function`, flat.
RESPONSE_TOOLS = [{"type": "function", **tool["function"]} for tool in TOOLS]


def test_responses_call_a_required_tool_whole_and_streamed_alike(sdk):
    ask = dict(model=SMOL, input=ASK[0]["content"], tools=RESPONSE_TOOLS, tool_choice="required", temperature=0)
    response = sdk.responses.create(**ask)
    assert response.status == "completed" and [item.type for item in response.output] == ["function_call"] * len(response.output)
    calls = [(item.name, item.arguments, item.call_id) for item in response.output]
    for name, arguments, _ in calls:
        VALIDATORS[name].model_validate_json(arguments)  # raises unless the arguments validate
    assert [tool.name for tool in response.tools] == ["get_weather", "get_time"] and response.tool_choice == "required"
    events = list(sdk.responses.create(**ask, stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert [(item.name, item.arguments) for item in done] == [(name, arguments) for name, arguments, _ in calls]
    assert "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta") == "".join(
        arguments for _, arguments, _ in calls
    )
    assert [(i.name, i.arguments) for i in events[-1].response.output] == [(name, args) for name, args, _ in calls]
    assert not any(e.type == "response.output_text.delta" for e in events)  # a forced call has no text


def test_responses_take_a_calls_output_back_and_answer_from_it(sdk):
    first = sdk.responses.create(
        model=SMOL, input=ASK[0]["content"], tools=RESPONSE_TOOLS, tool_choice={"type": "function", "name": "get_weather"}
    )
    (call,) = first.output
    assert call.name == "get_weather"
    history = [
        ASK[0],
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 degrees celsius."},
    ]
    second = sdk.responses.create(model=SMOL, input=history, tools=RESPONSE_TOOLS, temperature=0, max_output_tokens=64)
    assert second.status in ("completed", "incomplete") and second.output[0].type == "message"
    assert "21" in second.output_text  # it read the result
    assert second.usage.input_tokens > first.usage.input_tokens


def test_responses_tool_requests_that_cannot_run_are_bad_requests_naming_the_field(sdk):
    cases = [
        (dict(tools=RESPONSE_TOOLS, tool_choice={"type": "function", "name": "nope"}), "tool_choice"),
        (dict(tool_choice="required"), "tool_choice"),
        (dict(tools=[RESPONSE_TOOLS[0], RESPONSE_TOOLS[0]]), "tools"),
        (dict(tools=RESPONSE_TOOLS, tool_choice="required", text={"format": {"type": "json_object"}}), "text.format"),
        (
            dict(input=[ASK[0], {"type": "function_call", "call_id": "c", "name": "get_time", "arguments": "[1]"}]),
            "input.items.1.function_call.arguments",
        ),
    ]
    for extra, field in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            sdk.responses.create(**{"model": SMOL, "input": ASK[0]["content"], **extra})
        assert caught.value.body["param"] == field, caught.value.message
