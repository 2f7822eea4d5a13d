"""Dense against factorized time of single layers: `LayerTimer` cuts each unit's first layer (with its
following bias Add) out of the model with the data input fixed to its concrete shape (observe/activations.py),
splices a factorization into the cut, and times both side by side (latency.py); results are cached by
everything the time depends on (op, attributes, shapes, method and ranks, provider, threads), in memory and
optionally in a JSON file shared between runs."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from ..factorize.rewrite import build
from ..graph.imported import import_graph
from ..graph.layers import Layer, Unit, find_layers
from ..graph.model_io import is_large
from ..graph.splice import Factorized
from ..graph.weights import CHAIN_OPS, ConstantIndex, stored_constant
from ..observe.activations import Activation, Untimeable, data_input
from ..observe.cache import write_cache_file
from .latency import time_side_by_side

LAYER_WARMUP = 1  # a single layer's first run allocates its buffers; the next ones are steady (measured: a
# 768->3072 MatMul at 2048 tokens, 63/51/52/51 ms), and the median ignores one slow run anyway
LAYER_MIN_RUNS = 20  # a single layer is quick: more runs, less time, ...
LAYER_MIN_SECONDS = 0.25
LAYER_MAX_SECONDS = 0.5  # ... but a slow layer (a BERT-base FFN at 2048 tokens: 0.1 s a run) stops after this
CACHE_FORMAT = "onnx-lowrank-latency-1"



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
