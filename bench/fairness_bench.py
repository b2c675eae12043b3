"""Fairness between users (`auth: users`): the time to first token of one user's single stream on
an idle service, and again while another user floods it with many streams, in one run.

The service runs as `RAY_CHAT_AUTH=users make serve` runs it, with two users made by `make user`'s
CLI. "bob" sends one streamed request at a time, pausing a random 0 to --think-ms after each
answer as a person would; first alone, then while "alice" runs --flood closed-loop streams (no
pause), which wait `Retry-After` when refused (429), as OpenAI's SDKs do, from a process of
their own. Printed: bob's TTFT p50/p95 idle and under the flood, their ratio, and what alice got
(tokens/s, answers, 429s).

    .venv/bin/python -m bench.fairness_bench [--model packaged|tiny] [--flood 64]
        [--concurrent-streams 8|none] [--duration 30] [--think-ms 200]

Why bob pauses: with none he asks again the moment his last token arrives, which came at the end
of one of the engine's steps, so his next question always reaches it a few ms into the next step
and waits for nearly all of it (12 ms of a ~17 ms step under the flood, by timestamps on 2 cores);
a person's next question comes at any moment of a step. `--think-ms 0` measures the lock-step case.

--concurrent-streams sets `quotas.concurrent_streams` for everyone (`none`: no limit), to see
what the limit buys.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import time

from bench.load_bench import MODEL_NAME, model_config
from bench.machine import cpu_name
from loadtests.service import new_user_key, running_service
from loadtests.users import Answer, Users, Workload, percentile


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def ttft_line(label: str, answers: list[Answer]) -> tuple[str, float]:
    ttft = [t for a in answers if a.ok and (t := a.ttft_s) is not None]
    p50 = percentile(ttft, 50)
    failed = sum(not a.ok for a in answers)
    text = f"  bob {label:<12} TTFT p50 {p50 * 1e3:7.1f} ms, p95 {percentile(ttft, 95) * 1e3:7.1f} ms ({len(ttft)} answers"
    return text + (f", {failed} failed)" if failed else ")"), p50


def flood(url: str, key: str, workload: Workload, users: int, seconds: float, results: multiprocessing.Queue) -> None:
    """alice's streams, in a process of their own: in bob's event loop, handling them would
    delay the arrival times bob's TTFT is read from."""
    answers = asyncio.run(Users(url, workload, bearer(key)).run(users, seconds))
    results.put([(a.ended, a.ok, a.status, a.tokens) for a in answers])


async def measure(url: str, alice: str, bob: str, args: argparse.Namespace) -> None:
    workload = Workload("completions", MODEL_NAME, args.max_tokens)
    single = Users(url, workload, bearer(bob), think_s=args.think_ms / 1e3)
    await single.run(1, 3.0)  # warm-up: the first requests set up connections and caches
    idle = await single.run(1, args.duration)

    results: multiprocessing.Queue = multiprocessing.Queue()
    flooding = multiprocessing.Process(
        target=flood, args=(url, alice, workload, args.flood, args.duration + 2 * args.warmup, results)
    )
    flooding.start()
    await asyncio.sleep(args.warmup)
    started = time.perf_counter()
    loaded = await single.run(1, args.duration)
    ended = time.perf_counter()
    flooded = await asyncio.to_thread(results.get)
    flooding.join()

    idle_text, idle_p50 = ttft_line("idle", idle)
    loaded_text, loaded_p50 = ttft_line("under flood", loaded)
    print(idle_text)
    print(loaded_text)
    print(f"  ratio (under flood / idle, p50): {loaded_p50 / idle_p50:.2f}x")
    # perf_counter is the system's monotonic clock: the same in both processes.
    during = [(ok, status, tokens) for when, ok, status, tokens in flooded if started <= when < ended]
    served = sum(ok for ok, _, _ in during)
    limited = sum(status == 429 for _, status, _ in during)
    tokens = sum(tokens for ok, _, tokens in during if ok)
    print(
        f"  alice's {args.flood} streams in the same window: {tokens / (ended - started):.0f} tok/s, "
        f"{served} answers, {limited} refused with 429, {len(during) - served - limited} other failures"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "packaged"], default="packaged")
    parser.add_argument("--flood", type=int, default=64, help="alice's concurrent streams")
    parser.add_argument("--concurrent-streams", default="8", help="quotas.concurrent_streams, or none")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds bob asks, idle and under the flood")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of flood before bob asks")
    parser.add_argument("--think-ms", type=float, default=200.0, help="bob's longest pause after an answer")
    parser.add_argument("--port", type=int, default=8432)
    args = parser.parse_args()
    limit = None if args.concurrent_streams == "none" else int(args.concurrent_streams)
    print(
        f"{cpu_name()}, {os.cpu_count()} cores; model {args.model}; {args.max_tokens}-token answers, "
        f"original sampling; alice floods with {args.flood} streams; concurrent_streams {limit}; "
        f"bob pauses up to {args.think_ms:.0f} ms\n",
        flush=True,
    )
    app_args = {"quotas": {"concurrent_streams": limit}}
    with running_service([model_config(args.model, "cpu")], args.port, app_args=app_args, env={"RAY_CHAT_AUTH": "users"}) as app:
        alice, bob = new_user_key(app.database, "alice"), new_user_key(app.database, "bob")
        asyncio.run(measure(app.url, alice, bob, args))


if __name__ == "__main__":
    main()
