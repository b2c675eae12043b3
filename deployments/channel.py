"""What the project's TCP channels beside Serve share (`output_channel`: model replica to
ingress; `call_channel`: ingress to the history replica, and to a model's where it has one):
frames, and a server end that trusts a connection only once it has presented the server's
secret.

Frames: a 4-byte big-endian length, then the payload. The first frame on a connection is the
secret as JSON (128 random bits that the server hands out only through Serve, so only Ray's
authenticated callers learn it); a server drops a connection that does not open with it within
`HANDSHAKE_TIMEOUT_S`, and reads nothing else from it before."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import struct
from typing import Any

logger = logging.getLogger(__name__)

LENGTH = struct.Struct(">I")
MAX_FRAME_BYTES = 64 << 20
HANDSHAKE_TIMEOUT_S = 10.0


class ChannelError(ConnectionError):
    """A channel's connection failed: what was on the way over it is lost (503 to a user)."""


def frame(payload: bytes) -> bytes:
    return LENGTH.pack(len(payload)) + payload


def json_frame(payload: Any) -> bytes:
    return frame(json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode())


class FrameBuffer:
    """Bytes as they arrive, cut into frames."""

    def __init__(self, max_frame_bytes: int | None = MAX_FRAME_BYTES):
        self.data = bytearray()
        self.max_frame_bytes = max_frame_bytes

    def feed(self, data: bytes) -> list[bytes]:
        """The frames `data` completes; `ValueError` for one over the size limit."""
        self.data += data
        frames = []
        while len(self.data) >= LENGTH.size:
            (length,) = LENGTH.unpack_from(self.data)
            if self.max_frame_bytes is not None and length > self.max_frame_bytes:
                raise ValueError("a frame over the size limit")
            if len(self.data) < LENGTH.size + length:
                break
            frames.append(bytes(self.data[LENGTH.size : LENGTH.size + length]))
            del self.data[: LENGTH.size + length]
        return frames


class TrustedServer:
    """A TCP server on a port the OS picks, whose connections (`protocol`) must present `secret`
    before anything else; `stop` closes it and every connection it holds."""

    def __init__(self) -> None:
        self.secret = secrets.token_hex(16)
        self.host, self.port = "", 0
        self.server: asyncio.AbstractServer | None = None
        self.connections: set[TrustedProtocol] = set()

    def protocol(self) -> TrustedProtocol:
        """The end of a new connection."""
        raise NotImplementedError

    async def start(self, host: str) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self.protocol, host, 0)
        self.host, self.port = host, self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for connection in list(self.connections):
                connection.close()
            await self.server.wait_closed()


class TrustedProtocol(asyncio.Protocol):
    """A server's end of one connection: the first frame must be the server's secret; every
    later one goes to `frame_received`."""

    def __init__(self, server: TrustedServer):
        self.secret, self.connections = server.secret, server.connections
        self.frames = FrameBuffer()
        self.is_trusted = False
        self.transport: asyncio.BaseTransport | None = None
        self.handshake: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # uvloop's transports are not asyncio.Transport subclasses
        self.connections.add(self)
        self.handshake = asyncio.get_running_loop().call_later(HANDSHAKE_TIMEOUT_S, transport.close)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.frames.feed(data)
        except ValueError as exc:
            return self.drop(str(exc))
        for payload in frames:
            if self.transport is None or self.transport.is_closing():
                return
            if self.is_trusted:
                self.frame_received(payload)
            elif self._is_secret(payload):
                self.is_trusted = True
                if self.handshake is not None:
                    self.handshake.cancel()
            else:
                return self.drop("a connection without the server's secret")

    def _is_secret(self, payload: bytes) -> bool:
        try:
            presented = json.loads(payload)
        except ValueError:
            return False
        return isinstance(presented, str) and secrets.compare_digest(presented, self.secret)

    def frame_received(self, payload: bytes) -> None:
        raise NotImplementedError

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)  # type: ignore[attr-defined]

    def drop(self, why: str) -> None:
        peer = self.transport and self.transport.get_extra_info("peername")
        logger.warning("%s: dropped %s from %s", type(self).__name__, why, peer)
        self.close()

    def close(self) -> None:
        self.frames.data.clear()
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        if self.handshake is not None:
            self.handshake.cancel()
