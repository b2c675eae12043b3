"""Users, keys and who owns which conversation, in a real SQLite file (`auth: users`)."""

from __future__ import annotations

import sqlite3

import pytest

from deployments.history_store import ConversationNotFoundError, HistoryStore
from deployments.turn_claims import ConversationBusyError
from deployments.user_accounts import UserError, key_hash
from tests.support import NOW, RELEASED_SCHEMA


async def test_a_key_names_its_user_until_revoked_and_only_its_hash_is_stored(store):
    alice, key = await store.add_user("alice")
    assert key.startswith("rc-") and len(key) >= 3 + 32  # 192 random bits, base64url
    assert (await store.authenticate(key_hash(key))) == alice
    assert await store.authenticate(key_hash(key + "x")) is None
    with sqlite3.connect(store.path) as db:
        stored = db.execute("SELECT prefix, hash FROM api_keys").fetchall()
    assert stored == [(key[:10], key_hash(key))]  # the key itself is nowhere
    assert await store.revoke_key(key[:10]) == 1
    assert await store.authenticate(key_hash(key)) is None
    with pytest.raises(UserError, match="no live key"):
        await store.revoke_key(key[:10])


async def test_rotating_revokes_every_old_key_and_names_are_unique(store):
    await store.add_user("bob", admin=True)
    first = await store.rotate_key("bob")
    second = await store.rotate_key("bob")
    assert await store.authenticate(key_hash(first)) is None
    bob = await store.authenticate(key_hash(second))
    assert bob is not None and bob.name == "bob" and bob.admin
    with pytest.raises(UserError, match="exists already"):
        await store.add_user("bob")
    with pytest.raises(UserError, match="no user"):
        await store.rotate_key("nobody")
    with pytest.raises(UserError, match="user name"):
        await store.add_user("two words")
    # Listed oldest first, by their first characters: the first two revoked, the last one live.
    keys = await store.list_keys()
    assert [(k.user, k.revoked_at is None) for k in keys] == [("bob", False), ("bob", False), ("bob", True)]
    assert keys[-1].prefix == second[:10]


async def test_someone_elses_conversation_is_not_found_by_any_method(store):
    alice, _ = await store.add_user("alice")
    bob, _ = await store.add_user("bob")
    mine = await store.create_conversation(owner=alice.id)
    await store.append_message(mine.id, "user", "alice's secret")
    await store.begin_turn(mine.id, "alice-turn", owner=alice.id)  # answering: busy for alice
    for attempt in (
        store.get_conversation(mine.id, bob.id),
        store.begin_turn(mine.id, "bob-turn", bob.id),  # not found, not busy: 409 would confirm it exists
        store.rename_conversation(mine.id, "taken", bob.id),
        store.delete_conversation(mine.id, bob.id),
    ):
        with pytest.raises(ConversationNotFoundError):
            await attempt
    with pytest.raises(ConversationBusyError):
        await store.begin_turn(mine.id, "alice-again", alice.id)
    assert await store.list_conversation_ids(bob.id) == [] and await store.list_conversations(bob.id) == []
    assert await store.list_conversation_ids(alice.id) == [mine.id]
    assert await store.list_conversation_ids(None) == [mine.id]  # auth none/key, or an admin's ?all=true
    kept = await store.get_conversation(mine.id, alice.id)
    assert kept.title == "alice's secret" and [m.content for m in kept.messages] == ["alice's secret"]


async def test_a_released_database_opens_with_every_conversation_kept_and_owned(tmp_path):
    path = tmp_path / "history.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(RELEASED_SCHEMA)
        for i in range(3):
            db.execute("INSERT INTO conversations (title, created_at, updated_at) VALUES (?, ?, ?)", (f"old {i}", NOW, NOW))
            db.execute(
                "INSERT INTO messages (conversation_id, role, content, created_at) VALUES (?, 'user', ?, ?)",
                (i + 1, f"hi {i}", NOW),
            )
    store = HistoryStore(path)
    await store.open()
    try:
        assert await store.list_conversation_ids() == [1, 2, 3]  # auth none/key: as before
        assert await store.adopt_unowned("admin") == 3
        admin = (await store.list_users())[0]
        assert admin.name == "admin" and admin.admin
        assert await store.list_conversation_ids(admin.id) == [1, 2, 3]
        assert [m.content for m in (await store.get_conversation(2, admin.id)).messages] == ["hi 1"]
        assert await store.adopt_unowned("admin") == 0  # the next start takes nothing more
        new = await store.create_conversation(owner=None)
        assert await store.list_conversation_ids(admin.id) == [1, 2, 3] and new.id == 4
    finally:
        await store.close()
