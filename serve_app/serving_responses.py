"""`POST /v1/responses`: the Responses API. `input` and `instructions` become one turn, and its
outputs a response object, whole or as the API's typed stream of events: a message of text and,
with `tools`, the function calls the answer makes (`serve_app.tool_calls`)."""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from fastapi.sse import format_sse_event

from deployments.engine.protocol import GenerationOutput
from deployments.engine.sampling_params import SamplingParams
from serve_app.protocol import (
    ChoiceLogprobs,
    MessageStatusOut,
    ResponseError,
    ResponseIncompleteDetails,
    ResponseObject,
    ResponseOutputFunctionCall,
    ResponseOutputItem,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponsesRequest,
    ResponseStatus,
    ResponseUsage,
)
from serve_app.serving import OpenAIServing, collect, finish_reason_of
from serve_app.streaming import LastChunk, ServerSentEventsResponse
from serve_app.tool_calls import Call, CallReader, CallSplitter
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

    @property
    def tool_names(self) -> set[str] | None:
        """The names of the tools the answer may call; None: no tools (or tool_choice "none")."""
        tools = self.body.tool_definitions
        return None if tools is None else {tool["function"]["name"] for tool in tools}

    def message(self, status: MessageStatusOut, text: str | None = None, logprobs: list | None = None) -> ResponseOutputMessage:
        """`logprobs`: the engine's entries of its tokens, if asked."""
        scored = ChoiceLogprobs.of(logprobs).content if logprobs else []
        content = [] if text is None else [ResponseOutputText(text=text, logprobs=scored)]
        return ResponseOutputMessage(id=self.message_id, status=status, content=content)

    def render(
        self,
        status: ResponseStatus,
        output: list[ResponseOutputItem] | None = None,
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
            tools=self.body.tools or [],
            tool_choice=self.body.tool_choice or "auto",
            parallel_tool_calls=self.body.parallel_tool_calls is not False,
        )

    def finished(
        self, text: str | None, last: GenerationOutput, calls: Sequence[Call] = (), logprobs: list | None = None
    ) -> ResponseObject:
        """The whole response: its message (if it has text; `logprobs`: its tokens' entries, if
        asked), then its calls; "incomplete" when it ran out of `max_output_tokens` (or of the
        context)."""
        status: MessageStatusOut = "incomplete" if finish_reason_of(last) == "length" and not calls else "completed"
        usage = ResponseUsage(
            input_tokens=last.prompt_tokens,
            output_tokens=last.completion_tokens,
            total_tokens=last.prompt_tokens + last.completion_tokens,
        )
        output: list[ResponseOutputItem] = [] if text is None else [self.message(status, text, logprobs)]
        output += [
            ResponseOutputFunctionCall(
                id=f"fc_{call.id.removeprefix('call_')}", call_id=call.id, name=call.name, arguments=call.arguments
            )
            for call in calls
        ]
        return self.render(status, output, usage)


