"""Picks each running request's next token from a batch of logits, every row under its own
`SamplingParams`, in a few batched tensor ops on the logits' device (CPU or GPU): logit bias, repeat
penalty, presence and frequency penalties, EOS suppressed before `min_tokens`, then greedy, or
temperature / top-k / top-p sampling.

The per-request settings live in `SlotSampling`, a table with one entry per KV-cache row written
once when a request is admitted, so a step sends the device nothing but the rows' slots and
positions (which the forward pass needs anyway) and reads back one id per row. On a GPU at small
batches the sampler's cost is its number of kernel launches, not its arithmetic; at 256 rows it is
its passes over the [rows, vocabulary] logits: the code counts both.

Sampling draws one uniform number per row and step from a counter-based hash of (seed, step),
not from a stateful generator: a request's draw depends only on its own logits, seed and token
index, never on which requests share the step, so a seeded request repeats exactly, and a whole
batch of rows samples in one op. Top-k and top-p work on the `CANDIDATES` most likely tokens (a
`topk`, not a sort of the vocabulary; see `top_candidates`); a row whose candidates do not hold
its top-p mass falls back to the whole vocabulary, so the result is exact either way.

Does not own stopping or text (see `batched`, `detokenizer`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import astuple, dataclass
from typing import Generic, NamedTuple, TypeVar

import torch

from deployments.engine.sampling_params import MAX_LOGIT_BIAS, SamplingParams

# Candidates for top-k / top-p. With SmolLM2 at temperature 0.7 and top_p 0.9, 64 tokens hold the
# mass in nearly every step; a row needing more takes the whole-vocabulary path.
CANDIDATES = 64
# A row whose candidates do not hold its top-p mass tries this many before sorting the vocabulary.
SORT_CANDIDATES = 1024
_MASK32 = 0xFFFFFFFF
# `top_candidates` on a CPU looks at the vocabulary in chunks of this many tokens.
TOPK_CHUNK = 128


def _hash32(x):
    """A 32-bit integer mix of an int or an int64 tensor (values < 2**32, no overflow): consecutive
    inputs give unrelated outputs."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


def seed_key(seed: int) -> int:
    """A request's seed (0 <= seed < 2**64) folded into the 32-bit key its draws hash (`uniform`):
    computed once at admission, so a step hashes only the step."""
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed {seed} is outside [0, 2**64)")
    return _hash32(_hash32(seed & _MASK32) ^ (seed >> 32))


