"""Locust load test for the chat service: each simulated user starts a conversation and asks
questions through the original streaming API, and we report, besides Locust's own request
stats, two latency series that matter for chat:

- `TTFT`: time from sending the request to the first streamed byte of the answer;
- `ITL`: inter-token latency, the gap between consecutive streamed chunks (one chunk is at most
  one decode step, so this is the per-token latency a reader sees).

Run against a running service (`make serve`), e.g. 16 users for one minute:

    .venv/bin/locust -f loadtests/locustfile.py --headless -u 16 -r 4 -t 60s --host http://127.0.0.1:8080

Settings via environment: LOAD_MODEL (model name, default: the server's default model),
LOAD_SAMPLE_LEN (tokens per answer, default 64), LOAD_PROMPT.
"""

from __future__ import annotations

import os
import time

from locust import HttpUser, between, events, task

MODEL = os.environ.get("LOAD_MODEL") or None
SAMPLE_LEN = int(os.environ.get("LOAD_SAMPLE_LEN", "64"))
PROMPT = os.environ.get("LOAD_PROMPT", "Tell me a short story about a lighthouse keeper.")


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
