"""4-bit blocks with a data-aware low-rank correction (factorize/int4.py): our packing run by ONNX Runtime's
own MatMulNBits kernel computes exactly the weight we predict with, the correction lowers the output error
the calibration data shows, and `--quantize int4` writes a smaller model that keeps its bound."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import MODELS, make_model, run
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from onnx_lowrank.factorize.int4 import BLOCK_SIZES, BlocksDecomposer, rounded
from onnx_lowrank.factorize.rewrite import build
from onnx_lowrank.graph.adapters import ADAPTERS
from onnx_lowrank.graph.imported import import_graph
from onnx_lowrank.graph.layers import find_layers
from onnx_lowrank.graph.splice import Factorization
from onnx_lowrank.observe.calibration import load_calibration
from onnx_lowrank.observe.statistics import unit_statistics


def matmul(width: int, out: int, seed: int = 0, bias: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    initializers = {"w": rng.standard_normal((width, out)).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h" if bias else "y"], name="mm")]
    if bias:
        initializers["b"] = rng.standard_normal(out).astype(np.float32)
        nodes.append(helper.make_node("Add", ["h", "b"], ["y"], name="add"))
    return make_model(nodes, {"x": ["N", 6, width]}, ["y"], initializers)


def correlated(width: int, count: int = 64, seed: int = 1) -> np.ndarray:
    """Inputs with a few strong directions: where a data-aware correction pays."""
    rng = np.random.default_rng(seed)
    scales = np.geomspace(10.0, 0.01, width)
    return (rng.standard_normal((count, 6, width)) * scales + 0.3).astype(np.float32)


def decomposer(model: onnx.ModelProto, data: np.ndarray | None, block: int = 32):
    (unit,) = find_layers(import_graph(model).graph, model, ADAPTERS).units
    moments = None
    if data is not None:
        samples = load_calibration({"x": data}, model)
        (moments,) = unit_statistics(model, [unit], samples, list(range(len(samples))), "cpu", batch_size=8)
    return unit, BlocksDecomposer(unit.layers[0], moments, (block,))


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 5), st.integers(1, 40), st.sampled_from(BLOCK_SIZES), st.integers(0, 2**16))
def test_rounding_keeps_every_weight_within_half_a_step(blocks, out, block, seed):
    width = blocks * block - (seed % block)  # a last block padded
    matrix = np.random.default_rng(seed).standard_normal((out, width)) * 3
    plain = rounded(matrix, block, shrinks=(1.0,))
    assert plain.codes.max() <= 15 and plain.dequantized().shape == matrix.shape
    step = np.repeat(plain.scales, block, axis=1)[:, :width]
    assert np.all(np.abs(plain.dequantized() - matrix) <= step / 2 + 1e-9)
    # the range search weighs columns by their importance, and no block loses more than plain rounding
    importance = np.random.default_rng(seed + 1).exponential(size=width)
    searched = rounded(matrix, block, importance=importance)

    def block_losses(found):
        lost = np.zeros((out, blocks * block))
        lost[:, :width] = importance * (found.dequantized() - matrix) ** 2
        return lost.reshape(out, blocks, block).sum(axis=2)

    assert np.all(block_losses(searched) <= block_losses(rounded(matrix, block, importance=importance,
                                                                 shrinks=(1.0,))) + 1e-12)


@pytest.mark.parametrize("rank", [0, 8])
@pytest.mark.parametrize("bias", [False, True])
def test_matmulnbits_computes_the_weight_we_predict_with(rank, bias):
    """ONNX Runtime's MatMulNBits on our packed codes, scales and zero points (K = 200: a padded last
    block), plus the correction: the chain equals x @ (Q + A B)^T, bias included."""
    model = matmul(200, 150, bias=bias)
    unit, found = decomposer(model, correlated(200), block=64)
    fit = found.factorize((rank, 64))
    compressed = build(model, ADAPTERS, {unit.key: fit})
    onnx.checker.check_model(compressed, full_check=True)
    assert any(node.op_type == "MatMulNBits" and node.domain == "com.microsoft" for node in compressed.graph.node)
    x = correlated(200, count=1)
    expected = x @ fit.same_op_weight()[0].T.astype(np.float32)
    if bias:
        expected = expected + numpy_bias(model) + (0 if fit.bias_shift is None else fit.bias_shift[0])
    np.testing.assert_allclose(run(compressed, {"x": x})[0], expected, rtol=2e-4, atol=2e-4)


def numpy_bias(model: onnx.ModelProto) -> np.ndarray:
    return next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "b")


def test_the_correction_lowers_the_output_error_the_data_shows():
    """The predicted errors are the relative output errors on the calibration data, falling with the rank;
    measured in ONNX Runtime on the same data they agree."""
    model = matmul(512, 320)
    data = correlated(512)
    unit, found = decomposer(model, data)
    errors = {option.config[0]: option.error for option in found.options()}
    assert list(errors) == [0, 8, 16]  # ranks up to a sixteenth of the smaller side
    assert errors[16] < errors[8] < errors[0]
    assert errors[16] < 0.7 * errors[0]  # a few strong input directions: the correction takes much of it (GPTQ: 0.62)
    dense = run(model, {"x": data})[0]
    for rank, error in errors.items():
        compressed = build(model, ADAPTERS, {unit.key: found.factorize((rank, 32))})
        after = run(compressed, {"x": data})[0]
        measured = float(np.sum((after - dense) ** 2) / np.sum(dense**2))
        assert measured == pytest.approx(error, rel=0.5)


def test_an_option_costs_its_bytes():
    model = matmul(256, 192)
    _, found = decomposer(model, None)
    fit = found.factorize((8, 32))
    packed = sum(array.nbytes for array in fit.blocks.packed()) + 2 * 8 * (256 + 192)  # float16 factors
    assert fit.nbytes == packed
    assert fit.params == -(-packed // 4)  # float32 weights: bytes in units of four
    with pytest.raises(ValueError, match="correction rank"):
        found.factorize((5, 32))


def test_quantize_int4_writes_a_smaller_model_within_its_bound(tmp_path: Path):
    out, report_path = tmp_path / "m.onnx", tmp_path / "r.json"
    done = subprocess.run(
        [sys.executable, "-m", "onnx_lowrank", "compress", str(MODELS / "minilm_l2.onnx"), "-o", str(out),
         "--calib", str(MODELS / "minilm_sentences.npz"), "--metric", "cosine", "--tolerance", "0.02",
         "--quantize", "int4", "--objective", "size", "--report", str(report_path), "--quiet"],
        capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(report_path.read_text())
    assert report["validation"]["passed"] and report["validation"]["value"] <= 0.02
    assert report["bytes_after"] < 0.2 * report["bytes_before"]  # 16.1%: tables and MatMuls int4
    quantized = [layer for layer in report["layers"] if layer["method"] == "int4"]
    assert quantized and all(layer["quantization"]["bits"] == 4 and layer["quantization"]["block"] in (32, 64, 128)
                             for layer in quantized)
    assert all(layer["bytes_after"] < layer["bytes_before"] / 4 for layer in quantized)  # 4-bit and a little more
    assert all(layer["bytes_before"] == 4 * layer["params_before"] for layer in report["layers"])
    written = onnx.load(str(out))
    assert any(node.op_type == "MatMulNBits" for node in written.graph.node)
    assert {entry.domain for entry in written.opset_import} >= {"", "com.microsoft"}
    assert not [note for note in report["notes"] if "accuracy_level" in note]  # --objective size: not tried


def test_int8_activations_are_kept_only_where_validated_and_faster():
    """Under the balanced objective MatMulNBits' accuracy_level 4 is tried on the written model: kept only
    when it validates and runs faster, and the notes say which (on the 4-bit nodes: an int8-dyn layer the
    gate chose runs at level 4 anyway); the report's bytes are the file's."""
    import onnx_lowrank
    from onnx_lowrank.graph.model_io import model_stats

    written, report = onnx_lowrank.compress(onnx.load(MODELS / "minilm_l2.onnx"), calibration=MODELS / "minilm_sentences.npz",
                                            metric="cosine", tolerance=0.02, quantize="int4", batch_size=32)
    nbits = [{attribute.name: attribute.i for attribute in node.attribute} for node in written.graph.node
             if node.op_type == "MatMulNBits"]
    notes = [note for note in report.notes if "accuracy_level" in note]
    if not nbits:
        assert not notes  # the balanced gate kept no block layer (timings on a loaded machine): nothing to try
        return
    (note,) = notes
    dynamic = sum(layer.method == "int8-dyn" for layer in report.layers)
    assert sum(attributes.get("accuracy_level") == 4 for attributes in nbits) >= dynamic
    levels = {attributes.get("accuracy_level", 0) for attributes in nbits if attributes["bits"] == 4}
    if levels:
        assert (levels == {4}) == ("as fast as with float activations" in note)
        assert levels in ({0}, {4}) and ("activations kept float" in note) == (levels == {0})
    assert report.validation is not None and report.validation.passed
    assert report.bytes_after == model_stats(written).bytes


def test_accuracy_level_is_set_on_every_matmulnbits_and_nothing_else():
    from onnx_lowrank.quantize.accuracy_level import quantized_matmuls, with_accuracy_level

    model = matmul(256, 192)
    unit, found = decomposer(model, None)
    compressed = build(model, ADAPTERS, {unit.key: found.factorize((8, 32))})
    variant = with_accuracy_level(compressed)
    assert quantized_matmuls(variant) == 1 and quantized_matmuls(model) == 0
    (node,) = [node for node in variant.graph.node if node.op_type == "MatMulNBits"]
    assert {a.name: a for a in node.attribute}["accuracy_level"].i == 4
    # its float16 scales become float32 (ONNX Runtime's level 4 misreads scales that are not an initializer)
    casts = [n for n in compressed.graph.node if n.op_type == "Cast"]
    assert [n.op_type for n in variant.graph.node if n.op_type != "Cast"] == [
        n.op_type for n in compressed.graph.node if n.op_type != "Cast"]
    assert len([n for n in variant.graph.node if n.op_type == "Cast"]) == len(casts) - 1
    scales = {t.name: t for t in variant.graph.initializer}[node.input[2]]
    assert scales.data_type == onnx.TensorProto.FLOAT
    assert len(variant.graph.initializer) == len(compressed.graph.initializer)  # the float16 copy is gone
    x = correlated(256, count=2)
    exact = run(compressed, {"x": x})[0]
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        session = ort.InferenceSession(variant.SerializeToString(), options, providers=["CPUExecutionProvider"])
        assert np.linalg.norm(session.run(None, {"x": x})[0] - exact) < 0.05 * np.linalg.norm(exact)


@pytest.mark.parametrize("arguments, words", [
    (["--quantize", "int4", "--block-size", "48"], ("block size", "48")),
    (["--block-size", "32"], ("--block-size", "int4")),
])
def test_block_size_mistakes_are_one_line(tmp_path: Path, arguments, words):
    done = subprocess.run([sys.executable, "-m", "onnx_lowrank", "compress", str(MODELS / "minilm_l2.onnx"),
                           "-o", str(tmp_path / "m.onnx"), "--target-params", "0.5", *arguments],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and all(word in done.stderr for word in words)
    assert not (tmp_path / "m.onnx").exists()


def lookup(rows: int = 400, width: int = 128, seed: int = 0) -> onnx.ModelProto:
    table = np.random.default_rng(seed).standard_normal((rows, width)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["y"], name="embed", axis=0)], "lookup",
        [helper.make_tensor_value_info("idx", onnx.TensorProto.INT64, ["N", 5])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 5, width])],
        [onnx.numpy_helper.from_array(table, "table")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def skewed_indices(rows: int, count: int = 64, seed: int = 2) -> np.ndarray:
    """Lookups that favour the first rows (Zipf-like), as token ids do."""
    rng = np.random.default_rng(seed)
    return np.minimum(rng.zipf(1.3, size=(count, 5)) - 1, rows - 1).astype(np.int64)


def table_fit(model: onnx.ModelProto, feed: dict, rank: int):
    """The model's table unit (its tied unit, if any), its statistics from `feed`, its 4-bit fit at block 32
    and `rank` (block 32 offers ranks 0 and 8, the correction lowering the error), and the model rebuilt with it."""
    from onnx_lowrank.factorize.int4 import TableBlocksDecomposer

    units = find_layers(import_graph(model).graph, model, ADAPTERS).units
    (unit,) = [unit for unit in units if unit.tied] or [unit for unit in units if unit.op == "Gather"]
    samples = load_calibration(feed, model)
    (statistics,) = unit_statistics(model, [unit], samples, list(range(len(samples))), "cpu", batch_size=8)
    found = TableBlocksDecomposer(unit.layers[0], statistics, (32,))
    errors = [option.error for option in found.options()]
    assert [option.config[0] for option in found.options()] == [0, 8] and errors[1] < errors[0]
    fit = found.factorize((rank, 32))
    compressed = build(model, ADAPTERS, {unit.key: fit})
    onnx.checker.check_model(compressed, full_check=True)
    return unit, statistics, fit, compressed


@pytest.mark.parametrize("rank", [0, 8])
def test_gather_block_quantized_looks_up_the_table_we_predict_with(rank):
    """An embedding table as ONNX Runtime's GatherBlockQuantized on our packed rows (and the correction's
    Gather and MatMul): every looked-up row is the row of Q + A B."""
    model = lookup()
    _, _, fit, compressed = table_fit(model, {"idx": skewed_indices(400)}, rank)
    assert any(node.op_type == "GatherBlockQuantized" for node in compressed.graph.node)
    indices = np.array([[0, 1, 2, 399, 57]], dtype=np.int64)
    expected = fit.same_op_weight()[0].T[indices].astype(np.float32)
    np.testing.assert_allclose(run(compressed, {"idx": indices})[0], expected, rtol=1e-5, atol=1e-5)
    assert fit.nbytes < (0.17 if rank == 0 else 0.25) * 400 * 128 * 4  # of the float table, correction included


def test_target_bytes_keeps_that_share_of_the_file(tmp_path: Path):
    report_path = tmp_path / "r.json"
    done = subprocess.run(
        [sys.executable, "-m", "onnx_lowrank", "compress", str(MODELS / "minilm_l2.onnx"), "-o",
         str(tmp_path / "m.onnx"), "--target-bytes", "0.25", "--quantize", "int4", "--objective", "size",
         "--report", str(report_path), "--quiet"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(report_path.read_text())
    assert 0.2 * report["bytes_before"] < report["bytes_after"] <= 0.25 * report["bytes_before"]


@pytest.mark.parametrize("value, words", [
    ("0", ("target-bytes", "(0, 1]")), ("1.5", ("target-bytes", "(0, 1]")),
    ("0.003", ("--target-bytes 0.003", "outside its factorizable weights")),
])
def test_target_bytes_mistakes_are_one_line(tmp_path: Path, value, words):
    done = subprocess.run([sys.executable, "-m", "onnx_lowrank", "compress", str(MODELS / "minilm_l2.onnx"),
                           "-o", str(tmp_path / "m.onnx"), "--target-bytes", value],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and all(word in done.stderr for word in words), done.stderr


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha, beta, with_c", [(1.0, 1.0, True), (0.5, 2.0, True), (1.5, 1.0, False),
                                                  (1.0, 0.0, True)])
@pytest.mark.parametrize("rank", [0, 8])
def test_gemm_becomes_matmulnbits_with_its_alpha_beta_and_c(trans_b, alpha, beta, with_c, rank):
    """A Gemm x @ B' (transA 0, B' stored transposed or not): alpha * x @ (Q + A B)^T + beta * C."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((150, 200))  # out x in
    inputs = ["x", "b"] + (["c"] if with_c else [])
    initializers = {"b": (w if trans_b else w.T).astype(np.float32)}
    if with_c:
        initializers["c"] = rng.standard_normal(150).astype(np.float32)
    node = helper.make_node("Gemm", inputs, ["y"], name="gemm", alpha=alpha, beta=beta, transB=trans_b)
    model = make_model([node], {"x": [4, 200]}, ["y"], initializers)
    unit, found = decomposer(model, None, block=32)
    fit = found.factorize((rank, 32))
    compressed = build(model, ADAPTERS, {unit.key: fit})
    onnx.checker.check_model(compressed, full_check=True)
    x = rng.standard_normal((4, 200)).astype(np.float32)
    expected = alpha * x @ fit.same_op_weight()[0].T + (beta * initializers["c"] if with_c else 0.0)
    np.testing.assert_allclose(run(compressed, {"x": x})[0], expected, rtol=2e-4, atol=2e-4)


