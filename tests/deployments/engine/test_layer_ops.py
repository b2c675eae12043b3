"""A decoder layer's small ops, each device's module against plain torch written out here:
`torch_layer_ops` (every device), `cpu_layer_ops` (our C kernels, x86 AVX2, fp32) and
`fused_layer_ops` (Triton; on a GPU, or without one in Triton's interpreter, which
tests/conftest.py turns on). Then the whole decoder stack with each module against
`torch_layer_ops`'."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from deployments.engine import cpu_kernels, cpu_layer_ops, torch_layer_ops
from deployments.engine.forward import PromptChunk, _layers, build_step, embed, extract_weights, layer_ops, rms_norm, rope_table
from deployments.engine.kv_cache import KVCache
from deployments.model_loader import build_tiny_random_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAS_TRITON = importlib.util.find_spec("triton") is not None


def ops_module(name: str):
    if name == "cpu_layer_ops":
        if DEVICE != "cpu" or cpu_kernels.load() is None:
            pytest.skip("our C kernels run on an x86 AVX2 CPU with a C compiler")
        return cpu_layer_ops
    if name == "fused_layer_ops":
        if not HAS_TRITON:
            pytest.skip("Triton comes with torch's CUDA builds; `pip install triton` here")
        from deployments.engine import fused_layer_ops

        return fused_layer_ops
    return torch_layer_ops


# Each module with the dtypes it serves: the C kernels are fp32 only.
CASES = [
    ("torch_layer_ops", torch.float32),
    ("torch_layer_ops", torch.bfloat16),
    ("cpu_layer_ops", torch.float32),
    ("fused_layer_ops", torch.float32),
    ("fused_layer_ops", torch.bfloat16),
]


def close(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Equal up to the last bits of the dtype: fp32 arithmetic may fuse multiply-adds
    differently, an exp may differ in its last bits, and Triton's interpreter rounds fp32 to
    bf16 toward zero (a GPU rounds to nearest), twice in `silu_and_mul`."""
    tolerance = 2e-6 if ours.dtype == torch.float32 else 1.6e-2
    return torch.allclose(ours.float(), theirs.float(), rtol=tolerance, atol=tolerance)


def tiny_model_with_distinct_norms():
    """The tiny random model with its norm weights randomized: initialized to ones, every norm
    would look alike, and a norm applied in the wrong place would go unnoticed."""
    model, _ = build_tiny_random_model()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
    return model


