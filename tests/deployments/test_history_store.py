from __future__ import annotations

import asyncio
import pickle
import sqlite3

import pytest

from deployments.history_store import ConversationNotFoundError, HistoryStore, UnansweredCallError
from deployments.turn_claims import ConversationBusyError
from tests.support import NOW, RELEASED_SCHEMA


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


async def test_a_turn_stores_its_prompt_in_one_write_after_reading_and_its_answer_after_it(store):
    conversation = await store.create_conversation()
    calls = [{"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]
    await store.append_message(conversation.id, "user", "Weather in Paris?")
    await store.append_message(conversation.id, "assistant", "", tool_calls=calls, completion_tokens=9)
    results = [
        {"role": "tool", "content": "18 C", "tool_call_id": "call_1"},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
    ]
    # A result for a call the conversation does not wait for: refused, nothing stored, the claim free.
    unanswered = {"role": "tool", "content": "x", "tool_call_id": "call_9"}
    with pytest.raises(UnansweredCallError, match=r"^'call_9' answers no call that conversation 1 waits for") as refused:
        await store.begin_turn(conversation.id, "t0", prompts=[results[0], unanswered])
    assert refused.value.index == 1 and store.turns.holder(conversation.id) is None
    seen = await store.begin_turn(conversation.id, "t1", prompts=results, model="m", parameters={"seed": 1})
    assert [m.role for m in seen.messages] == ["user", "assistant"]  # the conversation before the turn
    await store.append_message(conversation.id, "assistant", "Sunny, 18 C.", ends_turn="t1")
    messages = (await store.get_conversation(conversation.id)).messages
    assert [(m.role, m.content, m.tool_calls, m.tool_call_id) for m in messages] == [
        ("user", "Weather in Paris?", None, None),
        ("assistant", "", calls, None),
        ("tool", "18 C", None, "call_1"),
        ("tool", "sunny", None, "call_1"),
        ("assistant", "Sunny, 18 C.", None, None),
    ]
    assert messages[2].parameters == {"seed": 1} and messages[2].model == "m"
    assert messages[2].created_at == messages[3].created_at  # one write
    assert store.turns.holder(conversation.id) is None


async def test_a_turn_that_does_not_start_takes_back_its_prompt_and_the_title_it_gave(store):
    conversation = await store.create_conversation()
    await store.begin_turn(conversation.id, "a", prompts=[{"role": "user", "content": "First question"}])
    await store.end_turn(conversation.id, "a")
    after = await store.get_conversation(conversation.id)
    assert (after.messages, after.title, store.turns.holder(conversation.id)) == ([], None, None)
    await store.begin_turn(conversation.id, "b", prompts=[{"role": "user", "content": "Second"}])
    await store.append_message(conversation.id, "assistant", "answer", ends_turn="b")
    await store.begin_turn(conversation.id, "c", prompts=[{"role": "user", "content": "Third"}])
    await store.end_turn(conversation.id, "c")
    after = await store.get_conversation(conversation.id)
    assert [m.content for m in after.messages] == ["Second", "answer"] and after.title == "Second"


async def test_a_database_of_a_release_before_tool_turns_keeps_every_message_and_takes_them(tmp_path):
    """Its messages table checks `role` against three roles and has no call columns."""
    path = tmp_path / "history.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(RELEASED_SCHEMA)
        db.execute("INSERT INTO conversations (title, created_at, updated_at) VALUES ('kept', ?, ?)", (NOW, NOW))
        rows = [(1, "user", "q", None, "complete", None), (1, "assistant", "a", '{"seed": 3}', "stopped", "gone")]
        for row in [*rows, (1, "user", "deleted", None, "complete", None)]:
            db.execute(
                "INSERT INTO messages (conversation_id, role, content, parameters, status, error, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (*row, NOW),
            )
        db.execute("DELETE FROM messages WHERE id = 3")
    for _ in range(2):  # opened again: nothing left to migrate
        store = HistoryStore(path)
        await store.open()
        try:
            conversation = await store.get_conversation(1)
            assert [(m.id, m.role, m.content, m.parameters, m.status, m.error) for m in conversation.messages[:2]] == [
                (1, "user", "q", None, "complete", None),
                (2, "assistant", "a", {"seed": 3}, "stopped", "gone"),
            ]
            tool = await store.append_message(1, "tool", "r", tool_call_id="c")
            assert tool.id > 3  # a deleted message's id never returns
        finally:
            await store.close()
    with sqlite3.connect(path) as db:
        assert {row[0] for row in db.execute("SELECT name FROM sqlite_master")} >= {"messages", "messages_by_conversation"}
        assert "messages_before_tools" not in {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
    with pytest.raises(sqlite3.IntegrityError):  # the role is still checked
        with sqlite3.connect(path) as db:
            db.execute("INSERT INTO messages (conversation_id, role, content, created_at) VALUES (1, 'robot', 'x', ?)", (NOW,))


async def test_writes_at_once_are_each_whole_whatever_another_does(store):
    """The store has one connection, so one transaction at a time: a write that fails (its
    conversation deleted meanwhile) rolls back only itself, and one write's commit never
    publishes another's half. Started together, their statements would otherwise interleave."""
    kept, gone = await store.create_conversation(), await store.create_conversation()
    await store.append_message(kept.id, "assistant", "old answer")
    [old] = (await store.get_conversation(kept.id)).messages
    await store.delete_conversation(gone.id)
    stored, failed, renamed = await asyncio.gather(
        store.append_message(kept.id, "assistant", "new answer", replace_after=old.id - 1),
        store.append_message(gone.id, "assistant", "late"),
        store.rename_conversation(kept.id, "renamed"),
        return_exceptions=True,
    )
    assert isinstance(failed, ConversationNotFoundError)
    assert not isinstance(stored, BaseException) and not isinstance(renamed, BaseException)
    with sqlite3.connect(store.path) as db:  # what is committed, read as another process would
        rows = db.execute("SELECT id, content FROM messages WHERE conversation_id = ?", (kept.id,)).fetchall()
        title = db.execute("SELECT title FROM conversations WHERE id = ?", (kept.id,)).fetchone()[0]
    assert rows == [(stored.id, "new answer")]
    assert title == "renamed"


async def test_a_write_cancelled_halfway_leaves_nothing_behind(store):
    conversation = await store.create_conversation()
    await store.append_message(conversation.id, "user", "kept")
    [kept] = (await store.get_conversation(conversation.id)).messages
    replacing = asyncio.create_task(store.append_message(conversation.id, "assistant", "never", replace_after=kept.id - 1))
    await asyncio.sleep(0)  # its DELETE is under way
    replacing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await replacing
    await store.append_message(conversation.id, "assistant", "answer")
    assert [m.content for m in (await store.get_conversation(conversation.id)).messages] == ["kept", "answer"]
