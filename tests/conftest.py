"""Shared fixtures. `serve_app` starts the real application (real Ray, real Serve, real SQLite
file, the packaged SmolLM2 plus two tiny random models) from `serve_config.yaml`'s own args, on a
free port, once per test session, and always shuts it down."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

import pytest

from tests.support import ServeApp, config_app_args, free_port, own_ports, use_serve_environment

# Before anything starts Ray: Serve then runs as `make serve` runs it, its HAProxy front on ports
# of its own (other tests start services of their own beside it; see `own_ports`).
use_serve_environment()
os.environ.update(own_ports())

# Without a GPU, Triton kernels (the GPU attention) run in Triton's interpreter on the CPU. Set
# before anything imports torch: torch may import Triton, which reads this once.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

TEST_MODELS = [
    {"name": "tiny-random", "source": {"kind": "tiny_random"}, "num_cpus": 0.2, "torch_threads": 1},
    # One request at a time and one waiting: for backpressure tests.
    {
        "name": "tiny-narrow",
        "source": {"kind": "tiny_random"},
        "num_cpus": 0.1,
        "torch_threads": 1,
        "max_ongoing_requests": 1,
        "max_queued_requests": 1,
    },
]


@pytest.fixture(scope="session")
def serve_app(tmp_path_factory) -> ServeApp:
    import ray
    from ray import serve

    port = free_port()
    database_path = tmp_path_factory.mktemp("history") / "history.sqlite3"
    args = config_app_args()
    args["database_path"] = str(database_path)
    args["models"] += TEST_MODELS
    # Two ingress replicas, as a busy service runs: every test then goes through either, and
    # what they must agree on (one answer at a time per conversation, /metrics) is exercised.
    # The models above leave 0.1 of the 2 CPUs Ray is given.
    args["ingress_num_replicas"], args["ingress_num_cpus"] = 2, 0.05
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


@pytest.fixture
def report(request) -> Callable[[str], None]:
    """Writes a test's measured counts (recovery time, turns kept, requests refused) into the
    run's output past pytest's capture, so every CI log carries them."""
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")

    def write(line: str) -> None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"[{request.node.name}] {line}")

    return write
