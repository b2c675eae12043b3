"""`make serve`: runs `serve run --address local CONFIG` so that stopping it in any usual way
(Ctrl-C, SIGTERM, SIGHUP when the terminal closes) stops it within seconds and leaves no process
and no bound port behind.

Ray starts each actor in a process group of its own, and Serve's HAProxy front is a child of one
of them (its manager). A SIGTERM to `serve run`'s process group ends Ray's GCS and raylet, the
actors die with them, and the orphaned haproxy keeps the HTTP port, so the next start fails with
"Failed to bind to address". Here the launcher is a child subreaper (Linux prctl): what is
orphaned below it is re-parented to it, not to init. Any of those signals becomes one SIGINT to
`serve run`, which Serve handles as Ctrl-C; after `STOP_GRACE_S`, or at once when `serve run` has
exited, every process still below the launcher is ended. Serve's own shutdown would wait for
the ingress replica to "drain" (Serve's RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S, which
keeps a replica reachable while load balancers deregister it during an upgrade), and then for its
controller (docs/performance.md). What is stored is committed already (SQLite, WAL,
synchronous=FULL); the answers still streaming end, as they would at the end of Serve's wait.

    python -m serve_app.launcher serve_config.yaml
"""

from __future__ import annotations

import ctypes
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
STOP_GRACE_S = 5.0
KILL_TIMEOUT_S = 2.0
POLL_S = 0.25


def become_subreaper() -> bool:
    """Orphans below this process become its children (Linux 3.4+); False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def end_descendants(timeout_s: float = KILL_TIMEOUT_S) -> list[str]:
    """SIGTERM to every process still below this one, SIGKILL to those alive `timeout_s` later
    (Ray's GCS, raylet and workers take longer over SIGTERM); returns the names of the ones
    that were left (reaped here)."""
    left = psutil.Process().children(recursive=True)
    names = []
    for process in left:
        try:
            names.append(process.name())
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(left, timeout=timeout_s)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout_s)
    return names


def serve_command() -> str:
    """Serve's CLI: the one installed beside this interpreter (the virtual environment's), else
    the first on PATH (Ray installed with `pip --target`, as on the GPU machines: bench/gpu_check.sh)."""
    beside = Path(sys.executable).with_name("serve")
    found = str(beside) if beside.is_file() else shutil.which("serve")
    if found is None:
        raise SystemExit(f"Serve's `serve` command is neither beside {sys.executable} nor on PATH: install ray[serve]")
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    serve = serve_command()
    become_subreaper()
    # Its own process group: a terminal's Ctrl-C reaches the launcher only, which passes it on
    # once (two SIGINTs would cut Serve's graceful shutdown short).
    service = subprocess.Popen([serve, "run", "--address", "local", argv[0]], process_group=0)
    stop_by: float | None = None  # once asked to stop: when the rest is ended

    def stop(signum: int, _frame: object) -> None:
        nonlocal stop_by
        if stop_by is None:
            stop_by = time.monotonic() + STOP_GRACE_S
            service.send_signal(signal.SIGINT)
        else:  # asked again: no more waiting
            stop_by = time.monotonic()

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)
    # A plain sleep between polls: Popen.wait(timeout) polls every 50 ms, which costs CPU for as long
    # as the service runs; a signal's handler runs during the sleep all the same.
    while service.poll() is None and (stop_by is None or time.monotonic() < stop_by):
        time.sleep(POLL_S)
    left = end_descendants()
    service.wait()
    if left:
        print(f"stopped {len(left)} process(es) of Ray and Serve", file=sys.stderr)
    return 0 if stop_by is not None else service.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
