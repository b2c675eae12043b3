"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step of a small model is a few hundred small kernels (and sampling a few dozen more); launched one by one from Python
the GPU waits on the launches (transformers' `generate` on an H100: ~77 ms a step at any batch),
while a replayed graph launches them all at once (3.3 ms at batch 1, 11.3 ms at 256, measured on
an H100). A graph fixes its shapes and addresses, so:
- the step's inputs (token ids, cache rows, positions) live in static buffers that each step
  overwrites, and the KV cache never moves (the GPU engine allocates it whole);
- a step of n rows replays the smallest bucket >= n; its padding rows decode token 0 at
  position 0 of the cache's scratch row, and their logits are ignored;
- attention reads each row's length from the positions buffer (`cached_attention`), so one
  graph serves any mix of lengths; sampling reads each row's settings from the per-slot table
  (`sampler.SlotSampling`), so one graph serves any mix of settings.

Prefill steps (and decode steps beyond the largest bucket) run eagerly: their shapes vary, and
they are few. Capturing takes well under a second per bucket for SmolLM2 and needs no disk
cache; what takes the time at start is Triton compiling its kernel, which Triton caches on disk
(~/.triton/cache) by itself.
"""

from __future__ import annotations

import logging
import time

import torch

from deployments.engine.forward import LlamaWeights, StepBatch, forward
from deployments.engine.kv_cache import KVCache
from deployments.engine.sampler import Draft, SlotSampling, StepRows, draw

logger = logging.getLogger(__name__)


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
        self, weights: LlamaWeights, cache: KVCache, rope: torch.Tensor, sampling: SlotSampling, eos_ids: torch.Tensor,
        max_rows: int,
    ):
        started = time.monotonic()
        self._cache = cache
        self.sizes = bucket_sizes(max_rows)
        device = cache.device
        # token ids, slots, positions: one buffer, so a step's inputs go over in one copy.
        self._inputs = torch.zeros(3, max_rows, dtype=torch.long, device=device)
        self._inputs[1] = cache.scratch_slot
        self._host = torch.zeros(3, max_rows, dtype=torch.long).pin_memory()
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._drafts: dict[int, Draft] = {}

        def step(size: int) -> Draft:
            token_ids, slots, positions = self._inputs[:, :size]
            batch = StepBatch(token_ids, slots, positions, logit_rows=torch.arange(size, device=device))
            logits = forward(weights, cache, rope, batch)
            # Sampling too (the host knows nothing of the rows here, so every part of it runs):
            # its ~40 small kernels would otherwise be launched one by one after the pass.
            return draw(logits, StepRows(slots, positions), sampling, cache.tokens, eos_ids)

        pool = None
        # Largest first: the smaller graphs then fit in the memory the largest one took.
        for size in reversed(self.sizes):
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm-up off the capture stream (cuBLAS, Triton's compile)
                step(size)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._drafts[size] = step(size)
            pool = graph.pool()
            self._graphs[size] = graph
        torch.cuda.synchronize(device)
        logger.info(
            "Captured %d CUDA graphs (decode batches %s) in %.1f s",
            len(self.sizes), ", ".join(map(str, self.sizes)), time.monotonic() - started,
        )

    def bucket(self, rows: int) -> int | None:
        """The graph that fits `rows` decode tokens, or None if there are too many."""
        return next((size for size in self.sizes if size >= rows), None)

    def decode(self, decode: list[tuple[int, int, int]]) -> Draft:
        """`decode`: (slot, position, token id) per row (at most the largest bucket) -> the
        rows' sampled `Draft` (see `sampler.finish`)."""
        rows = len(decode)
        size = self.bucket(rows)
        assert size is not None, f"{rows} rows exceed the largest CUDA graph ({self.sizes[-1]})"
        host = self._host[:, :size]
        host[:, :rows] = torch.tensor(decode).T[[2, 0, 1]]
        host[:, rows:] = torch.tensor([[0], [self._cache.scratch_slot], [0]])
        self._inputs[:, :size].copy_(host, non_blocking=True)
        self._graphs[size].replay()
        return self._drafts[size][:rows]
