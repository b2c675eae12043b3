"""A Llama forward pass as plain functions over a static KV cache, for the batched engine.

One call runs one engine step: the decode tokens of every running request plus chunks of
newcomers' prompts, flattened into one [N, hidden] activation so each weight matrix is read once
per step (on CPU a step costs about one pass over the weights, whatever N is, until N gets large).
Only attention is per request. On the CPU, decode rows attend to their own cache rows (our C
kernel, `cpu_layer_ops.decode_attention`, or one masked batched call in torch) and each prompt
chunk attends causally to its own row through a mask; on a GPU one Triton kernel serves every
token of the step, each reading its own row up to its own position (`cached_attention`), so a
step's shapes depend only on its token count (CUDA graphs, see `cuda_graphs`). A layer's small
ops (RoPE and the cache write, the residual adds with the norms after them, the MLP's gate) come
from one of three modules with one interface, per device: `fused_layer_ops` (GPU),
`cpu_layer_ops` (x86 AVX2) or `torch_layer_ops` (see `layer_ops`). With int4 weights on x86 AVX2,
a step of decode rows only runs every layer in one C call (`cpu_layer_ops.decode_layers`), to
the bit what the layer loop gives.

Owns: turning a transformers `LlamaForCausalLM` into `LlamaWeights` (fp32, bf16, fp16, or on the
CPU int8 with per-token int8 activations, see `Int8Linear`, or int4), RoPE, RMSNorm, attention
over the cache, logits.
Does not own scheduling or sampling (see `batched`, `sampler`).
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from deployments.engine import cpu_int4, cpu_kernels, cpu_layer_ops, torch_layer_ops
from deployments.engine.kv_cache import KVCache
from deployments.engine.sampler import CANDIDATES
from deployments.engine.torch_threads import run_in_fresh_thread
from deployments.model_registry import CPU_ONLY_WEIGHTS, WeightFormat

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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
    # `_attention_layout`.
    inv_freq: torch.Tensor  # [head_dim // 2], from the model's own rotary embedding (rope_parameters)
    rope_scaling: float  # transformers' `attention_scaling` (1.0 for default RoPE)
    dtype: torch.dtype  # activations and KV cache
    # int4 layers on our C kernels: their table for a decode-only step in one call (see `forward`).
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


def _fused_linear(parts: list[nn.Linear]) -> nn.Linear:
    """One Linear whose output is the parts' outputs side by side: one matmul instead of
    three (q/k/v) or two (gate/up), so the small-M matmuls of a decode step get bigger."""
    weight = torch.cat([p.weight.detach() for p in parts])
    has_bias = parts[0].bias is not None
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, dtype=weight.dtype)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([p.bias.detach() for p in parts]), requires_grad=False)
    return fused


def _attention_layout(q_proj: nn.Linear, k_proj: nn.Linear, head_dim: int) -> tuple[nn.Linear, nn.Linear]:
    """Copies of q_proj and k_proj whose per-head output rows are reordered from transformers'
    rotate-half layout (pairs i, i + head_dim/2) to interleaved pairs (2i, 2i+1), so RoPE is
    one complex multiply instead of ~6 ops per layer (gpt-fast does the same permutation).
    Attention scores are unchanged: q and k get the same order. q also absorbs the softmax
    scale 1/sqrt(head_dim), one multiply fewer per layer."""
    half = head_dim // 2
    order = torch.stack([torch.arange(half), torch.arange(half, head_dim)], dim=1).reshape(-1)

    def reordered(linear: nn.Linear, scale: float) -> nn.Linear:
        weight = linear.weight.detach()
        weight = weight.view(-1, head_dim, weight.shape[1])[:, order].reshape(weight.shape) * scale
        out = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None, dtype=weight.dtype)
        out.weight = nn.Parameter(weight, requires_grad=False)
        if linear.bias is not None:
            out.bias = nn.Parameter(linear.bias.detach().view(-1, head_dim)[:, order].reshape(-1) * scale, requires_grad=False)
        return out

    return reordered(q_proj, head_dim**-0.5), reordered(k_proj, 1.0)


def extract_weights(model: PreTrainedModel, weight_format: WeightFormat = "fp32") -> LlamaWeights:
    """Copies a `LlamaForCausalLM`'s weights into `LlamaWeights` in `weight_format`; the model
    itself is left untouched (the reference engine and benchmarks still use it)."""
    config = model.config
    if weight_format in CPU_ONLY_WEIGHTS and model.device.type != "cpu":
        raise ValueError(f"{weight_format} weights run on the CPU only, not {model.device}")
    dtype = _DTYPES.get(weight_format, torch.float32)
    inner = model.model

    def tensor(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(dtype, copy=True)

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    layers = []
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        q_proj, k_proj = _attention_layout(attn.q_proj, attn.k_proj, head_dim)
        layers.append(
            LayerWeights(
                input_norm=tensor(layer.input_layernorm.weight),
                qkv_proj=_fused_linear([q_proj, k_proj, attn.v_proj]).to(dtype),
                o_proj=_fused_linear([attn.o_proj]).to(dtype),
                post_attention_norm=tensor(layer.post_attention_layernorm.weight),
                gate_up_proj=_fused_linear([mlp.gate_proj, mlp.up_proj]).to(dtype),
                down_proj=_fused_linear([mlp.down_proj]).to(dtype),
            )
        )
    weights = LlamaWeights(
        embed=tensor(inner.embed_tokens.weight),
        layers=layers,
        norm=tensor(inner.norm.weight),
        lm_head=_fused_linear([model.lm_head]).to(dtype),
        n_heads=config.num_attention_heads,
        n_kv_heads=config.num_key_value_heads,
        head_dim=head_dim,
        intermediate_size=config.intermediate_size,
        rms_norm_eps=config.rms_norm_eps,
        inv_freq=inner.rotary_emb.inv_freq.detach().float(),
        rope_scaling=float(inner.rotary_emb.attention_scaling),
        dtype=dtype,
    )
    if weight_format in ("int8", "int4"):
        _quantize(weights, Int4Linear if weight_format == "int4" else Int8Linear)
    if weight_format == "int4" and layer_ops(weights, weights.embed[:1]) is cpu_layer_ops:
        weights.decode_table = _decode_table(weights)
    return weights


class Int8Linear(nn.Module):
    """W8A8: int8 weights with one scale per output channel, and each activation row (token)
    quantized to int8 with its own scale at run time; the matmul is integer and exact, so a
    row's result never depends on the other rows in the step.

    Per token, not per tensor as torch's dynamic quantization does: one prompt's outlier token
    (the first token's activations are ~100x the rest) would otherwise set the scale for every
    row (perplexity on a ~100-token text: fp32 6.08, per-tensor 13.3, per token 6.2-6.4).
    Perplexity on bench/engine_bench.py's ~475-token text: fp32 8.03, this 8.31 (+3.4%); the
    same weights with the two scale multiplications in the other order gave 8.55, so the
    per-token rounding noise is worth a few percent either way. SmoothQuant (migrating outliers
    into the weights with calibrated per-channel scales) was needed for per-tensor int8 but is
    not worth its calibration here: it moved perplexity by a few percent either way with its
    strength, and at one setting the greedy capital-of-France answer went wrong.

    Two integer kernels, the faster for the row count; both give the same int32 sums, scaled in
    the same order, so the choice never changes a result. Layers of SmolLM2, one pass on a CPU
    with VNNI: `torch._int_mm` 5.4 ms at 1 row, 13.6 at 16; oneDNN's prepacked `qlinear` (x86)
    7.6 / 9.6, and ahead from 4 rows on. (Torch's per-tensor dynamic int8, for scale: 7.3 / 13.1
    with lm_head.) The price: the weights are held twice, plain and prepacked (SmolLM2: 2 x 134 MB).

    On an x86 CPU without VNNI (AVX2 only) oneDNN's kernel adds pairs of u8 x s8 products in
    saturating int16 first, and `_int_mm` takes a slow reference kernel (16 rows over one layer
    and lm_head: 354 ms vs fp32's 52). There activations get 7 bits (|q| <= 63, as fbgemm's
    `reduce_range`): a pair of products then stays within int16, so oneDNN's sums are exact again,
    and it takes every step (one layer and lm_head here: 9.8 ms at 1 row, 20 at 16).
    """

    ONEDNN_MIN_ROWS = 4
    # Buffers, set by `register_buffer`.
    weight: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127
        self.register_buffer("weight", torch.round(weight / scale[:, None]).to(torch.int8))  # [out, in]
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())
        self.out_features, self.in_features = weight.shape
        # The weight's transposed view, not a transposed copy: measured 6.8 vs 9.3 ms a pass.
        self._weight_t = self.weight.t()
        self._packed: torch.Tensor | None = None
        self._zero_points = torch.zeros(self.out_features, dtype=torch.long)
        bits = cpu_int8_activation_bits()
        # The largest activation integer; oneDNN wants unsigned activations (signed ones take a
        # reference kernel, ~100x slower), hence the zero point of 128 (64 with 7 bits) in `forward`.
        self._q_max = 127 if bits in (0, 8) else 63
        self._onednn_min_rows = self.ONEDNN_MIN_ROWS if bits == 8 else 1
        if bits:
            self._packed = torch.ops.onednn.qlinear_prepack(self.weight, [1, self.in_features])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] fp32 -> [..., out_features] fp32."""
        rows = x.reshape(-1, self.in_features)
        return self._matmul(rows).view(*x.shape[:-1], self.out_features)

    def _matmul(self, rows: torch.Tensor) -> torch.Tensor:
        scale = rows.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-8).div_(self._q_max)
        q = torch.round(rows / scale)  # integers in [-q_max, q_max]
        if self._packed is not None and len(rows) >= self._onednn_min_rows:
            zero_point = self._q_max + 1
            out = torch.ops.onednn.qlinear_pointwise(
                q.add_(zero_point).to(torch.uint8),
                1.0,
                zero_point,
                self._packed,
                self.weight_scale,
                self._zero_points,
                None,
                1.0,
                0,
                torch.float32,
                "none",
                [],
                "",
            )
        else:
            out = torch._int_mm(q.to(torch.int8), self._weight_t) * self.weight_scale
        out.mul_(scale)
        if self.bias is not None:
            out.add_(self.bias)
        return out


