"""Finding a node's constant weight wherever exporters put it.

Weights live in initializers, in `Constant` nodes (paddle2onnx keeps every weight this way), and behind
Identity / Transpose / Cast chains. A `Weight` records the stored tensor, how to read the value the node
actually sees (in float64, after the chain) and the two element types, so factors can be stored like the
original. The value is read from the stored tensor on each use, never kept: a model's weights are then
never all held in float64 at once, and a model with external data is read layer by layer from its file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper

from .bodies import all_graphs
from .model_io import FLOAT_TYPES

CHAIN_OPS = ("Identity", "Transpose", "Cast")


@dataclass
class Weight:
    """A constant weight as one node sees it."""

    name: str  # the stored tensor: an initializer or the output of a Constant node
    stored: gs.Tensor | None  # that tensor in the graph (None once detached from it)
    storage_type: int  # TensorProto element type as stored
    node_type: int  # element type the consuming node sees (differs when the chain casts)
    shape: tuple[int, ...]  # as the node sees it, after the chain's transposes
    source: onnx.TensorProto | None = None  # the stored tensor's proto, read on every use of `value`
    base_dir: str = ""  # where its external data lies, if it has any
    steps: tuple = ()  # the chain, in order: ("transpose", perm) or ("cast", element type)
    held: np.ndarray | None = None  # the value itself, for a weight detached from its model

    @property
    def value(self) -> np.ndarray:
        """float64, after the chain's transposes and casts: a fresh array on each use unless held."""
        if self.held is not None:
            return self.held
        assert self.source is not None, self.name  # a weight not held is read from its proto
        value = numpy_helper.to_array(self.source, self.base_dir).astype(np.float64)
        for kind, argument in self.steps:
            if kind == "transpose":
                value = np.transpose(value, argument)
            else:
                value = value.astype(helper.tensor_dtype_to_np_dtype(argument)).astype(np.float64)
        return value

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def storage_dtype(self) -> np.dtype:
        return helper.tensor_dtype_to_np_dtype(self.storage_type)

    @property
    def node_dtype(self) -> np.dtype:
        return helper.tensor_dtype_to_np_dtype(self.node_type)


class ConstantIndex:
    """Stored constants of a model by tensor name, read from the proto so every dtype (bfloat16 too) survives;
    and the names of the graph outputs (a constant or activation that is one cannot be changed). Both
    cover the bodies of If / Loop / Scan nodes too: names are unique across a model's graphs."""

    def __init__(self, model: onnx.ModelProto, base_dir: str = ""):
        self.base_dir = base_dir  # where the model's external data lies, if it has any
        self.graph_outputs: set[str] = set()
        self._tensors: dict[str, onnx.TensorProto] = {}
        for graph in all_graphs(model.graph):
            self.graph_outputs.update(output.name for output in graph.output)
            self._tensors.update((t.name, t) for t in graph.initializer)
            for node in graph.node:
                if node.op_type == "Constant" and node.output:
                    for attribute in node.attribute:
                        if attribute.name == "value":
                            self._tensors[node.output[0]] = attribute.t

    def get(self, name: str) -> onnx.TensorProto | None:
        return self._tensors.get(name)


def stored_constant(tensor: gs.Tensor) -> gs.Tensor | None:
    """The tensor holding a constant's stored value: the initializer itself, or a Constant node's output."""
    if isinstance(tensor, gs.Constant):
        return tensor
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        return tensor
    return None


def resolve(tensor: gs.Tensor, index: ConstantIndex) -> Weight | str:
    """Follow `tensor` back through Identity / Transpose / Cast to a stored constant.

    Returns the Weight, or a reason why the input is not a usable constant weight.
    """
    steps: list[gs.Node] = []
    while stored_constant(tensor) is None:
        producers = tensor.inputs
        if not producers:
            return f"{tensor.name} is a graph input, not a constant"
        producer = producers[0]
        if producer.op not in CHAIN_OPS:
            return f"{tensor.name} is computed by {producer.op} node {producer.name!r}, not a constant"
        steps.append(producer)
        tensor = producer.inputs[0]
    proto = index.get(tensor.name)
    if proto is None:
        return f"constant {tensor.name} has no tensor value (sparse or scalar-attribute Constant)"
    if proto.data_type not in FLOAT_TYPES:
        return f"weight {tensor.name} has element type {helper.tensor_dtype_to_string(proto.data_type)}, not floating point"
    shape, node_type, chain = tuple(proto.dims), proto.data_type, []
    for step in reversed(steps):
        if step.op == "Transpose":
            perm = step.attrs.get("perm")
            if perm is not None and sorted(perm) != list(range(len(shape))):
                return f"Transpose node {step.name!r} has perm {list(perm)}, not a permutation of {len(shape)} axes"
            perm = tuple(perm) if perm is not None else tuple(reversed(range(len(shape))))
            shape = tuple(shape[axis] for axis in perm)
            chain.append(("transpose", perm))
        elif step.op == "Cast":
            node_type = step.attrs["to"]
            if node_type not in FLOAT_TYPES:
                return f"weight {tensor.name} is cast to {helper.tensor_dtype_to_string(node_type)}, not floating point"
            chain.append(("cast", node_type))
    if 0 in shape:
        return f"weight {tensor.name} is empty (shape {list(shape)})"
    weight = Weight(name=tensor.name, stored=tensor, storage_type=proto.data_type, node_type=node_type, shape=shape,
                    source=proto, base_dir=index.base_dir, steps=tuple(chain))
    stored = numpy_helper.to_array(proto, index.base_dir)
    if not np.isfinite(stored if stored.dtype.kind == "f" else stored.astype(np.float32)).all():  # bfloat16
        return f"weight {tensor.name} holds NaN or Inf"
    return weight


def weight_users(stored: gs.Tensor, graph_outputs: set[str]) -> tuple[list[gs.Node], bool]:
    """The nodes that consume a stored constant, looking through chain ops; and whether it reaches a graph output."""
    users: list[gs.Node] = []
    to_output = False
    frontier = [stored]
    seen: set[int] = set()
    while frontier:
        current = frontier.pop()
        to_output = to_output or current.name in graph_outputs
        for consumer in current.outputs:
            if id(consumer) in seen:
                continue
            seen.add(id(consumer))
            if consumer.op in CHAIN_OPS:
                frontier.extend(consumer.outputs)
            else:
                users.append(consumer)
    return users, to_output
