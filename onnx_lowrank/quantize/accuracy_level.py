"""MatMulNBits' `accuracy_level` under `--quantize int4`: level 4 quantizes the activations to int8 inside
the kernel (faster on x86 with VNNI or AMX, and known to flip decisions: onnxruntime#29849), so it is
offered only where the model validates with it and runs faster with it on the validation provider.

ONNX Runtime 1.32 computes level 4 wrong when the scales are not an initializer (a Cast of float16 scales
that its optimizer did not fold, as with graph optimizations disabled), so the scales of those nodes are
stored in float32 here, as the kernel reads them."""

from __future__ import annotations

import onnx
from onnx import numpy_helper

from ..graph.bodies import all_graphs

INT8_ACTIVATIONS = 4  # accuracy_level: the MatMulNBits kernel computes with int8 activations
MATMUL_NBITS = ("com.microsoft", "MatMulNBits")
SCALES = 2  # MatMulNBits' input position of the scales


def quantized_matmuls(model: onnx.ModelProto) -> int:
    """How many MatMulNBits nodes the model holds, bodies included."""
    return sum(_is_nbits(node) for graph in all_graphs(model.graph) for node in graph.node)


def with_accuracy_level(model: onnx.ModelProto, level: int = INT8_ACTIVATIONS) -> onnx.ModelProto:
    """A copy of the model whose MatMulNBits nodes all compute at `level`, their scales float32 initializers."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for graph in all_graphs(copy.graph):
        produced = {output: node for node in graph.node for output in node.output}
        stored = {tensor.name: tensor for tensor in graph.initializer}
        for node in graph.node:
            if not _is_nbits(node):
                continue
            kept = [attribute for attribute in node.attribute if attribute.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend([*kept, onnx.helper.make_attribute("accuracy_level", level)])
            cast = produced.get(node.input[SCALES])
            if cast is not None and cast.op_type == "Cast" and cast.input[0] in stored:
                name = f"{cast.input[0]}.float32"
                if name not in stored:
                    value = numpy_helper.to_array(stored[cast.input[0]]).astype("float32")
                    stored[name] = numpy_helper.from_array(value, name)
                    graph.initializer.append(stored[name])
                node.input[SCALES] = name
    _drop_unused_casts(copy)
    return copy


def _is_nbits(node: onnx.NodeProto) -> bool:
    return (node.domain, node.op_type) == MATMUL_NBITS


def _drop_unused_casts(model: onnx.ModelProto) -> None:
    """Casts whose output nothing reads any more, and the initializers only they read."""
    graphs = list(all_graphs(model.graph))
    read = {name for graph in graphs for node in graph.node for name in node.input}
    read |= {output.name for graph in graphs for output in graph.output}
    orphans = set()
    for graph in graphs:
        for node in [node for node in graph.node if node.op_type == "Cast" and node.output[0] not in read]:
            graph.node.remove(node)
            orphans.add(node.input[0])
    read = {name for graph in graphs for node in graph.node for name in node.input}
    for graph in graphs:
        for tensor in [tensor for tensor in graph.initializer if tensor.name in orphans - read]:
            graph.initializer.remove(tensor)
