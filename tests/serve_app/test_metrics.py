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


def test_a_scrape_gives_every_ingress_replicas_turns_by_replica_and_the_model_replicas_streams_summed():
    first, second = ServiceMetrics(), ServiceMetrics()
    first.turn_started("m", 0.07)
    first.turn_finished("m", "complete", prompt_tokens=10, completion_tokens=5)
    second.turn_started("m", 0.3)
    second.turn_finished("m", "complete", prompt_tokens=20, completion_tokens=7)
    second.turn_finished("other", "failed", prompt_tokens=0, completion_tokens=0)

    samples = scraped(
        render(
            {"a": first.families(), "b": second.families()},
            {"m": [stats(2, 1, 30, 100), stats(1, 0, 12, 50)], "idle": []},
        )
    )
    assert samples[("chat_turns_total", (("model", "m"), ("replica", "a"), ("status", "complete")))] == 1
    assert samples[("chat_turns_total", (("model", "m"), ("replica", "b"), ("status", "complete")))] == 1
    assert samples[("chat_turns_total", (("model", "other"), ("replica", "b"), ("status", "failed")))] == 1
    assert ("chat_turns_total", (("model", "other"), ("replica", "a"), ("status", "failed"))) not in samples
    assert samples[("chat_generated_tokens_total", (("model", "m"), ("replica", "b")))] == 7
    assert samples[("chat_prompt_tokens_total", (("model", "m"), ("replica", "a")))] == 10
    bucket = "chat_time_to_first_token_seconds_bucket"
    assert samples[(bucket, (("le", "0.1"), ("model", "m"), ("replica", "a")))] == 1
    assert samples[(bucket, (("le", "0.1"), ("model", "m"), ("replica", "b")))] == 0
    assert samples[(bucket, (("le", "0.5"), ("model", "m"), ("replica", "b")))] == 1
    assert samples[("chat_active_streams", (("model", "m"),))] == 3
    assert samples[("chat_queued_streams", (("model", "m"),))] == 1
    assert samples[("chat_replica_requests", (("model", "m"),))] == 42
    assert samples[("chat_prompt_tokens_reused", (("model", "m"),))] == 150
    assert samples[("chat_active_streams", (("model", "idle"),))] == 0


def test_what_could_not_be_read_is_left_out_not_reported_as_zero():
    """A model whose replicas could not be asked (mid-upgrade) has no gauge in that scrape,
    and an ingress replica that did not answer has no series: gaps, never false zeros or a
    counter that seems to reset."""
    only = ServiceMetrics()
    only.turn_finished("m", "complete", prompt_tokens=3, completion_tokens=4)
    samples = scraped(render({"a": only.families()}, {}))
    assert samples[("chat_generated_tokens_total", (("model", "m"), ("replica", "a")))] == 4
    assert not [key for key in samples if key[0] == "chat_active_streams"]
