"""The call channel to the history, over a real store and real TCP connections on 127.0.0.1:
calls answered as the store answers them, the fallback through Serve's handle (an in-process
stand-in that records what it is asked), cancellation, the goodbye of a stopping replica, a lost
connection."""

from __future__ import annotations

import asyncio
import pickle
from types import SimpleNamespace
from typing import Any

import pytest

from deployments import call_channel
from deployments.call_channel import CallClient, CallServer, ReplicaLostError
from deployments.channel import frame, json_frame
from deployments.history_store import ConversationNotFoundError, HistoryStore
from deployments.turn_claims import ConversationBusyError


class StoreHandle:
    """The history deployment's Serve handle, over the store in-process: `address` answers the
    current server's; every method called is recorded."""

    def __init__(self, store: HistoryStore, server: CallServer | None):
        self.store, self.server = store, server
        self.called: list[str] = []

    def __getattr__(self, name: str) -> SimpleNamespace:
        async def remote(*args: Any, **kwargs: Any) -> Any:
            self.called.append(name)
            if name == "address":
                return self.server and self.server.address()
            return await getattr(self.store, name)(*args, **kwargs)

        return SimpleNamespace(remote=remote)


async def started(store: HistoryStore) -> CallServer:
    server = CallServer(store, "history")
    await server.start("127.0.0.1")
    return server


@pytest.fixture
async def server(store):
    server = await started(store)
    yield server
    await server.stop()


@pytest.fixture
async def handle(store, server):
    return StoreHandle(store, server)


@pytest.fixture
async def client(handle, monkeypatch):
    monkeypatch.setattr(call_channel, "REOPEN_AFTER_S", 0.0)
    client = CallClient(handle, "history")
    assert await client.opened()
    yield client
    client.close()


async def until(condition, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


async def test_calls_go_over_the_channel_and_answer_as_the_store_does(store, handle, client):
    created = await client.create_conversation.remote(title="t")
    claimed = await client.begin_turn.remote(created.id, "turn-1", None, [{"role": "user", "content": "hi"}], model="m")
    await client.append_message.remote(created.id, "assistant", "hello", model="m", ends_turn="turn-1")
    assert claimed.messages == []
    assert await client.get_conversation.remote(created.id) == await store.get_conversation(created.id)
    assert [(m.role, m.content) for m in (await store.get_conversation(created.id)).messages] == [
        ("user", "hi"),
        ("assistant", "hello"),
    ]
    assert handle.called == ["address"]  # nothing went through Serve


async def test_the_store_errors_are_raised_with_their_type_and_fields(store, client):
    with pytest.raises(ConversationNotFoundError) as missing:
        await client.get_conversation.remote(999)
    assert missing.value.conversation_id == 999 and str(missing.value) == "conversation '999' not found"
    conversation = await store.create_conversation()
    await client.begin_turn.remote(conversation.id, "turn-1", None, None)
    with pytest.raises(ConversationBusyError, match="is already answering"):
        await client.begin_turn.remote(conversation.id, "turn-2", None, None)
    with pytest.raises(AttributeError, match="no method '_now'"):
        await client.call("_now", (), {})
    # An answer that cannot be pickled fails its call, and the connection goes on.
    with pytest.raises(RuntimeError, match="history.transaction: its answer cannot be sent"):
        await client.transaction.remote()
    # Arguments that cannot be pickled fail their call before it leaves, leaving nothing behind.
    with pytest.raises((pickle.PicklingError, AttributeError)):
        await client.get_conversation.remote(lambda: conversation.id)
    assert client._connection.waiting == {}
    assert await client.list_conversation_ids.remote() == [conversation.id]


async def test_calls_go_through_serve_while_no_channel_is_open(store, handle, monkeypatch):
    monkeypatch.setattr(call_channel, "REOPEN_AFTER_S", 0.0)
    server, handle.server = handle.server, None  # a replica that gives no address (stopping)
    client = CallClient(handle, "history")
    created = await client.create_conversation.remote(title="through Serve")
    assert "create_conversation" in handle.called
    assert (await store.get_conversation(created.id)).title == "through Serve"
    handle.server = server
    await until(lambda: client._opening is None)
    assert await client.opened()
    handle.called.clear()
    assert await client.list_conversation_ids.remote() == [created.id]
    assert handle.called == []
    client.close()


async def test_a_connection_without_the_secret_runs_nothing(store, server):
    call = frame(pickle.dumps((1, "create_conversation", (), {"title": "forged"})))
    for opening in (json_frame("not-the-secret") + call, call):
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(opening)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
        writer.close()
    assert await store.list_conversation_ids() == []


async def test_a_cancelled_call_is_cancelled_in_the_history(store, client):
    async with store.transaction():  # held: the write waits for it
        write = client.create_conversation.remote(title="cancelled")  # a task, as a handle's response
        await asyncio.sleep(0.2)
        assert not write.done()
        write.cancel()
        await asyncio.sleep(0.2)
    assert await store.list_conversation_ids() == []  # rolled back, not run once the lock was free
    assert await client.list_conversation_ids.remote() == []


async def test_a_stopping_replica_answers_the_calls_made_and_the_next_go_through_serve(store, handle, client):
    async with store.transaction():
        waiting = client.create_conversation.remote(title="made before the goodbye")  # a task, as a handle's response
        await asyncio.sleep(0.2)
        stopping = asyncio.create_task(handle.server.stop())
        await until(lambda: not client._connection.is_open)
        handle.called.clear()
        assert await client.list_conversation_ids.remote() == []  # a read, through Serve
        assert "list_conversation_ids" in handle.called
        assert not stopping.done()  # the call made before the goodbye is still running
    created = await waiting
    await asyncio.wait_for(stopping, 5)
    assert (await store.get_conversation(created.id)).title == "made before the goodbye"
    # The replica that follows: the next call opens a channel to it.
    handle.server = await started(store)
    await client.list_conversation_ids.remote()
    await until(lambda: client._connection is not None and client._connection.is_open)
    handle.called.clear()
    assert await client.list_conversation_ids.remote() == [created.id]
    assert handle.called == []
    await handle.server.stop()


async def test_a_lost_connection_fails_its_waiting_calls_and_the_next_go_through_serve(store, handle, server, client):
    async with store.transaction():
        waiting = client.create_conversation.remote(title="lost")  # a task, as a handle's response
        await asyncio.sleep(0.2)
        for connection in list(server.connections):
            connection.transport.abort()
        with pytest.raises(ReplicaLostError, match="connection to the history replica was lost"):
            await asyncio.wait_for(waiting, 5)
    await asyncio.sleep(0.2)
    assert await store.list_conversation_ids() == []  # the caller gone, its call was cancelled
    handle.called.clear()
    created = await client.create_conversation.remote(title="after")
    assert sorted(handle.called[:2]) == ["address", "create_conversation"]
    assert await store.list_conversation_ids() == [created.id]
