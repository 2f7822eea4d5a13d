"""What a validated model promises: its held-out error against the tolerance, and an upper confidence bound
for new inputs (generalization.py: Clopper-Pearson for lost decisions, a bootstrap over samples for the
continuous metrics, the order statistic for max-abs)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import onnx

from ..errors import known
from ..observe.sessions import Session
from ..report import Validation
from .evaluator import Evaluator
from .generalization import beyond_maximum, bootstrap, clopper_pearson
from .metrics import DISCRETE, score


def validation(evaluator: Evaluator, model: onnx.ModelProto, indices: Sequence[int], all_labels, metric: str,
               tolerance: float | None, confidence: float, steered: Sequence[int] = ()) -> Validation:
    """The held-out result of `model` on `indices` and what it promises for new inputs; `steered`: held-out
    samples that steered the choice (the resampled bound leaves them out: they favour it)."""
    indices = list(indices)
    labels = None if all_labels is None else all_labels[indices]
    common: dict[str, Any] = {"metric": metric, "tolerance": tolerance, "provider": evaluator.provider_used,
              "samples": len(indices), "confidence": confidence, "outputs": list(evaluator.output_names)}
    if metric in DISCRETE:
        judged = evaluator.judge(model, indices, metric, labels)
        lost, total = known(judged.lost, "the decisions lost")  # judged on a discrete metric
        found = known(judged.threat, "the threat")
        return Validation(value=judged.error, passed=None if tolerance is None else judged.value <= tolerance,
                          unseen_bound=clopper_pearson(lost, total, confidence), decisions=total, lost=lost,
                          threatened=found.threatened, calibration_decisions=found.decisions,
                          ties=found.ties, ties_lost=found.ties_lost,
                          predicted_unseen=found.predicted, **common)
    names = evaluator.output_names
    candidate = evaluator.outputs(Session(model, evaluator.provider), indices, names)
    reference = evaluator.reference(indices, names)
    error = score(metric, reference, candidate, labels)
    # resampled: the held-out samples that did not steer the choice (the others favour it)
    left_out = set(steered)
    kept = [position for position, index in enumerate(indices) if index not in left_out]
    kept = kept if len(kept) >= len(indices) // 4 else list(range(len(indices)))
    bound = beyond_maximum(len(indices), confidence) if metric == "max-abs" else bootstrap(
        metric, [[r[k] for k in kept] for r in reference], [[c[k] for k in kept] for c in candidate],
        confidence, labels=None if labels is None else labels[kept])
    return Validation(value=error, passed=None if tolerance is None else error <= tolerance,
                      unseen_bound=bound, **common)
