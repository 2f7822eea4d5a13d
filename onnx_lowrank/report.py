"""The typed report of a run, and its JSON form (the keys MISSION.md promises).

Every section is a dataclass whose fields are named as its JSON keys. A field with OMITTED metadata is a
key the JSON only has when it is known: while the field is None, the dict form (`as_dict`) leaves it out.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_OMIT = "omitted when None"
OMITTED = {_OMIT: True}  # field metadata: the dict form leaves the key out while the value is None


def as_dict(value: Any) -> Any:
    """The JSON-ready form of a report or any part of it: dataclasses.asdict, except that the OMITTED
    fields that are None are left out."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: as_dict(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not (f.metadata.get(_OMIT) and getattr(value, f.name) is None)}
    if isinstance(value, (list, tuple)):
        return type(value)(as_dict(item) for item in value)
    if isinstance(value, dict):
        return type(value)((as_dict(k), as_dict(v)) for k, v in value.items())
    return copy.deepcopy(value)


def _built(cls, data: Mapping | None):
    """A section's dataclass from its dict form (None stays None): its `from_dict` when it has parts of
    its own to build, else its fields as they are."""
    if data is None:
        return None
    return cls.from_dict(data) if hasattr(cls, "from_dict") else cls(**data)


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
    bytes_before: int | None = None  # the weight's bytes, and its replacement's (quantized: as stored)
    bytes_after: int | None = None
    quantization: dict[str, int] | None = None  # a quantized layer's scheme: {"bits", "block", "correction_rank"}


@dataclass(frozen=True)
class SkippedLayer:
    node: str
    op: str
    reason: str


@dataclass(frozen=True)
class Validation:
    """The compressed model's error on the held-out calibration samples, in ONNX Runtime."""

    metric: str
    value: float  # what was held against the tolerance: the metric; for top1 / accuracy the share of held-out
    # decisions changed or lost (near-ties apart where exempt), or the share predicted from the calibration
    # margins threatened (`predicted_unseen`) where that is larger
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
    # which any change may flip ...
    ties_lost: int | None = None  # ... and how many of the `lost` were such near-ties ...
    ties_exempt: bool | None = None  # ... and whether they were left out of `value` (--ties exempt) or counted
    calibration_decisions: int | None = None  # top1 / accuracy: decisions on all calibration samples
    predicted_unseen: float | None = None  # threatened / decisions of all calibration samples: the
    # predicted fraction of new inputs whose decision may change (what the search held within the tolerance)
    outputs: list[str] | None = None  # the graph outputs compared (--outputs, or the metric's default)
    accept: str | None = None  # what `passed` holds within the tolerance: "value", or "bound": the value and
    # `unseen_bound` (--accept)


@dataclass(frozen=True)
class TracePoint:
    """A validated candidate of the search (the report's trace)."""

    params: int  # of the units
    error: float
    samples: int  # held-out samples it was validated on
    # top1 / accuracy: the calibration decisions whose margin it threatens
    threatened: int | None = field(default=None, metadata=OMITTED)


@dataclass(frozen=True)
class Chosen:
    """The search's chosen point."""

    params: int  # of the units
    error: float


