from __future__ import annotations

import pytest
import torch
from transformers import TopKLogitsWarper, TopPLogitsWarper

from deployments.engine import sampler
from deployments.engine.sampler import (
    Needs,
    SlotSampling,
    StepRows,
    apply_occurrence_penalties,
    apply_repeat_penalty,
    draw,
    finish,
    seed_key,
    uniform,
)
from deployments.engine.sampling_params import SamplingParams
from tests.deployments.engine.helpers import MIXED, written_together

NO_EOS = torch.tensor([], dtype=torch.long)


def admit(table: SlotSampling, slot: int, params: SamplingParams, seed: int, prompt_tokens: int) -> None:
    """One request admitted into cache row `slot`, as the engine admits it."""
    table.write([table.entry(slot, params, seed, prompt_tokens)])


def sample(logits: torch.Tensor, rows: StepRows, table: SlotSampling, history: torch.Tensor, eos_ids: torch.Tensor) -> list[int]:
    """A step's token ids on the host, as the engine's step draws them: logits [B, vocab]
    (modified in place) -> one id per row."""
    return finish(draw(logits, rows, table, history, eos_ids))


def sample_rows(
    logits: torch.Tensor,
    params: list[SamplingParams],
    seeds: list[int],
    *,
    history: torch.Tensor | None = None,
    positions: list[int] | None = None,
    prompt_tokens: int = 1,
    eos_ids: torch.Tensor = NO_EOS,
) -> list[int]:
    """One step over rows 0..B-1 of a fresh table: row i samples logits[i] under params[i]."""
    rows = len(params)
    positions = positions or [prompt_tokens - 1] * rows
    table = SlotSampling.empty(rows, max(positions) + 1, logits.device)
    table.write([table.entry(slot, p, seed, prompt_tokens) for slot, (p, seed) in enumerate(zip(params, seeds))])
    history = history if history is not None else torch.zeros(rows, max(positions) + 1, dtype=torch.long)
    step = StepRows(torch.arange(rows), torch.tensor(positions), Needs.of(params))
    return sample(logits.clone(), step, table, history, eos_ids)


def draws(logits: torch.Tensor, params: SamplingParams, n: int = 400) -> list[int]:
    """n draws of one logits row, each under its own seed, all in one batch."""
    return sample_rows(logits.expand(n, -1), [params] * n, list(range(n)))


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
        assert set(draws(logits, params)) == allowed_by_transformers(logits, params)


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_draws_follow_the_softmax(top_p):
    torch.manual_seed(0)
    logits = torch.randn(200) * 2
    params = SamplingParams(temperature=0.8, top_p=top_p, repeat_penalty=1.0)
    n = 20_000
    counts = torch.bincount(torch.tensor(draws(logits, params, n)), minlength=200).float()
    probs = (logits / 0.8).softmax(-1)
    if top_p < 1.0:
        ordered, order = probs.sort(descending=True)
        keep = torch.zeros_like(probs, dtype=torch.bool)
        keep[order] = (ordered.cumsum(0) - ordered) < top_p
        probs = torch.where(keep, probs, 0.0) / probs[keep].sum()
    # Each token's count within 5 standard deviations of its expectation, and nothing outside the set.
    expected = probs * n
    assert ((counts - expected).abs() <= 5 * expected.clamp(min=1).sqrt() + 1).all()
    assert counts[probs == 0].sum() == 0


def test_the_candidate_shortcut_draws_exactly_what_a_full_sort_draws(monkeypatch):
    torch.manual_seed(1)
    logits = torch.randn(64, 1000) * torch.linspace(0.2, 4, 64)[:, None]  # flat to peaked rows
    params = [SamplingParams(temperature=0.7, top_p=0.9, top_k=k, repeat_penalty=1.0) for k in [0, 5, 40] * 21 + [0]]
    seeds = list(range(64))
    with_candidates = sample_rows(logits, params, seeds)
    monkeypatch.setattr(sampler, "CANDIDATES", 1000)  # every row exact on the first path: a full sort
    assert sample_rows(logits, params, seeds) == with_candidates
    monkeypatch.setattr(sampler, "CANDIDATES", 2)  # nearly every row takes the fallback
    assert sample_rows(logits, params, seeds) == with_candidates  # on its 1,024 (here all 1,000) tokens
    monkeypatch.setattr(sampler, "SORT_CANDIDATES", 30)  # the flatter rows' mass lies beyond: sorted
    assert sample_rows(logits, params, seeds) == with_candidates


