"""Shared helpers for the model-level tests: build tiny ONNX models, compress them, run them in onnxruntime;
and the expensive results on the real models in models/ that several test modules read, computed once per
session (`inspected`, `shared_run`)."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from threadpoolctl import threadpool_limits

import onnx_lowrank
from onnx_lowrank.check import latency
from onnx_lowrank.factorize.conv import CanonicalPolyadic
from onnx_lowrank.observe import sessions as runtime
from onnx_lowrank.run import stages as pipeline

OPSET = 17
IR_VERSION = 8

# max|diff| <= REL * max|ref| + ABS, by the element type the weights are stored in
TOLERANCES = {
    "float32": (1e-4, 1e-5),
    "float16": (5e-3, 1e-5),
    "bfloat16": (3e-2, 1e-5),
    "float64": (1e-10, 1e-12),
}


def value_info(name: str, shape: Sequence[int] | None, elem_type: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, None if shape is None else list(shape))


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Mapping[str, Sequence[int]],
    outputs: Sequence[str] | Mapping[str, Sequence[int] | None],
    initializers: Mapping[str, np.ndarray] | None = None,
    opset: int = OPSET,
    ir_version: int = IR_VERSION,
    elem_type: int = TensorProto.FLOAT,
) -> onnx.ModelProto:
    """A model with graph inputs by name -> static shape, all of `elem_type`, and outputs by name
    (their shapes inferred by ONNX unless given)."""
    if not isinstance(outputs, Mapping):
        outputs = {name: None for name in outputs}
    graph = helper.make_graph(
        list(nodes),
        "test",
        [value_info(name, shape, elem_type) for name, shape in inputs.items()],
        [value_info(name, shape, elem_type) for name, shape in outputs.items()],
        [numpy_helper.from_array(np.asarray(value), name) for name, value in (initializers or {}).items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
    if any(shape is None for shape in outputs.values()):
        # the checker wants typed outputs: take the shapes ONNX infers for those not given
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        for declared, found in zip(model.graph.output, inferred.graph.output):
            declared.CopyFrom(found)
    onnx.checker.check_model(model, full_check=True)
    return model


def one_node_model(
    op: str,
    node_inputs: Sequence[str],
    graph_inputs: Mapping[str, Sequence[int]],
    initializers: Mapping[str, np.ndarray] | None = None,
    attrs: Mapping | None = None,
    opset: int = OPSET,
    name: str | None = None,
    elem_type: int = TensorProto.FLOAT,
) -> onnx.ModelProto:
    """One `op` node named `name` (default: the op in lower case) computing output "y"."""
    node = helper.make_node(op, list(node_inputs), ["y"], name=name or op.lower(), **dict(attrs or {}))
    return make_model([node], graph_inputs, ["y"], initializers, opset=opset, elem_type=elem_type)


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """All outputs of the model, in a real onnxruntime CPU session with graph optimizations disabled."""
    return session(model).run(None, dict(feeds))


def random_feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Standard-normal values for every graph input (static shapes, each in its declared element type)."""
    rng = np.random.default_rng(seed)
    initializers = {t.name for t in model.graph.initializer}
    feeds = {}
    for graph_input in model.graph.input:
        if graph_input.name in initializers:
            continue
        tensor_type = graph_input.type.tensor_type
        shape = [d.dim_value for d in tensor_type.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        feeds[graph_input.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def compress_checked(model: onnx.ModelProto, **options) -> tuple[onnx.ModelProto, onnx_lowrank.Report]:
    """compress (full rank, larger allowed, unless told otherwise) and run the full ONNX checker on the result."""
    options.setdefault("ranks", {"*": "full"})
    options.setdefault("allow_larger", True)
    before = model.SerializeToString()
    new, report = onnx_lowrank.compress(model, **options)
    assert model.SerializeToString() == before, "compress modified its input model"
    onnx.checker.check_model(new, full_check=True)
    return new, report


def assert_close(reference: Sequence[np.ndarray], got: Sequence[np.ndarray], dtype: str = "float32") -> None:
    rel, abs_ = TOLERANCES[dtype]
    assert len(reference) == len(got)
    for ref, out in zip(reference, got):
        assert out.shape == ref.shape, f"output shape {out.shape} != reference {ref.shape}"
        assert out.dtype == ref.dtype
        scale = float(np.max(np.abs(ref))) if ref.size else 0.0
        diff = float(np.max(np.abs(out.astype(np.float64) - ref.astype(np.float64)))) if ref.size else 0.0
        assert diff <= rel * scale + abs_, f"max|diff| {diff:.3g} > {rel:g} * {scale:.3g} + {abs_:g}"


def assert_same_outputs(original: onnx.ModelProto, new: onnx.ModelProto, dtype: str = "float32", seed: int = 0):
    feeds = random_feeds(original, seed)
    reference = run(original, feeds)
    assert_close(reference, run(new, feeds), dtype)
    return reference


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def assert_factorized(report: onnx_lowrank.Report, original: onnx.ModelProto, new: onnx.ModelProto,
                      node: str, op: str) -> None:
    """The node was rewritten: the report names it and the op count grew by one per node of the unit."""
    names = [layer.node for layer in report.layers]
    assert node in names, f"{node} not factorized; skipped: {report.skipped}"
    layer = report.layers[names.index(node)]
    assert layer.op == op
    assert op_counts(new).get(op, 0) == op_counts(original).get(op, 0) + len(layer.nodes)
    assert node not in {n.name for n in new.graph.node}, "the original node is still in the graph"


# ------------------------------------------------------------------------------- shared real-model results

MODELS = Path(__file__).resolve().parents[1] / "models"
DIGITS = MODELS / "digits_cnn.onnx"
MINILM = MODELS / "minilm_l2.onnx"
PPOCR = MODELS / "ppocr_cls.onnx"


def inspected(path: Path) -> tuple[onnx_lowrank.LayerInfo, ...]:
    """onnx_lowrank.inspect(path) (weights only), once per session per file: the rows are frozen, and
    inspecting the digits CNN takes about 14 s (CP decompositions of its convs at every candidate rank)."""
    return _inspected(Path(path).resolve())


@cache
def _inspected(path: Path) -> tuple[onnx_lowrank.LayerInfo, ...]:
    return tuple(onnx_lowrank.inspect(path))


# compress() runs that more than one test module asserts on: name -> (model file, options)
SHARED_RUNS = {
    "minilm target 0.7": (MINILM, dict(target_params=0.7)),  # no data: weights alone, not validated
    "minilm full rank": (MINILM, dict(ranks={"*": "full"}, allow_larger=True)),
    "ppocr target 0.7": (PPOCR, dict(target_params=0.7)),
    "ppocr full rank": (PPOCR, dict(ranks={"*": "full"}, allow_larger=True)),
    "digits compact 0.05": (DIGITS, dict(calibration=MODELS / "digits_calib.npz", tolerance=0.05, objective="size",
                                         method="svd")),
}


@dataclass(frozen=True)
class SharedRun:
    model: onnx.ModelProto
    report: onnx_lowrank.Report
    input_unchanged: bool  # the ModelProto passed to compress() serializes to the same bytes afterwards


@cache
def shared_run(name: str) -> SharedRun:
    """compress() of a freshly loaded copy of the model with SHARED_RUNS[name]'s options, once per session.
    Treat the model and report as read-only: other tests read the same objects."""
    path, options = SHARED_RUNS[name]
    model = onnx.load_from_string(path.read_bytes())
    before = model.SerializeToString()
    new, report = onnx_lowrank.compress(model, **options)
    return SharedRun(new, report, model.SerializeToString() == before)


@pytest.fixture(scope="session", autouse=True)
def cp_once_per_kernel():
    """CP factors (tensorly's parafac: deterministic, SVD start, fixed seed) of a kernel at a rank, computed once
    per session: every `--method auto` run on the digits CNN decomposes the same kernels at the same ranks, and
    those ALS fits take most of such a run (about 14 s of 20). The memo only avoids recomputing identical
    factors; the key holds all they depend on (kernel, rank, attributes, the divergence threshold)."""
    memo: dict[tuple, tuple] = {}
    steps = CanonicalPolyadic.steps

    def memoised(self, config):
        key = (self.kernel.shape, self.kernel.dtype.str, self.kernel.tobytes(), tuple(config),
               repr(sorted(self.attrs.items())), self.DIVERGENCE)
        if key not in memo:
            before = len(self.rejected)
            memo[key] = (steps(self, config), self.rejected[before:])
        else:
            self.rejected.extend(memo[key][1])
        return memo[key][0]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CanonicalPolyadic, "steps", memoised)
        yield


@pytest.fixture(scope="session", autouse=True)
def quick_end_to_end_timing():
    """The end-to-end timing that closes every compress run with data, in fewer rounds (3 runs, 0.05 s instead of
    10 runs, 1 s): these tests check what the report's timings are, not how precise (tests/test_latency.py checks
    the rounds themselves; measured, the full rounds were a quarter of a MiniLM-L2 compact run, and 5 runs,
    0.2 s still over a quarter of a MiniLM-L2 run at fixed ranks)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "end_to_end", functools.partial(latency.end_to_end, min_runs=3, min_seconds=0.05))
        yield


@pytest.fixture(scope="session", autouse=True)
def one_thread_per_worker():
    """With a pytest-xdist worker per core, each worker's ONNX Runtime sessions and BLAS calls use one thread:
    every worker's thread pools spread over every core would oversubscribe the machine (onnxruntime's pool
    threads spin while they wait). Sessions asked for a thread count (the latency tests) keep it."""
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) < 2:
        yield
        return
    opened = runtime.open_session

    def one_thread(model, provider, threads, level):
        return opened(model, provider, threads or 1, level)

    with threadpool_limits(1), pytest.MonkeyPatch.context() as patch:
        patch.setattr(runtime, "open_session", one_thread)
        yield


# the modules with the longest runs (measured: the README's commands about 100 s, then the real-model bound
# tests): handed out first, so that pytest-xdist's workers, which take a module at a time, finish together
LONGEST_FIRST = ("test_readme.py", "test_error_bound.py", "test_objective.py", "test_conv_methods.py",
                 "test_overrides.py", "test_parallel.py")


def pytest_collection_modifyitems(items):
    """The longest modules first (a stable sort: each module's tests keep their order)."""
    rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
