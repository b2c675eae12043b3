"""The CPU's quantized linear layers and where the engine's weights take them: `Int8Linear`
(W8A8, per-token activations), `Int4Linear` (weight-only, GGUF Q4_1's layout), `RescoredHead`
(a quantized lm_head made exact at each row's best logits), and the probes of this CPU's int8
kernel (`cpu_int8_activation_bits`, `cpu_has_fast_int8`) that decide how int8 runs here.

Owns: quantizing a `LlamaWeights`' layers and lm_head (`quantize`, `quantized_lm_head`) and the
int4 layers' table for a decode step in one C call (`int4_decode_table`).
Does not own the weights' layout (`weights`), turning a transformers model into them or running
them (`forward`), or the int4 kernel itself (`cpu_int4`, `cpu_kernels`).
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import nn

from deployments.engine import cpu_int4, cpu_kernels, cpu_layer_ops
from deployments.engine.sampler import CANDIDATES
from deployments.engine.torch_threads import run_in_fresh_thread
from deployments.engine.weights import LlamaWeights


class Int8Linear(nn.Module):
    """W8A8: int8 weights with one scale per output channel, and each activation row (token)
    quantized to int8 with its own scale at run time; the matmul is integer and exact, so a
    row's result never depends on the other rows in the step.

    Per token, not per tensor as torch's dynamic quantization does: one prompt's outlier token
    (the first token's activations are ~100x the rest) would otherwise set the scale for every
    row and cost the others their precision. SmoothQuant (calibrated per-channel scales that move
    outliers into the weights) was needed for per-tensor int8 only, and is not worth its
    calibration here: it moved perplexity either way with its strength.

    Two integer kernels, the faster for the row count: `torch._int_mm` below `ONEDNN_MIN_ROWS`,
    oneDNN's prepacked `qlinear` (x86) from there on; both give the same int32 sums, scaled in
    the same order, so the choice never changes a result. The price: the weights are held twice,
    plain and prepacked.

    On an x86 CPU without VNNI (AVX2 only) oneDNN's kernel adds pairs of u8 x s8 products in
    saturating int16 first, and `_int_mm` takes a slow reference kernel. There activations get 7
    bits (|q| <= 63, as fbgemm's `reduce_range`): a pair of products then stays within int16, so
    oneDNN's sums are exact again, and it takes every step.
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
        # The weight's transposed view, not a transposed copy: `_int_mm` is faster on it.
        self._weight_t = self.weight.t()
        self._packed: torch.Tensor | None = None
        self._zero_points = torch.zeros(self.out_features, dtype=torch.long)
        bits = cpu_int8_activation_bits()
        # The largest activation integer; oneDNN wants unsigned activations (signed ones take a
        # slow reference kernel), hence the zero point of 128 (64 with 7 bits) in `forward`.
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
    7 bits the loss of perplexity is too much for a default."""
    return cpu_int8_activation_bits() == 8


class Int4Linear(nn.Module):
    """Weight-only 4-bit: groups of 32 inputs, each with a scale and a minimum, the layout of
    GGUF's Q4_1. The packaged SmolLM2's linear layers are Q4_1, so this holds their values again
    in an eighth of fp32's bytes.

    Two kernels, chosen once per process (`cpu_kernels.load`): on x86 with AVX2 our own
    (`int4_avx2.c`: int16 activations per group of 32, integer dot products, fp16 scales; faster
    than torch's, see `cpu_int4`), else torch's (bf16 activations: torch's CPU int4 kernel runs at
    full speed only with them). Either way a row's result never depends on the other rows. Both
    unpack the weights per step, so past a few rows `Int8Linear` may be faster where the CPU has
    VNNI.
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
    quantized pass.

    Why: the head is the step's biggest matrix, and its quantized pass with the rescoring costs
    a fraction of the fp32 pass at few rows. One format whatever the row count, so a row's
    logits never depend on the other rows in the step. Memory: the quantized copy next to the
    fp32 weights, which are the embedding table itself when the two are tied (SmolLM2).
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


def quantize(weights: LlamaWeights, layer_linear: type[Int8Linear] | type[Int4Linear]) -> None:
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


def int4_decode_table(w: LlamaWeights) -> ctypes.Array | None:
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
