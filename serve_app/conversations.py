"""Conversations as stored, shared by both APIs: the reads and writes of the history deployment
that routes pass through (list, create, get, rename, delete, export, a user's usage), and what a
turn reads of a conversation (its history as the model sees it) and adds to it (its prompt). A
turn's life (its claim, storing its prompt and answer) is `serve_app.turns`."""

from __future__ import annotations

from typing import Any

from deployments.call_channel import DeploymentHandleLike
from deployments.history_records import UserUsage
from deployments.history_store import ConversationNotFoundError
from serve_app.protocol import MAX_CONVERSATION_ID, ChatMessage, Conversation, ConversationSummary, Message


class UsageNotKeptError(LookupError):
    """Usage is counted per user, and the service has none (404)."""

    def __init__(self) -> None:
        super().__init__("usage is counted per user: the service runs without users (auth: users turns them on)")


def parse_conversation_id(raw: str | int) -> int:
    """Ids are positive integers that fit SQLite's INTEGER; anything else names no conversation
    (404, not 422, and never an overflow deeper down)."""
    if isinstance(raw, int):
        conversation_id = raw
    # Digits counted before int(), which refuses more than 4,300 of them.
    elif raw.isascii() and raw.isdigit() and len(raw) <= len(str(MAX_CONVERSATION_ID)):
        conversation_id = int(raw)
    else:
        raise ConversationNotFoundError(raw)
    if not 0 <= conversation_id <= MAX_CONVERSATION_ID:
        raise ConversationNotFoundError(raw)
    return conversation_id


def context_messages(history: list[Message]) -> list[dict[str, Any]]:
    """The earlier turns the model sees: each prompt (a user's message, or the results of the
    tools an answer called) with the answer that followed it, its calls included. Unanswered
    prompts and empty (failed) answers are left out, so that every prompt has its answer."""
    turns: list[dict[str, Any]] = []
    prompt: list[Message] = []
    for message in history:
        if message.role == "assistant":
            if prompt and (message.content or message.tool_calls):
                turns += [chat_message(m) for m in (*prompt, message)]
            prompt = []
        elif message.role == "tool" and prompt and prompt[-1].role == "tool":
            prompt.append(message)
        else:
            prompt = [message] if message.role in ("user", "tool") else []
    return turns


def chat_message(message: Message) -> dict[str, Any]:
    """A stored message as the chat template takes it."""
    fields = message.model_dump(include={"role", "content", "tool_calls", "tool_call_id"})
    return ChatMessage.model_validate(fields).template_message()


def stored_prompts(new_messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a turn stores of the messages it was sent: the user's prompt, or the tool results
    that end them (every message before is the caller's context, not the conversation's)."""
    if new_messages[-1]["role"] != "tool":
        return [{"role": "user", "content": new_messages[-1]["content"]}]
    results: list[dict[str, Any]] = []
    for message in reversed(new_messages):
        if message["role"] != "tool":
            break
        results.insert(0, {"role": "tool", "content": message["content"], "tool_call_id": message.get("tool_call_id")})
    return results


def conversation_markdown(conversation: Conversation) -> str:
    """A readable transcript: title, then each message under its speaker."""
    lines = [f"# {conversation.title or f'Conversation {conversation.id}'}", ""]
    for message in conversation.messages:
        if message.role == "user":
            speaker = "User"
        elif message.role == "tool":
            speaker = f"Tool result ({message.tool_call_id})"
        else:
            speaker = f"Assistant ({message.model})" if message.model else "Assistant"
        note = "" if message.status == "complete" else f" — {message.status}"
        lines += [f"## {speaker}{note}", ""]
        if message.content:
            lines += [message.content, ""]
        for call in message.tool_calls or []:
            lines += [
                f"Called `{call['function']['name']}` ({call['id']}):",
                "",
                "```json",
                call["function"]["arguments"],
                "```",
                "",
            ]
        if message.error:
            lines += [f"> error: {message.error}", ""]
    return "\n".join(lines)


class ConversationService:
    """History access: each method is one call on the history deployment, with the route's
    conversation id parsed first (`parse_conversation_id`). `owner`: the caller's user id
    (`auth: users`), whose conversations alone are found; None: everyone's
    (`serve_app.auth.Caller.owner`)."""

    def __init__(self, history: DeploymentHandleLike):
        self.history = history

    async def list_ids(self, owner: int | None) -> list[int]:
        return await self.history.list_conversation_ids.remote(owner)

    async def list_summaries(self, owner: int | None) -> list[ConversationSummary]:
        return await self.history.list_conversations.remote(owner)

    async def create(self, owner: int | None) -> ConversationSummary:
        return await self.history.create_conversation.remote(owner=owner)

    async def get(self, raw_id: str | int, owner: int | None) -> Conversation:
        return await self.history.get_conversation.remote(parse_conversation_id(raw_id), owner)

    async def rename(self, raw_id: str, title: str, owner: int | None) -> ConversationSummary:
        return await self.history.rename_conversation.remote(parse_conversation_id(raw_id), title, owner)

    async def delete(self, raw_id: str, owner: int | None) -> int:
        conversation_id = parse_conversation_id(raw_id)
        await self.history.delete_conversation.remote(conversation_id, owner)
        return conversation_id

    async def usage(self, user_id: int | None) -> list[UserUsage]:
        """Each user's usage today (None: every user's)."""
        return await self.history.usage.remote(user_id)
