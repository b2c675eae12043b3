"""Generation turns without Ray: what the model sees and where its replica's router keeps it,
then turns driven end to end against a stand-in model replica and a real history store, and a
request's choices (OpenAI's `n`) read through `serve_app.serving`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import Any

import pytest
from ray.exceptions import ActorDiedError
from ray.serve.exceptions import BackPressureError

from deployments.engine.protocol import Delivered, GenerationOutput, GenerationRequest, InvalidRequestError
from deployments.engine.sampling_params import SamplingParams
from deployments.history_store import HistoryStore
from deployments.model_registry import ModelConfig, ModelRegistry
from deployments.output_channel import Inbox, output_entry
from deployments.turn_claims import TURN_LEASE_S, ConversationBusyError, TurnClaims
from serve_app import turns as turns_module
from serve_app.protocol import STREAM_ERROR_MARKER, Completion, CompletionChoice, CompletionLogprobs, Message
from serve_app.serving import sse_events, start_choices
from serve_app.tool_calls import CallReader
from serve_app.turns import ModelOverloadedError, TurnRecord, TurnService, affinity_key

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def message(i: int, role: str, content: str, **fields) -> Message:
    return Message(id=i, role=role, content=content, created_at=NOW, **fields)


def test_the_turns_of_a_conversation_share_an_affinity_key_and_other_conversations_do_not():
    system = {"role": "system", "content": "Be brief."}
    first = [system, {"role": "user", "content": "Hi"}]
    later = [*first, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Go on"}]
    assert affinity_key(None, first, None) == affinity_key(None, later, None)
    assert affinity_key(None, first, None) != affinity_key(None, [system, {"role": "user", "content": "Bye"}], None)
    stored = TurnRecord(conversation_id=7, parameters={}, claim="t")
    assert affinity_key(stored, first, None) == affinity_key(stored, later, None) != affinity_key(None, first, None)
    assert affinity_key(TurnRecord(conversation_id=8, parameters={}, claim="t"), first, None) != affinity_key(stored, first, None)
    # A completion that extends an earlier prompt keeps its key.
    opening = "Once upon a time " * 20
    assert affinity_key(None, None, opening) == affinity_key(None, None, opening + "there was a dragon.")


# --- turns, driven without Ray: a model replica's stream is a stand-in, history a real store ---


class FakeStream:
    """What a model replica does with one request: its `outputs` but the last go to the
    request's inbox stream, then the call returns the last (`Delivered`), or, where the outputs
    end without a finish, raises `error`."""

    def __init__(self, outputs: list[GenerationOutput], error: BaseException | None = None):
        self._outputs, self._error = list(outputs), error
        self.is_cancelled = False

    async def answer(self, inbox: Inbox, request: GenerationRequest) -> Delivered:
        assert request.reply_to is not None
        for sent, output in enumerate(self._outputs):
            if output.finish_reason is not None:
                return Delivered(output, sent)
            inbox.deliver([output_entry(request.reply_to.stream, output)])
            await asyncio.sleep(0)
        return await self.after_outputs()

    async def after_outputs(self) -> Delivered:
        raise self._error or AssertionError("an answer without a finish needs an error")


class HangingStream(FakeStream):
    """A replica that, after its outputs, goes on answering for ever."""

    async def after_outputs(self) -> Delivered:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


class FakeCall:
    """A unary handle call's response: awaited for the replica's answer, cancellable."""

    def __init__(self, stream: FakeStream, answer: Awaitable[Delivered]):
        self.stream, self.task = stream, asyncio.ensure_future(answer)

    def __await__(self):
        return self.task.__await__()

    def cancel(self) -> None:
        self.stream.is_cancelled = True
        self.task.cancel()


class Remote:
    def __init__(self, fn):
        self.remote = fn


class FakeModel:
    """A model deployment's handle whose `generate` calls are answered by the given streams in turn."""

    def __init__(self, inbox: Inbox, *streams: FakeStream | BaseException):
        self._inbox, self._streams = inbox, list(streams)
        self.generate = Remote(self._generate)

    def _generate(self, request: GenerationRequest) -> FakeCall:
        stream = self._streams.pop(0)
        if isinstance(stream, BaseException):
            raise stream
        return FakeCall(stream, stream.answer(self._inbox, request))


