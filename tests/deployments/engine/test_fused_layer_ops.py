"""The GPU's fused layer ops against the torch ops the CPU runs, on a GPU or (no GPU) in Triton's
interpreter (tests/conftest.py turns it on)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton", reason="Triton comes with torch's CUDA builds; `pip install triton` here")
from deployments.engine.forward import (  # noqa: E402
    PromptChunk,
    _layers,
    _layers_on_gpu,
    apply_rope,
    build_step,
    extract_weights,
    rms_norm,
    rope_table,
)
from deployments.engine.fused_layer_ops import add_rms_norm, rope_and_cache_write, silu_and_mul  # noqa: E402
from deployments.engine.kv_cache import KVCache  # noqa: E402
from deployments.model_loader import build_tiny_random_model  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def close(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Equal up to the last bits of the dtype: fp32 arithmetic may fuse multiply-adds
    differently, and Triton's interpreter rounds fp32 to bf16 toward zero (a GPU rounds to
    nearest), twice in `silu_and_mul`."""
    tolerance = 1e-6 if ours.dtype == torch.float32 else 1.6e-2
    return torch.allclose(ours.float(), theirs.float(), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize(
    "n_heads, n_kv_heads, head_dim, dtype", [(9, 3, 64, torch.bfloat16), (4, 2, 16, torch.float32)],
)
def test_rope_and_cache_write_equals_torchs_rope_and_index_copy(n_heads, n_kv_heads, head_dim, dtype):
    torch.manual_seed(0)
    rows, capacity, context = 4, 40, 64
    angles = torch.outer(torch.arange(context, dtype=torch.float32), torch.rand(head_dim // 2))
    rope = torch.polar(torch.full_like(angles, 1.5), angles).to(DEVICE)
    # Decode tokens of two rows, then a prompt chunk of row 3.
    slots = torch.tensor([0, 2, 3, 3, 3], device=DEVICE)
    positions = torch.tensor([39, 0, 5, 6, 7], device=DEVICE)
    n = len(slots)
    qkv = torch.randn(n, (n_heads + 2 * n_kv_heads) * head_dim, dtype=dtype, device=DEVICE)

    def cache() -> KVCache:
        return KVCache(1, rows - 1, n_kv_heads, capacity, head_dim, dtype, torch.device(DEVICE), capacity)

    theirs = cache()
    qk = apply_rope(qkv[:, : (n_heads + n_kv_heads) * head_dim].reshape(n, n_heads + n_kv_heads, head_dim), rope[positions])
    v = qkv[:, (n_heads + n_kv_heads) * head_dim :].reshape(n, n_kv_heads, head_dim)
    theirs.update(0, theirs.write_index(slots, positions, n_kv_heads), qk[:, n_heads:], v)

    ours = cache()
    q = rope_and_cache_write(qkv, rope, positions, slots, ours.k[0], ours.v[0], n_heads, n_kv_heads)
    assert close(q, qk[:, :n_heads])
    assert close(ours.k[0], theirs.k[0]) and torch.equal(ours.v[0], theirs.v[0])
    assert ours.k[0][0, :, 39].abs().sum() > 0  # written where the step said, nowhere else
    assert ours.k[0][1].abs().sum() == 0 and ours.v[0][0, :, :39].abs().sum() == 0


@pytest.mark.parametrize("width, dtype", [(1536, torch.bfloat16), (100, torch.float32)])
def test_silu_and_mul_equals_torchs(width, dtype):
    torch.manual_seed(1)
    gate_up = torch.randn(3, 2 * width, dtype=dtype, device=DEVICE) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    assert close(silu_and_mul(gate_up), F.silu(gate) * up)


@pytest.mark.parametrize("width, dtype", [(576, torch.bfloat16), (100, torch.float32)])
def test_add_rms_norm_equals_torchs_add_then_norm(width, dtype):
    torch.manual_seed(2)
    x, delta = (torch.randn(3, width, dtype=dtype, device=DEVICE) for _ in range(2))
    weight = torch.rand(width, dtype=dtype, device=DEVICE) + 0.5
    total, normed = add_rms_norm(x, delta, weight, 1e-5)
    assert close(total, x + delta)
    assert close(normed, rms_norm(x + delta, weight, 1e-5))


def test_the_fused_layers_compute_what_torchs_layers_compute():
    """The whole decoder stack, prompt chunks then decode rows, both ways: same hidden states,
    same KV cache."""
    model, _ = build_tiny_random_model()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:  # initialized to ones: every norm would look alike
                parameter.uniform_(0.5, 1.5)
    w = extract_weights(model.to(DEVICE).eval(), "fp32")
    rope, groups = rope_table(w, 64), w.n_heads // w.n_kv_heads
    a, b = torch.randint(0, 259, (9,)).tolist(), torch.randint(0, 259, (5,)).tolist()
    steps = [
        build_step([], [(PromptChunk(0, 0, 9, True), a), (PromptChunk(2, 0, 5, True), b)], groups),
        build_step([(0, 9, 5), (2, 5, 7)], [], groups),
    ]
    results = []
    for layers in (_layers, _layers_on_gpu):
        cache = KVCache(len(w.layers), 3, w.n_kv_heads, 64, w.head_dim, w.dtype, torch.device(DEVICE), 64)
        with torch.inference_mode():
            hidden = [layers(w, cache, rope, step.to(torch.device(DEVICE)), w.embed[step.token_ids.to(DEVICE)]) for step in steps]
        results.append((hidden, cache.kv))
    (theirs, their_cache), (ours, our_cache) = results
    assert all(close(o, t) for o, t in zip(ours, theirs))
    assert close(our_cache, their_cache) and our_cache.abs().sum() > 0
