"""The soak's short form (`python -m bench.load_bench --soak` is the long one): 16 closed-loop
users, half storing their turns through the original API and half through OpenAI's completions,
for three minutes against the service as `make serve` starts it. No request may fail, no process of the
service may grow by more than 10% after the first minute (a leak under a steady load; a few pages
more of a small process such as HAProxy's 13 MiB do not count), and the history database may grow
only with the turns it stores."""

from __future__ import annotations

import asyncio

import pytest

from loadtests.service import running_service
from loadtests.soak import soak
from tests.support import free_port

pytestmark = pytest.mark.slow

MODEL = {
    "name": "tiny-random",
    "source": {"kind": "tiny_random"},
    "max_batch_size": 64,
    "torch_threads": 1,
    "num_cpus": 1,
    "max_ongoing_requests": 256,
}
MAX_GROWTH, SLACK_BYTES = 0.10, 2 << 20


def test_minutes_of_load_fail_no_request_and_grow_no_process(report):
    with running_service([MODEL], free_port()) as service:
        result = asyncio.run(
            soak(
                service.url,
                service.launcher.pid,
                service.database,
                MODEL["name"],
                users=16,
                duration_s=180,
                warmup_s=60,
                sample_every_s=15,
                max_tokens=64,
            )
        )
    report(result.render(window_s=60))
    assert result.errors == []
    assert len(result.answers) > 500
    grown = [
        (label, f"{growth:+.1%}")
        for label, start, end, growth in result.memory_growth()
        if growth > MAX_GROWTH and end - start > SLACK_BYTES
    ]
    assert grown == []
    first_half, second_half = result.database_bytes_per_turn()
    assert second_half < 2 * first_half + 1024
