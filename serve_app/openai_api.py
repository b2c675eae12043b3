"""The OpenAI-compatible endpoint family (`/v1`): models, chat completions and text
completions, streamed as server-sent events or returned whole. Converts protocol requests into
turns of the shared `ConversationService` and engine outputs back into OpenAI's chunk shapes."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Annotated, Any

from fastapi import APIRouter, Header
from fastapi.sse import format_sse_event
from pydantic import BaseModel

from deployments.engine.protocol import GenerationOutput, InvalidRequestError
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
    ModelList,
    ModelObject,
    OpenAIErrorResponse,
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

    return router
