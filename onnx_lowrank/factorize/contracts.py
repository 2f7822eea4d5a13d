"""The contracts every decomposition keeps: a `Decomposer` offers `Option`s and factorizes one; what it returns
is `graph.splice.Factorized`, which writes its own chain in place of the layer's node. A unit's SVD is a
`SpectralDecomposer`: one rank, whose predicted errors its `Spectrum` gives.

- `svd.TruncatedSVD`, `data_aware.DataAwareSVD` and `data_aware.FrequencyWeightedSVD` are `SpectralDecomposer`s
  (one rank, a spectrum: explicit ranks and the energy threshold pick from it); they return an
  `graph.splice.Factorization`, a two-factor product that the layer's adapter writes as the node's own op.
- The Conv decomposers (`conv.ConvDecomposer` and its subclasses) return a `conv.ConvChain`,
  a chain of Conv nodes of its own.
- `prune.ChannelPruning` (a pair's consumer) returns a `prune.PrunedInputs`, `prune.KeptRows` (its producers,
  offering nothing alone) a `prune.KeptOutputs`: each the layer's own node with a smaller weight.
- `heads.HeadScores` (an attention pair's key) and `heads.QuerySide` (its query, offering nothing alone)
  return a `heads.HeadSide`: the projection's own node, fewer dimensions per head.
- `parking.Parked` (`ParkedSpectral` for a unit's SVD) stands for a decomposer written to disk.

mypy checks that every one of them keeps its contract (the assignments at the end of `registry.py`, and
`tests/test_types.py` runs mypy).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import numpy as np

from ..graph.splice import Factorized


@dataclass(frozen=True)
class Spectrum:
    """Energies of the rank components, (G, k) descending per group: squared singular values of the
    weight (weight-only) or eigenvalues of the layer's output second moment (data-aware).

    `total` is the energy the errors are relative to; by default the sum of all components, but a
    data-aware layer measures against its whole output energy, mean and bias included. `rest` is the
    energy of the components that were not computed (a partial decomposition: only the leading ones).
    """

    energies: np.ndarray
    total: float | None = None
    rest: float = 0.0

    @cached_property
    def energy(self) -> np.ndarray:
        """Energy of each rank component, summed over groups (grouped layers share one rank)."""
        return np.sum(self.energies, axis=0)

    @cached_property
    def dropped(self) -> np.ndarray:
        """Predicted error at rank r = 0..k: dropped energy over total energy (0 for an all-zero layer)."""
        total = self.energy.sum() + self.rest if self.total is None else self.total
        tail = np.concatenate([np.cumsum(self.energy[::-1])[::-1], [0.0]]) + self.rest
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
        """Every rank computed: all of them, or the leading ones of a partial decomposition."""
        return [self.option(rank) for rank in range(1, self.spectrum.energy.shape[0] + 1)]


class Decomposer(Protocol):
    """One method's ways to factorize a unit: its options, and the factors of any one of them."""

    @property
    def method(self) -> str: ...

    def options(self) -> list[Option]:
        """The options offered (each with its configuration, parameters and predicted error)."""
        ...

    def factorize(self, config: tuple[int, ...], /) -> Factorized:
        """The factors of an option's configuration (ValueError for one the decomposer does not offer)."""
        ...


class SpectralDecomposer(Decomposer, Protocol):
    """A unit's SVD (weight-only, data-aware or frequency-weighted): one rank, whose predicted errors its
    spectrum gives; what explicit ranks, the energy threshold and the sensitivity probes use."""

    @property
    def spectrum(self) -> Spectrum: ...

    def option(self, rank: int) -> Option:
        """The option of this rank."""
        ...
