"""The typed report of a run, and its JSON form (the keys MISSION.md promises)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field


@dataclass(frozen=True)
class LayerReport:
    """One factorized unit (its weight may serve several nodes, listed in `nodes`)."""

    node: str
    op: str
    weight: str
    shape: list[int]  # the weight's shape as the node sees it
    method: str
    rank: int
    params_before: int
    params_after: int
    predicted_error: float  # relative dropped energy of the weight (weight-only) at this rank
    nodes: list[str]


@dataclass(frozen=True)
class SkippedLayer:
    node: str
    op: str
    reason: str


@dataclass(frozen=True)
class Validation:
    metric: str
    value: float
    tolerance: float
    passed: bool
    provider: str
    samples: int


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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)
