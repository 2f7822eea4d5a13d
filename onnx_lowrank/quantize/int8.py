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
* the weight range (`int8_range`, INT8_RANGES) follows the CPU: full 8-bit weights only where it sums
  the u8 x s8 products into int32 (x86 VNNI or AMX, ARM dot product: cpu_features.py); elsewhere (x86
  with AVX2 or AVX-512 alone) pairs of products go through saturating int16 and full-range weights
  overflow (digits_cnn factorized, AMD EPYC AVX2: 91.7% of predictions kept), so the weights get 7 bits
  (onnxruntime's reduce_range, dynamic and static alike) at a small cost in accuracy (MiniLM-L6: mean
  cosine 0.9928 -> 0.9913). "auto" decides by the CPU this runs on, which also runs the validation; a
  model meant for other CPUs is right everywhere with "reduced". The weight-only MatMulNBits scheme
  (8 bits, int8 activations per block) is exact on AVX2 without VNNI (matches int8 arithmetic done in
  float64 to 2e-7): it has no range to reduce.
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
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import InputError
from ..graph.bodies import all_graphs
from ..system.cpu_features import full_int8_range, read_cpuinfo

QUANTIZATIONS = ("int8", "int4")  # int4: factorize/int4.py, options of the menus
INT8_RANGES = ("auto", "full", "reduced")  # --int8-range: see int8_range_for

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
WEIGHT_ONLY_SCHEME = ("weight-only (MatMulNBits): int8 weights, symmetric, one scale per {block} weights along K; "
                      "activations quantized per row and block at run time (accuracy level 4)")
WEIGHT_ONLY_BLOCK = 32  # MiniLM-L6, every MatMul weight-only: mean cosine error 0.0005 at 32, 0.0013 at 128
WEIGHT_ONLY_OPS = ("MatMul", "Gemm")
WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Conv": 1, "Gather": 0}
_OTHER_FLOATS = (TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)
_QUANTIZED = (TensorProto.INT8, TensorProto.UINT8)
_NAME_PREFIX = "onnx_lowrank_quantize"
SOURCE_KEY = "onnx_lowrank.source"  # a low-rank chain's node: the name of the node it replaced


@dataclass(frozen=True)
class QuantizedModel:
    """The quantized model and what happened to it.

    `info` (JSON-ready): {"scheme": "int8",
    "nodes": {op type: number of nodes quantized},
    "schemes": {op type: how those nodes were quantized},
    "float": {op type: number of weight-bearing nodes left float},
    "notes": [one line per reason something stayed float, or that there was nothing to quantize],
    "range": "full" or "reduced" (7-bit weights), "range_reason": why (`int8_range_for`)}.
    """

    model: onnx.ModelProto
    info: dict = field(default_factory=dict)


@dataclass
class _Candidate:
    name: str  # unique in the working copy
    op_type: str  # as in the input model (a Gemm stays "Gemm" here after its rewrite into MatMul)
    weight_only: bool = False  # MatMulNBits instead of dynamic


def int8_range_for(choice: str = "auto", cpuinfo: str | None = None) -> tuple[str, str]:
    """The weight range ("full" or "reduced") an INT8_RANGES choice means here, and why: "auto" is full
    only where this CPU (or the /proc/cpuinfo text given) sums int8 products without saturating."""
    if choice not in INT8_RANGES:
        raise InputError(f"unknown int8 range {choice!r}; choose one of {', '.join(INT8_RANGES)}")
    full, why = full_int8_range(read_cpuinfo() if cpuinfo is None else cpuinfo)
    if choice == "auto":
        return ("full" if full else "reduced"), f"auto: {why}"
    if choice == "full" and not full:
        why += ": full-range products can saturate here"
    return choice, f"requested; {why}"


