"""Latency measurement: activation shapes, single-layer models, side-by-side timing, the timing cache and
the not-slower gate.

Everything that touches ONNX Runtime runs real sessions on the two shipped models (minilm_l2: MatMul +
bias Add and Gather layers; digits_cnn: Conv and Gemm) with their calibration data. The reference
tensors are fetched independently: the whole model run once with the layers' data inputs and outputs
exposed as extra graph outputs. Timings on a shared machine are noise, so no test asserts which model is
faster, only that timings are well formed; the bisection's logic is checked with a fake timer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import assert_close, make_model, run
from onnx import helper, numpy_helper

from onnx_lowrank.check import latency, layer_timer
from onnx_lowrank.check.latency import Timing, end_to_end, time_side_by_side, timing_session
from onnx_lowrank.check.layer_timer import LayerTimer
from onnx_lowrank.choose.objective import not_slower
from onnx_lowrank.factorize.menu import pareto_front
from onnx_lowrank.factorize.registry import decomposers_for
from onnx_lowrank.factorize.rewrite import build
from onnx_lowrank.graph.adapters import ADAPTERS
from onnx_lowrank.graph.imported import import_graph
from onnx_lowrank.graph.layers import find_layers
from onnx_lowrank.graph.splice import Factorization
from onnx_lowrank.observe.activations import Untimeable, activation_shapes, activations, timed_activations
from onnx_lowrank.observe.calibration import load_calibration

MODELS = Path(__file__).resolve().parent.parent / "models"
CASES = {"minilm": ("minilm_l2.onnx", "minilm_sentences.npz"), "digits": ("digits_cnn.onnx", "digits_calib.npz")}
BATCH = 8
QUICK = {"min_runs": 5, "min_seconds": 0.02}  # the tests check what timings are, not how precise


class Case:
    def __init__(self, name: str):
        model_file, calibration = CASES[name]
        self.model = onnx.load(str(MODELS / model_file))
        samples = load_calibration(str(MODELS / calibration), self.model)
        _, self.feed = next(samples.batches(list(range(BATCH)), BATCH))
        self.units = find_layers(import_graph(self.model).graph, self.model, ADAPTERS).units
        self._reference: dict[str, np.ndarray] | None = None

    def unit(self, name: str):
        return next(unit for unit in self.units if unit.name == name)

    def reference(self) -> dict[str, np.ndarray]:
        """Every node input and output of every layer (and its bias Add) on the feed: one independent run."""
        if self._reference is None:
            names = set()
            for node in self.model.graph.node:
                if node.op_type in ADAPTERS or node.op_type == "Add":
                    names.update(n for n in (*node.input, *node.output) if n)
            initializers = {t.name for t in self.model.graph.initializer}
            constants = {o for node in self.model.graph.node if node.op_type == "Constant" for o in node.output}
            names -= initializers | constants
            inputs = {i.name for i in self.model.graph.input}
            probing = onnx.ModelProto()
            probing.CopyFrom(self.model)
            existing = {o.name for o in probing.graph.output}
            computed = sorted(names - inputs)
            probing.graph.output.extend(onnx.ValueInfoProto(name=n) for n in computed if n not in existing)
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            session = ort.InferenceSession(probing.SerializeToString(), options, providers=["CPUExecutionProvider"])
            self._reference = dict(zip(computed, session.run(computed, self.feed)))
            self._reference.update({n: self.feed[n] for n in names & inputs})
        return self._reference


_CASES: dict[str, Case] = {}


def get_case(name: str) -> Case:
    """Each model loaded once for the whole module."""
    if name not in _CASES:
        _CASES[name] = Case(name)
    return _CASES[name]


@pytest.fixture(params=list(CASES))
def case(request) -> Case:
    return get_case(request.param)


def expected_data_input(case: Case, node: onnx.NodeProto) -> str:
    """In these two models every weight is a MatMul's / Gemm's B or a Conv's kernel (input 1) and every
    Gather's table (input 0), stored as an initializer: the data is the other input."""
    data, weight = (1, 0) if node.op_type == "Gather" else (0, 1)
    assert node.input[weight] in {t.name for t in case.model.graph.initializer}
    return node.input[data]


