"""The HTTP edge: the FastAPI app (routes, CORS, the chat page) and the one place where domain
errors become HTTP status codes. The Serve deployment at the bottom only holds handles and
builds the app on its replica."""

from __future__ import annotations

import asyncio
import hmac
import json
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import ray
from fastapi import Depends, FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import Metric
from ray import serve
from ray.exceptions import RayError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.engine.protocol import InvalidRequestError
from deployments.history_store import ConversationNotFoundError
from deployments.logs import show_our_logs
from deployments.model_registry import ModelRegistry, UnknownModelError
from deployments.output_channel import ChannelError, Inbox
from deployments.quotas import QuotaExceededError
from deployments.turn_claims import ConversationBusyError
from serve_app.auth import CALLER, Caller, PermissionDeniedError, UnauthorizedError, bearer_key, is_open
from serve_app.conversations import (
    ConversationService,
    ModelOverloadedError,
    StreamLease,
    UnknownRevisionError,
    conversation_markdown,
    parse_conversation_id,
)
from serve_app.metrics import render as metrics_text
from serve_app.openai_api import OPENAI_ERROR_CODES, create_openai_router, create_tokenizer_router
from serve_app.protocol import (
    Conversation,
    ConversationSummary,
    ErrorResponse,
    ExportFormat,
    GenerateRequest,
    ModelCard,
    OpenAIErrorResponse,
    RegenerateRequest,
    RenameRequest,
    StopResponse,
    UsageEntry,
    UsageReport,
)
from serve_app.settings import AppSettings
from serve_app.streaming import TextStreamResponse

FRONTEND_DIR = Path(__file__).resolve().parent.parent / "frontend"
# Larger bodies get 413 before they are read whole (nginx's default limit too); the longest valid
# prompt, 100,000 characters, fits even with every character escaped (`\u00e9`, 6 bytes).
MAX_BODY_BYTES = 1 << 20


class UsageNotKeptError(LookupError):
    """Usage is counted per user, and the service has none (404)."""

    def __init__(self) -> None:
        super().__init__("usage is counted per user: the service runs without users (auth: users turns them on)")


# Domain errors -> HTTP status, wherever they were raised (here or in a replica).
ERROR_STATUS: dict[type[Exception], int] = {
    ConversationNotFoundError: status.HTTP_404_NOT_FOUND,
    UnknownModelError: status.HTTP_404_NOT_FOUND,
    UnknownRevisionError: status.HTTP_404_NOT_FOUND,
    ConversationBusyError: status.HTTP_409_CONFLICT,
    PermissionDeniedError: status.HTTP_403_FORBIDDEN,
    UsageNotKeptError: status.HTTP_404_NOT_FOUND,
    InvalidRequestError: status.HTTP_400_BAD_REQUEST,  # PromptTooLongError among them
}

_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 409, 413, 422, 429, 503)
}


