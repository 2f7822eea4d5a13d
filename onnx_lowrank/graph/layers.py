"""What can be factorized in a graph: layers (one node + its weight) grouped into units (one weight matrix set).

Every adapter views its node's weight as G matrices in one orientation, out x in (G = groups of a
grouped conv or batch matrices of a batched MatMul), so the decompositions and rank choice never see
op types. A weight shared by several nodes in the same orientation forms one unit: factorized once.
"""

from __future__ import annotations

import collections
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import ClassVar, Protocol

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .bodies import Scope, bodies, unobservable
from .weights import ConstantIndex, Weight, resolve, weight_users


@dataclass
class BiasSite:
    """Where a layer's output mean can go when its statistics are centred: its own bias input (added if
    absent) or the constant of the Add that follows it. Centring anywhere else would drop the mean."""

    node: gs.Node  # the node holding the bias: the layer itself or the following Add
    index: int  # position of the bias among that node's inputs
    value: np.ndarray  # the current bias (zeros if none yet), float64, in its stored shape
    channel_axis: int  # the axis of `value` along which the layer's output channels run
    scale: float = 1.0  # bias units per unit of W x (Gemm: beta / alpha)
    weight: Weight | None = None  # how the current bias is stored (None: like the layer's weight)

    def shifted(self, shift: np.ndarray) -> np.ndarray:
        """The bias plus a per-channel shift, in a shape that broadcasts like the original."""
        shape = [1] * max(self.value.ndim, -self.channel_axis if self.channel_axis < 0 else self.channel_axis + 1)
        shape[self.channel_axis] = shift.size
        return self.value + (shift / self.scale).reshape(shape)


@dataclass
class Layer:
    """One node whose weight can be factorized, with its weight seen as matrices (G, out, in)."""

    node: gs.Node
    adapter: Adapter
    weight: Weight
    view: Callable[[np.ndarray], np.ndarray] | None  # the weight's value as matrices: reshapes and
    # transposes only (None once detached: the matrices are held instead)
    info: dict = field(default_factory=dict)  # adapter-specific facts found by check()
    bias: BiasSite | None = None  # where the output mean can be absorbed (None: statistics stay uncentred)
    output_scale: np.ndarray | None = None  # per output channel: how much a following BatchNormalization
    # amplifies each channel's error (data-aware factors weigh output errors by it)
    held: np.ndarray | None = None  # the matrices of a detached layer
    scope: Scope | None = None  # the If / Loop / Scan body the node lives in (None: the main graph)
    transposed: bool = False  # uses its unit's matrices transposed: the LM head of a tied embedding table
    shape: tuple[int, int, int] = field(init=False)  # of the matrices: (G, out, in)

    def __post_init__(self) -> None:
        if self.held is not None:
            self.shape = self.held.shape
        else:  # applied to a stride-0 array of the weight's shape: the shape without reading the weight
            self.shape = self.viewed(np.broadcast_to(np.empty(()), self.weight.shape)).shape

    @property
    def matrices(self) -> np.ndarray:
        """Read from the weight on each use (see weights.Weight.value), unless held."""
        return self.held if self.held is not None else self.viewed(self.weight.value)

    def viewed(self, value: np.ndarray) -> np.ndarray:
        """A value of the weight's shape seen as the matrices (only a layer attached to its graph can)."""
        if self.view is None:
            raise RuntimeError(f"layer {self.node.name!r} is detached: it holds its matrices, and no view")
        return self.view(value)


def batchnorm_scale(node: gs.Node, index: ConstantIndex, channels: int) -> np.ndarray | None:
    """scale / sqrt(var + eps) of the inference BatchNormalization that alone consumes the node's output
    along axis 1 (None when there is none or its parameters are computed)."""
    output = node.outputs[0]
    if output.name in index.graph_outputs or len(output.outputs) != 1:
        return None
    norm = output.outputs[0]
    if norm.op != "BatchNormalization" or len(norm.inputs) < 5 or norm.attrs.get("training_mode", 0):
        return None
    scale, variance = resolve(norm.inputs[1], index), resolve(norm.inputs[4], index)
    if isinstance(scale, str) or isinstance(variance, str) or scale.value.size != channels:
        return None
    return scale.value.reshape(-1) / np.sqrt(variance.value.reshape(-1) + float(norm.attrs.get("epsilon", 1e-5)))


