from __future__ import annotations

import json

from deployments.tool_prompt import TOOL_CALL_OPEN, template_knows_tools, with_tools_in_text

WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}


def test_a_template_without_tools_gets_them_calls_and_results_as_text():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
    ]
    system, user, assistant, result = with_tools_in_text(messages, [WEATHER])
    assert system["content"].startswith("Be brief.\n\n") and json.dumps(WEATHER) in system["content"]
    assert user == {"role": "user", "content": "Weather in Paris?"}
    assert assistant["content"] == f'{TOOL_CALL_OPEN}\n{{"name": "weather", "arguments": {{"city": "Paris"}}}}\n</tool_call>'
    assert result == {"role": "user", "content": "<tool_response>\nsunny\n</tool_response>"}
    assert with_tools_in_text(messages[1:2], [WEATHER])[0]["role"] == "system"  # one is added
    assert with_tools_in_text(messages[1:], [])[0] == {"role": "user", "content": "Weather in Paris?"}  # no tools: none


def test_a_template_that_reads_tools_is_told_apart():
    assert template_knows_tools("{% if tools %}{{ tools | tojson }}{% endif %}")
    assert not template_knows_tools("{% for m in messages %}{{ m['content'] }}{% endfor %}") and not template_knows_tools(None)