def _onednn_sums_exactly(activation: int) -> bool:
    """Whether oneDNN's u8 x s8 kernel sums 64 products of `activation` (after the zero point)
    and 127 exactly: pairs of them overflow int16 when the CPU has no VNNI and activation > 64."""
    weight = torch.full((16, 64), 127, dtype=torch.int8)
    packed = torch.ops.onednn.qlinear_prepack(weight, [1, 64])
    zero_point = 128 if activation > 63 else 64
    activations = torch.full((4, 64), activation + zero_point, dtype=torch.uint8)
    out = torch.ops.onednn.qlinear_pointwise(
        activations,
        1.0,
        zero_point,
        packed,
        torch.ones(16),
        torch.zeros(16, dtype=torch.long),
        None,
        1.0,
        0,
        torch.float32,
        "none",
        [],
        "",
    )
    return bool((out == 64 * activation * 127).all())


@functools.cache
def cpu_int8_activation_bits() -> int:
    """The activation width `Int8Linear` can give oneDNN's int8 kernel here and still get exact
    sums: 8 where the CPU has VNNI, 7 where it adds pairs of products in int16 first (AVX2
    only, e.g. this project's CI machine), 0 where there is no oneDNN int8 kernel (e.g. ARM).

    Probed on a thread of its own, whoever asks: the probe runs parallel oneDNN ops, and the
    caller's thread would keep their OpenMP pool. `LLMServer` asks on the replica's thread, and
    that second pool made libgomp stop spin-waiting in the engine's (see `torch_threads`): every
    parallel op of every step then woke a sleeping thread."""

    def probe() -> int:
        try:
            return 8 if _onednn_sums_exactly(127) else 7 if _onednn_sums_exactly(63) else 0
        except (RuntimeError, AttributeError, NotImplementedError):
            return 0

    return run_in_fresh_thread(probe)


