"""How far a compressed model's outputs are from the original's on held-out samples (lower is better).

Each metric compares, per floating-point graph output, the reference and candidate outputs of every
sample (a sample's output is its rows along axis 0 for stacked .npz data, the whole output for a feed
used as is); a model with several outputs takes the worst one.
- rel-l2: ||candidate - reference|| / ||reference|| over all samples together.
- cosine: 1 - the mean over samples of the cosine similarity of the flattened outputs.
- max-abs: the largest absolute difference.
- top1: the fraction of argmax decisions (over the last axis, at every position) that change.
- accuracy: the fraction of samples the original classifies right (argmax over the last axis of the
  first output, against the labels) that the compressed model gets wrong. Lucky fixes earn no credit,
  so it bounds the accuracy drop from above; 0 is lossless in the paper's sense and more: no sample is
  lost, so the accuracy is at least the original's. (A drop that fixes may offset overfits the search
  to a few borderline samples; this definition held up on unseen data where that one did not.)
- perplexity (language models): the candidate's perplexity over the original's, less 1: exp(mean
  next-token NLL of the candidate - mean NLL of the original) - 1, so a tolerance of 0.05 allows 5% more
  perplexity. Scored on the first output (logits, [..., positions, vocabulary]) against the input ids
  shifted by one, at the positions the attention mask marks valid: the targets come from the calibration
  feeds themselves (calibration.next_token_targets), no labels are given. Only the logits are compared.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import InputError

METRICS = ("rel-l2", "cosine", "max-abs", "top1", "accuracy", "perplexity")
DISCRETE = ("top1", "accuracy")  # one decision per sample: judged by the decisions lost and their margins
DEFAULT_METRIC = "rel-l2"
DEFAULT_TOLERANCE = {"rel-l2": 0.05, "cosine": 0.01, "max-abs": 0.1, "top1": 0.01, "accuracy": 0.0,
                     "perplexity": 0.05}

Outputs = list[list[np.ndarray]]  # per graph output, per sample


def check_metric(metric: str, has_labels: bool) -> None:
    if metric not in METRICS:
        raise InputError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    if metric == "accuracy" and not has_labels:
        raise InputError("the accuracy metric needs labels (--labels FILE.npy)")
    if metric == "perplexity" and not has_labels:
        raise InputError("the perplexity metric needs next-token targets (derived from the input ids)")


def compared_outputs(metric: str, names: Sequence[str], chosen: Sequence[str] | None = None) -> list[str]:
    """The graph outputs a metric reads: those `chosen` (--outputs), else for perplexity only the first (the
    logits), for the others every one."""
    if chosen:
        unknown = [name for name in chosen if name not in names]
        if unknown:
            raise InputError(f"--outputs names {unknown[0]!r}, which is not an output of the model "
                             f"(its outputs: {', '.join(names)})")
        return list(dict.fromkeys(chosen))
    return list(names[:1]) if metric == "perplexity" else list(names)


def score(metric: str, reference: Outputs, candidate: Outputs, labels: np.ndarray | None = None) -> float:
    """The metric's value for the candidate's outputs against the reference's."""
    if metric in DISCRETE:
        lost, total = lost_decisions(metric, reference, candidate, labels)
        return lost / max(total, 1)
    if metric == "perplexity":
        return perplexity_excess(token_nll(reference[0], labels), token_nll(candidate[0], labels))
    values = [_one(metric, ref, cand) for ref, cand in zip(reference, candidate) if _is_float(ref)]
    if not values:
        raise InputError("the model has no floating-point output to compare")
    return max(values)


def lost_decisions(metric: str, reference: Outputs, candidate: Outputs, labels=None) -> tuple[int, int]:
    """top1: argmax decisions changed and decisions made (of the float output where most changed);
    accuracy: samples the original gets right and the candidate wrong, and samples."""
    if metric == "accuracy":
        truth = np.asarray(labels).reshape(-1)
        right_before = _predictions(reference[0], truth.size) == truth
        right_after = _predictions(candidate[0], truth.size) == truth
        return int(np.sum(right_before & ~right_after)), int(truth.size)
    counts = [
        (sum(int(np.sum(np.argmax(r, -1) != np.argmax(c, -1))) for r, c in zip(ref, cand)),
         sum(int(np.prod(r.shape[:-1])) for r in ref))
        for ref, cand in zip(reference, candidate) if _is_float(ref)
    ]
    if not counts:
        raise InputError("the model has no floating-point output to compare")
    return max(counts, key=lambda count: count[0] / max(count[1], 1))


