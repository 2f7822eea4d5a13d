"""The two small real models in models/, compressed through the Python API and run in onnxruntime.

* ppocr_cls.onnx: PaddleOCR's text-direction classifier; every weight is a Constant node, no initializers.
  Input `x` float32 [N, 3, 48, 192], output the two class probabilities.
* minilm_l2.onnx: the first 2 layers of all-MiniLM-L6-v2 with mean pooling + L2 norm; inputs
  `input_ids`, `attention_mask` int64 [batch, seq], fed with the first 16 real tokenised sentences.

At full rank (ranks {"*": "full"}, allow_larger) the rewrite must be exact up to float32 rounding; at
target_params=0.7 the model must be valid, smaller, and still run. The compressions are conftest.shared_run's,
made once per session (tests/test_summary.py reads MiniLM's at 0.7 too).
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import SHARED_RUNS, inspected, shared_run

import onnx_lowrank

MODELS = Path(__file__).resolve().parents[1] / "models"
PPOCR = MODELS / "ppocr_cls.onnx"
MINILM = MODELS / "minilm_l2.onnx"
SENTENCES = MODELS / "minilm_sentences.npz"
TARGET = 0.7
BUDGET_SLACK = 1e-3  # of the factorizable parameters


def session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 2
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else Path(model).read_bytes()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def image_batch(seed: int = 0) -> np.ndarray:
    """Image-like input as PaddleOCR feeds it ((pixel/255 - 0.5) / 0.5): smooth blobs, edges and noise in [-1, 1]."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 1, (4, 3, 6, 24))
    smooth = np.repeat(np.repeat(coarse, 8, axis=2), 8, axis=3)  # 48 x 192
    strokes = (rng.uniform(0, 1, (4, 1, 48, 192)) > 0.9).astype(np.float64)
    pixels = np.clip(0.7 * smooth + 0.3 * strokes + 0.05 * rng.standard_normal((4, 3, 48, 192)), 0, 1)
    return ((pixels - 0.5) / 0.5).astype(np.float32)


def sentence_feeds() -> dict[str, np.ndarray]:
    with np.load(SENTENCES) as data:
        return {name: data[name][:16] for name in ("input_ids", "attention_mask")}


