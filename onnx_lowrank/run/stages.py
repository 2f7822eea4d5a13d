"""One compression run as a sequence of named stages, each making one record (records.py) from those before:

    load -> statistics -> factorize -> latency gate -> sensitivity -> int8 fallback -> search -> validate
    -> report -> diagnose -> fusion check -> latency

`run_stages` times each stage under its name (the report's `phases`) and gives it its progress bar. A stage
that does not apply to a run (no calibration data, no int8, a mode that needs no sensitivities) is skipped
and leaves no phase. The evaluator is built where the sensitivities are measured, the search and the refit
where the ranks are chosen.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx

from ..check.decoding import decode_feed
from ..check.evaluator import Evaluator
from ..check.generalization import Decisions, ties_exempt, weighted_fit
from ..check.latency import end_to_end, time_side_by_side
from ..check.metrics import DISCRETE, check_metric, compared_outputs
from ..check.overrides import overrides_for
from ..choose.allocation import bytes_budget
from ..choose.objective import restrict as restrict_to_objective
from ..choose.search import Search
from ..choose.sensitivity import positions_of, positions_seen, probe_count, sensitivities
from ..errors import BoundNotMet, InputError, known
from ..factorize.int4 import METHOD_BITS
from ..factorize.menu import coupled
from ..factorize.parking import PARK_MIN_PARAMS
from ..factorize.quantized_svd import FACTOR_BITS
from ..factorize.refit import Refit
from ..factorize.registry import PAIRINGS, decomposers_for
from ..factorize.rewrite import build, check_rewritten, factors_of
from ..graph.adapters import ADAPTERS
from ..graph.bodies import every_graph
from ..graph.imported import import_graph
from ..graph.layers import Plan, Skipped, find_layers
from ..graph.model_io import model_stats
from ..observe.activations import activation_shapes
from ..observe.cache import Cache, key_of, model_fingerprint, samples_fingerprint
from ..observe.calibration import Samples, load_calibration, next_token_targets
from ..observe.sessions import resolve_provider
from ..observe.statistics import Tied, unit_statistics
from ..options import Options
from ..quantize.accuracy_level import INT8_ACTIVATIONS, quantized_matmuls, with_accuracy_level
from ..quantize.share import Int8Share
from ..report import Chosen, Report, SkippedLayer
from ..system.parallel import executor_for, pool_pays
from .modes import RankMode, rank_mode_for
from .progress import Advance, ignore
from .records import (
    Allocated,
    Calibrated,
    Judging,
    Loaded,
    Observed,
    Offered,
    Run,
    Shared,
    Written,
)
from .report_parts import clearly_slower, fusions, layer_reports, refusal, traced


@dataclass(frozen=True)
class Stage:
    """A named step of the run; `bar` is its progress bar's label and length (None: no known end)."""

    name: str | Callable[[Run], str]
    work: Callable[[Run, Advance], None]
    applies: Callable[[Run], bool] = lambda run: True
    bar: tuple[str, Callable[[Run], int | None]] | None = None


def run_stages(run: Run, stages: Sequence[Stage]) -> None:
    """Each stage that applies, timed under its name, with its progress bar."""
    for stage in stages:
        if not stage.applies(run):
            continue
        name = stage.name if isinstance(stage.name, str) else stage.name(run)
        advance = run.progress.phase(stage.bar[0], stage.bar[1](run)) if stage.bar else ignore
        begun = time.perf_counter()
        try:
            stage.work(run, advance)
        finally:
            run.phases[name] = run.phases.get(name, 0.0) + time.perf_counter() - begun


# ------------------------------------------------------------------------------------------------ stages


