from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import types

import pytest
import torch

from deployments.engine import cpu_int4, cpu_kernels, cpu_layer_ops, torch_layer_ops
from deployments.engine import outputs as outputs_module
from deployments.engine.batched import BatchedEngine
from deployments.engine.forward import PromptChunk, build_step, extract_weights, forward, rope_table, step_attention
from deployments.engine.kv_cache import KVCache
from deployments.engine.outputs import OutputStage
from deployments.engine.protocol import GenerationOutput, InvalidRequestError, PromptTooLongError
from deployments.engine.quantized import Int4Linear, Int8Linear, RescoredHead
from deployments.engine.reference import ReferenceEngine
from deployments.engine.sampler import CANDIDATES
from deployments.engine.sampling_params import SamplingParams
from deployments.engine.sequence import Posts
from deployments.model_loader import load_model
from deployments.model_registry import ModelConfig
from tests.deployments.engine.helpers import OVERLAP, prompt, run
from tests.support import REPO_ROOT

GREEDY = SamplingParams(max_tokens=24, min_tokens=24, temperature=0)


def test_forward_matches_transformers_with_chunked_prefill_and_batched_decode(tiny):
    w = extract_weights(tiny.model, "fp32")
    cache = KVCache(len(w.layers), 4, w.n_kv_heads, 64, w.head_dim, w.dtype)
    rope = rope_table(w, 64)
    a, b = torch.randint(0, 259, (20,)).tolist(), torch.randint(0, 259, (13,)).tolist()
    with torch.inference_mode():
        forward(w, cache, rope, build_step([], [(PromptChunk(0, 0, 8, False), a[:8])]))
        first = forward(w, cache, rope, build_step([], [(PromptChunk(0, 8, 12, True), a[8:]), (PromptChunk(2, 0, 13, True), b)]))
        second = forward(w, cache, rope, build_step([(0, 20, 5), (2, 13, 7)], []))
        expected_a = tiny.model(torch.tensor([a + [5]])).logits[0]
        expected_b = tiny.model(torch.tensor([b + [7]])).logits[0]
    torch.testing.assert_close(first, torch.stack([expected_a[19], expected_b[12]]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second, torch.stack([expected_a[20], expected_b[13]]), atol=1e-5, rtol=1e-5)


# Not fp32: MKL's fp32 GEMM rounds a row differently with the row count (1 row vs 60: 9e-8), so
# there a tail's logits may differ in their last bits; the integer formats' sums are exact.
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_a_prompts_logits_do_not_depend_on_where_its_prefill_was_split(tiny, fmt):
    """A prefix-cache hit computes only the prompt's tail: its logits must be those of the whole
    prompt in one chunk, to the bit, or a seeded request's second answer differs from its first
    (with the served int4 model it did: a last-bit difference in attention flipped an activation
    code, and the answer drifted within 5 tokens)."""
    torch.manual_seed(0)
    w = extract_weights(tiny.model, fmt)
    rope = rope_table(w, 128)
    prompt = torch.randint(0, 259, (60,)).tolist()

    def logits(split: int) -> torch.Tensor:
        cache = KVCache(len(w.layers), 2, w.n_kv_heads, 128, w.head_dim, torch.float32)
        if split:
            forward(w, cache, rope, build_step([], [(PromptChunk(0, 0, split, False), prompt[:split])]))
        tail = prompt[split:]
        return forward(w, cache, rope, build_step([], [(PromptChunk(0, split, len(tail), True), tail)]))

    with torch.inference_mode():
        whole = logits(0)
        for split in (1, 30, 59):
            assert torch.equal(logits(split), whole), split


def test_a_cpu_step_runs_each_prompts_last_token_as_a_decode_row():
    """The tokens that give a prompt its first new token join the decode rows in slot order; a
    chunk left with no tokens is gone; the logits stay in the order the engine samples them."""
    chunks = [
        (PromptChunk(1, 0, 5, True), [11, 12, 13, 14, 15]),
        (PromptChunk(2, 7, 1, True), [21]),  # a prefix-cache hit: only the prompt's last token runs
        (PromptChunk(4, 0, 6, False), [41, 42, 43, 44, 45, 46]),
    ]
    step = build_step([(0, 4, 1), (3, 9, 3)], chunks)
    assert step.n_decode == 4 and step.slots[:4].tolist() == [0, 1, 2, 3]
    assert step.positions[:4].tolist() == [4, 4, 7, 9]
    assert [(c.slot, c.start, c.length, c.is_last) for c in step.chunks] == [(1, 0, 4, False), (4, 0, 6, False)]
    assert step.token_ids[4:].tolist() == [11, 12, 13, 14, 41, 42, 43, 44, 45, 46]
    # Logits: the running requests' rows in order, then the prompts that end here, in order.
    assert step.token_ids[step.logit_rows].tolist() == [1, 3, 15, 21]
    assert step.slots[step.logit_rows].tolist() == [0, 3, 1, 2]


def test_a_cpu_steps_attention_masks_let_each_token_see_its_own_rows_keys_up_to_itself(tiny):
    """The additive biases every layer's attention shares: a decode row (torch's ops) sees its
    cache row up to its position, a free row only key 0; a prompt chunk's token (each of its
    query groups) sees its row up to itself. Our C decode kernel reads positions: no decode bias."""
    w = extract_weights(tiny.model, "fp32")
    groups = w.n_heads // w.n_kv_heads
    step = build_step([(0, 4, 1), (2, 9, 3)], [(PromptChunk(1, 3, 4, False), [5, 6, 7, 8])])
    shared = step_attention(step, w, torch_layer_ops)
    visible = shared.decode_bias[:, 0, 0] == 0  # [rows, keys]
    assert visible.tolist() == [[k <= last for k in range(10)] for last in (4, 0, 9)]
    assert torch.isinf(shared.decode_bias[~shared.decode_bias.eq(0)]).all()
    (chunk_bias,) = shared.chunk_biases
    assert chunk_bias.shape == (1, 1, groups * 4, 7)
    expected = [[k <= position for k in range(7)] for position in (3, 4, 5, 6)] * groups
    assert (chunk_bias[0, 0] == 0).tolist() == expected
    assert step_attention(step, w, cpu_layer_ops).decode_bias is None


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_a_steps_logits_come_in_its_order_and_each_rows_equal_its_own_step(tiny, fmt):
    """Two decode rows and a prompt's last token in one step (int4: the decode-only step that
    runs every layer in one C call), against each row in a step of its own: the same logits, to
    the bit, in the order asked."""
    torch.manual_seed(0)
    w = extract_weights(tiny.model, fmt)
    rope = rope_table(w, 64)
    prompts = [torch.randint(0, 259, (n,)).tolist() for n in (9, 5, 12)]
    rows = [(0, 9, 7, None), (2, 12, 8, None), (1, 4, prompts[1][4], PromptChunk(1, 4, 1, True))]

    def filled_cache() -> KVCache:
        cache = KVCache(len(w.layers), 3, w.n_kv_heads, 64, w.head_dim, torch.float32)
        for slot, ids in enumerate(prompts):
            ids = ids[:4] if slot == 1 else ids  # slot 1's prompt ends in the step below
            forward(w, cache, rope, build_step([], [(PromptChunk(slot, 0, len(ids), False), ids)]))
        return cache

    def step(cache: KVCache, rows: list) -> torch.Tensor:
        decode = [(slot, position, token) for slot, position, token, chunk in rows if chunk is None]
        chunks = [(chunk, [token]) for _, _, token, chunk in rows if chunk is not None]
        return forward(w, cache, rope, build_step(decode, chunks))

    with torch.inference_mode():
        together = step(filled_cache(), rows)
        alone = torch.cat([step(filled_cache(), [row]) for row in rows])
    assert torch.equal(together, alone)


@pytest.mark.parametrize("kernel", ["ours", "torch"])
def test_int4_linear_holds_q4_1_weights_exactly(kernel, monkeypatch):
    # Weights on GGUF Q4_1's grid (min + q * scale, q in 0..15, per group of 32) come back as
    # they were, up to how the kernel rounds the activations (tests/.../test_cpu_int4.py for ours).
    if kernel == "torch":
        monkeypatch.setattr(cpu_kernels, "load", lambda: None)
    elif cpu_kernels.load() is None:
        pytest.skip("our int4 kernel cannot be built here")
    torch.manual_seed(0)
    out_features, in_features = 48, 64
    q = torch.randint(0, 16, (out_features, in_features // 32, 32))
    q[..., 0], q[..., 1] = 0, 15  # every group spans the whole grid, as Q4_1's groups do
    scale = (torch.rand(out_features, in_features // 32, 1) * 0.01 + 0.001).half().float()
    minimum = (-torch.rand(out_features, in_features // 32, 1) * 0.05).half().float()
    linear = torch.nn.Linear(in_features, out_features)
    linear.weight.data = (minimum + q * scale).reshape(out_features, in_features)
    rows = torch.randn(3, in_features)
    with torch.inference_mode():
        int4 = Int4Linear(linear)
        ours = int4(rows)
        if kernel == "ours":
            assert torch.equal(cpu_int4.unpack(int4.codes, int4.scales, int4.minimums), linear.weight)
            expected = cpu_int4.matmul(cpu_kernels.load(), rows, int4.codes, int4.scales, int4.minimums, linear.bias)
        else:
            expected = linear(rows.bfloat16().float())
    torch.testing.assert_close(ours, expected, atol=0.005, rtol=0)  # half a grid step off: 0.04


def test_int8_linear_quantizes_each_row_on_its_own():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    quantized = Int8Linear(linear)
    rows = torch.randn(5, 64)
    rows[2] *= 100  # an outlier token must not cost the other rows their precision
    # 5 rows take the oneDNN kernel, 1 row `torch._int_mm`: the same numbers either way.
    with torch.inference_mode():
        together = quantized(rows)
        alone = torch.cat([quantized(rows[i : i + 1]) for i in range(5)])
        expected = linear(rows)
    assert torch.equal(together, alone)
    relative_error = (together - expected).norm(dim=1) / expected.norm(dim=1)
    assert relative_error.max() < 0.02


def test_probing_the_cpus_int8_kernel_leaves_the_callers_thread_without_an_openmp_pool():
    # A thread that runs a parallel torch op keeps an OpenMP pool (here: one more thread for
    # good); a second pool in a replica slowed every step of the engine's (see torch_threads).
    # The probe's thread and its pool's workers exit just after it returns: wait (2 s at most)
    # for the count to settle, as long after the parallel op on the caller's thread.
    script = (
        "import os, time, torch\n"
        "from deployments.engine.quantized import cpu_int8_activation_bits\n"
        "def settled(limit):\n"
        "    deadline = time.monotonic() + 2\n"
        "    while len(os.listdir('/proc/self/task')) > limit and time.monotonic() < deadline:\n"
        "        time.sleep(0.02)\n"
        "    return len(os.listdir('/proc/self/task'))\n"
        "torch.set_num_threads(2)\n"
        "before = len(os.listdir('/proc/self/task'))\n"
        "cpu_int8_activation_bits()\n"
        "probed = settled(before)\n"
        "torch.ones(64, 64) @ torch.ones(64, 64)  # the check can fail: a parallel op here adds a thread\n"
        "torch.ones(512, 512).exp()\n"
        "print(before, probed, settled(before))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    before, probed, after_parallel_op = map(int, result.stdout.split())
    assert probed == before
    assert after_parallel_op > before


def test_int8_linear_sums_exactly_at_the_extremes():
    """Every activation and weight at its largest integer: where the CPU adds pairs of products
    in int16 (no VNNI), 8-bit activations would saturate there; the width `Int8Linear` picks
    for this CPU keeps the sums exact, for one row and for many."""
    linear = torch.nn.Linear(64, 16, bias=False)
    torch.nn.init.ones_(linear.weight)
    quantized = Int8Linear(linear)
    with torch.inference_mode():
        for rows in (1, 8):
            assert torch.equal(quantized(torch.ones(rows, 64)), torch.full((rows, 16), 64.0))


@pytest.mark.parametrize("approximate", [Int8Linear, Int4Linear])
def test_rescored_head_is_exact_at_each_rows_best_logits(approximate):
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 4096)
    rescored = RescoredHead(head, approximate(head))
    rows = torch.randn(6, 64)
    rows[1] *= 100
    with torch.inference_mode():
        together = rescored(rows)
        alone = torch.cat([rescored(rows[i : i + 1]) for i in range(6)])
        expected = head(rows)
        best = rescored.approximate(rows).topk(CANDIDATES, dim=-1).indices
    assert torch.equal(together, alone)
    exact = together.gather(-1, best)
    torch.testing.assert_close(exact, expected.gather(-1, best), atol=1e-5, rtol=1e-5)
    # No other logit outranks them; the best of all is fp32's.
    others = together.scatter(-1, best, -math.inf)
    assert (others.amax(dim=-1) <= exact.amin(dim=-1)).all()
    assert torch.equal(together.argmax(-1), expected.argmax(-1))
    # The rest of each row is the quantized approximation.
    assert ((together - expected).norm(dim=1) / expected.norm(dim=1)).max() < 0.1


@pytest.mark.parametrize("weight_format", ["bf16", "int8", "int4"])
async def test_bf16_int8_and_int4_weights_stay_close_to_fp32_and_generate(tiny, weight_format):
    ids = torch.randint(0, 259, (12,)).tolist()
    logits = {}
    for fmt in ("fp32", weight_format):
        w = extract_weights(tiny.model, fmt)
        cache = KVCache(len(w.layers), 1, w.n_kv_heads, 16, w.head_dim, w.dtype)
        with torch.inference_mode():
            step = build_step([], [(PromptChunk(0, 0, 12, True), ids)])
            logits[fmt] = forward(w, cache, rope_table(w, 16), step)
    assert (logits[weight_format] - logits["fp32"]).abs().max() < 0.05
    engine = BatchedEngine(tiny, weights=weight_format, max_batch_size=2, max_context=64)
    try:
        _, outputs = await run(engine, ids, GREEDY)
    finally:
        engine.shutdown()
    assert outputs[-1].completion_tokens == 24 and outputs[-1].finish_reason == "length"


@pytest.mark.parametrize(
    "penalties",
    [
        {"repeat_penalty": 3.0, "repeat_last_n": 8},  # 1.3 left this tiny model's answer as it was
        {"repeat_penalty": 1.0, "presence_penalty": 0.8, "frequency_penalty": 0.3},
        {"repeat_penalty": 1.2, "repeat_last_n": 16, "presence_penalty": -0.5, "frequency_penalty": 1.0},
    ],
)
async def test_greedy_matches_the_reference_engine_including_penalties(tiny, engine, penalties):
    params = SamplingParams(max_tokens=30, min_tokens=30, temperature=0, **penalties)
    unpenalized = SamplingParams(max_tokens=30, min_tokens=30, temperature=0, repeat_penalty=1.0)
    ids = prompt(tiny, "hello there")
    ours, outputs = await run(engine, ids, params)
    reference = ReferenceEngine(tiny)
    try:
        theirs = "".join([o.text async for o in reference.generate(ids, params)])
    finally:
        reference.shutdown()
    assert ours == theirs
    assert ours != (await run(engine, ids, unpenalized))[0]  # the penalties changed the answer
    assert outputs[-1].finish_reason == "length"
    assert outputs[-1].completion_tokens == 30 and outputs[-1].prompt_tokens == len(ids)
    assert all(o.finish_reason is None for o in outputs[:-1])


async def test_logit_bias_matches_the_reference_engine_and_a_token_beyond_the_vocabulary_is_refused(tiny, engine):
    ids = prompt(tiny, "hello there")
    greedy = SamplingParams(max_tokens=20, min_tokens=20, temperature=0, repeat_penalty=1.0)
    plain, _ = await run(engine, ids, greedy)
    favourite = prompt(tiny, plain)[0]  # this tiny model's answer repeats one token
    biased = SamplingParams(**{**greedy.__dict__, "logit_bias": ((favourite, -100.0), (favourite + 1, 0.5))})
    ours, _ = await run(engine, ids, biased)
    reference = ReferenceEngine(tiny)
    try:
        assert ours == "".join([o.text async for o in reference.generate(ids, biased)])
        vocab = tiny.model.config.vocab_size
        for refusing in (engine, reference):
            with pytest.raises(InvalidRequestError, match=f"logit_bias: token id {vocab} is not among"):
                await run(refusing, ids, SamplingParams(logit_bias=((0, 1.0), (vocab, 1.0))))
    finally:
        reference.shutdown()
    assert favourite not in prompt(tiny, ours) and ours != plain
    assert (await run(engine, ids, greedy))[0] == plain  # the rows the biased request used forgot its bias


async def test_a_request_outgrowing_the_initial_cache_matches_the_reference_engine(tiny):
    engine = BatchedEngine(tiny, max_batch_size=2, max_context=1024, prefill_chunk_tokens=256)
    reference = ReferenceEngine(tiny)
    ids = prompt(tiny, "long " * 100)  # 500 tokens; the answer crosses the 512-position start capacity
    try:
        ours, _ = await run(engine, ids, GREEDY)
        theirs = "".join([o.text async for o in reference.generate(ids, GREEDY)])
    finally:
        engine.shutdown()
        reference.shutdown()
    assert ours == theirs


@pytest.mark.parametrize("weight_format", ["fp32", "int8", "int4"])
async def test_greedy_output_is_the_same_alone_and_in_a_mixed_batch(tiny, weight_format):
    engine = BatchedEngine(tiny, weights=weight_format, max_batch_size=8, max_context=256, prefill_chunk_tokens=16)
    try:
        await greedy_alone_and_in_a_mixed_batch(tiny, engine)
    finally:
        engine.shutdown()


async def greedy_alone_and_in_a_mixed_batch(tiny, engine):
    texts = ["hi", "a much longer prompt that spans several prefill chunks of sixteen tokens", "x" * 40, "hello"]
    alone = [(await run(engine, prompt(tiny, t), GREEDY))[0] for t in texts]
    requests = []
    for i, t in enumerate(texts):
        requests.append(run(engine, prompt(tiny, t), GREEDY))
        # Company with other lengths and sampling settings.
        requests.append(
            run(engine, prompt(tiny, t * 2), SamplingParams(max_tokens=5 + 7 * i, temperature=1.0, top_p=0.9, top_k=20))
        )
    together = await asyncio.gather(*requests)
    assert [text for text, _ in together[::2]] == alone


async def test_a_request_the_engine_cannot_run_fails_alone_and_others_stream_on(tiny, engine):
    long = SamplingParams(max_tokens=60, min_tokens=60, temperature=0)
    ids = prompt(tiny, "a long answer")
    alone, _ = await run(engine, ids, long)

    async def poison(params: SamplingParams):
        await asyncio.sleep(0.05)  # while the long answer streams
        with pytest.raises(InvalidRequestError):
            await run(engine, prompt(tiny, "poison"), params)

    (together, _), _, _ = await asyncio.gather(
        run(engine, ids, long),
        poison(SamplingParams(max_tokens=5, temperature=1.0, top_k=2**70)),  # beyond int64: the edge refuses it too
        poison(SamplingParams(max_tokens=5, seed=2**64)),
    )
    with pytest.raises(InvalidRequestError, match="the prompt is empty"):
        await run(engine, [], long)
    assert together == alone
    assert engine.stats().active_requests == 0


async def test_seeded_sampling_repeats_alone_and_in_company(tiny, engine):
    params = SamplingParams(max_tokens=20, min_tokens=20, temperature=1.0, top_p=0.8, top_k=50, seed=7)
    ids = prompt(tiny, "seeded")
    first, _ = await run(engine, ids, params)
    second, _ = await run(engine, ids, params)
    company = [run(engine, prompt(tiny, "other"), SamplingParams(max_tokens=20, temperature=1.0, seed=i)) for i in range(5)]
    in_company, *_ = await asyncio.gather(run(engine, ids, params), *company)
    assert first == second == in_company[0]
    other_seed, _ = await run(
        engine, ids, SamplingParams(max_tokens=20, min_tokens=20, temperature=1.0, top_p=0.8, top_k=50, seed=8)
    )
    assert other_seed != first


async def test_a_request_joining_mid_stream_gets_the_same_tokens_as_alone(tiny, engine):
    long_ids, late_ids = prompt(tiny, "the first request"), prompt(tiny, "the late one, with a longer prompt than the first")
    params = SamplingParams(max_tokens=40, min_tokens=40, temperature=0)
    long_alone, _ = await run(engine, long_ids, params)
    late_alone, _ = await run(engine, late_ids, GREEDY)

    first_texts: list[str] = []

    async def first():
        async for output in engine.generate(long_ids, params):
            first_texts.append(output.text)
            if len(first_texts) == 10:
                late.set()  # join while the first is mid-stream

    late = asyncio.Event()

    async def second():
        await late.wait()
        return (await run(engine, late_ids, GREEDY))[0]

    _, late_text = await asyncio.gather(first(), second())
    assert "".join(first_texts) == long_alone
    assert late_text == late_alone


@pytest.mark.parametrize("newcomers_first", [None, False], ids=["cpu-default", "off"])
async def test_a_newcomers_prompt_runs_before_the_running_requests_next_token_on_a_cpu(tiny, newcomers_first):
    every_token = {"max_chunks_per_s": math.inf, "max_stream_chunks_per_s": math.inf}
    engine = BatchedEngine(tiny, max_batch_size=4, max_context=256, newcomers_first=newcomers_first, **every_token)
    steps: list[tuple[int, int]] = []  # (decode rows, prompt chunks) of each step run
    run_step = engine.runner.run

    def recording(step):
        steps.append((len(step.decode), len(step.chunks)))
        return run_step(step)

    engine.runner.run = recording  # type: ignore[method-assign]
    try:
        params = SamplingParams(max_tokens=200, min_tokens=200, temperature=0)  # running when the late one comes
        outputs = aiter(engine.generate(prompt(tiny, "the first request"), params))
        for _ in range(5):
            await anext(outputs)
        await run(engine, prompt(tiny, "the late one"), GREEDY)
        async for _ in outputs:
            pass
    finally:
        engine.shutdown()
    joined = next(i for i, (_, chunks) in enumerate(steps) if chunks and i > 0)  # the late prompt's step
    if newcomers_first is None:
        assert steps[joined] == (0, 1) and steps[joined + 1] == (2, 0)
    else:
        assert steps[joined] == (1, 1)


@OVERLAP
async def test_closing_the_stream_frees_the_slot(tiny, overlap):
    engine = BatchedEngine(tiny, max_batch_size=1, max_context=256, overlap_steps=overlap)
    try:
        stream = engine.generate(prompt(tiny, "hello"), SamplingParams(max_tokens=200, min_tokens=200, temperature=0))
        await stream.__anext__()
        await stream.aclose()
        # The single slot is free again: a new request runs to completion.
        _, outputs = await asyncio.wait_for(run(engine, prompt(tiny, "next"), GREEDY), timeout=10)
        assert outputs[-1].completion_tokens == 24
        assert engine.stats().active_requests == 0 and engine.stats().total_requests == 2
    finally:
        engine.shutdown()


@OVERLAP
async def test_requests_beyond_the_batch_size_wait_their_turn(tiny, overlap):
    engine = BatchedEngine(tiny, max_batch_size=2, max_context=256, overlap_steps=overlap)
    try:
        results = await asyncio.gather(*(run(engine, prompt(tiny, f"q{i}"), GREEDY) for i in range(5)))
        assert all(outputs[-1].completion_tokens == 24 for _, outputs in results)
    finally:
        engine.shutdown()


async def test_a_prompt_longer_than_the_context_is_rejected_before_generating(tiny, engine):
    with pytest.raises(PromptTooLongError, match="256 tokens"):
        await run(engine, [5] * 300, GREEDY)


@OVERLAP
async def test_generation_stops_at_the_context_end(tiny, overlap):
    engine = BatchedEngine(tiny, max_batch_size=2, max_context=32, overlap_steps=overlap)
    try:
        _, outputs = await run(engine, [5] * 30, SamplingParams(max_tokens=10, temperature=0))
        assert outputs[-1].finish_reason == "length" and outputs[-1].completion_tokens == 2
    finally:
        engine.shutdown()


async def test_stop_string_truncates_the_output(tiny, engine):
    ids = prompt(tiny, "stop me")
    full, _ = await run(engine, ids, GREEDY)
    stop = full[5:8]
    text, outputs = await run(engine, ids, SamplingParams(max_tokens=24, temperature=0, stop=(stop,)))
    assert text == full[: full.index(stop)]
    assert outputs[-1].finish_reason == "stop"


async def test_eos_stops_unless_ignored_and_is_suppressed_before_min_tokens(tiny, engine):
    eos = tiny.tokenizer.eos_token_id
    # Make EOS the greedy choice by biasing lm_head towards it for this test's engine.
    engine.runner.weights.lm_head.weight.data[eos] *= 0
    engine.runner.weights.lm_head.bias = torch.nn.Parameter(torch.zeros(259))
    engine.runner.weights.lm_head.bias.data[eos] = 100.0
    ids = prompt(tiny, "eos")
    _, outputs = await run(engine, ids, SamplingParams(max_tokens=10, temperature=0))
    # The EOS token ends the answer but is not counted (as in OpenAI's usage).
    assert outputs[-1].finish_reason == "stop" and outputs[-1].completion_tokens == 0
    _, outputs = await run(engine, ids, SamplingParams(max_tokens=10, min_tokens=4, temperature=0))
    assert outputs[-1].finish_reason == "stop" and outputs[-1].completion_tokens == 4  # 4 forced, then EOS
    _, outputs = await run(engine, ids, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    assert outputs[-1].finish_reason == "length" and outputs[-1].completion_tokens == 6


@pytest.mark.slow
async def test_smollm2_greedy_answer_matches_transformers_token_for_token():
    torch.set_num_threads(2)
    loaded = load_model(ModelConfig(name="smol"))
    tokenizer = loaded.tokenizer
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        expected = loaded.model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)[0, len(ids) :].tolist()
    engine = BatchedEngine(loaded, max_context=512)
    try:
        answer, outputs = await run(engine, ids, SamplingParams(max_tokens=40, temperature=0, repeat_penalty=1.0))
    finally:
        engine.shutdown()
    assert expected[-1] == loaded.tokenizer.eos_token_id
    assert outputs[-1].completion_tokens == len(expected) - 1  # EOS is not counted
    assert answer == tokenizer.decode(expected, skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
async def test_smollm2_int8_still_answers_the_capital_of_france():
    loaded = load_model(ModelConfig(name="smol"))
    text = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    engine = BatchedEngine(loaded, weights="int8", max_context=512)
    try:
        answer, _ = await run(engine, prompt(loaded, text), SamplingParams(max_tokens=40, temperature=0, repeat_penalty=1.0))
    finally:
        engine.shutdown()
    assert "Paris" in answer


async def test_prefix_caching_reuses_shared_prompts_without_changing_the_output(tiny):
    system = prompt(tiny, "You are a helpful assistant who answers briefly. ")
    prompts = [system + prompt(tiny, q) for q in ("Why is the sky blue?", "Name a prime.", "Why is the sky blue?")]
    outputs = {}
    for caching in (False, True):
        engine = BatchedEngine(tiny, max_batch_size=8, max_context=256, prefill_chunk_tokens=16, prefix_caching=caching)
        try:
            sequential = [(await run(engine, p, GREEDY))[0] for p in prompts]
            reused_sequentially = engine.stats().reused_prompt_tokens
            # Eight identical prompts at once: one computes it, the others wait a step and copy.
            together = await asyncio.gather(*(run(engine, prompts[1], GREEDY) for _ in range(8)))
            outputs[caching] = (sequential, [text for text, _ in together])
        finally:
            engine.shutdown()
        if caching:
            # The second prompt shares the system prompt; the third is the first one again.
            assert reused_sequentially == len(system) + len(prompts[2]) - 1
            assert engine.stats().reused_prompt_tokens - reused_sequentially == 8 * (len(prompts[1]) - 1)
        else:
            assert engine.stats().reused_prompt_tokens == 0
    assert outputs[True] == outputs[False]
    assert len(set(outputs[True][1])) == 1


async def test_many_streams_get_coalesced_chunks_with_the_same_text(tiny, engine):
    ids = [prompt(tiny, f"stream {i}") for i in range(4)]
    expected = [(await run(engine, p, GREEDY))[0] for p in ids]
    slow = BatchedEngine(tiny, max_batch_size=8, max_context=256, max_chunks_per_s=20)  # 4 streams: one chunk per 0.2 s
    try:
        results = await asyncio.gather(*(run(slow, p, GREEDY) for p in ids))
    finally:
        slow.shutdown()
    assert [text for text, _ in results] == expected
    for _, outputs in results:
        assert outputs[0].completion_tokens == 1  # the first token is never held back
        assert len(outputs) < 24 // 2 and outputs[-1].completion_tokens == 24


async def test_streams_started_apart_get_their_chunks_in_the_same_steps(tiny, monkeypatch):
    """The chunk windows are the replica's: streams that joined at different steps are sent
    their text in the same steps (one frame, one wake-up downstream for all), not each on its own
    schedule; and newcomers, whose prompts run in steps of their own, neither start a window nor
    make the others' chunks more frequent. The output stage's clock counts its steps here (1 ms
    each), so the windows are steps: 4 or 5 streams at 400 chunks a second, 10-12.5 steps."""
    steps = [0]
    emit = OutputStage.emit

    def counting_emit(stage, *args, **kwargs):
        steps[0] += 1
        return emit(stage, *args, **kwargs)

    monkeypatch.setattr(OutputStage, "emit", counting_emit)
    monkeypatch.setattr(outputs_module, "time", types.SimpleNamespace(monotonic=lambda: steps[0] / 1000))
    deliveries: list[list[GenerationOutput]] = []
    deliver = Posts.deliver

    def recording_deliver(posts):
        deliveries.append([item for _, item in posts._items])
        deliver(posts)

    monkeypatch.setattr(Posts, "deliver", recording_deliver)
    engine = BatchedEngine(tiny, max_batch_size=5, max_context=256, max_chunks_per_s=400, max_stream_chunks_per_s=math.inf)
    long = SamplingParams(max_tokens=160, temperature=0, ignore_eos=True)
    started = [asyncio.Event() for _ in range(4)]

    async def stream(index: int) -> int:
        if index:
            await started[index - 1].wait()  # each joins after the one before has its first token
        count = 0
        async for _ in engine.generate(prompt(tiny, f"stream {index}"), long):
            started[index].set()
            count += 1
        return count

    async def newcomers() -> int:
        """One short request after another, in the fifth slot, while the long streams run."""
        answered = 0
        while not answered or len(engine.scheduler.running()) > 0:
            await run(engine, prompt(tiny, f"newcomer {answered}"), SamplingParams(max_tokens=2, ignore_eos=True))
            answered += 1
        return answered

    try:
        *counts, answered = await asyncio.gather(*(stream(i) for i in range(4)), newcomers())
    finally:
        engine.shutdown()
    middle = [[o for o in items if o.completion_tokens > 1 and o.finish_reason is None] for items in deliveries]
    middle = [outputs for outputs in middle if outputs]
    assert answered > 20  # newcomers kept arriving
    # Each long stream sends one chunk a window of 10 steps or more, its first and its end ...
    assert all(10 <= count <= steps[0] / 10 + 3 for count in counts)
    # ... and the steps that send them send three or four streams' at once (3.9; on each
    # stream's own schedule, as before the windows were the replica's, 1.3).
    assert sum(map(len, middle)) / len(middle) >= 2.5


async def test_overlapped_steps_stream_exactly_what_step_by_step_streams(tiny, redone_rows):
    """Queuing each decode step before reading the last one changes no output: not the finish
    of requests whose end the host learns a step late (EOS, stop strings), not requests joining
    and leaving, and not rows whose drafted id the whole-vocabulary sort then changes (top_k
    beyond the candidates): the step queued meanwhile read the drafted id on the device, so
    that row's result is dropped and the row decoded again from the right id."""
    workload = [
        ("hi", SamplingParams(max_tokens=30, temperature=0)),
        ("a longer prompt, over one chunk of sixteen tokens", SamplingParams(max_tokens=17, temperature=0.8, top_p=0.9, seed=1)),
        ("sorted", SamplingParams(max_tokens=40, temperature=1.5, top_k=CANDIDATES + 36, seed=2)),
        ("stops", SamplingParams(max_tokens=40, temperature=0.9, seed=3, stop=("e", "a", "o"))),
        ("penalty", SamplingParams(max_tokens=25, temperature=0.7, top_p=0.9, repeat_penalty=1.3, seed=4)),
        ("occurrences", SamplingParams(max_tokens=25, temperature=0.8, presence_penalty=1.0, frequency_penalty=0.5, seed=5)),
        ("late", SamplingParams(max_tokens=12, temperature=0)),
    ]

    async def staggered(engine, index, text, params):
        await asyncio.sleep(0.03 * index)  # later requests join running ones
        text, outputs = await run(engine, prompt(tiny, text), params)
        return text, outputs[-1].finish_reason, outputs[-1].completion_tokens

    results = {}
    for overlap in (False, True):
        engine = BatchedEngine(tiny, max_batch_size=4, max_context=256, prefill_chunk_tokens=16, overlap_steps=overlap)
        try:
            results[overlap] = await asyncio.gather(*(staggered(engine, i, *w) for i, w in enumerate(workload)))
        finally:
            engine.shutdown()
    assert results[True] == results[False]
    assert sum(redone_rows) > 0  # the sort did change drafted ids that a queued step had read
    assert {finish for _, finish, _ in results[True]} == {"stop", "length"}
