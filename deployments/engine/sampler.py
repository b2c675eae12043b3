"""Picks each running request's next token from a batch of logits, every row under its own
`SamplingParams`, in a few batched tensor ops on the logits' device (CPU or GPU): repeat penalty,
EOS suppressed before `min_tokens`, then greedy, or temperature / top-k / top-p sampling.

The per-request settings live in `SlotSampling`, a table with one entry per KV-cache row written
once when a request is admitted, so a step sends the device nothing but the rows' slots and
positions (which the forward pass needs anyway) and reads back one id per row.

Sampling draws one uniform number per row and step from a counter-based hash of (seed, step),
not from a stateful generator: a request's draw depends only on its own logits, seed and token
index, never on which requests share the step, so a seeded request repeats exactly, and a whole
batch of rows samples in one op. Top-k and top-p work on the `CANDIDATES` most likely tokens
(one `topk` instead of sorting the vocabulary); a row whose candidates do not hold its top-p
mass falls back to the whole vocabulary, so the result is exact either way.

Does not own stopping or text (see `batched`, `detokenizer`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import astuple, dataclass

import torch

from deployments.engine.sampling import SamplingParams

# Candidates for top-k / top-p. With SmolLM2 at temperature 0.7 and top_p 0.9, 64 tokens hold the
# mass in nearly every step; a row needing more takes the whole-vocabulary path.
CANDIDATES = 64
_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (int64 tensors holding values < 2**32, no overflow): consecutive
    inputs give unrelated outputs."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


def uniform(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One number in (0, 1) per row, a pure function of (seed [B] int64 >= 0, step [B] int64)."""
    key = _hash32(_hash32(seeds & _MASK32) ^ (seeds >> 32))
    bits = _hash32(key ^ _hash32(steps & _MASK32))
    return ((bits >> 8).float() + 0.5) / 2**24  # 24 bits: exact in float32, never 0 or 1


