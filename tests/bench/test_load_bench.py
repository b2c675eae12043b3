"""The load benchmark: its engine-alone process (one model load for every run it is asked for) and
its CPU report, with the idle service's share taken out."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

from bench import load_bench
from bench.load_bench import EngineAlone, cpu_lines, model_config
from loadtests.processes import KINDS
from loadtests.users import Window


def test_the_engine_alone_process_answers_each_run_asked_of_it_with_one_model():
    spec = {"model": model_config("tiny", "cpu"), "max_tokens": 16, "warmup": 0.2, "duration": 1.0}
    engine = EngineAlone(spec)
    try:
        engine.wait_ready()
        pid = engine.process.pid
        (one, one_cpu_s), (three, _) = engine.run("completions", 1), engine.run("original", 3)
        assert one.tokens > 0 and three.tokens > 0 and not one.errors and not three.errors
        assert three.requests > one.requests  # three closed-loop users ask more than one
        assert one.seconds == three.seconds == 1.0 and 0 < one_cpu_s < 2.5  # two threads at most
        assert engine.process.pid == pid and engine.process.poll() is None
    finally:
        engine.close()
    assert engine.process.returncode == 0


def test_cpu_lines_take_the_idle_services_rates_over_the_windows_seconds_out():
    window = Window(seconds=20.0, tokens=200_000, requests=800, errors=[], ttft_s=[], gaps_s=[], chunks=4000)
    cpu = {kind: 0.0 for kind in KINDS} | {"ingress": 2.0, "model": 10.0, "controller": 0.5, "client": 1.0}
    idle = {kind: 0.0 for kind in KINDS} | {"ingress": 0.01, "model": 0.2, "controller": 0.02}
    rows = {line[:27].strip(): line[27:].split() for line in cpu_lines(cpu, window, idle)[1:]}
    columns = [*KINDS, "client", "not model"]
    per_1000 = dict(zip(columns, map(float, rows["per 1,000 tok"]), strict=True))
    above = dict(zip(columns, map(float, rows["per 1,000 tok above idle"]), strict=True))
    assert per_1000["ingress"] == 10.0 and per_1000["not model"] == 12.5  # 2.5 s of CPU over 200 x 1,000 tokens
    assert above["ingress"] == 9.0 and above["controller"] == 0.5 and above["model"] == 30.0  # less 20 s at idle's rate
    assert above["not model"] == 9.5 and above["client"] == per_1000["client"] == 5.0
    assert float(rows["per request above idle"][KINDS.index("ingress")]) == 2.25  # (2.0 - 0.2) s / 800 x 1,000 ms
    assert not any("above idle" in line for line in cpu_lines(cpu, window))


def test_idle_cpu_reads_each_kinds_rate_off_the_tree(monkeypatch):
    monkeypatch.setattr(load_bench, "IDLE_SETTLE_S", 0.0)
    spinning = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    sleeping = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.5)  # both started
        spin = asyncio.run(load_bench.idle_cpu(spinning.pid, 1.5))
        sleep = asyncio.run(load_bench.idle_cpu(sleeping.pid, 1.5))
    finally:
        for process in (spinning, sleeping):
            process.kill()
            process.wait()
    assert 0.6 < spin["ray"] <= 1.05 and sum(spin.values()) == spin["ray"]  # a plain process counts as Ray's own
    assert sleep["ray"] < 0.05
    assert "not model 1" not in load_bench.idle_line(sleep) and f"ray {spin['ray'] * 1e3:.1f}" in load_bench.idle_line(spin)