def test_eight_bit_blocks_run_exactly_and_lose_far_less():
    """The 8-bit weight-only options (MatMulNBits and GatherBlockQuantized at 8 bits) compute exactly the
    weight we predict with, at about twice the 4-bit bytes and a small fraction of their error."""
    from onnx_lowrank.factorize.int4 import INT8_WEIGHT_ONLY, BlocksDecomposer, TableBlocksDecomposer

    model = matmul(200, 150, bias=True)
    unit, four = decomposer(model, correlated(200), block=64)
    eight = BlocksDecomposer(unit.layers[0], None, (64,), INT8_WEIGHT_ONLY)
    assert [option.config for option in eight.options()] == [(0, 64)]
    fit = eight.factorize((0, 64))
    compressed = build(model, ADAPTERS, {unit.key: fit})
    onnx.checker.check_model(compressed, full_check=True)
    x = correlated(200, count=1)
    expected = x @ fit.same_op_weight()[0].T.astype(np.float32) + numpy_bias(model)
    np.testing.assert_allclose(run(compressed, {"x": x})[0], expected, rtol=2e-4, atol=2e-4)
    assert fit.scheme == {"bits": 8, "block": 64, "correction_rank": 0, "correction_bits": 0}
    assert 1.8 < fit.nbytes / four.factorize((0, 64)).nbytes < 2.2
    assert eight.options()[0].error < 0.02 * BlocksDecomposer(unit.layers[0], None, (64,)).options()[0].error

    table = lookup()
    (unit,) = find_layers(import_graph(table).graph, table, ADAPTERS).units
    rows = TableBlocksDecomposer(unit.layers[0], None, (32,), INT8_WEIGHT_ONLY).factorize((0, 32))
    indices = np.array([[0, 5, 399, 7, 7]], dtype=np.int64)
    looked_up = run(build(table, ADAPTERS, {unit.key: rows}), {"idx": indices})[0]
    np.testing.assert_allclose(looked_up, rows.same_op_weight()[0].T[indices], rtol=1e-5, atol=1e-5)


