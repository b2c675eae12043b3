"""What the OpenAI serving classes (`serving_chat`, `serving_completions`, `serving_responses`)
share: a request's choices (OpenAI's `n`) started, read as they come or collected whole, and
written as OpenAI's server-sent events (`data: [DONE]` and the error event of a stream that
fails after it started). Routes are `serve_app.openai_api`; errors before a stream starts become
HTTP responses in `serve_app.errors`."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any

from fastapi.sse import format_sse_event
from pydantic import BaseModel

from deployments.engine.protocol import GenerationOutput
from deployments.engine.sampling_params import SamplingParams
from deployments.model_registry import ModelConfig
from serve_app.protocol import FinishReasonOut, Usage
from serve_app.served_models import ServedModels
from serve_app.streaming import LastChunk
from serve_app.turns import Turn, TurnService, describe_failure


class OpenAIServing:
    """Base of the serving classes: the models a request names and the turns that answer it."""

    def __init__(self, models: ServedModels, turns: TurnService):
        self.models = models
        self.turns = turns


def finish_reason_of(output: GenerationOutput) -> FinishReasonOut | None:
    # A stop request ends the answer early, which OpenAI's clients know as "stop".
    return "stop" if output.finish_reason == "cancelled" else output.finish_reason


def usage_of(*lasts: GenerationOutput) -> Usage:
    """The usage of a request's choices (their last outputs): the prompt once, every answer."""
    prompt, completion = lasts[0].prompt_tokens, sum(last.completion_tokens for last in lasts)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def start_choices(service: TurnService, model: ModelConfig, choices: list[SamplingParams], **prompt: Any) -> list[Turn]:
    """A turn per choice (`n`), started together (`prompt`: `start_turn`'s keyword arguments).
    If one cannot start, the others are abandoned and its error is the request's."""
    if len(choices) == 1:  # nearly every request: no task to start it in
        return [await service.start_turn(model, choices[0], **prompt)]
    started = await asyncio.gather(*(service.start_turn(model, params, **prompt) for params in choices), return_exceptions=True)
    turns = [turn for turn in started if isinstance(turn, Turn)]
    if len(turns) < len(started):
        await asyncio.gather(*(service.abandon(turn) for turn in turns))
        raise next(failure for failure in started if isinstance(failure, BaseException))
    return turns


async def choice_outputs(
    service: TurnService, turns: list[Turn], echo: str = ""
) -> AsyncGenerator[tuple[int, GenerationOutput], None]:
    """Every choice's outputs as they come, each with its choice's index; each choice ends with
    its output that has a finish reason, and its first output's text starts with `echo` (a
    completion's prompt). If one fails, the others are stopped and its error raised. One choice
    (nearly every request) streams straight through, with no task and queue between: every
    streamed chunk's CPU counts on a small machine."""
    if echo:
        echoed: set[int] = set()
        async with aclosing(choice_outputs(service, turns)) as plain:
            async for index, first_or_later in plain:
                if index not in echoed:
                    echoed.add(index)
                    first_or_later = dataclasses.replace(first_or_later, text=echo + first_or_later.text)
                yield index, first_or_later
        return
    if len(turns) == 1:
        async with aclosing(service.outputs(turns[0])) as outputs:
            async for output in outputs:
                yield 0, output
        return
    arrived: asyncio.Queue[tuple[int, GenerationOutput | Exception | None]] = asyncio.Queue()

    async def pump(index: int, turn: Turn) -> None:
        try:
            async with aclosing(service.outputs(turn)) as outputs:
                async for output in outputs:
                    arrived.put_nowait((index, output))
            arrived.put_nowait((index, None))
        except Exception as exc:  # noqa: BLE001 - raised by the reader
            arrived.put_nowait((index, exc))

    pumps = [asyncio.create_task(pump(index, turn)) for index, turn in enumerate(turns)]
    try:
        running = len(pumps)
        while running:
            index, item = await arrived.get()
            if isinstance(item, Exception):
                raise item
            if item is None:
                running -= 1
            else:
                yield index, item
    finally:
        for task in pumps:
            task.cancel()  # a stopped answer is recorded as such by its `outputs`
        await asyncio.gather(*pumps, return_exceptions=True)


