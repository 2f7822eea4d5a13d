"""Layers inside control-flow bodies (If branches, Loop and Scan bodies): where they live, and how a tensor
inside a body is fetched.

ONNX Runtime returns graph outputs only, and a body's tensors are none. So a copy of the model carries
each wanted tensor out: an Identity of it becomes an extra output of its body and of the node holding the
body, up to the main graph. An If's branches must output alike, so the branch that lacks the tensor
outputs an empty placeholder of its element type, whose (absent) rows are ignored; a Loop or Scan stacks
the extra output over its iterations (one more leading axis per Loop / Scan level), and each iteration's
slice is used as the tensor. A layer whose tensor only ever came back empty never ran on the data.

Steps address bodies by node position, which is the same in a freshly imported onnx-graphsurgeon graph
and in the proto it came from.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from .model_io import all_graphs, inner_graphs

BODIES = {"If": ("then_branch", "else_branch"), "Loop": ("body",), "Scan": ("body",)}
STACKING = ("Loop", "Scan")  # their extra outputs stack the iterations' values on a new axis 0
PREFIX = "onnx_lowrank.observed"


@dataclass(frozen=True)
class Step:
    """One level down: the body `attribute` of the control-flow node at `position` of its graph."""

    position: int
    op: str
    name: str
    attribute: str


@dataclass
class Scope:
    """Where a layer inside a body lives: the steps down to its body, and that body."""

    steps: tuple[Step, ...]
    graph: gs.Graph

    @property
    def where(self) -> str:
        """The innermost body first: "inside If 'x' then_branch, in Loop 'y' body"."""
        places = [f"{step.op} {step.name!r} {step.attribute}" for step in reversed(self.steps)]
        return "inside " + ", in ".join(places)

    @property
    def unseen(self) -> str:
        """The reason for a layer whose tensor never came back."""
        taken = any(step.op == "If" for step in self.steps)
        return f"{self.where}: never {'taken' if taken else 'run'} on the calibration data"


def bodies(graph: gs.Graph, steps: tuple[Step, ...] = ()) -> Iterator[tuple[gs.Graph, tuple[Step, ...]]]:
    """The graph (no steps) and every body nested in it, depth first."""
    yield graph, steps
    for position, node in enumerate(graph.nodes):
        for attribute, value in node.attrs.items():
            for body in value if isinstance(value, list) else [value]:
                if isinstance(body, gs.Graph):
                    yield from bodies(body, (*steps, Step(position, node.op, node.name, attribute)))


def unobservable(steps: Sequence[Step]) -> str | None:
    """Why a tensor in this body cannot be fetched (None when it can)."""
    for step in steps:
        if step.attribute not in BODIES.get(step.op, ()):
            return f"the {step.attribute} of {step.op} node {step.name!r} is no If, Loop or Scan body"
    stacked = False
    for step in steps:
        if step.op == "If" and stacked:
            return (f"inside If {step.name!r} within a Loop or Scan body: the iterations that skip the branch "
                    "would stack placeholders of another shape")
        stacked = stacked or step.op in STACKING
    return None


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


class Names:
    """Fresh names among those taken (by a model's tensors and nodes, or any set given)."""

    def __init__(self, taken: set[str]):
        self.taken = taken

    @classmethod
    def of(cls, model: onnx.ModelProto) -> Names:
        return cls({name for graph in all_graphs(model.graph) for name in _graph_names(graph)})

    def fresh(self, base: str) -> str:
        candidate, suffix = base, 1
        while candidate in self.taken:
            suffix += 1
            candidate = f"{base}_{suffix}"
        self.taken.add(candidate)
        return candidate


def _graph_names(graph: onnx.GraphProto) -> Iterator[str]:
    yield from (value.name for value in (*graph.input, *graph.output, *graph.value_info))
    yield from (tensor.name for tensor in graph.initializer)
    for node in graph.node:
        yield node.name
        yield from node.output


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


def paired(graph: gs.Graph, proto: onnx.GraphProto) -> Iterator[tuple[gs.Graph, onnx.GraphProto]]:
    """Each imported graph (the main one, then its bodies) with the proto graph it was imported from:
    their node lists run in the same order until the imported graph is changed."""
    yield graph, proto
    for node, source in zip(graph.nodes, proto.node):
        for attribute in source.attribute:
            imported = node.attrs.get(attribute.name)
            if attribute.type == onnx.AttributeProto.GRAPH and isinstance(imported, gs.Graph):
                yield from paired(imported, attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS and isinstance(imported, list):
                for body, body_proto in zip(imported, attribute.graphs):
                    yield from paired(body, body_proto)


def single_copies(graph: onnx.GraphProto) -> None:
    """onnx-graphsurgeon writes an outer-scope constant into every body that reads it (and leaves it out
    of the outer graph when no node there reads it): keep one copy, in the main graph, which every body
    sees. Only identical copies are merged, and only where no body computes a tensor of that name."""
    main = {tensor.name: tensor for tensor in graph.initializer}
    inner = list(inner_graphs(graph))
    copies: dict[str, list[onnx.TensorProto]] = {}
    computed: set[str] = set()
    for body in inner:
        computed.update(name for node in body.node for name in node.output)
        for tensor in body.initializer:
            copies.setdefault(tensor.name, []).append(tensor)
    merged = set()
    for name, found in copies.items():
        everything = found + ([main[name]] if name in main else [])
        if len(everything) < 2 or name in computed:
            continue
        first = everything[0].SerializeToString()
        if all(tensor.SerializeToString() == first for tensor in everything[1:]):
            merged.add(name)
            if name not in main:
                graph.initializer.append(found[0])
    for body in inner:
        for position in reversed(range(len(body.initializer))):
            if body.initializer[position].name in merged:
                del body.initializer[position]
