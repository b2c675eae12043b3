"""`POST /v1/responses`: the Responses API for text. `input` and `instructions` become one
turn, and its outputs one message of text in a response object, whole or as the API's typed
stream of events."""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from fastapi.sse import format_sse_event

from deployments.engine.protocol import GenerationOutput
from deployments.engine.sampling_params import SamplingParams
from serve_app.protocol import (
    MessageStatusOut,
    ResponseError,
    ResponseIncompleteDetails,
    ResponseObject,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponsesRequest,
    ResponseStatus,
    ResponseUsage,
)
from serve_app.serving import OpenAIServing, collect, finish_reason_of
from serve_app.streaming import ServerSentEventsResponse
from serve_app.turns import StreamLease, Turn, describe_failure


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


class ServingResponses(OpenAIServing):
    """Responses: `create` starts the request's one turn, then answers whole or streamed."""

    async def create(self, body: ResponsesRequest, lease: StreamLease | None) -> ResponseObject | ServerSentEventsResponse:
        model = self.models.resolve(body.model)
        params = body.to_sampling_params()
        turn = await self.turns.start_turn(model, params, messages=body.chat_messages(), lease=lease)
        draft = ResponseDraft(body, model.name, params)
        return self.stream(turn, draft) if body.stream else await self.whole(turn, draft)

    async def whole(self, turn: Turn, draft: ResponseDraft) -> ResponseObject:
        [(text, last)] = await collect(self.turns, [turn])
        return draft.finished(text, last)

    def stream(self, turn: Turn, draft: ResponseDraft) -> ServerSentEventsResponse:
        return ServerSentEventsResponse(self._events(turn, draft))

    async def _events(self, turn: Turn, draft: ResponseDraft) -> AsyncGenerator[bytes, None]:
        """The Responses API's stream: the response created and in progress, its message and text
        part added, the text's deltas, then each of those done and the response completed (or
        incomplete: out of tokens). Every event names its type twice (the SSE `event:` field and
        `type`) and carries its `sequence_number`. A failure after the stream started ends it with
        `response.failed`. Unlike chat completions, no `data: [DONE]`. The opening events go out in
        one write, as do the closing ones (see `serving.sse_events`)."""
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
            async with aclosing(self.turns.outputs(turn)) as outputs:
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
