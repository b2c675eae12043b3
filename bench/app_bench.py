"""What the ingress's FastAPI app costs a request by itself, in one process, without Ray: the
middleware, routing, body validation and the error answer of requests refused before any
deployment is called. Through HTTP these microseconds are lost in the machine's noise
(docs/performance.md); here a change to the app's stack shows in one run.

    .venv/bin/python -m bench.app_bench [--requests 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import time

from deployments.model_registry import ModelRegistry
from serve_app.conversations import ConversationService
from serve_app.ingress import Services, create_app
from serve_app.served_models import ServedModels
from serve_app.settings import AppSettings
from serve_app.turns import TurnService

ROUNDS = 7
# (method, path, body): each answered by the app alone, and what it answers.
REQUESTS = [
    ("POST", "/v1/completions", b'{"model": "none", "prompt": "hi", "max_tokens": 1}'),  # 404: unknown model
    ("POST", "/v1/chat/completions", b'{"model": "none", "messages": []}'),  # 400: no messages
    ("POST", "/conversations/1/generate", b'{"prompt": ""}'),  # 422: empty prompt
    ("GET", "/healthz", b""),
    ("GET", "/v1/nowhere", b""),  # 404 after every route was tried
]


def build_app():
    settings = AppSettings.model_validate({"api_key": None})
    registry = ModelRegistry(settings.models)
    services = Services(ServedModels(registry, {}), ConversationService(None), TurnService(registry, models={}, history=None))
    return create_app(settings, services)


async def call(app, method: str, path: str, body: bytes) -> int:
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop() if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8080),
        "state": {},
    }
    await app(scope, receive, send)
    return sent[0]["status"]


async def measure(requests: int) -> None:
    app = build_app()
    for method, path, body in REQUESTS:
        status = await call(app, method, path, body)
        for _ in range(requests // 10):  # warm-up
            await call(app, method, path, body)
        rounds = []  # the best of ROUNDS: this machine's jitter only ever adds time
        for _ in range(ROUNDS):
            started = time.perf_counter()
            for _ in range(requests // ROUNDS):
                await call(app, method, path, body)
            rounds.append((time.perf_counter() - started) / (requests // ROUNDS) * 1e6)
        print(
            f"  {method:<4} {path:<28} {status}  {min(rounds):6.1f} us a request (median round {sorted(rounds)[ROUNDS // 2]:.1f})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000, help="of each kind")
    args = parser.parse_args()
    asyncio.run(measure(args.requests))


if __name__ == "__main__":
    main()
