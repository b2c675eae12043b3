"""The GPU attention kernel against plain attention, on a GPU or (no GPU) in Triton's
interpreter (tests/conftest.py turns it on)."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton comes with torch's CUDA builds; `pip install triton` here")
from deployments.engine.cached_attention import cached_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(q, k_cache, v_cache, slots, positions):
    groups = q.shape[1] // k_cache.shape[1]
    out = []
    for i, (slot, position) in enumerate(zip(slots.tolist(), positions.tolist())):
        k = k_cache[slot, :, : position + 1].float().repeat_interleave(groups, 0)  # [heads, keys, dim]
        v = v_cache[slot, :, : position + 1].float().repeat_interleave(groups, 0)
        weights = (q[i].float()[:, None, :] * k).sum(-1).softmax(-1)
        out.append((weights[:, :, None] * v).sum(1))
    return torch.stack(out)


@pytest.mark.parametrize(
    "n_heads, n_kv_heads, head_dim, dtype",
    [(9, 3, 64, torch.float32), (4, 2, 16, torch.float32), (8, 8, 128, torch.bfloat16)],
)
def test_each_token_attends_to_its_own_row_up_to_its_own_position(n_heads, n_kv_heads, head_dim, dtype):
    torch.manual_seed(0)
    rows, capacity = 5, 150
    k_cache = torch.randn(rows, n_kv_heads, capacity, head_dim, dtype=dtype, device=DEVICE)
    v_cache = torch.randn(rows, n_kv_heads, capacity, head_dim, dtype=dtype, device=DEVICE)
    # Decode tokens of three rows at different lengths, then a prompt chunk of row 4 (causal).
    slots = torch.tensor([0, 2, 3, 4, 4, 4, 4], device=DEVICE)
    positions = torch.tensor([0, 149, 63, 10, 11, 12, 13], device=DEVICE)
    q = torch.randn(len(slots), n_heads, head_dim, dtype=dtype, device=DEVICE) / head_dim**0.5
    out = cached_attention(q, k_cache, v_cache, slots, positions)
    expected = reference(q, k_cache, v_cache, slots, positions)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert (out.float() - expected).norm() / expected.norm() < tolerance
