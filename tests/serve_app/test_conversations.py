"""Conversations as stored: ids as routes take them, the history a turn reads and the prompt it
stores, and the Markdown export."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from deployments.history_store import ConversationNotFoundError
from serve_app.conversations import context_messages, conversation_markdown, parse_conversation_id, stored_prompts
from serve_app.protocol import Conversation, Message

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def message(i: int, role: str, content: str, **fields) -> Message:
    return Message(id=i, role=role, content=content, created_at=NOW, **fields)


@pytest.mark.parametrize("raw", ["abc", "-1", "1.5", "", "١"])
def test_ids_that_are_not_plain_integers_name_no_conversation(raw):
    with pytest.raises(ConversationNotFoundError, match=f"conversation '{raw}' not found"):
        parse_conversation_id(raw)


def test_ids_parse():
    assert parse_conversation_id("42") == 42
    assert parse_conversation_id(str(2**63 - 1)) == 2**63 - 1


# Beyond SQLite's INTEGER the history store would raise OverflowError (a 503 once it crossed Ray);
# beyond 4,300 digits int() itself raises ValueError (a 500).
@pytest.mark.parametrize("raw", [str(2**63), "9" * 20, "9" * 5000, 2**63, -1])
def test_ids_beyond_what_sqlite_stores_name_no_conversation(raw):
    with pytest.raises(ConversationNotFoundError, match=f"conversation '{raw}' not found"):
        parse_conversation_id(raw)


def test_context_keeps_answered_turns_and_skips_unanswered_or_failed_ones():
    history = [
        message(1, "user", "q1"),
        message(2, "assistant", "a1"),
        message(3, "user", "lost"),  # no answer: e.g. the service died
        message(4, "user", "q2"),
        message(5, "assistant", "", status="failed", error="boom"),
        message(6, "user", "q3"),
        message(7, "assistant", "partial", status="stopped"),
    ]
    assert context_messages(history) == [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q3"},
        {"role": "assistant", "content": "partial"},
    ]


def test_context_replays_tool_turns_with_their_calls_and_leaves_out_a_failed_answer_to_results():
    call = {"id": "call_a_0", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
    history = [
        message(1, "user", "Weather in Oslo?"),
        message(2, "assistant", "", tool_calls=[call]),
        message(3, "tool", "-3 C", tool_call_id="call_a_0"),
        message(4, "assistant", "", status="failed", error="boom"),  # its results are left out with it
        message(5, "tool", "-3 C", tool_call_id="call_a_0"),  # sent again
        message(6, "tool", "snow", tool_call_id="call_a_0"),
        message(7, "assistant", "Cold and snowy."),
    ]
    results = [
        {"role": "tool", "content": "-3 C", "tool_call_id": "call_a_0"},
        {"role": "tool", "content": "snow", "tool_call_id": "call_a_0"},
    ]
    template_call = {"id": "call_a_0", "type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}
    assert context_messages(history) == [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [template_call]},
        *results,
        {"role": "assistant", "content": "Cold and snowy."},
    ]
    assert stored_prompts([{"role": "user", "content": "q"}, *results]) == results
    assert stored_prompts([*results, {"role": "system", "content": "s"}, {"role": "user", "content": "q"}]) == [
        {"role": "user", "content": "q"}
    ]


def test_markdown_export_names_speakers_and_marks_unfinished_answers():
    conversation = Conversation(
        id=3,
        title=None,
        created_at=NOW,
        updated_at=NOW,
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


def test_markdown_export_shows_an_answers_calls_and_the_tools_results():
    call = {"id": "call_x_0", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
    conversation = Conversation(
        id=4,
        title="Oslo",
        created_at=NOW,
        updated_at=NOW,
        messages=[
            message(1, "user", "Weather?"),
            message(2, "assistant", "Looking.", model="smol", tool_calls=[call]),
            message(3, "tool", "-3 C", tool_call_id="call_x_0"),
        ],
    )
    assert conversation_markdown(conversation) == (
        "# Oslo\n\n## User\n\nWeather?\n\n## Assistant (smol)\n\nLooking.\n\n"
        'Called `weather` (call_x_0):\n\n```json\n{"city": "Oslo"}\n```\n\n'
        "## Tool result (call_x_0)\n\n-3 C\n"
    )
