from __future__ import annotations

import torch
from transformers import TopKLogitsWarper, TopPLogitsWarper

from deployments.sampler import RowSampling, sample
from deployments.sampling import SamplingParams


def draws(logits: torch.Tensor, params: SamplingParams, n: int = 300) -> set[int]:
    row = RowSampling(params=params, history=[], generator=torch.Generator().manual_seed(0))
    return {sample(logits.clone()[None], [row])[0] for _ in range(n)}


def allowed_by_transformers(logits: torch.Tensor, params: SamplingParams) -> set[int]:
    scores = logits[None] / params.temperature
    if params.top_k:
        scores = TopKLogitsWarper(params.top_k)(None, scores)
    scores = TopPLogitsWarper(params.top_p)(None, scores)
    return set(torch.isfinite(scores[0]).nonzero().flatten().tolist())


def test_top_k_then_top_p_keep_the_same_tokens_as_transformers():
    logits = torch.tensor([3.0, 2.9, 2.5, 1.0, 0.5, 0.0, -1.0, 2.0])
    for params in (
        SamplingParams(temperature=1.0, top_k=3, top_p=1.0, repeat_penalty=1.0),
        SamplingParams(temperature=1.0, top_k=0, top_p=0.6, repeat_penalty=1.0),
        SamplingParams(temperature=0.7, top_k=4, top_p=0.8, repeat_penalty=1.0),
    ):
        assert draws(logits, params) == allowed_by_transformers(logits, params)


def test_greedy_rows_take_the_argmax_and_eos_can_be_suppressed():
    logits = torch.tensor([[0.0, 5.0, 1.0], [0.0, 5.0, 1.0]])
    greedy = SamplingParams(temperature=0, repeat_penalty=1.0)
    rows = [
        RowSampling(greedy, [], torch.Generator()),
        RowSampling(greedy, [], torch.Generator(), suppressed_ids=(1,)),
    ]
    assert sample(logits, rows) == [1, 2]
