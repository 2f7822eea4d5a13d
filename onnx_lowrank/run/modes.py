"""How each unit's rank is chosen: one class per mode, picked once from the options (`rank_mode_for`).

- ExplicitRanks (`--ranks`) and Energy (`--energy`): per unit, from a table or the spectrum.
- Budget (`--target-params` or `--target-bytes` without data): the least predicted error within the budget.
- ValidatedBudget (the same with data): allocations at the budget validated end to end.
- Compact (data, none of the above): the fewest parameters whose validated error is within the tolerance;
  when none is, it says how close the search came (`refusal`).

A mode sees no run: it allocates from `Menus` and judges an `Outcome`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..check.evaluator import Trial
from ..check.metrics import DEFAULT_TOLERANCE, DISCRETE
from ..choose.allocation import by_budget, by_energy, short_of_budget
from ..choose.ranks_file import explicit
from ..choose.search import Search
from ..errors import InputError, known
from ..factorize.menu import Choice, UnitDecomposers
from ..observe.calibration import DISCRETE_VALIDATION_FRACTION, VALIDATION_FRACTION, Samples, Split, split
from ..options import Options


@dataclass(frozen=True)
class Allocation:
    """Every unit's choice, and the validated trial it came from when a search chose it."""

    choices: list[Choice]
    trial: Trial | None = None
    note: str | None = None  # what the report's notes should say of it (a size mode short of its target)


@dataclass(frozen=True)
class Menus:
    """What a mode allocates from: every unit's options, and with calibration data the search and each
    unit's sensitivity (the stages before the search leave them)."""

    settings: Options
    decomposers: list[UnitDecomposers]
    known: set[str]  # node and tensor names of the model (explicit ranks name them)
    search: Search | None = None
    sensitivity: list[float] | None = None
    share: float | None = None  # the tolerance left to the factorization (int8 may take some)
    budget: float | None = None  # the size modes' share of the factorizable weights (--target-params / -bytes)


@dataclass(frozen=True)
class Outcome:
    """What a mode with a bound judges the written model by: its allocation, the tolerance and the errors."""

    allocation: Allocation
    has_units: bool
    metric: str
    tolerance: float | None
    written_error: float | None  # the written model's validated error (int8 included)
    int8_alone: float | None = None  # int8 of the original alone, when it was measured
    int8_kept: int = 0  # nodes int8 left weight-only or float
    int8: bool = False  # whether the written model is quantized
    accept_bound: bool = False  # a candidate passes only when its bound for new inputs does too (--accept bound)
    decomposers: Sequence[UnitDecomposers] = ()  # the menus (a refusal says what they keep at break-even)
    observed: bool = False  # whether the menus come from statistics of the data


class RankMode:
    """A way of choosing ranks. The flags say what it needs of the stages before it."""

    name = ""  # the report's `mode`
    eager = False  # every option decomposed up front: the mode compares them all
    gated = False  # the objective's latency gate restricts the options on offer
    probes = False  # it weighs units by their measured sensitivity
    shares_tolerance = False  # int8 and the factorization share one tolerance (quantize's fallback)
    sized = True  # the size is fixed before validation: --refit auto refits the chosen ranks (refit.py)

    def tolerance(self, settings: Options) -> float | None:
        return settings.tolerance

    def split(self, samples: Samples, settings: Options) -> Split:
        """The calibration samples the factors are fitted on and those held out to validate."""
        return held_out_split(samples, settings)

    def allocate(self, menus: Menus) -> Allocation:
        raise NotImplementedError

    def closest(self, search: Search | None, outcome: Outcome) -> Trial | None:
        """The candidate to report when the bound is not met (None: nothing to say)."""
        return None

    def refusal(self, outcome: Outcome, closest: Trial | None) -> str | None:
        """Why the written model is refused when the mode found nothing within its bound (None: it is not)."""
        return None


class ExplicitRanks(RankMode):
    name = "ranks"

    def allocate(self, menus: Menus) -> Allocation:
        settings = menus.settings
        ranks = known(settings.ranks, "--ranks")  # the option that picks this mode
        return Allocation(explicit(menus.decomposers, ranks, menus.known, settings.allow_larger))


class Energy(RankMode):
    name = "energy"
    gated = True

    def allocate(self, menus: Menus) -> Allocation:
        settings = menus.settings
        choices = by_energy(menus.decomposers, known(settings.energy, "--energy"), settings.allow_larger)
        return Allocation([_allowed(candidate, choice) for candidate, choice in zip(menus.decomposers, choices)])


class Budget(RankMode):
    name = "size"
    eager = gated = True

    def allocate(self, menus: Menus) -> Allocation:
        choices = by_budget(menus.decomposers, known(menus.budget, "the budget"), asked=_asked(menus))
        return self.noted(menus, Allocation(choices))

    @staticmethod
    def noted(menus: Menus, allocation: Allocation) -> Allocation:
        """The allocation, with a note when it keeps clearly less than the target (allocation.short_of_budget)."""
        settings = menus.settings
        note = short_of_budget(menus.decomposers, allocation.choices, known(menus.budget, "the budget"),
                               settings.objective, "--" + _asked(menus))
        return allocation if note is None else dataclasses.replace(allocation, note=note)


def _asked(menus: Menus) -> str:
    """The option that set the size modes' budget, as a message names it."""
    settings, budget = menus.settings, known(menus.budget, "the budget")
    if settings.target_bytes is None:
        return f"target-params {budget:g}"
    return f"target-bytes {settings.target_bytes:g} (a budget of {budget:.1%} of the factorizable weights)"


