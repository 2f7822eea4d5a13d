"""Fetching tensors from inside control-flow bodies (If branches, Loop and Scan bodies).

ONNX Runtime returns graph outputs only, and a body's tensors are none. So a copy of the model carries
each wanted tensor out: an Identity of it becomes an extra output of its body and of the node holding the
body, up to the main graph. An If's branches must output alike, so the branch that lacks the tensor
outputs an empty placeholder of its element type, whose (absent) rows are ignored; a Loop or Scan stacks
the extra output over its iterations (one more leading axis per Loop / Scan level), and each iteration's
slice is used as the tensor. A layer whose tensor only ever came back empty never ran on the data.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from ..graph.bodies import STACKING, Names, Step
from ..graph.layers import Layer

PREFIX = "onnx_lowrank.observed"


@dataclass(frozen=True)
class Request:
    """A tensor to fetch: its name, the steps down to the body it is read in, its element type."""

    name: str
    steps: tuple[Step, ...]
    elem_type: int

    @property
    def depth(self) -> int:
        """Leading axes the fetched value stacks (one per Loop / Scan level)."""
        return sum(step.op in STACKING for step in self.steps)


def exposed(model: onnx.ModelProto, requests: Sequence[Request]) -> tuple[onnx.ModelProto, list[str]]:
    """The model with every requested tensor reachable as a graph output (a copy when one is inside a
    body; the model itself otherwise, left as it is), and per request the output's name. Main-graph
    tensors keep their names (the caller adds them to the outputs, or reads graph inputs from its feed)."""
    if not any(request.steps for request in requests):
        return model, [request.name for request in requests]
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    names = Names.of(copy)
    return copy, [_expose(copy, request, names) if request.steps else request.name for request in requests]


def unstacked(value: np.ndarray, depth: int) -> Iterator[np.ndarray]:
    """A fetched value's per-iteration slices (the value itself at depth 0), without empty placeholders."""
    if depth == 0:
        if value.size:
            yield value
        return
    for item in value:
        yield from unstacked(item, depth - 1)


def fetch_request(layer: Layer, tensor: gs.Tensor) -> Request:
    """How to fetch a tensor the layer reads or makes: from its body, when it lives in one (the element
    type is what an If's placeholder needs: inferred, else the weight's, else int64 indices)."""
    elem_type: int = onnx.TensorProto.INT64 if layer.node.op == "Gather" and tensor is layer.node.inputs[1] \
        else layer.weight.node_type
    if tensor.dtype is not None:
        try:
            elem_type = int(helper.np_dtype_to_tensor_dtype(np.dtype(tensor.dtype)))
        except (TypeError, KeyError):  # no numpy type (bfloat16)
            pass
    return Request(tensor.name, layer.scope.steps if layer.scope is not None else (), elem_type)


def _expose(model: onnx.ModelProto, request: Request, names: Names) -> str:
    """Carry one body tensor out to the main graph's outputs; returns the graph output's name."""
    graphs, nodes = [model.graph], []
    for step in request.steps:
        node = graphs[-1].node[step.position]
        nodes.append(node)
        graphs.append(next(a.g for a in node.attribute if a.name == step.attribute))
    current = names.fresh(f"{PREFIX}/{request.name}")
    graphs[-1].node.append(helper.make_node("Identity", [request.name], [current], name=names.fresh(f"{PREFIX}/identity")))
    graphs[-1].output.append(helper.make_tensor_value_info(current, request.elem_type, None))
    for level in reversed(range(len(nodes))):
        node, step = nodes[level], request.steps[level]
        if node.op_type == "If":
            other = "else_branch" if step.attribute == "then_branch" else "then_branch"
            _placeholder(next(a.g for a in node.attribute if a.name == other), request.elem_type, names)
        elif node.op_type == "Scan":
            for attribute in node.attribute:
                if attribute.name in ("scan_output_axes", "scan_output_directions"):
                    attribute.ints.append(0)
        outer = names.fresh(f"{PREFIX}/{request.name}")
        node.output.append(outer)
        graphs[level].output.append(helper.make_tensor_value_info(outer, request.elem_type, None))
        current = outer
    return current


def _placeholder(branch: onnx.GraphProto, elem_type: int, names: Names) -> None:
    """An empty tensor as the branch's extra output."""
    output = names.fresh(f"{PREFIX}/placeholder")
    empty = helper.make_tensor(output, elem_type, [0], np.zeros(0, helper.tensor_dtype_to_np_dtype(elem_type)))
    branch.node.append(helper.make_node("Constant", [], [output], name=names.fresh(f"{PREFIX}/empty"), value=empty))
    branch.output.append(helper.make_tensor_value_info(output, elem_type, None))
