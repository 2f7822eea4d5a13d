"""The validated searches of the two modes: candidate allocations built, validated in ONNX Runtime (the
evaluator), every trial kept (the report's trace). The sensitivities they weigh units by are sensitivity.py's.

- Compact mode: the allocations along the Lagrangian frontier (params + lambda * sensitivity * error) are
  ordered by size; a bisection over them, each step validated end to end, finds the smallest one whose
  validated error is within the tolerance; then the frontiers of size mode's other weightings, below it.
- Size mode: at the parameter budget, allocations with sensitivity weights s**a (a = 0, 0.5, 1) are
  validated, then (enough held-out samples) the best with one coarse unit raised a step and the others
  lowered to fit (_raised), and the least validated error wins.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx

from ..check.evaluator import Evaluator, Trial
from ..check.metrics import DISCRETE
from ..check.validation import validation
from ..errors import InputError, known
from ..factorize.coupled import COUPLED_METHODS
from ..factorize.menu import Choice, UnitDecomposers, coupled, known_coupling, pareto_front
from ..factorize.rewrite import build, factors_of
from ..graph.splice import Factorized
from ..report import Validation
from .allocation import by_budget, descent, frontier
from .bisection import Edge, predicted_errors

SIZE_MODE_EXPONENTS = (0.0, 0.5, 1.0)
FRONTIERS_MIN_SAMPLES = 32  # held-out samples compact mode needs to search the other weightings' frontiers
PIN_SHARE = 0.5  # of the size between the chosen and the nearest failing allocation, one unit's step (_pinned_below)
RAISED_SHARE = 0.1  # size mode: of the allocation, what the largest unit must hold to be tried larger (_raised)
RAISED_BY = (1.25, 1.6, 2.0)  # the larger options it is tried at: the smallest at least these times its size
RAISED_FLOOR = 0.9  # of the budget: how far below it the others step down
RAISED_STEPS = 2000  # at most this many single steps down to get back within the budget
PIN_FLOOR = 0.8  # of the chosen allocation's size: how far below it the pinned search looks
# too (Silero VAD, 9 held out: the smallest of three searches reached rel-l2 0.085 on new recordings, the
# first one's stays within 0.075)


class Search:
    """Allocations of ranks over the units: build, validate, remember every trial (the report's trace)."""

    def __init__(self, original, adapters, candidates, evaluator: Evaluator, indices, metric, labels, advance=None,
                 memo: dict | None = None,
                 refit: Callable[[dict[str, Factorized]], dict[str, Factorized]] | None = None,
                 refit_candidates: bool = False, accept_bound: bool = False):
        """`memo`: rewrite.build's for this original (shared with the refit); `refit`: solves an allocation's
        factors again for the compressed model's inputs (refit.Refit), every candidate's when
        `refit_candidates` (--refit sequential), else only when asked; `accept_bound`: a candidate passes
        only when its bound for new inputs is within the tolerance too (--accept bound)."""
        self.original = original
        self.adapters = adapters
        self.candidates = candidates
        self.evaluator = evaluator
        self.indices = list(indices)  # the held-out samples
        self.metric = metric
        self.labels = labels
        self.trials: list[Trial] = []
        self.memo: dict = {} if memo is None else memo  # rewrite.build's, for every candidate
        self.steered: list[int] = []  # held-out samples that steered the choice (compact mode's bisection)
        self.advance = advance  # called once per validated trial (a progress bar)
        self.refit = refit
        self.refit_candidates = refit_candidates
        self.accept_bound = accept_bound
        self._refitted: dict[tuple, tuple[dict[str, Factorized], int]] = {}  # the last allocations' refits

    def factors(self, choices: Sequence[Choice], refit: bool | None = None) -> dict[str, Factorized]:
        """The allocation's factors, refit if told to (None: when the search refits its candidates)."""
        return self.refitted(choices, refit)[0]

    def refitted(self, choices: Sequence[Choice], refit: bool | None = None) -> tuple[dict[str, Factorized], int]:
        """The allocation's factors and how many of them were refit (the last two allocations' are kept:
        compact mode validates a candidate on half of the held-out samples, then on all)."""
        solve = self.refit
        if solve is None or not self._refits(refit):
            return factors_of(self.candidates, choices), 0
        key = tuple(choice.option for choice in choices)
        if key not in self._refitted:
            factors = factors_of(self.candidates, choices)
            refitted = solve(factors)
            last = list(self._refitted.items())[-1:]
            self._refitted = {**dict(last), key: (refitted, sum(refitted[k] is not factors[k] for k in factors))}
        return self._refitted[key]

    def _refits(self, refit: bool | None) -> bool:
        return self.refit is not None and (self.refit_candidates if refit is None else refit)

    def passes(self, trial: Trial, tolerance: float) -> bool:
        """Whether a validated candidate is accepted: its value within the tolerance (--accept value), and
        its upper confidence bound for new inputs too (--accept bound)."""
        return trial.value <= tolerance and (not self.accept_bound or known(trial.bound, "the bound") <= tolerance)

    def params(self, choices: Sequence[Choice]) -> int:
        return sum(c.unit.params if ch.option is None else ch.option.params for c, ch in zip(self.candidates, choices))

    def validated(self, choices: list[Choice], indices: Sequence[int] | None = None, metric: str | None = None,
                  refit: bool | None = None) -> Trial:
        """Build and validate one allocation (on all held-out samples, in the search's metric, unless told)."""
        indices = self.indices if indices is None else list(indices)
        labels = None if self.labels is None else self.labels[indices]
        model = build(self.original, self.adapters, self.factors(choices, refit), memo=self.memo)
        candidate = (tuple(choice.option for choice in choices), self._refits(refit))
        judged = self.evaluator.judge(model, indices, metric or self.metric, labels, candidate)
        trial = Trial(choices, self.params(choices), judged.error, len(indices), judged.threat, judged.lost,
                      judged.bound)
        self.trials.append(trial)
        if self.advance is not None:
            self.advance(1)
        return trial

    def compact(self, sensitivity: Sequence[float], tolerance: float) -> Trial | None:
        """The smallest allocation whose validated error is within the tolerance, over the frontiers of
        every weighting size mode tries (None if only the all-dense end passes).

        The frontier of sensitivity weights (exponent 1, all methods) is searched first; on each other
        frontier only the allocations smaller than the best so far are (one validation when its largest such
        allocation fails): the predictions can mislead, and on PP-OCR another weighting is smaller. With
        fewer than FRONTIERS_MIN_SAMPLES held-out samples only the first: the smallest of several searches
        on a few samples is the luckiest. With as many, a unit whose step broke the edge is then pinned and
        the others searched below (_pinned_below).
        """
        self.steered = self.indices[::2]
        best: Trial | None = None
        weightings = self._weightings(sensitivity)
        for view, weights in weightings if len(self.indices) >= FRONTIERS_MIN_SAMPLES else weightings[:1]:
            found = self._smallest_passing(frontier(view, weights), tolerance, None if best is None else best.params,
                                           sensitivity)
            if found is not None:
                best = found
        if best is None or len(self.indices) < FRONTIERS_MIN_SAMPLES:  # few samples: more searches, luckier picks
            return best
        return self._pinned_below(best, tolerance, sensitivity)

    def _pinned_below(self, best: Trial, tolerance: float, sensitivity: Sequence[float]) -> Trial:
        """Where one unit's step holds most of the size between `best` and the failing allocation nearest
        below it (a large table changing precision: its predicted error misled), the frontiers passed that
        step only with every other unit as it was. That unit is pinned at its choice in `best` and the
        others searched again below `best` (a few validations); the smaller passing allocation is kept."""
        failed = [trial for trial in self.trials if trial.params < best.params and trial.value > tolerance]
        if not failed:
            return best
        nearest = max(failed, key=lambda trial: trial.params)
        position = {id(candidate): unit for unit, candidate in enumerate(self.candidates)}
        kept = set()  # a pair pruned in `best`: its units keep their choices together
        for consumer in coupled(self.candidates):
            option = best.choices[position[id(consumer)]].option
            if option is not None and option.method in COUPLED_METHODS:
                kept |= {position[id(member)] for member in (consumer, *known_coupling(consumer).producers)}
        steps = [-np.inf if unit in kept else self._size(best.choices, unit) - self._size(nearest.choices, unit)
                 for unit in range(len(best.choices))]
        unit = int(np.argmax(steps))
        if steps[unit] <= PIN_SHARE * (best.params - nearest.params) or best.choices[unit].option is None:
            return best
        weights = [max(value, 1e-12) for value in sensitivity]
        steps_down = descent(self.candidates, best.choices, weights, kept | {unit}, PIN_FLOOR * best.params)
        found = self._smallest_passing([*steps_down, best.choices], tolerance, best.params, sensitivity)
        return best if found is None else found

    def _size(self, choices: Sequence[Choice], unit: int) -> int:
        option = choices[unit].option
        return self.candidates[unit].unit.params if option is None else option.params

    def _weightings(self, sensitivity: Sequence[float]) -> list[tuple[list[UnitDecomposers], list[float]]]:
        """The candidate views and weights (sensitivity**a) of the allocations compact mode and size mode
        search, sensitivity weights with every method first."""
        views = [self.candidates]
        if any(c.offers_others for c in self.candidates):
            views.append([c.primary_only() for c in self.candidates])
        exponents = sorted(SIZE_MODE_EXPONENTS, key=lambda exponent: exponent != 1.0)
        return [(view, [max(s, 1e-12) ** exponent for s in sensitivity]) for view in views for exponent in exponents]

    def _smallest_passing(self, candidates: list[list[Choice]], tolerance: float, below: int | None,
                          sensitivity: Sequence[float]) -> Trial | None:
        """The smallest of `candidates` (a frontier, in growing size) with fewer parameters than `below`
        whose validated error is within the tolerance, or None.

        Bisection on half of the held-out samples selects; the whole held-out part confirms, and a
        search above the selection (galloping up) runs if it does not: choosing the edge on the same samples
        that certify it would favour candidates that pass by luck. The first candidate not smaller than
        `below` (the dense end, when None) counts as passing without a validation; the one before it, the least
        compression on offer, is validated first: when it fails, nothing on the frontier is searched (a model
        that nothing compresses within the tolerance is refused after one validation per frontier, not a
        bisection each). Below another frontier's best the search steps down from there (galloping), else it
        bisects the whole frontier, at the interpolated edge where the metric is continuous (`interpolated`).
        """
        end = len(candidates) - 1 if below is None else sum(self.params(c) < below for c in candidates)
        edge = Edge(self.validated, [self.steered, self.indices], candidates, tolerance, end,
                    None if self.metric in DISCRETE else predicted_errors(candidates, sensitivity), self.passes)
        if end == 0 or not edge.passes(end - 1, 1):
            return None  # nothing smaller, or the least compression on offer fails already: one validation says no
        # the smallest allocation (rank 1 nearly everywhere) is validated only when the bisection gets there
        chosen = edge.first_passing(-1, end, 1) if below is None else edge.galloping_down()
        if chosen < end and not edge.passes(chosen, 2):
            chosen = edge.galloping_up(chosen)
        return None if chosen == end else edge.tried[(chosen, len(self.indices))]

    def at_budget(self, sensitivity: Sequence[float], fraction: float, asked: str | None = None) -> Trial:
        """At the budget, the least validated error among allocations weighted by sensitivity**a; with
        several methods, also among those using the SVDs alone (predictions can mislead: the winners
        are validated)."""
        seen: dict[tuple, Trial] = {}

        def validate(choices: list[Choice]) -> None:  # each distinct allocation once
            key = tuple(c.option for c in choices)
            if key not in seen:
                seen[key] = self.validated(choices)

        for number, (view, weights) in enumerate(self._weightings(sensitivity)):
            try:
                choices = by_budget(view, fraction, weights, asked)
            except InputError:  # the budget is below what the SVDs alone can reach (every method's can)
                if number == 0:
                    raise
                continue
            validate(choices)
        best = min(seen.values(), key=self.ranked)
        if len(self.indices) < FRONTIERS_MIN_SAMPLES:  # few samples: more candidates, luckier picks
            return best
        for choices in self._raised(best.choices, sensitivity, fraction * sum(c.unit.params for c in self.candidates)):
            validate(choices)
        return min(seen.values(), key=self.ranked)

    def _raised(self, choices: list[Choice], sensitivity: Sequence[float], budget: float) -> list[list[Choice]]:
        """Size mode's counterpart of _pinned_below: the unit holding the most of the allocation (at least
        RAISED_SHARE of it: a large table, whose step between 4 and 8 bits its predicted error can misjudge)
        takes a larger option of its own (the smallest at least RAISED_BY times its size, each), pinned,
        and the others step down (descent) until the budget holds again."""
        weights = [max(value, 1e-12) for value in sensitivity]
        position = {id(candidate): unit for unit, candidate in enumerate(self.candidates)}
        paired = {position[id(member)] for consumer in coupled(self.candidates)
                  for member in (consumer, *known_coupling(consumer).producers)}
        sizes = [-1 if unit in paired or choice.option is None else self._size(choices, unit)
                 for unit, choice in enumerate(choices)]
        unit = int(np.argmax(sizes))
        if sizes[unit] < RAISED_SHARE * self.params(choices):
            return []
        candidate = self.candidates[unit]
        front = pareto_front(candidate.options(), candidate.unit.params)
        raised = {o for o in (next((o for o in front if o.params >= factor * sizes[unit]), None) for factor in RAISED_BY)
                  if o is not None}
        found = []
        for option in sorted(raised, key=lambda option: option.params):
            start = [Choice(option) if where == unit else choice for where, choice in enumerate(choices)]
            within = [c for c in descent(self.candidates, start, weights, paired | {unit}, RAISED_FLOOR * budget,
                                         RAISED_STEPS) if self.params(c) <= budget]
            if within:
                found.append(within[-1])
        return found

    def ranked(self, trial: Trial) -> tuple[float, float]:
        """How a trial ranks among others at one size: by its bound first where that is what is accepted."""
        return (known(trial.bound, "the bound"), trial.value) if self.accept_bound else (trial.value, 0.0)

    def validation(self, model: onnx.ModelProto, tolerance: float | None, confidence: float) -> Validation:
        """The held-out result of `model` and what it promises for new inputs (check/validation.py); the
        samples that steered the choice are left out of the resampled bound."""
        return validation(self.evaluator, model, self.indices, self.labels, self.metric, tolerance, confidence,
                          self.steered, self.accept_bound)

    def closest(self) -> Trial | None:
        """The trial with the least error among those that removed parameters, validated on the whole
        held-out part (None when no trial removed any)."""
        total = sum(c.unit.params for c in self.candidates)
        shrunk = [t for t in self.trials if t.params < total]
        if not shrunk:
            return None
        best = min(shrunk, key=lambda t: (t.value, t.samples != len(self.indices)))
        return best if best.samples == len(self.indices) else self.validated(best.choices)