class HistoryHandle:
    """The history deployment's handle, over a real store: `handle.get_conversation.remote(1)`
    awaits `store.get_conversation(1)`, whatever `store.get_conversation` is at the time."""

    def __init__(self, store: HistoryStore):
        self.store = store

    def __getattr__(self, name: str) -> Remote:
        return Remote(getattr(self.store, name))


@pytest.fixture
async def history(tmp_path):
    store = HistoryStore(tmp_path / "history.sqlite3")
    await store.open()
    await store.create_conversation()  # id 1, where every turn below is taken
    yield HistoryHandle(store)
    await store.close()


async def stored(history: HistoryHandle) -> list[Message]:
    return (await history.store.get_conversation(1)).messages


def service_with(history: HistoryHandle, *streams: FakeStream | BaseException, **model: Any) -> TurnService:
    registry = ModelRegistry([ModelConfig(name="m", source={"kind": "tiny_random"}, **model)])
    inbox = Inbox()  # not started: the fake replicas deliver to it in-process
    return TurnService(registry, {"m": FakeModel(inbox, *streams)}, history, inbox=inbox)


def outputs(*texts: str, finish: str | None = None) -> list[GenerationOutput]:
    return [GenerationOutput(text, 5, i + 1, finish if i == len(texts) - 1 else None) for i, text in enumerate(texts)]


async def start(service: TurnService):
    model = service.registry.default
    return await service.conversation_turn(1, None, [{"role": "user", "content": "hi"}], model, SamplingParams(), {})


async def test_a_replica_dying_mid_answer_ends_the_text_stream_with_the_marker_and_stores_why(history):
    service = service_with(history, FakeStream(outputs("Hel", "lo"), error=ActorDiedError()))
    turn = await start(service)
    pieces = [piece async for piece in service.text_pieces(turn)]
    assert pieces[:2] == ["Hel", "lo"]
    assert pieces[2].startswith(f"\n{STREAM_ERROR_MARKER}the model's replica stopped while answering")
    assert pieces[2].endswith("\n")
    user, answer = await stored(history)
    assert (user.role, user.content) == ("user", "hi")
    assert (answer.content, answer.status) == ("Hello", "failed")
    assert answer.error.startswith("the model's replica stopped while answering")


async def test_an_openai_stream_that_fails_ends_with_an_error_event_then_done(history):
    service = service_with(history, FakeStream(outputs("Hel"), error=RuntimeError("CUDA out of memory")))
    turn = await start(service)
    events = sse_wire([piece async for piece in sse_events(service, [turn], completion_chunk, None)])
    assert [event[:6] for event in events] == [b"data: "] * 3
    assert json.loads(events[0][6:])["choices"][0]["text"] == "Hel"
    error = json.loads(events[1][6:])["error"]
    assert error["message"] == "the answer failed: CUDA out of memory" and error["code"] == 503
    assert events[2] == b"data: [DONE]"
    assert (await stored(history))[-1].status == "failed"


async def test_a_second_answer_while_the_conversation_still_answers_is_refused(history):
    service = service_with(history, FakeStream(outputs("a", "b", finish="stop")), FakeStream(outputs("c", finish="stop")))
    first = await start(service)
    # Another ingress replica: its own service, the same history.
    with pytest.raises(ConversationBusyError, match="conversation '1' is already answering"):
        await start(service_with(history, FakeStream(outputs("x", finish="stop"))))
    with pytest.raises(ConversationBusyError):
        await start(service)
    assert [piece async for piece in service.text_pieces(first)] == ["a", "b"]
    second = await start(service)  # the first answer is stored: the conversation is free again
    assert [piece async for piece in service.text_pieces(second)] == ["c"]
    assert [(m.role, m.content) for m in await stored(history)] == [
        ("user", "hi"),
        ("assistant", "ab"),
        ("user", "hi"),
        ("assistant", "c"),
    ]


