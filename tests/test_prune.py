"""Structured MLP compression (prune.py): which producer -> activation -> consumer pairs are found, that keeping
every channel is exact, that the predicted error is the one onnxruntime measures on the calibration rows, and
that the allocation offers it (and only with `--method prune`)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import make_model, run
from onnx import helper

import onnx_lowrank
from onnx_lowrank.check.overrides import overrides_for, with_overridable
from onnx_lowrank.choose.allocation import frontier
from onnx_lowrank.errors import BoundNotMet
from onnx_lowrank.factorize.menu import coupled
from onnx_lowrank.factorize.prune import PrunedInputs, couple, find_pairs, forward_selection
from onnx_lowrank.factorize.registry import decomposers_for
from onnx_lowrank.factorize.rewrite import build
from onnx_lowrank.graph.adapters import ADAPTERS
from onnx_lowrank.graph.imported import import_graph
from onnx_lowrank.graph.layers import find_layers
from onnx_lowrank.observe.calibration import load_calibration
from onnx_lowrank.observe.statistics import Moments, unit_statistics

D, H, OUT, ROWS = 6, 12, 5, 40


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _w(*shape: int, seed: int = 0) -> np.ndarray:
    return (_rng(seed).standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)


def gelu_nodes(x: str, y: str, prefix: str = "g") -> list[onnx.NodeProto]:
    """GELU as exporters write it: x * 0.5 * (1 + erf(x / sqrt 2)), its constants Constant nodes."""
    const = lambda name, value: helper.make_node(  # noqa: E731
        "Constant", [], [name], value=helper.make_tensor(name, onnx.TensorProto.FLOAT, [], [value]))
    return [const(f"{prefix}_c0", 1.4142135), helper.make_node("Div", [x, f"{prefix}_c0"], [f"{prefix}_d"]),
            helper.make_node("Erf", [f"{prefix}_d"], [f"{prefix}_e"]), const(f"{prefix}_c1", 1.0),
            helper.make_node("Add", [f"{prefix}_e", f"{prefix}_c1"], [f"{prefix}_a"]),
            helper.make_node("Mul", [x, f"{prefix}_a"], [f"{prefix}_m"]), const(f"{prefix}_c2", 0.5),
            helper.make_node("Mul", [f"{prefix}_m", f"{prefix}_c2"], [y])]


def matmul_gelu_matmul(extra_output: str | None = None, residual: bool = False,
                       position_scale: bool = False) -> onnx.ModelProto:
    act = "act_scaled" if position_scale else "act"
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="up"), helper.make_node("Add", ["h0", "b1"], ["h1"]),
             *gelu_nodes("h1", "act"), helper.make_node("MatMul", [act, "w2"], ["y0"], name="down"),
             helper.make_node("Add", ["y0", "b2"], ["y"])]
    outputs = ["y"] + ([extra_output] if extra_output else [])
    if residual:  # the activation also feeds something else: no pair
        nodes.append(helper.make_node("ReduceSum", ["act"], ["s"], keepdims=0))
        outputs.append("s")
    init = {"w1": _w(D, H), "b1": _w(H, seed=1), "w2": _w(H, OUT, seed=2), "b2": _w(OUT, seed=3)}
    if position_scale:  # varies along the positions, not the channels: no pair
        nodes.insert(-2, helper.make_node("Mul", ["act", "by_position"], ["act_scaled"]))
        init["by_position"] = np.arange(1, 5, dtype=np.float32).reshape(4, 1)
    return make_model(nodes, {"x": ["N", 4, D]}, outputs, init)


def gemm_relu_gemm(per_channel_scale: bool = False) -> onnx.ModelProto:
    """Gemm -> Relu (-> Mul by a per-channel constant, cut with the channels) -> Gemm."""
    act = "r"
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["r"])]
    init = {"w1": _w(H, D), "b1": _w(H, seed=1) + 0.3, "w2": _w(H, OUT, seed=2)}
    if per_channel_scale:
        nodes.append(helper.make_node("Mul", ["r", "scale"], ["rs"]))
        init["scale"] = np.linspace(0.5, 1.5, H).astype(np.float32)
        act = "rs"
    nodes.append(helper.make_node("Gemm", [act, "w2"], ["y"], name="fc2"))  # no C: centring adds one
    return make_model(nodes, {"x": ["N", D]}, ["y"], init)


def swiglu() -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "wg"], ["g"], name="gate"),
             helper.make_node("MatMul", ["x", "wu"], ["u"], name="up"),
             helper.make_node("Sigmoid", ["g"], ["sg"]), helper.make_node("Mul", ["g", "sg"], ["silu"]),
             helper.make_node("Mul", ["silu", "u"], ["a"]), helper.make_node("MatMul", ["a", "wd"], ["y"], name="down")]
    init = {"wg": _w(D, H), "wu": _w(D, H, seed=1), "wd": _w(H, OUT, seed=2)}
    return make_model(nodes, {"x": ["N", D]}, ["y"], init)


def conv_relu_conv(kernel: int = 1, out_kernel: int = 1, paddle_bias: bool = False) -> onnx.ModelProto:
    """Conv -> Relu -> Conv -> HardSigmoid; `paddle_bias`: the first bias as paddle2onnx writes it, an Add of
    Reshape(Constant) after a bias-less Conv."""
    first = helper.make_node("Conv", ["x", "k1", "c1"], ["h"], name="squeeze", pads=[kernel // 2] * 4)
    nodes = [first]
    if paddle_bias:
        first.input.pop()
        first.output[0] = "h_nobias"
        nodes += [helper.make_node("Constant", [], ["flat"], value=onnx.numpy_helper.from_array(_w(H, seed=1) + 0.2)),
                  helper.make_node("Constant", [], ["to"], value=onnx.numpy_helper.from_array(np.array([1, -1, 1, 1]))),
                  helper.make_node("Reshape", ["flat", "to"], ["c1_4d"]), helper.make_node("Add", ["h_nobias", "c1_4d"], ["h"])]
    nodes += [helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "k2", "c2"], ["z"], name="excite", pads=[out_kernel // 2] * 4),
             helper.make_node("HardSigmoid", ["z"], ["y"])]
    init = {"k1": _w(H, D, kernel, kernel), "c1": _w(H, seed=1) + 0.2, "k2": _w(OUT, H, out_kernel, out_kernel, seed=2),
            "c2": _w(OUT, seed=3)}
    return make_model(nodes, {"x": ["N", D, 2, 4]}, ["y"], init)


MODELS = {"matmul-gelu-matmul": matmul_gelu_matmul, "gemm-relu-gemm": gemm_relu_gemm, "swiglu": swiglu,
          "conv1x1-relu-conv1x1": conv_relu_conv, "conv3x3-relu-conv1x1": lambda: conv_relu_conv(kernel=3),
          "gemm-relu-scale-gemm": lambda: gemm_relu_gemm(per_channel_scale=True),
          "conv-add-relu-conv": lambda: conv_relu_conv(paddle_bias=True)}
EXPECTED = {"matmul-gelu-matmul": ("down", ["up"]), "gemm-relu-gemm": ("fc2", ["fc1"]), "swiglu": ("down", ["gate", "up"]),
            "conv1x1-relu-conv1x1": ("excite", ["squeeze"]), "conv3x3-relu-conv1x1": ("excite", ["squeeze"]),
            "gemm-relu-scale-gemm": ("fc2", ["fc1"]), "conv-add-relu-conv": ("excite", ["squeeze"])}


def pairs_of(model: onnx.ModelProto):
    plan = find_layers(import_graph(model).graph, model, ADAPTERS)
    names = {unit.key: unit.name for unit in plan.units}
    return plan.units, [(names[p.consumer], sorted(names[k] for k in p.producers)) for p in find_pairs(plan.units, model)]


@pytest.mark.parametrize("case", list(MODELS))
def test_pairs_are_found(case):
    _, found = pairs_of(MODELS[case]())
    assert found == [EXPECTED[case]]


NEGATIVE = {
    "producer output is a graph output": lambda: matmul_gelu_matmul(extra_output="h1"),
    "activation read elsewhere": lambda: matmul_gelu_matmul(residual=True),
    "a constant along the positions in the chain": lambda: matmul_gelu_matmul(position_scale=True),
    "consumer is a 3x3 conv": lambda: conv_relu_conv(out_kernel=3),
}


@pytest.mark.parametrize("case", list(NEGATIVE))
def test_pairs_that_must_not_be_found(case):
    assert pairs_of(NEGATIVE[case]())[1] == []


def test_shared_weights_and_mismatched_axes_are_not_pairs():
    # the producer's weight also feeds another node; a Transpose between changes the channel axis
    shared = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"), helper.make_node("Relu", ["h"], ["r"]),
              helper.make_node("MatMul", ["r", "w2"], ["y"], name="down"),
              helper.make_node("MatMul", ["x", "w1"], ["z"], name="twin")]
    init = {"w1": _w(D, H), "w2": _w(H, OUT, seed=2)}
    assert pairs_of(make_model(shared, {"x": ["N", D]}, ["y", "z"], init))[1] == []
    moved = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Transpose", ["r"], ["t"], perm=[1, 0]),
             helper.make_node("MatMul", ["t", "w2"], ["y"], name="down")]
    init = {"w1": _w(D, H), "w2": _w(ROWS, OUT, seed=2)}
    assert pairs_of(make_model(moved, {"x": ["N", D]}, ["y"], init))[1] == []


# ------------------------------------------------------------------------------- exactness, prediction


def calibration(model: onnx.ModelProto, count: int = 24, seed: int = 5) -> dict[str, np.ndarray]:
    """`count` samples along the free batch axis, channels correlated and off-centre."""
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim][1:]
    axis = 1 if len(shape) == 3 else -1  # conv channels, else the last axis
    rng = _rng(seed)
    mixing = rng.standard_normal((D, D)) + np.eye(D)
    data = np.moveaxis(np.moveaxis(rng.standard_normal((count, *shape)), axis, -1) @ mixing, -1, axis)
    return {"x": (data + 0.3).astype(np.float32)}


def coupled_candidates(model: onnx.ModelProto, data: dict[str, np.ndarray], method: str = "prune"):
    units, _ = pairs_of(model)
    pairs = find_pairs(units, model)
    samples = load_calibration(data, model)
    statistics = unit_statistics(model, units, samples, list(range(len(samples))), "cpu", batch_size=8)
    candidates = decomposers_for(units, method, statistics)
    couple(pairs, candidates, statistics)
    return candidates


def pair_factors(candidates, k: int):
    (consumer,) = coupled(candidates)
    coupling = consumer.coupling
    option = next(o for o in consumer.options() if o.method == "prune" and o.config == (k,)) if k < consumer.unit.shape[1] \
        else None
    inputs = consumer.factorize(option) if option else consumer._by_method["prune"].factorize((k,))
    factors = {consumer.unit.key: inputs}
    for producer in coupling.producers:
        factors[producer.unit.key] = producer._by_method["prune"].factorize((k,))
    return factors, inputs


def outputs(model, data):
    return run(model, data)


@pytest.mark.parametrize("case", list(MODELS))
def test_keeping_every_channel_is_exact(case):
    model = MODELS[case]()
    data = calibration(model)
    factors, inputs = pair_factors(coupled_candidates(model, data), H)
    assert isinstance(inputs, PrunedInputs) and inputs.predicted_error < 1e-9
    new = build(model, ADAPTERS, factors)
    onnx.checker.check_model(new, full_check=True)
    assert not any("lowrank" in node.name and node.op_type not in ("MatMul", "Gemm", "Conv") for node in new.graph.node)
    (before,), (after,) = outputs(model, data), outputs(new, data)
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4 * np.abs(before).max())


@pytest.mark.parametrize("case", list(MODELS))
def test_the_refit_fed_to_the_original_computes_the_pruned_pair(case):
    """A sensitivity probe feeds the consumer's refit with zeros in the dropped columns to the original's
    session (its producers left whole): the outputs of the pair built pruned, bias shift included."""
    model = MODELS[case]()
    data = calibration(model)
    factors, inputs = pair_factors(coupled_candidates(model, data), H // 3)
    units, _ = pairs_of(model)
    overrides = overrides_for(model, units, {o.name for o in model.graph.output})
    fed = overrides[next(iter(factors))].feed(inputs)
    assert fed is not None
    probing = onnx.ModelProto()
    probing.CopyFrom(model)
    with_overridable(probing, overrides.values())
    (built,), (probed,) = outputs(build(model, ADAPTERS, factors), data), run(probing, {**data, **fed})
    np.testing.assert_allclose(probed, built, rtol=1e-4, atol=1e-5 * np.abs(built).max())


def _unshrunk(self: Moments, target: np.ndarray, covariance=None) -> np.ndarray:
    return np.zeros(self.total.shape[0])


@pytest.mark.parametrize("case", list(MODELS))
def test_predicted_error_is_the_measured_error(case, monkeypatch):
    """Relative to E||B a||^2 (the consumer's output less its bias), over the calibration rows themselves."""
    monkeypatch.setattr(Moments, "shrinkage", _unshrunk)
    model = MODELS[case]()
    data = calibration(model, count=32)
    candidates = coupled_candidates(model, data)
    (before,) = outputs(model, data)
    linear = _linear_outputs(model, data)
    for k in (H // 4, H // 2):
        factors, inputs = pair_factors(candidates, k)
        new = build(model, ADAPTERS, factors)
        (after,) = outputs(new, data)
        after_linear, before_linear = _pre_activation(model, new, data)
        measured = np.sum((after_linear - before_linear) ** 2) / np.sum(linear**2)
        assert 1e-4 < inputs.predicted_error < 1
        assert measured == pytest.approx(inputs.predicted_error, rel=1e-4), (k, measured, inputs.predicted_error)
        assert after.shape == before.shape


def _consumer_output(model: onnx.ModelProto) -> str:
    """The consumer's output before anything after it (its bias Add's output for MatMul + Add)."""
    last = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "Conv")][-1]
    following = [n for n in model.graph.node if last.output[0] in n.input and n.op_type == "Add"]
    return following[0].output[0] if following else last.output[0]


