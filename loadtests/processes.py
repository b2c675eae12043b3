"""The processes of a running service, by kind, and what each kind spends: CPU seconds and
resident memory, read from /proc (psutil) for every process under the one that started the
service (`serve run`, or the launcher of `make serve`).

A Ray worker names itself after the actor it holds (`ray::ServeReplica:chat:Ingress`), so a
process's kind is read off its command line. Kinds:

    front       what takes the HTTP connections: Serve's proxy actor, or HAProxy and its manager
    ingress     the ingress deployment's replicas
    model       the model deployments' replicas
    history     the history deployment's replica
    controller  Serve's controller
    ray         everything else: GCS, raylet, dashboard, log monitor, idle workers, `serve run`
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import psutil

KINDS = ("front", "ingress", "model", "history", "controller", "ray")

_KIND_PATTERNS = (
    ("front", re.compile(r"^(ray::ProxyActor|ray::HAProxyManager|.*/haproxy\b)")),
    ("ingress", re.compile(r"^ray::ServeReplica:[^:]+:Ingress\b")),
    ("model", re.compile(r"^ray::ServeReplica:[^:]+:LLM-")),
    ("history", re.compile(r"^ray::ServeReplica:[^:]+:HistoryDeployment\b")),
    ("controller", re.compile(r"^ray::ServeController\b")),
)


def kind_of(command: str) -> str:
    for kind, pattern in _KIND_PATTERNS:
        if pattern.match(command):
            return kind
    return "ray"


@dataclass(frozen=True)
class ProcessSample:
    pid: int
    kind: str
    name: str  # the first word of its command line (the actor's name for a Ray worker)
    cpu_s: float  # user + system since it started
    rss_bytes: int


def sample_tree(root_pid: int) -> list[ProcessSample]:
    """Every live process under `root_pid` (itself included), with its CPU time and RSS."""
    try:
        root = psutil.Process(root_pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    samples = []
    for process in processes:
        try:
            with process.oneshot():
                command = " ".join(process.cmdline()) or process.name()
                times = process.cpu_times()
                rss = process.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        samples.append(ProcessSample(process.pid, kind_of(command), command.split()[0], times.user + times.system, rss))
    return samples


def own_cpu_s() -> float:
    """This process's CPU seconds (the load generator's own cost)."""
    times = os.times()
    return times.user + times.system


def cpu_by_kind(before: list[ProcessSample], after: list[ProcessSample]) -> dict[str, float]:
    """CPU seconds each kind spent between two samples of the same tree. A process that started
    in between counts from zero; one that ended in between is lost (its last seconds unknown)."""
    started = {sample.pid: sample.cpu_s for sample in before}
    spent: dict[str, float] = defaultdict(float)
    for sample in after:
        spent[sample.kind] += sample.cpu_s - started.get(sample.pid, 0.0)
    return {kind: spent.get(kind, 0.0) for kind in KINDS}


@contextlib.contextmanager
def frozen(root_pid: int) -> Iterator[None]:
    """Every process under `root_pid` (itself included) stopped (SIGSTOP) meanwhile, and all of
    them continued together afterwards, whatever happens in between. A benchmark measures
    something else on the same machine with none of the tree's work beside it, and the tree keeps
    its state for the next run: Ray's and Serve's timers (health checks, heartbeats) stand still
    with the processes that keep them."""
    stopped: list[int] = []
    try:
        for sample in sample_tree(root_pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(sample.pid, signal.SIGSTOP)
                stopped.append(sample.pid)
        _wait_stopped(stopped)
        yield
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def unwind_on_sigterm() -> None:
    """A SIGTERM (a timeout, a kill) ends this process the way Ctrl-C does, through every
    `finally` on the way out: a benchmark stopped while it holds a service `frozen` continues
    it and stops it, rather than leave it stopped, holding its ports, for good."""

    def exit_(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, exit_)


def _wait_stopped(pids: list[int], timeout_s: float = 2.0) -> None:
    """Until every one of `pids` has stopped: a signal is delivered when its process next runs."""
    deadline = time.monotonic() + timeout_s
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            process = psutil.Process(pid)
            while process.status() not in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE) and time.monotonic() < deadline:
                time.sleep(0.001)
