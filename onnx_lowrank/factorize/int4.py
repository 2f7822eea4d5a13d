"""4-bit block-wise weights with a data-aware low-rank correction (`--quantize int4`), and 8-bit block-wise
weights beside them, as options of a MatMul's, a Gemm's or an embedding table's menu beside its
factorizations: the allocation mixes precisions per layer.

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
them (data_aware.row_weights: a share spread over every row, so rows never seen stay bounded).

8-bit blocks ("int8-wo", weight-only: activations stay float) cost twice the bytes of 4-bit ones and lose
about a sixteenth of their error; they need no correction (offered at rank 0).

An option's cost is its bytes in float-weight units (`params`: bytes over the bytes of one weight), so an
allocation that counts parameters counts bytes; its predicted error is the layer's relative output error
(data_aware.OutputError), comparable with every factorization's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Generic, Self, TypeVar

import numpy as np

from ..graph.layers import Layer
from ..graph.splice import Emitter
from ..observe.statistics import Counts, Moments, outer_products
from . import linalg
from .contracts import Option
from .data_aware import OutputError, row_weights

INT4 = "int4"
INT8_WEIGHT_ONLY = "int8-wo"
METHOD_BITS = {INT4: 4, INT8_WEIGHT_ONLY: 8}
BLOCK_SIZES = (32, 64, 128)
DEFAULT_BLOCK = 32  # SmolLM2-135M, ONNX Runtime's RTN: perplexity x1.35 at block 32, x1.57 at 128
CORRECTION_RANKS = (0, 8, 16, 32, 64)  # the correction ranks offered (those below a sixteenth of the smaller side)
ALTERNATIONS = 3  # rounding and correction fitted in turn this many times; the best fit is kept
MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class Blocks:
    """A (out x in) matrix rounded to `bits` in blocks along `in`: codes (out, blocks, block) in
    0..2^bits - 1, scales and zero points (out, blocks); `width` is `in` (the last block is padded with zeros)."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    width: int
    bits: int = 4

    @property
    def block(self) -> int:
        return int(self.codes.shape[2])

    def dequantized(self) -> np.ndarray:
        values = (self.codes.astype(np.float64) - self.zero_points[:, :, None]) * self.scales[:, :, None]
        return values.reshape(values.shape[0], -1)[:, : self.width]

    @property
    def nbytes(self) -> int:
        """What MatMulNBits stores: codes and zero points (two a byte at 4 bits), float32 scales."""
        return sum(array.nbytes for array in self.packed())

    def packed_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """GatherBlockQuantized's inputs: data (uint8 rows x width * bits / 8, unpadded), scales, zero points."""
        weights, scales, zero_points = self.packed()
        return weights.reshape(weights.shape[0], -1)[:, : self.width * self.bits // 8], scales, zero_points

    def packed(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """MatMulNBits' inputs B (uint8 out x blocks x block * bits / 8), scales (float32 out x blocks) and
        zero points (uint8 out x blocks, at 4 bits out x ceil(blocks / 2)); pairs of 4-bit values low nibble
        first."""
        codes, zero_points = self.codes.astype(np.uint8), self.zero_points.astype(np.uint8)
        if self.bits == 8:
            return codes, self.scales.astype(np.float32), zero_points
        weights = codes[:, :, 0::2] | (codes[:, :, 1::2] << 4)
        if zero_points.shape[1] % 2:
            zero_points = np.concatenate([zero_points, np.zeros_like(zero_points[:, :1])], axis=1)
        return weights, self.scales.astype(np.float32), zero_points[:, 0::2] | (zero_points[:, 1::2] << 4)


def rounded(matrix: np.ndarray, block: int, bits: int = 4) -> Blocks:
    """Round to nearest in blocks along the input dimension, each block's range mapped onto 0..2^bits - 1."""
    levels = 2**bits - 1
    out, width = matrix.shape
    padded = np.zeros((out, math.ceil(width / block) * block))
    padded[:, :width] = matrix
    blocks = padded.reshape(out, -1, block)
    low = np.minimum(blocks.min(axis=2), 0.0)
    high = np.maximum(blocks.max(axis=2), 0.0)
    scales = (high - low) / levels
    scales = np.where(scales > 0, scales, 1.0)
    zero_points = np.clip(np.round(-low / scales), 0, levels)
    codes = np.clip(np.round(blocks / scales[:, :, None]) + zero_points[:, :, None], 0, levels)
    return Blocks(codes.astype(np.uint8), scales, zero_points.astype(np.uint8), width, bits)


@dataclass(frozen=True)
class BlockWeights:
    """Blocks of 4 or 8 bits plus a rank-r correction A @ B (r may be 0): what both kinds of layer hold."""

    method: str
    rank: int
    blocks: Blocks
    correction_out: np.ndarray  # A
    correction_in: np.ndarray  # B
    predicted_error: float
    weight_bytes: int = 4  # bytes of one weight of the layer (the unit `params` counts in)

    @property
    def nbytes(self) -> int:
        raise NotImplementedError

    @property
    def params(self) -> int:
        """Bytes in float-weight units: what the allocation weighs against the layer's parameters."""
        return math.ceil(self.nbytes / self.weight_bytes)

    def _correction_bytes(self) -> int:
        return 4 * (self.correction_out.size + self.correction_in.size)

    def in_float32(self) -> Self:
        return replace(self, correction_out=self.correction_out.astype(np.float32),
                       correction_in=self.correction_in.astype(np.float32))

    @property
    def scheme(self) -> dict[str, int]:
        """What the report says of it: bits, block and the correction's rank."""
        return {"bits": self.blocks.bits, "block": self.blocks.block, "correction_rank": self.rank}

    def _approximation(self) -> np.ndarray:
        """Q + A B in the stored orientation."""
        return self.blocks.dequantized() + self.correction_out @ self.correction_in


@dataclass(frozen=True)
class BlockQuantized(BlockWeights):
    """A MatMul's weight W (out x in) as 4-bit blocks along `in`, A (out x r), B (r x in)."""

    bias_shift: np.ndarray | None = None  # (1, out): what the layer's bias gains (its affine optimum)

    @property
    def nbytes(self) -> int:
        return self.blocks.nbytes + self._correction_bytes()

    def same_op_weight(self) -> np.ndarray:
        """Q + A B as (1, out, in): the layer's own MatMul computes the same with it."""
        return self._approximation()[None]

    def emit(self, layer: Layer, emit: Emitter) -> None:
        """MatMulNBits(x) for Q, plus (x B^T) A^T beside it, added; the bias shift moves into the bias site
        (a Gemm's alpha, beta and C then applied as it did)."""
        weights, scales, zero_points = self.blocks.packed()
        out, width = self.correction_out.shape[0], self.blocks.width
        gemm = layer.node.op == "Gemm"
        product = emit.variable("product") if gemm else emit.outputs[0]
        quantized = emit.variable("q") if self.rank else product
        emit.node("q", "MatMulNBits", [emit.inputs[0], emit.constant("q_weight", weights),
                                       emit.constant("q_scales", scales), emit.constant("q_zero_points", zero_points)],
                  [quantized], {"K": width, "N": out, "bits": self.blocks.bits, "block_size": self.blocks.block},
                  domain=MS_DOMAIN)
        if self.rank:
            middle = emit.variable("c_mid")
            emit.node("c_in", "MatMul", [emit.inputs[0], emit.weight("c_in", self.correction_in.T)], [middle])
            _add_correction(emit, quantized, "MatMul", [middle, emit.weight("c_out", self.correction_out.T)],
                            [product])
        if gemm:
            _gemm_tail(layer, emit, product, self.bias_shift)
        elif self.bias_shift is not None and layer.bias is not None:
            site = layer.bias
            site.node.inputs[site.index] = emit.bias(site, self.bias_shift)


def _gemm_tail(layer: Layer, emit: Emitter, product, bias_shift: np.ndarray | None) -> None:
    """alpha * product + beta * C, C moved by the bias shift (its site's scale is beta / alpha)."""
    attrs = layer.node.attrs
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    c = list(emit.inputs[2:3])
    if bias_shift is not None and layer.bias is not None:
        c = [emit.bias(layer.bias, bias_shift)]
    scaled = product
    if alpha != 1.0:
        scaled = emit.variable("scaled") if c and beta != 0.0 else emit.outputs[0]
        emit.node("alpha", "Mul", [product, emit.constant("alpha", np.asarray(alpha, np.float32))], [scaled])
    if not c or beta == 0.0:
        if scaled is product:
            emit.node("out", "Identity", [product], emit.outputs)
        return
    bias = c[0]
    if beta != 1.0:
        bias = emit.variable("beta_c")
        emit.node("beta", "Mul", [c[0], emit.constant("beta", np.asarray(beta, np.float32))], [bias])
    emit.node("bias", "Add", [scaled, bias], emit.outputs)


@dataclass(frozen=True)
class BlockQuantizedTable(BlockWeights):
    """An embedding table (V x d) as 4-bit blocks along its rows, A (V x r) looked up, B (r x d)."""

    bias_shift: None = None  # a lookup has no bias

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for array in self.blocks.packed_rows()) + self._correction_bytes()

    def same_op_weight(self) -> np.ndarray:
        """The table's matrix view (1, d, V) of Q + A B: the layer's own Gather computes the same with it."""
        return self._approximation().T[None]

    def emit(self, layer: Layer, emit: Emitter) -> None:
        """GatherBlockQuantized(indices) for Q, plus Gather(A, indices) @ B beside it, added."""
        data, scales, zero_points = self.blocks.packed_rows()
        quantized = emit.variable("q") if self.rank else emit.outputs[0]
        emit.node("q", "GatherBlockQuantized", [emit.constant("q_data", data), emit.inputs[1],
                                                emit.constant("q_scales", scales),
                                                emit.constant("q_zero_points", zero_points)],
                  [quantized], {"gather_axis": 0, "quantize_axis": 1, "block_size": self.blocks.block,
                                "bits": self.blocks.bits}, domain=MS_DOMAIN)
        if self.rank:
            looked_up = emit.variable("c_mid")
            emit.node("c_in", "Gather", [emit.weight("c_in", self.correction_out), emit.inputs[1]], [looked_up],
                      {"axis": 0})
            _add_correction(emit, quantized, "MatMul", [looked_up, emit.weight("c_out", self.correction_in)],
                            emit.outputs)


def _add_correction(emit: Emitter, quantized, op: str, inputs: list, outputs: list) -> None:
    """The correction's last product, added to the quantized layer's output into `outputs`."""
    corrected = emit.variable("c")
    emit.node("c_out", op, inputs, [corrected])
    emit.node("add", "Add", [quantized, corrected], outputs)


FitT = TypeVar("FitT", BlockQuantized, BlockQuantizedTable)


class _BlockOptions(Generic[FitT]):
    """A unit's int4 options: 4-bit blocks with each correction rank on offer, rounding and correction
    fitted in turn (ALTERNATIONS times) and the fit with the least predicted error kept."""

    def __init__(self, matrix: np.ndarray, block: int, weight_bytes: int, method: str):
        self.method = method  # INT4 or INT8_WEIGHT_ONLY
        self._bits = METHOD_BITS[method]
        self._matrix = matrix  # the stored orientation: a MatMul's W (out x in), a table (V x d)
        self._block = block
        self._weight_bytes = weight_bytes
        self._fits: dict[int, FitT] = {}

    def options(self) -> list[Option]:
        return [Option(self.method, (rank,), fit.params, fit.predicted_error) for rank, fit in
                ((rank, self._fit(rank)) for rank in self.ranks())]

    def ranks(self) -> list[int]:
        """The correction ranks on offer: up to a sixteenth of the smaller side at 4 bits, none at 8."""
        limit = min(self._matrix.shape) // 16 if self._bits == 4 else 0
        return [rank for rank in CORRECTION_RANKS if rank <= limit]

    def factorize(self, config: tuple[int, ...]) -> FitT:
        if config[0] not in self.ranks():
            raise ValueError(f"{self.method} offers correction ranks {self.ranks()}, not {config[0]}")
        return self._fit(config[0])

    def _fit(self, rank: int) -> FitT:
        if rank not in self._fits:
            matrix, fits = self._matrix, []
            correction = (np.zeros((matrix.shape[0], 0)), np.zeros((0, matrix.shape[1])))
            for _ in range(ALTERNATIONS if rank else 1):
                blocks = rounded(matrix - correction[0] @ correction[1], self._block, self._bits)
                correction = self._correction(matrix - blocks.dequantized(), rank) if rank else correction
                fits.append(self._made(rank, blocks, correction))
            self._fits[rank] = min(fits, key=lambda fit: fit.predicted_error)
        return self._fits[rank]

    def _correction(self, residual: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _made(self, rank: int, blocks: Blocks, correction: tuple[np.ndarray, np.ndarray]) -> FitT:
        raise NotImplementedError


class BlocksDecomposer(_BlockOptions[BlockQuantized]):
    """A MatMul unit's int4 options, the correction fitted against the layer's input statistics (its
    weight alone without them)."""

    def __init__(self, layer: Layer, moments: Moments | None, block: int = DEFAULT_BLOCK, method: str = INT4):
        weight = np.asarray(layer.matrices, dtype=np.float64)[0]  # (out, in)
        super().__init__(weight, block, int(np.dtype(layer.weight.storage_dtype).itemsize), method)
        self._error = OutputError(layer, moments)
        self._root = None if moments is None else linalg.sqrt_psd(
            linalg.shrunk(moments, np.eye(weight.shape[1])[None]) + outer_products(moments.mean))[0]

    def _correction(self, residual: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """The best rank-r A, B for the residual under the input statistics: A = U_r, B = U_r^T R."""
        weighted = residual if self._root is None else residual @ self._root
        left = np.linalg.svd(weighted, full_matrices=False)[0][:, :rank]
        return left, left.T @ residual

    def _made(self, rank: int, blocks: Blocks, correction: tuple[np.ndarray, np.ndarray]) -> BlockQuantized:
        approx = (blocks.dequantized() + correction[0] @ correction[1])[None]
        return BlockQuantized(self.method, rank, blocks, *correction, predicted_error=self._error(approx),
                             weight_bytes=self._weight_bytes, bias_shift=self._error.bias_shift(approx))


class TableBlocksDecomposer(_BlockOptions[BlockQuantizedTable]):
    """An embedding table's int4 options, its rows weighted by their lookup counts (the frequency-weighted
    SVD's weights; uniform without counts)."""

    def __init__(self, layer: Layer, counts: Counts | None, block: int = DEFAULT_BLOCK, method: str = INT4):
        table = np.asarray(layer.matrices, dtype=np.float64)[0].T  # (V, d)
        super().__init__(table, block, int(np.dtype(layer.weight.storage_dtype).itemsize), method)
        self._rows = row_weights(counts, table.shape[0])
        self._total = float(np.sum(self._rows[:, None] * table**2))

    def _correction(self, residual: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """The best rank-r A, B for the residual with its rows weighted: min ||D (R - A B)||, D = diag(sqrt w)."""
        roots = np.sqrt(self._rows)[:, None]
        u, s, vt = np.linalg.svd(roots * residual, full_matrices=False)
        return u[:, :rank] * s[:rank] / roots, vt[:rank]

    def _made(self, rank: int, blocks: Blocks, correction: tuple[np.ndarray, np.ndarray]) -> BlockQuantizedTable:
        left = self._matrix - blocks.dequantized() - correction[0] @ correction[1]
        error = float(np.sum(self._rows[:, None] * left**2) / self._total) if self._total > 0 else 0.0
        return BlockQuantizedTable(self.method, rank, blocks, *correction, predicted_error=error,
                                   weight_bytes=self._weight_bytes)


def offers_int4_table(layer: Layer, statistics: object) -> bool:
    """Int4 rows replace a Gather on a float32 table (along its rows) of even width; not a tied table."""
    return (layer.node.op == "Gather" and not layer.transposed and layer.weight.storage_dtype == np.float32
            and layer.weight.shape[1] % 2 == 0 and (statistics is None or isinstance(statistics, Counts)))


def offers_int4(layer: Layer, statistics: object, side: str) -> bool:
    """Int4 blocks replace a MatMul x @ W, or a Gemm x @ B' (transA 0), with a 2-D float32 weight
    (MatMulNBits' layout), whose input's moments (the correction's weighting) are known, or no statistics
    at all; not the head of a tied table."""
    op, info = layer.node.op, layer.info
    shaped = (op == "MatMul" and info["side"] == "right" and not info["batch"]) or (
        op == "Gemm" and info["side"] == "B" and not layer.node.attrs.get("transA", 0))
    return (shaped and not layer.transposed and layer.weight.storage_dtype == np.float32
            and (statistics is None or (isinstance(statistics, Moments) and side == "input")))
