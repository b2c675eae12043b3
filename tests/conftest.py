"""Shared fixtures. `serve_app` starts the real application (real Ray, real Serve, real SQLite
file, the packaged SmolLM2 plus two tiny random models) from `serve_config.yaml`'s own args, on a
free port, once per test session, and always shuts it down."""

from __future__ import annotations

import copy
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

# Without a GPU, Triton kernels (the GPU attention) run in Triton's interpreter on the CPU. Set
# before anything imports torch: torch may import Triton, which reads this once.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
TEST_MODELS = [
    {"name": "tiny-random", "source": {"kind": "tiny_random"}, "num_cpus": 0.2, "torch_threads": 1},
    # One request at a time and one waiting: for backpressure tests.
    {
        "name": "tiny-narrow", "source": {"kind": "tiny_random"}, "num_cpus": 0.1, "torch_threads": 1,
        "max_ongoing_requests": 1, "max_queued_requests": 1,
    },
]
APP_NAME = "chat"
STARTUP_TIMEOUT_S = 600  # the first run converts the packaged GGUF (~20-40 s) on a busy 2-core box


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


@pytest.fixture(scope="session")
def serve_app(tmp_path_factory) -> ServeApp:
    import ray
    from ray import serve

    port = free_port()
    database_path = tmp_path_factory.mktemp("history") / "history.sqlite3"
    args = config_app_args()
    args["database_path"] = str(database_path)
    args["models"] += TEST_MODELS
    # A Ray instance of its own ("local"), even where `ray start` left a cluster (live or dead)
    # that ray.init() would otherwise join. No dashboard: it would clash with that cluster's.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = ServeApp(url=f"http://127.0.0.1:{port}", database_path=database_path, args=args)
    try:
        app.deploy()
        yield app
    finally:
        serve.shutdown()
        ray.shutdown()
