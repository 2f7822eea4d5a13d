"""A unit's factorization fed to the original model instead of built into a copy of it.

A factor chain computes second @ first @ x, what the layer computes with the dense weight second @ first.
So the original model, with the unit's stored weight (and the bias its factors shift) turned into graph
inputs, computes what the factorized model computes (up to float rounding) when fed that product. One
session then serves every unit's sensitivity probe, where building, serializing and loading a model per
unit cost more than running it (BERT-base: about 2.5 s of 4.5 s per probe).

A unit qualifies when its weight is stored (an initializer or a Constant node's) as float16/32/64 and its
adapter's view only moves elements (reshapes, transposes): then the view applied to the stored positions
says where each matrix element goes back to. Its bias shift, if any, must go to an initializer that only
its bias node uses, or to a bias the node lacks (added as zeros in the probing copy, where Constant nodes
of fed tensors also become initializers). A unit inside an If / Loop / Scan body qualifies alike: its fed
tensors move to the main graph, and the body reads them from the outer scope. Other units are probed by
building their model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..graph.bodies import all_graphs, inner_graphs
from ..graph.layers import BiasSite, Layer, Unit
from ..graph.splice import Factorized
from ..graph.weights import ConstantIndex, Weight, weight_users

FED_DTYPES = (np.float16, np.float32, np.float64)  # what onnxruntime's Python binding takes as is


@dataclass(frozen=True)
class Placement:
    """Where the elements of a value seen through a view go in the stored tensor."""

    name: str  # the initializer
    dims: tuple[int, ...]  # its stored shape
    dtype: np.dtype  # its stored element type
    positions: np.ndarray  # per element of the viewed value (in C order), its index in the stored tensor
    attach: tuple[str, int] | None = None  # a bias the node lacks: (the node's first output, input position)

    def stored(self, value: np.ndarray) -> np.ndarray:
        flat = np.empty(math.prod(self.dims), dtype=self.dtype)
        flat[self.positions] = np.asarray(value).reshape(-1)
        return flat.reshape(self.dims)


@dataclass(frozen=True)
class Override:
    """The inputs to feed for one unit's factorization."""

    weight: Placement
    biases: tuple[tuple[BiasSite, Placement], ...]  # per layer: its bias site and where its value goes

    @property
    def placements(self) -> list[Placement]:
        return [self.weight, *(placement for _, placement in self.biases)]

    def feed(self, factors: Factorized) -> dict[str, np.ndarray] | None:
        """The stored weight (and biases) of the dense equivalent of `factors`; None for a decomposition
        with its own chain (Tucker-2, CP, ...) or a bias shift this override has no place for."""
        weight = factors.same_op_weight()
        if weight is None or (factors.bias_shift is not None and not self.biases):
            return None
        fed = {self.weight.name: self.weight.stored(weight)}
        if factors.bias_shift is not None:
            shift = np.asarray(factors.bias_shift, dtype=np.float64).reshape(-1)
            for site, placement in self.biases:
                fed[placement.name] = placement.stored(site.shifted(shift))
        return fed


def overrides_for(model: onnx.ModelProto, units: Sequence[Unit], graph_outputs: set[str]) -> dict[str, Override]:
    """By unit key, the overrides of the units that qualify (see the module's docstring)."""
    stored = ConstantIndex(model)  # initializers and Constant nodes' tensors: what a probe may feed
    found = {}
    for unit in units:
        override = _override(unit, stored, graph_outputs)
        if override is not None:
            found[unit.key] = override
    return found


