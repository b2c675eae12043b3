"""Running one engine step on the model's device: the weights, the KV cache, the sampler's
per-row table and, on CUDA, the decode steps' graphs.

A step is given as decode rows and prompt chunks (from the `scheduler`'s plan); the runner
computes their logits (`forward`), masks constrained rows (`grammar.Masks`), takes the asking
rows' logprobs and draws one id per sampled row (`sampler.draw`), all queued on the device: the
caller decides when to read the ids (`sampler.finish`), so a step can be queued before the last
one is read. One runner per device kind, chosen once by the engine at load: `ModelRunner`
runs every step eagerly and grows its cache with the longest request; `CudaModelRunner` sizes
the cache to the GPU's memory up front and replays decode steps from CUDA graphs.

Does not own which rows run (`scheduler`) or what their ids become (`outputs`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import NamedTuple

import llguidance
import torch

from deployments.engine.cuda_graphs import DecodeGraphs, DecodeRow
from deployments.engine.forward import PromptChunk, build_step, extract_weights, fed_token_ids, forward, rope_table
from deployments.engine.grammar import Masks
from deployments.engine.kv_cache import INITIAL_CAPACITY, KVCache
from deployments.engine.sampler import Draft, Needs, SlotSampling, StepLogprobs, StepRows, draw
from deployments.engine.scheduler import PrefixCopy
from deployments.engine.sequence import Sequence
from deployments.model_loader import LoadedModel, eos_token_ids
from deployments.model_registry import WeightFormat

logger = logging.getLogger(__name__)


class ConstrainedRows(NamedTuple):
    """The step's logit rows whose tokens a grammar limits, and their matchers (by row)."""

    rows: list[int]
    matchers: list[llguidance.LLMatcher]


class ScoredRows(NamedTuple):
    """The step's logit rows whose logprobs are asked, and the most alternatives one asks."""

    rows: list[int]
    top: int


@dataclass
class Step:
    """One step to queue: `decode` rows, then `chunks` of prompts; one id is drawn per decode row
    and completed prompt, as `needs` says. `previous`: the ids of the step queued before, which
    decode rows with a previous row read (see `DecodeRow`). `pending`: the draft is read only
    after another step is queued."""

    decode: list[DecodeRow]
    chunks: list[tuple[PromptChunk, list[int]]]
    needs: Needs
    previous: torch.Tensor | None = None
    constrained: ConstrainedRows | None = None
    scored: ScoredRows | None = None
    pending: bool = False
    prompt_top: int = 0  # alternatives the scored chunks' tokens want (`PromptChunk.is_scored`)

    @property
    def is_plain_decode(self) -> bool:
        """Decode rows only, none masked or scored: what a CUDA graph replays."""
        return not self.chunks and self.constrained is None and (self.scored is None or not self.scored.rows)


class PromptLogprobs(NamedTuple):
    """The logprobs of a step's scored prompt tokens' logits, and each row's (slot, position):
    they score the prompt's token at position + 1."""

    logprobs: StepLogprobs
    rows: list[tuple[int, int]]


class StepResult(NamedTuple):
    draft: Draft  # one id per sampled row, still on the device (see `sampler.finish`)
    tokens: torch.Tensor  # the drafted ids by row, on the device: a next step's decode rows may read them
    logprobs: StepLogprobs | None  # of the scored rows, if any
    prompt_logprobs: PromptLogprobs | None = None


