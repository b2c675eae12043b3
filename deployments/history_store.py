"""The conversation history in one SQLite file, through aiosqlite.

Owns the schema and every read and write of conversations and messages. Exactly one process
opens the file (the history deployment), so there is no cross-process locking to think about;
WAL mode keeps reads cheap while a write commits, and `synchronous=FULL` makes a committed
turn survive a kill -9 or power loss. A message is written in one INSERT once it is final, so
history never holds half-written rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite

from deployments.history_records import Conversation, ConversationSummary, Message, MessageRole, MessageStatus
from deployments.quotas import USAGE_SCHEMA, Quotas, StreamBook, UserQuotas
from deployments.turn_claims import TurnClaims
from deployments.user_accounts import USERS_SCHEMA, UserAccounts

CONVERSATIONS_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: ids of deleted ones never return
    title       TEXT,
    owner_id    INTEGER REFERENCES users(id),  -- NULL: made without users (auth none or key)
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
"""
MESSAGES_TABLE = """
CREATE TABLE IF NOT EXISTS messages (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id  INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role             TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant', 'tool')),
    content          TEXT NOT NULL,
    model            TEXT,
    parameters       TEXT,  -- JSON
    status           TEXT NOT NULL DEFAULT 'complete' CHECK (status IN ('complete', 'stopped', 'failed')),
    error            TEXT,
    prompt_tokens    INTEGER,  -- assistant rows: tokens the model read (history included)
    completion_tokens INTEGER,  -- assistant rows: tokens it generated
    tool_calls       TEXT,  -- JSON: an assistant's calls
    tool_call_id     TEXT,  -- a tool's result: the call it answers
    created_at       TEXT NOT NULL
)"""
MESSAGES_INDEX = "CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages (conversation_id, id)"
SCHEMA = f"{CONVERSATIONS_SCHEMA}{MESSAGES_TABLE};\n{MESSAGES_INDEX};\n"
# Databases written before users existed: their conversations have no owner yet (`adopt_unowned`).
MIGRATIONS = {"owner_id": "ALTER TABLE conversations ADD COLUMN owner_id INTEGER REFERENCES users(id)"}
# The columns of `messages` before tool turns were stored; its CHECK on `role` cannot be altered,
# so such a table is copied into one of today's schema.
MESSAGE_COLUMNS_BEFORE_TOOLS = (
    "id, conversation_id, role, content, model, parameters, status, error, prompt_tokens, completion_tokens, created_at"
)
# Only conversations of `owner` (a user id); None: everyone's (auth none or key).
OWNED = "(:owner IS NULL OR owner_id = :owner)"
SUMMARY = "SELECT id, title, created_at, updated_at FROM conversations"

TITLE_CHARS = 60

logger = logging.getLogger(__name__)


class ConversationNotFoundError(LookupError):
    def __init__(self, conversation_id: int | str):
        self.conversation_id = conversation_id
        super().__init__(f"conversation '{conversation_id}' not found")

    def __reduce__(self):
        # Raised in the history replica and pickled to the caller: rebuild it from the id, not
        # from the message (which would read "conversation 'conversation '5' not found' not found").
        return type(self), (self.conversation_id,)


class UnansweredCallError(ValueError):
    """A turn's prompt `index` is a tool result for a call its conversation does not wait for."""

    def __init__(self, index: int, tool_call_id: str | None, conversation_id: int, waiting: list[str]):
        self.index, self.tool_call_id, self.conversation_id, self.waiting = index, tool_call_id, conversation_id, waiting
        super().__init__(
            f"{tool_call_id!r} answers no call that conversation {conversation_id} waits for (its last answer's calls: {waiting})"
        )

    def __reduce__(self):
        return type(self), (self.index, self.tool_call_id, self.conversation_id, self.waiting)


@dataclass
class _PromptWrite:
    """A turn's prompt being stored (`begin_turn`): the turn, the write, and the title it gives
    an untitled conversation (None: it gives none)."""

    turn_id: str
    task: asyncio.Task[list[Message]]
    title: str | None


def _now() -> datetime:
    return datetime.now(UTC)


def _as_text(moment: datetime) -> str:
    # Fixed-width ISO 8601 in UTC: the text sorts as the times do (`ORDER BY updated_at`).
    return moment.isoformat(timespec="microseconds")


def _inserted_id(cursor: aiosqlite.Cursor) -> int:
    # sqlite3 sets lastrowid on every successful INSERT; None would mean no row was inserted.
    if cursor.lastrowid is None:
        raise RuntimeError("the INSERT returned no row id")
    return cursor.lastrowid


def title_from_prompt(prompt: str) -> str:
    line = " ".join(prompt.split())
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1].rstrip() + "…"


