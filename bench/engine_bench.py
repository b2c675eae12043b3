"""Benchmarks the batched engine against transformers' `generate` and against the floor on the
real SmolLM2 in fp32, int8 and int4 weights, and checks that quantized weights keep the answers
right (perplexity on a fixed text, the greedy capital-of-France answer).

    .venv/bin/python bench/engine_bench.py [--quick] [--threads N] [--http http://127.0.0.1:8080]

The floor is the time of one pass over every weight matrix (each Linear and lm_head, one matmul
with a [batch, in_features] activation): a decode step cannot be faster, so tokens/s at the
floor is batch / that time. Every run generates exactly 128 (--quick: 32) new tokens (min = max,
EOS ignored). The machine may be shared: numbers are noisy; run once, read the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deployments.engine.batched import BatchedEngine  # noqa: E402
from deployments.engine.forward import Int4Linear, Int8Linear, PromptChunk, build_step, extract_weights, forward, rope_table  # noqa: E402
from deployments.engine.kv_cache import KVCache  # noqa: E402
from deployments.engine.sampling import SamplingParams  # noqa: E402
from deployments.engine.torch_threads import run_in_fresh_thread  # noqa: E402
from deployments.model_loader import LoadedModel, load_model  # noqa: E402
from deployments.model_registry import ModelConfig  # noqa: E402

QUESTION = "What is the capital of France?"
# A fixed text for the perplexity check: prose, a story, science, a recipe and code, ~475
# tokens. (A ~100-token text was too short: int8's perplexity moved by 2% with the order of two
# float multiplications.)
PERPLEXITY_TEXT = (
    "The city of Paris is the capital and most populous city of France. It is located on the river Seine, "
    "in the north of the country. Paris is known for its museums and architectural landmarks: the Louvre "
    "is the most visited art museum in the world, and the Eiffel Tower, built for the 1889 World's Fair, "
    "has become a global symbol of the city. The city is also a major centre of finance, diplomacy, "
    "commerce, fashion and science, and it hosts the headquarters of many international organisations.\n\n"
    "Once upon a time, in a small village at the edge of a great forest, there lived a girl named Mira who "
    "loved to collect stones. Every morning she walked along the river and picked up the smoothest, brightest "
    "pebbles she could find. One day she found a stone that glowed softly in her hand. She showed it to her "
    "grandmother, who smiled and told her an old story about the river spirits and the gifts they leave for "
    "children who are kind to the forest.\n\n"
    "Photosynthesis is the process by which green plants, algae and some bacteria turn light into chemical "
    "energy. In the leaves, chlorophyll absorbs sunlight, which drives the reactions that split water into "
    "oxygen, protons and electrons. The energy captured is stored in molecules such as ATP and NADPH, which "
    "the plant then uses to fix carbon dioxide from the air into sugars. Almost all the oxygen in the "
    "atmosphere was produced this way, and nearly every food chain on Earth starts with it.\n\n"
    "To make a simple tomato sauce, warm two tablespoons of olive oil in a pan over medium heat. Add a chopped "
    "onion and a pinch of salt, and cook until soft, about ten minutes. Stir in two cloves of garlic for a "
    "minute, then add a can of crushed tomatoes and a few basil leaves. Let it simmer gently for twenty "
    "minutes, stirring now and then, and season with salt and pepper before serving it over pasta.\n\n"
    "def read_lines(path):\n    \"\"\"Return the lines of a text file without trailing newlines.\"\"\"\n"
    "    with open(path, encoding='utf-8') as handle:\n        return [line.rstrip('\\n') for line in handle]\n\n\n"
    "def main():\n    lines = read_lines('notes.txt')\n    print(f'{len(lines)} lines')\n    return 0\n"
)


@dataclass
class Run:
    label: str
    batch: int
    tokens_per_s: float
    ttft_s: list[float]
    itl_s: list[float]
    # Through HTTP the client sees chunks, not tokens: gaps between chunks instead of ITL.
    gap_name: str = "ITL"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def chat_prompt(loaded: LoadedModel, question: str = QUESTION) -> list[int]:
    tokenizer = loaded.tokenizer
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def floor_s(linears: list[nn.Module], batch: int, repeats: int = 10) -> float:
    """Fastest of `repeats` passes of one matmul with every weight matrix at `batch` rows: the
    minimum, not the median, because other work on a shared machine only ever adds time."""
    inputs = [torch.randn(batch, m.in_features) for m in linears]
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            started = time.perf_counter()
            for m, x in zip(linears, inputs):
                m(x)
            times.append(time.perf_counter() - started)
    return min(times[1:])


def torch_dynamic_int8(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated, and says so per layer
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)


def with_our_linears(model: nn.Module, layer_linear: type[nn.Module]) -> nn.Module:
    """A copy of transformers' model with the engine's quantized Linears: the same int8/int4
    model, run by `generate`."""
    model = copy.deepcopy(model)
    for parent in list(model.model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                setattr(parent, name, layer_linear(child))
    model.lm_head = Int8Linear(model.lm_head)  # as `forward._quantize` does
    return model


def measure_floors(loaded: LoadedModel, fmt: str, batches: tuple[int, ...]) -> dict[int, float]:
    """The floor for each batch size, over the engine's own weight matrices in `fmt`."""
    linears = extract_weights(loaded.model, fmt).linears
    return {b: floor_s(linears, b) for b in batches}


