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
from one of three modules with one interface (`layer_ops.LayerOps`), per device, chosen once at
load: `fused_layer_ops` (GPU), `cpu_layer_ops` (x86 AVX2) or `torch_layer_ops` (see `layer_ops`).
With int4 weights on x86 AVX2, a step of decode rows only runs every layer in one C call
(`cpu_layer_ops.decode_layers`), to the bit what the layer loop gives.

Owns: turning a transformers `LlamaForCausalLM` into `LlamaWeights` (fp32, bf16, fp16, or on the
CPU int8 or int4, see `quantized`), RoPE, RMSNorm, attention over the cache, logits.
Does not own the quantized layers (`quantized`), scheduling or sampling (see `batched`, `sampler`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from deployments.engine import cpu_kernels, cpu_layer_ops, torch_layer_ops
from deployments.engine.kv_cache import KVCache
from deployments.engine.layer_ops import LayerOps
from deployments.engine.quantized import Int4Linear, Int8Linear, int4_decode_table, quantize
from deployments.engine.weights import LayerWeights, LlamaWeights
from deployments.model_registry import CPU_ONLY_WEIGHTS, WeightFormat

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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
        quantize(weights, Int4Linear if weight_format == "int4" else Int8Linear)
    weights.ops = layer_ops(weights, weights.embed[:1])
    if weight_format == "int4" and weights.ops is cpu_layer_ops:
        weights.decode_table = int4_decode_table(weights)
    return weights


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
    # Every token's logits too, after the step's sampled rows (`StepBatch.scored`): the prompt's
    # logprobs (a completion's echo).
    is_scored: bool = False


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
    # CPU's masked attention (`CpuStepAttention`); host ints, as reading them off a device waits.
    decode_span: tuple[int, int] = (0, 0)
    chunks: list[PromptChunk] = field(default_factory=list)
    # The last len(scored) logit rows are scored chunks' tokens (`PromptChunk.is_scored`), not
    # sampled: each one's (slot, position), whose logits give the next position's prompt token.
    scored: list[tuple[int, int]] = field(default_factory=list)

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
            self.scored,
        )


def fed_token_ids(host_ids: torch.Tensor, previous_rows: torch.Tensor, previous_tokens: torch.Tensor) -> torch.Tensor:
    """A decode step's input ids when the step before it has not reached the host yet: row i
    takes `previous_tokens[previous_rows[i]]` (the id that step drafted, on the device) where
    previous_rows[i] >= 0, else `host_ids[i]`."""
    return torch.where(previous_rows >= 0, previous_tokens[previous_rows.clamp(min=0)], host_ids)


def build_step(decode: list[tuple[int, int, int]], chunks: list[tuple[PromptChunk, list[int]]], cuda: bool = False) -> StepBatch:
    """`decode`: (slot, position, token id) per running request, slots ascending; `chunks`:
    prompt chunks with their token ids. The step's logits are the decode rows' in order, then
    those of the chunks that end their prompt, in order, then those of the scored chunks' tokens
    (all but a prompt's last, whose logits are sampled), in order.

    A CUDA step (`cuda`) puts its long chunks last, where its attention takes each in a call of
    its own (`CudaStepAttention`). A CPU (or mps) step runs each prompt's last token as a decode
    row, for two reasons. Its chunks' attention runs one chunk at a time, padded to whole blocks
    of query rows (see `CpuStepAttention.attend`): one-token chunks (chats continuing a cached
    prompt) cost several times what as many decode rows cost. And a prompt's first new token
    then comes from the same kernel whether the prefix cache held all of the prompt but its last
    token or none of it, so its logits are equal to the bit either way."""
    logit_order: list[tuple[int, int, int]] = list(decode)
    if not cuda:
        ends = [(c.slot, c.start + c.length - 1, ids[-1]) for c, ids in chunks if c.is_last]
        chunks = [(replace(c, length=c.length - 1, is_last=False), ids[:-1]) if c.is_last else (c, ids) for c, ids in chunks]
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
    first_token = {}
    for i in order:
        chunk, ids = chunks[i]
        first_token[i] = len(token_ids)
        token_ids += ids
        slots += [chunk.slot] * chunk.length
        positions += range(chunk.start, chunk.start + chunk.length)
    logit_rows += [first_token[i] + chunk.length - 1 for i, (chunk, _) in enumerate(chunks) if chunk.is_last]
    scored = []
    for i, (chunk, _) in enumerate(chunks):
        if chunk.is_scored:
            rows = range(first_token[i], first_token[i] + chunk.length - chunk.is_last)
            logit_rows += rows
            scored += [(chunk.slot, positions[row]) for row in rows]
    return StepBatch(
        token_ids=torch.tensor(token_ids),
        slots=torch.tensor(slots),
        positions=torch.tensor(positions),
        logit_rows=torch.tensor(logit_rows, dtype=torch.long),
        n_decode=len(decode),
        decode_span=(slots[len(decode) - 1] + 1, max(positions[: len(decode)]) + 1) if decode else (0, 0),
        chunks=[chunks[i][0] for i in order],
        scored=scored,
    )