def cpu_has_fast_int8() -> bool:
    """Whether `Int8Linear` runs at full precision and speed here (VNNI, 8-bit activations). With
    7 bits SmolLM2's perplexity is 9.10 (8 bits: 8.37, fp32: 8.03), too much for a default."""
    return cpu_int8_activation_bits() == 8


class Int4Linear(nn.Module):
    """Weight-only 4-bit: groups of 32 inputs, each with a scale and a minimum, the layout of
    GGUF's Q4_1. The packaged SmolLM2's linear layers are Q4_1, so this holds their values again
    in an eighth of fp32's bytes: perplexity 8.07 vs fp32 8.03 on bench/engine_bench.py's text.

    Two kernels, chosen once per process (`cpu_kernels.load`): on x86 with AVX2 our own
    (`int4_avx2.c`: int16 activations per group of 32, integer dot products, fp16 scales), else
    torch's (bf16 activations: torch's CPU int4 kernel runs at full speed only with them, fp32
    was 25x slower). Either way a row's result never depends on the other rows. Ours is 1.6-2.2x
    torch's from 1 to 64 rows (`cpu_int4`). Both unpack the weights per step, so past a few rows
    `Int8Linear` may be faster where the CPU has VNNI.
    """

    GROUP = cpu_int4.GROUP
    # Buffers, set by `register_buffer`: our kernel's (codes, scales, minimums) or torch's.
    codes: torch.Tensor
    scales: torch.Tensor
    minimums: torch.Tensor
    packed: torch.Tensor
    scales_and_zeros: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        self.out_features, self.in_features = weight.shape
        if not self.fits(linear):
            raise ValueError(
                f"int4 weights need in_features divisible by {self.GROUP} and out_features by 16, "
                f"not {self.in_features} and {self.out_features}"
            )
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())
        self._kernel = cpu_kernels.load()
        if self._kernel is not None:
            codes, scales, minimums = cpu_int4.pack(weight)
            self.register_buffer("codes", codes)
            self.register_buffer("scales", scales)
            self.register_buffer("minimums", minimums)
            return
        groups = weight.view(self.out_features, -1, self.GROUP)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        scale = ((high - low) / 15).clamp(min=1e-8)
        q = torch.round((groups - low[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.int32)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.view_as(weight), 1))
        # The kernel computes (q - 8) * scale + zero per group: zero = low + 8 * scale.
        scales_and_zeros = torch.stack([scale, low + 8 * scale], dim=-1).transpose(0, 1).contiguous()
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(torch.bfloat16))

    @property
    def runs_our_kernel(self) -> bool:
        return self._kernel is not None

    @classmethod
    def fits(cls, linear: nn.Linear) -> bool:
        """Whether both int4 kernels take `linear`'s shape."""
        return linear.in_features % cls.GROUP == 0 and linear.out_features % 16 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] fp32 -> [..., out_features] fp32."""
        rows = x.reshape(-1, self.in_features)
        if self._kernel is not None:
            out = cpu_int4.matmul(self._kernel, rows, self.codes, self.scales, self.minimums, self.bias)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                rows.to(torch.bfloat16), self.packed, self.GROUP, self.scales_and_zeros
            ).float()
            if self.bias is not None:
                out.add_(self.bias)
        return out.view(*x.shape[:-1], self.out_features)


class RescoredHead(nn.Module):
    """lm_head for CPUs where `Int8Linear` gives activations 7 bits (AVX2 without VNNI): a
    quantized pass (`approximate`: the layers' format) ranks the vocabulary, then each row's
    `CANDIDATES` best logits are recomputed from the fp32 weights and written over their
    approximations.

    Quantized logits alone are too coarse: with the 7-bit int8 head the packaged model's greedy
    answer to the capital of France went wrong. But only the top of each row decides a token:
    greedy takes its first, top-k / top-p draw among the sampler's `CANDIDATES` (the rest only
    add a little to the softmax's denominator). With those exact, and no other logit above them,
    greedy picks what fp32 picks unless fp32's best token ranks below `CANDIDATES` in the
    quantized pass (the packaged SmolLM2 with int4: perplexity 8.11, fp32 head 8.04).

    Measured on this project's 2-core AVX2 EPYC, SmolLM2's head (49,152 x 576), ms at 1 / 4 /
    16 / 64 rows: fp32 13.8 / 31 / 48 / 70; int8 (7-bit) 9.4 / 14.0 / 20.7 / 31; int4 2.8 / 5.3
    / 20.5 / 79 (`topk` and the gathered fp32 rows add 0.3 ms at 1 row); int4 with the kernel's
    later layout (8 outputs to a vector), rescoring included, 1.1-1.4 at 1 row and 9-12 at 16.
    One format whatever the
    row count, so a row's logits never depend on the other rows in the step. Memory: the
    quantized copy (int4: 18 MB with its scales) next to the fp32 weights, which are the
    embedding table itself when the two are tied (SmolLM2).
    """

    weight: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear, approximate: nn.Module, exact_weight: torch.Tensor | None = None):
        """`exact_weight`: the fp32 weight when it is held already (tied embeddings), else a copy
        of `linear`'s is kept."""
        super().__init__()
        self.approximate = approximate
        self.out_features, self.in_features = linear.weight.shape
        self.register_buffer("weight", linear.weight.detach().float() if exact_weight is None else exact_weight)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [rows, hidden] fp32 -> logits [rows, vocab] fp32, exact at each row's best."""
        logits = self.approximate(x)
        best = logits.topk(min(CANDIDATES, logits.shape[-1]), dim=-1).indices  # [rows, k]
        # Multiply and sum, not `bmm`: bmm's sums change with the row count in their last bits.
        exact = (self.weight[best] * x.unsqueeze(1)).sum(-1)
        if self.bias is not None:
            exact += self.bias[best]
        # No approximation may outrank the exact candidates: the sampler's candidates are these.
        logits = torch.minimum(logits, exact.amin(dim=-1, keepdim=True), out=logits)
        return logits.scatter_(-1, best, exact)


def _quantize(weights: LlamaWeights, layer_linear: type[Int8Linear] | type[Int4Linear]) -> None:
    """The layers' Linears become `layer_linear` (`Int8Linear` or `Int4Linear`): a quarter or an
    eighth of the bytes a CPU decode step is bound by reading. lm_head gets 8 bits where the CPU
    can (the packaged GGUF keeps the tied embedding in 8 bits, Q8_0), see `quantized_lm_head`;
    embedding and norms stay fp32."""
    for layer in weights.layers:
        for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
            setattr(layer, name, layer_linear(getattr(layer, name)))
    if not isinstance(weights.lm_head, nn.Linear):
        raise ValueError(f"lm_head is quantized already ({type(weights.lm_head).__name__})")
    tied = weights.lm_head.weight.shape == weights.embed.shape and torch.equal(weights.lm_head.weight, weights.embed)
    weights.lm_head = quantized_lm_head(weights.lm_head, layer_linear, weights.embed if tied else None)


def _decode_table(w: LlamaWeights) -> ctypes.Array | None:
    """`cpu_layer_ops.decode_layer_table` of `w`'s layers where every linear layer runs on our
    int4 kernel, else None."""
    layers = []
    for layer, next_norm in zip(w.layers, w.norms_after):
        buffers: list[cpu_layer_ops.Int4Buffers] = []
        for linear in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj):
            if not (isinstance(linear, Int4Linear) and linear.runs_our_kernel):
                return None
            buffers.append((linear.codes, linear.scales, linear.minimums, linear.bias))
        layers.append((buffers, layer.post_attention_norm, next_norm))
    return cpu_layer_ops.decode_layer_table(layers)


