from __future__ import annotations

from datetime import datetime, timezone

import pytest

from deployments.history_store import ConversationNotFoundError
from serve_app.conversations import context_messages, conversation_markdown, parse_conversation_id
from serve_app.protocol import Conversation, Message

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def message(i: int, role: str, content: str, **fields) -> Message:
    return Message(id=i, role=role, content=content, created_at=NOW, **fields)


@pytest.mark.parametrize("raw", ["abc", "-1", "1.5", "", "١"])
def test_ids_that_are_not_plain_integers_name_no_conversation(raw):
    with pytest.raises(ConversationNotFoundError, match=f"conversation '{raw}' not found"):
        parse_conversation_id(raw)


def test_ids_parse():
    assert parse_conversation_id("42") == 42


def test_context_keeps_answered_turns_and_skips_unanswered_or_failed_ones():
    history = [
        message(1, "user", "q1"), message(2, "assistant", "a1"),
        message(3, "user", "lost"),  # no answer: e.g. the service died
        message(4, "user", "q2"), message(5, "assistant", "", status="failed", error="boom"),
        message(6, "user", "q3"), message(7, "assistant", "partial", status="stopped"),
    ]
    assert context_messages(history) == [
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q3"}, {"role": "assistant", "content": "partial"},
    ]


def test_markdown_export_names_speakers_and_marks_unfinished_answers():
    conversation = Conversation(
        id=3, title=None, created_at=NOW, updated_at=NOW,
        messages=[
            message(1, "user", "Hi"),
            message(2, "assistant", "Hel", model="smol", status="stopped"),
            message(3, "assistant", "", model="smol", status="failed", error="out of memory"),
        ],
    )
    assert conversation_markdown(conversation) == (
        "# Conversation 3\n\n## User\n\nHi\n\n## Assistant (smol) — stopped\n\nHel\n\n"
        "## Assistant (smol) — failed\n\n> error: out of memory\n"
    )