def quantize_int8(
    model: onnx.ModelProto,
    feeds: Iterable[Mapping[str, np.ndarray]] | None = None,
    *,
    int8_range: str = "auto",
    exclude: Collection[str] = (),
    weight_only: Collection[str] = (),
) -> QuantizedModel:
    """Quantize the weights of MatMul, Gemm and Gather (dynamic) and of Conv (static QDQ) to int8.

    `feeds`: calibration feed dicts (input name -> array; one dict is one feed), consumed once, only when
    the model has Conv weights to quantize; without them Conv stays float and `info` says so.
    `int8_range`: "full", "reduced" (7-bit weights) or "auto" (by this CPU, `int8_range_for`).
    `exclude`: names of nodes to leave float (say, those whose quantization costs the most accuracy; an
    excluded Gemm may come back as the equivalent float MatMul + Add, since onnxruntime's dynamic pass
    rewrites plain Gemms).
    `weight_only`: names of MatMul and Gemm nodes to quantize weight-only instead (MatMulNBits, see the
    module docstring); other ops named there stay float.
    The input model is not modified. Raises InputError for bad feeds, RuntimeError (one line) when
    onnxruntime's quantizer fails.
    """
    chosen = int8_range_for(int8_range)
    reduce_range = chosen[0] == "reduced"
    working = onnx.ModelProto()
    working.CopyFrom(model)
    notes: list[str] = []
    left_float: Counter[str] = Counter()
    candidates = _prepare(working, notes, left_float, _names(exclude), _names(weight_only))
    nbits = [c for c in candidates if c.weight_only]
    if nbits:
        try:
            working = weight_only_nodes(working, {c.name for c in nbits})
        except Exception as error:  # noqa: BLE001 - onnxruntime.quantization raises anything
            raise RuntimeError(f"onnxruntime's weight-only quantizer failed: {_one_line(error)}") from None
    dynamic = [c for c in candidates if c.op_type != "Conv" and not c.weight_only]
    convs, conv_feeds = _conv_feeds([c for c in candidates if c.op_type == "Conv"], feeds, left_float, notes)

    if not dynamic and not convs:
        if not candidates and not left_float:
            notes.append("nothing to quantize: no MatMul, Gemm, Gather or Conv node has a constant float weight")
        if not nbits:
            return QuantizedModel(_copy(model), _info({}, left_float, notes, chosen))

    with tempfile.TemporaryDirectory(prefix="onnx-lowrank-quantize-") as folder, _quiet_onnxruntime():
        path = Path(folder) / "input.onnx"
        _save(working, path)
        del working  # only the saved copy is needed from here on
        result = _quantize_saved(path, Path(folder), model.graph, dynamic, convs, conv_feeds, reduce_range)
    _restore_metadata(result, model)
    return _outcome(result, dynamic, convs, nbits, left_float, notes, chosen)


def _conv_feeds(convs: list[_Candidate], feeds: Iterable[Mapping[str, np.ndarray]] | None, left_float: Counter,
                notes: list[str]) -> tuple[list[_Candidate], Iterator | None]:
    """The Convs to quantize statically and their calibration feeds. The first feed is read here, so that
    empty feeds are the caller's error (InputError) before any quantizer runs; without feeds the Convs
    stay float and are counted so (left_float, notes)."""
    if convs and feeds is not None:
        feeds = iter([feeds] if isinstance(feeds, Mapping) else feeds)  # a dict is one feed
        first = next(feeds, None)
        if first is None:
            raise InputError("the calibration feeds are empty; Conv quantization needs at least one")
        return convs, itertools.chain([first], feeds)
    if convs:
        left_float["Conv"] += len(convs)
        notes.append(f"{len(convs)} Conv node(s) stay float: static quantization needs calibration feeds")
    return [], None


