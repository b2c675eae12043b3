"""What structured outputs and logprobs cost users: closed-loop streams of chat completions
through HTTP, the service as `make serve` runs it, the original API's sampling (temperature 0.7,
top_p 0.9, repetition penalty 1.1), in one run:

- plain: every stream free text;
- constrained: every stream held to a typical schema (`response_format` json_schema: a person
  with a nested address, an enum, an integer, a boolean and a list);
- logprobs: every stream with `logprobs` and `top_logprobs` 5;
- mixed: half the streams plain, half constrained, side by side: the plain half's tokens/s per
  stream against the plain run's.

Rounds alternate the runs (machines are noisy); printed: tokens/s of each run and the ratios
the issue asks for, per round and over all rounds.

`--engine`: the same runs on the engine alone (the packaged model's `BatchedEngine`, int4, 2
torch threads), without HTTP's noise: 16 rows of 128 tokens, EOS ignored, constrained rows held
to a list that cannot end within them (so every row runs every step); per-stream tokens/s.

    .venv/bin/python -m bench.structured_bench [--model packaged|tiny] [--users 16] [--duration 30] [--rounds 2] [--engine]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import time

import torch

from bench.engine_bench import ORIGINAL_DEFAULTS, STORY, chat_prompt, fixed_length, served_model
from bench.load_bench import MODEL_NAME, model_config
from bench.machine import cpu_name
from deployments.engine.batched import BatchedEngine
from deployments.engine.sampling_params import Constraint
from deployments.engine.torch_threads import run_in_fresh_thread
from deployments.model_loader import load_model
from loadtests.service import free_port, running_service
from loadtests.users import Answer, Users, Workload

SHORT = {"type": "string", "maxLength": 40}
PERSON = {
    "type": "object",
    "properties": {
        "name": SHORT,
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "active": {"type": "boolean"},
        "address": {
            "type": "object",
            "properties": {"city": SHORT, "zip_code": {"type": "string", "maxLength": 10}},
            "required": ["city", "zip_code"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": SHORT, "maxItems": 5},
    },
    "required": ["name", "age", "role", "active", "address", "tags"],
    "additionalProperties": False,
}
PROMPT = "Describe a fictional person: name, age, role, whether active, address and a few tags, as JSON."
EXTRAS = {
    "plain": {},
    "constrained": {"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}},
    "logprobs": {"logprobs": True, "top_logprobs": 5},
}


def tokens_per_s(answers: list[Answer]) -> float:
    """Tokens over the time from the first request to the last answer's end: a closed loop's
    answers under way at the window's end are finished and counted, so the window alone would
    count whole waves of answers (16 streams of 128 tokens: 8 or 9 in 30 s, a 12% step)."""
    return sum(a.tokens for a in answers if a.ok) / (max(a.ended for a in answers) - min(a.sent for a in answers))


async def measure(url: str, kinds: list[str], users: int, seconds: float, max_tokens: int) -> list[list[Answer]]:
    """`users` streams split evenly over `kinds`, all at once; each kind's answers."""
    groups = [Users(url, Workload("chat", MODEL_NAME, max_tokens, PROMPT, EXTRAS[kind])) for kind in kinds]
    results = await asyncio.gather(*(g.run(users // len(kinds), seconds) for g in groups))
    for kind, answers in zip(kinds, results):
        failed = [a for a in answers if not a.ok]
        if failed:
            raise RuntimeError(f"{len(failed)} {kind} requests failed: {failed[0].error}")
    return results


# A list longer than the engine runs' answers: a constrained row decodes every step, as a plain one does.
ENDLESS = {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 200}


async def engine_rates(engine: BatchedEngine, prompt_ids: list[int], kinds: list[str], tokens: int) -> dict[str, float]:
    """One stream of each of `kinds` at once on `engine`; each kind's mean tokens/s per stream
    after its first token."""
    base = fixed_length(tokens, ORIGINAL_DEFAULTS)
    asked = {
        "plain": {},
        "constrained": {"constraint": Constraint(json_schema=json.dumps(ENDLESS), field="response_format")},
        "logprobs": {"logprobs": 5},
    }
    rates: dict[str, list[float]] = {kind: [] for kind in kinds}

    async def one(index: int, kind: str) -> None:
        params = dataclasses.replace(base, seed=index, **asked[kind])
        first = 0.0
        async for _ in engine.generate(prompt_ids, params):
            first = first or time.perf_counter()
        rates[kind].append((tokens - 1) / (time.perf_counter() - first))

    await asyncio.gather(*(one(index, kind) for index, kind in enumerate(kinds)))
    return {kind: sum(values) / len(values) for kind, values in rates.items()}


async def engine_rounds(rounds: int, streams: int, tokens: int) -> None:
    torch.set_num_threads(2)
    loaded = run_in_fresh_thread(load_model, served_model())
    prompt_ids = chat_prompt(loaded, STORY)
    engine = BatchedEngine(loaded, weights="int4", max_batch_size=streams, max_context=len(prompt_ids) + tokens + 8)
    print(f"engine alone, packaged model int4, {streams} rows of {tokens} tokens; CPU: {cpu_name()}")
    for kind in ("plain", "constrained"):  # warm-up: a grammar compiled, the kernels loaded
        await engine_rates(engine, prompt_ids, [kind] * streams, 16)
    totals: dict[str, float] = {}
    for round_number in range(1, rounds + 1):
        rates = {"plain": (await engine_rates(engine, prompt_ids, ["plain"] * streams, tokens))["plain"]}
        mixed = await engine_rates(engine, prompt_ids, ["plain", "constrained"] * (streams // 2), tokens)
        rates["mixed: plain half"], rates["mixed: constrained half"] = mixed["plain"], mixed["constrained"]
        rates["constrained"] = (await engine_rates(engine, prompt_ids, ["constrained"] * streams, tokens))["constrained"]
        rates["logprobs"] = (await engine_rates(engine, prompt_ids, ["logprobs"] * streams, tokens))["logprobs"]
        for kind, rate in rates.items():
            totals[kind] = totals.get(kind, 0.0) + rate
        print(f"round {round_number}: " + ", ".join(f"{kind} {rate:.1f} tok/s a stream" for kind, rate in rates.items()))
        print(f"  {ratios(rates)}")
    print(f"all rounds: {ratios(totals)}")
    engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "packaged"], default="packaged")
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--engine", action="store_true", help="the engine alone, in this process")
    args = parser.parse_args()
    if args.engine:
        asyncio.run(engine_rounds(args.rounds, args.users, args.max_tokens))
        return
    print(f"{args.model} model, {args.users} streams of chat completions, {args.duration:.0f} s each; CPU: {cpu_name()}")
    totals: dict[str, float] = {}
    with running_service([model_config(args.model, "cpu")], free_port()) as service:
        for round_number in range(1, args.rounds + 1):
            rates = {}
            for kind in ("plain", "constrained", "logprobs"):
                asyncio.run(measure(service.url, [kind], args.users, args.warmup, args.max_tokens))
                [answers] = asyncio.run(measure(service.url, [kind], args.users, args.duration, args.max_tokens))
                rates[kind] = tokens_per_s(answers)
            asyncio.run(measure(service.url, ["plain", "constrained"], args.users, args.warmup, args.max_tokens))
            plain, constrained = asyncio.run(
                measure(service.url, ["plain", "constrained"], args.users, args.duration, args.max_tokens)
            )
            # Per stream: half the streams are plain here.
            rates["mixed: plain half"] = tokens_per_s(plain) * 2
            rates["mixed: constrained half"] = tokens_per_s(constrained) * 2
            for kind, rate in rates.items():
                totals[kind] = totals.get(kind, 0.0) + rate
            print(f"round {round_number}: " + ", ".join(f"{kind} {rate:.0f} tok/s" for kind, rate in rates.items()))
            print(f"  {ratios(rates)}")
    print(f"all rounds: {ratios(totals)}")


def ratios(rates: dict[str, float]) -> str:
    plain = rates["plain"]
    return (
        f"constrained / plain {rates['constrained'] / plain:.2f} (target >= 0.85), "
        f"logprobs / plain {rates['logprobs'] / plain:.2f} (>= 0.9), "
        f"plain streams beside constrained ones / plain {rates['mixed: plain half'] / plain:.2f} (>= 0.95)"
    )


if __name__ == "__main__":
    main()
