"""Users and their API keys, in the history's SQLite file (`auth: users`).

A key is 192 random bits; only its SHA-256 is stored, with its first characters to tell keys
apart in listings. A fast hash is enough: the keys are random, so there is nothing to guess from
a leaked hash that a slow hash would protect. Every request's key is looked up here, in the one
process that owns the file, so a revoked key is refused by every ingress replica at once.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime

import aiosqlite

from deployments.history_records import ApiKeyInfo, User

USERS_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL UNIQUE,
    admin       INTEGER NOT NULL DEFAULT 0,
    created_at  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id     INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    prefix      TEXT NOT NULL,
    hash        BLOB NOT NULL UNIQUE,
    created_at  TEXT NOT NULL,
    revoked_at  TEXT
);
"""

KEY_PREFIX = "rc-"
SHOWN_CHARS = 10  # of a key, in listings: "rc-" and 7 random characters
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"


class UserError(ValueError):
    """A user or key that does not exist, or a name taken already: said to the operator."""


def key_hash(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _now_text() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


class UserAccounts:
    """The users and keys part of the history store (mixed into `HistoryStore`, on its connection)."""

    @property
    def db(self) -> aiosqlite.Connection:
        raise NotImplementedError  # the store's open connection

    def transaction(self) -> AbstractAsyncContextManager[aiosqlite.Connection]:
        raise NotImplementedError  # the store's `transaction`: one write, whole

    async def add_user(self, name: str, admin: bool = False) -> tuple[User, str]:
        """A new user and its first key (returned once, never stored)."""
        if not re.match(NAME_PATTERN, name):
            raise UserError(f"a user name is 1-64 letters, digits and . _ @ - (not '{name}')")
        async with self.transaction() as db:
            try:
                await db.execute("INSERT INTO users (name, admin, created_at) VALUES (?, ?, ?)", (name, int(admin), _now_text()))
            except aiosqlite.IntegrityError:
                raise UserError(f"user '{name}' exists already (`rotate` gives it a new key)") from None
            user = await self._user(name)
            key = await self._new_key(user.id)
        return user, key

    async def ensure_user(self, name: str, admin: bool) -> User:
        """The user named `name`, created without a key if there is none."""
        async with self.transaction() as db:
            await db.execute(
                "INSERT INTO users (name, admin, created_at) VALUES (?, ?, ?) ON CONFLICT(name) DO NOTHING",
                (name, int(admin), _now_text()),
            )
        return await self._user(name)

    async def rotate_key(self, name: str) -> str:
        """Revokes every key of `name` and returns a new one."""
        async with self.transaction() as db:
            user = await self._user(name)
            await db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE user_id = ? AND revoked_at IS NULL", (_now_text(), user.id)
            )
            key = await self._new_key(user.id)
        return key

    async def revoke_key(self, prefix: str) -> int:
        """Revokes the live keys starting with `prefix` (at least what listings show); how many."""
        if len(prefix) < SHOWN_CHARS:
            raise UserError(f"give at least the {SHOWN_CHARS} characters that `list` shows of a key")
        async with self.transaction() as db:
            cursor = await db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE prefix = ? AND revoked_at IS NULL", (_now_text(), prefix[:SHOWN_CHARS])
            )
        if cursor.rowcount == 0:
            raise UserError(f"no live key starts with '{prefix}'")
        return cursor.rowcount

    async def list_users(self) -> list[User]:
        async with self.db.execute("SELECT * FROM users ORDER BY name") as cursor:
            return [User(**dict(row)) async for row in cursor]

    async def list_keys(self) -> list[ApiKeyInfo]:
        query = (
            "SELECT api_keys.prefix, users.name AS user, api_keys.created_at, api_keys.revoked_at"
            " FROM api_keys JOIN users ON users.id = api_keys.user_id ORDER BY users.name, api_keys.id"
        )
        async with self.db.execute(query) as cursor:
            return [ApiKeyInfo(**dict(row)) async for row in cursor]

    async def authenticate(self, hashed: bytes) -> User | None:
        """The user whose live key hashes to `hashed` (`key_hash`), or None."""
        query = (
            "SELECT users.*, api_keys.hash FROM api_keys JOIN users ON users.id = api_keys.user_id"
            " WHERE api_keys.hash = ? AND api_keys.revoked_at IS NULL"
        )
        async with self.db.execute(query, (hashed,)) as cursor:
            row = await cursor.fetchone()
        # The index finds the row by the hash; the comparison itself takes the same time for any key.
        if row is None or not hmac.compare_digest(row["hash"], hashed):
            return None
        return User(**dict(row))  # `hash` is not a field: dropped

    async def _user(self, name: str) -> User:
        async with self.db.execute("SELECT * FROM users WHERE name = ?", (name,)) as cursor:
            row = await cursor.fetchone()
        if row is None:
            raise UserError(f"no user '{name}'")
        return User(**dict(row))

    async def _new_key(self, user_id: int) -> str:
        key = KEY_PREFIX + secrets.token_urlsafe(24)  # 192 bits
        await self.db.execute(
            "INSERT INTO api_keys (user_id, prefix, hash, created_at) VALUES (?, ?, ?, ?)",
            (user_id, key[:SHOWN_CHARS], key_hash(key), _now_text()),
        )
        return key