def test_a_seeded_row_draws_the_same_alone_and_among_others():
    torch.manual_seed(2)
    logits = torch.randn(4, 300)
    params = [
        SamplingParams(temperature=0.7, top_p=0.9),
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.3, top_k=20),
        SamplingParams(temperature=0.7, top_p=1.0),
    ]
    together = sample_rows(logits, params, [7, 8, 9, 10])
    alone = [sample_rows(logits[i : i + 1], [params[i]], [seed])[0] for i, seed in enumerate([7, 8, 9, 10])]
    assert together == alone
    assert together[1] == int(logits[1].argmax())


def test_skipping_what_no_row_needs_changes_no_draw():
    torch.manual_seed(4)
    logits = torch.randn(7, 300) * 2
    history = logits.topk(12).indices.flip(1)  # the likeliest tokens were the last ones: the penalty bites
    params = [
        SamplingParams(temperature=0, repeat_penalty=1.0),
        SamplingParams(temperature=0, repeat_penalty=3.0, repeat_last_n=6),
        SamplingParams(temperature=0.7, top_p=0.9, repeat_penalty=3.0),
        SamplingParams(temperature=0.9, top_k=7, repeat_penalty=1.0),
        SamplingParams(temperature=0.7, repeat_penalty=1.0),
        SamplingParams(temperature=0, repeat_penalty=1.0, presence_penalty=1.5, frequency_penalty=0.5),
        SamplingParams(temperature=0.8, top_p=0.9, logit_bias=((int(history[6, -1]), -100.0), (7, 3.0))),
    ]

    def tokens(rows: list[int], needs: Needs | None) -> list[int]:
        chosen = [params[r] for r in rows]
        table = SlotSampling.empty(len(rows), 12, logits.device)
        for slot, p in enumerate(chosen):
            admit(table, slot, p, slot, 3)
        step = StepRows(torch.arange(len(rows)), torch.full((len(rows),), 11), needs or Needs.of(chosen))
        return sample(logits[rows].clone(), step, table, history[rows], NO_EOS)

    for rows in ([0], [0, 1], [2, 3], [0, 2], [4], [1, 2, 3, 4], [5], [0, 5], [1, 2, 5], [6], [0, 6], [2, 5, 6]):
        assert tokens(rows, None) == tokens(rows, Needs())


def test_requests_admitted_together_get_the_rows_they_get_one_by_one():
    one_by_one = SlotSampling.empty(5, 300, torch.device("cpu"))
    for slot, p in zip([4, 0, 2], MIXED):
        admit(one_by_one, slot, p, 2**63 + slot, 10 * slot + 1)
    together = written_together(torch.device("cpu"))
    for name in ("floats", "ints", "u", "bias_ids", "bias_values"):
        assert torch.equal(getattr(together, name), getattr(one_by_one, name)), name
    assert together.u[1].eq(0).all()  # the empty row stays empty
    # Row 4's prompt is 41 tokens: the token after position p is its (p - 40)th generated one.
    generated_before = (torch.arange(300) - 40).clamp(min=0)
    assert torch.equal(together.u[4], uniform(torch.full((300,), seed_key(2**63 + 4)), generated_before))


def test_uniform_is_a_pure_function_of_seed_and_step():
    keys = torch.tensor([seed_key(seed) for seed in (0, 1, 2**63 - 1, 0)])
    steps = torch.tensor([0, 0, 5, 1])
    u = uniform(keys, steps)
    assert torch.equal(u, uniform(keys, steps))
    assert ((u > 0) & (u < 1)).all()
    assert len(set(u.tolist())) == 4
    across_seeds = uniform(torch.tensor([seed_key(seed) for seed in range(100_000)]), torch.zeros(100_000, dtype=torch.long))
    along_steps = uniform(torch.full((100_000,), seed_key(7)), torch.arange(100_000))
    for many in (across_seeds, along_steps):
        assert abs(float(many.mean()) - 0.5) < 0.01 and abs(float(many.var()) - 1 / 12) < 0.003
    # Consecutive draws of one request are unrelated.
    assert abs(float(torch.corrcoef(torch.stack([along_steps[:-1], along_steps[1:]]))[0, 1])) < 0.02


