"""Full-rank rewrites reproduce the original model in onnxruntime; planted ranks are exact; truncation shrinks.

Every test builds a tiny model in code with seeded random weights, compresses it with the public API,
runs the full ONNX checker on the result and compares both models in a real onnxruntime CPU session.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import onnx
import pytest
from conftest import (
    assert_close,
    assert_factorized,
    assert_same_outputs,
    compress_checked,
    make_model,
    one_node_model,
    op_counts,
    random_feeds,
    run,
)
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import onnx_lowrank

META = ("onnx_lowrank.source", "onnx_lowrank.method", "onnx_lowrank.rank")

seeds = st.integers(0, 2**16)
small = st.integers(1, 6)


def weights(seed: int, *shape: int, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def planted(seed: int, groups: int, out_dim: int, in_dim: int, rank: int) -> np.ndarray:
    """(groups, out, in) matrices of rank exactly `rank` each (before rounding to float32)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((groups, out_dim, rank)) @ rng.standard_normal((groups, rank, in_dim))


def initializer_types(model: onnx.ModelProto) -> dict[str, int]:
    return {t.name: t.data_type for t in model.graph.initializer}


# --------------------------------------------------------------------------------------------- Gemm

C_SHAPES = {"N": lambda m, n: (n,), "1N": lambda m, n: (1, n), "MN": lambda m, n: (m, n), "M1": lambda m, n: (m, 1),
            "1": lambda m, n: (1,), "11": lambda m, n: (1, 1), "scalar": lambda m, n: ()}


def gemm_model(seed, m, k, n, trans_a, trans_b, alpha, beta, c_kind, opset, const_side="B", c_input=False):
    rng = np.random.default_rng(seed)
    a_shape = (k, m) if trans_a else (m, k)
    b_shape = (n, k) if trans_b else (k, n)
    inits, graph_inputs = {}, {}
    if const_side == "B":
        graph_inputs["a"] = a_shape
        inits["b"] = rng.standard_normal(b_shape).astype(np.float32)
    else:
        inits["a"] = rng.standard_normal(a_shape).astype(np.float32)
        graph_inputs["b"] = b_shape
    node_inputs = ["a", "b"]
    if c_kind is not None:
        c_shape = C_SHAPES[c_kind](m, n)
        if c_input:
            graph_inputs["c"] = c_shape
        else:
            inits["c"] = np.asarray(rng.standard_normal(c_shape), dtype=np.float32)
        node_inputs.append("c")
    attrs = {"alpha": alpha, "beta": beta}
    if trans_a:
        attrs["transA"] = 1
    if trans_b:
        attrs["transB"] = 1
    return one_node_model("Gemm", node_inputs, graph_inputs, inits, attrs, opset=opset)


gemm_common = dict(
    m=small, k=small, n=small, trans_a=st.booleans(), trans_b=st.booleans(),
    alpha=st.sampled_from([1.0, 0.5, -2.0]), beta=st.sampled_from([1.0, 0.25, -1.5]), seed=seeds,
)


@settings(max_examples=120, deadline=None)
@given(c_kind=st.sampled_from([None, *C_SHAPES]), c_input=st.booleans(), **gemm_common)
def test_gemm_constant_b_opset13(m, k, n, trans_a, trans_b, alpha, beta, c_kind, c_input, seed):
    model = gemm_model(seed, m, k, n, trans_a, trans_b, alpha, beta, c_kind, 13, c_input=c_input)
    new, report = compress_checked(model)
    assert_factorized(report, model, new, "gemm", "Gemm")
    assert report.layers[0].rank == min(k, n)
    assert_same_outputs(model, new, seed=seed)


@settings(max_examples=80, deadline=None)
@given(c_kind=st.sampled_from([None, *C_SHAPES]), **gemm_common)
def test_gemm_constant_a_opset13(m, k, n, trans_a, trans_b, alpha, beta, c_kind, seed):
    model = gemm_model(seed, m, k, n, trans_a, trans_b, alpha, beta, c_kind, 13, const_side="A")
    new, report = compress_checked(model)
    assert_factorized(report, model, new, "gemm", "Gemm")
    assert report.layers[0].rank == min(m, k)
    assert_same_outputs(model, new, seed=seed)


@settings(max_examples=80, deadline=None)
@given(opset=st.sampled_from([9, 10]), c_kind=st.sampled_from(list(C_SHAPES)),
       const_side=st.sampled_from(["A", "B"]), **gemm_common)
def test_gemm_old_opsets_with_required_c(opset, m, k, n, trans_a, trans_b, alpha, beta, c_kind, const_side, seed):
    model = gemm_model(seed, m, k, n, trans_a, trans_b, alpha, beta, c_kind, opset, const_side=const_side)
    new, report = compress_checked(model)
    assert_factorized(report, model, new, "gemm", "Gemm")
    for node in new.graph.node:
        assert len(node.input) == 3, "Gemm before opset 11 needs C on every node"
    assert [o.version for o in new.opset_import] == [opset]
    assert_same_outputs(model, new, seed=seed)


# ------------------------------------------------------------------------------------------- MatMul

@settings(max_examples=60, deadline=None)
@given(batch=st.lists(st.integers(1, 3), max_size=2), m=small, k=small, n=small, extra=st.none() | st.integers(0, 9),
       key=st.sampled_from(["*", "w", "matmul"]), seed=seeds)
def test_matmul_constant_right(batch, m, k, n, extra, key, seed):
    """x @ W with x 2-D, 3-D and 4-D; "full" and any integer rank >= the full rank mean the same."""
    x_shape = (*batch, m, k)
    model = one_node_model("MatMul", ["x", "w"], {"x": x_shape}, {"w": weights(seed, k, n)})
    new, report = compress_checked(model, ranks={key: "full" if extra is None else min(k, n) + extra})
    assert_factorized(report, model, new, "matmul", "MatMul")
    assert report.layers[0].rank == min(k, n)
    assert report.layers[0].shape == [k, n]
    assert_same_outputs(model, new, seed=seed)


