"""The Python API: `compress` and `compress_file`, configured by one typed `Options` object.

Ranks come from one of: explicit `ranks`, an `energy` threshold, a parameter budget (`target_params`,
size mode) or, with calibration data and none of those, the fewest parameters whose validated error is
within `tolerance` (compact mode). With calibration data the factors are data-aware (unless `no_data`)
and the result is validated in ONNX Runtime on held-out samples.
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

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
from .ranks import Candidates, Choice, by_budget, by_energy, explicit, validate_ranks
from .report import LayerReport, Report, SkippedLayer, Validation
from .runtime import PROVIDERS, resolve_provider
from .search import PROBE_SAMPLES, Evaluator, Search, build, factors_of, sensitivities
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
            raise InputError("method cp needs tensorly: pip install 'onnx-lowrank[cp]'")
        unknown = [op for op in self.ops if op not in ADAPTERS]
        if unknown or not self.ops:
            raise InputError(f"unknown op type {unknown[0] if unknown else '(none)'!r} in ops; choose from {', '.join(ADAPTERS)}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise InputError(f"batch size must be a positive integer, got {self.batch_size!r}")
        check_jobs(self.jobs)
        if self.scheduler is not None and (not isinstance(self.scheduler, str) or not self.scheduler):
            raise InputError(f"scheduler must be an address such as tcp://host:8786, got {self.scheduler!r}")
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
    loaded = load_model(input_path)
    output = check_output_path(output_path, loaded.path)
    model, report = _compress(loaded, settings, calibration, labels)
    save_model(model, output, external_data=loaded.external_data)
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
    clock = _Clock()
    original = loaded.model
    before = model_stats(original)
    adapters = {op: ADAPTERS[op] for op in settings.ops}
    imported = import_graph(original)
    plan = find_layers(imported.graph, original, adapters)
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
            statistics = unit_statistics(original, units, samples, parts.fit, provider, settings.batch_size)
            cache.save_statistics(data_key, statistics)
        clock.lap("statistics")
    mode = settings.mode
    with executor_for(settings.jobs, settings.scheduler, sum(unit.params for unit in units)) as workers:
        candidates = candidates_for(units, settings.method, statistics, workers, eager=mode in ("size", "compact"))
    clock.lap("factorize")

    validation, sensitivity, trial, search = None, None, None, None
    if samples is not None:
        evaluator = Evaluator(original, samples, provider, settings.batch_size)
        search = Search(original, adapters, candidates, evaluator, parts.validation, settings.metric, samples.labels)
        if mode in ("size", "compact"):
            probe = parts.fit[:PROBE_SAMPLES]
            probe_key = key_of(data_key, settings.method, settings.no_data, probe)
            sensitivity = cache.floats("sensitivity", probe_key)
            if sensitivity is None or len(sensitivity) != len(units):
                sensitivity = sensitivities(original, adapters, candidates, evaluator, probe)
                cache.save_floats("sensitivity", probe_key, sensitivity)
            clock.lap("sensitivity")
    tolerance = settings.tolerance
    if mode == "ranks":
        choices = explicit(candidates, settings.ranks, known, settings.allow_larger)
    elif mode == "energy":
        choices = by_energy(candidates, settings.energy, settings.allow_larger)
    elif mode == "size" and search is None:
        choices = by_budget(candidates, settings.target_params)
    elif mode == "size":
        trial = search.at_budget(sensitivity, settings.target_params)
        choices = trial.choices
    else:
        tolerance = DEFAULT_TOLERANCE[settings.metric] if tolerance is None else tolerance
        trial = search.compact(sensitivity, tolerance)
        choices = trial.choices if trial is not None else [Choice(None, "within the tolerance only dense")] * len(units)
    clock.lap("search" if search is not None else "choose")

    factors = factors_of(candidates, choices)
    if factors:
        result = build(original, adapters, factors)
        _check_output(result, full=loaded.shapes_consistent)
    else:
        result = onnx.ModelProto()
        result.CopyFrom(original)
    if search is not None:
        value = trial.error if trial is not None else search.try_(choices).error
        validation = Validation(
            metric=settings.metric,
            value=value,
            tolerance=tolerance,
            passed=None if tolerance is None else value <= tolerance,
            provider=search.evaluator.provider_used,
            samples=len(search.indices),
        )
        clock.lap("validate")
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
        layers=_layer_reports(candidates, choices, factors, sensitivity),
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
        trace=[{"params": t.params, "error": t.error, "samples": t.samples} for t in search.trials] if search else [],
    )
    if mode == "compact" and trial is None and units:
        report.validation = None if closest is None else Validation(
            settings.metric, closest.error, tolerance, False, search.evaluator.provider_used, len(search.indices)
        )
        if closest is None:
            detail = ""
        else:
            detail = f" (the closest that removes parameters reached {closest.error:.4g} on the held-out part)"
        raise BoundNotMet(f"no factorization keeps {settings.metric} within {tolerance:g}{detail}", report)
    if validation is not None and validation.passed is False:
        raise BoundNotMet(f"{settings.metric} is {validation.value:.4g}, above the tolerance {tolerance:g}", report)
    return result, report


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
    sensitivity: list[float] | None,
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
                shape=list(unit.weight.value.shape),
                method=factorization.method,
                rank=config[0] if len(config) == 1 else list(config),
                params_before=unit.params,
                params_after=factorization.params,
                predicted_error=factorization.predicted_error,
                nodes=[layer.node.name for layer in unit.layers],
                sensitivity=None if sensitivity is None else sensitivity[position],
                alternatives=_alternatives(candidate, choice.option),
            )
        )
    return reports


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
