"""Structured MLP compression: keep k of the h channels between a producer and its consumer, refit the consumer.

A pair is producer(s) -> an elementwise activation chain -> consumer: a transformer FFN (MatMul/Gemm d -> h,
GELU or any per-element function, MatMul h -> d'), LLaMA's SwiGLU (gate and up MatMuls, SiLU(gate) * up,
down MatMul) or 1x1 Conv -> activation -> 1x1 Conv (squeeze-excitation). Dropping intermediate channels
removes rows of every producer and columns of the consumer: no node is added, every product shrinks.

For the kept set S the consumer's least-squares refit under its input statistics (covariance C and mean
mu of a = act(...), its correlations shrunk where the data are thin) is B' = B C[:,S] C[S,S]^-1, the mean of the dropped
part moving into the consumer's bias (c = B mu - B' mu_S) where it has a bias site (uncentred second
moments otherwise). The error left is tr(B R_S B^T), R_S = C - C[:,S] C[S,S]^-1 C[S,:] (a Schur
complement): relative to E||B a||^2 it is the predicted error, comparable with the SVD's. S grows greedily
(forward selection: the channel whose residual column removes the most error, ||B R[:,j]||^2 / R[j,j]),
R shrinking by a rank-1 step each time (a pivoted Cholesky of C): one pass orders every channel and gives
the error curve for every k.

The pruning options live on the consumer's unit (`ChannelPruning`); the producers' units hold `KeptRows`,
which offer nothing alone. The allocation treats the pair as one menu (ranks.Coupling): producers and
consumer factorized as usual, or the consumer pruned with the producers' rows dropped alongside.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Self

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import scipy.linalg
import scipy.linalg.blas

from ..errors import known
from ..graph.layers import Layer, Unit
from ..observe.statistics import Moments
from ..system.parallel import one_blas_thread
from . import linalg
from .contracts import Option
from .coupled import PRUNE, channel_axis, constant_value, cuttable_bias, output_after_bias, own_node
from .menu import Coupling, UnitDecomposers
from .parking import Parked

if TYPE_CHECKING:
    from ..graph.splice import Emitter

from ..graph.splice import Factorized

PRUNING_METHODS = ("auto", PRUNE)  # the --method values that offer it
REFITS_KEPT = 4  # a pair's last refits kept for the search's next builds
RIDGE = 1e-9  # added to C's diagonal, relative to its mean diagonal: C[S,S] is then always invertible

# ops computing each output element from the elements at the same position only (constants: scalars)
ELEMENTWISE = frozenset({
    "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Gelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
    "Erf", "Softplus", "Softsign", "Mish", "ThresholdedRelu", "Exp", "Neg", "Abs", "Sqrt", "Identity", "Clip",
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min",
})


@dataclass(frozen=True)
class Pair:
    """Producer units -> an elementwise chain -> a consumer unit, by unit key."""

    consumer: str
    producers: tuple[str, ...]
    chain: tuple[str, ...]  # the activation's node names


# ------------------------------------------------------------------------------------------- detection


def _producer_ends(units: Sequence[Unit]) -> dict[str, Unit]:
    """By tensor name, the output of each unit that could produce a pair's channels: its node's output, or
    that of the Add holding its bias."""
    ends = {}
    for unit in units:
        layer = unit.layers[0]
        if len(unit.layers) != 1 or channel_axis(layer, consuming=False) is None or not cuttable_bias(layer):
            continue
        ends[output_after_bias(layer).name] = unit
    return ends


def channel_axis_of(value: np.ndarray, output: gs.Tensor, axis: str, channels: int) -> int | None:
    """The axis of a constant operand along which the activation's channels run, when it holds one value
    per channel and is constant along every other axis (None otherwise; scalars are none of this)."""
    if axis == "last":
        position = value.ndim - 1
    else:  # axis 1 of the activation, aligned from the right
        rank = None if output.shape is None else len(output.shape)
        if rank is None or value.ndim < rank - 1:
            return None
        position = 1 - (rank - value.ndim)
    if position < 0 or value.shape[position] != channels or value.size != channels:
        return None
    return position


def _operand_fits(operand: gs.Tensor, node: gs.Node, axis: str, channels: int) -> bool | None:
    """A constant operand: True when one value or one per channel (cut with the channels), False when it
    varies otherwise; None for a computed operand."""
    value = constant_value(operand)
    if value is None:
        return None
    return value.size == 1 or channel_axis_of(value, node.outputs[0], axis, channels) is not None


def _chain(start: gs.Tensor, ends: dict[str, Unit], axis: str, channels: int) -> tuple[list[gs.Node], list[Unit]] | None:
    """The elementwise nodes computing `start` from producer ends (and scalar or per-channel constants),
    and those producers."""
    nodes: list[gs.Node] = []
    producers: list[Unit] = []
    frontier, seen = [start], set()
    while frontier:
        tensor = frontier.pop()
        if tensor.name in seen:
            continue
        seen.add(tensor.name)
        if tensor.name in ends:
            producers.append(ends[tensor.name])
            continue
        if len(tensor.inputs) != 1:
            return None  # a graph input
        node = tensor.inputs[0]
        if node.op not in ELEMENTWISE or node.domain not in ("", "ai.onnx", None) or len(node.outputs) != 1:
            return None
        nodes.append(node)
        for operand in node.inputs:
            if not operand.name:
                continue  # an optional input left out
            fits = _operand_fits(operand, node, axis, channels)
            if fits is None:
                frontier.append(operand)
            elif not fits:
                return None
    return (nodes, producers) if nodes and producers else None


def _closed(consumer: gs.Node, nodes: list[gs.Node], producers: list[Unit], outputs: set[str]) -> bool:
    """Whether the chain's tensors (and the producers' outputs) feed only the chain and the consumer."""
    inside = {id(node) for node in nodes} | {id(consumer)}
    tensors = [node.outputs[0] for node in nodes]
    for unit in producers:
        layer = unit.layers[0]
        tensors.append(layer.node.outputs[0])
        if layer.bias is not None and layer.bias.node is not layer.node:
            tensors.append(layer.bias.node.outputs[0])
            inside.add(id(layer.bias.node))
    return all(t.name not in outputs and all(id(user) in inside for user in t.outputs) for t in tensors)


def find_pairs(units: Sequence[Unit], model: onnx.ModelProto) -> list[Pair]:
    """Every producer -> elementwise chain -> consumer pair whose channels can be pruned, conservatively:
    single-node units of one matrix, the chain closed (nothing else reads it, no graph output in it), its
    constants scalars, channel axes agreeing, each unit in one pair at most (the first found)."""
    outputs = {output.name for output in model.graph.output}
    ends = _producer_ends(units)
    pairs: list[Pair] = []
    taken: set[str] = set()
    for unit in units:
        layer = unit.layers[0]
        axis = channel_axis(layer, consuming=True)
        if len(unit.layers) != 1 or axis is None or unit.key in taken:
            continue
        data = layer.adapter.observed(layer)[0]
        found = _chain(data, ends, axis, unit.shape[1])
        if found is None:
            continue
        nodes, producers = found
        keys = [p.key for p in producers]
        fits = all(channel_axis(p.layers[0], consuming=False) == axis and p.shape[0] == unit.shape[1]
                   for p in producers)
        if not fits or len(set(keys)) != len(keys) or unit.key in keys or taken & set(keys):
            continue
        if [id(user) for user in data.outputs] != [id(layer.node)] or not _closed(
                layer.node, nodes, producers, outputs):
            continue
        taken |= {unit.key, *keys}
        pairs.append(Pair(unit.key, tuple(keys), tuple(node.name for node in nodes)))
    return pairs


# -------------------------------------------------------------------------------------- decomposition


def forward_selection(weighted: np.ndarray, moment: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The channels in the order greedy forward selection keeps them, and the error tr(B R_k B^T) left
    with the first k kept, k = 0..h. `weighted` (d', h) is B (rows scaled by the error weights D),
    `moment` (h, h) positive definite. R_k = moment - L_k L_k^T, L the pivoted Cholesky factor.

    Each step costs O((d' + k) h) and touches every array once: B R_k is updated in place (a BLAS
    rank-1 update), its column norms and the error by the same step's algebra (keeping channel j removes
    ||B R_k[:, j]||^2 / R_k[j, j], its gain, from the error). On one BLAS thread: waking a pool for each
    of these matrix-vector steps made it four times slower on 2 cores."""
    with one_blas_thread():
        return _forward_selection(weighted, moment)


