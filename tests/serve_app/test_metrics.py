from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from deployments.engine.protocol import EngineStats
from serve_app.metrics import ServiceMetrics, render


def scraped(text: bytes) -> dict[tuple, float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
    }


def stats(active: int, queued: int, total: int, reused: int) -> EngineStats:
    return EngineStats(active_requests=active, queued_requests=queued, total_requests=total, reused_prompt_tokens=reused)


def test_a_scrape_adds_up_every_ingress_replicas_turns_and_every_model_replicas_streams():
    first, second = ServiceMetrics(), ServiceMetrics()
    first.turn_started("m", 0.07)
    first.turn_finished("m", "complete", prompt_tokens=10, completion_tokens=5)
    second.turn_started("m", 0.3)
    second.turn_finished("m", "complete", prompt_tokens=20, completion_tokens=7)
    second.turn_finished("m", "stopped", prompt_tokens=1, completion_tokens=1)
    second.turn_finished("other", "failed", prompt_tokens=0, completion_tokens=0)

    samples = scraped(render(
        [first.families(), second.families()],
        {"m": [stats(2, 1, 30, 100), stats(1, 0, 12, 50)], "other": []},
    ))
    assert samples[("chat_turns_total", (("model", "m"), ("status", "complete")))] == 2
    assert samples[("chat_turns_total", (("model", "m"), ("status", "stopped")))] == 1
    assert samples[("chat_turns_total", (("model", "other"), ("status", "failed")))] == 1
    assert samples[("chat_generated_tokens_total", (("model", "m"),))] == 13
    assert samples[("chat_prompt_tokens_total", (("model", "m"),))] == 31
    bucket = "chat_time_to_first_token_seconds_bucket"
    assert samples[(bucket, (("le", "0.1"), ("model", "m")))] == 1
    assert samples[(bucket, (("le", "0.5"), ("model", "m")))] == 2
    assert samples[("chat_time_to_first_token_seconds_count", (("model", "m"),))] == 2
    assert abs(samples[("chat_time_to_first_token_seconds_sum", (("model", "m"),))] - 0.37) < 1e-9
    created = ("chat_turns_created", (("model", "m"), ("status", "complete")))
    assert samples[created] == min(
        s.value for f in (first.families() + second.families()) for s in f.samples if (s.name, tuple(sorted(s.labels.items()))) == created
    )
    assert samples[("chat_active_streams", (("model", "m"),))] == 3
    assert samples[("chat_queued_streams", (("model", "m"),))] == 1
    assert samples[("chat_replica_requests", (("model", "m"),))] == 42
    assert samples[("chat_prompt_tokens_reused", (("model", "m"),))] == 150
    assert samples[("chat_active_streams", (("model", "other"),))] == 0


def test_one_replica_scrapes_as_itself():
    only = ServiceMetrics()
    only.turn_finished("m", "complete", prompt_tokens=3, completion_tokens=4)
    samples = scraped(render([only.families()], {}))
    assert samples[("chat_generated_tokens_total", (("model", "m"),))] == 4
