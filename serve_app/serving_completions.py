"""`POST /v1/completions`: a text prompt becomes a turn per choice, and their outputs OpenAI's
text completion, whole or streamed."""

from __future__ import annotations

import time
import uuid

from serve_app.protocol import Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, FinishReasonOut, Usage
from serve_app.serving import OpenAIServing, collect, finish_reason_of, sse_events, start_choices, usage_of
from serve_app.streaming import ServerSentEventsResponse
from serve_app.turns import StreamLease, Turn


class CompletionChunks:
    """The bodies of one text completion, whole or streamed, each with the request's id,
    creation time and model; a choice's logprobs count their text's offsets from its start."""

    def __init__(self, model: str, choices: int):
        self.id, self.created, self.model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), model
        self.offsets = [0] * choices  # of the next streamed token's text, per choice

    def choice(
        self, index: int, text: str | None, finish_reason: FinishReasonOut | None, logprobs: list | None
    ) -> CompletionChoice:
        scored = None
        if logprobs is not None:
            scored = CompletionLogprobs.of(logprobs, self.offsets[index])
            self.offsets[index] += sum(len(piece) for piece, _, _ in logprobs)
        return CompletionChoice(index=index, text=text or "", finish_reason=finish_reason, logprobs=scored)

    def completion(self, choices: list[CompletionChoice], usage: Usage | None = None) -> Completion:
        return Completion(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def text(self, index: int, text: str | None, finish_reason: FinishReasonOut | None, logprobs: list | None) -> Completion:
        """A chunk of choice `index`'s text (`sse_events`' `chunk`)."""
        return self.completion([self.choice(index, text, finish_reason, logprobs)])

    def usage(self, usage: Usage) -> Completion:
        return self.completion([], usage)


class ServingCompletions(OpenAIServing):
    """Text completions: `create` starts a turn per choice, then answers whole or streamed."""

    async def create(self, body: CompletionRequest, lease: StreamLease | None) -> Completion | ServerSentEventsResponse:
        model = self.models.resolve(body.model)
        turns = await start_choices(self.turns, model, body.choices_params(), prompt=body.prompt_text, lease=lease)
        chunks = CompletionChunks(model.name, body.n)
        echo = body.prompt_text if body.echo else ""
        return self.stream(body, turns, chunks, echo) if body.stream else await self.whole(turns, chunks, echo)

    async def whole(self, turns: list[Turn], chunks: CompletionChunks, echo: str) -> Completion:
        answers = await collect(self.turns, turns, echo)
        choices = [
            chunks.choice(index, text, finish_reason_of(last), last.logprobs) for index, (text, last) in enumerate(answers)
        ]
        return chunks.completion(choices, usage_of(*(last for _, last in answers)))

    def stream(self, body: CompletionRequest, turns: list[Turn], chunks: CompletionChunks, echo: str) -> ServerSentEventsResponse:
        usage = chunks.usage if body.include_usage else None
        return ServerSentEventsResponse(sse_events(self.turns, turns, chunks.text, usage, echo=echo))
