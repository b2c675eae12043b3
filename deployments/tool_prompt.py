"""Tools in a chat prompt: a model whose chat template knows tools gets them through it
(transformers' `apply_chat_template(tools=...)`); for one whose template does not (the packaged
SmolLM2's), the tools, the calls and their results are written into the messages in the Hermes
format that Qwen's and Hermes' templates use: the tools in the system message, each call as
`<tool_call>{"name": ..., "arguments": ...}</tool_call>` in the assistant's text, each result as
`<tool_response>...</tool_response>` in a user message. `serve_app.tool_calls` reads calls back
in the same format.
"""

from __future__ import annotations

import json
from typing import Any

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"

FALLBACK_INSTRUCTIONS = (
    "You may call one or more functions to answer. The functions, as JSON schemas:\n<tools>\nTOOLS\n</tools>\n"
    "To call a function, answer with a JSON object of its name and arguments between tags:\n"
    f'{TOOL_CALL_OPEN}\n{{"name": <function-name>, "arguments": <arguments-as-a-JSON-object>}}\n{TOOL_CALL_CLOSE}'
)


def template_knows_tools(chat_template: str | None) -> bool:
    """Whether a chat template renders `tools` (it reads the variable); transformers passes the
    tools to any template, and one that does not read them drops them silently."""
    return chat_template is not None and "tools" in chat_template


def _call_text(call: dict[str, Any]) -> str:
    function = call["function"]
    return f"{TOOL_CALL_OPEN}\n{json.dumps({'name': function['name'], 'arguments': function['arguments']})}\n{TOOL_CALL_CLOSE}"


def with_tools_in_text(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`messages` for a template without tool support: plain role/content messages that carry
    the tools (in the system message, if any), the assistant's calls and the tools' results."""
    rendered: list[dict[str, Any]] = []
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "assistant" and message.get("tool_calls"):
            content = "\n".join(([content] if content else []) + [_call_text(call) for call in message["tool_calls"]])
        elif role == "tool":
            role, content = "user", f"<tool_response>\n{content}\n</tool_response>"
        rendered.append({"role": role, "content": content})
    if not tools:
        return rendered
    instructions = FALLBACK_INSTRUCTIONS.replace("TOOLS", "\n".join(json.dumps(tool) for tool in tools))
    if rendered and rendered[0]["role"] == "system":
        rendered[0] = {"role": "system", "content": f"{rendered[0]['content']}\n\n{instructions}"}
    else:
        rendered.insert(0, {"role": "system", "content": instructions})
    return rendered
