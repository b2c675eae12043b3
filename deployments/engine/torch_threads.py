"""Keeping torch's CPU work on one long-lived thread per process.

torch's CPU kernels run on OpenMP (libgomp), and libgomp keeps one pool of worker threads for
every OS thread that has run a parallel op. Its workers spin-wait between ops only while the
process has no more pool threads than CPUs; past that they sleep, and waking them costs time on
every op. A decode step is many small ops, so once a second thread has touched torch (the
replica thread that loaded the model, the benchmark's main thread) every step got much slower
(docs/engine.md#threads). A thread's pool is freed when the thread exits, so one-off torch work
(loading the model, converting weights) runs in a short-lived thread, and the engine's own thread
is the only one left holding a pool.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def run_in_fresh_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """`fn(*args, **kwargs)` on a new thread that exits afterwards (taking its OpenMP pool
    with it); returns its result or raises its exception. Blocks the caller meanwhile."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["result"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name=f"torch-{getattr(fn, '__name__', 'work')}")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["result"]  # type: ignore[return-value]
