"""Per-user limits (`auth: users`): streams at once, requests a minute, generated tokens a day.

They are kept by the history deployment, the one process every ingress replica asks, so a limit
holds however many ingress replicas there are. A generation request starts a stream there before
any work is queued (`begin_stream`) and ends it when its last answer has ended (`end_stream`,
with the tokens it used). Streams are leases, like turn claims (`turn_claims`): one an ingress
replica never ends (it died) lapses unless renewed. The requests of the last minute are kept in
memory (a restart of the history replica forgets at most a minute of them); each day's counts
per user are in SQLite (`usage`), written within a second of each request's end.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections import deque
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

import aiosqlite
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from deployments.history_records import User, UserUsage
from deployments.turn_claims import TURN_LEASE_S
from deployments.user_accounts import NAME_PATTERN

USAGE_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    user_id            INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    day                TEXT NOT NULL,  -- UTC, YYYY-MM-DD
    requests           INTEGER NOT NULL DEFAULT 0,
    prompt_tokens      INTEGER NOT NULL DEFAULT 0,
    completion_tokens  INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, day)
);
"""

# The per-user metrics' label for the users past `metrics_users`: no user name starts with "_".
OTHER_USERS = "_other"
LimitName = Literal["concurrent_streams", "requests_per_minute", "tokens_per_day"]
WINDOW_S = 60.0
# How long the history keeps a day's new counts before writing them (`UserQuotas.end_stream`);
# what a kill -9 of the history replica can lose of them.
USAGE_WRITE_S = 1.0


class Limits(BaseModel):
    """One user's limits; None: unlimited."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    concurrent_streams: int | None = Field(default=None, gt=0)
    requests_per_minute: int | None = Field(default=None, gt=0)
    # Generated (completion) tokens per UTC day. A request is refused once the day's count has
    # reached it; the answers streaming at that moment finish.
    tokens_per_day: int | None = Field(default=None, gt=0)


UserName = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]


class Quotas(Limits):
    """Everyone's limits (the fields of `Limits`), with `users` overriding some of them by name:
    `{alice: {tokens_per_day: null}}` lifts only alice's daily limit."""

    # By default no one holds more than half the packaged model's batch (`max_batch_size` 16),
    # so one user's flood leaves the others room (docs/users.md#fairness measures it).
    concurrent_streams: int | None = Field(default=8, gt=0)
    users: dict[UserName, Limits] = {}
    # Users whose id is at most this have their own series in the per-user metrics; the others
    # share `user="_other"`, so a service with thousands of users keeps a bounded label set.
    metrics_users: int = Field(default=50, ge=0)

    def metrics_label(self, user_id: int, name: str) -> str:
        """The user's label in the per-user metrics: the name of one of the first
        `metrics_users` users (by id, so every ingress replica agrees), else `OTHER_USERS`."""
        return name if user_id <= self.metrics_users else OTHER_USERS

    def limits_of(self, name: str) -> Limits:
        defaults = Limits(**self.model_dump(include=set(Limits.model_fields)))
        override = self.users.get(name)
        return defaults.model_copy(update=override.model_dump(exclude_unset=True)) if override else defaults


class QuotaExceededError(RuntimeError):
    """A user's request over one of their limits (429 with `Retry-After`)."""

    WHAT = {
        "concurrent_streams": "streams at once",
        "requests_per_minute": "requests per minute",
        "tokens_per_day": "generated tokens per day (UTC)",
    }

    def __init__(self, limit: LimitName, allowed: int, retry_after_s: int):
        self.limit, self.allowed, self.retry_after_s = limit, allowed, retry_after_s
        super().__init__(
            f"rate limit reached: {self.WHAT[limit]}, at most {allowed} per user (`{limit}`); retry in {retry_after_s} s"
        )

    @property
    def counts(self) -> Literal["requests", "tokens"]:
        """What the limit counts (the `type` of OpenAI's rate-limit errors)."""
        return "tokens" if self.limit == "tokens_per_day" else "requests"

    def __reduce__(self):
        # Raised in the history replica and pickled to the ingress.
        return type(self), (self.limit, self.allowed, self.retry_after_s)


