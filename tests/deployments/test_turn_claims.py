from __future__ import annotations

import pickle

import pytest

from deployments.turn_claims import ConversationBusyError, TurnClaims


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_conversation_takes_one_turn_at_a_time_and_others_are_independent():
    claims = TurnClaims()
    claims.claim(1, "a")
    with pytest.raises(ConversationBusyError, match="conversation '1' is already answering"):
        claims.claim(1, "b")
    claims.claim(2, "b")  # another conversation
    claims.release(1, "b")  # not b's to give back
    with pytest.raises(ConversationBusyError):
        claims.claim(1, "c")
    claims.release(1, "a")
    claims.claim(1, "c")
    assert (claims.holder(1), claims.holder(2)) == ("c", "b")


def test_a_claim_lapses_after_its_lease_unless_its_turn_renews_it():
    clock = Clock()
    claims = TurnClaims(lease_s=60, clock=clock)
    claims.claim(1, "streaming")
    claims.claim(2, "gone")  # its ingress replica died: never renewed, never given back
    clock.now += 50
    claims.claim(1, "streaming")  # renewed: another 60 s from now
    clock.now += 50
    with pytest.raises(ConversationBusyError):
        claims.claim(1, "new")
    claims.claim(2, "new")
    assert (claims.holder(1), claims.holder(2)) == ("streaming", "new")
    clock.now += 61
    assert claims.holder(1) is None
    claims.claim(3, "x")
    assert claims._holders.keys() == {3}  # lapsed claims are dropped, not kept for ever


def test_busy_errors_cross_processes_intact():
    error = pickle.loads(pickle.dumps(ConversationBusyError(7)))
    assert isinstance(error, ConversationBusyError)
    assert str(error) == str(ConversationBusyError(7))
    assert error.conversation_id == 7