def load(run: Run, advance: Advance) -> None:
    """The model's layers, the mode, the calibration data and its split, the cache key."""
    settings, original, given = run.settings, run.original, run.given
    adapters: dict = {op: ADAPTERS[op] for op in settings.ops}
    imported = import_graph(original)
    plan = find_layers(imported.graph, original, adapters, given.loaded.base_dir)
    names: set[str] = set()
    for graph in every_graph(imported.graph):  # bodies' layers can be named too
        names |= {n.name for n in graph.nodes} | set(graph.tensors())
    couplings = []
    if not settings.no_data and given.calibration is not None:  # coupled units need statistics
        taken: set[str] = set()
        for pairing in PAIRINGS:
            if settings.method in pairing.methods:
                pairs = pairing.find(plan.units, original, taken)
                couplings.append((pairing, pairs))
                taken |= {key for pair in pairs for key in pairing.keys(pair)}
    # inspect describes the layers in a mode of its own
    mode = given.mode or rank_mode_for(settings, has_data=given.calibration is not None)
    samples = _calibration(settings, original, given.calibration, given.labels)
    cache = Cache(settings.cache)
    data = None if samples is None else _calibrated(run, mode, samples, plan, cache)
    before = model_stats(original)
    if settings.target_bytes is not None:  # a target below what the rest of the model weighs: say so now
        bytes_budget(settings.target_bytes, before.bytes, plan.units)
    run.loaded = Loaded(mode, before, adapters, plan, tuple(couplings), frozenset(names), cache,
                        mode.tolerance(settings), data)


def _calibrated(run: Run, mode: RankMode, samples: Samples, plan: Plan, cache: Cache) -> Calibrated:
    """The calibration data split as the mode wants it, and what the statistics are taken on."""
    settings = run.settings
    parts = mode.split(samples, settings)
    provider = resolve_provider(settings.provider)
    statistics_fit, decisions = _statistics_fit(run, samples, parts.fit, provider)
    key = None
    if cache.folder is not None:  # the statistics' samples, repeats included: what everything cached hangs on
        key = key_of(model_fingerprint(run.original), samples_fingerprint(samples, statistics_fit), provider,
                     settings.batch_size, [unit.key for unit in plan.units])
    return Calibrated(samples, parts, provider, statistics_fit, decisions, key)


def _statistics_fit(run: Run, samples: Samples, fit: list[int], provider: str) -> tuple[list[int], dict[str, Decisions]]:
    """What the statistics are taken on: for a classifier judged by decisions (top1 / accuracy, one per
    sample) the fit samples with the least sure decisions repeated (generalization.weighted_fit), else the
    fit samples; and the original's decisions, where they were judged for that."""
    settings = run.settings
    if settings.no_data or settings.metric not in DISCRETE:
        return fit, {}
    compared = compared_outputs(settings.metric, [o.name for o in run.original.graph.output], settings.outputs)
    evaluator = Evaluator(run.original, samples, provider, settings.batch_size, compared=compared)
    name = evaluator.decision_names(settings.metric)[0]
    found = evaluator.decisions(name)  # the search's evaluator judges candidates against them
    return (weighted_fit(fit, found.margins) if found.margins.size == len(samples) else fit), {name: found}


def statistics(run: Run, advance: Advance) -> None:
    """What each layer sees on the fit samples (or the cache's copy of it); units in If / Loop / Scan bodies
    that never ran on them are left dense. With --no-data only those bodies are observed, for that alone
    (and nothing is cached)."""
    no_data, data, load = run.settings.no_data, run.calibrated, run.load
    observed = [unit for unit in run.units if unit.layers[0].scope] if no_data else run.units
    found = None if no_data else load.cache.statistics(data.key)
    if found is None:
        found = unit_statistics(run.original, observed, data.samples, data.statistics_fit, data.provider,
                                run.settings.batch_size, advance)
        if not no_data:
            load.cache.save_statistics(data.key, found)
    gone, skipped = set(), list(load.plan.skipped)
    for unit, stats in zip(observed, found):
        scope = unit.layers[0].scope
        if scope is not None and not np.sum(stats.counts.count if isinstance(stats, Tied) else stats.count):
            gone.add(id(unit))
            skipped.extend(Skipped(layer.node.name, layer.node.op, scope.unseen) for layer in unit.layers)
    plan = Plan([unit for unit in load.plan.units if id(unit) not in gone], skipped)
    run.observed = Observed(plan, None if no_data else [
        stats for unit, stats in zip(observed, found) if id(unit) not in gone])


