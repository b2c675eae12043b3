"""The conversation history in one SQLite file, through aiosqlite.

Owns the schema and every read and write of conversations and messages. Exactly one process
opens the file (the history deployment), so there is no cross-process locking to think about;
WAL mode keeps reads cheap while a write commits, and `synchronous=FULL` makes a committed
turn survive a kill -9 or power loss. A message is written in one INSERT once it is final, so
history never holds half-written rows.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite

from deployments.history_records import Conversation, ConversationSummary, Message, MessageRole, MessageStatus
from deployments.turn_claims import TurnClaims

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: ids of deleted ones never return
    title       TEXT,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id  INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role             TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content          TEXT NOT NULL,
    model            TEXT,
    parameters       TEXT,  -- JSON
    status           TEXT NOT NULL DEFAULT 'complete' CHECK (status IN ('complete', 'stopped', 'failed')),
    error            TEXT,
    prompt_tokens    INTEGER,  -- assistant rows: tokens the model read (history included)
    completion_tokens INTEGER,  -- assistant rows: tokens it generated
    created_at       TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages (conversation_id, id);
"""

TITLE_CHARS = 60


class ConversationNotFoundError(LookupError):
    def __init__(self, conversation_id: int | str):
        self.conversation_id = conversation_id
        super().__init__(f"conversation '{conversation_id}' not found")

    def __reduce__(self):
        # Raised in the history replica and pickled to the caller: rebuild it from the id, not
        # from the message (which would read "conversation 'conversation '5' not found' not found").
        return type(self), (self.conversation_id,)


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


class HistoryStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._db: aiosqlite.Connection | None = None
        # Which turn answers in which conversation (one at a time each): see `turn_claims`.
        self.turns = TurnClaims()

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = await aiosqlite.connect(self.path)
        self._db.row_factory = aiosqlite.Row
        await self._db.execute("PRAGMA journal_mode=WAL")
        await self._db.execute("PRAGMA synchronous=FULL")
        await self._db.execute("PRAGMA foreign_keys=ON")
        await self._db.executescript(SCHEMA)
        await self._db.commit()

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("HistoryStore.open() was not called")
        return self._db

    async def create_conversation(self, title: str | None = None) -> ConversationSummary:
        now = _now()
        cursor = await self.db.execute(
            "INSERT INTO conversations (title, created_at, updated_at) VALUES (?, ?, ?)", (title, _as_text(now), _as_text(now))
        )
        await self.db.commit()
        return ConversationSummary(id=_inserted_id(cursor), title=title, created_at=now, updated_at=now)

    async def list_conversation_ids(self) -> list[int]:
        async with self.db.execute("SELECT id FROM conversations ORDER BY id") as cursor:
            return [row["id"] async for row in cursor]

    async def list_conversations(self) -> list[ConversationSummary]:
        """Newest activity first."""
        async with self.db.execute("SELECT * FROM conversations ORDER BY updated_at DESC, id DESC") as cursor:
            return [ConversationSummary(**dict(row)) async for row in cursor]

    async def _summary(self, conversation_id: int) -> ConversationSummary:
        async with self.db.execute("SELECT * FROM conversations WHERE id = ?", (conversation_id,)) as cursor:
            row = await cursor.fetchone()
        if row is None:
            raise ConversationNotFoundError(conversation_id)
        return ConversationSummary(**dict(row))

    async def get_conversation(self, conversation_id: int) -> Conversation:
        summary = await self._summary(conversation_id)
        async with self.db.execute("SELECT * FROM messages WHERE conversation_id = ? ORDER BY id", (conversation_id,)) as cursor:
            rows = [dict(row) async for row in cursor]
        for row in rows:
            row["parameters"] = json.loads(row["parameters"]) if row["parameters"] else None
        return Conversation(**summary.model_dump(), messages=[Message(**row) for row in rows])

    async def begin_turn(self, conversation_id: int, turn_id: str) -> Conversation:
        """The conversation, claimed for one answer by `turn_id` until that answer is stored
        (`append_message(..., ends_turn=turn_id)`) or `end_turn`; `ConversationBusyError` while
        another answer streams in it."""
        self.turns.claim(conversation_id, turn_id)
        try:
            return await self.get_conversation(conversation_id)
        except BaseException:
            self.turns.release(conversation_id, turn_id)
            raise

    async def renew_turn(self, conversation_id: int, turn_id: str) -> None:
        self.turns.claim(conversation_id, turn_id)

    async def end_turn(self, conversation_id: int, turn_id: str) -> None:
        self.turns.release(conversation_id, turn_id)

    async def rename_conversation(self, conversation_id: int, title: str) -> ConversationSummary:
        cursor = await self.db.execute(
            "UPDATE conversations SET title = ?, updated_at = ? WHERE id = ?", (title, _as_text(_now()), conversation_id)
        )
        await self.db.commit()
        if cursor.rowcount == 0:
            raise ConversationNotFoundError(conversation_id)
        return await self._summary(conversation_id)

    async def delete_conversation(self, conversation_id: int) -> None:
        cursor = await self.db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))
        await self.db.commit()
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
        replace_after: int | None = None,
        ends_turn: str | None = None,
    ) -> Message:
        """Adds one final message; the first user message also titles an untitled conversation.
        With `replace_after` (a message id), the messages after that one are deleted in the same
        transaction: a regenerated answer replaces the old one atomically. With `ends_turn`, that
        turn's claim on the conversation is given back, stored or not (deleted meanwhile)."""
        try:
            now = _now()
            try:
                if replace_after is not None:
                    await self.db.execute(
                        "DELETE FROM messages WHERE conversation_id = ? AND id > ?", (conversation_id, replace_after)
                    )
                cursor = await self.db.execute(
                    "INSERT INTO messages (conversation_id, role, content, model, parameters, status, error,"
                    " prompt_tokens, completion_tokens, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        conversation_id,
                        role,
                        content,
                        model,
                        json.dumps(parameters) if parameters else None,
                        status,
                        error,
                        prompt_tokens,
                        completion_tokens,
                        _as_text(now),
                    ),
                )
            except aiosqlite.IntegrityError:  # the foreign key: no such conversation (or deleted meanwhile)
                await self.db.rollback()
                raise ConversationNotFoundError(conversation_id) from None
            title = title_from_prompt(content) if role == "user" else None
            await self.db.execute(
                "UPDATE conversations SET updated_at = ?, title = COALESCE(title, ?) WHERE id = ?",
                (_as_text(now), title, conversation_id),
            )
            await self.db.commit()
            return Message(
                id=_inserted_id(cursor),
                role=role,
                content=content,
                model=model,
                parameters=parameters,
                status=status,
                error=error,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                created_at=now,
            )
        finally:
            if ends_turn is not None:
                self.turns.release(conversation_id, ends_turn)
