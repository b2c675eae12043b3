"""A decoder layer's small ops on an x86 AVX2 CPU in fp32, through our C kernels
(`layer_ops_avx2.c`, built by `cpu_kernels`): `layer_ops.LayerOps`, as the GPU's `fused_layer_ops`,
plus `decode_attention`. `forward.layer_ops` picks these where `cpu_kernels.load()` works and the
model runs in fp32; else `torch_layer_ops`.

Through torch, a decode step's small ops cost more in calls than in arithmetic; these kernels cut
that, and `decode_layers` runs the whole stack in one call, without Python and torch between the
kernels (docs/engine.md#cpu-kernels).
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


def _check_places(positions: torch.Tensor, slots: torch.Tensor) -> None:
    """The kernels read these as int64 arrays: anything else would be read as garbage."""
    assert positions.dtype == slots.dtype == torch.int64 and positions.is_contiguous() and slots.is_contiguous()


def _cache_strides(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int]:
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1 and k_cache.dtype == torch.float32
    return k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)


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
    """`torch_layer_ops.rope_and_cache_write` (same arguments, same result) in one C call."""
    n_tokens, head_dim = len(qkv), qkv.shape[1] // (n_heads + 2 * n_kv_heads)
    assert qkv.stride(1) == 1 and qkv.dtype == torch.float32
    _check_places(positions, slots)
    q = qkv.new_empty(n_tokens, n_heads, head_dim)
    table = torch.view_as_real(rope)  # [context, head_dim // 2, 2]: cos, sin (times the scaling)
    assert table.is_contiguous()
    _kernels().rope_and_cache_write(
        qkv.data_ptr(),
        qkv.stride(0),
        table.data_ptr(),
        positions.data_ptr(),
        slots.data_ptr(),
        q.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        *_cache_strides(k_cache, v_cache),
        n_tokens,
        n_heads,
        n_kv_heads,
        head_dim,
        torch.get_num_threads(),
    )
    return q


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """q [n, n_heads, head_dim] (pre-scaled), one decode token per row: token i attends to
    positions 0..positions[i] of row slots[i] of k/v_cache [rows, n_kv_heads, capacity, head_dim],
    its own keys only. Returns [n, n_heads, head_dim]."""
    n_tokens, n_heads, head_dim = q.shape
    _check_places(positions, slots)
    q = q.contiguous()
    out = torch.empty_like(q)
    if n_tokens:
        status = _kernels().decode_attention(
            q.data_ptr(),
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            *_cache_strides(k_cache, v_cache),
            slots.data_ptr(),
            positions.data_ptr(),
            out.data_ptr(),
            n_tokens,
            n_heads,
            k_cache.shape[1],
            head_dim,
            torch.get_num_threads(),
        )
        if status:
            raise MemoryError(f"decode attention of {n_tokens} rows: out of memory")
    return out


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, delta [N, width] -> (x + delta, rms_norm(x + delta) * weight)."""
    x, delta = x.contiguous(), delta.contiguous()
    total, normed = torch.empty_like(x), torch.empty_like(x)
    _kernels().add_rms_norm(
        x.data_ptr(),
        delta.data_ptr(),
        weight.data_ptr(),
        eps,
        total.data_ptr(),
        normed.data_ptr(),
        len(x),
        x.shape[1],
        torch.get_num_threads(),
    )
    return total, normed


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [N, 2 * width] (gate, then up) -> silu(gate) * up [N, width]."""
    gate_up = gate_up.contiguous()
    out = gate_up.new_empty(len(gate_up), gate_up.shape[1] // 2)
    _kernels().silu_and_mul(gate_up.data_ptr(), out.data_ptr(), len(gate_up), out.shape[1], torch.get_num_threads())
    return out


class _Int4Linear(ctypes.Structure):
    _fields_ = [
        ("codes", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
        ("minimums", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("in_features", ctypes.c_int),
        ("out_features", ctypes.c_int),
    ]


class _DecodeLayer(ctypes.Structure):
    _fields_ = [
        ("qkv", _Int4Linear),
        ("o", _Int4Linear),
        ("gate_up", _Int4Linear),
        ("down", _Int4Linear),
        ("post_attention_norm", ctypes.c_void_p),
        ("next_norm", ctypes.c_void_p),
    ]


# One int4 linear layer's buffers, as `cpu_int4.pack` lays them out: (codes, scales, minimums, bias).
Int4Buffers = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]


def decode_layer_table(layers: list[tuple[list[Int4Buffers], torch.Tensor, torch.Tensor]]) -> ctypes.Array:
    """The C table of a model's int4 layers for `decode_layers`: per layer its (qkv, o, gate_up,
    down) buffers, its post-attention norm and the norm after it (the next layer's input norm, the
    final norm after the last). It holds addresses: the tensors must outlive it, unmoved."""

    def linear(codes: torch.Tensor, scales: torch.Tensor, minimums: torch.Tensor, bias: torch.Tensor | None) -> _Int4Linear:
        blocks, groups = codes.shape[:2]
        return _Int4Linear(
            codes.data_ptr(),
            scales.data_ptr(),
            minimums.data_ptr(),
            None if bias is None else bias.data_ptr(),
            groups * 32,
            blocks * 8,
        )

    table = (_DecodeLayer * len(layers))()
    for entry, (linears, post_attention_norm, next_norm) in zip(table, layers):
        assert (
            post_attention_norm.dtype == next_norm.dtype == torch.float32
            and post_attention_norm.is_contiguous()
            and next_norm.is_contiguous()
        )
        entry.qkv, entry.o, entry.gate_up, entry.down = (linear(*buffers) for buffers in linears)
        entry.post_attention_norm, entry.next_norm = post_attention_norm.data_ptr(), next_norm.data_ptr()
    return table


def decode_layers(
    table: ctypes.Array,
    x: torch.Tensor,
    h: torch.Tensor,
    rope: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    kv: torch.Tensor,
    n_heads: int,
    intermediate_size: int,
    eps: float,
) -> torch.Tensor:
    """A step of decode tokens only through every layer of `table` (`decode_layer_table`) in one
    call: x [N, hidden] the residual stream after the embedding, h its first norm; token i at
    position positions[i] of cache row slots[i] of kv [layers, 2 (k, v), rows, n_kv_heads,
    capacity, head_dim] (`KVCache.kv`). Returns the final norm's output [N, hidden] (x and h are
    overwritten). Bit for bit what `forward._layers` gives with these ops."""
    n_tokens, hidden = x.shape
    assert x.is_contiguous() and h.is_contiguous() and kv.is_contiguous() and x.dtype == h.dtype == kv.dtype == torch.float32
    _check_places(positions, slots)
    table_rope = torch.view_as_real(rope)
    assert table_rope.is_contiguous()
    status = _kernels().decode_layers(
        table,
        len(table),
        x.data_ptr(),
        h.data_ptr(),
        table_rope.data_ptr(),
        positions.data_ptr(),
        slots.data_ptr(),
        kv.data_ptr(),
        kv.stride(0),
        kv.stride(1),
        kv.stride(2),
        kv.stride(3),
        kv.stride(4),
        n_tokens,
        hidden,
        n_heads,
        kv.shape[3],
        kv.shape[5],
        intermediate_size,
        eps,
        torch.get_num_threads(),
    )
    if status:
        raise MemoryError(f"decode step of {n_tokens} rows: out of memory")
    return h
