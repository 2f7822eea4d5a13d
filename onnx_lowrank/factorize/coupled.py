"""Coupled units: factorizations that change two or three units at once, written together or not at all.

Two kinds: a pruned pair (prune.py: a consumer's input columns and its producers' rows, cut alike) and
attention heads (heads.py: query and key projections, cut per head alike). Both keep one contract:

- a `Pairing` finds its pairs at load (`find`) and, once the statistics are in, offers the pair's options
  on one unit's menu and holds the other side on its partners' (`couple`, through `menu.Coupling`), so no
  allocation ever splits a pair;
- each side's factorization is `Coupled`: it says what it needs of its partners' (`unmatched`), and
  `unmatched` refuses a set of factorizations that would write one side without the other;
- the methods in COUPLED_METHODS run the layers' own ops on smaller matrices: never slower, never timed alone
  (a pruned layer cannot be: its input is narrower than the activation it would be fed).

And the graph helpers both kinds share: where a layer's channels run, its bias site, its own node rewritten.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import known
from ..graph.layers import Layer, Unit
from ..graph.splice import Factorized
from .menu import UnitDecomposers

if TYPE_CHECKING:
    from ..graph.splice import Emitter

PRUNE = "prune"
HEADS = "heads"
COUPLED_METHODS = (PRUNE, HEADS)
CONSTANT_LIMIT = 1 << 16  # values of a constant operand read at most (a per-channel one has h)


class Pairing(Protocol):
    """One kind of coupled units: the --method values that offer it, how its pairs are found and coupled."""

    methods: tuple[str, ...]

    def find(self, units: Sequence[Unit], model: onnx.ModelProto, taken: Collection[str]) -> list:
        """The pairs among `units` (none of whose units is in `taken`, another kind's)."""
        ...

    def keys(self, pair) -> tuple[str, ...]:
        """The unit keys a pair couples."""
        ...

    def couple(self, pairs: Sequence, candidates: Sequence[UnitDecomposers], statistics: Sequence,
               parking: Path | None) -> None:
        """Offer each pair's options on one unit's menu, its other side held on its partners'."""
        ...


@runtime_checkable
class Coupled(Protocol):
    """A factorization that is one side of a pair: what it needs of its partners' factorizations."""

    def unmatched(self, key: str, factors: Mapping[str, Factorized]) -> str | None:
        """Why unit `key`'s factorization (this one) cannot be written beside `factors`, or None."""
        ...


def unmatched(factors: Mapping[str, Factorized]) -> str | None:
    """Why a set of factorizations cannot be written (one side of a pair without the other cut alike), or None."""
    for key, factorized in factors.items():
        if isinstance(factorized, Coupled):
            problem = factorized.unmatched(key, factors)
            if problem is not None:
                return problem
    return None


def channel_axis(layer: Layer, consuming: bool) -> str | None:
    """Where the layer's channels run in the activation between the pair: "last" (MatMul x @ W, Gemm with a
    constant B) or "axis1" (Conv, group 1; a consumer 1x1 and unpadded); None when it cannot take part."""
    op, info = layer.node.op, layer.info
    if layer.shape[0] != 1:
        return None
    if op == "MatMul" and info["side"] == "right" and not info["batch"]:
        return "last"
    if op == "Gemm" and info["side"] == "B" and not (consuming and layer.node.attrs.get("transA", 0)):
        return "last"
    if op != "Conv":
        return None
    if consuming:
        spatial = layer.weight.shape[2:]
        padded = any(layer.node.attrs.get("pads", [])) or layer.node.attrs.get("auto_pad", "NOTSET") not in (
            "NOTSET", "VALID", b"NOTSET", b"VALID")
        if any(size != 1 for size in spatial) or padded or layer.adapter.observed(layer)[1] != "input":
            return None
    return "axis1"


def cuttable_bias(layer: Layer) -> bool:
    """A producer's bias must be a constant we can cut (or absent)."""
    if layer.bias is not None:
        return True
    return layer.node.op == "MatMul" or len(layer.node.inputs) < 3


def output_after_bias(layer: Layer) -> gs.Tensor:
    """The layer's output, or that of the Add holding its bias."""
    site = layer.bias
    return (site.node if site is not None and site.node is not layer.node else layer.node).outputs[0]


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a tensor computed from constants alone through Identity / Cast / Reshape / Unsqueeze
    (paddle2onnx writes biases as Reshape(Constant)), or None for a computed one."""
    if isinstance(tensor, gs.Constant):  # a weight-sized one is no bias or scale: not read (it may be external)
        return np.asarray(tensor.values) if np.prod(tensor.shape) <= CONSTANT_LIMIT else None
    if len(tensor.inputs) != 1:
        return None
    node = tensor.inputs[0]
    if node.op == "Constant":
        value = node.attrs.get("value")
        return np.asarray(value.values) if isinstance(value, gs.Constant) else None
    if node.op not in ("Identity", "Cast", "Reshape", "Unsqueeze") or not node.inputs:
        return None
    data = constant_value(node.inputs[0])
    second = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if data is None or (node.op == "Reshape" and second is None):
        return None
    if node.op == "Cast":
        return data.astype(onnx.helper.tensor_dtype_to_np_dtype(node.attrs["to"]))
    if node.op == "Reshape":
        copy = not node.attrs.get("allowzero", 0)
        return data.reshape([data.shape[i] if d == 0 and copy else int(d) for i, d in enumerate(known(second, "shape"))])
    if node.op == "Unsqueeze":
        axes = node.attrs.get("axes", second)
        if axes is None:
            return None
        rank = data.ndim + len(list(axes))
        return data.reshape(_unsqueezed(data.shape, sorted(int(a) % rank for a in axes)))
    return data


def _unsqueezed(shape: tuple[int, ...], axes: list[int]) -> list[int]:
    dims = list(shape)
    for axis in axes:
        dims.insert(axis, 1)
    return dims


def own_node(layer: Layer, emit: Emitter, matrices: np.ndarray, rest: list) -> None:
    """The layer's own node with a smaller weight, in the layout the node sees (the inverse of its view)."""
    matrix = matrices[0]
    if layer.node.op == "MatMul":
        value = matrix.T  # x @ W: W is in x out
    elif layer.node.op == "Gemm":
        value = matrix if layer.info["transposed"] else matrix.T
    else:  # Conv: (out, in, *kernel)
        value = matrix.reshape(matrix.shape[0], -1, *layer.weight.shape[2:])
    weight = emit.weight("pruned", value)
    emit.node("pruned", layer.node.op, [emit.inputs[0], weight, *rest], emit.outputs, dict(layer.node.attrs))
