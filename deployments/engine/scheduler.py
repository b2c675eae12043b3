"""What each step of the batched engine runs: which waiting requests get a cache row (a
"slot"), which prompt tokens are computed and which are copied from another row.

Owns: the waiting queue, the slots and what a free slot's row still holds (least recently
freed first), admission, prefix caching (`_reuse_prefix`), chunked prefill and whether a
newcomer's prompt runs before the running requests' next tokens (`plan`). Does
not own the cache's tensors (the runner copies what a plan says), running a step
(`model_runner`) or outputs (`outputs`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from deployments.engine.forward import PromptChunk
from deployments.engine.prefix_index import PrefixIndex, common_prefix
from deployments.engine.sequence import Sequence


class PrefixCopy(NamedTuple):
    """Positions [start, end) of cache row `source`, copied into row `target` (prefix caching)."""

    source: int
    target: int
    start: int
    end: int


@dataclass
class StepPlan:
    """One step: a token for each row in `decode`, then `chunks` of newcomers' prompts (in
    order), after `copies` give newcomers the prefixes other rows already hold."""

    decode: list[Sequence] = field(default_factory=list)
    chunks: list[tuple[PromptChunk, list[int]]] = field(default_factory=list)
    completing: list[Sequence] = field(default_factory=list)  # whose prompt's last chunk runs
    scoring: list[Sequence] = field(default_factory=list)  # whose prompt chunk is scored (`PromptChunk.is_scored`)
    copies: list[PrefixCopy] = field(default_factory=list)

    @property
    def sampled(self) -> list[Sequence]:
        """The requests the step draws a token for, in its logits' row order."""
        return self.decode + self.completing

    @property
    def is_empty(self) -> bool:
        return not self.decode and not self.chunks