class StreamBook:
    """In memory: each user's streams (leases) and the starts of their requests in the last minute."""

    def __init__(self, lease_s: float = TURN_LEASE_S, clock: Callable[[], float] = time.monotonic):
        self.lease_s = lease_s
        self._clock = clock
        self._streams: dict[int, dict[str, float]] = {}  # user id -> lease -> when it lapses
        self._starts: dict[int, deque[float]] = {}  # user id -> request starts, oldest first

    def start(self, user_id: int, limits: Limits) -> str:
        """A new stream's lease, or `QuotaExceededError` (the request counted nowhere)."""
        now = self._clock()
        streams, starts = self._live(user_id, now)
        if limits.requests_per_minute is not None and len(starts) >= limits.requests_per_minute:
            wait = starts[len(starts) - limits.requests_per_minute] + WINDOW_S - now
            raise QuotaExceededError("requests_per_minute", limits.requests_per_minute, max(1, math.ceil(wait)))
        if limits.concurrent_streams is not None and len(streams) >= limits.concurrent_streams:
            # No time can be known: a stream ends when its answer does.
            raise QuotaExceededError("concurrent_streams", limits.concurrent_streams, 1)
        lease = secrets.token_hex(8)
        streams[lease] = now + self.lease_s
        starts.append(now)
        return lease

    def renew(self, user_id: int, lease: str) -> None:
        """Extends the lease; after a restart of the history replica, takes it again."""
        self._streams.setdefault(user_id, {})[lease] = self._clock() + self.lease_s

    def end(self, user_id: int, lease: str) -> None:
        streams = self._streams.get(user_id, {})
        streams.pop(lease, None)
        if not streams:
            self._streams.pop(user_id, None)

    def counts(self, user_id: int) -> tuple[int, int]:
        """The user's live streams and requests in the last minute."""
        streams, starts = self._live(user_id, self._clock())
        return len(streams), len(starts)

    def _live(self, user_id: int, now: float) -> tuple[dict[str, float], deque[float]]:
        # Lapsed leases and starts older than a minute are dropped as they are read.
        streams = {lease: ends for lease, ends in self._streams.get(user_id, {}).items() if ends > now}
        starts = self._starts.get(user_id, deque())
        while starts and starts[0] <= now - WINDOW_S:
            starts.popleft()
        self._streams[user_id], self._starts[user_id] = streams, starts
        return streams, starts


def today() -> str:
    return datetime.now(UTC).date().isoformat()


def seconds_to_tomorrow() -> int:
    now = datetime.now(UTC)
    tomorrow = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC)
    return max(1, math.ceil((tomorrow - now).total_seconds()))