def transformers_run(model: nn.Module, prompt_ids: list[int], batch: int, tokens: int, label: str) -> Run:
    input_ids = torch.tensor([prompt_ids] * batch)
    with torch.inference_mode():
        started = time.perf_counter()
        out = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=tokens, min_new_tokens=tokens,
            do_sample=False, pad_token_id=2,
        )
        elapsed = time.perf_counter() - started
    assert out.shape[1] - len(prompt_ids) == tokens
    return Run(label, batch, batch * tokens / elapsed, [], [])


def fixed_length(tokens: int, sampling: dict | None = None) -> SamplingParams:
    """Exactly `tokens` new tokens (EOS ignored); greedy without a repeat penalty unless
    `sampling` says otherwise (e.g. ORIGINAL_DEFAULTS)."""
    return SamplingParams(
        max_tokens=tokens, min_tokens=tokens, ignore_eos=True, **(sampling or {"temperature": 0, "repeat_penalty": 1.0})
    )


# What the original's clients and the chat page send.
ORIGINAL_DEFAULTS = {"temperature": 0.7, "top_p": 0.9, "repeat_penalty": 1.1, "repeat_last_n": 64}


async def engine_run(
    engine: BatchedEngine, prompt_ids: list[int], batch: int, tokens: int, label: str, sampling: dict | None = None
) -> Run:
    params = fixed_length(tokens, sampling)
    ttfts, itls = [], []

    async def one() -> None:
        started = last = time.perf_counter()
        seen = 0
        async for output in engine.generate(prompt_ids, params):
            now = time.perf_counter()
            new_tokens = output.completion_tokens - seen
            if not seen:
                ttfts.append(now - started)
            elif new_tokens:
                # A coalesced chunk of n tokens counts as n gaps of 1/n of its wait.
                itls.extend([(now - last) / new_tokens] * new_tokens)
            seen, last = output.completion_tokens, now
        assert output.completion_tokens == tokens

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(batch)))
    elapsed = time.perf_counter() - started
    return Run(label, batch, batch * tokens / elapsed, ttfts, itls)


async def http_run(url: str, model: str, batch: int, tokens: int, label: str, sampling: dict | None = None) -> Run:
    """The same request through the running Serve app's streaming chat API (SSE), measured at
    the client: what a user of the service gets, proxy, ingress and handles included."""
    import httpx

    params = fixed_length(tokens, sampling)
    body = {
        "model": model, "messages": [{"role": "user", "content": QUESTION}], "stream": True,
        "max_tokens": tokens, "min_tokens": tokens, "ignore_eos": True, "temperature": params.temperature,
        "top_p": params.top_p, "repetition_penalty": params.repeat_penalty, "stream_options": {"include_usage": True},
    }
    ttfts, itls = [], []

    async def one(client: httpx.AsyncClient) -> None:
        started = last = time.perf_counter()
        first, usage = True, None
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[len("data: "):])
                usage = chunk.get("usage") or usage
                if not (chunk["choices"] and chunk["choices"][0]["delta"].get("content")):
                    continue
                now = time.perf_counter()
                (ttfts if first else itls).append(now - (started if first else last))
                first, last = False, now
        assert usage["completion_tokens"] == tokens

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        # Warm-up: the connection, and the replica's prefix cache as for the engine alone.
        (await client.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2, "min_tokens": 0})).raise_for_status()
        started = time.perf_counter()
        await asyncio.gather(*(one(client) for _ in range(batch)))
        elapsed = time.perf_counter() - started
    return Run(label, batch, batch * tokens / elapsed, ttfts, itls, gap_name="chunk gap")


def perplexity(weights, loaded: LoadedModel) -> float:
    """Of PERPLEXITY_TEXT under our forward pass with these weights (one prompt chunk)."""
    ids = loaded.tokenizer(PERPLEXITY_TEXT, add_special_tokens=False)["input_ids"]
    cache = KVCache(len(weights.layers), 1, weights.n_kv_heads, len(ids), weights.head_dim, weights.dtype)
    batch = build_step([], [(PromptChunk(0, 0, len(ids), True), ids)], weights.n_heads // weights.n_kv_heads)
    batch.logit_rows = torch.arange(len(ids))  # every position, not only the last
    with torch.inference_mode():
        logits = forward(weights, cache, rope_table(weights, len(ids)), batch)
    loss = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]))
    return math.exp(loss.item())


async def greedy_answer(engine: BatchedEngine, prompt_ids: list[int]) -> str:
    params = SamplingParams(max_tokens=40, temperature=0, repeat_penalty=1.0)
    return "".join([o.text async for o in engine.generate(prompt_ids, params)])


