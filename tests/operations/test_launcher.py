"""`make serve`'s launcher (`serve_app/launcher.py`) stopped the usual ways: Ctrl-C in its
terminal (SIGINT to the foreground process group) and SIGTERM to its process group (a service
manager's stop). Either way, once it has exited, no process it started is left and the ports
it served on can be bound again, the HAProxy front's included: a haproxy orphaned by Ray's
actors otherwise keeps the HTTP port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.support import REPO_ROOT, free_port, own_ports, wait_ready, write_serve_config

pytestmark = pytest.mark.slow

MODEL = {"name": "tiny-random", "source": {"kind": "tiny_random"}, "num_cpus": 0.2, "torch_threads": 1}


def session_processes(session: int) -> list[str]:
    left = []
    for process in psutil.process_iter(["pid", "name"]):
        try:
            if os.getsid(process.pid) == session:
                left.append(f"{process.pid} {process.info['name']}")
        except (ProcessLookupError, PermissionError):
            pass
    return left


def can_bind(port: int) -> bool:
    """As a server starting again binds it: SO_REUSEADDR, so the connections the service closed
    (TIME_WAIT) do not count, and a socket still listening does."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm to the process group"])
def test_stopping_the_launcher_leaves_no_process_and_no_bound_port(tmp_path: Path, how: str, report):
    port, ports = free_port(), own_ports()
    stats_port, metrics_port = int(ports["RAY_SERVE_HAPROXY_STATS_PORT"]), int(ports["RAY_SERVE_HAPROXY_METRICS_PORT"])
    config = write_serve_config(tmp_path, port, {"database_path": str(tmp_path / "history.sqlite3"), "models": [MODEL]})
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"RAY_SERVE_ENABLE_HA_PROXY": "1", **ports}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "serve_app.launcher", str(config)],
        cwd=REPO_ROOT,
        env=env,
        start_new_session=True,
        stdout=(tmp_path / "serve.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}", launcher, tmp_path / "serve.log", timeout_s=300)
        assert any("haproxy" in name for name in session_processes(launcher.pid))  # the front is HAProxy
        started = time.monotonic()
        os.killpg(launcher.pid, signal.SIGINT if how == "ctrl-c" else signal.SIGTERM)
        launcher.wait(timeout=120)
        report(f"{how}: the launcher exited {time.monotonic() - started:.1f} s after the signal")
        time.sleep(1)  # the kernel reaps the last of them
        assert session_processes(launcher.pid) == []
        assert can_bind(port) and can_bind(stats_port) and can_bind(metrics_port)
    finally:
        for process in psutil.process_iter():
            try:
                if os.getsid(process.pid) == launcher.pid:
                    process.kill()
            except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
                pass