class UserQuotas:
    """The limits and usage part of the history store (mixed into `HistoryStore`, on its
    connection, with its users: `UserAccounts`)."""

    streams: StreamBook
    quotas: Quotas
    # (user id, day) -> (requests, prompt tokens, generated tokens) counted and not written yet,
    # and the task that writes them.
    _unwritten: dict[tuple[int, str], tuple[int, int, int]]
    _writing: asyncio.Task | None

    @property
    def db(self) -> aiosqlite.Connection:
        raise NotImplementedError  # the store's open connection

    def transaction(self) -> AbstractAsyncContextManager[aiosqlite.Connection]:
        raise NotImplementedError  # the store's `transaction`: one write, whole

    async def authenticate(self, hashed: bytes) -> User | None:
        raise NotImplementedError  # `UserAccounts.authenticate`

    async def admit_user(self, hashed: bytes, streams: bool) -> tuple[User, str | QuotaExceededError | None] | None:
        """The user whose live key hashes to `hashed` (None: no such key) and, for a generation
        request (`streams`), a lease on one of their streams, or the `QuotaExceededError` of the
        limit it would pass: the one call an ingress makes to let a request in. The refusal is
        returned, not raised: Serve would log each one with its traceback."""
        user = await self.authenticate(hashed)
        if user is None or not streams:
            return None if user is None else (user, None)
        try:
            return user, await self.begin_stream(user.id, self.quotas.limits_of(user.name))
        except QuotaExceededError as refusal:
            return user, refusal

    async def begin_stream(self, user_id: int, limits: Limits) -> str:
        """A lease on one of the user's streams for a generation request; `QuotaExceededError`
        when a limit is reached."""
        if limits.tokens_per_day is not None:
            day = today()
            async with self.db.execute(
                "SELECT completion_tokens FROM usage WHERE user_id = ? AND day = ?", (user_id, day)
            ) as cursor:
                row = await cursor.fetchone()
            generated = (row["completion_tokens"] if row is not None else 0) + self._unwritten.get((user_id, day), (0, 0, 0))[2]
            if generated >= limits.tokens_per_day:
                raise QuotaExceededError("tokens_per_day", limits.tokens_per_day, seconds_to_tomorrow())
        return self.streams.start(user_id, limits)

    async def renew_stream(self, user_id: int, lease: str) -> None:
        self.streams.renew(user_id, lease)

    async def end_stream(self, user_id: int, lease: str, prompt_tokens: int, completion_tokens: int) -> None:
        """Ends the stream and counts the request and its tokens in the day's usage, written
        within `USAGE_WRITE_S` with every other count of that time in one commit, rather than a
        commit (an fsync: `synchronous=FULL`) per request."""
        self.streams.end(user_id, lease)
        key = (user_id, today())
        requests, prompt, completion = self._unwritten.get(key, (0, 0, 0))
        self._unwritten[key] = (requests + 1, prompt + prompt_tokens, completion + completion_tokens)
        if self._writing is None:
            self._writing = asyncio.create_task(self._write_usage_soon())

    async def _write_usage_soon(self) -> None:
        await asyncio.sleep(USAGE_WRITE_S)
        self._writing = None
        await self.write_usage()

    async def write_usage(self) -> None:
        """Writes the counts not written yet (`end_stream`)."""
        counts, self._unwritten = self._unwritten, {}
        if not counts:
            return
        async with self.transaction() as db:
            await db.executemany(
                "INSERT INTO usage (user_id, day, requests, prompt_tokens, completion_tokens) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (user_id, day) DO UPDATE SET requests = requests + excluded.requests,"
                " prompt_tokens = prompt_tokens + excluded.prompt_tokens,"
                " completion_tokens = completion_tokens + excluded.completion_tokens",
                [(user_id, day, *numbers) for (user_id, day), numbers in counts.items()],
            )

    async def usage(self, user_id: int | None = None, day: str | None = None) -> list[UserUsage]:
        """The day's usage (default today, UTC) of one user, or of every user (None), by name."""
        await self.write_usage()
        day = day or today()
        query = (
            "SELECT users.id, users.name AS user, users.admin, COALESCE(usage.requests, 0) AS requests,"
            " COALESCE(usage.prompt_tokens, 0) AS prompt_tokens, COALESCE(usage.completion_tokens, 0) AS completion_tokens"
            " FROM users LEFT JOIN usage ON usage.user_id = users.id AND usage.day = :day"
            " WHERE :user IS NULL OR users.id = :user ORDER BY users.name"
        )
        async with self.db.execute(query, {"day": day, "user": user_id}) as cursor:
            rows = [dict(row) async for row in cursor]
        report = []
        for row in rows:
            active, last_minute = self.streams.counts(row.pop("id"))
            report.append(UserUsage(**row, day=day, active_streams=active, requests_last_minute=last_minute))
        return report
