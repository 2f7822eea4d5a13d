"""Every unit's data input on a real feed (its tensor, concrete shape and element type), in one ONNX Runtime
run with those tensors as extra outputs, fetched from inside If / Loop / Scan bodies where they live: what
single layers are timed on, and what a probe costs where no statistics were gathered."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from ..graph.layers import Layer, Unit
from ..observe.sessions import session_with_outputs
from .exposed import Request, exposed, fetch_request, unstacked


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
