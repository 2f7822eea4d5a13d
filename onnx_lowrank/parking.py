"""Keeping each layer's decompositions on disk while the ranks are chosen, so that a large model's
factors (an SVD holds more than the weight it came from) are never all in memory at once.

A parked decomposer keeps in memory what choosing a rank reads (its method, spectrum and options) and
is read back from its file only to factorize at the chosen rank.
"""

from __future__ import annotations

import pickle
from pathlib import Path

PARK_MIN_PARAMS = 4_000_000  # factorizable parameters from which a model's decompositions go to disk
# (below, they stay in memory, where they are faster to reach)


class Parked:
    """A decomposer in a file: spectrum and options at hand, the rest read back on use."""

    def __init__(self, decomposer, path: Path):
        self.method = decomposer.method
        self.spectrum = getattr(decomposer, "spectrum", None)
        self._options = decomposer.options()
        self._path = path
        with open(path, "wb") as stream:
            pickle.dump(decomposer, stream, protocol=pickle.HIGHEST_PROTOCOL)

    def options(self) -> list:
        return self._options

    def factorize(self, config):
        return self.unparked().factorize(config)

    def unparked(self):
        """The decomposer itself, read back (not kept)."""
        with open(self._path, "rb") as stream:
            return pickle.load(stream)  # noqa: S301 - a file this process wrote

    def __getattr__(self, name: str):  # anything else a decomposer offers, e.g. option(rank)
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.unparked(), name)