def factorize(run: Run, advance: Advance) -> None:
    """Every unit's decompositions: the ranks on offer, each with its parameters and predicted error."""
    settings, units, data, statistics = run.settings, run.units, run.data, run.statistics
    timing_feed = None if data is None else next(data.samples.batches(data.fit, settings.batch_size))[1]
    factorizable = sum(unit.params for unit in units)
    pays = pool_pays(statistics is None, settings.method != "svd" and any(unit.op == "Conv" for unit in units),
                     factorizable, blocks=settings.quantize == "int4")
    with executor_for(settings.jobs, settings.scheduler, factorizable, pays) as workers:
        parking = run.given.work if factorizable >= PARK_MIN_PARAMS else None
        decomposers = decomposers_for(units, settings.method, statistics, workers, eager=run.load.mode.eager,
                                      advance=advance, parking=parking, int4_blocks=settings.int4_blocks)
    for pairing, pairs in run.load.couplings:
        if pairs and statistics is not None:
            pairing.couple(pairs, decomposers, statistics, parking)
    blocks = any(option.method in METHOD_BITS | FACTOR_BITS for c in decomposers for option in c.options())
    unused = () if settings.int4_blocks is None or blocks else (
        "--quantize int4: no layer takes 4- or 8-bit blocks here (they apply to MatMul x @ W and Gemm with a "
        "constant 2-D float32 weight, and to embedding tables): the model is factorized only",)
    run.offered = Offered(decomposers, timing_feed, notes=unused)


def latency_gate(run: Run, advance: Advance) -> None:
    """The objective's restriction of the options: tile-multiple ranks, none slower than its dense layer."""
    offered, data, settings = run.menus_offered, run.data, run.settings
    provider = data.provider if data else "cpu"
    others = (feed for _, feed in data.samples.batches(data.fit, settings.batch_size)) if data else ()
    feed = offered.timing_feed
    used: tuple[str, ...] = ()
    decode = None if feed is None or settings.objective == "size" else decode_feed(run.original, feed, provider)
    if decode is not None:  # a decoder is used token by token: its layers are timed at that step
        feed, others = decode, ()
        used = (f"--objective {settings.objective}: a decoder with a KV cache, so every layer was timed at one-token "
                "decode (batch 1), the step its users wait for, not at its prompts",)
    timer, notes = restrict_to_objective(settings.objective, offered.decomposers, provider, run.original,
                                         run.load.adapters, feed, run.load.cache.file("latency.json"), advance, others)
    run.offered = replace(offered, timer=timer, notes=offered.notes + used + tuple(notes))


def sensitivity(run: Run, advance: Advance) -> None:
    """The evaluator of candidates and, for the modes that weigh units by it, each unit's sensitivity."""
    settings, units, load, data = run.settings, run.units, run.load, run.calibrated
    outputs = [o.name for o in run.original.graph.output]
    overrides = overrides_for(run.original, units, set(outputs)) if load.mode.probes else None
    evaluator = Evaluator(run.original, data.samples, data.provider, settings.batch_size, overrides,
                          compared_outputs(settings.metric, outputs, settings.outputs), data.decisions,
                          exempt_ties=ties_exempt(settings.ties, load.tolerance),
                          bound_confidence=settings.confidence if settings.accept == "bound" else None)
    found = None
    if load.mode.probes:
        decomposers = run.menus_offered.decomposers
        probe = data.fit[:probe_count(units, _positions(run, data))]
        probe_key = key_of(data.key, settings.method, settings.no_data, probe)
        found = load.cache.floats("sensitivity", probe_key)
        if found is None or len(found) != len(units) + len(coupled(decomposers)):
            found = sensitivities(run.original, load.adapters, decomposers, evaluator, probe, advance)
            load.cache.save_floats("sensitivity", probe_key, found)
    run.judging = Judging(evaluator, found)


