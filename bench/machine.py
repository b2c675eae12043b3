"""The CPU a benchmark ran on, named as precisely as the machine says, for the line every
benchmark prints above its figures.

A VM's `model name` is often only "AMD EPYC", which a Zen 4 and a Zen 5 EPYC can both say, with
AVX-512 and VNNI on both: figures from the two must not be compared, and only the x86 family and
model tell them apart. The vector extensions say which of our kernels (AVX2, AVX-512) and which
of a baseline's paths (llama.cpp's AMX) could run.
"""

from __future__ import annotations

import platform
from pathlib import Path

# The vector extensions that decide which kernels run, as /proc/cpuinfo names them.
VECTOR_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")


# Intel server cores seen with AVX-512 (family 6), by model.
_INTEL_CORES = {85: "Skylake/Cascade Lake", 106: "Ice Lake", 143: "Sapphire Rapids", 207: "Emerald Rapids", 173: "Granite Rapids"}


def _core(vendor: str, family: int, model: int) -> str | None:
    """The core's name where known: AMD's family 25 (Zen 3 and Zen 4, told apart by model
    ranges) and 26 (Zen 5), Intel's server cores above; None for others, which the family and
    model still name."""
    if vendor == "GenuineIntel" and family == 6:
        return _INTEL_CORES.get(model)
    if vendor != "AuthenticAMD":
        return None
    if family == 26:
        return "Zen 5"
    if family == 25 and (0x10 <= model <= 0x1F or 0x60 <= model <= 0x7F or 0xA0 <= model <= 0xAF):
        return "Zen 4"
    if family == 25 and (model <= 0x0F or 0x20 <= model <= 0x5F):
        return "Zen 3"
    return None


def cpu_name(cpuinfo: str | None = None) -> str:
    """E.g. "AMD EPYC (Zen 4: x86 family 25 model 17 stepping 1; avx2 avx512f avx512_vnni
    avx512_bf16)", from `cpuinfo` (the text of /proc/cpuinfo, read where not given); the
    machine's architecture where there is no /proc/cpuinfo."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.exists() else ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            break  # the first processor's entry describes them all
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.machine()
    if "cpu family" not in fields or "model" not in fields:
        return name
    family, model = int(fields["cpu family"]), int(fields["model"])
    core = _core(fields.get("vendor_id", ""), family, model)
    flags = set(fields.get("flags", "").split())
    identity = f"x86 family {family} model {model} stepping {fields.get('stepping', '?')}"
    vectors = " ".join(flag for flag in VECTOR_FLAGS if flag in flags) or "no AVX2"
    return f"{name} ({f'{core}: ' if core else ''}{identity}; {vectors})"
