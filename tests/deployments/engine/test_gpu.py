"""The batched engine on a CUDA GPU: the same answers as transformers on the same GPU, CUDA
graphs changing nothing, batch independence, seeds, cancellation and the KV cache's memory
bound. Skipped where torch sees no CUDA GPU; `make test-gpu` runs them on a GPU machine.

Equality tests use fp32 weights (transformers on the GPU in fp32 too): bf16's rounding depends
on the matmul shapes, so bf16 is checked by closeness instead."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from deployments.engine.batched import BatchedEngine
from deployments.engine.forward import LONG_CHUNK_TOKENS, PromptChunk, build_step, extract_weights, forward, rope_table
from deployments.engine.kv_cache import KVCache
from deployments.engine.reference import ReferenceEngine
from deployments.engine.sampler import CANDIDATES
from deployments.engine.sampling_params import SamplingParams
from deployments.model_loader import LoadedModel, build_tiny_random_model
from deployments.model_registry import ModelConfig
from tests.deployments.engine.helpers import written_together

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CUDA = torch.device("cuda")
GREEDY = SamplingParams(max_tokens=32, min_tokens=32, temperature=0, repeat_penalty=1.0)
PROMPTS = ["Hello there", "The quick brown fox jumps over", "a", "Once upon a time in a land far away, " * 4, "1 2 3"]


def load(shape: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    model, tokenizer = build_tiny_random_model(0, shape)
    model = model.to(CUDA, dtype).eval()
    config = ModelConfig(name=shape, source={"kind": "tiny_random", "shape": shape}, device="cuda")
    return LoadedModel(config, model, tokenizer, CUDA, 512)


@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def loaded(request) -> LoadedModel:
    return load(request.param)


def engine_for(loaded: LoadedModel, **options) -> BatchedEngine:
    options = {
        "weights": "fp32",
        "max_batch_size": 8,
        "max_context": 256,
        "prefill_chunk_tokens": 32,
        "max_chunks_per_s": math.inf,
        "max_stream_chunks_per_s": math.inf,
        **options,
    }
    return BatchedEngine(loaded, **options)


def ids(loaded: LoadedModel, text: str) -> list[int]:
    return loaded.tokenizer(text, add_special_tokens=False)["input_ids"]


async def answer(engine, prompt_ids: list[int], params: SamplingParams = GREEDY) -> str:
    return "".join([o.text async for o in engine.generate(prompt_ids, params)])


def transformers_greedy(loaded: LoadedModel, prompt_ids: list[int], params: SamplingParams) -> str:
    with torch.inference_mode():
        out = loaded.model.generate(
            torch.tensor([prompt_ids], device=CUDA),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long, device=CUDA),
            max_new_tokens=params.max_tokens,
            min_new_tokens=params.min_tokens,
            do_sample=False,
            pad_token_id=loaded.tokenizer.pad_token_id,
        )
    return loaded.tokenizer.decode(out[0, len(prompt_ids) :], skip_special_tokens=True)


async def test_greedy_matches_transformers_on_the_gpu_with_cuda_graphs(loaded):
    engine = engine_for(loaded)
    try:
        assert engine.runner.graphs is not None
        ours = await asyncio.gather(*(answer(engine, ids(loaded, p)) for p in PROMPTS))
    finally:
        engine.shutdown()
    assert ours == [transformers_greedy(loaded, ids(loaded, p), GREEDY) for p in PROMPTS]


async def test_long_prompt_chunks_match_transformers_on_the_gpu(loaded):
    # Chunks of LONG_CHUNK_TOKENS or more take torch's fused attention (`forward.CudaStepAttention`): a
    # long prompt from position 0 beside a short one, then a prompt continuing an earlier one
    # after a prefix-cache hit (a long chunk from the middle of its row).
    story = ids(loaded, "Once upon a time in a land far away, a fox met a crow. " * 40)
    other = ids(loaded, "The quick brown fox jumps over the lazy dog. " * 40)[:300]
    short, first, second = ids(loaded, "1 2 3"), story[:120], story[:420]
    assert len(story) >= 420 and LONG_CHUNK_TOKENS <= 300
    params = SamplingParams(max_tokens=16, min_tokens=16, temperature=0, repeat_penalty=1.0)
    engine = engine_for(loaded, max_context=512, prefill_chunk_tokens=2048)
    try:
        ours = await asyncio.gather(answer(engine, other, params), answer(engine, short, params), answer(engine, first, params))
        reused = engine.stats().reused_prompt_tokens
        ours.append(await answer(engine, second, params))
        assert (
            len(first) <= engine.stats().reused_prompt_tokens - reused <= len(second) - LONG_CHUNK_TOKENS
        )  # then one long chunk
    finally:
        engine.shutdown()
    assert ours == [transformers_greedy(loaded, p, params) for p in (other, short, first, second)]


async def test_cuda_graphs_change_no_token_and_a_request_alone_equals_it_in_company(loaded):
    # Greedy rows, some with the repeat penalty (the original's clients send it at temperature
    # 0 too), some with OpenAI's presence and frequency penalties and a logit bias: the graphs'
    # two greedy sampler variants and the one that does everything.
    penalized = [{"repeat_penalty": 1.3}, {"presence_penalty": 0.8, "frequency_penalty": 0.4, "logit_bias": ((5, 2.0),)}]
    params = [GREEDY, *(SamplingParams(**{**GREEDY.__dict__, **p}) for p in penalized)] * (len(PROMPTS) // 3 + 1)
    results = {}
    for graphs in (True, False):
        engine = engine_for(loaded, cuda_graphs=graphs)
        try:
            together = await asyncio.gather(*(answer(engine, ids(loaded, p), q) for p, q in zip(PROMPTS, params)))
            alone = [await answer(engine, ids(loaded, p), q) for p, q in zip(PROMPTS, params)]
        finally:
            engine.shutdown()
        assert together == alone
        results[graphs] = together
    assert results[True] == results[False]


async def test_overlapped_steps_change_no_token_on_the_gpu(loaded, redone_rows):
    # Each graph step queued before the last one is read (the GPU default) vs step by step,
    # with requests that end a step before the host knows (stop strings), a greedy and a
    # sampled graph variant, and a row whose every draw sorts the vocabulary (top_k beyond the
    # candidates), so a queued step read a drafted id that `finish` changed and is redone.
    workload = [
        (PROMPTS[0], GREEDY),
        (PROMPTS[1], SamplingParams(max_tokens=20, temperature=0, stop=("e",))),
        # Hot enough that the SmolLM2-shaped model's drafts (over the candidates) and the sort's
        # draws (over the top 100) differ too.
        (PROMPTS[2], SamplingParams(max_tokens=28, temperature=5.0, top_k=CANDIDATES + 36, seed=5)),
        (PROMPTS[3], SamplingParams(max_tokens=24, temperature=0.7, top_p=0.9, repeat_penalty=1.1, seed=6)),
    ]
    results = {}
    for overlap in (True, False):
        engine = engine_for(loaded, overlap_steps=overlap)
        try:
            assert engine.runner.graphs is not None
            results[overlap] = await asyncio.gather(*(answer(engine, ids(loaded, p), params) for p, params in workload))
        finally:
            engine.shutdown()
    assert results[True] == results[False]
    assert sum(redone_rows) > 0


async def test_bf16_logits_stay_close_to_transformers_bf16():
    loaded = load("smollm2", torch.bfloat16)
    w = extract_weights(loaded.model, "bf16")
    prompt_ids = ids(loaded, PROMPTS[3])
    cache = KVCache(len(w.layers), 1, w.n_kv_heads, 128, w.head_dim, w.dtype, CUDA, 128)
    batch = build_step([], [(PromptChunk(0, 0, len(prompt_ids), True), prompt_ids)], cuda=True).to(CUDA)
    with torch.inference_mode():
        ours = forward(w, cache, rope_table(w, 128), batch)[0]
        theirs = loaded.model(torch.tensor([prompt_ids], device=CUDA)).logits[0, -1].float()
    assert (ours - theirs).norm() / theirs.norm() < 2e-2


async def test_seeded_sampling_repeats_in_any_company_on_the_gpu(loaded):
    # The draw is a function of the row's logits, seed and step only; on a GPU the logits
    # themselves can differ in the last bits with the batch size (cuBLAS picks kernels by
    # shape), which moves a draw only when its number lands within rounding of a boundary:
    # never seen with peaked (trained-like) distributions, often with flat random ones.
    engine = engine_for(loaded)
    seeded = SamplingParams(max_tokens=24, min_tokens=24, temperature=0.7, top_p=0.9, repeat_penalty=1.1, seed=1234)
    prompt_ids = ids(loaded, PROMPTS[0])
    try:
        alone = await answer(engine, prompt_ids, seeded)
        crowd = await asyncio.gather(
            answer(engine, prompt_ids, seeded),
            *(answer(engine, ids(loaded, p), SamplingParams(max_tokens=24, temperature=1.0)) for p in PROMPTS),
        )
        other_seed = await answer(engine, prompt_ids, SamplingParams(**{**seeded.__dict__, "seed": 99}))
    finally:
        engine.shutdown()
    assert crowd[0] == alone
    assert other_seed != alone


async def test_closing_a_stream_frees_its_slot_on_the_gpu(loaded):
    engine = engine_for(loaded, max_batch_size=2)
    try:
        stream = engine.generate(ids(loaded, PROMPTS[0]), SamplingParams(max_tokens=200, min_tokens=200, temperature=0))
        await anext(stream)
        await anext(stream)
        assert engine.stats().active_requests == 1
        await stream.aclose()
        for _ in range(100):
            if engine.stats().active_requests == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.stats().active_requests == 0
        assert await answer(engine, ids(loaded, PROMPTS[1])) == transformers_greedy(loaded, ids(loaded, PROMPTS[1]), GREEDY)
    finally:
        engine.shutdown()


def test_the_kv_cache_stays_within_its_share_of_free_memory():
    loaded = load("tiny")
    free, _ = torch.cuda.mem_get_info()
    w = extract_weights(loaded.model, "bf16")
    per_position = KVCache.bytes_per_position(len(w.layers), w.n_kv_heads, w.head_dim, w.dtype)
    # A fraction that holds 256 rows of ~1,000 positions, not the 100,000 asked for.
    fraction = 257 * 1000 * per_position / free
    engine = BatchedEngine(loaded, weights="bf16", max_batch_size=256, max_context=100_000, gpu_memory_fraction=fraction)
    try:
        assert 256 <= engine.max_context < 1000 * 1.01
        assert engine.runner.cache.size_bytes <= fraction * free
        assert engine.runner.graphs.sizes[-1] == 256
    finally:
        engine.shutdown()
    with pytest.raises(ValueError, match="lower max_batch_size or raise gpu_memory_fraction"):
        BatchedEngine(loaded, weights="bf16", max_batch_size=256, max_context=100_000, gpu_memory_fraction=fraction / 100)


async def test_the_reference_engine_runs_on_the_gpu():
    loaded = load("tiny")
    engine = ReferenceEngine(loaded)
    try:
        prompt_ids = ids(loaded, PROMPTS[1])
        assert await answer(engine, prompt_ids) == transformers_greedy(loaded, prompt_ids, GREEDY)
    finally:
        engine.shutdown()


def test_the_sampling_table_written_on_the_gpu_equals_the_cpus():
    cpu, gpu = written_together(torch.device("cpu")), written_together(CUDA)
    for name in ("floats", "ints", "u", "bias_ids", "bias_values"):  # u: each row's draws, computed on the GPU
        assert torch.equal(getattr(cpu, name), getattr(gpu, name).cpu()), name
