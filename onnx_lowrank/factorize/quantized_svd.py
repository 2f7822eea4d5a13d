"""Today's factorization with its factors quantized (`--quantize int4`): a MatMul's or Gemm's data-aware
SVD at rank r, y = (x B^T) A^T, both factors stored as MatMulNBits blocks ("svd-int4"; "svd-int8" is built
the same way with 8-bit factors), offered beside the unit's float factorizations and its 4- and 8-bit
blocks so that the allocation weighs them all in bytes. Only the 4-bit factors are on the menu: at a
quarter of the break-even rank they cost what 8-bit factors cost at an eighth, and each menu's fitting
costs seconds per layer (SmolLM2-135M's 210 units: its 20-minute budget).

B (r x in) is the best rank-r basis under the layer's input statistics (U_r^T W, as int4.py's correction
takes it), rounded to blocks along the input by each rounding the unit's blocks use (activation-aware round
to nearest, GPTQ); A (out x r) is then refitted to the rounded B under the same statistics (least squares:
it absorbs what B's rounding lost) and rounded along r. The rounding whose result predicts the least
output error is kept. Ranks are offered at fractions of the float break-even out * in / (out + in): at the
bytes of the 4-bit blocks' own menu a low-rank weight pays only where its spectrum falls fast, so a few
ranks suffice and each costs one rounding of each factor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Self

import numpy as np

from ..graph.layers import Layer
from ..graph.splice import Emitter
from ..observe.statistics import Moments
from .contracts import Option
from .data_aware import OutputError
from .int4 import BLOCK_SIZES, INT4, Blocks, BlocksDecomposer, finish_product, matmul_nbits, product_output, rounded

FACTOR_BITS = {"svd-int4": 4, "svd-int8": 8}
RANK_SHARES = {4: (0.25, 0.5), 8: (0.125, 0.25)}  # ranks offered, as shares of the float break-even
RANK_STEP = 16  # offered ranks are multiples of this (MatMulNBits' smallest block along r)


@dataclass(frozen=True)
class QuantizedFactors:
    """W (out x in) ~= A @ B, B (r x in) and A (out x r) each in blocks along its input."""

    method: str
    rank: int
    inner: Blocks  # B
    outer: Blocks  # A
    predicted_error: float
    weight_bytes: int = 4
    bias_shift: np.ndarray | None = None  # (1, out)

    @property
    def nbytes(self) -> int:
        return self.inner.nbytes + self.outer.nbytes

    @property
    def params(self) -> int:
        """Bytes in float-weight units, as the blocks' options count them."""
        return math.ceil(self.nbytes / self.weight_bytes)

    @property
    def scheme(self) -> dict[str, int]:
        """What the report says of it: the factors' bits and the block along the input."""
        return {"bits": self.inner.bits, "block": self.inner.block, "correction_rank": 0, "correction_bits": 0}

    def in_float32(self) -> Self:
        return self

    def same_op_weight(self) -> np.ndarray:
        return (self.outer.dequantized() @ self.inner.dequantized())[None]

    def emit(self, layer: Layer, emit: Emitter) -> None:
        """MatMulNBits(x) by B, then MatMulNBits by A; a Gemm's tail and the bias shift as the blocks'."""
        product, middle = product_output(layer, emit), emit.variable("f_mid")
        matmul_nbits(emit, "f_in", emit.inputs[0], self.inner, middle)
        matmul_nbits(emit, "f_out", middle, self.outer, product)
        finish_product(layer, emit, product, self.bias_shift)


class FactorsDecomposer(BlocksDecomposer):
    """A MatMul unit's SVD with quantized factors, at `bits`: the statistics, roundings and error of the
    unit's block options (BlocksDecomposer), another menu."""

    def __init__(self, layer: Layer, moments: Moments | None, blocks: Sequence[int] = BLOCK_SIZES, bits: int = 4,
                 error: OutputError | None = None):
        super().__init__(layer, moments, blocks, INT4, error)
        self.method = next(method for method, factor_bits in FACTOR_BITS.items() if factor_bits == bits)
        self._bits = bits
        self._block = min(blocks)
        self._factored: dict[int, QuantizedFactors] = {}
        self._basis: np.ndarray | None = None

    def configs(self) -> list[tuple[int, ...]]:
        """(rank, block): ranks at RANK_SHARES of the float break-even, multiples of RANK_STEP below the
        smaller side; the smallest block on offer (the factors are small: their scales cost little)."""
        out, width = self._matrix.shape
        even = out * width / (out + width)
        ranks = {RANK_STEP * round(share * even / RANK_STEP) for share in RANK_SHARES[self._bits]}
        return [(rank, self._block) for rank in sorted(ranks) if RANK_STEP <= rank < min(out, width)]

    def options(self) -> list[Option]:
        return [Option(self.method, config, fit.params, fit.predicted_error)
                for config, fit in ((config, self.factorize(config)) for config in self.configs())]

    def factorize(self, config: tuple[int, ...]) -> QuantizedFactors:  # type: ignore[override]
        if tuple(config) not in self.configs():
            raise ValueError(f"{self.method} offers (rank, block) {self.configs()}, not {tuple(config)}")
        rank = config[0]
        if rank not in self._factored:
            if self._basis is None:  # the largest rank's basis: every rank takes its leading rows
                self._basis = self._correction(self._matrix, max(config[0] for config in self.configs()))[1]
            basis = self._basis[:rank]
            self._factored[rank] = min((self._factors(rank, way(basis, self._block)) for way in self._roundings()),
                                       key=lambda fit: fit.predicted_error)
        return self._factored[rank]

    def _factors(self, rank: int, inner: Blocks) -> QuantizedFactors:
        """A refitted to the rounded B, then rounded along r."""
        block = self._block if self._block <= rank else RANK_STEP
        outer = rounded(self.refitted(self._matrix, inner.dequantized()), block, self._bits)
        approx = (outer.dequantized() @ inner.dequantized())[None]
        return QuantizedFactors(self.method, rank, inner, outer, self._error(approx), self._weight_bytes,
                                self._error.bias_shift(approx))
