"""An ingress replica's calls to a deployment of one replica, on a TCP connection beside Serve.

The history deployment has one replica, and so has a model served by a fixed `num_replicas: 1`
(the default): their calls need nothing a Serve handle call brings (routing among replicas,
queue bounds, autoscaling), yet each cost the ingress ~0.9 ms and the replica ~0.6 ms of CPU
on two cores, most of it in Serve's router, request metrics and gRPC (docs/performance.md). So
each ingress replica keeps one connection to such a replica and makes its calls on it:
`CallClient` has a handle's interface (`client.get_conversation.remote(1)` is a task to await
or cancel), and makes a call through the handle itself while the connection is not open (the
first calls, or the replica restarting), so nothing depends on the channel being reachable.

- Replica side: `CallServer` runs the deployment's public methods for trusted connections,
  concurrently, as Serve would; it answers `address()` through Serve. Stopping (`stop`, as the
  replica shuts down) says goodbye: each caller sends its next calls through Serve, whose
  router knows the replica that follows, while the calls already made are answered.
- Ingress side: `CallClient`. A call cancelled by its caller is cancelled in the replica too (a
  cancelled history write is rolled back, a cancelled generation stops); a call whose connection
  is lost before its answer raises `ReplicaLostError` (503, as for a replica lost mid-call).

Frames (`deployments.channel`): after the secret, pickle both ways, as Ray's own calls are: the
secret is given only through Serve, to callers Ray has authenticated. Calls `(id, method, args,
kwargs)`, cancellations `(id,)`, the caller's last frame `None`; answers `(id, True, value)`,
`(id, False, exception)`, `(id, None, None)` for a call made after the goodbye (to be made
through Serve), the goodbye `None`.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import time
from typing import Any, Protocol

from deployments.channel import ChannelError, FrameBuffer, TrustedProtocol, TrustedServer, frame, json_frame

logger = logging.getLogger(__name__)

# After a connection could not be opened, or said goodbye, calls go through Serve this long
# before the next try: a replica that is away is not asked again at every call.
REOPEN_AFTER_S = 1.0
# How long a stopping server waits, by default, for its callers to finish their calls and go.
STOP_TIMEOUT_S = 10.0
# Errors a method answers with (a conversation not found, a prompt too long), not failures of
# the replica: not logged there.
ANSWERS = (LookupError, ValueError, RuntimeError, PermissionError)

GOODBYE = None


class ReplicaLostError(ChannelError):
    """The connection to the replica was lost while a call waited for its answer: the replica
    stopped (or its node cannot be reached), as a Serve call's `RayActorError` says."""


def _pickled(payload: Any) -> bytes:
    return frame(pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))


# --- the replica's side ------------------------------------------------------------------------


class CallServer(TrustedServer):
    """Runs `target`'s public methods for the callers that present its secret; `name` (the
    deployment's) names them in the log."""

    def __init__(self, target: object, name: str):
        super().__init__()
        self.target, self.name = target, name
        self.is_stopping = False
        self._starting: asyncio.Lock | None = None

    async def start_once(self, host: str) -> None:
        """Starts the server unless it is started (or stopping): for a replica that starts it
        on its first `address()` call, which several callers may make at once."""
        self._starting = self._starting or asyncio.Lock()
        async with self._starting:
            if self.server is None and not self.is_stopping:
                await self.start(host)

    def protocol(self) -> TrustedProtocol:
        return _ServerProtocol(self)

    def address(self) -> tuple[str, int, str] | None:
        """Where callers connect, and the secret they present (None once stopping)."""
        return None if self.is_stopping or self.server is None else (self.host, self.port, self.secret)

    async def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Says goodbye to every caller and waits (at most `timeout_s`) until each has had its
        calls answered and gone; then closes what is left."""
        self.is_stopping = True
        if self.server is None:
            return
        self.server.close()
        for connection in list(self.connections):
            connection.write(_pickled(GOODBYE))
        deadline = time.monotonic() + timeout_s
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await super().stop()

    def method(self, name: str) -> Any:
        """The target's method `name`; `AttributeError` for a private or missing one."""
        if name.startswith("_"):
            raise AttributeError(f"{self.name} has no method {name!r}")
        return getattr(self.target, name)


