"""Typed application settings: the `args:` of the application in `serve_config.yaml`,
validated once when the application is built and passed down as objects."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments.model_registry import ModelConfig, ModelRegistry
from deployments.quotas import Quotas
from deployments.user_accounts import NAME_PATTERN

AuthMode = Literal["none", "key", "users"]


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
    # Who may use the API (the page, its static files, /healthz, /readyz and the API docs stay
    # open); read once when the application is built, default $RAY_CHAT_AUTH:
    # - none: anyone who reaches the port (the laptop: serve_config.yaml binds to 127.0.0.1);
    # - key: one shared key, `Authorization: Bearer <api_key>` (default when `api_key` is set);
    # - users: each person's own key (`make user NAME=...`); each sees only their own
    #   conversations (docs/users.md).
    # validate_default: the environment's value is checked as a configured one is.
    auth: AuthMode | None = Field(default_factory=lambda: os.environ.get("RAY_CHAT_AUTH") or None, validate_default=True)
    # The shared key of `auth: key`. Default: $RAY_CHAT_API_KEY.
    api_key: str | None = Field(default_factory=lambda: os.environ.get("RAY_CHAT_API_KEY") or None, min_length=8)
    # With `auth: users`, conversations made before users existed belong to this user (an
    # admin, made without a key if missing: `make user NAME=admin ROTATE=1` gives it one).
    owner_of_unowned: str = Field(default="admin", pattern=NAME_PATTERN)
    # With `auth: users`: each user's limits (streams at once, requests per minute, generated
    # tokens per day), defaults and overrides by name (`deployments.quotas.Quotas`, docs/users.md).
    quotas: Quotas = Quotas()
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

    @model_validator(mode="after")
    def _auth_is_complete(self):
        if self.auth is None:
            # Set neither in the config nor in the environment: a key given means it is wanted.
            object.__setattr__(self, "auth", "key" if self.api_key else "none")
        if self.auth == "key" and not self.api_key:
            raise ValueError("auth: key needs api_key (or RAY_CHAT_API_KEY)")
        return self

    def resolved(self) -> AppSettings:
        """A copy with every relative path made absolute, so replicas (whose working directory
        is Ray's, not ours) find the same files."""
        cache = self.model_cache_dir.resolve() if self.model_cache_dir else None
        return self.model_copy(update={"database_path": self.database_path.resolve(), "model_cache_dir": cache})
