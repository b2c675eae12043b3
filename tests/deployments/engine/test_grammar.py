"""Grammar-constrained decoding in both engines, on the tiny random model: whatever a random
model's logits say, a constrained answer parses and validates, and constrained rows share
steps with plain ones without changing what either gives."""

from __future__ import annotations

import asyncio

import pytest
import torch

from deployments.engine.grammar import Grammars, Masks
from deployments.engine.protocol import InvalidRequestError
from deployments.engine.reference import ReferenceEngine
from deployments.engine.sampling_params import Constraint, SamplingParams
from deployments.model_loader import eos_token_ids
from tests.deployments.engine.helpers import RECORD, Record, no_whitespace, prompt, run


def constrained(seed: int, temperature: float = 1.0, **overrides) -> SamplingParams:
    return SamplingParams(max_tokens=200, temperature=temperature, seed=seed, constraint=RECORD, **overrides)


async def test_a_constrained_answer_always_validates_and_ends_with_its_grammar(tiny, engine):
    for seed in range(4):
        text, outputs = await run(engine, prompt(tiny, "a record"), constrained(seed))
        assert outputs[-1].finish_reason == "stop", text
        record = Record.model_validate_json(text)  # raises unless it parses and validates
        assert len(record.tags) <= 3 and all(len(tag) <= 8 for tag in record.tags)
    # ignore_eos cannot run past the grammar's end: the answer ends where the JSON does.
    text, outputs = await run(engine, prompt(tiny, "a record"), constrained(0, ignore_eos=True))
    assert outputs[-1].finish_reason == "stop"
    Record.model_validate_json(text)


async def test_json_mode_gives_an_object_and_a_short_budget_ends_with_length(tiny, engine):
    # A random model seldom closes what it opens: a bias makes "}" its favourite token, which the
    # grammar still forbids first (an answer must open with "{"), then allows.
    close = tiny.tokenizer.convert_tokens_to_ids("}")
    json_object = Constraint(json_schema='{"type": "object"}')
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=1, logit_bias=((close, 100.0),), constraint=json_object)
    text, outputs = await run(engine, prompt(tiny, "json"), params)
    assert text == "{}" and outputs[-1].finish_reason == "stop"
    long = {"type": "object", "properties": {"text": {"type": "string", "minLength": 20}}, "required": ["text"]}
    params = SamplingParams(max_tokens=14, temperature=1.0, seed=3, constraint=no_whitespace(long))
    text, outputs = await run(engine, prompt(tiny, "json"), params)
    assert outputs[-1].finish_reason == "length" and outputs[-1].completion_tokens == 14
    assert text.startswith('{"text":"')  # the grammar's start, cut where the budget ends


async def test_constrained_and_plain_rows_in_one_batch_each_give_what_they_give_alone(tiny, engine):
    plain = [SamplingParams(max_tokens=30, min_tokens=30, temperature=1.0, top_p=0.9, seed=seed) for seed in range(3)]
    greedy = SamplingParams(max_tokens=30, min_tokens=30, temperature=0)
    requests = [(prompt(tiny, f"record {seed}"), constrained(seed)) for seed in range(3)]
    requests += [(prompt(tiny, f"plain {i}"), params) for i, params in enumerate([*plain, greedy])]
    alone = [(await run(engine, ids, params))[0] for ids, params in requests]
    together = await asyncio.gather(*(run(engine, ids, params) for ids, params in requests))
    assert [text for text, _ in together] == alone
    for text in alone[:3]:
        Record.model_validate_json(text)


async def test_the_batched_engine_follows_a_grammar_as_the_reference_engine_does(tiny, engine):
    reference = ReferenceEngine(tiny)
    try:
        for ids in (prompt(tiny, "one"), prompt(tiny, "another prompt")):
            params = constrained(0, temperature=0)
            expected, _ = await run(reference, ids, params)
            got, _ = await run(engine, ids, params)
            assert got == expected
            Record.model_validate_json(got)
    finally:
        reference.shutdown()


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ('{"type": "objectx"}', "response_format: .*objectx"),
        ("[1, 2]", "response_format: the schema must be a JSON object"),
        ('{"type": "string", "minLength": 5, "maxLength": 2}', "response_format: "),
    ],
)
async def test_a_schema_that_cannot_compile_is_refused_naming_the_field(tiny, engine, schema, message):
    with pytest.raises(InvalidRequestError, match=message):
        await run(engine, prompt(tiny, "x"), SamplingParams(constraint=Constraint(json_schema=schema)))
    with pytest.raises(InvalidRequestError, match="min_tokens: cannot be combined with response_format"):
        await run(engine, prompt(tiny, "x"), SamplingParams(min_tokens=3, constraint=RECORD))
    assert engine.stats().active_requests == 0


def test_a_constraint_compiles_once_and_each_request_gets_its_own_matcher(tiny):
    grammars = Grammars(tiny.tokenizer, tiny.require_model().config.vocab_size, eos_token_ids(tiny))
    assert not grammars.is_compiled(RECORD)
    first = grammars.matcher(RECORD)
    assert grammars.is_compiled(RECORD)
    second = grammars.matcher(RECORD)
    assert first.consume_tokens(tiny.tokenizer.encode('{"name":"ab"', add_special_tokens=False))
    assert not second.consume_tokens(tiny.tokenizer.encode("x", add_special_tokens=False))  # a fresh start: "{" only
    assert grammars.matcher(RECORD).consume_tokens(tiny.tokenizer.encode('{"name"', add_special_tokens=False))


@pytest.mark.parametrize("vocab", [32 * 40, 32 * 40 - 7])  # a vocabulary that fills its last bitmask word or not
def test_masks_leave_allowed_logits_and_other_rows_as_they_were_and_make_refused_ones_unpickable(vocab):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, vocab, generator=generator) * 10
    logits[4, 3] = -torch.inf  # refused already (a logit bias): stays so
    masks, rows = Masks(vocab, 3), [1, 4]
    bitmask = torch.randint(-(2**31), 2**31 - 1, (2, (vocab + 31) // 32), dtype=torch.int32, generator=generator)
    allowed = torch.tensor([[bool(int(word) >> bit & 1) for word in row for bit in range(32)][:vocab] for row in bitmask])
    before = logits.clone()
    masks.apply(logits, rows, bitmask)
    others = [0, 2, 3]
    assert torch.equal(logits[others], before[others])
    for mask_row, row in enumerate(rows):
        assert torch.equal(logits[row][allowed[mask_row]], before[row][allowed[mask_row]])
        refused = logits[row][~allowed[mask_row]]
        assert len(refused) and bool((refused <= torch.finfo(torch.float32).min / 2).all())
        probabilities = (logits[row] / 0.7).softmax(dim=-1)
        assert probabilities[~allowed[mask_row]].sum() == 0 and logits[row].argmax() in allowed[mask_row].nonzero()
