"""Models people ship beyond plain float32 graphs: control flow (If / Loop bodies) and float16 / bfloat16.

* Subgraphs: layers inside If / Loop bodies are factorized in place (tests/test_subgraphs.py has the
  mechanism); a weight read by the main graph and, from the outer scope, by both If branches is kept whole,
  once, with the reason; the result is valid and within the tolerance on both branches.
* float16: the real digits CNN converted to float16 (weights, inputs, outputs) compresses in compact mode:
  statistics in float64, factors stored in float16, validated in float16 by ONNX Runtime.
* bfloat16: factors are stored in bfloat16; ONNX Runtime's CPU provider has no bfloat16 MatMul or Conv, so
  validation there is refused with one line naming the problem rather than a crash.
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from conftest import run
from onnx import TensorProto, helper, numpy_helper

import onnx_lowrank

MODELS = Path(__file__).resolve().parents[1] / "models"


def low_rank(rng: np.random.Generator, rows: int, cols: int, rank: int = 3, noise: float = 0.02) -> np.ndarray:
    matrix = rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols)) / np.sqrt(cols)
    return (matrix + noise * rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)


# ---------------------------------------------------------------------------------------------- subgraphs


def control_flow_model() -> onnx.ModelProto:
    """x [4, 32], c bool -> MatMul(w_main) -> Relu -> h; If c: Gemm(h, w_body) + MatMul(h, w_shared)
    else: MatMul(h, w_shared) -> Loop (2 trips) of MatMul(state, w_loop) -> y [4, 32].

    w_main: only the main graph (factorizable). w_shared: read by a main-graph MatMul and, as an outer-scope
    reference, by both If branches. w_body: an initializer of the then-branch. w_loop: read in the Loop body.
    """
    rng = np.random.default_rng(11)
    f32 = TensorProto.FLOAT
    then_branch = helper.make_graph(
        [helper.make_node("Gemm", ["h", "w_body"], ["g"], name="then_gemm", transB=1),
         helper.make_node("MatMul", ["h", "w_shared"], ["s"], name="then_shared"),
         helper.make_node("Add", ["g", "s"], ["then_out"], name="then_add")],
        "then", [], [helper.make_tensor_value_info("then_out", f32, [4, 32])],
        [numpy_helper.from_array(low_rank(rng, 32, 32), "w_body")],
    )
    else_branch = helper.make_graph(
        [helper.make_node("MatMul", ["h", "w_shared"], ["else_out"], name="else_shared")],
        "else", [], [helper.make_tensor_value_info("else_out", f32, [4, 32])],
    )
    loop_body = helper.make_graph(
        [helper.make_node("MatMul", ["state", "w_loop"], ["mixed"], name="loop_matmul"),
         helper.make_node("Tanh", ["mixed"], ["state_out"], name="loop_tanh"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="loop_cond")],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("state", f32, [4, 32])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("state_out", f32, [4, 32])],
    )
    nodes = [
        helper.make_node("MatMul", ["x", "w_main"], ["a"], name="main_matmul"),
        helper.make_node("Relu", ["a"], ["h"], name="relu"),
        helper.make_node("MatMul", ["h", "w_shared"], ["side"], name="main_shared"),
        helper.make_node("If", ["c"], ["branched"], name="branch", then_branch=then_branch, else_branch=else_branch),
        helper.make_node("Add", ["branched", "side"], ["sum"], name="join"),
        helper.make_node("Loop", ["trips", "", "sum"], ["y"], name="loop", body=loop_body),
    ]
    weights = {
        "w_main": low_rank(rng, 32, 32).T.copy(),
        "w_shared": low_rank(rng, 32, 32).T.copy(),
        "w_loop": (0.5 * low_rank(rng, 32, 32)).T.copy(),
        "trips": np.array(2, np.int64),
    }
    graph = helper.make_graph(
        nodes, "control_flow",
        [helper.make_tensor_value_info("x", f32, [4, 32]), helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", f32, [4, 32])],
        [numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def control_flow_feeds(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((4, 32)).astype(np.float32), "c": np.array(index % 2 == 0)}
            for index in range(count)]


def _initializers(graph: onnx.GraphProto) -> list[str]:
    """Initializer names of the graph and all its subgraphs (onnx-graphsurgeon may move a constant read
    only in a body into that body), each as often as it is stored."""
    names = [t.name for t in graph.initializer]
    for node in graph.node:
        for attribute in node.attribute:
            for body in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                names += _initializers(body)
    return names


def test_layers_in_bodies_compress_and_a_weight_shared_across_scopes_is_kept_once():
    original = control_flow_model()
    model, report = onnx_lowrank.compress(original, calibration=control_flow_feeds(48, 1), tolerance=0.05,
                                          objective="size")
    onnx.checker.check_model(model, full_check=True)

    assert {layer.node for layer in report.layers} <= {"main_matmul", "then_gemm", "loop_matmul"}
    assert "then_gemm" in {layer.node for layer in report.layers}
    reasons = {skipped.node: skipped.reason for skipped in report.skipped}
    for user in ("main_shared", "then_shared", "else_shared"):
        assert "weight w_shared is shared by layers in the main graph and inside If 'branch'" in reasons[user]

    kept = _initializers(model.graph)
    assert kept.count("w_shared") == 1 and kept.count("trips") == 1, kept
    assert report.params_after < report.params_before
    assert report.validation.passed and report.validation.value <= 0.05
    for feed in control_flow_feeds(6, 99):  # both branches, on samples the tool never saw
        expected, got = run(original, feed)[0], run(model, feed)[0]
        assert np.linalg.norm(got - expected) <= 0.1 * np.linalg.norm(expected)


def test_outer_scope_weights_survive_weight_only_mode():
    """w_loop, read only by the Loop body from the outer scope, may be factorized there; w_shared stays."""
    original = control_flow_model()
    model, report = onnx_lowrank.compress(original, target_params=0.5, objective="size")
    onnx.checker.check_model(model, full_check=True)
    kept = _initializers(model.graph)
    assert kept.count("w_shared") == 1
    assert ("w_loop" in kept) != ("loop_matmul" in {layer.node for layer in report.layers})
    for feed in control_flow_feeds(2, 3):
        assert run(model, feed)[0].shape == (4, 32)


# ---------------------------------------------------------------------------------------------- dtypes


def to_dtype(model: onnx.ModelProto, elem_type: int) -> onnx.ModelProto:
    """The model with every float32 initializer, graph input and output in `elem_type` (no casts)."""
    dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    converted = onnx.ModelProto()
    converted.CopyFrom(model)
    for tensor in converted.graph.initializer:
        if tensor.data_type == TensorProto.FLOAT:
            value = numpy_helper.to_array(tensor).astype(dtype)
            tensor.CopyFrom(helper.make_tensor(tensor.name, elem_type, value.shape, value.tobytes(), raw=True))
    for value_info in (*converted.graph.input, *converted.graph.output):
        if value_info.type.tensor_type.elem_type == TensorProto.FLOAT:
            value_info.type.tensor_type.elem_type = elem_type
    del converted.graph.value_info[:]
    onnx.checker.check_model(converted, full_check=True)
    return converted


def test_float16_digits_compact_mode():
    original = to_dtype(onnx.load(str(MODELS / "digits_cnn.onnx")), TensorProto.FLOAT16)
    calib = {"image": np.load(MODELS / "digits_calib.npz")["image"].astype(np.float16)}
    model, report = onnx_lowrank.compress(original, calibration=calib, tolerance=0.03, objective="size",
                                          method="svd")
    onnx.checker.check_model(model, full_check=True)

    assert report.layers and report.params_after < 0.7 * report.params_before
    assert report.validation.passed and report.validation.value <= 0.03
    floats = [t for t in model.graph.initializer if t.data_type not in (TensorProto.INT64,)]
    assert {t.data_type for t in floats} == {TensorProto.FLOAT16}, "factors must stay in the model's dtype"

    unseen = np.load(MODELS / "digits_eval.npz")["image"].astype(np.float16)
    expected = run(original, {"image": unseen})[0].astype(np.float64)
    got = run(model, {"image": unseen})[0]
    assert got.dtype == np.float16
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) <= 0.045  # 1.5x the bound, unseen data


def bf16_matmul_model() -> onnx.ModelProto:
    rng = np.random.default_rng(4)
    weight = low_rank(rng, 48, 32).T.astype(ml_dtypes.bfloat16)
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    graph = helper.make_graph(
        [node], "bf16",
        [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["N", 32])],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, ["N", 48])],
        [helper.make_tensor("w", TensorProto.BFLOAT16, weight.shape, weight.view(np.uint16).tobytes(), raw=True)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_bfloat16_factors_stay_bfloat16():
    model, report = onnx_lowrank.compress(bf16_matmul_model(), ranks={"*": 3})
    onnx.checker.check_model(model, full_check=True)
    assert report.layers[0].rank == 3
    assert {t.data_type for t in model.graph.initializer} == {TensorProto.BFLOAT16}


def test_bfloat16_validation_on_cpu_is_refused_in_one_line():
    feeds = {"x": np.random.default_rng(0).standard_normal((32, 32)).astype(ml_dtypes.bfloat16)}
    with pytest.raises(onnx_lowrank.InputError, match=r"onnxruntime cannot run the input model: .*MatMul") as raised:
        onnx_lowrank.compress(bf16_matmul_model(), calibration=feeds, tolerance=0.05)
    assert "\n" not in str(raised.value)
