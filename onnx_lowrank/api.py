"""The Python API: `compress` and `inspect`, configured by one typed `Options` object."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import onnx

from .adapters import ADAPTERS
from .errors import InputError
from .layers import Plan, find_layers
from .model_io import LoadedModel, check_output_path, load_model, model_stats, save_model
from .ranks import Choice, by_budget, by_energy, explicit, validate_ranks
from .report import LayerReport, Report, SkippedLayer
from .splice import Splice, export, import_graph
from .svd import TruncatedSVD, spectrum_of

METHODS = ("auto", "svd")


@dataclass(frozen=True)
class Options:
    """How to compress. Exactly one of `ranks`, `target_params`, `energy` chooses the ranks."""

    ranks: Mapping[str, int | str] | None = None  # {"node or weight name" | "*": int | "full"}
    target_params: float | None = None  # keep this fraction of the factorizable parameters
    energy: float | None = None  # per layer, the smallest rank keeping this fraction of singular-value energy
    method: str = "auto"
    ops: Sequence[str] = field(default_factory=lambda: tuple(ADAPTERS))
    allow_larger: bool = False  # keep factorizations that do not shrink a layer

    def __post_init__(self) -> None:
        given = [name for name in ("ranks", "target_params", "energy") if getattr(self, name) is not None]
        if len(given) != 1:
            raise InputError("choose ranks with exactly one of --ranks, --target-params or --energy")
        if self.ranks is not None:
            object.__setattr__(self, "ranks", validate_ranks(self.ranks))
        _check_fraction("target-params", self.target_params, allow_one=True)
        _check_fraction("energy", self.energy, allow_one=True)
        if self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        unknown = [op for op in self.ops if op not in ADAPTERS]
        if unknown or not self.ops:
            raise InputError(f"unknown op type {unknown[0] if unknown else '(none)'!r} in ops; choose from {', '.join(ADAPTERS)}")


def _check_fraction(name: str, value: float | None, allow_one: bool) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{name} must be a number in (0, 1], got {value!r}")
    if not (0 < value <= 1 if allow_one else 0 < value < 1):
        raise InputError(f"{name} must be in (0, 1], got {value:g}")


def compress(model_or_path: onnx.ModelProto | str | os.PathLike, **options) -> tuple[onnx.ModelProto, Report]:
    """Factorize the model's layers; return the new model and a report. The input is never modified.

    `options` are the fields of `Options`. Raises InputError for unusable input or options.
    """
    settings = Options(**options)
    return _compress(load_model(model_or_path), settings)


def compress_file(
    input_path: str | os.PathLike, output_path: str | os.PathLike, **options
) -> Report:
    """Compress a model file into another, atomically; external data is kept when the input had it.

    Options, model and output path are all checked before any work is done.
    """
    settings = Options(**options)
    loaded = load_model(input_path)
    output = check_output_path(output_path, loaded.path)
    model, report = _compress(loaded, settings)
    save_model(model, output, external_data=loaded.external_data)
    return report


def _compress(loaded: LoadedModel, settings: Options) -> tuple[onnx.ModelProto, Report]:
    start = time.perf_counter()
    original = loaded.model
    before = model_stats(original)
    imported = import_graph(original)
    graph = imported.graph
    plan = find_layers(graph, original, {op: ADAPTERS[op] for op in settings.ops})
    svds = [TruncatedSVD(unit.matrices) for unit in plan.units]
    choices = _choose(plan, svds, settings, known={n.name for n in graph.nodes} | set(graph.tensors()))

    splice = Splice(graph)
    layers: list[LayerReport] = []
    skipped = [SkippedLayer(s.node, s.op, s.reason) for s in plan.skipped]
    for unit, svd, choice in zip(plan.units, svds, choices):
        if choice.rank is None:
            skipped.extend(SkippedLayer(layer.node.name, layer.node.op, choice.reason) for layer in unit.layers)
            continue
        factors = svd.factorize(choice.rank)
        for layer in unit.layers:
            splice.replace(layer, factors)
        layers.append(
            LayerReport(
                node=unit.name,
                op=unit.op,
                weight=unit.weight.name,
                shape=list(unit.weight.value.shape),
                method=factors.method,
                rank=factors.rank,
                params_before=unit.params,
                params_after=factors.params,
                predicted_error=factors.predicted_error,
                nodes=[layer.node.name for layer in unit.layers],
            )
        )
    if layers:
        result = export(imported, original, splice.metadata)
        _check_output(result)
    else:
        result = onnx.ModelProto()
        result.CopyFrom(original)
    after = model_stats(result)
    report = Report(
        params_before=before.params,
        params_after=after.params,
        bytes_before=before.bytes,
        bytes_after=after.bytes,
        seconds=time.perf_counter() - start,
        ops_before=before.ops,
        ops_after=after.ops,
        layers=layers,
        skipped=skipped,
    )
    return result, report


def _choose(plan: Plan, svds: list[TruncatedSVD], settings: Options, known: set[str]) -> list[Choice]:
    spectra = [svd.spectrum for svd in svds]
    if settings.ranks is not None:
        return explicit(plan.units, settings.ranks, known, settings.allow_larger)
    if settings.energy is not None:
        return by_energy(plan.units, spectra, settings.energy, settings.allow_larger)
    return by_budget(plan.units, spectra, settings.target_params)


def _check_output(model: onnx.ModelProto) -> None:
    """Our own output must pass the full checker; a failure here is a bug, not bad input."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise RuntimeError(f"the rewritten model fails the ONNX checker: {error}") from error