@pytest.mark.parametrize(
    ("failure", "answered_as"),
    [
        (FakeStream([], error=BackPressureError(num_queued_requests=1, max_queued_requests=1)), ModelOverloadedError),
        (FakeStream([], error=ValueError("prompt too long")), ValueError),
        (RuntimeError("no replica"), RuntimeError),  # raised by the call itself
    ],
)
async def test_a_turn_that_fails_to_start_frees_its_conversation_before_the_error_is_answered(history, failure, answered_as):
    service = service_with(history, failure, FakeStream(outputs("ok", finish="stop")))
    with pytest.raises(answered_as):
        await start(service)
    assert history.store.turns.holder(1) is None  # a retry at once is taken
    conversation = await history.store.get_conversation(1)
    assert (conversation.messages, conversation.title) == ([], None)  # its prompt taken back
    retry = await start(service)
    assert [piece async for piece in service.text_pieces(retry)] == ["ok"]
    assert [(m.role, m.content) for m in await stored(history)] == [("user", "hi"), ("assistant", "ok")]


async def test_regenerating_where_there_is_no_prompt_frees_the_conversation(history):
    service = service_with(history, FakeStream(outputs("ok", finish="stop")))
    with pytest.raises(InvalidRequestError, match="has no prompt to answer again"):
        await service.regenerate_turn("1", None, service.registry.default, SamplingParams(), {})
    assert history.store.turns.holder(1) is None


