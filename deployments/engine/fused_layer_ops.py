"""A decoder layer's small ops on a GPU, fused into Triton kernels.

A replayed decode step of a small model costs its kernel launches more than its arithmetic
(docs/gpu.md). Between the QKV projection and attention, torch's ops took 8 kernels a layer
(q/k to fp32, the complex multiply, back to bf16, copies of k, v and q into contiguous tensors,
two `index_copy_` into the cache); `rope_and_cache_write` does it in one. `silu_and_mul` does the
MLP's gate in one instead of two, `add_rms_norm` a residual update and the norm after it in one
instead of two.

A CPU runs the same interface (`layer_ops.LayerOps`) in C (`cpu_layer_ops`) or torch
(`torch_layer_ops`): no Triton there (`forward.layer_ops` picks). Tests run these kernels on the
CPU through Triton's interpreter (TRITON_INTERPRET=1) against those ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_and_cache_write_kernel(
    qkv_ptr,
    rope_ptr,
    positions_ptr,
    slots_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    stride_qkv_token,
    stride_rope_position,
    stride_cache_row,
    stride_cache_head,
    stride_cache_position,
    N_HEADS: tl.constexpr,
    N_KV_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    token = tl.program_id(0)
    head = tl.program_id(1)  # q heads, then k heads, then v heads, as in the QKV projection's output
    position = tl.load(positions_ptr + token)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    i = tl.arange(0, BLOCK)
    mask = i < HALF
    source = qkv_ptr + token * stride_qkv_token + head * 2 * HALF
    # The interleaved layout (`forward._attention_layout`): pair i is elements 2i and 2i+1.
    even = tl.load(source + 2 * i, mask=mask, other=0.0)
    odd = tl.load(source + 2 * i + 1, mask=mask, other=0.0)
    kv_head = head - N_HEADS
    if head < N_HEADS + N_KV_HEADS:
        # x * rotation as complex numbers, in fp32 like `forward.apply_rope`.
        rotation = rope_ptr + position * stride_rope_position + 2 * i
        cos = tl.load(rotation, mask=mask, other=0.0)
        sin = tl.load(rotation + 1, mask=mask, other=0.0)
        a, b = even.to(tl.float32), odd.to(tl.float32)
        even = (a * cos - b * sin).to(even.dtype)
        odd = (a * sin + b * cos).to(odd.dtype)
        if head < N_HEADS:
            target = q_ptr + (token * N_HEADS + head) * 2 * HALF
        else:
            target = k_ptr + slot * stride_cache_row + kv_head * stride_cache_head + position * stride_cache_position
    else:
        kv_head -= N_KV_HEADS
        target = v_ptr + slot * stride_cache_row + kv_head * stride_cache_head + position * stride_cache_position
    tl.store(target + 2 * i, even, mask=mask)
    tl.store(target + 2 * i + 1, odd, mask=mask)


def rope_and_cache_write(
    qkv: torch.Tensor,
    rope: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    n_heads: int,
    n_kv_heads: int,
) -> torch.Tensor:
    """qkv [N, (n_heads + 2 * n_kv_heads) * head_dim], the QKV projection's output; rope the
    complex64 rotation table [context, head_dim // 2] (`forward.rope_table`). Writes token i's
    rotated keys and its values at position positions[i] of row slots[i] of k/v_cache [rows,
    n_kv_heads, capacity, head_dim]; returns the rotated queries [N, n_heads, head_dim]."""
    n_tokens = qkv.shape[0]
    head_dim = qkv.shape[1] // (n_heads + 2 * n_kv_heads)
    assert qkv.stride(1) == 1 and k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1
    q = qkv.new_empty(n_tokens, n_heads, head_dim)
    table = torch.view_as_real(rope)  # [context, head_dim // 2, 2]: cos, sin (times the scaling)
    _rope_and_cache_write_kernel[(n_tokens, n_heads + 2 * n_kv_heads)](
        qkv,
        table,
        positions,
        slots,
        q,
        k_cache,
        v_cache,
        qkv.stride(0),
        table.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        N_HEADS=n_heads,
        N_KV_HEADS=n_kv_heads,
        HALF=head_dim // 2,
        BLOCK=max(16, triton.next_power_of_2(head_dim // 2)),
    )
    return q


@triton.jit
def _silu_and_mul_kernel(gate_up_ptr, out_ptr, stride_token, WIDTH: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = i < WIDTH
    gate = tl.load(gate_up_ptr + token * stride_token + i, mask=mask, other=0.0)
    up = tl.load(gate_up_ptr + token * stride_token + WIDTH + i, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    # Rounded to the input's dtype in between, as torch's F.silu(gate) * up is.
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    tl.store(out_ptr + token * WIDTH + i, (silu.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [N, 2 * width] (gate, then up) -> silu(gate) * up [N, width]."""
    n_tokens, width = gate_up.shape[0], gate_up.shape[1] // 2
    assert gate_up.stride(1) == 1
    out = gate_up.new_empty(n_tokens, width)
    block = 1024
    _silu_and_mul_kernel[(n_tokens, triton.cdiv(width, block))](gate_up, out, gate_up.stride(0), WIDTH=width, BLOCK=block)
    return out


@triton.jit
def _add_rms_norm_kernel(
    x_ptr,
    delta_ptr,
    weight_ptr,
    sum_ptr,
    normed_ptr,
    stride_x,
    stride_delta,
    eps,
    WIDTH: tl.constexpr,
    BLOCK: tl.constexpr,
):
    token = tl.program_id(0)
    i = tl.arange(0, BLOCK)
    mask = i < WIDTH
    x = tl.load(x_ptr + token * stride_x + i, mask=mask, other=0.0)
    delta = tl.load(delta_ptr + token * stride_delta + i, mask=mask, other=0.0)
    total = (x.to(tl.float32) + delta.to(tl.float32)).to(x.dtype)  # rounded as torch's x + delta is
    tl.store(sum_ptr + token * WIDTH + i, total, mask=mask)
    s = total.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / WIDTH + eps)
    weight = tl.load(weight_ptr + i, mask=mask, other=0.0).to(tl.float32)
    tl.store(normed_ptr + token * WIDTH + i, (s * rstd * weight).to(x.dtype), mask=mask)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream's update and the next norm in one kernel: x, delta [N, width] ->
    (x + delta, rms_norm(x + delta) * weight)."""
    n_tokens, width = x.shape
    assert x.stride(1) == 1 and delta.stride(1) == 1
    total, normed = torch.empty_like(x), torch.empty_like(x)
    _add_rms_norm_kernel[(n_tokens,)](
        x,
        delta,
        weight,
        total,
        normed,
        x.stride(0),
        delta.stride(0),
        eps,
        WIDTH=width,
        BLOCK=triton.next_power_of_2(width),
    )
    return total, normed
