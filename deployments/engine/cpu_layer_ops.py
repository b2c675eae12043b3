"""A decoder layer's small ops on an x86 AVX2 CPU in fp32, through our C kernels
(`layer_ops_avx2.c`, built by `cpu_kernels`): the interface of the GPU's `fused_layer_ops`, plus
`decode_attention`. `forward.layer_ops` picks these where `cpu_kernels.load()` works and the
model runs in fp32; else `torch_layer_ops`.

One SmolLM2 decode step of one row on the 2-core AVX2 EPYC: ~19 ms with torch's ops, of which
~5 ms in ~2,500 small calls (see the C file).
"""

from __future__ import annotations

import ctypes

import torch

from deployments.engine import cpu_kernels


def _kernels() -> ctypes.CDLL:
    library = cpu_kernels.load()
    if library is None:
        raise RuntimeError("our CPU kernels cannot run here (see the log): use torch_layer_ops")
    return library


def _cache_strides(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int]:
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1 and k_cache.dtype == torch.float32
    return k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)


def rope_and_cache_write(
    qkv: torch.Tensor, rope: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, n_kv_heads: int,
) -> torch.Tensor:
    """qkv [N, (n_heads + 2 * n_kv_heads) * head_dim] -> the rotated queries [N, n_heads,
    head_dim]; token i's rotated keys and its values go to position positions[i] of row slots[i]
    of k/v_cache [rows, n_kv_heads, capacity, head_dim]. rope: complex64 [context, head_dim // 2]."""
    n_tokens, head_dim = len(qkv), qkv.shape[1] // (n_heads + 2 * n_kv_heads)
    assert qkv.stride(1) == 1 and qkv.dtype == torch.float32
    q = qkv.new_empty(n_tokens, n_heads, head_dim)
    table = torch.view_as_real(rope)  # [context, head_dim // 2, 2]: cos, sin (times the scaling)
    assert table.is_contiguous()
    _kernels().rope_and_cache_write(
        qkv.data_ptr(), qkv.stride(0), table.data_ptr(), positions.data_ptr(), slots.data_ptr(),
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), *_cache_strides(k_cache, v_cache),
        n_tokens, n_heads, n_kv_heads, head_dim, torch.get_num_threads(),
    )
    return q


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
) -> torch.Tensor:
    """q [n, n_heads, head_dim] (pre-scaled), one decode token per row: token i attends to
    positions 0..positions[i] of row slots[i] of k/v_cache [rows, n_kv_heads, capacity, head_dim],
    its own keys only. Returns [n, n_heads, head_dim]."""
    n_tokens, n_heads, head_dim = q.shape
    q = q.contiguous()
    out = torch.empty_like(q)
    if n_tokens:
        status = _kernels().decode_attention(
            q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), *_cache_strides(k_cache, v_cache),
            slots.data_ptr(), positions.data_ptr(), out.data_ptr(),
            n_tokens, n_heads, k_cache.shape[1], head_dim, torch.get_num_threads(),
        )
        if status:
            raise MemoryError(f"decode attention of {n_tokens} rows: out of memory")
    return out


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, delta [N, width] -> (x + delta, rms_norm(x + delta) * weight)."""
    x, delta = x.contiguous(), delta.contiguous()
    total, normed = torch.empty_like(x), torch.empty_like(x)
    _kernels().add_rms_norm(
        x.data_ptr(), delta.data_ptr(), weight.data_ptr(), eps, total.data_ptr(), normed.data_ptr(),
        len(x), x.shape[1], torch.get_num_threads(),
    )
    return total, normed


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [N, 2 * width] (gate, then up) -> silu(gate) * up [N, width]."""
    gate_up = gate_up.contiguous()
    out = gate_up.new_empty(len(gate_up), gate_up.shape[1] // 2)
    _kernels().silu_and_mul(gate_up.data_ptr(), out.data_ptr(), len(gate_up), out.shape[1], torch.get_num_threads())
    return out
