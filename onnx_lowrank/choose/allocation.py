"""Allocating ranks across units from their menus: an energy threshold, or a parameter budget.

Every unit's menu is the Pareto front of its options among those that shrink it, then "keep dense" (a
pruned pair's units share one front). The budget is spent where it buys the most: per unit, the option
minimising params + lambda * error, with lambda bisected to meet the budget, a greedy top-up of the budget
left over, then an exchange search (the budget is a knapsack that lambda alone cannot always fill well).
`frontier` traces every allocation lambda gives, for the validated searches.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import InputError
from ..factorize.coupled import COUPLED_METHODS
from ..factorize.menu import Choice, UnitDecomposers, coupled, known_coupling, pareto_front
from ..graph.layers import Unit


def by_energy(candidates: Sequence[UnitDecomposers], keep: float, allow_larger: bool) -> list[Choice]:
    """Per unit, the smallest rank of its SVD keeping `keep` of the (singular-value or output) energy."""
    return [keep_if_smaller(c, max(1, c.primary.spectrum.rank_for_energy(keep)), allow_larger) for c in candidates]


def by_budget(candidates: Sequence[UnitDecomposers], fraction: float, weights: Sequence[float] | None = None,
              asked: str | None = None) -> list[Choice]:
    """Keep at most `fraction` of the units' parameters at the least total (weighted) predicted error;
    `asked` names the option that set the budget (default: --target-params at `fraction`)."""
    options = _weighted_fronts(candidates, weights)
    # the budget is over every layer found, whatever the method: units nothing shrinks stay dense in it
    total = sum(c.unit.params for c in candidates)
    budget = fraction * total
    floor = sum(o.params[0] for o in options)
    if floor > budget:
        raise InputError(
            f"{asked or f'target-params {fraction:g}'} is below what the smallest rank everywhere keeps "
            f"({floor / total:.3f} of the parameters; layers no decomposition of the chosen method shrinks stay whole)"
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
    return _scattered(options, picks, len(candidates))


BUDGET_SLACK = 0.005  # a size-mode result further below its target than this (of the parameters) gets a note


def short_of_budget(candidates: Sequence[UnitDecomposers], choices: Sequence[Choice], fraction: float,
                    objective: str, asked: str | None = None) -> str | None:
    """Why a --target-params allocation keeps clearly less than asked (None when it is within BUDGET_SLACK): the
    least predicted error within the target is what is chosen, and the options on offer move in steps (only some
    ranks under --objective balanced / latency), so the allocations nearer the target can predict more error
    (digits CNN at 0.8: one Conv cut to 36% by Tucker-2, 73.7% kept, rather than three layers cut by SVD)."""
    total = sum(c.unit.params for c in candidates)
    kept = sum(c.unit.params if ch.option is None else ch.option.params for c, ch in zip(candidates, choices))
    if not total or kept >= (fraction - BUDGET_SLACK) * total:
        return None
    steps = [c.unit.params - max(shrinking) for c in candidates
             if (shrinking := [o.params for o in c.options() if o.params < c.unit.params])]
    least = f"; the least saving a layer offers is {min(steps):,} parameters ({min(steps) / total:.1%})" if steps else ""
    gate = "" if objective == "size" else (f"; --objective {objective} offers only ranks in hardware-friendly "
                                           "multiples, none slower than the dense layer: --objective size offers every rank")
    return (f"{asked or f'--target-params {fraction:g}'} kept {kept / total:.1%} of the factorizable parameters: the least "
            f"predicted error found within the target is there, the allocations nearer it predicting more (each "
            f"layer's options move in steps{least}){gate}")


CHAIN_OVERHEAD = 2048  # bytes a unit's chain adds beside its weights: node and tensor names, metadata (MiniLM-L2
# int4: about 1.1 KB a unit, which made --target-bytes 0.2 write 20.09% of the file before it was reserved)


def bytes_budget(target: float, file_bytes: int, units: Sequence[Unit]) -> float:
    """The share of the factorizable weights that leaves `target` of the file's bytes: what the model holds
    outside them (graph, biases, norms, what no decomposition applies to) is kept as it is, and each unit's
    chain may add CHAIN_OVERHEAD. The weights are counted in bytes (exact where they share one element type,
    as an export's float weights do)."""
    weights = sum(unit.params * np.dtype(unit.weight.storage_dtype).itemsize for unit in units)
    rest = file_bytes - weights + CHAIN_OVERHEAD * len(units)
    fraction = (target * file_bytes - rest) / weights if weights else 0.0
    if fraction <= 0:
        raise InputError(f"--target-bytes {target:g} keeps {target * file_bytes:,.0f} bytes, less than the "
                         f"{rest:,} the model holds outside its factorizable weights, their chains' names included "
                         f"({rest / file_bytes:.1%} of its file)")
    return min(fraction, 1.0)


def frontier(
    candidates: Sequence[UnitDecomposers], weights: Sequence[float] | None = None, points: int = 600
) -> list[list[Choice]]:
    """The distinct allocations params + lambda * weight * error traces as lambda grows: from the
    smallest model (rank 1 nearly everywhere) to the largest; ends with everything dense."""
    options = _weighted_fronts(candidates, weights)
    seen: dict[tuple[int, ...], None] = {}
    for log_lambda in np.linspace(*LOG_LAMBDA, points):
        seen.setdefault(tuple(o.best(10**log_lambda) for o in options), None)
    seen.setdefault(tuple(len(o.params) - 1 for o in options), None)
    return [_scattered(options, list(picks), len(candidates)) for picks in seen]


def descent(candidates: Sequence[UnitDecomposers], start: Sequence[Choice], weights: Sequence[float],
            pinned: set[int], floor: float, steps: int = 400) -> list[list[Choice]]:
    """Allocations below `start`, in growing size: from `start`, one unit at a time moves to a smaller option
    of its own, the move that adds the least weighted predicted error per parameter saved, while the total
    stays above `floor`; the units at `pinned` positions keep their choice, and no unit takes a pruning (its
    producers would have to follow). Dense where the frontier's
    lambda steps are coarse: a search near one allocation."""
    current, found = list(start), []
    sizes = [c.unit.params if ch.option is None else ch.option.params for c, ch in zip(candidates, current)]
    total = sum(sizes)
    for _ in range(steps):
        move = None
        for position, candidate in enumerate(candidates):
            if position in pinned:
                continue
            chosen = current[position].option
            error = 0.0 if chosen is None else chosen.error
            for option in candidate.options():
                saved = sizes[position] - option.params
                if saved > 0 and option.method not in COUPLED_METHODS:  # a pruning moves its producers too
                    cost = weights[position] * (option.error - error) / saved
                    if move is None or cost < move[0]:
                        move = (cost, position, option)
        if move is None or total - (sizes[move[1]] - move[2].params) < floor:
            break
        _, position, option = move
        total -= sizes[position] - option.params
        sizes[position], current[position] = option.params, Choice(option)
        found.append(list(current))
    return found[::-1]


LOG_LAMBDA = (-6.0, 24.0)  # errors are relative (<= 1 per unit), params counts below 1e12


def _params(options: Sequence[_Front], log_lambda: float) -> int:
    return sum(int(o.params[o.best(10**log_lambda)]) for o in options)


def _scattered(fronts: Sequence[_Front], picks: Sequence[int], count: int) -> list[Choice]:
    """Every unit's choice from the fronts' picks (a pair's front chooses for several units)."""
    choices: list[Choice] = [Choice(None)] * count
    for front, index in zip(fronts, picks):
        for position, choice in zip(front.positions, front.choices(index)):
            choices[position] = choice
    return choices


def _weighted_fronts(candidates: Sequence[UnitDecomposers], weights) -> list[_Front]:
    """One front per unit, but one per pruned pair for its units together. `weights`: per unit, then per
    coupled consumer (in order) the weight of its pruning options (the consumer's own when not given)."""
    weights = [1.0] * len(candidates) if weights is None else list(weights)
    position = {id(candidate): index for index, candidate in enumerate(candidates)}
    pairs: dict[int, tuple[UnitDecomposers, float]] = {}
    for number, consumer in enumerate(coupled(candidates)):
        extra = len(candidates) + number
        pairs[position[id(consumer)]] = (consumer, weights[extra] if extra < len(weights) else
                                         weights[position[id(consumer)]])
    paired = {position[id(p)] for consumer, _ in pairs.values() for p in known_coupling(consumer).producers}
    fronts: list[_Front] = []
    for index, candidate in enumerate(candidates):
        if index in pairs:
            consumer, weight = pairs[index]
            producers = known_coupling(consumer).producers
            members = [_WeightedFront(p, weights[position[id(p)]], position[id(p)]) for p in producers]
            members.append(_WeightedFront(consumer, weights[index], index, excluded=known_coupling(consumer).method))
            fronts.append(_PairFront(consumer, members, weight))
        elif index not in paired:
            fronts.append(_WeightedFront(candidate, weights[index], index))
    return fronts


class _Front:
    """A menu the allocation picks one entry of: sizes ascending, weighted errors descending, the last entry
    everything dense; each entry is a choice for every unit at `positions`."""

    params: np.ndarray
    errors: np.ndarray
    positions: list[int]

    def best(self, multiplier: float) -> int:
        return int(np.argmin(self.params + multiplier * self.errors))

    def choices(self, index: int) -> list[Choice]:
        raise NotImplementedError


class _WeightedFront(_Front):
    """A unit's options that shrink it, on their Pareto front (fewer parameters, then less error) and
    ordered by size, then dense (last entry); errors weighted by the unit's sensitivity (1 if unknown).
    `excluded`: a method left out (a pair's pruning, which its pair's front offers)."""

    def __init__(self, candidate: UnitDecomposers, weight: float, position: int = 0, excluded: str | None = None):
        dense = candidate.unit.params
        front = pareto_front([o for o in candidate.options() if o.method != excluded], dense)
        self.options = front
        self.positions = [position]
        self.params = np.array([o.params for o in front] + [dense])
        self.errors = weight * np.array([o.error for o in front] + [0.0])
        notes = "; ".join(candidate.notes)
        self.empty_reason = candidate.emptied_by or "no decomposition shrinks it" + (f" ({notes})" if notes else "")

    def choice(self, index: int) -> Choice:
        if not self.options:
            return Choice(None, self.empty_reason)
        if index == len(self.options):
            return Choice(None, "kept dense: its parameters buy more accuracy here than elsewhere")
        return Choice(self.options[index])

    def choices(self, index: int) -> list[Choice]:
        return [self.choice(index)]


class _PairFront(_Front):
    """A pruned pair's units as one menu: each factorized as usual (every combination of their own
    options), or the consumer's pruning options with the producers' rows cut alike; on the Pareto front
    of the sums, then everything dense (last entry)."""

    def __init__(self, consumer: UnitDecomposers, members: list[_WeightedFront], weight: float):
        coupling = known_coupling(consumer)
        self.positions = [position for member in members for position in member.positions]
        params, errors = members[0].params, members[0].errors
        picks = np.arange(len(params))[:, None]
        for member in members[1:]:
            params = (params[:, None] + member.params[None, :]).reshape(-1)
            errors = (errors[:, None] + member.errors[None, :]).reshape(-1)
            picks = np.concatenate([np.repeat(picks, len(member.params), axis=0),
                                    np.tile(np.arange(len(member.params)), len(picks))[:, None]], axis=1)
            kept = _pareto(params, errors, int(params[-1]))
            params, errors, picks = params[kept], errors[kept], picks[kept]
        pruning = [o for o in consumer.options() if o.method == coupling.method]
        entries: list[list[Choice]] = [[m.choice(int(i)) for m, i in zip(members, row)] for row in picks]
        for option in pruning:
            cut = [Choice(coupling.producer_option(p, option)) for p in coupling.producers]
            entries.append([*cut, Choice(option)])
        params = np.concatenate([params, [sum(c.option.params for c in e if c.option) for e in entries[len(picks):]]])
        errors = np.concatenate([errors, [weight * o.error for o in pruning]])
        dense = int(sum(m.params[-1] for m in members))
        kept = _pareto(params, errors, dense)
        self.entries = [entries[i] for i in kept] + [[m.choice(len(m.params) - 1) for m in members]]
        self.params = np.append(params[kept], dense)
        self.errors = np.append(errors[kept], 0.0)

    def choices(self, index: int) -> list[Choice]:
        return self.entries[index]


def _pareto(params: np.ndarray, errors: np.ndarray, dense: int) -> np.ndarray:
    """Indices of the entries below `dense` parameters that no smaller one matches in error, by size; the
    all-dense entry (the last one, when its sum is `dense`) is appended."""
    order = np.lexsort((errors, params))
    order = order[params[order] < dense]
    best = np.minimum.accumulate(errors[order])
    improves = np.concatenate([[True], errors[order][1:] < best[:-1]]) if order.size else np.zeros(0, dtype=bool)
    found = order[improves]
    dense_entries = np.flatnonzero(params == dense)
    return np.append(found, dense_entries[-1:]) if dense_entries.size else found


def _top_up(options: Sequence[_Front], picks: list[int], left: float) -> None:
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


def _exchange(options: Sequence[_Front], picks: list[int], budget: float) -> None:
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


def keep_if_smaller(candidate: UnitDecomposers, rank: int, allow_larger: bool) -> Choice:
    unit = candidate.unit
    if rank <= unit.break_even or allow_larger:
        return Choice(candidate.primary.option(rank))
    return Choice(None, f"rank {rank} would not shrink it (break-even rank {unit.break_even}); --allow-larger keeps it")
