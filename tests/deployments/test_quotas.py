"""Per-user limits and usage: the in-memory stream book on a clock the test moves, and the day's
counts in a real SQLite file."""

from __future__ import annotations

import asyncio
import pickle
import sqlite3

import pytest
from pydantic import ValidationError

from deployments.history_store import HistoryStore
from deployments.quotas import OTHER_USERS, USAGE_WRITE_S, Limits, QuotaExceededError, Quotas, StreamBook, today
from deployments.user_accounts import key_hash


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def refused(book: StreamBook, user_id: int, limits: Limits) -> QuotaExceededError:
    with pytest.raises(QuotaExceededError) as refusal:
        book.start(user_id, limits)
    return refusal.value


def test_streams_at_once_are_counted_per_user_and_freed_when_they_end():
    book = StreamBook(clock=Clock())
    limits = Limits(concurrent_streams=2)
    first, _ = book.start(1, limits), book.start(1, limits)
    refusal = refused(book, 1, limits)
    assert (refusal.limit, refusal.allowed, refusal.retry_after_s, refusal.counts) == ("concurrent_streams", 2, 1, "requests")
    assert "streams at once, at most 2 per user" in str(refusal) and "`concurrent_streams`" in str(refusal)
    book.start(2, limits)  # another user's streams are theirs
    book.end(1, first)
    book.start(1, limits)
    assert book.counts(1) == (2, 3)


def test_a_stream_its_ingress_never_ends_lapses_and_a_renewal_takes_it_again():
    clock = Clock()
    book = StreamBook(lease_s=60, clock=clock)
    limits = Limits(concurrent_streams=1)
    lease = book.start(1, limits)
    clock.now += 59
    refused(book, 1, limits)
    book.renew(1, lease)
    clock.now += 59
    refused(book, 1, limits)  # renewed: still held
    clock.now += 2
    other = book.start(1, limits)  # lapsed
    # After a restart the history replica knows no lease; the renewal of a running one takes it again.
    restarted = StreamBook(lease_s=60, clock=clock)
    restarted.renew(1, other)
    refused(restarted, 1, limits)


def test_requests_per_minute_slide_and_say_when_the_next_one_is_allowed():
    clock = Clock()
    book = StreamBook(clock=clock)
    limits = Limits(requests_per_minute=3)
    for step in (0, 10, 20):
        clock.now += step
        book.end(1, book.start(1, limits))  # ended streams still count in the minute
    # Started at 1000, 1010, 1030; now 1030: the first leaves the window at 1060.
    refusal = refused(book, 1, limits)
    assert (refusal.limit, refusal.retry_after_s) == ("requests_per_minute", 30)
    clock.now += 29.5
    assert refused(book, 1, limits).retry_after_s == 1
    clock.now += 0.5
    book.start(1, limits)
    assert book.counts(1) == (1, 3)


def test_the_refusal_survives_the_trip_from_the_history_replica():
    refusal = QuotaExceededError("tokens_per_day", 100, 3600)
    copy = pickle.loads(pickle.dumps(refusal))
    assert (copy.limit, copy.allowed, copy.retry_after_s, copy.counts, str(copy)) == (
        "tokens_per_day",
        100,
        3600,
        "tokens",
        str(refusal),
    )


def test_overrides_replace_only_the_limits_they_name():
    quotas = Quotas(
        concurrent_streams=4,
        requests_per_minute=60,
        users={"alice": Limits(tokens_per_day=10), "bob": {"requests_per_minute": None}},
        metrics_users=2,
    )
    assert quotas.limits_of("carol") == Limits(concurrent_streams=4, requests_per_minute=60)
    assert quotas.limits_of("alice") == Limits(concurrent_streams=4, requests_per_minute=60, tokens_per_day=10)
    assert quotas.limits_of("bob") == Limits(concurrent_streams=4)
    assert [quotas.metrics_label(i, name) for i, name in ((1, "a"), (2, "b"), (3, "c"))] == ["a", "b", OTHER_USERS]
    assert Quotas().limits_of("anyone").concurrent_streams == 8  # the default that keeps a flood to its share
    with pytest.raises(ValidationError, match="concurrent_streams"):
        Quotas(concurrent_streams=0)
    with pytest.raises(ValidationError, match="users"):
        Quotas(users={"two words": Limits()})
    with pytest.raises(ValidationError, match="tokens_a_day"):
        Quotas(users={"alice": {"tokens_a_day": 5}})


