"""Conv and ConvTranspose (1-D/2-D/3-D, any strides/pads/auto_pad/dilations, group >= 1) as matrices per group.

Conv W (Cout, Cin/g, *k): per group the matrix (Cout/g, Cin/g * prod(k)); emitted as
Conv(k, Cin -> g*r, original attributes) -> Conv(1x1, g*r -> Cout, group g, bias).
ConvTranspose W (Cin, Cout/g, *k): per group the matrix (Cout/g, Cin/g * prod(k)); emitted as
ConvTranspose(k, Cin -> g*r, original attributes) -> ConvTranspose(1x1, g*r -> Cout, group g, bias).
Depthwise convs (one input channel per group) have no channel rank to cut: only the spatial
factorization (conv_methods) can shrink them; depthwise ConvTransposes are skipped.
A Conv's statistics are taken on its input patches (im2col) when a patch has at most PATCH_LIMIT values,
so that any decomposition's output error is exact; otherwise, and for ConvTranspose (whose outputs
overlap), on the output channels. The output mean goes into the second node's bias (added when absent,
unless the bias is computed).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from ..layers import BiasSite, Emits, Layer, Skip, TwoFactors, batchnorm_scale
from ..weights import ConstantIndex, Weight, resolve
from .im2col import conv_patches


def _grouped_weight(node: gs.Node, index: ConstantIndex) -> tuple[Weight, int] | str:
    """The constant kernel and group count of a (transposed) convolution, or why it cannot be factorized."""
    weight = resolve(node.inputs[1], index)
    if isinstance(weight, str):
        return f"kernel is not a constant: {weight}"
    if weight.ndim < 3:
        return f"kernel {weight.name} has {weight.ndim} dimensions, expected 3 or more"
    groups = int(node.attrs.get("group", 1))
    problem = _attribute_problem(node, weight.shape, groups)
    if problem:
        return problem
    if node.op == "ConvTranspose" and groups > 1 and weight.shape[0] // groups == 1:
        return "depthwise (one input channel per group): no channel rank to reduce"
    return weight, groups


AUTO_PADS = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")


def _attribute_problem(node: gs.Node, kernel: tuple[int, ...], groups: int) -> str | None:
    """Attributes the checker lets through but no runtime could run (a model nobody ran): say which."""
    spatial = len(kernel) - 2
    channels = kernel[1] if node.op == "Conv" else kernel[0]  # the side split into groups
    if groups < 1 or (node.op == "Conv" and kernel[0] % groups) or (node.op == "ConvTranspose" and channels % groups):
        return f"group {groups} does not divide the kernel's channels {tuple(kernel[:2])}"
    if min(kernel) < 1:
        return f"kernel shape {tuple(kernel)} has an empty dimension"
    expected = {"strides": spatial, "dilations": spatial, "pads": 2 * spatial, "kernel_shape": spatial,
                "output_padding": spatial}
    for name, length in expected.items():
        value = node.attrs.get(name)
        if value is None:
            continue
        value = list(value)
        if len(value) != length:
            return f"attribute {name} has {len(value)} values for {spatial} spatial dimensions"
        low = 0 if name in ("pads", "output_padding") else 1
        if min(value, default=low) < low:
            return f"attribute {name} {value} has values below {low}"
    if "kernel_shape" in node.attrs and list(node.attrs["kernel_shape"]) != list(kernel[2:]):
        return f"attribute kernel_shape {list(node.attrs['kernel_shape'])} disagrees with the kernel {tuple(kernel)}"
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in AUTO_PADS:
        return f"unknown auto_pad {auto_pad!r}"
    return None


def _bias_site(layer: Layer, index: ConstantIndex, out_channels: int) -> BiasSite | None:
    node = layer.node
    if len(node.inputs) < 3:
        return BiasSite(node, 2, np.zeros(out_channels), 0)
    current = resolve(node.inputs[2], index)
    return None if isinstance(current, str) else BiasSite(node, 2, current.value, 0, weight=current)


class _ChannelStatistics:
    """Shared by Conv and ConvTranspose: statistics of the output channels, grouped."""

    def observed(self, layer: Layer) -> tuple[gs.Tensor, str]:
        return layer.node.outputs[0], "output"

    def rows(self, layer: Layer, array: np.ndarray) -> np.ndarray:
        groups, channels = layer.shape[:2]
        rows = np.moveaxis(array, 1, -1).reshape(-1, groups, channels)
        return rows.swapaxes(0, 1)

    def _tail(self, layer: Layer, factors: TwoFactors, emit: Emits, op: str, w2: np.ndarray) -> gs.Variable:
        """The 1x1 node mapping g*r channels to the output, carrying the (shifted) bias."""
        bias = emit.inputs[2:]
        if factors.bias_shift is not None:
            bias = [emit.bias(layer.bias, factors.bias_shift)]
        middle = emit.variable("mid")
        spatial = w2.ndim - 2
        attrs = {"group": layer.info["groups"], "kernel_shape": [1] * spatial}
        emit.node("b", op, [middle, emit.weight("b", w2), *bias], emit.outputs, attrs)
        return middle


PATCH_LIMIT = 4096


class ConvAdapter(_ChannelStatistics):
    op_type: ClassVar[str] = "Conv"

    def observed(self, layer: Layer) -> tuple[gs.Tensor, str]:
        if layer.shape[2] <= PATCH_LIMIT:
            return layer.node.inputs[0], "input"
        return super().observed(layer)

    def rows(self, layer: Layer, array: np.ndarray) -> np.ndarray:
        if layer.shape[2] <= PATCH_LIMIT:
            kernel = tuple(layer.weight.shape[2:])
            return conv_patches(array, kernel, layer.node.attrs, layer.info["groups"])
        return super().rows(layer, array)

    def check(self, node: gs.Node, index: ConstantIndex, opset: int) -> Layer | Skip:
        found = _grouped_weight(node, index)
        if isinstance(found, str):
            return Skip(found)
        weight, groups = found
        out_channels = weight.shape[0]
        layer = Layer(node, self, weight, lambda value: value.reshape(groups, out_channels // groups, -1),
                      info={"groups": groups})
        layer.bias = _bias_site(layer, index, out_channels)
        layer.output_scale = batchnorm_scale(node, index, out_channels)
        return layer

    def rewrite(self, layer: Layer, factors: TwoFactors, emit: Emits) -> None:
        kernel = layer.weight.shape
        groups, rank, spatial = layer.info["groups"], factors.rank, len(kernel) - 2
        w1 = factors.first.reshape(groups * rank, kernel[1], *kernel[2:])
        w2 = factors.second.reshape(kernel[0], rank, *[1] * spatial)
        middle = self._tail(layer, factors, emit, "Conv", w2)
        emit.node("a", "Conv", [emit.inputs[0], emit.weight("a", w1)], [middle], dict(layer.node.attrs))


class ConvTransposeAdapter(_ChannelStatistics):
    op_type: ClassVar[str] = "ConvTranspose"

    def check(self, node: gs.Node, index: ConstantIndex, opset: int) -> Layer | Skip:
        found = _grouped_weight(node, index)
        if isinstance(found, str):
            return Skip(found)
        weight, groups = found
        in_channels, out_per_group = weight.shape[:2]

        def view(value: np.ndarray) -> np.ndarray:
            blocks = value.reshape(groups, in_channels // groups, out_per_group, -1)
            return blocks.transpose(0, 2, 1, 3).reshape(groups, out_per_group, -1)

        layer = Layer(node, self, weight, view, info={"groups": groups})
        layer.bias = _bias_site(layer, index, groups * out_per_group)
        layer.output_scale = batchnorm_scale(node, index, groups * out_per_group)
        return layer

    def rewrite(self, layer: Layer, factors: TwoFactors, emit: Emits) -> None:
        kernel = layer.weight.shape
        groups, rank, spatial = layer.info["groups"], factors.rank, len(kernel) - 2
        in_per_group = kernel[0] // groups
        w1 = factors.first.reshape(groups, rank, in_per_group, -1).transpose(0, 2, 1, 3)
        w1 = w1.reshape(kernel[0], rank, *kernel[2:])
        w2 = factors.second.transpose(0, 2, 1).reshape(groups * rank, kernel[1], *[1] * spatial)
        middle = self._tail(layer, factors, emit, "ConvTranspose", w2)
        emit.node("a", "ConvTranspose", [emit.inputs[0], emit.weight("a", w1)], [middle], dict(layer.node.attrs))
