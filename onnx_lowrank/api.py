"""The Python API: `compress` and `compress_file`, configured by one typed `Options` object.

Ranks come from one of: explicit `ranks`, an `energy` threshold, a parameter budget (`target_params`,
size mode) or, with calibration data and none of those, the fewest parameters whose validated error is
within `tolerance` (compact mode). With calibration data the factors are data-aware (unless `no_data`)
and the result is validated in ONNX Runtime on held-out samples.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from .adapters import ADAPTERS
from .calibration import DISCRETE_VALIDATION_FRACTION, VALIDATION_FRACTION, Samples, load_calibration, split
from .cache import Cache, key_of, model_fingerprint, samples_fingerprint
from .data_aware import unit_statistics
from .errors import BoundNotMet, InputError
from .layers import find_layers
from .metrics import DEFAULT_METRIC, DEFAULT_TOLERANCE, check_metric
from .parallel import check_jobs, executor_for
from .model_io import LoadedModel, check_output_path, load_model, model_stats, save_model
from .methods import METHODS, candidates_for
from .objective import DEFAULT_OBJECTIVE, OBJECTIVES
from .objective import restrict as restrict_to_objective
from .parking import PARK_MIN_PARAMS
from .progress import Progress
from .fusion import fusion_check
from .installation import install_hint
from .latency import LayerTimer, Untimeable, end_to_end
from .quantize import FALLBACK_SHARE, INT8_RANGES, QUANTIZATIONS, Fallback, chain_names, fallback, quantize_int8
from .ranks import Candidates, Choice, by_budget, by_energy, explicit, validate_ranks
from .report import LayerReport, Report, SkippedLayer
from .runtime import PROVIDERS, resolve_provider
from .overrides import overrides_for
from .search import Evaluator, Search, build, factors_of, probe_count, sensitivities
from .splice import import_graph
from .svd import Factorization


@dataclass(frozen=True)
class Options:
    """How to compress. At most one of `ranks`, `target_params`, `energy`; with none, calibration data
    is needed and compact mode finds the fewest parameters within `tolerance`."""

    ranks: Mapping[str, int | str] | None = None  # {"node or weight name" | "*": int | "full"}
    target_params: float | None = None  # keep this fraction of the factorizable parameters
    energy: float | None = None  # per layer, the smallest rank keeping this fraction of the predicted energy
    tolerance: float | None = None  # bound on the validated error (compact mode default: per metric)
    metric: str = DEFAULT_METRIC
    method: str = "auto"
    no_data: bool = False  # weight-only factors even when calibration data is given
    ops: Sequence[str] = field(default_factory=lambda: tuple(ADAPTERS))
    provider: str = "cpu"  # cpu | cuda | auto: where validation runs
    allow_larger: bool = False  # keep factorizations that do not shrink a layer
    seed: int = 0  # the calibration split
    batch_size: int = 8  # samples per ONNX Runtime run
    jobs: int | None = None  # worker processes for the per-layer work (None: all cores, for large models)
    scheduler: str | None = None  # address of a Dask scheduler to send the per-layer work to instead
    cache: str | os.PathLike | None = None  # folder keeping statistics and sensitivities between runs
    objective: str = DEFAULT_OBJECTIVE  # size | latency | balanced: see objective.py
    quantize: str | None = None  # "int8": quantize the weights after factorizing, validated together
    int8_range: str = "auto"  # full | reduced | auto: reduced range where the CPU lacks VNNI (quantize.py)
    confidence: float = 0.95  # of the bound promised for new inputs (generalization.py)
    progress: bool = False  # progress bars on stderr (the command line turns them on in a terminal)

    def __post_init__(self) -> None:
        given = [name for name in ("ranks", "target_params", "energy") if getattr(self, name) is not None]
        if len(given) > 1:
            raise InputError("choose ranks with only one of --ranks, --target-params or --energy")
        if self.ranks is not None:
            object.__setattr__(self, "ranks", validate_ranks(self.ranks))
        _check_fraction("target-params", self.target_params)
        _check_fraction("energy", self.energy)
        if self.tolerance is not None:
            if isinstance(self.tolerance, bool) or not isinstance(self.tolerance, (int, float)):
                raise InputError(f"tolerance must be a number, got {self.tolerance!r}")
            if not math.isfinite(self.tolerance) or self.tolerance < 0 or (self.tolerance == 0 and self.metric != "accuracy"):
                raise InputError(f"tolerance must be a positive number (0 only for accuracy), got {self.tolerance:g}")
        check_metric(self.metric, has_labels=True)
        if self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.mode in ("ranks", "energy") and self.method not in ("auto", "svd"):
            raise InputError(f"--ranks and --energy choose SVD ranks; they do not combine with --method {self.method}")
        if self.method == "cp" and importlib.util.find_spec("tensorly") is None:
            raise InputError(f"method cp needs tensorly: {install_hint('cp')}")
        unknown = [op for op in self.ops if op not in ADAPTERS]
        if unknown or not self.ops:
            raise InputError(f"unknown op type {unknown[0] if unknown else '(none)'!r} in ops; choose from {', '.join(ADAPTERS)}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise InputError(f"batch size must be a positive integer, got {self.batch_size!r}")
        check_jobs(self.jobs)
        if self.scheduler is not None and (not isinstance(self.scheduler, str) or not self.scheduler):
            raise InputError(f"scheduler must be an address such as tcp://host:8786, got {self.scheduler!r}")
        if self.objective not in OBJECTIVES:
            raise InputError(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if self.quantize not in (None, *QUANTIZATIONS):
            raise InputError(f"unknown quantization {self.quantize!r}; choose {', '.join(QUANTIZATIONS)}")
        if self.int8_range not in INT8_RANGES:
            raise InputError(f"unknown int8 range {self.int8_range!r}; choose one of {', '.join(INT8_RANGES)}")
        if isinstance(self.confidence, bool) or not isinstance(self.confidence, (int, float)) \
                or not 0.5 <= self.confidence < 1:
            raise InputError(f"confidence must be a number in [0.5, 1), got {self.confidence!r}")
        if self.provider not in PROVIDERS:
            raise InputError(f"unknown provider {self.provider!r}; choose one of {', '.join(PROVIDERS)}")

    @property
    def mode(self) -> str:
        if self.ranks is not None:
            return "ranks"
        if self.energy is not None:
            return "energy"
        return "size" if self.target_params is not None else "compact"


def _check_fraction(name: str, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{name} must be a number in (0, 1], got {value!r}")
    if not 0 < value <= 1:
        raise InputError(f"{name} must be in (0, 1], got {value:g}")


def compress(
    model_or_path: onnx.ModelProto | str | os.PathLike, calibration=None, labels=None, **options
) -> tuple[onnx.ModelProto, Report]:
    """Factorize the model's layers; return the new model and a report. The input is never modified.

    `calibration`: a path (.npz of stacked samples, or a folder of .npz feeds), an onnxruntime
    CalibrationDataReader, a dict of stacked arrays or an iterable of feed dicts. `labels`: a path to an
    .npy or an array, one per sample (for the accuracy metric). `options` are the fields of `Options`.
    Raises InputError for unusable input, BoundNotMet when the tolerance cannot be met.
    """
    settings = Options(**options)
    return _compress(load_model(model_or_path), settings, calibration, labels)


def compress_file(
    input_path: str | os.PathLike, output_path: str | os.PathLike, calibration=None, labels=None, **options
) -> Report:
    """Compress a model file into another, atomically; external data is kept when the input had it.

    Options, model and output path are all checked before any work is done; nothing is written when
    the run fails (BoundNotMet included).
    """
    settings = Options(**options)
    loaded = load_model(input_path, lazy=True)
    output = check_output_path(output_path, loaded.path)
    if calibration is not None or settings.quantize:  # ONNX Runtime and the quantizer need the weights in
        loaded = loaded.materialized()
    model, report = _compress(loaded, settings, calibration, labels)
    # a model whose weights stay in the input's files is checked as written
    check = loaded.shapes_consistent if loaded.base_dir else None
    save_model(model, output, external_data=loaded.external_data, base_dir=loaded.base_dir, check=check)
    return report


class _Clock:
    """Seconds per phase, for the report."""

    def __init__(self):
        self.start = self._mark = time.perf_counter()
        self.phases: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self._mark
        self._mark = now


def _compress(loaded: LoadedModel, settings: Options, calibration, labels) -> tuple[onnx.ModelProto, Report]:
    with Progress(settings.progress) as progress, tempfile.TemporaryDirectory(prefix="onnx-lowrank-") as work:
        return _compress_with(loaded, settings, calibration, labels, progress, Path(work))


def _compress_with(
    loaded: LoadedModel, settings: Options, calibration, labels, progress: Progress, work: Path
) -> tuple[onnx.ModelProto, Report]:
    clock = _Clock()
    original = loaded.model
    before = model_stats(original)
    adapters = {op: ADAPTERS[op] for op in settings.ops}
    imported = import_graph(original)
    plan = find_layers(imported.graph, original, adapters, loaded.base_dir)
    known = {n.name for n in imported.graph.nodes} | set(imported.graph.tensors())
    samples = _calibration(settings, original, calibration, labels)
    clock.lap("load")

    units = plan.units
    parts = split(samples, settings.seed, _held_out_fraction(settings.metric)) if samples is not None else None
    provider = resolve_provider(settings.provider) if samples is not None else None
    statistics, cache, data_key = None, Cache(settings.cache), None
    if samples is not None and cache.folder is not None:
        data_key = key_of(model_fingerprint(original), samples_fingerprint(samples, parts.fit), provider,
                          settings.batch_size, [unit.key for unit in units])
    if samples is not None and not settings.no_data:
        statistics = cache.statistics(data_key)
        if statistics is None:
            statistics = unit_statistics(original, units, samples, parts.fit, provider, settings.batch_size,
                                         progress.phase("statistics (samples)", len(parts.fit)))
            cache.save_statistics(data_key, statistics)
        clock.lap("statistics")
    mode = settings.mode
    # one calibration batch: what layers and the whole model are timed on
    timing_feed = next(samples.batches(parts.fit, settings.batch_size))[1] if samples is not None else None
    factorizable = sum(unit.params for unit in units)
    pool_pays = statistics is None or (settings.method != "svd" and any(unit.op == "Conv" for unit in units))
    with executor_for(settings.jobs, settings.scheduler, factorizable, pool_pays) as workers:
        candidates = candidates_for(units, settings.method, statistics, workers, eager=mode in ("size", "compact"),
                                    advance=progress.phase("factorizations (layers)", len(units)),
                                    parking=work if factorizable >= PARK_MIN_PARAMS else None)
    clock.lap("factorize")
    timer, notes = None, []
    if mode in ("size", "compact", "energy"):
        timer, notes = restrict_to_objective(
            settings.objective, candidates, provider or "cpu", original, adapters, timing_feed,
            cache.file("latency.json"), progress.phase("latency gate (layers)", len(units)),
        )
        clock.lap("latency gate")

    validation, sensitivity, trial, search = None, None, None, None
    if samples is not None:
        overrides = overrides_for(original, units, {o.name for o in original.graph.output}) \
            if mode in ("size", "compact") else None
        evaluator = Evaluator(original, samples, provider, settings.batch_size, overrides)
        search = Search(original, adapters, candidates, evaluator, parts.validation, settings.metric, samples.labels,
                        progress.phase("validated candidates"))
        if mode in ("size", "compact"):
            probe = parts.fit[:probe_count(units, statistics, len(parts.fit))]
            probe_key = key_of(data_key, settings.method, settings.no_data, probe)
            sensitivity = cache.floats("sensitivity", probe_key)
            if sensitivity is None or len(sensitivity) != len(units):
                sensitivity = sensitivities(original, adapters, candidates, evaluator, probe,
                                            progress.phase("sensitivity probes (layers)", len(units)))
                cache.save_floats("sensitivity", probe_key, sensitivity)
            clock.lap("sensitivity")
    tolerance = settings.tolerance
    if mode == "compact" and tolerance is None:
        tolerance = DEFAULT_TOLERANCE[settings.metric]
    int8 = _Int8(settings, samples, parts, search, original) if settings.quantize else None
    factor_tolerance = tolerance if int8 is None or mode != "compact" else int8.room(tolerance)
    if int8 is not None and mode == "compact":
        clock.lap("int8 fallback")
    while True:
        if mode == "ranks":
            choices = explicit(candidates, settings.ranks, known, settings.allow_larger)
        elif mode == "energy":
            choices = by_energy(candidates, settings.energy, settings.allow_larger)
            choices = [_allowed(candidate, choice) for candidate, choice in zip(candidates, choices)]
        elif mode == "size" and search is None:
            choices = by_budget(candidates, settings.target_params)
        elif mode == "size":
            trial = search.at_budget(sensitivity, settings.target_params)
            choices = trial.choices
        else:
            trial = None if factor_tolerance is None else search.compact(sensitivity, factor_tolerance)
            dense = "within the tolerance only dense"
            choices = trial.choices if trial is not None else [Choice(None, dense)] * len(units)
        clock.lap("search" if search is not None else "choose")
        factors = factors_of(candidates, choices)
        if factors:
            factorized = build(original, adapters, factors, loaded.base_dir)
            if not loaded.base_dir:  # otherwise the checker cannot read it in memory: save_model checks it
                _check_output(factorized, full=loaded.shapes_consistent)
        else:
            factorized = onnx.ModelProto()
            factorized.CopyFrom(original)
        result = factorized if int8 is None else int8.quantize(factorized)
        if search is None:
            break
        factor_error = trial.error if trial is not None else search.try_(choices).error
        value = factor_error if int8 is None else int8.error(result)
        clock.lap("validate")
        if int8 is None or mode != "compact" or value <= tolerance or not factors:
            break
        factor_tolerance = int8.tighter(factor_tolerance)  # the two errors did not add up as assumed
    if search is not None:
        validation = search.validation(result, tolerance, settings.confidence)
    closest = search.closest() if mode == "compact" and trial is None and units else None
    after = model_stats(result)
    report = Report(
        params_before=before.params,
        params_after=after.params,
        bytes_before=before.bytes,
        bytes_after=after.bytes,
        seconds=time.perf_counter() - clock.start,
        ops_before=before.ops,
        ops_after=after.ops,
        layers=_layer_reports(candidates, choices, factors, sensitivity, timer),
        skipped=[SkippedLayer(s.node, s.op, s.reason) for s in plan.skipped]
        + [
            SkippedLayer(layer.node.name, layer.node.op, choice.reason)
            for unit, choice in zip(units, choices)
            if choice.option is None
            for layer in unit.layers
        ],
        validation=validation,
        mode=mode,
        phases=clock.phases,
        trace=[_traced(t) for t in search.trials] if search else [],
        factorizable_params=factorizable,
        chosen=None if trial is None else {"params": trial.params, "error": trial.error},
        objective=settings.objective,
        notes=notes,
    )
    clock.lap("report")  # the per-layer timings of the chosen factorizations included
    any_factors = bool(factors)
    del factors  # the model holds its own copy of the factors now: a large model's are not held twice
    if int8 is not None:
        report.quantization = int8.summary(factorized, result, None if search is None else factor_error,
                                           None if search is None else value)
    if mode == "compact" and trial is None and units and (int8 is None or value > tolerance):
        report.validation = None if closest is None else dataclasses.replace(
            search.validation(build(original, adapters, search.factors(closest.choices)), tolerance,
                              settings.confidence), passed=False)
        if int8 is not None and int8.alone_error is not None and int8.alone_error > tolerance:
            kept = len(int8.floats) + len(int8.weight_only)
            detail = f" (int8 quantization alone reaches {int8.alone_error:.4g}" + (
                f" with {kept} node(s) weight-only or float)" if kept else ")")
        elif closest is None:
            detail = ""
        else:
            threatened = "" if closest.threat is None else \
                f", with {closest.threat.threatened} calibration decision(s) threatened"
            detail = f" (the closest that removes parameters reached {closest.error:.4g} on the held-out part{threatened})"
        raise BoundNotMet(f"no factorization keeps {settings.metric} within {tolerance:g}{detail}", report)
    if validation is not None and validation.passed is False:
        raise BoundNotMet(_above(validation), report)
    if any_factors:
        report.fusions = _fusions(original, factorized, report, search, loaded.base_dir)
        clock.lap("fusion check")
    if samples is not None and (any_factors or int8 is not None):
        report.latency = end_to_end(original, factorized, result if int8 is not None else None,
                                    timing_feed, provider,
                                    progress.phase("end-to-end latency"))
        clock.lap("latency")
        slower = _clearly_slower(report.latency)
        if slower:
            report.notes.append(slower)
    report.phases, report.seconds = clock.phases, time.perf_counter() - clock.start
    return result, report


def _above(validation) -> str:
    """Why a validated model is refused: its error, or for top1 / accuracy the margins it threatens."""
    seen = f"{validation.metric} is {validation.value:.4g}"
    if validation.threatened:
        seen += (f" and {validation.threatened} of {validation.calibration_decisions} calibration decisions "
                 f"have their margin threatened ({validation.predicted_unseen:.4g})")
    return f"{seen}, above the tolerance {validation.tolerance:g}"


def _traced(trial) -> dict:
    """A validated candidate in the report's trace; top1 / accuracy add the calibration decisions it threatens."""
    traced = {"params": trial.params, "error": trial.error, "samples": trial.samples}
    if trial.threat is not None:
        traced["threatened"] = trial.threat.threatened
    return traced