def _positions(run: Run, data: Calibrated) -> list[float]:
    """Per unit, the positions it applies its weight at per sample (what a probe costs): from the statistics,
    else (--no-data) from the activations of one sample."""
    if run.statistics is not None:
        return positions_seen(run.statistics, len(data.statistics_fit))
    if not data.fit:
        return []
    feed = next(data.samples.batches(data.fit[:1], 1))[1]
    return positions_of(run.units, activation_shapes(run.original, run.units, feed, data.provider))


def int8_fallback(run: Run, advance: Advance) -> None:
    """int8 of the original alone, made to fit its share of a shared tolerance (quantize.fallback)."""
    settings, data = run.settings, run.data
    int8 = Int8Share(settings.metric, settings.int8_range, settings.batch_size, None if data is None else data.samples,
                     None if data is None else data.parts, None if run.judging is None else run.judging.evaluator,
                     run.original)
    share = run.load.tolerance
    if run.load.mode.shares_tolerance:  # a mode with a tolerance
        share = int8.factor_share(known(share, "the tolerance"))
    run.shared = Shared(int8, share)


def search(run: Run, advance: Advance) -> None:
    """The mode's allocation of ranks (validated candidates, with calibration data: the search and, with
    --refit, the refit of its candidates are built here)."""
    _method_applies(run)
    found = None if run.judging is None else _search(run, run.judging.evaluator, advance)
    allocation = run.load.mode.allocate(run.menus(found, run.share))
    refit_on = found is not None and found.refit is not None and found.refit_candidates
    run.allocated = _settle_refit(run, Allocated(allocation, found, refit_on, run.share))


def _search(run: Run, evaluator: Evaluator, advance: Advance) -> Search:
    settings, data, load = run.settings, run.calibrated, run.load
    memo: dict = {}  # rewrite.build's, shared by every candidate and refit stage
    refit = None if settings.refit == "none" or run.statistics is None else Refit(
        run.original, load.adapters, run.units, run.statistics, data.samples, data.parts.fit, data.provider,
        settings.batch_size, run.given.loaded.base_dir, memo)
    return Search(run.original, load.adapters, run.menus_offered.decomposers, evaluator, data.parts.validation,
                  settings.metric, data.samples.labels, advance, memo=memo, refit=refit,
                  refit_candidates=refit is not None and settings.refit == "sequential",
                  accept_bound=settings.accept == "bound")


def _method_applies(run: Run) -> None:
    """A forced method that no layer offers is a usage error (--method heads on a CNN), not a bound that
    could not be met."""
    method, decomposers = run.settings.method, run.menus_offered.decomposers
    if method in ("auto", "svd") or not decomposers or any(c.offers_any for c in decomposers):
        return
    why = sorted({note for c in decomposers for note in c.notes}) or [f"{method}: no layer offers it"]
    raise InputError(f"--method {method} applies to no layer of this model ({'; '.join(why)})")


def _settle_refit(run: Run, allocated: Allocated) -> Allocated:
    """--refit auto, in a mode that fixes the size before validating: the chosen ranks refit too, kept so
    when that validates better (sequential: the search refit every candidate; compact mode's size is what
    its search finds, so auto leaves it alone: a refit at the found size would cost passes for no size)."""
    search = allocated.search
    if search is None or search.refit is None or allocated.refit_on or not run.load.mode.sized:
        return allocated
    chosen = allocated.allocation
    plain = chosen.trial or search.validated(chosen.choices, refit=False)
    allocated = replace(allocated, allocation=replace(chosen, trial=plain))
    if search.refitted(plain.choices, refit=True)[1] == 0:
        return allocated
    refit = search.validated(plain.choices, refit=True)
    if refit.value < plain.value:
        return replace(allocated, allocation=replace(chosen, trial=refit), refit_on=True)
    return allocated