@dataclass(frozen=True)
class Timing:
    """Wall time of one inference: median and 10th / 90th percentiles over `runs` timed runs."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int

    def to_dict(self) -> dict:
        return as_dict(self)

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Timing:
        ms = np.asarray(seconds, dtype=np.float64) * 1e3
        p10, median, p90 = np.percentile(ms, [10, 50, 90])
        return cls(float(median), float(p10), float(p90), int(ms.size))


@dataclass
class Latency:
    """End to end, the original against the compressed model, side by side (latency.end_to_end). Should
    onnxruntime fail to run a model with every optimization on, `error` says so and only `provider`,
    `batch` and `threads` are given besides."""

    provider: str  # the one that ran: cpu or cuda
    batch: int | None  # the feed's first axis
    threads: int | None  # None: onnxruntime's default
    runs: int | None = field(default=None, metadata=OMITTED)
    original: Timing | None = field(default=None, metadata=OMITTED)
    compressed: Timing | None = field(default=None, metadata=OMITTED)  # the written model (quantized, with int8)
    factorized: Timing | None = field(default=None, metadata=OMITTED)  # with int8: the factorized one as well
    speedup: float | None = field(default=None, metadata=OMITTED)  # median original / median compressed
    error: str | None = field(default=None, metadata=OMITTED)

    def to_dict(self) -> dict:
        return as_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> Latency:
        timings = {name: _built(Timing, data.get(name)) for name in ("original", "compressed", "factorized")}
        return cls(**{**data, **timings})


@dataclass(frozen=True)
class FusionChange:
    """A kind of fused node whose count changed, and the factorized layer(s) it is attributed to."""

    kind: str
    layer: str | None  # None: the unfactorized part
    original: int
    compressed: int


@dataclass
class Fusions:
    """ONNX Runtime's fused nodes, original against factorized (fusion.fusion_check); when onnxruntime could
    not optimize the models, only `error`."""

    provider: str | None = field(default=None, metadata=OMITTED)
    level: str | None = field(default=None, metadata=OMITTED)
    original: dict[str, int] | None = field(default=None, metadata=OMITTED)  # fused kinds of the whole graphs
    compressed: dict[str, int] | None = field(default=None, metadata=OMITTED)
    # {"original", "compressed"}: the same for the nodes attributed to no factorized layer
    unfactorized: dict[str, dict[str, int]] | None = field(default=None, metadata=OMITTED)
    unfactorized_match: bool | None = field(default=None, metadata=OMITTED)
    lost: list[FusionChange] | None = field(default=None, metadata=OMITTED)
    gained: list[FusionChange] | None = field(default=None, metadata=OMITTED)
    error: str | None = field(default=None, metadata=OMITTED)

    def to_dict(self) -> dict:
        return as_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> Fusions:
        changes = {side: [FusionChange(**entry) for entry in data[side]]
                   for side in ("lost", "gained") if data.get(side) is not None}
        return cls(**{**data, **changes})


@dataclass(frozen=True)
class FallbackStep:
    """A node the int8 fallback took out of dynamic quantization (quantize.FallbackNode), and why."""

    node: str
    op: str
    scheme: str  # "weight-only" (MatMul, Gemm) or "float" (Gather, Conv)
    error_reduction: float
    extra_bytes: int
    error_after: float


@dataclass(frozen=True)
class FallbackSearch:
    """What the int8 fallback measured (quantize.Fallback)."""

    share: float
    error_int8_all: float
    error_int8_fallback: float
    nodes_measured: int
    checks: int
    seconds: float


@dataclass
class Quantization:
    """--quantize: what factorization and quantization each gave (int8_share.Int8Share.summary)."""

    scheme: str
    bytes_factorized: int
    bytes_quantized: int
    error_factorized: float | None  # the factorization alone (validated, before quantizing)
    error_quantized: float | None  # factorization and quantization together: what was validated
    error_quantized_alone: float | None  # the original quantized (with the fallback), no factorization
    nodes: dict  # what the quantizer did: quantize.QuantizedModel.info
    range: str | None  # full or reduced (7-bit weights)
    range_reason: str | None  # auto: which CPU feature decided; or requested
    # compact mode: the nodes taken out of dynamic int8, in order, and what was measured
    fallback_nodes: list[FallbackStep] | None = field(default=None, metadata=OMITTED)
    fallback: FallbackSearch | None = field(default=None, metadata=OMITTED)

    def to_dict(self) -> dict:
        return as_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> Quantization:
        steps = data.get("fallback_nodes")
        return cls(**{**data, "fallback_nodes": None if steps is None else [FallbackStep(**step) for step in steps],
                      "fallback": _built(FallbackSearch, data.get("fallback"))})


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
    trace: list[TracePoint] = field(default_factory=list)  # every validated candidate
    factorizable_params: int = 0  # parameters of the factorizable units before (the trace's full size)
    chosen: Chosen | None = None  # the search's chosen point
    objective: str = "size"  # size | latency | balanced: what the ranks were chosen for
    latency: Latency | None = None  # end to end, original vs compressed, side by side
    decode_latency: Latency | None = field(default=None, metadata=OMITTED)  # a KV-cache decoder: one token, batch 1
    fusions: Fusions | None = None  # ONNX Runtime's fused nodes, original vs factorized
    notes: list[str] = field(default_factory=list)  # what the user should know about how it was done
    quantization: Quantization | None = None  # --quantize: what factorization and quantization each gave
    refit: str = "none"  # sequential: the factorized layers were solved again in graph order (refit.py)
    refit_layers: int = 0  # how many of them

    def to_dict(self) -> dict:
        return as_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> Report:
        """The report of its dict form (`to_dict`, or its JSON read back)."""
        validation = data.get("validation")
        return cls(**{
            **data,
            "layers": [LayerReport(**layer) for layer in data.get("layers", [])],
            "skipped": [SkippedLayer(**entry) for entry in data.get("skipped", [])],
            "validation": None if validation is None else Validation(**validation),
            "trace": [TracePoint(**point) for point in data.get("trace", [])],
            "chosen": _built(Chosen, data.get("chosen")),
            "latency": _built(Latency, data.get("latency")),
            "decode_latency": _built(Latency, data.get("decode_latency")),
            "fusions": _built(Fusions, data.get("fusions")),
            "quantization": _built(Quantization, data.get("quantization")),
        })

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)
