"""`conv_patches` (im2col), the rows a Conv layer's input statistics are taken on, against onnxruntime.

For any Conv (1-D to 3-D, strides, dilations, explicit asymmetric pads, auto_pad SAME_UPPER / SAME_LOWER /
VALID, groups 1 / 2 / depthwise) the rows (G, P, d) times the flattened kernel (G, Cout / G, d) must be
onnxruntime's Conv output (no bias) at every output position, in the order (sample, *output position).
Beyond MAX_ROWS positions a seeded random subset of those rows is kept: every kept row is one of the full
set's (without repeats), and the same seed keeps the same subset.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from conftest import make_model, run
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from onnx import helper

from onnx_lowrank.graph.adapters import ADAPTERS
from onnx_lowrank.graph.adapters import conv as conv_adapter
from onnx_lowrank.graph.adapters import im2col as patches
from onnx_lowrank.graph.adapters.im2col import conv_pads, conv_patches
from onnx_lowrank.graph.imported import import_graph
from onnx_lowrank.graph.layers import find_layers


def conv_model(x_shape, kernel: np.ndarray, attrs: dict):
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", **attrs)
    return make_model([node], {"x": list(x_shape)}, ["y"], {"w": kernel})


def output_rows(y: np.ndarray, groups: int) -> np.ndarray:
    """ORT's (N, Cout, *out) output as (G, N * prod(out), Cout / G): sample-major, then positions in C order."""
    per_group = y.shape[1] // groups
    flat = np.moveaxis(y, 1, -1).reshape(-1, groups, per_group)
    return flat.swapaxes(0, 1).astype(np.float64)


def through_patches(x: np.ndarray, kernel: np.ndarray, attrs: dict, groups: int) -> np.ndarray:
    rows = conv_patches(x, tuple(kernel.shape[2:]), attrs, groups)
    d = kernel.shape[1] * math.prod(kernel.shape[2:])
    assert rows.shape[0] == groups and rows.shape[2] == d
    matrices = kernel.astype(np.float64).reshape(groups, kernel.shape[0] // groups, d)
    return rows.astype(np.float64) @ np.swapaxes(matrices, 1, 2)


@st.composite
def conv_cases(draw):
    rank = draw(st.integers(1, 3))
    auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET-no-pads", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    largest = {1: 9, 2: 7, 3: 5}[rank]
    kernel = [draw(st.integers(1, 3)) for _ in range(rank)]
    strides = [draw(st.integers(1, 3)) for _ in range(rank)]
    same = auto_pad.startswith("SAME")
    dilations = [1] * rank if same else [draw(st.integers(1, 3)) for _ in range(rank)]  # ORT: no dilation with SAME
    spatial = [draw(st.integers(1, largest)) for _ in range(rank)]
    pads = [draw(st.integers(0, 2)) for _ in range(2 * rank)]
    attrs: dict = {"kernel_shape": kernel}
    if draw(st.booleans()) or any(s > 1 for s in strides):
        attrs["strides"] = strides
    if any(d > 1 for d in dilations) or draw(st.booleans()):
        attrs["dilations"] = dilations
    if auto_pad == "NOTSET":
        attrs["pads"] = pads
    elif auto_pad != "NOTSET-no-pads":
        attrs["auto_pad"] = auto_pad
    begin, end = (pads[:rank], pads[rank:]) if auto_pad == "NOTSET" else ([0] * rank, [0] * rank)
    if not same:  # every output axis must have at least one position
        assume(all(s + b + e >= (k - 1) * d + 1 for s, b, e, k, d in zip(spatial, begin, end, kernel, dilations)))
    layout = draw(st.sampled_from(["dense", "two-groups", "depthwise"]))
    per_group_in = draw(st.integers(1, 3))
    per_group_out = draw(st.integers(1, 3))
    groups = {"dense": 1, "two-groups": 2, "depthwise": draw(st.integers(2, 4))}[layout]
    if layout == "depthwise":
        per_group_in = 1
    if groups > 1:
        attrs["group"] = groups
    batch = draw(st.integers(1, 2))
    seed = draw(st.integers(0, 2**16))
    return batch, groups * per_group_in, groups * per_group_out, spatial, kernel, attrs, groups, seed


@settings(max_examples=120, deadline=None)
@given(case=conv_cases())
def test_patches_times_kernel_is_the_onnxruntime_conv(case):
    batch, c_in, c_out, spatial, kernel_shape, attrs, groups, seed = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, c_in, *spatial)).astype(np.float32)
    kernel = rng.standard_normal((c_out, c_in // groups, *kernel_shape)).astype(np.float32)
    reference = run(conv_model(x.shape, kernel, attrs), {"x": x})[0]
    expected = output_rows(reference, groups)
    assert expected.shape[1] <= patches.MAX_ROWS  # small enough: every position is kept
    got = through_patches(x, kernel, attrs, groups)
    assert got.shape == expected.shape
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER"])
def test_same_padding_puts_the_odd_pixel_where_onnx_says(auto_pad):
    """Even kernel, stride 1: one pixel of padding in all, at the end (UPPER) or at the start (LOWER)."""
    begin, end = conv_pads({"auto_pad": auto_pad}, (6, 5), (2, 4))
    if auto_pad == "SAME_UPPER":
        assert (begin, end) == ([0, 1], [1, 2])
    else:
        assert (begin, end) == ([1, 2], [0, 1])
    # bytes, as onnx attributes may come, are read the same
    assert conv_pads({"auto_pad": auto_pad.encode()}, (6, 5), (2, 4)) == (begin, end)


def rows_multiset(rows: np.ndarray) -> Counter:
    return Counter(row.tobytes() for row in np.ascontiguousarray(rows.swapaxes(0, 1).reshape(rows.shape[1], -1)))


@settings(max_examples=60, deadline=None)
@given(
    rank=st.integers(1, 3),
    size=st.integers(2, 6),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    groups=st.sampled_from([1, 2]),
    limit=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_beyond_max_rows_a_seeded_subset_of_the_rows_is_kept(rank, size, kernel, stride, groups, limit, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 2 * groups, *[size] * rank)).astype(np.float32)
    attrs = {"strides": [stride] * rank, "pads": [1] * (2 * rank)}
    shape = (kernel,) * rank
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(patches, "MAX_ROWS", 10**9)
        full = conv_patches(x, shape, attrs, groups)
        patch.setattr(patches, "MAX_ROWS", limit)
        kept = conv_patches(x, shape, attrs, groups, seed=seed)
        again = conv_patches(x, shape, attrs, groups, seed=seed)
    positions = full.shape[1]
    assert kept.shape == (groups, min(positions, limit), full.shape[2])
    if positions <= limit:
        assert np.array_equal(kept, full)  # nothing dropped, nothing reordered
    else:
        # a subset of the rows, without repeats (as a multiset: rows in the padding may coincide)
        whole, subset = rows_multiset(full), rows_multiset(kept)
        assert all(count <= whole[row] for row, count in subset.items())
    assert np.array_equal(kept, again)


def test_more_than_max_rows_real_limit():
    """At the real MAX_ROWS: 2 x 96 x 96 = 18432 positions > 16384; the subset is deterministic in the
    seed, differs between seeds, and is a subset of the full set of patches."""
    assert patches.MAX_ROWS == 16384
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 96, 96)).astype(np.float32)
    attrs = {"pads": [1, 1, 1, 1]}
    kept = conv_patches(x, (3, 3), attrs, 1)
    assert kept.shape == (1, patches.MAX_ROWS, 27)
    assert np.array_equal(kept, conv_patches(x, (3, 3), attrs, 1))
    other = conv_patches(x, (3, 3), attrs, 1, seed=1)
    assert not np.array_equal(kept, other)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(patches, "MAX_ROWS", 10**9)
        full = conv_patches(x, (3, 3), attrs, 1)
    assert full.shape == (1, 2 * 96 * 96, 27)
    whole = rows_multiset(full)
    for chosen in (kept, other):
        subset = rows_multiset(chosen)
        assert sum(subset.values()) == patches.MAX_ROWS
        assert all(count <= whole[row] for row, count in subset.items())


