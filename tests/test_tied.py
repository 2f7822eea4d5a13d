"""Tied embeddings: one table used by the token lookup (Gather) and, transposed, by the LM head (MatMul).

* Found as one unit of two layers (the head `transposed`), factorized once by "svd-tied" with calibration
  data (lookup frequencies and the head's input moments) and by the plain SVD without.
* Full rank reproduces the original's logits in ONNX Runtime, with and without calibration data.
* The factors are shared: the written model holds one copy of each (the head reads them through
  Transpose nodes), the unit's parameters are counted once, and the model's size is what the report says.
* Compression within a bound: at the rank of the table's structure the logits move by at most a few
  percent, and compact mode with --metric perplexity keeps the tied unit factorized within the tolerance.
* The sensitivity probe fed to the original (overrides.py) computes what the built model computes, and
  the statistics cache stores and restores the tied statistics.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from test_perplexity import VOCABULARY, WIDTH, tiny_lm, token_data

import onnx_lowrank
from onnx_lowrank.check.overrides import overrides_for, with_overridable
from onnx_lowrank.factorize.data_aware import TiedSVD
from onnx_lowrank.factorize.rewrite import build
from onnx_lowrank.factorize.svd import TruncatedSVD
from onnx_lowrank.graph.adapters import ADAPTERS
from onnx_lowrank.graph.imported import import_graph
from onnx_lowrank.graph.layers import find_layers
from onnx_lowrank.observe.cache import Cache
from onnx_lowrank.observe.calibration import load_calibration
from onnx_lowrank.observe.statistics import Tied, unit_statistics


def logits(model: onnx.ModelProto, data: dict[str, np.ndarray], fed: dict | None = None) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {**data, **(fed or {})})[0]


def known_list(found):
    assert found is not None
    return found


def plan_of(model: onnx.ModelProto):
    return find_layers(import_graph(model).graph, model, ADAPTERS)


def test_the_table_and_its_head_are_one_unit():
    plan = plan_of(tiny_lm(tied=True))
    tied = [unit for unit in plan.units if unit.tied]
    assert len(tied) == 1 and not plan.skipped
    unit = tied[0]
    assert [layer.node.name for layer in unit.layers] == ["embed", "lm_head"]
    assert [layer.transposed for layer in unit.layers] == [False, True]
    assert unit.shape == (WIDTH, VOCABULARY) and unit.params == WIDTH * VOCABULARY


def test_full_rank_is_exact_and_the_factors_are_stored_once():
    model = tiny_lm(tied=True)
    data = token_data(model, 16)
    for calibration in (data, None):
        new, report = onnx_lowrank.compress(model, calibration=calibration, ranks={"*": "full"}, allow_larger=True)
        onnx.checker.check_model(new, full_check=True)
        np.testing.assert_allclose(logits(new, data), logits(model, data), rtol=1e-4, atol=1e-4)
        row = next(layer for layer in report.layers if layer.node == "embed")
        assert row.nodes == ["embed", "lm_head"] and row.method == ("svd-tied" if calibration else "svd")
        assert row.params_after == WIDTH * (WIDTH + VOCABULARY)  # rank d: V x d + d x d, once
        tables = [t for t in new.graph.initializer if t.name.startswith("table")]
        assert sorted(tuple(t.dims) for t in tables) == [(WIDTH, WIDTH), (VOCABULARY, WIDTH)]
        stored = sum(int(np.prod(t.dims)) for t in new.graph.initializer)
        assert stored == report.params_after  # every parameter counted once, none hidden


def test_at_the_structure_rank_the_logits_move_little():
    """The table is rank 6 plus 5% noise: rank 6 keeps the logits within a few percent (relative L2), and
    the tied factors do better on the calibration text than the plain SVD of the table."""
    model = tiny_lm(tied=True)
    data = token_data(model, 32)
    reference = logits(model, data)
    errors = {}
    for calibration in (data, None):
        new, report = onnx_lowrank.compress(model, calibration=calibration, ranks={"table": 6, "hidden": "full"},
                                            allow_larger=True)  # fmt: skip
        assert next(layer.rank for layer in report.layers if layer.node == "embed") == 6
        got = logits(new, data)
        errors[calibration is None] = float(np.linalg.norm(got - reference) / np.linalg.norm(reference))
    assert errors[False] <= 0.05 and errors[True] <= 0.1
    assert errors[False] <= errors[True] * 1.05


def test_compact_perplexity_keeps_the_tied_unit_factorized():
    model = tiny_lm(tied=True)
    data = token_data(model, 32)
    new, report = onnx_lowrank.compress(model, calibration=data, metric="perplexity", tolerance=0.05,
                                        objective="size")  # fmt: skip
    row = next(layer for layer in report.layers if layer.node == "embed")
    assert row.method == "svd-tied" and row.params_after < row.params_before
    assert report.validation is not None and report.validation.value <= 0.05
    assert len([t for t in new.graph.initializer if t.name.startswith("table")]) == 2


def test_probe_fed_to_the_original_matches_the_built_model_and_the_cache_round_trips(tmp_path):
    model = tiny_lm(tied=True)
    data = token_data(model, 16)
    plan = plan_of(model)
    unit = next(u for u in plan.units if u.tied)
    samples = load_calibration(data, model)
    statistics = unit_statistics(model, plan.units, samples, list(range(16)), "cpu", 8)
    tied = statistics[plan.units.index(unit)]
    assert isinstance(tied, Tied) and int(tied.counts.count.sum()) == 16 * 12
    cache = Cache(tmp_path)
    cache.save_statistics("key", statistics)
    restored = known_list(cache.statistics("key"))[plan.units.index(unit)]
    assert isinstance(restored, Tied)
    np.testing.assert_array_equal(restored.counts.count, tied.counts.count)
    np.testing.assert_array_equal(restored.moments.outer, tied.moments.outer)
    factors = TiedSVD(unit.layers[0], tied).factorize(4)
    override = overrides_for(model, plan.units, {"logits"})[unit.key]
    probing = onnx.ModelProto()
    probing.CopyFrom(model)
    fed = logits(with_overridable(probing, [override]), data, override.feed(factors))
    built = logits(build(model, ADAPTERS, {unit.key: factors}), data)
    np.testing.assert_allclose(fed, built, rtol=1e-4, atol=1e-4)


def test_a_memo_shared_by_rewrites_of_one_original_finds_the_same_units_and_writes_the_same_model():
    """find_layers' memo (shared weights' digests, the tie check), kept across builds of one original:
    the same units and the same written model as without it, build after build."""
    model = tiny_lm(tied=True)
    unit = next(u for u in plan_of(model).units if u.tied)
    factors = {unit.key: TruncatedSVD(unit.matrices).factorize(4)}
    memo: dict = {}
    keys = [u.key for u in find_layers(import_graph(model).graph, model, ADAPTERS, memo=memo).units]
    assert memo and keys == [u.key for u in plan_of(model).units]
    alone = build(model, ADAPTERS, factors).SerializeToString()
    for _ in range(2):
        assert build(model, ADAPTERS, factors, memo=memo).SerializeToString() == alone
