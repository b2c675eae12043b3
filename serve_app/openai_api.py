"""The OpenAI-compatible endpoint family (`/v1`): models, chat completions, text completions
and responses (the Responses API), streamed as server-sent events or returned whole. Converts
protocol requests into turns of the shared `ConversationService` and engine outputs back into
OpenAI's chunk and event shapes."""

from __future__ import annotations

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
from serve_app.conversations import ConversationService, Turn, describe_failure
from serve_app.protocol import (
    MAX_CONVERSATION_ID,
    ChatCompletion,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatDelta,
    Completion,
    CompletionChoice,
    CompletionRequest,
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
    Usage,
)
from serve_app.streaming import ServerSentEventsResponse

STARTED_AT = int(time.time())
SSE_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "With `stream: true`: chunks as server-sent events."}
}


def finish_reason_of(output: GenerationOutput) -> FinishReasonOut | None:
    # A stop request ends the answer early, which OpenAI's clients know as "stop".
    return "stop" if output.finish_reason == "cancelled" else output.finish_reason


def usage_of(output: GenerationOutput) -> Usage:
    return Usage(
        prompt_tokens=output.prompt_tokens,
        completion_tokens=output.completion_tokens,
        total_tokens=output.prompt_tokens + output.completion_tokens,
    )


async def collect(service: ConversationService, turn: Turn) -> tuple[str, GenerationOutput]:
    """The whole answer and its last output (finish reason, exact token counts)."""
    pieces: list[str] = []
    async with aclosing(service.outputs(turn)) as outputs:
        async for output in outputs:
            pieces.append(output.text)
    return "".join(pieces), output


async def sse_events(
    service: ConversationService,
    turn: Turn,
    chunk: Callable[[str | None, FinishReasonOut | None], BaseModel],
    usage_chunk: Callable[[Usage], BaseModel] | None,
) -> AsyncGenerator[bytes, None]:
    """OpenAI's stream: `chunk(text, finish_reason)` per output, a closing chunk with the finish
    reason, an optional usage chunk, then `data: [DONE]`. A failure after the stream started
    ends it with an error event, then `data: [DONE]` (as vLLM does)."""
    try:
        async with aclosing(service.outputs(turn)) as outputs:
            async for output in outputs:
                if output.text:
                    yield format_sse_event(data_str=chunk(output.text, None).model_dump_json())
    except Exception as exc:  # noqa: BLE001 - logged and stored by `outputs`
        error = {"message": describe_failure(exc), "type": "server_error", "param": None, "code": 503}
        yield format_sse_event(data_str=json.dumps({"error": error}))
        yield format_sse_event(data_str="[DONE]")
        return
    yield format_sse_event(data_str=chunk(None, finish_reason_of(output)).model_dump_json())
    if usage_chunk is not None:
        yield format_sse_event(data_str=usage_chunk(usage_of(output)).model_dump_json())
    yield format_sse_event(data_str="[DONE]")


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
        self, status: ResponseStatus, output: list[ResponseOutputMessage] | None = None, usage: ResponseUsage | None = None,
        error: ResponseError | None = None,
    ) -> ResponseObject:
        return ResponseObject(
            id=self.id, created_at=self.created_at, status=status, model=self.model, output=output or [], usage=usage,
            error=error, instructions=self.body.instructions, max_output_tokens=self.body.max_output_tokens,
            temperature=self.params.temperature, top_p=self.params.top_p,
            incomplete_details=ResponseIncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None,
        )

    def finished(self, text: str, last: GenerationOutput) -> ResponseObject:
        """The whole response: "incomplete" when it ran out of `max_output_tokens` (or of the context)."""
        status: MessageStatusOut = "incomplete" if finish_reason_of(last) == "length" else "completed"
        usage = ResponseUsage(
            input_tokens=last.prompt_tokens, output_tokens=last.completion_tokens,
            total_tokens=last.prompt_tokens + last.completion_tokens,
        )
        return self.render(status, [self.message(status, text)], usage)


