"""int8 quantization of a model's weights (`--quantize int8`), done by onnxruntime.quantization.

Which scheme each weight-bearing node gets:

* MatMul with a constant B, and Gemm: **dynamic** (`quantize_dynamic`). Weights are stored int8,
  activations are quantized at run time from their actual range, so no calibration data is needed and
  nothing depends on how representative it is. onnxruntime's dynamic mode has no Gemm quantizer: it
  rewrites Gemms with alpha = beta = 1 into MatMul + Add itself, under new names. This module rewrites
  every Gemm with a constant B and transA=0 first (alpha folded into the weight, B transposed when
  transB=1, beta folded into a constant C), keeping the Gemm's name on the MatMul so that nodes are
  selected, counted and excluded by their original names. onnxruntime's session optimizer fuses the
  result back into one DynamicQuantizeMatMul with its bias (checked on digits_cnn).
* Gather of a constant table (embeddings; in a factorized embedding Gather + MatMul, the Gather's
  narrow table): **dynamic** too. onnxruntime stores the table uint8 with one scale and zero point
  (its Gather quantizer treats the table as an activation: per tensor, asymmetric, full 8 bits) and
  the looked-up rows stay quantized into a following MatMulInteger, or are dequantized for other
  consumers. Embedding tables are often the largest tensors of a language model.
* Conv: **static QDQ** (`quantize_static`, QuantFormat.QDQ), calibrated (MinMax) on the caller's
  feeds: with fixed activation scales onnxruntime's CPU optimizer fuses DQ -> Conv -> Q into
  QLinearConv (checked on digits_cnn), while dynamic quantization would emit ConvInteger, which the
  CPU provider implements for uint8 weights only. Without feeds, Conv stays float and the info says so.

Settings, and why:

* int8 weights (QuantType.QInt8), symmetric (zero point 0), with uint8 activations: the U8S8 format
  onnxruntime's x86 and ARM CPU kernels are built around (VNNI's vpdpbusd multiplies u8 by s8); uint8
  activations use the whole range for one-sided tensors such as ReLU outputs.
* per channel (one scale per output column of a MatMul/Gemm weight, per output channel of a Conv):
  rows of a weight matrix, and especially the factors of a low-rank chain whose columns carry very
  different singular values, have very different ranges; one scale per tensor wastes most of the 256
  levels on the small ones. Measured on MiniLM-L2: mean cosine 0.978 per tensor, 0.998 per channel.
  QDQ per-channel needs opset >= 13; older models get per-tensor Conv weights.
* reduce_range off by default (full 8-bit weights): that is onnxruntime's advice (quantize_static's
  docstring) for x86 CPUs with VNNI (AVX512-VNNI / AVX-VNNI: Cascade Lake and later, Zen 4) and for
  ARM. On x86 CPUs without VNNI (AVX2 / AVX-512 only) the u8 x s8 products are summed in pairs into
  saturating int16 (vpmaddubsw), which full-range weights can overflow; pass `reduce_range=True`
  (7-bit weights) for those targets, at a small cost in accuracy (MiniLM-L6: mean cosine 0.9928 ->
  0.9913).
* MatMulConstBOnly: only MatMuls with a constant B are quantized; activation x activation products
  (attention scores) hold no weight to shrink and stay float.
* No `quant_pre_process`: it runs onnxruntime's graph optimizer, which fuses and renames the nodes
  (a factorized chain, LayerNorm, attention) that this module selects by name; onnxruntime's quantizers
  already run ONNX shape inference, which is all they need here.

Only the main graph is quantized (nodes inside If/Loop/Scan bodies stay float). onnxruntime.quantization
works on files: the model goes through a temporary folder (under $TMPDIR), always with external data,
so models over 2 GB take the same path as small ones.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import tempfile
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import InputError

QUANTIZATIONS = ("int8",)

SCHEMES = {
    "MatMul": "dynamic: int8 weights, symmetric, one scale per output column; uint8 activations quantized "
              "at run time (MatMulInteger)",
    "Gemm": "dynamic, as a MatMul (+ Add for the bias): int8 weights, symmetric, one scale per output "
            "column; uint8 activations quantized at run time",
    "Gather": "dynamic: uint8 table, one scale and zero point for the whole table; rows dequantized after "
              "the lookup (or fed quantized to the next MatMulInteger)",
    "Conv": "static QDQ: int8 weights, symmetric, one scale per output channel; uint8 activations with "
            "scales calibrated (MinMax) on the calibration feeds; int32 bias",
}
_WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Conv": 1, "Gather": 0}
_OTHER_FLOATS = (TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)
_QUANTIZED = (TensorProto.INT8, TensorProto.UINT8)
_NAME_PREFIX = "onnx_lowrank_quantize"


@dataclass(frozen=True)
class QuantizedModel:
    """The quantized model and what happened to it.

    `info` (JSON-ready): {"scheme": "int8",
    "nodes": {op type: number of nodes quantized},
    "schemes": {op type: how those nodes were quantized},
    "float": {op type: number of weight-bearing nodes left float},
    "notes": [one line per reason something stayed float, or that there was nothing to quantize]}.
    """

    model: onnx.ModelProto
    info: dict = field(default_factory=dict)


@dataclass
class _Candidate:
    name: str  # unique in the working copy
    op_type: str  # as in the input model (a Gemm stays "Gemm" here after its rewrite into MatMul)


def quantize_int8(
    model: onnx.ModelProto,
    feeds: Iterable[Mapping[str, np.ndarray]] | None = None,
    *,
    reduce_range: bool = False,
    exclude: Collection[str] = (),
) -> QuantizedModel:
    """Quantize the weights of MatMul, Gemm and Gather (dynamic) and of Conv (static QDQ) to int8.

    `feeds`: calibration feed dicts (input name -> array; one dict is one feed), consumed once, only when
    the model has Conv weights to quantize; without them Conv stays float and `info` says so.
    `reduce_range`: 7-bit weights, for x86 CPUs without VNNI (see the module docstring).
    `exclude`: names of nodes to leave float (say, those whose quantization costs the most accuracy; an
    excluded Gemm may come back as the equivalent float MatMul + Add, since onnxruntime's dynamic pass
    rewrites plain Gemms).
    The input model is not modified. Raises InputError when onnxruntime cannot quantize the model,
    naming the problem in one line.
    """
    working = onnx.ModelProto()
    working.CopyFrom(model)
    notes: list[str] = []
    left_float: Counter[str] = Counter()
    candidates = _prepare(working, notes, left_float, {exclude} if isinstance(exclude, str) else set(exclude))

    dynamic = [c for c in candidates if c.op_type != "Conv"]
    convs = [c for c in candidates if c.op_type == "Conv"]
    first = None
    if convs and feeds is not None:
        feeds = iter([feeds] if isinstance(feeds, Mapping) else feeds)  # a dict is one feed
        first = next(feeds, None)
        if first is None:
            raise InputError("the calibration feeds are empty; Conv quantization needs at least one")
    elif convs:
        left_float["Conv"] += len(convs)
        notes.append(f"{len(convs)} Conv node(s) stay float: static quantization needs calibration feeds")
        convs = []

    if not dynamic and not convs:
        if not candidates and not left_float:
            notes.append("nothing to quantize: no MatMul, Gemm, Gather or Conv node has a constant float weight")
        return QuantizedModel(_copy(model), _info({}, left_float, notes))

    with tempfile.TemporaryDirectory(prefix="onnx-lowrank-quantize-") as folder, _quiet_onnxruntime():
        path = Path(folder) / "input.onnx"
        _save(working, path)
        del working
        try:
            if convs:
                path = _static_conv(path, Path(folder) / "conv.onnx", convs, itertools.chain([first], feeds),
                                    reduce_range)
            if dynamic:
                path = _dynamic(path, Path(folder) / "dynamic.onnx", dynamic, reduce_range)
        except (InputError, MemoryError):
            raise
        except Exception as error:  # onnxruntime.quantization raises anything from ValueError to KeyError
            raise InputError(f"onnxruntime cannot quantize this model: {_one_line(error)}") from None
        try:
            onnx.checker.check_model(str(path))
        except Exception as error:
            raise InputError(f"onnxruntime's quantization gave an invalid model: {_one_line(error)}") from None
        result = onnx.load(str(path))  # loads the external data back into the proto
    _restore_metadata(result, model)

    quantized = _quantized(result, dynamic + convs)
    done = Counter(c.op_type for c in dynamic + convs if c.name in quantized)
    declined = Counter(c.op_type for c in dynamic + convs if c.name not in quantized)
    for op_type, count in sorted(declined.items()):
        notes.append(f"{count} {op_type} node(s) stay float: onnxruntime's quantizer left them")
    left_float.update(declined)
    return QuantizedModel(result, _info(done, left_float, notes))


def _prepare(model: onnx.ModelProto, notes: list[str], left_float: Counter, exclude: set[str]) -> list[_Candidate]:
    """The weight-bearing nodes onnxruntime can quantize, each with a unique name (onnxruntime selects
    nodes by name); Constant-node weights lifted into initializers, Gemms rewritten into MatMul + Add."""
    graph = model.graph
    _lift_constants(model)
    weights = {t.name: t for t in graph.initializer}
    for overridable in graph.input:  # an initializer that is also an input can be replaced at run time
        weights.pop(overridable.name, None)
    skipped: Counter[tuple[str, str]] = Counter()  # (op type, why it stays float)
    constants = {t.name for t in graph.initializer}
    taken = {node.name for node in graph.node if node.name}  # one namespace for new node and tensor names
    taken.update(name for node in graph.node for name in itertools.chain(node.input, node.output))
    taken.update(t.name for t in graph.initializer)
    taken.update(v.name for v in itertools.chain(graph.input, graph.output))
    named = Counter(node.name for node in graph.node)
    candidates = []
    gemms = []
    for index, node in enumerate(graph.node):
        position = _WEIGHT_INPUT.get(node.op_type)
        if node.domain not in ("", "ai.onnx") or position is None or len(node.input) <= position:
            continue
        weight = weights.get(node.input[position])
        if weight is None or weight.data_type not in (TensorProto.FLOAT, *_OTHER_FLOATS):
            continue  # no constant float weight: nothing to quantize
        reason = _unsupported(node, weight, constants)
        if node.name and node.name in exclude:
            reason = "excluded by name"
        if reason:
            skipped[node.op_type, reason] += 1
            continue
        if not node.name or named[node.name] > 1:  # onnxruntime selects nodes by name
            node.name = _unique(f"{_NAME_PREFIX}_{node.op_type}_{index}", taken)
        candidates.append(_Candidate(node.name, node.op_type))
        if node.op_type == "Gemm":
            gemms.append(node)
    for (op_type, reason), count in sorted(skipped.items()):
        left_float[op_type] += count
        notes.append(f"{count} {op_type} node(s) stay float: {reason}")
    for gemm in gemms:
        _gemm_to_matmul(model, gemm, weights, taken)
    return candidates


def _unsupported(node: onnx.NodeProto, weight: onnx.TensorProto, constants: set[str]) -> str | None:
    """Why this weight-bearing node cannot be quantized here, if it cannot."""
    if weight.data_type != TensorProto.FLOAT:
        # onnxruntime's dynamic quantizer would feed float16 activations to DynamicQuantizeLinear,
        # which takes float32 only
        return "int8 quantization here takes float32 weights only"
    if node.op_type == "MatMul" and len(weight.dims) != 2:
        return "a batched constant B (onnxruntime's per-column scales assume [K, N])"
    if node.op_type == "Gemm" and _attribute(node, "transA", 0):
        return "Gemm with transA=1 has no MatMul form to quantize"
    bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 else ""
    if bias and _attribute(node, "beta", 1.0) not in (0.0, 1.0) and bias not in constants:
        return "Gemm with a computed bias C scaled by beta"
    return None


def _lift_constants(model: onnx.ModelProto) -> None:
    """Float Constant nodes feeding a weight input become initializers (onnxruntime quantizes only those)."""
    graph = model.graph
    if model.ir_version < 4:  # initializers must then be graph inputs too, and those are overridable
        return
    wanted = {node.input[p] for node in graph.node
              if (p := _WEIGHT_INPUT.get(node.op_type)) is not None and len(node.input) > p}
    outputs = {output.name for output in graph.output}
    keep = []
    for node in graph.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None) if node.op_type == "Constant" else None
        if (value is not None and node.domain in ("", "ai.onnx") and node.output[0] in wanted
                and node.output[0] not in outputs and value.data_type == TensorProto.FLOAT):
            tensor = TensorProto()
            tensor.CopyFrom(value)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            keep.append(node)
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)


def _gemm_to_matmul(model: onnx.ModelProto, gemm: onnx.NodeProto, weights: dict, taken: set) -> None:
    """Y = alpha * A @ op(B) + beta * C as MatMul(A, alpha * op(B)) [+ Add(., beta * C)], in place.

    The MatMul keeps the Gemm's name (the candidate list refers to it by name)."""
    graph = model.graph
    alpha = _attribute(gemm, "alpha", 1.0)
    beta = _attribute(gemm, "beta", 1.0)
    source = weights[gemm.input[1]]
    weight_name = source.name
    if alpha != 1.0 or _attribute(gemm, "transB", 0):
        array = numpy_helper.to_array(source)
        array = (array.T if _attribute(gemm, "transB", 0) else array) * np.asarray(alpha, array.dtype)
        weight_name = _unique(f"{source.name}_matmul", taken)
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), weight_name))
        # the original stays for any other consumer; onnxruntime drops it when unused
    bias = gemm.input[2] if len(gemm.input) > 2 and beta != 0.0 else ""
    nodes = []
    output = gemm.output[0]
    matmul_output = _unique(f"{output}_matmul", taken) if bias else output
    nodes.append(helper.make_node("MatMul", [gemm.input[0], weight_name], [matmul_output], name=gemm.name))
    if bias:
        initializer = next((t for t in graph.initializer if t.name == bias), None)
        if beta != 1.0:  # a constant C (_gemm_unsupported): scale it once
            scaled = numpy_helper.to_array(initializer)
            scaled = scaled * np.asarray(beta, scaled.dtype)
            name = _unique(f"{bias}_scaled", taken)
            graph.initializer.append(numpy_helper.from_array(scaled, name))
            bias = name
        nodes.append(helper.make_node("Add", [matmul_output, bias], [output], name=_unique(f"{gemm.name}_bias", taken)))
    position = list(graph.node).index(gemm)
    graph.node.remove(gemm)
    for offset, node in enumerate(nodes):
        graph.node.insert(position + offset, node)


