"""int8 quantization (onnx_lowrank.quantize.int8) on the real models in models/, run in onnxruntime CPU sessions.

* minilm_l2.onnx: dynamic int8 for its MatMuls and embedding Gathers; embeddings compared with the fp32
  model's on the 600 calibration sentences.
* digits_cnn.onnx: static QDQ for its Convs (calibrated on digits_calib.npz), dynamic for its Gemms;
  accuracy on digits_eval.npz.
* small built models for the Gemm rewrite, Constant-node weights, nothing to quantize, and bad feeds.

Accuracy is asserted under each distinct int8 range among the one auto picks on the CPU running the tests,
"reduced" (right on every CPU) and "full" where this CPU sums int8 products without saturating: "auto" alone
where it resolves to "reduced" (a CPU without VNNI, whose "full" saturates), "auto" (= "full") and "reduced"
where it does not. tests/test_int8_range.py tests the choice itself.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import make_model
from onnx import TensorProto, helper, numpy_helper

import onnx_lowrank
from onnx_lowrank.cli.main import main
from onnx_lowrank.errors import InputError
from onnx_lowrank.observe.calibration import load_calibration
from onnx_lowrank.quantize import int8 as quantize
from onnx_lowrank.quantize.fallback import _excludable, _restore_float, _variant, chain_names, fallback
from onnx_lowrank.quantize.int8 import QUANTIZATIONS, int8_range_for, quantize_int8
from onnx_lowrank.system.cpu_features import full_int8_range, read_cpuinfo

MODELS = Path(__file__).resolve().parents[1] / "models"
MINILM = MODELS / "minilm_l2.onnx"
SENTENCES = MODELS / "minilm_sentences.npz"
DIGITS = MODELS / "digits_cnn.onnx"
DIGITS_CALIB = MODELS / "digits_calib.npz"
DIGITS_EVAL = MODELS / "digits_eval.npz"
DIGITS_LABELS = MODELS / "digits_eval_labels.npy"

FULL_RANGE_EXACT, THIS_CPU = full_int8_range(read_cpuinfo())
AUTO = int8_range_for("auto")[0]  # what "auto" resolves to here: "full" where exact, else "reduced"
assert AUTO == ("full" if FULL_RANGE_EXACT else "reduced")
# each distinct resolved range once: "auto" (whichever it picks), then "reduced" or "full" where auto took the
# other one and this CPU runs it exactly ("full" never runs where it saturates)
RANGES = [pytest.param("auto", id=f"auto={AUTO}")] + [
    range_ for range_ in ("reduced", "full") if range_ != AUTO and (range_ == "reduced" or FULL_RANGE_EXACT)]


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    """A CPU session with onnxruntime's default optimizations, as a user would run the model."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@cache
def sentences() -> dict[str, np.ndarray]:
    with np.load(SENTENCES) as data:
        return {name: data[name] for name in data.files}


@cache
def minilm_embeddings(count: int | None = None) -> np.ndarray:
    """The fp32 model's embeddings, computed once for the int8 ranges tested."""
    return embeddings(onnx.load(MINILM), count)


@cache
def quantized_minilm(int8_range: str) -> tuple[quantize.QuantizedModel, bool]:
    """quantize_int8 of MiniLM without feeds, made once for the tests that read it; and whether its input
    ModelProto serialized to the same bytes afterwards."""
    model = onnx.load(MINILM)
    before = model.SerializeToString()
    result = quantize_int8(model, int8_range=int8_range)
    return result, model.SerializeToString() == before


@cache
def factorized_minilm() -> tuple[onnx.ModelProto, int, np.ndarray]:
    """MiniLM with its embedding tables factorized (rank 96): the model, how many layers were factorized,
    and its fp32 embeddings of the first 200 sentences."""
    factorized, report = onnx_lowrank.compress(onnx.load(MINILM), ranks={"*": 96}, ops=("Gather",), method="svd",
                                               jobs=1)
    return factorized, len(report.layers), embeddings(factorized, 200)


