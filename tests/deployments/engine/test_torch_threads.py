import threading

import pytest

from deployments.engine.torch_threads import run_in_fresh_thread


def test_runs_on_another_thread_that_has_exited_and_returns_the_result():
    seen = []

    def work(a, b=0):
        seen.append(threading.current_thread())
        return a + b

    assert run_in_fresh_thread(work, 2, b=3) == 5
    assert seen[0] is not threading.current_thread()
    assert not seen[0].is_alive()


def test_reraises_the_exception_in_the_caller():
    def fail():
        raise KeyError("missing")

    with pytest.raises(KeyError, match="missing"):
        run_in_fresh_thread(fail)