def _quantize_saved(path: Path, folder: Path, graph: onnx.GraphProto, dynamic: list[_Candidate],
                    convs: list[_Candidate], conv_feeds: Iterator | None, reduce_range: bool) -> onnx.ModelProto:
    """Run onnxruntime's quantizers on the model saved at `path` (static QDQ for the Convs, calibrated on
    `conv_feeds` checked against the input model's `graph`, then dynamic), check and load the result.
    Their failures become one-line RuntimeErrors, since onnxruntime raises anything from ValueError to
    KeyError; the caller's errors (InputError, a bad feed) and MemoryError pass through."""
    try:
        if convs:
            assert conv_feeds is not None, "_conv_feeds keeps Convs to quantize only when it has their feeds"
            reader = _Reader(conv_feeds, graph)
            path = _static_conv(path, folder / "conv.onnx", convs, reader, reduce_range)
        if dynamic:
            path = _dynamic(path, folder / "dynamic.onnx", dynamic, reduce_range)
    except (InputError, MemoryError):
        raise
    except Exception as error:  # onnxruntime.quantization raises anything from ValueError to KeyError
        raise RuntimeError(f"onnxruntime's int8 quantizer failed: {_one_line(error)}") from None
    try:
        onnx.checker.check_model(str(path))
    except Exception as error:
        raise RuntimeError(f"onnxruntime's int8 quantizer gave an invalid model: {_one_line(error)}") from None
    return onnx.load(str(path))  # loads the external data back into the proto


def _outcome(result: onnx.ModelProto, dynamic: list[_Candidate], convs: list[_Candidate], nbits: list[_Candidate],
             left_float: Counter, notes: list[str], chosen: tuple[str, str]) -> QuantizedModel:
    """The quantized model and its info, counted from the result itself: onnxruntime's quantizers may
    leave a node they were asked to quantize, which then counts as float, with a note."""
    attempted = dynamic + convs + nbits  # (Convs without feeds were counted float above)
    quantized = _quantized(result, attempted)
    done = Counter(c.op_type for c in dynamic + convs if c.name in quantized)
    light = Counter(c.op_type for c in nbits if c.name in quantized)
    declined = Counter(c.op_type for c in attempted if c.name not in quantized)
    for op_type, count in sorted(declined.items()):
        notes.append(f"{count} {op_type} node(s) stay float: onnxruntime's quantizer left them")
    left_float.update(declined)
    return QuantizedModel(result, _info(done, left_float, notes, chosen, light))

def _names(names: Collection[str]) -> set[str]:
    return {names} if isinstance(names, str) else set(names)


def weight_only_nodes(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """The MatMuls named (constant 2-D B) as MatMulNBits, 8 bits; onnxruntime's quantizer renames each
    node (a suffix) and keeps its output name. That output is typed float here (value_info): ONNX shape
    inference does not know MatMulNBits, and every tensor computed from an untyped one stays untyped,
    which onnxruntime's dynamic MatMul quantizer refuses further down (digits_cnn, first Gemm weight-only:
    "Unable to find data type for weight_name='logits_matmul'")."""
    from onnxruntime.quantization import QuantFormat

    matmul_nbits_quantizer = _matmul_nbits()
    config = matmul_nbits_quantizer.DefaultWeightOnlyQuantConfig(
        block_size=WEIGHT_ONLY_BLOCK, is_symmetric=True, accuracy_level=4, quant_format=QuantFormat.QOperator,
        op_types_to_quantize=("MatMul",), quant_axes=(("MatMul", 0),), bits=8)
    others = {node.name for graph in all_graphs(model.graph) for node in graph.node} - names
    quantizer = matmul_nbits_quantizer.MatMulNBitsQuantizer(model, nodes_to_exclude=others | {""}, algo_config=config)
    outputs = [node.output[0] for node in model.graph.node if node.name in names]  # float32: so are the weights
    with _quiet_onnxruntime():
        quantizer.process()
    result = quantizer.model.model
    typed = {v.name for v in itertools.chain(result.graph.value_info, result.graph.output)}
    result.graph.value_info.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
                                   for name in outputs if name not in typed)
    return result


