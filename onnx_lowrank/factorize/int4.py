"""4-bit block-wise weights with a data-aware low-rank correction (`--quantize int4`), as options of a
MatMul's or an embedding table's menu beside its factorizations.

A layer y = W x (W: out x in) becomes y = Q(x) + (x B^T) A^T: Q is W rounded to 4 bits in blocks of
`block` weights along the input dimension, each block with its own scale and zero point (asymmetric,
round to nearest), stored and run as ONNX Runtime's MatMulNBits (com.microsoft); A B (rank r) corrects
what the rounding lost, fitted as the data-aware SVD fits a factorization: the best rank-r approximation
of the residual R = W - Q under the layer's input statistics, min ||(R - A B) S|| with S S^T = E[x x^T]
(A = U_r, B = U_r^T R, U from the SVD of R S: no inverse, rank-deficient statistics are harmless).
Rounding and correction are alternated (Q from W - A B, then A B from W - Q) and the best fit kept: the
correction absorbs what rounding the rest loses (ZeroQuant-V2's LoRC, LQER, QERA).

An embedding table (Gather) is rounded alike, in blocks along each row, stored and looked up as
GatherBlockQuantized (com.microsoft), its correction a factorized table beside it (Gather on A, MatMul by
B); its rows are weighted by how often calibration looked them up, as the frequency-weighted SVD weighs
them (a share spread over every row, so rows never seen stay bounded).

An option's cost is its bytes in float-weight units (`params`: bytes over the bytes of one weight), so an
allocation that counts parameters counts bytes; its predicted error is the layer's relative output error
(data_aware.OutputError), comparable with every factorization's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Self

import numpy as np

from ..errors import known
from ..graph.layers import Layer
from ..graph.splice import Emitter
from ..observe.statistics import Counts, Moments, outer_products
from . import linalg
from .contracts import Option
from .data_aware import FrequencyWeightedSVD, OutputError

INT4 = "int4"
BITS = 4
LEVELS = 2**BITS - 1
BLOCK_SIZES = (32, 64, 128)
DEFAULT_BLOCK = 32  # SmolLM2-135M, ONNX Runtime's RTN: perplexity x1.35 at block 32, x1.57 at 128
CORRECTION_RANKS = (0, 8, 16, 32, 64)  # the correction ranks offered (those below a sixteenth of the smaller side)
ALTERNATIONS = 3  # rounding and correction fitted in turn this many times; the best fit is kept
MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class Blocks:
    """A (out x in) matrix rounded to 4 bits in blocks along `in`: codes (out, blocks, block) in 0..15,
    scales and zero points (out, blocks); `width` is `in` (the last block is padded with zeros)."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    width: int

    @property
    def block(self) -> int:
        return int(self.codes.shape[2])

    def dequantized(self) -> np.ndarray:
        values = (self.codes.astype(np.float64) - self.zero_points[:, :, None]) * self.scales[:, :, None]
        return values.reshape(values.shape[0], -1)[:, : self.width]

    @property
    def nbytes(self) -> int:
        """What MatMulNBits stores: packed codes and zero points (two a byte), float32 scales."""
        out, blocks, block = self.codes.shape
        return out * blocks * block // 2 + out * math.ceil(blocks / 2) + 4 * out * blocks

    def packed_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """GatherBlockQuantized's inputs: data (uint8 rows x width/2, unpadded), scales, zero points."""
        weights, scales, zero_points = self.packed()
        return weights.reshape(weights.shape[0], -1)[:, : self.width // 2], scales, zero_points

    def packed(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """MatMulNBits' inputs B (uint8 out x blocks x block/2), scales (float32 out x blocks) and zero points
        (uint8 out x ceil(blocks/2)), each pair of 4-bit values low nibble first."""
        codes = self.codes.astype(np.uint8)
        weights = codes[:, :, 0::2] | (codes[:, :, 1::2] << 4)
        zero_points = self.zero_points.astype(np.uint8)
        if zero_points.shape[1] % 2:
            zero_points = np.concatenate([zero_points, np.zeros_like(zero_points[:, :1])], axis=1)
        return weights, self.scales.astype(np.float32), zero_points[:, 0::2] | (zero_points[:, 1::2] << 4)


def rounded(matrix: np.ndarray, block: int) -> Blocks:
    """Round to nearest in blocks along the input dimension, each block's range mapped onto 0..15."""
    out, width = matrix.shape
    padded = np.zeros((out, math.ceil(width / block) * block))
    padded[:, :width] = matrix
    blocks = padded.reshape(out, -1, block)
    low = np.minimum(blocks.min(axis=2), 0.0)
    high = np.maximum(blocks.max(axis=2), 0.0)
    scales = (high - low) / LEVELS
    scales = np.where(scales > 0, scales, 1.0)
    zero_points = np.clip(np.round(-low / scales), 0, LEVELS)
    codes = np.clip(np.round(blocks / scales[:, :, None]) + zero_points[:, :, None], 0, LEVELS)
    return Blocks(codes.astype(np.uint8), scales, zero_points.astype(np.uint8), width)


@dataclass(frozen=True)
class Int4Corrected:
    """A layer's weight as 4-bit blocks plus a rank-r correction A (out x r) @ B (r x in) (r may be 0)."""

    method: str
    rank: int
    blocks: Blocks
    correction_out: np.ndarray  # A: (out, r)
    correction_in: np.ndarray  # B: (r, in)
    predicted_error: float
    bias_shift: np.ndarray | None = None  # (1, out): what the layer's bias gains (its affine optimum)
    weight_bytes: int = 4  # bytes of one weight of the layer (the unit `params` counts in)

    @property
    def nbytes(self) -> int:
        return self.blocks.nbytes + 4 * (self.correction_out.size + self.correction_in.size)

    @property
    def params(self) -> int:
        """Bytes in float-weight units: what the allocation weighs against the layer's parameters."""
        return math.ceil(self.nbytes / self.weight_bytes)

    def in_float32(self) -> Self:
        return replace(self, correction_out=self.correction_out.astype(np.float32),
                       correction_in=self.correction_in.astype(np.float32))

    def same_op_weight(self) -> np.ndarray:
        """Q + A B as (1, out, in): the layer's own MatMul computes the same with it."""
        return (self.blocks.dequantized() + self.correction_out @ self.correction_in)[None]

    def emit(self, layer: Layer, emit: Emitter) -> None:
        """MatMulNBits(x) for Q, plus (x B^T) A^T beside it, added; the bias shift moves into the bias site."""
        weights, scales, zero_points = self.blocks.packed()
        out, width = self.correction_out.shape[0], self.blocks.width
        quantized = emit.variable("q") if self.rank else emit.outputs[0]
        emit.node("q", "MatMulNBits", [emit.inputs[0], emit.constant("q_weight", weights),
                                       emit.constant("q_scales", scales), emit.constant("q_zero_points", zero_points)],
                  [quantized], {"K": width, "N": out, "bits": BITS, "block_size": self.blocks.block},
                  domain=MS_DOMAIN)
        if self.rank:
            middle, corrected = emit.variable("c_mid"), emit.variable("c")
            emit.node("c_in", "MatMul", [emit.inputs[0], emit.weight("c_in", self.correction_in.T)], [middle])
            emit.node("c_out", "MatMul", [middle, emit.weight("c_out", self.correction_out.T)], [corrected])
            emit.node("add", "Add", [quantized, corrected], emit.outputs)
        if self.bias_shift is not None and layer.bias is not None:
            site = layer.bias
            site.node.inputs[site.index] = emit.bias(site, self.bias_shift)


@dataclass(frozen=True)
class Int4Lookup:
    """An embedding table (V x d) as 4-bit blocks along its rows plus a rank-r correction A (V x r) @ B (r x d)."""

    method: str
    rank: int
    blocks: Blocks  # rows: the table's
    correction_out: np.ndarray  # A: (V, r), looked up
    correction_in: np.ndarray  # B: (r, d)
    predicted_error: float
    weight_bytes: int = 4
    bias_shift: None = None  # a lookup has no bias

    @property
    def nbytes(self) -> int:
        data, scales, zero_points = self.blocks.packed_rows()
        return data.nbytes + scales.nbytes + zero_points.nbytes + 4 * (self.correction_out.size + self.correction_in.size)

    @property
    def params(self) -> int:
        return math.ceil(self.nbytes / self.weight_bytes)

    def in_float32(self) -> Self:
        return replace(self, correction_out=self.correction_out.astype(np.float32),
                       correction_in=self.correction_in.astype(np.float32))

    def same_op_weight(self) -> np.ndarray:
        """The table's matrix view (1, d, V) of Q + A B: the layer's own Gather computes the same with it."""
        return (self.blocks.dequantized() + self.correction_out @ self.correction_in).T[None]

    def emit(self, layer: Layer, emit: Emitter) -> None:
        """GatherBlockQuantized(indices) for Q, plus Gather(A, indices) @ B beside it, added."""
        data, scales, zero_points = self.blocks.packed_rows()
        quantized = emit.variable("q") if self.rank else emit.outputs[0]
        emit.node("q", "GatherBlockQuantized", [emit.constant("q_data", data), emit.inputs[1],
                                                emit.constant("q_scales", scales),
                                                emit.constant("q_zero_points", zero_points)],
                  [quantized], {"gather_axis": 0, "quantize_axis": 1, "block_size": self.blocks.block,
                                "bits": BITS}, domain=MS_DOMAIN)
        if self.rank:
            looked_up, corrected = emit.variable("c_mid"), emit.variable("c")
            emit.node("c_in", "Gather", [emit.weight("c_in", self.correction_out), emit.inputs[1]], [looked_up],
                      {"axis": 0})
            emit.node("c_out", "MatMul", [looked_up, emit.weight("c_out", self.correction_in)], [corrected])
            emit.node("add", "Add", [quantized, corrected], emit.outputs)


class Int4TableDecomposer:
    """An embedding table's int4 options: rows in 4-bit blocks with each correction rank on offer, the
    rows weighted by their lookup counts (the frequency-weighted SVD's weights; uniform without counts)."""

    method = INT4

    def __init__(self, layer: Layer, counts: Counts | None, block: int = DEFAULT_BLOCK):
        self._table = np.asarray(layer.matrices, dtype=np.float64)[0].T  # (V, d)
        self._block = block
        self._rows = row_weights(counts, self._table.shape[0])
        self._total = float(np.sum(self._rows[:, None] * self._table**2))
        self._weight_bytes = int(np.dtype(layer.weight.storage_dtype).itemsize)
        self._fits: dict[int, Int4Lookup] = {}

    def options(self) -> list[Option]:
        return [Option(INT4, (rank,), fit.params, fit.predicted_error) for rank, fit in
                ((rank, self._fit(rank)) for rank in self.ranks())]

    def ranks(self) -> list[int]:
        limit = min(self._table.shape) // 16
        return [rank for rank in CORRECTION_RANKS if rank <= limit]

    def factorize(self, config: tuple[int, ...]) -> Int4Lookup:
        if config[0] not in self.ranks():
            raise ValueError(f"int4 offers correction ranks {self.ranks()}, not {config[0]}")
        return self._fit(config[0])

    def _fit(self, rank: int) -> Int4Lookup:
        """Rounding and correction in turn, the fit with the least weighted row error kept."""
        if rank not in self._fits:
            table, roots, best = self._table, np.sqrt(self._rows)[:, None], None
            correction = (np.zeros((table.shape[0], 0)), np.zeros((0, table.shape[1])))
            for _ in range(ALTERNATIONS if rank else 1):
                blocks = rounded(table - correction[0] @ correction[1], self._block)
                residual = table - blocks.dequantized()
                if rank:
                    u, s, vt = np.linalg.svd(roots * residual, full_matrices=False)
                    correction = (u[:, :rank] * s[:rank] / roots, vt[:rank])
                left = residual - correction[0] @ correction[1]
                error = float(np.sum(self._rows[:, None] * left**2) / self._total) if self._total > 0 else 0.0
                if best is None or error < best.predicted_error:
                    best = Int4Lookup(INT4, rank, blocks, *correction, error, self._weight_bytes)
            self._fits[rank] = known(best, "an int4 fit")
        return self._fits[rank]


def row_weights(counts: Counts | None, rows: int) -> np.ndarray:
    """How much each table row weighs: its lookup frequency with a share spread over every row
    (FrequencyWeightedSVD's weights), uniform without counts."""
    uniform = np.full(rows, 1.0 / rows)
    if counts is None or not counts.count.sum():
        return uniform
    share = FrequencyWeightedSVD.UNSEEN_SHARE
    return (1 - share) * counts.count / counts.count.sum() + share * uniform


def offers_int4_table(layer: Layer, statistics: object) -> bool:
    """Int4 rows replace a Gather on a float32 table (along its rows) of even width; not a tied table."""
    return (layer.node.op == "Gather" and not layer.transposed and layer.weight.storage_dtype == np.float32
            and layer.weight.shape[1] % 2 == 0 and (statistics is None or isinstance(statistics, Counts)))


def offers_int4(layer: Layer, statistics: object, side: str) -> bool:
    """Int4 blocks replace a MatMul x @ W with a 2-D float32 weight (MatMulNBits' layout), whose input's
    moments (the correction's weighting) are known, or no statistics at all; not the head of a tied table."""
    return (layer.node.op == "MatMul" and layer.info["side"] == "right" and not layer.info["batch"]
            and not layer.transposed and layer.weight.storage_dtype == np.float32
            and (statistics is None or (isinstance(statistics, Moments) and side == "input")))


class Int4Decomposer:
    """A MatMul unit's int4 options: 4-bit blocks of `block` weights with each correction rank on offer,
    fitted against the layer's input statistics (its weight alone without them)."""

    method = INT4

    def __init__(self, layer: Layer, moments: Moments | None, block: int = DEFAULT_BLOCK):
        self._weight = np.asarray(layer.matrices, dtype=np.float64)[0]  # (out, in)
        self._block = block
        self._error = OutputError(layer, moments)
        self._root = None if moments is None else linalg.sqrt_psd(
            linalg.shrunk(moments, np.eye(self._weight.shape[1])[None]) + outer_products(moments.mean))[0]
        self._weight_bytes = int(np.dtype(layer.weight.storage_dtype).itemsize)
        self._fits: dict[int, Int4Corrected] = {}

    def options(self) -> list[Option]:
        return [Option(INT4, (rank,), fit.params, fit.predicted_error) for rank, fit in
                ((rank, self._fit(rank)) for rank in self.ranks())]

    def ranks(self) -> list[int]:
        limit = min(self._weight.shape) // 16
        return [rank for rank in CORRECTION_RANKS if rank <= limit]

    def factorize(self, config: tuple[int, ...]) -> Int4Corrected:
        if config[0] not in self.ranks():
            raise ValueError(f"int4 offers correction ranks {self.ranks()}, not {config[0]}")
        return self._fit(config[0])

    def _fit(self, rank: int) -> Int4Corrected:
        """Rounding and correction in turn (ALTERNATIONS times), the fit with the least output error kept."""
        if rank not in self._fits:
            weight = self._weight
            best_fit: Int4Corrected | None = None
            correction = (np.zeros((weight.shape[0], 0)), np.zeros((0, weight.shape[1])))
            for _ in range(ALTERNATIONS if rank else 1):
                blocks = rounded(weight - correction[0] @ correction[1], self._block)
                correction = self._correction(weight - blocks.dequantized(), rank)
                approx = blocks.dequantized() + correction[0] @ correction[1]
                fit = Int4Corrected(INT4, rank, blocks, *correction, self._error(approx[None]),
                                    self._error.bias_shift(approx[None]), self._weight_bytes)
                if best_fit is None or fit.predicted_error < best_fit.predicted_error:
                    best_fit = fit
            self._fits[rank] = known(best_fit, "an int4 fit")
        return self._fits[rank]

    def _correction(self, residual: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """The best rank-r A, B for the residual under the input statistics: A = U_r, B = U_r^T R."""
        if rank == 0:
            return np.zeros((residual.shape[0], 0)), np.zeros((0, residual.shape[1]))
        weighted = residual if self._root is None else residual @ self._root
        left = np.linalg.svd(weighted, full_matrices=False)[0][:, :rank]
        return left, left.T @ residual
