"""The continuous-batching engine: every running request advances by one token per step, in
one forward pass over the weights, and requests join and leave between steps.

One decode loop runs in its own thread (`_run`). Each step it admits waiting requests into free
cache slots, drops cancelled ones, then runs `forward` over one decode token per running request
plus up to `prefill_chunk_tokens` of newcomers' prompts (chunked prefill: a long prompt costs
running streams a few slower steps, not one long stall), samples, and hands each request its new
text into the request's asyncio queue, all of a step's in one `loop.call_soon_threadsafe`
(`Posts`). The caller's event loop
never runs torch. On a GPU, while every request is decoding, each step is queued before the last
one's ids are read (`overlap_steps`): the device computes step t+1 while the host streams step
t's text, and a row reads its input id from step t's draft on the device.

A newcomer's prompt starts from the longest prefix another cache row already holds (prefix
caching, `_reuse_prefix`): the chat template's system prompt, or a conversation's earlier turns.

Owns: admission, slots, stopping (EOS, stop strings, max_tokens, context), streaming. The
forward pass is `forward`, sampling `sampler`, text `detokenizer`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass, field

import llguidance
import torch

from deployments.engine.cuda_graphs import DecodeGraphs, DecodeRow
from deployments.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from deployments.engine.forward import PromptChunk, build_step, extract_weights, fed_token_ids, forward, rope_table
from deployments.engine.grammar import Grammars, Masks
from deployments.engine.kv_cache import INITIAL_CAPACITY, KVCache
from deployments.engine.prefix_index import PrefixIndex, common_prefix
from deployments.engine.protocol import (
    EngineStats,
    FinishReason,
    GenerationOutput,
    InvalidRequestError,
    PromptTooLongError,
    TokenLogprob,
    check_constraint,
    check_logit_bias,
)
from deployments.engine.sampler import Draft, Fetch, Needs, SlotEntry, SlotSampling, StepLogprobs, StepRows, draw, finish
from deployments.engine.sampling import SamplingParams
from deployments.model_loader import LoadedModel, eos_token_ids
from deployments.model_registry import WeightFormat

logger = logging.getLogger(__name__)


class EngineShutDownError(RuntimeError):
    """The engine stopped while the request was waiting or running."""


@dataclass(eq=False)
class Sequence:
    """One request inside the engine. Written by the engine thread only, except
    `is_cancelled`, which the request's async generator sets."""

    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue
    posts: Posts  # the engine's, through which `send` hands over outputs
    detokenizer: IncrementalDetokenizer
    stop_matcher: StopStringMatcher
    seed: int  # of the request's draws (see `sampler.uniform`)
    matcher: llguidance.LLMatcher | None = None  # its constraint's state (see `grammar`)
    slot: int = -1
    n_prefilled: int = 0  # prompt tokens already in the cache
    generated: list[int] = field(default_factory=list)
    is_cancelled: bool = False
    unsent_text: str = ""  # held back to coalesce chunks, see `BatchedEngine._advance`
    unsent_logprobs: list[TokenLogprob] = field(default_factory=list)  # of the tokens since the last output
    last_sent: float = -math.inf  # time.monotonic() of the last output sent

    @property
    def steps_alone(self) -> bool:
        """Whether each of its steps must be read before the next is queued, and run eagerly:
        its grammar's mask needs its last token on the host; its logprobs, the step's logits."""
        return self.matcher is not None or self.params.logprobs is not None

    @property
    def is_prefilled(self) -> bool:
        return self.n_prefilled == len(self.prompt_ids)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.generated)

    def cached_ids(self) -> list[int]:
        """The tokens whose K/V are in the cache row, at positions 0, 1, ...: the prefilled
        prompt and every generated token but the newest (it is written by the next step)."""
        return (self.prompt_ids + self.generated)[: self.n_prefilled + max(0, len(self.generated) - 1)]

    def send(self, item: GenerationOutput | BaseException) -> None:
        """Hands `item` to the request: at the end of the engine's step (`Posts.deliver`)."""
        self.posts.add(self, item)


