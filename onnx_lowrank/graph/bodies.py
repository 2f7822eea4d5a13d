"""Control-flow bodies (If branches, Loop and Scan bodies): the one walk over a graph and every body nested
in it (`all_graphs` for a proto, `bodies` / `every_graph` for an imported graph, `paired` for both side by
side), where a layer in a body lives (`Scope`: the `Step`s down to it), which bodies' tensors can be
fetched (observe/exposed.py fetches them), fresh names, and one copy of the constants bodies share.

Steps address bodies by node position, which is the same in a freshly imported onnx-graphsurgeon graph
and in the proto it came from.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import onnx
import onnx_graphsurgeon as gs

BODIES = {"If": ("then_branch", "else_branch"), "Loop": ("body",), "Scan": ("body",)}
STACKING = ("Loop", "Scan")  # their extra outputs stack the iterations' values on a new axis 0


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


def every_graph(graph: gs.Graph) -> list[gs.Graph]:
    """The imported graph and every body nested in it, depth first."""
    return [body for body, _ in bodies(graph)]


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


def node_bodies(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The bodies a node holds in its attributes (If branches, Loop and Scan bodies)."""
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            yield attribute.g
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            yield from attribute.graphs


def all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and every subgraph nested in it."""
    yield graph
    yield from inner_graphs(graph)


def inner_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """Every subgraph nested in the graph, not the graph itself."""
    for node in graph.node:
        for body in node_bodies(node):
            yield from all_graphs(body)


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
