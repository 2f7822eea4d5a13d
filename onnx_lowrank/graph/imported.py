"""Importing a model into onnx-graphsurgeon (shapes inferred, unnamed nodes named) and exporting the spliced
graph faithfully: what onnx-graphsurgeon drops on the way is kept aside and put back."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.importers.onnx_importer import get_onnx_tensor_dtype, get_onnx_tensor_shape
from onnx_graphsurgeon.ir.tensor import LazyValues
from onnx_graphsurgeon.logger import G_LOGGER

from .bodies import all_graphs, every_graph, paired, single_copies
from .model_io import is_repeated

META_PREFIX = "onnx_lowrank."
HEADER_ONLY_BYTES = 1024  # initializers this large go to shape inference without their values


@contextlib.contextmanager
def quiet_graphsurgeon() -> Iterator[None]:
    """onnx-graphsurgeon logs warnings (e.g. about bfloat16) that mean nothing to our users."""
    severity = G_LOGGER.severity
    G_LOGGER.severity = G_LOGGER.ERROR
    try:
        yield
    finally:
        G_LOGGER.severity = severity


@dataclass
class Imported:
    """A graph to splice, plus what onnx-graphsurgeon drops on the way: node doc strings and metadata."""

    graph: gs.Graph
    node_extras: dict[str, onnx.NodeProto]  # by node name: only doc_string and metadata_props are used
    empty_lists: dict[str, list[onnx.AttributeProto]] = field(default_factory=dict)  # by node name: list
    # attributes with no values, which onnx-graphsurgeon cannot export (their type is lost on import)


def import_graph(model: onnx.ModelProto) -> Imported:
    """Import the model with the shapes ONNX shape inference finds (activation ranks become known); the
    caller's proto is never touched, and its weights are neither copied nor serialized: inference runs
    on a copy without their payloads. Nodes left unnamed by the exporter get unique names, in the main
    graph and in If / Loop / Scan bodies."""
    with quiet_graphsurgeon():
        graph = gs.import_onnx(model)
    _detach_renamed(graph)
    _add_inferred_shapes(graph, model)
    taken = {node.name for current in every_graph(graph) for node in current.nodes}
    extras: dict[str, onnx.NodeProto] = {}
    empty_lists: dict[str, list[onnx.AttributeProto]] = {}
    for body, source in paired(graph, model.graph):
        for position, (node, proto) in enumerate(zip(body.nodes, source.node)):
            if not node.name:
                name = f"{node.op}_{position}"
                while name in taken:
                    name += "_"
                node.name = name
                taken.add(name)
            if proto.doc_string or proto.metadata_props:
                extras[node.name] = proto
            empty = [name for name, value in node.attrs.items() if isinstance(value, (list, tuple)) and not value]
            if empty:
                empty_lists[node.name] = [onnx.AttributeProto(name=a.name, type=a.type) for a in proto.attribute
                                          if a.name in empty]
                for name in empty:
                    del node.attrs[name]
    return Imported(graph, extras, empty_lists)


def _detach_renamed(graph: gs.Graph) -> None:
    """onnx-graphsurgeon exports a constant it did not load as the very TensorProto it came from, named
    after the graph tensor: for a Constant node's value (whose own name is usually unset) that would
    rename the caller's tensor, or set its empty name. Those constants get a copy of theirs."""
    for current in every_graph(graph):
        attributes = [value for node in current.nodes for value in node.attrs.values() if isinstance(value, gs.Constant)]
        for tensor in [*current.tensors().values(), *attributes]:
            values = getattr(tensor, "_values", None)
            if isinstance(values, LazyValues) and (values.tensor.name != tensor.name or not values.tensor.HasField("name")):
                copy = onnx.TensorProto()
                copy.CopyFrom(values.tensor)
                values.tensor = copy