class ModelRunner:
    """Eager steps on any device (the CPU, Apple's mps). Created on the engine's thread, which
    then runs all its torch work."""

    graphs: DecodeGraphs | None = None  # a GPU's (see `CudaModelRunner`)
    is_cuda = False  # how `forward.build_step` lays a step out for the device's attention

    def __init__(self, loaded: LoadedModel, weights: WeightFormat, max_batch_size: int, max_context: int):
        self.device = loaded.device
        w = self.weights = extract_weights(loaded.require_model(), weights)
        kv_bytes = KVCache.bytes_per_position(len(w.layers), w.n_kv_heads, w.head_dim, w.dtype)
        self.max_batch_size = max_batch_size
        self.max_context = self._fitting_context(max_context, kv_bytes)
        self.vocab_size = w.embed.shape[0]
        self._rope = rope_table(w, self.max_context)
        self.cache = KVCache(
            len(w.layers),
            max_batch_size,
            w.n_kv_heads,
            self.max_context,
            w.head_dim,
            w.dtype,
            self.device,
            self._initial_capacity(),
        )
        self.sampling = SlotSampling.empty(max_batch_size + 1, self.max_context, self.device)  # + the scratch row
        self._eos = torch.tensor(eos_token_ids(loaded), dtype=torch.long, device=self.device)
        self._masks = Masks(self.vocab_size, max_batch_size, parallel=self.is_cuda)

    def _fitting_context(self, max_context: int, bytes_per_position: int) -> int:
        return max_context  # the cache grows as requests get longer

    def _initial_capacity(self) -> int:
        return INITIAL_CAPACITY

    def admit(self, seqs: list[Sequence]) -> None:
        """Each newcomer samples under its settings in its cache row."""
        self.sampling.write([replace(seq.sampling, slot=seq.slot) for seq in seqs])

    def copy_prefixes(self, copies: list[PrefixCopy]) -> None:
        for copy in copies:
            self.cache.copy_positions(*copy)

    def run(self, step: Step) -> StepResult:
        """Queues `step` on the device: its forward pass, masks, logprobs and draws."""
        longest = max([row.position + 1 for row in step.decode] + [c.start + c.length for c, _ in step.chunks])
        self.cache.reserve(longest)
        constrained, scored = step.constrained, step.scored
        filling = None if constrained is None else self._masks.start_fill(constrained.matchers)  # beside the pass
        decode = [row[:3] for row in step.decode]
        batch = build_step(decode, step.chunks, cuda=self.is_cuda).to(self.device)
        if step.previous is not None:
            previous_rows = [row.previous_row for row in step.decode] + [-1] * (len(batch.token_ids) - len(decode))
            batch.token_ids = fed_token_ids(batch.token_ids, torch.tensor(previous_rows, device=self.device), step.previous)
        logits, logit_rows = forward(self.weights, self.cache, self._rope, batch), batch.logit_rows
        prompt_logprobs = None
        if batch.scored:  # the last rows: scored prompt tokens, not sampled
            n = len(logit_rows) - len(batch.scored)
            scores = StepLogprobs(logits[n:], list(range(len(batch.scored))), step.prompt_top)
            prompt_logprobs = PromptLogprobs(scores, batch.scored)
            logits, logit_rows = logits[:n], logit_rows[:n]
        # Before bias, penalties, masks and temperature change the logits (in place).
        logprobs = StepLogprobs(logits, scored.rows, scored.top) if scored is not None and scored.rows else None
        if constrained is not None and filling is not None:
            self._masks.apply(logits, constrained.rows, filling.result())
        rows = StepRows(batch.slots[logit_rows], batch.positions[logit_rows], step.needs)
        draft = draw(logits, rows, self.sampling, self.cache.tokens[:, :longest], self._eos)
        return StepResult(draft, draft.tokens, logprobs, prompt_logprobs)


class CudaModelRunner(ModelRunner):
    """On a GPU the cache is allocated whole, as large as the memory allows (CUDA graphs hold
    its addresses, so it never moves), and decode steps of plain rows replay a CUDA graph."""

    is_cuda = True

    def __init__(
        self,
        loaded: LoadedModel,
        weights: WeightFormat,
        max_batch_size: int,
        max_context: int,
        gpu_memory_fraction: float,
        cuda_graphs: bool,
    ):
        self.gpu_memory_fraction = gpu_memory_fraction
        super().__init__(loaded, weights, max_batch_size, max_context)
        self.graphs = (
            DecodeGraphs(self.weights, self.cache, self._rope, self.sampling, self._eos, max_batch_size) if cuda_graphs else None
        )

    def _initial_capacity(self) -> int:
        return self.max_context

    def _fitting_context(self, max_context: int, bytes_per_position: int) -> int:
        """The context each of `max_batch_size` cache rows (and the scratch row) can have within
        `gpu_memory_fraction` of the GPU's free memory: the configured context if it fits."""
        free, _ = torch.cuda.mem_get_info(self.device)
        budget = int(free * self.gpu_memory_fraction)
        fits = budget // ((self.max_batch_size + 1) * bytes_per_position)
        if fits < min(max_context, 256):
            raise ValueError(
                f"the KV cache for {self.max_batch_size} requests needs {bytes_per_position * 256 / 2**20:.1f} MiB per "
                f"request for 256 tokens, but {self.gpu_memory_fraction} of the GPU's {free / 2**30:.1f} GiB free is "
                f"{budget / 2**30:.1f} GiB; lower max_batch_size or raise gpu_memory_fraction"
            )
        if fits < max_context:
            logger.warning(
                "KV cache: %d requests x %d tokens do not fit %.1f GiB (%s of %.1f GiB free); context cut to %d tokens",
                self.max_batch_size,
                max_context,
                budget / 2**30,
                self.gpu_memory_fraction,
                free / 2**30,
                fits,
            )
        return min(max_context, fits)

    def run(self, step: Step) -> StepResult:
        graphs = self.graphs
        if graphs is None or not step.is_plain_decode or not graphs.bucket(len(step.decode)):
            return super().run(step)
        if step.previous is not None and step.previous is not graphs.previous:
            graphs.previous[: len(step.previous)].copy_(step.previous)  # an eager step's ids
        draft = graphs.decode(step.decode, step.needs)  # forward pass and sampling, replayed
        if step.pending and step.needs.sampled:
            draft = draft.clone()  # the next replay overwrites the graph's output, and `finish` may sort it
        return StepResult(draft, graphs.previous, None)