@dataclass
class SlotSampling:
    """Every cache row's sampling settings, as tensors [rows] on the engine's device."""

    temperature: torch.Tensor  # float32, 0 = greedy
    top_p: torch.Tensor  # float32
    top_k: torch.Tensor  # int64, 0 = off
    repeat_penalty: torch.Tensor  # float32, 1 = off
    repeat_last_n: torch.Tensor  # int64
    seed: torch.Tensor  # int64
    first_position: torch.Tensor  # int64: the position of the request's first generated token
    min_tokens: torch.Tensor  # int64

    @classmethod
    def empty(cls, rows: int, device: torch.device) -> SlotSampling:
        def zeros(dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(rows, dtype=dtype, device=device)

        f, i = torch.float32, torch.int64
        return cls(zeros(f), zeros(f), zeros(i), zeros(f), zeros(i), zeros(i), zeros(i), zeros(i))

    def set(self, slot: int, params: SamplingParams, seed: int, prompt_tokens: int) -> None:
        """At admission: the request in cache row `slot` samples under `params`."""
        p = params
        for tensor, value in (
            (self.temperature, p.temperature), (self.top_p, p.top_p), (self.top_k, p.top_k),
            (self.repeat_penalty, p.repeat_penalty), (self.repeat_last_n, p.repeat_last_n), (self.seed, seed),
            (self.first_position, prompt_tokens), (self.min_tokens, p.min_tokens),
        ):
            tensor[slot] = value


@dataclass(frozen=True)
class Needs:
    """Which parts of `draw` a step's rows use: an eager step skips the work no row needs, and
    a CUDA graph is captured per `Needs` variant (see `cuda_graphs`), since inside a graph the
    host cannot skip anything. `Needs()` is everything."""

    sampled: bool = True  # some row samples (temperature > 0)
    unfiltered: bool = True  # some row samples from the whole vocabulary (no top-k, no top-p)
    penalty: bool = True  # some row has a repeat penalty
    min_tokens: bool = True  # some row suppresses EOS before min_tokens

    @classmethod
    def of(cls, params: Iterable[SamplingParams]) -> Needs:
        params = list(params)
        return cls(
            sampled=any(not p.is_greedy for p in params),
            unfiltered=any(not p.is_greedy and p.top_k == 0 and p.top_p >= 1.0 for p in params),
            penalty=any(p.repeat_penalty != 1.0 and p.repeat_last_n > 0 for p in params),
            min_tokens=any(p.min_tokens > 0 for p in params),
        )

    def covers(self, other: Needs) -> bool:
        """Whether a step built for `self` does all that rows needing `other` need."""
        return all(mine or not theirs for mine, theirs in zip(astuple(self), astuple(other)))


@dataclass
class StepRows:
    """Which rows a step samples: their cache rows and the position of their last input token
    (device tensors), and which parts of sampling they need."""

    slots: torch.Tensor  # [B] int64
    positions: torch.Tensor  # [B] int64
    needs: Needs = Needs()


@dataclass
class Draft:
    """`draw`'s result: the chosen ids, except for rows whose top-p mass lies beyond the
    candidates (`needs_sort`), which `finish` draws again over the sorted vocabulary."""

    tokens: torch.Tensor  # [B] int64
    needs_sort: torch.Tensor  # [B] bool
    scaled: torch.Tensor  # [B, vocab]: the logits after penalty and temperature
    top_k: torch.Tensor  # [B]
    top_p: torch.Tensor  # [B]
    u: torch.Tensor  # [B]

    def _map(self, f) -> Draft:
        return Draft(*(f(t) for t in (self.tokens, self.needs_sort, self.scaled, self.top_k, self.top_p, self.u)))

    def __getitem__(self, rows: slice) -> Draft:
        return self._map(lambda t: t[rows])

    def clone(self) -> Draft:
        """A copy that outlives the CUDA graph output it was drafted into (the next replay
        overwrites that)."""
        return self._map(torch.clone)


def apply_repeat_penalty(
    logits: torch.Tensor, history: torch.Tensor, positions: torch.Tensor, penalty: torch.Tensor, last_n: torch.Tensor
) -> None:
    """In place on logits [B, vocab]: each token among a row's last `last_n` tokens (positions
    (position - last_n, position] of `history` [B, >position], the row's prompt and generated
    ids) has its logit divided by the penalty when positive and multiplied by it when negative,
    once however often it was seen (the original's rule)."""
    columns = torch.arange(history.shape[1], device=history.device)[None, :]
    in_window = (columns <= positions[:, None]) & (columns > positions[:, None] - last_n[:, None])
    seen = torch.zeros(logits.shape, dtype=torch.int32, device=logits.device)
    seen.scatter_add_(1, history.long(), in_window.int())
    factor = torch.where(logits > 0, penalty[:, None].reciprocal(), penalty[:, None])
    logits.copy_(torch.where(seen > 0, logits * factor, logits))


def _draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse CDF: per row, the index where the cumulative probs [B, n] pass u [B] of their total."""
    cdf = probs.cumsum(dim=-1)
    index = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1))
    return index.squeeze(1).clamp_(max=probs.shape[-1] - 1)


def _filtered_draw(
    values: torch.Tensor, ids: torch.Tensor, log_total: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
    u: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k then top-p over logits sorted most likely first (`values` [B, n], their token `ids`),
    with `log_total` [B, 1] the log of the softmax's denominator. Returns the drawn ids [B] and
    the kept set's probability mass before top-p [B]."""
    ranks = torch.arange(values.shape[-1], device=values.device)[None, :]
    in_top_k = (top_k[:, None] == 0) | (ranks < top_k[:, None])
    probs = (values - log_total).exp() * in_top_k
    mass_before = probs.cumsum(dim=-1) - probs
    keep = (mass_before < top_p[:, None]) | (ranks == 0)  # rank 0 always survives
    return ids.gather(1, _draw(probs * keep, u)[:, None]).squeeze(1), probs.sum(dim=-1)


def draw(logits: torch.Tensor, rows: StepRows, table: SlotSampling, history: torch.Tensor, eos_ids: torch.Tensor) -> Draft:
    """logits [B, vocab] fp32 (modified in place) -> a `Draft`. `history` [rows of the cache,
    > max position]: every row's token ids by position. No host synchronisation and fixed
    shapes, so a CUDA graph can hold it (see `cuda_graphs`)."""
    slots, positions = rows.slots, rows.positions
    if rows.needs.penalty:
        apply_repeat_penalty(logits, history[slots], positions, table.repeat_penalty[slots], table.repeat_last_n[slots])
    steps = positions + 1 - table.first_position[slots]  # tokens generated before this one
    if rows.needs.min_tokens and len(eos_ids):
        suppress = (steps < table.min_tokens[slots])[:, None]
        logits[:, eos_ids] = torch.where(suppress, -torch.inf, logits[:, eos_ids])
    greedy = logits.argmax(dim=-1)
    top_k, top_p = table.top_k[slots], table.top_p[slots]
    u = uniform(table.seed[slots], steps)
    if not rows.needs.sampled:
        return Draft(greedy, torch.zeros_like(greedy, dtype=torch.bool), logits, top_k, top_p, u)
    temperature = table.temperature[slots]
    is_greedy = temperature == 0
    scaled = logits / torch.where(is_greedy, 1.0, temperature)[:, None]
    # Top-k first, then top-p over the top-k survivors' renormalized mass, as transformers'
    # warpers do; on the most likely CANDIDATES tokens, sorted.
    k = min(CANDIDATES, scaled.shape[-1])
    values, ids = scaled.topk(k, dim=-1)
    ranks = torch.arange(k, device=scaled.device)[None, :]
    is_filtered = (top_k > 0) | (top_p < 1.0)
    top_k_fits = (top_k > 0) & (top_k <= k)
    # The softmax's denominator: over the top-k set when the candidates hold it, else the vocabulary.
    log_total = torch.where(
        top_k_fits[:, None],
        values.masked_fill(ranks >= top_k[:, None], -torch.inf).logsumexp(dim=-1, keepdim=True),
        scaled.logsumexp(dim=-1, keepdim=True),
    )
    tokens, mass = _filtered_draw(values, ids, log_total, top_k, top_p, u)
    if rows.needs.unfiltered:  # no filter: the whole vocabulary as it is, no sort needed
        tokens = torch.where(is_filtered, tokens, _draw(scaled.softmax(dim=-1), u))
    # Exact when the kept set ends inside the candidates: the top-k set fits, or (no top-k)
    # the candidates hold the top-p mass.
    is_exact = ~is_filtered | top_k_fits | ((top_k == 0) & (mass >= top_p))
    return Draft(torch.where(is_greedy, greedy, tokens), ~is_greedy & ~is_exact, scaled, top_k, top_p, u)


@dataclass
class Fetch:
    """A draft's ids and sort flags on their way to the host: on a GPU an asynchronous copy into
    pinned memory, so the host can queue the next step before waiting for this one."""

    host: torch.Tensor  # [2, B] int64: ids, needs_sort
    done: torch.cuda.Event | None = None
    _read: tuple[list[int], list[int]] | None = None

    @classmethod
    def start(cls, draft: Draft) -> Fetch:
        both = torch.stack([draft.tokens, draft.needs_sort.long()])
        if not both.is_cuda:
            return cls(both)
        host = torch.empty(both.shape, dtype=both.dtype, pin_memory=True)
        host.copy_(both, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return cls(host, done)

    def wait(self) -> tuple[list[int], list[int]]:
        """The drafted ids and which rows need the sort, once the copy is done."""
        if self._read is None:
            if self.done is not None:
                self.done.synchronize()
            tokens, needs_sort = self.host.tolist()
            self._read = tokens, needs_sort
        return self._read


def finish(draft: Draft, fetch: Fetch | None = None) -> list[int]:
    """The step's token ids on the host: one transfer (`fetch`, if already started), plus a
    sort over the vocabulary for the rare rows whose candidates did not hold their top-p mass
    (a flat distribution, or top_k above the candidates)."""
    tokens, needs_sort = (fetch or Fetch.start(draft)).wait()
    if not any(needs_sort):
        return tokens
    values, ids = draft.scaled.sort(dim=-1, descending=True)
    vocab = torch.arange(values.shape[-1], device=values.device)[None, :]
    in_top_k = (draft.top_k[:, None] == 0) | (vocab < draft.top_k[:, None])
    log_total = values.masked_fill(~in_top_k, -torch.inf).logsumexp(dim=-1, keepdim=True)
    resampled = _filtered_draw(values, ids, log_total, draft.top_k, draft.top_p, draft.u)[0]
    return torch.where(draft.needs_sort, resampled, draft.tokens).tolist()


def sample(
    logits: torch.Tensor, rows: StepRows, table: SlotSampling, history: torch.Tensor, eos_ids: torch.Tensor
) -> list[int]:
    """logits [B, vocab] fp32 (modified in place) -> one token id per row, on the host."""
    return finish(draw(logits, rows, table, history, eos_ids))
