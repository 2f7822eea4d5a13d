"""The contracts every decomposition keeps: a `Decomposer` offers options and factorizes one; what it returns
is `Factorized`, which writes its own chain in place of the layer's node.

- `svd.TruncatedSVD`, `data_aware.DataAwareSVD` and `data_aware.FrequencyWeightedSVD` are `SpectralDecomposer`s
  (one rank, a spectrum: explicit ranks and the energy threshold pick from it); they return an
  `svd.Factorization`, a two-factor product that the layer's adapter writes as the node's own op.
- The Conv decomposers (`conv_methods.ConvDecomposer` and its subclasses) return a `conv_methods.ConvChain`,
  a chain of Conv nodes of its own.
- `prune.ChannelPruning` (a pair's consumer) returns a `prune.PrunedInputs`, `prune.KeptRows` (its producers,
  offering nothing alone) a `prune.KeptOutputs`: each the layer's own node with a smaller weight.
- `heads.HeadScores` (an attention pair's key) and `heads.QuerySide` (its query, offering nothing alone)
  return a `heads.HeadSide`: the projection's own node, fewer dimensions per head.
- `parking.Parked` (`ParkedSpectral` for a unit's SVD) stands for a decomposer written to disk.

mypy checks that every one of them keeps its contract (the assignments at the end of this module, and
`tests/test_types.py` runs mypy).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, Self

import numpy as np

if TYPE_CHECKING:
    from ..graph.layers import Layer
    from ..graph.splice import Emitter
    from .svd import Option, Spectrum


class Factorized(Protocol):
    """A unit's weight factorized at one option: what it costs, how far it is predicted to be off, and the
    nodes that replace each of the unit's layers."""

    @property
    def method(self) -> str: ...

    @property
    def rank(self) -> int | tuple[int, ...]:
        """The option's configuration: one rank, or one per step (Tucker-2's output and input ranks)."""
        ...

    @property
    def params(self) -> int: ...

    @property
    def predicted_error(self) -> float: ...

    @property
    def bias_shift(self) -> np.ndarray | None:
        """(G, out): what the layer's bias must gain (the affine optimum), or None."""
        ...

    def in_float32(self) -> Self:
        """The same factors in float32 (what a float32 model stores them as)."""
        ...

    def same_op_weight(self) -> np.ndarray | None:
        """The matrices (G, out, in) that the layer's own op, given them as its weight, computes the chain
        with (a two-factor product: second @ first), or None when the chain is made of other ops (Tucker-2,
        CP, ...). A sensitivity probe feeds them to the original model instead of building the chain."""
        ...

    def emit(self, layer: Layer, emit: Emitter) -> None:
        """Write the nodes that replace `layer` (whose node is already disconnected) through `emit`."""
        ...


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


if TYPE_CHECKING:  # every decomposition keeps its contract (mypy checks these assignments)
    from .conv import (
        BlockLowRank,
        CanonicalPolyadic,
        ConvChain,
        ConvDecomposer,
        DepthwiseSeparable,
        SpatialSeparable,
        Tucker2,
    )
    from .data_aware import DataAwareSVD, FrequencyWeightedSVD
    from .heads import HeadScores, HeadSide, QuerySide
    from .parking import Parked, ParkedSpectral
    from .prune import ChannelPruning, KeptOutputs, KeptRows, PrunedInputs
    from .svd import Factorization, TruncatedSVD

    _spectral: list[type[SpectralDecomposer]] = [TruncatedSVD, DataAwareSVD, FrequencyWeightedSVD, ParkedSpectral]
    _decomposers: list[type[Decomposer]] = [
        ConvDecomposer, Tucker2, CanonicalPolyadic, SpatialSeparable, DepthwiseSeparable, BlockLowRank, Parked,
        ChannelPruning, KeptRows, HeadScores, QuerySide,
    ]
    _factorized: list[type[Factorized]] = [Factorization, ConvChain, PrunedInputs, KeptOutputs, HeadSide]