def test_greedy_rows_take_the_argmax_and_eos_is_suppressed_before_min_tokens():
    logits = torch.tensor([[0.0, 5.0, 1.0]] * 3)
    eos = torch.tensor([1])
    params = [
        SamplingParams(temperature=0, repeat_penalty=1.0),
        SamplingParams(temperature=0, repeat_penalty=1.0, min_tokens=3),
        SamplingParams(temperature=0, repeat_penalty=1.0, min_tokens=3),
    ]
    # Prompt of 2 tokens: position 3 means 2 tokens generated so far, position 4 means 3.
    assert sample_rows(logits, params, [0, 0, 0], positions=[3, 3, 4], prompt_tokens=2, eos_ids=eos) == [1, 2, 1]


def test_repeat_penalty_divides_positive_and_multiplies_negative_logits_in_the_window():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0, 1.0]])
    history = torch.tensor([[2, 0, 1, 1, 3]])  # positions 0..4; the window of 3 at position 3 is 0, 1, 1
    apply_repeat_penalty(logits, history, torch.tensor([3]), torch.tensor([2.0]), torch.tensor([3]))
    assert logits.tolist() == [[1.0, -4.0, 2.0, -2.0, 1.0]]


def penalized_one_by_one(logits, history, positions, penalties, windows):
    """The original's loop: each distinct token of the window, once."""
    out = logits.clone()
    for row, (position, penalty, last_n) in enumerate(zip(positions, penalties, windows)):
        for token in set(history[row, max(position - last_n + 1, 0) : position + 1].tolist()) if last_n else ():
            logit, factor = logits[row, token], torch.tensor(penalty)  # float32 arithmetic, as the engine's
            out[row, token] = logit / factor if logit > 0 else logit * factor
    return out


def test_repeat_penalty_equals_the_originals_loop_for_any_window_and_penalty():
    torch.manual_seed(3)
    vocab, width = 50, 40
    logits = torch.randn(6, vocab) * 3
    history = torch.randint(0, 12, (6, width))  # few distinct ids: many repeats, inside and outside each window
    positions, penalties, windows = [39, 10, 0, 25, 39, 5], [1.3, 0.5, 2.0, 1.1, 1.0, 3.0], [64, 4, 1, 0, 7, 6]
    expected = penalized_one_by_one(logits, history, positions, penalties, windows)
    got = logits.clone()
    apply_repeat_penalty(got, history, torch.tensor(positions), torch.tensor(penalties), torch.tensor(windows))
    assert torch.equal(got, expected)


def penalized_by_openais_formula(logits, history, positions, last_prompt_positions, presences, frequencies):
    """OpenAI's documented rule, row by row: logit - count * frequency - (count > 0) * presence,
    counting each token among the row's generated tokens."""
    out = logits.clone()
    for row, (position, last_prompt, presence, frequency) in enumerate(
        zip(positions, last_prompt_positions, presences, frequencies)
    ):
        counts = torch.bincount(history[row, last_prompt + 1 : position + 1], minlength=logits.shape[1]).float()
        out[row] -= counts * frequency + (counts > 0).float() * presence
    return out


def test_presence_and_frequency_penalties_follow_openais_formula():
    torch.manual_seed(6)
    vocab, width = 50, 40
    logits = torch.randn(7, vocab) * 3
    history = torch.randint(0, 12, (7, width))  # few distinct ids: repeats in prompt, answer and beyond
    positions = [39, 20, 8, 30, 12, 5, 25]
    last_prompt_positions = [9, 20, 3, 0, 11, 5, 2]  # rows 1 and 5 have generated nothing yet
    presences = [0.5, 1.0, 0.0, -0.7, 2.0, 1.5, 0.3]
    frequencies = [0.25, 2.0, 1.0, 0.0, -2.0, 0.5, 0.0]
    expected = penalized_by_openais_formula(logits, history, positions, last_prompt_positions, presences, frequencies)
    got = logits.clone()
    apply_occurrence_penalties(
        got,
        history,
        torch.tensor(positions),
        torch.tensor(last_prompt_positions),
        torch.tensor(presences),
        torch.tensor(frequencies),
    )
    # Not bit for bit: a token seen n times here loses the frequency penalty n times over, not n times it once.
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert not torch.equal(got, logits)
    assert torch.equal(got[[1, 5]], logits[[1, 5]])  # nothing generated: nothing penalized, not even the prompt