class Posts:
    """What the engine thread has for the requests during one step, handed to their event loops
    after it in one call per loop: each `call_soon_threadsafe` wakes the loop with a write to its
    self-pipe, and the loop then runs every request's hand-over in one turn."""

    def __init__(self) -> None:
        self._items: list[tuple[Sequence, GenerationOutput | BaseException]] = []

    def add(self, seq: Sequence, item: GenerationOutput | BaseException) -> None:
        self._items.append((seq, item))

    def deliver(self) -> None:
        if not self._items:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, GenerationOutput | BaseException]]] = {}
        for seq, item in self._items:
            by_loop.setdefault(seq.loop, []).append((seq.outputs, item))
        self._items = []
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[asyncio.Queue, GenerationOutput | BaseException]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


@dataclass(eq=False)
class _Launched:
    """A decode step queued on the device whose ids the host has not read yet (see `_step`)."""

    seqs: list[Sequence]  # by row
    positions: list[int]
    draft: Draft
    fetch: Fetch
    tokens: torch.Tensor  # the drafted ids by row, on the device: the next step's fed rows read them
    # Rows fed a drafted id that `finish` then changed (the rare whole-vocabulary sort): their
    # result is discarded and the row decoded again from the right id.
    stale: set[Sequence] = field(default_factory=set)


