"""Typed application settings: the `args:` of the application in `serve_config.yaml`,
validated once when the application is built and passed down as objects."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments.model_registry import ModelConfig, ModelRegistry


def _default_models() -> list[ModelConfig]:
    return [ModelConfig(name="SmolLM2-135M-Instruct", aliases=("smollm2",))]


class AppSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    models: list[ModelConfig] = Field(default_factory=_default_models, min_length=1)
    # Relative paths are resolved against the directory `serve run` / `serve deploy` ran in.
    database_path: Path = Path("data/history.sqlite3")
    # None: $XDG_CACHE_HOME/ray-chat/models (~/.cache/ray-chat/models).
    model_cache_dir: Path | None = None
    # The original page was opened from a file (Origin: null) or another localhost port.
    cors_origins: list[str] = ["null"]
    cors_origin_regex: str | None = r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?"
    # When set, every API route requires `Authorization: Bearer <api_key>` (the page, its static
    # files, /healthz, /readyz and the API docs stay open). Default: $RAY_CHAT_API_KEY, read once
    # when the application is built.
    api_key: str | None = Field(default_factory=lambda: os.environ.get("RAY_CHAT_API_KEY") or None, min_length=8)
    # The light deployments take a sliver of a CPU so the model replicas can be scheduled.
    ingress_num_cpus: float = Field(default=0.1, ge=0)
    # Ingress replicas: each relays its streams' chunks and sets up its requests on one core, so
    # a GPU serving hundreds of streams wants several. They share nothing but the history
    # deployment, which also keeps each conversation to one answer at a time. Serve's
    # `autoscaling_config` (min_replicas, max_replicas, target_ongoing_requests, ...) replaces
    # the count.
    ingress_num_replicas: int = Field(default=1, gt=0)
    ingress_autoscaling_config: dict | None = None
    # Streams one ingress replica relays at once (Serve's default of 5 would queue the 6th
    # chat in the proxy); model replicas bound the real work.
    ingress_max_ongoing_requests: int = Field(default=256, gt=0)
    history_num_cpus: float = Field(default=0.1, ge=0)
    # Calls the history replica takes at once: every turn makes three (its conversation, its
    # prompt, its answer), and SQLite's commits are quick. At Serve's default of 5, the calls of 64
    # turns arriving together queued in their callers and the last answers ended seconds late.
    history_max_ongoing_requests: int = Field(default=1024, gt=0)
    # Custom Ray resources the history replica needs: pins it to the node that holds the
    # database file (e.g. {"history_node": 1} with `ray start --head --resources ...`).
    history_resources: dict[str, float] = {}
    # On an upgrade (`serve deploy` of a changed config) or a scale-down, a replica being
    # replaced finishes its streams for up to this long before it is stopped.
    graceful_shutdown_timeout_s: float = Field(default=300.0, ge=0)

    @model_validator(mode="after")
    def _model_names_are_unique(self):
        ModelRegistry(self.models)
        return self

    def resolved(self) -> AppSettings:
        """A copy with every relative path made absolute, so replicas (whose working directory
        is Ray's, not ours) find the same files."""
        cache = self.model_cache_dir.resolve() if self.model_cache_dir else None
        return self.model_copy(update={"database_path": self.database_path.resolve(), "model_cache_dir": cache})