def is_long(chunk: PromptChunk) -> bool:
    """A prompt chunk whose attention a GPU runs in torch's fused attention (`CudaStepAttention`)."""
    return chunk.length >= LONG_CHUNK_TOKENS


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, weight.shape, weight, eps)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """q [b, n_kv_heads, m, head_dim] over k/v [b, n_kv_heads, keys, head_dim] (strided views
    of the cache), bias broadcastable to [b, n_kv_heads, m, keys] (0 or -inf). Two bmm calls
    instead of `scaled_dot_product_attention`: its CPU kernel is slower for these few-query
    shapes; 3-D bmm reads the cache views in place."""
    b, h, m, d = q.shape  # q is pre-scaled by 1/sqrt(d) (see `_attention_layout`)
    keys = k.shape[2]
    scores = torch.bmm(q.reshape(b * h, m, d), k.flatten(0, 1).transpose(1, 2)).view(b, h, m, keys) + bias
    probs = scores.float().softmax(dim=-1).to(v.dtype)
    return torch.bmm(probs.view(b * h, m, keys), v.flatten(0, 1)).view(b, h, m, d)


# Chunk attention's query rows come in blocks of this many (see `CpuStepAttention.attend`).
CHUNK_QUERY_BLOCK = 128
# From this many tokens a prompt chunk's attention on a GPU is one call of torch's fused
# attention (`cached_attention.chunk_attention`) instead of a share of the attention kernel,
# whose cost grows with the square of a chunk's length, while each such call costs its
# launches: the break-even length is not measured yet.
LONG_CHUNK_TOKENS = 256


