"""What the history's records say of themselves."""

from __future__ import annotations

from datetime import UTC, datetime

from deployments.history_records import Conversation, Message

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def conversation(*messages: tuple[str, str, dict]) -> Conversation:
    return Conversation(
        id=1,
        created_at=NOW,
        updated_at=NOW,
        messages=[
            Message(id=i, role=role, content=content, created_at=NOW, **fields)
            for i, (role, content, fields) in enumerate(messages)
        ],
    )


def test_a_conversation_waits_for_the_results_of_its_last_answers_calls_until_words_or_a_prompt_follow():
    call = {"id": "call_a_0", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
    asked = [("user", "Weather in Oslo?", {}), ("assistant", "", {"tool_calls": [call]})]
    answered = [("tool", "-3 C", {"tool_call_id": "call_a_0"}), ("assistant", "", {"status": "failed", "error": "boom"})]
    assert conversation(*asked).waiting_calls() == {"call_a_0"}
    assert conversation(*asked, *answered).waiting_calls() == {"call_a_0"}  # a failed answer: send them again
    assert conversation(*asked, *answered[:1], ("assistant", "Cold.", {})).waiting_calls() == set()
    assert conversation(*asked, ("user", "new topic", {})).waiting_calls() == set()
    assert conversation(asked[0]).waiting_calls() == set()
