"""How a model replica's outputs reach the ingress replica that relays them, beside Serve.

A request still reaches its model replica as one Serve handle call: Serve's router picks the
replica (conversation affinity), `max_ongoing_requests` and the queue bound it, the autoscaler
counts it, and cancelling the call cancels the generation. But the call is unary and returns the
request's last output (`Delivered`); every output before that one travels on a TCP connection
from the model replica to the ingress replica, one connection per pair of replicas, carrying the
outputs of all their requests, one message per event-loop turn (an engine step's outputs).
A Serve streaming call costs the ingress and the replica more CPU than a unary call, and every
streamed message costs both sides again (docs/performance.md).

- Ingress side: `Inbox`, a TCP server on the replica's node; `ModelStream` is one request's
  outputs as the ingress reads them (the earlier ones from the inbox, the last from the call),
  with a streaming call's interface (`async for`, `cancel()`).
- Replica side: `Outbox`, the connections to inboxes; `deliver` runs a request's outputs
  through it and returns the last.

Frames (`deployments.channel`): JSON, never pickle, as model replicas are not trusted with more
than outputs. The first frame on a connection is the inbox's secret, which only requests carry.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Protocol

from deployments.channel import ChannelError, TrustedProtocol, TrustedServer, json_frame
from deployments.engine.protocol import Delivered, GenerationOutput, ReplyTo

# How long a stream whose last output has arrived waits for the earlier ones still on the way
# (they left first, on a connection of their own; this only bounds a connection lost in between).
STRAGGLER_TIMEOUT_S = 10.0


def output_entry(stream: int, output: GenerationOutput) -> list:
    """An output's entry in a frame (`Inbox.deliver` reads it): the finish travels in the call's
    answer instead."""
    entry = [stream, output.text, output.prompt_tokens, output.completion_tokens]
    return entry if output.logprobs is None else [*entry, output.logprobs]


# --- the ingress side --------------------------------------------------------------------------


class _End:
    """A stream's handle call ended: with its `Delivered`, or with the error it raised."""

    __slots__ = ("delivered", "error")

    def __init__(self, delivered: Delivered | None = None, error: BaseException | None = None):
        self.delivered, self.error = delivered, error


class Inbox(TrustedServer):
    """An ingress replica's end: model replicas connect to it and send the outputs of the
    streams `open` registered."""

    def __init__(self) -> None:
        super().__init__()
        self._streams: dict[int, asyncio.Queue] = {}
        self._next_stream = 0

    def protocol(self) -> TrustedProtocol:
        return _InboxProtocol(self)

    def stream(self, call: Callable[[ReplyTo], UnaryCall]) -> ModelStream:
        """A new stream, whose outputs `call(reply_to)` (the handle call it makes) sends here."""
        self._next_stream += 1
        reply_to = ReplyTo(self.host, self.port, self.secret, self._next_stream)
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[reply_to.stream] = queue
        try:
            return ModelStream(self, reply_to.stream, queue, call(reply_to))
        except BaseException:
            self.close(reply_to.stream)
            raise

    def close(self, stream: int) -> None:
        """Forgets a stream; its outputs still on the way are dropped."""
        self._streams.pop(stream, None)

    def deliver(self, outputs: list[list]) -> None:
        """One frame's outputs: `[stream, text, prompt_tokens, completion_tokens]` each, and the
        output's logprobs after them where it has some."""
        for stream, text, prompt_tokens, completion_tokens, *logprobs in outputs:
            queue = self._streams.get(stream)
            if queue is not None:
                queue.put_nowait(GenerationOutput(text, prompt_tokens, completion_tokens, None, *logprobs))


class _InboxProtocol(TrustedProtocol):
    """One model replica's connection: frames of outputs in, delivered; nothing is sent back."""

    def __init__(self, inbox: Inbox):
        super().__init__(inbox)
        self.inbox = inbox

    def frame_received(self, payload: bytes) -> None:
        try:
            outputs = json.loads(payload)
        except ValueError:
            return self.drop("a frame that is not JSON")
        self.inbox.deliver(outputs)


class UnaryCall(Protocol):
    """A Serve handle call's response (`DeploymentResponse`): awaited for its result."""

    def __await__(self): ...

    def cancel(self) -> None: ...


