"""The Gather adapter (an embedding table (V x d) ~ A (V x r) @ B (r x d), emitted as Gather(A) -> MatMul(B)),
its statistics (`Counts`: lookups per row) and its data-aware factors (`FrequencyWeightedSVD`, "svd-freq").

* Full rank (ranks {"*": "full"}, allow_larger) reproduces onnxruntime's Gather for float32 / float16
  tables, int32 / int64 indices (negative ones too) of rank 0 to 3.
* What is not a layer: a Gather along axis 1 (skipped, with the reason), a Gather on computed data (shape
  arithmetic: not reported at all), a table also used by a MatMul other than as an LM head (skipped, with
  the reason; tied embeddings are one unit: tests/test_tied.py).
* `Counts` against np.bincount, standalone and through `collect` in onnxruntime.
* `FrequencyWeightedSVD` against numpy: the predicted error is the expected relative error of lookups
  under its row weights (calibration frequency, 10% spread uniformly), it beats the plain SVD on lookups
  drawn like the calibration's, and the ranks it offers respect its row bound.
* End to end on models/minilm_l2.onnx in size mode (target 0.6): the word-embedding Gather is factorized
  with "svd-freq" and the error on unseen sentences is what validation said (within 2x).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import assert_close, compress_checked, run
from onnx import TensorProto, helper, numpy_helper

import onnx_lowrank
from onnx_lowrank.factorize.data_aware import FrequencyWeightedSVD
from onnx_lowrank.factorize.svd import TruncatedSVD
from onnx_lowrank.graph.adapters import ADAPTERS
from onnx_lowrank.graph.imported import import_graph
from onnx_lowrank.graph.layers import Layer, find_layers
from onnx_lowrank.observe.calibration import load_calibration
from onnx_lowrank.observe.statistics import Counts, collect

OPSET = 17
INDEX_TYPES = {"int64": (np.int64, TensorProto.INT64), "int32": (np.int32, TensorProto.INT32)}
TABLE_TYPES = {"float32": (np.float32, TensorProto.FLOAT), "float16": (np.float16, TensorProto.FLOAT16)}


def graph_model(nodes, inputs, outputs, initializers) -> onnx.ModelProto:
    """inputs / outputs: name -> (element type, shape); outputs' shapes are checked by the full checker."""
    graph = helper.make_graph(
        nodes,
        "gather",
        [helper.make_tensor_value_info(name, kind, shape) for name, (kind, shape) in inputs.items()],
        [helper.make_tensor_value_info(name, kind, shape) for name, (kind, shape) in outputs.items()],
        [numpy_helper.from_array(np.asarray(value), name) for name, value in initializers.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def embedding_model(table: np.ndarray, index_shape, index_type=TensorProto.INT64, axis: int | None = None):
    """y = Gather(table, ids), table an initializer."""
    kind = TABLE_TYPES[str(table.dtype)][1]
    attrs = {} if axis is None else {"axis": axis}
    node = helper.make_node("Gather", ["table", "ids"], ["y"], name="emb", **attrs)
    rows, width = table.shape
    out = [*index_shape, width] if axis in (None, 0) else [rows, *index_shape]
    return graph_model([node], {"ids": (index_type, list(index_shape))}, {"y": (kind, out)}, {"table": table})


def plan_of(model: onnx.ModelProto):
    return find_layers(import_graph(model).graph, model, ADAPTERS)


# ------------------------------------------------------------------------------------ full-rank exactness


@pytest.mark.parametrize("index_shape", [(), (7,), (3, 5), (2, 3, 4)], ids=["rank0", "rank1", "rank2", "rank3"])
@pytest.mark.parametrize("index_type", list(INDEX_TYPES))
@pytest.mark.parametrize("table_type", list(TABLE_TYPES))
def test_full_rank_reproduces_the_gather(table_type, index_type, index_shape):
    rng = np.random.default_rng(len(index_shape))
    vocabulary, width = 40, 12
    table = rng.standard_normal((vocabulary, width)).astype(TABLE_TYPES[table_type][0])
    numpy_type, onnx_type = INDEX_TYPES[index_type]
    model = embedding_model(table, index_shape, onnx_type)
    new, report = compress_checked(model)
    assert [(layer.node, layer.op, layer.method, layer.rank) for layer in report.layers] == [("emb", "Gather", "svd", 12)]
    assert report.skipped == []
    ops = [node.op_type for node in new.graph.node]
    assert ops == ["Gather", "MatMul"], ops
    lookup = numpy_helper.to_array(next(t for t in new.graph.initializer if t.name == new.graph.node[0].input[0]))
    assert lookup.shape == (vocabulary, 12) and lookup.dtype == table.dtype
    # random indices, negative ones too (Gather counts them from the end), the two extremes included
    ids = np.asarray(rng.integers(-vocabulary, vocabulary, index_shape), dtype=numpy_type)
    if ids.size >= 2:
        ids.reshape(-1)[:2] = [-vocabulary, vocabulary - 1]
    assert_close(run(model, {"ids": ids}), run(new, {"ids": ids}), table_type)
    # every row, by its positive and its negative index, in batches shaped like the model's indices
    every = np.arange(-vocabulary, vocabulary).astype(numpy_type)
    size = int(np.prod(index_shape, dtype=np.int64))
    batches = [np.asarray(b) for b in np.resize(every, -(-every.size // size) * size).reshape(-1, *index_shape)]
    reference = [run(model, {"ids": ids})[0] for ids in batches]
    np.testing.assert_array_equal(np.stack(reference).reshape(-1, width)[: every.size], table[every])
    assert_close(reference, [run(new, {"ids": ids})[0] for ids in batches], table_type)


# ------------------------------------------------------------------------------------ what is not a layer


def test_gather_along_axis_one_is_skipped_with_the_reason():
    table = np.random.default_rng(0).standard_normal((20, 6)).astype(np.float32)
    plan = plan_of(embedding_model(table, (4,), axis=1))
    assert plan.units == []
    assert [(s.node, s.op) for s in plan.skipped] == [("emb", "Gather")]
    assert "axis 1" in plan.skipped[0].reason


def test_gather_with_constant_indices_is_skipped_with_the_reason():
    table = np.random.default_rng(0).standard_normal((20, 6)).astype(np.float32)
    node = helper.make_node("Gather", ["table", "ids"], ["y"], name="emb")
    model = graph_model([node], {}, {"y": (TensorProto.FLOAT, [3, 6])},
                        {"table": table, "ids": np.array([1, 2, 3], np.int64)})
    plan = plan_of(model)
    assert plan.units == [] and [s.node for s in plan.skipped] == ["emb"]
    assert "constant" in plan.skipped[0].reason


def test_gathers_on_computed_data_are_not_reported():
    """Shape arithmetic (Shape -> Gather) and a Gather on a graph input are no layers: the embedding beside
    them is the only layer, and nothing is skipped; compress leaves them as they are."""
    rng = np.random.default_rng(1)
    table = rng.standard_normal((30, 8)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["e"], name="emb"),
        helper.make_node("Shape", ["e"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], name="shape_gather", axis=0),
        helper.make_node("Gather", ["x", "ids"], ["picked"], name="input_gather"),
        helper.make_node("Add", ["e", "picked"], ["y"], name="add"),
    ]
    model = graph_model(
        nodes,
        {"ids": (TensorProto.INT64, [2, 3]), "x": (TensorProto.FLOAT, [30, 8])},
        {"y": (TensorProto.FLOAT, [2, 3, 8]), "batch": (TensorProto.INT64, [])},
        {"table": table, "zero": np.array(0, np.int64)},
    )
    plan = plan_of(model)
    assert [unit.name for unit in plan.units] == ["emb"]
    assert plan.skipped == []
    new, report = compress_checked(model)
    assert [layer.node for layer in report.layers] == ["emb"] and report.skipped == []
    names = {node.name for node in new.graph.node}
    assert {"shape_gather", "input_gather"} <= names and "emb" not in names
    feeds = {"ids": rng.integers(-30, 30, (2, 3)), "x": rng.standard_normal((30, 8)).astype(np.float32)}
    assert_close(run(model, feeds), run(new, feeds))


def test_tied_embeddings_are_one_unit_and_a_table_transposed_otherwise_is_skipped():
    """The table is the input embedding and, transposed, the output projection (logits = h @ table^T): one
    unit, factorized once for both uses (tests/test_tied.py). A MatMul that multiplies by the table
    transposed on the other side (table^T @ x) is no LM head: both are left, each with a reason."""
    rng = np.random.default_rng(2)
    vocabulary, width = 30, 8
    table = rng.standard_normal((vocabulary, width)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["h"], name="emb"),
        helper.make_node("Transpose", ["table"], ["table_t"], name="tie", perm=[1, 0]),
        helper.make_node("MatMul", ["h", "table_t"], ["y"], name="lm_head"),
    ]
    model = graph_model(nodes, {"ids": (TensorProto.INT64, [2, 3])},
                        {"y": (TensorProto.FLOAT, [2, 3, vocabulary])}, {"table": table})
    plan = plan_of(model)
    assert [[layer.node.name for layer in unit.layers] for unit in plan.units] == [["emb", "lm_head"]]
    assert plan.skipped == []
    nodes[2] = helper.make_node("MatMul", ["table_t", "x"], ["y"], name="left")
    model = graph_model(nodes, {"ids": (TensorProto.INT64, [2, 3]), "x": (TensorProto.FLOAT, [vocabulary, 2])},
                        {"y": (TensorProto.FLOAT, [width, 2]), "h": (TensorProto.FLOAT, [2, 3, width])}, {"table": table})
    plan = plan_of(model)
    assert plan.units == []
    reasons = {s.node: (s.op, s.reason) for s in plan.skipped}
    assert set(reasons) == {"emb", "left"}
    assert reasons["emb"][0] == "Gather" and "left" in reasons["emb"][1] and "table" in reasons["emb"][1]
    assert reasons["left"][0] == "MatMul" and "emb" in reasons["left"][1]


def test_table_shared_with_a_matmul_in_the_same_orientation_with_calibration():
    """Both use the table as out x in = table^T, but observe different statistics (lookup counts, input
    vectors): two units on one weight, each skipped as used by the other, never merged."""
    rng = np.random.default_rng(3)
    vocabulary, width = 50, 8
    table = rng.standard_normal((vocabulary, width)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["onehot", "table"], ["z"], name="mm"),
        helper.make_node("Gather", ["table", "ids"], ["h"], name="emb"),
        helper.make_node("Add", ["h", "z"], ["y"], name="add"),
    ]
    model = graph_model(nodes, {"ids": (TensorProto.INT64, ["n", 4]), "onehot": (TensorProto.FLOAT, ["n", 4, vocabulary])},
                        {"y": (TensorProto.FLOAT, ["n", 4, width])}, {"table": table})
    calibration = {"ids": rng.integers(0, vocabulary, (40, 4)),
                   "onehot": rng.standard_normal((40, 4, vocabulary)).astype(np.float32)}
    _, report = onnx_lowrank.compress(model, calibration, target_params=0.9)
    assert report.layers == []
    reasons = {entry.node: entry.reason for entry in report.skipped}
    assert "also used by" in reasons["emb"] and "also used by" in reasons["mm"]


# ------------------------------------------------------------------------------------------------ Counts


def test_counts_count_lookups_and_wrap_negative_indices():
    rng = np.random.default_rng(4)
    rows = 17
    counts = Counts.empty(rows)
    assert counts.count.shape == (rows,) and counts.count.sum() == 0
    batches = [rng.integers(-rows, rows, shape) for shape in [(5,), (3, 4), (2, 2, 3), ()]]
    batches.append(np.array([-1, -rows, 0, rows - 1], np.int32))
    for batch in batches:
        counts.add(batch)
    flat = np.concatenate([np.asarray(b, dtype=np.int64).reshape(-1) for b in batches])
    np.testing.assert_array_equal(counts.count, np.bincount(flat % rows, minlength=rows))
    assert counts.count[rows - 1] >= 2 and counts.count[0] >= 2  # -1 and rows - 1; -rows and 0

    other = Counts.empty(rows)
    other.add(np.arange(rows))
    before = counts.count.copy()
    merged = counts.merged(other)
    np.testing.assert_array_equal(merged.count, before + 1)
    np.testing.assert_array_equal(counts.count, before)  # the parts are left as they were


def test_collect_counts_the_lookups_of_the_fit_samples():
    rng = np.random.default_rng(5)
    table = rng.standard_normal((25, 6)).astype(np.float32)
    node = helper.make_node("Gather", ["table", "ids"], ["y"], name="emb")
    model = graph_model([node], {"ids": (TensorProto.INT32, ["n", 3])}, {"y": (TensorProto.FLOAT, ["n", 3, 6])},
                        {"table": table})
    ids = rng.integers(-25, 25, (20, 3)).astype(np.int32)
    plan = plan_of(model)
    layer = plan.units[0].layers[0]
    assert layer.adapter.observed(layer)[1] == "indices"
    fit = [0, 3, 4, 7, 9, 11, 12, 15, 19]
    found = collect(model, [layer], load_calibration({"ids": ids}, model), fit, "cpu", batch_size=4)[0]
    assert isinstance(found, Counts)
    np.testing.assert_array_equal(found.count, np.bincount((ids[fit].astype(np.int64) % 25).reshape(-1), minlength=25))


# ------------------------------------------------------------------------------------ FrequencyWeightedSVD


def table_layer(table: np.ndarray) -> Layer:
    """A layer as the adapter makes it: W = table^T, one matrix (FrequencyWeightedSVD reads only this)."""
    return Layer(None, None, None, None, held=np.asarray(table, dtype=np.float64).T[None])


def zipf(rows: int, rng, exponent: float = 1.1) -> np.ndarray:
    p = 1.0 / np.arange(1, rows + 1) ** exponent
    return rng.permutation(p / p.sum())


def decaying_table(rng, rows: int, width: int, decay: float = -1.0) -> np.ndarray:
    return rng.standard_normal((rows, width)) * np.logspace(0, decay, width) @ np.linalg.qr(rng.standard_normal((width, width)))[0]


def per_row_errors(table: np.ndarray, approx: np.ndarray) -> np.ndarray:
    return np.sum((table - approx) ** 2, axis=1) / np.sum(table**2, axis=1)


def plain_per_row_errors(table: np.ndarray, rank: int) -> np.ndarray:
    """Each row's relative error under the plain SVD of the table at this rank (the rows projected on the top
    right singular vectors), straight from numpy."""
    _, _, vt = np.linalg.svd(table, full_matrices=False)
    kept = vt[:rank]
    return per_row_errors(table, table @ kept.T @ kept)


def approximation(factorizer, rank: int) -> np.ndarray:
    """The table the factors rebuild at this rank, (V, d)."""
    return factorizer.factorize(rank).reconstruct()[0].T


def test_predicted_error_is_the_expected_error_under_the_row_weights():
    rng = np.random.default_rng(6)
    rows, width = 120, 24
    table = decaying_table(rng, rows, width)
    counts = Counts.empty(rows)
    counts.add(rng.choice(rows, 3000, p=zipf(rows, rng)))
    fw = FrequencyWeightedSVD(table_layer(table), counts)
    weights = 0.9 * counts.count / counts.count.sum() + 0.1 / rows  # calibration frequency, 10% uniform
    np.testing.assert_allclose(fw.row_weights, weights, rtol=1e-12)
    assert fw.row_weights.sum() == pytest.approx(1.0)
    energy = np.sum(weights * np.sum(table**2, axis=1))
    plain = TruncatedSVD(table.T[None])
    for rank in range(1, width + 1):
        factors = fw.factorize(rank)
        assert factors.method == "svd-freq" and factors.first.shape == (1, rank, rows)
        assert factors.second.shape == (1, width, rank) and factors.bias_shift is None
        lost = np.sum(weights * np.sum((table - approximation(fw, rank)) ** 2, axis=1))
        assert factors.predicted_error == pytest.approx(lost / energy, rel=1e-9, abs=1e-13), rank
        # the weighted optimum: the plain SVD's factors lose at least as much under the same weights
        plain_lost = np.sum(weights * np.sum((table - approximation(plain, rank)) ** 2, axis=1))
        assert lost <= plain_lost * (1 + 1e-9) + 1e-12, rank
    assert fw.factorize(width).predicted_error == pytest.approx(0.0, abs=1e-12)


def test_frequency_weighted_factors_beat_the_plain_svd_on_lookups_like_the_calibration():
    rng = np.random.default_rng(7)
    rows, width = 300, 32
    table = decaying_table(rng, rows, width, decay=-0.5)
    p = zipf(rows, rng)
    counts = Counts.empty(rows)
    counts.add(rng.choice(rows, 5000, p=p))
    fw = FrequencyWeightedSVD(table_layer(table), counts)
    plain = TruncatedSVD(table.T[None])
    fresh = rng.choice(rows, 20000, p=p)  # new lookups from the same distribution
    looked_up = table[fresh]

    def error(factorizer, rank):
        return np.sum((looked_up - approximation(factorizer, rank)[fresh]) ** 2) / np.sum(looked_up**2)

    offered = [option.config[0] for option in fw.options()]
    # the row bound keeps out the smallest ranks (rare rows would lose over half their energy there)
    compared = [rank for rank in offered if rank < width][:4]
    assert len(compared) >= 2, offered
    for rank in compared:
        weighted, ordinary = error(fw, rank), error(plain, rank)
        assert weighted < 0.8 * ordinary, (rank, weighted, ordinary)
        # and it predicted about what these lookups show (10% of its weight is on all rows alike)
        assert fw.factorize(rank).predicted_error == pytest.approx(weighted, rel=0.25), rank


def row_bound_case():
    """A table whose row 0 (never looked up in calibration) points along a direction the frequent rows hardly
    use: the plain SVD keeps it at rank 1, weighting by frequency drops it until the last ranks."""
    rng = np.random.default_rng(0)
    rows, width = 100, 16
    table = rng.standard_normal((rows, width)) * np.logspace(0, -0.5, width)
    table[:, -1] *= 0.1
    table[0] = 0.1 * rng.standard_normal(width)
    table[0, -1] = 10.0
    p = 1.0 / np.arange(1, rows)
    counts = Counts.empty(rows)
    counts.add(1 + rng.choice(rows - 1, 5000, p=p / p.sum()))
    assert counts.count[0] == 0
    return table, counts


@pytest.mark.parametrize("case", ["random", "unseen-direction"])
def test_offered_ranks_respect_the_row_bound(case):
    """`worst_row` is the largest per-row relative error of the weighted factors (checked against the
    factors themselves); a rank is offered exactly where every row is within max(2 x its own error under
    the plain SVD, 50%), the plain SVD's per-row errors computed here in numpy."""
    if case == "random":
        rng = np.random.default_rng(8)
        rows, width = 80, 20
        table = decaying_table(rng, rows, width)
        counts = Counts.empty(rows)
        counts.add(rng.choice(rows, 2000, p=zipf(rows, rng, exponent=1.5)))
    else:
        table, counts = row_bound_case()
        rows, width = table.shape
    fw = FrequencyWeightedSVD(table_layer(table), counts)
    assert fw.worst_row.shape == (width + 1,)
    assert fw.worst_row[0] == pytest.approx(1.0)
    offered = {option.config[0] for option in fw.options()}
    assert all(option.method == "svd-freq" for option in fw.options())
    assert {o.config[0] for o in fw.options()} <= set(range(1, width + 1))
    for rank in range(1, width + 1):
        mine = per_row_errors(table, approximation(fw, rank))
        assert fw.worst_row[rank] == pytest.approx(mine.max(), rel=1e-9, abs=1e-12), rank
        bound = np.maximum(2 * plain_per_row_errors(table, rank), 0.5)
        assert (rank in offered) == bool(np.all(mine <= bound + 1e-12)), (rank, mine.max())
    assert width in offered  # full rank is exact


def test_a_never_seen_row_is_not_left_badly_approximated():
    """At every offered rank, every row (row 0 never looked up, in particular) keeps its relative error
    within max(2 x its error under the plain SVD, 50%)."""
    table, counts = row_bound_case()
    fw = FrequencyWeightedSVD(table_layer(table), counts)
    offered = [option.config[0] for option in fw.options()]
    assert offered
    for rank in offered:
        mine = per_row_errors(table, approximation(fw, rank))
        bound = np.maximum(2 * plain_per_row_errors(table, rank), 0.5)
        assert mine[0] <= bound[0] + 1e-12, (rank, mine[0], bound[0])
        assert np.all(mine <= bound + 1e-12), (rank, np.flatnonzero(mine > bound + 1e-12))


def test_never_seen_rows_keep_a_share_of_the_weight():
    """10% of the weight is spread over all rows: rows calibration never looked up weigh 0.1 / V, not 0, so
    an ordinary never-seen row (in directions the table shares) stays about as well kept as a seen one."""
    rng = np.random.default_rng(9)
    rows, width = 60, 12
    table = decaying_table(rng, rows, width, decay=-1.5)
    counts = Counts.empty(rows)
    counts.add(rng.integers(10, rows, 4000))  # rows 0..9 never looked up
    fw = FrequencyWeightedSVD(table_layer(table), counts)
    np.testing.assert_allclose(fw.row_weights[:10], 0.1 / rows, rtol=1e-12)
    assert np.all(fw.row_weights[10:] > 0.1 / rows)
    for rank in (o.config[0] for o in fw.options()):
        errors = per_row_errors(table, approximation(fw, rank))
        plain = plain_per_row_errors(table, rank)
        assert errors[:10].max() <= max(2 * plain[:10].max(), 0.05), rank

    empty = FrequencyWeightedSVD(table_layer(table), Counts.empty(rows))  # no lookups at all: all rows alike
    np.testing.assert_allclose(empty.row_weights, 1.0 / rows)
    for rank in (3, 6):
        np.testing.assert_allclose(approximation(empty, rank), approximation(TruncatedSVD(table.T[None]), rank),
                                   atol=1e-9)


def test_frequency_weighted_factors_through_the_rewrite():
    """With calibration data and an explicit rank the Gather gets "svd-freq" factors; the rewritten model
    looks every row up as its projection on one r-dimensional subspace (Gather(A) -> MatMul(B) with B's
    rows orthonormal), which keeps the rows calibration used most better than the plain SVD does."""
    rng = np.random.default_rng(10)
    vocabulary, width, rank = 64, 16, 6
    table = decaying_table(rng, vocabulary, width, decay=-0.5).astype(np.float32)
    node = helper.make_node("Gather", ["table", "ids"], ["y"], name="emb")
    model = graph_model([node], {"ids": (TensorProto.INT64, ["n", 8])}, {"y": (TensorProto.FLOAT, ["n", 8, width])},
                        {"table": table})
    frequent = rng.choice(vocabulary, 6, replace=False)
    ids = rng.choice(frequent, (40, 8))  # calibration looks up only these 6 rows
    new, report = onnx_lowrank.compress(model, {"ids": ids}, ranks={"emb": rank}, allow_larger=True)
    assert [(layer.node, layer.method, layer.rank) for layer in report.layers] == [("emb", "svd-freq", rank)]
    onnx.checker.check_model(new, full_check=True)
    every = np.arange(vocabulary).reshape(-1, 8)  # every row once, in order
    got = np.concatenate([run(new, {"ids": batch[None]})[0][0] for batch in every]).astype(np.float64)
    rows = table.astype(np.float64)
    _, singular, vt = np.linalg.svd(got, full_matrices=False)
    assert singular[rank] < 1e-5 * singular[0]  # rank r
    basis = vt[:rank].T
    np.testing.assert_allclose(got, rows @ basis @ basis.T, atol=1e-5)  # each row projected on one subspace
    # six looked-up rows, rank 6, 10% of the weight spread over all rows: the frequent rows are nearly exact,
    # far better than the plain SVD at the same rank keeps them
    weighted = per_row_errors(rows[frequent], got[frequent])
    plain = plain_per_row_errors(rows, rank)[frequent]
    assert weighted.max() < 0.05 and weighted.sum() < 0.2 * plain.sum(), (weighted, plain)


# ------------------------------------------------------------------------------------------ MiniLM, end to end

MODELS = Path(__file__).resolve().parents[1] / "models"
MINILM = MODELS / "minilm_l2.onnx"
SENTENCES = MODELS / "minilm_sentences.npz"
WORD_EMBEDDINGS = "/bert/embeddings/word_embeddings/Gather"


def minilm_outputs(model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else Path(model).read_bytes()
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    count = len(feeds["input_ids"])
    parts = [session.run(None, {k: v[i : i + 50] for k, v in feeds.items()}) for i in range(0, count, 50)]
    return [np.concatenate([part[j] for part in parts]) for j in range(len(parts[0]))]


def cosine_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    a = reference.reshape(len(reference), -1).astype(np.float64)
    b = candidate.reshape(len(candidate), -1).astype(np.float64)
    return float(1.0 - np.mean(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


TARGET = 0.6  # at 0.8 the allocation keeps the word embeddings dense (break-even rank 307 of 384): cutting
# the MatMuls buys more; from about 0.7 down it takes them to rank ~215


def test_minilm_word_embeddings_are_factorized_by_frequency():
    """Calibration on sentences [0:200], size mode with cosine; the unseen sentences [400:600] show about the
    error validation measured on the held-out calibration sentences (within 2x)."""
    with np.load(SENTENCES) as data:
        calibration = {name: data[name][:200] for name in ("input_ids", "attention_mask")}
        unseen = {name: data[name][-200:] for name in ("input_ids", "attention_mask")}
    # --method svd: what auto was on MiniLM before pruning (no Conv); at this budget auto now prunes the FFNs
    # instead of factorizing the word embeddings (tests/test_prune.py covers that); no refit, which would
    # triple the run
    model, report = onnx_lowrank.compress(
        MINILM, calibration, metric="cosine", target_params=TARGET, batch_size=32, objective="size", method="svd",
        refit="none",  # the subject is the table's factorization (tests/test_refit.py: the refit)
    )
    onnx.checker.check_model(model, full_check=True)
    layers = {layer.node: layer for layer in report.layers}
    assert WORD_EMBEDDINGS in layers, (sorted(layers), report.skipped)
    word = layers[WORD_EMBEDDINGS]
    assert word.op == "Gather" and word.method == "svd-freq"
    assert word.rank < 384 and word.params_after < word.params_before == 1539 * 384
    assert all(layer.method == "svd-freq" for layer in report.layers if layer.op == "Gather")
    assert all(layer.method != "svd-freq" for layer in report.layers if layer.op != "Gather")
    names = {node.name for node in model.graph.node}
    assert WORD_EMBEDDINGS not in names
    # Gathers on shapes are no layers: never reported, still in the graph
    reported = {layer.node for layer in report.layers} | {s.node for s in report.skipped}
    assert "/bert/embeddings/Gather" not in reported and "/bert/embeddings/Gather" in names
    assert report.validation.metric == "cosine" and report.validation.value is not None

    reference, got = minilm_outputs(MINILM, unseen), minilm_outputs(model, unseen)
    unseen_error = max(cosine_error(r, c) for r, c in zip(reference, got))
    assert unseen_error <= 2 * report.validation.value + 1e-6, (unseen_error, report.validation.value)