def tied_lm(rows: int = 300, width: int = 128, seed: int = 0) -> onnx.ModelProto:
    """input_ids -> table lookup -> x @ W -> logits = h @ table^T: one table, the lookup and the LM head."""
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((rows, width)).astype(np.float32)
    hidden = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["h0"], name="embed"),
         helper.make_node("MatMul", ["h0", "hidden"], ["h1"], name="mlp"),
         helper.make_node("Transpose", ["table"], ["table_t"], name="tie", perm=[1, 0]),
         helper.make_node("MatMul", ["h1", "table_t"], ["logits"], name="lm_head")], "tied",
        [helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["N", 5])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", 5, rows])],
        [onnx.numpy_helper.from_array(table, "table"), onnx.numpy_helper.from_array(hidden, "hidden")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("rank", [0, 8])
def test_a_tied_table_stays_one_stored_table_for_lookup_and_head(rank):
    """The lookup runs GatherBlockQuantized and the head MatMulNBits on the same stored blocks (one copy),
    and the correction's two factors are stored once; the logits are h @ (Q + A B)^T exactly."""
    from onnx_lowrank.factorize.int4 import table_blocks
    from onnx_lowrank.observe.statistics import Tied

    model = tied_lm()
    unit, tied, fit, compressed = table_fit(model, {"input_ids": skewed_indices(300)}, rank)
    assert isinstance(tied, Tied) and table_blocks(unit, tied, (32, 64, 96)) == [32, 64]
    ops = [node.op_type for node in compressed.graph.node]
    assert "GatherBlockQuantized" in ops and "MatMulNBits" in ops
    uint8 = [t for t in compressed.graph.initializer if t.data_type == onnx.TensorProto.UINT8]
    assert len(uint8) == 2  # the blocks and their zero points, once for both uses
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    assert sum(int(np.prod(t.dims)) for t in compressed.graph.initializer if t.data_type in floats
               and 300 in t.dims) == 300 * (rank + 128 // 32)  # scales, the correction's lookup factor: once
    indices = np.array([[0, 1, 2, 299, 57]], dtype=np.int64)
    approximation = fit.same_op_weight()[0].T  # (V, d): Q + A B
    hidden = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "hidden"))
    expected = (approximation[indices] @ hidden) @ approximation.T
    np.testing.assert_allclose(run(compressed, {"input_ids": indices})[0], expected, rtol=1e-4, atol=1e-3)