def embeddings(model: onnx.ModelProto, count: int | None = None) -> np.ndarray:
    """sentence_embedding for the first `count` calibration sentences (all 600 by default)."""
    run = session(model)
    feeds = sentences()
    count = count or len(feeds["input_ids"])
    return np.concatenate([
        run.run(["sentence_embedding"], {name: array[start : start + 100] for name, array in feeds.items()})[0]
        for start in range(0, count, 100)
    ])


def cosine_error(model: onnx.ModelProto, start: int, stop: int):
    """1 - mean cosine of sentence_embedding against `model`'s on sentences [start, stop): what the
    fallback's check and select callables measure, in onnxruntime CPU sessions."""
    feeds = {name: array[start:stop] for name, array in sentences().items()}
    reference = session(model).run(["sentence_embedding"], feeds)[0]
    return lambda candidate: 1 - mean_cosine(session(candidate).run(["sentence_embedding"], feeds)[0], reference)


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def digits_feeds(model: onnx.ModelProto):
    """Calibration feeds through the project's loader, 64 samples a batch."""
    samples = load_calibration(DIGITS_CALIB, model)
    return (feed for _, feed in samples.batches(list(range(len(samples))), 64))


def digits_predictions(model: onnx.ModelProto) -> np.ndarray:
    with np.load(DIGITS_EVAL) as data:
        images = data["image"]
    return session(model).run(["logits"], {"image": images})[0].argmax(axis=1)


def float_weight_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer if t.data_type == TensorProto.FLOAT)


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {output: node for node in model.graph.node for output in node.output}


def test_quantizations_offered():
    assert QUANTIZATIONS == ("int8", "int4")  # int4: factorize/int4.py, options of the menus


@pytest.mark.parametrize("int8_range", RANGES)
def test_minilm_dynamic_int8_is_valid_smaller_and_close(int8_range):
    model = onnx.load(MINILM)
    before = model.SerializeToString()
    result, unchanged = quantized_minilm(int8_range)
    assert unchanged, "quantize_int8 modified its input model"

    onnx.checker.check_model(result.model, full_check=True)
    info = result.info
    assert info["nodes"] == {"Gather": 3, "MatMul": 12}  # 3 embedding tables, 6 MatMuls a layer
    assert info["float"] == {} and info["notes"] == []
    assert set(info["schemes"]) == {"Gather", "MatMul"} and "dynamic" in info["schemes"]["MatMul"]
    ops = {node.op_type for node in result.model.graph.node}
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops
    # measured 0.258: every weight matrix and embedding table is 8-bit, LayerNorm and biases stay float
    assert result.model.ByteSize() <= 0.30 * len(before)
    assert float_weight_bytes(result.model) <= 0.02 * float_weight_bytes(model)

    cosine = mean_cosine(embeddings(result.model), minilm_embeddings())
    assert cosine >= 0.98, f"mean cosine {cosine:.4f} against the fp32 model"


@pytest.mark.parametrize("int8_range", RANGES)
def test_digits_convs_get_qdq_and_keep_accuracy(int8_range):
    model = onnx.load(DIGITS)
    before = model.SerializeToString()
    result = quantize_int8(model, digits_feeds(model), int8_range=int8_range)
    assert model.SerializeToString() == before

    quantized = result.model
    onnx.checker.check_model(quantized, full_check=True)
    assert result.info["nodes"] == {"Conv": 3, "Gemm": 2}
    assert "static QDQ" in result.info["schemes"]["Conv"] and "dynamic" in result.info["schemes"]["Gemm"]
    made_by = producers(quantized)
    initializers = {t.name: t for t in quantized.graph.initializer}
    convs = [node for node in quantized.graph.node if node.op_type == "Conv"]
    assert len(convs) == 3
    for conv in convs:
        # DQ on the activation, the weight and the bias; Q on the output
        assert all(made_by[name].op_type == "DequantizeLinear" for name in conv.input), conv.name
        consumers = [node.op_type for node in quantized.graph.node if conv.output[0] in node.input]
        assert consumers == ["QuantizeLinear"], conv.name
        weight = made_by[conv.input[1]]
        assert initializers[weight.input[0]].data_type == TensorProto.INT8
        out_channels = initializers[weight.input[0]].dims[0]
        assert list(initializers[weight.input[1]].dims) == [out_channels]  # one scale per output channel
    assert quantized.ByteSize() <= 0.35 * len(before)  # measured 0.284

    labels = np.load(DIGITS_LABELS)
    fp32, int8 = digits_predictions(model), digits_predictions(quantized)
    assert (int8 == labels).mean() >= (fp32 == labels).mean() - 0.01
    assert (int8 == fp32).mean() >= 0.98


