"""The GPU attention kernel against plain attention, on a GPU or (no GPU) in Triton's
interpreter (tests/conftest.py turns it on)."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton comes with torch's CUDA builds; `pip install triton` here")
from deployments.engine.cached_attention import cached_attention, chunk_attention  # noqa: E402
from deployments.engine.forward import LONG_CHUNK_TOKENS, PromptChunk, build_step  # noqa: E402

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


@pytest.mark.parametrize("start", [0, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_long_chunk_attends_as_its_tokens_would_in_the_kernel(start, dtype):
    # A chunk after a prefix already in the cache (start 37, e.g. a prefix-cache hit): its
    # queries are the last of the row's keys, causal from the bottom right.
    torch.manual_seed(1)
    n_heads, n_kv_heads, head_dim, length = 9, 3, 64, 300
    k_cache = torch.randn(3, n_kv_heads, 400, head_dim, dtype=dtype, device=DEVICE)
    v_cache = torch.randn(3, n_kv_heads, 400, head_dim, dtype=dtype, device=DEVICE)
    q = torch.randn(length, n_heads, head_dim, dtype=dtype, device=DEVICE) / head_dim**0.5
    out = chunk_attention(q, k_cache, v_cache, 2, start)
    slots = torch.full((length,), 2, device=DEVICE)
    expected = reference(q, k_cache, v_cache, slots, torch.arange(start, start + length, device=DEVICE))
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert (out.float() - expected).norm() / expected.norm() < tolerance


def test_a_gpu_step_puts_long_chunks_last_and_keeps_the_logits_in_chunk_order():
    long, short = LONG_CHUNK_TOKENS, 5
    chunks = [
        (PromptChunk(3, 0, long, True), list(range(long))),
        (PromptChunk(1, 10, short, True), [7] * short),
        (PromptChunk(2, 0, long, False), [9] * long),
    ]
    step = build_step([(0, 4, 42)], chunks, cuda=True)
    assert [(c.slot, c.length) for c in step.chunks] == [(1, short), (3, long), (2, long)]
    assert step.slots.tolist() == [0] + [1] * short + [3] * long + [2] * long
    assert step.positions[1 : 1 + short].tolist() == list(range(10, 10 + short))
    # Logits: the decode token, then the chunks that end their prompt in the order given.
    assert step.token_ids[step.logit_rows].tolist() == [42, long - 1, 7]
    cpu = build_step([(0, 4, 42)], chunks)  # the CPU's step keeps the given order
    assert [c.slot for c in cpu.chunks] == [3, 1, 2]
