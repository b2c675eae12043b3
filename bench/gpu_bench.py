"""The batched engine on a CUDA GPU against transformers' `generate` on the same GPU, greedy and
with the original's default sampling (temperature 0.7, top_p 0.9, repeat_penalty 1.1), at 1 / 16
/ 64 / 256 streams; and against its own decode step replayed alone (the CUDA-graph step: no
sampling, no streaming), measured in the same run.

    python -m bench.gpu_bench [--streams 1,16,64,256] [--tokens 128] [--http http://127.0.0.1:8080 --model NAME]

The model is SmolLM2-135M's shape with random weights, in bf16 (throughput does not depend on
the values; the packaged weights do not travel to a GPU machine without network). Every request
generates exactly --tokens new tokens (EOS ignored). Without a GPU it says so and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import torch

from bench.engine_bench import (
    ORIGINAL_DEFAULTS,
    QUESTION,
    Run,
    describe,
    engine_run,
    fixed_length,
    generate_options,
    http_run,
    percentile,
)
from deployments.engine.batched import BatchedEngine
from deployments.engine.cuda_graphs import DecodeRow
from deployments.engine.sampler import Needs
from deployments.model_loader import LoadedModel, build_tiny_random_model
from deployments.model_registry import ModelConfig

SAMPLINGS = {"greedy": None, "original defaults": ORIGINAL_DEFAULTS}
NEW_CHAT_TOKENS = 16  # enough for a time to first token


def transformers_run(loaded: LoadedModel, prompt_ids: list[int], batch: int, tokens: int, sampling: dict | None) -> Run:
    input_ids = torch.tensor([prompt_ids] * batch, device=loaded.device)
    with torch.inference_mode():
        torch.cuda.synchronize()
        started = time.perf_counter()
        out = loaded.model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            pad_token_id=loaded.tokenizer.pad_token_id,
            **generate_options(sampling),
        )
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
    assert out.shape[1] - len(prompt_ids) == tokens
    return Run("transformers generate", batch, batch * tokens / elapsed, [], [])


@torch.inference_mode()
def graph_step_tps(engine: BatchedEngine, batch: int, sampling: dict | None, repeats: int = 50) -> float:
    """Tokens/s of the decode step alone (forward pass and sampling): `batch` rows replayed
    from their CUDA graph (the variant `sampling` takes), nothing else."""
    graphs = engine.runner.graphs
    assert graphs is not None
    decode = [DecodeRow(slot, 40, 1) for slot in range(batch)]
    needs = Needs.of([fixed_length(1, sampling)])
    graphs.decode(decode, needs)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        graphs.decode(decode, needs)
    torch.cuda.synchronize()
    return batch * repeats / (time.perf_counter() - started)


async def http_line(args: argparse.Namespace, model: str, batch: int, sampling_name: str, engine_tps: float | None) -> None:
    """One run through the Serve app at `args.http`, with its ratio to the engine alone (when
    measured) and the streamed chunks a second the client received."""
    served = await http_run(args.http, model, batch, args.tokens, f"HTTP {model}, {batch} stream(s)", SAMPLINGS[sampling_name])
    elapsed = batch * args.tokens / served.tokens_per_s
    chunks_per_s = (len(served.ttft_s) + len(served.itl_s)) / elapsed
    ratio = f"  {served.tokens_per_s / engine_tps:4.2f}x engine alone" if engine_tps else ""
    print(f"{describe(served)}{ratio}  {chunks_per_s:.0f} chunks/s", flush=True)


async def http_only(args: argparse.Namespace) -> None:
    for name in SAMPLINGS:
        print(f"\n== {name}")
        for batch in [int(s) for s in args.streams.split(",")]:
            for model in args.models.split(","):
                await http_line(args, model, batch, name, None)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", default="1,16,64,256")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--http", metavar="URL", help="also measure through a running Serve app")
    parser.add_argument("--models", default="SmolLM2-135M-Instruct", help="the served model(s) for --http, comma-separated")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--http-only", action="store_true", help="only the runs through --http (another Serve setup)")
    args = parser.parse_args()
    if args.http_only:
        await http_only(args)
        return
    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU: this benchmark measures the GPU path (bench.engine_bench is the CPU's)")
    streams = [int(s) for s in args.streams.split(",")]
    model, tokenizer = build_tiny_random_model(0, "smollm2")
    device = torch.device("cuda")
    loaded = LoadedModel(
        ModelConfig(name="smollm2-random", source={"kind": "tiny_random", "shape": "smollm2"}, device="cuda"),
        model.to(device, torch.bfloat16).eval(),
        tokenizer,
        device,
        2048,
    )

    def chat(question: str) -> list[int]:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
        return ids if isinstance(ids, list) else ids["input_ids"]

    prompt_ids = chat(QUESTION)
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}; SmolLM2-135M shape, random weights, bf16; "
        f"prompt {len(prompt_ids)} tokens, {args.tokens} new tokens per request\n"
    )

    theirs: dict[tuple[str, int], Run] = {}
    if not args.skip_transformers:
        for sampling in SAMPLINGS.values():  # warm-up: CUDA context, cuBLAS handles, both decoding paths
            transformers_run(loaded, prompt_ids, 1, 16, sampling)
        # Greedy and sampled alternate, so neither gets all the early (or late) runs.
        for batch in streams:
            for name, sampling in SAMPLINGS.items():
                theirs[name, batch] = transformers_run(loaded, prompt_ids, batch, args.tokens, sampling)
                print(
                    f"transformers generate, {name}, {batch} stream(s): {theirs[name, batch].tokens_per_s:.0f} tok/s", flush=True
                )

    started = time.perf_counter()
    engine = BatchedEngine(loaded, weights="bf16", max_batch_size=max(streams), max_context=2048)
    assert engine.runner.graphs is not None
    print(
        f"engine ready in {time.perf_counter() - started:.1f} s (KV cache {engine.runner.cache.size_bytes / 2**30:.2f} GiB, "
        f"graphs {engine.runner.graphs.sizes})"
    )
    step_tps = {(name, b): graph_step_tps(engine, b, sampling) for name, sampling in SAMPLINGS.items() for b in streams}
    await engine_run(engine, prompt_ids, 1, 4, "warm-up")
    ours: dict[tuple[str, str, int], Run] = {}  # (sampling, how, streams)
    for name, sampling in SAMPLINGS.items():
        print(f"\n== {name}")
        for batch in streams:
            base = theirs.get((name, batch))
            # Each decode step queued before the last one is read (the GPU default), then step by step.
            for how, overlap in (("overlapped", True), ("step by step", False)):
                engine.overlap_steps = overlap
                run = ours[name, how, batch] = await engine_run(
                    engine, prompt_ids, batch, args.tokens, f"engine {how}, {batch} stream(s)", sampling
                )
                line = describe(run, step_tps[name, batch], base.tokens_per_s if base else None)
                print(line.replace("of floor", "of graph step"), flush=True)
            engine.overlap_steps = True
            for model_name in args.models.split(",") if args.http else []:
                await http_line(args, model_name, batch, name, ours[name, "overlapped", batch].tokens_per_s)
    # The runs above ask one question, whose prompt the prefix cache holds after the first: a
    # newcomer prefills one token. New chats each ask their own, as users do.
    print(f"\n== new chats: each stream its own question, greedy, {NEW_CHAT_TOKENS} new tokens")
    new_chats: dict[int, Run] = {}
    for batch in streams:
        prompts = [chat(f"Chat {batch}-{index}: {QUESTION}") for index in range(batch)]
        new_chats[batch] = await engine_run(
            engine, prompts[0], batch, NEW_CHAT_TOKENS, f"engine, {batch} new chat(s)", prompts=prompts
        )
        print(describe(new_chats[batch]), flush=True)
    engine.shutdown()

    def line(label: str, values) -> None:
        print(f"{label:<34}" + "".join(f"{v:>12}" for v in values))

    print()
    line("summary, tok/s", streams)
    for name in SAMPLINGS:
        overlapped = {b: ours[name, "overlapped", b] for b in streams}
        print(f"-- {name}")
        line("  graph step alone", [f"{step_tps[name, b]:.0f}" for b in streams])
        line("  ours (overlapped steps)", [f"{overlapped[b].tokens_per_s:.0f}" for b in streams])
        line("  ours, step by step", [f"{ours[name, 'step by step', b].tokens_per_s:.0f}" for b in streams])
        line("  overlapped / graph step", [f"{overlapped[b].tokens_per_s / step_tps[name, b]:.2f}" for b in streams])
        if theirs:
            line("  transformers generate", [f"{theirs[name, b].tokens_per_s:.0f}" for b in streams])
            line("  ours / transformers", [f"{overlapped[b].tokens_per_s / theirs[name, b].tokens_per_s:.1f}x" for b in streams])
        line("  TTFT p95 ms", [f"{percentile(overlapped[b].ttft_s, 95) * 1e3:.1f}" for b in streams])
        line(
            "  ITL p50 / p95 ms",
            [f"{percentile(overlapped[b].itl_s, 50) * 1e3:.1f}/{percentile(overlapped[b].itl_s, 95) * 1e3:.1f}" for b in streams],
        )
    line("TTFT p95 ms, new chats", [f"{percentile(new_chats[b].ttft_s, 95) * 1e3:.1f}" for b in streams])
    greedy, sampled = SAMPLINGS
    line(
        "sampling / greedy",
        [f"{ours[sampled, 'overlapped', b].tokens_per_s / ours[greedy, 'overlapped', b].tokens_per_s:.2f}" for b in streams],
    )


if __name__ == "__main__":
    asyncio.run(main())
