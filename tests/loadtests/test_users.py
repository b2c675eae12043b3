"""The closed-loop load client against a real HTTP server (uvicorn, in-process) that streams as
the service does: chunked SSE with usage and `data: [DONE]`, a text stream, a JSON body, errors."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from loadtests.users import Answer, Users, Window, Workload, openai_outcome, stagger

CONNECTIONS: set[tuple[str, int]] = set()


async def completions(request: Request) -> StreamingResponse:
    CONNECTIONS.add(request.scope["client"])
    body = await request.json()
    if body["model"] == "busy":
        return JSONResponse({"error": {"message": "overloaded"}}, status_code=503)

    def data(payload: dict) -> str:
        return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"  # compact, as pydantic writes it

    async def events():
        for text in ("Once", " upon", " a time"):
            await asyncio.sleep(0.01)
            yield data({"choices": [{"text": text, "finish_reason": None}]})
        yield data({"choices": [{"text": "", "finish_reason": "length"}]})
        if body["model"] != "cut":
            yield data({"choices": [], "usage": {"completion_tokens": body["max_tokens"]}})
            yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


async def start(request: Request) -> PlainTextResponse:
    return PlainTextResponse("7")


async def generate(request: Request) -> StreamingResponse:
    async def pieces():
        yield "Hel"
        await asyncio.sleep(0.01)
        yield "lo"

    return StreamingResponse(pieces(), media_type="text/plain")


async def conversation(request: Request) -> JSONResponse:
    return JSONResponse({"messages": [{"role": "user"}, {"role": "assistant", "completion_tokens": 42}]})


@pytest.fixture
async def server_url():
    app = Starlette(
        routes=[
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/conversations/start", start),
            Route("/conversations/7/generate", generate, methods=["POST"]),
            Route("/conversations/7", conversation),
        ]
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    CONNECTIONS.clear()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    await task


async def test_users_stream_answers_over_one_connection_each_and_read_usage(server_url):
    answers = await Users(server_url, Workload("completions", "m", max_tokens=9)).run(count=2, duration_s=0.3)
    assert len(answers) >= 4 and all(a.ok for a in answers)
    assert {a.tokens for a in answers} == {9}
    # The three text events, not the finish, usage and [DONE] that follow the last at once.
    assert {len(a.chunks) for a in answers} == {3}
    # Each arrival timed: the server sends the texts 10, 20 and 30 ms after the request.
    assert all(a.ttft_s >= 0.01 and a.chunks[-1] - a.sent >= 0.03 and min(a.gaps_s()) >= 0 for a in answers)
    assert len(CONNECTIONS) == 2  # keep-alive: every request of a user on its connection


async def test_a_refusal_and_a_stream_cut_short_are_errors(server_url):
    busy = await Users(server_url, Workload("completions", "busy")).run(count=1, duration_s=0.05)
    assert busy[0].status == 503 and not busy[0].ok and "overloaded" in (busy[0].error or "")
    cut = await Users(server_url, Workload("completions", "cut")).run(count=1, duration_s=0.05)
    assert cut[0].status == 200 and cut[0].error == "the stream ended without data: [DONE]"


async def test_original_api_users_start_a_conversation_each_time_and_read_stored_tokens(server_url):
    users = Users(server_url, Workload("original", "m"))
    answers = await users.run(count=1, duration_s=0.05)
    assert answers[0].ok and answers[0].conversation_id == 7 and len(answers[0].chunks) == 2
    await users.stored_tokens(answers)
    assert answers[0].tokens == 42


def test_openai_outcome_reads_usage_or_the_error_event():
    usage = b'data: {"choices":[{"text":"a"}]}\n\ndata: {"choices":[],"usage":{"completion_tokens":3}}\n\ndata: [DONE]\n\n'
    assert openai_outcome(usage) == (3, None)
    failed = b'data: {"choices":[{"text":"a"}]}\n\ndata: {"error":{"message":"replica died"}}\n\ndata: [DONE]\n\n'
    assert openai_outcome(failed) == (0, "replica died")


def test_a_window_counts_what_ended_in_it_and_times_what_was_sent_in_it():
    def answer(sent: float, ended: float, tokens: int, status: int = 200) -> Answer:
        return Answer(sent=sent, ended=ended, status=status, chunks=[sent + 0.1, sent + 0.3], tokens=tokens)

    answers = [answer(0.5, 1.5, 10), answer(1.2, 2.5, 20), answer(2.0, 3.5, 40), answer(2.1, 2.2, 0, status=503)]
    window = Window.of(answers, 1.0, 3.0)
    assert (window.requests, window.errors) == (2, ["HTTP 503"])
    # Tokens pro rata of the time each answer streamed (first chunk to end) inside the window.
    assert window.tokens == pytest.approx(10 * 0.5 / 0.9 + 20 + 40 * 0.9 / 1.4)
    assert window.chunks_per_s == 2
    assert window.ttft_s == pytest.approx([0.1, 0.1])  # the two answers sent in it that succeeded
    assert window.gaps_s == pytest.approx([0.2, 0.2])


def test_windows_merged_count_their_seconds_tokens_and_latencies_together():
    def window(seconds: float, tokens: float, ttft: list[float]) -> Window:
        return Window(seconds, tokens, len(ttft), [f"e{seconds}"], ttft, [0.01] * len(ttft), 2 * len(ttft))

    merged = Window.merged([window(20, 2000, [0.1]), window(30, 4000, [0.2, 0.3])])
    assert merged.tokens_per_s == 120  # 6,000 tokens over 50 s, not the mean of 100 and 133
    assert (merged.requests, merged.chunks, merged.errors) == (3, 6, ["e20", "e30"])
    assert merged.ttft_s == [0.1, 0.2, 0.3] and len(merged.gaps_s) == 3


async def test_users_start_one_by_one_over_the_ramp(server_url):
    assert stagger(4, 2.0) == [0.0, 0.5, 1.0, 1.5]
    started = time.perf_counter()
    answers = sorted(
        await Users(server_url, Workload("completions", "m")).run(count=2, duration_s=0.6, ramp_s=0.5), key=lambda a: a.sent
    )
    alone = [a for a in answers if a.sent < started + 0.2]  # before the second user's start at 0.25 s
    assert len(alone) >= 2 and all(later.sent >= earlier.ended for earlier, later in zip(alone, alone[1:]))
    together = [a for a in answers if a.sent > started + 0.3]
    assert any(b.sent < a.ended for a, b in zip(together, together[1:]))  # two users' answers overlap


async def test_a_thinking_user_pauses_a_random_time_after_each_answer(server_url):
    answers = await Users(server_url, Workload("completions", "m"), think_s=0.1).run(count=1, duration_s=0.8)
    pauses = [later.sent - earlier.ended for earlier, later in zip(answers, answers[1:])]
    assert len(pauses) >= 4 and all(0 <= pause < 0.12 for pause in pauses)
    assert max(pauses) - min(pauses) > 0.01  # drawn anew each time, not one fixed wait


async def test_a_burst_starts_every_conversation_before_anyone_asks(server_url):
    answers = await Users(server_url, Workload("original", "m")).burst(3)
    assert len(answers) == 3 and all(a.ok and a.conversation_id == 7 for a in answers)
    # Asked at once: each question was sent before any answer ended.
    assert max(a.sent for a in answers) < min(a.ended for a in answers)
