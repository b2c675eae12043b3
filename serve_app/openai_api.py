"""The OpenAI-compatible endpoint family (`/v1`): models, chat completions, text completions
and responses (the Responses API), streamed as server-sent events or returned whole. Converts
protocol requests into turns of the shared `ConversationService` and engine outputs back into
OpenAI's chunk and event shapes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Header
from fastapi.sse import format_sse_event
from pydantic import BaseModel

from deployments.engine.protocol import GenerationOutput, InvalidRequestError
from deployments.engine.sampling import SamplingParams
from deployments.model_registry import ModelConfig
from serve_app.auth import CALLER, Caller
from serve_app.conversations import ConversationService, StreamLease, Turn, describe_failure
from serve_app.protocol import (
    MAX_CONVERSATION_ID,
    ChatCompletion,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatDelta,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    DetokenizeBody,
    Detokenized,
    FinishReasonOut,
    MessageStatusOut,
    ModelList,
    ModelObject,
    OpenAIErrorResponse,
    ResponseError,
    ResponseIncompleteDetails,
    ResponseObject,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponsesRequest,
    ResponseStatus,
    ResponseUsage,
    TokenizeBody,
    Tokenized,
    ToolCall,
    ToolCallDelta,
    ToolCallFunction,
    Usage,
)
from serve_app.streaming import ServerSentEventsResponse
from serve_app.tool_calls import Call, CallSplitter, calls_in_text, forced_calls

STARTED_AT = int(time.time())
# The statuses whose bodies are OpenAI's error under /v1 (`ingress._error_body`; a 422 is answered as a 400).
OPENAI_ERROR_CODES = (400, 401, 403, 404, 409, 413, 429, 503)
SSE_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "With `stream: true`: chunks as server-sent events."}
}


def finish_reason_of(output: GenerationOutput) -> FinishReasonOut | None:
    # A stop request ends the answer early, which OpenAI's clients know as "stop".
    return "stop" if output.finish_reason == "cancelled" else output.finish_reason


def usage_of(*lasts: GenerationOutput) -> Usage:
    """The usage of a request's choices (their last outputs): the prompt once, every answer."""
    prompt, completion = lasts[0].prompt_tokens, sum(last.completion_tokens for last in lasts)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def start_choices(
    service: ConversationService, model: ModelConfig, choices: list[SamplingParams], **prompt: Any
) -> list[Turn]:
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


async def choice_outputs(service: ConversationService, turns: list[Turn]) -> AsyncGenerator[tuple[int, GenerationOutput], None]:
    """Every choice's outputs as they come, each with its choice's index; each choice ends with
    its output that has a finish reason. If one fails, the others are stopped and its error
    raised. One choice (nearly every request) streams straight through, with no task and queue
    between: every streamed chunk's CPU counts on a small machine."""
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


async def collect(service: ConversationService, turns: list[Turn]) -> list[tuple[str, GenerationOutput]]:
    """Each choice's whole answer and its last output (finish reason, exact token counts), which
    carries the whole answer's logprobs if they were asked."""
    pieces: list[list[str]] = [[] for _ in turns]
    logprobs: list[list] = [[] for _ in turns]
    lasts: dict[int, GenerationOutput] = {}
    async with aclosing(choice_outputs(service, turns)) as outputs:
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
    service: ConversationService,
    turns: list[Turn],
    chunk: Callable[[int, str | None, FinishReasonOut | None, list | None], BaseModel],
    usage_chunk: Callable[[Usage], BaseModel] | None,
    opening: bytes = b"",
) -> AsyncGenerator[bytes, None]:
    """OpenAI's stream: `chunk(index, text, finish_reason, logprobs)` per output of choice `index`, a
    closing chunk with each choice's finish reason, an optional usage chunk, then
    `data: [DONE]`. A failure after the stream started ends it with an error event, then
    `data: [DONE]` (as vLLM does). The events of one output go out together, in one write, with
    `opening` before the first and the stream's end after the last: each write costs the ingress
    and the front a pass through every layer of both."""
    lasts: list[GenerationOutput] = []
    text_events: dict[int, TextEvents] = {}
    pending = [opening]
    try:
        async with aclosing(choice_outputs(service, turns)) as outputs:
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
        yield b"".join([*pending, stream_error(exc)])
        return
    if usage_chunk is not None:
        pending.append(format_sse_event(data_str=usage_chunk(usage_of(*lasts)).model_dump_json()))
    yield b"".join([*pending, DONE_EVENT])