class BatchedEngine:
    def __init__(
        self,
        loaded: LoadedModel,
        *,
        weights: WeightFormat = "fp32",
        max_batch_size: int = 16,
        max_context: int | None = None,
        prefill_chunk_tokens: int | None = None,
        prefix_caching: bool = True,
        max_chunks_per_s: float = 150.0,
        max_stream_chunks_per_s: float = 40.0,
        cuda_graphs: bool = True,
        gpu_memory_fraction: float = 0.9,
        overlap_steps: bool | None = None,
    ):
        self._tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.use_cuda_graphs = cuda_graphs and self.device.type == "cuda"
        # Queue each decode step before reading the last one's ids (see `_step`). Default: on a
        # GPU, where the device then computes while the host streams text; on the CPU the host
        # is the device, so it would only deliver every token a step later.
        self.overlap_steps = self.device.type == "cuda" if overlap_steps is None else overlap_steps
        self._launched: _Launched | None = None
        self.gpu_memory_fraction = gpu_memory_fraction
        self.max_batch_size = max_batch_size
        self.max_context = max_context or loaded.context_length
        # Newcomers' prompt tokens a step takes: every running stream waits for them. Default:
        # 2,048 on a GPU, where an eager step of short prompts costs its ~7 ms of kernel
        # launches almost whatever its tokens (H100, SmolLM2: 1 prompt of 45 tokens 7.1 ms, 45
        # of them 8.0, 182 of them 28), so new chats arriving together share few steps, and a
        # long prompt's chunk of 2,048 costs a step ~12 ms (8,192 tokens: 23 ms, not measured
        # as a default). 256 on a CPU, where every token costs.
        self.prefill_chunk_tokens = prefill_chunk_tokens or (2048 if self.device.type == "cuda" else 256)
        self.prefix_caching = prefix_caching
        self.max_chunks_per_s = max_chunks_per_s
        self.max_stream_chunks_per_s = max_stream_chunks_per_s
        self._eos_ids = eos_token_ids(loaded)
        self._token_texts: dict[int, str] = {}
        self._slots: list[Sequence | None] = [None] * max_batch_size
        # What a free slot's cache row still holds from its last request (see `_reuse_prefix`).
        self._left_in_slot: list[list[int]] = [[] for _ in range(max_batch_size)]
        self._freed_at = [0] * max_batch_size  # in frees so far, for least-recently-used order
        self._frees = 0
        self._waiting: deque[Sequence] = deque()
        self._posts = Posts()  # written and delivered by the engine thread only
        self._wakeup = threading.Condition()
        self._is_shut_down = False
        self._total = 0
        self.reused_prompt_tokens = 0  # prompt tokens prefix caching did not have to compute
        # All torch work, setup included, happens on the engine's thread (see torch_threads).
        self._ready = threading.Event()
        self._setup_error: BaseException | None = None
        # Handed over through an attribute, not the thread's args (which live as long as the
        # thread), so the caller can free transformers' copy of the weights once we are set up.
        self._to_load: tuple[LoadedModel, WeightFormat] | None = (loaded, weights)
        self._thread = threading.Thread(target=self._run, name="batched-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._setup_error is not None:
            raise self._setup_error

    def _setup(self, loaded: LoadedModel, weights: WeightFormat) -> None:
        w = self._weights = extract_weights(loaded.require_model(), weights)
        if self.device.type == "cuda":
            # Allocated whole (CUDA graphs hold its addresses), so sized to the memory there is.
            self.max_context = self._gpu_context(KVCache.bytes_per_position(len(w.layers), w.n_kv_heads, w.head_dim, w.dtype))
            initial_capacity = self.max_context
        else:
            initial_capacity = INITIAL_CAPACITY
        self._rope = rope_table(w, self.max_context)
        self._cache = KVCache(
            len(w.layers),
            self.max_batch_size,
            w.n_kv_heads,
            self.max_context,
            w.head_dim,
            w.dtype,
            self.device,
            initial_capacity,
        )
        self._sampling = SlotSampling.empty(self.max_batch_size + 1, self.max_context, self.device)  # + the scratch row
        self._eos_tensor = torch.tensor(self._eos_ids, dtype=torch.long, device=self.device)
        self._grammars = Grammars(self._tokenizer, w.embed.shape[0], self._eos_ids)
        self._masks = Masks(w.embed.shape[0], self.max_batch_size)
        self._graphs = (
            DecodeGraphs(w, self._cache, self._rope, self._sampling, self._eos_tensor, self.max_batch_size)
            if self.use_cuda_graphs
            else None
        )
        logger.info(
            "Batched engine on %s: %s weights, batch %d, context %d, KV cache %.0f MiB%s, CUDA graphs %s",
            self.device,
            weights,
            self.max_batch_size,
            self.max_context,
            self._cache.size_bytes / 2**20,
            "" if self.device.type == "cuda" else " (grows with the longest request)",
            "on" if self._graphs else "off",
        )

    def _gpu_context(self, bytes_per_position: int) -> int:
        """The context each of `max_batch_size` cache rows (and the scratch row) can have within
        `gpu_memory_fraction` of the GPU's free memory: the configured context if it fits."""
        free, _ = torch.cuda.mem_get_info(self.device)
        budget = int(free * self.gpu_memory_fraction)
        fits = budget // ((self.max_batch_size + 1) * bytes_per_position)
        if fits < min(self.max_context, 256):
            raise ValueError(
                f"the KV cache for {self.max_batch_size} requests needs {bytes_per_position * 256 / 2**20:.1f} MiB per "
                f"request for 256 tokens, but {self.gpu_memory_fraction} of the GPU's {free / 2**30:.1f} GiB free is "
                f"{budget / 2**30:.1f} GiB; lower max_batch_size or raise gpu_memory_fraction"
            )
        if fits < self.max_context:
            logger.warning(
                "KV cache: %d requests x %d tokens do not fit %.1f GiB (%s of %.1f GiB free); context cut to %d tokens",
                self.max_batch_size,
                self.max_context,
                budget / 2**30,
                self.gpu_memory_fraction,
                free / 2**30,
                fits,
            )
        return min(self.max_context, fits)

    # --- the asyncio side -------------------------------------------------------------------

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams) -> AsyncGenerator[GenerationOutput, None]:
        if not prompt_token_ids:
            raise InvalidRequestError("the prompt is empty: it has no tokens")
        if len(prompt_token_ids) >= self.max_context:
            raise PromptTooLongError(
                f"the prompt is {len(prompt_token_ids)} tokens but the engine's context is {self.max_context} "
                "tokens, with room needed for at least one new token; shorten the prompt"
            )
        check_logit_bias(params, self._weights.embed.shape[0])
        matcher = None if params.constraint is None else await self._matcher(params)
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        seq = Sequence(
            prompt_ids=list(prompt_token_ids),
            params=params,
            loop=asyncio.get_running_loop(),
            outputs=asyncio.Queue(),
            posts=self._posts,
            detokenizer=IncrementalDetokenizer(self._tokenizer),
            stop_matcher=StopStringMatcher(params.stop),
            seed=seed,
            matcher=matcher,
        )
        with self._wakeup:
            if self._is_shut_down:
                raise EngineShutDownError("the engine is shut down")
            self._waiting.append(seq)
            self._total += 1
            self._wakeup.notify()
        try:
            while True:
                item = await seq.outputs.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            # Closed early (client gone) or finished: either way the engine may drop it now.
            seq.is_cancelled = True
            with self._wakeup:
                self._wakeup.notify()

    async def _matcher(self, params: SamplingParams) -> llguidance.LLMatcher:
        """A matcher for the request's constraint: compiled in a worker thread the first time
        (a large schema takes 100 ms or more, and the caller's loop serves other requests)."""
        check_constraint(params)
        constraint = params.constraint
        assert constraint is not None
        if self._grammars.is_compiled(constraint):
            return self._grammars.matcher(constraint)
        return await asyncio.to_thread(self._grammars.matcher, constraint)

    def stats(self) -> EngineStats:
        active = sum(s is not None for s in self._slots)
        return EngineStats(
            active_requests=active,
            queued_requests=len(self._waiting),
            total_requests=self._total,
            reused_prompt_tokens=self.reused_prompt_tokens,
        )

    def shutdown(self) -> None:
        with self._wakeup:
            self._is_shut_down = True
            self._wakeup.notify()
        self._thread.join(timeout=30)

    # --- the engine thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            assert self._to_load is not None
            self._setup(*self._to_load)
            self._to_load = None
        except BaseException as exc:  # noqa: BLE001 - raised by __init__ in the caller's thread
            self._setup_error = exc
            return
        finally:
            self._ready.set()
        with torch.inference_mode():
            while True:
                with self._wakeup:
                    while not self._is_shut_down and not self._has_work():
                        self._wakeup.wait()
                    if self._is_shut_down:
                        break
                    self._admit()
                try:
                    self._step()
                except Exception as exc:  # noqa: BLE001 - fail the requests in the step, keep serving
                    logger.exception("engine step failed")
                    self._launched = None
                    for seq in self._running():
                        seq.send(exc)
                        self._free(seq, keep_cache=False)  # the failed step may have written part of it
                self._posts.deliver()
        error = EngineShutDownError("the engine shut down")
        for seq in [*self._running(), *self._waiting]:
            seq.send(error)
        self._posts.deliver()

    def _running(self) -> list[Sequence]:
        return [s for s in self._slots if s is not None]

    def _has_work(self) -> bool:
        return bool(self._waiting) or any(s is not None for s in self._slots) or self._launched is not None

    def _admit(self) -> None:
        free = [slot for slot, seq in enumerate(self._slots) if seq is None]
        if not self._waiting or not free:
            return
        leftovers = None
        if self.prefix_caching:
            # Rows are overwritten empty first, then least recently freed first; a newcomer
            # that continues a row's leftover (the next turn of that chat) takes that row.
            free.sort(key=lambda slot: (bool(self._left_in_slot[slot]), self._freed_at[slot], slot))
            leftovers = PrefixIndex((self._left_in_slot[slot], slot) for slot in free if self._left_in_slot[slot])
        # else the lowest free slots, so the decode batch stays dense
        order = iter(free)
        taken: set[int] = set()
        entries: list[SlotEntry] = []
        while self._waiting and len(taken) < len(free):
            seq = self._waiting.popleft()
            if seq.is_cancelled:
                continue
            seq.slot = self._pick_slot(seq, order, taken, leftovers)
            taken.add(seq.slot)
            try:
                entries.append(self._sampling.entry(seq.slot, seq.params, seq.seed, len(seq.prompt_ids)))
            except ValueError as exc:  # e.g. a top_k beyond int64
                # This request alone fails: it never joins a step, so it cannot fail others'.
                seq.send(InvalidRequestError(f"sampling parameters the engine cannot represent: {exc}"))
                continue
            self._slots[seq.slot] = seq
            if self.prefix_caching:
                seq.n_prefilled = common_prefix(seq.prompt_ids, self._left_in_slot[seq.slot], len(seq.prompt_ids) - 1)
                self.reused_prompt_tokens += seq.n_prefilled
            self._left_in_slot[seq.slot] = []
        self._sampling.write(entries)

    def _pick_slot(self, seq: Sequence, order: Iterator[int], taken: set[int], leftovers: PrefixIndex | None) -> int:
        """The free row whose leftover the prompt continues (`leftovers`, with prefix caching),
        else the next in `order` not `taken`. Rows in use are reachable by copying (`_reuse_prefix`)."""
        if leftovers is not None:
            shared, slot = leftovers.longest(seq.prompt_ids, len(seq.prompt_ids) - 1)
            if slot >= 0 and shared == min(len(self._left_in_slot[slot]), len(seq.prompt_ids) - 1):
                leftovers.discard(self._left_in_slot[slot], slot)
                return slot
        slot = next(slot for slot in order if slot not in taken)
        if leftovers is not None and self._left_in_slot[slot]:
            leftovers.discard(self._left_in_slot[slot], slot)
        return slot

    def _free(self, seq: Sequence, keep_cache: bool = True) -> None:
        if seq.slot >= 0 and self._slots[seq.slot] is seq:
            self._slots[seq.slot] = None
            self._left_in_slot[seq.slot] = seq.cached_ids() if keep_cache else []
            self._frees += 1
            self._freed_at[seq.slot] = self._frees

    def _cached_prefixes(self) -> PrefixIndex:
        """Every cache row's contents now, before this step's forward: the tokens whose K/V it
        holds, running or left behind by a finished request."""
        contents = [seq.cached_ids() if seq is not None else left for seq, left in zip(self._slots, self._left_in_slot)]
        return PrefixIndex((cached, slot) for slot, cached in enumerate(contents) if cached)

    def _reuse_prefix(self, seq: Sequence, cached: PrefixIndex, computing: PrefixIndex) -> bool:
        """Prefix caching: copies the longest start of `seq`'s prompt that another cache row
        holds (`cached`: running or left by a finished request: the same system prompt, or
        the earlier turns of the same conversation) instead of computing it again. Returns
        False if `seq` should rather wait a step because a prompt prefilling in this step
        (`computing`, up to its chunk's end) computes more of its prefix (16 identical new
        chats prefill once, not 16 times)."""
        limit = len(seq.prompt_ids) - 1  # its last token must run, to give the first new token's logits
        shared, slot = cached.longest(seq.prompt_ids, limit, exclude=seq.slot)
        if shared > seq.n_prefilled:
            self._cache.copy_positions(slot, seq.slot, seq.n_prefilled, shared)
            self.reused_prompt_tokens += shared - seq.n_prefilled
            seq.n_prefilled = shared
        return computing.longest(seq.prompt_ids, limit)[0] <= seq.n_prefilled

    def _step(self) -> None:
        for seq in self._running():
            if seq.is_cancelled:
                self._free(seq)
        if self._launched is not None:
            launched, self._launched = self._launched, None
            if all(s.is_prefilled and not s.steps_alone for s in self._running()):
                # Steady decoding: the next step is queued before this one's ids are read, so
                # the device computes it while the host streams this one's text.
                self._launched = self._launch_decode(launched)
            self._complete(launched)
            return  # else newcomers are admitted and planned with every row's ids on the host
        decoding = [s for s in self._running() if s.is_prefilled]
        completing: list[Sequence] = []
        # Prompt chunks go to newcomers in arrival-slot order, up to the step's token budget.
        chunks, budget = [], self.prefill_chunk_tokens
        computing = PrefixIndex()
        cached = self._cached_prefixes() if self.prefix_caching and len(decoding) < len(self._running()) else PrefixIndex()
        for seq in self._running():
            if seq.is_prefilled or budget <= 0:
                continue
            if self.prefix_caching and not self._reuse_prefix(seq, cached, computing):
                continue
            length = min(budget, len(seq.prompt_ids) - seq.n_prefilled)
            is_last = seq.n_prefilled + length == len(seq.prompt_ids)
            chunk = PromptChunk(seq.slot, seq.n_prefilled, length, is_last)
            chunks.append((chunk, seq.prompt_ids[seq.n_prefilled : seq.n_prefilled + length]))
            seq.n_prefilled += length
            budget -= length
            computing.add(seq.prompt_ids[: seq.n_prefilled], seq.slot)
            if is_last:
                completing.append(seq)
        sampled = decoding + completing  # the rows whose logits the step samples, in order
        if not chunks and self.overlap_steps and not any(seq.steps_alone for seq in sampled):
            self._launched = self._launch_decode(None)
            return
        if not decoding and not chunks:
            return
        decode = [(s.slot, s.length - 1, s.generated[-1], -1) for s in decoding]
        constrained = [row for row, seq in enumerate(sampled) if seq.matcher is not None]
        scored = [row for row, seq in enumerate(sampled) if seq.params.logprobs is not None]
        masks = None
        if constrained:  # each constrained row's allowed tokens, after the last token it took
            masks = constrained, self._masks.fill([m for row in constrained if (m := sampled[row].matcher) is not None])
        top = max((sampled[row].params.logprobs or 0 for row in scored), default=0)
        draft, _, scores = self._launch(decode, chunks, Needs.of(s.params for s in sampled), None, masks, (scored, top))
        tokens = finish(draft)  # the one transfer back per step: the chosen ids
        logprobs = dict(zip(scored, scores.of([tokens[row] for row in scored]))) if scores is not None else {}
        interval = self._chunk_interval(len(sampled))
        for row, (seq, token) in enumerate(zip(sampled, tokens)):
            self._advance(seq, token, interval, logprobs.get(row))

    def _launch(
        self,
        decode: list[DecodeRow],
        chunks: list[tuple[PromptChunk, list[int]]],
        needs: Needs,
        previous: torch.Tensor | None,
        masks: tuple[list[int], torch.Tensor] | None = None,
        scored: tuple[list[int], int] = ([], 0),
    ) -> tuple[Draft, torch.Tensor, StepLogprobs | None]:
        """Queues one step (`decode` rows, then `chunks`; `previous`: the ids the rows' previous
        rows read, see `DecodeRow`) -> its draft of one id per decode row and completed prompt
        (sampled as `needs` says), and those ids by row on the device. `masks`: the constrained
        rows (by logit row) and their bitmasks (see `grammar.Masks`); `scored`: the rows whose
        logprobs are asked (by logit row) and how many alternatives the most asking one wants,
        whose `StepLogprobs` are then returned too. Such steps run eagerly."""
        rows, top = scored
        if self._graphs is not None and not chunks and masks is None and not rows and self._graphs.bucket(len(decode)):
            if previous is not None and previous is not self._graphs.previous:
                self._graphs.previous[: len(previous)].copy_(previous)  # an eager step's ids
            return self._graphs.decode(decode, needs), self._graphs.previous, None  # forward pass and sampling, replayed
        longest = max([p + 1 for _, p, _, _ in decode] + [c.start + c.length for c, _ in chunks])
        self._cache.reserve(longest)
        batch = build_step([row[:3] for row in decode], chunks, cuda=self.device.type == "cuda")
        batch = batch.to(self.device)
        if previous is not None:
            previous_rows = [row[3] for row in decode] + [-1] * (len(batch.token_ids) - len(decode))
            batch.token_ids = fed_token_ids(batch.token_ids, torch.tensor(previous_rows, device=self.device), previous)
        logits = forward(self._weights, self._cache, self._rope, batch)
        # Before bias, penalties, masks and temperature change the logits (in place).
        scores = StepLogprobs(logits, rows, top) if rows else None
        if masks is not None:
            self._masks.apply(logits, *masks)
        step_rows = StepRows(batch.slots[batch.logit_rows], batch.positions[batch.logit_rows], needs)
        draft = draw(logits, step_rows, self._sampling, self._cache.tokens[:, :longest], self._eos_tensor)
        return draft, draft.tokens, scores

    def _launch_decode(self, previous: _Launched | None) -> _Launched | None:
        """Queues a decode step for every running request without waiting for `previous` (the
        step queued before it, if any): a request with a row there continues from the id that
        row drafts, read on the device. Requests whose drafted id is predictably their last
        (max_tokens, the context) sit this step out."""
        previous_row = (
            {} if previous is None else {seq: row for row, seq in enumerate(previous.seqs) if seq not in previous.stale}
        )
        decode: list[DecodeRow] = []
        seqs = []
        for seq in self._running():
            if not seq.is_prefilled:
                continue
            row = previous_row.get(seq, -1)
            if row >= 0:
                if self._at_length_limit(seq, pending=1):
                    continue
                decode.append((seq.slot, seq.length, 0, row))
            else:
                decode.append((seq.slot, seq.length - 1, seq.generated[-1], -1))
            seqs.append(seq)
        if not seqs:
            return None
        needs = Needs.of(s.params for s in seqs)
        draft, tokens, _ = self._launch(decode, [], needs, None if previous is None else previous.tokens)
        if self._graphs is not None and tokens is self._graphs.previous and needs.sampled:
            draft = draft.clone()  # the next replay overwrites the graph's output, and `finish` may sort it
        return _Launched(seqs, [p for _, p, _, _ in decode], draft, Fetch.start(draft), tokens)

    def _complete(self, launched: _Launched) -> None:
        """Reads `launched`'s ids and advances its requests; rows whose request was freed
        meanwhile (finished, cancelled) or which were fed a wrong id are dropped."""
        drafted, _ = launched.fetch.wait()
        tokens = finish(launched.draft, launched.fetch)
        valid = [
            (seq, token)
            for seq, position, token in zip(launched.seqs, launched.positions, tokens)
            if self._slots[seq.slot] is seq and seq not in launched.stale and position == seq.length - 1
        ]
        if drafted != tokens and self._launched is not None:
            fed = {seq for seq, position in zip(self._launched.seqs, self._launched.positions) if position == seq.length}
            for seq, drafted_id, token in zip(launched.seqs, drafted, tokens):
                if drafted_id != token and seq in fed:
                    self._launched.stale.add(seq)
        interval = self._chunk_interval(len(valid))
        for seq, token in valid:
            self._advance(seq, token, interval)

    def _chunk_interval(self, rows: int) -> float:
        """The least time between two streamed chunks of one request. Every streamed chunk costs
        CPU in the replica, the ingress, the proxy and the client (~2.5 ms in all on 2 cores),
        taken from the engine on a small machine. So the replica sends at most about
        `max_chunks_per_s` in all and each stream at most `max_stream_chunks_per_s` (the caller
        picks them for its device: fewer where the cores are shared): many streams get
        their text every few steps; a single stream gets every token when a step takes longer
        than 1 / `max_stream_chunks_per_s`."""
        return max(1 / self.max_stream_chunks_per_s, rows / self.max_chunks_per_s)

    def _at_length_limit(self, seq: Sequence, pending: int = 0) -> bool:
        """Whether `seq`, with `pending` more tokens than it has, is at max_tokens or the context."""
        return len(seq.generated) + pending >= seq.params.max_tokens or seq.length + pending >= self.max_context

    def _advance(
        self, seq: Sequence, token: int, interval: float, logprobs: tuple[float, list[tuple[int, float]]] | None = None
    ) -> None:
        """Appends one token (with its logprobs, if asked: its own and its alternatives'); sends
        the request its new text if `interval` seconds passed since the last send (or this is
        its first), and the finish if it is done."""
        seq.generated.append(token)
        piece = seq.detokenizer.add(token)
        # Like the usage, without the EOS that ends the answer.
        if logprobs is not None and (token not in self._eos_ids or seq.params.ignore_eos):
            logprob, top = logprobs
            alternatives = [[self._token_text(t), lp] for t, lp in top[: seq.params.logprobs]]
            seq.unsent_logprobs.append([piece, logprob, alternatives])
        text = seq.stop_matcher.feed(piece)
        finish: FinishReason | None = None
        # Like OpenAI's usage, the completion count leaves out the EOS token that ends it.
        completion_tokens = len(seq.generated)
        if seq.matcher is not None and not seq.matcher.consume_token(token):
            logger.error("a constrained answer took a token its grammar refused: %s", seq.matcher.get_error())
        if seq.stop_matcher.is_stopped:
            finish = "stop"
        elif token in self._eos_ids and not seq.params.ignore_eos:
            finish = "stop"
            completion_tokens -= 1
        elif seq.matcher is not None and seq.matcher.is_stopped():
            finish = "stop"  # the grammar is complete: nothing but EOS could follow (ignore_eos or not)
            completion_tokens -= token in self._eos_ids
        elif self._at_length_limit(seq):
            finish = "length"
        if finish is not None and not seq.stop_matcher.is_stopped:
            text += seq.stop_matcher.feed(seq.detokenizer.flush())
            if seq.stop_matcher.is_stopped:
                finish = "stop"
            else:
                text += seq.stop_matcher.flush()
        if finish is not None:
            self._free(seq)  # before the finish is sent, so the caller sees the slot free
        seq.unsent_text += text
        now = time.monotonic()
        if finish is not None or (seq.unsent_text and now - seq.last_sent >= interval):
            logprobs_out = seq.unsent_logprobs if seq.params.logprobs is not None else None
            seq.send(GenerationOutput(seq.unsent_text, len(seq.prompt_ids), completion_tokens, finish, logprobs_out))
            seq.unsent_text, seq.unsent_logprobs, seq.last_sent = "", [], now

    def _token_text(self, token: int) -> str:
        """A token's text on its own, as a logprob's alternative shows it (kept: at most the
        vocabulary's texts, and a few decodes a token saved for every request asking)."""
        if token not in self._token_texts:
            # transformers types `decode` as str | list[str]: a list only for a batch of sequences.
            self._token_texts[token] = self._tokenizer.decode([token])  # type: ignore[assignment]
        return self._token_texts[token]
