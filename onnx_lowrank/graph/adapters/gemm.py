"""Gemm: Y = alpha * A' @ B' + beta * C, with a constant B (usual) or a constant A.

Constant B (K x N): the map on rows is W = B'^T (N x K); emitted as Gemm(A, B1) -> Gemm(T, B2, C) with
alpha, beta and C on the second node. Constant A (M x K): W = A'; emitted as Gemm(A1, B) -> Gemm(A2, T, C).
Factors keep the original transA/transB storage layout. Statistics are taken on the other operand's
vectors; the output mean goes into C (added when absent, unless beta is 0 or C is computed).
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from ..layers import BiasSite, Emits, Layer, Skip, TwoFactors, batchnorm_scale
from ..weights import ConstantIndex, Weight, resolve


class GemmAdapter:
    op_type: ClassVar[str] = "Gemm"

    def check(self, node: gs.Node, index: ConstantIndex, opset: int) -> Layer | Skip:
        if opset < 7:
            return Skip(f"Gemm before opset 7 (opset {opset}) uses legacy broadcasting")
        alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
        if alpha == 0 or not math.isfinite(alpha) or not math.isfinite(beta):
            return Skip(f"alpha {alpha:g} and beta {beta:g}: the product does not count or is not finite")
        if any(int(node.attrs.get(name, 0)) not in (0, 1) for name in ("transA", "transB")):
            return Skip("transA / transB must be 0 or 1")
        a_weight = resolve(node.inputs[0], index)
        b_weight = resolve(node.inputs[1], index)
        if isinstance(a_weight, Weight) and isinstance(b_weight, Weight):
            return Skip("both A and B are constants (fold constants first)")
        if isinstance(b_weight, Weight):
            side, weight = "B", b_weight
        elif isinstance(a_weight, Weight):
            side, weight = "A", a_weight
        else:
            return Skip("no constant weight (both A and B are computed)")
        if weight.ndim != 2:
            return Skip(f"weight {weight.name} is not 2-D")
        transposed = bool(node.attrs.get(f"trans{side}", 0))
        # A' (M x K) or B' (K x N), B' transposed to out x in: the stored weight transposed an odd number of times
        if transposed != (side == "B"):
            view = lambda value: value.T[None]  # noqa: E731
        else:
            view = lambda value: value[None]  # noqa: E731
        layer = Layer(node, self, weight, view, info={"side": side, "transposed": transposed, "opset": opset})
        layer.bias = _bias_site(layer, index)
        if side == "B":
            layer.output_scale = batchnorm_scale(node, index, layer.shape[1])
        return layer

    def observed(self, layer: Layer) -> tuple[gs.Tensor, str]:
        return layer.node.inputs[1 if layer.info["side"] == "A" else 0], "input"

    def rows(self, layer: Layer, array: np.ndarray) -> np.ndarray:
        if layer.info["side"] == "B":  # rows of A'
            vectors = array.T if layer.node.attrs.get("transA", 0) else array
        else:  # columns of B'
            vectors = array if layer.node.attrs.get("transB", 0) else array.T
        return vectors[None]

    def rewrite(self, layer: Layer, factors: TwoFactors, emit: Emits) -> None:
        attrs = layer.node.attrs
        first, second = factors.first, factors.second
        side, transposed = layer.info["side"], layer.info["transposed"]
        zero = [emit.weight("zero_c", np.zeros(1))] if layer.info["opset"] < 11 else []  # C optional from opset 11
        c = emit.inputs[2:3] or zero
        if factors.bias_shift is not None:
            c = [emit.bias(layer.bias, factors.bias_shift)]
        tail = {"alpha": attrs.get("alpha", 1.0), "beta": attrs.get("beta", 1.0)}
        middle = emit.variable("mid")
        if side == "B":
            # B' ~= first^T (K x r) @ second^T (r x N); stored transposed when transB=1
            b1, b2 = (first[0], second[0]) if transposed else (first[0].T, second[0].T)
            head = {"transA": attrs.get("transA", 0), "transB": int(transposed)}
            emit.node("a", "Gemm", [emit.inputs[0], emit.weight("a", b1), *zero], [middle], head)
            emit.node("b", "Gemm", [middle, emit.weight("b", b2), *c], emit.outputs, {**tail, "transB": int(transposed)})
        else:
            # A' ~= second (M x r) @ first (r x K); stored transposed when transA=1
            a1, a2 = (first[0].T, second[0].T) if transposed else (first[0], second[0])
            head = {"transA": int(transposed), "transB": attrs.get("transB", 0)}
            emit.node("a", "Gemm", [emit.weight("a", a1), emit.inputs[1], *zero], [middle], head)
            emit.node("b", "Gemm", [emit.weight("b", a2), middle, *c], emit.outputs, {**tail, "transA": int(transposed)})


def _bias_site(layer: Layer, index: ConstantIndex) -> BiasSite | None:
    """C absorbs the mean per output channel: columns for a constant B, rows for a constant A.
    The node computes alpha * W x + beta * C, so a shift of W x is alpha / beta in C."""
    beta = float(layer.node.attrs.get("beta", 1.0))
    alpha = float(layer.node.attrs.get("alpha", 1.0))
    if beta == 0.0:
        return None
    channels = layer.shape[1]
    axis = -1 if layer.info["side"] == "B" else -2
    if len(layer.node.inputs) < 3:
        value = np.zeros(channels) if axis == -1 else np.zeros((channels, 1))
        return BiasSite(layer.node, 2, value, axis, scale=beta / alpha)
    current = resolve(layer.node.inputs[2], index)
    if isinstance(current, str):
        return None
    return BiasSite(layer.node, 2, current.value, axis, scale=beta / alpha, weight=current)
