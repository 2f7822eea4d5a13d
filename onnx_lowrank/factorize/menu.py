"""A unit's menu: every way to factorize it (one decomposer per method), the options they offer (a method
and its ranks, with the parameters they cost and their predicted error) less those a restriction rules out,
and what an allocation picks from it (`Choice`). The allocations themselves are choose/'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..graph.layers import Unit
from ..graph.splice import Factorized
from ..system.parallel import blas_threads
from .contracts import Decomposer, Option, SpectralDecomposer
from .int4 import METHOD_BITS
from .parking import Parked, ParkedSpectral, Shelf
from .quantized_svd import FACTOR_BITS


@dataclass(frozen=True)
class Choice:
    """A unit's option, or None to keep it dense, with the reason when it stays dense."""

    option: Option | None
    reason: str | None = None

    @property
    def rank(self) -> int | tuple[int, ...] | None:
        if self.option is None:
            return None
        config = self.option.config
        return config[0] if len(config) == 1 else config


@dataclass(frozen=True)
class Coupling:
    """A consumer whose options of `method` also cut its producers' output channels (prune.py): the
    producers then take the matching option (their rows kept), so the allocation weighs the pair as one."""

    method: str
    producers: tuple[UnitDecomposers, ...]

    def producer_option(self, producer: UnitDecomposers, option: Option) -> Option:
        """What the producer keeps for a consumer's option: k of its rows (its error shows on the consumer)."""
        groups, _, in_dim = producer.unit.matrix_shape
        return Option(self.method, option.config, groups * option.config[0] * in_dim, 0.0)


