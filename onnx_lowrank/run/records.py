"""What the stages of a run pass on: one frozen record per stage, produced by it and read by the stages after
it, and `Run`, which holds the records made so far.

    Given -> Loaded (load) -> Observed (statistics) -> Offered (factorize, latency gate) -> Judging
    (sensitivity) -> Shared (int8 fallback) -> Allocated (search) -> Written (validate, fusion check) -> Report

A stage that changes what an earlier one found makes a record of its own (the statistics stage's plan
drops units whose bodies never ran; the latency gate's Offered adds the timer and its notes). The report is
the one mutable product: the stages after it (diagnose, fusion check, latency) complete it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from ..check.evaluator import Evaluator, Trial
from ..check.generalization import Decisions
from ..check.layer_timer import LayerTimer
from ..choose.allocation import bytes_budget
from ..choose.search import Search
from ..errors import known
from ..factorize.coupled import Pairing
from ..factorize.menu import UnitDecomposers
from ..graph.layers import Plan, Unit
from ..graph.model_io import LoadedModel, ModelStats
from ..graph.splice import Factorized
from ..observe.cache import Cache
from ..observe.calibration import Samples, Split
from ..observe.statistics import Counts, Moments, Tied
from ..options import Options
from ..quantize.share import Int8Share
from ..report import Report, Validation
from .modes import Allocation, Menus, Outcome, RankMode
from .progress import Progress


@dataclass(frozen=True)
class Given:
    """What the caller gives a run; `mode`: a rank mode of the caller's own (inspect's), else the options'."""

    settings: Options
    loaded: LoadedModel
    calibration: object
    labels: object
    work: Path  # a temporary folder (large models park their decompositions there)
    mode: RankMode | None = None


@dataclass(frozen=True)
class Calibrated:
    """The calibration data (load stage, with --calib): its split, the provider that runs it, and the fit
    samples the statistics are taken on (the least sure decisions repeated, for top1 / accuracy)."""

    samples: Samples
    parts: Split
    provider: str
    statistics_fit: list[int]
    decisions: dict[str, Decisions]  # the original's, where the load stage judged them already
    key: str | None  # what everything cached hangs on (None: no cache)

    @property
    def fit(self) -> list[int]:
        return self.parts.fit


@dataclass(frozen=True)
class Loaded:
    """The load stage's: the layers found, the rank mode, the calibration data."""

    mode: RankMode
    before: ModelStats
    adapters: dict
    plan: Plan
    couplings: tuple[tuple[Pairing, list], ...]  # per kind of coupled units, its pairs
    known: frozenset[str]  # node and tensor names (explicit ranks name them)
    cache: Cache
    tolerance: float | None
    data: Calibrated | None


@dataclass(frozen=True)
class Observed:
    """The statistics stage's: what each unit sees on the fit samples (None with --no-data), and the plan
    without the units of bodies that never ran on them."""

    plan: Plan
    statistics: list[Moments | Counts | Tied] | None


@dataclass(frozen=True)
class Offered:
    """Every unit's menu (factorize); the latency gate's restriction adds the timer and its notes."""

    decomposers: list[UnitDecomposers]
    timing_feed: dict[str, np.ndarray] | None  # one calibration batch: what layers and the whole model are timed on
    timer: LayerTimer | None = None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Judging:
    """The sensitivity stage's: the evaluator of candidates, and each unit's sensitivity where the mode
    weighs units by it."""

    evaluator: Evaluator
    sensitivity: list[float] | None


@dataclass(frozen=True)
class Shared:
    """The int8 fallback's: int8 of the original, and the tolerance it leaves the factorization."""

    int8: Int8Share
    share: float | None


@dataclass(frozen=True)
class Allocated:
    """The search stage's: the mode's allocation, the search that validated it (with calibration data), and
    whether the written factorizations are refit (refit.py)."""

    allocation: Allocation
    search: Search | None
    refit_on: bool
    share: float | None  # the tolerance the factorization was searched within


@dataclass(frozen=True)
class Written:
    """The validate stage's: the model to write (the factorized one, quantized with int8), its factors and
    its validated errors; the fusion check may replace the model by a variant ONNX Runtime fuses alike."""

    allocated: Allocated  # as finally allocated (int8 may have halved the factorization's share)
    factors: dict[str, Factorized]  # by unit key, until the report is made (the model holds its own copy)
    rewritten: bool  # whether any unit was factorized
    refit_layers: int
    factorized: onnx.ModelProto
    model: onnx.ModelProto  # what is written
    factor_error: float | None  # the factorization's validated error, before quantizing
    error: float | None  # the written model's: what is held against the tolerance
    validation: Validation | None
    closest: Trial | None


@dataclass
class Run:
    """The records of one run, each set by the stage that makes it (None until then)."""

    given: Given
    progress: Progress
    phases: dict[str, float] = field(default_factory=dict)  # seconds per stage
    start: float = field(default_factory=time.perf_counter)
    loaded: Loaded | None = None
    observed: Observed | None = None
    offered: Offered | None = None
    judging: Judging | None = None
    shared: Shared | None = None
    allocated: Allocated | None = None
    written: Written | None = None
    report: Report | None = None

    @property
    def settings(self) -> Options:
        return self.given.settings

    @property
    def original(self) -> onnx.ModelProto:
        return self.given.loaded.model

    @property
    def load(self) -> Loaded:
        return known(self.loaded, "the load stage's record")

    @property
    def data(self) -> Calibrated | None:
        return self.load.data

    @property
    def calibrated(self) -> Calibrated:
        """The calibration data, for the stages that run only with it."""
        return known(self.load.data, "the calibration data")

    @property
    def plan(self) -> Plan:
        return self.observed.plan if self.observed is not None else self.load.plan

    @property
    def units(self) -> list[Unit]:
        return self.plan.units

    @property
    def statistics(self) -> list[Moments | Counts | Tied] | None:
        return None if self.observed is None else self.observed.statistics

    @property
    def menus_offered(self) -> Offered:
        return known(self.offered, "the factorize stage's record")

    @property
    def int8(self) -> Int8Share | None:
        return None if self.shared is None else self.shared.int8

    @property
    def share(self) -> float | None:
        """The tolerance left to the factorization: all of it unless int8 took some."""
        return self.load.tolerance if self.shared is None else self.shared.share

    @property
    def chosen(self) -> Allocated:
        return known(self.allocated, "the search stage's record")

    @property
    def final(self) -> Written:
        return known(self.written, "the validate stage's record")

    def menus(self, search: Search | None, share: float | None) -> Menus:
        """What the rank mode allocates from: the menus, `search` validating, within `share` of the tolerance."""
        judging = self.judging
        return Menus(self.settings, self.menus_offered.decomposers, set(self.load.known), search,
                     None if judging is None else judging.sensitivity, share, self.budget)

    @property
    def budget(self) -> float | None:
        """The size modes' share of the factorizable weights: --target-params, or what --target-bytes leaves."""
        settings = self.settings
        if settings.target_bytes is None:
            return settings.target_params
        return bytes_budget(settings.target_bytes, self.load.before.bytes, self.units)

    def outcome(self, allocation: Allocation, error: float | None) -> Outcome:
        """What the rank mode judges the written model by: its allocation and validated error."""
        int8 = self.int8
        return Outcome(allocation, bool(self.units), self.settings.metric, self.load.tolerance, error,
                       None if int8 is None else int8.alone_error,
                       0 if int8 is None else len(int8.floats) + len(int8.weight_only), int8 is not None,
                       self.settings.accept == "bound", self.menus_offered.decomposers, self.statistics is not None)
