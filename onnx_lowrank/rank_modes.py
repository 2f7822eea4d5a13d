"""How each unit's rank is chosen: one class per mode, picked once from the options (`rank_mode_for`).

- ExplicitRanks (`--ranks`) and Energy (`--energy`): per unit, from a table or the spectrum.
- Budget (`--target-params` without data): the least predicted error within the parameter budget.
- ValidatedBudget (`--target-params` with data): allocations at the budget validated end to end.
- Compact (data, none of the above): the fewest parameters whose validated error is within the tolerance;
  when none is, it says how close the search came (`diagnose`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .calibration import DISCRETE_VALIDATION_FRACTION, VALIDATION_FRACTION, Samples, Split, split
from .errors import BoundNotMet, InputError, known
from .metrics import DEFAULT_TOLERANCE
from .options import Options
from .ranks import Choice, UnitDecomposers, by_budget, by_energy, explicit, short_of_budget
from .rewrite import build
from .search import Trial

if TYPE_CHECKING:
    from .pipeline import Run


@dataclass(frozen=True)
class Allocation:
    """Every unit's choice, and the validated trial it came from when a search chose it."""

    choices: list[Choice]
    trial: Trial | None = None


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

    def allocate(self, run: Run) -> Allocation:
        raise NotImplementedError

    def closest(self, run: Run) -> Trial | None:
        """The candidate to report when the bound is not met (None: nothing to say)."""
        return None

    def diagnose(self, run: Run) -> None:
        """Raise BoundNotMet, with what was closest, when the mode found nothing within its bound."""


class ExplicitRanks(RankMode):
    name = "ranks"

    def allocate(self, run: Run) -> Allocation:
        settings = run.settings
        ranks = known(settings.ranks, "--ranks")  # the option that picks this mode
        return Allocation(explicit(run.decomposers, ranks, run.known, settings.allow_larger))


class Energy(RankMode):
    name = "energy"
    gated = True

    def allocate(self, run: Run) -> Allocation:
        choices = by_energy(run.decomposers, known(run.settings.energy, "--energy"), run.settings.allow_larger)
        return Allocation([_allowed(candidate, choice) for candidate, choice in zip(run.decomposers, choices)])


class Budget(RankMode):
    name = "size"
    eager = gated = True

    def allocate(self, run: Run) -> Allocation:
        choices = by_budget(run.decomposers, known(run.settings.target_params, "--target-params"))
        return self.noted(run, Allocation(choices))

    @staticmethod
    def noted(run: Run, allocation: Allocation) -> Allocation:
        """The allocation, with a note in the run when it keeps clearly less than the target (ranks.short_of_budget)."""
        note = short_of_budget(run.decomposers, allocation.choices, known(run.settings.target_params, "--target-params"),
                               run.settings.objective)
        if note is not None and note not in run.notes:
            run.notes.append(note)
        return allocation


class ValidatedBudget(Budget):
    probes = True

    def allocate(self, run: Run) -> Allocation:
        search, sensitivity = known(run.search, "the search"), known(run.sensitivity, "the sensitivities")
        trial = search.at_budget(sensitivity, known(run.settings.target_params, "--target-params"))
        return self.noted(run, Allocation(trial.choices, trial))


class Compact(RankMode):
    name = "compact"
    eager = gated = probes = shares_tolerance = True
    sized = False  # the size is what it searches: only --refit sequential refits its candidates

    def tolerance(self, settings: Options) -> float | None:
        return DEFAULT_TOLERANCE[settings.metric] if settings.tolerance is None else settings.tolerance

    def allocate(self, run: Run) -> Allocation:
        search, sensitivity = known(run.search, "the search"), known(run.sensitivity, "the sensitivities")
        trial = None if run.share is None else search.compact(sensitivity, run.share)
        if trial is not None:
            return Allocation(trial.choices, trial)
        return Allocation([Choice(None, "within the tolerance only dense")] * len(run.decomposers))

    def closest(self, run: Run) -> Trial | None:
        return known(run.search, "the search").closest() if self._found_nothing(run) else None

    def _found_nothing(self, run: Run) -> bool:
        return run.chosen.trial is None and bool(run.units)

    def diagnose(self, run: Run) -> None:
        int8, tolerance = run.int8, known(run.tolerance, "the tolerance")  # compact mode always has one
        if not self._found_nothing(run) or (
                int8 is not None and known(run.written_error, "the written model's error") <= tolerance):
            return
        closest, search, report = run.closest, known(run.search, "the search"), known(run.report, "the report")
        report.validation = None if closest is None else dataclasses.replace(
            search.validation(build(run.original, run.adapters, search.factors(closest.choices), memo=search.memo),
                              tolerance, run.settings.confidence), passed=False)
        if int8 is not None and int8.alone_error is not None and int8.alone_error > tolerance:
            kept = len(int8.floats) + len(int8.weight_only)
            detail = f" (int8 quantization alone reaches {int8.alone_error:.4g}" + (
                f" with {kept} node(s) weight-only or float)" if kept else ")")
        elif closest is None:
            detail = ""
        else:
            threatened = "" if closest.threat is None else \
                f", with {closest.threat.threatened} calibration decision(s) threatened"
            bound = "" if closest.bound is None else f" and a bound of {closest.bound:.4g} for new inputs"
            detail = (f" (the closest that removes parameters reached {closest.value:.4g} on the held-out part"
                      f"{threatened}{bound})")
        also = " (and its bound for new inputs, --accept bound)" if run.settings.accept == "bound" else ""
        raise BoundNotMet(f"no factorization keeps {run.settings.metric}{also} within {tolerance:g}{detail}"
                          f"{energy_at_break_even(run.decomposers, run.statistics is not None)}", report)


def energy_at_break_even(candidates: list[UnitDecomposers], data: bool) -> str:
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
    discrete = settings.metric in ("top1", "accuracy")
    return split(samples, settings.seed, DISCRETE_VALIDATION_FRACTION if discrete else VALIDATION_FRACTION)


def rank_mode_for(settings: Options, has_data: bool) -> RankMode:
    """The mode the options ask for (checked against whether calibration data was given)."""
    if settings.ranks is not None:
        return ExplicitRanks()
    if settings.energy is not None:
        return Energy()
    if settings.target_params is not None:
        return ValidatedBudget() if has_data else Budget()
    if not has_data:
        raise InputError("choose ranks with --ranks, --target-params or --energy, or give --calib for compact mode")
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
