"""Latency on the execution provider validation runs on: a factorization is only worth keeping where it
is not slower than the dense layer it replaces.

Low-rank chains cut multiply-adds, yet two small GEMMs can run slower than one larger one (less work per
call, another kernel launch, a lost MatMul+Add fusion). So, as deployed (ONNX Runtime with every graph
optimization on, the given intra-op thread count):

- `time_side_by_side` times models on one feed in interleaved rounds (the order alternates every round,
  so drift of a shared, busy machine hits all of them alike): one layer dense against factorized, or
  (`end_to_end`, for the report) the original against the compressed model.
- `activations` / `activation_shapes` find the concrete shape of every unit's data input on a real feed,
  in one run with those tensors as extra outputs.
- `LayerTimer` cuts each unit's first layer (with its following bias Add) out of the model with the data
  input fixed to that shape, splices a factorization into the cut, and times both; results are cached by
  everything the time depends on (op, attributes, shapes, method and ranks, provider, threads), in memory
  and optionally in a JSON file shared between runs.
- `not_slower` bisects, per method of a unit, its options ordered by size for the largest whose
  factorized time is within `margin` times the dense time (time grows with rank): a handful of timings
  per unit, and every option up to that one is allowed.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from ..factorize.contracts import Option
from ..factorize.heads import HEADS
from ..factorize.menu import UnitDecomposers, pareto_front
from ..factorize.prune import PRUNE
from ..factorize.rewrite import build
from ..graph.bodies import Request, exposed, unstacked
from ..graph.imported import import_graph
from ..graph.layers import Layer, Unit, fetch_request, find_layers
from ..graph.model_io import is_large
from ..graph.splice import Factorized
from ..graph.weights import CHAIN_OPS, ConstantIndex, stored_constant
from ..observe.cache import write_cache_file
from ..observe.sessions import EXECUTION_PROVIDERS, open_session, session_with_outputs
from ..report import Latency, Timing

UNTIMED = (PRUNE, HEADS)  # the same ops on smaller matrices, no node added: never slower (and a pruned layer
# cannot be timed alone: its input is narrower than the activation it would be fed)


WARMUP = 3  # untimed runs of every model before the rounds, ...
WARM_AFTER_SECONDS = 0.5  # ... fewer for a model one of whose warm-up runs took this long (BERT-base: 3 s a run)
MIN_RUNS = 10  # timed runs of every model, at least ...
MIN_SECONDS = 1.0  # ... and rounds for at least this long in all (end to end), ...
MAX_SECONDS = 15.0  # ... but slow models (BERT-base at batch 16: 3 s a run) stop after this long
LAYER_WARMUP = 1  # a single layer's first run allocates its buffers; the next ones are steady (measured: a
# 768->3072 MatMul at 2048 tokens, 63/51/52/51 ms), and the median ignores one slow run anyway
LAYER_MIN_RUNS = 20  # a single layer is quick: more runs, less time, ...
LAYER_MIN_SECONDS = 0.25
LAYER_MAX_SECONDS = 0.5  # ... but a slow layer (a BERT-base FFN at 2048 tokens: 0.1 s a run) stops after this
FEW_RUNS = 5  # stopping after the longest allowed time needs this many runs of every model

CACHE_FORMAT = "onnx-lowrank-latency-1"


# --------------------------------------------------------------------------------------------- timing


def timing_session(model: onnx.ModelProto, provider: str, threads: int = 0) -> ort.InferenceSession:
    """A session as models are deployed: every graph optimization on (fusions, constant folding),
    `threads` intra-op threads (0: ONNX Runtime's default), CUDA first when `provider` is "cuda"."""
    return open_session(model, provider, threads, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)


class _Runner:
    """One model's session with its feed bound: each call is one timed inference (seconds).

    On CUDA the inputs live on the device and the outputs stay there (IOBinding), so what is timed is
    the model, not host-device copies that are the same for every model compared."""

    def __init__(self, model: onnx.ModelProto, feed: Mapping[str, np.ndarray], provider: str, threads: int):
        self.session = timing_session(model, provider, threads)
        self.cuda = self.session.get_providers()[0] == EXECUTION_PROVIDERS["cuda"]
        if provider == "cuda" and not self.cuda:
            warnings.warn("the CUDA execution provider failed to start; timing on the CPU", RuntimeWarning, stacklevel=3)
        names = [i.name for i in self.session.get_inputs()]
        missing = [name for name in names if name not in feed]
        if missing:
            raise ValueError(f"the feed has no value for model input {missing[0]!r}")
        self.feed = {name: feed[name] for name in names}
        self.outputs = [o.name for o in self.session.get_outputs()]
        if self.cuda:
            self.binding = self.session.io_binding()
            self.on_device = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), "cuda", 0)
                              for name, value in self.feed.items()}  # kept alive as long as the binding
            for name, value in self.on_device.items():
                self.binding.bind_ortvalue_input(name, value)
            for name in self.outputs:
                self.binding.bind_output(name, "cuda")

    def __call__(self) -> float:
        if self.cuda:
            start = time.perf_counter()
            self.session.run_with_iobinding(self.binding)  # synchronizes the device before returning
            return time.perf_counter() - start
        start = time.perf_counter()
        self.session.run(self.outputs, self.feed)
        return time.perf_counter() - start