def quantized_lm_head(
    linear: nn.Linear, layer_linear: type[Int8Linear] | type[Int4Linear], exact_weight: torch.Tensor | None = None
) -> nn.Module:
    """The lm_head for this CPU next to `layer_linear` layers: `Int8Linear` where the CPU has
    VNNI; where int8 activations get 7 bits, a `RescoredHead` over `layer_linear` (over
    `Int8Linear` where the int4 kernel cannot take the shape, e.g. a tiny test vocabulary of 259);
    else `linear` itself (fp32)."""
    bits = cpu_int8_activation_bits()
    if bits == 8:
        return Int8Linear(linear)
    if bits != 7:
        return linear
    approximate = Int8Linear(linear) if layer_linear is Int4Linear and not Int4Linear.fits(linear) else layer_linear(linear)
    return RescoredHead(linear, approximate, exact_weight)


def rope_table(weights: LlamaWeights, max_context: int) -> torch.Tensor:
    """The rotation of each position: complex64 [max_context, head_dim // 2]."""
    angles = torch.outer(torch.arange(max_context, dtype=torch.float32, device=weights.inv_freq.device), weights.inv_freq)
    return torch.polar(torch.full_like(angles, weights.rope_scaling), angles)


@dataclass
class PromptChunk:
    """`length` prompt tokens of the request in cache row `slot`, starting at position `start`;
    the chunk that ends the prompt (`is_last`) also yields the first token's logits."""

    slot: int
    start: int
    length: int
    is_last: bool


