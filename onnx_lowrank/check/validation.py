"""What a validated model promises: its held-out error against the tolerance, and an upper confidence bound
for new inputs (generalization.py: Clopper-Pearson for lost decisions, a bootstrap over samples for the
continuous metrics, the order statistic for max-abs)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx

from ..errors import known
from ..observe.sessions import Session
from ..report import Validation
from .evaluator import Evaluator
from .generalization import beyond_maximum, bootstrap, clopper_pearson
from .metrics import DISCRETE, Outputs, score


def validation(evaluator: Evaluator, model: onnx.ModelProto, indices: Sequence[int], all_labels, metric: str,
               tolerance: float | None, confidence: float, steered: Sequence[int] = (),
               accept_bound: bool = False) -> Validation:
    """The held-out result of `model` on `indices` and what it promises for new inputs; `steered`: held-out
    samples that steered the choice (the resampled bound leaves them out: they favour it); `accept_bound`:
    it passes only when its bound is within the tolerance too (--accept bound)."""
    indices = list(indices)
    labels = None if all_labels is None else all_labels[indices]
    common: dict[str, Any] = {"metric": metric, "tolerance": tolerance, "provider": evaluator.provider_used,
              "samples": len(indices), "confidence": confidence, "outputs": list(evaluator.output_names),
                              "accept": "bound" if accept_bound else "value"}
    if metric in DISCRETE:
        judged = evaluator.judge(model, indices, metric, labels)
        lost, total = known(judged.lost, "the decisions lost")  # judged on a discrete metric
        found = known(judged.threat, "the threat")
        bound = clopper_pearson(lost, total, confidence)
        return Validation(value=judged.value, passed=_passed(judged.value, bound, tolerance, accept_bound),
                          unseen_bound=bound, decisions=total, lost=lost,
                          threatened=found.threatened, calibration_decisions=found.decisions,
                          ties=found.ties, ties_lost=found.ties_lost, ties_exempt=found.exempt,
                          predicted_unseen=found.predicted, **common)
    names = evaluator.output_names
    candidate = evaluator.outputs(Session(model, evaluator.provider), indices, names)
    reference = evaluator.reference(indices, names)
    error = score(metric, reference, candidate, labels)
    # resampled: the held-out samples that did not steer the choice (the others favour it)
    left_out = set(steered)
    kept = [position for position, index in enumerate(indices) if index not in left_out]
    kept = kept if len(kept) >= len(indices) // 4 else list(range(len(indices)))
    if metric == "max-abs":
        bound = beyond_maximum(len(indices), confidence)
    else:
        bound = _resampled(metric, reference, candidate, kept, labels, confidence)
        if bound < error:  # the samples that did not steer are not where this model errs (a refused
            # candidate, whose error the steering samples show): a bound for it is over all of them
            bound = max(error, _resampled(metric, reference, candidate, range(len(indices)), labels, confidence))
    return Validation(value=error, passed=_passed(error, bound, tolerance, accept_bound), unseen_bound=bound,
                      **common)


def _resampled(metric: str, reference: Outputs, candidate: Outputs, kept: Sequence[int], labels: np.ndarray | None,
               confidence: float) -> float:
    """The bootstrap bound over the held-out samples at positions `kept`."""
    return bootstrap(metric, [[r[k] for k in kept] for r in reference], [[c[k] for k in kept] for c in candidate],
                     confidence, labels=None if labels is None else labels[list(kept)])


def _passed(value: float, bound: float, tolerance: float | None, accept_bound: bool) -> bool | None:
    """Within the tolerance: the value, and with --accept bound the bound for new inputs too."""
    if tolerance is None:
        return None
    return value <= tolerance and (not accept_bound or bound <= tolerance)
