"""Our C kernels for x86 AVX2 CPUs, built on first use and loaded with ctypes: the int4 matmul
(`int4_avx2.c`, see `cpu_int4`) and a decoder layer's small ops (`layer_ops_avx2.c`, see
`cpu_layer_ops`).

They are compiled once per machine with the system's C compiler (`cc`, or `$CC`) into one library
in the user's cache (`$XDG_CACHE_HOME/ray-chat/kernels`, under a hash of the sources and flags):
no build step at install. The library links OpenMP by the soname torch's own libgomp has, so it
runs on torch's thread pool, never a second one. Where there is no compiler, no AVX2, or the
build fails, `load()` returns None and says why once in the log; the engine then runs torch's
ops (`Int4Linear` torch's int4 kernel, the layers `torch_layer_ops`).
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

SOURCES = [Path(__file__).with_name("int4_avx2.c"), Path(__file__).with_name("layer_ops_avx2.c")]
# -ffp-contract=off: no fused multiply-adds but the written ones, so the activations round as
# the tests' torch reference rounds them. -fno-math-errno: sqrtf is one instruction, no libm.
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC"]

_pointer, _long, _int, _float = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float
# Each function's (return type, argument types), as the C sources declare them.
SIGNATURES = {
    "int4_matmul": (_int, [_pointer] * 4 + [_pointer] * 2 + [_int] * 4),
    "int4_wide_supported": (_int, []),
    "int4_use_wide": (_int, [_int]),
    "rope_and_cache_write": (None, [_pointer, _long] + [_pointer] * 6 + [_long] * 3 + [_int] * 5),
    "decode_attention": (_int, [_pointer] * 3 + [_long] * 3 + [_pointer] * 3 + [_int] * 5),
    "add_rms_norm": (None, [_pointer] * 3 + [_float] + [_pointer] * 2 + [_int] * 3),
    "silu_and_mul": (None, [_pointer] * 2 + [_int] * 3),
    "decode_layers": (_int, [_pointer, _int] + [_pointer] * 6 + [_long] * 5 + [_int] * 6 + [_float, _int]),
}


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
        subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", tmp], check=True, capture_output=True, text=True, timeout=120)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use; None where they cannot run here (logged once)."""
    if platform.machine().lower() not in ("x86_64", "amd64") or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        logger.info("CPU kernels: torch's (ours need an x86 CPU with AVX2)")
        return None
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        logger.warning("CPU kernels: torch's, slower here: no C compiler (%s) to build ours", compiler)
        return None
    sources = b"".join(source.read_bytes() for source in SOURCES)
    digest = hashlib.sha256(sources + " ".join([compiler, *FLAGS]).encode()).hexdigest()[:16]
    target = cache_dir() / f"cpu_kernels-{digest}.so"
    try:
        if not target.exists():
            _build(compiler, target)
        library = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = exc.stderr if isinstance(exc, subprocess.CalledProcessError) else exc
        logger.warning("CPU kernels: torch's, slower here: building ours failed: %s", detail)
        return None
    for name, (restype, argtypes) in SIGNATURES.items():
        function = getattr(library, name)
        function.restype, function.argtypes = restype, argtypes
    wide = library.int4_use_wide(1)
    logger.info("CPU kernels: ours for AVX2, the int4 matmul's for %s (%s)", "AVX-512 VNNI" if wide else "AVX2", target)
    return library
