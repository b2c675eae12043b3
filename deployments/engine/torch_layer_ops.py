"""A decoder layer's small ops in plain torch (`layer_ops.LayerOps`, as `fused_layer_ops` on a
GPU and `cpu_layer_ops` on x86 AVX2 implement it), for every other device and dtype (Apple mps,
ARM CPUs, a CPU without a C compiler, bf16 on a CPU), and the reference the tests hold both to."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """x [N, heads, head_dim] in the interleaved layout; rotation [N, head_dim // 2] complex."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * rotation[:, None, :]).flatten(2).to(x.dtype)


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
    """qkv [N, (n_heads + 2 * n_kv_heads) * head_dim] -> the rotated queries [N, n_heads,
    head_dim]; token i's rotated keys and its values go to position positions[i] of row slots[i]
    of k/v_cache [rows, n_kv_heads, capacity, head_dim]. rope: complex64 [context, head_dim // 2]."""
    n_tokens, head_dim = len(qkv), qkv.shape[1] // (n_heads + 2 * n_kv_heads)
    # q and k heads side by side get RoPE in one call.
    qk = apply_rope(
        qkv[:, : (n_heads + n_kv_heads) * head_dim].reshape(n_tokens, n_heads + n_kv_heads, head_dim), rope[positions]
    )
    v = qkv[:, (n_heads + n_kv_heads) * head_dim :].reshape(n_tokens, n_kv_heads, head_dim)
    # index_copy_ into a flat [rows * heads * capacity, head_dim] view: several times faster
    # than advanced-index assignment (cache[slots, :, positions] = k).
    heads = torch.arange(n_kv_heads, device=qkv.device)
    index = ((slots[:, None] * n_kv_heads + heads) * k_cache.shape[2] + positions[:, None]).reshape(-1)
    k_cache.view(-1, head_dim).index_copy_(0, index, qk[:, n_heads:].reshape(-1, head_dim))
    v_cache.view(-1, head_dim).index_copy_(0, index, v.reshape(-1, head_dim))
    return qk[:, :n_heads]


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, delta [N, width] -> (x + delta, rms_norm(x + delta) * weight)."""
    total = x + delta
    return total, F.rms_norm(total, weight.shape, weight, eps)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [N, 2 * width] (gate, then up) -> silu(gate) * up [N, width]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
