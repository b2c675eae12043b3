"""The CPU int4 matmul of `Int4Linear`: our AVX2 kernel (`int4_avx2.c`) where it can be built,
else torch's own int4 kernel.

Why our own: on x86 CPUs without VNNI (AVX2 only, like this project's CI machine) torch's int4
kernel computes in bf16 and unpacks the weights again for every activation row. Ours quantizes
each row's activations to int16 per group of 32 (as exact as fp32 activations for the answers,
see the C file) and multiplies in integers. One pass over SmolLM2's layers on the 2-core AVX2
EPYC, ours vs torch's in the same process, ranges over four runs, ms at 1 / 4 / 16 / 64 rows:
ours 10.9-14.5 / 18.6-22.9 / 51-75 / 234-295, torch's 15.0-18.6 / 24.1-28.8 / 63-86 / 309-377;
the int4 lm_head pass at 1 row 1.8-2.0 vs 2.7-2.8 ms. The weights are GGUF's Q4_1 (fp16 scale
and minimum per group of 32), so the packaged model's values are held exactly.

The kernel is compiled once per machine with the system's C compiler (`cc`, or `$CC`) into the
user's cache (`$XDG_CACHE_HOME/ray-chat/kernels`, under a hash of its source and flags) and loaded
with ctypes: no build step at install. It links OpenMP by the soname torch's own libgomp has, so
it runs on torch's thread pool, never a second one. Where there is no compiler, no AVX2, or the
build fails, `load()` returns None and says why once in the log; `Int4Linear` then takes torch's
kernel.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("int4_avx2.c")
# -ffp-contract=off: no fused multiply-adds but the written ones, so the activations round as
# the tests' torch reference rounds them. -fno-math-errno: sqrtf is one instruction, no libm.
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC"]
GROUP = 32


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ray-chat" / "kernels"


def _build(compiler: str, target: Path) -> None:
    """Compiles into a temporary file and renames it into place: a concurrent build (two
    replicas starting at once) or an interrupted one never leaves a half-written library."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], check=True, capture_output=True, text=True, timeout=120)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use; None where it cannot run here (logged once)."""
    if platform.machine().lower() not in ("x86_64", "amd64") or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        logger.info("int4 on the CPU: torch's kernel (ours needs an x86 CPU with AVX2)")
        return None
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        logger.warning("int4 on the CPU: torch's kernel, slower here: no C compiler (%s) to build ours", compiler)
        return None
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *FLAGS]).encode()).hexdigest()[:16]
    target = cache_dir() / f"int4_avx2-{digest}.so"
    try:
        if not target.exists():
            _build(compiler, target)
        library = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = exc.stderr if isinstance(exc, subprocess.CalledProcessError) else exc
        logger.warning("int4 on the CPU: torch's kernel, slower here: building ours failed: %s", detail)
        return None
    library.int4_matmul.restype = ctypes.c_int
    library.int4_matmul.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_float] + [ctypes.c_void_p] * 2 + [ctypes.c_int] * 4
    logger.info("int4 on the CPU: our AVX2 kernel (%s)", target)
    return library


def pack(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 [out, in] -> the kernel's Q4_1 layout: codes uint8 [out, in / 2], scales and
    minimums fp16 [out, in / 32]. Weights already on Q4_1's grid (the packaged GGUF's) come back
    exactly: each group's minimum and scale are its own, rounded to fp16 first."""
    out_features, in_features = weight.shape
    groups = weight.float().view(out_features, in_features // GROUP, GROUP)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((high - low) / 15).clamp(min=1e-8).half()
    minimums = low.half()
    q = torch.round((groups - minimums.float()[..., None]) / scales.float()[..., None]).clamp_(0, 15).to(torch.uint8)
    codes = q[..., : GROUP // 2] | (q[..., GROUP // 2 :] << 4)
    return codes.reshape(out_features, in_features // 2).contiguous(), scales.contiguous(), minimums.contiguous()


def unpack(codes: torch.Tensor, scales: torch.Tensor, minimums: torch.Tensor) -> torch.Tensor:
    """`pack`'s inverse: the fp32 weights the kernel multiplies by."""
    out_features = codes.shape[0]
    nibbles = codes.view(out_features, -1, GROUP // 2)
    q = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=-1).float()
    return (q * scales.float()[..., None] + minimums.float()[..., None]).view(out_features, -1)


def matmul(
    library: ctypes.CDLL, x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, minimums: torch.Tensor,
    bias: torch.Tensor | None, norm: tuple[torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """x fp32 [rows, in] -> fp32 [rows, out] through the kernel, on torch's intra-op threads.
    `norm` (weight, eps): multiply RMSNorm(x) instead, normalized inside the kernel."""
    x = x.float().contiguous()
    rows, in_features = x.shape
    out = torch.empty(rows, codes.shape[0])
    norm_weight, eps = (None, 0.0) if norm is None else (norm[0].float().contiguous(), norm[1])
    if rows:
        status = library.int4_matmul(
            codes.data_ptr(), scales.data_ptr(), minimums.data_ptr(), None if bias is None else bias.data_ptr(),
            None if norm_weight is None else norm_weight.data_ptr(), eps,
            x.data_ptr(), out.data_ptr(), rows, in_features, codes.shape[0], torch.get_num_threads(),
        )
        if status:
            raise MemoryError(f"int4 matmul of {rows} rows: out of memory")
    return out
