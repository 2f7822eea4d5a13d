"""`inspect`: per-layer facts without changing anything: what can be factorized, how far, what cannot."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import onnx

from .adapters import ADAPTERS
from .errors import InputError
from .layers import find_layers
from .model_io import load_model
from .splice import import_graph
from .calibration import load_calibration
from .data_aware import data_aware_factorizers
from .runtime import resolve_provider
from .svd import spectrum_of


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


def inspect(
    model_or_path: onnx.ModelProto | str | os.PathLike,
    ops: Sequence[str] | None = None,
    calibration=None,
    provider: str = "cpu",
    batch_size: int = 8,
) -> list[LayerInfo]:
    """Per-layer shape, size and spectrum of every candidate layer, and the reason for each skip.

    The spectrum is the weight's singular values, or with calibration data (any source `compress`
    takes; all samples are used) the energy of the layer's outputs on that data per rank.
    """
    loaded = load_model(model_or_path)
    chosen = tuple(ops) if ops is not None else tuple(ADAPTERS)
    unknown = [op for op in chosen if op not in ADAPTERS]
    if unknown:
        raise InputError(f"unknown op type {unknown[0]!r} in ops; choose from {', '.join(ADAPTERS)}")
    graph = import_graph(loaded.model).graph
    plan = find_layers(graph, loaded.model, {op: ADAPTERS[op] for op in chosen})
    if calibration is not None:
        samples = load_calibration(calibration, loaded.model)
        every = list(range(len(samples)))
        provider = resolve_provider(provider)
        spectra = [f.spectrum for f in data_aware_factorizers(loaded.model, plan.units, samples, every, provider, batch_size)]
    else:
        spectra = [spectrum_of(unit.matrices) for unit in plan.units]
    rows = []
    for unit, spectrum in zip(plan.units, spectra):
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
