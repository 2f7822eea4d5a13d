"""Building candidate models, validating them in ONNX Runtime, and the searches of the two modes.

- Sensitivity: per unit, one probe model with only that unit factorized (at about 1% predicted error)
  measures how much the final outputs move per unit of the unit's predicted error.
- Compact mode: the allocations along the Lagrangian frontier (params + lambda * sensitivity * error) are
  ordered by size; a bisection over them, each step validated end to end, finds the smallest one whose
  validated error is within the tolerance; then the frontiers of size mode's other weightings, below it.
- Size mode: at the parameter budget, allocations with sensitivity weights s**a (a = 0, 0.5, 1) are
  validated and the least validated error wins.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from .calibration import Samples
from .decompositions import Factorized
from .errors import InputError, known
from .generalization import (
    DISCRETE,
    Decisions,
    Threat,
    beyond_maximum,
    bootstrap,
    clopper_pearson,
    decisions,
    margins_for,
    threat,
)
from .layers import Unit
from .metrics import Outputs, lost_decisions, score
from .overrides import Override, with_overridable
from .prune import KeptOutputs, pruned_probe
from .ranks import Choice, UnitDecomposers, by_budget, coupled, frontier
from .report import Validation
from .rewrite import build, factors_of
from .runtime import Session, session_with_outputs, with_outputs
from .statistics import Moments

PROBE_ERROR = 0.01  # predicted relative error at which each unit's sensitivity is probed
PROBE_SAMPLES = 16  # fit samples a probe runs on, at most ...
PROBE_MIN_SAMPLES = 2  # ... and at least, within PROBE_MACS multiply-adds of the factorizable layers in all
PROBE_MACS = 2e12  # (one probe per unit). BERT-base at 128 tokens: 2 samples (about 30 s on 2 cores); MiniLM-L6
# at 64 tokens: 16. Measured on MiniLM-L6: 2 samples rank its units' sensitivities as 16 do (Spearman 0.95-0.98
# for four disjoint pairs; 4 samples 0.98-0.99), and the half-size allocations they lead to validated at
# 0.1156-0.1204 mean cosine error, 16 samples' at 0.1195
SIZE_MODE_EXPONENTS = (0.0, 0.5, 1.0)
FRONTIERS_MIN_SAMPLES = 32  # held-out samples compact mode needs to search the other weightings' frontiers
# too (Silero VAD, 9 held out: the smallest of three searches reached rel-l2 0.085 on new recordings, the
# first one's stays within 0.075)


SATURATING = ("Softmax", "LogSoftmax", "Sigmoid")


def probe_outputs(model: onnx.ModelProto) -> list[str]:
    """The tensors sensitivity is measured on: each graph output, or the input of the Softmax /
    LogSoftmax / Sigmoid it comes from through Identity nodes (saturated probabilities hardly move while
    logits do)."""
    producers = {name: node for node in model.graph.node for name in node.output}
    names = []
    for output in model.graph.output:
        name = output.name
        while name in producers and producers[name].op_type == "Identity":
            name = producers[name].input[0]
        node = producers.get(name)
        names.append(node.input[0] if node is not None and node.op_type in SATURATING else output.name)
    return names


@dataclass(frozen=True)
class Judged:
    """A candidate's validated error and, for top1 / accuracy, its margin analysis (generalization.py)."""

    error: float
    threat: Threat | None = None
    lost: tuple[int, int] | None = None  # top1 / accuracy: decisions lost, of decisions made (held-out)
    bound: float | None = None  # the upper confidence bound for new inputs, where asked (--accept bound)

    @property
    def value(self) -> float:
        """What the search holds within the tolerance: the error seen (for top1 / accuracy, less the
        held-out near-ties lost where they are exempt), or the fraction of calibration decisions threatened
        when that is larger."""
        if self.threat is None or self.lost is None:
            return self.error
        lost, total = self.lost
        counted = lost - (self.threat.ties_lost if self.threat.exempt else 0)
        return max(counted / max(total, 1), self.threat.predicted)


