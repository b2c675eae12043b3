"""The application builder: `serve_config.yaml` points `import_path` here, Serve calls
`build_app(args)`, and the typed settings become the deployment graph:

    Ingress (FastAPI) --> one LLMDeployment per configured model
                      --> HistoryDeployment (sole owner of the SQLite file)
"""

from __future__ import annotations

import re
from typing import Any

from ray.serve import Application

from deployments.history_deployment import HistoryDeployment
from deployments.llm_deployment import LLMDeployment
from deployments.model_registry import ModelConfig
from serve_app.ingress import Ingress
from serve_app.settings import AppSettings


def deployment_name(model: ModelConfig) -> str:
    return "LLM-" + re.sub(r"[^A-Za-z0-9_-]", "_", model.name)


def _model_deployment(model: ModelConfig, settings: AppSettings) -> Application:
    options: dict[str, Any] = {
        "name": deployment_name(model),
        "ray_actor_options": {"num_cpus": model.num_cpus, "num_gpus": model.num_gpus},
        "max_ongoing_requests": model.max_ongoing_requests,
        "max_queued_requests": model.max_queued_requests,
    }
    if model.autoscaling_config is not None:
        options["autoscaling_config"] = model.autoscaling_config
    else:
        options["num_replicas"] = model.num_replicas
    return LLMDeployment.options(**options).bind(model, settings.model_cache_dir)


def build_app(args: dict[str, Any] | None = None) -> Application:
    settings = AppSettings.model_validate(args or {}).resolved()
    history = HistoryDeployment.options(ray_actor_options={"num_cpus": settings.history_num_cpus}).bind(
        settings.database_path
    )
    models = {model.name: _model_deployment(model, settings) for model in settings.models}
    return Ingress.options(
        ray_actor_options={"num_cpus": settings.ingress_num_cpus},
        max_ongoing_requests=settings.ingress_max_ongoing_requests,
    ).bind(settings, models, history)
