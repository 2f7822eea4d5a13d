"""MatMul with a constant weight on either side, 2-D or batched (each batch matrix factorized at one rank).

x @ W (W: ..., K x N): the map is W^T per batch; emitted as MatMul(x, W1) -> MatMul(T, W2), so a bias Add
that follows stays where it was and ONNX Runtime's MatMul+Add fusion still applies.
W @ x (W: ..., M x K): emitted as MatMul(W1, x) -> MatMul(W2, T).
Statistics are taken on the activation's vectors; the output mean can only go into the constant of an
Add that alone consumes the output (MatMul has no bias of its own).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from ...errors import known
from ..layers import BiasSite, Emits, Layer, Skip, TwoFactors
from ..weights import ConstantIndex, Weight, resolve, weight_users


class MatMulAdapter:
    op_type: ClassVar[str] = "MatMul"

    def check(self, node: gs.Node, index: ConstantIndex, opset: int) -> Layer | Skip:
        left = resolve(node.inputs[0], index)
        right = resolve(node.inputs[1], index)
        if isinstance(left, Weight) and isinstance(right, Weight):
            return Skip("both inputs are constants (fold constants first)")
        if isinstance(right, Weight):
            side, weight = "right", right
        elif isinstance(left, Weight):
            side, weight = "left", left
        else:
            return Skip("no constant weight (both inputs are computed)")
        if weight.ndim < 2:
            return Skip(f"weight {weight.name} is a vector (no rank to reduce)")
        batch = weight.shape[:-2]
        if batch:
            activation = node.inputs[0 if side == "right" else 1]
            if activation.shape is None:
                return Skip("batched weight with an activation of unknown rank (a 1-D one would change the result)")
            if len(activation.shape) < 2:
                return Skip("batched weight with a 1-D activation")
        if side == "right":  # x @ W maps rows: out x in = W^T
            view = lambda value: value.reshape(-1, *value.shape[-2:]).transpose(0, 2, 1)  # noqa: E731
        else:
            view = lambda value: value.reshape(-1, *value.shape[-2:])  # noqa: E731
        layer = Layer(node, self, weight, view, info={"side": side, "batch": batch})
        layer.bias = _following_add(layer, index)
        return layer

    def observed(self, layer: Layer) -> tuple[gs.Tensor, str]:
        return layer.node.inputs[0 if layer.info["side"] == "right" else 1], "input"

    def rows(self, layer: Layer, array: np.ndarray) -> np.ndarray:
        batch = layer.info["batch"]
        vectors = array if layer.info["side"] == "right" else np.swapaxes(array, -1, -2)
        if vectors.ndim == 1:
            vectors = vectors[None]
        if batch:
            lead = np.broadcast_shapes(vectors.shape[:-2], batch)
            vectors = np.broadcast_to(vectors, (*lead, *vectors.shape[-2:]))
            groups = int(np.prod(batch))
            vectors = vectors.reshape(-1, groups, *vectors.shape[-2:]).swapaxes(0, 1)
            return vectors.reshape(groups, -1, vectors.shape[-1])
        return vectors.reshape(1, -1, vectors.shape[-1])

    def rewrite(self, layer: Layer, factors: TwoFactors, emit: Emits) -> None:
        first, second = factors.first, factors.second
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
        if factors.bias_shift is not None:
            site = known(layer.bias, "the bias site of a layer whose factors shift its bias")
            site.node.inputs[site.index] = emit.bias(site, factors.bias_shift)


def _following_add(layer: Layer, index: ConstantIndex) -> BiasSite | None:
    """The Add that alone consumes a 2-D-weight MatMul's output, if its other operand is a per-channel constant."""
    if layer.info["batch"]:
        return None
    consumers = layer.node.outputs[0].outputs
    if len(consumers) != 1 or consumers[0].op != "Add" or layer.node.outputs[0].name in index.graph_outputs:
        return None
    add = consumers[0]
    position = 1 if add.inputs[0] is layer.node.outputs[0] else 0
    constant = resolve(add.inputs[position], index)
    if isinstance(constant, str):
        return None
    channels = layer.shape[1]
    axis = -1 if layer.info["side"] == "right" else -2
    shape = constant.value.shape
    per_channel = len(shape) >= -axis and shape[axis] in (1, channels) and all(
        size == 1 for i, size in enumerate(shape) if i != len(shape) + axis
    )
    users, to_output = weight_users(constant.stored, index.graph_outputs)
    if not per_channel or to_output or len(users) != 1:
        return None
    return BiasSite(add, position, constant.value, axis, weight=constant)

