"""The int8 fallback (`--quantize int8`, int8.py quantizes).

when int8 of the whole model costs more error than the caller can
spend, the nodes whose quantization costs the most leave the dynamic scheme. A MatMul or Gemm becomes
**weight-only int8** (`weight_only`; onnxruntime's MatMulNBits quantizer, bits=8): its weights stay 8-bit,
symmetric, with one scale per WEIGHT_ONLY_BLOCK weights along K, and its activations are quantized per
row and block at run time (accuracy_level 4), not per tensor. On MiniLM-L6 the dynamic scheme's error is
almost all in its per-tensor activations (mean cosine error 0.0186; the same weights rounded to int8 with
float activations: 0.0031), which the weight-only scheme avoids (every MatMul so: 0.0005) at about
12% more bytes than dynamic int8 and a slower kernel (MiniLM-L6, every MatMul: 296 ms against 178 ms
dynamic, 333 ms float, batch 32, 2 cores). A Gather or Conv is kept float. Each quantized node's cost is
measured, not guessed: the error of the int8 model with that one node taken out (MatMul: weight-only;
Gemm, Gather, Conv: float), in onnxruntime sessions on the caller's selection samples; names, shapes or
a node's local output error are no guide (on MiniLM-L6 one
FFN-output MatMul of layer 0 holds 0.0083 of the 0.0195 mean cosine error of int8, while its own output
moves less than most: its relative output error, 1.7e-3, is below the median). The variants are built by
putting the float node back into the one quantized model (onnxruntime's quantizers keep every replaced
node's output name) and quantizing that node alone weight-only, so each costs a session, not a
quantization of the model (MiniLM-L6, 39 nodes: about 20 s on 2 cores). Nodes then leave the dynamic
scheme greedily, the best measured error reduction per added byte first, each step checked on the caller's
check samples on the graph `quantize_int8(exclude=..., weight_only=...)` gives.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from ..graph.bodies import node_bodies as subgraphs
from .int8 import SOURCE_KEY, WEIGHT_INPUT, WEIGHT_ONLY_OPS, int8_range_for, quantize_int8, weight_only_nodes

FALLBACK_SHARE = 0.6


FALLBACK_CHECKS = 8  # at most this many checked steps (quantize + validate) in the greedy


@dataclass(frozen=True)
class FallbackNode:
    """A weight-bearing node the fallback took out of the dynamic (or static) scheme, and why."""

    name: str
    op_type: str
    scheme: str  # "weight-only" (MatMul, Gemm) or "float" (Gather, Conv)
    error_reduction: float  # measured on the selection samples: int8 error minus the error with it so
    extra_bytes: int  # what the step added to the int8 file (measured on the checked model)
    error_after: float  # checked: int8 error with it (and every node taken before it) so

    def to_dict(self) -> dict:
        return {"node": self.name, "op": self.op_type, "scheme": self.scheme, "error_reduction": self.error_reduction,
                "extra_bytes": self.extra_bytes, "error_after": self.error_after}


@dataclass(frozen=True)
class Fallback:
    """What `fallback` found: the nodes to quantize weight-only (`weight_only`) or keep float (`floats`),
    and the measurements behind them."""

    floats: tuple[str, ...]
    weight_only: tuple[str, ...]
    nodes: tuple[FallbackNode, ...]  # the same nodes, in the order they were taken
    error_all: float  # checked error of int8 of every node
    error: float  # checked error of int8 with the fallback
    share: float  # what the int8 error was to be brought within
    measured: int  # nodes whose cost was measured (0: int8 of every node was within the share)
    checks: int  # quantizations checked (the first: every node)
    seconds: float

    def to_dict(self) -> dict:
        return {"share": self.share, "error_int8_all": self.error_all, "error_int8_fallback": self.error,
                "nodes_measured": self.measured, "checks": self.checks, "seconds": self.seconds}


def fallback(
    model: onnx.ModelProto,
    share: float,
    check: Callable[[onnx.ModelProto], float],
    select: Callable[[onnx.ModelProto], float] | None = None,
    feeds: Iterable[Mapping[str, np.ndarray]] | None = None,
    *,
    int8_range: str = "auto",
    max_checks: int = FALLBACK_CHECKS,
) -> Fallback:
    """The nodes to take out of dynamic int8 (MatMul and Gemm: weight-only int8; Gather, Conv: float) so
    that the error is at most `share`, measured, not guessed.

    `check(model)`: the error that must be within `share` (the caller's validation). `select(model)`: the
    error each node's cost is measured with (default: `check`; better on other samples than those that
    check, so that the nodes are not chosen on the samples that certify them). `feeds`: Conv calibration,
    as for `quantize_int8` (kept in memory: the model is quantized several times), and `int8_range`.

    When int8 of every node is within `share`, nothing changes (one quantization, one check). Otherwise
    each quantized node's cost is measured: select(int8 of all) - select(int8 with that node taken out),
    the variants built from the one quantized model (`_variant`). Nodes with a positive cost are taken in
    order of cost per added byte, each step checked on the model `quantize_int8(exclude=...,
    weight_only=...)` gives; a node whose step does not lower the checked error is left as it was; it
    stops within `share`, out of nodes, or after `max_checks` checks. The result may still be above
    `share`: `error` says where it ended.
    """
    started = time.perf_counter()
    int8_range = int8_range_for(int8_range)[0]  # read the CPU once
    if feeds is not None:
        feeds = list([feeds] if isinstance(feeds, Mapping) else feeds)
    full = quantize_int8(model, feeds, int8_range=int8_range).model
    error_all = check(full)
    if error_all <= share:
        return Fallback((), (), (), error_all, error_all, share, 0, 1, time.perf_counter() - started)

    def requantize(taken: Sequence[onnx.NodeProto]) -> onnx.ModelProto:  # int8 anew, with `taken` taken out
        return quantize_int8(model, feeds, int8_range=int8_range, **_taken_out(taken)).model

    select = select or check
    base_bytes = full.ByteSize()
    base = select(full)
    nodes = {node.name: node for node in _excludable(model, full)}
    costs = _costs(full, model, nodes, base, base_bytes, select, requantize)
    kept, error, checks = _take_greedily(full, model, nodes, costs, requantize, check, share, error_all, base_bytes,
                                         max_checks)
    return Fallback(tuple(k.name for k in kept if k.scheme == "float"),
                    tuple(k.name for k in kept if k.scheme == "weight-only"), tuple(kept), error_all, error,
                    share, len(costs), checks, time.perf_counter() - started)


def _costs(full: onnx.ModelProto, model: onnx.ModelProto, nodes: Mapping[str, onnx.NodeProto], base: float,
           base_bytes: int, select: Callable[[onnx.ModelProto], float],
           requantize: Callable[[Sequence[onnx.NodeProto]], onnx.ModelProto]) -> dict[str, tuple[float, int]]:
    """Each node's cost, measured rather than guessed: the error it adds (`base`, select of int8 of every
    node, less select of int8 with that node taken out) and the bytes taking it out adds (at least 1). The
    variants are built from the one quantized model `full` (`_variant`), so that measuring every node does
    not quantize the model once per node; only a node whose output cannot be reconnected is requantized."""
    costs: dict[str, tuple[float, int]] = {}
    for node in nodes.values():
        variant = _variant(full, model, [node])
        if variant is None:  # no output of the original name to reconnect: quantize without it
            variant = requantize([node])
        costs[node.name] = (base - select(variant), max(variant.ByteSize() - base_bytes, 1))
        del variant
    return costs


def _take_greedily(full: onnx.ModelProto, model: onnx.ModelProto, nodes: Mapping[str, onnx.NodeProto],
                   costs: Mapping[str, tuple[float, int]],
                   requantize: Callable[[Sequence[onnx.NodeProto]], onnx.ModelProto],
                   check: Callable[[onnx.ModelProto], float], share: float, error_all: float, base_bytes: int,
                   max_checks: int) -> tuple[list[FallbackNode], float, int]:
    """The greedy of `fallback`: nodes with a positive cost, best error reduction per added byte first,
    each step checked on the exact model quantize_int8 gives (a variant only where it is that model), a
    step kept only if it lowers the checked error; stops within `share`, out of nodes or after
    `max_checks` checks (the first was int8 of every node). Returns the nodes taken, the last checked
    error and the number of checks."""
    order = sorted((name for name, cost in costs.items() if cost[0] > 0),
                   key=lambda name: costs[name][0] / costs[name][1], reverse=True)
    kept: list[FallbackNode] = []
    error, checks, size = error_all, 1, base_bytes
    for name in order:
        if error <= share or checks >= max_checks:
            break
        taken = [*(nodes[k.name] for k in kept), nodes[name]]
        trial = _variant(full, model, taken, exact=True)
        if trial is None:
            trial = requantize(taken)
        value, trial_size = check(trial), trial.ByteSize()
        del trial
        checks += 1
        if value < error:
            node = nodes[name]
            kept.append(FallbackNode(name, node.op_type, _scheme(node), costs[name][0], trial_size - size, value))
            error, size = value, trial_size
    return kept, error, checks


def _scheme(node: onnx.NodeProto) -> str:
    return "weight-only" if node.op_type in WEIGHT_ONLY_OPS else "float"


def _taken_out(nodes: Sequence[onnx.NodeProto]) -> dict[str, list[str]]:
    """quantize_int8's keywords for these nodes taken out of the dynamic and static schemes."""
    return {"exclude": [n.name for n in nodes if _scheme(n) == "float"],
            "weight_only": [n.name for n in nodes if _scheme(n) == "weight-only"]}