def _matmul_nbits():
    """onnxruntime's MatMulNBits quantizer module. Importing it calls logging.basicConfig(level=INFO),
    which would print every library's INFO messages from then on: the root logger is put back as it was."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization import matmul_nbits_quantizer

    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)
    return matmul_nbits_quantizer


# compact mode: int8 of the original may take this much of the tolerance, the factorization the rest. Less
# keeps more nodes float for a room the factorization may not use: on MiniLM-L6 at cosine 0.02, 0.5 kept 3
# nodes float (+4.4% of the file) for a room of 0.0105, no more factorized than 0.6 with 1 node (+2%, room
# 0.0088), whose rank frontier steps from 0.0087 to 0.0109.


def _prepare(model: onnx.ModelProto, notes: list[str], left_float: Counter, exclude: set[str],
             weight_only: set[str]) -> list[_Candidate]:
    """The weight-bearing nodes onnxruntime can quantize, each with a unique name (onnxruntime selects
    nodes by name); Constant-node weights lifted into initializers, Gemms rewritten into MatMul + Add.
    Named in `weight_only`: MatMul and Gemm candidates marked so, other ops excluded."""
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
        position = WEIGHT_INPUT.get(node.op_type)
        if node.domain not in ("", "ai.onnx") or position is None or len(node.input) <= position:
            continue
        weight = weights.get(node.input[position])
        if weight is None or weight.data_type not in (TensorProto.FLOAT, *_OTHER_FLOATS):
            continue  # no constant float weight: nothing to quantize
        reason = _unsupported(node, weight, constants)
        light = bool(node.name) and node.name in weight_only
        if node.name and (node.name in exclude or light and node.op_type not in WEIGHT_ONLY_OPS):
            reason = "excluded by name"
        if reason:
            skipped[node.op_type, reason] += 1
            continue
        if not node.name or named[node.name] > 1:  # onnxruntime selects nodes by name
            node.name = _unique(f"{_NAME_PREFIX}_{node.op_type}_{index}", taken)
        candidates.append(_Candidate(node.name, node.op_type, light))
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
              if (p := WEIGHT_INPUT.get(node.op_type)) is not None and len(node.input) > p}
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
        if beta != 1.0:  # a constant C (_unsupported): scale it once
            initializer = next((t for t in graph.initializer if t.name == bias), None)
            assert initializer is not None, "_unsupported keeps only Gemms whose C scaled by beta is a constant"
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


def _static_conv(source: Path, target: Path, convs: list[_Candidate], reader: _Reader, reduce_range: bool) -> Path:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    opset = next((o.version for o in onnx.load(str(source), load_external_data=False).opset_import
                  if o.domain in ("", "ai.onnx")), 0)
    quantize_static(
        str(source),
        str(target),
        reader,
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
    """onnxruntime's CalibrationDataReader protocol (get_next until None) over an iterator of feeds, each
    checked against the graph's inputs: a bad feed is the caller's error, not a failure of the quantizer."""

    def __init__(self, feeds: Iterator, graph: onnx.GraphProto):
        self._feeds = feeds
        self._count = 0
        self._inputs = {v.name for v in graph.input}
        self._required = self._inputs - {t.name for t in graph.initializer}

    def get_next(self):
        feed = next(self._feeds, None)
        if feed is None:
            return None
        if not isinstance(feed, Mapping):
            raise InputError(f"calibration feed {self._count} is a {type(feed).__name__}, not a dict of input arrays")
        if set(feed) - self._inputs or self._required - set(feed):
            raise InputError(f"calibration feed {self._count} gives {', '.join(sorted(feed))}; "
                             f"the model's inputs are {', '.join(sorted(self._inputs))}")
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
        weight = node.input[WEIGHT_INPUT[node.op_type]] if node.op_type in WEIGHT_INPUT else ""
        if types.get(weight) in _QUANTIZED or producers.get(weight) == "DequantizeLinear":
            done.add(candidate.name)
    return done


def _info(done: Mapping[str, int], left_float: Mapping[str, int], notes: list[str], chosen: tuple[str, str],
          weight_only: Mapping[str, int] | None = None) -> dict:
    info: dict[str, Any] = {
        "scheme": "int8",
        "nodes": dict(sorted(done.items())),
        "schemes": {op_type: SCHEMES[op_type] for op_type in sorted(done)},
        "float": dict(sorted(left_float.items())),
        "notes": notes,
        "range": chosen[0],
        "range_reason": chosen[1],
    }
    if weight_only:
        info["weight_only"] = dict(sorted(weight_only.items()))
        info["schemes"]["weight_only"] = WEIGHT_ONLY_SCHEME.format(block=WEIGHT_ONLY_BLOCK)
    return info


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