def _static_conv(source: Path, target: Path, convs: list[_Candidate], feeds: Iterator, reduce_range: bool) -> Path:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    opset = next((o.version for o in onnx.load(str(source), load_external_data=False).opset_import
                  if o.domain in ("", "ai.onnx")), 0)
    quantize_static(
        str(source),
        str(target),
        _Reader(feeds),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["Conv"],
        nodes_to_quantize=[c.name for c in convs],
        per_channel=opset >= 13,  # DequantizeLinear's axis (per-channel) came with opset 13
        reduce_range=reduce_range,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        use_external_data_format=True,
        extra_options={"CalibMaxIntermediateOutputs": 16},  # bounded memory, same ranges
    )
    return target


def _dynamic(source: Path, target: Path, nodes: list[_Candidate], reduce_range: bool) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(source),
        str(target),
        op_types_to_quantize=["MatMul", "Gather"],  # Gemms were rewritten into MatMul
        nodes_to_quantize=[c.name for c in nodes],
        per_channel=True,
        reduce_range=reduce_range,
        weight_type=QuantType.QInt8,
        use_external_data_format=True,
        extra_options={"MatMulConstBOnly": True},
    )
    return target


class _Reader:
    """onnxruntime's CalibrationDataReader protocol (get_next until None) over an iterator of feeds."""

    def __init__(self, feeds: Iterator):
        self._feeds = feeds
        self._count = 0

    def get_next(self):
        feed = next(self._feeds, None)
        if feed is None:
            return None
        if not isinstance(feed, Mapping):
            raise InputError(f"calibration feed {self._count} is a {type(feed).__name__}, not a dict of input arrays")
        self._count += 1
        return {name: np.asarray(value) for name, value in feed.items()}

    def __iter__(self):
        return iter(self.get_next, None)