def uniform(keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One number in (0, 1) per row, a pure function of (key [B] int64 from `seed_key`, step [B]
    int64, 0 <= step < 2**31). One hash of the key and a Weyl sequence of the step: 17 elementwise
    ops, each a kernel launch on a GPU."""
    bits = _hash32(keys ^ (steps * 0x9E3779B1 & _MASK32))
    return ((bits >> 8).float() + 0.5) / 2**24  # 24 bits: exact in float32, never 0 or 1


T = TypeVar("T")


class FloatColumns(NamedTuple, Generic[T]):
    """`SlotSampling.floats`' columns, in order: one request's values (`SlotSampling.entry`), or
    a step's rows' [B] tensors (`SlotSampling.rows`)."""

    temperature: T  # 0 = greedy
    divisor: T  # of the logits: the temperature, 1 for greedy rows
    top_p: T  # > 0
    repeat_penalty: T  # 1 = off (also when repeat_last_n is 0)
    sort_below: T  # the row needs the sort when its candidates hold less probability than this
    presence_penalty: T  # 0 = off
    frequency_penalty: T  # 0 = off


class IntColumns(NamedTuple, Generic[T]):
    """`SlotSampling.ints`' columns, in order, as `FloatColumns`."""

    top_k: T  # 0 = off
    kept: T  # candidates in the top-k set: top_k when they hold it, else all
    fits: T  # 1: the candidates hold the top-k set (0 < top_k <= CANDIDATES)
    filtered: T  # 1: top-k or top-p
    repeat_last_n: T
    last_prompt_position: T
    min_tokens: T


@dataclass
class SlotSampling:
    """Every cache row's sampling settings on the engine's device, in the forms a step uses them
    (derived once at admission rather than in every step: on a GPU each op of a step is a kernel
    launch, and at batch 1 the sampler's cost is its number of kernels). A step gathers its rows'
    settings in three ops."""

    floats: torch.Tensor  # [rows, len(FloatColumns._fields)] float32: a `FloatColumns` per row
    ints: torch.Tensor  # [rows, len(IntColumns._fields)] int64: an `IntColumns` per row
    u: torch.Tensor  # [rows, context] float32: the row's `uniform` draw for the token after each position
    # The row's logit bias: token ids and the values added to their logits, padded with (0, 0.0).
    bias_ids: torch.Tensor  # [rows, MAX_LOGIT_BIAS] int64
    bias_values: torch.Tensor  # [rows, MAX_LOGIT_BIAS] float32

    @classmethod
    def empty(cls, rows: int, context: int, device: torch.device) -> SlotSampling:
        return cls(
            torch.zeros(rows, len(FloatColumns._fields), device=device),
            torch.zeros(rows, len(IntColumns._fields), dtype=torch.int64, device=device),
            torch.zeros(rows, context, device=device),
            torch.zeros(rows, MAX_LOGIT_BIAS, dtype=torch.int64, device=device),
            torch.zeros(rows, MAX_LOGIT_BIAS, device=device),
        )

    @staticmethod
    def entry(slot: int, params: SamplingParams, seed: int, prompt_tokens: int) -> SlotEntry:
        """Cache row `slot`'s settings for a request admitted with `params`, `seed` and a prompt
        of `prompt_tokens`. ValueError if the table cannot hold them (a seed beyond 64 bits, a
        number beyond int64)."""
        p, k = params, CANDIDATES
        fits = 0 < p.top_k <= k  # the top-k set lies among the candidates
        if p.is_greedy or not p.is_filtered or fits:
            sort_below = -1.0  # never sorts
        elif p.top_k > k:
            sort_below = 2.0  # always sorts
        else:
            sort_below = p.top_p  # sorts when the candidates hold less than the top-p mass
        penalty = p.repeat_penalty if p.penalizes_repeats else 1.0
        floats = FloatColumns(
            temperature=p.temperature,
            divisor=p.temperature or 1.0,
            top_p=max(p.top_p, 1e-9),
            repeat_penalty=penalty,
            sort_below=sort_below,
            presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty,
        )
        ints = IntColumns(
            top_k=p.top_k,
            kept=p.top_k if fits else k,
            fits=fits,
            filtered=p.is_filtered,
            repeat_last_n=p.repeat_last_n,
            last_prompt_position=prompt_tokens - 1,
            min_tokens=p.min_tokens,
        )
        for value in ints:
            if not -(2**63) <= value < 2**63:
                raise ValueError(f"{value} does not fit in 64 bits")
        if len(p.logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias holds {len(p.logit_bias)} tokens, more than {MAX_LOGIT_BIAS}")
        return SlotEntry(slot, floats, ints, seed_key(seed), p.logit_bias)

    def write(self, entries: list[SlotEntry]) -> None:
        """At admission: each entry's request samples under its settings in its cache row. All
        newcomers of a step at once: a GPU's batch of 256 fills at once, and written one request
        at a time, each one's draws on the host would delay every newcomer's first token (docs/gpu.md)."""
        if not entries:
            return
        slots = self._on_device([e.slot for e in entries], torch.int64)
        ints = self._on_device([e.ints for e in entries], torch.int64)
        self.floats.index_copy_(0, slots, self._on_device([e.floats for e in entries], torch.float32))
        self.ints.index_copy_(0, slots, ints)
        # The rows' biases: cleared whole (a row's previous request leaves none behind), then
        # the few requests that have one written pair by pair.
        self.bias_ids.index_fill_(0, slots, 0)
        self.bias_values.index_fill_(0, slots, 0.0)
        pairs = [(e.slot, column, token, value) for e in entries for column, (token, value) in enumerate(e.logit_bias)]
        if pairs:
            rows, columns, tokens, values = zip(*pairs)
            where = self._on_device([rows, columns], torch.int64)
            self.bias_ids[where[0], where[1]] = self._on_device(list(tokens), torch.int64)
            self.bias_values[where[0], where[1]] = self._on_device(list(values), torch.float32)
        # Each row's draw for the token after every position, computed where the table lives:
        # integer ops, so the same numbers on any device.
        keys = self._on_device([[e.key] for e in entries], torch.int64)
        last_prompt_position = IntColumns(*ints.unbind(1)).last_prompt_position[:, None]
        generated_before = (torch.arange(self.u.shape[1], device=self.u.device) - last_prompt_position).clamp(min=0)
        self.u.index_copy_(0, slots, uniform(keys, generated_before))

    def _on_device(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        row = torch.tensor(values, dtype=dtype)
        # From pinned memory, without waiting: a copy from pageable memory would wait for every
        # step queued on the GPU (the engine queues steps ahead, see `batched`).
        return row.pin_memory().to(self.u.device, non_blocking=True) if self.u.is_cuda else row

    def rows(
        self, slots: torch.Tensor, positions: torch.Tensor
    ) -> tuple[FloatColumns[torch.Tensor], IntColumns[torch.Tensor], torch.Tensor]:
        """The settings of a step's rows, each column [B]: those of cache rows `slots`, and their
        draws for the token after `positions`."""
        return FloatColumns(*self.floats[slots].unbind(1)), IntColumns(*self.ints[slots].unbind(1)), self.u[slots, positions]


@dataclass(frozen=True)
class SlotEntry:
    """One admitted request's row of `SlotSampling` (`SlotSampling.entry`)."""

    slot: int
    floats: FloatColumns[float]
    ints: IntColumns[int]
    key: int  # its seed's `seed_key`
    logit_bias: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Needs:
    """Which parts of `draw` a step's rows use: an eager step skips the work no row needs, and
    a CUDA graph is captured per `Needs` variant (see `cuda_graphs`), since inside a graph the
    host cannot skip anything. `Needs()` is everything."""

    sampled: bool = True  # some row samples (temperature > 0)
    greedy: bool = True  # some row is greedy (temperature 0)
    bias: bool = True  # some row has a logit bias
    unfiltered: bool = True  # some row samples from the whole vocabulary (no top-k, no top-p)
    penalty: bool = True  # some row has a repeat penalty
    occurrences: bool = True  # some row has a presence or frequency penalty
    min_tokens: bool = True  # some row suppresses EOS before min_tokens

    @classmethod
    def of(cls, params: Iterable[SamplingParams]) -> Needs:
        params = list(params)
        return cls(
            sampled=any(not p.is_greedy for p in params),
            greedy=any(p.is_greedy for p in params),
            bias=any(p.logit_bias for p in params),
            unfiltered=any(not p.is_greedy and not p.is_filtered for p in params),
            penalty=any(p.penalizes_repeats for p in params),
            occurrences=any(p.penalizes_occurrences for p in params),
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

    def __getitem__(self, rows: slice | list[int]) -> Draft:
        return self._map(lambda t: t[rows])

    def clone(self) -> Draft:
        """A copy that outlives the CUDA graph output it was drafted into (the next replay
        overwrites that)."""
        return self._map(torch.clone)


class StepLogprobs:
    """Log-probabilities of a step: the log-softmax of the raw logits (before bias, penalties,
    masks and temperature, as OpenAI and vLLM report them) of the rows that ask, computed on the
    logits' device, and each such row's `top` most likely tokens. Rows that do not ask pay
    nothing."""

    def __init__(self, logits: torch.Tensor, rows: list[int], top: int):
        self._logprobs = logits[torch.tensor(rows, device=logits.device)].float().log_softmax(dim=-1)
        self._top = top_candidates(self._logprobs, top) if top else None  # on a CPU cheaper than torch's topk

    def of(self, tokens: list[int]) -> list[tuple[float, list[tuple[int, float]]]]:
        """Per row, the log-probability of its chosen token (`tokens`, by row) and its top
        tokens' (id, log-probability), most likely first."""
        chosen = torch.tensor(tokens, device=self._logprobs.device)[:, None]
        logprobs = self._logprobs.gather(1, chosen)[:, 0].tolist()
        if self._top is None:
            return [(logprob, []) for logprob in logprobs]
        values, ids = self._top
        return [(logprob, list(zip(i, v))) for logprob, i, v in zip(logprobs, ids.tolist(), values.tolist())]


def apply_repeat_penalty(
    logits: torch.Tensor, history: torch.Tensor, positions: torch.Tensor, penalty: torch.Tensor, last_n: torch.Tensor
) -> None:
    """In place on logits [B, vocab]: each token among a row's last `last_n` tokens (positions
    (position - last_n, position] of `history` [B, >position], the row's prompt and generated
    ids) has its logit divided by the penalty when positive and multiplied by it when negative,
    once however often it was seen (the original's rule).

    Touches the history's columns only, never the whole vocabulary (at 256 rows that is 8
    passes over 50 MB less): gathers the logits of the history's tokens and scatters them back
    penalized. Columns outside the window point at the row's last token, which is always in it,
    so every write to a logit carries the same value and the order of the writes does not matter."""
    columns = torch.arange(history.shape[1], device=history.device)
    in_window = (columns <= positions[:, None]) & (columns > (positions - last_n)[:, None])
    ids = torch.where(in_window, history, history.gather(1, positions[:, None]))
    seen = logits.gather(1, ids)
    penalty = torch.where(last_n > 0, penalty, 1.0)[:, None]  # no window: the last token is not penalized either
    logits.scatter_(1, ids, torch.where(seen > 0, seen / penalty, seen * penalty))


def apply_occurrence_penalties(
    logits: torch.Tensor,
    history: torch.Tensor,
    positions: torch.Tensor,
    last_prompt_position: torch.Tensor,
    presence: torch.Tensor,
    frequency: torch.Tensor,
) -> None:
    """In place on logits [B, vocab]: OpenAI's presence and frequency penalties. Each token the
    row has generated (positions (last_prompt_position, position] of `history`) has its logit
    lowered by `frequency` for every time it was generated and by `presence` once.

    Like `apply_repeat_penalty`, touches the history's columns only. The frequency penalty is a
    scatter-add of one value per generated column (columns outside add 0): repeated ids add it
    once each, and since every write to a logit adds the same value, the order of the additions
    (atomic on a GPU) does not change the sum. The presence penalty is a gather and scatter
    whose columns outside the generated ones point at the first generated token, so again every
    write to a logit carries the same value; a row that has generated nothing yet writes its
    logits back unchanged."""
    columns = torch.arange(history.shape[1], device=history.device)
    generated = (columns > last_prompt_position[:, None]) & (columns <= positions[:, None])
    logits.scatter_add_(1, history, generated * -frequency[:, None])
    first_generated = history.gather(1, torch.minimum(last_prompt_position + 1, positions)[:, None])
    ids = torch.where(generated, history, first_generated)
    presence = torch.where(positions > last_prompt_position, presence, 0.0)[:, None]
    logits.scatter_(1, ids, logits.gather(1, ids) - presence)


def top_candidates(scaled: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`scaled.topk(k)` of [B, vocab]: values and ids [B, k], most likely first. On a CPU, where
    torch's topk pays for every logit, in two stages: the k chunks of TOPK_CHUNK tokens with the
    largest maxima hold the k largest logits (a logit outside them is beaten by each of their
    maxima), so the topk runs over those k chunks only (figures: docs/engine.md#sampling). Other
    devices, and vocabularies this would not shrink, take torch's topk."""
    rows, vocab = scaled.shape
    chunks = vocab // TOPK_CHUNK
    if scaled.is_cuda or vocab % TOPK_CHUNK or chunks < 4 * k:
        return scaled.topk(min(k, vocab), dim=-1)
    chunked = scaled.view(rows, chunks, TOPK_CHUNK)
    best = chunked.amax(dim=-1).topk(k, dim=-1).indices  # [B, k] chunk numbers
    pool = chunked[torch.arange(rows, device=scaled.device)[:, None], best]  # [B, k, TOPK_CHUNK]
    values, where = pool.view(rows, -1).topk(k, dim=-1)
    return values, best.gather(1, where // TOPK_CHUNK) * TOPK_CHUNK + where % TOPK_CHUNK


def _draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse CDF: per row, the index where the cumulative probs [B, n] pass u [B] of their total."""
    cdf = probs.cumsum(dim=-1)
    index = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1))
    return index.squeeze(1).clamp_(max=probs.shape[-1] - 1)


def _filtered_draw(
    p: torch.Tensor, ids: torch.Tensor, top_k_set: torch.Tensor, top_p: torch.Tensor, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-p over the top-k set, sorted most likely first: `p` [B, n] the set's probabilities in
    the whole row's softmax, 0 beyond it, for the tokens `ids`; `top_k_set` [B, 1]: the row has a
    top-k set, all of it in `p`, whose mass top-p then takes as the whole. -> the drawn ids [B]
    and the set's probability [B]."""
    probs = p / torch.where(top_k_set, p.sum(dim=-1, keepdim=True), 1.0)
    mass_before = probs.cumsum(dim=-1) - probs  # rank 0 always stays: 0 < top_p
    return ids.gather(1, _draw(probs * (mass_before < top_p[:, None]), u)[:, None]).squeeze(1), probs.sum(dim=-1)


def draw(logits: torch.Tensor, rows: StepRows, table: SlotSampling, history: torch.Tensor, eos_ids: torch.Tensor) -> Draft:
    """logits [B, vocab] fp32 (modified in place) -> a `Draft`. `history` [rows of the cache,
    > max position]: every row's token ids by position. No host synchronisation and fixed
    shapes, so a CUDA graph can hold it (see `cuda_graphs`)."""
    needs = rows.needs
    floats, ints, u = table.rows(rows.slots, rows.positions)
    if needs.bias:  # the padding adds 0 to token 0
        logits.scatter_add_(1, table.bias_ids[rows.slots], table.bias_values[rows.slots])
    if needs.penalty or needs.occurrences:
        seen = history[rows.slots]  # the rows' token ids by position, gathered once for both penalties
        if needs.penalty:
            apply_repeat_penalty(logits, seen, rows.positions, floats.repeat_penalty, ints.repeat_last_n)
        if needs.occurrences:
            apply_occurrence_penalties(
                logits, seen, rows.positions, ints.last_prompt_position, floats.presence_penalty, floats.frequency_penalty
            )
    if needs.min_tokens and len(eos_ids):
        suppress = (rows.positions - ints.last_prompt_position < ints.min_tokens)[:, None]
        logits[:, eos_ids] = torch.where(suppress, -torch.inf, logits[:, eos_ids])
    if not needs.sampled:  # no row samples, so none needs the sort
        greedy = logits.argmax(dim=-1)
        return Draft(greedy, torch.zeros_like(greedy, dtype=torch.bool), logits, ints.top_k, floats.top_p, u)
    # In place: each new [B, vocab] tensor is a few MB that a CPU first has to fault in and zero.
    scaled = logits.div_(floats.divisor[:, None])
    # Top-k first, then top-p over the top-k survivors' renormalized mass, as transformers'
    # warpers do; on the most likely CANDIDATES tokens, sorted.
    _, ids = top_candidates(scaled, CANDIDATES)
    ranks = torch.arange(ids.shape[-1], device=ids.device)
    # The whole row's softmax, for the mass of a row without a top-k set among the candidates and
    # for the unfiltered rows' draw: one pass, and on a CPU cheaper than torch's exp alone.
    probs = scaled.softmax(dim=-1)  # [B, vocab]
    p = probs.gather(1, ids) * (ranks < ints.kept[:, None])
    tokens, mass = _filtered_draw(p, ids, ints.fits[:, None] != 0, floats.top_p, u)
    if needs.unfiltered:  # no filter: the whole vocabulary in id order, no sort needed
        tokens = torch.where(ints.filtered != 0, tokens, _draw(probs, u))
    if needs.greedy:  # a greedy row's divisor is 1: its scaled logits are its logits
        tokens = torch.where(floats.temperature == 0, scaled.argmax(dim=-1), tokens)
    # A row needs the sort when its kept set may reach beyond the candidates (see `SlotSampling.entry`).
    return Draft(tokens, mass < floats.sort_below, scaled, ints.top_k, floats.top_p, u)


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
    second draw for the rare rows whose candidates did not hold their top-p mass (a flat
    distribution, or top_k above the candidates), over their SORT_CANDIDATES most likely
    tokens or, where those miss it too, over the sorted vocabulary."""
    tokens, needs_sort = (fetch or Fetch.start(draft)).wait()
    rows = [row for row, flag in enumerate(needs_sort) if flag]
    if not rows:
        return tokens
    tokens = list(tokens)  # not the fetch's own list: the engine compares the two
    # First the SORT_CANDIDATES most likely tokens (a topk, far cheaper than sorting the vocabulary
    # for the rare rows whose candidates miss the mass), then the whole sort for the rows whose
    # mass lies beyond those too.
    d = draft[rows]
    _, ids = d.scaled.topk(min(SORT_CANDIDATES, d.scaled.shape[-1]), dim=-1)
    drawn, mass = _sorted_draw(d, ids)
    # Exact where the kept set lies among those tokens (top_k 0, no top-k, included) and
    # they hold the top-p mass.
    exact = ((d.top_k <= ids.shape[-1]) & (mass >= d.top_p)).tolist()
    for row, token, is_exact in zip(rows, drawn.tolist(), exact):
        if is_exact:
            tokens[row] = token
    rows = [row for row, is_exact in zip(rows, exact) if not is_exact]
    if rows:
        d = draft[rows]
        ids = d.scaled.argsort(dim=-1, descending=True)
        for row, token in zip(rows, _sorted_draw(d, ids)[0].tolist()):
            tokens[row] = token
    return tokens


def _sorted_draw(d: Draft, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`_filtered_draw` for `d`'s rows over `ids` [B, n], their most likely tokens in order: all
    of the vocabulary, or its top n. The probabilities come from the row's softmax as in `draw`,
    so either path gives a row the same numbers."""
    ranks = torch.arange(ids.shape[-1], device=ids.device)
    p = d.scaled.softmax(dim=-1).gather(1, ids) * ((d.top_k[:, None] == 0) | (ranks < d.top_k[:, None]))
    top_k_set = ((d.top_k > 0) & (d.top_k <= ids.shape[-1]))[:, None]
    return _filtered_draw(p, ids, top_k_set, d.top_p, d.u)
