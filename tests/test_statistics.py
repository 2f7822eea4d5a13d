"""Streaming statistics: `Moments` against numpy, and `collect` against activations read from onnxruntime.

`Moments.shrinkage` (the Ledoit-Wolf intensity the data-aware factorization shrinks covariances by) is
checked against the formula computed here row by row, and for how it behaves with many and few rows.

`collect` runs a real onnxruntime session of a model with the observed tensors exposed as extra outputs;
here the same activations are fetched independently (the model with those tensors added as outputs) and
their numpy mean / covariance / second moment are the reference. A Conv observes its input patches
(im2col, computed here independently) when a patch has at most PATCH_LIMIT values, its output channels
otherwise (forced here by patching PATCH_LIMIT to 0); a ConvTranspose always its output channels.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import make_model, run
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from numpy.lib.stride_tricks import sliding_window_view
from onnx import helper

from onnx_lowrank.graph.adapters import ADAPTERS
from onnx_lowrank.graph.adapters import conv as conv_adapter
from onnx_lowrank.graph.imported import import_graph
from onnx_lowrank.graph.layers import find_layers
from onnx_lowrank.observe.calibration import load_calibration
from onnx_lowrank.observe.statistics import Moments, collect

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


# ------------------------------------------------------------------------------ fourth moments, shrinkage


def first_origin(batches: list[np.ndarray]) -> np.ndarray:
    """The origin `Moments` takes its sums about: the mean of the first non-empty batch."""
    return next(b for b in batches if b.shape[1]).astype(np.float64).mean(axis=1)


def ledoit_wolf(rows: np.ndarray, origin: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The intensity per group, written out row by row: the sampling variance of the rows' outer products
    about `origin` (sum_k ||z_k z_k^T - S||_F^2 / n^2, z_k = row_k - origin, S = mean z z^T) over the
    squared distance of the (biased) covariance from the target, clipped to [0, 1]. With `origin` the
    rows' own mean this is Ledoit & Wolf (2004)."""
    n = rows.shape[1]
    z = rows - origin[:, None, :]
    about_origin = np.swapaxes(z, 1, 2) @ z / n
    deviations = z[:, :, :, None] * z[:, :, None, :] - about_origin[:, None]  # (G, n, d, d)
    noise = np.sum(deviations**2, axis=(1, 2, 3)) / n**2
    covariance = numpy_statistics(rows)[1]
    distance = np.sum((covariance - target) ** 2, axis=(1, 2))
    return np.clip(np.maximum(noise / distance, 1.0 - n / rows.shape[2]), 0.0, 1.0)


def scaled_identity(moments: Moments) -> np.ndarray:
    """The input-side prior: the identity scaled to the covariance's trace."""
    covariance = moments.covariance
    dim = covariance.shape[-1]
    return np.eye(dim)[None] * (np.trace(covariance, axis1=1, axis2=2) / dim)[:, None, None]


def decaying_rows(rng, count: int, dim: int, decay: float = -1.0) -> np.ndarray:
    """(1, count, dim) rows with a full but decaying spectrum (variances 1 .. 10^decay), randomly rotated,
    off-centre."""
    rotation = np.linalg.qr(rng.standard_normal((dim, dim)))[0]
    mixing = rotation * np.sqrt(np.logspace(0, decay, dim))
    return (rng.standard_normal((count, dim)) @ mixing.T + rng.standard_normal(dim))[None]


def test_fourth_moment_sums_are_streamed_and_merged():
    rng = np.random.default_rng(5)
    batches = [rng.standard_normal((2, size, 3)) * 2 + 1 for size in (0, 4, 7, 1)]
    moments = accumulate(batches, 2, 3)
    rows = np.concatenate(batches, axis=1)
    expected = np.sum(np.sum((rows - first_origin(batches)[:, None]) ** 2, axis=2) ** 2, axis=1)
    np.testing.assert_allclose(moments.fourth, expected, rtol=1e-12)

    first, second = accumulate(batches[:2], 2, 3), accumulate(batches[2:], 2, 3)
    both = first.merged(second)  # re-expressed exactly about the first part's origin
    np.testing.assert_allclose(both.fourth, expected, rtol=1e-10)
    third = np.einsum("gp,gpd->gd", np.sum((rows - first_origin(batches)[:, None]) ** 2, axis=2),
                      rows - first_origin(batches)[:, None])
    np.testing.assert_allclose(both.third, third, rtol=1e-10, atol=1e-10)
    hand_built = Moments(second.count, second.total, second.outer, second.origin)  # no fourth sums
    assert first.merged(hand_built).fourth is None and hand_built.merged(first).fourth is None
    unchanged = first.merged(Moments.empty(2, 3))  # an empty part changes nothing
    assert np.array_equal(unchanged.fourth, first.fourth) and np.array_equal(unchanged.outer, first.outer)