@dataclass
class CpuStepAttention:
    """A CPU's (or mps') attention for one step (`step_attention`): what every layer's attention
    shares, worked out once per step, and each layer's call (`attend`). Decode rows attend to
    their own cache rows, in our C kernel (`c_decode`) or in one masked batched call of torch's;
    each prompt chunk attends causally to its own row through a mask."""

    batch: StepBatch
    w: LlamaWeights
    c_decode: bool  # decode rows in `cpu_layer_ops.decode_attention`, which reads positions: no decode mask
    # A prompt chunk's causal mask as an additive bias (0 or -inf), [1, 1, n_groups * length,
    # start + length] per chunk; and the decode rows', [rows, 1, 1, keys] with rows = the last
    # decode slot + 1, where torch's ops attend.
    chunk_biases: list[torch.Tensor] = field(default_factory=list)
    decode_bias: torch.Tensor | None = None

    @classmethod
    def of(cls, batch: StepBatch, w: LlamaWeights, ops: LayerOps) -> CpuStepAttention:
        c_decode = ops is cpu_layer_ops
        device, groups = batch.positions.device, w.n_heads // w.n_kv_heads

        def bias(mask: torch.Tensor) -> torch.Tensor:
            return torch.zeros(mask.shape, dtype=w.dtype, device=device).masked_fill_(~mask, float("-inf"))

        chunk_biases = []
        for chunk in batch.chunks:
            end = chunk.start + chunk.length
            causal = torch.arange(end, device=device)[None, :] <= torch.arange(chunk.start, end, device=device)[:, None]
            chunk_biases.append(bias(causal.repeat(groups, 1))[None, None])
        decode_bias = None
        if batch.n_decode and not c_decode:
            slots, positions = batch.slots[: batch.n_decode], batch.positions[: batch.n_decode]
            rows, keys = batch.decode_span
            # Rows between running requests (free or still prefilling) attend to key 0 only, so
            # their (discarded) softmax is not over an empty set.
            row_positions = torch.zeros(rows, dtype=torch.long, device=device).index_copy_(0, slots, positions)
            decode_bias = bias((torch.arange(keys, device=device)[None, :] <= row_positions[:, None])[:, None, None, :])
        return cls(batch, w, c_decode, chunk_biases, decode_bias)

    def attend(self, q: torch.Tensor, layer_k: torch.Tensor, layer_v: torch.Tensor) -> torch.Tensor:
        """q [N, n_heads, head_dim] -> [N, n_heads * head_dim]. Grouped-query attention without
        copying K/V: each KV head's query group is folded into the query-length dimension."""
        batch, w = self.batch, self.w
        n_kv, groups, head_dim = w.n_kv_heads, w.n_heads // w.n_kv_heads, w.head_dim
        outputs = []
        n_decode = batch.n_decode
        decode_slots = batch.slots[:n_decode]
        if n_decode and self.c_decode:
            out = cpu_layer_ops.decode_attention(q[:n_decode], layer_k, layer_v, decode_slots, batch.positions[:n_decode])
            outputs.append(out.reshape(n_decode, -1))
        elif n_decode:
            decode_bias = self.decode_bias
            assert decode_bias is not None  # `of` builds it for torch's ops
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
        for chunk, bias in zip(batch.chunks, self.chunk_biases):
            t, end = chunk.length, chunk.start + chunk.length
            q_chunk = (
                q[offset : offset + t]
                .reshape(t, n_kv, groups, head_dim)
                .permute(1, 2, 0, 3)
                .reshape(1, n_kv, groups * t, head_dim)
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


@dataclass
class CudaStepAttention:
    """A GPU's attention for one step (`step_attention`): one Triton kernel launch for every
    token before the step's long chunks, each reading its own cache row up to its own position
    (`cached_attention`), then each long chunk in a call of torch's fused attention."""

    batch: StepBatch
    short_tokens: int  # the tokens before the step's long chunks (one kernel launch)
    long_chunks: list[PromptChunk]

    @classmethod
    def of(cls, batch: StepBatch) -> CudaStepAttention:
        long = [chunk for chunk in batch.chunks if is_long(chunk)]  # the step's last tokens (`build_step`)
        return cls(batch, short_tokens=len(batch.token_ids) - sum(chunk.length for chunk in long), long_chunks=long)

    def attend(self, q: torch.Tensor, layer_k: torch.Tensor, layer_v: torch.Tensor) -> torch.Tensor:
        """q [N, n_heads, head_dim] -> [N, n_heads * head_dim]."""
        # Imported here: Triton comes with torch's CUDA builds, and the CPU path never needs it.
        from deployments.engine.cached_attention import cached_attention, chunk_attention

        batch = self.batch
        n = self.short_tokens
        outputs = [cached_attention(q[:n], layer_k, layer_v, batch.slots[:n], batch.positions[:n])] if n else []
        for chunk in self.long_chunks:
            outputs.append(chunk_attention(q[n : n + chunk.length], layer_k, layer_v, chunk.slot, chunk.start))
            n += chunk.length
        return (torch.cat(outputs) if len(outputs) > 1 else outputs[0]).reshape(len(q), -1)


StepAttention = CpuStepAttention | CudaStepAttention


def step_attention(batch: StepBatch, w: LlamaWeights, ops: LayerOps) -> StepAttention:
    """`batch`'s attention on its device, for layers whose small ops are `ops`: what every
    layer's attention in the step shares, worked out once, and each layer's `attend`."""
    if batch.token_ids.is_cuda:
        return CudaStepAttention.of(batch)
    return CpuStepAttention.of(batch, w, ops)


def layer_ops(w: LlamaWeights, x: torch.Tensor) -> LayerOps:
    """The module with a layer's small ops for `w`'s residual stream x [N, hidden]: Triton
    kernels on a GPU, our C kernels on an x86 AVX2 CPU in fp32 (widths in whole 8-float vectors),
    else torch's ops. A function of the model, device and dtype only, chosen once at load
    (`LlamaWeights.ops`), so every step of a model takes the same ops: a request's tokens never
    depend on which other requests share its step."""
    if x.is_cuda:
        # Imported here: Triton comes with torch's CUDA builds, and the CPU path never needs it.
        from deployments.engine import fused_layer_ops

        return fused_layer_ops
    widths = (w.head_dim, x.shape[-1], w.intermediate_size)
    if x.device.type == "cpu" and x.dtype == torch.float32 and all(n % 8 == 0 for n in widths) and cpu_kernels.load() is not None:
        return cpu_layer_ops
    return torch_layer_ops


def forward(w: LlamaWeights, cache: KVCache, rope: torch.Tensor, batch: StepBatch) -> torch.Tensor:
    """Runs one step, writing every token's K/V into the cache; returns fp32 logits
    [len(batch.logit_rows), vocab]."""
    cache.record_tokens(batch.slots, batch.positions, batch.token_ids)
    x, h = embed(w, batch.token_ids)
    if w.decode_table is not None and not batch.chunks:
        # Decode rows only, int4 on our kernels (`w.ops` is `cpu_layer_ops`, see
        # `extract_weights`): every layer in one C call, the same numbers.
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
        normed = _layers(w, cache, rope, batch, x, h, w.ops)
    # Only the last token of each sequence needs logits; lm_head is the biggest matrix.
    return w.lm_head(normed).float()


def embed(w: LlamaWeights, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream x [N, hidden] of `token_ids`, and h, its norm that the first layer's
    projections read."""
    x = w.embed[token_ids]
    return x, rms_norm(x, w.layers[0].input_norm, w.rms_norm_eps)


def _layers(
    w: LlamaWeights, cache: KVCache, rope: torch.Tensor, batch: StepBatch, x: torch.Tensor, h: torch.Tensor, ops: LayerOps
) -> torch.Tensor:
    """The decoder layers with `ops`' small ops (see `layer_ops`), then the final norm: the
    residual stream x [N, hidden] -> [len(logit_rows), hidden]. `h` is the normed residual
    stream each projection reads, computed with the residual update."""
    attn = step_attention(batch, w, ops)
    for i, (layer, next_norm) in enumerate(zip(w.layers, w.norms_after)):
        q = ops.rope_and_cache_write(
            layer.qkv_proj(h), rope, batch.positions, batch.slots, cache.k[i], cache.v[i], w.n_heads, w.n_kv_heads
        )
        x, h = ops.add_rms_norm(
            x, layer.o_proj(attn.attend(q, cache.k[i], cache.v[i])), layer.post_attention_norm, w.rms_norm_eps
        )
        x, h = ops.add_rms_norm(x, layer.down_proj(ops.silu_and_mul(layer.gate_up_proj(h))), next_norm, w.rms_norm_eps)
    return h[batch.logit_rows]
