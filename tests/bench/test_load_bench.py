"""The load benchmark's engine-alone process: one model load for every run it is asked for."""

from __future__ import annotations

from bench.load_bench import EngineAlone, model_config


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