class ValidatedBudget(Budget):
    probes = True

    def allocate(self, menus: Menus) -> Allocation:
        search, sensitivity = known(menus.search, "the search"), known(menus.sensitivity, "the sensitivities")
        trial = search.at_budget(sensitivity, known(menus.budget, "the budget"), _asked(menus))
        return self.noted(menus, Allocation(trial.choices, trial))


class Compact(RankMode):
    name = "compact"
    eager = gated = probes = shares_tolerance = True
    sized = False  # the size is what it searches: only --refit sequential refits its candidates

    def tolerance(self, settings: Options) -> float | None:
        return DEFAULT_TOLERANCE[settings.metric] if settings.tolerance is None else settings.tolerance

    def allocate(self, menus: Menus) -> Allocation:
        search, sensitivity = known(menus.search, "the search"), known(menus.sensitivity, "the sensitivities")
        trial = None if menus.share is None else search.compact(sensitivity, menus.share)
        if trial is not None:
            return Allocation(trial.choices, trial)
        return Allocation([Choice(None, "within the tolerance only dense")] * len(menus.decomposers))

    def closest(self, search: Search | None, outcome: Outcome) -> Trial | None:
        return known(search, "the search").closest() if self._found_nothing(outcome) else None

    @staticmethod
    def _found_nothing(outcome: Outcome) -> bool:
        return outcome.allocation.trial is None and outcome.has_units

    def refusal(self, outcome: Outcome, closest: Trial | None) -> str | None:
        tolerance = known(outcome.tolerance, "the tolerance")  # compact mode always has one
        if not self._found_nothing(outcome) or (
                outcome.int8 and known(outcome.written_error, "the written model's error") <= tolerance):
            return None
        if outcome.int8_alone is not None and outcome.int8_alone > tolerance:
            detail = f" (int8 quantization alone reaches {outcome.int8_alone:.4g}" + (
                f" with {outcome.int8_kept} node(s) weight-only or float)" if outcome.int8_kept else ")")
        elif closest is None:
            detail = ""
        else:
            threatened = "" if closest.threat is None else \
                f", with {closest.threat.threatened} calibration decision(s) threatened"
            bound = "" if closest.bound is None else f" and a bound of {closest.bound:.4g} for new inputs"
            detail = (f" (the closest that removes parameters reached {closest.value:.4g} on the held-out part"
                      f"{threatened}{bound})")
        also = " (and its bound for new inputs, --accept bound)" if outcome.accept_bound else ""
        return (f"no factorization keeps {outcome.metric}{also} within {tolerance:g}{detail}"
                f"{energy_at_break_even(outcome.decomposers, outcome.observed)}")


def energy_at_break_even(candidates: Sequence[UnitDecomposers], data: bool) -> str:
    """What `inspect` says of the layers, summarised for a refusal: the energy they keep at their break-even
    ranks (the largest that still save parameters), of their outputs on the data or of their weights."""
    kept = sorted(1.0 - float(c.primary.spectrum.dropped[c.unit.break_even]) for c in candidates if c.unit.break_even > 0)
    if not kept:
        return ""
    spread = f"{kept[0]:.1%}" if kept[0] >= kept[-1] - 0.0005 else f"{kept[0]:.1%} to {kept[-1]:.1%}"
    command = "onnx-lowrank inspect --calib" if data else "onnx-lowrank inspect"
    return (f"; at their break-even ranks, the largest that still save parameters, its {len(kept)} layers keep "
            f"{spread} of their {'output ' if data else ''}energy (median {float(np.median(kept)):.1%}; "
            f"`{command}` lists them): even the least compression on offer drops what the tolerance does not allow")


class Describe(RankMode):
    """`inspect`: no ranks are chosen; the layers are described, from the statistics of every sample."""

    name = "inspect"

    def split(self, samples: Samples, settings: Options) -> Split:
        return Split(fit=list(range(len(samples))), validation=[])


def held_out_split(samples: Samples, settings: Options) -> Split:
    """The seeded split: half held out, three quarters for top1 / accuracy (calibration.py)."""
    discrete = settings.metric in DISCRETE
    return split(samples, settings.seed, DISCRETE_VALIDATION_FRACTION if discrete else VALIDATION_FRACTION)


def rank_mode_for(settings: Options, has_data: bool) -> RankMode:
    """The mode the options ask for (checked against whether calibration data was given)."""
    if settings.ranks is not None:
        return ExplicitRanks()
    if settings.energy is not None:
        return Energy()
    if settings.target_params is not None or settings.target_bytes is not None:
        return ValidatedBudget() if has_data else Budget()
    if not has_data:
        raise InputError("choose ranks with --ranks, --target-params, --target-bytes or --energy, or give --calib "
                         "for compact mode")
    return Compact()


def _allowed(candidate: UnitDecomposers, choice: Choice) -> Choice:
    """An energy-chosen rank as the objective allows it: raised to the next rank on offer (rounded to
    the tile), or dense when none is within the dense size and speed."""
    if choice.option is None:
        return choice
    offered = [o for o in candidate.options() if o.method == choice.option.method]
    if choice.option in offered:
        return choice
    larger = [o for o in offered if o.config >= choice.option.config]
    if larger:
        return Choice(min(larger, key=lambda o: o.config))
    return Choice(None, candidate.emptied_by or "no allowed rank is at least the one the energy asks")
