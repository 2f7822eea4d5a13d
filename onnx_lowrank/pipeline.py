"""One compression run as a sequence of named stages over one state object, `Run`:

    load -> statistics -> factorize -> latency gate -> sensitivity -> int8 fallback -> search -> validate
    -> report -> diagnose -> fusion check -> latency

Each stage reads what the stages before it left in the run and adds its own part; `run_stages` times each
under its name (the report's `phases`) and gives it its progress bar. A stage that does not apply to a run
(no calibration data, no int8, a mode that needs no sensitivities) is skipped and leaves no phase.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx

from .adapters import ADAPTERS
from .cache import Cache, key_of, model_fingerprint, samples_fingerprint
from .calibration import Samples, Split, load_calibration, next_token_targets
from .data_aware import unit_statistics
from .decompositions import Factorized
from .errors import BoundNotMet, InputError, known
from .generalization import DISCRETE, Decisions, ties_exempt, weighted_fit
from .heads import HEADS_METHODS, HeadPair, couple_heads, find_heads
from .int8_share import Int8Share
from .latency import LayerTimer, activation_shapes, end_to_end
from .layers import Plan, Skipped, Unit, find_layers
from .methods import decomposers_for
from .metrics import check_metric, compared_outputs
from .model_io import LoadedModel, ModelStats, model_stats
from .objective import restrict as restrict_to_objective
from .options import Options
from .overrides import overrides_for
from .parallel import executor_for, pool_pays
from .parking import PARK_MIN_PARAMS
from .progress import Advance, Progress, ignore
from .prune import PRUNING_METHODS, Pair, couple, find_pairs
from .rank_modes import Allocation, RankMode, rank_mode_for
from .ranks import UnitDecomposers, coupled
from .refit import Refit
from .report import Chosen, Report, SkippedLayer, Validation
from .reporting import clearly_slower, fusions, layer_reports, refusal, traced
from .rewrite import build, check_rewritten, factors_of
from .runtime import resolve_provider
from .search import Evaluator, Search, Trial, positions_of, positions_seen, probe_count, sensitivities
from .splice import import_graph
from .statistics import Counts, Moments, Tied


@dataclass
class Run:
    """What one compression run knows, filled in stage by stage (the comments say which stage)."""

    settings: Options
    loaded: LoadedModel
    calibration: object
    labels: object
    progress: Progress
    work: Path  # a temporary folder (large models park their decompositions there)
    phases: dict[str, float] = field(default_factory=dict)  # seconds per stage
    start: float = field(default_factory=time.perf_counter)
    # load
    mode: RankMode | None = None
    before: ModelStats | None = None
    adapters: dict = field(default_factory=dict)
    plan: Plan | None = None
    pairs: list[Pair] = field(default_factory=list)  # producer -> activation -> consumer, to prune together
    heads: list[HeadPair] = field(default_factory=list)  # query and key projections, to cut per head together
    known: set[str] = field(default_factory=set)  # node and tensor names (explicit ranks name them)
    samples: Samples | None = None
    parts: Split | None = None
    provider: str | None = None
    cache: Cache | None = None
    data_key: str | None = None
    tolerance: float | None = None
    share: float | None = None  # the tolerance left to the factorization (int8 may take some)
    # statistics, factorize, latency gate
    statistics: list[Moments | Counts | Tied] | None = None
    decisions: dict[str, Decisions] = field(default_factory=dict)  # the original's, when the load stage found them
    statistics_fit: list[int] = field(default_factory=list)  # the fit samples, the least sure ones repeated
    timing_feed: dict[str, np.ndarray] | None = None  # one calibration batch: what layers and the whole model are timed on
    decomposers: list[UnitDecomposers] = field(default_factory=list)  # per unit, the same order
    timer: LayerTimer | None = None
    notes: list[str] = field(default_factory=list)
    # sensitivity, int8 fallback
    evaluator: Evaluator | None = None
    search: Search | None = None
    sensitivity: list[float] | None = None
    int8: Int8Share | None = None
    # search, validate
    allocation: Allocation | None = None
    factors: dict[str, Factorized] = field(default_factory=dict)  # by unit key, until the report is made
    rewritten: bool = False  # whether any unit was factorized
    refit_on: bool = False  # whether the written factorizations are refit (refit.py), and how many were
    refit_layers: int = 0
    factorized: onnx.ModelProto | None = None
    written: onnx.ModelProto | None = None  # what is written: the factorized model, quantized with int8
    factor_error: float | None = None  # the factorization's validated error, before quantizing
    written_error: float | None = None  # the written model's: what is held against the tolerance
    validation: Validation | None = None
    closest: Trial | None = None
    report: Report | None = None

    @property
    def original(self) -> onnx.ModelProto:
        return self.loaded.model

    @property
    def units(self) -> list[Unit]:
        return known(self.plan, "the plan").units

    # what the load stage always sets, for the stages after it
    @property
    def rank_mode(self) -> RankMode:
        return known(self.mode, "the rank mode")

    @property
    def store(self) -> Cache:
        return known(self.cache, "the cache")

    @property
    def fit(self) -> list[int]:
        """The samples the statistics are taken on (stages that run only with calibration data)."""
        return known(self.parts, "the calibration split").fit

    @property
    def chosen(self) -> Allocation:
        return known(self.allocation, "the allocation")


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
    settings, original = run.settings, run.original
    run.before = model_stats(original)
    run.adapters = {op: ADAPTERS[op] for op in settings.ops}
    imported = import_graph(original)
    run.plan = find_layers(imported.graph, original, run.adapters, run.loaded.base_dir)
    for graph in [imported.graph, *imported.graph.subgraphs(recursive=True)]:  # bodies' layers can be named too
        run.known |= {n.name for n in graph.nodes} | set(graph.tensors())
    if settings.method in PRUNING_METHODS and not settings.no_data and run.calibration is not None:  # needs statistics
        run.pairs = find_pairs(run.plan.units, original)
    if settings.method in HEADS_METHODS and not settings.no_data and run.calibration is not None:
        taken = {key for pair in run.pairs for key in (pair.consumer, *pair.producers)}
        run.heads = find_heads(run.plan.units, {o.name for o in original.graph.output}, taken)
    if run.mode is None:  # inspect describes the layers in a mode of its own
        run.mode = rank_mode_for(settings, has_data=run.calibration is not None)
    run.samples = _calibration(settings, original, run.calibration, run.labels)
    run.tolerance = run.share = run.rank_mode.tolerance(settings)
    run.cache = Cache(settings.cache)
    if run.samples is None:
        return
    run.parts = run.rank_mode.split(run.samples, settings)
    run.provider = resolve_provider(settings.provider)
    run.statistics_fit = _statistics_fit(run, run.samples, run.provider)
    if run.cache.folder is not None:  # the statistics' samples, repeats included: what everything cached hangs on
        run.data_key = key_of(model_fingerprint(original), samples_fingerprint(run.samples, run.statistics_fit),
                              run.provider, settings.batch_size, [unit.key for unit in run.units])


def statistics(run: Run, advance: Advance) -> None:
    """What each layer sees on the fit samples (or the cache's copy of it); units in If / Loop / Scan bodies
    that never ran on them are left dense. With --no-data only those bodies are observed, for that alone
    (and nothing is cached)."""
    no_data = run.settings.no_data
    observed = [unit for unit in run.units if unit.layers[0].scope] if no_data else run.units
    found = None if no_data else run.store.statistics(run.data_key)
    if found is None:
        found = unit_statistics(run.original, observed, known(run.samples, "the samples"), run.statistics_fit,
                                known(run.provider, "the provider"), run.settings.batch_size, advance)
        if not no_data:
            run.store.save_statistics(run.data_key, found)
    plan, gone = known(run.plan, "the plan"), set()
    for unit, stats in zip(observed, found):
        scope = unit.layers[0].scope
        if scope is not None and not np.sum(stats.counts.count if isinstance(stats, Tied) else stats.count):
            gone.add(id(unit))
            plan.skipped.extend(Skipped(layer.node.name, layer.node.op, scope.unseen) for layer in unit.layers)
    plan.units = [unit for unit in plan.units if id(unit) not in gone]
    if not no_data:
        run.statistics = [stats for unit, stats in zip(observed, found) if id(unit) not in gone]


def _statistics_fit(run: Run, samples: Samples, provider: str) -> list[int]:
    """What the statistics are taken on: for a classifier judged by decisions (top1 / accuracy, one per
    sample) the fit samples with the least sure decisions repeated (generalization.weighted_fit), else the
    fit samples."""
    settings = run.settings
    if settings.no_data or settings.metric not in DISCRETE:
        return run.fit
    compared = compared_outputs(settings.metric, [o.name for o in run.original.graph.output], settings.outputs)
    evaluator = Evaluator(run.original, samples, provider, settings.batch_size, compared=compared)
    name = evaluator.decision_names(settings.metric)[0]
    found = evaluator.decisions(name)
    run.decisions = {name: found}  # the search's evaluator judges candidates against them
    return weighted_fit(run.fit, found.margins) if found.margins.size == len(samples) else run.fit


def factorize(run: Run, advance: Advance) -> None:
    """Every unit's decompositions: the ranks on offer, each with its parameters and predicted error."""
    settings, units = run.settings, run.units
    if run.samples is not None:
        run.timing_feed = next(run.samples.batches(run.fit, settings.batch_size))[1]
    factorizable = sum(unit.params for unit in units)
    pays = pool_pays(run.statistics is None, settings.method != "svd" and any(unit.op == "Conv" for unit in units),
                     factorizable)
    with executor_for(settings.jobs, settings.scheduler, factorizable, pays) as workers:
        parking = run.work if factorizable >= PARK_MIN_PARAMS else None
        run.decomposers = decomposers_for(units, settings.method, run.statistics, workers, eager=run.rank_mode.eager,
                                          advance=advance, parking=parking)
    if run.pairs and run.statistics is not None:
        couple(run.pairs, run.decomposers, run.statistics, parking)
    if run.heads and run.statistics is not None:
        couple_heads(run.heads, run.decomposers, run.statistics)


def latency_gate(run: Run, advance: Advance) -> None:
    """The objective's restriction of the options: tile-multiple ranks, none slower than its dense layer."""
    others = (feed for _, feed in run.samples.batches(run.fit, run.settings.batch_size)) if run.samples else ()
    run.timer, run.notes = restrict_to_objective(
        run.settings.objective, run.decomposers, run.provider or "cpu", run.original, run.adapters, run.timing_feed,
        run.store.file("latency.json"), advance, others,
    )


def sensitivity(run: Run, advance: Advance) -> None:
    """The validator of candidates and, for the modes that weigh units by it, each unit's sensitivity."""
    settings, units, mode = run.settings, run.units, run.rank_mode
    samples, parts = known(run.samples, "the samples"), known(run.parts, "the calibration split")
    overrides = overrides_for(run.original, units, {o.name for o in run.original.graph.output}) \
        if mode.probes else None
    compared = compared_outputs(settings.metric, [o.name for o in run.original.graph.output], settings.outputs)
    run.evaluator = Evaluator(run.original, samples, known(run.provider, "the provider"), settings.batch_size,
                              overrides, compared, run.decisions)
    run.evaluator.exempt_ties = ties_exempt(settings.ties, run.tolerance)
    run.search = Search(run.original, run.adapters, run.decomposers, run.evaluator, parts.validation,
                        settings.metric, samples.labels)
    if settings.accept == "bound":
        run.evaluator.bound_confidence, run.search.accept_bound = settings.confidence, True
    if settings.refit != "none" and run.statistics is not None:
        run.search.refit = Refit(run.original, run.adapters, units, run.statistics, samples, parts.fit,
                                 known(run.provider, "the provider"), settings.batch_size, run.loaded.base_dir,
                                 run.search.memo)
        run.search.refit_candidates = settings.refit == "sequential"
    if not mode.probes:
        return
    probe = parts.fit[:probe_count(units, _positions(run, samples))]
    probe_key = key_of(run.data_key, settings.method, settings.no_data, probe)
    run.sensitivity = run.store.floats("sensitivity", probe_key)
    if run.sensitivity is None or len(run.sensitivity) != len(units) + len(coupled(run.decomposers)):
        run.sensitivity = sensitivities(run.original, run.adapters, run.decomposers, run.evaluator, probe, advance)
        run.store.save_floats("sensitivity", probe_key, run.sensitivity)


def _positions(run: Run, samples: Samples) -> list[float]:
    """Per unit, the positions it applies its weight at per sample (what a probe costs): from the statistics,
    else (--no-data) from the activations of one sample."""
    if run.statistics is not None:
        return positions_seen(run.statistics, len(run.statistics_fit))
    if not run.fit:
        return []
    feed = next(samples.batches(run.fit[:1], 1))[1]
    return positions_of(run.units, activation_shapes(run.original, run.units, feed, known(run.provider, "the provider")))


def int8_fallback(run: Run, advance: Advance) -> None:
    """int8 of the original alone, made to fit its share of a shared tolerance (quantize.fallback)."""
    run.int8 = Int8Share(run.settings, run.samples, run.parts, run.search, run.original)
    if run.rank_mode.shares_tolerance:  # a mode with a tolerance
        run.share = run.int8.factor_share(known(run.tolerance, "the tolerance"))


def search(run: Run, advance: Advance) -> None:
    """The mode's allocation of ranks (validated candidates, with calibration data)."""
    _method_applies(run)
    if run.search is not None:
        run.search.advance = advance
    run.allocation = run.rank_mode.allocate(run)
    _settle_refit(run)


def _method_applies(run: Run) -> None:
    """A forced method that no layer offers is a usage error (--method heads on a CNN), not a bound that
    could not be met."""
    method, decomposers = run.settings.method, run.decomposers
    if method in ("auto", "svd") or not decomposers or any(c.offers_any for c in decomposers):
        return
    why = sorted({note for c in decomposers for note in c.notes}) or [f"{method}: no layer offers it"]
    raise InputError(f"--method {method} applies to no layer of this model ({'; '.join(why)})")


def _settle_refit(run: Run) -> None:
    """--refit auto, in a mode that fixes the size before validating: the chosen ranks refit too, kept so
    when that validates better (sequential: the search refit every candidate; compact mode's size is what
    its search finds, so auto leaves it alone: a refit at the found size would cost passes for no size)."""
    search = run.search
    if search is None or search.refit is None:
        return
    run.refit_on = search.refit_candidates
    if run.refit_on or not run.rank_mode.sized:
        return
    plain = run.chosen.trial or search.validated(run.chosen.choices, refit=False)
    run.allocation = replace(run.chosen, trial=plain)
    if search.refitted(plain.choices, refit=True)[1] == 0:
        return
    refit = search.validated(plain.choices, refit=True)
    if refit.value < plain.value:
        run.refit_on, run.allocation = True, replace(run.chosen, trial=refit)


def validate(run: Run, advance: Advance) -> None:
    """The rewritten (and quantized) model, validated; int8 and a factorization that together exceed a shared
    tolerance give the factorization half its share, and the search runs again."""
    mode = run.rank_mode
    while True:
        written = _rewrite(run)
        if run.search is None:
            return
        trial = run.chosen.trial
        run.factor_error = trial.error if trial is not None else run.search.validated(run.chosen.choices).error
        run.written_error = run.factor_error if run.int8 is None else run.int8.error(written)
        if run.int8 is None or not mode.shares_tolerance or not run.factors:
            break
        tolerance = known(run.tolerance, "the tolerance")  # a mode that shares it has one
        if run.written_error <= tolerance:
            break
        run.share = run.int8.halved(known(run.share, "the share"))  # the two errors did not add up as assumed
        run.allocation = mode.allocate(run)
        _settle_refit(run)
    run.validation = run.search.validation(written, run.tolerance, run.settings.confidence)
    run.closest = mode.closest(run)


def _rewrite(run: Run) -> onnx.ModelProto:
    """The model to write (also left in the run, with the factorized one before quantizing)."""
    if run.search is not None:
        run.factors, run.refit_layers = run.search.refitted(run.chosen.choices, run.refit_on)
    else:
        run.factors = factors_of(run.decomposers, run.chosen.choices)
    if run.factors:
        factorized = build(run.original, run.adapters, run.factors, run.loaded.base_dir)
        if not run.loaded.base_dir:  # otherwise the checker cannot read it in memory: save_model checks it
            check_rewritten(factorized, full=run.loaded.shapes_consistent)
    else:
        factorized = onnx.ModelProto()
        factorized.CopyFrom(run.original)
    run.factorized = factorized
    run.written = factorized if run.int8 is None else run.int8.quantize(factorized)
    return run.written


def report(run: Run, advance: Advance) -> None:
    """The report of what was chosen and validated (the per-layer timings of the chosen factorizations
    included); the factors themselves are let go: the model holds its own copy of them."""
    written = known(run.written, "the written model")
    after, before, trial = model_stats(written), known(run.before, "the original's size"), run.chosen.trial
    choices = run.chosen.choices
    report = run.report = Report(
        params_before=before.params, params_after=after.params, bytes_before=before.bytes, bytes_after=after.bytes,
        seconds=time.perf_counter() - run.start, ops_before=before.ops, ops_after=after.ops,
        layers=layer_reports(run.decomposers, choices, run.factors, run.sensitivity, run.timer),
        skipped=[SkippedLayer(s.node, s.op, s.reason) for s in known(run.plan, "the plan").skipped] + [
            SkippedLayer(layer.node.name, layer.node.op, known(choice.reason, "a dense unit's reason"))
            for unit, choice in zip(run.units, choices) if choice.option is None for layer in unit.layers],
        validation=run.validation, mode=run.rank_mode.name, phases=run.phases,
        trace=[traced(t) for t in run.search.trials] if run.search else [],
        factorizable_params=sum(unit.params for unit in run.units),
        chosen=None if trial is None else Chosen(params=trial.params, error=trial.error),
        objective=run.settings.objective, notes=run.notes,
        refit="sequential" if run.refit_layers else "none", refit_layers=run.refit_layers,
    )
    run.rewritten, run.factors = bool(run.factors), {}
    if run.int8 is not None:
        validated = run.search is not None
        report.quantization = run.int8.summary(known(run.factorized, "the factorized model"), written,
                                                   run.factor_error if validated else None,
                                                   run.written_error if validated else None)


def diagnose(run: Run, advance: Advance) -> None:
    """Refuse a result outside the bound: the mode says how close it came, or the validation why."""
    run.rank_mode.diagnose(run)
    if run.validation is not None and run.validation.passed is False:
        raise BoundNotMet(refusal(run.validation), known(run.report, "the report"))


def fusion_check(run: Run, advance: Advance) -> None:
    """ONNX Runtime's fusions in the original and the factorized model; the factorized model is written
    without the intermediate shapes the rewrite inferred when only so it fuses as the original does (then
    validated again as written, unless quantized: int8 was measured on the model as it was)."""
    report = known(run.report, "the report")
    written, report.fusions = fusions(run.original, run.factorized, report, run.search, run.loaded.base_dir,
                                      bare=run.int8 is None)
    if written is run.factorized:
        return
    validation = None if run.search is None else run.search.validation(written, run.tolerance,
                                                                       run.settings.confidence)
    if validation is not None and validation.passed is False:  # float rounding of other kernels: keep the first
        report.fusions = fusions(run.original, run.factorized, report, run.search, run.loaded.base_dir, bare=False)[1]
        return
    run.factorized = run.written = written
    run.validation = report.validation = validation or report.validation
    report.bytes_after = model_stats(written).bytes


def latency(run: Run, advance: Advance) -> None:
    """The original and the written model timed end to end, side by side."""
    report = known(run.report, "the report")
    report.latency = end_to_end(run.original, known(run.factorized, "the factorized model"),
                                run.written if run.int8 is not None else None,
                                known(run.timing_feed, "the timing feed"), known(run.provider, "the provider"), advance)
    slower = clearly_slower(report.latency)
    if slower:
        report.notes.append(slower)


STAGES = (
    Stage("load", load),
    Stage("statistics", statistics, lambda run: run.samples is not None and (
        not run.settings.no_data or any(unit.layers[0].scope for unit in run.units)),
          ("statistics (samples)", lambda run: len(run.statistics_fit))),
    Stage("factorize", factorize, bar=("factorizations (layers)", lambda run: len(run.units))),
    Stage("latency gate", latency_gate, lambda run: run.rank_mode.gated,
          ("latency gate (layers)", lambda run: len(run.units))),
    Stage("sensitivity", sensitivity, lambda run: run.samples is not None,
          ("sensitivity probes (layers)",
           lambda run: len(run.units) + len(coupled(run.decomposers)) if run.rank_mode.probes else 0)),
    Stage("int8 fallback", int8_fallback, lambda run: run.settings.quantize is not None),
    Stage(lambda run: "search" if run.search is not None else "choose", search,
          bar=("validated candidates", lambda run: None)),
    Stage(lambda run: "validate" if run.search is not None else "rewrite", validate),
    Stage("report", report),
    Stage("diagnose", diagnose),
    Stage("fusion check", fusion_check, lambda run: run.rewritten),
    Stage("latency", latency, lambda run: run.samples is not None and (run.rewritten or run.int8 is not None),
          ("end-to-end latency", lambda run: None)),
)


FRONT = STAGES[:3]  # load, statistics, factorize: what `inspect` describes


def compress_run(run: Run) -> tuple[onnx.ModelProto, Report]:
    """The run through every stage: the model to write and its report."""
    run_stages(run, STAGES)
    report = known(run.report, "the report")
    report.phases, report.seconds = run.phases, time.perf_counter() - run.start
    return known(run.written, "the written model"), report


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