def validate(run: Run, advance: Advance) -> None:
    """The rewritten (and quantized) model, validated; int8 and a factorization that together exceed a shared
    tolerance give the factorization half its share, and the search runs again."""
    mode, allocated, int8, tolerance = run.load.mode, run.chosen, run.int8, run.load.tolerance
    while True:
        written = _rewrite(run, allocated)
        search = allocated.search
        if search is None:
            run.written = written
            return
        trial = allocated.allocation.trial
        factor_error = trial.error if trial is not None else search.validated(allocated.allocation.choices).error
        error = factor_error if int8 is None else int8.error(written.model)
        written = replace(written, factor_error=factor_error, error=error)
        if int8 is None or not mode.shares_tolerance or not written.factors:
            break
        if error <= known(tolerance, "the tolerance"):  # a mode that shares it has one
            break
        share = int8.halved(known(allocated.share, "the share"))  # the two errors did not add up as assumed
        again = Allocated(mode.allocate(run.menus(search, share)), search, search.refit_candidates, share)
        allocated = _settle_refit(run, again)
    run.allocated = allocated
    run.written = replace(written, validation=search.validation(written.model, tolerance, run.settings.confidence),
                          closest=mode.closest(search, run.outcome(allocated.allocation, written.error)))


def _rewrite(run: Run, allocated: Allocated) -> Written:
    """The model to write, with the factorized one before quantizing."""
    loaded, search, choices = run.given.loaded, allocated.search, allocated.allocation.choices
    refit_layers = 0
    if search is not None:
        factors, refit_layers = search.refitted(choices, allocated.refit_on)
    else:
        factors = factors_of(run.menus_offered.decomposers, choices)
    if factors:
        factorized = build(run.original, run.load.adapters, factors, loaded.base_dir)
        if not loaded.base_dir:  # otherwise the checker cannot read it in memory: save_model checks it
            check_rewritten(factorized, full=loaded.shapes_consistent)
    else:
        factorized = onnx.ModelProto()
        factorized.CopyFrom(run.original)
    model = factorized if run.int8 is None else run.int8.quantize(factorized)
    return Written(allocated, factors, bool(factors), refit_layers, factorized, model, None, None, None, None)


def report(run: Run, advance: Advance) -> None:
    """The report of what was chosen and validated (the per-layer timings of the chosen factorizations
    included); the factors themselves are let go: the model holds its own copy of them."""
    written, offered, load = run.final, run.menus_offered, run.load
    after, before, allocation = model_stats(written.model), load.before, written.allocated.allocation
    trial, choices, search = allocation.trial, allocation.choices, written.allocated.search
    report = run.report = Report(
        params_before=before.params, params_after=after.params, bytes_before=before.bytes, bytes_after=after.bytes,
        seconds=time.perf_counter() - run.start, ops_before=before.ops, ops_after=after.ops,
        layers=layer_reports(offered.decomposers, choices, written.factors,
                             None if run.judging is None else run.judging.sensitivity, offered.timer),
        skipped=[SkippedLayer(s.node, s.op, s.reason) for s in run.plan.skipped] + [
            SkippedLayer(layer.node.name, layer.node.op, known(choice.reason, "a dense unit's reason"))
            for unit, choice in zip(run.units, choices) if choice.option is None for layer in unit.layers],
        validation=written.validation, mode=load.mode.name, phases=run.phases,
        trace=[traced(t) for t in search.trials] if search else [],
        factorizable_params=sum(unit.params for unit in run.units),
        chosen=None if trial is None else Chosen(params=trial.params, error=trial.error),
        objective=run.settings.objective, notes=_notes(offered.notes, allocation.note),
        refit="sequential" if written.refit_layers else "none", refit_layers=written.refit_layers,
    )
    run.written = replace(written, factors={})
    if run.int8 is not None:
        validated = search is not None
        report.quantization = run.int8.summary(written.factorized, written.model,
                                               written.factor_error if validated else None,
                                               written.error if validated else None)