class Evaluator:
    """Runs candidates on calibration samples and scores them against the original's outputs: the graph
    outputs for validation, the probe tensors (logits rather than probabilities) for sensitivity."""

    def __init__(self, original: onnx.ModelProto, samples: Samples, provider: str, batch_size: int,
                 overrides: dict[str, Override] | None = None, compared: Sequence[str] | None = None,
                 decisions: dict[str, Decisions] | None = None):
        """`decisions`: the original's, by tensor name, where another evaluator found them already."""
        self.samples = samples
        self.batch_size = batch_size
        self.provider = provider
        self.overrides = overrides or {}  # by unit key: how to probe the unit in the original's session
        every = [o.name for o in original.graph.output]
        # the graph outputs the metric reads (perplexity: the logits alone, not a KV cache), every one by
        # default; sensitivity is probed on the same ones
        self.output_names = list(compared) if compared else every
        probes = dict(zip(every, probe_outputs(original)))
        self.probe_names = [probes[name] for name in self.output_names]
        probing = onnx.ModelProto()
        probing.CopyFrom(original)  # the extra outputs and inputs must not leak into the caller's model
        with_overridable(probing, self.overrides.values())
        self._original = Session(with_outputs(probing, self.probe_names), provider, source="the input model")
        self.provider_used = self._original.provider
        self._references: dict[tuple, dict[int, list[np.ndarray]]] = {}  # by output names, per sample
        self._decisions: dict[str, Decisions] = dict(decisions or {})
        self._last: tuple[Hashable, dict[int, list[np.ndarray]]] | None = None  # a candidate's outputs per sample
        self.exempt_ties = True  # top1 / accuracy: near-ties are not held against the tolerance (--ties)
        self.bound_confidence: float | None = None  # judge() gives each candidate's unseen bound (--accept bound)

    def outputs(self, session: Session, indices: Sequence[int], names: list[str], fed: dict | None = None) -> Outputs:
        """Per named tensor, per sample: its values (rows along axis 0 when the samples are stacked);
        `fed`: overridden initializers, fed with every batch."""
        collected: Outputs = [[] for _ in names]
        for chunk, feed in self.samples.batches(list(indices), self.batch_size):
            for store, value in zip(collected, session.run({**feed, **(fed or {})}, names)):
                if self.samples.batched and value.ndim and value.shape[0] == len(chunk):
                    store.extend(np.split(value, len(chunk)))
                else:
                    store.append(value)
        return collected

    def reference(self, indices: Sequence[int], names: list[str]) -> Outputs:
        """The original's outputs, each sample run once."""
        def finite(found: Outputs) -> None:
            for name, values in zip(names, found):
                if any(v.dtype.kind == "f" and not np.isfinite(v).all() for v in values):
                    raise InputError(f"the input model computes NaN or Inf in {name!r} on the calibration data")

        known = self._references.setdefault(tuple(names), {})
        return self._per_sample(known, indices, names, lambda: self._original, finite)

    def _per_sample(self, known: dict[int, list[np.ndarray]], indices: Sequence[int], names: list[str],
                    open_session: Callable[[], Session], check: Callable[[Outputs], None] | None = None) -> Outputs:
        """`outputs` on `indices`, run only on the samples `known` lacks (it gains them) where a run gives
        one value per sample; `check` sees what was run."""
        missing = [index for index in indices if index not in known]
        if missing:
            found = self.outputs(open_session(), missing, names)
            if check is not None:
                check(found)
            if any(len(values) != len(missing) for values in found):  # not per sample: nothing is ever known
                return found
            known.update({index: [values[p] for values in found] for p, index in enumerate(missing)})
        return [[known[index][n] for index in indices] for n in range(len(names))]

    def error(self, model: onnx.ModelProto, indices: Sequence[int], metric: str, labels=None) -> float:
        """The metric over the graph outputs of a candidate."""
        candidate = self.outputs(Session(model, self.provider), indices, self.output_names)
        return score(metric, self.reference(indices, self.output_names), candidate, labels)

    def judge(self, model: onnx.ModelProto, indices: Sequence[int], metric: str, labels=None,
              candidate: Hashable | None = None) -> Judged:
        """The metric and, for top1 / accuracy, how many calibration decisions the candidate threatens,
        from one run on the held-out samples (the model is left as it was). `candidate`: what the model
        was built from; the last candidate judged under the same key is not run again on the samples it
        already ran on (compact mode confirms on every held-out sample what half of them selected)."""
        confidence = self.bound_confidence
        if metric not in DISCRETE:
            found = self._candidate_outputs(lambda: Session(model, self.provider), indices, self.output_names,
                                            candidate)
            reference = self.reference(indices, self.output_names)
            bound = None if confidence is None else bootstrap(metric, reference, found, confidence, labels=labels)
            return Judged(score(metric, reference, found, labels), bound=bound)
        names = self.decision_names(metric)
        found = self._candidate_outputs(lambda: session_with_outputs(model, names, self.provider), indices,
                                        self.output_names + names, candidate)
        outputs, logits = found[: len(self.output_names)], found[len(self.output_names) :]
        lost, total = lost_decisions(metric, self.reference(indices, self.output_names), outputs, labels)
        threats = [self.threat(indices, name, after, labels) for name, after in zip(names, logits)]
        bound = None if confidence is None else clopper_pearson(lost, total, confidence)
        return Judged(lost / max(total, 1), max(threats, key=lambda t: t.predicted), (lost, total), bound)

    def _candidate_outputs(self, open_session: Callable[[], Session], indices: Sequence[int], names: list[str],
                           candidate: Hashable | None) -> Outputs:
        """`outputs` of a candidate; those of the samples the last candidate of the same key ran on are kept."""
        key = (candidate, tuple(names))
        if candidate is None or self._last is None or self._last[0] != key:
            self._last = None if candidate is None else (key, {})
        return self._per_sample({} if self._last is None else self._last[1], indices, names, open_session)

    def decision_names(self, metric: str) -> list[str]:
        """The tensors whose margins decide: per float graph output (accuracy: the first), its logits (the
        input of its Softmax) when they have the output's shape, else the output itself."""
        first = [0]
        outputs = self.reference(first, self.output_names)
        logits = self.reference(first, self.probe_names)
        names = [probe if logit[0].shape == o[0].shape else output
                 for output, probe, o, logit in zip(self.output_names, self.probe_names, outputs, logits)
                 if o and o[0].dtype.kind == "f"]
        return names[:1] if metric == "accuracy" else names

    def threat(self, indices: Sequence[int], name: str, after: list[np.ndarray], labels=None) -> Threat:
        """The calibration decisions threatened by a candidate whose `name` tensor on the held-out
        `indices` is `after` (generalization.threat)."""
        everything = self.decisions(name)
        before = self.reference(indices, [name])[0]
        classes = decisions(before, labels).classes
        return threat(everything, margins_for(before, classes), margins_for(after, classes), self.exempt_ties)

    def decisions(self, name: str) -> Decisions:
        """The original's decisions on every calibration sample, fit part included."""
        if name not in self._decisions:  # the logits themselves are not kept: only margins and classes
            every = list(range(len(self.samples)))
            self._decisions[name] = decisions(self.outputs(self._original, every, [name])[0], self.samples.labels)
        return self._decisions[name]

    def probe_error(self, model: onnx.ModelProto, indices: Sequence[int]) -> float:
        """Squared relative L2 error of the probe tensors of a candidate (changed in place)."""
        session = Session(with_outputs(model, self.probe_names), self.provider)
        candidate = self.outputs(session, indices, self.probe_names)
        return score("rel-l2", self.reference(indices, self.probe_names), candidate) ** 2

    def probe_error_fed(self, fed: dict[str, np.ndarray], indices: Sequence[int]) -> float:
        """The same for the original fed other values of its overridable initializers (overrides.py)."""
        reference = self.reference(indices, self.probe_names)  # the input model as it is: a failure is the user's
        try:
            candidate = self.outputs(self._original, indices, self.probe_names, fed)
        except InputError as error:  # the same session fed our values: a failure is ours, not bad input
            raise RuntimeError(f"{error} (fed a probe's overridden initializers)") from error
        return score("rel-l2", reference, candidate) ** 2