def full_rank(unit) -> Factorization:
    """W = second @ first exactly, at rank min(out, in), without an SVD: one factor is the identity."""
    groups, out_dim, in_dim = unit.matrices.shape
    eye = np.broadcast_to(np.eye(min(out_dim, in_dim)), (groups, min(out_dim, in_dim), min(out_dim, in_dim)))
    first, second = (eye, unit.matrices) if in_dim <= out_dim else (unit.matrices, eye)
    return Factorization("svd", min(out_dim, in_dim), np.array(first), np.array(second), 0.0)


def random_factors(unit, rank: int) -> Factorization:
    """Factors of the right shapes at a rank: all a timing depends on."""
    groups, out_dim, in_dim = unit.matrices.shape
    rng = np.random.default_rng(rank)
    return Factorization("svd", rank, rng.standard_normal((groups, rank, in_dim)),
                         rng.standard_normal((groups, out_dim, rank)), 0.5)


# --------------------------------------------------------------------------------- activation shapes


def test_activation_shapes_match_the_real_tensors(case: Case, monkeypatch):
    runs = []
    original_run = ort.InferenceSession.run

    def counting(self, *args, **kwargs):
        runs.append(1)
        return original_run(self, *args, **kwargs)

    before = case.model.SerializeToString()
    monkeypatch.setattr(ort.InferenceSession, "run", counting)
    shapes = activation_shapes(case.model, case.units, case.feed, "cpu")
    monkeypatch.undo()
    assert len(runs) == 1, "the shapes come from one onnxruntime run"
    assert case.model.SerializeToString() == before, "the model's outputs were not restored"

    reference = case.reference()
    assert set(shapes) == {unit.key for unit in case.units}
    protos = {node.name: node for node in case.model.graph.node}
    for unit in case.units:
        name = expected_data_input(case, protos[unit.name])
        assert shapes[unit.key] == reference[name].shape, unit.name
        assert all(isinstance(n, int) for n in shapes[unit.key])
    if case is get_case("minilm"):  # batch x sequence activations, indices of the graph input itself
        ids = case.unit("/bert/embeddings/word_embeddings/Gather")
        assert shapes[ids.key] == case.feed["input_ids"].shape
        dense = case.unit("/bert/encoder/layer.0/output/dense/MatMul")
        assert shapes[dense.key] == (*case.feed["input_ids"].shape, 1536)


def test_activations_carry_names_and_types(case: Case):
    found = activations(case.model, case.units, case.feed, "cpu")
    reference = case.reference()
    for unit in case.units:
        activation = found[unit.key]
        assert activation.dtype == reference[activation.name].dtype.name
        assert activation.shape == reference[activation.name].shape


def test_timed_activations_time_a_warm_run(case: Case):
    """The same activations, and one warm run's milliseconds when the model had to run (the embedding
    slack's rough figure), None when every data input is a graph input."""
    found, run_ms = timed_activations(case.model, case.units, case.feed, "cpu")
    assert found == activations(case.model, case.units, case.feed, "cpu")
    graph_inputs = {i.name for i in case.model.graph.input}
    if all(activation.name in graph_inputs for activation in found.values()):
        assert run_ms is None
    else:
        assert run_ms is not None and run_ms > 0
    assert timed_activations(case.model, case.units, case.feed, "cpu", timed=False)[1] is None


# ------------------------------------------------------------------------------ single-layer models


def assert_layer_models_exact(case: Case, timer: LayerTimer, extracted: bool) -> None:
    reference = case.reference()
    protos = {node.name: node for node in case.model.graph.node}
    for unit in case.units:
        layer = unit.layers[0]
        models = timer.models(unit, full_rank(unit))
        assert models.extracted is extracted
        assert models.input == expected_data_input(case, protos[unit.name])
        has_add = layer.bias is not None and layer.bias.node is not layer.node
        assert models.output == (layer.bias.node if has_add else layer.node).outputs[0].name
        if has_add:  # the fusion is part of what is timed
            assert [n.op_type for n in models.dense.graph.node] == [unit.op, "Add"]
        dims = models.dense.graph.input[0].type.tensor_type.shape.dim
        assert tuple(d.dim_value for d in dims) == reference[models.input].shape  # fixed, not symbolic
        onnx.checker.check_model(models.factorized, full_check=True)
        feed = {models.input: reference[models.input]}
        expected = [reference[models.output]]
        assert_close(expected, run(models.dense, feed))
        assert_close(expected, run(models.factorized, feed))  # full rank: the same layer
        deployed = timing_session(models.factorized, "cpu", 1).run(None, feed)  # fused as timed
        assert_close(expected, deployed)
        replaced = {n.name for n in models.factorized.graph.node}
        assert unit.name not in replaced and len(models.factorized.graph.node) > len(models.dense.graph.node)


