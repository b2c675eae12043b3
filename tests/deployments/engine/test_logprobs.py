"""Logprobs from the batched engine, against transformers' log-softmax of the same model."""

from __future__ import annotations

import asyncio

import pytest
import torch

from deployments.engine.batched import BatchedEngine
from deployments.engine.outputs import OutputStage
from deployments.engine.protocol import InvalidRequestError
from deployments.engine.reference import ReferenceEngine
from deployments.engine.sampling_params import SamplingParams
from deployments.model_loader import load_model
from deployments.model_registry import ModelConfig
from tests.deployments.engine.helpers import RECORD, prompt, run


def transformers_logprobs(tiny, ids: list[int], generated: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits at each generated token's position [len(generated), vocab]."""
    with torch.inference_mode():
        logits = tiny.model(torch.tensor([ids + generated])).logits[0, len(ids) - 1 : -1]
    return logits.float().log_softmax(dim=-1)


def flat(outputs) -> list:
    return [entry for output in outputs for entry in output.logprobs or []]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
async def test_logprobs_are_the_models_log_softmax_and_the_tokens_join_into_the_answer(tiny, engine, temperature, monkeypatch):
    generated: list[int] = []  # the ids the engine chose (random bytes need not decode and encode back)
    advance = OutputStage._advance
    monkeypatch.setattr(
        OutputStage, "_advance", lambda self, seq, token, *rest: generated.append(token) or advance(self, seq, token, *rest)
    )
    ids = prompt(tiny, "logprobs please")
    params = SamplingParams(max_tokens=12, min_tokens=12, temperature=temperature, seed=2, logprobs=5, repeat_penalty=1.3)
    text, outputs = await run(engine, ids, params)
    entries = flat(outputs)
    assert len(entries) == outputs[-1].completion_tokens == 12
    assert "".join(piece for piece, _, _ in entries) == text
    expected = transformers_logprobs(tiny, ids, generated)
    for position, (token, (_, logprob, top)) in enumerate(zip(generated, entries)):
        # Before the penalty and the temperature, which the sampling used.
        assert logprob == pytest.approx(expected[position, token].item(), abs=1e-4)
        values, best = expected[position].topk(5)
        assert [lp for _, lp in top] == pytest.approx(values.tolist(), abs=1e-4)
        assert [piece for piece, _ in top] == [tiny.tokenizer.decode([t]) for t in best.tolist()]
        assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
        if temperature == 0 and position == 0:
            assert top[0][1] == pytest.approx(logprob)  # greedy (the penalty only lowers others' later)


async def test_rows_asking_logprobs_and_constrained_rows_share_steps_with_plain_ones_unchanged(tiny, engine):
    requests = [
        (prompt(tiny, "scored"), SamplingParams(max_tokens=16, min_tokens=16, temperature=1.0, seed=1, logprobs=3)),
        (prompt(tiny, "record"), SamplingParams(max_tokens=200, temperature=1.0, seed=2, constraint=RECORD)),
        (prompt(tiny, "plain"), SamplingParams(max_tokens=16, min_tokens=16, temperature=1.0, top_p=0.9, seed=3)),
        (prompt(tiny, "greedy"), SamplingParams(max_tokens=16, min_tokens=16, temperature=0)),
    ]
    alone = [await run(engine, ids, params) for ids, params in requests]
    together = await asyncio.gather(*(run(engine, ids, params) for ids, params in requests))
    assert [text for text, _ in together] == [text for text, _ in alone]
    for (piece, logprob, top), (piece_alone, logprob_alone, top_alone) in zip(
        flat(together[0][1]), flat(alone[0][1]), strict=True
    ):
        assert piece == piece_alone and [t for t, _ in top] == [t for t, _ in top_alone]
        assert [logprob, *(lp for _, lp in top)] == pytest.approx([logprob_alone, *(lp for _, lp in top_alone)], abs=1e-5)
    assert all(output.logprobs is None for _, outputs in together[1:] for output in outputs)
    assert len(flat(alone[0][1])[0][2]) == 3


async def test_the_reference_engine_refuses_logprobs_naming_them(tiny):
    reference = ReferenceEngine(tiny)
    try:
        with pytest.raises(InvalidRequestError, match="logprobs: "):
            await run(reference, prompt(tiny, "x"), SamplingParams(logprobs=0))
    finally:
        reference.shutdown()


# The largest |engine - transformers fp32| of a greedy answer's logprobs we accept per weight
# format. Measured (2-core AMD EPYC Zen 5, "What is the capital of France?", 7 tokens): fp32
# 2.4e-6, int4 0.044 (the GGUF's Q4_1 values are exact; activations are rounded), int8 0.45
# (weights and activations rounded to 8 bits).
TOLERANCE = {"fp32": 1e-3, "int4": 0.1, "int8": 1.0}


@pytest.mark.slow
@pytest.mark.parametrize("weights", TOLERANCE)
async def test_the_packaged_models_logprobs_match_transformers_within_what_its_weights_allow(weights, monkeypatch):
    loaded = load_model(ModelConfig(name="smol"))
    tokenizer = loaded.tokenizer
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    generated: list[int] = []
    advance = OutputStage._advance
    monkeypatch.setattr(
        OutputStage, "_advance", lambda self, seq, token, *rest: generated.append(token) or advance(self, seq, token, *rest)
    )
    engine = BatchedEngine(loaded, weights=weights, max_context=512)
    try:
        answer, outputs = await run(engine, ids, SamplingParams(max_tokens=32, temperature=0, repeat_penalty=1.0, logprobs=5))
    finally:
        engine.shutdown()
    entries = flat(outputs)
    assert "Paris" in answer and "".join(piece for piece, _, _ in entries) == answer
    expected = transformers_logprobs(loaded, ids, generated)
    for position, (token, (_, logprob, top)) in enumerate(zip(generated, entries)):
        assert abs(logprob - expected[position, token].item()) <= TOLERANCE[weights]
        assert top[0][1] == pytest.approx(logprob)  # greedy: the chosen token is the most likely


@pytest.mark.parametrize("cached", [False, True], ids=["cold", "prompt-in-cache"])
async def test_prompt_logprobs_are_the_models_log_softmax_over_the_prompt_in_every_chunk(tiny, engine, cached):
    ids = prompt(tiny, "a prompt scored token by token, over several chunks of the step")  # > 16: chunked
    plain = SamplingParams(max_tokens=4, min_tokens=4, temperature=0)
    alone, _ = await run(engine, ids, plain)  # leaves the prompt in a cache row, for `cached`
    if not cached:
        await run(engine, prompt(tiny, "x" * 200), plain)  # its row and the prompt's are overwritten
    other = prompt(tiny, "a plain request beside it")
    other_alone, _ = await run(engine, other, plain)
    scored = SamplingParams(max_tokens=4, min_tokens=4, temperature=0, logprobs=2, prompt_logprobs=2)
    (text, outputs), (other_text, _) = await asyncio.gather(run(engine, ids, scored), run(engine, other, plain))
    entries = flat(outputs)
    assert len(entries) == len(ids) + 4
    first, *scored_entries = entries[: len(ids)]
    assert first[1:] == [None, None]  # nothing predicts the prompt's first token
    assert "".join(piece for piece, _, _ in entries[: len(ids)]) == tiny.tokenizer.decode(ids, skip_special_tokens=True)
    expected = transformers_logprobs(tiny, ids[:1], ids[1:])  # position i's logits score token i + 1
    for position, (token, (_, logprob, top)) in enumerate(zip(ids[1:], scored_entries)):
        assert logprob == pytest.approx(expected[position, token].item(), abs=1e-4)
        values, best = expected[position].topk(2)
        assert [lp for _, lp in top] == pytest.approx(values.tolist(), abs=1e-4)
        assert [piece for piece, _ in top] == [tiny.tokenizer.decode([t]) for t in best.tolist()]
    assert (text, other_text) == (alone, other_alone)  # scoring changes neither answer
