"""`Recent`, which lets every `/v1/models` and `/readyz` of the same second share one look at
Serve's status: one call for concurrent callers, its result kept for its time, a failure not kept,
and a caller that leaves not cancelling the call the others wait for."""

from __future__ import annotations

import asyncio

import pytest

from serve_app.served_models import Recent


class Counted:
    """A lookup that takes `delay_s`, answers how many times it was called, and fails on the calls
    listed in `failing`."""

    def __init__(self, delay_s: float = 0.05, failing: tuple[int, ...] = ()):
        self.calls, self.delay_s, self.failing = 0, delay_s, failing

    async def __call__(self) -> int:
        self.calls += 1
        call = self.calls
        await asyncio.sleep(self.delay_s)
        if call in self.failing:
            raise RuntimeError(f"call {call} failed")
        return call


async def test_concurrent_callers_share_one_call_and_its_result_answers_for_its_time():
    fetch = Counted()
    recent = Recent(fetch, ttl_s=0.3)
    assert await asyncio.gather(*(recent.get() for _ in range(20))) == [1] * 20
    assert await recent.get() == 1 and fetch.calls == 1  # done, still fresh
    await asyncio.sleep(0.35)
    assert await asyncio.gather(recent.get(), recent.get()) == [2, 2] and fetch.calls == 2


async def test_a_failed_call_fails_its_callers_and_the_next_caller_calls_again():
    fetch = Counted(failing=(1,))
    recent = Recent(fetch, ttl_s=60)
    outcomes = await asyncio.gather(recent.get(), recent.get(), return_exceptions=True)
    assert [str(outcome) for outcome in outcomes] == ["call 1 failed"] * 2 and fetch.calls == 1
    assert await recent.get() == 2 and await recent.get() == 2 and fetch.calls == 2


async def test_a_caller_that_leaves_does_not_cancel_the_call_the_others_wait_for():
    fetch = Counted(delay_s=0.1)
    recent = Recent(fetch, ttl_s=60)
    leaving, staying = asyncio.create_task(recent.get()), asyncio.create_task(recent.get())
    await asyncio.sleep(0.02)
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert await staying == 1 and await recent.get() == 1 and fetch.calls == 1
