from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import pytest
from ray.exceptions import ActorDiedError

from deployments.engine.protocol import GenerationOutput
from deployments.engine.sampling import SamplingParams
from deployments.history_store import ConversationNotFoundError
from deployments.model_registry import ModelConfig, ModelRegistry
from serve_app.conversations import (
    ConversationBusyError,
    ConversationService,
    TurnRecord,
    affinity_key,
    context_messages,
    conversation_markdown,
    parse_conversation_id,
)
from serve_app.openai_api import sse_events
from serve_app.protocol import STREAM_ERROR_MARKER, Conversation, Message, Usage

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def message(i: int, role: str, content: str, **fields) -> Message:
    return Message(id=i, role=role, content=content, created_at=NOW, **fields)


@pytest.mark.parametrize("raw", ["abc", "-1", "1.5", "", "١"])
def test_ids_that_are_not_plain_integers_name_no_conversation(raw):
    with pytest.raises(ConversationNotFoundError, match=f"conversation '{raw}' not found"):
        parse_conversation_id(raw)


def test_the_turns_of_a_conversation_share_an_affinity_key_and_other_conversations_do_not():
    system = {"role": "system", "content": "Be brief."}
    first = [system, {"role": "user", "content": "Hi"}]
    later = [*first, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Go on"}]
    assert affinity_key(None, first, None) == affinity_key(None, later, None)
    assert affinity_key(None, first, None) != affinity_key(None, [system, {"role": "user", "content": "Bye"}], None)
    stored = TurnRecord(conversation_id=7, prompt="Hi", parameters={})
    assert affinity_key(stored, first, None) == affinity_key(stored, later, None) != affinity_key(None, first, None)
    assert affinity_key(TurnRecord(conversation_id=8, prompt="Hi", parameters={}), first, None) != affinity_key(stored, first, None)
    # A completion that extends an earlier prompt keeps its key.
    opening = "Once upon a time " * 20
    assert affinity_key(None, None, opening) == affinity_key(None, None, opening + "there was a dragon.")


def test_ids_parse():
    assert parse_conversation_id("42") == 42
    assert parse_conversation_id(str(2**63 - 1)) == 2**63 - 1


# Beyond SQLite's INTEGER the history store would raise OverflowError (a 503 once it crossed Ray);
# beyond 4,300 digits int() itself raises ValueError (a 500).
@pytest.mark.parametrize("raw", [str(2**63), "9" * 20, "9" * 5000, 2**63, -1])
def test_ids_beyond_what_sqlite_stores_name_no_conversation(raw):
    with pytest.raises(ConversationNotFoundError, match=f"conversation '{raw}' not found"):
        parse_conversation_id(raw)


def test_context_keeps_answered_turns_and_skips_unanswered_or_failed_ones():
    history = [
        message(1, "user", "q1"), message(2, "assistant", "a1"),
        message(3, "user", "lost"),  # no answer: e.g. the service died
        message(4, "user", "q2"), message(5, "assistant", "", status="failed", error="boom"),
        message(6, "user", "q3"), message(7, "assistant", "partial", status="stopped"),
    ]
    assert context_messages(history) == [
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q3"}, {"role": "assistant", "content": "partial"},
    ]


def test_markdown_export_names_speakers_and_marks_unfinished_answers():
    conversation = Conversation(
        id=3, title=None, created_at=NOW, updated_at=NOW,
        messages=[
            message(1, "user", "Hi"),
            message(2, "assistant", "Hel", model="smol", status="stopped"),
            message(3, "assistant", "", model="smol", status="failed", error="out of memory"),
        ],
    )
    assert conversation_markdown(conversation) == (
        "# Conversation 3\n\n## User\n\nHi\n\n## Assistant (smol) — stopped\n\nHel\n\n"
        "## Assistant (smol) — failed\n\n> error: out of memory\n"
    )


# --- turns, driven without Ray: a model replica's stream and the history are stand-ins --------


class FakeStream:
    """What a model handle's streaming call returns: `outputs`, then `error` if given."""

    def __init__(self, outputs: list[GenerationOutput], error: BaseException | None = None):
        self._outputs, self._error = list(outputs), error
        self.is_cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> GenerationOutput:
        if self._outputs:
            return self._outputs.pop(0)
        if self._error is not None:
            raise self._error
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.is_cancelled = True


class Remote:
    def __init__(self, fn):
        self.remote = fn


class FakeModel:
    """A model deployment's handle whose `generate` calls return the given streams in turn."""

    def __init__(self, *streams: FakeStream):
        self._streams = list(streams)
        self.generate = Remote(lambda request: self._streams.pop(0))

    def options(self, stream: bool):
        return self


class FakeHistory:
    """The history deployment: one conversation (id 1), appended messages kept in order."""

    def __init__(self):
        self.appended: list[dict] = []
        self.get_conversation = Remote(self._get)
        self.append_message = Remote(self._append)

    async def _get(self, conversation_id: int) -> Conversation:
        return Conversation(id=conversation_id, title=None, created_at=NOW, updated_at=NOW, messages=[])

    async def _append(self, conversation_id: int, role: str, content: str, **fields) -> None:
        self.appended.append({"role": role, "content": content, **fields})


def service_with(*streams: FakeStream) -> tuple[ConversationService, FakeHistory]:
    registry = ModelRegistry([ModelConfig(name="m", source={"kind": "tiny_random"})])
    history = FakeHistory()
    return ConversationService(registry, {"m": FakeModel(*streams)}, history), history


def outputs(*texts: str, finish: str | None = None) -> list[GenerationOutput]:
    return [GenerationOutput(text, 5, i + 1, finish if i == len(texts) - 1 else None) for i, text in enumerate(texts)]


async def start(service: ConversationService):
    model = service.registry.default
    return await service.conversation_turn(1, [{"role": "user", "content": "hi"}], model, SamplingParams(), {})


async def test_a_replica_dying_mid_answer_ends_the_text_stream_with_the_marker_and_stores_why():
    service, history = service_with(FakeStream(outputs("Hel", "lo"), error=ActorDiedError()))
    turn = await start(service)
    pieces = [piece async for piece in service.text_pieces(turn)]
    assert pieces[:2] == ["Hel", "lo"]
    assert pieces[2].startswith(f"\n{STREAM_ERROR_MARKER}the model's replica stopped while answering")
    assert pieces[2].endswith("\n")
    user, answer = history.appended
    assert (user["role"], user["content"]) == ("user", "hi")
    assert (answer["content"], answer["status"]) == ("Hello", "failed")
    assert answer["error"].startswith("the model's replica stopped while answering")


async def test_an_openai_stream_that_fails_ends_with_an_error_event_then_done():
    service, history = service_with(FakeStream(outputs("Hel"), error=RuntimeError("CUDA out of memory")))
    turn = await start(service)
    events = [event async for event in sse_events(service, turn, lambda text, finish: Usage(
        prompt_tokens=0, completion_tokens=len(text or ""), total_tokens=0), None)]
    assert [e.startswith(b"data: ") for e in events] == [True, True, True]
    error = json.loads(events[1].decode().removeprefix("data: "))["error"]
    assert error["message"] == "the answer failed: CUDA out of memory" and error["code"] == 503
    assert events[2].strip() == b"data: [DONE]"
    assert history.appended[-1]["status"] == "failed"


async def test_a_second_answer_while_the_conversation_still_answers_is_refused():
    service, history = service_with(FakeStream(outputs("a", "b", finish="stop")), FakeStream(outputs("c", finish="stop")))
    first = await start(service)
    with pytest.raises(ConversationBusyError, match="conversation '1' is already answering"):
        await start(service)
    assert [piece async for piece in service.text_pieces(first)] == ["a", "b"]
    second = await start(service)  # the first answer has ended: the conversation is free again
    assert [piece async for piece in service.text_pieces(second)] == ["c"]
    assert [m["role"] for m in history.appended] == ["user", "assistant", "user", "assistant"]


async def test_the_answer_streams_while_its_prompt_is_stored_and_is_stored_after_it():
    """Storing the prompt (an SQLite commit) is not on the way to the first byte; the answer,
    stored when the stream ends, still follows its prompt."""
    service, history = service_with(FakeStream(outputs("Hel", "lo", finish="stop")))
    commit = asyncio.Event()
    append = history._append

    async def slow_append(conversation_id: int, role: str, content: str, **fields) -> None:
        if role == "user":
            await commit.wait()
        await append(conversation_id, role, content, **fields)

    history.append_message = Remote(slow_append)
    turn = await asyncio.wait_for(start(service), 5)  # the first output needs no write
    pieces = service.text_pieces(turn)
    assert await anext(pieces) == "Hel"
    assert history.appended == []  # the prompt's write is still under way
    rest = asyncio.create_task(anext(pieces))
    assert await rest == "lo"
    ending = asyncio.create_task(anext(pieces, None))
    await asyncio.sleep(0.05)
    assert not ending.done() and history.appended == []  # the answer waits for its prompt
    commit.set()
    assert await ending is None
    assert [(m["role"], m["content"]) for m in history.appended] == [("user", "hi"), ("assistant", "Hello")]