class _ServerProtocol(TrustedProtocol):
    """One caller's connection: its calls run as tasks; each answer goes back when ready."""

    def __init__(self, server: CallServer):
        super().__init__(server)
        self.server = server
        self.calls: dict[int, asyncio.Task] = {}
        self.has_left = False

    def frame_received(self, payload: bytes) -> None:
        try:
            message = pickle.loads(payload)
        except Exception:  # noqa: BLE001 - a trusted caller's frame that is not one
            return self.drop("a frame that is not a call")
        if message is None:  # the caller's last frame: it makes no more calls here
            self.has_left = True
            self._close_when_done()
        elif len(message) == 1:
            call = self.calls.get(message[0])
            if call is not None:
                call.cancel()
        elif self.server.is_stopping:
            self.write(_pickled((message[0], None, None)))
        else:
            call_id, name, args, kwargs = message
            task = asyncio.ensure_future(self._run(call_id, name, args, kwargs))
            self.calls[call_id] = task
            task.add_done_callback(lambda _: self._call_done(call_id))

    async def _run(self, call_id: int, name: str, args: tuple, kwargs: dict[str, Any]) -> None:
        try:
            value = self.server.method(name)(*args, **kwargs)
            if asyncio.iscoroutine(value):
                value = await value
            answer = (call_id, True, value)
        except asyncio.CancelledError:
            return  # cancelled by the caller: nobody waits for an answer
        except Exception as exc:  # noqa: BLE001 - the caller raises it
            if not isinstance(exc, ANSWERS):
                logger.exception("%s.%s failed", self.server.name, name)
            answer = (call_id, False, exc)
        try:
            data = _pickled(answer)
        except Exception as exc:  # noqa: BLE001 - an answer that cannot travel fails the call
            logger.exception("%s.%s: its answer cannot be sent", self.server.name, name)
            data = _pickled((call_id, False, RuntimeError(f"{self.server.name}.{name}: its answer cannot be sent: {exc!r}")))
        self.write(data)

    def _call_done(self, call_id: int) -> None:
        self.calls.pop(call_id, None)
        self._close_when_done()

    def _close_when_done(self) -> None:
        if self.has_left and not self.calls:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        for call in self.calls.values():  # the caller is gone: as when a Serve call is cancelled
            call.cancel()


# --- the ingress replica's side -----------------------------------------------------------------


class DeploymentHandleLike(Protocol):
    """A deployment's Serve handle, as the client uses it: `handle.<method>.remote(...)`,
    `address` among the methods (or a `CallClient` in its place)."""

    def __getattr__(self, name: str) -> Any: ...


class _Connection(asyncio.Protocol):
    """The connection to one replica's server, and the calls waiting for its answers."""

    def __init__(self, client: CallClient):
        self.client = client
        self.frames = FrameBuffer(max_frame_bytes=None)  # the server is trusted: answers of any size
        self.transport: asyncio.BaseTransport | None = None
        self.waiting: dict[int, asyncio.Future] = {}
        self.next_id = 0
        self.is_open = False  # connected and not told goodbye: takes new calls

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def send(self, message: Any) -> None:
        assert self.transport is not None
        self.transport.write(_pickled(message))  # type: ignore[attr-defined]

    async def call(self, name: str, args: tuple, kwargs: dict[str, Any]) -> tuple[bool | None, Any]:
        """The call's answer: (True, value), (False, exception) or (None, None) to make it through
        Serve instead."""
        self.next_id += 1
        call_id = self.next_id
        answer = self.waiting[call_id] = asyncio.get_running_loop().create_future()
        try:
            self.send((call_id, name, args, kwargs))  # arguments that cannot be pickled raise here
            return await answer
        except asyncio.CancelledError:
            # The caller's cancellation cancelled `answer` too, unless the answer had come.
            if answer.cancelled() and self.transport is not None and not self.transport.is_closing():
                self.send((call_id,))
            raise
        finally:
            self.waiting.pop(call_id, None)

    def data_received(self, data: bytes) -> None:
        for payload in self.frames.feed(data):
            message = pickle.loads(payload)
            if message is GOODBYE:
                self.is_open = False
                self.client.told_goodbye(self)
                self.send(None)
                continue
            call_id, is_done, value = message
            answer = self.waiting.get(call_id)
            if answer is not None and not answer.done():
                answer.set_result((is_done, value))

    def connection_lost(self, exc: Exception | None) -> None:
        self.is_open = False
        self.client.lost(self)
        error = ReplicaLostError(f"the connection to the {self.client.name} replica was lost: {exc or 'closed'}")
        for answer in self.waiting.values():
            if not answer.done():
                answer.set_exception(error)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class _Method:
    __slots__ = ("client", "name")

    def __init__(self, client: CallClient, name: str):
        self.client, self.name = client, name

    def remote(self, *args: Any, **kwargs: Any) -> asyncio.Task:
        # A task, as a Serve handle's response: the call is made now, and can be awaited or cancelled.
        return asyncio.ensure_future(self.client.call(self.name, args, kwargs))


