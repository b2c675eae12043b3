"""The output channel over real TCP on loopback: an ingress replica's `Inbox`, a model replica's
`Outbox`, and `deliver` between them, with a stand-in for the unary handle call."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from deployments.channel import LENGTH, ChannelError, json_frame
from deployments.engine.protocol import Delivered, GenerationOutput, ReplyTo
from deployments.output_channel import Inbox, ModelStream, Outbox, deliver


class Call:
    """A unary call running `answer` as a task: awaitable, cancellable (a DeploymentResponse)."""

    def __init__(self, answer):
        self.task = asyncio.ensure_future(answer)

    def __await__(self):
        return self.task.__await__()

    def cancel(self) -> None:
        self.task.cancel()


async def generation(texts: list[str], finish: str = "length", pause_s: float = 0.0) -> AsyncIterator[GenerationOutput]:
    for i, text in enumerate(texts):
        await asyncio.sleep(pause_s)
        yield GenerationOutput(text, 3, i + 1, finish if i == len(texts) - 1 else None)


@pytest.fixture
async def inbox():
    inbox = Inbox()
    await inbox.start("127.0.0.1")
    yield inbox
    await inbox.stop()


async def read_all(stream: ModelStream) -> list[GenerationOutput]:
    return [output async for output in stream]


async def test_outputs_arrive_in_order_and_the_last_comes_from_the_call(inbox):
    outbox = Outbox()
    streams = [inbox.stream(lambda to, i=i: Call(deliver(generation([f"{i}a", f"{i}b", f"{i}c"]), outbox, to))) for i in range(3)]
    answers = await asyncio.gather(*(read_all(stream) for stream in streams))
    assert [[o.text for o in outputs] for outputs in answers] == [[f"{i}a", f"{i}b", f"{i}c"] for i in range(3)]
    assert all(outputs[-1].finish_reason == "length" and outputs[-1].completion_tokens == 3 for outputs in answers)
    assert len(outbox._links) == 1  # one connection for every request to this inbox
    await outbox.close()


async def test_an_outputs_logprobs_cross_with_it(inbox):
    async def scored() -> AsyncIterator[GenerationOutput]:
        yield GenerationOutput("Pa", 3, 1, logprobs=[["Pa", -0.5, [["Pa", -0.5], ["Lo", -1.25]]]])
        yield GenerationOutput("ris", 3, 2)  # none with this one
        yield GenerationOutput("", 3, 3, "stop", logprobs=[["ris", -0.125, []]])

    outbox = Outbox()
    outputs = await read_all(inbox.stream(lambda to: Call(deliver(scored(), outbox, to))))
    assert [o.logprobs for o in outputs] == [[["Pa", -0.5, [["Pa", -0.5], ["Lo", -1.25]]]], None, [["ris", -0.125, []]]]
    await outbox.close()


async def test_the_last_output_waits_for_the_earlier_ones_still_on_the_way(inbox):
    delivered_first: asyncio.Future[Delivered] = asyncio.get_running_loop().create_future()
    stream = inbox.stream(lambda to: Call(delivered_first))
    delivered_first.set_result(Delivered(GenerationOutput("!", 3, 3, "stop"), sent=2))
    reading = asyncio.create_task(read_all(stream))
    await asyncio.sleep(0.05)
    assert not reading.done()  # two outputs are owed
    inbox.deliver([[1, "Hel", 3, 1], [1, "lo", 3, 2]])
    assert [o.text for o in await reading] == ["Hel", "lo", "!"]


async def test_an_error_of_the_call_is_raised_where_the_next_output_would_be(inbox):
    async def fails() -> Delivered:
        inbox.deliver([[1, "Hel", 3, 1]])
        await asyncio.sleep(0.01)
        raise RuntimeError("replica died")

    stream = inbox.stream(lambda to: Call(fails()))
    assert (await anext(stream)).text == "Hel"
    with pytest.raises(RuntimeError, match="replica died"):
        await anext(stream)
    with pytest.raises(StopAsyncIteration):
        await anext(stream)


async def test_cancelling_a_stream_cancels_its_call_and_closes_the_generation(inbox):
    outbox = Outbox()
    closed = asyncio.Event()

    async def endless() -> AsyncIterator[GenerationOutput]:
        try:
            for i in range(10**6):
                await asyncio.sleep(0.001)
                yield GenerationOutput("x", 1, i + 1)
        finally:
            closed.set()

    calls: list[Call] = []
    stream = inbox.stream(lambda to: calls.append(Call(deliver(endless(), outbox, to))) or calls[-1])
    assert (await anext(stream)).text == "x"
    stream.cancel()
    await asyncio.wait_for(closed.wait(), 5)
    assert calls[0].task.cancelled()
    assert inbox._streams == {}  # its outputs still on the way are dropped
    await outbox.close()


async def test_a_connection_without_the_secret_is_dropped_and_delivers_nothing(inbox):
    received: list[GenerationOutput] = []
    inbox._streams[1] = asyncio.Queue()
    reader, writer = await asyncio.open_connection(inbox.host, inbox.port)
    writer.write(json_frame("not-the-secret") + json_frame([[1, "forged", 1, 1]]))
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the inbox
    assert inbox._streams[1].empty()
    # Raw bytes that are no frame at all: dropped too.
    reader, writer = await asyncio.open_connection(inbox.host, inbox.port)
    writer.write(LENGTH.pack(1 << 30))
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert received == []


async def test_a_generation_fails_when_its_inbox_cannot_be_reached():
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    outbox = Outbox()
    to = ReplyTo("127.0.0.1", port, "secret", 1)
    with pytest.raises(ChannelError, match="cannot reach the ingress replica's output inbox"):
        await deliver(generation(["a", "b", "c", "d"], pause_s=0.05), outbox, to)
    assert outbox._links == {}  # forgotten: a later request connects again


async def test_generations_fail_when_the_inbox_goes_away_mid_answer():
    inbox = Inbox()
    await inbox.start("127.0.0.1")
    outbox = Outbox()
    stream = inbox.stream(lambda to: Call(deliver(generation(["a"] * 1000, pause_s=0.005), outbox, to)))
    assert (await anext(stream)).text == "a"
    running = stream.call_ended
    await inbox.stop()
    # The ingress replica is gone: its connections close, and the model replica's sends fail.
    with pytest.raises(ChannelError):
        await asyncio.wait_for(_drain(stream), 10)
    assert running.done()
    await outbox.close()


async def _drain(stream: ModelStream) -> None:
    async for _ in stream:
        pass