def _notes(gate: Sequence[str], allocation: str | None) -> list[str]:
    """The report's notes: the latency gate's, then the allocation's (a size mode short of its target)."""
    return [*gate, *([allocation] if allocation is not None and allocation not in gate else [])]


def diagnose(run: Run, advance: Advance) -> None:
    """Refuse a result outside the bound: the mode says how close it came, or the validation why."""
    report, written = known(run.report, "the report"), run.final
    why = run.load.mode.refusal(run.outcome(written.allocated.allocation, written.error), written.closest)
    if why is not None:
        closest, search = written.closest, known(written.allocated.search, "the search")  # a refusing mode searched
        report.validation = None if closest is None else replace(
            search.validation(build(run.original, run.load.adapters, search.factors(closest.choices), memo=search.memo),
                              run.load.tolerance, run.settings.confidence), passed=False)
        raise BoundNotMet(why, report)
    if written.validation is not None and written.validation.passed is False:
        raise BoundNotMet(refusal(written.validation), report)


def fusion_check(run: Run, advance: Advance) -> None:
    """ONNX Runtime's fusions in the original and the factorized model; the factorized model is written
    without the intermediate shapes the rewrite inferred when only so it fuses as the original does (then
    validated again as written, unless quantized: int8 was measured on the model as it was)."""
    report, written = known(run.report, "the report"), run.final
    search, base_dir = written.allocated.search, run.given.loaded.base_dir
    variant, report.fusions = fusions(run.original, written.factorized, report, search, base_dir,
                                      bare=run.int8 is None)
    if variant is written.factorized:
        return
    validation = None if search is None else search.validation(variant, run.load.tolerance, run.settings.confidence)
    if validation is not None and validation.passed is False:  # float rounding of other kernels: keep the first
        report.fusions = fusions(run.original, written.factorized, report, search, base_dir, bare=False)[1]
        return
    run.written = replace(written, factorized=variant, model=variant, validation=validation or written.validation)
    report.validation = run.written.validation
    report.bytes_after = model_stats(variant).bytes


def accuracy_level(run: Run, advance: Advance) -> None:
    """--quantize int4: MatMulNBits with int8 activations (accuracy_level 4), kept only where the model
    validates with it and runs faster with it, timed side by side with the model as it was. Its scales are
    then stored in float32 (quantize/accuracy_level.py): more bytes for speed, which --objective size
    does not trade."""
    report, written = known(run.report, "the report"), run.final
    search = written.allocated.search
    if search is None or not quantized_matmuls(written.model):
        return
    variant = with_accuracy_level(written.model)
    validation = search.validation(variant, run.load.tolerance, run.settings.confidence)
    metric = validation.metric
    if validation.passed is False:
        report.notes.append(f"MatMulNBits with int8 activations (accuracy_level {INT8_ACTIVATIONS}) would move {metric} "
                            f"to {validation.value:.4g}, beyond what the bound allows: activations kept float")
        return
    before, after = time_side_by_side([written.model, variant], known(run.menus_offered.timing_feed, "the timing feed"),
                                      run.calibrated.provider, min_runs=10, min_seconds=2.0, advance=advance)
    speedup = before.median_ms / after.median_ms
    if speedup <= 1.0:
        report.notes.append(f"MatMulNBits with int8 activations (accuracy_level {INT8_ACTIVATIONS}) validated "
                            f"({metric} {validation.value:.4g}) but ran {speedup:.2f}x as fast: activations kept float")
        return
    run.written = replace(written, model=variant, factorized=variant, validation=validation)
    report.validation = validation
    report.bytes_after = model_stats(variant).bytes
    report.notes.append(f"MatMulNBits with int8 activations (accuracy_level {INT8_ACTIVATIONS}): {metric} "
                        f"{validation.value:.4g}, {speedup:.2f}x as fast as with float activations")


