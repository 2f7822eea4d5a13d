"""ONNX Runtime's graph fusions survive the rewrite: on real models, the fused nodes of the layers that were
not factorized are the same in ORT's optimized original and compressed graphs, and a graph that breaks a
fusion is caught (onnx_lowrank.check.fusion, with real ONNX Runtime sessions)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import make_model
from onnx import helper, numpy_helper

import onnx_lowrank
from onnx_lowrank.check.fusion import fused_as_given, fusion_check, optimized_ops
from onnx_lowrank.report import FusionChange

MODELS = Path(__file__).resolve().parent.parent / "models"
MINILM = MODELS / "minilm_l2.onnx"
DIGITS = MODELS / "digits_cnn.onnx"
LAYER0 = "/bert/encoder/layer.0"
LAYER1 = "/bert/encoder/layer.1"
# Q/K/V of block 0 (the attention inputs) and the FFN of block 1 (its output feeds BiasGelu and SkipLayerNorm)
MINILM_PARTIAL = {
    f"{LAYER0}/attention/self/query/MatMul": 32,
    f"{LAYER0}/attention/self/key/MatMul": 32,
    f"{LAYER0}/attention/self/value/MatMul": 32,
    f"{LAYER1}/intermediate/dense/MatMul": 64,
    f"{LAYER1}/output/dense/MatMul": 64,
}
DIGITS_PARTIAL = {"/5/Conv": 16, "/9/Gemm": 32}


def _compress(path: Path, ranks: dict, **options) -> tuple[onnx.ModelProto, onnx.ModelProto, set[str]]:
    original = onnx.load(str(path))
    compressed, report = onnx_lowrank.compress(original, ranks=ranks, method="svd", jobs=1, **options)
    factorized = {node for layer in report.layers for node in layer.nodes}
    assert factorized
    return original, compressed, factorized


@pytest.fixture(scope="module")
def minilm_partial():
    return _compress(MINILM, MINILM_PARTIAL)


@pytest.fixture(scope="module")
def minilm_full():  # every MatMul at full rank (the embedding tables are left out: their SVD is slow)
    return _compress(MINILM, {"*": "full"}, allow_larger=True, ops=("MatMul",))


@pytest.fixture(scope="module")
def digits_partial():
    return _compress(DIGITS, DIGITS_PARTIAL)


@pytest.fixture(scope="module")
def digits_full():
    return _compress(DIGITS, {"*": "full"}, allow_larger=True)


def test_optimized_ops_counts_fused_nodes():
    model = onnx.load(str(DIGITS))
    ops = optimized_ops(model, level="extended")
    assert isinstance(ops, Counter)
    # three Conv+Relu and one Gemm+Relu become fused contrib ops; the last Gemm stays
    assert ops["com.microsoft:FusedConv"] == 3 and ops["com.microsoft:FusedGemm"] == 1 and ops["Gemm"] == 1
    assert "Relu" not in ops
    assert optimized_ops(model, level="basic")["Relu"] == 4  # no fusions at the basic level


@pytest.mark.parametrize("case", ["minilm_partial", "minilm_full"])
@pytest.mark.parametrize("level", ["extended", "all"])
def test_minilm_keeps_its_fusions(case, level, request):
    """The export declares no intermediate shapes; the compressed model is written without them too, and
    ONNX Runtime fuses it as it fuses the original as given."""
    original, compressed, factorized = request.getfixturevalue(case)
    assert not original.graph.value_info and not compressed.graph.value_info
    result = fusion_check(original, compressed, factorized, level=level, as_given=True)
    json.dumps(result.to_dict())  # the report carries it
    fused = result.original
    # what ORT fuses in this BERT export: Q.K^T with its scale, Add+Gelu; its residual Add+LayerNorm only
    # with shapes (test_shapes_alone_change_what_onnxruntime_fuses)
    assert fused["com.microsoft:FusedMatMul"] == 2 and fused["com.microsoft:BiasGelu"] == 2
    assert "com.microsoft:SkipLayerNormalization" not in fused
    assert result.unfactorized_match, result
    # the chains keep their neighbours' fusions too: nothing is lost anywhere
    assert result.compressed == result.original and not result.lost and not result.gained


def test_shapes_alone_change_what_onnxruntime_fuses(minilm_partial):
    """With the shapes ONNX inference finds, ONNX Runtime fuses each FFN's residual Add + LayerNormalization
    (SkipLayerNormalization), which it does not in the model as exported: written with them, the compressed
    model would run other kernels than the original (on MiniLM-L6, 4% slower on a Xeon)."""
    original, compressed, factorized = minilm_partial
    with_shapes = fusion_check(original, compressed, factorized, level="all")  # the shape-inferred original
    assert with_shapes.original["com.microsoft:SkipLayerNormalization"] == 2
    shaped, found = fused_as_given(original, build_with_shapes(compressed), factorized)
    assert not shaped.graph.value_info and found.unfactorized_match, found


def build_with_shapes(compressed: onnx.ModelProto) -> onnx.ModelProto:
    """The compressed model with every intermediate shape (what the rewrite builds before writing)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(compressed)
    copy.graph.value_info.extend(onnx.shape_inference.infer_shapes(compressed).graph.value_info)
    assert copy.graph.value_info
    return copy


@pytest.mark.parametrize("case", ["digits_partial", "digits_full"])
def test_digits_keeps_conv_and_gemm_activation_fusions(case, request):
    original, compressed, factorized = request.getfixturevalue(case)
    result = fusion_check(original, compressed, factorized, level="extended")
    assert result.original["com.microsoft:FusedConv+Relu"] == 3
    assert result.original["com.microsoft:FusedGemm+Relu"] == 1
    assert result.unfactorized_match, result
    # a factorized layer's activation fuses with the chain's last node: only the chains' heads are added
    assert not result.lost
    assert result.compressed["com.microsoft:FusedConv+Relu"] == 3
    assert result.compressed["com.microsoft:FusedGemm+Relu"] == 1
    if case == "digits_partial":
        assert result.unfactorized["original"] == {"Gemm": 1, "com.microsoft:FusedConv+Relu": 2}


