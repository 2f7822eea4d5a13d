"""Full-rank rewrites of the PyTorch-exported layer tests that ship with the `onnx` package.

`onnx/backend/test/data/pytorch-converted/test_*/` holds a model.onnx plus one input/expected-output pair.
Every case whose model has a Conv, ConvTranspose, Gemm, MatMul or Gather node is compressed with ranks
{"*": "full"} and allow_larger=True and run in onnxruntime (CPU, graph optimizations off); the result must
reproduce the shipped expected output. The original is checked against the same output first, in its own
test, so a case whose original already disagrees is reported separately from a rewrite that is wrong.

These models are IR version 3 (initializers listed as graph inputs), opset 6 or 9. Two adaptations:
* test_Linear's Gemm is opset 6 (legacy `broadcast` attribute): onnxruntime has no kernel for it and
  onnx_lowrank deliberately skips pre-7 Gemm, so that case is upgraded to opset 7 with onnx's own version
  converter before use; a separate test checks that the as-shipped model is left alone with a reason.
* `test_full_rank_ir4_*` repeats the rewrite on the same model moved to IR 4 (initializers no longer graph
  inputs), so that the numerics of the rewrite are checked even where the IR-3 output cannot be produced.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper, version_converter

import onnx_lowrank

DATA = Path(onnx.__file__).resolve().parent / "backend" / "test" / "data" / "pytorch-converted"
LAYER_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Gather"}
RTOL = 1e-4  # and atol = RTOL * max|expected|

ort.set_default_logger_severity(3)  # the opset-6 models make onnxruntime warn on every session


def _cases() -> list[str]:
    if not DATA.is_dir():
        return []
    found = []
    for model_path in sorted(DATA.glob("test_*/model.onnx")):
        model = onnx.load(str(model_path))
        if any(node.op_type in LAYER_OPS for node in model.graph.node):
            found.append(model_path.parent.name)
    return found


CASES = _cases()
pytestmark = pytest.mark.skipif(not CASES, reason=f"onnx test data not found under {DATA}")


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _has_legacy_gemm(model: onnx.ModelProto) -> bool:
    return _opset(model) < 7 and any(node.op_type == "Gemm" for node in model.graph.node)


@cache
def _shipped(case: str) -> bytes:
    return (DATA / case / "model.onnx").read_bytes()


def model_for(case: str) -> onnx.ModelProto:
    """The case's model as used here: as shipped, except a pre-7 Gemm model is upgraded to opset 7."""
    model = onnx.load_from_string(_shipped(case))
    if _has_legacy_gemm(model):
        model = version_converter.convert_version(model, 7)
    return model


def to_ir4(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model at IR 4: initializers are no longer also listed as graph inputs."""
    moved = onnx.ModelProto()
    moved.CopyFrom(model)
    moved.ir_version = 4
    initializers = {t.name for t in moved.graph.initializer}
    inputs = [i for i in moved.graph.input if i.name not in initializers]
    del moved.graph.input[:]
    moved.graph.input.extend(inputs)
    onnx.checker.check_model(moved, full_check=True)
    return moved


@cache
def data(case: str) -> tuple[np.ndarray, np.ndarray]:
    folder = DATA / case / "test_data_set_0"
    return (
        numpy_helper.to_array(onnx.load_tensor(str(folder / "input_0.pb"))),
        numpy_helper.to_array(onnx.load_tensor(str(folder / "output_0.pb"))),
    )


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    initializers = {t.name for t in model.graph.initializer}
    (name,) = [i.name for i in model.graph.input if i.name not in initializers]
    return session.run(None, {name: x})[0]


def assert_matches(got: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert got.shape == expected.shape, f"{what}: shape {got.shape} != expected {expected.shape}"
    scale = float(np.abs(expected).max()) or 1.0
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=RTOL * scale, err_msg=what)


def check_report(case: str, report: onnx_lowrank.Report) -> None:
    # depthwise convs too: at full rank each channel's filter is its own rank-1 SVD (exact, if larger)
    assert report.layers, f"nothing was factorized; skipped: {report.skipped}"
    for layer in report.layers:
        assert layer.op in LAYER_OPS
        assert layer.predicted_error == pytest.approx(0.0, abs=1e-12), layer
        assert layer.rank >= 1 and layer.params_after > 0, layer


def test_cases_cover_the_layer_families():
    names = set(CASES)
    for expected in ("test_Linear", "test_Linear_no_bias", "test_Conv1d", "test_Conv2d", "test_Conv3d",
                     "test_ConvTranspose2d", "test_Conv2d_groups", "test_Conv1d_dilated", "test_Conv2d_depthwise",
                     "test_Embedding"):
        assert expected in names, f"{expected} not found among {sorted(names)}"
    assert len(CASES) >= 25


@pytest.mark.parametrize("case", CASES)
def test_original_matches_expected(case: str):
    x, expected = data(case)
    assert_matches(run(model_for(case), x), expected, f"original {case}")


@pytest.mark.parametrize("case", CASES)
def test_full_rank_rewrite_matches_expected(case: str):
    x, expected = data(case)
    model = model_for(case)
    before = model.SerializeToString()
    new, report = onnx_lowrank.compress(model, ranks={"*": "full"}, allow_larger=True)
    assert model.SerializeToString() == before, "compress modified its input"
    check_report(case, report)
    onnx.checker.check_model(new, full_check=True)
    assert_matches(run(new, x), expected, f"full-rank rewrite of {case}")


@pytest.mark.parametrize("case", CASES)
def test_full_rank_ir4_rewrite_matches_expected(case: str):
    x, expected = data(case)
    model = to_ir4(model_for(case))
    new, report = onnx_lowrank.compress(model, ranks={"*": "full"}, allow_larger=True)
    check_report(case, report)
    onnx.checker.check_model(new, full_check=True)
    assert_matches(run(new, x), expected, f"full-rank rewrite of {case} at IR 4")


def test_opset6_gemm_is_left_alone():
    """As shipped, test_Linear is a Gemm-6 with `broadcast`: skipped with a reason naming the opset."""
    model = onnx.load_from_string(_shipped("test_Linear"))
    assert _has_legacy_gemm(model)
    new, report = onnx_lowrank.compress(model, ranks={"*": "full"}, allow_larger=True)
    assert report.layers == []
    assert [entry.op for entry in report.skipped] == ["Gemm"]
    assert "opset" in report.skipped[0].reason
    assert new.SerializeToString() == model.SerializeToString()