def _title_of(messages: list[dict[str, Any]]) -> str | None:
    """The title that storing `messages` (dicts of `Message`'s fields) gives an untitled
    conversation: its first user message's, if it has one."""
    return next((title_from_prompt(m["content"]) for m in messages if m["role"] == "user"), None)


def _log_failed_prompt(task: asyncio.Task) -> None:
    # A conversation deleted meanwhile is no failure: its answer's write finds it gone too.
    if not task.cancelled() and (error := task.exception()) and not isinstance(error, ConversationNotFoundError):
        logger.error("storing a turn's prompt failed", exc_info=error)


async def _written(prompt: _PromptWrite | None) -> list[Message]:
    """Waits for a turn's prompt to be stored; what it stored ([] for none, or where the write
    failed: `_log_failed_prompt` says why)."""
    if prompt is None:
        return []
    try:
        return await asyncio.shield(prompt.task)
    except Exception:  # noqa: BLE001 - logged by `_log_failed_prompt`
        return []


class HistoryStore(UserAccounts, UserQuotas):
    """Conversations, messages, (`UserAccounts`) users and their keys, and (`UserQuotas`) their
    limits and usage. A conversation belongs to the user who made it: every method that takes
    an `owner` (a user id) finds only that user's conversations, and another's is "not found",
    as one that never existed."""

    def __init__(self, path: Path, quotas: Quotas | None = None):
        self.path = Path(path)
        self._db: aiosqlite.Connection | None = None
        # Which turn answers in which conversation (one at a time each): see `turn_claims`.
        self.turns = TurnClaims()
        # Each user's streams and recent requests, against their limits: see `quotas`.
        self.streams = StreamBook()
        self.quotas = quotas or Quotas()
        self._unwritten: dict[tuple[int, str], tuple[int, int, int]] = {}
        self._writing: asyncio.Task | None = None
        self._write_lock = asyncio.Lock()
        # The prompt each conversation's turn stores, until its answer or `end_turn` (one turn at a time).
        self._prompts: dict[int, _PromptWrite] = {}

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = await aiosqlite.connect(self.path)
        self._db.row_factory = aiosqlite.Row
        await self._db.execute("PRAGMA journal_mode=WAL")
        await self._db.execute("PRAGMA synchronous=FULL")
        await self._migrate_messages()
        await self._db.execute("PRAGMA foreign_keys=ON")
        await self._db.executescript(USERS_SCHEMA + SCHEMA + USAGE_SCHEMA)
        async with self._db.execute("PRAGMA table_info(conversations)") as cursor:
            columns = {row["name"] async for row in cursor}
        for column, statement in MIGRATIONS.items():
            if column not in columns:
                await self._db.execute(statement)
        await self._db.execute("CREATE INDEX IF NOT EXISTS conversations_by_owner ON conversations (owner_id, id)")
        await self._db.commit()

    async def _migrate_messages(self) -> None:
        """Rebuilds a `messages` table written before tool turns (SQLite's own recipe for a
        changed constraint: a new table, the rows copied with their ids, the old one dropped),
        in one transaction, with foreign keys off so the conversations' rows are left alone."""
        async with self.db.execute("PRAGMA table_info(messages)") as cursor:
            columns = {row["name"] async for row in cursor}
        if not columns or "tool_calls" in columns:
            return
        old = "messages_before_tools"
        await self.db.execute("BEGIN")
        await self.db.execute(f"ALTER TABLE messages RENAME TO {old}")
        await self.db.execute("DROP INDEX messages_by_conversation")
        await self.db.execute(MESSAGES_TABLE)
        await self.db.execute(MESSAGES_INDEX)
        copied = MESSAGE_COLUMNS_BEFORE_TOOLS
        await self.db.execute(f"INSERT INTO messages ({copied}) SELECT {copied} FROM {old}")
        # AUTOINCREMENT's high mark: the ids of messages deleted before still never return.
        await self.db.execute("DELETE FROM sqlite_sequence WHERE name = 'messages'")
        await self.db.execute("UPDATE sqlite_sequence SET name = 'messages' WHERE name = ?", (old,))
        await self.db.execute(f"DROP TABLE {old}")
        await self.db.commit()

    async def adopt_unowned(self, owner_name: str) -> int:
        """Gives every conversation without an owner (made before `auth: users`) to the user
        `owner_name`, an admin made without a key if there is none; how many it took."""
        owner = await self.ensure_user(owner_name, admin=True)
        async with self.transaction() as db:
            cursor = await db.execute("UPDATE conversations SET owner_id = ? WHERE owner_id IS NULL", (owner.id,))
        return cursor.rowcount

    async def close(self) -> None:
        if self._db is not None:
            if self._writing is not None:
                self._writing.cancel()
                self._writing = None
            await self.write_usage()
            await self._db.close()
            self._db = None

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("HistoryStore.open() was not called")
        return self._db

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """The connection for one write, committed at the end or rolled back on any error
        (cancellation included). One write at a time: the connection has one transaction, and
        two writes' statements would interleave at their awaits, so that one's commit published
        the other's half and one's rollback undid rows the other's caller was told were stored."""
        async with self._write_lock:
            try:
                yield self.db
            except BaseException:
                await self.db.rollback()
                raise
            await self.db.commit()

    async def create_conversation(self, title: str | None = None, owner: int | None = None) -> ConversationSummary:
        now = _now()
        async with self.transaction() as db:
            cursor = await db.execute(
                "INSERT INTO conversations (title, owner_id, created_at, updated_at) VALUES (?, ?, ?, ?)",
                (title, owner, _as_text(now), _as_text(now)),
            )
        return ConversationSummary(id=_inserted_id(cursor), title=title, created_at=now, updated_at=now)

    async def list_conversation_ids(self, owner: int | None = None) -> list[int]:
        async with self.db.execute(f"SELECT id FROM conversations WHERE {OWNED} ORDER BY id", {"owner": owner}) as cursor:
            return [row["id"] async for row in cursor]

    async def list_conversations(self, owner: int | None = None) -> list[ConversationSummary]:
        """Newest activity first."""
        query = f"{SUMMARY} WHERE {OWNED} ORDER BY updated_at DESC, id DESC"
        async with self.db.execute(query, {"owner": owner}) as cursor:
            return [ConversationSummary(**dict(row)) async for row in cursor]

    async def _summary(self, conversation_id: int, owner: int | None = None) -> ConversationSummary:
        query = f"{SUMMARY} WHERE id = :id AND {OWNED}"
        async with self.db.execute(query, {"id": conversation_id, "owner": owner}) as cursor:
            row = await cursor.fetchone()
        if row is None:
            raise ConversationNotFoundError(conversation_id)
        return ConversationSummary(**dict(row))

    async def get_conversation(self, conversation_id: int, owner: int | None = None) -> Conversation:
        summary = await self._summary(conversation_id, owner)
        async with self.db.execute("SELECT * FROM messages WHERE conversation_id = ? ORDER BY id", (conversation_id,)) as cursor:
            rows = [dict(row) async for row in cursor]
        for row in rows:
            for column in ("parameters", "tool_calls"):
                row[column] = json.loads(row[column]) if row[column] else None
        return Conversation(**summary.model_dump(), messages=[Message(**row) for row in rows])

    async def begin_turn(
        self,
        conversation_id: int,
        turn_id: str,
        owner: int | None = None,
        prompts: list[dict[str, Any]] | None = None,
        model: str | None = None,
        parameters: dict[str, Any] | None = None,
    ) -> Conversation:
        """The conversation, claimed for one answer by `turn_id` until that answer is stored
        (`append_message(..., ends_turn=turn_id)`) or `end_turn`; `ConversationBusyError` while
        another answer streams in it. Someone else's conversation is not found before it could
        be found busy: a 409 would tell them it exists.

        `prompts`, the turn's prompt (a user's message, or the results of the calls the last
        answer made; each a dict of `Message`'s fields), are stored after the conversation is
        read, in a write that the call does not wait for: its commit (an fsync) would delay the
        first token, and a call of its own would cost the ingress and this replica more than
        the write. The answer's write waits for it; `end_turn` (the turn did not start) takes it
        back. A result for a call the conversation does not wait for is `UnansweredCallError`."""
        if owner is not None:
            await self._summary(conversation_id, owner)
        self.turns.claim(conversation_id, turn_id)
        try:
            conversation = await self.get_conversation(conversation_id, owner)
            waiting = conversation.waiting_calls()
            for index, prompt in enumerate(prompts or []):
                if prompt["role"] == "tool" and prompt.get("tool_call_id") not in waiting:
                    raise UnansweredCallError(index, prompt.get("tool_call_id"), conversation_id, sorted(waiting))
        except BaseException:
            self.turns.release(conversation_id, turn_id)
            raise
        if prompts:
            task = asyncio.create_task(self._append(conversation_id, prompts, model, parameters, None))
            task.add_done_callback(_log_failed_prompt)
            title = _title_of(prompts) if conversation.title is None else None
            self._prompts[conversation_id] = _PromptWrite(turn_id, task, title)
        return conversation

    async def renew_turn(self, conversation_id: int, turn_id: str) -> None:
        self.turns.claim(conversation_id, turn_id)

    async def end_turn(self, conversation_id: int, turn_id: str) -> None:
        """Gives a turn's claim back without an answer: it did not start (the prompt that
        `begin_turn` stored is deleted, and the title it gave) or its conversation is gone."""
        try:
            prompt = self._take_prompt(conversation_id, turn_id)
            stored = await _written(prompt)
            if prompt is not None and stored:
                async with self.transaction() as db:
                    await db.execute(f"DELETE FROM messages WHERE id IN ({', '.join('?' * len(stored))})", [m.id for m in stored])
                    if prompt.title is not None:  # unless renamed meanwhile
                        await db.execute(
                            "UPDATE conversations SET title = NULL WHERE id = ? AND title = ?", (conversation_id, prompt.title)
                        )
        finally:
            self.turns.release(conversation_id, turn_id)

    def _take_prompt(self, conversation_id: int, turn_id: str) -> _PromptWrite | None:
        """The prompt `begin_turn` stores for the turn, no longer pending (None: it stores none)."""
        prompt = self._prompts.get(conversation_id)
        if prompt is None or prompt.turn_id != turn_id:
            return None
        return self._prompts.pop(conversation_id)

    async def rename_conversation(self, conversation_id: int, title: str, owner: int | None = None) -> ConversationSummary:
        async with self.transaction() as db:
            cursor = await db.execute(
                f"UPDATE conversations SET title = :title, updated_at = :now WHERE id = :id AND {OWNED}",
                {"title": title, "now": _as_text(_now()), "id": conversation_id, "owner": owner},
            )
        if cursor.rowcount == 0:
            raise ConversationNotFoundError(conversation_id)
        return await self._summary(conversation_id)

    async def delete_conversation(self, conversation_id: int, owner: int | None = None) -> None:
        async with self.transaction() as db:
            cursor = await db.execute(
                f"DELETE FROM conversations WHERE id = :id AND {OWNED}", {"id": conversation_id, "owner": owner}
            )
        if cursor.rowcount == 0:
            raise ConversationNotFoundError(conversation_id)

    async def append_message(
        self,
        conversation_id: int,
        role: MessageRole,
        content: str,
        *,
        model: str | None = None,
        parameters: dict[str, Any] | None = None,
        status: MessageStatus = "complete",
        error: str | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        tool_calls: list[dict[str, Any]] | None = None,
        tool_call_id: str | None = None,
        replace_after: int | None = None,
        ends_turn: str | None = None,
    ) -> Message:
        """Adds one final message; the first user message also titles an untitled conversation.
        With `replace_after` (a message id), the messages after that one are deleted in the same
        transaction: a regenerated answer replaces the old one atomically. With `ends_turn`, that
        turn's claim on the conversation is given back, stored or not (deleted meanwhile)."""
        message = dict(
            role=role,
            content=content,
            status=status,
            error=error,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            tool_calls=tool_calls,
            tool_call_id=tool_call_id,
        )
        try:
            if ends_turn is not None:
                await _written(self._take_prompt(conversation_id, ends_turn))  # the answer follows its prompt
            [stored] = await self._append(conversation_id, [message], model, parameters, replace_after)
            return stored
        finally:
            if ends_turn is not None:
                self.turns.release(conversation_id, ends_turn)

    async def _append(
        self,
        conversation_id: int,
        messages: list[dict[str, Any]],
        model: str | None,
        parameters: dict[str, Any] | None,
        replace_after: int | None,
    ) -> list[Message]:
        now = _now()
        stored: list[Message] = []
        async with self.transaction() as db:
            if replace_after is not None:
                await db.execute("DELETE FROM messages WHERE conversation_id = ? AND id > ?", (conversation_id, replace_after))
            for fields in messages:
                message = Message(id=0, model=model, parameters=parameters, created_at=now, **fields)
                try:
                    cursor = await db.execute(
                        "INSERT INTO messages (conversation_id, role, content, model, parameters, status, error, prompt_tokens,"
                        " completion_tokens, tool_calls, tool_call_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            conversation_id,
                            message.role,
                            message.content,
                            model,
                            json.dumps(parameters) if parameters else None,
                            message.status,
                            message.error,
                            message.prompt_tokens,
                            message.completion_tokens,
                            json.dumps(message.tool_calls) if message.tool_calls else None,
                            message.tool_call_id,
                            _as_text(now),
                        ),
                    )
                except aiosqlite.IntegrityError:  # the foreign key: no such conversation (or deleted meanwhile)
                    raise ConversationNotFoundError(conversation_id) from None
                stored.append(message.model_copy(update={"id": _inserted_id(cursor)}))
            await db.execute(
                "UPDATE conversations SET updated_at = ?, title = COALESCE(title, ?) WHERE id = ?",
                (_as_text(now), _title_of(messages), conversation_id),
            )
        return stored
