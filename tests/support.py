"""Helpers shared by the test suite and the benchmarks: the application as serve_config.yaml
configures it, started in-process by `ServeApp`, free ports, and reading the app's metrics."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from loadtests.service import free_port, own_ports, serve_env, wait_ready, write_serve_config  # noqa: F401 - the tests' helpers too

REPO_ROOT = Path(__file__).resolve().parent.parent
APP_NAME = "chat"
# The schema of the release before users (50e4974): conversations without an owner.
RELEASED_SCHEMA = """
CREATE TABLE conversations (
    id INTEGER PRIMARY KEY AUTOINCREMENT, title TEXT, created_at TEXT NOT NULL, updated_at TEXT NOT NULL
);
CREATE TABLE messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')), content TEXT NOT NULL, model TEXT,
    parameters TEXT, status TEXT NOT NULL DEFAULT 'complete' CHECK (status IN ('complete', 'stopped', 'failed')),
    error TEXT, prompt_tokens INTEGER, completion_tokens INTEGER, created_at TEXT NOT NULL
);
CREATE INDEX messages_by_conversation ON messages (conversation_id, id);
"""
# A timestamp as the history store writes them.
NOW = "2026-12-01T10:00:00.000000+00:00"
STARTUP_TIMEOUT_S = 600  # the first run converts the packaged GGUF (~20-40 s) on a busy 2-core box


def use_serve_environment() -> None:
    """Puts `serve.env` (the environment `make serve` starts Ray in) into this process's
    environment, where not set already, so a Ray started here runs Serve as users get it."""
    for name, value in serve_env().items():
        os.environ.setdefault(name, value)


def config_app_args() -> dict:
    """The `args` of the application in serve_config.yaml, exactly as users run it."""
    config = yaml.safe_load((REPO_ROOT / "serve_config.yaml").read_text())
    (app,) = [a for a in config["applications"] if a["name"] == APP_NAME]
    return copy.deepcopy(app["args"])


@dataclass
class ServeApp:
    url: str
    database_path: Path
    args: dict

    def deploy(self) -> None:
        from ray import serve

        from serve_app.app import build_app

        serve.run(build_app(self.args), name=APP_NAME, route_prefix="/")
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=10).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"the Serve app did not become ready within {STARTUP_TIMEOUT_S} s")

    def restart(self) -> None:
        """Deletes the application (every replica, the history owner included) and deploys it
        again on the same database file."""
        from ray import serve

        serve.delete(APP_NAME)
        self.deploy()


def prompt_tokens_reused(client: httpx.Client, model: str) -> float:
    """Prompt tokens `model`'s replicas took from their prefix caches so far (`/metrics`)."""
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f'chat_prompt_tokens_reused{{model="{model}"}}'):
            return float(line.split()[-1])
    return 0.0


def metric_by_replica(client: httpx.Client, name: str, **labels: str) -> dict[str, float]:
    """`name`'s series with these labels (`/metrics`), summed per ingress replica (label `replica`)."""
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                replica = sample.labels.get("replica", "")
                values[replica] = values.get(replica, 0.0) + sample.value
    return values


def users_cli(database, *args: str) -> str:
    """`make user`'s CLI; its last line (the key, where it prints one)."""
    done = subprocess.run(
        [sys.executable, "-m", "serve_app.users", "--database", str(database), *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip().splitlines()[-1]