class ServingResponses(OpenAIServing):
    """Responses: `create` starts the request's one turn, then answers whole or streamed."""

    async def create(self, body: ResponsesRequest, lease: StreamLease | None) -> ResponseObject | ServerSentEventsResponse:
        model = self.models.resolve(body.model)
        params = body.to_sampling_params()
        tools = body.tool_definitions
        calls = CallReader.of(tools, body.calls_forced)
        turn = await self.turns.start_turn(model, params, messages=body.chat_messages(), tools=tools, calls=calls, lease=lease)
        draft = ResponseDraft(body, model.name, params)
        return self.stream(turn, draft) if body.stream else await self.whole(turn, draft)

    async def whole(self, turn: Turn, draft: ResponseDraft) -> ResponseObject:
        [(text, last)] = await collect(self.turns, [turn])
        content, calls = turn.answer_calls(text, last)
        return draft.finished(content, last, calls, last.logprobs)

    def stream(self, turn: Turn, draft: ResponseDraft) -> ServerSentEventsResponse:
        return ServerSentEventsResponse(self._events(turn, draft))

    async def _events(self, turn: Turn, draft: ResponseDraft) -> AsyncGenerator[bytes, None]:
        """The Responses API's stream: the response created and in progress, its message and text
        part added, the text's deltas, then each of those done, each call's item (added, its
        arguments, done), and the response completed (or incomplete: out of tokens). With tools
        the message opens with its first text, and text from where a call may start is held to
        the end (none of it when the call is forced). Every event names its type twice (the SSE
        `event:` field and `type`) and carries its `sequence_number`. A failure after the stream
        started ends it with `response.failed`. Unlike chat completions, no `data: [DONE]`. The
        opening events go out in one write, as do the closing ones (see `serving.sse_events`)."""
        numbers = itertools.count()

        def event(kind: str, **fields: Any) -> bytes:
            data = {"type": kind, "sequence_number": next(numbers), **fields}
            return format_sse_event(event=kind, data_str=json.dumps(data, ensure_ascii=False))

        where = {"item_id": draft.message_id, "output_index": 0, "content_index": 0}

        def message_added() -> list[bytes]:
            return [
                event("response.output_item.added", output_index=0, item=draft.message("in_progress").model_dump(mode="json")),
                event("response.content_part.added", **where, part=ResponseOutputText(text="").model_dump(mode="json")),
            ]

        in_progress = draft.render("in_progress").model_dump(mode="json")
        opening = [event("response.created", response=in_progress), event("response.in_progress", response=in_progress)]
        names, forced = draft.tool_names, draft.body.calls_forced
        splitter = CallSplitter() if names is not None and not forced else None
        has_message = names is None  # with tools, once it has text
        yield b"".join(opening + (message_added() if has_message else []))
        pieces: list[str] = []  # the answer's text
        shown: list[str] = []  # the message's, as streamed
        scored: list = []  # its tokens' logprobs, if asked (no tools then)
        try:
            async with aclosing(self.turns.outputs(turn)) as outputs:
                async for output in outputs:
                    pieces.append(output.text)
                    text = output.text if names is None else splitter.feed(output.text) if splitter else ""
                    if text or output.logprobs:
                        added = [] if has_message else message_added()
                        has_message = True
                        shown.append(text)
                        scored += output.logprobs or []
                        entries = ChoiceLogprobs.of(output.logprobs).content if output.logprobs else []
                        logprobs = [entry.model_dump(mode="json") for entry in entries]
                        yield b"".join([*added, event("response.output_text.delta", **where, delta=text, logprobs=logprobs)])
        except Exception as exc:  # noqa: BLE001 - logged and stored by `outputs`
            error = ResponseError(code="server_error", message=describe_failure(exc))
            yield LastChunk(event("response.failed", response=draft.render("failed", error=error).model_dump(mode="json")))
            return
        closing: list[bytes] = []
        calls: list[Call] = []
        if names is not None:
            rest, calls = turn.answer_calls("".join(pieces) if splitter is None else splitter.held, output)
            if rest:  # text held back as a possible call, or after the calls
                closing += [] if has_message else message_added()
                has_message = True
                shown.append(rest)
                closing.append(event("response.output_text.delta", **where, delta=rest, logprobs=[]))
        final = draft.finished("".join(shown) if has_message else None, output, calls, scored)
        for index, item in enumerate(final.output):
            if isinstance(item, ResponseOutputMessage):
                text_done = item.content[0]
                closing += [
                    event(
                        "response.output_text.done",
                        **where,
                        text=text_done.text,
                        logprobs=text_done.model_dump(mode="json")["logprobs"],
                    ),
                    event("response.content_part.done", **where, part=text_done.model_dump(mode="json")),
                ]
            else:
                at = {"item_id": item.id, "output_index": index}
                closing += [
                    event(
                        "response.output_item.added",
                        output_index=index,
                        item=item.model_copy(update={"arguments": "", "status": "in_progress"}).model_dump(mode="json"),
                    ),
                    event("response.function_call_arguments.delta", **at, delta=item.arguments),
                    event("response.function_call_arguments.done", **at, arguments=item.arguments),
                ]
            closing.append(event("response.output_item.done", output_index=index, item=item.model_dump(mode="json")))
        closing.append(event(f"response.{final.status}", response=final.model_dump(mode="json")))
        yield LastChunk(b"".join(closing))