def test_compress_quantizes_a_tied_table_once_within_its_bound(tmp_path: Path):
    """End to end with --quantize int4: the tied unit is offered blocks, and the written model holds no
    float copy of the table."""
    import onnx_lowrank

    model = tied_lm()
    data = {"input_ids": skewed_indices(300, count=96)}
    new, report = onnx_lowrank.compress(model, calibration=data, quantize="int4", tolerance=0.05,
                                        metric="rel-l2", objective="size")
    row = next(layer for layer in report.layers if layer.node == "embed")
    assert row.nodes == ["embed", "lm_head"]
    assert row.quantization is not None and row.bytes_after < 0.3 * row.bytes_before
    floats = [t for t in new.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and 300 * 128 <= np.prod(t.dims)]
    assert not floats


def test_gptq_is_plain_rounding_without_correlations_and_beats_it_with_them():
    """GPTQ against uncorrelated inputs of equal power rounds each weight to nearest (nothing to push onto
    other columns); against correlated inputs its output error E||(W - Q) x||^2 is well below plain
    rounding's, and the blocks it writes run in MatMulNBits exactly as predicted."""
    from onnx_lowrank.factorize.gptq import inverse_cholesky
    from onnx_lowrank.factorize.int4 import rounded_gptq

    rng = np.random.default_rng(3)
    weight = rng.standard_normal((48, 200))
    plain = rounded(weight, 32, shrinks=(1.0,))
    alone = rounded_gptq(weight, 32, 4, inverse_cholesky(np.eye(200) * 2.0))
    np.testing.assert_array_equal(alone.codes, plain.codes)
    x = rng.standard_normal((2000, 12)) @ rng.standard_normal((12, 200)) + 0.1 * rng.standard_normal((2000, 200))
    second = x.T @ x / len(x)  # a few strong input directions
    found = rounded_gptq(weight, 32, 4, inverse_cholesky(second))

    def output_error(blocks):
        lost = weight - blocks.dequantized()
        return float(np.sum((lost @ second) * lost))

    assert output_error(found) < 0.6 * output_error(plain)
    assert found.codes.max() <= 15 and found.scales.dtype == np.float16