def _variant(quantized: onnx.ModelProto, original: onnx.ModelProto, nodes: Sequence[onnx.NodeProto],
             exact: bool = False) -> onnx.ModelProto | None:
    """The quantized model with `nodes` taken out, without quantizing it anew: put back float
    (`_restore_float`), then the MatMuls weight-only. With `exact`, None where that is not the graph
    quantize_int8 would give: a Conv (its neighbours' QDQ scales would move) or a Gemm (quantize_int8
    rewrites it into a MatMul first) among them; otherwise a Gemm stays float (its cost is then an upper
    bound of what weight-only recovers)."""
    if exact and any(n.op_type in ("Conv", "Gemm") for n in nodes):
        return None
    variant = _restore_float(quantized, original, nodes)
    light = {n.name for n in nodes if n.op_type == "MatMul"}
    return variant if variant is None or not light else weight_only_nodes(variant, light)


def chain_names(model: onnx.ModelProto, names: Collection[str]) -> list[str]:
    """The nodes of `model` that stand for the named original nodes: those still there under their name
    and the nodes of the low-rank chains that replaced them (metadata `onnx_lowrank.source`)."""
    wanted = set(names)
    return [node.name for node in model.graph.node if node.name and (
        node.name in wanted
        or any(p.key == SOURCE_KEY and p.value in wanted for p in node.metadata_props))]