def _with_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.output[:]
    copy.graph.output.append(helper.make_empty_tensor_value_info(name))
    return copy


def _pre_activation(original, new, data):
    name = _consumer_output(original)
    return [outputs(_with_output(m, name), data)[0].astype(np.float64) for m in (new, original)]


def _linear_outputs(model, data) -> np.ndarray:
    """B a: the consumer's output less its bias."""
    (values,) = outputs(_with_output(model, _consumer_output(model)), data)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    last = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "Conv")][-1]
    adds = [n for n in model.graph.node if last.output[0] in n.input and n.op_type == "Add"]
    bias = inits.get(adds[0].input[1]) if adds else (inits.get(last.input[2]) if len(last.input) > 2 else None)
    values = values.astype(np.float64)
    if bias is None:
        return values
    return values - (bias.reshape(1, -1, 1, 1) if values.ndim == 4 else bias)


def test_forward_selection_matches_the_schur_complement():
    rng = _rng(3)
    weight = rng.standard_normal((4, 9))
    root = rng.standard_normal((9, 9))
    moment = root @ root.T + 0.1 * np.eye(9)
    order, errors = forward_selection(weight, moment)
    assert sorted(order) == list(range(9)) and errors[-1] == pytest.approx(0, abs=1e-9)
    for k in range(1, 9):
        kept = order[:k]
        schur = moment - moment[:, kept] @ np.linalg.solve(moment[np.ix_(kept, kept)], moment[kept])
        assert errors[k] == pytest.approx(np.trace(weight @ schur @ weight.T), rel=1e-8)
    assert np.all(np.diff(errors) <= 1e-12)