def _forward_selection(weighted: np.ndarray, moment: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h = moment.shape[0]
    floor = 1e-300
    residual = np.diag(moment).copy()  # diag(R_k)
    factor = np.zeros((h, h))  # row k: the k-th column of L
    product = np.asfortranarray(weighted @ moment)  # B R_k
    norms = np.einsum("ij,ij->j", product, product)  # ||B R_k[:, j]||^2
    order = np.empty(h, dtype=np.intp)
    errors = np.zeros(h + 1)
    errors[0] = max(float(np.sum(product * weighted)), 0.0)
    free = np.ones(h, dtype=bool)
    for step in range(h):
        gains = np.where(free, norms / np.maximum(residual, floor), -1.0)
        j = int(np.argmax(gains))
        root = np.sqrt(max(residual[j], floor))
        column = (moment[:, j] - factor[:step].T @ factor[:step, j]) / root
        factor[step] = column
        along = product[:, j] / root  # B times the new column of L
        norms += column * (column * float(along @ along) - 2 * (product.T @ along))
        product = scipy.linalg.blas.dger(-1.0, along, column, a=product, overwrite_a=True)
        residual -= column**2
        free[j] = False
        order[step] = j
        errors[step + 1] = max(errors[step] - float(gains[j]), 0.0)
    errors[h] = 0.0  # every channel kept: exact
    return order, errors


class ChannelPruning:
    """The consumer's side of a pair: per k, the k channels forward selection keeps and the refitted
    consumer. Errors are weighed like the data-aware SVD's (a following BatchNormalization's scale) and
    relative to E||D B a||^2, so options compare with every other method's."""

    method = PRUNE

    def __init__(self, layer: Layer, moments: Moments, producers: Sequence[str]):
        weight = np.asarray(layer.matrices, dtype=np.float64)  # (1, d', h)
        _, out_dim, h = weight.shape
        self._weight = weight[0]
        self.producers = tuple(producers)
        scale = linalg.safe_scale(layer.output_scale, 1, out_dim)
        # thin data: correlations pulled towards none, each channel's own variance kept (a channel the
        # calibration never fired stays free to drop; white inputs as the prior would give it weight)
        raw = moments.covariance
        covariance = linalg.shrunk(moments, raw * np.eye(h)[None])
        self._mean = moments.mean[0]
        second_moment = covariance + np.outer(self._mean, self._mean)[None]
        self._centred = layer.bias is not None
        moment = (covariance if self._centred else second_moment)[0]
        ridge = RIDGE * max(float(np.trace(moment)) / h, np.finfo(float).tiny)
        self._moment = moment + ridge * np.eye(h)
        self.order, left = forward_selection(scale[0][:, None] * self._weight, self._moment)
        energy = linalg.energy(scale[:, :, None] * weight, second_moment)
        self.errors = left / energy if energy > 0 else np.zeros_like(left)
        self._refits: dict[int, PrunedInputs] = {}

    def options(self) -> list[Option]:
        out_dim, h = self._weight.shape
        return [Option(PRUNE, (k,), out_dim * k, float(self.errors[k])) for k in range(1, h)]

    def factorize(self, config: tuple[int, ...]) -> PrunedInputs:
        """The pruned consumer keeping k channels; the last few k's are kept (a search builds the same
        pair's k again and again as other units' ranks change, and each refit solves a k x k system)."""
        (k,) = config
        if k not in self._refits:
            if len(self._refits) >= REFITS_KEPT:
                self._refits.pop(next(iter(self._refits)))
            self._refits[k] = self._refit(k)
        return self._refits[k]

    def _refit(self, k: int) -> PrunedInputs:
        h = self._weight.shape[1]
        if not 1 <= k <= h:
            raise ValueError(f"{k} channels kept, outside 1..{h}")
        kept = np.sort(self.order[:k])
        refit = scipy.linalg.solve(self._moment[np.ix_(kept, kept)], self._moment[kept] @ self._weight.T,
                                   assume_a="pos").T  # B C[:,S] C[S,S]^-1
        shift = None
        if self._centred:
            shift = (self._weight @ self._mean - refit @ self._mean[kept])[None]
        return PrunedInputs(PRUNE, k, kept, refit[None], float(self.errors[k]), shift, self.producers, h)


class KeptRows:
    """A producer's side of a pair: the rows (output channels) the consumer's pruning keeps. It offers
    nothing alone: the consumer's options choose it (ranks.Coupling)."""

    method = PRUNE

    def __init__(self, unit: Unit, order: np.ndarray):
        self._unit = unit
        self._order = order

    def options(self) -> list[Option]:
        return []

    def factorize(self, config: tuple[int, ...]) -> KeptOutputs:
        (k,) = config
        kept = np.sort(self._order[:k])
        return KeptOutputs(PRUNE, k, kept, np.asarray(self._unit.matrices, dtype=np.float64)[:, kept, :])


class _SmallerWeight:
    """What a pruned layer's factorization is: its own node with a smaller weight (`matrices`)."""

    matrices: np.ndarray

    @property
    def params(self) -> int:
        return int(self.matrices.size)

    def in_float32(self) -> Self:
        return replace(self, matrices=self.matrices.astype(np.float32))  # type: ignore[type-var]

    def same_op_weight(self) -> np.ndarray | None:
        """None: the weight has fewer rows or columns, which the original model cannot be fed."""
        return None


@dataclass(frozen=True)
class PrunedInputs(_SmallerWeight):
    """The consumer refitted on the kept channels (its input columns), its bias shifted by the mean of the
    dropped part; `producers`: the units whose rows must be kept alike."""

    method: str
    rank: int
    kept: np.ndarray
    matrices: np.ndarray  # (1, d', k)
    predicted_error: float
    bias_shift: np.ndarray | None
    producers: tuple[str, ...]
    channels: int  # h, before pruning

    def same_op_weight(self) -> np.ndarray:
        """The refit in the kept columns, zeros in the dropped ones: the consumer's own node computes the
        pruned pair with it while its producers stay whole (what they compute in the dropped channels is
        multiplied by zero), so a sensitivity probe can feed it to the original model."""
        groups, out, _ = self.matrices.shape
        full = np.zeros((groups, out, self.channels), dtype=self.matrices.dtype)
        full[:, :, self.kept] = self.matrices
        return full

    def unmatched(self, key: str, factors: Mapping[str, Factorized]) -> str | None:
        """Every producer must keep the same channels (its rows) as this consumer (its columns)."""
        for producer in self.producers:
            rows = factors.get(producer)
            if not isinstance(rows, KeptOutputs) or not np.array_equal(rows.kept, self.kept):
                return f"unit {key} keeps {self.rank} channels but its producer {producer} does not keep them"
        return None

    def emit(self, layer: Layer, emit: Emitter) -> None:
        rest = list(emit.inputs[2:])
        if self.bias_shift is not None:
            site = known(layer.bias, "the bias site of a consumer whose refit shifts its bias")
            shifted = emit.bias(site, self.bias_shift)
            if site.node is layer.node:
                rest = [shifted]
            else:
                site.node.inputs[site.index] = shifted
        _cut_chain(emit, emit.inputs[0], self.kept, self.channels, "axis1" if layer.node.op == "Conv" else "last")
        own_node(layer, emit, self.matrices, rest)


@dataclass(frozen=True)
class KeptOutputs(_SmallerWeight):
    """A producer with only the kept rows (output channels) and their bias entries; exact on what it keeps."""

    method: str
    rank: int
    kept: np.ndarray
    matrices: np.ndarray  # (1, k, in)
    predicted_error: float = 0.0  # the pair's error shows on its consumer
    bias_shift: np.ndarray | None = None

    def emit(self, layer: Layer, emit: Emitter) -> None:
        rest = list(emit.inputs[2:])
        site = layer.bias
        if site is not None and (site.node is not layer.node or site.weight is not None):
            value = site.value
            axis = site.channel_axis if site.channel_axis >= 0 else value.ndim + site.channel_axis
            if 0 <= axis < value.ndim and value.shape[axis] > 1:
                value = np.take(value, self.kept, axis=axis)
            cut = emit.weight("bias", value, like=site.weight)
            if site.node is layer.node:
                rest = [cut]
            else:
                site.node.inputs[site.index] = cut
        own_node(layer, emit, self.matrices, rest)


def _cut_chain(emit: Emitter, start: gs.Tensor, kept: np.ndarray, channels: int, axis: str) -> None:
    """The activation between a pruned pair has only the kept channels now: its per-channel constants are
    cut alike (one already cut, e.g. a producer's bias, has fewer values and is left), its inferred
    shapes dropped."""
    stack, seen = [start], {}
    while stack:
        tensor = stack.pop()
        if tensor.name in seen or not isinstance(tensor, gs.Variable):
            continue
        seen[tensor.name] = tensor
        node = tensor.inputs[0] if len(tensor.inputs) == 1 else None
        if node is None or node.op not in ELEMENTWISE:
            continue
        for position, operand in enumerate(node.inputs):
            value = constant_value(operand) if operand.name else None
            along = None if value is None else channel_axis_of(value, node.outputs[0], axis, channels)
            if value is None:
                stack.append(operand)
            elif along is not None:
                node.inputs[position] = emit.constant("channels", np.take(value, kept, axis=along))
    for tensor in seen.values():  # after every axis was found from the shapes
        tensor.shape = None


# ---------------------------------------------------------------------------------- into the allocation


def couple(pairs: Sequence[Pair], candidates: Sequence[UnitDecomposers], statistics: Sequence,
           parking: Path | None = None) -> None:
    """Offer each pair's pruning on its consumer's unit and hold the matching rows on its producers'."""
    by_key = {candidate.unit.key: (position, candidate) for position, candidate in enumerate(candidates)}
    for pair in pairs:
        position, consumer = by_key[pair.consumer]
        moments = statistics[position]
        if not isinstance(moments, Moments) or moments.count == 0:
            continue
        producers = tuple(by_key[key][1] for key in pair.producers)
        pruning = ChannelPruning(consumer.unit.layers[0], moments, pair.producers)
        for producer in producers:
            producer.hold(KeptRows(producer.unit, pruning.order))
        offered = pruning if parking is None else Parked(pruning, parking / f"{position}.{PRUNE}.pickle")
        consumer.couple(offered, Coupling(PRUNE, producers))


def pruned_probe(consumer: UnitDecomposers, target: float) -> tuple[dict[str, Factorized], float] | None:
    """The pair's factorizations at the pruning option whose predicted error is nearest `target` (and the
    error), what its sensitivity probe builds; None when it offers none that loses anything."""
    coupling = known(consumer.coupling, "the coupling of a pruned pair's consumer")
    pool = [o for o in consumer.options() if o.method == coupling.method and o.error > 1e-15]
    if not pool:
        return None
    option = min(pool, key=lambda o: abs(np.log(o.error / target)))
    factors = {consumer.unit.key: consumer.factorize(option)}
    for producer in coupling.producers:
        factors[producer.unit.key] = producer.factorize(coupling.producer_option(producer, option))
    return factors, option.error


class Pruning:
    """Pruned pairs as coupled units (coupled.Pairing): found at load, offered on the consumer's menu."""

    methods: tuple[str, ...] = PRUNING_METHODS

    def find(self, units: Sequence[Unit], model: onnx.ModelProto, taken: Collection[str]) -> list[Pair]:
        return [pair for pair in find_pairs(units, model) if not any(key in taken for key in self.keys(pair))]

    def keys(self, pair: Pair) -> tuple[str, ...]:
        return (pair.consumer, *pair.producers)

    def couple(self, pairs: Sequence[Pair], candidates: Sequence[UnitDecomposers], statistics: Sequence,
               parking: Path | None) -> None:
        couple(pairs, candidates, statistics, parking)


PRUNING = Pruning()