@pytest.mark.parametrize("case", ["digits_partial", "digits_full"])
def test_digits_unfactorized_layers_match_with_all_optimizations(case, request):
    """ORT_ENABLE_ALL adds the NCHWc layout (convolutions with fused activations); whether a factorized
    conv keeps it depends on its rank, the unfactorized ones must keep theirs."""
    original, compressed, factorized = request.getfixturevalue(case)
    result = fusion_check(original, compressed, factorized, level="all")
    assert result.unfactorized_match, result
    assert all(entry.layer is not None for entry in result.lost + result.gained)


def _insert_reshape(model: onnx.ModelProto, tensor: str) -> onnx.ModelProto:
    """A same-shape Reshape right after `tensor`'s producer: exact, but ORT does not remove it (an Identity
    it would), so whatever fusion spanned that edge no longer applies."""
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    graph = broken.graph
    position = next(i for i, node in enumerate(graph.node) if tensor in node.output)
    producer = graph.node[position]
    producer.output[list(producer.output).index(tensor)] = tensor + ".pre"
    shapes = {v.name: v.type.tensor_type.shape for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    rank = len(shapes[tensor].dim)
    graph.initializer.append(numpy_helper.from_array(np.zeros(rank, np.int64), tensor + ".same_shape"))
    graph.node.insert(position + 1, helper.make_node(
        "Reshape", [tensor + ".pre", tensor + ".same_shape"], [tensor], name=tensor + ".inserted"
    ))
    onnx.checker.check_model(broken)
    return broken


def test_broken_fusion_of_an_unfactorized_layer_is_caught(digits_partial):
    original, compressed, factorized = digits_partial
    assert "/0/Conv" not in factorized
    broken = _insert_reshape(compressed, "/0/Conv_output_0")  # between the first Conv and its Relu
    for level in ("extended", "all"):
        result = fusion_check(original, broken, factorized, level=level)
        assert not result.unfactorized_match
        lost = [entry for entry in result.lost if entry.layer is None]
        assert len(lost) == 1 and lost[0].kind.endswith("Conv+Relu"), result
        assert lost[0].original - lost[0].compressed == 1


def test_broken_fusion_of_a_factorized_layer_is_attributed_to_it(digits_partial):
    original, compressed, factorized = digits_partial
    broken = _insert_reshape(compressed, "/5/Conv_output_0")  # between the chain's last Conv and the Relu
    result = fusion_check(original, broken, factorized, level="extended")
    assert result.unfactorized_match, result
    assert result.lost == [
        FusionChange(kind="com.microsoft:FusedConv+Relu", layer="/5/Conv", original=1, compressed=0)
    ]


def test_broken_bias_gelu_in_a_transformer_is_caught(minilm_partial):
    original, compressed, factorized = minilm_partial
    bias_add = f"{LAYER0}/intermediate/dense/Add_output_0"  # block 0's FFN is not factorized
    assert f"{LAYER0}/intermediate/dense/MatMul" not in factorized
    result = fusion_check(original, _insert_reshape(compressed, bias_add), factorized, level="extended")
    assert not result.unfactorized_match
    assert FusionChange(kind="com.microsoft:BiasGelu", layer=None, original=2, compressed=1) in result.lost


def test_an_identity_is_no_break():
    """ORT removes Identity nodes before it fuses: one between a Conv and its Relu costs nothing."""
    original = onnx.load(str(DIGITS))
    patched = onnx.ModelProto()
    patched.CopyFrom(original)
    graph = patched.graph
    position = next(i for i, node in enumerate(graph.node) if node.name == "/0/Conv")
    graph.node[position].output[0] = "conv0.pre"
    graph.node.insert(position + 1, helper.make_node("Identity", ["conv0.pre"], ["/0/Conv_output_0"]))
    result = fusion_check(original, patched, set(), level="extended")
    assert result.unfactorized_match and not result.lost and not result.gained


def test_unnamed_nodes_are_attributed_by_the_names_the_rewrite_gives_them():
    """Two unnamed MatMul+Add+Relu blocks (ORT: FusedGemm each); the first is factorized, as "MatMul_0"."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["m0"]),
        helper.make_node("Add", ["m0", "b0"], ["a0"]),
        helper.make_node("Relu", ["a0"], ["h"]),
        helper.make_node("MatMul", ["h", "w1"], ["m1"]),
        helper.make_node("Add", ["m1", "b1"], ["a1"]),
        helper.make_node("Relu", ["a1"], ["y"]),
    ]
    weights = {"w0": rng.standard_normal((64, 48)), "b0": rng.standard_normal(48),
               "w1": rng.standard_normal((48, 40)), "b1": rng.standard_normal(40)}
    original = make_model(nodes, {"x": [8, 64]}, ["y"], {k: v.astype(np.float32) for k, v in weights.items()})
    compressed, report = onnx_lowrank.compress(original, ranks={"w0": 8}, method="svd", jobs=1)
    factorized = {node for layer in report.layers for node in layer.nodes}
    assert factorized == {"MatMul_0"}
    result = fusion_check(original, compressed, factorized, level="extended")
    assert result.original == {"com.microsoft:FusedGemm+Relu": 2}
    assert result.unfactorized["original"] == {"com.microsoft:FusedGemm+Relu": 1}
    assert result.unfactorized_match and not result.lost and not result.gained, result