@dataclass
class StepBatch:
    """One engine step, flattened: the first `n_decode` tokens are one token per decode
    row in slot order (the running requests, and on a CPU each prompt's last token, see
    `build_step`), then each prompt chunk's tokens in order."""

    token_ids: torch.Tensor  # [N]
    slots: torch.Tensor  # [N] cache row of each token
    positions: torch.Tensor  # [N]
    logit_rows: torch.Tensor  # which of the N tokens need next-token logits
    n_decode: int = 0
    # The cache rows and keys the decode rows span (last slot + 1, longest position + 1), for a
    # CPU's masked attention (`step_attention`); host ints, as reading them off a device waits.
    decode_span: tuple[int, int] = (0, 0)
    chunks: list[PromptChunk] = field(default_factory=list)

    def to(self, device: torch.device) -> StepBatch:
        def moved(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=True)

        return StepBatch(
            moved(self.token_ids),
            moved(self.slots),
            moved(self.positions),
            moved(self.logit_rows),
            self.n_decode,
            self.decode_span,
            self.chunks,
        )


def fed_token_ids(host_ids: torch.Tensor, previous_rows: torch.Tensor, previous_tokens: torch.Tensor) -> torch.Tensor:
    """A decode step's input ids when the step before it has not reached the host yet: row i
    takes `previous_tokens[previous_rows[i]]` (the id that step drafted, on the device) where
    previous_rows[i] >= 0, else `host_ids[i]`."""
    return torch.where(previous_rows >= 0, previous_tokens[previous_rows.clamp(min=0)], host_ids)


