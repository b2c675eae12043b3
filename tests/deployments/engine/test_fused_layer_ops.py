"""The GPU's fused layer ops against the torch ops the CPU runs, on a GPU or (no GPU) in Triton's
interpreter (tests/conftest.py turns it on)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton", reason="Triton comes with torch's CUDA builds; `pip install triton` here")
from deployments.engine.forward import apply_rope  # noqa: E402
from deployments.engine.fused_layer_ops import rope_and_cache_write, silu_and_mul  # noqa: E402
from deployments.engine.kv_cache import KVCache  # noqa: E402

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
