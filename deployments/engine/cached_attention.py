"""Attention over the KV cache on a GPU, as one Triton kernel for a whole step.

Every query token of the step (a decode token or a prompt-chunk token alike) attends to keys
0..position of its own cache row, and no further: causality falls out of the positions, and a
row reads only its own length, never the longest row's. So a step needs no masks, its shapes
depend only on the number of tokens (what a CUDA graph needs), and decode and prefill are one
launch per layer. One program per (token, KV head) runs the KV head's whole query group
(grouped-query attention reads each key once) with an online softmax in fp32.

A long prompt chunk's tokens go to `chunk_attention` instead (torch's fused attention over
the chunk's row): the kernel walks each token's keys one block at a time, so a chunk costs it
the square of its length, far more than torch's flash attention (docs/gpu.md;
`forward.LONG_CHUNK_TOKENS` decides which chunks).

The CPU keeps its batched-matmul attention (`forward.CpuStepAttention`): no Triton there. Tests run this
kernel on the CPU through Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.nn.attention.bias import causal_lower_right


@triton.jit
def _cached_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    slots_ptr,
    positions_ptr,
    stride_q_token,
    stride_q_head,
    stride_kv_row,
    stride_kv_head,
    stride_kv_position,
    stride_out_token,
    stride_out_head,
    GROUPS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    token = tl.program_id(0)
    kv_head = tl.program_id(1)
    slot = tl.load(slots_ptr + token)
    position = tl.load(positions_ptr + token)  # this token attends to keys 0..position

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    qd_mask = (g < GROUPS)[:, None] & (d < HEAD_DIM)[None, :]
    heads = kv_head * GROUPS + g
    q = tl.load(q_ptr + token * stride_q_token + heads[:, None] * stride_q_head + d[None, :], mask=qd_mask, other=0.0)
    q = q.to(tl.float32)  # [G, D], pre-scaled by 1/sqrt(head_dim)

    row = slot.to(tl.int64) * stride_kv_row + kv_head * stride_kv_head
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max of the scores
    total = tl.zeros([BLOCK_G], tl.float32)  # running softmax denominator
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start in range(0, position + 1, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_mask = n <= position
        kv_mask = n_mask[:, None] & (d < HEAD_DIM)[None, :]
        offsets = row + n[:, None] * stride_kv_position + d[None, :]
        k = tl.load(k_ptr + offsets, mask=kv_mask, other=0.0).to(tl.float32)  # [N, D]
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [G, N]
        scores = tl.where(n_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        rescale = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        total = total * rescale + tl.sum(p, axis=1)
        v = tl.load(v_ptr + offsets, mask=kv_mask, other=0.0).to(tl.float32)  # [N, D]
        acc = acc * rescale[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    out = acc / total[:, None]
    out_offsets = token * stride_out_token + heads[:, None] * stride_out_head + d[None, :]
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=qd_mask)


def cached_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """q [N, n_heads, head_dim] (scaled by 1/sqrt(head_dim)); k/v_cache [rows, n_kv_heads,
    capacity, head_dim], already holding this step's keys/values; slots, positions [N] int64
    -> [N, n_heads, head_dim]: token i attends to positions 0..positions[i] of row slots[i]."""
    n_tokens, n_heads, head_dim = q.shape
    n_kv_heads = k_cache.shape[1]
    groups = n_heads // n_kv_heads
    q = q.contiguous()
    out = torch.empty_like(q)
    block_g = max(2, triton.next_power_of_2(groups))
    block_d = max(16, triton.next_power_of_2(head_dim))
    # The [G, N, D] products live in registers: keep them around 8K elements.
    block_n = max(16, min(64, 8192 // (block_g * block_d)))
    _cached_attention_kernel[(n_tokens, n_kv_heads)](
        q,
        k_cache,
        v_cache,
        out,
        slots,
        positions,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        out.stride(0),
        out.stride(1),
        GROUPS=groups,
        HEAD_DIM=head_dim,
        BLOCK_G=block_g,
        BLOCK_D=block_d,
        BLOCK_N=block_n,
    )
    return out


def chunk_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot: int, start: int) -> torch.Tensor:
    """q [t, n_heads, head_dim] (scaled by 1/sqrt(head_dim)): a prompt chunk at positions
    start..start+t-1 of cache row `slot`, which already holds its keys/values -> [t, n_heads,
    head_dim]: token i attends to positions 0..start+i, as in `cached_attention`."""
    t, n_heads, _ = q.shape
    end = start + t
    groups = n_heads // k_cache.shape[1]
    # Each KV head repeated for its query group: a copy of the row's keys, small beside the attention.
    k = k_cache[slot, :, :end].repeat_interleave(groups, dim=0)[None]
    v = v_cache[slot, :, :end].repeat_interleave(groups, dim=0)[None]
    # The chunk's queries are the last t of the row's `end` positions: causal from the bottom
    # right (torch's plain is_causal aligns the first query with the first key).
    mask = causal_lower_right(t, end) if start else None
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k, v, attn_mask=mask, is_causal=not start, scale=1.0)
    return out[0].transpose(0, 1)
