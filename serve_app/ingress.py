"""The HTTP edge: the FastAPI app assembled from the services and the route groups (the original
API, the OpenAI API, health and metrics, usage), with its middleware (auth, CORS, the body
limit) and the chat page. The Serve deployment at the bottom only holds handles, builds the
services and builds the app on its replica. Errors become HTTP responses in `serve_app.errors`."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import Metric
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.call_channel import CallClient
from deployments.logs import show_our_logs
from deployments.model_registry import ModelRegistry
from deployments.output_channel import Inbox
from deployments.quotas import Quotas
from serve_app.auth import CALLER, Caller, PermissionDeniedError, UnauthorizedError, bearer_key, is_open
from serve_app.conversations import ConversationService, UsageNotKeptError
from serve_app.errors import ERROR_RESPONSES, OPENAI_ERROR_RESPONSES, BodyLimit, add_error_handlers, error_response
from serve_app.metrics import render as metrics_text
from serve_app.openai_api import create_openai_router, create_tokenizer_router
from serve_app.original_api import create_answers_router, create_conversations_router, create_models_router
from serve_app.protocol import ErrorResponse, UsageEntry, UsageReport
from serve_app.served_models import ServedModels
from serve_app.settings import AppSettings
from serve_app.streaming import TextStreamResponse
from serve_app.turns import StreamLease, TurnService

FRONTEND_DIR = Path(__file__).resolve().parent.parent / "frontend"
# Larger bodies get 413 before they are read whole (nginx's default limit too); the longest valid
# prompt, 100,000 characters, fits even with every character escaped (`\u00e9`, 6 bytes).
MAX_BODY_BYTES = 1 << 20


@dataclass(frozen=True)
class Services:
    """What the routes call: the served models, the conversations' history, and the turns
    that answer in them."""

    models: ServedModels
    conversations: ConversationService
    turns: TurnService


def create_app(settings: AppSettings, services: Services) -> FastAPI:
    # Who may use which route (`auth`); `leases` gives a generation route its stream lease.
    admission, leases = _user_admission(settings, services.turns) if settings.auth == "users" else ([], Depends(no_lease))
    app = FastAPI(
        title="ray-chat",
        summary="Multi-model streaming chat on Ray Serve",
        responses=ERROR_RESPONSES,
        dependencies=admission,
    )
    app.openapi = _corrected_openapi(app)  # type: ignore[method-assign]
    app.add_middleware(BodyLimit, max_body_size=MAX_BODY_BYTES)
    if settings.auth == "key":
        _require_shared_key(app, settings)
    # Added last, so outermost: even a 401 carries the CORS headers the browser needs to read it.
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_origin_regex=settings.cors_origin_regex,
        allow_methods=["*"],
        allow_headers=["*"],
    )
    add_error_handlers(app)

    models, conversations, turns = services.models, services.conversations, services.turns
    # A request is matched against the routers in this order (FastAPI tries every route of
    # each before the next): the generation routes first, as nearly every request under load
    # is one. No path of one router matches another's.
    app.include_router(create_openai_router(models, turns, leases))
    app.include_router(create_answers_router(models, turns, leases))
    app.include_router(create_health_router(models))
    app.include_router(create_models_router(models))
    app.include_router(create_conversations_router(conversations))
    app.include_router(create_usage_router(conversations, settings.quotas))
    app.include_router(create_metrics_router(models, turns))
    app.include_router(create_tokenizer_router(models))
    if FRONTEND_DIR.is_dir():
        _serve_frontend(app)
    return app


def create_health_router(models: ServedModels) -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz", response_model=dict[str, str], responses={503: {"model": ErrorResponse}})
    async def readyz() -> dict[str, str] | JSONResponse:
        """200 once every model has a replica that answers; 503 (with the laggards) before."""
        states = await models.states()
        if any(state != "ready" for state in states.values()):
            return JSONResponse({"detail": "models not ready", "models": states}, status_code=503)
        return {"status": "ready"}

    return router


def create_usage_router(conversations: ConversationService, quotas: Quotas) -> APIRouter:
    router = APIRouter(tags=["users"])

    @router.get("/v1/usage", responses=OPENAI_ERROR_RESPONSES)
    async def usage(all: bool = False, caller: Caller = CALLER) -> UsageReport:
        """With `auth: users`: the caller's generation requests, tokens, streams and limits today
        (UTC); `?all=true`: every user's (admins only)."""
        if caller.user_id is None:
            raise UsageNotKeptError()
        if all and not caller.admin:
            raise PermissionDeniedError("all: only an admin may see every user's usage")
        rows = await conversations.usage(None if all else caller.user_id)
        return UsageReport(data=[UsageEntry(**row.model_dump(), limits=quotas.limits_of(row.user)) for row in rows])

    return router


def create_metrics_router(models: ServedModels, turns: TurnService) -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        """Prometheus metrics: turns, TTFT, tokens, active and queued streams per model."""
        # Both are broadcasts to other replicas: asked at once.
        turn_metrics, streams = await asyncio.gather(turns.turn_metrics(), models.engine_stats())
        body = metrics_text(turn_metrics, streams)
        return PlainTextResponse(body, media_type=CONTENT_TYPE_LATEST)

    return router


