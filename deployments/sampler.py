"""Picks each running request's next token from a batch of logits, each row under its own
`SamplingParams`: repeat penalty, suppressed ids (EOS before `min_tokens`), then greedy, or
temperature / top-k / top-p sampling with the request's own `torch.Generator`.

A request's draw depends only on its own logits row and generator, never on which other
requests share the step, so a seeded request repeats exactly. Does not own stopping or text
(see `batched_engine`, `detokenizer`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deployments.sampling import SamplingParams


@dataclass
class RowSampling:
    """What the sampler needs to know about one logits row."""

    params: SamplingParams
    history: list[int]  # the last repeat_last_n of prompt + generated token ids, oldest first
    generator: torch.Generator
    suppressed_ids: tuple[int, ...] = ()


def apply_repeat_penalty(logits: torch.Tensor, history: list[int], penalty: float, last_n: int) -> None:
    """In place on one row [vocab]: each token seen in the last `last_n` ids of `history` has its
    logit divided by `penalty` when positive and multiplied by it when negative (once per
    token, however often it was seen)."""
    if penalty == 1.0 or last_n <= 0 or not history:
        return
    seen = torch.tensor(sorted(set(history[-last_n:])), dtype=torch.long)
    values = logits[seen]
    logits[seen] = torch.where(values > 0, values / penalty, values * penalty)


def sample(logits: torch.Tensor, rows: list[RowSampling]) -> list[int]:
    """logits [B, vocab] fp32 (modified in place) -> one token id per row."""
    for i, row in enumerate(rows):
        apply_repeat_penalty(logits[i], row.history, row.params.repeat_penalty, row.params.repeat_last_n)
        if row.suppressed_ids:
            logits[i, list(row.suppressed_ids)] = float("-inf")
    tokens = logits.argmax(dim=-1).tolist()
    sampled = [i for i, row in enumerate(rows) if not row.params.is_greedy]
    if not sampled:
        return tokens
    index = torch.tensor(sampled)
    temperatures = torch.tensor([rows[i].params.temperature for i in sampled])[:, None]
    scaled = logits[index] / temperatures  # [S, vocab]
    needs_filter = any(rows[i].params.top_k > 0 or rows[i].params.top_p < 1.0 for i in sampled)
    if needs_filter:
        # One sort for all sampled rows; then top-k and top-p are both cut-offs by rank.
        # Top-p counts mass after top-k, as transformers' warpers do (k first, then p).
        scaled, order = scaled.sort(dim=-1, descending=True)
        ranks = torch.arange(scaled.shape[-1])[None, :]
        top_k = torch.tensor([rows[i].params.top_k or scaled.shape[-1] for i in sampled])[:, None]
        scaled = scaled.masked_fill(ranks >= top_k, float("-inf"))
        probs = scaled.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        top_p = torch.tensor([rows[i].params.top_p for i in sampled])[:, None]
        # Rank 0 always survives, so a row never ends up with nothing to draw from.
        scaled = scaled.masked_fill((mass_before >= top_p) & (ranks > 0), float("-inf"))
    probs = scaled.softmax(dim=-1)
    for j, i in enumerate(sampled):
        choice = torch.multinomial(probs[j], 1, generator=rows[i].generator).item()
        tokens[i] = order[j, choice].item() if needs_filter else choice
    return tokens
