"""Sensitivity probes: fed to the original's session they compute what the built factorized model computes;
large models probe on fewer samples.

For every unit an override takes: the original model with the unit's weight (and bias) as graph inputs,
fed the factors' product, gives the outputs of the model built with the factor chain (real onnxruntime
sessions of both), for Gemm, MatMul, Conv, ConvTranspose and Gather under their attributes, weights
behind chains and in Constant nodes, and factors that shift the bias.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import assert_close, one_node_model, random_feeds, run, session
from hypothesis import given, settings
from hypothesis import strategies as st
from test_exactness import C_SHAPES, constant_node, conv_cases, conv_model, gemm_model, weights

from onnx_lowrank.check.evaluator import Evaluator
from onnx_lowrank.check.overrides import overrides_for, with_overridable
from onnx_lowrank.choose.sensitivity import (
    PROBE_ERROR,
    PROBE_MIN_SAMPLES,
    PROBE_SAMPLES,
    positions_of,
    positions_seen,
    probe_count,
    sensitivities,
)
from onnx_lowrank.factorize.menu import coupled
from onnx_lowrank.factorize.prune import couple, find_pairs
from onnx_lowrank.factorize.registry import decomposers_for
from onnx_lowrank.factorize.rewrite import build
from onnx_lowrank.factorize.svd import TruncatedSVD
from onnx_lowrank.graph.adapters import ADAPTERS
from onnx_lowrank.graph.imported import import_graph
from onnx_lowrank.graph.layers import find_layers
from onnx_lowrank.graph.splice import Factorization
from onnx_lowrank.observe.activations import activation_shapes
from onnx_lowrank.observe.calibration import load_calibration
from onnx_lowrank.observe.statistics import Moments, unit_statistics

MODELS = Path(__file__).resolve().parents[1] / "models"
ort.set_default_logger_severity(3)  # fed initializers are graph inputs: onnxruntime warns about each


def units_of(model: onnx.ModelProto):
    return find_layers(import_graph(model).graph, model, ADAPTERS).units


def probing(model: onnx.ModelProto, overrides) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return with_overridable(copy, overrides.values())


def halved(unit, shift: bool, seed: int = 0) -> Factorization:
    """The unit's SVD at half its full rank; with a random bias shift when asked."""
    factors = TruncatedSVD(unit.matrices).factorize(max(1, unit.full_rank // 2))
    if shift:
        groups, out_dim, _ = unit.matrix_shape
        factors = replace(factors, bias_shift=np.random.default_rng(seed).standard_normal((groups, out_dim)))
    return factors


def assert_fed_as_built(model: onnx.ModelProto, shift: bool = False, feeds=None) -> int:
    """Every unit with an override: fed outputs == built outputs. Returns how many units were fed."""
    feeds = random_feeds(model) if feeds is None else feeds
    units = units_of(model)
    overrides = overrides_for(model, units, {o.name for o in model.graph.output})
    fed_session = session(probing(model, overrides))
    assert_close(run(model, feeds), fed_session.run(None, feeds))  # not fed: the original
    fed_units = 0
    for unit in units:
        override = overrides.get(unit.key)
        factors = halved(unit, shift)
        fed = None if override is None else override.feed(factors)
        if fed is None:
            continue
        fed_units += 1
        built = build(model, ADAPTERS, {unit.key: factors})
        assert_close(run(built, feeds), fed_session.run(None, {**feeds, **fed}))
    return fed_units


@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 5), k=st.integers(1, 5), n=st.integers(1, 5), trans_a=st.booleans(), trans_b=st.booleans(),
       alpha=st.sampled_from([1.0, -2.0]), beta=st.sampled_from([1.0, 0.25]), c_kind=st.sampled_from([None, *C_SHAPES]),
       side=st.sampled_from(["A", "B"]), shift=st.booleans(), seed=st.integers(0, 2**16))
def test_gemm(m, k, n, trans_a, trans_b, alpha, beta, c_kind, side, shift, seed):
    model = gemm_model(seed, m, k, n, trans_a, trans_b, alpha, beta, c_kind, 13, const_side=side)
    fed = assert_fed_as_built(model, shift)
    if not shift or c_kind in ("N", "1N", None) and side == "B":
        assert fed == 1  # a per-channel bias initializer (added if absent) takes the shift


@settings(max_examples=40, deadline=None)
@given(case=conv_cases(transpose=False), shift=st.booleans())
def test_conv(case, shift):
    assert assert_fed_as_built(conv_model(case, transpose=False), shift) == 1  # a bias input is added if absent


@settings(max_examples=40, deadline=None)
@given(case=conv_cases(transpose=True), shift=st.booleans())
def test_conv_transpose(case, shift):
    assert assert_fed_as_built(conv_model(case, transpose=True), shift) == 1


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("weight_batch", [(), (3,)])
def test_matmul(side, weight_batch):
    weight = weights(1, *weight_batch, 4, 5)
    inputs = ["x", "w"] if side == "right" else ["w", "x"]
    x_shape = (3, 2, 4) if side == "right" else (3, 5, 2)
    assert assert_fed_as_built(one_node_model("MatMul", inputs, {"x": x_shape}, {"w": weight})) == 1