def time_side_by_side(
    models: Sequence[onnx.ModelProto],
    feed: Mapping[str, np.ndarray],
    provider: str,
    threads: int = 0,
    warmup: int = WARMUP,
    min_runs: int = MIN_RUNS,
    min_seconds: float = MIN_SECONDS,
    advance: Callable[[int], None] | None = None,
    max_seconds: float | None = None,
) -> list[Timing]:
    """Latency of each model on `feed` (each takes the inputs it declares), one Timing per model.

    All sessions are opened first (as deployed: see `timing_session`), each model runs `warmup` times,
    then rounds run every model once, in an order reversed every round (ABBA...: a drift of the machine's
    speed hits all models alike), until every model ran `min_runs` times and the rounds took
    `min_seconds` in all, or, with `max_seconds`, until the rounds took that long and every model ran
    FEW_RUNS times. A model is warm after a warm-up run of WARM_AFTER_SECONDS. `advance` is called
    once per round (a progress bar). Never compare timings taken on different machines or thread counts.
    """
    if min_runs < 1:
        raise ValueError(f"min_runs must be at least 1, got {min_runs}")
    runners = [_Runner(model, feed, provider, threads) for model in models]
    return _rounds(runners, warmup, min_runs, min_seconds, advance, max_seconds)


def _rounds(runners: list[_Runner], warmup: int, min_runs: int, min_seconds: float, advance,
            max_seconds: float | None = None) -> list[Timing]:
    for runner in runners:
        for _ in range(warmup):
            if runner() >= WARM_AFTER_SECONDS:
                break
    seconds: list[list[float]] = [[] for _ in runners]
    order = list(range(len(runners)))
    rounds, start = 0, time.perf_counter()
    while rounds < min_runs or time.perf_counter() - start < min_seconds:
        if max_seconds is not None and rounds >= min(FEW_RUNS, min_runs) and time.perf_counter() - start >= max_seconds:
            break
        for position in order if rounds % 2 == 0 else reversed(order):
            seconds[position].append(runners[position]())
        rounds += 1
        if advance is not None:
            advance(1)
    return [Timing.of(values) for values in seconds]


_ORT_ERRORS = tuple(value for value in vars(ort.capi.onnxruntime_pybind11_state).values()
                    if isinstance(value, type) and issubclass(value, Exception))


