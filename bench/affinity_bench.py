"""Conversation-affine routing, measured through HTTP (`make bench-affinity`, ~5 min here).

The packaged model is served twice by the real Serve app, each with two replicas: once with
conversation affinity (`deployments/affinity_router.py`), once with Serve's default router.
Against each in turn, 8 conversations run concurrently for 5 turns with the original API's
default sampling; printed per router: the time to first token of turn 5 (the longest history)
and the prompt tokens the replicas took from their prefix caches instead of computing them.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import httpx

from bench.engine_bench import ORIGINAL_DEFAULTS, percentile
from tests.support import config_app_args, free_port, prompt_tokens_reused

ROUTERS = {"affinity": True, "default": False}
QUESTIONS = [
    "Tell me about the history of {topic}.",
    "What are the most important facts about {topic}?",
    "How does {topic} affect people today?",
    "What do experts disagree about regarding {topic}?",
    "Summarise everything you said about {topic} in three points.",
]
TOPICS = ["the sea", "volcanoes", "bread", "bicycles", "the moon", "chess", "rivers", "music"]


def served_models(replicas: int) -> list[dict]:
    (packaged,) = config_app_args()["models"]
    return [
        {
            **packaged,
            "name": f"smollm2-{router}",
            "aliases": [],
            "num_replicas": replicas,
            # The 2 CPUs less the ingress's and the history's 0.1 each, shared by every replica.
            "num_cpus": 1.8 / (len(ROUTERS) * replicas),
            "torch_threads": 1,
            "conversation_affinity": affine,
        }
        for router, affine in ROUTERS.items()
    ]


async def conversation(http: httpx.AsyncClient, model: str, topic: str, sample_len: int) -> float:
    """Runs every turn; returns the last turn's time to first token."""
    conversation_id = (await http.get("/conversations/start")).json()
    for question in QUESTIONS:
        body = {"prompt": question.format(topic=topic), "model": model, "sample_len": sample_len, **ORIGINAL_DEFAULTS}
        sent = time.perf_counter()
        async with http.stream("POST", f"/conversations/{conversation_id}/generate", json=body) as response:
            response.raise_for_status()
            chunks = response.aiter_raw()
            await anext(chunks)
            ttft = time.perf_counter() - sent
            async for _ in chunks:
                pass
    return ttft


async def measure(url: str, model: str, sample_len: int) -> tuple[list[float], float]:
    with httpx.Client(base_url=url, timeout=60) as http:
        before = prompt_tokens_reused(http, model)
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        ttfts = await asyncio.gather(*(conversation(http, model, topic, sample_len) for topic in TOPICS))
    with httpx.Client(base_url=url, timeout=60) as http:
        return list(ttfts), prompt_tokens_reused(http, model) - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--sample-len", type=int, default=32)
    args = parser.parse_args()

    import ray
    from ray import serve

    from serve_app.app import build_app

    port = free_port()
    app_args = {**config_app_args(), "database_path": "/tmp/affinity-bench.sqlite3", "models": served_models(args.replicas)}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(app_args), name="chat", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    while httpx.get(f"{url}/readyz", timeout=10).status_code != 200:
        time.sleep(1)
    try:
        results = {router: asyncio.run(measure(url, f"smollm2-{router}", args.sample_len)) for router in ROUTERS}
    finally:
        serve.shutdown()
        ray.shutdown()

    print(
        f"{len(TOPICS)} concurrent conversations x {len(QUESTIONS)} turns, {args.replicas} replicas, "
        f"{args.sample_len} new tokens a turn, the original API's default sampling"
    )
    print(f"{'router':<10} {'turn 5 TTFT median':>19} {'p95':>8} {'prompt tokens reused':>21}")
    for router, (ttfts, reused) in results.items():
        print(f"{router:<10} {statistics.median(ttfts):>18.2f}s {percentile(ttfts, 95):>7.2f}s {reused:>21,.0f}")
    (affine, _), (default, _) = results["affinity"], results["default"]
    print(f"turn 5 TTFT median, default / affinity: {statistics.median(default) / statistics.median(affine):.2f}x")


if __name__ == "__main__":
    main()
