"""The streaming responses (`serve_app.streaming`) as an ASGI server drives them, without Ray: the
ASGI messages they send, how they end when the client goes, and that their body generator is
always closed."""

from __future__ import annotations

import asyncio

import pytest

from serve_app.streaming import LastChunk, ServerSentEventsResponse, TextStreamResponse

SCOPE = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "method": "POST"}


class Client:
    """The server's side of one connection: what the response sent, and a disconnect to give."""

    def __init__(self) -> None:
        self.sent: list[dict] = []
        self.gone = asyncio.Event()

    async def receive(self) -> dict:
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        self.sent.append(message)

    def bodies(self) -> list[tuple[bytes, bool]]:
        return [(m["body"], m.get("more_body", False)) for m in self.sent if m["type"] == "http.response.body"]


async def test_a_last_chunk_ends_the_response_in_its_own_write():
    after_last: list[str] = []

    async def body():
        yield b"data: 1\n\n"
        try:
            yield LastChunk(b"data: 2\n\ndata: [DONE]\n\n")
            after_last.append("resumed")  # never: the response ends with that chunk
        finally:
            after_last.append("closed")

    client = Client()
    await ServerSentEventsResponse(body())(SCOPE, client.receive, client.send)
    assert client.sent[0]["type"] == "http.response.start" and client.sent[0]["status"] == 200
    assert (b"content-type", b"text/event-stream; charset=utf-8") in client.sent[0]["headers"]
    assert client.bodies() == [(b"data: 1\n\n", True), (b"data: 2\n\ndata: [DONE]\n\n", False)]
    assert type(client.bodies()[-1][0]) is bytes  # a plain body for the server
    assert after_last == ["closed"]


async def test_a_body_without_a_last_chunk_ends_with_an_empty_one():
    async def body():
        yield "Hel"
        yield "lo"

    client = Client()
    await TextStreamResponse(body())(SCOPE, client.receive, client.send)
    assert client.bodies() == [(b"Hel", True), (b"lo", True), (b"", False)]


async def streaming_endlessly(client: Client, closed: asyncio.Event) -> asyncio.Task:
    """A text response whose body sends one chunk, then waits for ever (a model that has nothing
    more yet), setting `closed` when it is closed; returned once that chunk is sent."""

    async def endless():
        try:
            yield b"first"
            await asyncio.Event().wait()
            yield b"never"
        finally:
            closed.set()

    response = asyncio.create_task(TextStreamResponse(endless())(SCOPE, client.receive, client.send))
    async with asyncio.timeout(1):
        while not client.bodies():
            await asyncio.sleep(0)
    return response


async def test_the_client_going_ends_the_response_quietly_and_closes_the_body_at_once():
    client, closed = Client(), asyncio.Event()
    response = await streaming_endlessly(client, closed)
    client.gone.set()
    done, _ = await asyncio.wait({response}, timeout=1)
    assert response in done and response.result() is None  # the client's leaving is no server error
    assert closed.is_set()
    assert client.bodies() == [(b"first", True)]


async def test_a_cancellation_from_outside_is_not_taken_for_the_client_going():
    """Serve cancels the request's task itself when its client goes or its time is up: that
    cancellation goes on to the caller, and the body is closed all the same."""
    client, closed = Client(), asyncio.Event()
    response = await streaming_endlessly(client, closed)
    response.cancel()
    with pytest.raises(asyncio.CancelledError):
        await response
    assert closed.is_set()


async def test_a_failing_receive_ends_the_response_with_its_error_and_closes_the_body():
    """The server's `receive` raising (its channel to the client broken) ends the response with
    that error, as Starlette's own streaming response does, instead of streaming on unwatched."""
    client, closed = Client(), asyncio.Event()

    async def receive() -> dict:
        await client.gone.wait()
        raise RuntimeError("the client's channel broke")

    client.receive = receive  # type: ignore[method-assign]
    response = await streaming_endlessly(client, closed)
    client.gone.set()
    done, _ = await asyncio.wait({response}, timeout=1)
    assert response in done
    with pytest.raises(RuntimeError, match="channel broke"):
        response.result()
    assert closed.is_set()
