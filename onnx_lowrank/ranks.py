"""Choosing each unit's rank from its spectrum: explicit ranks, an energy threshold, or a parameter budget.

The budget is spent where it buys the most: per unit, the rank minimising params(r) + lambda * error(r)
(error = relative dropped energy), with lambda bisected to meet the budget, then a greedy top-up of the
budget left over. Nothing is saved at or above a unit's break-even rank, so that option is "keep dense".
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .layers import Unit
from .svd import Spectrum

FULL = "full"


@dataclass(frozen=True)
class Choice:
    """A unit's rank, or None to keep it dense, with the reason when it stays dense."""

    rank: int | None
    reason: str | None = None


def load_ranks_file(path: str | Path) -> dict[str, int | str]:
    """Read `{"node or weight name" | "*": int | "full"}`; InputError for anything else."""
    try:
        table = json.loads(Path(path).read_text())
    except OSError as error:
        raise InputError(f"cannot read ranks file {path}: {error.strerror or error}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"ranks file {path} is not valid JSON: {error}") from None
    return validate_ranks(table, f"ranks file {path}")


def validate_ranks(table: object, where: str = "ranks") -> dict[str, int | str]:
    if not isinstance(table, dict):
        raise InputError(f"{where} must be a JSON object mapping names to ranks")
    for name, rank in table.items():
        ok = rank == FULL or (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1)
        if not ok:
            raise InputError(f"{where}: rank for {name!r} must be a positive integer or \"full\", got {rank!r}")
    return dict(table)


def explicit(units: Sequence[Unit], table: Mapping[str, int | str], known: set[str], allow_larger: bool) -> list[Choice]:
    """Ranks by node name, then weight name, then "*"; units not named stay dense."""
    unknown = sorted(set(table) - known - {"*"})
    if unknown:
        raise InputError(f"ranks name {unknown[0]!r}, which is neither a node nor a weight of the model")
    choices = []
    for unit in units:
        named = {table[layer.node.name] for layer in unit.layers if layer.node.name in table}
        if len(named) > 1:
            raise InputError(f"nodes sharing weight {unit.weight.name} were given different ranks {sorted(map(str, named))}")
        wanted = named.pop() if named else table.get(unit.weight.name, table.get("*"))
        if wanted is None:
            choices.append(Choice(None, "no rank given"))
            continue
        rank = unit.full_rank if wanted == FULL else min(int(wanted), unit.full_rank)
        choices.append(_keep_if_smaller(unit, rank, allow_larger))
    return choices


def by_energy(units: Sequence[Unit], spectra: Sequence[Spectrum], keep: float, allow_larger: bool) -> list[Choice]:
    """Per unit, the smallest rank keeping `keep` of the singular-value energy."""
    return [_keep_if_smaller(u, max(1, s.rank_for_energy(keep)), allow_larger) for u, s in zip(units, spectra)]


def by_budget(
    units: Sequence[Unit], spectra: Sequence[Spectrum], fraction: float, weights: Sequence[float] | None = None
) -> list[Choice]:
    """Keep at most `fraction` of the units' parameters at the least total (weighted) predicted error."""
    options = _menus(units, spectra, weights)
    total = sum(unit.params for unit in units)
    budget = fraction * total
    floor = sum(o.params[0] for o in options)
    if floor > budget:
        raise InputError(
            f"target-params {fraction:g} is below what rank 1 everywhere keeps ({floor / total:.3f} of the parameters)"
        )
    # params(lambda) grows with lambda: bisect log10(lambda) for the largest that fits the budget
    low, high = LOG_LAMBDA
    if _params(options, high) <= budget:
        low = high
    for _ in range(100):
        middle = (low + high) / 2
        if _params(options, middle) <= budget:
            low = middle
        else:
            high = middle
    picks = [o.best(10**low) for o in options]
    _top_up(options, picks, budget - sum(o.params[i] for o, i in zip(options, picks)))
    _exchange(options, picks, budget)
    return [o.choice(i) for o, i in zip(options, picks)]


def frontier(
    units: Sequence[Unit], spectra: Sequence[Spectrum], weights: Sequence[float] | None = None, points: int = 600
) -> list[list[Choice]]:
    """The distinct allocations params(r) + lambda * weight * error(r) traces as lambda grows: from the
    smallest model (rank 1 nearly everywhere) to the largest; ends with everything dense."""
    options = _menus(units, spectra, weights)
    seen: dict[tuple[int, ...], None] = {}
    for log_lambda in np.linspace(*LOG_LAMBDA, points):
        seen.setdefault(tuple(o.best(10**log_lambda) for o in options), None)
    seen.setdefault(tuple(len(o.params) - 1 for o in options), None)
    return [[o.choice(i) for o, i in zip(options, picks)] for picks in seen]


LOG_LAMBDA = (-6.0, 24.0)  # errors are relative (<= 1 per unit), params counts below 1e12


def _params(options: list[_Menu], log_lambda: float) -> int:
    return sum(int(o.params[o.best(10**log_lambda)]) for o in options)


def _menus(units, spectra, weights) -> list[_Menu]:
    weights = [1.0] * len(units) if weights is None else weights
    return [_Menu(unit, spectrum, weight) for unit, spectrum, weight in zip(units, spectra, weights)]


class _Menu:
    """A unit's options: ranks 1..break-even, then dense (last entry); errors weighted by the unit's
    sensitivity (1 when unknown)."""

    def __init__(self, unit: Unit, spectrum: Spectrum, weight: float):
        ranks = np.arange(1, unit.break_even + 1)
        self.ranks = ranks
        self.params = np.append(ranks * unit.factor_params(1), unit.params)
        self.errors = weight * np.append(spectrum.dropped[ranks], 0.0)

    def best(self, multiplier: float) -> int:
        return int(np.argmin(self.params + multiplier * self.errors))

    def choice(self, index: int) -> Choice:
        if index == len(self.ranks):
            return Choice(None, "kept dense: its parameters buy more accuracy here than elsewhere")
        return Choice(int(self.ranks[index]))


def _top_up(options: list[_Menu], picks: list[int], left: float) -> None:
    """Spend what bisection left of the budget on the steps with the best error drop per parameter."""
    while True:
        best, best_gain = None, 0.0
        for k, (option, index) in enumerate(zip(options, picks)):
            for step in {index + 1, len(option.params) - 1} - {index}:
                if step >= len(option.params):
                    continue
                cost = option.params[step] - option.params[index]
                gain = (option.errors[index] - option.errors[step]) / max(cost, 1)
                if cost <= left and gain > best_gain:
                    best, best_gain = (k, step, cost), gain
        if best is None:
            return
        k, step, cost = best
        picks[k] = step
        left -= cost


def _exchange(options: list[_Menu], picks: list[int], budget: float) -> None:
    """Local search past what lambda can reach (the budget is a knapsack): raise one unit a step, paying
    for it by lowering others where that loses least per parameter freed, while the total error drops."""
    improved = True
    while improved:
        improved = False
        for k, option in enumerate(options):
            if picks[k] == len(option.params) - 1:
                continue
            up = picks[k] + 1
            gain = option.errors[picks[k]] - option.errors[up]
            need = sum(o.params[i] for o, i in zip(options, picks)) + option.params[up] - option.params[picks[k]] - budget
            trial = list(picks)
            trial[k] = up
            loss = 0.0
            while need > 0:
                steps = [
                    ((o.errors[trial[j] - 1] - o.errors[trial[j]]) / (o.params[trial[j]] - o.params[trial[j] - 1]), j)
                    for j, o in enumerate(options)
                    if j != k and trial[j] > 0
                ]
                if not steps:
                    break
                _, j = min(steps)
                loss += options[j].errors[trial[j] - 1] - options[j].errors[trial[j]]
                need -= options[j].params[trial[j]] - options[j].params[trial[j] - 1]
                trial[j] -= 1
            if need <= 0 and loss < gain - 1e-15:
                picks[:] = trial
                improved = True


def _keep_if_smaller(unit: Unit, rank: int, allow_larger: bool) -> Choice:
    if rank <= unit.break_even or allow_larger:
        return Choice(rank)
    return Choice(None, f"rank {rank} would not shrink it (break-even rank {unit.break_even}); --allow-larger keeps it")