def test_model_parameters_count_four_bit_weights_as_weights():
    """The model table counts a 4-bit weight as one parameter (two a stored byte), not half of one."""
    from onnx_lowrank.graph.model_io import model_stats

    model = matmul(256, 192)
    unit, found = decomposer(model, None)
    compressed = build(model, ADAPTERS, {unit.key: found.factorize((0, 32))})
    blocks = 256 // 32
    assert model_stats(compressed).params == 256 * 192 + 192 * blocks + 192 * blocks  # weights, scales, zero points


def test_int4_with_a_cache_and_workers_writes_the_same_model(tmp_path: Path, monkeypatch):
    """--cache (statistics and sensitivities stored, then read back) and --jobs 2 (the menus fitted in worker
    processes, the pool's size threshold lowered for this small model) write the model an inline, uncached
    run writes."""
    import onnx_lowrank
    from onnx_lowrank.system import parallel

    model = tied_lm()
    data = {"input_ids": skewed_indices(300, count=96)}
    common = dict(calibration=data, quantize="int4", tolerance=0.05, metric="rel-l2", objective="size")
    plain, _ = onnx_lowrank.compress(model, **common)
    monkeypatch.setattr(parallel, "POOL_MIN_PARAMS", 0)
    for _ in range(2):  # the first fills the cache, the second reads it
        cached, report = onnx_lowrank.compress(model, cache=tmp_path / "cache", jobs=2, **common)
        assert cached.graph == plain.graph and report.validation.passed


