"""The one place where errors become HTTP responses: domain errors (raised here or in a
replica), FastAPI's validation and routing errors, and the request body limit, each answered
in its route family's shape (OpenAI's error object under `/v1`, `{"detail": ...}` elsewhere).
A stream that fails after it started ends in its API's own way (`turns.text_pieces`,
`serving.stream_error`), not here."""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import iter_route_contexts
from ray.exceptions import RayError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.channel import ChannelError
from deployments.engine.protocol import InvalidRequestError
from deployments.history_store import ConversationNotFoundError
from deployments.model_registry import UnknownModelError
from deployments.quotas import QuotaExceededError
from deployments.turn_claims import ConversationBusyError
from serve_app.auth import PermissionDeniedError, UnauthorizedError
from serve_app.conversations import UsageNotKeptError
from serve_app.protocol import ErrorResponse, OpenAIErrorResponse
from serve_app.served_models import UnknownRevisionError
from serve_app.turns import ModelOverloadedError

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

# The error statuses a route may answer, as the OpenAPI schema documents them: the app's
# (`{"detail": ...}`), and those of `/v1` (OpenAI's error object; a 422 is answered as a 400).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 409, 413, 422, 429, 503)
}
OPENAI_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": OpenAIErrorResponse} for code in (400, 401, 403, 404, 409, 413, 429, 503)
}


def error_body(request: Request, code: int, message: str, param: str | None = None) -> dict:
    """`/v1` routes answer in OpenAI's error shape (the SDK reads it); the others as the
    original API did, `{"detail": ...}`."""
    if request.url.path.startswith("/v1/"):
        kind = "invalid_request_error" if code < 500 else "service_unavailable_error"
        return {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return {"detail": message}


def error_response(request: Request, exc: Exception) -> JSONResponse:
    """The one place errors become HTTP responses. Handle calls raise a replica's exception as
    a RayTaskError whose `cause` is the original, so the cause decides the status."""
    cause = getattr(exc, "cause", None) or exc
    if isinstance(cause, UnauthorizedError):
        return JSONResponse(error_body(request, 401, str(cause)), status_code=401, headers={"WWW-Authenticate": "Bearer"})
    if isinstance(cause, QuotaExceededError):
        body = error_body(request, 429, str(cause))
        if "error" in body:  # OpenAI's rate-limit error, which its SDK retries after `Retry-After`
            body["error"].update(type=cause.counts, code="rate_limit_exceeded")
        return JSONResponse(body, status_code=429, headers={"Retry-After": str(cause.retry_after_s)})
    if isinstance(cause, ModelOverloadedError):
        return JSONResponse(error_body(request, 503, str(cause)), status_code=503, headers={"Retry-After": "2"})
    for error_type, code in ERROR_STATUS.items():
        if isinstance(cause, error_type):
            # A bad parameter's message starts with its name: OpenAI's `param`.
            param = _named_field(str(cause)) if code == 400 else None
            return JSONResponse(error_body(request, code, str(cause), param), status_code=code)
    # Anything else from Ray (or the way its outputs come back): a replica died or could not
    # start; retrying may succeed once Serve has replaced it.
    message = f"a backend replica is unavailable, retry shortly ({type(cause).__name__}: {cause})"
    return JSONResponse(error_body(request, 503, message), status_code=503, headers={"Retry-After": "5"})


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    # Async: Starlette runs a plain function's handler on its thread pool, a hop to another
    # thread and back for every refusal (a flood of 429s or 503s is made of them).
    return error_response(request, exc)


def _named_field(message: str) -> str | None:
    """The field a message starts with ("tool_choice: ...", after pydantic's "Value error, ")."""
    named = re.match(r"(?:Value error, )?([a-z_][a-z_.0-9]*)(?=: )", message)
    return named and named[1]


async def _invalid_request(request: Request, exc: RequestValidationError) -> Response:
    errors = json.loads(json.dumps(exc.errors(), default=str))
    if any(error.get("type") == "json_invalid" for error in errors):
        return JSONResponse(error_body(request, 400, "the request body is not valid JSON"), status_code=400)
    if request.url.path.startswith("/v1/"):
        # OpenAI answers bad parameters with 400 and one message; name the first bad field.
        # A check across fields (a model validator) has no location: its message names the field.
        fields = [".".join(str(part) for part in error["loc"][1:]) or _named_field(error["msg"]) or "body" for error in errors]
        message = "; ".join(f"{field}: {error['msg']}" for field, error in zip(fields, errors))
        return JSONResponse(error_body(request, 400, message, fields[0]), status_code=400)
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
    return JSONResponse(error_body(request, exc.status_code, message), status_code=exc.status_code, headers=headers)


def _allowed_methods(request: Request) -> tuple[dict[str, str], str] | None:
    """The `Allow` header and message of a 405: Starlette's names the methods of the first route
    on the path only (GET of `/conversations`, not POST), so list those of every route with that
    path, in every included router. None for a 405 from a mount (the static files), which has no
    route here."""
    routes = [
        r
        for r in iter_route_contexts(request.app.router.routes)
        if isinstance(r.original_route, Route) and r.matches(request.scope)[0] != Match.NONE
    ]
    if not routes:
        return None
    allowed = ", ".join(sorted({method for route in routes if route.path == routes[0].path for method in route.methods or ()}))
    return {"Allow": allowed}, f"{request.method} is not allowed here; allowed: {allowed}"


class BodyLimit:
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
                await JSONResponse(error_body(Request(scope), 413, self.message), status_code=413)(scope, receive, send)
            elif not replaced:
                await send(message)

        await self.app(scope, receive, send_in_our_shape)


def add_error_handlers(app: FastAPI) -> None:
    """Answers every error above in its route family's shape (the body limit is a middleware:
    `BodyLimit`)."""
    for error_type in (*ERROR_STATUS, RayError, ChannelError, ModelOverloadedError, QuotaExceededError, UnauthorizedError):
        app.add_exception_handler(error_type, _domain_error)
    # Starlette types every handler as taking any Exception; it calls this one with RequestValidationError only.
    app.add_exception_handler(RequestValidationError, _invalid_request)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
