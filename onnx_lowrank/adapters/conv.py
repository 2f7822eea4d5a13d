"""Conv and ConvTranspose (1-D/2-D/3-D, any strides/pads/auto_pad/dilations, group >= 1) as matrices per group.

Conv W (Cout, Cin/g, *k): per group the matrix (Cout/g, Cin/g * prod(k)); emitted as
Conv(k, Cin -> g*r, original attributes) -> Conv(1x1, g*r -> Cout, group g, bias).
ConvTranspose W (Cin, Cout/g, *k): per group the matrix (Cout/g, Cin/g * prod(k)); emitted as
ConvTranspose(k, Cin -> g*r, original attributes) -> ConvTranspose(1x1, g*r -> Cout, group g, bias).
Depthwise layers (one input channel per group) have no channel rank to cut and are skipped.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from ..layers import Layer
from ..weights import ConstantIndex, Weight, resolve


def _grouped_weight(node: gs.Node, index: ConstantIndex) -> tuple[Weight, int] | str:
    """The constant kernel and group count of a (transposed) convolution, or why it cannot be factorized."""
    weight = resolve(node.inputs[1], index)
    if isinstance(weight, str):
        return f"kernel is not a constant: {weight}"
    if weight.value.ndim < 3:
        return f"kernel {weight.name} has {weight.value.ndim} dimensions, expected 3 or more"
    groups = int(node.attrs.get("group", 1))
    per_group_in = weight.value.shape[1] if node.op == "Conv" else weight.value.shape[0] // groups
    if groups > 1 and per_group_in == 1:
        return "depthwise (one input channel per group): no channel rank to reduce"
    return weight, groups


def _unit_kernel(rank: int) -> dict:
    return {"kernel_shape": [1] * rank}


class ConvAdapter:
    op_type: ClassVar[str] = "Conv"

    def check(self, node: gs.Node, index: ConstantIndex, opset: int) -> Layer | str:
        found = _grouped_weight(node, index)
        if isinstance(found, str):
            return found
        weight, groups = found
        out_channels, in_per_group = weight.value.shape[:2]
        matrices = weight.value.reshape(groups, out_channels // groups, -1)
        return Layer(node, self, weight, matrices, info={"groups": groups})

    def rewrite(self, layer: Layer, first: np.ndarray, second: np.ndarray, emit) -> None:
        kernel = layer.weight.value.shape
        groups, rank, spatial = layer.info["groups"], emit.rank, len(kernel) - 2
        w1 = first.reshape(groups * rank, kernel[1], *kernel[2:])
        w2 = second.reshape(kernel[0], rank, *[1] * spatial)
        middle = emit.variable("mid")
        emit.node("a", "Conv", [emit.inputs[0], emit.weight("a", w1)], [middle], dict(layer.node.attrs))
        tail = {"group": groups, **_unit_kernel(spatial)}
        emit.node("b", "Conv", [middle, emit.weight("b", w2), *emit.inputs[2:]], emit.outputs, tail)


class ConvTransposeAdapter:
    op_type: ClassVar[str] = "ConvTranspose"

    def check(self, node: gs.Node, index: ConstantIndex, opset: int) -> Layer | str:
        found = _grouped_weight(node, index)
        if isinstance(found, str):
            return found
        weight, groups = found
        in_channels, out_per_group = weight.value.shape[:2]
        blocks = weight.value.reshape(groups, in_channels // groups, out_per_group, -1)
        matrices = blocks.transpose(0, 2, 1, 3).reshape(groups, out_per_group, -1)
        return Layer(node, self, weight, matrices, info={"groups": groups})

    def rewrite(self, layer: Layer, first: np.ndarray, second: np.ndarray, emit) -> None:
        kernel = layer.weight.value.shape
        groups, rank, spatial = layer.info["groups"], emit.rank, len(kernel) - 2
        in_per_group = kernel[0] // groups
        w1 = first.reshape(groups, rank, in_per_group, -1).transpose(0, 2, 1, 3).reshape(kernel[0], rank, *kernel[2:])
        w2 = second.transpose(0, 2, 1).reshape(groups * rank, kernel[1], *[1] * spatial)
        middle = emit.variable("mid")
        emit.node("a", "ConvTranspose", [emit.inputs[0], emit.weight("a", w1)], [middle], dict(layer.node.attrs))
        tail = {"group": groups, **_unit_kernel(spatial)}
        emit.node("b", "ConvTranspose", [middle, emit.weight("b", w2), *emit.inputs[2:]], emit.outputs, tail)