def test_a_model_with_nothing_to_quantize_says_so_and_is_factorized_as_today():
    import onnx_lowrank

    rng = np.random.default_rng(0)
    kernel = (rng.standard_normal((16, 3)) @ rng.standard_normal((3, 72))).reshape(16, 8, 3, 3).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])
    model = make_model([node], {"x": [1, 8, 10, 10]}, ["y"], {"w": kernel})
    data = {"x": rng.standard_normal((40, 8, 10, 10)).astype(np.float32)}
    _, report = onnx_lowrank.compress(model, calibration=data, quantize="int4", tolerance=0.2, objective="size")
    _, plain = onnx_lowrank.compress(model, calibration=data, tolerance=0.2, objective="size")
    assert any("no layer takes 4- or 8-bit blocks" in note for note in report.notes)
    assert [(l.method, l.rank) for l in report.layers] == [(l.method, l.rank) for l in plain.layers]


def gemm(trans_b: int, alpha: float, beta: float, seed: int = 3) -> onnx.ModelProto:
    """y = alpha * x @ B' + beta * c, B' (200 x 150) stored transposed or not."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((150, 200))
    initializers = {"b": (w if trans_b else w.T).astype(np.float32), "c": rng.standard_normal(150).astype(np.float32)}
    node = helper.make_node("Gemm", ["x", "b", "c"], ["y"], name="gemm", alpha=alpha, beta=beta, transB=trans_b)
    return make_model([node], {"x": ["N", 200]}, ["y"], initializers)


def layer_statistics(model: onnx.ModelProto, feed: dict):
    (unit,) = find_layers(import_graph(model).graph, model, ADAPTERS).units
    samples = load_calibration(feed, model)
    (moments,) = unit_statistics(model, [unit], samples, list(range(len(samples))), "cpu", batch_size=8)
    return unit, moments


def chain_output(model: onnx.ModelProto, unit, fit, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What ONNX Runtime computes with the fit spliced in, and the same layer given the predicted weight."""
    compressed = build(model, ADAPTERS, {unit.key: fit})
    onnx.checker.check_model(compressed, full_check=True)
    assert any(node.op_type == "MatMulNBits" for node in compressed.graph.node)
    weight = fit.same_op_weight()
    same_op = build(model, ADAPTERS, {unit.key: Factorization("svd", 1, weight, np.eye(weight.shape[1])[None], 0.0,
                                                                fit.bias_shift)})
    return run(compressed, {"x": x})[0], run(same_op, {"x": x})[0]


@pytest.mark.parametrize("model", [matmul(200, 150, bias=True), gemm(1, 0.5, 2.0), gemm(0, 1.5, 1.0)],
                         ids=["matmul+bias", "gemm-transB", "gemm"])
