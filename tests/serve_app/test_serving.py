"""The OpenAI streams' encoding (`serve_app.serving`), without Ray."""

from __future__ import annotations

import pytest
from fastapi.sse import format_sse_event

from serve_app.protocol import (
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatDelta,
    Completion,
    CompletionChoice,
)
from serve_app.serving import TEXT, TextEvents


def completion_chunk(text: str) -> Completion:
    return Completion(id="cmpl-1", created=5, model="m", choices=[CompletionChoice(index=2, text=text)])


def chat_chunk(text: str) -> ChatCompletionChunk:
    return ChatCompletionChunk(
        id="chatcmpl-1", created=5, model="m", choices=[ChatCompletionChunkChoice(index=0, delta=ChatDelta(content=text))]
    )


@pytest.mark.parametrize("chunk", [completion_chunk, chat_chunk])
@pytest.mark.parametrize("text", ["Hello", 'é "quoted" \\ \n\t \u2028 \x01 \x00 😀', "</script>", "data: [DONE]\n\n"])
def test_text_events_are_the_bytes_pydantic_renders(chunk, text):
    assert TextEvents(chunk(TEXT)).of(text) == format_sse_event(data_str=chunk(text).model_dump_json())