SPECS = {
    "ppocr": (PPOCR, lambda: {"x": image_batch()}),
    "minilm": (MINILM, sentence_feeds),
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


OPTIONS = {"full": dict(ranks={"*": "full"}, allow_larger=True), "target": dict(target_params=TARGET)}
RUNS = {"full": "{} full rank", "target": "{} target 0.7"}  # conftest.SHARED_RUNS names, by model


class Case:
    """One real model: the proto, its feeds, the original outputs, and its compressions (shared, once per session)."""

    def __init__(self, name: str):
        self.name = name
        self.path, make_feeds = SPECS[name]
        self.model = onnx.load(str(self.path))
        self.feeds = make_feeds()
        self.outputs = session(self.model).run(None, self.feeds)
        self.output_names = [o.name for o in self.model.graph.output]

    def shared(self, key: str):
        """conftest.shared_run: compress() of a private copy with OPTIONS[key], and whether that copy was left
        unchanged."""
        name = RUNS[key].format(self.name)
        assert SHARED_RUNS[name] == (self.path, OPTIONS[key]), f"conftest.SHARED_RUNS[{name!r}] is not OPTIONS[{key!r}]"
        return shared_run(name)

    def compressed(self, key: str) -> tuple[onnx.ModelProto, onnx_lowrank.Report]:
        run = self.shared(key)
        return run.model, run.report


@cache
def get_case(name: str) -> Case:
    """One Case per model for the whole module: the original session and each compression run once."""
    return Case(name)


@pytest.fixture(params=list(SPECS))
def case(request) -> Case:
    return get_case(request.param)


@pytest.fixture()
def minilm() -> Case:
    return get_case("minilm")


def assert_close_f32(got: np.ndarray, reference: np.ndarray, what: str) -> None:
    assert got.shape == reference.shape, f"{what}: shape {got.shape} != {reference.shape}"
    scale = float(np.abs(reference).max())
    diff = float(np.abs(got.astype(np.float64) - reference).max())
    assert diff <= 1e-4 * scale + 1e-6, f"{what}: max|diff| {diff:.3g} vs scale {scale:.3g}"


# ----------------------------------------------------------------------------------------------- full rank


def test_full_rank_reproduces_outputs(case: Case):
    new, report = case.compressed("full")
    assert report.layers, f"no layer factorized; skipped: {report.skipped}"
    onnx.checker.check_model(new, full_check=True)
    for name, reference, got in zip(case.output_names, case.outputs, session(new).run(None, case.feeds)):
        assert_close_f32(got, reference, f"{case.name} {name}")


def test_ppocr_constant_node_weights_are_found():
    ppocr = get_case("ppocr")
    assert len(ppocr.model.graph.initializer) == 0, "the test premise: ppocr keeps its weights in Constant nodes"
    constants = {node.output[0] for node in ppocr.model.graph.node if node.op_type == "Constant"}
    _, report = ppocr.compressed("full")
    factorized = {layer.node: layer for layer in report.layers}
    assert factorized, report.skipped
    assert {layer.weight for layer in report.layers} <= constants
    # every non-depthwise conv and the classifier MatMul
    convs = [node for node in ppocr.model.graph.node if node.op_type == "Conv"]
    skipped = {entry.node: entry.reason for entry in report.skipped}
    assert len(factorized) + len(skipped) == len(convs) + 1
    assert all("depthwise" in reason for reason in skipped.values()), skipped
    assert any(layer.op == "MatMul" for layer in report.layers)


# ----------------------------------------------------------------------------------------------- target 0.7


def test_target_params_model_is_valid(case: Case):
    new, _ = case.compressed("target")
    onnx.checker.check_model(new, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(new, check_type=True, strict_mode=True)
    assert len(inferred.graph.node) == len(new.graph.node)


def test_target_params_is_smaller_and_meets_budget(case: Case):
    new, report = case.compressed("target")
    assert report.layers, "nothing factorized at target 0.7"
    assert report.params_after < report.params_before
    rows = inspected(case.path)
    factorizable = {row.node: row.params for row in rows if row.reason is None}
    total = sum(factorizable.values())
    factorized = {layer.node for layer in report.layers}
    assert factorized <= set(factorizable)
    after = sum(layer.params_after for layer in report.layers)
    dense = sum(params for node, params in factorizable.items() if node not in factorized)
    limit = TARGET * total + BUDGET_SLACK * total
    assert after <= limit, f"factorized layers keep {after} > {limit:.0f}"
    assert after + dense <= limit, f"factorizable layers keep {after} + {dense} dense > {limit:.0f} of {total}"
    for layer in report.layers:
        assert layer.params_after < layer.params_before, layer
        assert layer.params_before == factorizable[layer.node]
    # the whole model loses exactly what the factorized layers lose
    assert report.params_before - report.params_after == sum(l.params_before - l.params_after for l in report.layers)
    assert report.bytes_after < report.bytes_before
    assert len(new.SerializeToString()) < case.path.stat().st_size


def test_target_params_runs_with_finite_outputs(case: Case):
    new, _ = case.compressed("target")
    got = session(new).run(None, case.feeds)
    assert [o.name for o in new.graph.output] == case.output_names
    for name, reference, out in zip(case.output_names, case.outputs, got):
        assert out.shape == reference.shape, name
        assert out.dtype == reference.dtype, name
        assert np.all(np.isfinite(out)), name


def test_minilm_sentence_embedding_cosine(minilm: Case, record_property):
    new, _ = minilm.compressed("target")
    index = minilm.output_names.index("sentence_embedding")
    reference = minilm.outputs[index].astype(np.float64)
    got = session(new).run(["sentence_embedding"], minilm.feeds)[0].astype(np.float64)
    cosine = np.sum(reference * got, axis=1) / (np.linalg.norm(reference, axis=1) * np.linalg.norm(got, axis=1))
    mean = float(cosine.mean())
    record_property("minilm_target0.7_mean_cosine", mean)
    print(f"MiniLM sentence_embedding mean cosine at target_params={TARGET}: {mean:.4f} (min {cosine.min():.4f})")
    assert mean > 0.5


# ----------------------------------------------------------------------------------------------- inputs


@pytest.mark.parametrize("key", list(OPTIONS))
def test_compress_does_not_modify_input_model(case: Case, key: str):
    """`compress(model)` promises the input is never modified: its serialized bytes must stay identical
    (compared by conftest.shared_run around the very compress() call the other tests read)."""
    assert case.shared(key).input_unchanged, f"compress() changed the caller's {case.name} ModelProto"


@pytest.fixture(scope="module", params=list(SPECS))
def written(request, tmp_path_factory) -> tuple[Path, Path, Path, str, onnx_lowrank.Report]:
    """compress_file on a copy of the model: (source, copy, output, digest before, report)."""
    source = SPECS[request.param][0]
    folder = tmp_path_factory.mktemp(request.param)
    copy = folder / source.name
    copy.write_bytes(source.read_bytes())
    digest = sha256(copy)
    out = folder / f"{request.param}.small.onnx"
    report = onnx_lowrank.compress_file(copy, out, target_params=TARGET)
    return source, copy, out, digest, report


def test_compress_file_leaves_input_unchanged(written):
    source, copy, out, digest, report = written
    assert sha256(copy) == digest, "compress_file changed its input"
    assert sha256(source) == digest
    onnx.checker.check_model(str(out), full_check=True)
    assert report.layers and report.params_after < report.params_before
    assert out.stat().st_size < copy.stat().st_size
    assert sorted(p.name for p in copy.parent.iterdir()) == sorted([copy.name, out.name]), "stray files left"


def test_compress_file_report_bytes_are_file_sizes(written):
    source, copy, out, digest, report = written
    assert report.bytes_after == out.stat().st_size
    assert report.bytes_before == copy.stat().st_size, (
        f"report.bytes_before {report.bytes_before} != size of the input file {copy.stat().st_size}"
    )
