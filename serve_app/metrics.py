"""Prometheus metrics of the chat service, served by the ingress at `/metrics`.

Counters and histograms are observed where turns start and end (in this ingress replica); the
per-model stream gauges are read from every model replica at scrape time, so they are exact
however many replicas run. Ray Serve's own metrics (per deployment request rates, latencies,
replica counts) are exported by Ray on each node's metrics port, as usual for Ray.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from deployments.engine.protocol import EngineStats

TTFT_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32)


class ServiceMetrics:
    def __init__(self) -> None:
        # A registry per app, not the process-global one, so two apps in one process (tests)
        # don't collide.
        self.registry = CollectorRegistry()
        self.turns = Counter(
            "chat_turns", "Generations finished, by model and how they ended", ["model", "status"], registry=self.registry
        )
        self.ttft = Histogram(
            "chat_time_to_first_token_seconds", "From request to the first output", ["model"],
            buckets=TTFT_BUCKETS_S, registry=self.registry,
        )
        self.tokens = Counter("chat_generated_tokens", "Tokens generated", ["model"], registry=self.registry)
        self.prompt_tokens = Counter("chat_prompt_tokens", "Prompt tokens read", ["model"], registry=self.registry)
        self.active = Gauge("chat_active_streams", "Streams being decoded, all replicas", ["model"], registry=self.registry)
        self.queued = Gauge("chat_queued_streams", "Streams waiting for a slot, all replicas", ["model"], registry=self.registry)
        self.served = Gauge(
            "chat_replica_requests", "Requests the model's replicas have received since they started", ["model"],
            registry=self.registry,
        )
        self.reused = Gauge(
            "chat_prompt_tokens_reused",
            "Prompt tokens the model's replicas took from their prefix cache instead of computing, since they started",
            ["model"], registry=self.registry,
        )

    def turn_started(self, model: str, ttft_s: float) -> None:
        self.ttft.labels(model).observe(ttft_s)

    def turn_finished(self, model: str, status: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.turns.labels(model, status).inc()
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.tokens.labels(model).inc(completion_tokens)

    def render(self, stats_by_model: dict[str, list[EngineStats]]) -> bytes:
        for model, replicas in stats_by_model.items():
            self.active.labels(model).set(sum(s.active_requests for s in replicas))
            self.queued.labels(model).set(sum(s.queued_requests for s in replicas))
            self.served.labels(model).set(sum(s.total_requests for s in replicas))
            self.reused.labels(model).set(sum(s.reused_prompt_tokens for s in replicas))
        return generate_latest(self.registry)