def tool_answer(
    text: str, last: GenerationOutput, forced: bool, names: set[str]
) -> tuple[ChatCompletionMessage, FinishReasonOut | None]:
    """An answer of a request with tools: its calls (`tool_calls`, finish reason "tool_calls")
    and the text that is not a call. A forced call is the whole answer once its grammar is
    complete; cut short (max_tokens, a stop string), it is returned as text."""
    calls: list[Call] = []
    content: str | None = text
    if forced:
        if last.finish_reason == "stop":
            with contextlib.suppress(ValueError, KeyError, TypeError):
                calls, content = forced_calls(text), None
    else:
        content, calls = calls_in_text(text, names)
    tool_calls = [ToolCall(id=c.id, function=ToolCallFunction(name=c.name, arguments=c.arguments)) for c in calls]
    if calls and not content:
        content = None
    return ChatCompletionMessage(content=content, tool_calls=tool_calls or None), "tool_calls" if calls else finish_reason_of(
        last
    )


async def tool_answer_events(
    service: ConversationService,
    turn: Turn,
    chunk: Callable[[ChatDelta, FinishReasonOut | None], BaseModel],
    usage_chunk: Callable[[Usage], BaseModel] | None,
    forced: bool,
    names: set[str],
) -> AsyncGenerator[bytes, None]:
    """The stream of a request with tools: its text as it comes up to where a call may start
    (none of it when the call is forced), then the rest of its text, its calls (one
    `delta.tool_calls` chunk each, whole), its finish reason and usage, then `data: [DONE]`."""

    def event(delta: ChatDelta, finish: FinishReasonOut | None = None) -> bytes:
        return format_sse_event(data_str=chunk(delta, finish).model_dump_json(exclude_none=True))

    splitter, pieces = CallSplitter(), []
    yield event(ChatDelta(role="assistant", content=""))
    try:
        async with aclosing(service.outputs(turn)) as outputs:
            async for output in outputs:
                pieces.append(output.text)
                text = "" if forced else splitter.feed(output.text)
                if text:
                    yield event(ChatDelta(content=text))
    except Exception as exc:  # noqa: BLE001 - logged and stored by `outputs`
        yield stream_error(exc)
        return
    message, finish = tool_answer("".join(pieces) if forced else splitter.held, output, forced, names)
    closing = [event(ChatDelta(content=message.content))] if message.content else []
    closing += [
        event(ChatDelta(tool_calls=[ToolCallDelta(index=index, **call.model_dump())]))
        for index, call in enumerate(message.tool_calls or [])
    ]
    closing.append(event(ChatDelta(), finish))
    if usage_chunk is not None:
        closing.append(format_sse_event(data_str=usage_chunk(usage_of(output)).model_dump_json()))
    yield b"".join([*closing, DONE_EVENT])