class CallClient:
    """A deployment of one replica as an ingress replica calls it: `client.<method>.remote(...)`,
    on the channel when its connection is open, else through the Serve handle (opening the
    channel). `name` (the deployment's) names it in logs and errors."""

    def __init__(self, handle: DeploymentHandleLike, name: str):
        self.handle, self.name = handle, name
        self._connection: _Connection | None = None
        self._opening: asyncio.Task | None = None
        self._next_open_at = 0.0

    def __getattr__(self, name: str) -> _Method:
        if name.startswith("_"):
            raise AttributeError(name)
        return _Method(self, name)

    async def call(self, name: str, args: tuple, kwargs: dict[str, Any]) -> Any:
        connection = self._connection
        if connection is not None and connection.is_open:
            is_done, value = await connection.call(name, args, kwargs)
            if is_done is True:
                return value
            if is_done is False:
                raise value
        else:
            self.open()
        return await getattr(self.handle, name).remote(*args, **kwargs)

    def open(self) -> None:
        """Opens the connection in the background, unless one is open or opening, or the last
        try was less than `REOPEN_AFTER_S` ago."""
        if self._opening is not None or (self._connection is not None and self._connection.is_open):
            return
        if time.monotonic() < self._next_open_at:
            return
        self._opening = asyncio.create_task(self._open())

    async def opened(self) -> bool:
        """Opens the connection now (a replica's first call); whether it is open."""
        self.open()
        if self._opening is not None:
            await asyncio.shield(self._opening)
        return self._connection is not None and self._connection.is_open

    async def _open(self) -> None:
        try:
            address = await self.handle.address.remote()
            if address is None:  # the replica is stopping: Serve will route to the next one
                raise ConnectionError(f"the {self.name} replica is stopping")
            host, port, secret = address
            loop = asyncio.get_running_loop()
            _, connection = await loop.create_connection(lambda: _Connection(self), host, port)
            connection.transport.write(json_frame(secret))  # type: ignore[union-attr]
            connection.is_open = True
            self._connection = connection
            logger.info("%s channel open to %s:%s", self.name, host, port)
        except Exception as exc:  # noqa: BLE001 - calls go through Serve meanwhile
            logger.info("%s channel not open (%s); calls go through Serve", self.name, exc)
            self._next_open_at = time.monotonic() + REOPEN_AFTER_S
        finally:
            self._opening = None

    def told_goodbye(self, connection: _Connection) -> None:
        self._next_open_at = time.monotonic() + REOPEN_AFTER_S

    def lost(self, connection: _Connection) -> None:
        if self._connection is connection:
            self._connection = None
            self._next_open_at = time.monotonic() + REOPEN_AFTER_S

    def close(self) -> None:
        if self._opening is not None:
            self._opening.cancel()
        if self._connection is not None:
            self._connection.close()