def test_layer_models_reproduce_the_full_model_at_full_rank(case: Case):
    shapes = activation_shapes(case.model, case.units, case.feed, "cpu")
    timer = LayerTimer(case.model, ADAPTERS, shapes, "cpu", threads=1)
    assert_layer_models_exact(case, timer, extracted=True)


def test_layer_models_built_by_hand_when_extraction_fails(case: Case, monkeypatch):
    def refuse(self, inputs, outputs):
        raise ValueError("cannot extract")

    monkeypatch.setattr(onnx.utils.Extractor, "extract_model", refuse)
    found = activations(case.model, case.units, case.feed, "cpu")
    timer = LayerTimer(case.model, ADAPTERS, found, "cpu", threads=1)
    assert_layer_models_exact(case, timer, extracted=False)


def chained_model() -> onnx.ModelProto:
    """relu(x) @ Cast(Transpose(W stored in float16)) + b (b in a Constant node), then tanh: a weight behind
    a chain, a bias that is no initializer, the layer inside the graph."""
    rng = np.random.default_rng(3)
    bias = numpy_helper.from_array(rng.standard_normal(12).astype(np.float32), "b_value")
    nodes = [
        helper.make_node("Relu", ["x"], ["h"], name="relu"),
        helper.make_node("Transpose", ["w16"], ["w16_t"], name="transpose", perm=[1, 0]),
        helper.make_node("Cast", ["w16_t"], ["w"], name="cast", to=onnx.TensorProto.FLOAT),
        helper.make_node("MatMul", ["h", "w"], ["m"], name="matmul"),
        helper.make_node("Constant", [], ["b"], name="bias", value=bias),
        helper.make_node("Add", ["m", "b"], ["z"], name="add"),
        helper.make_node("Tanh", ["z"], ["y"], name="tanh"),
    ]
    weight = rng.standard_normal((12, 10)).astype(np.float16)
    return make_model(nodes, {"x": ["batch", 10]}, ["y"], {"w16": weight})


@pytest.mark.parametrize("extract", [True, False])
def test_a_weight_behind_a_chain_is_cut_out_with_its_chain(extract, monkeypatch):
    model = chained_model()
    if not extract:
        monkeypatch.setattr(onnx.utils.Extractor, "extract_model", lambda self, i, o: (_ for _ in ()).throw(ValueError("no")))
    (unit,) = find_layers(import_graph(model).graph, model, ADAPTERS).units
    feed = {"x": np.random.default_rng(4).standard_normal((5, 10)).astype(np.float32)}
    shapes = activation_shapes(model, [unit], feed, "cpu")
    assert shapes == {unit.key: (5, 10)}
    timer = LayerTimer(model, ADAPTERS, shapes, "cpu", threads=1, **QUICK)
    models = timer.models(unit, full_rank(unit))
    assert models.extracted is extract and (models.input, models.output) == ("h", "z")
    assert {"Transpose", "Cast"} <= {n.op_type for n in models.dense.graph.node}
    h = np.maximum(feed["x"], 0)
    dense = run(models.dense, {"h": h})
    assert_close(run(model, feed), [np.tanh(dense[0])])
    assert_close(dense, run(models.factorized, {"h": h}), "float16")  # factors stored in float16 too
    assert all(t > 0 for t in timer.times(unit, random_factors(unit, 4)))


def test_a_layer_that_cannot_be_cut_out_is_untimeable(monkeypatch):
    digits = get_case("digits")
    unit = digits.unit("/9/Gemm")
    monkeypatch.setattr(onnx.utils.Extractor, "extract_model", lambda self, i, o: (_ for _ in ()).throw(ValueError("no")))
    monkeypatch.setattr(layer_timer, "_by_hand", lambda *args: (_ for _ in ()).throw(ValueError("neither")))
    timer = LayerTimer(digits.model, ADAPTERS, activation_shapes(digits.model, digits.units, digits.feed, "cpu"), "cpu")
    with pytest.raises(Untimeable, match="/9/Gemm"):
        timer.models(unit, full_rank(unit))
    with pytest.raises(Untimeable):  # the caller decides: keep the unit dense, or let it be
        not_slower(candidate_of("/9/Gemm", "svd"), timer)


