"""The interface of a decoder layer's small ops (`LayerOps`): RoPE with the KV-cache write, a
residual add with the norm after it, the MLP's gate.

Three modules implement it, one per device: `fused_layer_ops` (GPU, Triton), `cpu_layer_ops`
(x86 AVX2, our C kernels) and `torch_layer_ops` (anything else, and the tests' reference);
`forward.layer_ops` picks one per model at load. Owns the interface only: no implementation, no
choice, and not attention (see `forward.step_attention`).
"""

from __future__ import annotations

from typing import Protocol

import torch


class LayerOps(Protocol):
    """What `forward` calls on the module chosen for a model (each module's functions, with
    these signatures and shapes; `torch_layer_ops` documents them)."""

    def rope_and_cache_write(
        self,
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
        head_dim]; token i's rotated keys and its values go to position positions[i] of row
        slots[i] of k/v_cache."""
        ...

    def add_rms_norm(
        self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x, delta [N, width] -> (x + delta, rms_norm(x + delta) * weight)."""
        ...

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up [N, 2 * width] (gate, then up) -> silu(gate) * up [N, width]."""
        ...