def end_to_end(
    original: onnx.ModelProto,
    factorized: onnx.ModelProto,
    quantized: onnx.ModelProto | None,
    feed: Mapping[str, np.ndarray],
    provider: str,
    advance: Callable[[int], None] | None = None,
    threads: int = 0,
    min_runs: int = MIN_RUNS,
    min_seconds: float = MIN_SECONDS,
) -> Latency:
    """The report's end-to-end latency: the original and the compressed model (the quantized one when
    given, else the factorized one; both when quantized) timed side by side on one feed.

    `provider` is the one that ran, `batch` the feed's first axis, `threads` None for onnxruntime's
    default; `original` / `compressed` [/ `factorized`] their Timings, `speedup` median original / median
    compressed. Should onnxruntime fail to run a model with every optimization on, `error` says so
    instead of failing the run that produced a validated model.
    """
    first = next(iter(feed.values()), None)
    batch = int(np.shape(first)[0]) if first is not None and np.ndim(first) else None
    models = {"original": original, "compressed": quantized if quantized is not None else factorized}
    if quantized is not None:
        models["factorized"] = factorized
    try:
        runners = [_Runner(model, feed, provider, threads) for model in models.values()]
        timings = _rounds(runners, WARMUP, min_runs, min_seconds, advance, MAX_SECONDS)
    except _ORT_ERRORS as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return Latency(provider, batch, threads or None,
                       error=f"onnxruntime could not time the models with every optimization on: {first_line}")
    timed = dict(zip(models, timings))
    return Latency(
        provider="cuda" if all(runner.cuda for runner in runners) else "cpu", batch=batch, threads=threads or None,
        runs=timings[0].runs, original=timed["original"], compressed=timed["compressed"],
        factorized=timed.get("factorized"), speedup=timings[0].median_ms / timings[1].median_ms,
    )


# --------------------------------------------------------------------------------- activation shapes


class Untimeable(ValueError):
    """A layer that cannot be cut out of its model into a model of its own."""


@dataclass(frozen=True)
class Activation:
    """A unit's data input on a real feed: its tensor name, concrete shape and element type."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy name: "float32", "int64", ...


def data_input(layer: Layer) -> str:
    """The name of the tensor a layer's weight is applied to: the activation of a MatMul / Gemm / Conv /
    ConvTranspose (the operand that is not the weight), the indices of a Gather. Not always what the
    adapter observes: convs may observe their output."""
    node = layer.node
    if node.op == "MatMul":
        position = 0 if layer.info["side"] == "right" else 1
    elif node.op == "Gemm":
        position = 0 if layer.info["side"] == "B" else 1
    elif node.op == "Gather":
        position = 1
    elif node.op in ("Conv", "ConvTranspose"):
        position = 0
    else:  # an op of some other adapter: what it observes, when that is an input
        tensor, side = layer.adapter.observed(layer)
        if side == "output":
            raise Untimeable(f"no data input known for {node.op} node {node.name!r}")
        return tensor.name
    return node.inputs[position].name


def activations(
    model: onnx.ModelProto, units: Sequence[Unit], feed: Mapping[str, np.ndarray], provider: str
) -> dict[str, Activation]:
    """Per unit key, its first layer's data input on `feed`, from one ONNX Runtime run with those tensors
    as extra outputs (graph inputs are read from the feed itself)."""
    return timed_activations(model, units, feed, provider, timed=False)[0]


def timed_activations(
    model: onnx.ModelProto, units: Sequence[Unit], feed: Mapping[str, np.ndarray], provider: str, timed: bool = True,
    others: Iterable[Mapping[str, np.ndarray]] = (),
) -> tuple[dict[str, Activation], float | None]:
    """`activations`, and with `timed` the milliseconds of a second (warm) run of the same session: the
    model's time give or take the copies of the extra outputs, enough for a rough allowance and cheaper
    than a session of its own (None when every data input is a graph input and nothing ran). A layer in
    an If branch or Loop body that `feed` does not run gets its activation from the first of `others`
    that runs it (none: no activation, and the layer cannot be timed)."""
    requests = {unit.key: _data_request(unit.layers[0]) for unit in units}
    graph_inputs = {i.name for i in model.graph.input}
    computed = list(dict.fromkeys(r for r in requests.values() if r.steps or r.name not in graph_inputs))
    values = {r: np.asarray(feed[r.name]) for r in requests.values() if r not in computed}
    if not computed:
        return _first_slices(requests, values), None
    run_ms = None
    exposing, outputs = exposed(model, computed)
    session = session_with_outputs(exposing, outputs, provider, source="the input model")
    values.update(zip(computed, session.run(dict(feed), outputs)))
    if timed:
        started = time.perf_counter()
        session.run(dict(feed), outputs)
        run_ms = (time.perf_counter() - started) * 1e3
    found = _first_slices(requests, values)
    for other in others:
        if len(found) == len(requests):
            break
        found = {**_first_slices(requests, dict(zip(computed, session.run(dict(other), outputs)))), **found}
    return found, run_ms


def _first_slices(requests: Mapping[str, Request], values: Mapping[Request, np.ndarray]) -> dict[str, Activation]:
    """Per unit key, its data input's first iteration in its body (none where the feed skips the body)."""
    found = {}
    for key, request in requests.items():
        value = next(unstacked(values[request], request.depth), None) if request in values else None
        if value is not None:
            found[key] = Activation(request.name, tuple(int(n) for n in value.shape), value.dtype.name)
    return found


