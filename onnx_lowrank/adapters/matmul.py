"""MatMul with a constant weight on either side, 2-D or batched (each batch matrix factorized at one rank).

x @ W (W: ..., K x N): the map is W^T per batch; emitted as MatMul(x, W1) -> MatMul(T, W2), so a bias Add
that follows stays where it was and ONNX Runtime's MatMul+Add fusion still applies.
W @ x (W: ..., M x K): emitted as MatMul(W1, x) -> MatMul(W2, T).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from ..layers import Layer
from ..weights import ConstantIndex, resolve


class MatMulAdapter:
    op_type: ClassVar[str] = "MatMul"

    def check(self, node: gs.Node, index: ConstantIndex, opset: int) -> Layer | str:
        left = resolve(node.inputs[0], index)
        right = resolve(node.inputs[1], index)
        left_const, right_const = not isinstance(left, str), not isinstance(right, str)
        if left_const and right_const:
            return "both inputs are constants (fold constants first)"
        if not (left_const or right_const):
            return "no constant weight (both inputs are computed)"
        side = "right" if right_const else "left"
        weight = right if right_const else left
        value = weight.value
        if value.ndim < 2:
            return f"weight {weight.name} is a vector (no rank to reduce)"
        batch = value.shape[:-2]
        if batch:
            activation = node.inputs[0 if side == "right" else 1]
            if activation.shape is None:
                return "batched weight with an activation of unknown rank (a 1-D one would change the result)"
            if len(activation.shape) < 2:
                return "batched weight with a 1-D activation"
        matrices = value.reshape(-1, *value.shape[-2:])
        if side == "right":
            matrices = matrices.transpose(0, 2, 1)  # x @ W maps rows: out x in = W^T
        return Layer(node, self, weight, matrices, info={"side": side, "batch": batch})

    def rewrite(self, layer: Layer, first: np.ndarray, second: np.ndarray, emit) -> None:
        batch = layer.info["batch"]
        middle = emit.variable("mid")
        if layer.info["side"] == "right":
            # W ~= first^T (K x r) @ second^T (r x N), per batch matrix
            w1 = first.transpose(0, 2, 1).reshape(*batch, first.shape[2], first.shape[1])
            w2 = second.transpose(0, 2, 1).reshape(*batch, second.shape[2], second.shape[1])
            emit.node("a", "MatMul", [emit.inputs[0], emit.weight("a", w1)], [middle])
            emit.node("b", "MatMul", [middle, emit.weight("b", w2)], emit.outputs)
        else:
            # W ~= second (M x r) @ first (r x K), per batch matrix
            w1 = first.reshape(*batch, *first.shape[1:])
            w2 = second.reshape(*batch, *second.shape[1:])
            emit.node("a", "MatMul", [emit.weight("a", w1), emit.inputs[1]], [middle])
            emit.node("b", "MatMul", [emit.weight("b", w2), middle], emit.outputs)