@dataclass
class ResponseDraft:
    """One answer of the Responses API, rendered at each stage of its life: its ids, and the
    request settings a response echoes."""

    body: ResponsesRequest
    model: str
    params: SamplingParams  # the body's, as the turn runs them
    id: str = field(default_factory=lambda: f"resp_{uuid.uuid4().hex}")
    message_id: str = field(default_factory=lambda: f"msg_{uuid.uuid4().hex}")
    created_at: int = field(default_factory=lambda: int(time.time()))

    def message(self, status: MessageStatusOut, text: str | None = None) -> ResponseOutputMessage:
        content = [] if text is None else [ResponseOutputText(text=text)]
        return ResponseOutputMessage(id=self.message_id, status=status, content=content)

    def render(
        self,
        status: ResponseStatus,
        output: list[ResponseOutputMessage] | None = None,
        usage: ResponseUsage | None = None,
        error: ResponseError | None = None,
    ) -> ResponseObject:
        return ResponseObject(
            id=self.id,
            created_at=self.created_at,
            status=status,
            model=self.model,
            output=output or [],
            usage=usage,
            error=error,
            instructions=self.body.instructions,
            max_output_tokens=self.body.max_output_tokens,
            temperature=self.params.temperature,
            top_p=self.params.top_p,
            text={"format": self.body.text.format.model_dump(by_alias=True, exclude_none=True)}
            if self.body.text and self.body.text.format
            else {"format": {"type": "text"}},
            incomplete_details=ResponseIncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None,
        )

    def finished(self, text: str, last: GenerationOutput) -> ResponseObject:
        """The whole response: "incomplete" when it ran out of `max_output_tokens` (or of the context)."""
        status: MessageStatusOut = "incomplete" if finish_reason_of(last) == "length" else "completed"
        usage = ResponseUsage(
            input_tokens=last.prompt_tokens,
            output_tokens=last.completion_tokens,
            total_tokens=last.prompt_tokens + last.completion_tokens,
        )
        return self.render(status, [self.message(status, text)], usage)