def _data_request(layer: Layer) -> Request:
    name = data_input(layer)
    return fetch_request(layer, next(tensor for tensor in layer.node.inputs if tensor.name == name))


def activation_shapes(
    model: onnx.ModelProto, units: Sequence[Unit], feed: Mapping[str, np.ndarray], provider: str
) -> dict[str, tuple[int, ...]]:
    """Per unit key, the concrete shape of its first layer's data input on `feed` (one run)."""
    return {key: found.shape for key, found in activations(model, units, feed, provider).items()}


# ------------------------------------------------------------------------------ single-layer models


@dataclass
class LayerModels:
    """A unit's first layer as a model of its own (input: the data input at its concrete shape; output:
    the layer's output, or its bias Add's), dense and with a factorization spliced in."""

    dense: onnx.ModelProto
    factorized: onnx.ModelProto
    input: str
    output: str
    extracted: bool  # cut by onnx.utils.Extractor (False: built by hand)


class LayerTimer:
    """Dense against factorized time of single layers, on `provider` with `threads` intra-op threads.

    `shapes`: per unit key, its data input's concrete shape (`activation_shapes`) or an `Activation`.
    `cache`: a JSON file keeping the timings between runs (read now, rewritten after each new timing);
    timings are keyed by what they depend on, not by unit, so layers alike are timed once.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        adapters: dict,
        shapes: Mapping[str, tuple[int, ...] | Activation],
        provider: str,
        threads: int = 0,
        cache: str | os.PathLike | None = None,
        min_runs: int = LAYER_MIN_RUNS,
        min_seconds: float = LAYER_MIN_SECONDS,
        seed: int = 0,
    ):
        self.model = model
        self.adapters = adapters
        self.shapes = dict(shapes)
        self.provider = provider
        self.threads = threads
        self.min_runs = min_runs
        self.min_seconds = min_seconds
        self.seed = seed
        self.path = None if cache is None else Path(cache)
        self.timings: dict[str, tuple[float, float]] = self._load()
        self.measured = 0  # timings taken (not found in the cache)
        self._extractor: onnx.utils.Extractor | None = None
        self._large: bool | None = None
        self._index: ConstantIndex | None = None
        self._dense: dict[str, tuple[onnx.ModelProto, str, str, bool]] = {}

    # ---- models

    def models(self, unit: Unit, factorization: Factorized) -> LayerModels:
        """The unit's first layer as a model of its own, dense and factorized (Untimeable when it cannot
        be cut out)."""
        dense, input_name, output_name, extracted = self._dense_model(unit)
        factorized = build(dense, self.adapters, {unit.key: factorization})
        return LayerModels(dense, factorized, input_name, output_name, extracted)

    def _dense_model(self, unit: Unit) -> tuple[onnx.ModelProto, str, str, bool]:
        if unit.key not in self._dense:
            layer = unit.layers[0]
            input_name, output_name = data_input(layer), _timed_output(layer)
            activation = self._activation(unit, input_name)
            problems = []
            for extracted, cut in ((True, self._extract), (False, self._by_hand)):
                try:
                    mini = cut(layer, activation, output_name)
                except Exception as error:  # noqa: BLE001 - any failure: try the other way
                    problems.append(f"{'extracting' if extracted else 'building'}: {error}")
                    continue
                problem = _finds_unit(mini, self.adapters, unit.key)
                if problem is None:
                    self._dense[unit.key] = (mini, input_name, output_name, extracted)
                    break
                problems.append(f"{'extracted' if extracted else 'built'} model: {problem}")
            else:
                raise Untimeable(f"cannot cut layer {layer.node.name!r} out of the model: " + "; ".join(problems))
        return self._dense[unit.key]

    def _activation(self, unit: Unit, input_name: str) -> Activation:
        found = self.shapes.get(unit.key)
        if found is None:
            raise Untimeable(f"no activation shape for unit {unit.key}")
        if isinstance(found, Activation):
            return found
        return Activation(input_name, tuple(int(n) for n in found), _declared_dtype(self.model, unit.layers[0], input_name))

    def _extract(self, layer: Layer, activation: Activation, output_name: str) -> onnx.ModelProto:
        if self._large is None:
            self._large = is_large(self.model)
        if self._large:  # onnx.utils.Extractor builds one protobuf message: cut it by hand
            raise Untimeable("the model is over 2 GB")
        if self._extractor is None:
            self._extractor = onnx.utils.Extractor(self.model)  # refers to the model, copies nothing
        extractor = self._extractor
        # the boundary's types are what we know, not what inference may (or may not) have recorded
        saved = {name: extractor.value_infos.get(name) for name in (activation.name, output_name)}
        extractor.value_infos[activation.name] = _value_info(activation)
        extractor.value_infos[output_name] = helper.make_tensor_value_info(output_name, layer.weight.node_type, None)
        try:
            mini = extractor.extract_model([activation.name], [output_name])
        finally:
            for name, info in saved.items():
                if info is None:
                    extractor.value_infos.pop(name, None)
                else:
                    extractor.value_infos[name] = info
        del mini.graph.value_info[:]  # symbolic shapes of the whole model's batch: the cut has concrete ones
        _check_closed(mini)
        if mini.ir_version < 4:  # before IR 4 every initializer must also be a graph input
            mini.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in mini.graph.initializer)
        return mini

    def _by_hand(self, layer: Layer, activation: Activation, output_name: str) -> onnx.ModelProto:
        if self._index is None:
            self._index = ConstantIndex(self.model)
        return _by_hand(self._index, self.model.opset_import, self.model.ir_version, layer, activation, output_name)

    def feed(self, unit: Unit) -> dict[str, np.ndarray]:
        """Random data of the unit's data input (indices in range for a Gather): what timing runs on."""
        _, input_name, _, _ = self._dense_model(unit)
        activation = self._activation(unit, input_name)
        rng = np.random.default_rng(self.seed)
        dtype = np.dtype(activation.dtype)
        if unit.op == "Gather":
            rows = unit.layers[0].weight.shape[0]
            return {input_name: rng.integers(0, rows, size=activation.shape).astype(dtype)}
        return {input_name: rng.standard_normal(activation.shape).astype(dtype)}

    # ---- timing

    def key(self, unit: Unit, factorization: Factorized) -> str:
        """What a layer's time depends on: op, attributes, weight and data shapes and types, the bias
        fused or not, the method and its ranks, provider and threads (not the weights' values)."""
        return self._key(unit, factorization.method, factorization.rank, factorization.bias_shift is not None)

    def cached(self, unit: Unit, method: str, rank, shifted: bool) -> tuple[float, float] | None:
        """The timing of this unit's layer factorized so, when one was taken (this run or in the cache
        file), without factorizing it: layers alike share timings."""
        return self.timings.get(self._key(unit, method, rank, shifted))

    def _key(self, unit: Unit, method: str, rank, shifted: bool) -> str:
        layer = unit.layers[0]
        activation = self._activation(unit, data_input(layer))
        parts = {
            "op": layer.node.op,
            "attrs": sorted((name, repr(value)) for name, value in layer.node.attrs.items()),
            "info": sorted((name, repr(value)) for name, value in layer.info.items()),
            "weight": [list(layer.weight.shape), layer.weight.storage_type, layer.weight.node_type],
            "activation": [list(activation.shape), activation.dtype],
            "bias": _timed_output(layer) != layer.node.outputs[0].name,
            "method": method,
            "rank": list(rank) if isinstance(rank, tuple) else rank,
            "bias_shift": shifted,
            "provider": self.provider,
            "threads": self.threads,
            "onnxruntime": ort.__version__,
        }
        return json.dumps(parts, sort_keys=True)

    def times(self, unit: Unit, factorization: Factorized) -> tuple[float, float]:
        """(dense_ms, factorized_ms): median latencies of the unit's first layer, measured side by side."""
        key = self.key(unit, factorization)
        if key not in self.timings:
            models = self.models(unit, factorization)
            dense, factorized = time_side_by_side(
                [models.dense, models.factorized], self.feed(unit), self.provider, self.threads, warmup=LAYER_WARMUP,
                min_runs=self.min_runs, min_seconds=self.min_seconds, max_seconds=LAYER_MAX_SECONDS,
            )
            self.timings[key] = (dense.median_ms, factorized.median_ms)
            self.measured += 1
            self._save()
        return self.timings[key]

    def _load(self) -> dict[str, tuple[float, float]]:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            stored = json.loads(self.path.read_text())
            if stored.get("format") != CACHE_FORMAT:
                return {}
            return {str(k): (float(v[0]), float(v[1])) for k, v in stored["timings"].items()}
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
            return {}  # a damaged or foreign file is ignored (and rewritten), never trusted

    def _save(self) -> None:
        if self.path is None:
            return
        merged = {**self._load(), **self.timings}  # another run may have added timings meanwhile
        text = json.dumps({"format": CACHE_FORMAT, "timings": {k: list(v) for k, v in merged.items()}}, indent=1)
        write_cache_file(self.path, lambda stream: stream.write(text.encode()))