class UnitDecomposers:
    """Every way to factorize one unit: one decomposer per method. `primary` is the unit's SVD, used
    where a single rank is asked for (explicit ranks, energy threshold); it offers options itself unless
    another method is forced. `notes` say why methods asked for do not apply. `coupling`: set on the
    consumer of a pruned pair (its producers' units hold their side without offering it)."""

    def __init__(self, unit: Unit, primary: SpectralDecomposer, others: Sequence[Decomposer] = (),
                 include_primary: bool = True, notes: Sequence[str] = ()):
        self.unit = unit
        self.primary = primary
        self.notes = list(notes)
        offered: list[Decomposer] = ([primary] if include_primary else []) + list(others)
        self._by_method: dict[str, Decomposer] = {d.method: d for d in [primary, *others]}
        self._offered = offered
        self._allowed: list[Callable[[Option], bool]] = []
        self.emptied_by: str | None = None  # why a restriction left no option, if one did
        self._every: list[Option] | None = None  # computed once: some methods' options cost seconds
        self._options: list[Option] | None = None
        self.coupling: Coupling | None = None
        self._last: tuple[Option, Factorized] | None = None  # the last factorization asked for

    def hold(self, decomposer: Decomposer) -> None:
        """Factorize with `decomposer` when an allocation says so, without offering its options (a
        producer's side of a pair: the consumer's options choose it)."""
        self._by_method[decomposer.method] = decomposer
        self._last = None

    def couple(self, decomposer: Decomposer, coupling: Coupling) -> None:
        """Offer `decomposer`, whose options also cut the producers of `coupling`."""
        self.hold(decomposer)
        self._offered.append(decomposer)
        if self._every is not None:
            self._every += decomposer.options()
        self._options = None
        self.coupling = coupling

    def options(self) -> list[Option]:
        """Every option offered, less those a restriction rules out."""
        if self._every is None:
            with blas_threads(self.unit.params):
                self._every = [option for decomposer in self._offered for option in decomposer.options()]
        if self._options is None:
            self._options = [o for o in self._every if all(allowed(o) for allowed in self._allowed)]
        return self._options

    def restrict(self, allowed: Callable[[Option], bool], note: str) -> None:
        """Offer only the options `allowed` keeps (rank multiples, the latency gate); `note` says why,
        should none be left."""
        self._allowed.append(allowed)
        self._options = None
        if not self.options() and self.emptied_by is None:
            self.emptied_by = note

    def factorize(self, option: Option) -> Factorized:
        """The factors of an option; in float32 when the weight is stored so (all they are written as). The
        last one is kept: consecutive allocations of a search mostly share a unit's option (PP-OCR, lossless,
        profiled: 3.3 s of 57 s went to factorizing the same options again)."""
        if self._last is not None and self._last[0] == option:
            return self._last[1]
        with blas_threads(self.unit.params):
            factorization = self._by_method[option.method].factorize(option.config)
        if self.unit.weight.storage_dtype == np.float32:
            factorization = factorization.in_float32()
        self._last = (option, factorization)
        return factorization

    def park(self, folder: Path, position: int, shelf: Shelf | None = None) -> None:
        """Move the decomposers to files in `folder` (see parking.py); they answer as before."""
        primary = ParkedSpectral(self.primary, folder / f"{position}.{self.primary.method}.pickle", shelf)
        parked: dict[str, Decomposer] = {
            method: primary if d is self.primary else Parked(d, folder / f"{position}.{method}.pickle", shelf)
            for method, d in self._by_method.items()
        }
        self._offered = [parked[d.method] for d in self._offered]
        self._by_method = parked
        self.primary = primary
        self._last = None

    @property
    def offers_any(self) -> bool:
        """Whether any of its methods offers an option, restrictions (rank multiples, timings) aside."""
        self.options()
        return bool(self._every)

    @property
    def offers_others(self) -> bool:
        """Whether methods besides the SVD compete for this unit."""
        return any(d is not self.primary for d in self._offered)

    def primary_only(self) -> UnitDecomposers:
        """The same unit offering its SVD alone (when the SVD is offered at all)."""
        if self.primary not in self._offered:
            return self
        alone = UnitDecomposers(self.unit, self.primary, notes=self.notes)
        alone._allowed, alone.emptied_by = list(self._allowed), self.emptied_by
        return alone

    def probe_option(self, target: float) -> Option | None:
        """The shrinking option whose predicted error is nearest `target` (and above 0): what a
        sensitivity probe factorizes. The SVD's where it has one, so that sensitivities, and with them
        the SVD-only allocation that `--method auto` also validates, are those of `--method svd`."""
        def useful(options: list[Option]) -> list[Option]:
            return [o for o in options if o.params < self.unit.params and o.error > 1e-15]

        pool = useful(self.primary.options()) or useful(self.options())
        return min(pool, key=lambda o: abs(np.log(o.error / target))) if pool else None


def coupled(candidates: Sequence[UnitDecomposers]) -> list[UnitDecomposers]:
    """The consumers of pruned pairs whose producers are among `candidates`, in order."""
    present = {id(candidate) for candidate in candidates}
    return [c for c in candidates
            if c.coupling is not None and all(id(p) in present for p in c.coupling.producers)]


def known_coupling(candidate: UnitDecomposers) -> Coupling:
    if candidate.coupling is None:
        raise RuntimeError(f"unit {candidate.unit.key} is no pruned pair's consumer")
    return candidate.coupling


def pareto_front(options: Sequence[Option], dense_params: int) -> list[Option]:
    """The options below the dense size that no smaller one matches in error, ordered by size: the only
    ones an allocation ever picks."""
    front: list[Option] = []
    for option in sorted(options, key=lambda o: (o.params, o.error)):
        if option.params < dense_params and (not front or option.error < front[-1].error):
            front.append(option)
    return front


def rank_multiple(multiple: int) -> Callable[[Option], bool]:
    """Options whose every rank is a multiple of `multiple` (what the hardware's kernels tile well); a block
    option's rank is its config's first entry (its block size and bits follow)."""
    return lambda option: all(rank % multiple == 0 for rank in _ranks(option))


def _ranks(option: Option) -> tuple[int, ...]:
    return option.config[:1] if option.method in METHOD_BITS or option.method in FACTOR_BITS else option.config