def _clearly_slower(timing: dict) -> str | None:
    """A note when the compressed model ran slower end to end beyond the timings' spread (each layer's
    gate cannot see effects between layers, such as a layout change)."""
    if "speedup" not in timing or timing["compressed"]["p10_ms"] <= timing["original"]["p90_ms"]:
        return None
    return (f"end to end the compressed model ran slower than the original ({timing['speedup']:.2f}x, "
            f"{timing['provider']}, batch {timing['batch']}); try --objective latency")


def _allowed(candidate: Candidates, choice: Choice) -> Choice:
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


class _Int8:
    """`--quantize int8` around the search. In compact mode the tolerance is shared: quantizing the
    original alone costs some error, the factorization is searched within what is left, and the two
    together are validated; should they add up to more than the tolerance, the factorization's share is
    halved (twice at most), then only the quantized original remains.

    When int8 of the original alone takes more than FALLBACK_SHARE of the tolerance, the nodes whose
    dynamic quantization costs the most (measured: quantize.fallback) are quantized weight-only instead
    (MatMul, Gemm) or kept float (Gather, Conv) until it takes at most that, in the original and in the
    factorized model (the low-rank chain that replaced such a node is treated alike). Their cost is
    measured on fit samples, the held-out part checks each step."""

    RETRIES = 2
    SELECT_SAMPLES = 32  # fit samples each node's cost is measured on

    def __init__(self, settings: Options, samples: Samples | None, parts, search: Search | None, original):
        self.metric = settings.metric
        self.range = settings.int8_range  # "auto": by this CPU (quantize.int8_range_for)
        # Conv needs calibration for its activations' scales; without data it stays float
        self.feeds = None if samples is None else [feed for _, feed in samples.batches(parts.fit, settings.batch_size)]
        self.search = search
        self.original = original
        self.alone_error: float | None = None
        self.info: dict = {}
        self.retries = self.RETRIES
        self.fallback: Fallback | None = None
        self.floats: tuple[str, ...] = ()  # original node names kept float
        self.weight_only: tuple[str, ...] = ()  # ... and quantized weight-only
        self.select_indices = [] if parts is None else list(parts.fit[: self.SELECT_SAMPLES])

    def quantize(self, model: onnx.ModelProto) -> onnx.ModelProto:
        quantized = quantize_int8(model, self.feeds, int8_range=self.range, exclude=chain_names(model, self.floats),
                                  weight_only=chain_names(model, self.weight_only))
        self.info = quantized.info
        return quantized.model

    def error(self, model: onnx.ModelProto) -> float:
        indices = self.search.indices
        labels = None if self.search.labels is None else self.search.labels[indices]
        return self.search.evaluator.judge(model, indices, self.metric, labels).value

    def select(self, model: onnx.ModelProto) -> float:
        """A node's cost, on fit samples (the held-out ones check): the metric, or for top1 and accuracy,
        too coarse on a few samples, the squared relative error of the logits (the sensitivity probe's)."""
        if self.metric in ("top1", "accuracy"):
            probing = onnx.ModelProto()
            probing.CopyFrom(model)  # probe_error adds outputs; the fallback builds on this model
            return self.search.evaluator.probe_error(probing, self.select_indices)
        return self.search.evaluator.error(model, self.select_indices, self.metric)

    def room(self, tolerance: float) -> float | None:
        """What the tolerance leaves the factorization once the original's own int8 error is spent, after
        taking out of dynamic int8 the nodes that cost the most when int8 alone takes more than its share
        (None: nothing)."""
        self.fallback = fallback(self.original, tolerance * FALLBACK_SHARE, self.error,
                                 self.select if self.select_indices else None, self.feeds, int8_range=self.range)
        self.floats, self.weight_only = self.fallback.floats, self.fallback.weight_only
        self.alone_error = self.fallback.error
        left = tolerance - self.alone_error
        return left if left > 0 or (left == 0 and self.metric == "accuracy") else None

    def tighter(self, share: float | None) -> float | None:
        self.retries -= 1
        if share is None or self.retries < 0 or share == 0:
            return None
        return share / 2

    def summary(self, factorized, quantized, factor_error: float | None, error: float | None) -> dict:
        summary = {
            "scheme": "int8",
            "bytes_factorized": model_stats(factorized).bytes,
            "bytes_quantized": model_stats(quantized).bytes,
            "error_factorized": factor_error,  # the factorization alone (validated, before quantizing)
            "error_quantized": error,  # factorization and quantization together: what was validated
            "error_quantized_alone": self.alone_error,  # the original quantized (with the fallback), no factorization
            "nodes": self.info,
            "range": self.info["range"],  # full or reduced (7-bit weights)
            "range_reason": self.info["range_reason"],  # auto: which CPU feature decided; or requested
        }
        if self.fallback is not None:  # compact mode: the nodes taken out, each with its measured cost
            summary["fallback_nodes"] = [node.to_dict() for node in self.fallback.nodes]
            summary["fallback"] = self.fallback.to_dict()
        return summary


