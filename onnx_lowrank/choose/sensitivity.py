"""Per unit, how much the final outputs move per unit of its predicted error: one probe model with only
that unit factorized (at about PROBE_ERROR predicted error), fed to the original's session where an override
allows, run on a few fit samples (as many as PROBE_MACS affords)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import onnx

from ..check.evaluator import Evaluator
from ..factorize.menu import UnitDecomposers, coupled
from ..factorize.prune import KeptOutputs, pruned_probe
from ..factorize.rewrite import build
from ..graph.layers import Unit
from ..graph.splice import Factorized
from ..observe.statistics import Moments

PROBE_ERROR = 0.01  # predicted relative error at which each unit's sensitivity is probed
PROBE_SAMPLES = 16  # fit samples a probe runs on, at most ...
PROBE_MIN_SAMPLES = 2  # ... and at least, within PROBE_MACS multiply-adds of the factorizable layers in all
PROBE_MACS = 2e12  # (one probe per unit). BERT-base at 128 tokens: 2 samples (about 30 s on 2 cores); MiniLM-L6
# at 64 tokens: 16. Measured on MiniLM-L6: 2 samples rank its units' sensitivities as 16 do (Spearman 0.95-0.98
# for four disjoint pairs; 4 samples 0.98-0.99), and the half-size allocations they lead to validated at
# 0.1156-0.1204 mean cosine error, 16 samples' at 0.1195


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