class ModelStream:
    """One request's outputs as the ingress reads them (`Inbox.stream`): those before the last
    from its inbox stream, the last from the handle call once every earlier one has arrived. An error of the call (before or during the answer) is raised
    where the next output would be."""

    def __init__(self, inbox: Inbox, stream: int, queue: asyncio.Queue, call: UnaryCall):
        self._inbox, self._stream, self._queue, self._call = inbox, stream, queue, call
        self._received = 0
        self._end: _End | None = None
        self._is_over = False
        # Done when the handle call is: the model replica's work on the request is over.
        self.call_ended = asyncio.ensure_future(self._await_call(call))

    async def _await_call(self, call: Awaitable[Delivered]) -> None:
        try:
            self._queue.put_nowait(_End(delivered=await call))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - raised to the reader
            self._queue.put_nowait(_End(error=exc))

    def __aiter__(self) -> ModelStream:
        return self

    async def __anext__(self) -> GenerationOutput:
        if self._is_over:
            raise StopAsyncIteration
        while True:
            end = self._end
            if end is not None and (end.error is not None or self._received >= end.delivered.sent):  # type: ignore[union-attr]
                self._finish()
                if end.error is not None:
                    raise end.error
                return end.delivered.last  # type: ignore[union-attr]
            if end is None:
                item = await self._queue.get()
            else:
                try:
                    item = await asyncio.wait_for(self._queue.get(), STRAGGLER_TIMEOUT_S)
                except TimeoutError:
                    self._end = _End(
                        error=ChannelError(
                            f"{end.delivered.sent - self._received} output(s) of the answer were lost on the way"  # type: ignore[union-attr]
                        )
                    )
                    continue
            if isinstance(item, _End):
                self._end = item
            else:
                self._received += 1
                return item

    def _finish(self) -> None:
        self._is_over = True
        self._inbox.close(self._stream)

    def cancel(self) -> None:
        """Stops the generation (the handle call is cancelled) and forgets the stream."""
        if not self.call_ended.done():
            self._call.cancel()
            self.call_ended.cancel()
        self._finish()


# --- the model replica's side ------------------------------------------------------------------


class _Link:
    """The connection to one inbox: outputs queued during an event-loop turn go as one frame
    at its end."""

    def __init__(self, outbox: Outbox, to: ReplyTo):
        self.outbox, self.key = outbox, (to.host, to.port, to.secret)
        self.pending: list[list] = []
        self.writer: asyncio.StreamWriter | None = None
        self.error: BaseException | None = None
        self.flush_scheduled = False
        self.opening = asyncio.ensure_future(self._open(to))

    async def _open(self, to: ReplyTo) -> None:
        try:
            reader, writer = await asyncio.open_connection(to.host, to.port)
            writer.write(json_frame(to.secret))
        except OSError as exc:
            self._fail(ChannelError(f"cannot reach the ingress replica's output inbox at {to.host}:{to.port}: {exc}"))
            return
        self.writer = writer
        self._flush()
        # The inbox sends nothing: the read ends when the connection does.
        await reader.read()
        self._fail(ChannelError(f"the ingress replica's output inbox at {to.host}:{to.port} closed the connection"))

    def send(self, stream: int, output: GenerationOutput) -> None:
        """Queues `output` for `stream` (sent at the end of this event-loop turn); raises
        `ChannelError` once the connection has failed."""
        if self.error is not None:
            raise self.error
        self.pending.append(output_entry(stream, output))
        if not self.flush_scheduled and self.writer is not None:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_scheduled = False
        if self.pending and self.writer is not None and self.error is None:
            self.writer.write(json_frame(self.pending))
            self.pending = []

    def _fail(self, error: BaseException) -> None:
        self.error = error
        self.pending = []
        if self.writer is not None:
            self.writer.close()
        self.outbox.forget(self)


class Outbox:
    """A model replica's connections to the inboxes of the ingress replicas that send it
    requests, opened on first use and forgotten when they close."""

    def __init__(self) -> None:
        self._links: dict[tuple[str, int, str], _Link] = {}

    def link(self, to: ReplyTo) -> _Link:
        """The connection to `to`'s inbox, opened if there is none (a failed one is forgotten,
        so a later request opens a new one; the requests on the failed one fail)."""
        link = self._links.get((to.host, to.port, to.secret))
        if link is None:
            link = self._links[to.host, to.port, to.secret] = _Link(self, to)
        return link

    def forget(self, link: _Link) -> None:
        if self._links.get(link.key) is link:
            del self._links[link.key]

    async def close(self) -> None:
        for link in list(self._links.values()):
            link.opening.cancel()
            if link.writer is not None:
                link.writer.close()
        self._links.clear()


async def deliver(outputs: AsyncIterator[GenerationOutput], outbox: Outbox, to: ReplyTo) -> Delivered:
    """Sends `outputs` but the last to `to` and returns the last; closing `outputs` (the
    generation) if the connection fails or the call is cancelled."""
    sent, link = 0, None
    async with aclosing(outputs) as running:  # type: ignore[type-var]
        async for output in running:
            if output.finish_reason is not None:
                return Delivered(output, sent)
            link = link or outbox.link(to)
            link.send(to.stream, output)
            sent += 1
    raise RuntimeError("the generation ended without a last output")
