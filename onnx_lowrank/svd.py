"""Truncated SVD of a layer's weight matrices (weight-only decomposition), in float64 and deterministic.

One SVD per unit gives the whole spectrum, so every rank's factors and predicted error come from it
without recomputing. Grouped layers (G matrices) share one rank; their energies are pooled per rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np


@dataclass(frozen=True)
class Spectrum:
    """Energies of the rank components, (G, k) descending per group: squared singular values of the
    weight (weight-only) or eigenvalues of the layer's output second moment (data-aware).

    `total` is the energy the errors are relative to; by default the sum of all components, but a
    data-aware layer measures against its whole output energy, mean and bias included.
    """

    energies: np.ndarray
    total: float | None = None

    @cached_property
    def energy(self) -> np.ndarray:
        """Energy of each rank component, summed over groups (grouped layers share one rank)."""
        return np.sum(self.energies, axis=0)

    @cached_property
    def dropped(self) -> np.ndarray:
        """Predicted error at rank r = 0..k: dropped energy over total energy (0 for an all-zero layer)."""
        total = self.energy.sum() if self.total is None else self.total
        tail = np.concatenate([np.cumsum(self.energy[::-1])[::-1], [0.0]])
        return tail / total if total > 0 else np.zeros_like(tail)

    def rank_for_energy(self, keep: float) -> int:
        """The smallest rank keeping at least this fraction of the energy."""
        return int(np.argmax(self.dropped <= 1.0 - keep + 1e-12))

    @property
    def effective_rank(self) -> float:
        """Roy & Vetterli's effective rank: exp of the entropy of the normalised singular values."""
        sigma = np.sqrt(self.energy)
        if sigma.sum() == 0:
            return 0.0
        p = sigma / sigma.sum()
        p = p[p > 0]
        return float(np.exp(-np.sum(p * np.log(p))))


@dataclass(frozen=True)
class Option:
    """One way to factorize a unit: a method, its rank(s), the parameters it costs, its predicted error."""

    method: str
    config: tuple[int, ...]
    params: int
    error: float


class RankedOptions:
    """Options of a two-factor method with one rank: rank r costs G * r * (out + in) parameters."""

    method: str
    spectrum: Spectrum

    def _shape(self) -> tuple[int, int, int]:
        raise NotImplementedError

    def option(self, rank: int) -> Option:
        groups, out_dim, in_dim = self._shape()
        return Option(self.method, (rank,), groups * rank * (out_dim + in_dim), float(self.spectrum.dropped[rank]))

    def options(self) -> list[Option]:
        groups, out_dim, in_dim = self._shape()
        return [self.option(rank) for rank in range(1, min(out_dim, in_dim) + 1)]


@dataclass(frozen=True)
class Factorization:
    """W_g ~= second_g @ first_g for every group g: first (G, r, in) is applied first, second (G, out, r)."""

    method: str
    rank: int
    first: np.ndarray
    second: np.ndarray
    predicted_error: float
    bias_shift: np.ndarray | None = None  # (G, out): what the layer's bias must gain (affine optimum)

    @property
    def params(self) -> int:
        return int(self.first.size + self.second.size)

    @property
    def macs_per_position(self) -> int:
        """Multiply-adds per input vector (per pixel for convs), against out*in*G for the dense weight."""
        return self.params

    def reconstruct(self) -> np.ndarray:
        return self.second @ self.first


def spectrum_of(matrices: np.ndarray) -> Spectrum:
    """Singular values only: what `inspect` and rank choice need before any factor is built."""
    return Spectrum(np.linalg.svd(np.asarray(matrices, dtype=np.float64), compute_uv=False) ** 2)


class TruncatedSVD(RankedOptions):
    """Weight-only factorization: the best rank-r approximation of each matrix in Frobenius norm."""

    method = "svd"

    def __init__(self, matrices: np.ndarray):
        self._matrix_shape = matrices.shape
        u, s, vt = np.linalg.svd(np.asarray(matrices, dtype=np.float64), full_matrices=False)
        # fixed sign convention: the largest-magnitude entry of every left singular vector is positive
        rows = np.argmax(np.abs(u), axis=1, keepdims=True)
        signs = np.sign(np.take_along_axis(u, rows, axis=1))
        signs[signs == 0] = 1.0
        self._u = u * signs
        self._vt = vt * np.swapaxes(signs, 1, 2)
        self._singular_values = s
        self.spectrum = Spectrum(s**2)

    def _shape(self) -> tuple[int, int, int]:
        return self._matrix_shape

    def factorize(self, rank: int | tuple[int]) -> Factorization:
        """Factors at this rank, the singular values split evenly (keeps fp16/bf16 factors in range)."""
        rank = rank[0] if isinstance(rank, tuple) else rank
        if not 1 <= rank <= self._singular_values.shape[1]:
            raise ValueError(f"rank {rank} outside 1..{self._singular_values.shape[1]}")
        root = np.sqrt(self._singular_values[:, :rank])
        first = root[:, :, None] * self._vt[:, :rank, :]
        second = self._u[:, :, :rank] * root[:, None, :]
        return Factorization(self.method, rank, first, second, float(self.spectrum.dropped[rank]))
