"""The OpenAI-compatible routes (`/v1`: models, chat completions, text completions, responses)
and vLLM's `/tokenize` and `/detokenize`. Each route only takes its request and hands it to its
endpoint's serving class (`serving_chat`, `serving_completions`, `serving_responses`), which
turns it into turns and their outputs into OpenAI's bodies and streams; errors become HTTP
responses in `serve_app.errors`."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Header

from serve_app.auth import CALLER, Caller
from serve_app.errors import OPENAI_ERROR_RESPONSES
from serve_app.protocol import (
    MAX_CONVERSATION_ID,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    DetokenizeBody,
    Detokenized,
    ModelList,
    ModelObject,
    ResponseObject,
    ResponsesRequest,
    TokenizeBody,
    Tokenized,
)
from serve_app.served_models import ServedModels
from serve_app.serving_chat import ServingChat
from serve_app.serving_completions import ServingCompletions
from serve_app.serving_responses import ServingResponses
from serve_app.turns import StreamLease, TurnService

STARTED_AT = int(time.time())
SSE_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "With `stream: true`: chunks as server-sent events."}
}


def create_openai_router(models: ServedModels, turns: TurnService, leases: Any) -> APIRouter:
    """The `/v1` routes; `leases`: the dependency that gives a generation its stream lease
    (`ingress.create_app`)."""
    router = APIRouter(prefix="/v1", tags=["openai"], responses=OPENAI_ERROR_RESPONSES)
    chat, completion, response = ServingChat(models, turns), ServingCompletions(models, turns), ServingResponses(models, turns)

    @router.get("/models")
    async def list_models() -> ModelList:
        """Every served model with its state (loading / ready / failed)."""
        states = await models.states()
        return ModelList(
            data=[
                ModelObject(id=m.name, created=STARTED_AT, state=states[m.name], aliases=list(m.aliases))
                for m in models.registry.models
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
        return await chat.create(body, x_conversation_id, caller, lease)

    @router.post("/completions", response_model=Completion, responses=SSE_RESPONSE)
    async def completions(body: CompletionRequest, lease: StreamLease | None = leases):
        return await completion.create(body, lease)

    @router.post("/responses", response_model=ResponseObject, responses=SSE_RESPONSE)
    async def responses(body: ResponsesRequest, lease: StreamLease | None = leases):
        """The Responses API for text: `input` and `instructions` in, one message of text out."""
        return await response.create(body, lease)

    return router


def create_tokenizer_router(models: ServedModels) -> APIRouter:
    """vLLM's `/tokenize` and `/detokenize`, at the root as vLLM serves them: a client counts a
    prompt's tokens, chat template and tools included, before it sends it."""
    router = APIRouter(tags=["openai"])

    @router.post("/tokenize")
    async def tokenize(body: TokenizeBody) -> Tokenized:
        tokens, context = await models.tokenize(models.resolve(body.model), body.request())
        return Tokenized(count=len(tokens), max_model_len=context, tokens=tokens)

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeBody) -> Detokenized:
        return Detokenized(prompt=await models.detokenize(models.resolve(body.model), body.tokens))

    return router
