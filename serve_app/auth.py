"""Who is asking: the caller a request's key names (`auth` in the settings).

With `auth: none` or `key` the service has one principal, who sees every conversation; with
`auth: users` each key belongs to a user (`deployments.user_accounts`), who sees only their own.
The ingress resolves the key once per request (`ingress`: a middleware for the shared key, an
app-wide dependency for users) and the routes read the caller from the request's state.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Depends, Request

# Served to anyone: the page and its files, the probes, the API's documentation.
OPEN_PATHS = ("/healthz", "/readyz", "/docs", "/redoc", "/openapi.json")


@dataclass(frozen=True)
class Caller:
    user_id: int | None  # None: the one principal of `auth: none` or `key`
    admin: bool = True
    name: str | None = None  # the user's (`auth: users`)

    @property
    def owner(self) -> int | None:
        """Whose conversations this caller sees (the history store's `owner`); None: all."""
        return self.user_id


EVERYONE = Caller(user_id=None)


async def caller_of(request: Request) -> Caller:
    """The caller the auth middleware found for this request (FastAPI dependency). Async so that
    FastAPI calls it on the event loop: a plain function it would run in its thread pool, a
    thread hand-off on every request."""
    return getattr(request.state, "caller", EVERYONE)


# The dependency that gives a route its caller: `caller: Caller = CALLER`.
CALLER = Depends(caller_of)


def is_open(request: Request) -> bool:
    path = request.url.path
    return request.method == "OPTIONS" or path == "/" or path.startswith("/static/") or path.startswith(OPEN_PATHS)


def bearer_key(request: Request) -> str | None:
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    return key.strip() or None if scheme == "Bearer" else None


class UnauthorizedError(PermissionError):
    """No key, or not a live one (401 with `WWW-Authenticate: Bearer`)."""


class PermissionDeniedError(PermissionError):
    """A caller asked for what only an admin may do (403)."""
