"""`POST /v1/chat/completions`: a chat request becomes its turns (one per choice, or the next
turn of a stored conversation with `conversation_id`), and their outputs OpenAI's chat
completion, whole or streamed; with tools, the answer's calls are split from its text."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any

from fastapi.sse import format_sse_event

from deployments.engine.protocol import GenerationOutput, InvalidRequestError
from deployments.model_registry import ModelConfig
from serve_app.auth import Caller
from serve_app.protocol import (
    ChatCompletion,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatDelta,
    ChoiceLogprobs,
    FinishReasonOut,
    ToolCall,
    ToolCallDelta,
    ToolCallFunction,
    Usage,
)
from serve_app.serving import (
    DONE_EVENT,
    OpenAIServing,
    choice_outputs,
    collect,
    finish_reason_of,
    sse_events,
    start_choices,
    stream_error,
    usage_of,
)
from serve_app.streaming import LastChunk, ServerSentEventsResponse
from serve_app.tool_calls import CallReader, CallSplitter
from serve_app.turns import StreamLease, Turn


class ChatChunks:
    """The bodies of one chat completion, whole or streamed, each with the request's id,
    creation time and model."""

    def __init__(self, model: str):
        self.id, self.created, self.model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model

    def whole(self, choices: list[ChatCompletionChoice], usage: Usage) -> ChatCompletion:
        return ChatCompletion(id=self.id, created=self.created, model=self.model, usage=usage, choices=choices)

    def chunk(self, choices: list[ChatCompletionChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def delta(
        self, delta: ChatDelta, finish_reason: FinishReasonOut | None = None, index: int = 0, logprobs: list | None = None
    ) -> ChatCompletionChunk:
        scored = None if logprobs is None else ChoiceLogprobs.of(logprobs)
        return self.chunk([ChatCompletionChunkChoice(index=index, delta=delta, finish_reason=finish_reason, logprobs=scored)])

    def text(
        self, index: int, text: str | None, finish_reason: FinishReasonOut | None, logprobs: list | None
    ) -> ChatCompletionChunk:
        """A chunk of choice `index`'s text (`sse_events`' `chunk`)."""
        return self.delta(ChatDelta(content=text) if text is not None else ChatDelta(), finish_reason, index, logprobs)

    def usage(self, usage: Usage) -> ChatCompletionChunk:
        return self.chunk([], usage)


def tool_answer(turn: Turn, text: str, last: GenerationOutput) -> tuple[ChatCompletionMessage, FinishReasonOut | None]:
    """An answer of a request with tools as a chat message (`Turn.answer_calls`): its calls in
    `tool_calls`, with finish reason "tool_calls"."""
    content, calls = turn.answer_calls(text, last)
    tool_calls = [ToolCall(id=c.id, function=ToolCallFunction(name=c.name, arguments=c.arguments)) for c in calls]
    finish = "tool_calls" if calls else finish_reason_of(last)
    return ChatCompletionMessage(content=content, tool_calls=tool_calls or None), finish


class ServingChat(OpenAIServing):
    """Chat completions: `create` starts the request's turns, then answers whole or streamed,
    with or without tools."""

    async def create(
        self, body: ChatCompletionRequest, header_conversation_id: int | None, caller: Caller, lease: StreamLease | None
    ) -> ChatCompletion | ServerSentEventsResponse:
        """`header_conversation_id`: `X-Conversation-Id`, where the body has no `conversation_id`."""
        model = self.models.resolve(body.model)
        conversation_id = body.conversation_id if body.conversation_id is not None else header_conversation_id
        tools = body.tool_definitions
        calls = CallReader.of(tools, body.calls_forced)
        turns = await self._start(body, model, tools, calls, conversation_id, caller, lease)
        chunks = ChatChunks(model.name)
        if calls is not None:
            if body.stream:
                return self.stream_with_tools(body, turns, chunks)
            return await self.whole_with_tools(turns, chunks)
        return self.stream(body, turns, chunks) if body.stream else await self.whole(turns, chunks)

    async def _start(
        self,
        body: ChatCompletionRequest,
        model: ModelConfig,
        tools: list[dict[str, Any]] | None,
        calls: CallReader | None,
        conversation_id: int | None,
        caller: Caller,
        lease: StreamLease | None,
    ) -> list[Turn]:
        """A turn per choice; with a conversation: its next turn, stored (the user's prompt, or
        the tools' results, then the answer with its calls)."""
        if conversation_id is None:
            messages = body.chat_messages()
            return await start_choices(
                self.turns, model, body.choices_params(), messages=messages, tools=tools, calls=calls, lease=lease
            )
        if body.messages[-1].role not in ("user", "tool"):
            raise InvalidRequestError(
                "messages: with a conversation_id, the last message must be the user's new prompt or the tools' results"
            )
        if body.n > 1:
            raise InvalidRequestError("n: a conversation stores one answer a turn; ask for one choice with a conversation_id")
        turn = await self.turns.conversation_turn(
            conversation_id,
            caller.owner,
            body.chat_messages(),
            model,
            body.to_sampling_params(),
            body.stored_parameters(model.name),
            lease,
            tools=tools,
            calls=calls,
        )
        return [turn]

    async def whole(self, turns: list[Turn], chunks: ChatChunks) -> ChatCompletion:
        answers = await collect(self.turns, turns)
        choices = [
            ChatCompletionChoice(
                index=index,
                message=ChatCompletionMessage(content=text),
                finish_reason=finish_reason_of(last),
                logprobs=None if last.logprobs is None else ChoiceLogprobs.of(last.logprobs),
            )
            for index, (text, last) in enumerate(answers)
        ]
        return chunks.whole(choices, usage_of(*(last for _, last in answers)))

    def stream(self, body: ChatCompletionRequest, turns: list[Turn], chunks: ChatChunks) -> ServerSentEventsResponse:
        # OpenAI's first chunk of each choice carries the role only.
        roles = [chunks.delta(ChatDelta(role="assistant", content=""), index=index) for index in range(len(turns))]
        opening = b"".join(format_sse_event(data_str=role.model_dump_json()) for role in roles)
        usage = chunks.usage if body.include_usage else None
        return ServerSentEventsResponse(sse_events(self.turns, turns, chunks.text, usage, opening))

    async def whole_with_tools(self, turns: list[Turn], chunks: ChatChunks) -> ChatCompletion:
        answers = await collect(self.turns, turns)
        choices = []
        for index, (turn, (text, last)) in enumerate(zip(turns, answers, strict=True)):
            message, finish = tool_answer(turn, text, last)
            choices.append(ChatCompletionChoice(index=index, message=message, finish_reason=finish))
        return chunks.whole(choices, usage_of(*(last for _, last in answers)))

    def stream_with_tools(self, body: ChatCompletionRequest, turns: list[Turn], chunks: ChatChunks) -> ServerSentEventsResponse:
        return ServerSentEventsResponse(self._tool_events(turns, chunks, body.include_usage, body.calls_forced))

    async def _tool_events(
        self, turns: list[Turn], chunks: ChatChunks, include_usage: bool, forced: bool
    ) -> AsyncGenerator[bytes, None]:
        """The stream of a request with tools: each choice's text as it comes up to where a call
        may start (none of it when the call is forced), then at its end the rest of its text, its
        calls (one `delta.tool_calls` chunk each, whole) and its finish reason; then the usage,
        and `data: [DONE]`."""

        def event(delta: ChatDelta, index: int, finish: FinishReasonOut | None = None) -> bytes:
            return format_sse_event(data_str=chunks.delta(delta, finish, index).model_dump_json(exclude_none=True))

        splitters = [CallSplitter() for _ in turns]
        pieces: list[list[str]] = [[] for _ in turns]
        lasts: dict[int, GenerationOutput] = {}
        pending: list[bytes] = []  # the last choice's end, which goes out with the stream's
        yield b"".join(event(ChatDelta(role="assistant", content=""), index) for index in range(len(turns)))
        try:
            async with aclosing(choice_outputs(self.turns, turns)) as outputs:
                async for index, output in outputs:
                    pieces[index].append(output.text)
                    text = "" if forced else splitters[index].feed(output.text)
                    events = [event(ChatDelta(content=text), index)] if text else []
                    if output.finish_reason is not None:
                        lasts[index] = output
                        rest = "".join(pieces[index]) if forced else splitters[index].held
                        events += self._tool_closing(event, index, turns[index], rest, output)
                    if len(lasts) == len(turns):
                        pending = events
                    elif events:
                        yield b"".join(events)
        except Exception as exc:  # noqa: BLE001 - logged and stored by `outputs`
            yield LastChunk(stream_error(exc))
            return
        if include_usage:
            pending.append(format_sse_event(data_str=chunks.usage(usage_of(*lasts.values())).model_dump_json()))
        yield LastChunk(b"".join([*pending, DONE_EVENT]))

    @staticmethod
    def _tool_closing(event: Callable[..., bytes], index: int, turn: Turn, rest: str, last: GenerationOutput) -> list[bytes]:
        """The end of choice `index`'s stream: the text held back that is not a call, its calls,
        its finish reason."""
        message, finish = tool_answer(turn, rest, last)
        closing = [event(ChatDelta(content=message.content), index)] if message.content else []
        closing += [
            event(ChatDelta(tool_calls=[ToolCallDelta(index=number, **call.model_dump())]), index)
            for number, call in enumerate(message.tool_calls or [])
        ]
        closing.append(event(ChatDelta(), index, finish))
        return closing