class _Edge:
    """Compact mode's search along one frontier (Search._smallest_passing): the candidates validated, on
    the selecting half of the held-out samples (check 1) and on all of them (check 2)."""

    def __init__(self, search: Search, candidates: list[list[Choice]], tolerance: float, end: int,
                 predicted: list[float] | None):
        self.search, self.candidates, self.tolerance, self.end = search, candidates, tolerance, end
        self.predicted = predicted  # per candidate, on a continuous metric: the bisection interpolates
        self.checks = [search.steered, search.indices]
        self.tried: dict[tuple[int, int], Trial] = {}

    def passes(self, index: int, upto: int) -> bool:
        """Whether a candidate passes the first `upto` checks (the end counts as passing, unvalidated)."""
        if index == self.end:
            return True
        for indices in self.checks[:upto]:
            key = (index, len(indices))
            if key not in self.tried:
                self.tried[key] = self.search.validated(self.candidates[index], indices)
            if not self._within(self.tried[key], len(indices) == len(self.search.indices)):
                return False
        return True

    def _within(self, trial: Trial, confirming: bool) -> bool:
        """The selecting half holds the value within the tolerance; the confirmation on every held-out sample
        also the bound where it is accepted by (--accept bound: a bound from half of the samples is wider)."""
        return self.search.passes(trial, self.tolerance) if confirming else trial.value <= self.tolerance

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


