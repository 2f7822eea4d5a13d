"""Compact mode's bisection along one frontier of allocations (growing in size): the first candidate whose
validated error is within the tolerance, found with as few validations as the frontier allows: interpolated
where the metric is continuous, galloping where another frontier's best bounds it."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from ..check.evaluator import Trial
from ..factorize.menu import Choice


class Edge:
    """Compact mode's search along one frontier (Search._smallest_passing): the candidates validated
    (`validate`), on the selecting half of the held-out samples (check 1) and on all of them (check 2)."""

    def __init__(self, validate: Callable[[list[Choice], Sequence[int]], Trial], checks: list[list[int]],
                 candidates: list[list[Choice]], tolerance: float, end: int, predicted: list[float] | None,
                 accepts: Callable[[Trial, float], bool] | None = None):
        """`accepts`: whether a candidate confirmed on every held-out sample passes (Search.passes: its value,
        and with --accept bound its bound for new inputs); by default its value within the tolerance."""
        self.validate, self.candidates, self.tolerance, self.end = validate, candidates, tolerance, end
        self.accepts = accepts or (lambda trial, tolerance: trial.value <= tolerance)
        self.predicted = predicted  # per candidate, on a continuous metric: the bisection interpolates
        self.checks = checks
        self.tried: dict[tuple[int, int], Trial] = {}

    def passes(self, index: int, upto: int) -> bool:
        """Whether a candidate passes the first `upto` checks (the end counts as passing, unvalidated)."""
        if index == self.end:
            return True
        for indices in self.checks[:upto]:
            key = (index, len(indices))
            if key not in self.tried:
                self.tried[key] = self.validate(self.candidates[index], indices)
            if not self._within(self.tried[key], len(indices) == len(self.checks[-1])):
                return False
        return True

    def _within(self, trial: Trial, confirming: bool) -> bool:
        """The selecting half holds the value within the tolerance; the confirmation on every held-out sample
        also the bound where it is accepted by (--accept bound: a bound from half of the samples is wider)."""
        return self.accepts(trial, self.tolerance) if confirming else trial.value <= self.tolerance

    def first_passing(self, low: int, high: int, upto: int) -> int:
        """The first passing index in (low, high] (low fails, high passes): interpolated while that
        halves the interval, else bisected."""
        halved = True
        while high - low > 1:
            width, samples = high - low, len(self.checks[upto - 1])
            middle = None if self.predicted is None or not halved else interpolated(
                low, high, {index: trial.value for (index, count), trial in self.tried.items() if count == samples},
                self.predicted, self.tolerance)
            middle = (low + high) // 2 if middle is None else middle
            low, high = (low, middle) if self.passes(middle, upto) else (middle, high)
            halved = high - low <= width // 2
        return high

    def galloping_down(self) -> int:
        """The first passing index, stepping down 1, 2, 4, ... from the end, then searching the last step:
        below the best so far, the edge is near the end."""
        high, step = self.end, 1
        while high > 0:
            low = max(high - step, 0)
            if not self.passes(low, 1):
                return self.first_passing(low, high, 1)
            high, step = low, step * 2
        return 0

    def galloping_up(self, low: int) -> int:
        """The first index above `low` passing both checks, galloping up: mostly a near miss."""
        step = 1
        while True:
            high = min(low + step, self.end)
            if self.passes(high, 2):
                return self.first_passing(low, high, 2)
            low, step = high, step * 2


def predicted_errors(candidates: list[list[Choice]], sensitivity: Sequence[float]) -> list[float]:
    """Each allocation's predicted error: its units' predicted errors weighted by their sensitivities."""
    return [sum(s * ch.option.error for s, ch in zip(sensitivity, choices) if ch.option is not None)
            for choices in candidates]


def interpolated(low: int, high: int, errors: dict[int, float], predicted: Sequence[float],
                 tolerance: float) -> int | None:
    """The index strictly inside (low, high) of a frontier (predicted errors falling as it grows) where the
    validated error is expected to reach the tolerance: log error taken linear in log predicted error
    through the validated ends, or through the one validated with slope 1. The pick keeps an eighth of
    the interval from either end; None when nothing validated can say (errors of 0, a tolerance of 0).
    On smooth metrics it needs fewer validations than bisection (a validation of SmolLM2 costs ~27 s)."""
    ends = [(math.log(predicted[i]), math.log(errors[i])) for i in (low, high)
            if errors.get(i, 0.0) > 0 and predicted[i] > 0]
    if tolerance <= 0 or not ends:
        return None
    (x, y), slope = ends[0], 1.0
    if len(ends) == 2 and ends[1][0] != x:
        slope = (ends[1][1] - y) / (ends[1][0] - x)
    if slope <= 0:
        return None
    target = x + (math.log(tolerance) - y) / slope
    pick = min(range(low + 1, high), key=lambda i: abs(math.log(max(predicted[i], 1e-300)) - target))
    margin = max(1, (high - low) // 8)
    return min(max(pick, low + margin), high - margin)