def build_step(decode: list[tuple[int, int, int]], chunks: list[tuple[PromptChunk, list[int]]], cuda: bool = False) -> StepBatch:
    """`decode`: (slot, position, token id) per running request, slots ascending; `chunks`:
    prompt chunks with their token ids. The step's logits are the decode rows' in order, then
    those of the chunks that end their prompt, in order.

    A CUDA step (`cuda`) puts its long chunks last, where its attention takes each in a call of
    its own (`attend`). A CPU (or mps) step runs each prompt's last token as a decode row, for two reasons.
    Its chunks' attention runs one chunk at a time, padded to whole blocks of query rows (see
    `attend`): a step of 15 one-token chunks (15 chats continuing a cached prompt) took 253 ms
    on the 2-core machine, as 16 decode rows take ~60. And a prompt's first new token then comes
    from the same kernel whether the prefix cache held all of the prompt but its last token or
    none of it, so its logits are equal to the bit either way."""
    logit_order: list[tuple[int, int, int]] = list(decode)
    if not cuda:
        ends = [(c.slot, c.start + c.length - 1, ids[-1]) for c, ids in chunks if c.is_last]
        chunks = [(PromptChunk(c.slot, c.start, c.length - 1, False), ids[:-1]) if c.is_last else (c, ids) for c, ids in chunks]
        chunks = [(c, ids) for c, ids in chunks if c.length]
        logit_order += ends
        decode = sorted(logit_order)  # slots ascending: no two rows share a slot
    token_ids = [t for _, _, t in decode]
    slots = [s for s, _, _ in decode]
    positions = [p for _, p, _ in decode]
    row_of_slot = {s: row for row, s in enumerate(slots)}
    logit_rows = [row_of_slot[s] for s, _, _ in logit_order]
    # Logits stay in the chunks' order, wherever a chunk's tokens go (on a CPU every chunk
    # left here is a prompt's middle: no logits).
    order = sorted(range(len(chunks)), key=lambda i: is_long(chunks[i][0])) if cuda else range(len(chunks))
    last_token = {}
    for i in order:
        chunk, ids = chunks[i]
        token_ids += ids
        slots += [chunk.slot] * chunk.length
        positions += range(chunk.start, chunk.start + chunk.length)
        last_token[i] = len(token_ids) - 1
    logit_rows += [last_token[i] for i, (chunk, _) in enumerate(chunks) if chunk.is_last]
    return StepBatch(
        token_ids=torch.tensor(token_ids),
        slots=torch.tensor(slots),
        positions=torch.tensor(positions),
        logit_rows=torch.tensor(logit_rows, dtype=torch.long),
        n_decode=len(decode),
        decode_span=(slots[len(decode) - 1] + 1, max(positions[: len(decode)]) + 1) if decode else (0, 0),
        chunks=[chunks[i][0] for i in order],
    )


def is_long(chunk: PromptChunk) -> bool:
    """A prompt chunk whose attention a GPU runs in torch's fused attention (`attend`)."""
    return chunk.length >= LONG_CHUNK_TOKENS


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, weight.shape, weight, eps)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """q [b, n_kv_heads, m, head_dim] over k/v [b, n_kv_heads, keys, head_dim] (strided views
    of the cache), bias broadcastable to [b, n_kv_heads, m, keys] (0 or -inf). Two bmm calls
    instead of `scaled_dot_product_attention`: its CPU kernel took ~2x as long for these
    few-query shapes (measured at 16 rows x 200 keys); 3-D bmm reads the cache views in place."""
    b, h, m, d = q.shape  # q is pre-scaled by 1/sqrt(d) (see `_attention_layout`)
    keys = k.shape[2]
    scores = torch.bmm(q.reshape(b * h, m, d), k.flatten(0, 1).transpose(1, 2)).view(b, h, m, keys) + bias
    probs = scores.float().softmax(dim=-1).to(v.dtype)
    return torch.bmm(probs.view(b * h, m, keys), v.flatten(0, 1)).view(b, h, m, d)


@dataclass
class StepAttention:
    """What every layer's attention in a step shares (`attend`), worked out once per step by
    `step_attention`; each device's path reads its own fields."""

    # CPU: a prompt chunk's causal mask as an additive bias (0 or -inf), [1, 1, n_groups *
    # length, start + length] per chunk; and the decode rows', [rows, 1, 1, keys] with rows =
    # the last decode slot + 1, where torch's ops attend (our C kernel reads positions instead).
    chunk_biases: list[torch.Tensor] = field(default_factory=list)
    decode_bias: torch.Tensor | None = None
    # GPU: the tokens before the step's long chunks (one kernel launch), and those chunks.
    short_tokens: int = 0
    long_chunks: list[PromptChunk] = field(default_factory=list)