def test_eight_bit_corrections_run_exactly_and_cost_fewer_bytes(model):
    """A correction in 8-bit blocks (config (rank, block, 8)): two MatMulNBits beside the 4-bit one compute
    exactly the weight predicted with, for fewer bytes than its float16 factors and no more error (A is
    refitted to the rounded B)."""
    feed = correlated(200)[:, 0] if model.graph.node[0].op_type == "Gemm" else correlated(200)
    unit, moments = layer_statistics(model, {"x": feed})
    found = BlocksDecomposer(unit.layers[0], moments, (32,))
    assert (8, 32, 8) in found.configs() and (0, 32, 8) not in found.configs()
    for rank in (8,):
        half, eight = found.factorize((rank, 32)), found.factorize((rank, 32, 8))
        assert eight.scheme == {"bits": 4, "block": 32, "correction_rank": rank, "correction_bits": 8}
        assert eight.nbytes == eight.blocks.nbytes + sum(blocks.nbytes for blocks in eight.correction_blocks)
        assert eight.nbytes < half.nbytes and eight.predicted_error <= 1.01 * half.predicted_error
        written, expected = chain_output(model, unit, eight, feed[:4])
        np.testing.assert_allclose(written, expected, rtol=3e-4, atol=3e-4)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("model", [matmul(512, 320, bias=True), gemm(1, 0.5, 2.0)], ids=["matmul+bias", "gemm"])