# ------------------------------------------------------------------------ the Conv adapter's two sides


def adapter_layer(model):
    plan = find_layers(import_graph(model).graph, model, ADAPTERS)
    assert len(plan.units) == 1, plan.skipped
    return plan.units[0].layers[0]


def test_conv_side_switches_at_the_patch_limit():
    """A patch of PATCH_LIMIT values is observed on the input (patches); one more value, on the output."""
    limit = conv_adapter.PATCH_LIMIT
    assert limit == 4096
    at = np.zeros((4, limit // 4, 2, 2), np.float32)  # Cin * kh * kw = limit
    over = np.zeros((4, limit // 4 + 1, 2, 2), np.float32)
    for kernel, side in ((at, "input"), (over, "output")):
        model = conv_model((1, kernel.shape[1], 3, 3), kernel, {})
        layer = adapter_layer(model)
        tensor, found = layer.adapter.observed(layer)
        assert found == side
        assert tensor.name == ("x" if side == "input" else "y")


def test_conv_adapter_rows_are_the_patches_with_the_nodes_own_attributes():
    """Through onnx-graphsurgeon (attributes as it reads them: auto_pad a str, lists of ints), the adapter's
    rows are the patches; times the layer's matrices they give onnxruntime's output."""
    rng = np.random.default_rng(3)
    kernel = rng.standard_normal((6, 2, 3, 2)).astype(np.float32)
    attrs = {"auto_pad": "SAME_LOWER", "strides": [2, 1], "group": 2}
    x = rng.standard_normal((2, 4, 7, 6)).astype(np.float32)
    model = conv_model(x.shape, kernel, attrs)
    layer = adapter_layer(model)
    assert layer.adapter.observed(layer)[1] == "input"
    rows = layer.adapter.rows(layer, x)
    np.testing.assert_array_equal(rows, conv_patches(x, (3, 2), attrs, 2))
    got = rows.astype(np.float64) @ np.swapaxes(layer.matrices, 1, 2)
    np.testing.assert_allclose(got, output_rows(run(model, {"x": x})[0], 2), atol=1e-5)