def step_attention(batch: StepBatch, w: LlamaWeights, ops) -> StepAttention:
    """`batch`'s `StepAttention` on its device, for layers whose small ops are `ops`."""
    if batch.token_ids.is_cuda:
        long = [chunk for chunk in batch.chunks if is_long(chunk)]  # the step's last tokens (`build_step`)
        return StepAttention(short_tokens=len(batch.token_ids) - sum(chunk.length for chunk in long), long_chunks=long)
    device, groups = batch.positions.device, w.n_heads // w.n_kv_heads

    def bias(mask: torch.Tensor) -> torch.Tensor:
        return torch.zeros(mask.shape, dtype=w.dtype, device=device).masked_fill_(~mask, float("-inf"))

    chunk_biases = []
    for chunk in batch.chunks:
        end = chunk.start + chunk.length
        causal = torch.arange(end, device=device)[None, :] <= torch.arange(chunk.start, end, device=device)[:, None]
        chunk_biases.append(bias(causal.repeat(groups, 1))[None, None])
    decode_bias = None
    if batch.n_decode and ops is not cpu_layer_ops:
        slots, positions = batch.slots[: batch.n_decode], batch.positions[: batch.n_decode]
        rows, keys = batch.decode_span
        # Rows between running requests (free or still prefilling) attend to key 0 only, so
        # their (discarded) softmax is not over an empty set.
        row_positions = torch.zeros(rows, dtype=torch.long, device=device).index_copy_(0, slots, positions)
        decode_bias = bias((torch.arange(keys, device=device)[None, :] <= row_positions[:, None])[:, None, None, :])
    return StepAttention(chunk_biases, decode_bias)


# Chunk attention's query rows come in blocks of this many (see `attend`).
CHUNK_QUERY_BLOCK = 128
# From this many tokens a prompt chunk's attention on a GPU is one call of torch's fused
# attention (`cached_attention.chunk_attention`) instead of a share of the attention kernel,
# whose cost grows with the square of a chunk's length (H100, SmolLM2: a chunk of 2,048 tokens
# 3.3 ms a layer, 0.05 ms in torch's; its eager step 100.5 -> 11.6 ms), while each such call
# costs its launches (an eager step of 255 tokens 8.3 ms, of 256 tokens 11.2): break-even
# nearer ~430 tokens by those figures, not yet measured.
LONG_CHUNK_TOKENS = 256


def layer_ops(w: LlamaWeights, x: torch.Tensor):
    """The module with a layer's small ops for `w`'s residual stream x [N, hidden]: Triton
    kernels on a GPU, our C kernels on an x86 AVX2 CPU in fp32 (widths in whole 8-float vectors),
    else torch's ops. A function of the model, device and dtype only, so every step of a model
    takes the same ops: a request's tokens never depend on which other requests share its step."""
    if x.is_cuda:
        # Imported here: Triton comes with torch's CUDA builds, and the CPU path never needs it.
        from deployments.engine import fused_layer_ops

        return fused_layer_ops
    widths = (w.head_dim, x.shape[-1], w.intermediate_size)
    if x.device.type == "cpu" and x.dtype == torch.float32 and all(n % 8 == 0 for n in widths) and cpu_kernels.load() is not None:
        return cpu_layer_ops
    return torch_layer_ops