@pytest.mark.parametrize("int8_range", RANGES)
def test_convs_stay_float_without_feeds(int8_range):
    model = onnx.load(DIGITS)
    result = quantize_int8(model, int8_range=int8_range)
    assert result.info["nodes"] == {"Gemm": 2}
    assert result.info["float"] == {"Conv": 3}
    assert any("Conv" in note and "calibration" in note for note in result.info["notes"])
    onnx.checker.check_model(result.model, full_check=True)
    assert "DequantizeLinear" not in {node.op_type for node in result.model.graph.node}
    assert (digits_predictions(result.model) == digits_predictions(model)).mean() >= 0.98


def test_excluded_nodes_stay_float():
    model = onnx.load(DIGITS)
    result = quantize_int8(model, digits_feeds(model), exclude=["/11/Gemm", "/0/Conv"])
    assert result.info["nodes"] == {"Conv": 2, "Gemm": 1}
    assert result.info["float"] == {"Conv": 1, "Gemm": 1}
    # onnxruntime's dynamic pass turns every plain Gemm into MatMul + Add, the excluded one too: float still
    weights = {t.name: t.data_type for t in result.model.graph.initializer if t.name.startswith("11.weight")}
    assert weights and set(weights.values()) == {TensorProto.FLOAT}
    first = next(node for node in result.model.graph.node if node.name == "/0/Conv")
    assert first.input[1] == "0.weight"  # still the float initializer


def test_nothing_to_quantize():
    model = make_model(
        [helper.make_node("Add", ["x", "c"], ["s"], name="add"), helper.make_node("Relu", ["s"], ["y"], name="relu")],
        {"x": [2, 3]},
        ["y"],
        {"c": np.ones((2, 3), np.float32)},
    )
    result = quantize_int8(model, [{"x": np.ones((2, 3), np.float32)}])
    assert result.info["nodes"] == {} and result.info["float"] == {}
    assert result.info["notes"] and result.info["notes"][0].startswith("nothing to quantize")
    assert result.model.SerializeToString() == model.SerializeToString()
    assert result.model is not model


def test_float16_weights_stay_float():
    """onnxruntime's DynamicQuantizeLinear takes float32 only: a float16 MatMul is left as it is."""
    weight = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float16)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], {"x": [3, 8]}, ["y"],
                       {"w": weight}, elem_type=TensorProto.FLOAT16)
    result = quantize_int8(model)
    assert result.info["nodes"] == {} and result.info["float"] == {"MatMul": 1}
    assert "float32" in result.info["notes"][0]
    session(result.model).run(None, {"x": np.ones((3, 8), np.float16)})


@pytest.mark.parametrize("int8_range", RANGES)
def test_factorized_model_quantizes(int8_range):
    model = onnx.load(DIGITS)
    factorized, report = onnx_lowrank.compress(model, target_params=0.5, method="svd", jobs=1)
    assert report.layers, "nothing was factorized"
    before = factorized.SerializeToString()
    result = quantize_int8(factorized, digits_feeds(factorized), int8_range=int8_range)
    assert factorized.SerializeToString() == before

    onnx.checker.check_model(result.model, full_check=True)
    # every Conv and Gemm of the low-rank chains is quantized, none left float
    convs = sum(node.op_type == "Conv" for node in factorized.graph.node)
    gemms = sum(node.op_type == "Gemm" for node in factorized.graph.node)
    assert result.info["nodes"] == {"Conv": convs, "Gemm": gemms} and result.info["float"] == {}
    assert result.model.ByteSize() <= 0.35 * len(before)
    # measured on an AMD EPYC without VNNI: 0.986 reduced; 0.917 full, whose products saturate there
    assert (digits_predictions(result.model) == digits_predictions(factorized)).mean() >= 0.97