def _timed_output(layer: Layer) -> str:
    """The layer's output, or that of the Add holding its bias (so that MatMul+Add fusion is timed)."""
    bias = layer.bias
    if bias is not None and bias.node is not None and bias.node is not layer.node:
        return bias.node.outputs[0].name
    return layer.node.outputs[0].name


def _value_info(activation: Activation) -> onnx.ValueInfoProto:
    elem_type = helper.np_dtype_to_tensor_dtype(np.dtype(activation.dtype))
    return helper.make_tensor_value_info(activation.name, elem_type, list(activation.shape))


def _declared_dtype(model: onnx.ModelProto, layer: Layer, name: str) -> str:
    """The element type of a data input given only its shape: as declared in the model, else the weight's
    (float ops compute in one type), else int64 (Gather indices)."""
    for info in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        if info.name == name and info.type.tensor_type.elem_type:
            return helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type).name
    return "int64" if layer.node.op == "Gather" else layer.weight.node_dtype.name


def _check_closed(model: onnx.ModelProto) -> None:
    """Every node input is computed inside, stored, or the graph input: the cut reached nothing else."""
    known = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    for node in model.graph.node:
        missing = [name for name in node.input if name not in known]
        if missing:
            raise Untimeable(f"node {node.name!r} needs {missing[0]!r}, which is computed outside the layer")
        known.update(node.output)