def test_svd_with_quantized_factors_runs_exactly_and_keeps_its_prediction(model, bits):
    """The SVD with both factors in blocks ("svd-int4", "svd-int8"): two MatMulNBits compute exactly the
    weight predicted with; its error falls with the rank and is no better on the calibration data than
    predicted; A refitted to the rounded B loses less than the SVD's two factors rounded as they are."""
    from onnx_lowrank.factorize.data_aware import OutputError
    from onnx_lowrank.factorize.quantized_svd import FactorsDecomposer

    width = model.graph.initializer[0].dims[0] if model.graph.node[0].op_type == "MatMul" else 200
    data = correlated(width)
    feed = data[:, 0] if model.graph.node[0].op_type == "Gemm" else data
    unit, moments = layer_statistics(model, {"x": feed})
    found = FactorsDecomposer(unit.layers[0], moments, (32,), bits)
    options = found.options()
    assert [option.method for option in options] == [f"svd-int{bits}"] * len(options) and options
    assert [option.error for option in options] == sorted((option.error for option in options), reverse=True)
    dense = run(model, {"x": feed})[0]
    error = OutputError(unit.layers[0], moments)
    for option in options:
        fit = found.factorize(option.config)
        assert fit.params == -(-fit.nbytes // 4) and fit.inner.bits == fit.outer.bits == bits
        written, expected = chain_output(model, unit, fit, feed)
        np.testing.assert_allclose(written, expected, rtol=3e-4, atol=3e-3)
        measured = float(np.sum((written - dense) ** 2) / np.sum(dense**2))
        assert measured <= 1.05 * option.error  # the prediction's shrunk statistics err on the safe side
        rank = option.config[0]
        u, s, vt = np.linalg.svd(unit.matrices[0].astype(np.float64), full_matrices=False)
        basis, left = rounded(fit.inner.dequantized(), 32, bits), rounded(u[:, :rank] * s[:rank], 16, bits)
        unrefitted = error((rounded(left.dequantized(), 16, bits).dequantized() @ basis.dequantized())[None])
        assert option.error < unrefitted


def test_tile_multiples_read_a_block_options_rank_not_its_block_or_bits():
    """--objective balanced keeps ranks that are multiples of the provider's tile: a block option's rank is
    its correction's (or its factors'), not its block size or its correction's bits."""
    from onnx_lowrank.factorize.contracts import Option
    from onnx_lowrank.factorize.menu import rank_multiple

    tiles = rank_multiple(16)
    assert tiles(Option("int4", (16, 32, 8), 1, 0.1)) and tiles(Option("int4", (0, 128), 1, 0.1))
    assert not tiles(Option("int4", (8, 32), 1, 0.1)) and tiles(Option("svd-int4", (48, 32), 1, 0.1))
    assert tiles(Option("tucker2", (16, 32), 1, 0.1)) and not tiles(Option("tucker2", (16, 24), 1, 0.1))


@pytest.mark.parametrize("width, out, bias", [(512, 320, True), (256, 384, False)])
def test_int8_dynamic_runs_int8_activations_within_its_prediction(width, out, bias):
    """int8-dyn (int8 dynamic: 8-bit blocks, activations rounded to int8 per block at run time by
    MatMulNBits' accuracy_level 4) needs the input statistics to predict what its activations lose: its
    measured error is above int8-wo's (the activations' share), within its prediction; its scales are
    float32 initializers (no Cast: ONNX Runtime 1.32 reads level 4's scales wrong through one), so it costs
    int8-wo's bytes and two more per scale."""
    from onnx_lowrank.factorize.int4 import INT8_DYNAMIC, INT8_WEIGHT_ONLY

    model = matmul(width, out, bias=bias)
    rng = np.random.default_rng(5)
    data = (rng.standard_normal((64, 6, width)) * np.geomspace(3, 0.3, width)
            + rng.standard_normal(width) * 0.5).astype(np.float32)
    unit, moments = layer_statistics(model, {"x": data})
    with pytest.raises(ValueError, match="input statistics"):
        BlocksDecomposer(unit.layers[0], None, (32,), INT8_DYNAMIC)
    dense = run(model, {"x": data})[0]
    measured = {}
    for method in (INT8_WEIGHT_ONLY, INT8_DYNAMIC):
        fit = BlocksDecomposer(unit.layers[0], moments, (32,), method).factorize((0, 32))
        compressed = build(model, ADAPTERS, {unit.key: fit})
        onnx.checker.check_model(compressed, full_check=True)
        (node,) = [node for node in compressed.graph.node if node.op_type == "MatMulNBits"]
        levels = [attribute.i for attribute in node.attribute if attribute.name == "accuracy_level"]
        assert levels == ([4] if method == INT8_DYNAMIC else [])
        assert any(node.op_type == "Cast" for node in compressed.graph.node) == (method == INT8_WEIGHT_ONLY)
        after = run(compressed, {"x": data})[0]
        measured[method] = (fit, float(np.sum((after - dense) ** 2) / np.sum(dense**2)))
    (weight_only, kept), (dynamic, lost) = measured[INT8_WEIGHT_ONLY], measured[INT8_DYNAMIC]
    assert 1.5 * kept < lost <= dynamic.predicted_error
    assert dynamic.nbytes == weight_only.nbytes + 2 * weight_only.blocks.scales.size


def test_a_tables_correction_in_eight_bits_looks_up_what_we_predict_with():
    """A table's correction in 8 bits (not tied; ranks in whole blocks along r): A's rows looked up by
    GatherBlockQuantized, B^T in MatMulNBits, every looked-up row that of Q + A B as predicted, for fewer
    bytes than the float16 factors and no more error (B refitted to the rounded A). A tied table offers none."""
    from onnx_lowrank.factorize.int4 import TableBlocksDecomposer

    model = lookup(rows=600, width=256)
    (unit,) = find_layers(import_graph(model).graph, model, ADAPTERS).units
    samples = load_calibration({"idx": skewed_indices(600)}, model)
    (counts,) = unit_statistics(model, [unit], samples, list(range(len(samples))), "cpu", batch_size=8)
    found = TableBlocksDecomposer(unit.layers[0], counts, (32,))
    assert [config for config in found.configs() if len(config) == 3] == [(16, 32, 8)]  # not 8: half a block
    half, eight = found.factorize((16, 32)), found.factorize((16, 32, 8))
    assert eight.nbytes < half.nbytes and eight.predicted_error <= 1.01 * half.predicted_error
    compressed = build(model, ADAPTERS, {unit.key: eight})
    onnx.checker.check_model(compressed, full_check=True)
    assert [node.op_type for node in compressed.graph.node].count("GatherBlockQuantized") == 2
    indices = np.array([[0, 1, 2, 599, 57]], dtype=np.int64)
    expected = eight.same_op_weight()[0].T[indices].astype(np.float32)
    np.testing.assert_allclose(run(compressed, {"idx": indices})[0], expected, rtol=1e-4, atol=1e-4)
    tied = tied_configs(unit)
    assert (16, 32) in tied and all(len(config) == 2 for config in tied)


def tied_configs(unit) -> list[tuple[int, ...]]:
    """The configs a tied table's decomposer offers (a Tied statistic: the head's moments beside the counts)."""
    from onnx_lowrank.factorize.int4 import TableBlocksDecomposer
    from onnx_lowrank.observe.statistics import Counts, Moments, Tied

    width = unit.layers[0].weight.shape[1]
    moments = Moments.empty(1, width)
    moments.add(np.random.default_rng(0).standard_normal((1, 50, width)))
    statistics = Tied(Counts(np.ones(unit.layers[0].weight.shape[0])), moments)
    return TableBlocksDecomposer(unit.layers[0], statistics, (32,)).configs()
