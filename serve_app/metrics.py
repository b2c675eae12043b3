"""Prometheus metrics of the chat service, served by the ingress at `/metrics`.

Counters and histograms are observed where turns start and end, in whichever ingress replica
relays the turn. The replica that answers a scrape (it reaches one of them at random) gathers
every ingress replica's, each series labelled with its `replica`: sum them over it
(`sum by (model) (rate(chat_turns_total[5m]))`). Summed here instead, a replica that restarted
or was replaced, or did not answer one scrape, would make the totals drop, which Prometheus reads
as a counter reset. The per-model stream gauges are read from every model replica at scrape
time, so they are exact however many replicas run. Ray Serve's own metrics (per deployment
request rates, latencies, replica counts) are exported by Ray on each node's metrics port, as
usual for Ray.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from deployments.engine.protocol import EngineStats

TTFT_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32)


class ServiceMetrics:
    """One ingress replica's turn metrics."""

    def __init__(self) -> None:
        # A registry per app, not the process-global one, so two apps in one process (tests)
        # don't collide.
        self.registry = CollectorRegistry()
        self.turns = Counter(
            "chat_turns", "Generations finished, by model and how they ended", ["model", "status"], registry=self.registry
        )
        self.ttft = Histogram(
            "chat_time_to_first_token_seconds",
            "From request to the first output",
            ["model"],
            buckets=TTFT_BUCKETS_S,
            registry=self.registry,
        )
        self.tokens = Counter("chat_generated_tokens", "Tokens generated", ["model"], registry=self.registry)
        self.prompt_tokens = Counter("chat_prompt_tokens", "Prompt tokens read", ["model"], registry=self.registry)

        # Per user (`auth: users`), over a bounded label set (`Quotas.metrics_label`).
        self.user_requests = Counter("chat_user_requests", "Generation requests ended, by user", ["user"], registry=self.registry)
        self.user_tokens = Counter("chat_user_generated_tokens", "Tokens generated, by user", ["user"], registry=self.registry)
        self.user_prompt_tokens = Counter(
            "chat_user_prompt_tokens", "Prompt tokens read, by user", ["user"], registry=self.registry
        )
        self.user_refusals = Counter(
            "chat_user_refusals",
            "Requests refused by a user's limit, by user and limit",
            ["user", "limit"],
            registry=self.registry,
        )

    def turn_started(self, model: str, ttft_s: float) -> None:
        self.ttft.labels(model).observe(ttft_s)

    def turn_finished(self, model: str, status: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.turns.labels(model, status).inc()
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.tokens.labels(model).inc(completion_tokens)

    def user_request_ended(self, user: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.user_requests.labels(user).inc()
        self.user_prompt_tokens.labels(user).inc(prompt_tokens)
        self.user_tokens.labels(user).inc(completion_tokens)

    def user_refused(self, user: str, limit: str) -> None:
        self.user_refusals.labels(user, limit).inc()

    def families(self) -> list[Metric]:
        """This replica's samples, for the replica that answers a scrape to gather (`by_replica`)."""
        return list(self.registry.collect())


def by_replica(per_replica: dict[str, list[Metric]]) -> list[Metric]:
    """The ingress replicas' families as one set, each sample labelled with its replica."""
    merged: dict[str, Metric] = {}
    for replica, families in per_replica.items():
        for family in families:
            into = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type, family.unit))
            for sample in family.samples:
                into.add_sample(sample.name, {**sample.labels, "replica": replica}, sample.value)
    return list(merged.values())


def stream_gauges(stats_by_model: dict[str, list[EngineStats]]) -> Iterator[Metric]:
    """The model replicas' own counts, summed over each model's replicas."""
    gauges = (
        ("chat_active_streams", "Streams being decoded, all replicas", lambda s: s.active_requests),
        ("chat_queued_streams", "Streams waiting for a slot, all replicas", lambda s: s.queued_requests),
        ("chat_replica_requests", "Requests the model's replicas have received since they started", lambda s: s.total_requests),
        (
            "chat_prompt_tokens_reused",
            "Prompt tokens the model's replicas took from their prefix cache instead of computing, since they started",
            lambda s: s.reused_prompt_tokens,
        ),
    )
    for name, documentation, read in gauges:
        gauge = GaugeMetricFamily(name, documentation, labels=["model"])
        for model, replicas in stats_by_model.items():
            gauge.add_metric([model], sum(read(s) for s in replicas))
        yield gauge


class _Collected:
    """Families collected already, in the shape a registry takes (a collector)."""

    def __init__(self, families: list[Metric]):
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def render(per_replica: dict[str, list[Metric]], stats_by_model: dict[str, list[EngineStats]]) -> bytes:
    """The text a scrape gets: every ingress replica's turn metrics, then the gauges."""
    registry = CollectorRegistry()
    registry.register(_Collected([*by_replica(per_replica), *stream_gauges(stats_by_model)]))
    return generate_latest(registry)