def test_a_greedy_row_turns_from_a_token_it_generated_under_either_penalty():
    logits = torch.tensor([[5.0, 4.8, 0.0, 1.0]] * 4)
    history = torch.tensor([[3, 3, 0, 0]] * 4)  # a prompt of 2 tokens (3, 3), then token 0 twice
    params = [
        SamplingParams(temperature=0, repeat_penalty=1.0),
        SamplingParams(temperature=0, repeat_penalty=1.0, presence_penalty=0.3),
        SamplingParams(temperature=0, repeat_penalty=1.0, frequency_penalty=0.15),  # twice: 0.3
        SamplingParams(temperature=0, repeat_penalty=1.0, presence_penalty=-1.0, frequency_penalty=0.4),
    ]
    # Token 3 (logit 1), only in the prompt, is never penalized.
    assert sample_rows(logits, params, [0] * 4, history=history, positions=[3] * 4, prompt_tokens=2) == [0, 1, 1, 0]


def test_logit_bias_adds_to_its_tokens_before_the_penalties_and_leaves_a_reused_row():
    logits = torch.tensor([[1.0, 1.2, 0.0, 0.5]] * 3)
    history = torch.tensor([[0, 0]] * 3)  # token 0 is the prompt's last: in the repeat penalty's window
    params = [
        SamplingParams(temperature=0, repeat_penalty=1.0, logit_bias=((3, 1.0),)),  # 0.5 + 1: token 3
        SamplingParams(temperature=0, repeat_penalty=1.0, logit_bias=((1, -100.0), (2, 0.9))),  # 1 banned: token 0
        # (1.0 + 1.0) / 2 = 1.0 < 1.2: the bias first, then the penalty (the other order: 1.5 > 1.2).
        SamplingParams(temperature=0, repeat_penalty=2.0, repeat_last_n=4, logit_bias=((0, 1.0),)),
    ]
    assert sample_rows(logits, params, [0] * 3, history=history, positions=[1] * 3, prompt_tokens=2) == [3, 0, 1]
    table = SlotSampling.empty(1, 4, logits.device)
    for bias, expected in [(((3, 1.0),), 3), ((), 1)]:  # the row's next request has no bias
        admit(table, 0, SamplingParams(temperature=0, repeat_penalty=1.0, logit_bias=bias), 0, 1)
        step = StepRows(torch.tensor([0]), torch.tensor([0]), Needs())
        assert sample(logits[:1].clone(), step, table, history[:1], NO_EOS) == [expected]


def test_the_cpus_two_stage_topk_finds_what_torchs_topk_finds():
    """`top_candidates` over chunks of the vocabulary against `topk` over all of it: the same
    values and ids, most likely first, also when the best tokens crowd into one chunk, spread
    one to a chunk, or share rows with -inf (EOS held back) logits."""
    torch.manual_seed(5)
    vocab = 49_152
    logits = torch.randn(6, vocab) * 3
    logits[1, 256:384] += torch.linspace(20, 30, 128)  # the best 128 in one chunk
    logits[2, :: sampler.TOPK_CHUNK] += torch.linspace(20, 30, vocab // sampler.TOPK_CHUNK)  # one to a chunk
    logits[3, :1000] = -torch.inf
    logits[4] = torch.randn(vocab) * 0.01  # flat
    for k in (1, 64, 96):
        values, ids = sampler.top_candidates(logits, k)
        expected = logits.topk(k, dim=-1)
        assert torch.equal(values, expected.values) and torch.equal(ids, expected.indices), k
    small = torch.randn(3, 259)  # a vocabulary it would not shrink: torch's topk
    assert torch.equal(sampler.top_candidates(small, 64)[1], small.topk(64, dim=-1).indices)