def _held_out_fraction(metric: str) -> float:
    return DISCRETE_VALIDATION_FRACTION if metric in ("top1", "accuracy") else VALIDATION_FRACTION


def _calibration(settings: Options, model: onnx.ModelProto, calibration, labels) -> Samples | None:
    if calibration is None:
        if settings.mode == "compact":
            raise InputError("choose ranks with --ranks, --target-params or --energy, or give --calib for compact mode")
        if settings.tolerance is not None:
            raise InputError("--tolerance needs calibration data (--calib)")
        if labels is not None:
            raise InputError("--labels needs calibration data (--calib)")
        return None
    samples = load_calibration(calibration, model, labels)
    check_metric(settings.metric, has_labels=samples.labels is not None)
    split(samples, settings.seed, _held_out_fraction(settings.metric))  # too few samples: an input error now
    return samples


def _layer_reports(
    candidates: list[Candidates], choices: list[Choice], factors: dict[str, Factorization],
    sensitivity: list[float] | None, timer: LayerTimer | None,
) -> list[LayerReport]:
    reports = []
    for position, (candidate, choice) in enumerate(zip(candidates, choices)):
        if choice.option is None:
            continue
        unit = candidate.unit
        factorization = factors[unit.key]
        config = choice.option.config
        reports.append(
            LayerReport(
                node=unit.name,
                op=unit.op,
                weight=unit.weight.name,
                shape=list(unit.weight.shape),
                method=factorization.method,
                rank=config[0] if len(config) == 1 else list(config),
                params_before=unit.params,
                params_after=factorization.params,
                predicted_error=factorization.predicted_error,
                nodes=[layer.node.name for layer in unit.layers],
                sensitivity=None if sensitivity is None else sensitivity[position],
                alternatives=_alternatives(candidate, choice.option),
                spectrum=_spectrum(candidate),
                latency=None if timer is None else _layer_latency(timer, unit, factorization),
            )
        )
    return reports