# --------------------------------------------------------------------------------------- timing


def assert_sane(timing: Timing, min_runs: int) -> None:
    assert timing.runs >= min_runs
    assert 0 < timing.p10_ms <= timing.median_ms <= timing.p90_ms
    assert math.isfinite(timing.p90_ms)
    assert timing.to_dict() == {"median_ms": timing.median_ms, "p10_ms": timing.p10_ms,
                                "p90_ms": timing.p90_ms, "runs": timing.runs}


def test_time_side_by_side_gives_sane_timings():
    digits = get_case("digits")
    unit = digits.unit("/2/Conv")
    compressed = build(digits.model, ADAPTERS, {unit.key: random_factors(unit, 8)})
    timings = time_side_by_side([digits.model, compressed], digits.feed, "cpu", threads=1, min_runs=12, min_seconds=0.05)
    assert len(timings) == 2
    for timing in timings:
        assert_sane(timing, 12)
    assert timings[0].runs == timings[1].runs  # rounds run every model once
    with pytest.raises(ValueError, match="min_runs"):
        time_side_by_side([digits.model], digits.feed, "cpu", min_runs=0)
    with pytest.raises(ValueError, match="image"):
        time_side_by_side([digits.model], {}, "cpu")


def test_end_to_end_reports_original_against_compressed():
    digits = get_case("digits")
    unit = digits.unit("/2/Conv")
    factorized = build(digits.model, ADAPTERS, {unit.key: random_factors(unit, 8)})
    rounds = []
    found = end_to_end(digits.model, factorized, None, digits.feed, "cpu", rounds.append, threads=1,
                       min_runs=6, min_seconds=0.02)
    assert set(found.to_dict()) == {"provider", "batch", "threads", "runs", "original", "compressed", "speedup"}
    assert (found.provider, found.batch, found.threads) == ("cpu", BATCH, 1)
    assert found.runs == len(rounds) >= 6
    for timing in (found.original, found.compressed):
        assert_sane(timing, 6)
    assert found.speedup == pytest.approx(found.original.median_ms / found.compressed.median_ms)
    json.dumps(found.to_dict())

    other = build(digits.model, ADAPTERS, {unit.key: random_factors(unit, 4)})  # stands in for a quantized model
    found = end_to_end(digits.model, factorized, other, digits.feed, "cpu", min_runs=3, min_seconds=0)
    assert {"original", "compressed", "factorized"} <= set(found.to_dict()) and found.threads is None
    assert found.speedup == pytest.approx(found.original.median_ms / found.compressed.median_ms)


def test_end_to_end_says_when_onnxruntime_fails(monkeypatch):
    digits = get_case("digits")

    def fail(*args):
        raise ort.capi.onnxruntime_pybind11_state.Fail("optimizer crashed\nmore")

    monkeypatch.setattr(latency, "timing_session", fail)
    found = end_to_end(digits.model, digits.model, None, digits.feed, "cpu")
    assert "optimizer crashed" in found.error and "original" not in found.to_dict() and "speedup" not in found.to_dict()


def test_models_over_2gb_are_timed_from_a_file_and_cut_by_hand(monkeypatch):
    """Protobuf cannot serialize a model over 2 GB: sessions load it from a temporary folder with external
    data, and layers are cut by hand (the Extractor would build one message). Forced on a small model."""
    minilm = get_case("minilm")
    before = {t.name: numpy_helper.to_array(t) for t in minilm.model.graph.initializer}
    monkeypatch.setattr(layer_timer, "is_large", lambda model: model is minilm.model)
    (timing,) = time_side_by_side([minilm.model], minilm.feed, "cpu", threads=1, min_runs=3, min_seconds=0)
    assert_sane(timing, 3)
    unit = minilm.unit("/bert/encoder/layer.1/output/dense/MatMul")
    timer = LayerTimer(minilm.model, ADAPTERS, activation_shapes(minilm.model, minilm.units, minilm.feed, "cpu"),
                       "cpu", threads=1, **QUICK)
    assert timer.models(unit, random_factors(unit, 16)).extracted is False
    assert all(t > 0 for t in timer.times(unit, random_factors(unit, 16)))
    monkeypatch.undo()
    for tensor in minilm.model.graph.initializer:  # the weights went back into the caller's model
        assert tensor.data_location == onnx.TensorProto.DEFAULT and not tensor.external_data
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), before[tensor.name])


