"""Whether this CPU sums int8 products without saturating, from the flags of /proc/cpuinfo.

onnxruntime's x86 int8 kernels multiply uint8 activations by int8 weights. With VNNI (avx512_vnni,
avx_vnni) or AMX (amx_int8) the products are summed straight into int32. Without (AVX2, or AVX-512
alone) pairs of products are first summed into saturating int16 (vpmaddubsw): 2 x 255 x 127 overflows,
2 x 255 x 64 (7-bit weights, onnxruntime's reduce_range) does not. Measured on an AMD EPYC with AVX2 and
no VNNI: a 256 x 64 MatMul in full range is off by 13% (relative L2), in reduced range by 1.1%. On ARM
the dot-product extension (asimddp: sdot/udot) sums into int32; without it we do not rely on the kernel
and reduce the range too (onnxruntime advises full range on ARM; 7 bits cost little). Where the flags
cannot be read, reduced is the choice that is right everywhere.
"""

from __future__ import annotations

from pathlib import Path

INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp")  # int8 products summed into int32


def cpu_flags(cpuinfo: str) -> tuple[str, set[str]]:
    """The architecture ("x86", "arm" or "" when unknown) and the feature flags of the first processor
    listed in /proc/cpuinfo text ("flags" on x86, "Features" on ARM)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features"):
            return ("x86" if key == "flags" else "arm"), set(value.split())
    return "", set()


def full_int8_range(cpuinfo: str) -> tuple[bool, str]:
    """Whether full-range int8 weights are exact on the CPU this cpuinfo text describes, and why."""
    arch, flags = cpu_flags(cpuinfo)
    found = [flag for flag in INT8_DOT_FLAGS if flag in flags]
    if found:
        return True, f"this CPU has {found[0]}"
    if arch == "x86":
        best = "avx512 only" if "avx512bw" in flags else "avx2 only" if "avx2" in flags else "no avx2"
        return False, f"this CPU has no VNNI/AMX ({best})"
    if arch == "arm":
        return False, "this ARM CPU has no dot-product extension (asimddp)"
    return False, "this CPU's features are unknown"


def read_cpuinfo() -> str:
    """/proc/cpuinfo, or "" where there is none (macOS, Windows)."""
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""