@pytest.mark.parametrize("int8_range", RANGES)
def test_factorized_embeddings_quantize(int8_range):
    """A factorized embedding (Gather of the narrow table, then MatMul) has both its factors quantized;
    the Gather's uint8 rows feed the MatMulInteger directly."""
    model = onnx.load(MINILM)
    factorized, layers, reference = factorized_minilm()
    assert layers == 2  # the word and position tables (token types: 2 x 384, nothing to gain)
    result = quantize_int8(factorized, int8_range=int8_range)
    onnx.checker.check_model(result.model, full_check=True)
    assert result.info["nodes"] == {"Gather": 3, "MatMul": 14} and result.info["float"] == {}
    made_by = producers(result.model)
    tables = {t.name: t for t in result.model.graph.initializer}
    for node in result.model.graph.node:
        if node.op_type == "Gather" and node.input[0] in tables:
            assert tables[node.input[0]].data_type == TensorProto.UINT8
    narrow = [node for node in result.model.graph.node
              if node.op_type == "MatMulInteger" and made_by[node.input[0]].op_type == "Gather"]
    assert len(narrow) == 2
    assert result.model.ByteSize() <= 0.25 * model.ByteSize()  # measured 0.229
    cosine = mean_cosine(embeddings(result.model, 200), reference)
    assert cosine >= 0.98, f"mean cosine {cosine:.4f} against the fp32 factorized model"


