"""One answer at a time per conversation, however many ingress replicas serve it.

Two answers streaming into one conversation would interleave in its history, so a turn claims
its conversation before it starts and gives it back when its answer is stored. The claims live in
the history deployment, the one process that every ingress replica asks, so they hold with any
number of ingress replicas, and while `serve deploy` runs old and new ones side by side.

They are kept in memory: they only have to outlive a stream. Each one is a lease, because an
ingress replica that dies mid-answer never gives its claims back. A claim lapses unless renewed,
and a streaming turn renews its own every third of the lease. After a restart of the history
replica, which forgets them all, those renewals claim again.
"""

from __future__ import annotations

import time
from collections.abc import Callable

TURN_LEASE_S = 60.0


class ConversationBusyError(RuntimeError):
    """A new answer was asked for while the conversation's previous one is still streaming
    (409): two answers would race into one history."""

    def __init__(self, conversation_id: int):
        self.conversation_id = conversation_id
        super().__init__(
            f"conversation '{conversation_id}' is already answering; wait for the answer to finish or stop it "
            f"(POST /conversations/{conversation_id}/stop), then send again"
        )

    def __reduce__(self):
        # Raised in the history replica and pickled to the ingress: rebuilt from the id.
        return type(self), (self.conversation_id,)


class TurnClaims:
    def __init__(self, lease_s: float = TURN_LEASE_S, clock: Callable[[], float] = time.monotonic):
        self.lease_s = lease_s
        self._clock = clock
        # conversation id -> (the turn holding it, when its lease ends)
        self._holders: dict[int, tuple[str, float]] = {}

    def claim(self, conversation_id: int, turn_id: str) -> None:
        """Claims the conversation for `turn_id`, or renews that turn's claim; raises
        `ConversationBusyError` while another turn holds it."""
        now = self._clock()
        # Lapsed claims (their ingress replica died) are dropped here, so they never pile up.
        self._holders = {c: held for c, held in self._holders.items() if held[1] > now}
        holder = self._holders.get(conversation_id)
        if holder is not None and holder[0] != turn_id:
            raise ConversationBusyError(conversation_id)
        self._holders[conversation_id] = (turn_id, now + self.lease_s)

    def release(self, conversation_id: int, turn_id: str) -> None:
        """Gives the conversation back, if `turn_id` still holds it."""
        holder = self._holders.get(conversation_id)
        if holder is not None and holder[0] == turn_id:
            del self._holders[conversation_id]

    def holder(self, conversation_id: int) -> str | None:
        held = self._holders.get(conversation_id)
        return held[0] if held is not None and held[1] > self._clock() else None