def describe(run: Run, floor_tps: float, transformers_tps: float | None) -> str:
    line = f"{run.label:<34} {run.tokens_per_s:7.1f} tok/s  {run.tokens_per_s / floor_tps:5.0%} of floor"
    if transformers_tps:
        line += f"  {run.tokens_per_s / transformers_tps:4.2f}x transformers"
    if run.ttft_s:
        line += (
            f"  TTFT p50/p95 {percentile(run.ttft_s, 50) * 1e3:.0f}/{percentile(run.ttft_s, 95) * 1e3:.0f} ms"
            f"  {run.gap_name} p50/p95 {percentile(run.itl_s, 50) * 1e3:.0f}/{percentile(run.itl_s, 95) * 1e3:.0f} ms"
        )
    return line


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 new tokens instead of 128")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument(
        "--http", metavar="URL", help="also measure through a running Serve app (e.g. http://127.0.0.1:8080)"
    )
    parser.add_argument("--model", default="SmolLM2-135M-Instruct", help="the served model for --http")
    parser.add_argument(
        "--http-weights", default="int4", choices=["fp32", "int8", "int4"],
        help="the served model's weight format (default int4, as in serve_config.yaml)",
    )
    args = parser.parse_args()
    tokens = 32 if args.quick else 128
    torch.set_num_threads(args.threads)
    # Every torch call outside the engine runs on a short-lived thread, and never while an
    # engine is alive, so each side gets the CPUs' OpenMP pools to itself (see torch_threads).
    loaded = run_in_fresh_thread(load_model, ModelConfig(name="smol"))
    prompt_ids = chat_prompt(loaded)
    print(f"SmolLM2-135M, {args.threads} threads, prompt {len(prompt_ids)} tokens, {tokens} new tokens per request\n")

    # transformers on int8: torch's own dynamic quantization (what a transformers user reaches
    # for), and the same model with our int8 linears swapped in; the faster one is the baseline.
    # On int4, the same model with our int4 linears (torch has no int4 of its own for CPU).
    baselines = {
        "fp32": {"transformers generate": loaded.model},
        "int8": {
            "transformers + torch dynamic int8": run_in_fresh_thread(torch_dynamic_int8, loaded.model),
            "transformers + our int8 linears": run_in_fresh_thread(with_our_linears, loaded.model, Int8Linear),
        },
        "int4": {"transformers + our int4 linears": run_in_fresh_thread(with_our_linears, loaded.model, Int4Linear)},
    }
    batches = (1, args.streams)
    for fmt, hf_models in baselines.items():
        floors = run_in_fresh_thread(measure_floors, loaded, fmt, batches)
        their_runs = {
            b: [
                run_in_fresh_thread(transformers_run, model, prompt_ids, b, tokens, f"{name}, batch {b}")
                for name, model in hf_models.items()
            ]
            for b in batches
        }
        print(f"== {fmt}")
        for b in batches:
            print(f"floor at batch {b:<2}: one pass over the weights {floors[b] * 1e3:6.1f} ms = {b / floors[b]:7.1f} tok/s")
        for b in batches:
            for theirs in their_runs[b]:
                print(describe(theirs, b / floors[b], None))
        # Every request of the benchmark has the same prompt, so with prefix caching (the
        # default) only the first one computes it; the second pass shows the engine without.
        for prefix_caching in (True, False):
            engine = BatchedEngine(
                loaded, weights=fmt, max_batch_size=args.streams, max_context=len(prompt_ids) + tokens + 8,
                prefix_caching=prefix_caching,
            )
            name = "batched engine" + ("" if prefix_caching else " (no prefix cache)")
            await engine_run(engine, prompt_ids, 1, 4, "warm-up")
            idle_ttft = None
            for b in batches:
                ours = await engine_run(engine, prompt_ids, b, tokens, f"{name}, {b} stream(s)")
                floor_tps, best = b / floors[b], max(theirs.tokens_per_s for theirs in their_runs[b])
                print(describe(ours, floor_tps, best))
                if args.http and fmt == args.http_weights and prefix_caching:
                    served = await http_run(args.http, args.model, b, tokens, f"through HTTP, {b} stream(s)")
                    print(describe(served, floor_tps, best) + f"  {served.tokens_per_s / ours.tokens_per_s:4.2f}x engine alone")
                if b == 1:
                    idle_ttft = percentile(ours.ttft_s, 50)
                else:
                    print(f"  TTFT p95 at {b} streams / idle TTFT: {percentile(ours.ttft_s, 95) / idle_ttft:.1f}x")
            if prefix_caching:
                answer = await greedy_answer(engine, prompt_ids)
                print(f"perplexity ({fmt}): {run_in_fresh_thread(perplexity, engine._weights, loaded):.3f}")
                print(f"greedy answer ({fmt}): {answer!r} -> {'correct' if 'Paris' in answer else 'WRONG'}")
            engine.shutdown()
        print()


if __name__ == "__main__":
    asyncio.run(main())