def _by_hand(index: ConstantIndex, opsets, ir_version: int, layer: Layer, activation: Activation,
             output_name: str) -> onnx.ModelProto:
    """The layer (and its bias Add) rebuilt with onnx.helper: each other input traced back through its
    Identity / Transpose / Cast chain to the stored constant, which becomes an initializer of the same
    name (so the layer is found under the same unit key)."""
    nodes = [layer.node]
    if output_name != layer.node.outputs[0].name:
        assert layer.bias is not None  # the output is that of the layer's bias Add
        nodes.append(layer.bias.node)
    made = {activation.name, ""} | {t.name for node in nodes for t in node.outputs}
    stored: list[onnx.TensorProto] = []
    chains: list[onnx.NodeProto] = []
    for node in nodes:
        for tensor in node.inputs:
            chain = []
            while tensor.name not in made and stored_constant(tensor) is None:
                if len(tensor.inputs) != 1 or tensor.inputs[0].op not in CHAIN_OPS:
                    raise Untimeable(f"{tensor.name} is computed outside the layer")
                chain.append(tensor.inputs[0])
                made.add(tensor.name)
                tensor = tensor.inputs[0].inputs[0]
            if tensor.name not in made:
                proto = index.get(tensor.name)
                if proto is None:
                    raise Untimeable(f"constant {tensor.name} has no tensor value")
                initializer = onnx.TensorProto()
                initializer.CopyFrom(proto)
                initializer.name = tensor.name
                stored.append(initializer)
                made.add(tensor.name)
            chains.extend(_node_proto(step) for step in reversed(chain))
    graph = helper.make_graph(
        [*chains, *(_node_proto(node) for node in nodes)], "layer", [_value_info(activation)],
        [helper.make_tensor_value_info(output_name, layer.weight.node_type, None)], stored,
    )
    return helper.make_model(graph, opset_imports=opsets, ir_version=max(ir_version, 4))