def _quantized(model: onnx.ModelProto, candidates: list[_Candidate]) -> set[str]:
    """Names of the candidates whose weight is now 8-bit: their node was replaced (MatMulInteger), reads
    an int8/uint8 initializer (Gather) or a DequantizeLinear output (QDQ)."""
    nodes = {node.name: node for node in model.graph.node}
    producers = {output: node.op_type for node in model.graph.node for output in node.output}
    types = {t.name: t.data_type for t in model.graph.initializer}
    done = set()
    for candidate in candidates:
        node = nodes.get(candidate.name)
        if node is None:
            done.add(candidate.name)
            continue
        weight = node.input[_WEIGHT_INPUT[node.op_type]] if node.op_type in _WEIGHT_INPUT else ""
        if types.get(weight) in _QUANTIZED or producers.get(weight) == "DequantizeLinear":
            done.add(candidate.name)
    return done


def _info(done: Mapping[str, int], left_float: Mapping[str, int], notes: list[str]) -> dict:
    return {
        "scheme": "int8",
        "nodes": dict(sorted(done.items())),
        "schemes": {op_type: SCHEMES[op_type] for op_type in sorted(done)},
        "float": dict(sorted(left_float.items())),
        "notes": notes,
    }


def _save(model: onnx.ModelProto, path: Path) -> None:
    """Always with external data: the same path for any size, and protobuf never sizes a > 2 GB message."""
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)


def _restore_metadata(result: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """onnxruntime tags the models it shape-inferred ("onnx.infer"); keep only the original's tags."""
    keys = {prop.key for prop in original.metadata_props}
    kept = [prop for prop in result.metadata_props if prop.key in keys or prop.key != "onnx.infer"]
    if len(kept) != len(result.metadata_props):
        del result.metadata_props[:]
        result.metadata_props.extend(kept)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _attribute(node: onnx.NodeProto, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _unique(name: str, taken: set[str]) -> str:
    candidate, number = name, 1
    while candidate in taken:
        candidate, number = f"{name}_{number}", number + 1
    taken.add(candidate)
    return candidate


def _one_line(error: Exception) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]


class _DropAdvice(logging.Filter):
    """onnxruntime.quantization logs advice on the root logger (pre-processing, already-quantized)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("Please consider", "Please check if the model is already quantized"))


@contextlib.contextmanager
def _quiet_onnxruntime():
    advice = _DropAdvice()
    root = logging.getLogger()
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)