async def collect(service: TurnService, turns: list[Turn], echo: str = "") -> list[tuple[str, GenerationOutput]]:
    """Each choice's whole answer (after `echo`, see `choice_outputs`) and its last output
    (finish reason, exact token counts), which carries the whole answer's logprobs if they were
    asked."""
    pieces: list[list[str]] = [[] for _ in turns]
    logprobs: list[list] = [[] for _ in turns]
    lasts: dict[int, GenerationOutput] = {}
    async with aclosing(choice_outputs(service, turns, echo)) as outputs:
        async for index, output in outputs:
            pieces[index].append(output.text)
            logprobs[index] += output.logprobs or []
            lasts[index] = output
    return [
        (
            "".join(texts),
            lasts[index] if lasts[index].logprobs is None else dataclasses.replace(lasts[index], logprobs=logprobs[index]),
        )
        for index, texts in enumerate(pieces)
    ]


DONE_EVENT = format_sse_event(data_str="[DONE]")


def stream_error(exc: Exception) -> bytes:
    """How an OpenAI stream that already started ends on a failure: an error event, then
    `data: [DONE]` (as vLLM does)."""
    error = {"message": describe_failure(exc), "type": "server_error", "param": None, "code": 503}
    return format_sse_event(data_str=json.dumps({"error": error})) + DONE_EVENT


# Stands for a chunk's text in `TextEvents`' template: no id or model name holds it.
TEXT = "\x00"


class TextEvents:
    """The SSE events of one choice's text chunks: `chunk` (a pydantic model whose text is
    `TEXT`) is rendered once, and each event is that JSON with the text put in. A pydantic model
    rendered per chunk cost the ingress more than the rest of the chunk's way through it."""

    def __init__(self, chunk: BaseModel):
        prefix, suffix = chunk.model_dump_json().split(json.dumps(TEXT))
        self.prefix, self.suffix = f"data: {prefix}".encode(), f"{suffix}\n\n".encode()

    def of(self, text: str) -> bytes:
        return self.prefix + json.dumps(text, ensure_ascii=False).encode() + self.suffix


async def sse_events(
    service: TurnService,
    turns: list[Turn],
    chunk: Callable[[int, str | None, FinishReasonOut | None, list | None], BaseModel],
    usage_chunk: Callable[[Usage], BaseModel] | None,
    opening: bytes = b"",
    echo: str = "",
) -> AsyncGenerator[bytes, None]:
    """OpenAI's stream: `chunk(index, text, finish_reason, logprobs)` per output of choice `index`, a
    closing chunk with each choice's finish reason, an optional usage chunk, then
    `data: [DONE]`. A failure after the stream started ends it with an error event, then
    `data: [DONE]` (as vLLM does). The events of one output go out together, in one write, with
    `opening` before the first and the stream's end after the last (a `LastChunk`: the response
    ends in that write): each write costs the ingress and the front a pass through every layer of
    both. `echo`: see `choice_outputs`."""
    lasts: list[GenerationOutput] = []
    text_events: dict[int, TextEvents] = {}
    pending = [opening]
    try:
        async with aclosing(choice_outputs(service, turns, echo)) as outputs:
            async for index, output in outputs:
                if output.logprobs:  # rendered whole: the template has no place for them
                    pending.append(format_sse_event(data_str=chunk(index, output.text, None, output.logprobs).model_dump_json()))
                elif output.text:
                    events = text_events.get(index) or text_events.setdefault(index, TextEvents(chunk(index, TEXT, None, None)))
                    pending.append(events.of(output.text))
                if output.finish_reason is not None:
                    lasts.append(output)
                    pending.append(
                        format_sse_event(data_str=chunk(index, None, finish_reason_of(output), None).model_dump_json())
                    )
                if len(lasts) < len(turns) and any(pending):
                    yield b"".join(pending)
                    pending = []
    except Exception as exc:  # noqa: BLE001 - logged and stored by `outputs`
        yield LastChunk(b"".join([*pending, stream_error(exc)]))
        return
    if usage_chunk is not None:
        pending.append(format_sse_event(data_str=usage_chunk(usage_of(*lasts)).model_dump_json()))
    yield LastChunk(b"".join([*pending, DONE_EVENT]))
