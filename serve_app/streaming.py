"""Streaming responses that always close their body generator.

Starlette stops iterating a streaming body when the client disconnects, but if the disconnect
lands while the generator is suspended at a `yield`, the generator itself is only closed when it
is garbage-collected. Our generators record the turn in their `finally` (a stopped answer must
be stored promptly), so these responses close them explicitly, whatever ended the response.
"""

from __future__ import annotations

import asyncio

from fastapi.sse import EventSourceResponse
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

# asyncio keeps only weak references to tasks: hold the closing ones until they are done.
_closing: set[asyncio.Task] = set()


class _ClosesBody(StreamingResponse):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                # In a task of its own: after a disconnect this one sits in a cancelled anyio
                # scope, where every await inside the generator's cleanup would be cancelled.
                closing = asyncio.create_task(aclose())
                _closing.add(closing)
                closing.add_done_callback(_closing.discard)
                await asyncio.shield(closing)


class TextStreamResponse(_ClosesBody):
    media_type = "text/plain; charset=utf-8"


class ServerSentEventsResponse(_ClosesBody, EventSourceResponse):
    pass
