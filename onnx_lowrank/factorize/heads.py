"""Attention heads of fewer dimensions: each head's query and key projections cut together from d to r
dimensions, chosen so that the attention scores change least.

Per head the scores are s_ij = q_i . k_j with q = [x, 1] A_q (A_q: the head's d weight columns over its
d bias entries, (n+1) x d) and k = [y, 1] A_k: a bilinear form x~^T M y~ of rank d, M = A_q A_k^T. Over
independent query and key rows its squared error E[(x~^T (M - M') y~)^2] is ||S_x (M - M') S_y||^2, S the
square roots of the inputs' second moments (uncentred, of [x, 1]; from the units' statistics), so the best
rank-r M' is the whitened SVD truncated. It is found per head from the d x d core of the SVDs of S_x A_q and
S_y A_k, and it is a mixing of the head's own columns: A_q' = A_q G_q, A_k' = A_k G_k (G: d x r). The
projections shrink from n x H d to n x H r, the Reshape that splits the heads reads r for d, and the score
MatMul contracts over r; the scale after it (1 / sqrt(d)) stays, as it was part of the scores. At r = d
the product is M again (exact). Values, the output projection and everything after the scores are untouched.

Found conservatively (`find_heads`): a query unit and a key unit, each a single MatMul / Gemm of one
matrix (bias in an Add or in the Gemm), its output only reshaped to [.., .., H or -1, d] (a constant shape,
or a Concat whose trailing inputs are constants) and only transposed (or scaled by a scalar constant) into
one MatMul, the query as [B, H, S, d] on its left, the key as [B, H, d, S] on its right. Rotary position
embeddings (LLaMA) mix dimensions in pairs between the projection and the scores: such heads are not
found. The allocation treats the two units as a pruned pair is (ranks.Coupling): both factorized as usual,
or both cut to r per head.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Self

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import known
from ..graph.layers import Layer, Unit
from ..observe.statistics import Moments
from . import linalg
from .contracts import Option
from .coupled import HEADS, channel_axis, constant_value, cuttable_bias, output_after_bias, own_node
from .menu import Coupling, UnitDecomposers

if TYPE_CHECKING:
    from ..graph.splice import Emitter

from ..graph.splice import Factorized

HEADS_METHODS = ("auto", HEADS)  # the --method values that offer it
QUERY_PERM, KEY_PERM = (0, 2, 1, 3), (0, 2, 3, 1)  # [B, S, H, d] to what the score MatMul multiplies
SCALING = ("Mul", "Div")  # by a scalar constant: commutes with the cut


@dataclass(frozen=True)
class HeadPair:
    """A query and a key unit meeting in one score MatMul, by unit key, with their heads' count and size."""

    query: str
    key: str
    heads: int
    dim: int


# ------------------------------------------------------------------------------------------- detection


def _only_user(tensor: gs.Tensor, outputs: set[str]) -> gs.Node | None:
    return tensor.outputs[0] if len(tensor.outputs) == 1 and tensor.name not in outputs else None


