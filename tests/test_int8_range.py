"""The int8 weight range: which CPUs sum int8 products without saturating (onnx_lowrank.system.cpu_features, fed
/proc/cpuinfo text of both kinds), what "auto" picks on each, that a range asked for is honoured on any CPU
(the other kind of CPU simulated by forcing it), what the report says, and what saturation does to
products of extreme int8 codes in onnxruntime on the CPU running the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import make_model
from onnx import TensorProto, helper, numpy_helper

import onnx_lowrank
from onnx_lowrank.errors import InputError
from onnx_lowrank.quantize.int8 import int8_range_for, quantize_int8
from onnx_lowrank.system.cpu_features import full_int8_range, read_cpuinfo

DIGITS = Path(__file__).resolve().parents[1] / "models" / "digits_cnn.onnx"
FULL_RANGE_EXACT, THIS_CPU = full_int8_range(read_cpuinfo())

X86_BASE = "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht " \
           "syscall nx lm constant_tsc rep_good nopl pni pclmulqdq ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt aes " \
           "xsave avx f16c rdrand hypervisor lahf_lm"
AVX512 = "avx2 bmi1 bmi2 avx512f avx512dq avx512cd avx512bw avx512vl"


def x86(flags: str, cores: int = 2) -> str:
    """/proc/cpuinfo of an x86 CPU: one block per core, the flags on a "flags" line."""
    return "\n".join(f"processor\t: {core}\nvendor_id\t: GenuineIntel\nmodel name\t: test CPU\n"
                     f"flags\t\t: {X86_BASE} {flags}\nbogomips\t: 4000.00\n" for core in range(cores))


def arm(features: str) -> str:
    """/proc/cpuinfo of an ARM CPU: its flags on a "Features" line."""
    return f"processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: {features}\nCPU implementer\t: 0x41\n"


CPUS = {  # name: (cpuinfo text, full range exact, why)
    "x86 AVX2, no VNNI (AMD Zen 2)": (x86("avx2 bmi1 bmi2 sha_ni"), False, "this CPU has no VNNI/AMX (avx2 only)"),
    "x86 AVX-512, no VNNI (Skylake-SP)": (x86(AVX512), False, "this CPU has no VNNI/AMX (avx512 only)"),
    "x86 without AVX2": (x86(""), False, "this CPU has no VNNI/AMX (no avx2)"),
    "x86 AVX512-VNNI (Cascade Lake)": (x86(f"{AVX512} avx512_vnni"), True, "this CPU has avx512_vnni"),
    "x86 AVX-VNNI (Alder Lake)": (x86("avx2 avx_vnni"), True, "this CPU has avx_vnni"),
    "x86 AMX int8": (x86("avx2 amx_bf16 amx_tile amx_int8"), True, "this CPU has amx_int8"),
    "ARM dot product (Neoverse N1)": (arm("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid "
                                          "asimdrdm lrcpc dcpop asimddp ssbs"), True, "this CPU has asimddp"),
    "ARM, no dot product (Cortex-A72)": (arm("fp asimd evtstrm crc32 cpuid"), False,
                                         "this ARM CPU has no dot-product extension (asimddp)"),
    "no /proc/cpuinfo": ("", False, "this CPU's features are unknown"),
}


@pytest.mark.parametrize("name", CPUS)
def test_detection(name):
    text, exact, why = CPUS[name]
    assert full_int8_range(text) == (exact, why)
    assert int8_range_for("auto", text) == ("full" if exact else "reduced", f"auto: {why}")


@pytest.mark.parametrize("name", CPUS)
def test_a_range_asked_for_is_honoured(name):
    text, exact, why = CPUS[name]
    assert int8_range_for("reduced", text) == ("reduced", f"requested; {why}")
    chosen, reason = int8_range_for("full", text)
    assert chosen == "full" and reason.startswith(f"requested; {why}")
    assert ("can saturate" in reason) is not exact


def test_unknown_range_is_bad_input():
    with pytest.raises(InputError, match="unknown int8 range '7bit'; choose one of auto, full, reduced"):
        int8_range_for("7bit", "")


def test_flags_not_the_first_processors_are_ignored():
    """Only the first processor's flags count (every core of a machine reports the same)."""
    assert full_int8_range(x86("avx2", cores=1) + "\n" + x86("avx2 avx512_vnni", cores=1))[0] is False


@pytest.mark.parametrize("int8_range, largest", [("full", 127), ("reduced", 64)])
def test_forced_range_sets_the_weight_codes(int8_range, largest):
    """Both kinds of CPU simulated: the range asked for is what the weights get, dynamic (Gemm) and static
    (Conv) alike, on any CPU."""
    model = onnx.load(DIGITS)
    feeds = [{"image": np.random.default_rng(0).random((8, 1, 8, 8), np.float32)}]
    result = quantize_int8(model, feeds, int8_range=int8_range)
    assert result.info["nodes"] == {"Conv": 3, "Gemm": 2}
    assert result.info["range"] == int8_range and result.info["range_reason"].startswith("requested; ")
    weights = [numpy_helper.to_array(t) for t in result.model.graph.initializer
               if t.data_type == TensorProto.INT8 and len(t.dims) >= 2]
    assert len(weights) == 5
    assert max(int(np.abs(w.astype(np.int16)).max()) for w in weights) == largest


def extreme_products(**options) -> np.ndarray:
    """y = x @ w with x all ones (uint8 code 255) and w all +-1 (the largest weight codes): every pair of
    products summed in int16 overflows at full range (2 x 255 x 127 > 32767), not at 7 bits (2 x 255 x 64)."""
    weight = np.ones((256, 4), np.float32)
    weight[:, 1::2] = -1
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], {"x": [2, 256]}, ["y"],
                       {"w": weight})
    quantized = quantize_int8(model, **options).model
    assert "MatMul" not in {node.op_type for node in quantized.graph.node}  # quantized, one way or the other
    session = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": np.ones((2, 256), np.float32)})[0]


EXACT = np.tile(np.array([256, -256], np.float32), (2, 2))


def test_reduced_range_is_exact_on_every_cpu():
    np.testing.assert_array_equal(extreme_products(int8_range="reduced"), EXACT)


def test_weight_only_int8_is_exact_on_every_cpu():
    """MatMulNBits (8 bits, accuracy level 4) sums int8 x int8 without saturating, also without VNNI (AMD
    EPYC, AVX2): weight-only int8 has no range to reduce."""
    np.testing.assert_array_equal(extreme_products(weight_only=["mm"]), EXACT)


@pytest.mark.skipif(not FULL_RANGE_EXACT, reason=f"full-range int8 saturates here: {THIS_CPU}")
def test_full_range_is_exact_where_the_cpu_allows():
    np.testing.assert_array_equal(extreme_products(int8_range="full"), EXACT)


def test_auto_is_what_this_cpu_allows():
    assert quantize_int8(onnx.load(DIGITS), int8_range="auto").info["range"] == (
        "full" if FULL_RANGE_EXACT else "reduced")


@pytest.mark.parametrize("int8_range", ["auto", "full", "reduced"])
def test_report_says_which_range_and_why(int8_range):
    _, report = onnx_lowrank.compress(DIGITS, target_params=0.5, method="svd", jobs=1, quantize="int8",
                                      int8_range=int8_range)
    chosen, reason = int8_range_for(int8_range)
    assert report.quantization.range == chosen and report.quantization.range_reason == reason
    assert reason.startswith("auto: " if int8_range == "auto" else "requested; ")
    assert report.quantization.nodes["range"] == chosen