def rope_table_for(head_dim: int, context: int) -> torch.Tensor:
    angles = torch.outer(torch.arange(context, dtype=torch.float32), torch.rand(head_dim // 2))
    return torch.polar(torch.full_like(angles, 1.5), angles).to(DEVICE)


@pytest.mark.parametrize("name, dtype", CASES)
@pytest.mark.parametrize("n_heads, n_kv_heads, head_dim", [(9, 3, 64), (4, 2, 16)])
def test_rope_and_cache_write_rotates_pairs_and_writes_each_tokens_place(name, dtype, n_heads, n_kv_heads, head_dim):
    ops = ops_module(name)
    torch.manual_seed(0)
    rows, capacity = 4, 40
    rope = rope_table_for(head_dim, 64)
    # Decode tokens of two rows, then a prompt chunk of row 3.
    slots = torch.tensor([0, 2, 3, 3, 3], device=DEVICE)
    positions = torch.tensor([39, 0, 5, 6, 7], device=DEVICE)
    n = len(slots)
    qkv = torch.randn(n, (n_heads + 2 * n_kv_heads) * head_dim, dtype=dtype, device=DEVICE)
    k_cache, v_cache = (torch.zeros(rows, n_kv_heads, capacity, head_dim, dtype=dtype, device=DEVICE) for _ in range(2))

    q = ops.rope_and_cache_write(qkv, rope, positions, slots, k_cache, v_cache, n_heads, n_kv_heads)

    heads = qkv.view(n, -1, head_dim // 2, 2).float()  # pair i of a head: elements 2i, 2i + 1
    cos, sin = rope[positions].real[:, None], rope[positions].imag[:, None]
    rotated = torch.stack([heads[..., 0] * cos - heads[..., 1] * sin, heads[..., 0] * sin + heads[..., 1] * cos], -1).flatten(2)
    assert close(q, rotated[:, :n_heads].to(dtype))
    for t in range(n):
        assert close(k_cache[slots[t], :, positions[t]], rotated[t, n_heads : n_heads + n_kv_heads].to(dtype))
        assert torch.equal(
            v_cache[slots[t], :, positions[t]], qkv[t, (n_heads + n_kv_heads) * head_dim :].view(n_kv_heads, head_dim)
        )
    # Nowhere else: 5 tokens' places written, every other one still zero.
    assert int((k_cache.abs().sum(-1) > 0).sum()) == int((v_cache.abs().sum(-1) > 0).sum()) == n * n_kv_heads


@pytest.mark.parametrize("name, dtype", CASES)
@pytest.mark.parametrize("width", [1536, 104])
def test_silu_and_mul_equals_torchs(name, dtype, width):
    ops = ops_module(name)
    torch.manual_seed(1)
    gate_up = torch.randn(3, 2 * width, dtype=dtype, device=DEVICE) * 4
    gate_up[0, :8] = torch.tensor([-100.0, -30, -1e-3, 0, 1e-3, 30, 100, 89])  # exp's clamps and underflow
    gate, up = gate_up.chunk(2, dim=-1)
    assert close(ops.silu_and_mul(gate_up), F.silu(gate) * up)


@pytest.mark.parametrize("name, dtype", CASES)
@pytest.mark.parametrize("width", [576, 104])
def test_add_rms_norm_equals_torchs_add_then_norm(name, dtype, width):
    ops = ops_module(name)
    torch.manual_seed(2)
    x, delta = (torch.randn(3, width, dtype=dtype, device=DEVICE) for _ in range(2))
    x[1] *= 1000  # a row's scale is its own
    weight = torch.rand(width, dtype=dtype, device=DEVICE) + 0.5
    total, normed = ops.add_rms_norm(x, delta, weight, 1e-5)
    assert close(total, x + delta)
    assert close(normed, rms_norm(x + delta, weight, 1e-5))


@pytest.mark.parametrize("head_dim", [64, 16])
def test_decode_attention_reads_each_rows_own_keys(head_dim):
    ops_module("cpu_layer_ops")
    torch.manual_seed(3)
    n_heads, n_kv_heads, rows, capacity = 9, 3, 5, 300
    k_cache, v_cache = (torch.randn(rows, n_kv_heads, capacity, head_dim) for _ in range(2))
    # Lengths 1, 8, 9, 300 (whole and partial vectors of 8 scores), rows in any order.
    slots, positions = torch.tensor([3, 0, 4, 1]), torch.tensor([0, 7, 8, 299])
    q = torch.randn(len(slots), n_heads, head_dim) * 4 / head_dim**0.5  # pre-scaled, as the model's are; softmax peaked

    out = cpu_layer_ops.decode_attention(q, k_cache, v_cache, slots, positions)

    for t, (slot, position) in enumerate(zip(slots, positions)):
        keys = k_cache[slot, :, : position + 1].repeat_interleave(n_heads // n_kv_heads, 0)  # [n_heads, length, d]
        values = v_cache[slot, :, : position + 1].repeat_interleave(n_heads // n_kv_heads, 0)
        probs = (keys @ q[t, :, :, None]).squeeze(-1).softmax(-1)
        torch.testing.assert_close(out[t], (probs[:, None] @ values).squeeze(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["cpu_layer_ops", "fused_layer_ops"])
def test_the_decoder_stack_computes_the_same_with_each_devices_ops(name):
    """The whole decoder stack, prompt chunks then decode rows (over the torch mask path's
    attention on the CPU, our decode attention with the C kernels), both ways: same hidden
    states, same KV cache."""
    ops = ops_module(name)
    model = tiny_model_with_distinct_norms()
    w = extract_weights(model.to(DEVICE).eval(), "fp32")
    rope = rope_table(w, 64)
    a, b = torch.randint(0, 259, (9,)).tolist(), torch.randint(0, 259, (5,)).tolist()
    steps = [
        build_step([], [(PromptChunk(0, 0, 9, True), a), (PromptChunk(2, 0, 5, True), b)]),
        build_step([(0, 9, 5), (2, 5, 7)], [(PromptChunk(1, 0, 3, True), a[:3])]),
        build_step([(0, 10, 9), (1, 3, 1), (2, 6, 2)], []),
    ]
    results = []
    for each in (torch_layer_ops, ops):
        cache = KVCache(len(w.layers), 3, w.n_kv_heads, 64, w.head_dim, w.dtype, torch.device(DEVICE), 64)
        with torch.inference_mode():
            hidden = [
                _layers(w, cache, rope, moved, *embed(w, moved.token_ids), each)
                for moved in (s.to(torch.device(DEVICE)) for s in steps)
            ]
        results.append((hidden, cache.kv))
    (theirs, their_cache), (ours, our_cache) = results
    assert all(close(o, t) for o, t in zip(ours, theirs))
    assert close(our_cache, their_cache) and our_cache.abs().sum() > 0


def test_the_model_takes_our_c_kernels_where_they_run():
    model, _ = build_tiny_random_model()
    w = extract_weights(model.eval(), "fp32")
    x = w.embed[:2]
    expected = cpu_layer_ops if cpu_kernels.load() is not None else torch_layer_ops
    assert layer_ops(w, x) is expected
    assert layer_ops(w, x.bfloat16()) is torch_layer_ops  # the C kernels are fp32 only


def test_a_decode_step_in_one_c_call_gives_the_layer_loops_numbers_to_the_bit():
    """`cpu_layer_ops.decode_layers` (every layer of a decode-only int4 step in one call) against
    `_layers` with `cpu_layer_ops`, which serves the steps with prompt chunks: a request's tokens
    must not depend on whether another request was prefilling in its step."""
    ops_module("cpu_layer_ops")
    model = tiny_model_with_distinct_norms()
    w = extract_weights(model.eval(), "int4")
    assert w.decode_table is not None
    rope = rope_table(w, 64)
    prompts = {slot: torch.randint(0, 259, (length,)).tolist() for slot, length in ((0, 9), (1, 3), (3, 20))}
    caches = [KVCache(len(w.layers), 4, w.n_kv_heads, 64, w.head_dim, w.dtype) for _ in range(2)]
    decode = [(slot, len(ids), 7 + slot) for slot, ids in prompts.items()]  # rows 0, 1, 3: slot 2 free
    step = build_step(decode, [])
    with torch.inference_mode():
        for cache in caches:
            for slot, ids in prompts.items():
                prefill = build_step([], [(PromptChunk(slot, 0, len(ids), True), ids)])
                _layers(w, cache, rope, prefill, *embed(w, prefill.token_ids), cpu_layer_ops)
        theirs = _layers(w, caches[0], rope, step, *embed(w, step.token_ids), cpu_layer_ops)
        ours = cpu_layer_ops.decode_layers(
            w.decode_table,
            *embed(w, step.token_ids),
            rope,
            step.positions,
            step.slots,
            caches[1].kv,
            w.n_heads,
            w.intermediate_size,
            w.rms_norm_eps,
        )
    assert torch.equal(ours, theirs) and ours.abs().sum() > 0
    assert torch.equal(caches[1].kv, caches[0].kv)
