"""Layers inside If / Loop / Scan bodies are found, observed through extra outputs, and factorized in place.

Small synthetic models: an If with a layer in each branch (the calibration data take one), a Loop and a
Scan with a MatMul in the body, a Loop nested in an If branch, and a body reading a main-graph weight.
Each is exact at full rank on every branch; compact mode stays within its bound; a branch the data never
take keeps its weights with the reason; and the statistics of a body layer are those of the rows it saw.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import assert_close, compress_checked, run
from onnx import TensorProto, helper, numpy_helper
from test_overrides import assert_fed_as_built

import onnx_lowrank
from onnx_lowrank.graph.adapters import ADAPTERS
from onnx_lowrank.graph.imported import import_graph
from onnx_lowrank.graph.layers import find_layers
from onnx_lowrank.observe.activations import timed_activations
from onnx_lowrank.observe.calibration import Samples
from onnx_lowrank.observe.statistics import Moments, collect

F32 = TensorProto.FLOAT
DIM = 24


def low_rank(rng: np.random.Generator, rows: int, cols: int, rank: int = 4, noise: float = 0.02) -> np.ndarray:
    matrix = rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols)) / np.sqrt(cols)
    return (matrix + noise * rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)


def tensor(name: str, shape=None, elem_type: int = F32) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, shape)


def finished(nodes, inputs, outputs, initializers) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "subgraphs", inputs, outputs,
                              [numpy_helper.from_array(value, name) for name, value in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def if_model() -> onnx.ModelProto:
    """x [N, DIM], c bool: If c then Gemm(x, w_then) + b else MatMul(x, w_else) -> Relu -> y."""
    rng = np.random.default_rng(1)
    then_branch = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w_then", "b_then"], ["t"], name="then_gemm", transB=1)],
        "then", [], [tensor("t", ["N", DIM])],
        [numpy_helper.from_array(low_rank(rng, DIM, DIM), "w_then"),
         numpy_helper.from_array(rng.standard_normal(DIM).astype(np.float32), "b_then")])
    else_branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w_else"], ["e"], name="else_matmul")],
        "else", [], [tensor("e", ["N", DIM])], [numpy_helper.from_array(low_rank(rng, DIM, DIM), "w_else")])
    nodes = [helper.make_node("If", ["c"], ["branched"], name="branch", then_branch=then_branch, else_branch=else_branch),
             helper.make_node("Relu", ["branched"], ["y"], name="relu")]
    return finished(nodes, [tensor("x", ["N", DIM]), tensor("c", [], TensorProto.BOOL)], [tensor("y", ["N", DIM])], {})


def loop_model(outer_weight: bool = False) -> onnx.ModelProto:
    """x [N, DIM] -> Loop (3 trips) of state <- Tanh(MatMul(state, w_loop)), scanning each state -> y, ys.
    `outer_weight`: w_loop is a main-graph initializer the body reads from the outer scope."""
    rng = np.random.default_rng(2)
    weight = numpy_helper.from_array((0.8 * low_rank(rng, DIM, DIM)).T.copy(), "w_loop")
    body = helper.make_graph(
        [helper.make_node("MatMul", ["state", "w_loop"], ["mixed"], name="loop_matmul"),
         helper.make_node("Tanh", ["mixed"], ["state_out"], name="loop_tanh"),
         helper.make_node("Identity", ["state_out"], ["scanned"], name="loop_scanned"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="loop_cond")],
        "body", [tensor("i", [], TensorProto.INT64), tensor("cond_in", [], TensorProto.BOOL), tensor("state", ["N", DIM])],
        [tensor("cond_out", [], TensorProto.BOOL), tensor("state_out", ["N", DIM]), tensor("scanned", ["N", DIM])],
        [] if outer_weight else [weight])
    nodes = [helper.make_node("Loop", ["trips", "", "x"], ["y", "ys"], name="loop", body=body)]
    initializers = {"trips": np.array(3, np.int64)}
    if outer_weight:
        initializers["w_loop"] = numpy_helper.to_array(weight)
    return finished(nodes, [tensor("x", ["N", DIM])], [tensor("y", ["N", DIM]), tensor("ys", [3, "N", DIM])],
                    initializers)


def scan_model() -> onnx.ModelProto:
    """x [T, DIM] scanned row by row: out_t = MatMul(x_t, w_scan) (a scan output), acc += out_t."""
    rng = np.random.default_rng(3)
    body = helper.make_graph(
        [helper.make_node("MatMul", ["row", "w_scan"], ["out"], name="scan_matmul"),
         helper.make_node("Add", ["acc", "out"], ["acc_next"], name="scan_add")],
        "body", [tensor("acc", [DIM]), tensor("row", [DIM])], [tensor("acc_next", [DIM]), tensor("out", [DIM])],
        [numpy_helper.from_array(low_rank(rng, DIM, DIM).T.copy(), "w_scan")])
    nodes = [helper.make_node("Scan", ["acc0", "x"], ["total", "rows"], name="scan", body=body, num_scan_inputs=1)]
    return finished(nodes, [tensor("x", [8, DIM])], [tensor("total", [DIM]), tensor("rows", [8, DIM])],
                    {"acc0": np.zeros(DIM, np.float32)})


def nested_model() -> onnx.ModelProto:
    """If c then (the Loop of `loop_model`) else Identity: a Loop body inside an If branch."""
    loop = loop_model().graph
    then_branch = helper.make_graph(list(loop.node), "then", [], [tensor("y", ["N", DIM])], list(loop.initializer))
    else_branch = helper.make_graph([helper.make_node("Identity", ["x"], ["skipped"], name="else_identity")],
                                    "else", [], [tensor("skipped", ["N", DIM])])
    nodes = [helper.make_node("If", ["c"], ["out"], name="outer_if", then_branch=then_branch, else_branch=else_branch)]
    return finished(nodes, [tensor("x", ["N", DIM]), tensor("c", [], TensorProto.BOOL)], [tensor("out", ["N", DIM])], {})


def loop_in_loop_model() -> onnx.ModelProto:
    """The Loop of `loop_model` (3 trips) as the body of an outer Loop of 2 trips: 6 MatMuls a sample."""
    inner = loop_model().graph
    body = helper.make_graph(
        [helper.make_node("Loop", ["trips", "", "outer_state"], ["outer_next", "inner_scanned"], name="inner_loop",
                          body=inner.node[0].attribute[0].g),
         helper.make_node("Identity", ["outer_cond"], ["outer_cond_out"], name="outer_cond_id")],
        "outer_body", [tensor("j", [], TensorProto.INT64), tensor("outer_cond", [], TensorProto.BOOL),
                       tensor("outer_state", ["N", DIM])],
        [tensor("outer_cond_out", [], TensorProto.BOOL), tensor("outer_next", ["N", DIM])])
    nodes = [helper.make_node("Loop", ["outer_trips", "", "x"], ["y"], name="outer_loop", body=body)]
    return finished(nodes, [tensor("x", ["N", DIM])], [tensor("y", ["N", DIM])],
                    {"trips": np.array(3, np.int64), "outer_trips": np.array(2, np.int64)})


def feeds(count: int, seed: int, condition=None, rows: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    found = []
    for index in range(count):
        feed = {"x": rng.standard_normal((rows, DIM)).astype(np.float32)}
        if condition is not None:
            feed["c"] = np.array(condition(index))
        found.append(feed)
    return found


def reasons(report: onnx_lowrank.Report) -> dict[str, str]:
    return {skipped.node: skipped.reason for skipped in report.skipped}


def checked(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, strict_mode=True, check_type=True)


# --------------------------------------------------------------------------------------------- full rank


@pytest.mark.parametrize("build, inputs", [
    (if_model, [feeds(1, 5, lambda i: True)[0], feeds(1, 6, lambda i: False)[0]]),
    (lambda: loop_model(False), feeds(2, 7)),
    (lambda: loop_model(True), feeds(2, 8)),
    (nested_model, [feeds(1, 9, lambda i: True)[0], feeds(1, 10, lambda i: False)[0]]),
    (loop_in_loop_model, feeds(1, 12)),
])
def test_full_rank_chains_inside_bodies_reproduce_every_branch(build, inputs):
    original = build()
    model, report = compress_checked(original)
    checked(model)
    assert report.layers and not report.skipped
    for feed in inputs:
        assert_close(run(original, feed), run(model, feed))


def test_full_rank_scan_body():
    original = scan_model()
    model, report = compress_checked(original)
    checked(model)
    assert [layer.node for layer in report.layers] == ["scan_matmul"]
    feed = {"x": np.random.default_rng(0).standard_normal((8, DIM)).astype(np.float32)}
    assert_close(run(original, feed), run(model, feed))


def test_factor_chain_lives_in_the_body_and_an_outer_weight_is_dropped_once_unused():
    original = loop_model(outer_weight=True)
    model, report = onnx_lowrank.compress(original, ranks={"*": 4})
    checked(model)
    assert [layer.node for layer in report.layers] == ["loop_matmul"]
    body = next(node for node in model.graph.node if node.op_type == "Loop").attribute[0].g
    assert [node.op_type for node in body.node].count("MatMul") == 2
    everywhere = {t.name for t in model.graph.initializer} | {t.name for t in body.initializer}
    assert "w_loop" not in everywhere and sum("w_loop.lowrank" in name for name in everywhere) == 2
    assert report.params_after == 2 * 4 * DIM < report.params_before


# ------------------------------------------------------------------------------------- with calibration


def test_untaken_branch_keeps_its_weights_with_the_reason_and_the_taken_one_compresses():
    original = if_model()
    model, report = onnx_lowrank.compress(original, calibration=feeds(32, 1, lambda i: True), tolerance=0.05,
                                          objective="size", method="svd")
    checked(model)
    assert [layer.node for layer in report.layers] == ["then_gemm"]
    assert reasons(report)["else_matmul"] == "inside If 'branch' else_branch: never taken on the calibration data"
    assert report.validation.passed and report.validation.value <= 0.05
    assert report.params_after < report.params_before
    taken, untaken = feeds(6, 99, lambda i: True), feeds(6, 98, lambda i: False)
    for feed in untaken:  # the branch left alone is exact
        assert_close(run(original, feed), run(model, feed))
    expected = np.concatenate([run(original, feed)[0] for feed in taken])
    got = np.concatenate([run(model, feed)[0] for feed in taken])
    assert np.linalg.norm(got - expected) <= 0.075 * np.linalg.norm(expected)  # 1.5x the bound, unseen data


@pytest.mark.parametrize("build, make", [
    (lambda: loop_model(False), lambda count, seed: feeds(count, seed)),
    (scan_model, lambda count, seed: feeds(count, seed, rows=8)),
])
def test_loop_and_scan_bodies_compress_within_the_bound(build, make):
    original = build()
    model, report = onnx_lowrank.compress(original, calibration=make(32, 1), tolerance=0.05, objective="size",
                                          method="svd")
    checked(model)
    assert len(report.layers) == 1 and report.layers[0].rank < DIM
    assert report.validation.passed and report.validation.value <= 0.05


def test_statistics_of_a_branch_come_from_the_samples_that_take_it():
    """Half the samples take the then-branch: the Gemm's input moments are those of their x alone."""
    model = if_model()
    plan = find_layers(import_graph(model).graph, model, ADAPTERS)
    layers = [layer for unit in plan.units for layer in unit.layers]
    samples = feeds(8, 3, lambda i: i % 2 == 0)
    found = dict(zip([layer.node.name for layer in layers],
                     collect(model, layers, Samples(samples, batched=False), list(range(8)), "cpu")))
    rows = np.concatenate([feed["x"] for feed in samples if feed["c"]]).astype(np.float64)
    then, other = found["then_gemm"], found["else_matmul"]
    assert isinstance(then, Moments) and isinstance(other, Moments)
    assert then.count == other.count == rows.shape[0]
    np.testing.assert_allclose(then.mean[0], rows.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(then.second_moment[0], rows.T @ rows / rows.shape[0], atol=1e-6)


def test_statistics_of_a_loop_body_stack_every_iteration():
    model = loop_model()
    plan = find_layers(import_graph(model).graph, model, ADAPTERS)
    layer = plan.units[0].layers[0]
    x = feeds(1, 4)[0]["x"]
    (moments,) = collect(model, [layer], Samples([{"x": x}], batched=False), [0], "cpu")
    weight = numpy_helper.to_array(model.graph.node[0].attribute[0].g.initializer[0]).astype(np.float64)
    states, state = [], x.astype(np.float64)
    for _ in range(3):
        states.append(state)
        state = np.tanh(state @ weight)
    rows = np.concatenate(states)
    assert isinstance(moments, Moments) and moments.count == rows.shape[0]
    np.testing.assert_allclose(moments.mean[0], rows.mean(axis=0), atol=1e-5)


def test_statistics_of_a_loop_in_a_loop_count_every_inner_iteration():
    model = loop_in_loop_model()
    plan = find_layers(import_graph(model).graph, model, ADAPTERS)
    (layer,) = plan.units[0].layers
    assert layer.scope is not None and [step.name for step in layer.scope.steps] == ["outer_loop", "inner_loop"]
    (moments,) = collect(model, [layer], Samples(feeds(2, 4), batched=False), [0, 1], "cpu")
    assert isinstance(moments, Moments) and moments.count == 2 * 2 * 3 * 4  # samples x trips x trips x rows


# --------------------------------------------------------------------------------- what stays as it was


def test_if_inside_a_loop_body_is_left_with_the_reason():
    loop = loop_model().graph
    body = loop.node[0].attribute[0].g
    matmul = helper.make_node("MatMul", ["state", "w_inner"], ["inner"], name="inner_matmul")
    inner = helper.make_graph([matmul], "then", [], [tensor("inner", ["N", DIM])],
                              [numpy_helper.from_array(np.eye(DIM, dtype=np.float32), "w_inner")])
    plain = helper.make_graph([helper.make_node("Identity", ["state"], ["same"])], "else", [], [tensor("same", ["N", DIM])])
    nodes = list(body.node)
    nodes[2].input[0] = "picked"  # the scanned output
    nodes[2:2] = [helper.make_node("Less", ["i", "one"], ["first"]),
                  helper.make_node("If", ["first"], ["picked"], name="inner_if", then_branch=inner, else_branch=plain)]
    del body.node[:]
    body.node.extend(nodes)
    body.initializer.append(numpy_helper.from_array(np.array(1, np.int64), "one"))
    model = finished(list(loop.node), list(loop.input), list(loop.output), {"trips": np.array(3, np.int64)})
    plan = find_layers(import_graph(model).graph, model, ADAPTERS)
    why = {skipped.node: skipped.reason for skipped in plan.skipped}
    assert "inside If 'inner_if' then_branch, in Loop 'loop' body" in why["inner_matmul"]
    assert "placeholders" in why["inner_matmul"]
    assert [unit.name for unit in plan.units] == ["loop_matmul"]


@pytest.mark.parametrize("build, inputs", [
    (if_model, [feeds(1, 5, lambda i: True)[0], feeds(1, 6, lambda i: False)[0]]),
    (lambda: loop_model(False), feeds(1, 7)),
    (lambda: loop_model(True), feeds(1, 8)),
    (nested_model, feeds(1, 9, lambda i: True)),
])
@pytest.mark.parametrize("shift", [False, True])
def test_sensitivity_probes_feed_body_weights_as_the_built_model_computes(build, inputs, shift):
    """A body's fed weight (and bias) moves to the main graph and the body reads it from the outer scope:
    fed outputs are those of the model built with the chain, on every branch."""
    model = build()
    biased = 1 if build is if_model else 0  # a shift needs a bias site: the Gemm's (MatMuls feed Tanh)
    for feed in inputs:
        assert assert_fed_as_built(model, shift, feed) == biased + (0 if shift else 1)


def test_layers_of_a_branch_the_timing_feed_skips_are_timed_on_a_feed_that_takes_it():
    model = if_model()
    units = find_layers(import_graph(model).graph, model, ADAPTERS).units
    first, *others = feeds(3, 11, lambda i: i == 0)  # the first takes the then-branch, the others the else
    alone, _ = timed_activations(model, units, first, "cpu", timed=False)
    found, _ = timed_activations(model, units, first, "cpu", timed=False, others=others)
    names = {unit.key: unit.name for unit in units}
    assert {names[key] for key in alone} == {"then_gemm"}
    assert {names[key]: activation.shape for key, activation in found.items()} == {
        "then_gemm": (4, DIM), "else_matmul": (4, DIM)}


@pytest.mark.parametrize("build, make", [
    (if_model, lambda count, seed: feeds(count, seed, lambda i: i % 2 == 0)),
    (lambda: loop_model(False), lambda count, seed: feeds(count, seed)),
])
def test_int4_blocks_run_inside_bodies_within_the_bound(build, make):
    """--quantize int4 inside If and Loop bodies: the MatMulNBits chain lives in the body, its opset is
    declared, and the model validates within the bound on new inputs."""
    original = build()
    # --method cp decomposes Conv only: the bodies' low-rank MatMuls are offered blocks alone (the SVD would win)
    model, report = onnx_lowrank.compress(original, calibration=make(32, 1), tolerance=0.05, objective="size",
                                          quantize="int4", block_size=32, method="cp")
    onnx.checker.check_model(model, full_check=True)
    assert report.validation.passed and report.layers
    assert all(layer.quantization for layer in report.layers)  # 4- or 8-bit blocks (24 wide: no rank pays)
    inside = [node for graph in every_body(model.graph) for node in graph.node if node.op_type == "MatMulNBits"]
    assert len(inside) == len(report.layers) and not [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    for feed in make(4, 99):
        reference = run(original, feed)[0]
        assert np.linalg.norm(run(model, feed)[0] - reference) <= 0.2 * np.linalg.norm(reference)


def every_body(graph: onnx.GraphProto):
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield attribute.g
                yield from every_body(attribute.g)