@dataclass(frozen=True)
class LayerInfo:
    """One row of `inspect`: a candidate layer's shape, size and spectrum, or why it is skipped."""

    node: str
    op: str
    weight: str | None = None
    shape: list[int] | None = None  # the weight as the node sees it
    groups: int | None = None  # matrices factorized at one rank (conv groups, MatMul batch)
    matrix: tuple[int, int] | None = None  # (out, in) of each matrix
    params: int | None = None
    break_even: int | None = None  # largest rank that still shrinks the layer
    effective_rank: float | None = None
    rank_90: int | None = None  # smallest rank keeping 90% of the singular-value energy
    rank_99: int | None = None
    energy_at_break_even: float | None = None  # energy kept by the largest rank that still saves
    shared_by: list[str] = field(default_factory=list)
    reason: str | None = None  # why the node is not factorizable


def inspect(model_or_path: onnx.ModelProto | str | os.PathLike, ops: Sequence[str] | None = None) -> list[LayerInfo]:
    """Per-layer facts without changing anything: what can be factorized, how far, and what cannot."""
    loaded = load_model(model_or_path)
    chosen = tuple(ops) if ops is not None else tuple(ADAPTERS)
    unknown = [op for op in chosen if op not in ADAPTERS]
    if unknown:
        raise InputError(f"unknown op type {unknown[0]!r} in ops; choose from {', '.join(ADAPTERS)}")
    graph = import_graph(loaded.model).graph
    plan = find_layers(graph, loaded.model, {op: ADAPTERS[op] for op in chosen})
    rows = []
    for unit in plan.units:
        spectrum = spectrum_of(unit.matrices)
        rows.append(
            LayerInfo(
                node=unit.name,
                op=unit.op,
                weight=unit.weight.name,
                shape=list(unit.weight.value.shape),
                groups=unit.groups,
                matrix=unit.shape,
                params=unit.params,
                break_even=unit.break_even,
                effective_rank=spectrum.effective_rank,
                rank_90=spectrum.rank_for_energy(0.90),
                rank_99=spectrum.rank_for_energy(0.99),
                energy_at_break_even=float(1.0 - spectrum.dropped[unit.break_even]),
                shared_by=[layer.node.name for layer in unit.layers[1:]],
            )
        )
    rows += [LayerInfo(node=s.node, op=s.op, reason=s.reason) for s in plan.skipped]
    return rows