def latency(run: Run, advance: Advance) -> None:
    """The original and the written model timed end to end, side by side."""
    report, written = known(run.report, "the report"), run.final
    feed, provider = known(run.menus_offered.timing_feed, "the timing feed"), run.calibrated.provider
    quantized = written.model if run.int8 is not None else None
    report.latency = end_to_end(run.original, written.factorized, quantized, feed, provider, advance)
    decode = decode_feed(run.original, feed, provider)
    if decode is not None:  # a decoder: the step its users wait for, one token against the cache
        report.decode_latency = end_to_end(run.original, written.factorized, quantized, decode, provider, advance)
    slower = clearly_slower(report.latency) if report.decode_latency is None else clearly_slower(
        report.decode_latency, "at one-token decode")
    if slower:
        report.notes.append(slower)


def _has_data(run: Run) -> bool:
    return run.data is not None


STAGES = (
    Stage("load", load),
    Stage("statistics", statistics, lambda run: _has_data(run) and (
        not run.settings.no_data or any(unit.layers[0].scope for unit in run.units)),
          ("statistics (samples)", lambda run: len(run.calibrated.statistics_fit))),
    Stage("factorize", factorize, bar=("factorizations (layers)", lambda run: len(run.units))),
    Stage("latency gate", latency_gate, lambda run: run.load.mode.gated,
          ("latency gate (layers)", lambda run: len(run.units))),
    Stage("sensitivity", sensitivity, _has_data,
          ("sensitivity probes (layers)", lambda run: len(run.units) + len(coupled(run.menus_offered.decomposers))
           if run.load.mode.probes else 0)),
    Stage("int8 fallback", int8_fallback, lambda run: run.settings.quantize == "int8"),
    Stage(lambda run: "search" if _has_data(run) else "choose", search,
          bar=("validated candidates", lambda run: None)),
    Stage(lambda run: "validate" if _has_data(run) else "rewrite", validate),
    Stage("report", report),
    Stage("diagnose", diagnose),
    Stage("fusion check", fusion_check, lambda run: run.final.rewritten),
    # not in size mode (the least error is its aim) nor under --objective size: its scales cost bytes
    Stage("accuracy level", accuracy_level, lambda run: _has_data(run) and run.settings.quantize == "int4"
          and run.final.rewritten and run.load.tolerance is not None and run.settings.objective != "size",
          ("accuracy level timing", lambda run: None)),
    Stage("latency", latency, lambda run: _has_data(run) and (run.final.rewritten or run.int8 is not None),
          ("end-to-end latency", lambda run: None)),
)


FRONT = STAGES[:3]  # load, statistics, factorize: what `inspect` describes


def compress_run(run: Run) -> tuple[onnx.ModelProto, Report]:
    """The run through every stage: the model to write and its report."""
    run_stages(run, STAGES)
    report = known(run.report, "the report")
    report.phases, report.seconds = run.phases, time.perf_counter() - run.start
    return run.final.model, report


# ------------------------------------------------------------------------------------------------ helpers


def _calibration(settings: Options, model: onnx.ModelProto, calibration, labels) -> Samples | None:
    if calibration is None:
        if settings.tolerance is not None:
            raise InputError("--tolerance needs calibration data (--calib)")
        if labels is not None:
            raise InputError("--labels needs calibration data (--calib)")
        if settings.outputs:
            raise InputError("--outputs needs calibration data (--calib): it names what validation compares")
        return None
    samples = load_calibration(calibration, model, labels)
    if settings.metric == "perplexity":
        if labels is not None:
            raise InputError("the perplexity metric takes its targets from the input ids: give no --labels")
        samples.labels = next_token_targets(samples)
    check_metric(settings.metric, has_labels=samples.labels is not None)
    compared_outputs(settings.metric, [o.name for o in model.graph.output], settings.outputs)  # known names
    return samples
