"""What replaces a layer and how it is written: the `Factorized` contract every decomposition's result keeps,
the plain two-factor product (`Factorization`, which the layer's adapter writes as its own op), and the
splice that disconnects a layer's node and lets the factors write their chain in its place (`Emitter`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Protocol, Self, runtime_checkable

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import known
from .bodies import Names, every_graph
from .layers import BiasSite, Layer
from .weights import Weight


@runtime_checkable
class TiedHead(Protocol):
    """Factors of a tied table that emit the LM head's chain themselves (not as a two-factor product)."""

    def emit_tied_head(self, layer: Layer, emit: Emitter) -> None: ...


class Factorized(Protocol):
    """A unit's weight factorized at one option: what it costs, how far it is predicted to be off, and the
    nodes that replace each of the unit's layers."""

    @property
    def method(self) -> str: ...

    @property
    def rank(self) -> int | tuple[int, ...]:
        """The option's configuration: one rank, or one per step (Tucker-2's output and input ranks)."""
        ...

    @property
    def params(self) -> int: ...

    @property
    def predicted_error(self) -> float: ...

    @property
    def bias_shift(self) -> np.ndarray | None:
        """(G, out): what the layer's bias must gain (the affine optimum), or None."""
        ...

    def in_float32(self) -> Self:
        """The same factors in float32 (what a float32 model stores them as)."""
        ...

    def same_op_weight(self) -> np.ndarray | None:
        """The matrices (G, out, in) that the layer's own op, given them as its weight, computes the chain
        with (a two-factor product: second @ first), or None when the chain is made of other ops (Tucker-2,
        CP, ...). A sensitivity probe feeds them to the original model instead of building the chain."""
        ...

    def emit(self, layer: Layer, emit: Emitter) -> None:
        """Write the nodes that replace `layer` (whose node is already disconnected) through `emit`."""
        ...



@dataclass(frozen=True)
class Factorization:
    """W_g ~= second_g @ first_g for every group g: first (G, r, in) is applied first, second (G, out, r)."""

    method: str
    rank: int
    first: np.ndarray
    second: np.ndarray
    predicted_error: float
    bias_shift: np.ndarray | None = None  # (G, out): what the layer's bias must gain (affine optimum)

    @property
    def params(self) -> int:
        return int(self.first.size + self.second.size)

    def reconstruct(self) -> np.ndarray:
        return self.second @ self.first

    def in_float32(self) -> Factorization:
        """The factors in float32, what a float32 model stores them as anyway: half the memory."""
        return replace(self, first=self.first.astype(np.float32), second=self.second.astype(np.float32))

    def same_op_weight(self) -> np.ndarray:
        """The layer's own op computes second @ first @ x with this weight (see decompositions.Factorized)."""
        return self.reconstruct()

    def emit(self, layer: Layer, emit: Emitter) -> None:
        """The plain two-factor chain, written by the layer's adapter (its op, twice)."""
        layer.adapter.rewrite(layer, self, emit)


class Splice:
    """Shared state of one rewrite: names in use, factor constants made so far, metadata of added nodes."""

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        taken: set[str] = set()
        for current in every_graph(graph):
            taken |= {node.name for node in current.nodes} | set(current.tensors())
        self._names = Names(taken)
        self._constants: dict[tuple[str, str], gs.Tensor] = {}
        self.metadata: dict[str, dict[str, str]] = {}

    def unique(self, name: str) -> str:
        return self._names.fresh(name)

    def replace(self, layer: Layer, factors: Factorized) -> None:
        """Disconnect the layer's node and let the factors emit their chain in its place (a two-factor
        product through the layer's adapter, other decompositions their own nodes)."""
        node = layer.node
        emit = Emitter(self, layer, factors, inputs=list(node.inputs), outputs=list(node.outputs))
        node.inputs.clear()
        node.outputs.clear()
        if layer.transposed:  # the head of a tied table: its factors are the lookup's, shared
            _rewrite_tied_head(layer, factors, emit)
        else:
            factors.emit(layer, emit)