def _fusions(original, factorized, report: Report, search: Search | None, base_dir: str) -> dict:
    """ONNX Runtime's fusions in the original and the factorized model; a model ONNX Runtime cannot
    optimize was still validated as written, so that is a note, not a failure."""
    provider = search.evaluator.provider_used if search is not None else "cpu"
    try:
        return fusion_check(original, factorized, [n for layer in report.layers for n in layer.nodes], provider,
                            base_dir=base_dir)
    except Exception as error:  # noqa: BLE001 - onnxruntime's own exception types
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return {"error": f"onnxruntime could not optimize the models: {first_line}"}


def _layer_latency(timer: LayerTimer, unit, factorization: Factorization) -> dict[str, float] | None:
    """The chosen factorization against its dense layer, alone (cached when the gate timed it)."""
    try:
        dense_ms, factorized_ms = timer.times(unit, factorization)
    except Untimeable:
        return None
    return {"dense_ms": dense_ms, "factorized_ms": factorized_ms}


def _spectrum(candidate: Candidates) -> list[float]:
    """The unit's SVD energies as fractions of its total, to 4 digits (the report's spectrum plots)."""
    spectrum = candidate.primary.spectrum
    total = spectrum.energy.sum() if spectrum.total is None else spectrum.total
    return [float(f"{e:.4g}") for e in (spectrum.energy / total if total > 0 else spectrum.energy)]


def _alternatives(candidate: Candidates, chosen) -> dict[str, float | None]:
    """Why the other methods lost: each one's least predicted error within the chosen option's parameters
    (None: it has no option that small)."""
    best: dict[str, float | None] = {}
    for option in candidate.options():
        if option.method == chosen.method:
            continue
        best.setdefault(option.method, None)
        if option.params <= chosen.params and (best[option.method] is None or option.error < best[option.method]):
            best[option.method] = option.error
    return best


def _check_output(model: onnx.ModelProto, full: bool) -> None:
    """Our own output must pass the checker, with strict shape inference where the input did; a failure
    here is a bug, not bad input."""
    try:
        onnx.checker.check_model(model, full_check=full)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise RuntimeError(f"the rewritten model fails the ONNX checker: {error}") from error
