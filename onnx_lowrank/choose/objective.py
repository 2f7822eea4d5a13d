"""What ranks are chosen for (`--objective`): fewest parameters, or parameters that turn into speed.

A factorization that halves a layer's multiply-adds can still run slower: two thin GEMMs use the
hardware worse than one wide one, and odd ranks miss the kernels' tiles. So, except under `size`:
- every rank is a multiple of the provider's tile (RANK_MULTIPLE);
- with calibration data, each unit's factorizations are timed against its dense layer on the
  validation provider (latency.not_slower: a few single-layer timings per unit, cached by shape) and
  only those within MARGIN times the dense time stay on offer. `balanced` (default) keeps what is not
  slower; `latency` keeps what is at least 10% faster. An embedding lookup is a row copy, which a
  factorized table (Gather, then MatMul) can never beat, but its extra microseconds are nothing
  beside the model: `balanced` lets the tables together add up to EMBEDDING_SLACK of the original's
  end-to-end time (an equal share each: BERT's word and position tables had 1% each). Without calibration data there is no activation
  shape to time at, so only the rounding applies (the report's notes say so).
The search then picks among what is left, so the error bound and the size budget still hold.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..check.latency import time_side_by_side
from ..check.layer_timer import LayerTimer
from ..factorize.contracts import Option
from ..factorize.coupled import COUPLED_METHODS
from ..factorize.menu import UnitDecomposers, pareto_front, rank_multiple
from ..observe.activations import Untimeable, timed_activations

OBJECTIVES = ("balanced", "size", "latency")
DEFAULT_OBJECTIVE = "balanced"
RANK_MULTIPLE = {"cpu": 16, "cuda": 64}  # CPU: MLAS packs weights in panels of 16 columns; a rank just past
# a multiple of 16 costs a whole panel more (measured: +5-6% of a 384->r->1536 chain at 33, 49, 65, ...)
# and NCHWc convolutions keep their blocked layout. CUDA: tensor-core tiles.
EMBEDDING_SLACK = 0.01  # balanced: what factorized embedding tables together may add to the model's time
MARGIN = {"balanced": 1.0, "latency": 0.9}  # allowed factorized time, as a fraction of the dense time


def restrict(
    objective: str,
    candidates: Sequence[UnitDecomposers],
    provider: str,
    model: onnx.ModelProto,
    adapters: dict,
    feed: Mapping[str, np.ndarray] | None,
    cache_file=None,
    advance: Callable[[int], None] | None = None,
    others: Iterable[Mapping[str, np.ndarray]] = (),
) -> tuple[LayerTimer | None, list[str]]:
    """Restrict every unit's options to what the objective allows; returns the timer that measured
    them (None when nothing was timed) and notes for the report. Layers timed at their activation on
    `feed`, or on the first of `others` that runs them (an If branch `feed` does not take)."""
    if objective == "size":
        return None, []
    multiple = RANK_MULTIPLE[provider]
    for candidate in candidates:
        candidate.restrict(rank_multiple(multiple), f"no rank that shrinks it is a multiple of {multiple} "
                                                    f"(--objective {objective} on {provider}; size allows any)")
    if feed is None:
        return None, [f"--objective {objective} without calibration data: ranks are multiples of {multiple}, "
                      "but nothing was timed (there is no activation shape to time layers at)"]
    tables = sum(c.unit.op == "Gather" and not c.unit.tied and bool(c.options()) for c in candidates)
    embeddings = objective == "balanced" and tables > 0
    shapes, run_ms = timed_activations(model, [c.unit for c in candidates], feed, provider, timed=embeddings,
                                       others=others)
    timer = LayerTimer(model, adapters, shapes, provider, cache=cache_file)
    slack = 0.0
    if embeddings:  # a 1% allowance needs no precise figure: one warm run of the whole model
        if run_ms is None:
            run_ms = time_side_by_side([model], feed, provider, warmup=1, min_runs=1, min_seconds=0)[0].median_ms
        slack = EMBEDDING_SLACK * run_ms / tables
    for candidate in candidates:
        # a tied embedding table is not timed: its head, most of its work, cannot be cut out alone, and
        # every rank below break-even takes fewer multiply-adds there
        if candidate.options() and not candidate.unit.tied:
            allowed: Callable[[Option], bool]
            try:
                allowed = not_slower(candidate, timer, MARGIN[objective], slack if candidate.unit.op == "Gather" else 0.0)
            except Untimeable as why:
                allowed = _nothing
                note = f"cannot be timed alone ({why}), so kept dense under --objective {objective}"
            else:
                note = f"every factorization is slower than the dense layer on {provider} (measured)"
            candidate.restrict(allowed, note)
        if advance is not None:
            advance(1)
    return timer, []


def _nothing(option: Option) -> bool:
    return False




@dataclass
class Boundary:
    """One method of a unit: the largest option (by parameters) whose factorized layer is not slower
    than `margin` times the dense layer, and the times measured there (at the smallest option when none
    is fast enough)."""

    method: str
    largest: Option | None  # None: even the smallest option is slower
    dense_ms: float
    factorized_ms: float
    timings: int  # options timed by the bisection

    def to_dict(self) -> dict:
        largest = None if self.largest is None else {"config": list(self.largest.config), "params": self.largest.params}
        return {"method": self.method, "largest": largest, "dense_ms": self.dense_ms,
                "factorized_ms": self.factorized_ms, "timings": self.timings}


@dataclass
class LatencyLimit:
    """Which options of a unit are allowed: call it with an Option. An option is allowed when its method's
    largest allowed option has at least as many parameters; a method that was not timed (it offered no
    option then) allows everything."""

    unit: str  # the unit's key
    margin: float
    boundaries: dict[str, Boundary] = field(default_factory=dict)

    def __call__(self, option: Option) -> bool:
        boundary = self.boundaries.get(option.method)
        if boundary is None:
            return True
        return boundary.largest is not None and option.params <= boundary.largest.params

    def to_dict(self) -> dict:
        return {"unit": self.unit, "margin": self.margin, "boundaries": [b.to_dict() for b in self.boundaries.values()]}


def not_slower(candidates: UnitDecomposers, timer, margin: float = 1.0, slack_ms: float = 0.0) -> LatencyLimit:
    """The options of `candidates` whose factorized layer runs within `margin` times the dense layer's
    time plus `slack_ms` (`timer.times(unit, factorization) -> (dense_ms, factorized_ms)`, e.g. a
    LayerTimer).

    Time grows with rank, so per method a bisection over its options on the unit's Pareto front (the only
    ones an allocation picks) ordered by parameters finds the largest allowed one (about log2(options)
    timings); every option of that method up to its size is allowed. Raises Untimeable when the unit cannot be cut out of its model (the caller decides what
    that means: keep it dense, or let it be).
    """
    unit = candidates.unit
    limit = LatencyLimit(unit.key, margin)
    by_method: dict[str, list[Option]] = {}
    for option in pareto_front(candidates.options(), unit.params):  # what an allocation can pick
        if option.method not in COUPLED_METHODS:
            by_method.setdefault(option.method, []).append(option)
    for method, options in by_method.items():
        ordered = sorted(options, key=lambda o: (o.params, o.config))
        limit.boundaries[method] = _boundary(method, ordered, _option_times(candidates, timer), margin, slack_ms)
    return limit


def _option_times(candidates: UnitDecomposers, timer) -> Callable[[Option], tuple[float, float]]:
    """timer.times of an option's factorization, found without factorizing when the timer has it cached
    (`timer.cached`): a layer of a shape timed before (BERT-base: 75 units, 5 shapes) costs no
    decomposition. How a method's ranks read its option configs (a tuple, or its one number) and whether
    it shifts the bias are learned from the unit's first factorization of that method, always made."""
    unit = candidates.unit
    cached = getattr(timer, "cached", None)
    learned: dict[str, tuple[bool, bool] | None] = {}  # per method: (rank is the config tuple, bias shifted)

    def times(option: Option) -> tuple[float, float]:
        known = learned.get(option.method)
        if cached is not None and known is not None:
            whole, shifted = known
            found = cached(unit, option.method, option.config if whole else option.config[0], shifted)
            if found is not None:
                return found
        factorization = candidates.factorize(option)
        if option.method not in learned:
            rank, config = factorization.rank, tuple(option.config)
            reads: bool | None = rank == config if isinstance(rank, tuple) else None  # the rank is the config tuple
            if reads is None and len(config) == 1 and rank == config[0]:
                reads = False
            learned[option.method] = None if reads is None else (reads, factorization.bias_shift is not None)
        return timer.times(unit, factorization)

    return times


def _boundary(method: str, options: list[Option], times: Callable[[Option], tuple[float, float]],
              margin: float, slack_ms: float = 0.0) -> Boundary:
    """Bisection over options ordered by size for the last one within the margin (times grow with size)."""
    measured: dict[int, tuple[float, float]] = {}

    def allowed(position: int) -> bool:
        measured[position] = times(options[position])
        dense, factorized = measured[position]
        return factorized <= margin * dense + slack_ms

    low, high = -1, len(options)  # options[low] is allowed (or low = -1), options[high] is not (or past the end)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if allowed(middle) else (low, middle)
    dense, factorized = measured[max(low, 0)]  # the last allowed, or the first (refused) when none is
    return Boundary(method, options[low] if low >= 0 else None, dense, factorized, len(measured))
