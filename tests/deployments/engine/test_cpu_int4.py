from __future__ import annotations

import platform
import shutil

import pytest
import torch

from deployments.engine import cpu_int4, cpu_kernels

CAN_BUILD = (
    platform.machine().lower() in ("x86_64", "amd64")
    and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    and shutil.which("cc") is not None
)
needs_kernel = pytest.mark.skipif(not CAN_BUILD, reason="our int4 kernel needs x86 AVX2 and a C compiler")


def q4_1_weight(out_features: int, in_features: int) -> torch.Tensor:
    """Weights on GGUF Q4_1's grid (minimum + q * scale, q in 0..15 spanning every group, fp16
    scale and minimum), as the packaged model's are."""
    q = torch.randint(0, 16, (out_features, in_features // 32, 32))
    q[..., 0], q[..., 1] = 0, 15
    scale = (torch.rand(out_features, in_features // 32, 1) * 0.01 + 0.001).half().float()
    minimum = (-torch.rand(out_features, in_features // 32, 1) * 0.05).half().float()
    return (minimum + q * scale).reshape(out_features, in_features)


def reference_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The kernel's arithmetic in plain torch: each row's groups of 32 rounded to int16 codes,
    round(x * 32258 / amax), at the scale amax / 32258, then multiplied in fp32."""
    groups = x.view(len(x), -1, 32)
    amax = groups.abs().amax(dim=-1, keepdim=True)
    codes = torch.round(groups * torch.where(amax > 0, 32258 / amax, 0))
    return (codes * (amax / 32258)).view_as(x) @ weight.T


def test_pack_holds_q4_1_weights_exactly():
    torch.manual_seed(0)
    weight = q4_1_weight(48, 96)
    assert torch.equal(cpu_int4.unpack(*cpu_int4.pack(weight)), weight)


@needs_kernel
def test_the_kernel_is_built_where_it_can_run():
    # A broken build must fail here, not fall back silently to torch's slower kernel.
    assert cpu_kernels.load() is not None


@needs_kernel
@pytest.mark.parametrize("in_features", [32, 96, 256, 576, 1536])  # leftover groups, whole octets, both
def test_the_kernel_computes_its_reference_arithmetic(in_features):
    torch.manual_seed(in_features)
    weight = q4_1_weight(80, in_features)
    bias = torch.randn(80)
    x = torch.randn(7, in_features)
    x[2] *= 100  # an outlier row keeps its own scales
    x[4, :40] = 0  # an all-zero group
    codes, scales, minimums = cpu_int4.pack(weight)
    out = cpu_int4.matmul(cpu_kernels.load(), x, codes, scales, minimums, bias)
    torch.testing.assert_close(out, reference_matmul(x, weight) + bias, rtol=1e-5, atol=1e-4)
    # As close to fp32 as bf16 activations get, or closer.
    exact = x @ weight.T + bias
    assert ((out - exact).norm(dim=1) / exact.norm(dim=1)).max() < 1e-3


@needs_kernel
def test_a_rows_result_does_not_depend_on_the_other_rows():
    torch.manual_seed(1)
    weight = q4_1_weight(64, 576)
    packed = cpu_int4.pack(weight)
    x = torch.randn(19, 576)
    together = cpu_int4.matmul(cpu_kernels.load(), x, *packed, None)
    alone = torch.cat([cpu_int4.matmul(cpu_kernels.load(), x[i : i + 1], *packed, None) for i in range(19)])
    assert torch.equal(together, alone)
    assert cpu_int4.matmul(cpu_kernels.load(), x[:0], *packed, None).shape == (0, 64)


@needs_kernel
def test_the_sums_are_exact_at_the_extremes():
    # Every weight code 15 against activation codes of +-32258: the int32 sums must not overflow.
    weight = torch.full((16, 64), 15.0)
    weight[:, ::32] = 0  # each group spans 0..15: scale 1, minimum 0
    x = torch.ones(2, 64)
    x[1] = -1.0
    out = cpu_int4.matmul(cpu_kernels.load(), x, *cpu_int4.pack(weight), None)
    assert torch.equal(out, torch.tensor([[62 * 15.0] * 16, [-62 * 15.0] * 16]))


@needs_kernel
@pytest.mark.parametrize("out_features", [8, 24, 80, 960])  # one block of 8 outputs, odd block counts, even
def test_the_avx512_path_gives_the_avx2_paths_bits(out_features):
    """Where the CPU has AVX-512 VNNI, matmuls take two blocks to a vector (`block_rows_wide`):
    every row count, thread count (parts that split a pair of blocks) and bias, the same bits."""
    library = cpu_kernels.load()
    if not library.int4_wide_supported():
        pytest.skip("this CPU has no AVX-512 VNNI")
    torch.manual_seed(out_features)
    packed = cpu_int4.pack(q4_1_weight(out_features, 576))
    x = torch.randn(17, 576)
    x[3] *= 100
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2, 3):
            torch.set_num_threads(n_threads)
            for rows in (1, 4, 8, 9, 17):
                for bias in (None, torch.randn(out_features)):
                    library.int4_use_wide(0)
                    avx2 = cpu_int4.matmul(library, x[:rows], *packed, bias)
                    assert library.int4_use_wide(1) == 1
                    assert torch.equal(cpu_int4.matmul(library, x[:rows], *packed, bias), avx2), (n_threads, rows)
    finally:
        torch.set_num_threads(threads)
        library.int4_use_wide(1)  # what `cpu_kernels.load` chose