def test_gather_and_constant_node_and_transpose_chain():
    table = weights(2, 10, 6)
    w = weights(3, 6, 4)  # in a Constant node, reached through two Transposes
    nodes = [
        constant_node("w_stored", w),
        onnx.helper.make_node("Transpose", ["w_stored"], ["w_t"], perm=[1, 0]),
        onnx.helper.make_node("Gather", ["table", "ids"], ["rows"]),
        onnx.helper.make_node("MatMul", ["rows", "w_t_back"], ["y"]),
        onnx.helper.make_node("Transpose", ["w_t"], ["w_t_back"], perm=[1, 0]),
    ]
    graph = onnx.helper.make_graph(
        [nodes[0], nodes[1], nodes[4], nodes[2], nodes[3]], "g",
        [onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [2, 3])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(table, "table")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    feeds = {"ids": np.array([[0, 3, 9], [1, 1, 7]], dtype=np.int64)}
    assert assert_fed_as_built(model, feeds=feeds) == 2


@pytest.mark.parametrize("name, calibration", [("minilm_l2.onnx", "minilm_sentences.npz"),
                                               ("ppocr_cls.onnx", "ppocr_cls_lines.npz"),
                                               ("digits_cnn.onnx", "digits_calib.npz")])
def test_sensitivities_of_real_models_fed_as_built(name, calibration):
    """Data-aware factors (bias shifts included) of real models: every unit is fed, and the sensitivities
    agree with those measured on built models to float rounding; pruned pairs' (MiniLM's FFNs, PP-OCR's
    squeeze-excitation blocks) too."""
    model = onnx.load(MODELS / name)
    samples = load_calibration(MODELS / calibration, model)
    units = units_of(model)
    fit = list(range(8))  # the probes run on these: fed and built agree on any samples
    statistics = unit_statistics(model, units, samples, fit, "cpu", 8)
    candidates = decomposers_for(units, "svd", statistics)
    couple(find_pairs(units, model), candidates, statistics)
    overrides = overrides_for(model, units, {o.name for o in model.graph.output})
    options = [(c.unit, c.probe_option(PROBE_ERROR)) for c in candidates]
    factors = [(unit, c.factorize(option)) for c, (unit, option) in zip(candidates, options) if option is not None]
    assert len(factors) > len(units) // 2
    assert all(overrides[unit.key].feed(f) is not None for unit, f in factors)
    assert any(f.bias_shift is not None for _, f in factors)
    if len(candidates) > 20:  # PP-OCR: half its 54 units (a build each) and its pairs' consumers
        candidates = [c for i, c in enumerate(candidates) if i % 2 == 0 or c.coupling is not None]
    assert name == "digits_cnn.onnx" or coupled(candidates)
    built = sensitivities(model, ADAPTERS, candidates, Evaluator(model, samples, "cpu", 8), fit)
    fed = sensitivities(model, ADAPTERS, candidates, Evaluator(model, samples, "cpu", 8, overrides), fit)
    np.testing.assert_allclose(fed, built, rtol=1e-3)


def test_probe_count_follows_the_multiply_adds_of_a_sample():
    """16 samples for small models, fewer (never below 2) where probing every unit costs much (BERT-base: 2)."""
    # BERT-base's Linear layers, 12 x (4 of 768 x 768 and 2 of 768 x 3072), at 128 tokens
    bert = [SimpleNamespace(params=589_824)] * 48 + [SimpleNamespace(params=2_359_296)] * 24
    assert probe_count(bert, [128] * len(bert)) == 2
    assert probe_count(bert, positions_seen([stats(128 * 48)] * len(bert), 48)) == 2
    minilm = [SimpleNamespace(params=147_456)] * 24 + [SimpleNamespace(params=589_824)] * 12  # MiniLM-L6, 64 tokens
    assert probe_count(minilm, [64] * len(minilm)) == PROBE_SAMPLES
    assert probe_count([SimpleNamespace(params=1_000)], [64]) == PROBE_SAMPLES
    assert probe_count([SimpleNamespace(params=10**12)], [1]) == PROBE_MIN_SAMPLES
    assert probe_count([SimpleNamespace(params=10**12)], []) == PROBE_SAMPLES  # no fit sample to count on


def stats(positions: int) -> Moments:
    moments = Moments.empty(1, 2)
    moments.count = positions
    return moments


@pytest.mark.parametrize("name, calibration", [("minilm_l2.onnx", "minilm_sentences.npz"),
                                               ("ppocr_cls.onnx", "ppocr_cls_lines.npz"),
                                               ("digits_cnn.onnx", "digits_calib.npz")])
def test_positions_from_one_sample_agree_with_the_statistics(name, calibration):
    """--no-data gathers no statistics: what a probe costs comes from one sample's activations, which count
    the rows, tokens and (strided) conv output pixels the statistics count, give or take a conv's padding."""
    model = onnx.load(MODELS / name)
    samples = load_calibration(MODELS / calibration, model)
    units = units_of(model)
    fit = list(range(4))
    seen = positions_seen(unit_statistics(model, units, samples, fit, "cpu", 4), len(fit))
    shapes = activation_shapes(model, units, next(samples.batches([0], 1))[1], "cpu")
    estimated = positions_of(units, shapes)
    for unit, a, b in zip(units, seen, estimated):
        if unit.op != "Conv":
            assert a == b, unit.key
    macs = [sum(unit.params * p for unit, p in zip(units, found)) for found in (seen, estimated)]
    assert macs[1] == pytest.approx(macs[0], rel=0.05)