async def test_a_long_answer_renews_its_claim_so_no_other_turn_takes_the_conversation(history, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(turns_module.time, "monotonic", lambda: clock[0])
    history.store.turns = TurnClaims(lease_s=TURN_LEASE_S, clock=lambda: clock[0])
    texts = [f"{i} " for i in range(10)]
    service = service_with(history, FakeStream(outputs(*texts, finish="stop")))
    turn = await start(service)
    pieces = service.text_pieces(turn)
    received = [await anext(pieces)]
    for _ in range(8):  # 8 outputs, 30 s apart: 4 leases long
        clock[0] += 30
        received.append(await anext(pieces))
        await asyncio.sleep(0)  # the renewal's call runs
    with pytest.raises(ConversationBusyError):
        await start(service_with(history, FakeStream(outputs("x", finish="stop"))))
    received += [piece async for piece in pieces]
    assert "".join(received) == "".join(texts)
    assert history.store.turns.holder(1) is None


async def test_the_answer_streams_while_its_prompt_is_stored_and_is_stored_after_it(history):
    """Storing the prompt (an SQLite commit) is not on the way to the first byte; the answer,
    stored when the stream ends, still follows its prompt."""
    service = service_with(history, FakeStream(outputs("Hel", "lo", finish="stop")))
    commit = asyncio.Event()
    append = history.store._append

    async def slow_append(conversation_id: int, messages: list, *fields):
        if messages[0]["role"] == "user":  # the prompt's write
            await commit.wait()
        return await append(conversation_id, messages, *fields)

    history.store._append = slow_append  # type: ignore[method-assign]
    turn = await asyncio.wait_for(start(service), 5)  # the first output needs no write
    pieces = service.text_pieces(turn)
    assert await anext(pieces) == "Hel"
    assert await stored(history) == []  # the prompt's write is still under way
    rest = asyncio.create_task(anext(pieces))
    assert await rest == "lo"
    ending = asyncio.create_task(anext(pieces, None))
    await asyncio.sleep(0.05)
    assert not ending.done() and await stored(history) == []  # the answer waits for its prompt
    commit.set()
    assert await ending is None
    assert [(m.role, m.content) for m in await stored(history)] == [("user", "hi"), ("assistant", "Hello")]


async def test_a_tool_turn_stores_its_calls_with_the_ids_the_client_saw_and_takes_their_results(history):
    weather = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    called = '<tool_call>{"name": "weather", "arguments": {"city": "Oslo"}}</tool_call>'
    service = service_with(
        history,
        FakeStream(outputs("Let me look. ", called, finish="stop")),
        FakeStream(outputs("Cold.", finish="stop")),
    )
    model, reader = service.registry.default, CallReader(frozenset({"weather"}), forced=False)

    async def turn_of(messages: list[dict]) -> tuple[str, GenerationOutput]:
        turn = await service.conversation_turn(1, None, messages, model, SamplingParams(), {}, tools=weather, calls=reader)
        received = [output async for output in service.outputs(turn)]
        return turn.answer_calls("".join(o.text for o in received), received[-1])

    text, [call] = await turn_of([{"role": "user", "content": "Weather in Oslo?"}])
    assert text == "Let me look." and (call.name, json.loads(call.arguments)) == ("weather", {"city": "Oslo"})
    # The client answers the call it saw; an id the conversation never gave is refused, and frees it.
    wrong = [{"role": "tool", "content": "-3 C", "tool_call_id": "call_other"}]
    with pytest.raises(InvalidRequestError, match=r"^messages\.0\.tool_call_id: 'call_other' answers no call"):
        await service.conversation_turn(1, None, wrong, model, SamplingParams(), {}, tools=weather, calls=reader)
    assert history.store.turns.holder(1) is None
    text, calls = await turn_of([{"role": "tool", "content": "-3 C", "tool_call_id": call.id}])
    assert (text, calls) == ("Cold.", [])
    assert [(m.role, m.content, m.tool_calls, m.tool_call_id) for m in await stored(history)] == [
        ("user", "Weather in Oslo?", None, None),
        ("assistant", "Let me look.", [call.openai()], None),
        ("tool", "-3 C", None, call.id),
        ("assistant", "Cold.", None, None),
    ]


# --- a request's choices (OpenAI's `n`) ---

HI = [{"role": "user", "content": "hi"}]


def sse_wire(pieces: list[bytes]) -> list[bytes]:
    """The events of a stream, as a client reads them off the wire (however they were written)."""
    wire = b"".join(pieces)
    assert wire.endswith(b"\n\n")
    return wire.split(b"\n\n")[:-1]


def sse_data(pieces: list[bytes]) -> list:
    """The JSON of every event but the closing `data: [DONE]`, which must come last."""
    events = sse_wire(pieces)
    assert events[-1] == b"data: [DONE]" and b"data: [DONE]" not in events[:-1]
    return [json.loads(event.removeprefix(b"data: ")) for event in events[:-1]]


def completion_chunk(index: int, text: str | None, finish: str | None, logprobs: list | None) -> Completion:
    scored = None if logprobs is None else CompletionLogprobs.of(logprobs)
    choice = CompletionChoice(index=index, text=text or "", finish_reason=finish, logprobs=scored)
    return Completion(id="cmpl-1", created=0, model="m", choices=[choice])


async def test_an_outputs_logprobs_go_out_in_its_chunk(history):
    scored = [
        GenerationOutput("Pa", 3, 1, logprobs=[["Pa", -0.5, [["Pa", -0.5]]]]),
        GenerationOutput("ris", 3, 2, "stop", logprobs=[["ris", -0.25, [["ris", -0.25]]]]),
    ]
    service = service_with(history, FakeStream(scored))
    turns = await start_choices(service, service.registry.default, [SamplingParams(logprobs=1)], messages=HI)
    chunks = sse_data([piece async for piece in sse_events(service, turns, completion_chunk, None)])
    choices = [chunk["choices"][0] for chunk in chunks]
    assert [(c["text"], c["logprobs"] and c["logprobs"]["tokens"]) for c in choices] == [
        ("Pa", ["Pa"]),
        ("ris", ["ris"]),
        ("", None),  # the finish
    ]


async def test_choices_stream_each_its_text_and_finish_and_the_usage_counts_the_prompt_once(history):
    service = service_with(
        history, FakeStream(outputs("a", "b", finish="stop")), FakeStream(outputs("c", "d", "e", finish="length"))
    )
    turns = await start_choices(service, service.registry.default, [SamplingParams()] * 2, messages=HI)

    pieces = [piece async for piece in sse_events(service, turns, completion_chunk, lambda usage: usage)]
    *chunks, usage = sse_data(pieces)
    choices = [chunk["choices"][0] for chunk in chunks]
    texts = {index: "".join(c["text"] for c in choices if c["index"] == index) for index in (0, 1)}
    finishes = {c["index"]: c["finish_reason"] for c in choices if c["finish_reason"]}
    assert texts == {0: "ab", 1: "cde"} and finishes == {0: "stop", 1: "length"}
    assert usage == {"prompt_tokens": 5, "completion_tokens": 2 + 3, "total_tokens": 10}


async def test_a_choice_that_cannot_start_stops_the_ones_that_did(history):
    started = HangingStream(outputs("a"))
    service = service_with(
        history, started, FakeStream([], error=BackPressureError(num_queued_requests=1, max_queued_requests=1))
    )
    with pytest.raises(ModelOverloadedError):
        await start_choices(service, service.registry.default, [SamplingParams()] * 2, messages=HI)
    assert started.is_cancelled


async def test_a_choice_failing_mid_answer_stops_the_others_and_ends_the_stream_with_the_error(history):
    running = HangingStream(outputs("a", "b"))
    service = service_with(history, running, FakeStream(outputs("c"), error=ActorDiedError()))
    turns = await start_choices(service, service.registry.default, [SamplingParams()] * 2, messages=HI)
    pieces = [piece async for piece in sse_events(service, turns, completion_chunk, None)]
    assert sse_data(pieces)[-1]["error"]["message"].startswith("the model's replica stopped while answering")
    assert running.is_cancelled


async def test_each_output_goes_out_in_one_write_the_opening_with_the_first_the_end_with_the_last(history):
    service = service_with(history, FakeStream(outputs("Hel", "lo", finish="stop")))
    turns = await start_choices(service, service.registry.default, [SamplingParams()], messages=HI)
    pieces = [piece async for piece in sse_events(service, turns, completion_chunk, lambda usage: usage, b"data: {}\n\n")]
    first, last = pieces
    assert first.startswith(b"data: {}\n\ndata: ") and first.count(b"\n\n") == 2 and b'"text":"Hel"' in first
    assert last.count(b"\n\n") == 4 and b'"text":"lo"' in last and last.endswith(b"data: [DONE]\n\n")  # text, finish, usage, done


async def test_a_turn_beyond_what_serve_would_take_is_refused_before_any_work(history):
    # One replica taking one request, one more queued: Serve would refuse a third.
    service = service_with(
        history,
        HangingStream(outputs("a")),
        HangingStream(outputs("b")),
        FakeStream(outputs("c", finish="stop")),
        max_ongoing_requests=1,
        max_queued_requests=1,
    )
    model = service.registry.default
    first = await start_choices(service, model, [SamplingParams()], messages=HI)
    await start_choices(service, model, [SamplingParams()], messages=HI)
    calls = list(service.models["m"]._streams)
    with pytest.raises(ModelOverloadedError):
        await start(service)  # a stored conversation: refused before it is claimed
    assert history.store.turns.holder(1) is None and service.models["m"]._streams == calls  # no call made
    with pytest.raises(ModelOverloadedError):
        await start_choices(service, model, [SamplingParams()], messages=HI)
    await service.abandon(first[0])  # one generation ends: room for one more
    await asyncio.sleep(0.01)  # its call's cancellation is seen on the loop's next turns
    turn = await start(service)
    assert [piece async for piece in service.text_pieces(turn)] == ["c"]
