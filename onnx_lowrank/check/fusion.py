"""Whether ONNX Runtime still fuses the compressed graph as it fused the original.

ONNX Runtime rewrites a model when it opens a session (MatMul+Add -> Gemm, Conv+activation -> FusedConv,
Transpose/scale+MatMul -> FusedMatMul, Add+Gelu -> BiasGelu, Add+LayerNormalization ->
SkipLayerNormalization, NCHWc convolutions with fused activations, ...). `optimized_ops` asks it for the
optimized graph (SessionOptions.optimized_model_filepath) and counts its op types; `fusion_check` compares
the fused nodes of the original and of the compressed model and tells which differences come from the
factorized layers and which, if any, from the layers that were left alone.
"""

from __future__ import annotations

import re
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnxruntime as ort

from ..errors import InputError
from ..graph.bodies import all_graphs
from ..graph.bodies import node_bodies as subgraphs
from ..graph.imported import META_PREFIX, inferred_shapes
from ..observe.sessions import open_session, resolve_provider
from ..report import FusionChange, Fusions

LEVELS = {
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
CONTRIB_DOMAINS = ("com.microsoft", "com.microsoft.nchwc")
# ONNX-domain ops that ONNX Runtime's fusions produce (MatMul+Add -> Gemm, decomposed LayerNorm -> ...)
FUSED_ONNX_OPS = ("Gemm", "LayerNormalization", "SimplifiedLayerNormalization")
LAYOUT_OPS = ("ReorderInput", "ReorderOutput")  # NCHWc layout plumbing, not fusions
WALK_DEPTH = 3  # how far back from a fused node's output its absorbed nodes are looked for


def optimized_model(
    model: onnx.ModelProto, provider: str = "cpu", level: str = "all", base_dir: str = ""
) -> onnx.ModelProto:
    """The graph ONNX Runtime runs after its optimizations at `level` (basic | extended | all) on the
    provider (cpu | cuda | auto), as written by SessionOptions.optimized_model_filepath.

    Its initializers are written to a side file that is not read back (only the graph is wanted), so
    models of any size work; a model over 2 GB, or one whose external data is still in its files under
    `base_dir`, is handed to ONNX Runtime as a file with external data.
    """
    if level not in LEVELS:
        raise InputError(f"unknown optimization level {level!r}; choose one of {', '.join(LEVELS)}")
    with tempfile.TemporaryDirectory() as folder:
        written = Path(folder) / "optimized.onnx"
        open_session(model, resolve_provider(provider), 1, LEVELS[level], base_dir, optimized_to=written)
        return onnx.load(str(written), load_external_data=False)


def optimized_ops(model: onnx.ModelProto, provider: str = "cpu", level: str = "all") -> Counter:
    """How many nodes of each op type ONNX Runtime's optimized graph has (subgraphs included); op types
    outside the ONNX domain are named DOMAIN:OP, e.g. com.microsoft:FusedConv."""
    return Counter(_op_key(node) for node in _nodes(optimized_model(model, provider, level).graph))


def fusion_check(
    original: onnx.ModelProto,
    compressed: onnx.ModelProto,
    factorized_nodes: Iterable[str],
    provider: str = "cpu",
    level: str = "all",
    base_dir: str = "",
    as_given: bool = False,
) -> Fusions:
    """Compare the fused nodes ONNX Runtime makes of the original and of the compressed model (`base_dir`:
    where their external data lies, when they were read without it; `as_given`: the original as it is,
    not after shape inference).

    `factorized_nodes`: names of the original nodes that were replaced (the report's layers[].nodes;
    nodes the exporter left unnamed go by the names the rewrite gave them, OP_POSITION).

    Fused nodes are the optimized graph's contrib-domain nodes (FusedConv, FusedGemm, FusedMatMul,
    BiasGelu, SkipLayerNormalization, Attention, ..., NCHWc convolutions that absorbed an activation or
    an Add) and its Gemm / LayerNormalization nodes; NCHWc reorders and plain NCHWc ops are layout, not
    fusions. A node is counted by its kind: the op type, plus +ACTIVATION for a fused activation and
    +Sum for a fused residual Add (e.g. com.microsoft:FusedConv+Relu, com.microsoft.nchwc:Conv+Relu).
    Each fused node is attributed to the factorized layers it touches (a heuristic: see `_Source`).

    The original is compared after ONNX shape inference, as the rewrite sees it: the compressed model
    carries the inferred shapes, and shapes alone enable some fusions (SkipLayerNormalization needs
    them), which would otherwise look like changes made by the factorization.

    Returns the report's Fusions: provider and level; `original` and `compressed`, the fused kinds of the
    whole graphs; `unfactorized`, the same for the nodes attributed to no factorized layer;
    `unfactorized_match`, whether these are equal; `lost` and `gained`, one entry per kind whose count
    went down (up), with `layer` None for the unfactorized part, else the factorized layer(s) it is
    attributed to.
    """
    factorized = set(factorized_nodes)
    provider = resolve_provider(provider)
    baseline = original if as_given else _with_shapes(original)
    before = _fused(baseline, factorized, False, provider, level, base_dir)
    return _compared(before, _fused(compressed, factorized, True, provider, level, base_dir), provider, level)


def _fused(source: onnx.ModelProto, factorized: set[str], chains: bool, provider: str, level: str,
           base_dir: str) -> Counter:
    """ONNX Runtime's fused nodes of one side, counted by (kind, factorized layers they are attributed to)."""
    graph = _Source(source.graph, factorized, chains=chains)
    fused = [node for node in _nodes(optimized_model(source, provider, level, base_dir).graph) if _is_fused(node)]
    return Counter((_kind(node), graph.owners_of(node)) for node in fused)


def _compared(original: Counter, compressed: Counter, provider: str, level: str) -> Fusions:
    """The fusion check of the two sides' fused nodes (`_fused`)."""
    sides = {"original": original, "compressed": compressed}
    totals = {side: _by_kind(found) for side, found in sides.items()}
    unfactorized = {side: _by_kind(found, unfactorized_only=True) for side, found in sides.items()}
    lost, gained = _changes(sides["original"], sides["compressed"])
    return Fusions(
        provider=provider, level=level, original=totals["original"], compressed=totals["compressed"],
        unfactorized=unfactorized, unfactorized_match=unfactorized["original"] == unfactorized["compressed"],
        lost=lost, gained=gained,
    )


def fused_as_given(
    original: onnx.ModelProto, compressed: onnx.ModelProto, factorized_nodes: Iterable[str], provider: str = "cpu",
    base_dir: str = "", bare: bool = True,
) -> tuple[onnx.ModelProto, Fusions]:
    """The model to write and its fusion check. The rewrite writes the shapes ONNX inference found for every
    tensor; an original that declares no intermediate shapes can fuse less than the same graph with them
    (SkipLayerNormalization needs them: MiniLM as exported by PyTorch gets none, with shapes one per
    layer, 4% slower on a Xeon than the Add + LayerNormalization it replaces). Then the compressed model is
    compared with the original as it is, and written without those shapes when only so it fuses alike.
    `bare`: whether that variant may be chosen (if not, the comparison is with the shape-inferred original,
    as the model is written)."""
    factorized = set(factorized_nodes)
    if not bare or any(graph.value_info for graph in all_graphs(original.graph)):  # as rewritten, shapes and all
        return compressed, fusion_check(original, compressed, factorized, provider, base_dir=base_dir)
    provider = resolve_provider(provider)
    before = _fused(original, factorized, False, provider, "all", base_dir)  # the original as given, once
    found = _compared(before, _fused(compressed, factorized, True, provider, "all", base_dir), provider, "all")
    if found.unfactorized_match:
        return compressed, found
    shapeless = onnx.ModelProto()
    shapeless.CopyFrom(compressed)
    for graph in all_graphs(shapeless.graph):
        del graph.value_info[:]
    alike = _compared(before, _fused(shapeless, factorized, True, provider, "all", base_dir), provider, "all")
    return (shapeless, alike) if alike.unfactorized_match else (compressed, found)


def _changes(before: Counter, after: Counter) -> tuple[list[FusionChange], list[FusionChange]]:
    """The (kind, owners) whose count went down, and those whose count went up, by owners then kind."""
    lost: list[FusionChange] = []
    gained: list[FusionChange] = []
    for kind, owners in sorted(set(before) | set(after), key=lambda k: (k[1], k[0])):
        original, compressed = before[kind, owners], after[kind, owners]
        if original == compressed:
            continue
        change = FusionChange(kind=kind, layer=" + ".join(owners) or None, original=original, compressed=compressed)
        (lost if compressed < original else gained).append(change)
    return lost, gained


def _with_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the model with the value_info and outputs ONNX shape inference gives (as given when it fails)."""
    inferred = inferred_shapes(model)
    if inferred is None:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for listed in ("value_info", "output"):
        del getattr(copy.graph, listed)[:]
        getattr(copy.graph, listed).extend(getattr(inferred.graph, listed))
    return copy


def _by_kind(found: Counter, unfactorized_only: bool = False) -> dict[str, int]:
    """Counts by kind, sorted, of fused nodes counted by (kind, owners)."""
    counts: Counter = Counter()
    for (kind, owners), n in found.items():
        if not (unfactorized_only and owners):
            counts[kind] += n
    return dict(sorted(counts.items()))


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of the graph and of its subgraphs (If / Loop / Scan bodies)."""
    for inner in all_graphs(graph):
        yield from inner.node


def _op_key(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}:{node.op_type}"


def _activation(node: onnx.NodeProto) -> str | None:
    for attribute in node.attribute:
        if attribute.name == "activation" and attribute.type == onnx.AttributeProto.STRING:
            return attribute.s.decode()
    return None


def _kind(node: onnx.NodeProto) -> str:
    kind = _op_key(node)
    conv = node.op_type in ("Conv", "FusedConv") and node.domain in CONTRIB_DOMAINS
    if conv and len(node.input) > 3 and node.input[3]:
        kind += "+Sum"
    activation = _activation(node)
    return kind + f"+{activation}" if activation else kind


def _is_fused(node: onnx.NodeProto) -> bool:
    if node.domain in ("", "ai.onnx"):
        return node.op_type in FUSED_ONNX_OPS
    if node.domain == "com.microsoft.nchwc":
        return _kind(node) != _op_key(node)  # a plain NCHWc op is a layout change
    return node.domain == "com.microsoft" and node.op_type not in LAYOUT_OPS


_RANDOM = ("RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli")
_DECORATIONS = (re.compile(r"^fused "), re.compile(r"(_token_\d+)+$"), re.compile(r"_nchwc$"))


def _name_variants(name: str) -> list[str]:
    """A fused node's name and what it derives from: ONNX Runtime names a fused node after the first node
    it replaced (FusedConv: the Conv's name; FusedGemm: "fused " + name; MatMul+Add: NAME/MatMulAddFusion;
    NCHWc: the output tensor's name + "_nchwc"; taken names get "_token_N")."""
    variants = [name]
    for pattern in _DECORATIONS:
        name = pattern.sub("", name)
        variants.append(name)
    stripped = name.rstrip("/")
    while "/" in stripped.strip("/"):
        stripped = stripped[: stripped.rindex("/")]
        variants.append(stripped)
    return list(dict.fromkeys(v for v in variants if v))


@dataclass
class _Node:
    proto: onnx.NodeProto
    owner: str | None  # the factorized layer it is (original) or is part of the chain of (compressed)


@dataclass
class _Source:
    """The graph ONNX Runtime optimized, indexed to trace its fused nodes back to factorized layers.

    Attribution. ONNX Runtime does not record which source nodes a fused node replaced, so each fused
    node is traced back by names to the graph it was made from (the original, or the compressed model)
    and attributed to the factorized layers it touches:
    - its name, less what ONNX Runtime adds ("fused " before, "_token_N" or "_nchwc" after, trailing
      /-separated parts as in NAME/MatMulAddFusion), when that names a source node (or, as NCHWc nodes
      are named after their output, a source tensor, which is then followed back as below);
    - its input and output tensors that belong to one layer only: every node reading or writing the
      tensor is that layer (original) or part of that layer's chain (compressed; chain nodes carry the
      onnx_lowrank.source metadata). Weights, biases and a chain's inner tensors belong to their layer;
      the tensors a layer shares with its neighbours (its input and output) belong to none;
    - the source nodes it absorbed behind its outputs: from the producer of each output, back through
      nodes with one computed input whose result only they consume, stopping at the first node with a
      weight (at most WALK_DEPTH nodes: an activation, a bias Add or BatchNormalization, the layer).
    A fused node touching no factorized layer belongs to the unfactorized part.
    This is a heuristic. Every change of a count shows in `lost` / `gained`; what can be wrong is the
    part it is put in. A factorized layer's fused node whose name, tensors and outputs ONNX Runtime all
    renamed (folded initializers, NCHWc reorders) counts as unfactorized: a false mismatch, never a
    hidden one. The other way round, a neighbour's fusion taken for a factorized layer's would hide a
    loss among the unfactorized layers; the walk back stops at the first weight so that it does not
    reach past the layer a fusion was made around.
    """

    graph: onnx.GraphProto
    factorized: set[str]
    chains: bool  # compressed: a node belongs to the layer its chain replaced (onnx_lowrank.source)
    by_name: dict[str, _Node] = field(default_factory=dict)
    producer: dict[str, _Node] = field(default_factory=dict)
    consumers: dict[str, list[_Node]] = field(default_factory=dict)
    constants: set[str] = field(default_factory=set)  # initializers and what is computed from them alone
    weights: set[str] = field(default_factory=set)  # constants with two or more dimensions over 1
    boundary: set[str] = field(default_factory=set)  # graph inputs and outputs
    shapes: dict[str, list[int | None]] = field(default_factory=dict)  # from the graph's value_info

    def __post_init__(self) -> None:
        for graph in all_graphs(self.graph):
            self.boundary.update(value.name for value in (*graph.input, *graph.output))
            for value in graph.value_info:
                if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
                    dims = value.type.tensor_type.shape.dim
                    self.shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
            for tensor in graph.initializer:
                self._constant(tensor.name, list(tensor.dims))
            for tensor in graph.sparse_initializer:
                self._constant(tensor.values.name, list(tensor.dims))
        taken = {node.name for node in self.graph.node}
        for position, node in enumerate(self.graph.node):
            name = node.name
            if not name:  # the name the rewrite gave it (splice.import_graph)
                name = f"{node.op_type}_{position}"
                while name in taken:
                    name += "_"
                taken.add(name)
            self._add(node, name)

    def _add(self, proto: onnx.NodeProto, name: str) -> None:
        if self.chains:
            source = next((e.value for e in proto.metadata_props if e.key == META_PREFIX + "source"), None)
            node = _Node(proto, source if source in self.factorized else None)
        else:
            node = _Node(proto, name if name in self.factorized else None)
        if name:
            self.by_name.setdefault(name, node)
        for body in subgraphs(proto):  # after their node, as they see its outer scope
            for inner in body.node:
                self._add(inner, inner.name)
        self._index(node)

    def _index(self, node: _Node) -> None:
        proto = node.proto
        if proto.op_type == "Constant" and proto.domain in ("", "ai.onnx"):
            value = next((a.t for a in proto.attribute if a.name == "value" and a.type == a.TENSOR), None)
            self._constant(proto.output[0], None if value is None else list(value.dims))
            return  # a constant belongs to whoever reads it
        inputs = [tensor for tensor in proto.input if tensor]
        folded = proto.domain in ("", "ai.onnx") and proto.op_type not in _RANDOM
        if inputs and folded and all(t in self.constants for t in inputs):
            for tensor in proto.output:  # folded by ONNX Runtime (a Reshape or Cast of a bias or weight)
                self._constant(tensor, self.shapes.get(tensor))
            return
        for tensor in proto.output:
            if tensor:
                self.producer[tensor] = node
        for tensor in proto.input:
            if tensor:
                self.consumers.setdefault(tensor, []).append(node)

    def _constant(self, tensor: str, dims: list[int | None] | None) -> None:
        self.constants.add(tensor)
        if dims is not None and sum(1 for d in dims if d is None or d > 1) >= 2:
            self.weights.add(tensor)

    def owners_of(self, fused: onnx.NodeProto) -> tuple[str, ...]:
        """The factorized layers a node of the optimized graph touches (see the class's attribution)."""
        found: set[str | None] = set()  # None: a node or tensor no factorized layer owns
        anchors = [tensor for tensor in fused.output if tensor]
        for variant in _name_variants(fused.name):
            node = self.by_name.get(variant)
            if node is not None:
                found.add(node.owner)
                break
            if variant in self.producer:
                anchors.append(variant)
                break
        for tensor in (*fused.input, *fused.output):
            found.add(self._tensor_owner(tensor))
        for tensor in anchors:
            found.update(self._absorbed(tensor))
        return tuple(sorted(owner for owner in found if owner is not None))

    def _tensor_owner(self, tensor: str) -> str | None:
        if not tensor or tensor in self.boundary:
            return None
        touching = list(self.consumers.get(tensor, []))
        if tensor in self.producer:
            touching.append(self.producer[tensor])
        owners = {node.owner for node in touching}
        return owners.pop() if len(owners) == 1 else None

    def _absorbed(self, tensor: str) -> set[str | None]:
        owners = set()
        for _ in range(WALK_DEPTH):
            node = self.producer.get(tensor)
            if node is None:
                break
            owners.add(node.owner)
            computed = [t for t in node.proto.input if t and t not in self.constants]
            if any(t in self.weights for t in node.proto.input) or len(computed) != 1:
                break
            tensor = computed[0]
            if tensor in self.boundary or len(self.consumers.get(tensor, [])) != 1:
                break
        return owners