async def response_events(service: ConversationService, turn: Turn, draft: ResponseDraft) -> AsyncGenerator[bytes, None]:
    """The Responses API's stream: the response created and in progress, its message and text
    part added, the text's deltas, then each of those done and the response completed (or
    incomplete: out of tokens). Every event names its type twice (the SSE `event:` field and
    `type`) and carries its `sequence_number`. A failure after the stream started ends it with
    `response.failed`. Unlike chat completions, no `data: [DONE]`."""
    numbers = itertools.count()

    def event(kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": next(numbers), **fields}
        return format_sse_event(event=kind, data_str=json.dumps(data, ensure_ascii=False))

    where = {"item_id": draft.message_id, "output_index": 0, "content_index": 0}
    in_progress = draft.render("in_progress").model_dump(mode="json")
    yield event("response.created", response=in_progress)
    yield event("response.in_progress", response=in_progress)
    yield event("response.output_item.added", output_index=0, item=draft.message("in_progress").model_dump(mode="json"))
    yield event("response.content_part.added", **where, part=ResponseOutputText(text="").model_dump(mode="json"))
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
    yield event("response.output_text.done", **where, text=item.content[0].text, logprobs=[])
    yield event("response.content_part.done", **where, part=item.content[0].model_dump(mode="json"))
    yield event("response.output_item.done", output_index=0, item=item.model_dump(mode="json"))
    yield event(f"response.{final.status}", response=final.model_dump(mode="json"))


def create_openai_router(service: ConversationService) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["openai"], responses={code: {"model": OpenAIErrorResponse} for code in (400, 404, 503)})

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
    ):
        model = service.resolve_model(body.model)
        conversation_id = body.conversation_id if body.conversation_id is not None else x_conversation_id
        if conversation_id is not None and body.messages[-1].role != "user":
            raise InvalidRequestError("with a conversation_id, the last message must be the user's new prompt")
        stored = body.model_dump(
            include={"max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stop", "repetition_penalty"},
            exclude_none=True,
        ) | {"model": model.name}
        if conversation_id is None:
            turn = await service.start_turn(model, body.to_sampling_params(), messages=body.chat_messages())
        else:
            turn = await service.conversation_turn(
                conversation_id, body.chat_messages(), model, body.to_sampling_params(), stored
            )
        request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not body.stream:
            text, last = await collect(service, turn)
            return ChatCompletion(
                id=request_id, created=created, model=model.name, usage=usage_of(last),
                choices=[ChatCompletionChoice(message=ChatCompletionMessage(content=text), finish_reason=finish_reason_of(last))],
            )

        def chunk(text: str | None, finish_reason: FinishReasonOut | None) -> ChatCompletionChunk:
            delta = ChatDelta(content=text) if text is not None else ChatDelta()
            return ChatCompletionChunk(
                id=request_id, created=created, model=model.name,
                choices=[ChatCompletionChunkChoice(delta=delta, finish_reason=finish_reason)],
            )

        def usage_chunk(usage: Usage) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=request_id, created=created, model=model.name, choices=[], usage=usage)

        async def events() -> AsyncGenerator[bytes, None]:
            # OpenAI's first chunk carries the role only.
            first = ChatCompletionChunk(
                id=request_id, created=created, model=model.name,
                choices=[ChatCompletionChunkChoice(delta=ChatDelta(role="assistant", content=""))],
            )
            yield format_sse_event(data_str=first.model_dump_json())
            async with aclosing(sse_events(service, turn, chunk, usage_chunk if body.include_usage else None)) as rest:
                async for event in rest:
                    yield event

        return ServerSentEventsResponse(events())

    @router.post("/completions", response_model=Completion, responses=SSE_RESPONSE)
    async def completions(body: CompletionRequest):
        model = service.resolve_model(body.model)
        turn = await service.start_turn(model, body.to_sampling_params(), prompt=body.prompt_text)
        request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str | None, finish_reason: FinishReasonOut | None) -> Completion:
            choice = CompletionChoice(text=text or "", finish_reason=finish_reason)
            return Completion(id=request_id, created=created, model=model.name, choices=[choice])

        if not body.stream:
            text, last = await collect(service, turn)
            return chunk(text, finish_reason_of(last)).model_copy(update={"usage": usage_of(last)})

        def usage_chunk(usage: Usage) -> Completion:
            return Completion(id=request_id, created=created, model=model.name, choices=[], usage=usage)

        return ServerSentEventsResponse(sse_events(service, turn, chunk, usage_chunk if body.include_usage else None))

    @router.post("/responses", response_model=ResponseObject, responses=SSE_RESPONSE)
    async def responses(body: ResponsesRequest):
        """The Responses API for text: `input` and `instructions` in, one message of text out."""
        model = service.resolve_model(body.model)
        params = body.to_sampling_params()
        turn = await service.start_turn(model, params, messages=body.chat_messages())
        draft = ResponseDraft(body, model.name, params)
        if not body.stream:
            return draft.finished(*await collect(service, turn))
        return ServerSentEventsResponse(response_events(service, turn, draft))

    return router
