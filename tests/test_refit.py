"""Sequential refit (refit.py): the closed form against a brute-force least squares, its limits (no
shrinkage: the least squares on the compressed inputs; full shrinkage or unchanged inputs: today's
data-aware factors), the stages in graph order, and whole runs that validate better with it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_lowrank
from onnx_lowrank.factorize import refit as refit_module
from onnx_lowrank.factorize.data_aware import DataAwareSVD
from onnx_lowrank.factorize.refit import CrossMoments, Refit, _Problem, stages, strength_for
from onnx_lowrank.graph.adapters import ADAPTERS
from onnx_lowrank.graph.imported import import_graph
from onnx_lowrank.graph.layers import find_layers
from onnx_lowrank.observe.calibration import Samples
from onnx_lowrank.observe.sessions import Session, prefix, with_outputs
from onnx_lowrank.observe.statistics import Moments, collect

WIDTHS = (16, 32, 24, 8)


def chain_model(seed: int = 0, bias: bool = True) -> onnx.ModelProto:
    """x [n, 16] -> MatMul -> (Add) -> Relu -> MatMul -> (Add) -> Relu -> MatMul -> y [n, 8]: three layers
    in a row, each with some spectral decay so that low ranks cost something but not everything."""
    rng = np.random.default_rng(seed)
    nodes, inits, current = [], [], "x"
    for i, (m, n) in enumerate(zip(WIDTHS, WIDTHS[1:])):
        decay = np.diag(0.7 ** np.arange(min(m, n)))
        u, _ = np.linalg.qr(rng.standard_normal((m, m)))
        v, _ = np.linalg.qr(rng.standard_normal((n, n)))
        weight = (u[:, : min(m, n)] @ decay @ v[:, : min(m, n)].T * 2).astype(np.float32)
        inits.append(numpy_helper.from_array(weight, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"mm{i}"], name=f"mm{i}"))
        current = f"mm{i}"
        if bias:
            inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32) * 0.1, f"b{i}"))
            nodes.append(helper.make_node("Add", [current, f"b{i}"], [f"add{i}"], name=f"add{i}"))
            current = f"add{i}"
        if i < 2:
            nodes.append(helper.make_node("Relu", [current], [f"relu{i}"], name=f"relu{i}"))
            current = f"relu{i}"
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", WIDTHS[-1]])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def layer_of(model: onnx.ModelProto, index: int):
    return find_layers(import_graph(model).graph, model, ADAPTERS).units[index].layers[0]


def sums(x: np.ndarray, t: np.ndarray, centred: bool) -> CrossMoments:
    found = CrossMoments.empty(1, x.shape[1])
    found.add(x[None], t[None], centred)
    return found


def moments(x: np.ndarray) -> Moments:
    found = Moments.empty(1, x.shape[1])
    found.add(x[None])
    return found


@pytest.mark.parametrize("bias", [True, False])
def test_no_shrinkage_is_the_least_squares_on_the_compressed_inputs(bias):
    """strength 0: min ||W x - W' t - c|| over rank-r W' (and c where a bias site takes it) equals a brute
    force: the unconstrained least squares on the rows t, then the best rank-r part of its fitted values."""
    rng = np.random.default_rng(1)
    layer = layer_of(chain_model(bias=bias), 1)
    weight = layer.matrices[0].astype(np.float64)  # (24, 32)
    x = rng.standard_normal((4000, 32)) + 0.5
    t = x @ (np.eye(32) + 0.2 * rng.standard_normal((32, 32))) + 0.1 * rng.standard_normal((4000, 32))
    target = x @ weight.T
    found = sums(x, t, bias)
    projected, _, intercept = _Problem(layer, moments(x)).solve(5, found, 0.0)
    ours = t @ projected[0].T + intercept[0] + (weight - projected[0]) @ found.origin[0]
    rows, goal = (t - t.mean(0), target - target.mean(0)) if bias else (t, target)
    solution = np.linalg.lstsq(rows, goal, rcond=None)[0]  # (32, 24)
    top = np.linalg.svd(rows @ solution, full_matrices=False)[2][:5]  # (5, 24): output directions kept
    brute = rows @ solution @ top.T @ top + (target.mean(0) if bias else 0)
    assert np.linalg.norm(ours - target) == pytest.approx(np.linalg.norm(brute - target), rel=1e-6)
    np.testing.assert_allclose(ours, brute, atol=1e-6 * np.abs(target).max())


def test_full_shrinkage_gives_the_data_aware_weight():
    """Full shrinkage keeps today's weight, whatever the compressed inputs (the intercept still meets the
    mean the compressed model really sees: a mean is estimated well from few samples)."""
    rng = np.random.default_rng(2)
    layer = layer_of(chain_model(), 1)
    x = np.maximum(rng.standard_normal((3000, 32)) + 0.3, 0)
    stats = moments(x)
    expected = DataAwareSVD(layer, stats, "input").factorize(6)
    for t in (x + rng.standard_normal(x.shape), x):
        got = _Problem(layer, stats).factors(expected, sums(x, t, True), 1.0)
        np.testing.assert_allclose(got.reconstruct(), expected.reconstruct(), atol=1e-6)
        weight = layer.matrices[0].astype(np.float64)
        np.testing.assert_allclose(got.bias_shift[0], weight @ x.mean(0) - got.reconstruct()[0] @ t.mean(0), atol=1e-6)


def folds_of(x: np.ndarray, t: np.ndarray) -> list[CrossMoments]:
    first = sums(x[::2], t[::2], True)
    second = CrossMoments.empty(1, x.shape[1])
    second.origin = first.origin
    second.add(x[1::2][None], t[1::2][None], True)
    return [first, second]


def test_cross_validation_shrinks_thin_data_and_trusts_plenty():
    """A systematic distortion of the inputs seen on many rows is corrected (little shrinkage); seen on
    fewer rows than dimensions, the cross-moments are mostly noise and the prior wins (strong shrinkage)."""
    rng = np.random.default_rng(3)
    layer = layer_of(chain_model(), 1)
    mix = np.eye(32) + 0.05 * rng.standard_normal((32, 32))
    for rows, expected in ((4000, lambda s: s <= 0.25), (20, lambda s: s >= 0.5)):
        x = rng.standard_normal((rows, 32))
        t = x @ mix + 0.5 * rng.standard_normal((rows, 32))
        problem = _Problem(layer, moments(rng.standard_normal((4000, 32))))
        assert expected(strength_for(problem, 6, folds_of(x, t))), rows


def test_stages_follow_the_graph():
    model = chain_model()
    plan = find_layers(import_graph(model).graph, model, ADAPTERS)
    units = {unit.key: unit for unit in plan.units}
    keys = [unit.key for unit in plan.units]
    everything = {key: object() for key in keys}
    assert stages(model, units, everything, lambda key, factors: True) == [[keys[1]], [keys[2]]]
    assert stages(model, units, {keys[0]: object(), keys[2]: object()}, lambda k, f: True) == [[keys[2]]]
    assert stages(model, units, {keys[1]: object(), keys[2]: object()}, lambda k, f: True) == [[keys[2]]]


@pytest.fixture(scope="module")
def chain_data():
    rng = np.random.default_rng(4)
    return {"x": (rng.standard_normal((256, 16)) * np.linspace(2, 0.2, 16)).astype(np.float32)}


def test_explicit_ranks_validate_better_refit(chain_data):
    """The same ranks everywhere: refit (one pass per stage) lowers the validated error."""
    errors, reports = {}, {}
    for mode in ("none", "sequential"):
        _, report = onnx_lowrank.compress(chain_model(), calibration=chain_data, ranks={"*": 3}, refit=mode,
                                          metric="rel-l2")
        errors[mode], reports[mode] = report.validation.value, report
    assert reports["sequential"].refit == "sequential" and reports["sequential"].refit_layers == 2
    assert reports["none"].refit == "none" and reports["none"].refit_layers == 0
    assert errors["sequential"] < 0.95 * errors["none"]


def test_the_digits_cnn_at_a_budget_and_in_compact_mode():
    """The real digits CNN (SVD): at 30% of the factorizable parameters auto refits the chosen ranks and
    keeps the refit, which validated better; in compact mode (rel-l2 0.05) auto leaves the search alone
    and sequential, refitting every candidate, needs no more parameters than none."""
    common = {"calibration": "models/digits_calib.npz", "method": "svd", "objective": "size"}
    found = {mode: onnx_lowrank.compress("models/digits_cnn.onnx", target_params=0.3, refit=mode, **common)[1]
             for mode in ("none", "auto")}
    assert found["auto"].refit == "sequential" and found["auto"].refit_layers > 0
    assert found["auto"].params_after == found["none"].params_after
    assert found["auto"].validation.value < 0.8 * found["none"].validation.value
    compact = {mode: onnx_lowrank.compress("models/digits_cnn.onnx", tolerance=0.05, refit=mode, **common)[1]
               for mode in ("auto", "sequential")}
    assert compact["auto"].refit == "none"
    assert compact["sequential"].refit == "sequential" and compact["sequential"].validation.passed
    assert compact["sequential"].params_after <= compact["auto"].params_after


def test_the_originals_tensors_kept_or_computed_per_stage_refit_alike(chain_data, monkeypatch):
    """The original's observed tensors are computed once and kept for every stage (and candidate); past
    ORIGINAL_BYTES each stage computes its own: the refit factors are the same either way."""
    results = {}
    for limit in (refit_module.ORIGINAL_BYTES, 0):
        monkeypatch.setattr(refit_module, "ORIGINAL_BYTES", limit)
        model = chain_model()
        imported = import_graph(model)
        plan = find_layers(imported.graph, model, ADAPTERS)
        samples = Samples([{"x": chain_data["x"][i : i + 1]} for i in range(64)], batched=True)
        layers = [unit.layers[0] for unit in plan.units]
        statistics = collect(model, layers, samples, list(range(64)), "cpu")
        refitter = Refit(model, ADAPTERS, plan.units, statistics, samples, list(range(64)), "cpu", 16)
        factors = {layer_key: DataAwareSVD(layer, stats, "input").factorize(3)
                   for layer_key, layer, stats in zip((u.key for u in plan.units), layers, statistics)}
        results[limit] = refitter(factors)
        assert refitter.passes == 2 and bool(refitter._kept) == (limit > 0)
    kept, per_stage = results.values()
    for key in kept:
        np.testing.assert_allclose(kept[key].first, per_stage[key].first, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(kept[key].second, per_stage[key].second, rtol=1e-6, atol=1e-7)


def prefix_cases() -> dict[str, tuple[onnx.ModelProto, str, dict]]:
    """A real encoder cut in its middle, a body reading a tensor of the outer graph, IR 3 (initializers
    listed as graph inputs)."""
    minilm = onnx.load("models/minilm_l2.onnx")
    middle = [node for node in minilm.graph.node if node.op_type == "MatMul"][4].output[0]
    sentences = dict(np.load("models/minilm_sentences.npz"))
    feed = {name: value[:2] for name, value in sentences.items()}
    shifted = helper.make_graph([helper.make_node("Add", ["doubled", "one"], ["branch"])], "then", [],
                                [helper.make_tensor_value_info("branch", TensorProto.FLOAT, [2])])
    kept = helper.make_graph([helper.make_node("Identity", ["doubled"], ["other"])], "else", [],
                             [helper.make_tensor_value_info("other", TensorProto.FLOAT, [2])])
    nodes = [helper.make_node("Mul", ["x", "two"], ["doubled"]),
             helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
             helper.make_node("Greater", ["total", "zero"], ["positive"]),
             helper.make_node("If", ["positive"], ["chosen"], then_branch=shifted, else_branch=kept),
             helper.make_node("Neg", ["chosen"], ["y"]), helper.make_node("Mul", ["x", "three"], ["unused"])]
    inits = [numpy_helper.from_array(np.float32(v).reshape(s), n) for n, v, s in
             (("two", 2, ()), ("one", 1, ()), ("zero", 0, ()), ("three", 3, ()))]
    graph = helper.make_graph(nodes, "branches", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2]),
                               helper.make_tensor_value_info("unused", TensorProto.FLOAT, [2])], inits)
    branches = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    old = chain_model()
    old.ir_version = 3
    old.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in old.graph.initializer)
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    return {"minilm": (minilm, middle, feed), "body reads outer": (branches, "chosen", {"x": np.ones(2, np.float32)}),
            "ir 3": (old, "relu0", {"x": x})}


@pytest.mark.parametrize("case", ["minilm", "body reads outer", "ir 3"])
def test_prefix_computes_the_tensor_with_fewer_nodes(case):
    model, name, feed = prefix_cases()[case]
    part = prefix(model, [name])
    whole = Session(with_outputs(model, [name]), "cpu").run(feed, [name])[0]
    assert [o.name for o in part.graph.output] == [name]
    assert len(part.graph.node) < len(model.graph.node)
    assert len(part.graph.initializer) < len(model.graph.initializer)
    np.testing.assert_array_equal(Session(part, "cpu").run(feed, [name])[0], whole)