def _node_proto(node) -> onnx.NodeProto:
    return helper.make_node(node.op, [t.name for t in node.inputs], [t.name for t in node.outputs],
                            name=node.name, domain=node.domain or "", **dict(node.attrs))


def _finds_unit(mini: onnx.ModelProto, adapters: dict, key: str) -> str | None:
    """None when the layer model holds the unit under the same key (so factors splice into it), else why not."""
    plan = find_layers(import_graph(mini).graph, mini, adapters)
    if any(unit.key == key for unit in plan.units):
        return None
    if plan.skipped:
        return f"its layer is skipped: {plan.skipped[0].reason}"
    return f"the unit is found as {[unit.key for unit in plan.units]}, not {key!r}"


# ------------------------------------------------------------------------------- options not slower


@dataclass
class Boundary:
    """One method of a unit: the largest option (by parameters) whose factorized layer is not slower
    than `margin` times the dense layer, and the times measured there (at the smallest option when none
    is fast enough)."""

    method: str
    largest: Option | None  # None: even the smallest option is slower
    dense_ms: float
    factorized_ms: float
    timings: int  # options timed by the bisection

    def to_dict(self) -> dict:
        largest = None if self.largest is None else {"config": list(self.largest.config), "params": self.largest.params}
        return {"method": self.method, "largest": largest, "dense_ms": self.dense_ms,
                "factorized_ms": self.factorized_ms, "timings": self.timings}


