"""The configured models as the ingress reaches them, shared by both APIs: a request's model name
(or alias, and revision) resolved to its config, each model's state in Serve, its replicas'
engine stats, and its tokenizer. Generating is not here: a turn's lifecycle is
`serve_app.turns`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from ray import serve
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle

from deployments.engine.protocol import EngineStats, TokenizeRequest
from deployments.model_registry import ModelConfig, ModelRegistry
from serve_app.protocol import ModelState

logger = logging.getLogger(__name__)

# Serve's deployment status -> what a user of the model cares about.
MODEL_STATE: dict[str, ModelState] = {
    "HEALTHY": "ready",
    "UPSCALING": "ready",
    "DOWNSCALING": "ready",
    "UPDATING": "loading",
    "UNHEALTHY": "failed",
    "DEPLOY_FAILED": "failed",
}


# One look at Serve's status costs the ingress ~13 ms of CPU and the controller ~2 (2 cores of an
# AMD EPYC Zen 4): `GET /v1/models` or `/readyz` asked back to back filled the ingress's core at
# ~57 a second. Looks within this many seconds of one another share one: a UI polling the model
# list or a load balancer's probe costs the streams beside it next to nothing.
STATES_TTL_S = 1.0

T = TypeVar("T")


class Recent(Generic[T]):
    """`fetch()`'s result, shared: callers while it runs wait for the same call, and its result
    answers the callers of the `ttl_s` seconds after it started. A failed call is not kept: the
    next caller calls again. A caller cancelled while it waits does not cancel the call."""

    def __init__(self, fetch: Callable[[], Awaitable[T]], ttl_s: float):
        self._fetch, self._ttl_s = fetch, ttl_s
        self._started = 0.0
        self._result: asyncio.Future[T] | None = None

    def _stale(self, result: asyncio.Future[T]) -> bool:
        if result.get_loop() is not asyncio.get_running_loop() or time.monotonic() - self._started > self._ttl_s:
            return True
        return result.done() and (result.cancelled() or result.exception() is not None)

    async def get(self) -> T:
        result = self._result
        if result is None or self._stale(result):
            self._started = time.monotonic()
            result = self._result = asyncio.ensure_future(self._fetch())
        return await asyncio.shield(result)


class UnknownRevisionError(LookupError):
    def __init__(self, model: ModelConfig, requested: str):
        super().__init__(
            f"model '{model.name}' is served at revision '{model.revision}', not '{requested}'; "
            "omit `revision` or ask for the served one"
        )


async def answers_of(deployment: DeploymentHandle, method: str, *args: Any) -> list | None:
    """`method`'s answer from every replica of `deployment` that gives one; None where the
    deployment cannot be asked at all (while `serve deploy` replaces it, Serve may call it
    unavailable). A replica that fails to answer is left out. Both are logged: a scrape of
    `/metrics` during an upgrade still gets an answer, without the series it could not read."""
    try:
        answers = await deployment.broadcast(method, *args).results_async(return_exceptions=True)
    except RayServeException as exc:
        logger.warning("%s could not be asked for %s: %s", deployment.deployment_name, method, exc)
        return None
    for failure in (answer for answer in answers if isinstance(answer, Exception)):
        logger.warning("a replica of %s did not answer %s: %r", deployment.deployment_name, method, failure)
    return [answer for answer in answers if not isinstance(answer, Exception)]


async def broadcast(models: dict[str, DeploymentHandle], method: str, *args: Any) -> dict[str, list]:
    """Calls `method` on every replica of every model; the replicas' answers, per model that
    could be asked."""
    names = list(models)
    answers = await asyncio.gather(*(answers_of(models[name], method, *args) for name in names))
    return {name: answer for name, answer in zip(names, answers) if answer is not None}


class ServedModels:
    """The registry of configured models and their deployments' handles: what a route asks
    about a model, short of generating with it."""

    def __init__(self, registry: ModelRegistry, models: dict[str, DeploymentHandle]):
        self.registry = registry
        self.models = models
        self._states = Recent(self._look_up_states, STATES_TTL_S)

    def resolve(self, name: str | None, revision: str | None = None) -> ModelConfig:
        """The model a request names (None: the default); `UnknownModelError` (404, listing the
        models) or `UnknownRevisionError` where none is served so."""
        model = self.registry.resolve(name)
        if revision not in (None, "", model.revision):
            raise UnknownRevisionError(model, revision)
        return model

    async def states(self) -> dict[str, ModelState]:
        """Each model's state from Serve's view of its deployment, at most `STATES_TTL_S` old."""
        return await self._states.get()

    async def _look_up_states(self) -> dict[str, ModelState]:
        app_name = serve.get_replica_context().app_name
        status = await asyncio.to_thread(serve.status)
        deployments = status.applications[app_name].deployments
        return {
            name: MODEL_STATE.get(deployments[handle.deployment_name].status, "loading") for name, handle in self.models.items()
        }

    async def engine_stats(self) -> dict[str, list[EngineStats]]:
        """Every replica's engine stats, per model."""
        return await broadcast(self.models, "stats")

    async def tokenize(self, model: ModelConfig, request: TokenizeRequest) -> tuple[list[int], int]:
        """`request`'s token ids under `model`'s tokenizer and template, and its context length
        (a model replica's)."""
        return await self.models[model.name].tokenize.remote(request)

    async def detokenize(self, model: ModelConfig, tokens: list[int]) -> str:
        return await self.models[model.name].detokenize.remote(tokens)