@dataclass
class Unit:
    """A set of weight matrices factorized once, used by one or more layers."""

    key: str
    layers: list[Layer]
    head_left_out: bool = False  # a detached copy of a tied unit: its head layer was not copied

    @property
    def matrices(self) -> np.ndarray:
        return self.layers[0].matrices

    @property
    def tied(self) -> bool:
        """An embedding table that is also the LM head (its second layer sees it transposed)."""
        return self.head_left_out or any(layer.transposed for layer in self.layers)

    @property
    def matrix_shape(self) -> tuple[int, int, int]:
        return self.layers[0].shape

    @property
    def weight(self) -> Weight:
        return self.layers[0].weight

    @property
    def name(self) -> str:
        """The first node's name: how tables and reports refer to the unit."""
        return self.layers[0].node.name

    @property
    def op(self) -> str:
        return self.layers[0].node.op

    @property
    def groups(self) -> int:
        return self.matrix_shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of one matrix."""
        return self.matrix_shape[1], self.matrix_shape[2]

    @property
    def params(self) -> int:
        return math.prod(self.matrix_shape)

    @property
    def full_rank(self) -> int:
        return min(self.shape)

    def factor_params(self, rank: int) -> int:
        """Parameters of the two factors at this rank (all groups)."""
        out_dim, in_dim = self.shape
        return self.groups * rank * (out_dim + in_dim)

    @property
    def break_even(self) -> int:
        """The largest rank whose factors are strictly smaller than the dense weight (0 if none is)."""
        out_dim, in_dim = self.shape
        return -(-(out_dim * in_dim) // (out_dim + in_dim)) - 1


@dataclass
class NodeView:
    """What decompositions read of a node, without the graph around it."""

    name: str
    op: str
    attrs: dict


def detached(unit: Unit) -> Unit:
    """The unit's first layer cut loose from the graph (node, stored tensors): what decompositions need,
    small to pickle for worker processes or a cluster."""
    layer = unit.layers[0]
    bias = layer.bias
    if bias is not None:
        stored = None if bias.weight is None else replace(bias.weight, stored=None, source=None, held=bias.value)
        bias = replace(bias, node=None, weight=stored)
    node = NodeView(layer.node.name, layer.node.op, dict(layer.node.attrs))
    value = layer.weight.value
    weight = replace(layer.weight, stored=None, source=None, held=value)
    matrices = layer.viewed(value)
    return Unit(unit.key, [replace(layer, node=node, weight=weight, view=None, held=matrices, bias=bias, scope=None)],
                head_left_out=unit.tied)


@dataclass(frozen=True)
class Skip:
    """An adapter's answer for a node of its op type that it cannot factorize: why (the report lists it)."""

    reason: str


@dataclass(frozen=True)
class Skipped:
    """A node an adapter looked at and left, with the reason."""

    node: str
    op: str
    reason: str


class TwoFactors(Protocol):
    """What an adapter's rewrite reads of a two-factor product (graph.splice.Factorization keeps it)."""

    @property
    def rank(self) -> int: ...

    @property
    def first(self) -> np.ndarray:
        """(G, r, in): applied first."""
        ...

    @property
    def second(self) -> np.ndarray:
        """(G, out, r)."""
        ...

    @property
    def bias_shift(self) -> np.ndarray | None: ...


class Emits(Protocol):
    """What an adapter's rewrite writes the chain through (graph.splice.Emitter keeps it): the node's
    original inputs and outputs, and makers of constants, tensors and nodes."""

    inputs: list
    outputs: list

    def bias(self, site: BiasSite | None, shift: np.ndarray) -> gs.Tensor: ...

    def weight(self, role: str, value: np.ndarray, like: Weight | None = None) -> gs.Tensor: ...

    def variable(self, role: str, dtype=None) -> gs.Variable: ...

    def node(self, role: str, op: str, inputs: list, outputs: list, attrs: dict | None = None) -> gs.Node: ...


class Adapter(Protocol):
    """One op type: `check` a node (a Layer, or why it is skipped) and `rewrite` it as a chain."""

    op_type: ClassVar[str]

    def check(self, node: gs.Node, index: ConstantIndex, opset: int) -> Layer | Skip | None:
        """A Layer, a Skip saying why the node cannot be one, or None when it is no layer at all (e.g. a
        Gather on shapes) and deserves no line in reports."""

    def observed(self, layer: Layer) -> tuple[gs.Tensor, str]:
        """The tensor whose statistics describe the layer, and its side: "input" (vectors the weight
        multiplies) or "output" (the node's output, bias included)."""

    def rows(self, layer: Layer, array: np.ndarray) -> np.ndarray:
        """That tensor's values as (G, positions, channels): one row per vector the weight meets."""

    def rewrite(self, layer: Layer, factors: TwoFactors, emit: Emits) -> None:
        """Emit nodes computing second @ first @ x per group (`first` (G, r, in), `second` (G, out, r)),
        moving `factors.bias_shift` (when set) into the layer's bias site."""


@dataclass
class Plan:
    units: list[Unit]
    skipped: list[Skipped]


