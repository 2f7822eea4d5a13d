"""`inspect`: per-layer facts without changing anything: what can be factorized, how far, what cannot."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from ..graph.adapters import ADAPTERS
from ..graph.model_io import load_model
from ..options import Options
from .modes import Describe
from .progress import Progress
from .records import Given, Run
from .stages import FRONT, run_stages


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
    at_half: dict[str, float] = field(default_factory=dict)  # per method: least predicted error at half
    # the layer's parameters (methods with no option that small are absent)
    reason: str | None = None  # why the node is not factorizable


def inspect(
    model_or_path: onnx.ModelProto | str | os.PathLike,
    ops: Sequence[str] | None = None,
    calibration=None,
    provider: str = "cpu",
    batch_size: int = 8,
    method: str = "auto",
) -> list[LayerInfo]:
    """Per-layer shape, size and spectrum of every candidate layer, each method's predicted error at half
    the layer's parameters (what `--method auto` weighs), and the reason for each skip.

    The spectrum is the weight's singular values, or with calibration data (any source `compress`
    takes; all samples are used) the energy of the layer's outputs on that data per rank.
    """
    loaded = load_model(model_or_path, lazy=True)  # weights read one layer at a time
    if calibration is not None:  # ONNX Runtime needs them all
        loaded = loaded.materialized()
    settings = Options(ops=tuple(ops) if ops is not None else tuple(ADAPTERS), provider=provider,
                       batch_size=batch_size, method=method)
    with tempfile.TemporaryDirectory(prefix="onnx-lowrank-") as work:
        run = Run(Given(settings, loaded, calibration, None, Path(work), mode=Describe()), Progress(False))
        run_stages(run, FRONT)  # large models park their decompositions in `work`: rows are made here
        rows = [_row(unit, candidate) for unit, candidate in zip(run.units, run.menus_offered.decomposers)]
    return rows + [LayerInfo(node=s.node, op=s.op, reason=s.reason) for s in run.plan.skipped]


def _row(unit, candidate) -> LayerInfo:
    """A factorizable unit's row: its shape, size, spectrum and each method's error at half its size."""
    spectrum = candidate.primary.spectrum
    at_half: dict[str, float] = {}
    for option in candidate.options():
        if option.params <= unit.params / 2:
            at_half[option.method] = min(option.error, at_half.get(option.method, np.inf))
    shrinks = unit.break_even > 0  # some rank saves parameters: the energy it keeps means something
    return LayerInfo(
        node=unit.name,
        op=unit.op,
        weight=unit.weight.name,
        shape=list(unit.weight.shape),
        groups=unit.groups,
        matrix=unit.shape,
        params=unit.params,
        break_even=unit.break_even,
        effective_rank=spectrum.effective_rank,
        rank_90=spectrum.rank_for_energy(0.90),
        rank_99=spectrum.rank_for_energy(0.99),
        energy_at_break_even=float(1.0 - spectrum.dropped[unit.break_even]) if shrinks else None,
        shared_by=[layer.node.name for layer in unit.layers[1:]],
        at_half=dict(sorted(at_half.items(), key=lambda item: item[1])),
        reason=None if shrinks or any(o.params < unit.params for o in candidate.options()) else _unshrinkable(unit),
    )


def _unshrinkable(unit) -> str:
    """Why a layer no rank and no method shrinks is not factorizable (a depthwise convolution above all)."""
    groups, (rows, cols) = unit.groups, unit.shape
    each = f"each of its {groups} groups is a {rows}x{cols} matrix" if groups > 1 else f"its matrix is {rows}x{cols}"
    kind = "depthwise convolution: " if unit.op == "Conv" and groups > 1 and rows == 1 else ""
    return f"not factorizable ({kind}{each}, which no rank below {min(rows, cols)} shrinks, nor any other method)"
