from __future__ import annotations

import pickle
import sqlite3

import pytest

from deployments.history_store import ConversationNotFoundError, HistoryStore
from deployments.turn_claims import ConversationBusyError


@pytest.fixture
async def store(tmp_path):
    store = HistoryStore(tmp_path / "sub" / "history.sqlite3")
    await store.open()
    yield store
    await store.close()


async def test_schema_is_created_in_wal_mode(store):
    with sqlite3.connect(store.path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"conversations", "messages"} <= tables


async def test_a_turn_is_stored_and_read_back(store):
    conversation = await store.create_conversation()
    await store.append_message(
        conversation.id, "user", "What is the capital of France?", model="m", parameters={"temperature": 0}
    )
    await store.append_message(
        conversation.id, "assistant", "Paris.", model="m", parameters={"temperature": 0}, prompt_tokens=12, completion_tokens=3
    )
    stored = await store.get_conversation(conversation.id)
    assert stored.title == "What is the capital of France?"
    assert [(m.role, m.content, m.parameters, m.status) for m in stored.messages] == [
        ("user", "What is the capital of France?", {"temperature": 0}, "complete"),
        ("assistant", "Paris.", {"temperature": 0}, "complete"),
    ]
    assert (stored.messages[1].prompt_tokens, stored.messages[1].completion_tokens) == (12, 3)
    assert stored.updated_at >= stored.created_at


async def test_long_prompts_make_short_titles_and_the_first_prompt_wins(store):
    conversation = await store.create_conversation()
    await store.append_message(conversation.id, "user", "word " * 40)
    await store.append_message(conversation.id, "user", "second prompt")
    title = (await store.get_conversation(conversation.id)).title
    assert len(title) == 60 and title.endswith("…") and title.startswith("word word")


async def test_listing_ids_oldest_first_and_summaries_newest_activity_first(store):
    first, second = await store.create_conversation(), await store.create_conversation()
    await store.append_message(first.id, "user", "bump")
    assert await store.list_conversation_ids() == [first.id, second.id]
    assert [c.id for c in await store.list_conversations()] == [first.id, second.id]  # first was touched last


async def test_rename_and_delete_cascade(store):
    conversation = await store.create_conversation()
    await store.append_message(conversation.id, "user", "hi")
    assert (await store.rename_conversation(conversation.id, "Greeting")).title == "Greeting"
    await store.delete_conversation(conversation.id)
    with pytest.raises(ConversationNotFoundError):
        await store.get_conversation(conversation.id)
    with sqlite3.connect(store.path) as db:
        assert db.execute("SELECT COUNT(*) FROM messages").fetchone() == (0,)


async def test_unknown_conversations_raise_not_found(store):
    for call in (
        store.get_conversation(42),
        store.delete_conversation(42),
        store.rename_conversation(42, "x"),
        store.append_message(42, "user", "hi"),
    ):
        with pytest.raises(ConversationNotFoundError, match="conversation '42' not found"):
            await call
    assert await store.list_conversation_ids() == []


def test_not_found_keeps_its_message_when_pickled_across_ray():
    # The history replica's exceptions reach the ingress pickled; rebuilt from their message,
    # this one read "conversation 'conversation '42' not found' not found".
    error = pickle.loads(pickle.dumps(ConversationNotFoundError(42)))
    assert (str(error), error.conversation_id) == ("conversation '42' not found", 42)


async def test_history_survives_reopening_and_ids_are_never_reused(tmp_path):
    path = tmp_path / "history.sqlite3"
    store = HistoryStore(path)
    await store.open()
    kept, dropped = await store.create_conversation(), await store.create_conversation()
    await store.append_message(kept.id, "user", "persist me")
    await store.delete_conversation(dropped.id)
    await store.close()

    reopened = HistoryStore(path)
    await reopened.open()
    assert [m.content for m in (await reopened.get_conversation(kept.id)).messages] == ["persist me"]
    assert (await reopened.create_conversation()).id > dropped.id
    await reopened.close()


async def test_a_turn_holds_its_conversation_until_its_answer_is_stored(store):
    conversation = await store.create_conversation()
    other = await store.create_conversation()
    assert (await store.begin_turn(conversation.id, "first")).id == conversation.id
    with pytest.raises(ConversationBusyError):
        await store.begin_turn(conversation.id, "second")
    await store.begin_turn(other.id, "elsewhere")
    await store.append_message(conversation.id, "user", "hi")  # the prompt: still answering
    with pytest.raises(ConversationBusyError):
        await store.begin_turn(conversation.id, "second")
    await store.append_message(conversation.id, "assistant", "hello", ends_turn="first")
    next_turn = await store.begin_turn(conversation.id, "second")
    assert [m.content for m in next_turn.messages] == ["hi", "hello"]  # it sees the stored answer
    await store.end_turn(conversation.id, "second")  # a turn that failed to start
    await store.begin_turn(conversation.id, "third")


async def test_a_turn_on_a_missing_or_deleted_conversation_gives_its_claim_back(store):
    with pytest.raises(ConversationNotFoundError):
        await store.begin_turn(12345, "a")
    assert store.turns.holder(12345) is None
    conversation = await store.create_conversation()
    await store.begin_turn(conversation.id, "a")
    await store.delete_conversation(conversation.id)
    with pytest.raises(ConversationNotFoundError):
        await store.append_message(conversation.id, "assistant", "late", ends_turn="a")
    assert store.turns.holder(conversation.id) is None