def probe_count(units: Sequence, positions: Sequence[float]) -> int:
    """How many fit samples sensitivity probes run on: PROBE_SAMPLES unless a probe of every unit on that
    many would exceed the PROBE_MACS budget (one sample: params x the positions each layer applies its weight
    at per sample, summed over the factorizable layers)."""
    per_sample = sum(unit.params * count for unit, count in zip(units, positions))
    affordable = int(PROBE_MACS // (per_sample * len(units))) if per_sample > 0 else PROBE_SAMPLES
    return min(PROBE_SAMPLES, max(PROBE_MIN_SAMPLES, affordable))


def positions_seen(statistics: Sequence, fit: int) -> list[float]:
    """Per unit, the positions (rows, pixels, tokens) it saw per fit sample, from its moments (0 for a
    lookup table: a Gather multiplies nothing)."""
    return [stats.count / fit if isinstance(stats, Moments) and fit else 0.0 for stats in statistics]


def positions_of(units: Sequence[Unit], shapes: dict[str, tuple[int, ...]]) -> list[float]:
    """The same from each unit's data input's shape on one sample (`latency.activation_shapes`), where no
    statistics were gathered (--no-data): its elements over the features one position holds (a strided
    Conv's over its strides as well: it applies its weight at output positions)."""
    found = []
    for unit in units:
        shape, op = shapes.get(unit.key), unit.layers[0].node.op
        if shape is None or op == "Gather" or not shape:
            found.append(0.0)
            continue
        groups, _, inputs = unit.matrix_shape
        features = shape[1] if op in ("Conv", "ConvTranspose") else groups * inputs
        strides = unit.layers[0].node.attrs.get("strides", []) if op == "Conv" else []  # a Conv's output positions
        found.append(math.prod(shape) / max(features, 1) / math.prod(strides))
    return found


@dataclass
class Trial:
    """One validated candidate of a search."""

    choices: list[Choice]
    params: int  # parameters of the factorizable units after factorization
    error: float
    samples: int  # how many held-out samples it was validated on
    threat: Threat | None = None  # top1 / accuracy: the margin analysis (generalization.py)

    lost: tuple[int, int] | None = None  # top1 / accuracy: decisions lost, of decisions made
    bound: float | None = None  # the upper confidence bound for new inputs (--accept bound)

    @property
    def value(self) -> float:
        """What the search compares with the tolerance (Judged.value)."""
        return Judged(self.error, self.threat, self.lost).value


def sensitivities(
    original: onnx.ModelProto,
    adapters: dict,
    candidates: Sequence[UnitDecomposers],
    evaluator: Evaluator,
    probe: Sequence[int],
    advance: Callable[[int], None] | None = None,
) -> list[float]:
    """Final-output (logit) squared relative error per unit of predicted error, one unit at a time (each
    probed with its option nearest PROBE_ERROR): fed to the original's session where the evaluator has
    an override for the unit, else in a model built with the unit factorized. Then, per pruned pair (in
    the order of `ranks.coupled`), its pruning's own: the consumer's refit fed the same way (its producers
    left whole), else the pair built pruned."""
    def probed(key: str, factors: dict[str, Factorized]) -> float:
        """The error of `factors` (unit `key`'s, with its pair's), fed to the original's session where every
        unit's can be, else built. A pruned pair's producers stay whole there: the consumer's zero columns
        drop what they keep extra."""
        fed: dict[str, np.ndarray] = {}
        for name, factorized in factors.items():
            override = evaluator.overrides.get(name)
            feed = None if override is None else override.feed(factorized)
            if feed is None and (name == key or not isinstance(factorized, KeptOutputs)):
                return evaluator.probe_error(build(original, adapters, factors), probe)
            fed.update(feed or {})
        return evaluator.probe_error_fed(fed, probe)

    found = []
    for candidate in candidates:
        option = candidate.probe_option(PROBE_ERROR)
        if option is None:
            found.append(0.0)
        else:
            key = candidate.unit.key
            factors = candidate.factorize(option)
            found.append(probed(key, {key: factors}) / factors.predicted_error)
        if advance is not None:
            advance(1)
    for consumer in coupled(candidates):
        pruned = pruned_probe(consumer, PROBE_ERROR)
        if pruned is None:
            found.append(0.0)
        else:
            pair, predicted = pruned
            found.append(probed(consumer.unit.key, pair) / predicted)
        if advance is not None:
            advance(1)
    return found


class Search:
    """Allocations of ranks over the units: build, validate, remember every trial (the report's trace)."""

    def __init__(self, original, adapters, candidates, evaluator: Evaluator, indices, metric, labels, advance=None):
        self.original = original
        self.adapters = adapters
        self.candidates = candidates
        self.evaluator = evaluator
        self.indices = list(indices)  # the held-out samples
        self.metric = metric
        self.labels = labels
        self.trials: list[Trial] = []
        self.memo: dict = {}  # rewrite.build's, for every candidate
        self.steered: list[int] = []  # held-out samples that steered the choice (compact mode's bisection)
        self.advance = advance  # called once per validated trial (a progress bar)
        self.refit: Callable[[dict[str, Factorized]], dict[str, Factorized]] | None = None  # refit.Refit
        self.refit_candidates = False  # whether every candidate is refit (--refit sequential), or none
        self.accept_bound = False  # a candidate passes only when its unseen bound is within the tolerance too
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
        on a few samples is the luckiest.
        """
        self.steered = self.indices[::2]
        best: Trial | None = None
        weightings = self._weightings(sensitivity)
        for view, weights in weightings if len(self.indices) >= FRONTIERS_MIN_SAMPLES else weightings[:1]:
            found = self._smallest_passing(frontier(view, weights), tolerance, None if best is None else best.params,
                                           sensitivity)
            if found is not None:
                best = found
        return best

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
        edge = _Edge(self, candidates, tolerance, end,
                     None if self.metric in DISCRETE else predicted_errors(candidates, sensitivity))
        if end == 0 or not edge.passes(end - 1, 1):
            return None  # nothing smaller, or the least compression on offer fails already: one validation says no
        # the smallest allocation (rank 1 nearly everywhere) is validated only when the bisection gets there
        chosen = edge.first_passing(-1, end, 1) if below is None else edge.galloping_down()
        if chosen < end and not edge.passes(chosen, 2):
            chosen = edge.galloping_up(chosen)
        return None if chosen == end else edge.tried[(chosen, len(self.indices))]

    def at_budget(self, sensitivity: Sequence[float], fraction: float) -> Trial:
        """At the budget, the least validated error among allocations weighted by sensitivity**a; with
        several methods, also among those using the SVDs alone (predictions can mislead: the winners
        are validated)."""
        seen: dict[tuple, Trial] = {}
        for view, weights in self._weightings(sensitivity):
            choices = by_budget(view, fraction, weights)
            key = tuple(c.option for c in choices)
            if key not in seen:
                seen[key] = self.validated(choices)
        return min(seen.values(), key=self.ranked)

    def ranked(self, trial: Trial) -> tuple[float, float]:
        """How a trial ranks among others at one size: by its bound first where that is what is accepted."""
        return (known(trial.bound, "the bound"), trial.value) if self.accept_bound else (trial.value, 0.0)

    def validation(self, model: onnx.ModelProto, tolerance: float | None, confidence: float) -> Validation:
        """The held-out result of `model` and what it promises for new inputs (generalization.py)."""
        indices = self.indices
        labels = None if self.labels is None else self.labels[indices]
        common = {"metric": self.metric, "tolerance": tolerance, "provider": self.evaluator.provider_used,
                  "samples": len(indices), "confidence": confidence, "outputs": list(self.evaluator.output_names),
                  "accept": "bound" if self.accept_bound else "value"}
        if self.metric in DISCRETE:
            judged = self.evaluator.judge(model, indices, self.metric, labels)
            lost, total = known(judged.lost, "the decisions lost")  # judged on a discrete metric
            found = known(judged.threat, "the threat")
            bound = clopper_pearson(lost, total, confidence)
            return Validation(value=judged.value, passed=self._passed(judged.value, bound, tolerance),
                              unseen_bound=bound, decisions=total, lost=lost,
                              threatened=found.threatened, calibration_decisions=found.decisions,
                              ties=found.ties, ties_lost=found.ties_lost, ties_exempt=found.exempt,
                              predicted_unseen=found.predicted, **common)
        names = self.evaluator.output_names
        candidate = self.evaluator.outputs(Session(model, self.evaluator.provider), indices, names)
        reference = self.evaluator.reference(indices, names)
        error = score(self.metric, reference, candidate, labels)
        # resampled: the held-out samples that did not steer the choice (the others favour it)
        steered = set(self.steered)
        kept = [position for position, index in enumerate(indices) if index not in steered]
        kept = kept if len(kept) >= len(indices) // 4 else list(range(len(indices)))
        if self.metric == "max-abs":
            bound = beyond_maximum(len(indices), confidence)
        else:
            bound = self._resampled(reference, candidate, kept, labels, confidence)
            if bound < error:  # the samples that did not steer are not where this model errs (a refused
                # candidate, whose error the steering samples show): a bound for it is over all of them
                bound = max(error, self._resampled(reference, candidate, range(len(indices)), labels, confidence))
        return Validation(value=error, passed=self._passed(error, bound, tolerance), unseen_bound=bound, **common)

    def _resampled(self, reference: Outputs, candidate: Outputs, kept: Sequence[int], labels: np.ndarray | None,
                   confidence: float) -> float:
        """The bootstrap bound over the held-out samples at positions `kept`."""
        return bootstrap(self.metric, [[r[k] for k in kept] for r in reference],
                         [[c[k] for k in kept] for c in candidate], confidence,
                         labels=None if labels is None else labels[list(kept)])

    def _passed(self, value: float, bound: float, tolerance: float | None) -> bool | None:
        """Within the tolerance: the value, and with --accept bound the bound for new inputs too."""
        if tolerance is None:
            return None
        return value <= tolerance and (not self.accept_bound or bound <= tolerance)

    def closest(self) -> Trial | None:
        """The trial with the least error among those that removed parameters, validated on the whole
        held-out part (None when no trial removed any)."""
        total = sum(c.unit.params for c in self.candidates)
        shrunk = [t for t in self.trials if t.params < total]
        if not shrunk:
            return None
        best = min(shrunk, key=lambda t: (t.value, t.samples != len(self.indices)))
        return best if best.samples == len(self.indices) else self.validated(best.choices)