async def response_events(service: ConversationService, turn: Turn, draft: ResponseDraft) -> AsyncGenerator[bytes, None]:
    """The Responses API's stream: the response created and in progress, its message and text
    part added, the text's deltas, then each of those done and the response completed (or
    incomplete: out of tokens). Every event names its type twice (the SSE `event:` field and
    `type`) and carries its `sequence_number`. A failure after the stream started ends it with
    `response.failed`. Unlike chat completions, no `data: [DONE]`. The opening events go out in
    one write, as do the closing ones (see `sse_events`)."""
    numbers = itertools.count()

    def event(kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": next(numbers), **fields}
        return format_sse_event(event=kind, data_str=json.dumps(data, ensure_ascii=False))

    where = {"item_id": draft.message_id, "output_index": 0, "content_index": 0}
    in_progress = draft.render("in_progress").model_dump(mode="json")
    yield b"".join(
        [
            event("response.created", response=in_progress),
            event("response.in_progress", response=in_progress),
            event("response.output_item.added", output_index=0, item=draft.message("in_progress").model_dump(mode="json")),
            event("response.content_part.added", **where, part=ResponseOutputText(text="").model_dump(mode="json")),
        ]
    )
    pieces: list[str] = []
    try:
        async with aclosing(service.outputs(turn)) as outputs:
            async for output in outputs:
                if output.text:
                    pieces.append(output.text)
                    yield event("response.output_text.delta", **where, delta=output.text, logprobs=[])
    except Exception as exc:  # noqa: BLE001 - logged and stored by `outputs`
        error = ResponseError(code="server_error", message=describe_failure(exc))
        yield event("response.failed", response=draft.render("failed", error=error).model_dump(mode="json"))
        return
    final = draft.finished("".join(pieces), output)
    item = final.output[0]
    yield b"".join(
        [
            event("response.output_text.done", **where, text=item.content[0].text, logprobs=[]),
            event("response.content_part.done", **where, part=item.content[0].model_dump(mode="json")),
            event("response.output_item.done", output_index=0, item=item.model_dump(mode="json")),
            event(f"response.{final.status}", response=final.model_dump(mode="json")),
        ]
    )


def create_openai_router(service: ConversationService, leases: Any) -> APIRouter:
    """The `/v1` routes; `leases`: the dependency that gives a generation its stream lease
    (`ingress._stream_leases`)."""
    router = APIRouter(
        prefix="/v1", tags=["openai"], responses={code: {"model": OpenAIErrorResponse} for code in OPENAI_ERROR_CODES}
    )

    @router.get("/models")
    async def list_models() -> ModelList:
        """Every served model with its state (loading / ready / failed)."""
        states = await service.model_states()
        return ModelList(
            data=[
                ModelObject(id=m.name, created=STARTED_AT, state=states[m.name], aliases=list(m.aliases))
                for m in service.registry.models
            ]
        )

    @router.post("/chat/completions", response_model=ChatCompletion, responses=SSE_RESPONSE)
    async def chat_completions(
        body: ChatCompletionRequest,
        x_conversation_id: Annotated[
            int | None, Header(ge=1, le=MAX_CONVERSATION_ID, description="Same as the body's `conversation_id`.")
        ] = None,
        caller: Caller = CALLER,
        lease: StreamLease | None = leases,
    ):
        model = service.resolve_model(body.model)
        conversation_id = body.conversation_id if body.conversation_id is not None else x_conversation_id
        if conversation_id is not None and body.messages[-1].role != "user":
            raise InvalidRequestError("with a conversation_id, the last message must be the user's new prompt")
        stored = body.model_dump(
            include={
                "max_tokens",
                "max_completion_tokens",
                "temperature",
                "top_p",
                "top_k",
                "seed",
                "stop",
                "repetition_penalty",
            },
            exclude_none=True,
        ) | {"model": model.name}
        tools = body.tool_definitions
        has_tool_turns = any(m.role == "tool" or m.tool_calls for m in body.messages)
        if conversation_id is not None and (tools or has_tool_turns):
            raise InvalidRequestError(
                "conversation_id: a conversation stores text turns only; send a tool-using chat's history in messages"
            )
        if tools and body.n > 1:
            raise InvalidRequestError("n: a request with tools has one choice")
        if conversation_id is None:
            turns = await start_choices(
                service, model, body.choices_params(), messages=body.chat_messages(), tools=tools, lease=lease
            )
        elif body.n > 1:
            raise InvalidRequestError("n: a conversation stores one answer a turn; ask for one choice with a conversation_id")
        else:
            turns = [
                await service.conversation_turn(
                    conversation_id, caller.owner, body.chat_messages(), model, body.to_sampling_params(), stored, lease
                )
            ]
        request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        names = {tool["function"]["name"] for tool in tools or []}
        if tools and not body.stream:
            [(text, last)] = await collect(service, turns)
            message, finish = tool_answer(text, last, body.calls_forced, names)
            choice = ChatCompletionChoice(message=message, finish_reason=finish)
            return ChatCompletion(id=request_id, created=created, model=model.name, usage=usage_of(last), choices=[choice])
        if not body.stream:
            answers = await collect(service, turns)
            return ChatCompletion(
                id=request_id,
                created=created,
                model=model.name,
                usage=usage_of(*(last for _, last in answers)),
                choices=[
                    ChatCompletionChoice(
                        index=index,
                        message=ChatCompletionMessage(content=text),
                        finish_reason=finish_reason_of(last),
                        logprobs=None if last.logprobs is None else ChoiceLogprobs.of(last.logprobs),
                    )
                    for index, (text, last) in enumerate(answers)
                ],
            )

        def delta_chunk(
            delta: ChatDelta, finish_reason: FinishReasonOut | None = None, index: int = 0, logprobs: list | None = None
        ) -> ChatCompletionChunk:
            scored = None if logprobs is None else ChoiceLogprobs.of(logprobs)
            choice = ChatCompletionChunkChoice(index=index, delta=delta, finish_reason=finish_reason, logprobs=scored)
            return ChatCompletionChunk(id=request_id, created=created, model=model.name, choices=[choice])

        def chunk(
            index: int, text: str | None, finish_reason: FinishReasonOut | None, logprobs: list | None
        ) -> ChatCompletionChunk:
            return delta_chunk(ChatDelta(content=text) if text is not None else ChatDelta(), finish_reason, index, logprobs)

        def usage_chunk(usage: Usage) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=request_id, created=created, model=model.name, choices=[], usage=usage)

        if tools:
            usage = usage_chunk if body.include_usage else None
            return ServerSentEventsResponse(tool_answer_events(service, turns[0], delta_chunk, usage, body.calls_forced, names))

        # OpenAI's first chunk of each choice carries the role only.
        roles = [delta_chunk(ChatDelta(role="assistant", content=""), index=index) for index in range(len(turns))]
        opening = b"".join(format_sse_event(data_str=role.model_dump_json()) for role in roles)
        usage = usage_chunk if body.include_usage else None
        return ServerSentEventsResponse(sse_events(service, turns, chunk, usage, opening))

    @router.post("/completions", response_model=Completion, responses=SSE_RESPONSE)
    async def completions(body: CompletionRequest, lease: StreamLease | None = leases):
        model = service.resolve_model(body.model)
        turns = await start_choices(service, model, body.choices_params(), prompt=body.prompt_text, lease=lease)
        request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        offsets = [0] * body.n  # of the next streamed token's text, per choice

        def choice(
            index: int, text: str | None, finish_reason: FinishReasonOut | None, logprobs: list | None
        ) -> CompletionChoice:
            scored = None
            if logprobs is not None:
                scored = CompletionLogprobs.of(logprobs, offsets[index])
                offsets[index] += sum(len(piece) for piece, _, _ in logprobs)
            return CompletionChoice(index=index, text=text or "", finish_reason=finish_reason, logprobs=scored)

        def completion(choices: list[CompletionChoice], usage: Usage | None = None) -> Completion:
            return Completion(id=request_id, created=created, model=model.name, choices=choices, usage=usage)

        if not body.stream:
            answers = await collect(service, turns)
            choices = [choice(index, text, finish_reason_of(last), last.logprobs) for index, (text, last) in enumerate(answers)]
            return completion(choices, usage_of(*(last for _, last in answers)))

        def usage_chunk(usage: Usage) -> Completion:
            return completion([], usage)

        def chunk(index: int, text: str | None, finish_reason: FinishReasonOut | None, logprobs: list | None) -> Completion:
            return completion([choice(index, text, finish_reason, logprobs)])

        return ServerSentEventsResponse(sse_events(service, turns, chunk, usage_chunk if body.include_usage else None))

    @router.post("/responses", response_model=ResponseObject, responses=SSE_RESPONSE)
    async def responses(body: ResponsesRequest, lease: StreamLease | None = leases):
        """The Responses API for text: `input` and `instructions` in, one message of text out."""
        model = service.resolve_model(body.model)
        params = body.to_sampling_params()
        turn = await service.start_turn(model, params, messages=body.chat_messages(), lease=lease)
        draft = ResponseDraft(body, model.name, params)
        if not body.stream:
            [(text, last)] = await collect(service, [turn])
            return draft.finished(text, last)
        return ServerSentEventsResponse(response_events(service, turn, draft))

    return router


def create_tokenizer_router(service: ConversationService) -> APIRouter:
    """vLLM's `/tokenize` and `/detokenize`, at the root as vLLM serves them: a client counts a
    prompt's tokens, chat template and tools included, before it sends it."""
    router = APIRouter(tags=["openai"])

    @router.post("/tokenize")
    async def tokenize(body: TokenizeBody) -> Tokenized:
        tokens, context = await service.tokenize(service.resolve_model(body.model), body.request())
        return Tokenized(count=len(tokens), max_model_len=context, tokens=tokens)

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeBody) -> Detokenized:
        return Detokenized(prompt=await service.detokenize(service.resolve_model(body.model), body.tokens))

    return router
