"""The application builder: `serve_config.yaml` points `import_path` here, Serve calls
`build_app(args)`, and the typed settings become the deployment graph:

    Ingress (FastAPI) --> one LLMDeployment per configured model
                      --> HistoryDeployment (sole owner of the SQLite file)
"""

from __future__ import annotations

import re
from typing import Any

from ray.serve import Application, Deployment
from ray.serve.config import RequestRouterConfig

from deployments.affinity_router import ConversationAffinityRouter
from deployments.history_deployment import HistoryDeployment
from deployments.llm_deployment import LLMDeployment
from deployments.model_registry import ModelConfig
from serve_app.ingress import Ingress
from serve_app.settings import AppSettings


def _deployment(decorated: object) -> Deployment:
    """`@serve.deployment` has turned the class into a `Deployment`; mypy keeps seeing the class
    (it does not apply a class decorator's return type, python/mypy#3135), so check it here."""
    if not isinstance(decorated, Deployment):
        raise TypeError(f"{decorated!r} is not decorated with @serve.deployment")
    return decorated


def deployment_name(model: ModelConfig) -> str:
    return "LLM-" + re.sub(r"[^A-Za-z0-9_-]", "_", model.name)


def _replicas(num_replicas: int | str, autoscaling_config: dict | None) -> dict[str, Any]:
    """Serve's replica options: a fixed count, or autoscaling instead of it."""
    if autoscaling_config is not None:
        return {"autoscaling_config": autoscaling_config}
    return {"num_replicas": num_replicas}


# The ingress logs every HTTP request; the calls it makes for one (a generation, the history's
# reads and writes) are not logged again in the replicas they reach. Logging each was ~4% of a
# model replica's event-loop samples under load (py-spy), time the engine thread waits for the
# GIL; Serve still makes the record but drops it before formatting and writing it.
INNER_CALL_LOGGING = {"enable_access_log": False}


def _model_deployment(model: ModelConfig, settings: AppSettings) -> Application:
    options: dict[str, Any] = {
        "name": deployment_name(model),
        "ray_actor_options": {"num_cpus": model.num_cpus, "num_gpus": model.num_gpus, "resources": model.resources},
        "max_ongoing_requests": model.max_ongoing_requests,
        "max_queued_requests": model.max_queued_requests,
        "graceful_shutdown_timeout_s": settings.graceful_shutdown_timeout_s,
        "logging_config": INNER_CALL_LOGGING,
    }
    if model.conversation_affinity:
        # A replica batches up to max_batch_size requests at about the cost of one: only a
        # difference beyond that is worth a prefix-cache miss.
        options["request_router_config"] = RequestRouterConfig(
            # Ray annotates this constructor's `**kwargs: dict[str, Any]`, typing every keyword as a dict.
            request_router_class=ConversationAffinityRouter,  # type: ignore[arg-type]
            request_router_kwargs={"imbalance_threshold": model.max_batch_size},
        )
    options.update(_replicas(model.num_replicas, model.autoscaling_config))
    return _deployment(LLMDeployment).options(**options).bind(model, settings.model_cache_dir)


def build_app(args: dict[str, Any] | None = None) -> Application:
    settings = AppSettings.model_validate(args or {}).resolved()
    history = (
        _deployment(HistoryDeployment)
        .options(
            ray_actor_options={"num_cpus": settings.history_num_cpus, "resources": settings.history_resources},
            max_ongoing_requests=settings.history_max_ongoing_requests,
            graceful_shutdown_timeout_s=settings.graceful_shutdown_timeout_s,
            logging_config=INNER_CALL_LOGGING,
        )
        .bind(settings.database_path, settings.owner_of_unowned if settings.auth == "users" else None, settings.quotas)
    )
    models = {model.name: _model_deployment(model, settings) for model in settings.models}
    return (
        _deployment(Ingress)
        .options(
            ray_actor_options={"num_cpus": settings.ingress_num_cpus},
            max_ongoing_requests=settings.ingress_max_ongoing_requests,
            graceful_shutdown_timeout_s=settings.graceful_shutdown_timeout_s,
            **_replicas(settings.ingress_num_replicas, settings.ingress_autoscaling_config),
        )
        .bind(settings, models, history)
    )
