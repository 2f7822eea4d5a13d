"""Choosing each unit's rank from its spectrum: explicit ranks, an energy threshold, or a parameter budget.

The budget is spent where it buys the most: per unit, the rank minimising params(r) + lambda * error(r)
(error = relative dropped energy), with lambda bisected to meet the budget, then a greedy top-up of the
budget left over. Nothing is saved at or above a unit's break-even rank, so that option is "keep dense".
"""

from __future__ import annotations

import json
import math
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


def by_budget(units: Sequence[Unit], spectra: Sequence[Spectrum], fraction: float) -> list[Choice]:
    """Keep at most `fraction` of the units' parameters, at the least total predicted error."""
    options = [_Options(unit, spectrum) for unit, spectrum in zip(units, spectra)]
    total = sum(unit.params for unit in units)
    budget = fraction * total
    floor = sum(o.params[0] for o in options)
    if floor > budget:
        raise InputError(
            f"target-params {fraction:g} is below what rank 1 everywhere keeps ({floor / total:.3f} of the parameters)"
        )
    # params(lambda) grows with lambda; errors are relative (<= 1) so lambda beyond 1e3 * total keeps all dense
    low, high = -6.0, math.log10(1e3 * total + 1)
    if sum(o.best(10**high)[1] for o in options) <= budget:
        low = high
    for _ in range(100):
        middle = (low + high) / 2
        if sum(o.best(10**middle)[1] for o in options) <= budget:
            low = middle
        else:
            high = middle
    picks = [o.best(10**low)[0] for o in options]
    _top_up(options, picks, budget - sum(o.params[i] for o, i in zip(options, picks)))
    return [o.choice(i) for o, i in zip(options, picks)]


class _Options:
    """A unit's menu for the budget: ranks 1..break-even, then dense (last entry)."""

    def __init__(self, unit: Unit, spectrum: Spectrum):
        self.unit = unit
        ranks = np.arange(1, unit.break_even + 1)
        self.ranks = ranks
        self.params = np.append(ranks * (unit.factor_params(1)), unit.params)
        self.errors = np.append(spectrum.dropped[ranks], 0.0)

    def best(self, weight: float) -> tuple[int, int]:
        index = int(np.argmin(self.params + weight * self.errors))
        return index, int(self.params[index])

    def choice(self, index: int) -> Choice:
        if index == len(self.ranks):
            return Choice(None, "kept dense: its parameters buy more accuracy here than elsewhere")
        return Choice(int(self.ranks[index]))


def _top_up(options: list[_Options], picks: list[int], left: float) -> None:
    """Spend what bisection left of the budget on the steps with the best error drop per parameter."""
    while True:
        best, best_gain = None, 0.0
        for k, (option, index) in enumerate(zip(options, picks)):
            for step in {index + 1, len(option.params) - 1} - {index}:
                if step >= len(option.params) or step < index:
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


def _keep_if_smaller(unit: Unit, rank: int, allow_larger: bool) -> Choice:
    if rank <= unit.break_even or allow_larger:
        return Choice(rank)
    return Choice(None, f"rank {rank} would not shrink it (break-even rank {unit.break_even}); --allow-larger keeps it")