# ------------------------------------------------------------------------------------- in the allocation


def dead_half(width: int = 16, hidden: int = 32) -> onnx.ModelProto:
    """MatMul + Add -> Relu -> MatMul + Add whose odd hidden channels never fire: pruning them is free."""
    rng = _rng(7)
    bias = rng.uniform(0.5, 1.0, hidden)
    bias[1::2] = -50.0
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="up"), helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y0"], name="down"),
             helper.make_node("Add", ["y0", "b2"], ["y"])]
    init = {"w1": _w(width, hidden), "b1": bias.astype(np.float32), "w2": _w(hidden, width, seed=2),
            "b2": _w(width, seed=3)}
    return make_model(nodes, {"x": ["N", width]}, ["y"], init)


def test_compact_mode_prunes_dead_channels_and_reports_both_layers():
    model = dead_half()
    data = {"x": _rng(1).standard_normal((64, 16)).astype(np.float32)}
    new, report = onnx_lowrank.compress(model, calibration=data, metric="rel-l2", tolerance=1e-3, objective="size",
                                        method="prune")
    rows = {layer.node: layer for layer in report.layers}
    assert {rows["up"].method, rows["down"].method} == {"prune"}
    assert rows["up"].rank == rows["down"].rank <= 16
    k = rows["up"].rank
    assert (rows["up"].params_before, rows["up"].params_after) == (16 * 32, 16 * k)
    assert (rows["down"].params_before, rows["down"].params_after) == (32 * 16, k * 16)
    assert rows["down"].predicted_error < 1e-6 and rows["up"].predicted_error == 0
    assert report.params_after == report.params_before - 2 * 16 * (32 - k) - (32 - k)  # weights and bias entries
    assert [n.op_type for n in new.graph.node] == [n.op_type for n in model.graph.node]  # no node added
    np.testing.assert_allclose(run(new, data)[0], run(model, data)[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(BoundNotMet) as svd:  # without pruning nothing removes parameters within the tolerance
        onnx_lowrank.compress(model, calibration=data, metric="rel-l2", tolerance=1e-3, objective="size", method="svd")
    assert all(layer.method != "prune" for layer in svd.value.report.layers)


def test_the_pair_front_never_splits_a_pair():
    """Along the whole frontier a pruned consumer comes with its producers' rows cut alike (and only then)."""
    model = swiglu()
    candidates = coupled_candidates(model, calibration(model))
    (consumer,) = coupled(candidates)
    producers = [candidates.index(p) for p in consumer.coupling.producers]
    seen = set()
    for choices in frontier(candidates):
        methods = {choices[i].option.method if choices[i].option else None for i in producers}
        mine = choices[candidates.index(consumer)].option
        if mine is not None and mine.method == "prune":
            assert all(choices[i].option.config == mine.config for i in producers)
            seen.add("prune")
        else:
            assert "prune" not in methods
            seen.add("other")
        factors = {c.unit.key: c.factorize(ch.option) for c, ch in zip(candidates, choices) if ch.option}
        build(model, ADAPTERS, factors)  # never an unmatched pair
    assert seen == {"prune", "other"}


def test_an_unmatched_pair_is_refused():
    model = swiglu()
    candidates = coupled_candidates(model, calibration(model))
    factors, _ = pair_factors(candidates, 4)
    (consumer,) = coupled(candidates)
    del factors[consumer.coupling.producers[0].unit.key]
    with pytest.raises(RuntimeError, match="does not keep them"):
        build(model, ADAPTERS, factors)


def test_ppocr_squeeze_excitation_blocks_are_pairs():
    """The real model: MobileNetV3's SE blocks (Conv -> Relu -> 1x1 Conv -> HardSigmoid) and nothing else."""
    model = onnx.load("models/ppocr_cls.onnx")
    units, found = pairs_of(model)
    assert found, "no pair in ppocr_cls"
    plan = {unit.name: unit for unit in units}
    for consumer, (producer,) in found:
        assert plan[consumer].op == plan[producer].op == "Conv"
        assert plan[consumer].shape[1] == plan[producer].shape[0]
        assert plan[consumer].weight.shape[2:] == (1, 1)
