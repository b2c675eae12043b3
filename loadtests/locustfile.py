"""Locust load test for the chat service: each simulated user starts a conversation and asks
questions through the original streaming API, and we report, besides Locust's own request
stats, two latency series that matter for chat:

- `TTFT`: time from sending the request to the first streamed byte of the answer;
- `ITL`: inter-token latency, the gap between consecutive streamed chunks (one chunk is at most
  one decode step, so this is the per-token latency a reader sees).

Run against a running service (`make serve`), e.g. 16 users for one minute:

    .venv/bin/locust -f loadtests/locustfile.py --headless -u 16 -r 4 -t 60s --host http://127.0.0.1:8080

Settings via environment: LOAD_MODEL (model name, default: the server's default model),
LOAD_SAMPLE_LEN (tokens per answer, default 64), LOAD_PROMPT, and for a server that wants keys:

- LOAD_KEYS: a file of API keys, one per line (`auth: users`: one per user, e.g.
  `for i in 1 2 3 4; do make user NAME=load$i | tail -1; done > keys.txt`); the simulated users
  take them in turn, so N keys are N people sharing the load;
- LOAD_API_KEY: one key for every simulated user (`auth: key`).

A request refused by a user's limit (429) is its own row, `(429) <name>`, not a failure; the
simulated user then waits `Retry-After` (at most 5 s), as OpenAI's SDKs do.
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

from locust import HttpUser, between, events, task

MODEL = os.environ.get("LOAD_MODEL") or None
SAMPLE_LEN = int(os.environ.get("LOAD_SAMPLE_LEN", "64"))
PROMPT = os.environ.get("LOAD_PROMPT", "Tell me a short story about a lighthouse keeper.")


def api_keys() -> list[str]:
    if path := os.environ.get("LOAD_KEYS"):
        keys = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
        if not keys:
            raise SystemExit(f"LOAD_KEYS: no key in {path}")
        return keys
    return [key] if (key := os.environ.get("LOAD_API_KEY")) else []


KEYS = api_keys()
NEXT_KEY = itertools.count()
MAX_RETRY_WAIT_S = 5.0


def record(name: str, seconds: float, length: int = 0, exception: Exception | None = None) -> None:
    events.request.fire(
        request_type="STREAM",
        name=name,
        response_time=seconds * 1000,
        response_length=length,
        exception=exception,
        context={},
    )


class ChatUser(HttpUser):
    wait_time = between(0.5, 2)

    def on_start(self) -> None:
        if KEYS:
            self.client.headers["Authorization"] = f"Bearer {KEYS[next(NEXT_KEY) % len(KEYS)]}"
        self.conversation_id = self.client.get("/conversations/start", name="/conversations/start").json()

    @task
    def ask(self) -> None:
        body = {"prompt": PROMPT, "sample_len": SAMPLE_LEN, "model": MODEL}
        sent = time.perf_counter()
        with self.client.post(
            f"/conversations/{self.conversation_id}/generate",
            json=body,
            stream=True,
            name="/conversations/[id]/generate",
            catch_response=True,
        ) as response:
            if response.status_code == 429:  # a limit of this user's, not a failure of the service
                response.request_meta["name"] = f"(429) {response.request_meta['name']}"
                response.success()
                # Waits as OpenAI's SDKs do, at most MAX_RETRY_WAIT_S: a run's end must not wait a minute.
                time.sleep(min(float(response.headers.get("Retry-After", "1")), MAX_RETRY_WAIT_S))
                return
            if response.status_code != 200:
                response.failure(f"{response.status_code}: {response.text[:200]}")
                return
            previous, total = None, 0
            for chunk in response.iter_content(chunk_size=None):
                now = time.perf_counter()
                if previous is None:
                    record("TTFT", now - sent, len(chunk))
                else:
                    record("ITL", now - previous, len(chunk))
                previous, total = now, total + len(chunk)
            if total == 0:
                response.failure("empty answer")
            else:
                response.success()
