"""The CPU line every benchmark prints: /proc/cpuinfo's first processor, named by its family."""

from __future__ import annotations

import platform

from bench.machine import cpu_name


def cpuinfo(**fields: str) -> str:
    """A /proc/cpuinfo of two processors; the second's fields differ, to show they are not read."""
    names = {"cpu_family": "cpu family", "model_name": "model name"}  # the others keep their underscores
    first = "\n".join(f"{names.get(key, key)}\t: {value}" for key, value in fields.items())
    return f"processor\t: 0\n{first}\n\nprocessor\t: 1\nmodel name\t: another\ncpu family\t: 1\nmodel\t: 1\n\n"


def test_an_epyc_that_calls_itself_amd_epyc_is_named_by_its_family_and_model():
    flags = "fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 avx512vl"
    zen4 = cpuinfo(vendor_id="AuthenticAMD", cpu_family="25", model="17", model_name="AMD EPYC", stepping="1", flags=flags)
    zen5 = cpuinfo(vendor_id="AuthenticAMD", cpu_family="26", model="2", model_name="AMD EPYC", stepping="1", flags=flags)
    assert cpu_name(zen4) == "AMD EPYC (Zen 4: x86 family 25 model 17 stepping 1; avx2 avx512f avx512_vnni avx512_bf16)"
    assert cpu_name(zen5) == "AMD EPYC (Zen 5: x86 family 26 model 2 stepping 1; avx2 avx512f avx512_vnni avx512_bf16)"
    unknown = cpuinfo(vendor_id="AuthenticAMD", cpu_family="23", model="49", model_name="AMD EPYC 7B12", flags="avx2")
    assert cpu_name(unknown) == "AMD EPYC 7B12 (x86 family 23 model 49 stepping ?; avx2)"


def test_a_xeon_with_amx_and_a_cpu_without_avx2():
    xeon = cpuinfo(
        vendor_id="GenuineIntel",
        cpu_family="6",
        model="143",
        model_name="Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz",
        stepping="8",
        flags="avx2 avx512f avx512_vnni amx_tile amx_int8",
    )
    old = cpuinfo(
        vendor_id="GenuineIntel", cpu_family="6", model="42", model_name="Intel(R) Core(TM) i5-2500", flags="sse4_2 avx"
    )
    assert cpu_name(xeon) == (
        "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz (Sapphire Rapids: x86 family 6 model 143 stepping 8; "
        "avx2 avx512f avx512_vnni amx_tile)"
    )
    assert cpu_name(old) == "Intel(R) Core(TM) i5-2500 (x86 family 6 model 42 stepping ?; no AVX2)"
    other = cpuinfo(vendor_id="CentaurHauls", cpu_family="6", model="143", model_name="VIA Nano", flags="avx2")
    assert cpu_name(other) == "VIA Nano (x86 family 6 model 143 stepping ?; avx2)"  # not Intel's model 143


def test_a_cpu_without_a_family_keeps_its_name_or_the_architecture():
    assert cpu_name(cpuinfo(model_name="Neoverse-V2")) == "Neoverse-V2"
    assert cpu_name("") == platform.machine()
