"""The CPU int4 matmul of `quantized.Int4Linear`: our AVX2 kernel (`int4_avx2.c`, with an AVX-512
VNNI path) where it can be built, else torch's own int4 kernel.

Why our own: on x86 CPUs without VNNI (AVX2 only, like this project's CI machine) torch's int4
kernel computes in bf16 and unpacks the weights again for every activation row. Ours quantizes
each row's activations to int16 per group of 32 (as exact as fp32 activations for the answers,
see the C file) and multiplies in integers, 8 outputs to a vector: faster than torch's at every
row count. The weights are GGUF's Q4_1 (fp16 scale and minimum per group of 32), so the packaged
model's values are held exactly.

Where the CPU also has AVX-512 VNNI, matmuls of 2 rows or more take the kernel's 512-bit path,
which gives the same bits, faster.

The kernel is built and loaded with the layer ops' by `cpu_kernels`.
"""

from __future__ import annotations

import ctypes

import torch

GROUP = 32  # inputs per scale and minimum: GGUF Q4_1's block, which both int4 kernels take


def pack(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 [out, in] -> the kernel's Q4_1 layout (see the C file): codes uint8 [out / 8, in / 32,
    8, 16], per block of 8 outputs and group of 32 inputs; scales and minimums fp16 [out / 8,
    in / 32, 8]. Weights already on Q4_1's grid (the packaged GGUF's) come back exactly: each
    group's minimum and scale are its own, rounded to fp16 first."""
    out_features, in_features = weight.shape
    blocks, groups = out_features // 8, in_features // GROUP
    grouped = weight.float().view(out_features, groups, GROUP)
    low, high = grouped.amin(dim=-1), grouped.amax(dim=-1)
    scales = ((high - low) / 15).clamp(min=1e-8).half()
    minimums = low.half()
    q = torch.round((grouped - minimums.float()[..., None]) / scales.float()[..., None]).clamp_(0, 15).to(torch.uint8)

    def vectors(half: torch.Tensor) -> torch.Tensor:
        """[out, groups, 16] codes of inputs 2c + p -> [blocks, groups, c, 16]: byte 2o + p of
        vector c is output o's (of the block) code for input 2c + p."""
        return half.reshape(blocks, 8, groups, 8, 2).permute(0, 2, 3, 1, 4).reshape(blocks, groups, 8, 16)

    codes = vectors(q[..., : GROUP // 2]) | (vectors(q[..., GROUP // 2 :]) << 4)

    def lanes(t: torch.Tensor) -> torch.Tensor:  # [out, groups] -> [blocks, groups, 8]
        return t.view(blocks, 8, groups).transpose(1, 2).contiguous()

    return codes.contiguous(), lanes(scales), lanes(minimums)


def unpack(codes: torch.Tensor, scales: torch.Tensor, minimums: torch.Tensor) -> torch.Tensor:
    """`pack`'s inverse: the fp32 weights the kernel multiplies by."""
    blocks, groups = codes.shape[:2]

    def inputs(half: torch.Tensor) -> torch.Tensor:  # `pack`'s `vectors`, undone
        return half.reshape(blocks, groups, 8, 8, 2).permute(0, 3, 1, 2, 4).reshape(blocks * 8, groups, GROUP // 2)

    q = torch.cat([inputs(codes & 0x0F), inputs(codes >> 4)], dim=-1).float()

    def per_output(t: torch.Tensor) -> torch.Tensor:  # [blocks, groups, 8] -> [out, groups, 1]
        return t.transpose(1, 2).reshape(blocks * 8, groups, 1).float()

    return (q * per_output(scales) + per_output(minimums)).view(blocks * 8, -1)


def matmul(
    library: ctypes.CDLL,
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    minimums: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """x fp32 [rows, in] -> fp32 [rows, out] through the kernel (`cpu_kernels.load()`), on torch's
    intra-op threads."""
    x = x.float().contiguous()
    rows, in_features = x.shape
    out_features = codes.shape[0] * 8
    out = torch.empty(rows, out_features)
    if rows:
        status = library.int4_matmul(
            codes.data_ptr(),
            scales.data_ptr(),
            minimums.data_ptr(),
            None if bias is None else bias.data_ptr(),
            x.data_ptr(),
            out.data_ptr(),
            rows,
            in_features,
            out_features,
            torch.get_num_threads(),
        )
        if status:
            raise MemoryError(f"int4 matmul of {rows} rows: out of memory")
    return out