def token_nll(logits: Sequence[np.ndarray], targets) -> np.ndarray:
    """Per sample, (summed next-token negative log-likelihood, positions scored): `targets` holds per sample
    the id each position should predict, -1 where none is scored (calibration.next_token_targets)."""
    if targets is None:
        raise InputError("the perplexity metric needs next-token targets (derived from the input ids)")
    found = np.zeros((len(logits), 2))
    for position, (sample, target) in enumerate(zip(logits, targets)):
        if not np.issubdtype(sample.dtype, np.floating):
            raise InputError(f"perplexity reads the first output as logits, but it holds {sample.dtype}")
        target = np.asarray(target).reshape(-1)
        flat = sample.reshape(-1, sample.shape[-1]) if sample.ndim else sample.reshape(1, 1)
        if flat.shape[0] != target.size:
            raise InputError(f"perplexity: the first output has {flat.shape[0]} positions for {target.size} input ids "
                             "(it must be the logits of every input position)")
        scored = target >= 0
        if np.any(target[scored] >= flat.shape[1]):
            raise InputError(f"perplexity: an input id is beyond the {flat.shape[1]} logits of the first output")
        rows = flat[scored]
        peak = rows.max(axis=1, keepdims=True)
        # exp in the logits' own precision, summed in float64 (a float64 copy of the logits first was 3x slower
        # on SmolLM2's 49152 classes; the sums agree to 1e-9 relative)
        log_total = np.log(np.sum(np.exp(rows - peak), axis=1, dtype=np.float64)) + peak[:, 0]
        chosen = rows[np.arange(len(rows)), target[scored]].astype(np.float64)
        found[position] = np.sum(log_total - chosen), len(rows)
    return found


def perplexity_excess(reference: np.ndarray, candidate: np.ndarray) -> float:
    """exp(mean NLL of the candidate - mean NLL of the reference) - 1, from `token_nll`'s per-sample sums."""
    return float(perplexity_draws(reference, candidate, np.ones((1, len(reference))))[0])


def perplexity_draws(reference: np.ndarray, candidate: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The same for samples weighted per draw (draws, samples): the bootstrap's resamples."""
    count = np.maximum(weights @ reference[:, 1], 1.0)
    return np.expm1((weights @ candidate[:, 0] - weights @ reference[:, 0]) / count)


def _predictions(samples: Sequence[np.ndarray], count: int) -> np.ndarray:
    predictions = np.concatenate([np.argmax(s, axis=-1).reshape(-1) for s in samples])
    if predictions.size != count:
        raise InputError(f"{count} labels for {predictions.size} predictions of the first output")
    return predictions


def _one(metric: str, reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    if metric == "rel-l2":
        diff = sum(float(np.sum((c.astype(np.float64) - r) ** 2)) for r, c in zip(reference, candidate))
        norm = sum(float(np.sum(r.astype(np.float64) ** 2)) for r in reference)
        return float(np.sqrt(diff / norm)) if norm > 0 else float(np.sqrt(diff))
    if metric == "cosine":
        similarities = [cosine_similarity(r, c) for r, c in zip(reference, candidate)]
        return 1.0 - float(np.mean(similarities))
    if metric == "max-abs":
        return max(float(np.max(np.abs(c.astype(np.float64) - r))) for r, c in zip(reference, candidate))
    raise AssertionError(metric)


def cosine_similarity(reference: np.ndarray, candidate: np.ndarray) -> float:
    a = reference.astype(np.float64).reshape(-1)
    b = candidate.astype(np.float64).reshape(-1)
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    if norms == 0:
        return 1.0 if np.array_equal(a, b) else 0.0
    return float(a @ b / norms)


def _is_float(samples: Sequence[np.ndarray]) -> bool:
    return bool(samples) and np.issubdtype(samples[0].dtype, np.floating)