@pytest.fixture
def fake_runs(monkeypatch) -> list[str]:
    """Models named by strings run instantly: the names in the order run ("slow" reports
    WARM_AFTER_SECONDS a run, any other 1 ms)."""
    calls = []

    class Fake:
        def __init__(self, model, feed, provider, threads):
            self.name = model

        def __call__(self):
            calls.append(self.name)
            return latency.WARM_AFTER_SECONDS if self.name == "slow" else 1e-3

    monkeypatch.setattr(latency, "_Runner", Fake)
    return calls


def test_rounds_alternate_the_order(fake_runs):
    calls = fake_runs
    timings = time_side_by_side(["a", "b", "c"], {}, "cpu", warmup=1, min_runs=4, min_seconds=0)
    assert calls == ["a", "b", "c"] + ["a", "b", "c", "c", "b", "a", "a", "b", "c", "c", "b", "a"]
    assert [t.runs for t in timings] == [4, 4, 4] and timings[0].median_ms == pytest.approx(1.0)


def test_slow_models_warm_up_once_and_slow_layers_stop_early(fake_runs):
    """A warm-up run of WARM_AFTER_SECONDS ends the warm-up; with max_seconds spent, FEW_RUNS rounds do."""
    calls = fake_runs
    time_side_by_side(["slow", "quick"], {}, "cpu", warmup=3, min_runs=2, min_seconds=0)
    assert calls[:4] == ["slow", "quick", "quick", "quick"]
    timings = time_side_by_side(["quick"], {}, "cpu", min_runs=20, min_seconds=0, max_seconds=0.0)
    assert timings[0].runs == latency.FEW_RUNS
    assert time_side_by_side(["quick"], {}, "cpu", min_runs=20, min_seconds=0)[0].runs == 20


def test_layer_timings_are_sane_and_cached(tmp_path):
    minilm = get_case("minilm")
    shapes = activation_shapes(minilm.model, minilm.units, minilm.feed, "cpu")
    path = tmp_path / "latency.json"
    query = minilm.unit("/bert/encoder/layer.0/attention/self/query/MatMul")
    key = minilm.unit("/bert/encoder/layer.0/attention/self/key/MatMul")

    timer = LayerTimer(minilm.model, ADAPTERS, shapes, "cpu", threads=1, cache=path, **QUICK)
    dense, factorized = timer.times(query, random_factors(query, 32))
    assert dense > 0 and factorized > 0 and timer.measured == 1
    assert json.loads(path.read_text())["format"] == layer_timer.CACHE_FORMAT
    # the same shapes and rank: one timing serves both (the weights' values do not matter)
    assert timer.times(key, random_factors(key, 32)) == (dense, factorized) and timer.measured == 1
    timer.times(query, random_factors(query, 48))
    assert timer.measured == 2

    second = LayerTimer(minilm.model, ADAPTERS, shapes, "cpu", threads=1, cache=path, **QUICK)
    assert second.times(query, random_factors(query, 32)) == (dense, factorized)
    assert second.measured == 0
    other_threads = LayerTimer(minilm.model, ADAPTERS, shapes, "cpu", threads=2, cache=path, **QUICK)
    other_threads.times(query, random_factors(query, 32))
    assert other_threads.measured == 1  # another setting is another timing
    assert len(json.loads(path.read_text())["timings"]) == 3

    path.write_text("{not json")
    damaged = LayerTimer(minilm.model, ADAPTERS, shapes, "cpu", threads=1, cache=path, **QUICK)
    assert damaged.timings == {}
    damaged.times(query, random_factors(query, 32))
    assert len(json.loads(path.read_text())["timings"]) == 1  # rewritten whole


