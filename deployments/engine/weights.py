"""The weights the batched engine's forward pass reads (`LlamaWeights`, one `LayerWeights` per
decoder layer), as plain records.

Owns their layout only. Does not own how they are made (`forward.extract_weights`), quantized
(`quantized`) or run (`forward`); it sits apart from those so that both `forward` and `quantized`
can read it without importing each other.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

import torch
from torch import nn

from deployments.engine import torch_layer_ops
from deployments.engine.layer_ops import LayerOps


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv_proj: nn.Module  # hidden -> (n_heads + 2 * n_kv_heads) * head_dim
    o_proj: nn.Module
    post_attention_norm: torch.Tensor
    gate_up_proj: nn.Module  # hidden -> 2 * intermediate
    down_proj: nn.Module


@dataclass
class LlamaWeights:
    embed: torch.Tensor  # [vocab, hidden]
    layers: list[LayerWeights]
    norm: torch.Tensor
    lm_head: nn.Module
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int  # the MLP's width
    rms_norm_eps: float
    # q/k rows are stored interleaved for RoPE and q is pre-scaled by 1/sqrt(head_dim), see
    # `forward._attention_layout`.
    inv_freq: torch.Tensor  # [head_dim // 2], from the model's own rotary embedding (rope_parameters)
    rope_scaling: float  # transformers' `attention_scaling` (1.0 for default RoPE)
    dtype: torch.dtype  # activations and KV cache
    # The layers' small ops on these weights' device and dtype, chosen once at load
    # (`forward.layer_ops`), so every step of the model takes the same ops.
    ops: LayerOps = field(default=torch_layer_ops, repr=False, compare=False)
    # int4 layers on our C kernels: their table for a decode-only step in one call (see
    # `forward.forward`).
    decode_table: ctypes.Array | None = field(default=None, repr=False, compare=False)

    @property
    def norms_after(self) -> list[torch.Tensor]:
        """The norm each layer's output feeds: the next layer's input norm, the final norm last."""
        return [layer.input_norm for layer in self.layers[1:]] + [self.norm]

    @property
    def linears(self) -> list[nn.Module]:
        return [m for layer in self.layers for m in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj)] + [
            self.lm_head
        ]