class Scheduler:
    def __init__(self, max_batch_size: int, prefill_chunk_tokens: int, prefix_caching: bool, newcomers_first: bool = False):
        # Newcomers' prompt tokens a step takes: every running stream waits for them.
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.prefix_caching = prefix_caching
        self.newcomers_first = newcomers_first
        self._decoding_waited = False  # the last plan left the decoding requests out (`plan`)
        self.waiting: deque[Sequence] = deque()
        self._slots: list[Sequence | None] = [None] * max_batch_size
        # What a free slot's cache row still holds from its last request (see `_reuse_prefix`).
        self._left_in_slot: list[list[int]] = [[] for _ in range(max_batch_size)]
        self._freed_at = [0] * max_batch_size  # in frees so far, for least-recently-used order
        self._frees = 0
        self.reused_prompt_tokens = 0  # prompt tokens prefix caching did not have to compute

    def running(self) -> list[Sequence]:
        return [s for s in self._slots if s is not None]

    def holds(self, seq: Sequence) -> bool:
        """Whether `seq` still has its slot (not finished, cancelled or failed meanwhile)."""
        return seq.slot >= 0 and self._slots[seq.slot] is seq

    def has_work(self) -> bool:
        return bool(self.waiting) or any(s is not None for s in self._slots)

    def is_decoding_alone(self) -> bool:
        """Whether every running request decodes and none needs its steps read one by one
        (`Sequence.steps_alone`): then a step may be queued before the last is read."""
        return all(s.is_prefilled and not s.steps_alone for s in self.running())

    def admit(self) -> list[Sequence]:
        """Gives waiting requests the free slots, in arrival order; returns them."""
        free = [slot for slot, seq in enumerate(self._slots) if seq is None]
        if not self.waiting or not free:
            return []
        leftovers = None
        if self.prefix_caching:
            # Rows are overwritten empty first, then least recently freed first; a newcomer
            # that continues a row's leftover (the next turn of that chat) takes that row.
            free.sort(key=lambda slot: (bool(self._left_in_slot[slot]), self._freed_at[slot], slot))
            leftovers = PrefixIndex((self._left_in_slot[slot], slot) for slot in free if self._left_in_slot[slot])
        # else the lowest free slots, so the decode batch stays dense
        order = iter(free)
        admitted: list[Sequence] = []
        taken: set[int] = set()
        while self.waiting and len(admitted) < len(free):
            seq = self.waiting.popleft()
            if seq.is_cancelled:
                continue
            seq.slot = self._pick_slot(seq, order, taken, leftovers)
            taken.add(seq.slot)
            admitted.append(seq)
            self._slots[seq.slot] = seq
            if self.prefix_caching and not seq.scores_prompt:
                seq.n_prefilled = common_prefix(seq.prompt_ids, self._left_in_slot[seq.slot], len(seq.prompt_ids) - 1)
                self.reused_prompt_tokens += seq.n_prefilled
            self._left_in_slot[seq.slot] = []
        return admitted

    def _pick_slot(self, seq: Sequence, order: Iterator[int], taken: set[int], leftovers: PrefixIndex | None) -> int:
        """The free row whose leftover the prompt continues (`leftovers`, with prefix caching),
        else the next in `order` not `taken`. Rows in use are reachable by copying (`_reuse_prefix`)."""
        if leftovers is not None and not seq.scores_prompt:
            shared, slot = leftovers.longest(seq.prompt_ids, len(seq.prompt_ids) - 1)
            if slot >= 0 and shared == min(len(self._left_in_slot[slot]), len(seq.prompt_ids) - 1):
                leftovers.discard(self._left_in_slot[slot], slot)
                return slot
        slot = next(slot for slot in order if slot not in taken)
        if leftovers is not None and self._left_in_slot[slot]:
            leftovers.discard(self._left_in_slot[slot], slot)
        return slot

    def free(self, seq: Sequence, keep_cache: bool = True) -> None:
        """Gives `seq`'s slot back; its row's contents stay reusable unless `keep_cache` is False."""
        if self.holds(seq):
            self._slots[seq.slot] = None
            self._left_in_slot[seq.slot] = seq.cached_ids() if keep_cache else []
            self._frees += 1
            self._freed_at[seq.slot] = self._frees

    def drop_cancelled(self) -> None:
        for seq in self.running():
            if seq.is_cancelled:
                self.free(seq)

    def plan(self) -> StepPlan:
        """The next step with every running request's last id on the host: each decoding
        request's next token, and prompt chunks for newcomers in slot order up to the step's
        token budget (chunked prefill: a long prompt costs running streams a few slower steps,
        not one long stall).

        With `newcomers_first`, a step that completes a newcomer's prompt runs without the
        decoding requests, so its first token does not wait for all of theirs too: where a
        step's time grows with its rows (a CPU), it comes sooner. They then wait at most every
        other step, however many newcomers come."""
        running = self.running()
        plan = StepPlan(decode=[s for s in running if s.is_prefilled])
        budget = self.prefill_chunk_tokens
        computing = PrefixIndex()
        cached = self._cached_prefixes() if self.prefix_caching and len(plan.decode) < len(running) else PrefixIndex()
        for seq in running:
            if seq.is_prefilled or budget <= 0:
                continue
            reuses = self.prefix_caching and not seq.scores_prompt  # a scored prompt is computed whole
            if reuses and not self._reuse_prefix(seq, cached, computing, plan.copies):
                continue
            length = min(budget, len(seq.prompt_ids) - seq.n_prefilled)
            is_last = seq.n_prefilled + length == len(seq.prompt_ids)
            chunk = PromptChunk(seq.slot, seq.n_prefilled, length, is_last, seq.scores_prompt)
            plan.chunks.append((chunk, seq.prompt_ids[seq.n_prefilled : seq.n_prefilled + length]))
            seq.n_prefilled += length
            budget -= length
            computing.add(seq.prompt_ids[: seq.n_prefilled], seq.slot)
            if is_last:
                plan.completing.append(seq)
            if seq.scores_prompt:
                plan.scoring.append(seq)
        self._decoding_waited = self.newcomers_first and bool(plan.completing and plan.decode) and not self._decoding_waited
        if self._decoding_waited:
            plan.decode = []
        return plan

    def _cached_prefixes(self) -> PrefixIndex:
        """Every cache row's contents now, before this step's forward: the tokens whose K/V it
        holds, running or left behind by a finished request."""
        contents = [seq.cached_ids() if seq is not None else left for seq, left in zip(self._slots, self._left_in_slot)]
        return PrefixIndex((cached, slot) for slot, cached in enumerate(contents) if cached)

    def _reuse_prefix(self, seq: Sequence, cached: PrefixIndex, computing: PrefixIndex, copies: list[PrefixCopy]) -> bool:
        """Prefix caching: copies the longest start of `seq`'s prompt that another cache row
        holds (`cached`: running or left by a finished request: the same system prompt, or
        the earlier turns of the same conversation) instead of computing it again. Returns
        False if `seq` should rather wait a step because a prompt prefilling in this step
        (`computing`, up to its chunk's end) computes more of its prefix (16 identical new
        chats prefill once, not 16 times)."""
        limit = len(seq.prompt_ids) - 1  # its last token must run, to give the first new token's logits
        shared, slot = cached.longest(seq.prompt_ids, limit, exclude=seq.slot)
        if shared > seq.n_prefilled:
            # `cached` is the rows' contents before this step's copies: no copy reads another's.
            copies.append(PrefixCopy(slot, seq.slot, seq.n_prefilled, shared))
            self.reused_prompt_tokens += shared - seq.n_prefilled
            seq.n_prefilled = shared
        return computing.longest(seq.prompt_ids, limit)[0] <= seq.n_prefilled

    @property
    def active(self) -> int:
        return sum(s is not None for s in self._slots)