# ------------------------------------------------------------------------------ the not-slower gate


class ParamsTimer:
    """Factorized time proportional to the factors' size, dense time to the weight's: margin m allows
    exactly the options with params <= m * dense params."""

    def __init__(self):
        self.calls = 0

    def times(self, unit, factorization):
        self.calls += 1
        return float(unit.params), float(factorization.params)


_CANDIDATES = {}


def candidate_of(name: str, method: str):
    if (name, method) not in _CANDIDATES:
        _CANDIDATES[name, method] = decomposers_for([get_case("digits").unit(name)], method, None)[0]
    return _CANDIDATES[name, method]


@pytest.mark.parametrize("layer, method", [("/5/Conv", "svd"), ("/0/Conv", "auto")])  # 64 ranks; 7 methods
@pytest.mark.parametrize("margin", [0.0, 0.3, 0.5, 1.0, math.inf])
def test_bisection_finds_the_largest_option_not_slower(layer, method, margin):
    candidate = candidate_of(layer, method)
    unit = candidate.unit
    timer = ParamsTimer()
    limit = not_slower(candidate, timer, margin)
    front = pareto_front(candidate.options(), unit.params)  # what is timed: what an allocation can pick
    assert set(limit.boundaries) == {option.method for option in front}
    for option in front:
        assert limit(option) == (option.params <= margin * unit.params), option
    for name, boundary in limit.boundaries.items():
        count = sum(1 for o in front if o.method == name)
        assert boundary.timings <= math.ceil(math.log2(count + 1)) + 1  # a handful, not one per rank
        assert boundary.dense_ms == unit.params
        if boundary.largest is not None:
            assert boundary.factorized_ms == boundary.largest.params
        else:
            assert boundary.factorized_ms == min(o.params for o in front if o.method == name)
    if margin == math.inf:
        assert all(limit(o) for o in front)
    if margin == 0:
        assert not any(limit(o) for o in front)
        assert all(b.largest is None for b in limit.boundaries.values())
    assert json.dumps(limit.to_dict())


@pytest.mark.parametrize("margin", [0.0, math.inf])
def test_not_slower_with_real_timings(margin):
    digits = get_case("digits")
    candidate = candidate_of("/9/Gemm", "svd")
    timer = LayerTimer(digits.model, ADAPTERS, activation_shapes(digits.model, digits.units, digits.feed, "cpu"),
                       "cpu", threads=1, **QUICK)
    limit = not_slower(candidate, timer, margin)
    options = pareto_front(candidate.options(), candidate.unit.params)
    assert all(limit(o) for o in options) if margin == math.inf else not any(limit(o) for o in options)
    boundary = limit.boundaries["svd"]
    assert boundary.dense_ms > 0 and boundary.factorized_ms > 0
    assert boundary.timings == timer.measured <= math.ceil(math.log2(len(options) + 1)) + 1


class CachingParamsTimer(ParamsTimer):
    """ParamsTimer with LayerTimer's `cached`: a timing is found again by method, rank and bias shift."""

    def __init__(self):
        super().__init__()
        self.timings = {}

    def times(self, unit, factorization):
        found = super().times(unit, factorization)
        self.timings[unit.key, factorization.method, factorization.rank, factorization.bias_shift is not None] = found
        return found

    def cached(self, unit, method, rank, shifted):
        return self.timings.get((unit.key, method, rank, shifted))


@pytest.mark.parametrize("layer, method", [("/5/Conv", "svd"), ("/0/Conv", "auto")])
def test_cached_timings_spare_the_factorizations(layer, method, monkeypatch):
    """A second gate over options timed before factorizes each method once (to learn whether it shifts
    the bias) and finds the same boundaries: every method's option configs map onto its ranks."""
    candidate = candidate_of(layer, method)
    timer = CachingParamsTimer()
    first = not_slower(candidate, timer, 0.5)
    made = []
    factorize = type(candidate).factorize
    monkeypatch.setattr(type(candidate), "factorize",
                        lambda self, option: made.append(option) or factorize(self, option))
    again = not_slower(candidate, timer, 0.5)
    assert again.to_dict() == first.to_dict()
    assert len(made) == len(first.boundaries)  # one per method
    assert timer.calls == sum(b.timings for b in first.boundaries.values()) + len(made)