def _serve_frontend(app: FastAPI) -> None:
    """The chat page at `/` and its files under `/static`."""
    app.mount("/static", StaticFiles(directory=FRONTEND_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(FRONTEND_DIR / "index.html")


def _corrected_openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """`app.openapi` with two corrections to what FastAPI writes, so the schema says what the
    app does (schema-driven clients and tests/e2e/test_fuzz.py trust it):
    - errors are JSON on every route, also where success is streamed text (FastAPI documents a
      route's errors in its success media type);
    - an optional header is absent or an integer/string, never null (FastAPI writes
      `anyOf: [..., null]` for `int | None`)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        for operation in (op for item in schema["paths"].values() for op in item.values()):
            for code, response in operation.get("responses", {}).items():
                content = response.get("content", {})
                if code[0] in "45" and TextStreamResponse.media_type in content:
                    content["application/json"] = content.pop(TextStreamResponse.media_type)
            for parameter in operation.get("parameters", []):
                branches = parameter["schema"].pop("anyOf", None) if parameter["in"] == "header" else None
                if branches:
                    (kept,) = [branch for branch in branches if branch != {"type": "null"}]
                    parameter["schema"].update(kept)
        return schema

    return openapi


UNAUTHORIZED = {
    "key": "missing or wrong API key: send `Authorization: Bearer <key>`",
    "users": "missing, wrong or revoked API key: send `Authorization: Bearer <your key>`",
}


def _require_shared_key(app: FastAPI, settings: AppSettings) -> None:
    """`auth: key`: every request but the open ones (`auth.is_open`) must carry the shared key; else 401."""
    shared = f"Bearer {settings.api_key}".encode()

    @app.middleware("http")
    async def check_shared_key(request: Request, call_next):
        if is_open(request) or hmac.compare_digest(request.headers.get("authorization", "").encode(), shared):
            return await call_next(request)
        return error_response(request, UnauthorizedError(UNAUTHORIZED["key"]))


async def no_lease() -> None:
    return None


def _user_admission(settings: AppSettings, turns: TurnService) -> tuple[list[Any], Any]:
    """`auth: users`: the app's dependency that lets a request in, and the one that gives a
    generation route its request's stream lease. Every route but the open ones wants a user's
    live key, looked up in the history each time (a revoked key is refused at once everywhere),
    else 401; a generation request also takes a lease on one of its user's streams in the same
    history call, refused (429) over a limit before any work is queued, and given back with the
    tokens used as its last answer ends (`TurnService.end_stream`)."""

    async def lease_of(request: Request) -> StreamLease | None:
        return request.state.lease

    async def admit(request: Request) -> AsyncIterator[None]:
        if is_open(request):
            yield
            return
        route: APIRoute = request.scope["route"]  # the matched one: a generation route takes a lease
        streams = any(dependant.call is lease_of for dependant in route.dependant.dependencies)
        key = bearer_key(request)
        admitted = await turns.admit_user(key, streams, settings.quotas) if key else None
        if admitted is None:
            raise UnauthorizedError(UNAUTHORIZED["users"])
        user, lease = admitted
        request.state.caller, request.state.lease = Caller(user.id, user.admin, user.name), lease
        try:
            yield
        finally:
            if lease is not None:  # ended already if an answer was started (`outputs`)
                await turns.end_stream(lease)

    return [Depends(admit)], Depends(lease_of)


def first_calls(
    settings: AppSettings, models: dict[str, DeploymentHandle], channels: dict[str, CallClient], history: CallClient
) -> list[Any]:
    """One cheap call to each deployment, made as an ingress replica starts and not awaited (a
    model may still be loading). A handle finds its deployment's replicas and connects to one on
    its first call, which made each ingress replica's first answer slower than the next ones
    (docs/engine.md#warm-up). The history's, and that of a model with a channel (`channels`),
    opens its channel: it asks the replica for its `address` through the handle. None to a model
    that may have scaled to zero: the call would start a replica."""
    calls = [
        models[model.name].stats.remote()
        for model in settings.models
        if not model.may_scale_to_zero and model.name not in channels
    ]
    return [*calls, *(channel.opened() for channel in channels.values()), history.opened()]


def model_channels(settings: AppSettings, models: dict[str, DeploymentHandle]) -> dict[str, CallClient]:
    """A `CallClient` for each model of one replica (`ModelConfig.has_one_replica`): its
    generations go on a connection beside Serve; the others' through Serve's router."""
    return {
        model.name: CallClient(models[model.name], f"model '{model.name}'") for model in settings.models if model.has_one_replica
    }


@serve.deployment
@serve.ingress()
class Ingress:
    # Serve awaits async constructors; mypy holds every `__init__` to returning None.
    async def __init__(self, settings: AppSettings, models: dict[str, DeploymentHandle], history: DeploymentHandle):  # type: ignore[misc]
        show_our_logs()
        self.settings = settings
        context = serve.get_replica_context()
        replicas = serve.get_deployment_handle(context.deployment, context.app_name)
        # On the node's address, where model replicas on any node reach it (`output_channel`).
        inbox = Inbox()
        await inbox.start(ray.util.get_node_ip_address())
        registry = ModelRegistry(settings.models)
        history_client = CallClient(history, "history")
        channels = model_channels(settings, models)
        turns = TurnService(registry, models, history_client, replicas, inbox, channels)
        self.services = Services(ServedModels(registry, models), ConversationService(history_client), turns)
        self._first_calls = asyncio.gather(*first_calls(settings, models, channels, history_client), return_exceptions=True)

    def turn_metrics(self) -> tuple[str, list[Metric]]:
        """This replica's name and turn metrics, for the replica that answers a scrape (`/metrics`)."""
        return serve.get_replica_context().replica_tag, self.services.turns.metrics.families()

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.settings, self.services)