@settings(max_examples=50, deadline=None)
@given(batch=st.lists(st.integers(1, 3), max_size=2), m=small, k=small, n=small, seed=seeds)
def test_matmul_constant_left(batch, m, k, n, seed):
    """W @ x with x 2-D, 3-D and 4-D."""
    model = one_node_model("MatMul", ["w", "x"], {"x": (*batch, k, n)}, {"w": weights(seed, m, k)})
    new, report = compress_checked(model)
    assert_factorized(report, model, new, "matmul", "MatMul")
    assert report.layers[0].rank == min(m, k)
    assert_same_outputs(model, new, seed=seed)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("k", [1, 4])
def test_matmul_vector_activation(side, k):
    """A 1-D activation (x of shape (K,)) against a 2-D weight, on either side."""
    inputs = ["x", "w"] if side == "right" else ["w", "x"]
    shape = (k, 3) if side == "right" else (3, k)
    model = one_node_model("MatMul", inputs, {"x": (k,)}, {"w": weights(k, *shape)})
    new, report = compress_checked(model)
    assert_factorized(report, model, new, "matmul", "MatMul")
    assert_same_outputs(model, new)


# activation batch dims that broadcast against the weight's batch dims wb: matching, missing, all ones,
# an extra leading dim, fewer dims, a 1 where the weight has a size, a size where the weight has a 1
ACTIVATION_BATCHES = [
    lambda wb: wb,
    lambda wb: (),
    lambda wb: (1,) * len(wb),
    lambda wb: (2, *wb),
    lambda wb: wb[-1:],
    lambda wb: (*wb[:-1], 1),
    lambda wb: tuple(3 if d == 1 else d for d in wb),
]


@settings(max_examples=120, deadline=None)
@given(side=st.sampled_from(["right", "left"]), weight_batch=st.lists(st.integers(1, 3), min_size=1, max_size=2),
       activation=st.sampled_from(range(len(ACTIVATION_BATCHES))), m=small, k=small, n=small, seed=seeds)
def test_matmul_batched_constant_weight(side, weight_batch, activation, m, k, n, seed):
    """Constant weights (b, K, N) / (a, b, K, N) with matching and broadcasting activations."""
    x_batch = ACTIVATION_BATCHES[activation](tuple(weight_batch))
    if side == "right":
        w = weights(seed, *weight_batch, k, n)
        model = one_node_model("MatMul", ["x", "w"], {"x": (*x_batch, m, k)}, {"w": w})
    else:
        w = weights(seed, *weight_batch, m, k)
        model = one_node_model("MatMul", ["w", "x"], {"x": (*x_batch, k, n)}, {"w": w})
    new, report = compress_checked(model)
    assert_factorized(report, model, new, "matmul", "MatMul")
    layer = report.layers[0]
    assert layer.shape == list(w.shape)
    assert layer.rank == (min(k, n) if side == "right" else min(m, k))
    assert layer.params_before == w.size
    assert_same_outputs(model, new, seed=seed)


def _factorized_or_skipped(model, new, report, node):
    """Either rewrite is acceptable for an activation the chain cannot serve, but it must stay exact."""
    if report.layers:
        assert_factorized(report, model, new, node, "MatMul")
    else:
        assert [s.node for s in report.skipped] == [node] and report.skipped[0].reason
    assert_same_outputs(model, new)


@pytest.mark.parametrize("side", ["right", "left"])
def test_matmul_batched_weight_with_vector_activation(side):
    """x (K,) @ W (b, K, N) -> (b, N) and W (b, M, K) @ x (K,) -> (b, M): legal ONNX, must stay exact
    (or be left alone): the middle tensor of a naive chain loses the vector's promoted axis."""
    shape = (2, 4, 3) if side == "right" else (2, 3, 4)
    inputs = ["x", "w"] if side == "right" else ["w", "x"]
    model = one_node_model("MatMul", inputs, {"x": (4,)}, {"w": weights(7, *shape)})
    new, report = compress_checked(model)
    _factorized_or_skipped(model, new, report, "matmul")