def find_layers(graph: gs.Graph, model: onnx.ModelProto, adapters: dict[str, Adapter], base_dir: str = "",
                memo: dict | None = None) -> Plan:
    """Check every node of a handled op type, in the main graph and in If / Loop / Scan bodies (`graph`
    freshly imported: body steps are node positions); group the factorizable ones into units by shared
    weight. `base_dir`: where the model's external data lies, when it was loaded without it. `memo`: what
    an earlier call on the same model read of shared weights (their digests, tied tables' comparisons),
    kept by a caller that rewrites one model many times, so that large shared weights are read once."""
    memo = {} if memo is None else memo
    index = ConstantIndex(model, base_dir)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    skipped: list[Skipped] = []
    layers: list[Layer] = []
    for body, steps in bodies(graph):
        scope = Scope(steps, body) if steps else None
        problem = unobservable(steps)
        for node in body.nodes:
            adapter = adapters.get(node.op)
            if adapter is None or node.domain not in ("", "ai.onnx", None):
                continue
            found = adapter.check(node, index, opset)
            if found is None:
                continue
            if isinstance(found, Skip):
                skipped.append(Skipped(node.name, node.op, found.reason))
                continue
            if scope is not None and problem is not None:
                skipped.append(Skipped(node.name, node.op, f"{scope.where}: {problem}"))
                continue
            found.scope = scope
            layers.append(found)
    users = collections.Counter(layer.weight.name for layer in layers)
    units: dict[str, Unit] = {}
    for layer in layers:
        key = _unit_key(layer, users[layer.weight.name] > 1, memo)
        units.setdefault(key, Unit(key, [])).layers.append(layer)
    _tie(units, memo)
    kept: list[Unit] = []
    for unit in units.values():
        reason = _sharing_problem(unit, index.graph_outputs) or _scopes_problem(unit)
        if reason:
            skipped.extend(Skipped(layer.node.name, layer.node.op, reason) for layer in unit.layers)
        else:
            kept.append(unit)
    return Plan(kept, skipped)


def _scopes_problem(unit: Unit) -> str | None:
    """A weight whose layers live in different graphs (the main graph, bodies) runs under different
    conditions in each: one factorization would change a branch the data may never take."""
    places = {(layer.scope.where if layer.scope else "in the main graph") for layer in unit.layers}
    if len(places) > 1:
        return f"weight {unit.weight.name} is shared by layers {' and '.join(sorted(places))}: not factorized"
    return None


def _tie(units: dict[str, Unit], memo: dict) -> None:
    """An embedding table that a MatMul also multiplies by, transposed (logits = h @ table^T: tied input
    and output embeddings), becomes one unit, factorized once for both uses: the Gather first, then the
    head, which sees the unit's matrices transposed (and observes its own input's statistics)."""
    for key, unit in list(units.items()):
        if unit.op != "Gather" or len(unit.layers) != 1:
            continue
        others = [other for other in units.values() if other is not unit and other.weight.name == unit.weight.name]
        if len(others) != 1 or len(others[0].layers) != 1:
            continue
        head = others[0].layers[0]
        if head.node.op != "MatMul" or head.info.get("side") != "right" or head.info.get("batch") \
                or head.shape != (1, unit.shape[1], unit.shape[0]):
            continue
        same = ("tied", key, others[0].key)
        if same not in memo:
            memo[same] = np.array_equal(head.matrices[0], unit.matrices[0].T)
        if not memo[same]:
            continue
        head.transposed = True
        del units[others[0].key], units[key]
        units[key + ":tied"] = Unit(key + ":tied", [unit.layers[0], head])


def _unit_key(layer: Layer, shared: bool, memo: dict) -> str:
    """Layers share a unit when they use the same matrices and observe the same kind of statistics. A
    weight that several layers use is told apart by its matrices' contents (a MatMul and a Gemm may see
    one weight the same way); one used once, by the stored tensor's name (unique in the graph), the chain
    to its node and its adapter's view (op and what check() found), so that the weight is not read."""
    side = layer.adapter.observed(layer)[1]
    view = repr((layer.weight.steps, layer.node.op, sorted(layer.info.items())))
    if shared:
        seen = ("digest", layer.weight.name, view)
        if seen not in memo:
            memo[seen] = hashlib.sha1(np.ascontiguousarray(layer.matrices).tobytes()).hexdigest()[:16]
        digest = memo[seen]
    else:
        digest = "once-" + hashlib.sha1(view.encode()).hexdigest()[:11]
    return f"{layer.weight.name}:{layer.shape}:{side}:{digest}"


def _sharing_problem(unit: Unit, graph_outputs: set[str]) -> str | None:
    """A reason not to factorize when the weight is also used outside this unit (that would add parameters)."""
    users, to_output = weight_users(unit.weight.stored, graph_outputs)
    if to_output:
        return f"weight {unit.weight.name} is also a graph output"
    mine = {id(layer.node) for layer in unit.layers}
    others = [user for user in users if id(user) not in mine]
    if others:
        other = others[0]
        return f"weight {unit.weight.name} is also used by {other.op} node {other.name!r} in another way"
    return None
