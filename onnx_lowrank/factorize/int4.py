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
them (data_aware.row_weights: a share spread over every row, so rows never seen stay bounded). A table
that is also the LM head (logits = h @ table^T) stays one stored table: the head runs MatMulNBits on the
very bytes, scales and zero points GatherBlockQuantized looks up (reshaped to its blocks), its correction
the lookup's two factors transposed; its fit weighs the d side as the tied SVD does (data_aware.tied_metric).

8-bit blocks ("int8-wo", weight-only: activations stay float) cost twice the bytes of 4-bit ones and lose
about a sixteenth of their error; they need no correction (offered at rank 0). "int8-dyn" is int8 dynamic
quantization of a MatMul: the same 8-bit blocks run with int8 activations (MatMulNBits' accuracy_level 4:
each row's activations rounded per block to int8 at run time, an integer kernel with VNNI or AMX), its
scales float32 (ONNX Runtime 1.32 reads level 4's scales wrong through a Cast). It costs a little more
than int8-wo and loses more, so only speed can choose it (the latency gate times it); its predicted error
adds what rounding the activations loses: per block a step of max|x| / 127, max|x| taken as the block's
largest |mean| plus sqrt(2 ln 2n) of its largest deviation (n the block's size: a Gaussian's expected
maximum), spread through the weight's columns.

A MatMul's correction is also offered in 8 bits (config (rank, block, 8)): B rounded to 8-bit blocks along
the input, A refitted to the rounded B under the input statistics, then rounded along r, the two run as
MatMulNBits; about half the bytes of the float16 factors, at a predicted error the menu weighs as any other.
A table's (not tied: its head would read A and B transposed) likewise at ranks of whole blocks: A's rows
rounded along r and looked up by GatherBlockQuantized, B refitted under the row weights, B^T rounded for
MatMulNBits.

Each layer is offered every block size (32, 64, 128: larger blocks store fewer scales and lose more), or
the one `--block-size` names. Scales and the correction's factors are stored in float16 where every value
fits its range, and cast to float32 in the graph (ONNX Runtime folds the casts when it loads the model):
predictions use the stored values.

An option's cost is its bytes in float-weight units (`params`: bytes over the bytes of one weight), so an
allocation that counts parameters counts bytes; its predicted error is the layer's relative output error
(data_aware.OutputError), comparable with every factorization's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Generic, Self, TypeVar

import numpy as np
import onnx

from ..errors import known
from ..graph.layers import Layer, Unit
from ..graph.splice import Emitter
from ..observe.statistics import Counts, Moments, Tied, outer_products
from . import linalg
from .contracts import Option
from .data_aware import OutputError, row_weights, tied_metric
from .gptq import gptq, inverse_cholesky, stored_scales

INT4 = "int4"
INT8_WEIGHT_ONLY = "int8-wo"
INT8_DYNAMIC = "int8-dyn"
METHOD_BITS = {INT4: 4, INT8_WEIGHT_ONLY: 8, INT8_DYNAMIC: 8}
TABLE_METHODS = (INT4, INT8_WEIGHT_ONLY)  # a lookup has no activations to quantize
INT8_ACTIVATIONS = 4  # MatMulNBits' accuracy_level that quantizes its activations to int8 (int8-dyn)
BLOCK_SIZES = (32, 64, 128)
CORRECTION_RANKS = (0, 8, 16, 32, 64)  # the correction ranks offered (those below a sixteenth of the smaller side)
CORRECTION_BITS = 8  # a MatMul's correction is also offered with its factors in 8-bit blocks
CORRECTION_BLOCK = 32  # of those blocks along the input (along r: 16 for ranks up to 16)
HALF = np.float16  # how scales and correction factors are stored where their values fit
SHRINKS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)  # 4-bit block ranges tried (rounded())
ALTERNATIONS = 3  # rounding and correction fitted in turn this many times (the best rounding); the best fit is kept
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
        """What MatMulNBits stores: codes and zero points (two a byte at 4 bits), scales as stored."""
        return sum(array.nbytes for array in self.packed())

    def packed_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """GatherBlockQuantized's inputs: data (uint8 rows x width * bits / 8, unpadded), scales, zero points."""
        weights, scales, zero_points = self.packed()
        return weights.reshape(weights.shape[0], -1)[:, : self.width * self.bits // 8], scales, zero_points

    def packed(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """MatMulNBits' inputs B (uint8 out x blocks x block * bits / 8), scales (float32 out x blocks) and
        zero points (uint8 out x blocks, at 4 bits out x ceil(blocks / 2)); pairs of 4-bit values low nibble
        first. Scales are float16 where rounded() could keep them so (cast to float32 in the graph)."""
        codes, zero_points = self.codes.astype(np.uint8), self.zero_points.astype(np.uint8)
        scales = self.scales if self.scales.dtype == HALF else self.scales.astype(np.float32)
        if self.bits == 8:
            return codes, scales, zero_points
        weights = codes[:, :, 0::2] | (codes[:, :, 1::2] << 4)
        if zero_points.shape[1] % 2:
            zero_points = np.concatenate([zero_points, np.zeros_like(zero_points[:, :1])], axis=1)
        return weights, scales, zero_points[:, 0::2] | (zero_points[:, 1::2] << 4)


def rounded(matrix: np.ndarray, block: int, bits: int = 4, importance: np.ndarray | None = None,
            shrinks: Sequence[float] | None = None) -> Blocks:
    """Round to nearest in blocks along the input dimension, each block's range mapped onto 0..2^bits - 1.

    Activation-aware: each block's range is also tried shrunk by each of `shrinks` (the values beyond it
    clipped, the rest on a finer grid) and the range that loses least is kept, its loss weighted by
    `importance` (in,): how much each input column counts, the diagonal of the layer's input second moment
    (uniform when None). Shrink 1 is plain round-to-nearest, so no block loses more than it would. Every
    candidate uses its scales as stored (gptq.stored_scales: float16 where that fits, rounded up).
    """
    levels = 2**bits - 1
    out, width = matrix.shape
    padded = np.zeros((out, math.ceil(width / block) * block))
    padded[:, :width] = matrix
    blocks = padded.reshape(out, -1, block)
    weights = np.zeros(padded.shape[1])
    weights[:width] = 1.0 if importance is None else importance
    weights = weights.reshape(-1, block)  # (blocks, block)
    low = np.minimum(blocks.min(axis=2), 0.0)
    high = np.maximum(blocks.max(axis=2), 0.0)
    best_shrink, best_loss = np.ones(low.shape), np.full(low.shape, np.inf)
    for shrink in (SHRINKS if bits == 4 else (1.0,)) if shrinks is None else shrinks:
        codes, scales, zero_points = _on_grid(blocks, low * shrink, high * shrink, levels)
        lost = np.sum(weights * (blocks - (codes - zero_points[:, :, None]) * scales[:, :, None]) ** 2, axis=2)
        better = lost < best_loss
        best_shrink, best_loss = np.where(better, shrink, best_shrink), np.where(better, lost, best_loss)
    codes, scales, zero_points = _on_grid(blocks, low * best_shrink, high * best_shrink, levels)
    return _blocks(codes, scales, zero_points, width, bits)


def rounded_gptq(matrix: np.ndarray, block: int, bits: int, inverse_root: np.ndarray) -> Blocks:
    """GPTQ's rounding against the input second moment (gptq.py: `inverse_root` from inverse_cholesky), as
    Blocks."""
    codes, scales, zero_points = gptq(matrix, inverse_root, block, bits)
    return _blocks(codes, scales, zero_points, matrix.shape[1], bits)


def rank_block(rank: int) -> int:
    """The blocks along r of an 8-bit factor (MatMulNBits' smallest block is 16)."""
    return 16 if rank <= 16 else CORRECTION_BLOCK


def _blocks(codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, width: int, bits: int) -> Blocks:
    """Blocks with their scales as stored (stored_scales rounded them to float16 or float32 values)."""
    return Blocks(codes.astype(np.uint8), _as_stored(scales), zero_points.astype(np.uint8), width, bits)


def _on_grid(blocks: np.ndarray, low: np.ndarray, high: np.ndarray, levels: int) -> tuple:
    """Codes, scales (as stored: stored_scales) and zero points of blocks (out, blocks, block) on the grid
    spanning low..high."""
    scales = stored_scales((high - low) / levels)
    zero_points = np.clip(np.round(-low / scales), 0, levels)
    codes = np.clip(np.round(blocks / scales[:, :, None]) + zero_points[:, :, None], 0, levels)
    return codes, scales, zero_points


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
    # the correction's factors in 8-bit blocks where stored so, in the order they run (a MatMul's B and A, a
    # table's A and B^T; correction_out and correction_in then hold their values)
    correction_blocks: tuple[Blocks, Blocks] | None = None
    accuracy_level: int = 0  # MatMulNBits' (INT8_ACTIVATIONS: int8 dynamic)

    @property
    def nbytes(self) -> int:
        raise NotImplementedError

    @property
    def params(self) -> int:
        """Bytes in float-weight units: what the allocation weighs against the layer's parameters."""
        return math.ceil(self.nbytes / self.weight_bytes)

    def _correction_bytes(self) -> int:
        if self.correction_blocks is not None:
            return sum(blocks.nbytes for blocks in self.correction_blocks)
        return sum(_as_stored(factor).nbytes for factor in (self.correction_out, self.correction_in))

    def in_float32(self) -> Self:
        return replace(self, correction_out=self.correction_out.astype(np.float32),
                       correction_in=self.correction_in.astype(np.float32))

    @property
    def scheme(self) -> dict[str, int]:
        """What the report says of it: bits, block, the correction's rank and its factors' bits."""
        bits = 0 if not self.rank else CORRECTION_BITS if self.correction_blocks is not None else 16
        return {"bits": self.blocks.bits, "block": self.blocks.block, "correction_rank": self.rank,
                "correction_bits": bits}

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
        product = product_output(layer, emit)
        quantized = emit.variable("q") if self.rank else product
        matmul_nbits(emit, "q", emit.inputs[0], self.blocks, quantized, self.accuracy_level)
        if self.rank and self.correction_blocks is not None:
            inner, outer = self.correction_blocks
            middle, corrected = emit.variable("c_mid"), emit.variable("c")
            matmul_nbits(emit, "c_in", emit.inputs[0], inner, middle)
            matmul_nbits(emit, "c_out", middle, outer, corrected)
            emit.node("add", "Add", [quantized, corrected], [product])
        elif self.rank:
            middle = emit.variable("c_mid")
            emit.node("c_in", "MatMul", [emit.inputs[0], _factor(emit, "c_in", self.correction_in.T)], [middle])
            _add_correction(emit, quantized, "MatMul", [middle, _factor(emit, "c_out", self.correction_out.T)],
                            [product])
        finish_product(layer, emit, product, self.bias_shift)


def product_output(layer: Layer, emit: Emitter) -> object:
    """Where a MatMul's or Gemm's replacement writes x @ W: the node's output, or a Gemm's product that
    finish_product scales and biases."""
    return emit.variable("product") if layer.node.op == "Gemm" else emit.outputs[0]


def finish_product(layer: Layer, emit: Emitter, product, bias_shift: np.ndarray | None) -> None:
    """A Gemm's alpha, beta and C applied to the product; the bias shift moved into the bias site."""
    if layer.node.op == "Gemm":
        _gemm_tail(layer, emit, product, bias_shift)
    elif bias_shift is not None and layer.bias is not None:
        site = layer.bias
        site.node.inputs[site.index] = emit.bias(site, bias_shift)


def matmul_nbits(emit: Emitter, role: str, x, blocks: Blocks, output, accuracy_level: int = 0) -> None:
    """x @ blocks^T as MatMulNBits, its codes, scales and zero points constants named after `role`."""
    weights, scales, zero_points = blocks.packed()
    attributes = {"K": blocks.width, "N": blocks.codes.shape[0], "bits": blocks.bits, "block_size": blocks.block}
    if accuracy_level:
        attributes["accuracy_level"] = accuracy_level
    emit.node(role, "MatMulNBits", [x, emit.constant(f"{role}_weight", weights), _in_float(emit, f"{role}_scales", scales),
                                    emit.constant(f"{role}_zero_points", zero_points)], [output], attributes,
              domain=MS_DOMAIN)


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
        data, scales, zero_points = self._stored(emit)
        quantized = emit.variable("q") if self.rank else emit.outputs[0]
        emit.node("q", "GatherBlockQuantized", [data, emit.inputs[1], scales, zero_points],
                  [quantized], {"gather_axis": 0, "quantize_axis": 1, "block_size": self.blocks.block,
                                "bits": self.blocks.bits}, domain=MS_DOMAIN)
        if self.rank and self.correction_blocks is not None:  # A looked up from 8-bit rows, then B^T's blocks
            lookup, product = self.correction_blocks
            looked_up, corrected = emit.variable("c_mid"), emit.variable("c")
            data, scales, zero_points = lookup.packed_rows()
            emit.node("c_in", "GatherBlockQuantized", [emit.constant("c_in_data", data), emit.inputs[1],
                                                       _in_float(emit, "c_in_scales", scales),
                                                       emit.constant("c_in_zero_points", zero_points)],
                      [looked_up], {"gather_axis": 0, "quantize_axis": 1, "block_size": lookup.block,
                                    "bits": lookup.bits}, domain=MS_DOMAIN)
            matmul_nbits(emit, "c_out", looked_up, product, corrected)
            emit.node("add", "Add", [quantized, corrected], emit.outputs)
        elif self.rank:
            looked_up = emit.variable("c_mid")
            emit.node("c_in", "Gather", [_factor(emit, "c_in", self.correction_out), emit.inputs[1]], [looked_up],
                      {"axis": 0})
            _add_correction(emit, quantized, "MatMul", [looked_up, _factor(emit, "c_out", self.correction_in)],
                            emit.outputs)

    def emit_tied_head(self, layer: Layer, emit: Emitter) -> None:
        """The LM head h @ table^T of the same table: MatMulNBits(h) on the lookup's stored blocks (its
        bytes reshaped to MatMulNBits' rows x blocks x bytes), plus (h @ B^T) @ A^T, A and B the lookup's
        correction constants read through Transposes: the model holds one copy of each."""
        if self.blocks.width % self.blocks.block:
            raise RuntimeError(f"the tied head {layer.node.name!r} needs whole blocks, not width {self.blocks.width}")
        data, scales, zero_points = self._stored(emit)
        rows = self.blocks.codes.shape[0]
        blocks = emit.variable("q_blocks", dtype=np.uint8)
        emit.node("q_blocks", "Reshape", [data, emit.constant("q_shape", np.array(
            [rows, self.blocks.width // self.blocks.block, self.blocks.block * self.blocks.bits // 8], np.int64))],
                  [blocks])
        quantized = emit.variable("q") if self.rank else emit.outputs[0]
        emit.node("q", "MatMulNBits", [emit.inputs[0], blocks, scales, zero_points], [quantized],
                  {"K": self.blocks.width, "N": rows, "bits": self.blocks.bits, "block_size": self.blocks.block},
                  domain=MS_DOMAIN)
        if self.rank:
            rebuild, lookup, middle = emit.variable("c_in_t"), emit.variable("c_out_t"), emit.variable("c_mid")
            emit.node("c_in_t", "Transpose", [_factor(emit, "c_out", self.correction_in)], [rebuild], {"perm": [1, 0]})
            emit.node("c_out_t", "Transpose", [_factor(emit, "c_in", self.correction_out)], [lookup], {"perm": [1, 0]})
            emit.node("c_in", "MatMul", [emit.inputs[0], rebuild], [middle])
            _add_correction(emit, quantized, "MatMul", [middle, lookup], emit.outputs)

    def _stored(self, emit: Emitter) -> tuple:
        """The table's blocks as constants, shared with a tied head: data, scales (as float32), zero points."""
        data, scales, zero_points = self.blocks.packed_rows()
        return (emit.constant("q_data", data, shared=True), _in_float(emit, "q_scales", scales),
                emit.constant("q_zero_points", zero_points, shared=True))


def _as_stored(value: np.ndarray) -> np.ndarray:
    """Scales or a correction factor as stored: float16 when every value is one (the fits round them so),
    else float32."""
    half = value.astype(HALF)
    return half if np.array_equal(half, value) else value.astype(np.float32)


def _stored_pair(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A correction's factors rounded to float16 (in float64) where no value overflows it, as stored."""
    return _half_where_it_fits(first), _half_where_it_fits(second)


def _half_where_it_fits(value: np.ndarray) -> np.ndarray:
    half = value.astype(HALF)
    return half.astype(np.float64) if np.all(np.isfinite(half)) else value


def _in_float(emit: Emitter, role: str, value: np.ndarray) -> object:
    """A stored constant (shared with a tied head) as the float32 input a node takes: through a Cast when
    it is stored in float16."""
    stored = emit.constant(role, value, shared=True)
    if value.dtype != HALF:
        return stored
    cast = emit.variable(f"{role}_f32", dtype=np.float32)
    emit.node(f"{role}_cast", "Cast", [stored], [cast], {"to": onnx.TensorProto.FLOAT})
    return cast


def _factor(emit: Emitter, role: str, value: np.ndarray) -> object:
    return _in_float(emit, role, _as_stored(value))


def _add_correction(emit: Emitter, quantized, op: str, inputs: list, outputs: list) -> None:
    """The correction's last product, added to the quantized layer's output into `outputs`."""
    corrected = emit.variable("c")
    emit.node("c_out", op, inputs, [corrected])
    emit.node("add", "Add", [quantized, corrected], outputs)


FitT = TypeVar("FitT", BlockQuantized, BlockQuantizedTable)


class _BlockOptions(Generic[FitT]):
    """A unit's block options: every block size on offer with each correction rank (config: rank, block),
    rounding and correction fitted in turn (ALTERNATIONS times) and the fit with the least predicted error
    kept; the correction's factors rounded to float16 where they fit, as they are stored."""

    def __init__(self, matrix: np.ndarray, blocks: Sequence[int], weight_bytes: int, method: str):
        self.method = method  # one of METHOD_BITS
        self._bits = METHOD_BITS[method]
        self._matrix = matrix  # the stored orientation: a MatMul's W (out x in), a table (V x d)
        self._blocks = tuple(blocks)
        self._weight_bytes = weight_bytes
        self._fits: dict[tuple[int, int], FitT] = {}
        self._plain: dict[int, list[tuple[Blocks, tuple[np.ndarray, np.ndarray]]]] = {}
        self._importance: np.ndarray | None = None  # per input column: what rounded() weighs its loss by
        self._eight_bit_corrections = False  # whether corrections are also offered in 8-bit blocks

    def options(self) -> list[Option]:
        return [Option(self.method, config, fit.params, fit.predicted_error) for config, fit in
                ((config, self._option_fit(config)) for config in self.configs())]

    def configs(self) -> list[tuple[int, ...]]:
        """(correction rank, block) on offer, and (rank, block, 8) where the correction may be stored in 8
        bits: ranks up to a sixteenth of the smaller side at 4 bits, none at 8; blocks as given, those wider
        than the row left out unless none is narrower."""
        limit = min(self._matrix.shape) // 16 if self._bits == 4 else 0
        width = self._matrix.shape[1]
        blocks = [block for block in self._blocks if block <= width] or [min(self._blocks)]
        found: list[tuple[int, ...]] = [(rank, block) for block in blocks for rank in CORRECTION_RANKS if rank <= limit]
        if self._eight_bit_corrections:
            found += [(rank, block, CORRECTION_BITS) for rank, block in found if rank and self._eight_bits_fit(rank)]
        return found

    def factorize(self, config: tuple[int, ...]) -> FitT:
        if tuple(config) not in self.configs():
            raise ValueError(f"{self.method} offers (correction rank, block[, correction bits]) {self.configs()}, "
                             f"not {tuple(config)}")
        return self._option_fit(tuple(config))

    def _option_fit(self, config: tuple[int, ...]) -> FitT:
        return self._eight_bit(*config[:2]) if len(config) == 3 else self._fit(*config)

    def _eight_bit(self, rank: int, block: int) -> FitT:
        raise NotImplementedError

    def _eight_bits_fit(self, rank: int) -> bool:
        """Whether a correction of this rank may be stored in 8 bits (MatMulNBits pads r to its block)."""
        return True

    def _fit(self, rank: int, block: int) -> FitT:
        """The fit with the least predicted error over every rounding on offer and every alternation."""
        if (rank, block) not in self._fits:
            matrix = self._matrix
            starts = [(way, self._made(rank, blocks, _stored_pair(first[0][:, :rank], first[1][:rank])))
                      for way, (blocks, first) in zip(self._roundings(), self._first(block))]
            way, best = min(starts, key=lambda start: start[1].predicted_error)  # alternate the best rounding
            fit = best
            for _ in range(ALTERNATIONS - 1 if rank else 0):
                blocks = way(matrix - fit.correction_out @ fit.correction_in, block)
                fit = self._made(rank, blocks, _stored_pair(*self._correction(matrix - blocks.dequantized(), rank)))
                best = min(best, fit, key=lambda fit: fit.predicted_error)
            self._fits[rank, block] = best
        return self._fits[rank, block]

    def _roundings(self) -> list[Callable[[np.ndarray, int], Blocks]]:
        """The ways to round on offer: activation-aware round to nearest (rounded)."""
        return [partial(rounded, bits=self._bits, importance=self._importance)]

    def _first(self, block: int) -> list[tuple[Blocks, tuple[np.ndarray, np.ndarray]]]:
        """Per rounding, the weight rounded as it is and the correction of what that lost at the largest
        rank on offer: every rank's first alternation takes its leading part (one decomposition for all)."""
        if block not in self._plain:
            largest = max(config[0] for config in self.configs() if config[1] == block)
            self._plain[block] = [(blocks, self._correction(self._matrix - blocks.dequantized(), largest))
                                  for blocks in (way(self._matrix, block) for way in self._roundings())]
        return self._plain[block]

    def _correction(self, residual: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _made(self, rank: int, blocks: Blocks, correction: tuple[np.ndarray, np.ndarray]) -> FitT:
        raise NotImplementedError


class BlocksDecomposer(_BlockOptions[BlockQuantized]):
    """A MatMul unit's int4 options, the correction fitted against the layer's input statistics (its
    weight alone without them)."""

    def __init__(self, layer: Layer, moments: Moments | None, blocks: Sequence[int] = BLOCK_SIZES,
                 method: str = INT4, error: OutputError | None = None):
        """`error`: the layer's OutputError, shared by its decomposers (made here when not given)."""
        weight = np.asarray(layer.matrices, dtype=np.float64)[0]  # (out, in)
        super().__init__(weight, blocks, int(np.dtype(layer.weight.storage_dtype).itemsize), method)
        self._error = OutputError(layer, moments) if error is None else error
        self._root: np.ndarray | None = None  # S, S S^T = E[x x^T]: the corrections' weighting, made when first asked
        self._second: np.ndarray | None = None
        self._inverse_root: np.ndarray | None = None  # GPTQ's, made when first asked
        if moments is not None:
            self._second = (linalg.shrunk(moments, np.eye(weight.shape[1])[None]) + outer_products(moments.mean))[0]
            self._importance = np.diagonal(self._second).copy()
        self._eight_bit_corrections = self._bits == 4
        self._mean = None if moments is None else moments.mean[0]
        if method == INT8_DYNAMIC and moments is None:
            raise ValueError(f"{INT8_DYNAMIC} predicts what its activations lose from the input statistics")
        self._eights: dict[tuple[int, int], BlockQuantized] = {}

    def _roundings(self) -> list[Callable[[np.ndarray, int], Blocks]]:
        """With input statistics, GPTQ beside activation-aware round to nearest: the better fit is kept
        (int8-dyn rounds to nearest only: its activations lose several times what its weights do)."""
        found = super()._roundings()
        if self._second is not None and self.method != INT8_DYNAMIC:
            if self._inverse_root is None:
                self._inverse_root = inverse_cholesky(self._second)
            found.append(partial(rounded_gptq, bits=self._bits, inverse_root=self._inverse_root))
        return found

    def _correction(self, residual: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """The best rank-r A, B for the residual under the input statistics: A = U_r, B = U_r^T R (their
        leading r' columns and rows: the best of rank r')."""
        if self._second is not None and self._root is None:
            self._root = linalg.sqrt_psd(self._second[None])[0]
        weighted = residual if self._root is None else residual @ self._root
        left = linalg.top_singular(weighted, rank)[0]
        return left, left.T @ residual

    def _eight_bit(self, rank: int, block: int) -> BlockQuantized:
        """The float16 fit's correction in 8-bit blocks: B rounded along the input (weighted as the weight's
        rounding is), A refitted to the rounded B under the input statistics, then rounded along r."""
        if (rank, block) not in self._eights:
            fit = self._fit(rank, block)
            residual = self._matrix - fit.blocks.dequantized()
            inner = rounded(fit.correction_in, CORRECTION_BLOCK, CORRECTION_BITS, self._importance)
            outer = rounded(self.refitted(residual, inner.dequantized()), rank_block(rank), CORRECTION_BITS)
            self._eights[rank, block] = self._made(rank, fit.blocks, (outer.dequantized(), inner.dequantized()),
                                                   (inner, outer))
        return self._eights[rank, block]

    def refitted(self, target: np.ndarray, first: np.ndarray) -> np.ndarray:
        """The A (out x r) that best completes A @ first ~= target (out x in) under the input statistics:
        A = target E first^T (first E first^T)^+, E the input's second moment (the identity without it)."""
        weighted = first.T if self._second is None else self._second @ first.T
        return linalg.ridge_solve(first @ weighted, (target @ weighted).T).T

    def _made(self, rank: int, blocks: Blocks, correction: tuple[np.ndarray, np.ndarray],
              correction_blocks: tuple[Blocks, Blocks] | None = None) -> BlockQuantized:
        approx = (blocks.dequantized() + correction[0] @ correction[1])[None]
        error, level = self._error(approx), 0
        if self.method == INT8_DYNAMIC:
            blocks, level = replace(blocks, scales=blocks.scales.astype(np.float32)), INT8_ACTIVATIONS
            error += self._activation_error(approx[0], blocks.block)
        return BlockQuantized(self.method, rank, blocks, *correction, predicted_error=error,
                             weight_bytes=self._weight_bytes, correction_blocks=correction_blocks,
                             accuracy_level=level, bias_shift=self._error.bias_shift(approx))

    def _activation_error(self, weight: np.ndarray, block: int) -> float:
        """What rounding the activations to int8 per block adds to the relative output error (INT8_DYNAMIC;
        see the module's docstring): sum_j ||D w_j||^2 step_b(j)^2 / 12 over the output energy."""
        mean, second = known(self._mean, "the input mean"), known(self._second, "the input moments")
        width = len(mean)
        spread = np.sqrt(np.maximum(np.diagonal(second) - mean**2, 0.0))
        padded = -(-width // block) * block
        largest = [np.pad(np.abs(values), (0, padded - width)).reshape(-1, block).max(axis=1) for values in (mean, spread)]
        steps = np.repeat((largest[0] + np.sqrt(2 * np.log(2 * block)) * largest[1]) / 127, block)[:width]
        columns = np.sum((self._error.scale[0][:, None] * weight) ** 2, axis=0)
        return float(np.sum(columns * steps**2 / 12) / self._error.energy) if self._error.energy > 0 else 0.0


class TableBlocksDecomposer(_BlockOptions[BlockQuantizedTable]):
    """An embedding table's int4 options, its rows weighted by their lookup counts (the frequency-weighted
    SVD's weights; uniform without counts). A tied table (`statistics` Tied, or None for a tied unit
    without statistics) also weighs its d side by the tied SVD's metric M: min ||D (R - A B) M||."""

    def __init__(self, layer: Layer, statistics: Counts | Tied | None, blocks: Sequence[int] = BLOCK_SIZES,
                 method: str = INT4):
        table = np.asarray(layer.matrices, dtype=np.float64)[0].T  # (V, d)
        super().__init__(table, blocks, int(np.dtype(layer.weight.storage_dtype).itemsize), method)
        counts = statistics.counts if isinstance(statistics, Tied) else statistics
        self._rows = row_weights(counts, table.shape[0])
        self._metric = tied_metric(statistics.moments, table.shape[1]) if isinstance(statistics, Tied) else None
        self._importance = None if self._metric is None else np.sum(self._metric**2, axis=0)
        self._total = self._weighted(table)
        self._inverse_root: np.ndarray | None = None  # GPTQ's against M^2 (a tied table), made when first asked
        self._eight_bit_corrections = self._bits == 4 and self._metric is None  # a tied head reads A and B transposed
        self._eights: dict[tuple[int, int], BlockQuantizedTable] = {}

    def _roundings(self) -> list[Callable[[np.ndarray, int], Blocks]]:
        """A tied table also GPTQ against M^2: each row's error in the metric is what its rounding keeps
        small (the LM head's input moments weigh half of it)."""
        found = super()._roundings()
        if self._metric is not None:
            if self._inverse_root is None:
                self._inverse_root = inverse_cholesky(self._metric @ self._metric)
            found.append(partial(rounded_gptq, bits=self._bits, inverse_root=self._inverse_root))
        return found

    def _weighted(self, rows: np.ndarray) -> float:
        """sum_i w_i ||rows_i M||^2 (M = I for a table that is not tied)."""
        measured = rows if self._metric is None else rows @ self._metric
        return float(np.sum(self._rows[:, None] * measured**2))

    def _correction(self, residual: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """The best rank-r A, B for the residual with its rows weighted: min ||D (R - A B) M||, D = diag(sqrt w)."""
        roots = np.sqrt(self._rows)[:, None]
        if self._metric is None:
            u, s, vt = linalg.top_singular(roots * residual, rank)
            return u * s / roots, vt
        u, s, vt = linalg.top_singular(roots * residual @ self._metric, rank)
        return u * s / roots, np.linalg.solve(self._metric, vt.T).T  # M symmetric

    def _eight_bits_fit(self, rank: int) -> bool:
        """GatherBlockQuantized looks up whole blocks: r a multiple of its block along r."""
        return rank % rank_block(rank) == 0

    def _eight_bit(self, rank: int, block: int) -> BlockQuantizedTable:
        """The float16 fit's correction in 8-bit blocks along r: A's rows (looked up by GatherBlockQuantized)
        rounded, B refitted to them under the row weights, B^T rounded (MatMulNBits)."""
        if (rank, block) not in self._eights:
            fit = self._fit(rank, block)
            lookup = rounded(fit.correction_out, rank_block(rank), CORRECTION_BITS)
            rows = lookup.dequantized()
            weighted = self._rows[:, None] * rows
            basis = linalg.ridge_solve(rows.T @ weighted, weighted.T @ (self._matrix - fit.blocks.dequantized()))
            product = rounded(basis.T, rank_block(rank), CORRECTION_BITS)
            self._eights[rank, block] = self._made(rank, fit.blocks, (rows, product.dequantized().T),
                                                   (lookup, product))
        return self._eights[rank, block]

    def _made(self, rank: int, blocks: Blocks, correction: tuple[np.ndarray, np.ndarray],
              correction_blocks: tuple[Blocks, Blocks] | None = None) -> BlockQuantizedTable:
        left = self._matrix - blocks.dequantized() - correction[0] @ correction[1]
        error = self._weighted(left) / self._total if self._total > 0 else 0.0
        return BlockQuantizedTable(self.method, rank, blocks, *correction, predicted_error=error,
                                   weight_bytes=self._weight_bytes, correction_blocks=correction_blocks)


def table_blocks(unit: Unit, statistics: object, blocks: Sequence[int]) -> list[int]:
    """The block sizes on offer to an embedding table (none: not offered): a Gather on a float32 table of
    even width, rounded along its rows. A tied table's head reads the same blocks, so its width must be
    whole blocks."""
    layer = unit.layers[0]
    if layer.node.op != "Gather" or layer.weight.storage_dtype != np.float32 or layer.weight.shape[1] % 2:
        return []
    if unit.tied:
        fits = statistics is None or isinstance(statistics, Tied)
        return [block for block in blocks if layer.weight.shape[1] % block == 0] if fits else []
    return list(blocks) if len(unit.layers) == 1 and (statistics is None or isinstance(statistics, Counts)) else []


def offers_int4(layer: Layer, statistics: object, side: str) -> bool:
    """Int4 blocks replace a MatMul x @ W, or a Gemm x @ B' (transA 0), with a 2-D float32 weight
    (MatMulNBits' layout), whose input's moments (the correction's weighting) are known, or no statistics
    at all; not the head of a tied table."""
    op, info = layer.node.op, layer.info
    shaped = (op == "MatMul" and info["side"] == "right" and not info["batch"]) or (
        op == "Gemm" and info["side"] == "B" and not layer.node.attrs.get("transA", 0))
    return (shaped and not layer.transposed and layer.weight.storage_dtype == np.float32
            and (statistics is None or (isinstance(statistics, Moments) and side == "input")))