def head_shape(reshape: gs.Node, width: int) -> tuple[int, int] | None:
    """(H, d) when the Reshape's shape ends in [H or -1, d] with H d = width, the last two entries constants:
    a constant shape of 4 entries, or a Concat (axis 0) whose trailing inputs hold them."""
    shape = reshape.inputs[1]
    value = constant_value(shape)
    if value is not None:
        tail = [int(v) for v in value.reshape(-1)]
        if len(tail) != 4 or any(v == -1 for v in tail[:2]):
            return None
    else:
        node = shape.inputs[0] if len(shape.inputs) == 1 else None
        if node is None or node.op != "Concat" or node.attrs.get("axis", 0) not in (0, -1):
            return None
        tail = []
        for operand in reversed(node.inputs):
            value = constant_value(operand)
            if value is None:
                break
            tail = [int(v) for v in value.reshape(-1)] + tail
            if len(tail) >= 2:
                break
    if len(tail) < 2:
        return None
    heads, dim = tail[-2:]
    if dim <= 0 or width % dim or heads not in (-1, width // dim):
        return None
    return width // dim, dim


def _to_scores(start: gs.Node, outputs: set[str]) -> tuple[gs.Node, gs.Tensor, tuple[int, ...]] | None:
    """From the head-splitting Reshape through Transposes and scalar scalings to the next MatMul: that
    MatMul, the tensor it reads, and the axes of [B, S, H, d] in that tensor."""
    axes: tuple[int, ...] = (0, 1, 2, 3)
    tensor = start.outputs[0]
    while True:
        node = _only_user(tensor, outputs)
        if node is None:
            return None
        if node.op == "MatMul":
            return node, tensor, axes
        if node.op == "Transpose":
            perm = node.attrs.get("perm")
            if perm is None or sorted(perm) != [0, 1, 2, 3]:
                return None
            axes = tuple(axes[p] for p in perm)
        elif node.op not in SCALING or node.inputs[0] is not tensor or not _scalar(node.inputs[1]):
            return None
        tensor = node.outputs[0]


def _scalar(tensor: gs.Tensor) -> bool:
    value = constant_value(tensor)
    return value is not None and value.size == 1


def _split(unit: Unit, outputs: set[str]) -> tuple[int, int, gs.Node, int] | None:
    """(H, d, score MatMul, which of its inputs) when the unit is a query or key projection (see above)."""
    layer = unit.layers[0]
    if len(unit.layers) != 1 or channel_axis(layer, consuming=False) != "last" or not cuttable_bias(layer):
        return None
    if layer.bias is not None and layer.bias.value.size != unit.shape[0]:  # a bias broadcast over channels
        return None
    end = output_after_bias(layer)
    reshape = _only_user(end, outputs)
    if reshape is None or reshape.op != "Reshape" or reshape.inputs[0] is not end:
        return None
    found = head_shape(reshape, unit.shape[0])
    reached = _to_scores(reshape, outputs)
    if found is None or reached is None:
        return None
    scores, tensor, axes = reached
    side = [i for i, operand in enumerate(scores.inputs) if operand is tensor]
    if side == [0] and axes == QUERY_PERM or side == [1] and axes == KEY_PERM:
        return (*found, scores, side[0])
    return None


def find_heads(units: Sequence[Unit], outputs: set[str], taken: Collection[str] = ()) -> list[HeadPair]:
    """Every query / key pair whose heads can be cut (units in `taken`, e.g. pruned pairs', left out)."""
    sides: dict[int, dict[int, tuple[Unit, int, int]]] = {}
    for unit in units:
        found = None if unit.key in taken else _split(unit, outputs)
        if found is not None:
            heads, dim, scores, side = found
            sides.setdefault(id(scores), {})[side] = (unit, heads, dim)
    pairs = []
    for meeting in sides.values():
        if len(meeting) == 2:
            (query, heads, dim), (key, key_heads, key_dim) = meeting[0], meeting[1]
            if (heads, dim) == (key_heads, key_dim) and query.key != key.key:
                pairs.append(HeadPair(query.key, key.key, heads, dim))
    return pairs


# -------------------------------------------------------------------------------------- decomposition


def _augmented(layer: Layer) -> np.ndarray:
    """[W^T; b]: the layer's weight columns over its bias ((n+1) x out), zeros for a bias it lacks."""
    weight = np.asarray(layer.matrices, dtype=np.float64)[0]
    site = layer.bias
    bias = np.zeros(weight.shape[0]) if site is None else (site.value * site.scale).reshape(-1)
    return np.vstack([weight.T, bias[None]])


def _root(moments: Moments) -> np.ndarray:
    """A square root of the uncentred second moment of [x, 1] (the covariance shrunk where data are thin)."""
    covariance = linalg.shrunk(moments, moments.covariance * np.eye(moments.covariance.shape[1])[None])[0]
    mean = moments.mean[0]
    second = np.block([[covariance + np.outer(mean, mean), mean[:, None]], [mean[None], np.ones((1, 1))]])
    return linalg.sqrt_psd(second[None])[0]


def _mixing(whitened: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For S A = P D W^T: D W^T (what the core multiplies) and W D^+ (back to A's columns)."""
    _, values, right = np.linalg.svd(whitened, full_matrices=False)
    inverse = np.where(values > values.max(initial=0.0) * 1e-12, 1 / np.where(values > 0, values, 1), 0.0)
    return values[:, None] * right, right.T * inverse[None]


class HeadScores:
    """The key unit's side of a head pair: per r, both projections cut to r dimensions per head. Errors are
    the scores' relative squared error E[(x~^T (M - M') y~)^2] / E[(x~^T M y~)^2] over every head."""

    method = HEADS

    def __init__(self, query: Layer, key: Layer, query_moments: Moments, key_moments: Moments, pair: HeadPair):
        self.pair = pair
        self.query, self.key = query, key
        a_q, a_k = _augmented(query), _augmented(key)
        root_q, root_k = _root(query_moments), _root(key_moments)
        dim = pair.dim
        self._mix_q, self._mix_k = [], []  # per head: d x d, its columns in the order they are kept
        energies = []
        for head in range(pair.heads):
            columns = slice(head * dim, (head + 1) * dim)
            core_q, back_q = _mixing(root_q @ a_q[:, columns])
            core_k, back_k = _mixing(root_k @ a_k[:, columns])
            left, values, right = np.linalg.svd(core_q @ core_k.T)
            roots = np.sqrt(values)
            missing = dim - values.size  # a head wider than its input has rank n + 1 at most: zeros after
            self._mix_q.append(np.pad(back_q @ left * roots[None], ((0, 0), (0, missing))))
            self._mix_k.append(np.pad(back_k @ right.T * roots[None], ((0, 0), (0, missing))))
            energies.append(np.pad(values**2, (0, missing)))
        squares = np.array(energies)  # (H, d)
        total = float(squares.sum())
        left_out = squares.sum(axis=0)[::-1].cumsum()[::-1]  # per r: what heads lose keeping r
        self.errors = np.append(left_out, 0.0) / total if total > 0 else np.zeros(dim + 1)
        self._a = {"query": a_q, "key": a_k}

    def options(self) -> list[Option]:
        heads, dim, inputs = self.pair.heads, self.pair.dim, self.key.shape[2]
        return [Option(HEADS, (heads * r,), heads * r * inputs, float(self.errors[r])) for r in range(1, dim)]

    def factorize(self, config: tuple[int, ...]) -> HeadSide:
        return self.side("key", config)

    def side(self, which: str, config: tuple[int, ...]) -> HeadSide:
        """One projection (query or key) cut to config[0] / H dimensions per head."""
        heads, dim = self.pair.heads, self.pair.dim
        (columns,) = config
        if columns % heads or not 1 <= columns // heads <= dim:
            raise ValueError(f"{columns} columns is not 1..{dim} per head of {heads}")
        r = columns // heads
        mixes = self._mix_q if which == "query" else self._mix_k
        a = self._a[which]
        cut = np.hstack([a[:, h * dim:(h + 1) * dim] @ mixes[h][:, :r] for h in range(heads)])
        layer = self.query if which == "query" else self.key
        return HeadSide(HEADS, columns, cut[:-1].T[None], cut[-1], float(self.errors[r]) if which == "key" else 0.0,
                        layer.bias is not None, heads, dim, _augmented(layer)[-1],
                        self.pair.key if which == "query" else self.pair.query)


class QuerySide:
    """The query unit's side of a head pair; it offers nothing alone (ranks.Coupling chooses it)."""

    method = HEADS

    def __init__(self, scores: HeadScores):
        self._scores = scores

    def options(self) -> list[Option]:
        return []

    def factorize(self, config: tuple[int, ...]) -> HeadSide:
        return self._scores.side("query", config)


@dataclass(frozen=True)
class HeadSide:
    """A projection with r of its d dimensions per head: its own node with a narrower weight and bias, the
    Reshape after it splitting r per head."""

    method: str
    rank: int  # columns kept: H r
    matrices: np.ndarray  # (1, H r, n)
    bias: np.ndarray  # (H r,)
    predicted_error: float  # the pair's, on the key's side
    has_bias: bool
    heads: int
    dim: int
    original_bias: np.ndarray  # (H d,): what a probe's bias shift is taken from
    partner: str  # the other side's unit key: both are cut alike or neither

    @property
    def params(self) -> int:
        return int(self.matrices.size)

    @property
    def bias_shift(self) -> np.ndarray | None:
        """The padded bias (see same_op_weight) less the original, for a probe fed to the original model."""
        return (self._padded(self.bias[:, None])[:, 0] - self.original_bias)[None] if self.has_bias else None

    def _padded(self, rows: np.ndarray) -> np.ndarray:
        """Rows per head r, zeros to d: the original layout, whose dropped dimensions add nothing to a score."""
        r = self.rank // self.heads
        full = np.zeros((self.heads, self.dim, rows.shape[-1]), dtype=rows.dtype)
        full[:, :r] = rows.reshape(self.heads, r, -1)
        return full.reshape(self.heads * self.dim, -1)

    def in_float32(self) -> Self:
        return replace(self, matrices=self.matrices.astype(np.float32))

    def same_op_weight(self) -> np.ndarray:
        """The weight with zero rows for the dropped dimensions: with both sides fed so, the original model
        computes the cut scores (a probe feeds both)."""
        return self._padded(self.matrices[0])[None]

    def unmatched(self, key: str, factors: Mapping[str, Factorized]) -> str | None:
        """The partner must be cut to the same dimensions per head."""
        other = factors.get(self.partner)
        if not isinstance(other, HeadSide) or other.rank != self.rank:
            return f"unit {key} keeps {self.rank // self.heads} dimensions per head but {self.partner} does not"
        return None

    def emit(self, layer: Layer, emit: Emitter) -> None:
        rest = list(emit.inputs[2:])
        site = layer.bias
        if site is not None:
            bias = emit.weight("bias", (self.bias / site.scale).reshape(_bias_shape(site, self.rank)), like=site.weight)
            if site.node is layer.node:
                rest = [bias]
            else:
                site.node.inputs[site.index] = bias
        separate = site is not None and site.node is not layer.node
        reshape = (site.node.outputs[0] if separate else emit.outputs[0]).outputs[0]  # type: ignore[union-attr]
        own_node(layer, emit, self.matrices, rest)
        emit.outputs[0].shape = None  # narrower now, as is its bias Add's output
        if separate:
            site.node.outputs[0].shape = None  # type: ignore[union-attr]
        _narrow(reshape, self.rank // self.heads, emit)


def _bias_shape(site, width: int) -> list[int]:
    shape = list(site.value.shape) or [1]
    shape[site.channel_axis] = width
    return shape


def _narrow(reshape: gs.Node, r: int, emit: Emitter) -> None:
    """The Reshape splits r per head: its shape's last entry (a constant, or a Concat's last constant) is r."""
    shape = reshape.inputs[1]
    value = constant_value(shape)
    if value is not None:
        narrowed = value.reshape(-1).copy()
        narrowed[-1] = r
        reshape.inputs[1] = emit.constant("head_shape", narrowed.astype(value.dtype))
    else:
        concat = shape.inputs[0]
        last = known(constant_value(concat.inputs[-1]), "the head size in the Concat").reshape(-1).copy()
        last[-1] = r
        out = emit.variable("head_shape", dtype=np.int64)
        emit.node("head_shape", "Concat", [*concat.inputs[:-1], emit.constant("head_dim", last.astype(np.int64))],
                  [out], dict(concat.attrs))
        reshape.inputs[1] = out
    tensor = reshape.outputs[0]
    while tensor is not None:  # the inferred shapes down to the scores hold d
        tensor.shape = None
        users = tensor.outputs
        tensor = users[0].outputs[0] if len(users) == 1 and users[0].op != "MatMul" else None


# ---------------------------------------------------------------------------------- into the allocation


def couple_heads(pairs: Sequence[HeadPair], candidates: Sequence[UnitDecomposers], statistics: Sequence) -> None:
    """Offer each pair's cut on its key unit and hold the query's side on its query unit."""
    by_key = {candidate.unit.key: (position, candidate) for position, candidate in enumerate(candidates)}
    for pair in pairs:
        (q_at, query), (k_at, key) = by_key[pair.query], by_key[pair.key]
        moments = statistics[q_at], statistics[k_at]
        if not all(isinstance(m, Moments) and m.count for m in moments) or query.coupling or key.coupling:
            continue
        scores = HeadScores(query.unit.layers[0], key.unit.layers[0], *moments, pair)
        query.hold(QuerySide(scores))
        key.couple(scores, Coupling(HEADS, (query,)))


class AttentionHeads:
    """Attention heads as coupled units (coupled.Pairing): found at load, offered on the key's menu."""

    methods: tuple[str, ...] = HEADS_METHODS

    def find(self, units: Sequence[Unit], model: onnx.ModelProto, taken: Collection[str]) -> list[HeadPair]:
        return find_heads(units, {o.name for o in model.graph.output}, taken)

    def keys(self, pair: HeadPair) -> tuple[str, ...]:
        return (pair.query, pair.key)

    def couple(self, pairs: Sequence[HeadPair], candidates: Sequence[UnitDecomposers], statistics: Sequence,
               parking: Path | None) -> None:
        couple_heads(pairs, candidates, statistics)


ATTENTION_HEADS = AttentionHeads()
