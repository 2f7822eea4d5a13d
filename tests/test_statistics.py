"""Streaming statistics: `Moments` against numpy, and `collect` against activations read from onnxruntime.

`collect` runs a real onnxruntime session of a model with the observed tensors exposed as extra outputs;
here the same activations are fetched independently (the model with those tensors added as outputs) and
their numpy mean / covariance / second moment are the reference.
"""

from __future__ import annotations

import numpy as np
import onnx
from conftest import make_model, run
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from onnx_lowrank.adapters import ADAPTERS
from onnx_lowrank.calibration import load_calibration
from onnx_lowrank.layers import find_layers
from onnx_lowrank.splice import import_graph
from onnx_lowrank.statistics import Moments, collect

# ------------------------------------------------------------------------------------------- Moments


def numpy_statistics(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, biased covariance and second moment per group of (G, P, d) rows, straight from numpy."""
    mean = rows.mean(axis=1)
    covariance = np.stack([np.atleast_2d(np.cov(group.T, bias=True)) for group in rows])
    second = np.stack([group.T @ group / group.shape[0] for group in rows])
    return mean, covariance, second


def accumulate(batches: list[np.ndarray], groups: int, dim: int) -> Moments:
    moments = Moments.empty(groups, dim)
    for batch in batches:
        moments.add(batch)
    return moments


@settings(max_examples=60, deadline=None)
@given(
    groups=st.integers(1, 3),
    dim=st.integers(1, 6),
    sizes=st.lists(st.integers(0, 7), min_size=1, max_size=5).filter(lambda s: sum(s) >= 1),
    split_at=st.integers(0, 5),
    seed=st.integers(0, 2**16),
)
def test_streaming_moments_match_numpy_on_all_rows(groups, dim, sizes, split_at, seed):
    rng = np.random.default_rng(seed)
    offset = rng.standard_normal((groups, 1, dim)) * 3
    mixing = rng.standard_normal((groups, dim, dim))
    batches = [rng.standard_normal((groups, size, dim)) @ mixing + offset for size in sizes]
    batches[0] = batches[0].astype(np.float32)  # a float32 batch is accumulated in float64 like the others
    everything = np.concatenate([b.astype(np.float64) for b in batches], axis=1)

    moments = accumulate(batches, groups, dim)
    mean, covariance, second = numpy_statistics(everything)
    assert moments.count == everything.shape[1]
    np.testing.assert_allclose(moments.mean, mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(moments.second_moment, second, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(moments.covariance, covariance, rtol=1e-8, atol=1e-10)
    assert np.array_equal(moments.covariance, np.swapaxes(moments.covariance, 1, 2))
    assert np.all(np.linalg.eigvalsh(moments.covariance) >= -1e-9 * max(1.0, np.abs(covariance).max()))

    # merged == accumulating both parts; the two parts are left as they were
    cut = min(split_at, len(batches))
    first, second_part = accumulate(batches[:cut], groups, dim), accumulate(batches[cut:], groups, dim)
    first_before = (first.count, first.total.copy(), first.outer.copy())
    both = first.merged(second_part)
    assert both.count == moments.count
    np.testing.assert_allclose(both.mean, moments.mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(both.second_moment, moments.second_moment, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(both.covariance, moments.covariance, rtol=1e-8, atol=1e-10)
    assert first.count == first_before[0]
    assert np.array_equal(first.total, first_before[1]) and np.array_equal(first.outer, first_before[2])


def test_empty_moments_are_zero_not_nan():
    moments = Moments.empty(2, 3)
    for value in (moments.mean, moments.second_moment, moments.covariance):
        assert np.all(value == 0)
    moments.add(np.zeros((2, 0, 3)))  # an empty batch changes nothing
    assert moments.count == 0 and np.all(moments.covariance == 0)


def test_groups_are_kept_apart():
    rng = np.random.default_rng(3)
    rows = np.stack([rng.standard_normal((50, 4)) + 10, rng.standard_normal((50, 4)) * 0.1])
    moments = accumulate([rows[:, :20], rows[:, 20:]], 2, 4)
    mean, covariance, _ = numpy_statistics(rows)
    np.testing.assert_allclose(moments.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(moments.covariance, covariance, rtol=1e-9, atol=1e-12)
    assert moments.mean[0].min() > 5 and np.abs(moments.mean[1]).max() < 1


# ------------------------------------------------------------------------------------------- collect


def several_layers_model() -> onnx.ModelProto:
    """Three MatMuls on one graph input (q, k, v), a MatMul + Add on their sum; a Conv, a grouped Conv
    followed by BatchNormalization, a pooled Gemm (transB=1) on a second input."""
    rng = np.random.default_rng(0)

    def w(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    initializers = {
        "wq": w(16, 12), "wk": w(16, 12), "wv": w(16, 12), "w4": w(12, 6), "b4": w(6),
        "c1w": w(6, 3, 3, 3), "c1b": w(6), "c2w": w(8, 3, 3, 3),
        "gamma": w(8), "beta": w(8), "mu": w(8), "var": (rng.uniform(0.5, 2, 8)).astype(np.float32),
        "gw": w(4, 8), "gb": w(4),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"], name="q"),
        helper.make_node("MatMul", ["x", "wk"], ["k"], name="k"),
        helper.make_node("MatMul", ["x", "wv"], ["v"], name="v"),
        helper.make_node("Add", ["q", "k"], ["qk"], name="add_qk"),
        helper.make_node("Add", ["qk", "v"], ["s"], name="add_s"),
        helper.make_node("MatMul", ["s", "w4"], ["t"], name="proj"),
        helper.make_node("Add", ["t", "b4"], ["out1"], name="proj_bias"),
        helper.make_node("Conv", ["img", "c1w", "c1b"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node("Conv", ["r1", "c2w"], ["c2"], name="conv2", pads=[1, 1, 1, 1], group=2),
        helper.make_node("BatchNormalization", ["c2", "gamma", "beta", "mu", "var"], ["bn"], name="bn"),
        helper.make_node("GlobalAveragePool", ["bn"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "gw", "gb"], ["out2"], name="gemm", transB=1),
    ]
    inputs = {"x": ["n", 5, 16], "img": ["n", 3, 8, 8]}
    return make_model(nodes, inputs, ["out1", "out2"], initializers)


def expected_rows(activations: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per layer name, the (G, positions, d) rows it observes, computed here from the activations."""
    c1 = np.moveaxis(activations["c1"], 1, -1).reshape(1, -1, 6)
    c2 = np.moveaxis(activations["c2"], 1, -1).reshape(-1, 2, 4).swapaxes(0, 1)
    x = activations["x"].reshape(1, -1, 16)
    return {
        "q": x, "k": x, "v": x,
        "proj": activations["s"].reshape(1, -1, 12),
        "conv1": c1, "conv2": c2,
        "gemm": activations["flat"][None],
    }


def test_collect_matches_numpy_statistics_of_the_activations():
    model = several_layers_model()
    before = model.SerializeToString()
    rng = np.random.default_rng(1)
    arrays = {
        "x": (rng.standard_normal((14, 5, 16)) + 0.5).astype(np.float32),
        "img": rng.standard_normal((14, 3, 8, 8)).astype(np.float32),
    }
    samples = load_calibration(arrays, model)
    plan = find_layers(import_graph(model).graph, model, ADAPTERS)
    layers = [layer for unit in plan.units for layer in unit.layers]
    names = [layer.node.name for layer in layers]
    assert sorted(names) == sorted(["q", "k", "v", "proj", "conv1", "conv2", "gemm"]), plan.skipped
    indices = [0, 2, 3, 5, 6, 7, 9, 10, 12, 13, 1]  # a subset, not in order, 11 = 2 * 4 + 3 samples

    covered = []
    moments = collect(model, layers, samples, indices, "cpu", batch_size=4, progress=covered.append)
    assert model.SerializeToString() == before, "collect changed the model it was given"
    assert sum(covered) == len(indices)

    # reference: the same model with the observed tensors as extra outputs, on the same samples at once
    probing = onnx.ModelProto()
    probing.CopyFrom(model)
    extra = ["s", "c1", "c2", "flat"]
    probing.graph.output.extend(onnx.ValueInfoProto(name=name) for name in extra)
    feed = {name: array[indices] for name, array in arrays.items()}
    activations = dict(zip(["out1", "out2", *extra], run(probing, feed)))
    activations["x"] = feed["x"]
    reference = expected_rows(activations)

    for name, found in zip(names, moments):
        rows = reference[name].astype(np.float64)
        mean, covariance, second = numpy_statistics(rows)
        assert found.count == rows.shape[1], name
        np.testing.assert_allclose(found.mean, mean, rtol=1e-9, atol=1e-9, err_msg=name)
        np.testing.assert_allclose(found.second_moment, second, rtol=1e-9, atol=1e-9, err_msg=name)
        np.testing.assert_allclose(found.covariance, covariance, rtol=1e-8, atol=1e-9, err_msg=name)

    # the three layers on the same graph input see equal statistics
    by_name = dict(zip(names, moments))
    for other in ("k", "v"):
        assert by_name[other].count == by_name["q"].count
        assert np.array_equal(by_name[other].mean, by_name["q"].mean)
        assert np.array_equal(by_name[other].covariance, by_name["q"].covariance)

    # one observed tensor per pass (several sessions) gives the same statistics as one pass
    one_at_a_time = collect(model, layers, samples, indices, "cpu", batch_size=4, max_outputs=1)
    assert model.SerializeToString() == before
    for name, many, one in zip(names, moments, one_at_a_time):
        assert one.count == many.count, name
        np.testing.assert_allclose(one.mean, many.mean, rtol=1e-12, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(one.covariance, many.covariance, rtol=1e-12, atol=1e-12, err_msg=name)


def test_collect_is_independent_of_batch_size_and_layer_order():
    model = several_layers_model()
    rng = np.random.default_rng(2)
    arrays = {
        "x": rng.standard_normal((6, 5, 16)).astype(np.float32),
        "img": rng.standard_normal((6, 3, 8, 8)).astype(np.float32),
    }
    samples = load_calibration(arrays, model)
    plan = find_layers(import_graph(model).graph, model, ADAPTERS)
    layers = [layer for unit in plan.units for layer in unit.layers]
    everything = list(range(6))
    batched = collect(model, layers, samples, everything, "cpu", batch_size=8)
    single = collect(model, layers[::-1], samples, everything, "cpu", batch_size=1)[::-1]
    for layer, a, b in zip(layers, batched, single):
        assert a.count == b.count, layer.node.name
        np.testing.assert_allclose(a.mean, b.mean, rtol=1e-9, atol=1e-9, err_msg=layer.node.name)
        np.testing.assert_allclose(a.covariance, b.covariance, rtol=1e-9, atol=1e-9, err_msg=layer.node.name)


def test_collect_on_a_layer_whose_output_is_already_a_graph_output():
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("Conv", ["img", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    model = make_model(nodes, {"img": ["n", 3, 5, 5]}, ["y"],
                       {"w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
                        "b": rng.standard_normal(4).astype(np.float32)})
    before = model.SerializeToString()
    images = rng.standard_normal((5, 3, 5, 5)).astype(np.float32)
    plan = find_layers(import_graph(model).graph, model, ADAPTERS)
    layer = plan.units[0].layers[0]
    found = collect(model, [layer], load_calibration({"img": images}, model), list(range(5)), "cpu")[0]
    assert model.SerializeToString() == before
    rows = np.moveaxis(run(model, {"img": images})[0], 1, -1).reshape(1, -1, 4).astype(np.float64)
    mean, covariance, _ = numpy_statistics(rows)
    assert found.count == 5 * 25
    np.testing.assert_allclose(found.mean, mean, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(found.covariance, covariance, rtol=1e-8, atol=1e-9)
