"""Gather on a constant table (embeddings): table (V x d) ~ A (V x r) @ B (r x d).

Emitted as Gather(A, indices) -> MatMul(., B): the lookup returns r numbers instead of d, and one shared
MatMul rebuilds the vectors. The map from a one-hot row index to a vector is W = table^T (d x V); the
statistics are the lookup counts of each row.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from ..layers import Emits, Layer, Skip, TwoFactors
from ..weights import ConstantIndex, resolve, stored_constant


class GatherAdapter:
    op_type: ClassVar[str] = "Gather"

    def check(self, node: gs.Node, index: ConstantIndex, opset: int) -> Layer | Skip | None:
        table = resolve(node.inputs[0], index)
        if isinstance(table, str):
            return None  # a Gather on computed data (shapes, slices) is no layer: nothing to say about it
        if table.ndim != 2:
            return Skip(f"table {table.name} has {table.ndim} dimensions, expected 2 (an embedding table)")
        if int(node.attrs.get("axis", 0)) not in (0, -2):
            return Skip("gathers along the table's columns (axis 1), not its rows")
        if stored_constant(node.inputs[1]) is not None:
            return Skip("the indices are constants too (fold constants first)")
        return Layer(node, self, table, lambda value: value.T[None])

    def observed(self, layer: Layer) -> tuple[gs.Tensor, str]:
        return layer.node.inputs[1], "indices"

    def rows(self, layer: Layer, array: np.ndarray) -> np.ndarray:
        return array

    def rewrite(self, layer: Layer, factors: TwoFactors, emit: Emits) -> None:
        lookup = factors.first[0].T  # (V, r)
        rebuild = factors.second[0].T  # (r, d)
        middle = emit.variable("mid")
        emit.node("a", "Gather", [emit.weight("a", lookup), emit.inputs[1]], [middle], {"axis": 0})
        emit.node("b", "MatMul", [middle, emit.weight("b", rebuild)], emit.outputs)