def inferred_shapes(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """ONNX shape inference on a copy of the model whose large initializers are headers only (marked
    external, so that nothing reads them): inference needs their shapes, never their values; shape-giving
    constants are small and keep theirs. The copy, with its value_info and outputs inferred (None when
    inference fails, e.g. on unknown domains); serializing headers instead of weights makes this cheap
    for large models (BERT-base: about 2.4 s with the weights)."""
    headers = onnx.ModelProto()
    _copy_except(model, headers, "graph")
    _copy_except(model.graph, headers.graph, "initializer")
    for tensor in model.graph.initializer:
        header = headers.graph.initializer.add()
        if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.raw_data) < HEADER_ONLY_BYTES:
            header.CopyFrom(tensor)
            continue
        header.name, header.data_type = tensor.name, tensor.data_type
        header.dims.extend(tensor.dims)
        header.data_location = onnx.TensorProto.EXTERNAL
        entry = header.external_data.add()
        entry.key, entry.value = "location", "(left out)"
    try:
        return onnx.shape_inference.infer_shapes(headers)
    except Exception:  # inference is a help, not a requirement
        return None


def _add_inferred_shapes(graph: gs.Graph, model: onnx.ModelProto) -> None:
    """Shapes and element types of the activations, in the main graph and in bodies, from `inferred_shapes`."""
    inferred = inferred_shapes(model)
    if inferred is None:
        return
    for body, proto in paired(graph, inferred.graph):
        tensors = body.tensors()
        for info in [*proto.value_info, *proto.output]:
            tensor = tensors.get(info.name)
            if not isinstance(tensor, gs.Variable) or not info.type.HasField("tensor_type"):
                continue
            if tensor.dtype is None and info.type.tensor_type.elem_type:
                tensor.dtype = get_onnx_tensor_dtype(info)
            if tensor.shape is None and info.type.tensor_type.HasField("shape"):
                tensor.shape = get_onnx_tensor_shape(info)


def _copy_except(source, target, skipped: str) -> None:
    """Copy every field of a protobuf message but one."""
    for descriptor, value in source.ListFields():
        if descriptor.name == skipped:
            continue
        if is_repeated(descriptor) or descriptor.type == descriptor.TYPE_MESSAGE:
            getattr(target, descriptor.name).MergeFrom(value)
        else:
            setattr(target, descriptor.name, value)


def export(imported: Imported, original: onnx.ModelProto, metadata: dict[str, dict[str, str]]) -> onnx.ModelProto:
    """Export the spliced graph, keeping the original model's IR version, opsets, functions and metadata,
    and the doc strings and metadata of the nodes it did not replace."""
    graph = imported.graph
    graph.cleanup().toposort()
    with quiet_graphsurgeon():
        exported = gs.export_onnx(graph, do_type_check=False)
    model = exported  # the spliced graph; the rest from the original (not a copy of the graph: it may be GBs)
    for descriptor, _ in model.ListFields():
        if descriptor.name != "graph":
            model.ClearField(descriptor.name)
    for name in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, name, getattr(original, name))
    model.opset_import.extend(original.opset_import)
    declared = {entry.domain for entry in model.opset_import} | {"", "ai.onnx"}
    for domain in sorted({node.domain for graph in all_graphs(model.graph) for node in graph.node} - declared):
        model.opset_import.append(onnx.helper.make_opsetid(domain, 1))  # a chain's com.microsoft op (MatMulNBits)
    model.metadata_props.extend(original.metadata_props)
    model.functions.extend(original.functions)
    del model.graph.metadata_props[:]
    model.graph.metadata_props.extend(original.graph.metadata_props)
    single_copies(model.graph)
    if model.ir_version < 4:  # before IR 4 every initializer must also be a graph input
        listed = {value.name for value in model.graph.input}
        model.graph.input.extend(
            onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims)
            for t in model.graph.initializer
            if t.name not in listed
        )
    for node in (node for graph in all_graphs(model.graph) for node in graph.node):
        node.attribute.extend(imported.empty_lists.get(node.name, []))
        kept = imported.node_extras.get(node.name)
        if kept is not None:
            node.doc_string = kept.doc_string
            node.metadata_props.extend(kept.metadata_props)
        for key, value in metadata.get(node.name, {}).items():
            entry = node.metadata_props.add()
            entry.key, entry.value = META_PREFIX + key, value
    return model
