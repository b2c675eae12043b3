"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step of a small model is a few hundred small kernels (and sampling a few dozen more); launched one by one from Python
the GPU waits on the launches, while a replayed graph launches them all at once (figures:
docs/gpu.md). A graph fixes its shapes and addresses, so:
- the step's inputs (token ids, cache rows, positions) live in static buffers that each step
  overwrites, and the KV cache never moves (the GPU engine allocates it whole);
- a step of n rows replays the smallest bucket >= n; its padding rows decode token 0 at
  position 0 of the cache's scratch row, and their logits are ignored;
- attention reads each row's length from the positions buffer (`cached_attention`), so one
  graph serves any mix of lengths; sampling reads each row's settings from the per-slot table
  (`sampler.SlotSampling`), so one graph serves any mix of settings;
- each bucket has a few variants of the sampler (`VARIANTS`): a step skips the sampler's kernels
  its rows do not need;
- a row may take its token id from the previous replay's draft on the device (`DecodeRow`),
  so the engine can queue a step before it has read the one before (`BatchedEngine._step`).

Prefill steps (and decode steps beyond the largest bucket) run eagerly: their shapes vary, and
they are few. Capturing the 68 graphs of a batch of 256 takes a few seconds for SmolLM2 and needs no disk
cache; what takes the time at start is Triton compiling its kernel, which Triton caches on disk
(~/.triton/cache) by itself.
"""

from __future__ import annotations

import logging
import time
from typing import NamedTuple

import torch

from deployments.engine.forward import StepBatch, fed_token_ids, forward
from deployments.engine.kv_cache import KVCache
from deployments.engine.sampler import Draft, Needs, SlotSampling, StepRows, draw
from deployments.engine.weights import LlamaWeights

logger = logging.getLogger(__name__)

# The sampling variants captured per bucket, cheapest first; a step replays the first that covers
# its rows' needs (each variant's cost: docs/gpu.md, bench/sampler_bench.py). Greedy rows skip the sampler but the repeat
# penalty (which the original's clients send with temperature 0 too) and EOS suppression before
# min_tokens; rows that all filter (top-p or top-k: the original's defaults) skip the draw over
# the whole vocabulary in id order and EOS suppression. Only the last variant applies OpenAI's
# logit bias and presence and frequency penalties, which few requests send.
VARIANTS = (
    Needs(sampled=False, unfiltered=False, penalty=False, bias=False, occurrences=False),
    Needs(sampled=False, unfiltered=False, bias=False, occurrences=False),
    Needs(unfiltered=False, min_tokens=False, bias=False, occurrences=False),
    Needs(),
)


def variant_for(needs: Needs) -> Needs:
    """The cheapest captured variant that does all that rows needing `needs` need."""
    return next(v for v in VARIANTS if v.covers(needs))


class DecodeRow(NamedTuple):
    """One decode row of a step: the request in cache row `slot` takes token `token` at
    `position`. With `previous_row` >= 0 the token is instead the one the step before drafted
    in that row, read on the device (the host has not seen it yet, see `BatchedEngine._step`)."""

    slot: int
    position: int
    token: int
    previous_row: int = -1


def bucket_sizes(max_rows: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 up to 32, of 16 up to 128, of 32 beyond (vLLM-like: a
    padded row costs little at batch 200, much at batch 3), ending at `max_rows`."""
    sizes, size = [], 1
    while size < max_rows:
        sizes.append(size)
        size = size * 2 if size < 8 else size + (8 if size < 32 else 16 if size < 128 else 32)
    return [*sizes, max_rows]


class DecodeGraphs:
    @torch.inference_mode()
    def __init__(
        self,
        weights: LlamaWeights,
        cache: KVCache,
        rope: torch.Tensor,
        sampling: SlotSampling,
        eos_ids: torch.Tensor,
        max_rows: int,
    ):
        started = time.monotonic()
        self._cache = cache
        self.sizes = bucket_sizes(max_rows)
        device = cache.device
        # slots, positions, token ids, previous rows: one buffer, so a step's inputs go over in one copy.
        # Padding rows decode token 0 at position 0 of the cache's scratch row.
        self._padding = DecodeRow(cache.scratch_slot, 0, 0)
        self._inputs = torch.tensor([self._padding] * max_rows, device=device).T.contiguous()
        # The ids the last replayed step drafted, by row: the next step's previous rows read them.
        self.previous = torch.zeros(max_rows, dtype=torch.long, device=device)
        self._graphs: dict[tuple[Needs, int], torch.cuda.CUDAGraph] = {}
        self._drafts: dict[tuple[Needs, int], Draft] = {}

        def step(needs: Needs, size: int) -> Draft:
            slots, positions, host_ids, previous_rows = self._inputs[:, :size]
            token_ids = fed_token_ids(host_ids, previous_rows, self.previous)
            batch = StepBatch(token_ids, slots, positions, logit_rows=torch.arange(size, device=device), n_decode=size)
            logits = forward(weights, cache, rope, batch)
            # Sampling too: its small kernels would otherwise be launched one by one after the pass.
            draft = draw(logits, StepRows(slots, positions, needs), sampling, cache.tokens, eos_ids)
            self.previous[:size].copy_(draft.tokens)
            return draft

        pool = None
        # Largest first: the smaller graphs then fit in the memory the largest one took.
        for size in reversed(self.sizes):
            for needs in VARIANTS:
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):  # warm-up off the capture stream (cuBLAS, Triton's compile)
                    step(needs, size)
                torch.cuda.current_stream(device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._drafts[needs, size] = step(needs, size)
                pool = graph.pool()
                self._graphs[needs, size] = graph
        torch.cuda.synchronize(device)
        logger.info(
            "Captured %d CUDA graphs (decode batches %s, %d sampler variants each) in %.1f s",
            len(self._graphs),
            ", ".join(map(str, self.sizes)),
            len(VARIANTS),
            time.monotonic() - started,
        )

    def bucket(self, rows: int) -> int | None:
        """The graph that fits `rows` decode tokens, or None if there are too many."""
        return next((size for size in self.sizes if size >= rows), None)

    def decode(self, rows: list[DecodeRow], needs: Needs) -> Draft:
        """The rows' sampled `Draft` (see `sampler.finish`); at most the largest bucket of rows.
        The draft lives in the graph's output, which the next replay overwrites."""
        size = self.bucket(len(rows))
        assert size is not None, f"{len(rows)} rows exceed the largest CUDA graph ({self.sizes[-1]})"
        variant = variant_for(needs)
        # A new pinned buffer each step: the previous step's copy may not have run yet (the
        # engine queues a step before the one before it has finished), and torch's pinned
        # allocator reuses a buffer only once the copies that read it are done.
        host = torch.tensor(rows + [self._padding] * (size - len(rows))).T.contiguous().pin_memory()
        self._inputs[:, :size].copy_(host, non_blocking=True)
        self._graphs[variant, size].replay()
        return self._drafts[variant, size][: len(rows)]