@pytest.mark.parametrize("int8_range", RANGES)
def test_gemm_forms_and_constant_weights(int8_range):
    """Gemm with alpha, beta, transB, no bias; a transA Gemm stays float; a Constant-node MatMul weight and
    an unnamed node are quantized too."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 32)).astype(np.float32)  # transB: [N, K]
    w2 = rng.standard_normal((16, 24)).astype(np.float32)
    w3 = rng.standard_normal((24, 8)).astype(np.float32)
    w4 = rng.standard_normal((24, 12)).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "c1"], ["h1"], name="gemm_t", alpha=0.5, beta=2.0, transB=1),
        helper.make_node("Gemm", ["h1", "w2"], ["h2"], name="gemm_plain"),
        helper.make_node("Gemm", ["h2", "w3"], ["h3"], name="gemm_ta", transA=1),
        helper.make_node("Constant", [], ["w4"], value=numpy_helper.from_array(w4)),
        helper.make_node("MatMul", ["h2", "w4"], ["y2"]),  # unnamed
    ]
    model = make_model(
        nodes,
        {"x": [24, 32]},
        ["h3", "y2"],
        {"w1": w1, "c1": rng.standard_normal(16).astype(np.float32), "w2": w2, "w3": w3},
    )
    before = model.SerializeToString()
    result = quantize_int8(model, int8_range=int8_range)
    assert model.SerializeToString() == before
    onnx.checker.check_model(result.model, full_check=True)
    assert result.info["nodes"] == {"Gemm": 2, "MatMul": 1}
    assert result.info["float"] == {"Gemm": 1}
    assert result.info["notes"] == ["1 Gemm node(s) stay float: Gemm with transA=1 has no MatMul form to quantize"]

    feeds = {"x": rng.standard_normal((24, 32)).astype(np.float32)}
    reference = session(model).run(None, feeds)
    for ref, got in zip(reference, session(result.model).run(None, feeds)):
        assert got.shape == ref.shape
        # measured on an AMD EPYC without VNNI (h3, y2): 0.013, 0.019 reduced; 0.052, 0.106 full (saturated)
        assert np.linalg.norm(got - ref) <= 0.03 * np.linalg.norm(ref)


def test_bad_feeds_are_input_errors():
    model = onnx.load(DIGITS)
    with pytest.raises(InputError, match="calibration feeds are empty"):
        quantize_int8(model, [])
    with pytest.raises(InputError, match="calibration feed 0 gives pixels; the model's inputs are image"):
        quantize_int8(model, [{"pixels": np.zeros((1, 1, 8, 8), np.float32)}])
    with pytest.raises(InputError, match="calibration feed 0 is a str"):
        quantize_int8(model, ["image"])


def test_quantizer_failure_is_ours_not_bad_input(monkeypatch):
    """onnxruntime's quantizer failing on a model that loads and runs is a RuntimeError (the command line's
    exit 3), in one line, not an InputError (exit 2)."""
    def broken(*args):
        raise ValueError("no quantizer for this\nsecond line")

    monkeypatch.setattr(quantize, "_dynamic", broken)
    with pytest.raises(RuntimeError, match="^onnxruntime's int8 quantizer failed: no quantizer for this$"):
        quantize_int8(onnx.load(DIGITS))


# ------------------------------------------------------------------------------- per-node float fallback
# minilm_l2 measured (onnxruntime 1.32, CPU) on the first 200 sentences: int8 of every node costs mean cosine
# 0.0022; with the token-type table (2 x 384, nearly free) float 0.0021, and with layer 0's FFN-output MatMul
# (the one reading the GELU activations) float as well, 0.0013.

FFN_OUT_0 = "/bert/encoder/layer.0/output/dense/MatMul"


def test_fallback_keeps_nothing_float_within_the_share():
    model = onnx.load(MINILM)
    check = cosine_error(model, 0, 200)
    result = fallback(model, 0.02, check)
    assert result.floats == () and result.weight_only == () and result.nodes == ()
    assert result.measured == 0 and result.checks == 1  # one quantization, one check: nothing measured
    assert result.error == result.error_all <= 0.02


def test_fallback_takes_the_costliest_nodes_out_until_within_the_share():
    model = onnx.load(MINILM)
    check, select = cosine_error(model, 0, 200), cosine_error(model, 500, 532)
    share = 0.0015
    result = fallback(model, share, check, select)
    assert result.error_all > share, "int8 of every node is already within the share: nothing to test"
    assert result.nodes and result.error <= share < result.error_all
    assert result.measured == 15  # every quantized MatMul and Gather
    assert FFN_OUT_0 in result.weight_only  # a MatMul: weight-only int8, not float
    assert all(node.scheme == ("weight-only" if node.op_type == "MatMul" else "float") for node in result.nodes)
    steps = [result.error_all] + [node.error_after for node in result.nodes]
    assert all(after < before for before, after in zip(steps, steps[1:])), steps
    assert all(node.error_reduction > 0 and node.extra_bytes > 0 for node in result.nodes)
    assert len(result.nodes) <= 3, result.nodes  # a few nodes, not the model
    report = result.to_dict()
    assert report["share"] == share and report["error_int8_fallback"] == result.error

    # what quantize_int8 makes of them is what was checked: MatMulNBits for the MatMuls, float for the rest
    quantized = quantize_int8(model, exclude=result.floats, weight_only=result.weight_only)
    producers = {output: node for node in quantized.model.graph.node for output in node.output}
    originals = {node.name: node for node in model.graph.node}
    types = {t.name: t.data_type for t in quantized.model.graph.initializer}
    for name in result.weight_only:
        node = producers[originals[name].output[0]]
        assert node.op_type == "MatMulNBits" and node.domain == "com.microsoft", name
        assert types[node.input[1]] == TensorProto.UINT8  # 8-bit codes
    for name in result.floats:
        node = producers[originals[name].output[0]]
        weight = node.input[0] if node.op_type == "Gather" else node.input[1]
        assert types[weight] == TensorProto.FLOAT, name
    assert sum(quantized.info.get("weight_only", {}).values()) == len(result.weight_only)
    assert sum(quantized.info["float"].values()) == len(result.floats)
    assert check(quantized.model) == pytest.approx(result.error, rel=1e-6, abs=1e-9)


def test_weight_only_variant_equals_quantizing_so():
    """The fallback measures a MatMul's cost on the quantized model with that node put back and quantized
    weight-only alone: the outputs of what quantize_int8(weight_only=[node]) gives. Weight-only int8 is
    far closer to float than the dynamic scheme on this model's layer-0 FFN output."""
    model = onnx.load(MINILM)
    full = quantized_minilm("auto")[0].model  # quantize_int8(model)
    nodes = {node.name: node for node in _excludable(model, full)}
    feeds = {name: array[:50] for name, array in sentences().items()}
    names = [FFN_OUT_0, "/bert/encoder/layer.1/attention/self/value/MatMul"]
    variant = _variant(full, model, [nodes[name] for name in names], exact=True)
    quantized = quantize_int8(model, weight_only=names)
    assert quantized.info["weight_only"] == {"MatMul": 2} and quantized.info["nodes"]["MatMul"] == 10
    onnx.checker.check_model(variant)
    got, expected, dynamic, exact = (session(m).run(["sentence_embedding"], feeds)[0]
                                     for m in (variant, quantized.model, full, model))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert abs(variant.ByteSize() - quantized.model.ByteSize()) < 1024
    assert np.abs(got - exact).max() < np.abs(dynamic - exact).max()