@settings(max_examples=60, deadline=None)
@given(
    groups=st.integers(1, 3),
    dim=st.integers(2, 6),
    sizes=st.lists(st.integers(0, 9), min_size=1, max_size=4).filter(lambda s: sum(s) >= 2),
    identity_target=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_shrinkage_is_the_ledoit_wolf_intensity_of_the_rows(groups, dim, sizes, identity_target, seed):
    """Against the formula computed row by row about the rows' own mean, whatever the batching, for the
    identity prior and for an arbitrary PSD target."""
    rng = np.random.default_rng(seed)
    offset = rng.standard_normal((groups, 1, dim)) * 3
    mixing = rng.standard_normal((groups, dim, dim))
    batches = [rng.standard_normal((groups, size, dim)) @ mixing + offset for size in sizes]
    rows = np.concatenate(batches, axis=1)
    moments = accumulate(batches, groups, dim)
    if identity_target:
        target = scaled_identity(moments)
    else:
        shape = rng.standard_normal((groups, dim, dim))
        target = shape @ np.swapaxes(shape, 1, 2)
    distance = np.sum((moments.covariance - target) ** 2, axis=(1, 2))
    assume(np.all(distance > 1e-6 * np.sum(moments.covariance**2, axis=(1, 2))))  # the ratio is defined

    found = moments.shrinkage(target)
    assert found.shape == (groups,) and np.all((found >= 0) & (found <= 1))
    expected = ledoit_wolf(rows, rows.mean(axis=1), target)
    # the package takes the variance as fourth / n - ||S||^2: that difference carries float64 rounding
    rounding = 1e-12 * np.sum(np.sum((rows - first_origin(batches)[:, None]) ** 2, axis=2) ** 2, axis=1)
    assert np.all(np.abs(found - expected) <= 1e-9 * expected + rounding / rows.shape[1] ** 2 / distance + 1e-15)

    # all rows in one batch: the origin is their mean, and this is the textbook intensity
    single = accumulate([rows], groups, dim)
    np.testing.assert_allclose(single.shrinkage(target), ledoit_wolf(rows, rows.mean(axis=1), target),
                               rtol=1e-7, atol=1e-12)


def shrinkage_intensities(dim: int, counts: list[int], draws: int = 10) -> np.ndarray:
    """(draws, len(counts)): the shrinkage intensity of `count` decaying-spectrum rows, per seed."""
    intensities = np.zeros((draws, len(counts)))
    for seed in range(draws):
        rng = np.random.default_rng(seed)
        for j, count in enumerate(counts):
            moments = accumulate([decaying_rows(rng, count, dim)], 1, dim)
            intensities[seed, j] = moments.shrinkage(scaled_identity(moments))[0]
    return intensities


def test_shrinkage_vanishes_with_many_rows_and_grows_as_rows_get_fewer():
    """16 dims, a decaying spectrum: near 0 with thousands of rows per dimension, falling like 1/rows,
    large once there are about as many rows as dimensions. Averaged over draws for the ordering."""
    dim, counts = 16, [50_000, 5_000, 500, 64, 16]
    intensities = shrinkage_intensities(dim, counts)
    assert np.all((intensities >= 0) & (intensities <= 1))
    assert np.all(intensities[:, 0] < 1e-3), intensities[:, 0]
    mean = intensities.mean(axis=0)
    assert np.all(np.diff(mean) > 0), mean
    assert 7 < mean[1] / mean[0] < 13 and 7 < mean[2] / mean[1] < 13, mean  # ~ 1 / rows when small
    assert mean[-1] > 0.5, mean  # one row per dimension: the covariance's own shape is mostly noise

    # rows that truly have the prior's shape (white): shrunk most of the way, whatever their number
    rng = np.random.default_rng(1)
    for count in (500, 64):
        white = [accumulate([rng.standard_normal((1, count, dim))], 1, dim) for _ in range(10)]
        assert np.mean([m.shrinkage(scaled_identity(m))[0] for m in white]) > 0.85


def test_moments_without_fourth_sums_or_rows_are_handled():
    rng = np.random.default_rng(6)
    rows = rng.standard_normal((2, 5, 3))
    streamed = accumulate([rows], 2, 3)
    hand_built = Moments(streamed.count, streamed.total, streamed.outer, streamed.origin)  # fourth=None
    assert np.array_equal(hand_built.shrinkage(scaled_identity(hand_built)), np.zeros(2))  # not shrunk
    assert np.all(streamed.shrinkage(scaled_identity(streamed)) > 0)
    for count in (0, 1):  # no spread at all: the covariance is zero, so is its target; any intensity is moot
        moments = accumulate([rows[:, :count]], 2, 3)
        found = moments.shrinkage(scaled_identity(moments))
        assert found.shape == (2,) and np.all(np.isfinite(found)) and np.all((found >= 0) & (found <= 1))
        assert np.all(scaled_identity(moments) == 0)


def test_shrinkage_keeps_growing_down_to_two_rows():
    dim, counts = 64, [16, 8, 4, 3, 2]
    intensities = shrinkage_intensities(dim, counts)
    mean = intensities.mean(axis=0)
    assert np.all(np.diff(mean) >= -0.02), mean


def test_shrinkage_does_not_depend_on_batching():
    dim = 64
    one_batch, batches_of_five = [], []
    for seed in range(10):
        rows = decaying_rows(np.random.default_rng(seed), 16, dim)
        one = accumulate([rows], 1, dim)
        five = accumulate([rows[:, s : s + 5] for s in range(0, 16, 5)], 1, dim)
        np.testing.assert_allclose(five.covariance, one.covariance, rtol=1e-9, atol=1e-12)
        one_batch.append(one.shrinkage(scaled_identity(one))[0])
        batches_of_five.append(five.shrinkage(scaled_identity(five))[0])
    np.testing.assert_allclose(batches_of_five, one_batch, rtol=1e-9)


# ------------------------------------------------------------------------------------------- collect


def several_layers_model() -> onnx.ModelProto:
    """Three MatMuls on one graph input (q, k, v), a MatMul + Add on their sum; a Conv, a grouped Conv
    followed by BatchNormalization, a pooled Gemm (transB=1) on a second input; a ConvTranspose (stride 2)
    on the first conv's activations."""
    rng = np.random.default_rng(0)

    def w(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    initializers = {
        "wq": w(16, 12), "wk": w(16, 12), "wv": w(16, 12), "w4": w(12, 6), "b4": w(6),
        "c1w": w(6, 3, 3, 3), "c1b": w(6), "c2w": w(8, 3, 3, 3),
        "gamma": w(8), "beta": w(8), "mu": w(8), "var": (rng.uniform(0.5, 2, 8)).astype(np.float32),
        "gw": w(4, 8), "gb": w(4), "dw": w(6, 4, 2, 2),
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
        helper.make_node("ConvTranspose", ["r1", "dw"], ["out3"], name="deconv", strides=[2, 2]),
    ]
    inputs = {"x": ["n", 5, 16], "img": ["n", 3, 8, 8]}
    return make_model(nodes, inputs, ["out1", "out2", "out3"], initializers)


def patch_rows(x: np.ndarray, kernel: tuple[int, int], pad: int, groups: int) -> np.ndarray:
    """im2col of a stride-1 2-D convolution with symmetric padding: (G, N*Ho*Wo, Cin/G*kh*kw), sample-major
    then positions in C order, each patch flattened like a (Cin/G, kh, kw) kernel slice."""
    x = np.pad(np.asarray(x, dtype=np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    windows = sliding_window_view(x, kernel, axis=(2, 3))  # (N, C, Ho, Wo, kh, kw)
    n, c, ho, wo = windows.shape[:4]
    windows = windows.reshape(n, groups, c // groups, ho, wo, *kernel).transpose(1, 0, 3, 4, 2, 5, 6)
    return windows.reshape(groups, n * ho * wo, -1)


def channel_rows(y: np.ndarray, groups: int) -> np.ndarray:
    """Output channels as rows: (G, N * positions, C / G)."""
    return np.moveaxis(y, 1, -1).reshape(-1, groups, y.shape[1] // groups).swapaxes(0, 1)


def expected_rows(activations: dict[str, np.ndarray], conv_side: str) -> dict[str, np.ndarray]:
    """Per layer name, the (G, positions, d) rows it observes, computed here from the activations."""
    if conv_side == "input":
        c1 = patch_rows(activations["img"], (3, 3), 1, 1)
        c2 = patch_rows(activations["r1"], (3, 3), 1, 2)
    else:
        c1, c2 = channel_rows(activations["c1"], 1), channel_rows(activations["c2"], 2)
    x = activations["x"].reshape(1, -1, 16)
    return {
        "q": x, "k": x, "v": x,
        "proj": activations["s"].reshape(1, -1, 12),
        "conv1": c1, "conv2": c2,
        "gemm": activations["flat"][None],
        "deconv": channel_rows(activations["out3"], 1),
    }


@pytest.mark.parametrize("conv_side", ["input", "output"])
def test_collect_matches_numpy_statistics_of_the_activations(conv_side, monkeypatch):
    if conv_side == "output":
        monkeypatch.setattr(conv_adapter, "PATCH_LIMIT", 0)
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
    assert sorted(names) == sorted(["q", "k", "v", "proj", "conv1", "conv2", "gemm", "deconv"]), plan.skipped
    sides = {layer.node.name: layer.adapter.observed(layer)[1] for layer in layers}
    assert sides["conv1"] == sides["conv2"] == conv_side and sides["deconv"] == "output"
    indices = [0, 2, 3, 5, 6, 7, 9, 10, 12, 13, 1]  # a subset, not in order, 11 = 2 * 4 + 3 samples

    covered = []
    moments = collect(model, layers, samples, indices, "cpu", batch_size=4, progress=covered.append)
    assert model.SerializeToString() == before, "collect changed the model it was given"
    assert sum(covered) == len(indices)

    # reference: the same model with the observed tensors as extra outputs, on the same samples at once
    probing = onnx.ModelProto()
    probing.CopyFrom(model)
    extra = ["s", "c1", "r1", "c2", "flat"]
    probing.graph.output.extend(onnx.ValueInfoProto(name=name) for name in extra)
    feed = {name: array[indices] for name, array in arrays.items()}
    activations = dict(zip(["out1", "out2", "out3", *extra], run(probing, feed)))
    activations |= feed
    reference = expected_rows(activations, conv_side)

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


@pytest.mark.parametrize("conv_side", ["input", "output"])
def test_collect_on_a_layer_whose_output_is_already_a_graph_output(conv_side, monkeypatch):
    """Output side: the observed tensor is a graph output already. Input side: it is a graph input (fed, not
    fetched)."""
    if conv_side == "output":
        monkeypatch.setattr(conv_adapter, "PATCH_LIMIT", 0)
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("Conv", ["img", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    model = make_model(nodes, {"img": ["n", 3, 5, 5]}, ["y"],
                       {"w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
                        "b": rng.standard_normal(4).astype(np.float32)})
    before = model.SerializeToString()
    images = rng.standard_normal((5, 3, 5, 5)).astype(np.float32)
    plan = find_layers(import_graph(model).graph, model, ADAPTERS)
    layer = plan.units[0].layers[0]
    assert layer.adapter.observed(layer) == (layer.node.inputs[0] if conv_side == "input" else layer.node.outputs[0], conv_side)
    found = collect(model, [layer], load_calibration({"img": images}, model), list(range(5)), "cpu")[0]
    assert model.SerializeToString() == before
    if conv_side == "output":
        rows = channel_rows(run(model, {"img": images})[0], 1).astype(np.float64)
    else:
        rows = patch_rows(images, (3, 3), 1, 1)
    mean, covariance, _ = numpy_statistics(rows)
    assert found.count == 5 * 25
    np.testing.assert_allclose(found.mean, mean, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(found.covariance, covariance, rtol=1e-8, atol=1e-9)
