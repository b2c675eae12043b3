from __future__ import annotations

import json

import pytest

from serve_app.tool_calls import CallSplitter, call_stem, calls_in_text, forced_calls, forced_constraint

WEATHER = {
    "type": "function",
    "function": {"name": "weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}
TIME = {"type": "function", "function": {"name": "time"}}


def test_a_forced_call_is_decoded_under_the_schema_of_the_tools_calls():
    one = json.loads(forced_constraint([WEATHER, TIME], "weather", parallel=True).json_schema)
    assert one["properties"] == {"name": {"const": "weather"}, "arguments": WEATHER["function"]["parameters"]}
    assert one["required"] == ["name", "arguments"] and one["additionalProperties"] is False
    several = json.loads(forced_constraint([WEATHER, TIME], None, parallel=True).json_schema)
    assert several["type"] == "array" and several["minItems"] == 1
    assert [c["properties"]["name"]["const"] for c in several["items"]["anyOf"]] == ["weather", "time"]
    assert json.loads(forced_constraint([WEATHER, TIME], None, parallel=False).json_schema)["anyOf"][1]["properties"][
        "arguments"
    ] == {"type": "object"}
    assert forced_constraint([WEATHER], None, parallel=False).field == "tools"


def test_forced_calls_are_read_from_one_call_or_a_list():
    [call] = forced_calls('{"name": "weather", "arguments": {"city": "Paris"}}', call_stem())
    assert (call.name, json.loads(call.arguments)) == ("weather", {"city": "Paris"}) and call.id.startswith("call_")
    calls = forced_calls('[{"name": "time", "arguments": {}}, {"name": "weather", "arguments": {"city": "Oslo"}}]', "s")
    assert [c.name for c in calls] == ["time", "weather"] and len({c.id for c in calls}) == 2
    assert [c.id for c in calls] == ["call_s_0", "call_s_1"]  # read again, the same ids


@pytest.mark.parametrize(
    ("text", "content", "called"),
    [
        ('<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>', "", ["weather"]),
        ('Let me look.\n<tool_call>{"name": "time", "arguments": {}}</tool_call>', "Let me look.", ["time"]),
        (
            '<tool_call>{"name": "time", "arguments": {}}</tool_call><tool_call>{"name": "weather", "arguments": {}}</tool_call>',
            "",
            ["time", "weather"],
        ),
        ("It is sunny in Paris.", "It is sunny in Paris.", []),
        (
            '<tool_call>{"name": "unknown", "arguments": {}}</tool_call>',
            '<tool_call>{"name": "unknown", "arguments": {}}</tool_call>',
            [],
        ),
        ("<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", []),
        (
            '<tool_call>{"name": "time", "arguments": [1]}</tool_call>',
            '<tool_call>{"name": "time", "arguments": [1]}</tool_call>',
            [],
        ),
    ],
)
def test_auto_calls_are_read_from_the_text_and_anything_else_stays_text(text, content, called):
    rest, calls = calls_in_text(text, {"weather", "time"}, call_stem())
    assert rest == content and [c.name for c in calls] == called


def test_the_splitter_streams_text_up_to_where_a_call_may_start():
    splitter = CallSplitter()
    assert splitter.feed("Hello <") == "Hello "  # "<" may begin a call
    assert splitter.feed("b>bold</b> and <tool_c") == "<b>bold</b> and "
    assert splitter.feed('all>{"name": "time"') == "" and splitter.feed(', "arguments": {}}</tool_call> after') == ""
    assert splitter.held == '<tool_call>{"name": "time", "arguments": {}}</tool_call> after'
    plain = CallSplitter()
    assert "".join(plain.feed(piece) for piece in ["a <", "3 and", " b<"]) + plain.held == "a <3 and b<"