@dataclass
class LatencyLimit:
    """Which options of a unit are allowed: call it with an Option. An option is allowed when its method's
    largest allowed option has at least as many parameters; a method that was not timed (it offered no
    option then) allows everything."""

    unit: str  # the unit's key
    margin: float
    boundaries: dict[str, Boundary] = field(default_factory=dict)

    def __call__(self, option: Option) -> bool:
        boundary = self.boundaries.get(option.method)
        if boundary is None:
            return True
        return boundary.largest is not None and option.params <= boundary.largest.params

    def to_dict(self) -> dict:
        return {"unit": self.unit, "margin": self.margin, "boundaries": [b.to_dict() for b in self.boundaries.values()]}


def not_slower(candidates: UnitDecomposers, timer, margin: float = 1.0, slack_ms: float = 0.0) -> LatencyLimit:
    """The options of `candidates` whose factorized layer runs within `margin` times the dense layer's
    time plus `slack_ms` (`timer.times(unit, factorization) -> (dense_ms, factorized_ms)`, e.g. a
    LayerTimer).

    Time grows with rank, so per method a bisection over its options on the unit's Pareto front (the only
    ones an allocation picks) ordered by parameters finds the largest allowed one (about log2(options)
    timings); every option of that method up to its size is allowed. Raises Untimeable when the unit cannot be cut out of its model (the caller decides what
    that means: keep it dense, or let it be).
    """
    unit = candidates.unit
    limit = LatencyLimit(unit.key, margin)
    by_method: dict[str, list[Option]] = {}
    for option in pareto_front(candidates.options(), unit.params):  # what an allocation can pick
        if option.method not in UNTIMED:
            by_method.setdefault(option.method, []).append(option)
    for method, options in by_method.items():
        ordered = sorted(options, key=lambda o: (o.params, o.config))
        limit.boundaries[method] = _boundary(method, ordered, _option_times(candidates, timer), margin, slack_ms)
    return limit


def _option_times(candidates: UnitDecomposers, timer) -> Callable[[Option], tuple[float, float]]:
    """timer.times of an option's factorization, found without factorizing when the timer has it cached
    (`timer.cached`): a layer of a shape timed before (BERT-base: 75 units, 5 shapes) costs no
    decomposition. How a method's ranks read its option configs (a tuple, or its one number) and whether
    it shifts the bias are learned from the unit's first factorization of that method, always made."""
    unit = candidates.unit
    cached = getattr(timer, "cached", None)
    learned: dict[str, tuple[bool, bool] | None] = {}  # per method: (rank is the config tuple, bias shifted)

    def times(option: Option) -> tuple[float, float]:
        known = learned.get(option.method)
        if cached is not None and known is not None:
            whole, shifted = known
            found = cached(unit, option.method, option.config if whole else option.config[0], shifted)
            if found is not None:
                return found
        factorization = candidates.factorize(option)
        if option.method not in learned:
            rank, config = factorization.rank, tuple(option.config)
            reads: bool | None = rank == config if isinstance(rank, tuple) else None  # the rank is the config tuple
            if reads is None and len(config) == 1 and rank == config[0]:
                reads = False
            learned[option.method] = None if reads is None else (reads, factorization.bias_shift is not None)
        return timer.times(unit, factorization)

    return times


def _boundary(method: str, options: list[Option], times: Callable[[Option], tuple[float, float]],
              margin: float, slack_ms: float = 0.0) -> Boundary:
    """Bisection over options ordered by size for the last one within the margin (times grow with size)."""
    measured: dict[int, tuple[float, float]] = {}

    def allowed(position: int) -> bool:
        measured[position] = times(options[position])
        dense, factorized = measured[position]
        return factorized <= margin * dense + slack_ms

    low, high = -1, len(options)  # options[low] is allowed (or low = -1), options[high] is not (or past the end)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if allowed(middle) else (low, middle)
    dense, factorized = measured[max(low, 0)]  # the last allowed, or the first (refused) when none is
    return Boundary(method, options[low] if low >= 0 else None, dense, factorized, len(measured))
