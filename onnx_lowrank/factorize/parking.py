"""Keeping each layer's decompositions on disk while the ranks are chosen, so that a large model's
factors (an SVD holds more than the weight it came from) are never all in memory at once.

A parked decomposer keeps in memory what choosing a rank reads (its method, spectrum and options) and
is read back from its file only to factorize at the chosen rank.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar, cast

if TYPE_CHECKING:
    from ..graph.splice import Factorized
    from .contracts import Decomposer, Option, SpectralDecomposer, Spectrum

PARK_MIN_PARAMS = 4_000_000  # factorizable parameters from which a model's decompositions go to disk
# (below, they stay in memory, where they are faster to reach)

D = TypeVar("D", bound="Decomposer")


class Shelf:
    """The decomposer read back last, shared by one run's parked decomposers: a unit is often factorized
    a few times in a row (the latency gate's bisection, then its report), and one more decomposer in
    memory is within the bound."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.decomposer: Decomposer | None = None


class Parked(Generic[D]):
    """A decomposer in a file: its method and options at hand, the rest read back on use."""

    def __init__(self, decomposer: D, path: Path, shelf: Shelf | None = None):
        self.method = decomposer.method
        self._options = decomposer.options()
        self._path = path
        self._shelf = shelf or Shelf()
        with open(path, "wb") as stream:
            pickle.dump(decomposer, stream, protocol=pickle.HIGHEST_PROTOCOL)

    def options(self) -> list[Option]:
        return self._options

    def factorize(self, config: tuple[int, ...]) -> Factorized:
        return self.unparked().factorize(config)

    def unparked(self) -> D:
        """The decomposer itself, read back (kept on the shelf until another is read)."""
        if self._shelf.path != self._path:
            self._shelf.path, self._shelf.decomposer = None, None  # never two read-back copies at once
            with open(self._path, "rb") as stream:
                self._shelf.decomposer = pickle.load(stream)  # noqa: S301 - a file this process wrote
            self._shelf.path = self._path
        return cast(D, self._shelf.decomposer)  # what this one wrote to its file


class ParkedSpectral(Parked["SpectralDecomposer"]):
    """A unit's SVD in a file: its spectrum also at hand (rank choice reads it)."""

    def __init__(self, decomposer: SpectralDecomposer, path: Path, shelf: Shelf | None = None):
        super().__init__(decomposer, path, shelf)
        self.spectrum: Spectrum = decomposer.spectrum

    def option(self, rank: int) -> Option:
        return self.unparked().option(rank)
