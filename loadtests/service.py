"""The service as `make serve` starts it (its launcher, serve.env's environment), on a port and
with models of the caller's, for benchmarks and tests that load it from outside."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 600.0


class ServiceFailed(RuntimeError):
    pass


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out for `bind(0)` and outgoing connections."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; macOS's range starts higher still


# Handed out by `free_port` in this process, so two calls never give the same port.
_given: set[int] = set()


def free_port() -> int:
    """A port free on every interface, below the kernel's ephemeral range and above Ray's worker
    ports (10002-19999): a port from `bind(0)` could be taken by one of Ray's many connections
    before the service bound it (seen in CI: HAProxy's metrics port "Address already in use")."""
    candidates = [port for port in range(20000, max(_ephemeral_low(), 20001)) if port not in _given]
    for port in random.sample(candidates, min(len(candidates), 200)):
        with socket.socket() as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
        _given.add(port)
        return port
    with socket.socket() as sock:  # no such range here: the kernel's choice
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def own_ports() -> dict[str, str]:
    """Ports of its own for a service's HAProxy front, where another runs on the machine: its
    stats page and metrics (8404, 9101 on every interface), and the Python proxy that it falls
    back to when no ingress replica is up (8500, 9500). Two services sharing the fallback answer
    each other's requests: one's HAProxy reaches the other's app whenever its own replica is
    restarting (seen in tests: a conversation just created was "not found")."""
    names = (
        "RAY_SERVE_HAPROXY_STATS_PORT",
        "RAY_SERVE_HAPROXY_METRICS_PORT",
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
    )
    return {name: str(free_port()) for name in names}


def serve_env() -> dict[str, str]:
    """The settings of `serve.env`, the environment `make serve` starts Ray and Serve in."""
    settings = {}
    for line in (REPO_ROOT / "serve.env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, value = line.split("=", 1)
            settings[name.strip()] = value.strip()
    return settings


def serve_environment(front: str | None = None, **extra: str) -> dict[str, str]:
    """The environment `make serve` starts the service in (serve.env over this process's), with
    the front asked for ("haproxy" or "python"; None: serve.env's) and `extra` on top."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | serve_env()
    if front is not None:
        env["RAY_SERVE_ENABLE_HA_PROXY"] = "1" if front == "haproxy" else "0"
    # Ray's workers import this repository's packages, whichever checkout runs the benchmark; what
    # PYTHONPATH held stays behind it (Ray itself, where it was installed with `pip --target`).
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env | extra


@dataclass
class RunningService:
    url: str
    launcher: subprocess.Popen
    directory: Path

    @property
    def database(self) -> Path:
        return self.directory / "history.sqlite3"


@contextlib.contextmanager
def running_service(
    models: list[dict], port: int, front: str | None = None, app_args: dict | None = None, env: dict[str, str] | None = None
) -> Iterator[RunningService]:
    """The service with `models` on `port`, started by `make serve`'s launcher in a directory of
    its own (its config, log and history database) and on ports of its own (`own_ports`);
    stopped as Ctrl-C stops it."""
    directory = Path(tempfile.mkdtemp(prefix="ray-chat-load-"))
    args = {"database_path": str(directory / "history.sqlite3"), "models": models, **(app_args or {})}
    config = write_serve_config(directory, port, args)
    log = directory / "serve.log"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "serve_app.launcher", str(config)],
        cwd=REPO_ROOT,
        env=serve_environment(front, **own_ports(), **(env or {})),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    service = RunningService(f"http://127.0.0.1:{port}", launcher, directory)
    try:
        wait_ready(service.url, launcher, log)
        yield service
    finally:
        launcher.send_signal(signal.SIGINT)
        launcher.wait(timeout=120)


def new_user_key(database: Path, name: str) -> str:
    """A user made by `make user`'s CLI in the service's `database` (`auth: users`); its key."""
    done = subprocess.run(
        [sys.executable, "-m", "serve_app.users", "--database", str(database), "add", name],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip().splitlines()[-1]


def write_serve_config(directory: Path, port: int, app_args: dict) -> Path:
    """`directory`/serve_config.yaml: the chat app alone on 127.0.0.1:`port`, built with `app_args`."""
    config = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{"name": "chat", "route_prefix": "/", "import_path": "serve_app.app:build_app", "args": app_args}],
    }
    path = directory / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def wait_ready(url: str, process: subprocess.Popen, log: Path, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Returns once `url`/readyz answers 200; `ServiceFailed` with the log's end if `process`
    (what started the service) exits first or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServiceFailed(f"the service exited while starting:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise ServiceFailed(f"the service was not ready after {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")
