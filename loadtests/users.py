"""Closed-loop users over HTTP: each user keeps one connection and sends its next request as soon
as its last answer has ended (or after a random pause, `think_s`), for as long as the run lasts,
and records when each answer's chunks arrived.

The client is a few lines of HTTP/1.1 over asyncio streams with every request's bytes built once,
so that on a small machine it costs the service as little CPU as it can (an httpx or Locust
client spends about as much per request as the service's own front). It speaks what the
service sends: `Content-Length` or chunked bodies, keep-alive.

Three kinds of request, each what a user of one API sends:
- `completions`: `POST /v1/completions`, streamed, usage included (OpenAI's SDK, `stream=True`);
- `chat`: `POST /v1/chat/completions`, the same for chat messages;
- `original`: a new conversation (`GET /conversations/start`), then `POST
  /conversations/{id}/generate`, the original API's streamed text. Its answer's token count is
  the one stored with it, read afterwards (`stored_tokens`).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

ApiKind = Literal["completions", "chat", "original"]
PROMPT = "Write a long story about a girl named Mira who collects stones by a river."
# The original API's defaults, which its users send (temperature 0.7, top_p 0.9, repeat
# penalty 1.1); the OpenAI requests ask for the same through vLLM's `repetition_penalty`.
ORIGINAL_SAMPLING = {"temperature": 0.7, "top_p": 0.9}


@dataclass(frozen=True)
class Workload:
    """What every user asks, the same request again and again."""

    api: ApiKind
    model: str
    max_tokens: int = 256
    prompt: str = PROMPT
    extra: dict = field(default_factory=dict)  # more fields of an OpenAI request (response_format, logprobs, ...)

    def body(self) -> dict:
        """The JSON body of one request (for `original`, of its generate call)."""
        if self.api == "original":
            return {
                "prompt": self.prompt,
                "model": self.model,
                "sample_len": self.max_tokens,
                **ORIGINAL_SAMPLING,
                "repeat_penalty": 1.1,
            }
        body = {
            "model": self.model,
            "max_tokens": self.max_tokens,
            **ORIGINAL_SAMPLING,
            "repetition_penalty": 1.1,
            # Every answer as long as asked, so runs compare (the original API cannot ask this).
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.api == "chat":
            return body | {"messages": [{"role": "user", "content": self.prompt}]} | self.extra
        return body | {"prompt": self.prompt} | self.extra

    @property
    def path(self) -> str:
        return {"completions": "/v1/completions", "chat": "/v1/chat/completions", "original": "/conversations/{id}/generate"}[
            self.api
        ]


@dataclass
class Answer:
    """One request as its user saw it (times from `time.perf_counter()`)."""

    sent: float
    ended: float = 0.0
    status: int = 0
    chunks: list[float] = field(default_factory=list)  # arrival of each body chunk with text
    tokens: int = 0  # the answer's completion tokens (usage, or stored for `original`)
    error: str | None = None
    conversation_id: int | None = None
    retry_after_s: float | None = None  # of a 429: when the service said to ask again

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None

    @property
    def ttft_s(self) -> float | None:
        return self.chunks[0] - self.sent if self.chunks else None

    def gaps_s(self) -> list[float]:
        return [later - earlier for earlier, later in zip(self.chunks, self.chunks[1:])]


class HttpError(Exception):
    pass


class Connection:
    """One keep-alive HTTP/1.1 connection."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.headers: dict[bytes, bytes] = {}  # of the last response, names in lower case

    async def request(self, head: bytes, body: bytes, on_chunk: Callable[[bytes], None]) -> tuple[int, bytes]:
        """Sends one request (`head` ends with the blank line) and reads its response; `on_chunk`
        sees each piece of the body as it arrives. Returns the status and the whole body."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        try:
            self.writer.write(head + body)
            status_line, _, headers = (await self.reader.readuntil(b"\r\n\r\n")).partition(b"\r\n")
            status = int(status_line.split(b" ", 2)[1])
            self.headers = fields = {
                name.strip().lower(): value.strip()
                for name, _, value in (line.partition(b":") for line in headers.split(b"\r\n") if line)
            }
            pieces = []
            if fields.get(b"transfer-encoding") == b"chunked":
                while True:
                    size = int((await self.reader.readline()).split(b";")[0], 16)
                    piece = (await self.reader.readexactly(size + 2))[:-2]
                    if not size:
                        break
                    on_chunk(piece)
                    pieces.append(piece)
            elif b"content-length" in fields:
                pieces.append(await self.reader.readexactly(int(fields[b"content-length"])))
            else:
                pieces.append(await self.reader.read())
            if fields.get(b"connection") == b"close" or b"content-length" not in fields and b"transfer-encoding" not in fields:
                await self.close()
            return status, b"".join(pieces)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


def _head(method: str, host: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", *(f"{k}: {v}" for k, v in headers.items())]
    if body or method == "POST":
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def openai_outcome(body: bytes) -> tuple[int, str | None]:
    """(completion tokens, error) of a streamed OpenAI answer: its usage event, or the error event
    that ended it; an answer that ended without `data: [DONE]` failed."""
    events = body.split(b"\n\n")
    if not body.endswith(b"data: [DONE]\n\n"):
        return 0, "the stream ended without data: [DONE]"
    for event in reversed(events[:-2]):
        if event.startswith(b"data: {"):
            data = json.loads(event[6:])
            if "error" in data:
                return 0, data["error"].get("message", "error event")
            if data.get("usage"):
                return data["usage"]["completion_tokens"], None
    return 0, "no usage event"


class Users:
    """`count` closed-loop users of `workload` against the service at `url`."""

    def __init__(self, url: str, workload: Workload, headers: dict[str, str] | None = None, think_s: float = 0.0):
        """`think_s`: each user pauses a random time of up to this long after each answer, as a
        person reading it would; 0: the next request at once."""
        parts = urlsplit(url)
        self.think_s = think_s
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.workload = workload
        self.headers = headers or {}
        self._body = json.dumps(workload.body()).encode()
        authority = f"{self.host}:{self.port}"
        self._start_head = _head("GET", authority, "/conversations/start", b"", self.headers)
        self._head = _head("POST", authority, workload.path, self._body, self.headers)
        self._authority = authority

    async def run(self, count: int, duration_s: float, ramp_s: float = 0.0) -> list[Answer]:
        """Every answer of `count` users sending for `duration_s` (answers under way at the end
        are finished and kept: a closed loop's last requests). The users start one by one over
        `ramp_s` (see `stagger`)."""
        answers: list[Answer] = []
        stop_at = time.perf_counter() + duration_s
        await asyncio.gather(*(self._user(stop_at, answers, delay) for delay in stagger(count, ramp_s)))
        return answers

    async def _user(self, stop_at: float, answers: list[Answer], delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        connection = Connection(self.host, self.port)
        try:
            while time.perf_counter() < stop_at:
                answers.append(answer := await self.ask(connection))
                pause = random.uniform(0.0, self.think_s)
                if answer.retry_after_s is not None:  # over a limit: wait as OpenAI's SDKs do
                    pause = answer.retry_after_s
                await asyncio.sleep(min(pause, max(0.0, stop_at - time.perf_counter())))
        finally:
            await connection.close()

    async def ask(self, connection: Connection, conversation: bytes | None = None) -> Answer:
        """One request of the workload, as its user sees it; never raises for the service's
        failures, which the answer records. The original API's request starts a conversation
        first, unless given one (its id, as the service sent it)."""
        answer = Answer(sent=time.perf_counter())
        try:
            head = self._head
            if self.workload.api == "original":
                if conversation is None:
                    status, conversation = await connection.request(self._start_head, b"", lambda _: None)
                    if status != 200:
                        answer.status, answer.error = status, conversation.decode(errors="replace")[:200]
                        return answer
                answer.conversation_id = int(conversation)
                head = head.replace(b"{id}", conversation)
                answer.sent = time.perf_counter()
            clock, chunks, is_original = time.perf_counter, answer.chunks, self.workload.api == "original"

            def arrived(piece: bytes) -> None:
                # Text only, not a write of nothing but an OpenAI stream's closing events (finish,
                # usage, [DONE]), which follow its last text at once: its chunks with text (or the
                # chat's role) are those whose finish_reason is still null.
                if is_original or b'"finish_reason":null' in piece:
                    chunks.append(clock())

            answer.status, body = await connection.request(head, self._body, arrived)
            if answer.status != 200:
                answer.error = body.decode(errors="replace")[:200]
                if answer.status == 429:
                    answer.retry_after_s = float(connection.headers.get(b"retry-after", b"1"))
            elif self.workload.api != "original":
                answer.tokens, answer.error = openai_outcome(body)
            elif b"\n[error] " in body:
                answer.error = body.decode(errors="replace").rpartition("[error] ")[2][:200]
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            answer.error = f"{type(exc).__name__}: {exc}"
        answer.ended = time.perf_counter()
        return answer

    async def burst(self, count: int) -> list[Answer]:
        """`count` users of the original API who each start a conversation, then all ask at once."""
        assert self.workload.api == "original", "a burst asks through the original API"
        connections = [Connection(self.host, self.port) for _ in range(count)]
        try:
            started = await asyncio.gather(*(c.request(self._start_head, b"", lambda _: None) for c in connections))
            if any(status != 200 for status, _ in started):
                raise HttpError(f"a conversation could not be started: {started[0]}")
            return await asyncio.gather(*(self.ask(c, created) for c, (_, created) in zip(connections, started)))
        finally:
            for connection in connections:
                await connection.close()

    async def stored_tokens(self, answers: list[Answer], concurrency: int = 8) -> None:
        """Fills in each original-API answer's token count from its stored message."""
        pending = [a for a in answers if a.conversation_id is not None and a.ok]

        async def read(connection: Connection) -> None:
            while pending:
                answer = pending.pop()
                head = _head("GET", self._authority, f"/conversations/{answer.conversation_id}", b"", self.headers)
                status, body = await connection.request(head, b"", lambda _: None)
                if status == 200:
                    messages = json.loads(body)["messages"]
                    answer.tokens = messages[-1]["completion_tokens"] or 0

        connections = [Connection(self.host, self.port) for _ in range(concurrency)]
        try:
            await asyncio.gather(*(read(connection) for connection in connections))
        finally:
            for connection in connections:
                await connection.close()


def stagger(count: int, ramp_s: float) -> list[float]:
    """When each of `count` users starts: evenly over `ramp_s`. Users that start together and ask
    the same stay in step (their answers end in the same decode step), and a window then counts
    whole waves of answers; started apart, they stay apart."""
    return [ramp_s * i / count for i in range(count)]


def _share_in(answer: Answer, start: float, end: float) -> float:
    """The part of `answer`'s tokens generated between `start` and `end`, taking them as spread
    evenly from its first chunk to its end."""
    begin = answer.chunks[0] if answer.chunks else answer.sent
    if answer.ended <= begin:
        return 1.0 if start <= answer.ended < end else 0.0
    return max(0.0, min(end, answer.ended) - max(start, begin)) / (answer.ended - begin)


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


@dataclass
class Window:
    """What users got in one measured window: the tokens generated in it, the answers that ended
    in it, and the latencies of those sent in it."""

    seconds: float
    tokens: float
    requests: int
    errors: list[str]
    ttft_s: list[float]
    gaps_s: list[float]
    chunks: int

    @classmethod
    def of(cls, answers: list[Answer], start: float, end: float) -> Window:
        ended = [a for a in answers if start <= a.ended < end]
        sent = [a for a in answers if start <= a.sent < end and a.ok]
        ok = [a for a in ended if a.ok]
        return cls(
            seconds=end - start,
            tokens=sum(a.tokens * _share_in(a, start, end) for a in answers if a.ok),
            requests=len(ok),
            errors=[a.error or f"HTTP {a.status}" for a in ended if not a.ok],
            ttft_s=[t for a in sent if (t := a.ttft_s) is not None],
            gaps_s=[gap for a in sent for gap in a.gaps_s()],
            chunks=sum(len(a.chunks) for a in ok),
        )

    @classmethod
    def merged(cls, windows: list[Window]) -> Window:
        """Several windows of the same run as one: their seconds, tokens and answers together."""
        return cls(
            seconds=sum(w.seconds for w in windows),
            tokens=sum(w.tokens for w in windows),
            requests=sum(w.requests for w in windows),
            errors=[e for w in windows for e in w.errors],
            ttft_s=[t for w in windows for t in w.ttft_s],
            gaps_s=[g for w in windows for g in w.gaps_s],
            chunks=sum(w.chunks for w in windows),
        )

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds

    @property
    def chunks_per_s(self) -> float:
        return self.chunks / self.seconds