def attend(
    q: torch.Tensor,
    layer_k: torch.Tensor,
    layer_v: torch.Tensor,
    batch: StepBatch,
    shared: StepAttention,
    w: LlamaWeights,
    ops,
) -> torch.Tensor:
    """q [N, n_heads, head_dim] -> [N, n_heads * head_dim]. Grouped-query attention without
    copying K/V: each KV head's query group is folded into the query-length dimension."""
    if q.is_cuda:
        # Imported here: Triton comes with torch's CUDA builds, and the CPU path never needs it.
        from deployments.engine.cached_attention import cached_attention, chunk_attention

        n = shared.short_tokens
        outputs = [cached_attention(q[:n], layer_k, layer_v, batch.slots[:n], batch.positions[:n])] if n else []
        for chunk in shared.long_chunks:
            outputs.append(chunk_attention(q[n : n + chunk.length], layer_k, layer_v, chunk.slot, chunk.start))
            n += chunk.length
        return (torch.cat(outputs) if len(outputs) > 1 else outputs[0]).reshape(len(q), -1)
    n_kv, groups, head_dim = w.n_kv_heads, w.n_heads // w.n_kv_heads, w.head_dim
    outputs = []
    n_decode = batch.n_decode
    decode_slots = batch.slots[:n_decode]
    if n_decode and ops is cpu_layer_ops:
        out = cpu_layer_ops.decode_attention(q[:n_decode], layer_k, layer_v, decode_slots, batch.positions[:n_decode])
        outputs.append(out.reshape(n_decode, -1))
    elif n_decode:
        decode_bias = shared.decode_bias
        assert decode_bias is not None  # `step_attention` builds it for torch's ops
        rows, keys = decode_bias.shape[0], decode_bias.shape[-1]
        q_decode = q[:n_decode].reshape(n_decode, n_kv, groups, head_dim)
        if rows == n_decode:  # slots 0..n-1, the usual case: no scatter/gather needed
            q_rows = q_decode
        else:
            q_rows = q.new_zeros(rows, n_kv, groups, head_dim)
            q_rows[decode_slots] = q_decode
        out = attention(q_rows, layer_k[:rows, :, :keys], layer_v[:rows, :, :keys], decode_bias)
        outputs.append((out if rows == n_decode else out[decode_slots]).reshape(n_decode, -1))
    offset = n_decode
    for chunk, bias in zip(batch.chunks, shared.chunk_biases):
        t, end = chunk.length, chunk.start + chunk.length
        q_chunk = (
            q[offset : offset + t].reshape(t, n_kv, groups, head_dim).permute(1, 2, 0, 3).reshape(1, n_kv, groups * t, head_dim)
        )
        row = slice(chunk.slot, chunk.slot + 1)
        # Padded to whole blocks of query rows: the batched matmul otherwise rounds a row
        # differently with the chunk's length, and a prefix-cache hit, which computes only the
        # prompt's tail, must give the logits of the whole prompt to the bit (else a seeded
        # request's second answer drifted from its first with the int4 kernel's int16 codes).
        m = groups * t
        pad = (0, 0, 0, -m % CHUNK_QUERY_BLOCK)
        out = attention(F.pad(q_chunk, pad), layer_k[row, :, :end], layer_v[row, :, :end], F.pad(bias, pad))[:, :, :m]
        outputs.append(out.reshape(n_kv, groups, t, head_dim).permute(2, 0, 1, 3).reshape(t, -1))
        offset += t
    return torch.cat(outputs) if len(outputs) > 1 else outputs[0]


def forward(w: LlamaWeights, cache: KVCache, rope: torch.Tensor, batch: StepBatch) -> torch.Tensor:
    """Runs one step, writing every token's K/V into the cache; returns fp32 logits
    [len(batch.logit_rows), vocab]."""
    cache.record_tokens(batch.slots, batch.positions, batch.token_ids)
    x, h = embed(w, batch.token_ids)
    ops = layer_ops(w, x)
    if w.decode_table is not None and ops is cpu_layer_ops and not batch.chunks:
        # Decode rows only, int4 on our kernels: every layer in one C call, the same numbers.
        normed = cpu_layer_ops.decode_layers(
            w.decode_table,
            x,
            h,
            rope,
            batch.positions,
            batch.slots,
            cache.kv,
            w.n_heads,
            w.intermediate_size,
            w.rms_norm_eps,
        )[batch.logit_rows]
    else:
        normed = _layers(w, cache, rope, batch, x, h, ops)
    # Only the last token of each sequence needs logits; lm_head is the biggest matrix.
    return w.lm_head(normed).float()


def embed(w: LlamaWeights, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream x [N, hidden] of `token_ids`, and h, its norm that the first layer's
    projections read."""
    x = w.embed[token_ids]
    return x, rms_norm(x, w.layers[0].input_norm, w.rms_norm_eps)


def _layers(
    w: LlamaWeights, cache: KVCache, rope: torch.Tensor, batch: StepBatch, x: torch.Tensor, h: torch.Tensor, ops
) -> torch.Tensor:
    """The decoder layers with `ops`' small ops (see `layer_ops`), then the final norm: the
    residual stream x [N, hidden] -> [len(logit_rows), hidden]. `h` is the normed residual
    stream each projection reads, computed with the residual update."""
    shared = step_attention(batch, w, ops)
    for i, (layer, next_norm) in enumerate(zip(w.layers, w.norms_after)):
        q = ops.rope_and_cache_write(
            layer.qkv_proj(h), rope, batch.positions, batch.slots, cache.k[i], cache.v[i], w.n_heads, w.n_kv_heads
        )
        x, h = ops.add_rms_norm(
            x, layer.o_proj(attend(q, cache.k[i], cache.v[i], batch, shared, w, ops)), layer.post_attention_norm, w.rms_norm_eps
        )
        x, h = ops.add_rms_norm(x, layer.down_proj(ops.silu_and_mul(layer.gate_up_proj(h))), next_norm, w.rms_norm_eps)
    return h[batch.logit_rows]
