"""OpenAI's tool calls on chat completions: what a forced call decodes under, and the calls read
back from an answer.

- `tool_choice` "required" or a named function: the answer is decoded under a JSON schema of the
  calls (one call, or with `parallel_tool_calls` a list of them), so every call names a tool and
  its arguments validate against that tool's parameters.
- "auto": the model's text is read for calls in the Hermes format the prompt asked for (see
  `deployments.tool_prompt`); text that is not a call stays text.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from deployments.engine.sampling_params import Constraint
from deployments.tool_prompt import TOOL_CALL_CLOSE, TOOL_CALL_OPEN


@dataclass(frozen=True)
class Call:
    name: str
    arguments: str  # JSON text of an object, as OpenAI gives it
    id: str

    def openai(self) -> dict[str, Any]:
        """As OpenAI's chat completions give it (and a conversation stores it)."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def call_stem() -> str:
    """The random part of one answer's call ids: its n-th call is `call_<stem>_<n>`."""
    return uuid.uuid4().hex[:20]


def new_call(name: str, arguments: Any, stem: str, number: int) -> Call:
    return Call(name, json.dumps(arguments, ensure_ascii=False), f"call_{stem}_{number}")


def _call_schema(tools: list[dict[str, Any]]) -> dict[str, Any]:
    """A JSON schema of one call of one of `tools` (OpenAI's function definitions)."""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": tool["function"]["name"]},
                "arguments": tool["function"].get("parameters") or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool in tools
    ]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def forced_constraint(tools: list[dict[str, Any]], name: str | None, parallel: bool) -> Constraint:
    """The constraint of a forced call: of the tool `name`, else of any of `tools` (several
    at once if `parallel`)."""
    if name is not None:
        schema = _call_schema([tool for tool in tools if tool["function"]["name"] == name])
    else:
        schema = _call_schema(tools)
        if parallel:
            schema = {"type": "array", "items": schema, "minItems": 1}
    return Constraint(json_schema=json.dumps(schema), field="tools")


def forced_calls(text: str, stem: str) -> list[Call]:
    """The calls of an answer decoded under `forced_constraint` (complete: it parses), their ids
    made of `stem`."""
    value = json.loads(text)
    return [
        new_call(call["name"], call["arguments"], stem, n) for n, call in enumerate(value if isinstance(value, list) else [value])
    ]


_CALL = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)


def _parsed_call(body: str, names: Collection[str]) -> dict[str, Any] | None:
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or value.get("name") not in names or not isinstance(value.get("arguments", {}), dict):
        return None
    return value


def calls_in_text(text: str, names: Collection[str], stem: str) -> tuple[str, list[Call]]:
    """An "auto" answer's text without its calls, and the calls (their ids made of `stem`): each
    `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` that names one of `names` with an
    object of arguments. Anything else, a malformed call included, stays text."""
    calls: list[Call] = []

    def take(match: re.Match) -> str:
        call = _parsed_call(match[1], names)
        if call is None:
            return match[0]
        calls.append(new_call(call["name"], call.get("arguments", {}), stem, len(calls)))
        return ""

    rest = _CALL.sub(take, text)
    return (rest.strip() if calls else rest), calls


class CallSplitter:
    """Streams an "auto" answer's text as it comes, up to where a call may start: from
    `<tool_call>` on (or a tail that may begin it), text is held until the answer ends."""

    def __init__(self) -> None:
        self.held = ""
        self._in_call = False

    def feed(self, text: str) -> str:
        """The part of `text` that can go to the client now."""
        if self._in_call:
            self.held += text
            return ""
        text = self.held + text
        start = text.find(TOOL_CALL_OPEN)
        if start >= 0:
            self._in_call, self.held = True, text[start:]
            return text[:start]
        # Hold a tail that may be the tag's beginning ("<tool_c"), lest it be sent as text.
        keep = next((n for n in range(min(len(text), len(TOOL_CALL_OPEN) - 1), 0, -1) if TOOL_CALL_OPEN.startswith(text[-n:])), 0)
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep]


@dataclass(frozen=True)
class CallReader:
    """How the answers of a request with tools are read back: the tools they may call, and
    whether a call was forced."""

    names: frozenset[str]
    forced: bool

    @classmethod
    def of(cls, tools: list[dict[str, Any]] | None, forced: bool) -> CallReader | None:
        """The reader of answers that may call `tools` (templates' definitions); None: no tools."""
        return cls(frozenset(tool["function"]["name"] for tool in tools), forced) if tools else None

    def split(self, text: str, finished: bool, stem: str) -> tuple[str | None, list[Call]]:
        """The answer's text that is not a call (None if there is none beside calls), and its
        calls, their ids made of `stem` (`call_stem`: one per answer, so that reading it again
        gives the same ids: those a conversation stores are those its client saw). A forced
        call is the whole answer once its grammar is complete (`finished`: it ended with
        "stop"); cut short (max_tokens, a stop string), it is returned as text."""
        calls: list[Call] = []
        content: str | None = text
        if self.forced:
            if finished:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    calls, content = forced_calls(text, stem), None
        else:
            content, calls = calls_in_text(text, self.names, stem)
        return (None if calls and not content else content), calls
