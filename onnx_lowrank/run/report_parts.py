"""The parts of a run's Report that are worked out from its state: per-layer rows, the trace, notes and
the one-line reasons a result is refused."""

from __future__ import annotations

import numpy as np
import onnx

from ..check.fusion import fused_as_given
from ..check.layer_timer import LayerTimer
from ..choose.search import Search
from ..factorize.coupled import COUPLED_METHODS
from ..factorize.int4 import BlockWeights
from ..factorize.menu import Choice, UnitDecomposers, coupled, known_coupling
from ..factorize.quantized_svd import QuantizedFactors
from ..graph.layers import Unit
from ..graph.splice import Factorized
from ..observe.activations import Untimeable
from ..report import Fusions, Latency, LayerReport, Report, TracePoint

QUANTIZED = (BlockWeights, QuantizedFactors)  # stored in blocks: their bytes and scheme are reported


def refusal(validation) -> str:
    """Why a validated model is refused: its error, or for top1 / accuracy the margins it threatens."""
    seen = f"{validation.metric} is {validation.value:.4g}"
    if validation.threatened:
        seen += (f" and {validation.threatened} of {validation.calibration_decisions} calibration decisions "
                 f"have their margin threatened ({validation.predicted_unseen:.4g})")
    if validation.value <= validation.tolerance and validation.unseen_bound is not None:  # --accept bound
        return (f"{seen}, within the tolerance {validation.tolerance:g}, but its bound for new inputs "
                f"({validation.unseen_bound:.4g} at {validation.confidence:g} confidence) is above it (--accept bound)")
    return f"{seen}, above the tolerance {validation.tolerance:g}"


def traced(trial) -> TracePoint:
    """A validated candidate in the report's trace; top1 / accuracy add the calibration decisions it threatens."""
    return TracePoint(params=trial.params, error=trial.error, samples=trial.samples,
                      threatened=None if trial.threat is None else trial.threat.threatened)


def clearly_slower(timing: Latency, where: str = "end to end") -> str | None:
    """A note when the compressed model ran slower `where` (end to end; a decoder: at one-token decode, what
    it is used for) beyond the timings' spread (each layer's gate cannot see effects between layers, such as
    a layout change)."""
    original, compressed = timing.original, timing.compressed
    if timing.speedup is None or original is None or compressed is None:
        return None  # the timing failed (timing.error): nothing to compare
    if compressed.p10_ms <= original.p90_ms:
        return None
    return (f"{where} the compressed model ran slower than the original ({timing.speedup:.2f}x, "
            f"{timing.provider}, batch {timing.batch}); try --objective latency")


def layer_reports(
    candidates: list[UnitDecomposers], choices: list[Choice], factors: dict[str, Factorized],
    sensitivity: list[float] | None, timer: LayerTimer | None,
) -> list[LayerReport]:
    reports = []
    pruned = _pair_sensitivity_positions(candidates)
    for position, (candidate, choice) in enumerate(zip(candidates, choices)):
        if choice.option is None:
            continue
        # a pruned pair's rows show its pruning's sensitivity
        where = pruned.get(id(candidate), position) if choice.option.method in COUPLED_METHODS else position
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
                rank=config[0] if len(config) == 1 or isinstance(factorization, QUANTIZED) else list(config),
                params_before=unit.params,
                params_after=factorization.params,
                predicted_error=factorization.predicted_error,
                nodes=[layer.node.name for layer in unit.layers],
                sensitivity=None if sensitivity is None or where >= len(sensitivity) else sensitivity[where],
                alternatives=_alternatives(candidate, choice.option),
                spectrum=_spectrum(candidate),
                latency=None if timer is None else _layer_latency(timer, unit, factorization),
                **_bytes(unit, factorization),
            )
        )
    return reports


def _bytes(unit: Unit, factorization: Factorized) -> dict:
    """The weight's bytes and its replacement's: a quantized layer's as stored, factors in the weight's type."""
    size = np.dtype(unit.weight.storage_dtype).itemsize
    if isinstance(factorization, QUANTIZED):
        return {"bytes_before": unit.params * size, "bytes_after": factorization.nbytes,
                "quantization": factorization.scheme}
    return {"bytes_before": unit.params * size, "bytes_after": factorization.params * size, "quantization": None}


def _pair_sensitivity_positions(candidates: list[UnitDecomposers]) -> dict[int, int]:
    """Where each pruned pair's sensitivity is (after the units', search.sensitivities), for its units."""
    found = {}
    for number, consumer in enumerate(coupled(candidates)):
        for member in (consumer, *known_coupling(consumer).producers):
            found[id(member)] = len(candidates) + number
    return found


def fusions(original, factorized, report: Report, search: Search | None, base_dir: str, bare: bool = True
            ) -> tuple[onnx.ModelProto, Fusions]:
    """ONNX Runtime's fusions in the original and the factorized model, and the variant of the factorized
    model to write (fusion.fused_as_given); a model ONNX Runtime cannot optimize was still validated as
    written, so that is a note, not a failure."""
    provider = search.evaluator.provider_used if search is not None else "cpu"
    try:
        return fused_as_given(original, factorized, [n for layer in report.layers for n in layer.nodes], provider,
                              base_dir=base_dir, bare=bare)
    except Exception as error:  # noqa: BLE001 - onnxruntime's own exception types
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return factorized, Fusions(error=f"onnxruntime could not optimize the models: {first_line}")


def _layer_latency(timer: LayerTimer, unit, factorization: Factorized) -> dict[str, float] | None:
    """The chosen factorization against its dense layer, alone (cached when the gate timed it)."""
    if factorization.method in COUPLED_METHODS:
        return None
    try:
        dense_ms, factorized_ms = timer.times(unit, factorization)
    except Untimeable:
        return None
    return {"dense_ms": dense_ms, "factorized_ms": factorized_ms}


def _spectrum(candidate: UnitDecomposers) -> list[float]:
    """The unit's SVD energies as fractions of its total, to 4 digits (the report's spectrum plots)."""
    spectrum = candidate.primary.spectrum
    total = spectrum.energy.sum() if spectrum.total is None else spectrum.total
    return [float(f"{e:.4g}") for e in (spectrum.energy / total if total > 0 else spectrum.energy)]


def _alternatives(candidate: UnitDecomposers, chosen) -> dict[str, float | None]:
    """Why the other methods lost: each one's least predicted error within the chosen option's parameters
    (None: it has no option that small)."""
    best: dict[str, float | None] = {}
    for option in candidate.options():
        if option.method == chosen.method:
            continue
        least = best.setdefault(option.method, None)
        if option.params <= chosen.params and (least is None or option.error < least):
            best[option.method] = option.error
    return best