def _excludable(model: onnx.ModelProto, quantized: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The weight-bearing nodes of the main graph that int8 changed and that can be excluded by name."""
    named = Counter(node.name for node in model.graph.node)
    after = {node.name: node for node in quantized.graph.node}
    found = []
    for node in model.graph.node:
        if node.op_type not in WEIGHT_INPUT or node.domain not in ("", "ai.onnx") or not node.name:
            continue
        if named[node.name] > 1:
            continue
        same = after.get(node.name)
        if same is not None and same.op_type == node.op_type and list(same.input) == list(node.input):
            continue  # left float (no constant weight, or onnxruntime declined it)
        found.append(node)
    return found


def _restore_float(quantized: onnx.ModelProto, original: onnx.ModelProto,
                   nodes: Sequence[onnx.NodeProto]) -> onnx.ModelProto | None:
    """The quantized model with `nodes` (of `original`) float again, without quantizing anew. The nodes
    producing each one's outputs (onnxruntime keeps the output names: the scale Mul of a MatMulInteger,
    the DequantizeLinear after a uint8 Gather, the bias Add of a rewritten Gemm, a QDQ Conv) give way to
    the float node, and what only they used is dropped. For the dynamic nodes (MatMul, Gemm, Gather) that
    is the graph quantizing with them excluded gives (identical outputs, tests/test_quantize.py); a QDQ
    Conv keeps the Q/DQ pairs around it, whose calibrated scales a new quantization would place
    differently: close, not equal. None when an output the graph uses has no producer under its name (a
    Gather whose uint8 rows feed the next MatMulInteger directly)."""
    used = _used(original.graph)
    weights = {t.name: t for t in original.graph.initializer}
    variant = onnx.ModelProto()
    variant.CopyFrom(quantized)
    graph = variant.graph
    current = list(graph.node)
    added: dict[str, onnx.TensorProto] = {}
    for node in nodes:
        producers = {name: index for index, n in enumerate(current) for name in n.output if name}
        positions = set()
        for name in node.output:
            if name in producers:
                positions.add(producers[name])
            elif name and name in used:
                return None
        if not positions:
            return None
        at = max(positions)
        known = {v.name for v in graph.input} | {t.name for t in graph.initializer} | set(added)
        known.update(name for n in current[:at] for name in n.output)
        for name in node.input:
            if name and name not in known:
                if name not in weights:
                    return None
                added[name] = weights[name]
        restored = onnx.NodeProto()
        restored.CopyFrom(node)
        current = [restored if index == at else n for index, n in enumerate(current)
                   if index not in positions or index == at]
    current = _live(current, {v.name for v in graph.output})
    del graph.node[:]
    graph.node.extend(current)
    graph.initializer.extend(added.values())
    needed = _used(graph)
    if any(t.name not in needed for t in graph.initializer):
        tensors = [t for t in graph.initializer if t.name in needed]
        del graph.initializer[:]
        graph.initializer.extend(tensors)
    return variant


def _live(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """The nodes (topologically sorted) that some graph output depends on."""
    needed = set(outputs)
    kept = []
    for node in reversed(nodes):
        if any(name and name in needed for name in node.output):
            kept.append(node)
            needed.update(_node_inputs(node))
    kept.reverse()
    return kept


def _used(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name the graph's nodes read (their subgraphs' included) and its outputs."""
    used = {v.name for v in graph.output}
    for node in graph.node:
        used.update(_node_inputs(node))
    return used


def _node_inputs(node: onnx.NodeProto) -> set[str]:
    """A node's inputs, and the names its subgraphs (If/Loop/Scan bodies) read from outer scopes."""
    names = {name for name in node.input if name}
    for body in subgraphs(node):
        names.update(_used(body))
    return names