def test_matmul_batched_weight_with_activation_of_unknown_rank():
    """The activation's rank is unknown to the tool (a Reshape to a runtime shape); at run time it is 1-D."""
    nodes = [helper.make_node("Reshape", ["x0", "shape"], ["x"], name="reshape"),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    graph = helper.make_graph(
        nodes, "test",
        [helper.make_tensor_value_info("x0", TensorProto.FLOAT, ["n"]),
         helper.make_tensor_value_info("shape", TensorProto.INT64, ["r"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b"])],
        [numpy_helper.from_array(weights(8, 2, 4, 3), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    new, report = compress_checked(model)
    feeds = {"x0": weights(9, 4), "shape": np.array([4], dtype=np.int64)}
    if not report.layers:
        assert report.skipped and report.skipped[0].node == "mm"
    assert_close(run(model, feeds), run(new, feeds))


@pytest.mark.parametrize("side", ["right", "left"])
def test_matmul_vector_weight_is_skipped(side):
    inputs = ["x", "w"] if side == "right" else ["w", "x"]
    x_shape = (3, 4) if side == "right" else (4, 3)
    model = one_node_model("MatMul", inputs, {"x": x_shape}, {"w": weights(1, 4)})
    new, report = compress_checked(model)
    assert report.layers == []
    assert [(s.node, s.op) for s in report.skipped] == [("matmul", "MatMul")]
    assert "vector" in report.skipped[0].reason
    assert_same_outputs(model, new)


def test_matmul_without_constant_is_skipped():
    model = one_node_model("MatMul", ["x", "z"], {"x": (3, 4), "z": (4, 5)})
    new, report = compress_checked(model)
    assert report.layers == [] and len(report.skipped) == 1
    assert_same_outputs(model, new)


# --------------------------------------------------------------------------------------------- Conv

AUTO_PADS = ["NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]


@st.composite
def conv_cases(draw, transpose: bool):
    dims = draw(st.integers(1, 3))
    kernel = [draw(st.integers(1, 3)) for _ in range(dims)]
    strides = [draw(st.integers(1, 2 if not transpose else 3)) for _ in range(dims)]
    dilations = [draw(st.integers(1, 2)) for _ in range(dims)]
    groups = draw(st.integers(1, 3))
    in_per_group = draw(st.integers(1, 3) if groups == 1 else st.integers(2, 3))  # grouped, never depthwise
    out_per_group = draw(st.integers(1, 4))
    auto_pad = draw(st.sampled_from(AUTO_PADS))
    if auto_pad.startswith("SAME"):
        dilations = [1] * dims  # onnxruntime's CPU kernels refuse dilations with SAME_* padding
    size_range = {1: (3, 8), 2: (3, 6), 3: (3, 4)}[dims]
    spatial = [draw(st.integers(*size_range)) for _ in range(dims)]
    attrs = {}
    if draw(st.booleans()):
        attrs["kernel_shape"] = kernel
    if strides != [1] * dims or draw(st.booleans()):
        attrs["strides"] = strides
    if dilations != [1] * dims or draw(st.booleans()):
        attrs["dilations"] = dilations
    if groups > 1 or draw(st.booleans()):
        attrs["group"] = groups
    if auto_pad != "NOTSET" or draw(st.booleans()):
        attrs["auto_pad"] = auto_pad
    if auto_pad == "NOTSET" and draw(st.booleans()):
        limit = [min(2, (k - 1) * d) for k, d in zip(kernel, dilations)]
        begin = [draw(st.integers(0, lim)) for lim in limit]
        end = [draw(st.integers(0, lim)) for lim in limit]
        attrs["pads"] = begin + end
    if transpose and auto_pad in ("NOTSET", "VALID") and draw(st.booleans()):
        attrs["output_padding"] = [draw(st.integers(0, s - 1)) for s in strides]  # onnxruntime: below the stride
    if not transpose:
        effective = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
        spatial = [max(s, e) for s, e in zip(spatial, effective)]  # VALID / no pads still leave an output
    return dict(dims=dims, kernel=kernel, groups=groups, in_per_group=in_per_group, out_per_group=out_per_group,
                spatial=spatial, attrs=attrs, bias=draw(st.booleans()), batch=draw(st.integers(1, 2)),
                seed=draw(seeds))


def conv_model(case, transpose: bool, weight=None, op_name=None):
    cin, cout = case["groups"] * case["in_per_group"], case["groups"] * case["out_per_group"]
    if weight is None:
        if transpose:
            shape = (cin, case["out_per_group"], *case["kernel"])
        else:
            shape = (cout, case["in_per_group"], *case["kernel"])
        weight = weights(case["seed"], *shape)
    inits = {"w": weight}
    node_inputs = ["x", "w"]
    if case["bias"]:
        inits["b"] = weights(case["seed"] + 1, cout)
        node_inputs.append("b")
    op = "ConvTranspose" if transpose else "Conv"
    return one_node_model(op, node_inputs, {"x": (case["batch"], cin, *case["spatial"])}, inits, case["attrs"],
                          name=op_name)


def expected_full_rank(case, transpose: bool) -> int:
    per_group_in = case["in_per_group"] * math.prod(case["kernel"])
    return min(case["out_per_group"], per_group_in)


@settings(max_examples=250, deadline=None)
@given(case=conv_cases(transpose=False))
def test_conv_full_rank(case):
    model = conv_model(case, transpose=False)
    new, report = compress_checked(model)
    assert_factorized(report, model, new, "conv", "Conv")
    layer = report.layers[0]
    assert layer.rank == expected_full_rank(case, False)
    per_group = case["out_per_group"] * case["in_per_group"] * math.prod(case["kernel"])
    assert layer.params_before == case["groups"] * per_group
    assert_same_outputs(model, new, seed=case["seed"])


@settings(max_examples=250, deadline=None)
@given(case=conv_cases(transpose=True))
def test_conv_transpose_full_rank(case):
    model = conv_model(case, transpose=True)
    new, report = compress_checked(model)
    assert_factorized(report, model, new, "convtranspose", "ConvTranspose")
    assert report.layers[0].rank == expected_full_rank(case, True)
    assert_same_outputs(model, new, seed=case["seed"])


@pytest.mark.parametrize(
    "dims, groups, strides, kernel, input_size, output_shape",
    [
        (1, 1, [2], [3], [5], [10]),
        (2, 2, [2, 3], [3, 2], [4, 3], [8, 9]),
        (2, 1, [2, 2], [2, 2], [3, 4], [7, 9]),
        (3, 1, [2, 1, 2], [2, 3, 1], [3, 3, 2], [6, 5, 4]),
    ],
)
def test_conv_transpose_output_shape(dims, groups, strides, kernel, input_size, output_shape):
    case = dict(dims=dims, kernel=kernel, groups=groups, in_per_group=2, out_per_group=3, spatial=input_size,
                attrs={"strides": strides, "output_shape": output_shape, "group": groups}, bias=True, batch=1,
                seed=dims)
    model = conv_model(case, transpose=True)
    new, report = compress_checked(model)
    assert_factorized(report, model, new, "convtranspose", "ConvTranspose")
    reference = assert_same_outputs(model, new)
    assert list(reference[0].shape[2:]) == output_shape


@pytest.mark.parametrize("op", ["Conv", "ConvTranspose"])
@pytest.mark.parametrize("multiplier", [1, 2])
def test_depthwise(op, multiplier):
    """A depthwise ConvTranspose is skipped (no channel rank); a depthwise Conv is a layer whose only
    shrinking decomposition is the spatial one, and it is exact at full rank like every other."""
    channels = 4
    shape = (channels * multiplier, 1, 3, 3) if op == "Conv" else (channels, multiplier, 3, 3)
    model = one_node_model(op, ["x", "w"], {"x": (1, channels, 5, 5)}, {"w": weights(3, *shape)},
                           {"group": channels})
    new, report = compress_checked(model)
    assert_same_outputs(model, new)
    if op == "ConvTranspose":
        assert report.layers == []
        assert len(report.skipped) == 1 and report.skipped[0].op == op
        assert "depthwise" in report.skipped[0].reason
        return
    if multiplier == 2:  # two filters per channel: a rank-1 SVD per channel shrinks it
        _, plain = onnx_lowrank.compress(model, target_params=0.9, method="svd", objective="size")
        assert [layer.method for layer in plain.layers] == ["svd"]
    else:  # one filter per channel has no channel rank to cut
        with pytest.raises(onnx_lowrank.InputError, match="below what the smallest rank everywhere keeps"):
            onnx_lowrank.compress(model, target_params=0.9, method="svd", objective="size")
        _, plain = onnx_lowrank.compress(model, energy=0.9, method="svd", objective="size")
        assert plain.layers == [] and "would not shrink it" in plain.skipped[0].reason
        # its kh x kw filter: kh x 1 then 1 x kw
        _, spatial = onnx_lowrank.compress(model, target_params=0.9, method="spatial", objective="size")
        assert [layer.method for layer in spatial.layers] == ["spatial"]


# --------------------------------------------------------------------------------- weight placement

def constant_node(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"{name}_const", value=numpy_helper.from_array(value, name))


def assert_chain_gone(new: onnx.ModelProto, ops=("Constant", "Identity", "Transpose")) -> None:
    left = [n.op_type for n in new.graph.node if n.op_type in ops]
    assert left == [], f"weight chain nodes left in the output: {left}"


@pytest.mark.parametrize("op", ["MatMul", "Gemm", "Conv"])
def test_weight_in_constant_node(op):
    if op == "Conv":
        w, x_shape, inputs = weights(0, 6, 3, 3, 3), (1, 3, 6, 6), ["x", "w"]
    elif op == "Gemm":
        w, x_shape, inputs = weights(0, 5, 4), (3, 5), ["x", "w"]
    else:
        w, x_shape, inputs = weights(0, 5, 4), (2, 3, 5), ["x", "w"]
    nodes = [constant_node("w", w), helper.make_node(op, inputs, ["y"], name="layer")]
    model = make_model(nodes, {"x": x_shape}, ["y"])
    new, report = compress_checked(model)
    assert_factorized(report, model, new, "layer", op)
    assert report.layers[0].weight == "w"
    assert_chain_gone(new)
    assert_same_outputs(model, new)


@pytest.mark.parametrize("op", ["MatMul", "Conv", "ConvTranspose"])
def test_weight_behind_identity(op):
    shapes = {"MatMul": ((6, 4), (3, 6)), "Conv": ((5, 2, 3, 3), (1, 2, 5, 5)),
              "ConvTranspose": ((2, 5, 3, 3), (1, 2, 4, 4))}
    w_shape, x_shape = shapes[op]
    nodes = [helper.make_node("Identity", ["w"], ["w_id"], name="id1"),
             helper.make_node("Identity", ["w_id"], ["w_id2"], name="id2"),
             helper.make_node(op, ["x", "w_id2"], ["y"], name="layer")]
    model = make_model(nodes, {"x": x_shape}, ["y"], {"w": weights(1, *w_shape)})
    new, report = compress_checked(model)
    assert_factorized(report, model, new, "layer", op)
    assert_chain_gone(new)
    assert "w" not in {t.name for t in new.graph.initializer}
    assert_same_outputs(model, new)


@pytest.mark.parametrize("side", ["right", "left"])
def test_matmul_weight_behind_transpose(side):
    """A (N, K) initializer transposed to (K, N) feeds x @ W; the mirror image for W @ x."""
    nodes = [helper.make_node("Transpose", ["w"], ["w_t"], name="tr", perm=[1, 0])]
    if side == "right":
        nodes.append(helper.make_node("MatMul", ["x", "w_t"], ["y"], name="mm"))
        model = make_model(nodes, {"x": (2, 3, 6)}, ["y"], {"w": weights(2, 4, 6)})
    else:
        nodes.append(helper.make_node("MatMul", ["w_t", "x"], ["y"], name="mm"))
        model = make_model(nodes, {"x": (6, 3)}, ["y"], {"w": weights(2, 6, 4)})
    new, report = compress_checked(model)
    assert_factorized(report, model, new, "mm", "MatMul")
    assert report.layers[0].shape == ([6, 4] if side == "right" else [4, 6])  # as the node sees it
    assert_chain_gone(new)
    assert_same_outputs(model, new)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_weight_behind_transpose(trans_b):
    # the initializer is stored the other way round; a Transpose (default perm) makes it what Gemm expects
    stored = (3, 5) if trans_b else (5, 3)  # Gemm sees (N, K) = (5, 3) with transB=1, (K, N) = (3, 5) without
    nodes = [helper.make_node("Transpose", ["w"], ["w_t"], name="tr"),
             helper.make_node("Gemm", ["x", "w_t", "c"], ["y"], name="gemm", transB=trans_b, alpha=0.7)]
    model = make_model(nodes, {"x": (4, 3)}, ["y"], {"w": weights(3, *stored), "c": weights(4, 5)})
    new, report = compress_checked(model)
    assert_factorized(report, model, new, "gemm", "Gemm")
    assert_chain_gone(new)
    assert_same_outputs(model, new)


HALF_TYPES = [("float16", TensorProto.FLOAT16), ("bfloat16", TensorProto.BFLOAT16)]


def _half_model(op: str, storage: str, seed: int = 0):
    np_type = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[storage]
    if op == "MatMul":
        w, x_shape = weights(seed, 8, 6).astype(np_type), (3, 8)
    elif op == "Gemm":
        w, x_shape = weights(seed, 6, 8).astype(np_type), (3, 8)
    elif op == "Conv":
        w, x_shape = weights(seed, 6, 4, 3, 3).astype(np_type), (1, 4, 6, 6)
    else:
        w, x_shape = weights(seed, 4, 3, 2, 2).astype(np_type), (1, 4, 4, 4)
    attrs = {"transB": 1} if op == "Gemm" else {}
    nodes = [helper.make_node("Cast", ["w"], ["w_f"], name="cast", to=TensorProto.FLOAT),
             helper.make_node(op, ["x", "w_f"], ["y"], name="layer", **attrs)]
    return make_model(nodes, {"x": x_shape}, ["y"], {"w": w})


def _assert_half_factors(new: onnx.ModelProto, storage_type: int) -> None:
    factors = {t.name: t.data_type for t in new.graph.initializer if "lowrank" in t.name}
    assert len(factors) == 2, factors
    assert set(factors.values()) == {storage_type}, factors
    casts = [n for n in new.graph.node if n.op_type == "Cast"]
    assert sorted(i for n in casts for i in n.input) == sorted(factors), "each factor is cast once"
    for cast in casts:
        assert helper.get_attribute_value(next(a for a in cast.attribute if a.name == "to")) == TensorProto.FLOAT
        assert {p.key for p in cast.metadata_props} >= set(META)
    assert "w" not in {t.name for t in new.graph.initializer}


@pytest.mark.parametrize("op", ["MatMul", "Gemm", "Conv", "ConvTranspose"])
@pytest.mark.parametrize("storage, storage_type", HALF_TYPES)
def test_weight_behind_cast(op, storage, storage_type):
    model = _half_model(op, storage)
    assert initializer_types(model)["w"] == storage_type
    new, report = compress_checked(model)
    assert_factorized(report, model, new, "layer", op)
    _assert_half_factors(new, storage_type)
    assert_same_outputs(model, new, dtype=storage)


@pytest.mark.parametrize("storage, storage_type", HALF_TYPES)
def test_weight_behind_identity_transpose_cast_chain(storage, storage_type):
    np_type = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[storage]
    nodes = [
        helper.make_node("Identity", ["w"], ["w1"], name="id"),
        helper.make_node("Transpose", ["w1"], ["w2"], name="tr", perm=[1, 0]),
        helper.make_node("Cast", ["w2"], ["w3"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["x", "w3"], ["y"], name="mm"),
    ]
    model = make_model(nodes, {"x": (2, 3, 7)}, ["y"], {"w": weights(5, 5, 7).astype(np_type)})
    new, report = compress_checked(model)
    assert_factorized(report, model, new, "mm", "MatMul")
    assert report.layers[0].shape == [7, 5]
    _assert_half_factors(new, storage_type)
    assert_chain_gone(new, ("Constant", "Identity", "Transpose"))
    assert_same_outputs(model, new, dtype=storage)


def test_constant_node_behind_cast_chain_in_conv():
    w = weights(6, 8, 3, 2, 2).astype(np.float16)
    nodes = [
        constant_node("w", w),
        helper.make_node("Identity", ["w"], ["w1"], name="id"),
        helper.make_node("Cast", ["w1"], ["w2"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Conv", ["x", "w2", "b"], ["y"], name="conv", pads=[1, 0, 0, 1], strides=[2, 1]),
    ]
    model = make_model(nodes, {"x": (2, 3, 5, 5)}, ["y"], {"b": weights(7, 8)})
    new, report = compress_checked(model)
    assert_factorized(report, model, new, "conv", "Conv")
    _assert_half_factors(new, TensorProto.FLOAT16)
    assert_chain_gone(new)
    assert_same_outputs(model, new, dtype="float16")


FLOAT16_SHAPES = {
    "MatMul": ((6, 5), (2, 3, 6), {}),
    "Gemm": ((5, 6), (3, 6), {"transB": 1, "alpha": 0.5}),
    "Conv": ((6, 4, 3, 3), (1, 4, 5, 5), {"pads": [1, 0, 1, 0]}),
    "ConvTranspose": ((4, 5, 2, 2), (1, 4, 3, 3), {"strides": [2, 2]}),
}


@pytest.mark.parametrize("op", list(FLOAT16_SHAPES))
def test_float16_model(op):
    """A model computing in float16 throughout: factors stored as FLOAT16, no Cast added."""
    w_shape, x_shape, attrs = FLOAT16_SHAPES[op]
    model = one_node_model(op, ["x", "w"], {"x": x_shape}, {"w": weights(12, *w_shape).astype(np.float16)}, attrs,
                           name="layer", elem_type=TensorProto.FLOAT16)
    new, report = compress_checked(model)
    assert_factorized(report, model, new, "layer", op)
    assert set(initializer_types(new).values()) == {TensorProto.FLOAT16}
    assert "Cast" not in op_counts(new)
    assert_same_outputs(model, new, dtype="float16")


@pytest.mark.parametrize("op", ["MatMul", "Gemm"])
def test_float64_model(op):
    w_shape, x_shape, attrs = FLOAT16_SHAPES[op]
    model = one_node_model(op, ["x", "w"], {"x": x_shape}, {"w": weights(13, *w_shape).astype(np.float64)}, attrs,
                           name="layer", elem_type=TensorProto.DOUBLE)
    new, report = compress_checked(model)
    assert_factorized(report, model, new, "layer", op)
    assert set(initializer_types(new).values()) == {TensorProto.DOUBLE}
    assert_same_outputs(model, new, dtype="float64")


def test_float32_weight_cast_down_to_float16():
    """float32 storage, float16 compute: factors stay FLOAT initializers, each Cast to FLOAT16."""
    nodes = [helper.make_node("Cast", ["w"], ["w16"], name="cast", to=TensorProto.FLOAT16),
             helper.make_node("MatMul", ["x", "w16"], ["y"], name="mm")]
    model = make_model(nodes, {"x": (3, 7)}, ["y"], {"w": weights(14, 7, 5)}, elem_type=TensorProto.FLOAT16)
    new, report = compress_checked(model)
    assert_factorized(report, model, new, "mm", "MatMul")
    factors = {t.name: t.data_type for t in new.graph.initializer}
    assert len(factors) == 2 and set(factors.values()) == {TensorProto.FLOAT}
    casts = [n for n in new.graph.node if n.op_type == "Cast"]
    assert len(casts) == 2 and sorted(n.input[0] for n in casts) == sorted(factors)
    assert all(helper.get_attribute_value(c.attribute[0]) == TensorProto.FLOAT16 for c in casts)
    assert_same_outputs(model, new, dtype="float16")


@pytest.mark.parametrize("op", ["MatMul", "Conv"])
def test_zero_and_rank_deficient_weights_at_full_rank(op):
    shape, x_shape = ((6, 4), (3, 6)) if op == "MatMul" else ((4, 3, 2, 2), (1, 3, 4, 4))
    for w in (np.zeros(shape, np.float32), planted(15, 1, shape[0], math.prod(shape[1:]), 1)[0].reshape(shape)):
        model = one_node_model(op, ["x", "w"], {"x": x_shape}, {"w": w.astype(np.float32)})
        new, report = compress_checked(model)
        assert_factorized(report, model, new, op.lower(), op)
        assert_same_outputs(model, new)


# ---------------------------------------------------------------------------------- shared weights

@pytest.mark.parametrize("through_identity", [False, True])
def test_shared_weight_factorized_once(through_identity):
    nodes = []
    second_weight = "w"
    if through_identity:
        nodes.append(helper.make_node("Identity", ["w"], ["w_id"], name="id"))
        second_weight = "w_id"
    nodes += [helper.make_node("MatMul", ["x1", "w"], ["y1"], name="mm1"),
              helper.make_node("MatMul", ["x2", second_weight], ["y2"], name="mm2")]
    model = make_model(nodes, {"x1": (3, 6), "x2": (2, 4, 6)}, ["y1", "y2"], {"w": weights(8, 6, 5)})
    new, report = compress_checked(model)
    assert len(report.layers) == 1
    assert sorted(report.layers[0].nodes) == ["mm1", "mm2"]
    assert op_counts(new)["MatMul"] == 4
    assert len(new.graph.initializer) == 2, [t.name for t in new.graph.initializer]
    assert report.params_after == 5 * (5 + 6)  # full rank 5 of the (out 5, in 6) map, stored once
    assert_same_outputs(model, new)


def test_weight_also_used_by_add_is_skipped():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Add", ["h", "w"], ["y"], name="add")]
    model = make_model(nodes, {"x": (5, 5)}, ["y"], {"w": weights(9, 5, 5)})
    new, report = compress_checked(model)
    assert report.layers == []
    assert [(s.node, s.op) for s in report.skipped] == [("mm", "MatMul")]
    assert "also used" in report.skipped[0].reason
    assert_same_outputs(model, new)


def test_shared_weight_matmul_and_gemm():
    """x1 @ W and Gemm(x2, W, C): the same map in the same orientation, one unit, one set of factors."""
    nodes = [helper.make_node("MatMul", ["x1", "w"], ["y1"], name="mm"),
             helper.make_node("Gemm", ["x2", "w", "c"], ["y2"], name="gemm", alpha=0.5, beta=2.0)]
    inits = {"w": weights(16, 6, 5), "c": weights(17, 5)}
    model = make_model(nodes, {"x1": (2, 3, 6), "x2": (4, 6)}, ["y1", "y2"], inits)
    new, report = compress_checked(model)
    assert len(report.layers) == 1 and sorted(report.layers[0].nodes) == ["gemm", "mm"]
    assert op_counts(new) == {"MatMul": 2, "Gemm": 2}
    assert sorted(t.name for t in new.graph.initializer if t.name != "c") == sorted(
        t.name for t in new.graph.initializer if "lowrank" in t.name)
    assert len(new.graph.initializer) == 3
    assert_same_outputs(model, new)


def test_shared_weight_seen_through_transpose():
    """MatMul(x, Transpose(W)) and Gemm(x, W, transB=1) apply the same map: both rewritten exactly."""
    nodes = [helper.make_node("Transpose", ["w"], ["w_t"], name="tr", perm=[1, 0]),
             helper.make_node("MatMul", ["x1", "w_t"], ["y1"], name="mm"),
             helper.make_node("Gemm", ["x2", "w"], ["y2"], name="gemm", transB=1)]
    model = make_model(nodes, {"x1": (3, 6), "x2": (4, 6)}, ["y1", "y2"], {"w": weights(18, 5, 6)})
    new, report = compress_checked(model)
    assert {node for layer in report.layers for node in layer.nodes} == {"mm", "gemm"}, report.skipped
    assert op_counts(new) == {"MatMul": 2, "Gemm": 2}
    assert_same_outputs(model, new)


def test_weight_used_in_two_orientations_is_skipped():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y1"], name="right"),
             helper.make_node("MatMul", ["w", "z"], ["y2"], name="left")]
    model = make_model(nodes, {"x": (3, 5), "z": (5, 2)}, ["y1", "y2"], {"w": weights(19, 5, 5)})
    new, report = compress_checked(model)
    assert report.layers == []
    assert sorted(s.node for s in report.skipped) == ["left", "right"]
    assert all("also used" in s.reason for s in report.skipped)
    assert_same_outputs(model, new)


def test_weight_that_is_a_graph_output_is_skipped():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
             helper.make_node("Identity", ["w"], ["w_out"], name="id")]
    model = make_model(nodes, {"x": (3, 4)}, ["y", "w_out"], {"w": weights(20, 4, 4)})
    new, report = compress_checked(model)
    assert report.layers == []
    assert "graph output" in report.skipped[0].reason
    assert_same_outputs(model, new)


# ------------------------------------------------------------------------------------ planted rank

def break_even(out_dim: int, in_dim: int) -> int:
    return -(-(out_dim * in_dim) // (out_dim + in_dim)) - 1


@settings(max_examples=60, deadline=None)
@given(k=st.integers(4, 12), n=st.integers(4, 12), batch=st.lists(st.integers(1, 3), max_size=2),
       side=st.sampled_from(["right", "left"]), data=st.data(), seed=seeds)
def test_planted_rank_matmul(k, n, batch, side, data, seed):
    rank = data.draw(st.integers(1, break_even(n, k)))
    matrix = planted(seed, 1, n, k, rank)[0].astype(np.float32)  # (out, in)
    if side == "right":
        model = one_node_model("MatMul", ["x", "w"], {"x": (*batch, 3, k)}, {"w": matrix.T.copy()})
    else:
        model = one_node_model("MatMul", ["w", "x"], {"x": (*batch, k, 3)}, {"w": matrix})
    new, report = compress_checked(model, ranks={"*": rank}, allow_larger=False)
    assert_factorized(report, model, new, "matmul", "MatMul")
    assert report.layers[0].rank == rank
    assert report.params_after < report.params_before
    assert report.layers[0].predicted_error < 1e-10
    assert_same_outputs(model, new, seed=seed)


@settings(max_examples=50, deadline=None)
@given(k=st.integers(4, 12), n=st.integers(4, 12), trans_b=st.booleans(), key=st.sampled_from(["gemm", "w", "*"]),
       data=st.data(), seed=seeds)
def test_planted_rank_gemm(k, n, trans_b, key, data, seed):
    rank = data.draw(st.integers(1, break_even(n, k)))
    matrix = planted(seed, 1, n, k, rank)[0].astype(np.float32)  # (N, K)
    w = matrix if trans_b else matrix.T.copy()
    model = one_node_model("Gemm", ["x", "w", "c"], {"x": (3, k)}, {"w": w, "c": weights(seed, n)},
                           {"transB": int(trans_b), "alpha": 1.5, "beta": 0.5})
    new, report = compress_checked(model, ranks={key: rank}, allow_larger=False)
    assert_factorized(report, model, new, "gemm", "Gemm")
    assert report.layers[0].rank == rank
    assert report.params_after < report.params_before
    assert_same_outputs(model, new, seed=seed)


@settings(max_examples=80, deadline=None)
@given(groups=st.integers(1, 3), in_per_group=st.integers(1, 3), out_per_group=st.integers(4, 8),
       kernel=st.lists(st.integers(1, 3), min_size=1, max_size=3), transpose=st.booleans(),
       data=st.data(), seed=seeds)
def test_planted_rank_conv(groups, in_per_group, out_per_group, kernel, transpose, data, seed):
    if groups > 1:
        in_per_group = max(in_per_group, 2)
    columns = in_per_group * math.prod(kernel)
    limit = break_even(out_per_group, columns)
    assume(limit >= 1)  # some rank must shrink the layer
    rank = data.draw(st.integers(1, limit))
    matrices = planted(seed, groups, out_per_group, columns, rank)  # (g, out/g, in/g * prod k), rank each
    if transpose:
        # W (Cin, Cout/g, *k): group block (in/g, out/g, k) from the (out/g, in/g, k) matrix
        blocks = matrices.reshape(groups, out_per_group, in_per_group, -1).transpose(0, 2, 1, 3)
        w = blocks.reshape(groups * in_per_group, out_per_group, *kernel)
    else:
        w = matrices.reshape(groups * out_per_group, in_per_group, *kernel)
    w = (w / np.abs(w).max()).astype(np.float32)
    case = dict(dims=len(kernel), kernel=kernel, groups=groups, in_per_group=in_per_group,
                out_per_group=out_per_group, spatial=[4] * len(kernel), attrs={"group": groups}, bias=True,
                batch=1, seed=seed)
    model = conv_model(case, transpose, weight=w, op_name="layer")
    new, report = compress_checked(model, ranks={"*": rank}, allow_larger=False)
    assert_factorized(report, model, new, "layer", "ConvTranspose" if transpose else "Conv")
    assert report.layers[0].rank == rank
    assert report.layers[0].params_after == groups * rank * (out_per_group + columns)
    assert report.params_after < report.params_before
    assert report.layers[0].predicted_error < 1e-10
    assert_same_outputs(model, new, seed=seed)


def test_planted_rank_below_break_even_refused_above():
    """With allow_larger=False a rank at or above break-even leaves the layer dense, with a reason."""
    w = weights(11, 6, 6)  # break-even 2
    model = one_node_model("MatMul", ["x", "w"], {"x": (2, 6)}, {"w": w})
    new, report = compress_checked(model, ranks={"*": 3}, allow_larger=False)
    assert report.layers == []
    assert "break-even" in report.skipped[0].reason
    assert_same_outputs(model, new)


# -------------------------------------------------------------------------------------- metadata

def multi_layer_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["x", "cw", "cb"], ["h1"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
        helper.make_node("ConvTranspose", ["h2", "tw"], ["h3"], name="deconv", strides=[2, 2], group=2),
        helper.make_node("Flatten", ["h3"], ["h4"], name="flatten"),
        helper.make_node("Gemm", ["h4", "gw", "gb"], ["h5"], name="", transB=1),  # unnamed
        helper.make_node("MatMul", ["h5", "mw"], ["y"], name="matmul"),
        helper.make_node("MatMul", ["mw2", "h5"], ["z"], name=""),  # unnamed, constant on the left
    ]
    inits = {
        "cw": weights(20, 6, 3, 3, 3), "cb": weights(21, 6),
        "tw": weights(22, 6, 2, 2, 2),
        "gw": weights(23, 10, 4 * 8 * 8), "gb": weights(24, 10),
        "mw": weights(25, 10, 7), "mw2": weights(26, 5, 2),
    }
    model = make_model(nodes, {"x": (2, 3, 4, 4)}, {"y": (2, 7), "z": (5, 10)}, inits)
    model.producer_name, model.producer_version, model.doc_string = "tests", "1.2.3", "a test model"
    model.model_version, model.domain = 42, "org.tests"
    helper.set_model_props(model, {"author": "tests", "purpose": "metadata"})
    model.graph.doc_string = "graph doc"
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("ranks", [{"*": "full"}, {"*": 2}, {"conv": 1, "matmul": "full", "*": 3}])
def test_metadata_and_model_fields(ranks):
    model = multi_layer_model()
    original_names = {n.name for n in model.graph.node}
    new, report = compress_checked(model, ranks=ranks)
    assert len(report.layers) == 5, report.skipped
    layers = {node: layer for layer in report.layers for node in layer.nodes}

    names = [n.name for n in new.graph.node]
    assert all(names) and len(set(names)) == len(names), names
    added = [n for n in new.graph.node if n.name not in original_names]
    assert len(added) == 2 * len(layers)
    sources = {}
    for node in added:
        props = {p.key: p.value for p in node.metadata_props}
        assert set(props) == set(META), (node.name, props)
        assert props["onnx_lowrank.source"] in layers, props
        layer = layers[props["onnx_lowrank.source"]]
        assert props["onnx_lowrank.method"] == layer.method == "svd"
        assert props["onnx_lowrank.rank"] == str(layer.rank)
        sources.setdefault(props["onnx_lowrank.source"], []).append(node.op_type)
    assert {s: sorted(ops) for s, ops in sources.items()} == {
        node: [layer.op] * 2 for node, layer in layers.items()
    }
    for node in new.graph.node:
        if node.name in original_names:
            assert not any(p.key.startswith("onnx_lowrank.") for p in node.metadata_props)

    assert list(new.graph.input) == list(model.graph.input)
    assert list(new.graph.output) == list(model.graph.output)
    assert list(new.opset_import) == list(model.opset_import)
    assert new.ir_version == model.ir_version
    assert list(new.metadata_props) == list(model.metadata_props)
    for field in ("producer_name", "producer_version", "doc_string", "model_version", "domain"):
        assert getattr(new, field) == getattr(model, field), field
    assert new.graph.name == model.graph.name
    assert new.graph.doc_string == model.graph.doc_string

    feeds = random_feeds(model)
    reference = run(model, feeds)
    got = run(new, feeds)
    if ranks == {"*": "full"}:
        assert_close(reference, got)
    else:
        assert [r.shape for r in reference] == [g.shape for g in got]


def test_untouched_nodes_keep_doc_string_and_metadata():
    """Nodes the rewrite does not touch come out as they went in, their own metadata_props included."""
    model = multi_layer_model()
    model.ir_version = 10  # node metadata_props are IR 10
    for node in model.graph.node:
        if node.op_type in ("Relu", "Flatten"):
            node.doc_string = f"{node.name} doc"
            entry = node.metadata_props.add()
            entry.key, entry.value = "exporter.scope", f"/model/{node.name}"
    onnx.checker.check_model(model, full_check=True)
    new, report = compress_checked(model)
    assert len(report.layers) == 5
    before = {n.name: n for n in model.graph.node if n.op_type in ("Relu", "Flatten")}
    after = {n.name: n for n in new.graph.node if n.op_type in ("Relu", "Flatten")}
    assert after == before
    assert_same_outputs(model, new)


def test_generated_names_never_collide():
    """Names the rewrite would pick are already taken by a node, a tensor and an initializer."""
    nodes = [
        helper.make_node("Relu", ["x"], ["mm.lowrank_mid"], name="mm.lowrank_a"),
        helper.make_node("MatMul", ["mm.lowrank_mid", "w"], ["h"], name="mm"),
        helper.make_node("Add", ["h", "w.lowrank_a"], ["mm.lowrank_b"], name="w.lowrank_b"),
        helper.make_node("MatMul", ["mm.lowrank_b", "w2"], ["y"], name="mm_2"),
    ]
    inits = {"w": weights(21, 4, 6), "w.lowrank_a": weights(22, 6), "w2": weights(23, 6, 3)}
    model = make_model(nodes, {"x": (2, 4)}, ["y"], inits)
    new, report = compress_checked(model)
    assert sorted(layer.node for layer in report.layers) == ["mm", "mm_2"]
    names = [n.name for n in new.graph.node]
    assert len(set(names)) == len(names)
    tensors = [o for n in new.graph.node for o in n.output] + [t.name for t in new.graph.initializer]
    assert len(set(tensors)) == len(tensors)
    assert "w.lowrank_a" in {t.name for t in new.graph.initializer}
    assert_same_outputs(model, new)


# ------------------------------------------------------------------------------------ truncation

@pytest.mark.parametrize(
    "op, w_shape, x_shape, rank",
    [
        ("MatMul", (16, 12), (4, 16), 3),
        ("Gemm", (16, 12), (4, 16), 1),
        ("Conv", (12, 4, 3, 3), (1, 4, 6, 6), 2),
        ("ConvTranspose", (8, 6, 3, 3), (1, 8, 4, 4), 2),
        ("Conv", (8, 3, 3), (2, 3, 9), 1),
    ],
)
def test_truncation_shrinks_and_runs(op, w_shape, x_shape, rank):
    model = one_node_model(op, ["x", "w"], {"x": x_shape}, {"w": weights(30, *w_shape)})
    new, report = compress_checked(model, ranks={"*": rank}, allow_larger=False)
    assert_factorized(report, model, new, op.lower(), op)
    layer = report.layers[0]
    assert layer.rank == rank
    assert layer.params_after < layer.params_before
    assert report.params_after < report.params_before
    assert 0 < layer.predicted_error < 1
    feeds = random_feeds(model)
    reference, got = run(model, feeds)[0], run(new, feeds)[0]
    assert got.shape == reference.shape and got.dtype == reference.dtype
    assert np.all(np.isfinite(got))
    assert np.max(np.abs(got - reference)) > 1e-3 * np.max(np.abs(reference)), "a truncated layer cannot be exact"
    # the factors are the best rank-r approximation: the output error is below the input-free worst case
    relative = np.linalg.norm(got - reference) / np.linalg.norm(reference)
    assert relative < 1.0
