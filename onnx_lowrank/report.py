"""The typed report of a run, and its JSON form (the keys MISSION.md promises)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field


@dataclass
class LayerReport:
    """One factorized unit (its weight may serve several nodes, listed in `nodes`)."""

    node: str
    op: str
    weight: str
    shape: list[int]  # the weight's shape as the node sees it
    method: str
    rank: int | list[int]  # one rank, or one per stage (Tucker-2: [out, in])
    params_before: int
    params_after: int
    predicted_error: float  # relative dropped energy at this rank: of the weight, or of W x on calibration data
    nodes: list[str]
    sensitivity: float | None = None  # final-output squared relative error per unit of predicted error
    alternatives: dict[str, float | None] = field(default_factory=dict)  # other methods' least predicted
    # error within these parameters (None: none that small): why they lost
    spectrum: list[float] = field(default_factory=list)  # the SVD's energy per rank component, as a
    # fraction of the total (data-aware: of the layer's output energy), largest first: where the cut fell
    latency: dict[str, float] | None = None  # the gate's micro-benchmark: {"dense_ms", "factorized_ms"}


@dataclass(frozen=True)
class SkippedLayer:
    node: str
    op: str
    reason: str


@dataclass(frozen=True)
class Validation:
    """The compressed model's error on the held-out calibration samples, in ONNX Runtime."""

    metric: str
    value: float
    tolerance: float | None  # None: no bound was asked for (size or explicit ranks without --tolerance)
    passed: bool | None
    provider: str  # the execution provider that really ran: cpu or cuda
    samples: int
    # what the held-out result promises for new inputs from the same distribution (generalization.py)
    confidence: float | None = None  # the confidence level of `unseen_bound` (e.g. 0.95)
    unseen_bound: float | None = None  # upper confidence bound on the metric for new inputs: Clopper-Pearson
    # for top1 / accuracy (the fraction of new decisions lost), a bootstrap over samples for rel-l2 and
    # cosine; for max-abs, the fraction of new inputs that may exceed the observed maximum
    decisions: int | None = None  # top1 / accuracy: decisions counted on the held-out part (samples, or
    # positions for top1 on sequence outputs) ...
    lost: int | None = None  # ... and how many of them changed (top1) or were lost (accuracy)
    threatened: int | None = None  # top1 / accuracy: calibration decisions (fit part included) whose margin
    # is within the safety factor times the perturbation the compressed model causes at that margin level
    ties: int | None = None  # top1 / accuracy: calibration decisions the original makes by a near-tie margin,
    # which any change may flip: counted, not held against the tolerance ...
    ties_lost: int | None = None  # ... and how many of the `lost` were such near-ties
    calibration_decisions: int | None = None  # top1 / accuracy: decisions on all calibration samples
    predicted_unseen: float | None = None  # threatened / decisions of all calibration samples: the
    # predicted fraction of new inputs whose decision may change (what the search held within the tolerance)


@dataclass
class Report:
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    seconds: float
    ops_before: dict[str, int]
    ops_after: dict[str, int]
    layers: list[LayerReport] = field(default_factory=list)
    skipped: list[SkippedLayer] = field(default_factory=list)
    validation: Validation | None = None
    mode: str = ""  # ranks | energy | size | compact
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase
    trace: list[dict] = field(default_factory=list)  # every validated candidate: params (of the units), error
    factorizable_params: int = 0  # parameters of the factorizable units before (the trace's full size)
    chosen: dict | None = None  # the search's chosen point: {"params" (of the units), "error"}
    objective: str = "size"  # size | latency | balanced: what the ranks were chosen for
    latency: dict | None = None  # end to end, original vs compressed, side by side: {"provider", "batch",
    # "threads", "runs", "original": {"median_ms", "p10_ms", "p90_ms"}, "compressed": {...}, "speedup"}
    fusions: dict | None = None  # ONNX Runtime's fused nodes, original vs factorized (fusion.fusion_check)
    notes: list[str] = field(default_factory=list)  # what the user should know about how it was done
    quantization: dict | None = None  # --quantize: {"scheme", "bytes_factorized", "bytes_quantized",
    # "error_factorized", "error_quantized", "nodes"}: what factorization and quantization each gave

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)