def test_restored_float_node_equals_quantizing_without_it():
    """The fallback measures each node's cost on the quantized model with that node put back float: for
    the dynamic nodes that must be exactly what quantize_int8(exclude=[node]) gives."""
    model = onnx.load(MINILM)
    full = quantized_minilm("auto")[0].model  # quantize_int8(model)
    nodes = {node.name: node for node in _excludable(model, full)}
    assert len(nodes) == 15
    feeds = {name: array[:50] for name, array in sentences().items()}
    for names in ([FFN_OUT_0], ["/bert/embeddings/word_embeddings/Gather"],
                  [FFN_OUT_0, "/bert/encoder/layer.1/attention/self/value/MatMul"]):
        restored = _restore_float(full, model, [nodes[name] for name in names])
        excluded = quantize_int8(model, exclude=names).model
        onnx.checker.check_model(restored)
        assert abs(restored.ByteSize() - excluded.ByteSize()) < 64  # the int8 weight gone, the float one back
        got, expected = (session(m).run(["sentence_embedding"], feeds)[0] for m in (restored, excluded))
        assert np.array_equal(got, expected), names
        assert not np.array_equal(got, session(full).run(["sentence_embedding"], feeds)[0])


def test_excluded_node_keeps_its_low_rank_chain_float():
    model = onnx.load(MINILM)
    factorized, _ = onnx_lowrank.compress(model, ranks={FFN_OUT_0: 96}, method="svd", jobs=1)
    chain = chain_names(factorized, [FFN_OUT_0])
    assert chain == [f"{FFN_OUT_0}.lowrank_a", f"{FFN_OUT_0}.lowrank_b"]
    result = quantize_int8(factorized, exclude=chain)
    assert result.info["float"] == {"MatMul": 2} and result.info["nodes"]["MatMul"] == 11
    types = {t.name: t.data_type for t in result.model.graph.initializer}
    kept = [node for node in result.model.graph.node if node.name in chain]
    assert len(kept) == 2 and all(types[node.input[1]] == TensorProto.FLOAT for node in kept)


def test_weight_only_node_before_a_dynamic_one():
    """A MatMulNBits output has no type for ONNX shape inference (a com.microsoft op), nor then anything
    computed from it; onnxruntime's dynamic quantizer needs the type of the MatMul output further down
    (digits_cnn: the second Gemm's, 'logits_matmul'). The fallback quantizes so when it takes the first Gemm."""
    model = onnx.load(DIGITS)
    result = quantize_int8(model, digits_feeds(model), weight_only=["/9/Gemm"])
    assert result.info["weight_only"] == {"Gemm": 1} and result.info["nodes"] == {"Conv": 3, "Gemm": 1}
    onnx.checker.check_model(result.model, full_check=True)
    ops = [node.op_type for node in result.model.graph.node]
    assert "MatMulNBits" in ops and "MatMulInteger" in ops
    assert (digits_predictions(result.model) == digits_predictions(model)).mean() >= 0.97


def test_readme_lossless_digits_with_int8(tmp_path):
    """The README's lossless example with --quantize int8: written (0) or bound not met (1), never exit 2."""
    output = tmp_path / "q.onnx"
    code = main(["compress", str(DIGITS), "-o", str(output), "--calib", str(MODELS / "digits_calib.npz"),
                 "--labels", str(MODELS / "digits_calib_labels.npy"), "--metric", "accuracy", "--quantize", "int8"])
    assert code in (0, 1)
    if code == 0:
        session(onnx.load(output))
