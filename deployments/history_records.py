"""What the history deployment stores and returns: conversations and their messages.

Defined here, beside the store that owns them, so the store imports nothing from the HTTP side;
the wire protocol (`serve_app.protocol`) serves these models as they are.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel

# tool: a function's result, sent back in a chat with tools, answering the call of `tool_call_id`.
MessageRole = Literal["system", "user", "assistant", "tool"]
# complete: the answer ended normally; stopped: the client went away or pressed stop, the
# partial answer is kept; failed: generation raised, `error` says why.
MessageStatus = Literal["complete", "stopped", "failed"]


class Message(BaseModel):
    id: int
    role: MessageRole
    content: str
    model: str | None = None
    parameters: dict[str, Any] | None = None
    status: MessageStatus = "complete"
    error: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    # An assistant's calls, as OpenAI's chat completions give them ({"id", "type": "function",
    # "function": {"name", "arguments": JSON text}}); a tool's result, the call it answers.
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    created_at: datetime


class ConversationSummary(BaseModel):
    id: int
    title: str | None = None
    created_at: datetime
    updated_at: datetime


class Conversation(ConversationSummary):
    messages: list[Message] = []

    def waiting_calls(self) -> set[str]:
        """The ids of the calls whose results the conversation waits for: those of its last answer
        that made calls, unless a user's prompt or an answer in words came after it (an empty,
        failed answer to their results does not count: the results may be sent again)."""
        for message in reversed(self.messages):
            if message.role == "assistant" and message.tool_calls:
                return {call["id"] for call in message.tool_calls}
            if message.role == "user" or (message.role == "assistant" and message.content):
                return set()
        return set()


class User(BaseModel):
    """Someone with keys to the service when it runs with `auth: users`."""

    id: int
    name: str
    admin: bool = False
    created_at: datetime


class ApiKeyInfo(BaseModel):
    """A key as it may be shown: its first characters only (the rest is stored only as a hash)."""

    prefix: str
    user: str
    created_at: datetime
    revoked_at: datetime | None = None


class UserUsage(BaseModel):
    """One user's use of the service on one UTC day (`auth: users`)."""

    user: str
    admin: bool
    day: str  # YYYY-MM-DD
    requests: int  # generation requests that have ended
    prompt_tokens: int
    completion_tokens: int
    active_streams: int
    requests_last_minute: int