class Emitter:
    """What an adapter uses to build one layer's chain: its original inputs/outputs and node/weight makers."""

    def __init__(self, splice: Splice, layer: Layer, factors: Factorized, inputs: list, outputs: list):
        self._splice = splice
        self._layer = layer
        self._factors = factors
        self.inputs = inputs
        self.outputs = outputs

    def bias(self, site: BiasSite | None, shift: np.ndarray) -> gs.Tensor:
        """The layer's bias moved by `shift` (G, out), stored like the bias it replaces."""
        site = known(site, "the bias site of a layer whose factors shift its bias")
        return self.weight("bias", site.shifted(shift.reshape(-1)), like=site.weight)

    def weight(self, role: str, value: np.ndarray, like: Weight | None = None) -> gs.Tensor:
        """A constant stored in the element type of the weight it derives from (`like`, by default the
        layer's weight), cast to what the node sees when the two differ.

        Identical factors of one weight (a weight shared by several nodes) become one constant.
        """
        weight = like or self._layer.weight
        stored = np.ascontiguousarray(value.astype(weight.storage_dtype, copy=False))  # factors: no copy
        key = (weight.name, hashlib.sha1(stored.tobytes() + str(stored.shape).encode()).hexdigest())
        if key in self._splice._constants:
            return self._splice._constants[key]
        tensor: gs.Tensor = gs.Constant(self._splice.unique(f"{weight.name}.lowrank_{role}"), stored)
        if weight.node_type != weight.storage_type:
            cast = gs.Variable(self._splice.unique(f"{tensor.name}.cast"), dtype=weight.node_dtype)
            self.node(f"{role}_cast", "Cast", [tensor], [cast], {"to": weight.node_type})
            tensor = cast
        self._splice._constants[key] = tensor
        return tensor

    def constant(self, role: str, value: np.ndarray, shared: bool = False) -> gs.Constant:
        """A constant of the chain stored as given (its element type is the one it replaces); `shared`: one
        constant for every chain of the layer's weight that stores this very value (a tied table's blocks)."""
        stored = np.ascontiguousarray(value)
        key = (self._layer.weight.name, hashlib.sha1(stored.tobytes() + repr((stored.shape, stored.dtype)).encode())
               .hexdigest())
        if shared and key in self._splice._constants:
            return self._splice._constants[key]
        tensor = gs.Constant(self._splice.unique(f"{self._layer.node.name}.lowrank_{role}"), stored)
        if shared:
            self._splice._constants[key] = tensor
        return tensor

    def variable(self, role: str, dtype=None) -> gs.Variable:
        """An intermediate tensor of the chain, in the element type the layer computes in unless told."""
        return gs.Variable(self._splice.unique(f"{self._layer.node.name}.lowrank_{role}"),
                           dtype=self._layer.weight.node_dtype if dtype is None else dtype)

    def node(self, role: str, op: str, inputs: list, outputs: list, attrs: dict | None = None,
             domain: str = "") -> gs.Node:
        """A node of the chain (`domain`: an op set other than ONNX's, e.g. com.microsoft's MatMulNBits)."""
        name = self._splice.unique(f"{self._layer.node.name}.lowrank_{role}")
        node = gs.Node(op, name=name, attrs=attrs or {}, inputs=inputs, outputs=outputs, domain=domain or None)
        scope = self._layer.scope  # a layer in a body gets its chain there
        (self._splice.graph if scope is None else scope.graph).nodes.append(node)
        self._splice.metadata[name] = {
            "source": self._layer.node.name,
            "method": self._factors.method,
            "rank": str(self._factors.rank if not isinstance(self._factors.rank, tuple) else list(self._factors.rank)),
        }
        return node


def _rewrite_tied_head(layer: Layer, factors: Factorized, emit: Emitter) -> None:
    """The LM head x @ table^T of a tied embedding table whose unit's factors are the lookup's, W = table^T
    ~ second (d x r) @ first (r x V): x @ second @ first, each factor the very constant the Gather's chain
    stores (its V x r lookup, its r x d rebuild), read through a Transpose, so the model holds one copy."""
    if isinstance(factors, TiedHead):
        factors.emit_tied_head(layer, emit)
        return
    if not isinstance(factors, Factorization):
        raise RuntimeError(f"the tied head {layer.node.name!r} takes two-factor products, not {factors.method}")
    rebuild = emit.variable("rebuild_t")
    lookup = emit.variable("lookup_t")
    middle = emit.variable("mid")
    emit.node("b_t", "Transpose", [emit.weight("b", factors.second[0].T)], [rebuild], {"perm": [1, 0]})
    emit.node("a_t", "Transpose", [emit.weight("a", factors.first[0].T)], [lookup], {"perm": [1, 0]})
    emit.node("b", "MatMul", [emit.inputs[0], rebuild], [middle])
    emit.node("a", "MatMul", [middle, lookup], emit.outputs)
