"""Attention heads cut per head (heads.py): found only where the cut is exact in form, exact at full
size for every shape style and bias, predicted errors that are the scores' measured ones, probes fed to the
original that compute what is built, and a real encoder (MiniLM-L2) compressed with them in compact mode."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import MINILM, MODELS, make_model, run
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

import onnx_lowrank
from onnx_lowrank.check.overrides import overrides_for, with_overridable
from onnx_lowrank.factorize.coupled import HEADS
from onnx_lowrank.factorize.heads import HeadSide, couple_heads, find_heads
from onnx_lowrank.factorize.menu import coupled
from onnx_lowrank.factorize.registry import decomposers_for
from onnx_lowrank.factorize.rewrite import build
from onnx_lowrank.graph.adapters import ADAPTERS
from onnx_lowrank.graph.imported import import_graph
from onnx_lowrank.graph.layers import find_layers
from onnx_lowrank.observe.calibration import load_calibration
from onnx_lowrank.observe.statistics import Moments, unit_statistics

SEQ = 5


def attention(heads: int = 2, dim: int = 4, width: int = 6, bias: bool = True, shape: str = "concat",
              scale_on_query: bool = False, rotary: bool = False, second_user: bool = False) -> onnx.ModelProto:
    """One self-attention block as exporters write it: Q, K, V projections (MatMul, + bias Add), split into
    heads by Reshape ([B, S, -1, d] from a Concat of the input's dims, or the constant [0, 0, H, d]),
    transposed, scores scaled, softmax, context, merged and projected. `rotary`: an elementwise product
    by a per-position table between the split and the scores (what rotary embeddings do; no cut then)."""
    rng = np.random.default_rng(heads * 100 + dim)
    inner = heads * dim
    init = {name: (rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32)
            for name, s in (("wq", (width, inner)), ("wk", (width, inner)), ("wv", (width, inner)), ("wo", (inner, width)))}
    nodes = []
    for p in "qkv":
        if bias:
            init[f"b{p}"] = rng.standard_normal(inner).astype(np.float32)
            nodes += [helper.make_node("MatMul", ["x", f"w{p}"], [f"{p}0"], name=f"{p}_proj"),
                      helper.make_node("Add", [f"b{p}", f"{p}0"], [f"{p}1"])]
        else:
            nodes.append(helper.make_node("MatMul", ["x", f"w{p}"], [f"{p}1"], name=f"{p}_proj"))
        if shape == "concat":
            nodes += [helper.make_node("Shape", ["x"], [f"{p}_s"], start=0, end=2),
                      helper.make_node("Concat", [f"{p}_s", "minus_one", "head_dim"], [f"{p}_shape"], axis=0)]
        nodes.append(helper.make_node("Reshape", [f"{p}1", f"{p}_shape" if shape == "concat" else "split"], [f"{p}2"]))
    init["minus_one"], init["head_dim"] = np.array([-1], np.int64), np.array([dim], np.int64)
    init["split"], init["merge"] = np.array([0, 0, heads, dim], np.int64), np.array([0, 0, inner], np.int64)
    query = "q2"
    if rotary:
        init["table"] = rng.standard_normal((SEQ, 1, dim)).astype(np.float32)
        nodes.append(helper.make_node("Mul", ["q2", "table"], ["q_rot"]))
        query = "q_rot"
    if scale_on_query:
        init["scale"] = np.array(dim**-0.5, np.float32)
        nodes.append(helper.make_node("Mul", [query, "scale"], ["q_scaled"]))
        query = "q_scaled"
    nodes += [helper.make_node("Transpose", [query], ["qt"], perm=[0, 2, 1, 3]),
              helper.make_node("Transpose", ["k2"], ["kt"], perm=[0, 2, 3, 1]),
              helper.make_node("Transpose", ["v2"], ["vt"], perm=[0, 2, 1, 3]),
              helper.make_node("MatMul", ["qt", "kt"], ["scores"], name="scores"),
              helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
              helper.make_node("MatMul", ["probs", "vt"], ["context"]),
              helper.make_node("Transpose", ["context"], ["ct"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ct", "merge"], ["merged"]),
              helper.make_node("MatMul", ["merged", "wo"], ["y"], name="o_proj")]
    outputs = ["y"]
    if second_user:  # the split keys are read by something else too: no cut
        nodes.append(helper.make_node("ReduceSum", ["k2"], ["k_sum"], keepdims=0))
        outputs.append("k_sum")
    return make_model(nodes, {"x": ["N", SEQ, width]}, outputs, init)


def gemm_attention(heads: int = 2, dim: int = 3, width: int = 5, trans_b: int = 1) -> onnx.ModelProto:
    """Q and K as Gemm nodes on the flattened rows (bias as C, weight transposed or not), split into heads
    by a Reshape to [-1, S, H, d] from a Concat of constants."""
    rng = np.random.default_rng(7)
    inner = heads * dim
    init = {"split_lead": np.array([-1, SEQ], np.int64), "split_heads": np.array([heads], np.int64),
            "split_dim": np.array([dim], np.int64), "rows": np.array([-1, width], np.int64)}
    nodes = [helper.make_node("Reshape", ["x", "rows"], ["x2"])]
    for p in "qk":
        w = (rng.standard_normal((width, inner)) / np.sqrt(width)).astype(np.float32)
        init[f"w{p}"], init[f"b{p}"] = (w.T.copy() if trans_b else w), rng.standard_normal(inner).astype(np.float32)
        nodes += [helper.make_node("Gemm", ["x2", f"w{p}", f"b{p}"], [f"{p}1"], name=f"{p}_proj", transB=trans_b),
                  helper.make_node("Concat", ["split_lead", "split_heads", "split_dim"], [f"{p}_shape"], axis=0),
                  helper.make_node("Reshape", [f"{p}1", f"{p}_shape"], [f"{p}2"])]
    nodes += [helper.make_node("Transpose", ["q2"], ["qt"], perm=[0, 2, 1, 3]),
              helper.make_node("Transpose", ["k2"], ["kt"], perm=[0, 2, 3, 1]),
              helper.make_node("MatMul", ["qt", "kt"], ["scores"], name="scores"),
              helper.make_node("Softmax", ["scores"], ["y"], axis=-1)]
    return make_model(nodes, {"x": ["N", SEQ, width]}, ["y"], init)


def calibration(model: onnx.ModelProto, count: int = 16, seed: int = 3) -> dict[str, np.ndarray]:
    width = model.graph.input[0].type.tensor_type.shape.dim[2].dim_value
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((width, width)) + np.eye(width)
    return {"x": (rng.standard_normal((count, SEQ, width)) @ mixing + 0.2).astype(np.float32)}


def units_of(model: onnx.ModelProto):
    return find_layers(import_graph(model).graph, model, ADAPTERS).units


def candidates(model: onnx.ModelProto, data: dict[str, np.ndarray]):
    units = units_of(model)
    pairs = find_heads(units, {o.name for o in model.graph.output})
    samples = load_calibration(data, model)
    statistics = unit_statistics(model, units, samples, list(range(len(samples))), "cpu", batch_size=8)
    found = decomposers_for(units, "auto", statistics)
    couple_heads(pairs, found, statistics)
    return found


def head_factors(found, per_head: int):
    (key,) = coupled(found)
    (query,) = key.coupling.producers
    heads = key._by_method[HEADS].pair.heads
    config = (heads * per_head,)
    return {query.unit.key: query._by_method[HEADS].factorize(config), key.unit.key: key._by_method[HEADS].factorize(config)}


@pytest.mark.parametrize("case", [dict(), dict(bias=False), dict(shape="constant"), dict(scale_on_query=True)])
def test_heads_are_found(case):
    model = attention(heads=3, dim=2, **case)
    (pair,) = find_heads(units_of(model), {"y"})
    assert (pair.heads, pair.dim) == (3, 2)
    assert pair.query.startswith("wq:") and pair.key.startswith("wk:")


@pytest.mark.parametrize("case", [dict(rotary=True), dict(second_user=True)])
def test_heads_that_must_not_be_found(case):
    assert find_heads(units_of(attention(**case)), {"y", "k_sum"}) == []


@settings(max_examples=25, deadline=None)
@given(heads=st.integers(1, 3), dim=st.integers(2, 5), width=st.integers(3, 8), bias=st.booleans(),
       shape=st.sampled_from(["concat", "constant"]), scale_on_query=st.booleans())
def test_keeping_every_dimension_is_exact(heads, dim, width, bias, shape, scale_on_query):
    model = attention(heads, dim, width, bias, shape, scale_on_query)
    data = calibration(model)
    factors = head_factors(candidates(model, data), dim)
    new = build(model, ADAPTERS, factors)
    onnx.checker.check_model(new, full_check=True)
    (before,), (after,) = run(model, data), run(new, data)
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4 * np.abs(before).max())


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_projections_are_cut_exactly_at_full_size(trans_b):
    model = gemm_attention(trans_b=trans_b)
    (pair,) = find_heads(units_of(model), {"y"})
    assert (pair.heads, pair.dim) == (2, 3)
    data = calibration(model)
    found = candidates(model, data)
    (before,) = run(model, data)
    full = build(model, ADAPTERS, head_factors(found, 3))
    np.testing.assert_allclose(run(full, data)[0], before, rtol=1e-4, atol=1e-5)
    cut = build(model, ADAPTERS, head_factors(found, 2))
    onnx.checker.check_model(cut, full_check=True)
    assert run(cut, data)[0].shape == before.shape


def test_cut_heads_shrink_the_projections_and_run():
    model = attention(heads=2, dim=4, width=6)
    data = calibration(model)
    factors = head_factors(candidates(model, data), 2)
    new = build(model, ADAPTERS, factors)
    onnx.checker.check_model(new, full_check=True)
    sizes = {t.name: list(t.dims) for t in new.graph.initializer}
    assert sorted(dims for name, dims in sizes.items() if "lowrank_pruned" in name) == [[6, 4], [6, 4]]
    (before,), (after,) = run(model, data), run(new, data)
    assert after.shape == before.shape and 0 < np.abs(after - before).max() < np.abs(before).max()


def _unshrunk(self: Moments, target: np.ndarray, covariance=None) -> np.ndarray:
    return np.zeros(self.total.shape[0])


def test_predicted_error_is_the_scores_error(monkeypatch):
    """Relative to the scores' energy over every pair of calibration rows (the second moment's pairs)."""
    monkeypatch.setattr(Moments, "shrinkage", _unshrunk)
    model = attention(heads=2, dim=4, width=6)
    data = calibration(model, count=24)
    found = candidates(model, data)
    rows = np.concatenate([data["x"].reshape(-1, 6), np.ones((24 * SEQ, 1))], axis=1).astype(np.float64)
    init = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    a_q, a_k = (np.vstack([init[f"w{p}"], init[f"b{p}"][None]]) for p in "qk")
    for per_head in (1, 2, 3):
        factors = head_factors(found, per_head)
        q_side, k_side = (factors[key] for key in sorted(factors, key=lambda k: k.startswith("wk:")))
        cut_q, cut_k = (np.vstack([s.matrices[0].T, s.bias[None]]) for s in (q_side, k_side))
        energy = lost = 0.0
        for h in range(2):
            full = rows @ a_q[:, h * 4:(h + 1) * 4] @ (rows @ a_k[:, h * 4:(h + 1) * 4]).T
            cut = rows @ cut_q[:, h * per_head:(h + 1) * per_head] @ (rows @ cut_k[:, h * per_head:(h + 1) * per_head]).T
            energy, lost = energy + np.sum(full**2), lost + np.sum((full - cut) ** 2)
        assert isinstance(k_side, HeadSide) and 1e-4 < k_side.predicted_error < 1
        assert lost / energy == pytest.approx(k_side.predicted_error, rel=1e-3), per_head


def test_both_sides_fed_to_the_original_compute_the_cut_heads():
    """A sensitivity probe feeds both projections with zero rows in the dropped dimensions."""
    model = attention(heads=2, dim=4, width=6)
    data = calibration(model)
    factors = head_factors(candidates(model, data), 2)
    overrides = overrides_for(model, units_of(model), {"y"})
    fed = {}
    for key, side in factors.items():
        fed.update(overrides[key].feed(side) or {})
    probing = onnx.ModelProto()
    probing.CopyFrom(model)
    with_overridable(probing, overrides.values())
    (built,), (probed,) = run(build(model, ADAPTERS, factors), data), run(probing, {**data, **fed})
    np.testing.assert_allclose(probed, built, rtol=1e-4, atol=1e-5 * np.abs(built).max())


def test_one_side_alone_is_refused():
    model = attention()
    factors = head_factors(candidates(model, calibration(model)), 2)
    with pytest.raises(RuntimeError, match="per head"):
        build(model, ADAPTERS, dict([next(iter(factors.items()))]))


def test_minilm_heads_in_compact_mode():
    """The real encoder's two layers are found, and compact mode with heads alone writes a valid model
    within its bound whose query and key projections are narrower."""
    model = onnx.load(MINILM)
    assert len(find_heads(units_of(model), {o.name for o in model.graph.output})) == 2
    compressed, report = onnx_lowrank.compress(model, str(MODELS / "minilm_sentences.npz"), metric="cosine", tolerance=0.003,
                                               method=HEADS, objective="size", refit="none")
    onnx.checker.check_model(compressed)
    cut = [layer for layer in report.layers if layer.method == HEADS]
    assert cut and report.params_after < report.params_before
    assert report.validation.value <= 0.003