def _error_body(request: Request, code: int, message: str, param: str | None = None) -> dict:
    """`/v1` routes answer in OpenAI's error shape (the SDK reads it); the others as the
    original API did, `{"detail": ...}`."""
    if request.url.path.startswith("/v1/"):
        kind = "invalid_request_error" if code < 500 else "service_unavailable_error"
        return {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return {"detail": message}


def _error_response(request: Request, exc: Exception) -> JSONResponse:
    """The one place errors become HTTP responses. Handle calls raise a replica's exception as
    a RayTaskError whose `cause` is the original, so the cause decides the status."""
    cause = getattr(exc, "cause", None) or exc
    if isinstance(cause, UnauthorizedError):
        return JSONResponse(_error_body(request, 401, str(cause)), status_code=401, headers={"WWW-Authenticate": "Bearer"})
    if isinstance(cause, QuotaExceededError):
        body = _error_body(request, 429, str(cause))
        if "error" in body:  # OpenAI's rate-limit error, which its SDK retries after `Retry-After`
            body["error"].update(type=cause.counts, code="rate_limit_exceeded")
        return JSONResponse(body, status_code=429, headers={"Retry-After": str(cause.retry_after_s)})
    if isinstance(cause, ModelOverloadedError):
        return JSONResponse(_error_body(request, 503, str(cause)), status_code=503, headers={"Retry-After": "2"})
    for error_type, code in ERROR_STATUS.items():
        if isinstance(cause, error_type):
            # A bad parameter's message starts with its name: OpenAI's `param`.
            param = _named_field(str(cause)) if code == 400 else None
            return JSONResponse(_error_body(request, code, str(cause), param), status_code=code)
    # Anything else from Ray (or the way its outputs come back): a replica died or could not
    # start; retrying may succeed once Serve has replaced it.
    message = f"a backend replica is unavailable, retry shortly ({type(cause).__name__}: {cause})"
    return JSONResponse(_error_body(request, 503, message), status_code=503, headers={"Retry-After": "5"})


def _named_field(message: str) -> str | None:
    """The field a message starts with ("tool_choice: ...", after pydantic's "Value error, ")."""
    named = re.match(r"(?:Value error, )?([a-z_][a-z_.]*)(?=: )", message)
    return named and named[1]


async def _invalid_request(request: Request, exc: RequestValidationError) -> Response:
    errors = json.loads(json.dumps(exc.errors(), default=str))
    if any(error.get("type") == "json_invalid" for error in errors):
        return JSONResponse(_error_body(request, 400, "the request body is not valid JSON"), status_code=400)
    if request.url.path.startswith("/v1/"):
        # OpenAI answers bad parameters with 400 and one message; name the first bad field.
        # A check across fields (a model validator) has no location: its message names the field.
        fields = [".".join(str(part) for part in error["loc"][1:]) or _named_field(error["msg"]) or "body" for error in errors]
        message = "; ".join(f"{field}: {error['msg']}" for field, error in zip(fields, errors))
        return JSONResponse(_error_body(request, 400, message, fields[0]), status_code=400)
    # ASCII JSON: an echoed input may hold a lone surrogate ("\ud800"), which UTF-8 cannot encode (a 500).
    return Response(json.dumps({"detail": errors}), status_code=422, media_type="application/json")


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's own errors (an unknown route or method, a body it cannot parse) in the route
    family's shape; for a body it cannot parse, why: not UTF-8, nested too deep, ..."""
    message, headers = str(exc.detail), exc.headers
    if exc.status_code == 400 and exc.__cause__ is not None:
        message = f"the request body is not valid JSON ({exc.__cause__})"
    if exc.status_code == 405:
        headers, message = _allowed_methods(request) or (headers, message)
    return JSONResponse(_error_body(request, exc.status_code, message), status_code=exc.status_code, headers=headers)


def _allowed_methods(request: Request) -> tuple[dict[str, str], str] | None:
    """The `Allow` header and message of a 405: Starlette's names the methods of the first route
    on the path only (GET of `/conversations`, not POST), so list those of every route with that
    path. None for a 405 from a mount (the static files), which has no route here."""
    routes = [r for r in request.app.router.routes if isinstance(r, Route) and r.matches(request.scope)[0] != Match.NONE]
    if not routes:
        return None
    allowed = ", ".join(sorted({method for route in routes if route.path == routes[0].path for method in route.methods or ()}))
    return {"Allow": allowed}, f"{request.method} is not allowed here; allowed: {allowed}"


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


class _BodyLimit:
    """Starlette's request body limit (413 as soon as a body, chunked or not, passes the limit,
    before it is read whole), answering in the route family's error shape instead of its own
    plain-text "Content Too Large"."""

    def __init__(self, app: ASGIApp, max_body_size: int) -> None:
        self.app = RequestBodyLimitMiddleware(app, max_body_size)
        self.message = f"the request body is larger than {max_body_size} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        replaced = False

        async def send_in_our_shape(message: Message) -> None:
            # Only the limit answers 413 here; its plain-text body's messages are dropped.
            nonlocal replaced
            if message["type"] == "http.response.start" and message["status"] == 413:
                replaced = True
                await JSONResponse(_error_body(Request(scope), 413, self.message), status_code=413)(scope, receive, send)
            elif not replaced:
                await send(message)

        await self.app(scope, receive, send_in_our_shape)


def _conversation_links(conversation_id: str) -> dict[str, Any]:
    """OpenAPI links from a route that creates or answers in a conversation to the routes that take
    its id (`conversation_id`: where the id is), so client generators and schema-driven tests
    (tests/e2e/test_fuzz.py) chain the calls."""
    targets = {
        "get": "/get",
        "rename": "/patch",
        "delete": "/delete",
        "export": "~1export/get",
        "generate": "~1generate/post",
        "regenerate": "~1regenerate/post",
        "stop": "~1stop/post",
    }
    path_item = "#/paths/~1conversations~1{conversation_id}"
    return {
        name: {"operationRef": path_item + target, "parameters": {"conversation_id": conversation_id}}
        for name, target in targets.items()
    }


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
        return _error_response(request, UnauthorizedError(UNAUTHORIZED["key"]))


async def no_lease() -> None:
    return None


def _user_admission(settings: AppSettings, service: ConversationService) -> tuple[list[Any], Any]:
    """`auth: users`: the app's dependency that lets a request in, and the one that gives a
    generation route its request's stream lease. Every route but the open ones wants a user's
    live key, looked up in the history each time (a revoked key is refused at once everywhere),
    else 401; a generation request also takes a lease on one of its user's streams in the same
    history call, refused (429) over a limit before any work is queued, and given back with the
    tokens used as its last answer ends (`ConversationService.end_stream`)."""

    async def lease_of(request: Request) -> StreamLease | None:
        return request.state.lease

    async def admit(request: Request) -> AsyncIterator[None]:
        if is_open(request):
            yield
            return
        route: APIRoute = request.scope["route"]  # the matched one: a generation route takes a lease
        streams = any(dependant.call is lease_of for dependant in route.dependant.dependencies)
        key = bearer_key(request)
        admitted = await service.admit_user(key, streams, settings.quotas) if key else None
        if admitted is None:
            raise UnauthorizedError(UNAUTHORIZED["users"])
        user, lease = admitted
        request.state.caller, request.state.lease = Caller(user.id, user.admin, user.name), lease
        try:
            yield
        finally:
            if lease is not None:  # ended already if an answer was started (`outputs`)
                await service.end_stream(lease)

    return [Depends(admit)], Depends(lease_of)


def create_app(settings: AppSettings, service: ConversationService) -> FastAPI:
    # Who may use which route (`auth`); `leases` gives a generation route its stream lease.
    admission, leases = _user_admission(settings, service) if settings.auth == "users" else ([], Depends(no_lease))
    app = FastAPI(
        title="ray-chat",
        summary="Multi-model streaming chat on Ray Serve",
        responses=_ERROR_RESPONSES,
        dependencies=admission,
    )
    app.openapi = _corrected_openapi(app)  # type: ignore[method-assign]
    app.add_middleware(_BodyLimit, max_body_size=MAX_BODY_BYTES)
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
    for error_type in (*ERROR_STATUS, RayError, ChannelError, ModelOverloadedError, QuotaExceededError, UnauthorizedError):
        app.add_exception_handler(error_type, _error_response)
    # Starlette types every handler as taking any Exception; it calls this one with RequestValidationError only.
    app.add_exception_handler(RequestValidationError, _invalid_request)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    registry = service.registry

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], response_model=dict[str, str], responses={503: {"model": ErrorResponse}})
    async def readyz() -> dict[str, str] | JSONResponse:
        """200 once every model has a replica that answers; 503 (with the laggards) before."""
        states = await service.model_states()
        if any(state != "ready" for state in states.values()):
            return JSONResponse({"detail": "models not ready", "models": states}, status_code=503)
        return {"status": "ready"}

    @app.get("/models", tags=["models"])
    async def list_models() -> list[ModelCard]:
        return [
            ModelCard(name=m.name, aliases=list(m.aliases), revision=m.revision, is_default=m is registry.default)
            for m in registry.models
        ]

    @app.get("/conversations", tags=["conversations"], response_model=list[int] | list[ConversationSummary])
    async def list_conversations(detail: bool = False, all: bool = False, caller: Caller = CALLER):
        """Ids of the caller's conversations, oldest first (the original's answer); with
        `?detail=true`, each one's id, title and timestamps, most recently active first. With
        `auth: users`, `?all=true` lists every user's (admins only)."""
        if all and not caller.admin:
            raise PermissionDeniedError("all: only an admin may list every user's conversations")
        owner = None if all else caller.owner
        return await service.list_summaries(owner) if detail else await service.list_ids(owner)

    @app.get(
        "/conversations/start",
        tags=["conversations"],
        responses={200: {"links": _conversation_links("$response.body")}},
    )
    async def start_conversation(caller: Caller = CALLER) -> int:
        """Creates a conversation and returns its id (a bare JSON number)."""
        return (await service.create(caller.owner)).id

    @app.post(
        "/conversations",
        status_code=201,
        tags=["conversations"],
        responses={201: {"links": _conversation_links("$response.body#/id")}},
    )
    async def create_conversation(caller: Caller = CALLER) -> ConversationSummary:
        return await service.create(caller.owner)

    @app.get("/conversations/{conversation_id}", tags=["conversations"])
    async def get_conversation(conversation_id: str, caller: Caller = CALLER) -> Conversation:
        return await service.get(conversation_id, caller.owner)

    @app.patch("/conversations/{conversation_id}", tags=["conversations"])
    async def rename_conversation(conversation_id: str, body: RenameRequest, caller: Caller = CALLER) -> ConversationSummary:
        return await service.rename(conversation_id, body.title, caller.owner)

    @app.get(
        "/conversations/{conversation_id}/export",
        tags=["conversations"],
        responses={200: {"content": {"application/json": {}, "text/markdown": {}}}},
    )
    async def export_conversation(conversation_id: str, format: ExportFormat = "json", caller: Caller = CALLER) -> Response:
        """The whole conversation as a downloadable JSON document or Markdown transcript."""
        conversation = await service.get(conversation_id, caller.owner)
        if format == "markdown":
            body, media_type, suffix = conversation_markdown(conversation), "text/markdown; charset=utf-8", "md"
        else:
            body, media_type, suffix = conversation.model_dump_json(indent=2), "application/json", "json"
        disposition = f'attachment; filename="conversation-{conversation.id}.{suffix}"'
        return Response(body, media_type=media_type, headers={"Content-Disposition": disposition})

    @app.delete("/conversations/{conversation_id}", tags=["conversations"])
    async def delete_conversation(conversation_id: str, caller: Caller = CALLER) -> dict[str, int | bool]:
        return {"id": await service.delete(conversation_id, caller.owner), "deleted": True}

    @app.post(
        "/conversations/{conversation_id}/generate",
        tags=["conversations"],
        response_class=TextStreamResponse,
        responses={
            200: {
                "description": "The answer, streamed as it is generated.",
                "links": _conversation_links("$request.path.conversation_id"),
            }
        },
    )
    async def generate(
        conversation_id: str, body: GenerateRequest, caller: Caller = CALLER, lease: StreamLease | None = leases
    ) -> TextStreamResponse:
        """Appends `prompt` to the conversation and streams the model's answer as plain text."""
        model = service.resolve_model(body.model, body.revision)
        turn = await service.conversation_turn(
            conversation_id,
            caller.owner,
            [{"role": "user", "content": body.prompt}],
            model,
            body.to_sampling_params(),
            body.stored_parameters(model.name, model.revision),
            lease,
        )
        return TextStreamResponse(service.text_pieces(turn))

    @app.post(
        "/conversations/{conversation_id}/regenerate",
        tags=["conversations"],
        response_class=TextStreamResponse,
        responses={
            200: {
                "description": "The new answer, streamed.",
                "links": _conversation_links("$request.path.conversation_id"),
            }
        },
    )
    async def regenerate(
        conversation_id: str,
        body: RegenerateRequest | None = None,
        caller: Caller = CALLER,
        lease: StreamLease | None = leases,
    ) -> TextStreamResponse:
        """Answers the last prompt again (optionally with other parameters or another model);
        the new answer replaces the previous one once it is complete or stopped."""
        body = body or RegenerateRequest()
        model = service.resolve_model(body.model, body.revision)
        turn = await service.regenerate_turn(
            conversation_id,
            caller.owner,
            model,
            body.to_sampling_params(),
            body.stored_parameters(model.name, model.revision),
            lease,
        )
        return TextStreamResponse(service.text_pieces(turn))

    @app.post("/conversations/{conversation_id}/stop", tags=["conversations"])
    async def stop(conversation_id: str, caller: Caller = CALLER) -> StopResponse:
        """Stops the answer being generated in this conversation within one decode step; the
        partial answer is stored with status "stopped"."""
        stopped = await service.stop(conversation_id, caller.owner)
        return StopResponse(id=parse_conversation_id(conversation_id), stopped=stopped)

    @app.get("/v1/usage", tags=["users"], responses={code: {"model": OpenAIErrorResponse} for code in OPENAI_ERROR_CODES})
    async def usage(all: bool = False, caller: Caller = CALLER) -> UsageReport:
        """With `auth: users`: the caller's generation requests, tokens, streams and limits today
        (UTC); `?all=true`: every user's (admins only)."""
        if caller.user_id is None:
            raise UsageNotKeptError()
        if all and not caller.admin:
            raise PermissionDeniedError("all: only an admin may see every user's usage")
        rows = await service.usage(None if all else caller.user_id)
        return UsageReport(data=[UsageEntry(**row.model_dump(), limits=settings.quotas.limits_of(row.user)) for row in rows])

    @app.get("/metrics", tags=["health"], response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        """Prometheus metrics: turns, TTFT, tokens, active and queued streams per model."""
        # Both are broadcasts to other replicas: asked at once.
        turns, streams = await asyncio.gather(service.turn_metrics(), service.engine_stats())
        body = metrics_text(turns, streams)
        return PlainTextResponse(body, media_type=CONTENT_TYPE_LATEST)

    app.include_router(create_openai_router(service, leases))
    app.include_router(create_tokenizer_router(service))

    if FRONTEND_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=FRONTEND_DIR), name="static")

        @app.get("/", include_in_schema=False)
        async def index() -> FileResponse:
            return FileResponse(FRONTEND_DIR / "index.html")

    return app


def first_calls(settings: AppSettings, models: dict[str, DeploymentHandle], history: DeploymentHandle) -> list[Any]:
    """One cheap call to each deployment, made as an ingress replica starts and not awaited (a
    model may still be loading). A handle finds its deployment's replicas and connects to one on
    its first call, which cost each ingress replica's first answer ~45 ms (2-core CPU: 62-80 ms
    to the first byte, 15-24 after). None to a model that may have scaled to zero: the call
    would start a replica."""
    calls = [models[model.name].stats.remote() for model in settings.models if not model.may_scale_to_zero]
    return [*calls, history.ready.remote()]


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
        self.service = ConversationService(ModelRegistry(settings.models), models, history, replicas, inbox)
        self._first_calls = asyncio.gather(*first_calls(settings, models, history), return_exceptions=True)

    def turn_metrics(self) -> tuple[str, list[Metric]]:
        """This replica's name and turn metrics, for the replica that answers a scrape (`/metrics`)."""
        return serve.get_replica_context().replica_tag, self.service.metrics.families()

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.settings, self.service)