async def test_the_days_generated_tokens_are_stored_and_refuse_past_the_limit(store):
    alice, _ = await store.add_user("alice")
    bob, _ = await store.add_user("bob", admin=True)
    limits = Limits(tokens_per_day=100)
    lease = await store.begin_stream(alice.id, limits)
    await store.end_stream(alice.id, lease, 30, 60)
    lease = await store.begin_stream(alice.id, limits)  # 60 < 100: allowed, and may pass it
    [during] = await store.usage(alice.id)
    assert (during.active_streams, during.requests_last_minute, during.requests) == (1, 2, 1)
    await store.end_stream(alice.id, lease, 40, 45)
    with pytest.raises(QuotaExceededError) as refusal:
        await store.begin_stream(alice.id, limits)
    assert refusal.value.limit == "tokens_per_day" and 0 < refusal.value.retry_after_s <= 86400
    await store.end_stream(bob.id, await store.begin_stream(bob.id, limits), 5, 7)  # bob's own count

    usage = {row.user: row for row in await store.usage()}
    assert usage["alice"].model_dump() == {
        "user": "alice",
        "admin": False,
        "day": today(),
        "requests": 2,
        "prompt_tokens": 70,
        "completion_tokens": 105,
        "active_streams": 0,
        "requests_last_minute": 2,
    }
    assert (usage["bob"].admin, usage["bob"].completion_tokens) == (True, 7)
    # A user with no use today is listed with zeros; another day's counts are that day's.
    carol, _ = await store.add_user("carol")
    [none] = await store.usage(carol.id)
    assert (none.requests, none.completion_tokens) == (0, 0)
    assert [row.requests for row in await store.usage(alice.id, "2000-01-01")] == [0]
    with sqlite3.connect(store.path) as db:
        rows = db.execute(
            "SELECT user_id, day, requests, prompt_tokens, completion_tokens FROM usage ORDER BY user_id"
        ).fetchall()
    assert rows == [(alice.id, today(), 2, 70, 105), (bob.id, today(), 1, 5, 7)]


async def test_counts_survive_a_restart_of_the_history(store, tmp_path):
    alice, _ = await store.add_user("alice")
    await store.end_stream(alice.id, await store.begin_stream(alice.id, Limits()), 3, 50)
    await store.close()
    reopened = HistoryStore(store.path)
    await reopened.open()
    try:
        with pytest.raises(QuotaExceededError):
            await reopened.begin_stream(alice.id, Limits(tokens_per_day=50))
    finally:
        await reopened.close()


async def test_one_call_lets_a_request_in_with_its_lease_or_says_which_limit(tmp_path):
    store = HistoryStore(tmp_path / "history.sqlite3", Quotas(users={"alice": Limits(concurrent_streams=1)}))
    await store.open()
    try:
        alice, key = await store.add_user("alice")
        bob, bobs_key = await store.add_user("bob")
        assert await store.admit_user(key_hash("rc-unknown"), streams=True) is None
        assert await store.admit_user(key_hash(key), streams=False) == (alice, None)  # reading: no stream
        admitted = await store.admit_user(key_hash(key), streams=True)
        assert admitted is not None and admitted[0] == alice and admitted[1]
        _, refusal = await store.admit_user(key_hash(key), streams=True)
        assert isinstance(refusal, QuotaExceededError)
        assert (refusal.limit, refusal.allowed) == ("concurrent_streams", 1)
        assert (await store.admit_user(key_hash(key), streams=False)) == (alice, None)  # still reads
        # bob has the default limit.
        for _ in range(Quotas().concurrent_streams or 0):
            await store.admit_user(key_hash(bobs_key), streams=True)
        _, refusal = await store.admit_user(key_hash(bobs_key), streams=True)
        assert isinstance(refusal, QuotaExceededError) and (refusal.limit, refusal.allowed) == ("concurrent_streams", 8)
    finally:
        await store.close()


async def test_counts_are_written_within_a_second_in_one_commit(store):
    alice, _ = await store.add_user("alice")
    for tokens in (5, 7):
        await store.end_stream(alice.id, await store.begin_stream(alice.id, Limits()), 1, tokens)

    def stored() -> list[tuple]:
        with sqlite3.connect(store.path) as db:
            return db.execute("SELECT requests, completion_tokens FROM usage").fetchall()

    assert stored() == []  # not yet: a commit per request is what it saves
    await asyncio.sleep(USAGE_WRITE_S + 0.3)
    assert stored() == [(2, 12)]