def with_overridable(model: onnx.ModelProto, overrides: Iterable[Override]) -> onnx.ModelProto:
    """The model (changed in place) taking the overrides' tensors as optional graph inputs: Constant nodes
    of them become initializers, a bias a node lacks is added as zeros, and those stored in If / Loop / Scan
    bodies move to the main graph, whose inputs every body reads from the outer scope."""
    placements = {p.name: p for override in overrides for p in override.placements}
    by_output = {node.output[0]: node for graph in all_graphs(model.graph) for node in graph.node if node.output}
    for graph in all_graphs(model.graph):
        for node in [n for n in graph.node if n.op_type == "Constant" and n.output[0] in placements]:
            tensor = model.graph.initializer.add()
            tensor.CopyFrom(next(a.t for a in node.attribute if a.name == "value"))
            tensor.name = node.output[0]
            graph.node.remove(node)
    for body in inner_graphs(model.graph):
        for position in reversed(range(len(body.initializer))):
            if body.initializer[position].name in placements:
                model.graph.initializer.add().CopyFrom(body.initializer[position])
                del body.initializer[position]
    for placement in placements.values():
        if placement.attach is not None:
            output, position = placement.attach
            inputs = by_output[output].input
            inputs.extend([""] * (position + 1 - len(inputs)))
            inputs[position] = placement.name
            zeros = np.zeros(placement.dims, placement.dtype)
            model.graph.initializer.append(numpy_helper.from_array(zeros, placement.name))
    present = {i.name for i in model.graph.input}
    initializers = {t.name: t for t in model.graph.initializer}
    for name in placements:
        if name not in present:
            tensor = initializers[name]
            model.graph.input.append(helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
    return model


def _override(unit: Unit, stored: ConstantIndex, graph_outputs: set[str]) -> Override | None:
    placements = [_placement(layer.weight, stored, _unit_view(layer)) for layer in unit.layers]
    first = placements[0]
    if first is None or any(p is None or p.name != first.name or not np.array_equal(p.positions, first.positions)
                            for p in placements):
        return None
    channels = unit.groups * unit.shape[0]
    biases: list[tuple[BiasSite, Placement]] = []
    for layer in unit.layers:
        placement = _bias_placement(layer, channels, stored, graph_outputs)
        if layer.bias is None or placement is None:
            biases = []  # a bias shift is then probed by building
            break
        biases.append((layer.bias, placement))
    return Override(first, tuple(biases))


def _unit_view(layer: Layer):
    """The layer's view of its weight as its unit's matrices (a tied head sees them transposed)."""
    view = layer.view
    if view is None or not layer.transposed:
        return view
    return lambda value: np.swapaxes(view(value), 1, 2)


def _bias_placement(layer: Layer, channels: int, stored: ConstantIndex, graph_outputs: set[str]) -> Placement | None:
    """Where the layer's shifted bias goes: its bias initializer when only its bias node uses it and it
    holds one value per channel, or a new one the node takes as input."""
    site = layer.bias
    if site is None:
        return None
    if site.weight is None:  # the node has no bias yet (Conv, Gemm): the chain would add one
        if site.node is not layer.node or site.index != len(site.node.inputs):
            return None
        dtype = layer.weight.node_dtype
        if dtype not in FED_DTYPES:
            return None
        dims = tuple(site.value.shape)
        output = layer.node.outputs[0].name
        positions = np.arange(math.prod(dims))
        return Placement(f"{output}.probe_bias", dims, np.dtype(dtype), positions, (output, site.index))
    users, to_output = weight_users(site.weight.stored, graph_outputs)
    placement = _placement(site.weight, stored)
    if to_output or [id(user) for user in users] != [id(site.node)] or placement is None:
        return None
    if site.shifted(np.zeros(channels)).size != placement.positions.size:  # a bias broadcast over channels
        return None
    return placement


def _placement(weight: Weight, stored: ConstantIndex, view=None) -> Placement | None:
    """Where the value a node sees (through `view`, if given) goes back to in the stored initializer, when
    it is one and the chain and view only move elements."""
    tensor = stored.get(weight.name)
    if tensor is None or weight.stored is None:
        return None
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    if dtype not in FED_DTYPES:
        return None
    dims = tuple(tensor.dims)
    size = math.prod(dims)
    positions = np.arange(size, dtype=np.int64).reshape(dims)
    for kind, argument in weight.steps:
        if kind == "transpose":
            positions = np.transpose(positions, argument)
    if view is not None:
        positions = view(positions)
    positions = np.asarray(positions).reshape(-1)
    if positions.size != size or positions.dtype.kind not in "iu":
        return None
    if positions.min() < 0 or positions.max() >= size or not (np.bincount(positions, minlength=size) == 1).all():
        return None  # the view repeats or drops elements (counted, not sorted: a 30522 x 768 table took 0.4 s)
    return Placement(weight.name, dims, np.dtype(dtype), positions)
