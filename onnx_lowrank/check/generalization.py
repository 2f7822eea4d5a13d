"""What a result validated on held-out calibration samples promises for new inputs from the same distribution.

Zero decisions lost among a few hundred held-out samples is a weak statement: a sample whose logit margin is
small flips under a perturbation that happened to miss every held-out sample. So, for top1 and accuracy:

- Every decision the original makes on the calibration data (fit part included) has a logit margin: the
  decided class's logit minus the best other one (accuracy: the labelled class, for the samples the original
  gets right; top1: the original's argmax, at every position).
- On the held-out samples, the candidate's shrink of each margin is measured. The perturbation at a margin
  level is the largest shrink among the NEIGHBOURS held-out decisions nearest to it in margin.
- A decision is *threatened* when SAFETY times that perturbation reaches its margin. The fraction of
  threatened calibration decisions predicts the fraction of new inputs that may change their decision; the
  search holds it within the tolerance (lossless, tolerance 0: no decision threatened).
- Decisions whose margin is below TIE times the median margin are near-ties of the original itself: any
  change of the model moves them either way (on the PP-OCR direction classifier, the gentlest factorization
  that removes 4% of the parameters flips a 0.04-logit decision). They are counted and reported (and so is
  a held-out one the candidate loses). `--ties count` (the default for a positive tolerance) holds them
  against the tolerance like any other decision where they are seen: a held-out near-tie that changes counts
  among the decisions changed. The margins' prediction covers the other decisions only, either way: a
  near-tie's margin says nothing of whether it flips (counted as threatened, the near-ties alone would
  exceed a 1% tolerance on PP-OCR's 160 text lines, 2 of them near-ties, whatever the candidate).
  `--ties exempt` (the default at tolerance 0: lossless mode, which could otherwise accept no change at
  all) leaves the held-out near-ties lost out of the count: the tolerance then bounds the other decisions.

The statistics the data-aware factorizations are solved on weigh the fit samples whose decision is least
sure more: the LOW_MARGIN_SHARE of them with the smallest margins count LOW_MARGIN_WEIGHT times
(`weighted_fit`), so the factors keep most exactly what those decisions hang on (PP-OCR direction
classifier, lossless: 28.5% removed instead of 26.6% on its text-line set, no new image lost).

For every metric the report also gives an upper confidence bound (`confidence`, default 95%) on new inputs:
Clopper-Pearson on the decisions lost (top1, accuracy); a percentile bootstrap over held-out samples
(rel-l2, cosine, perplexity); for max-abs, which no resampling can bound above what was seen, the fraction of new inputs
that may exceed the observed maximum (exact for continuous distributions: 1 - (1 - confidence) ** (1 / n)).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import betaincinv

from .metrics import cosine_similarity, perplexity_draws, token_nll

SAFETY = 2.0  # a decision is threatened when twice the perturbation at its margin level reaches it
NEIGHBOURS = 8  # held-out decisions nearest in margin whose largest shrink is the perturbation there
TIE = 0.02  # margins below this fraction of the median margin are near-ties of the original
BOOTSTRAP_ROUNDS = 2000
LOW_MARGIN_SHARE = 0.2  # the fit samples with the smallest margins ...
LOW_MARGIN_WEIGHT = 5  # ... count this many times in the statistics


@dataclass(frozen=True)
class Decisions:
    """The original's decisions, flattened over samples and positions: the class decided and its margin."""

    classes: np.ndarray  # int64
    margins: np.ndarray  # float64; <= 0 where the original is wrong (accuracy): nothing to lose there

    def tie_level(self) -> float:
        decided = self.margins[self.margins > 0]
        return TIE * float(np.median(decided)) if decided.size else 0.0


def decisions(logits: Sequence[np.ndarray], labels: np.ndarray | None) -> Decisions:
    """Per decision: the labelled class (accuracy) or the original's argmax (top1), and its margin."""
    flat = _flat(logits)
    classes = np.argmax(flat, axis=1) if labels is None else np.asarray(labels).reshape(-1).astype(np.int64)
    return Decisions(classes, margins_for(flat, classes))


def margins_for(logits: Sequence[np.ndarray] | np.ndarray, classes: np.ndarray) -> np.ndarray:
    """The margin of each decided class: its logit minus the largest other one."""
    flat = logits if isinstance(logits, np.ndarray) else _flat(logits)
    rows = np.arange(flat.shape[0])
    decided = flat[rows, classes]
    others = flat.copy()
    others[rows, classes] = -np.inf
    return decided - others.max(axis=1)


def _flat(logits: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(z, dtype=np.float64).reshape(-1, np.shape(z)[-1]) for z in logits])


@dataclass(frozen=True)
class Threat:
    """The margin analysis of one candidate."""

    threatened: int  # calibration decisions whose margin SAFETY x the perturbation at its level reaches
    decisions: int  # calibration decisions counted (ties and the original's mistakes included)
    ties: int  # near-ties of the original among them ...
    ties_lost: int  # ... and the held-out ones the candidate lost (part of the decisions lost)
    exempt: bool = True  # whether near-ties are left out of what is held against the tolerance (--ties)

    @property
    def predicted(self) -> float:
        return self.threatened / max(self.decisions, 1)


def threat(everything: Decisions, held_out_before: np.ndarray, held_out_after: np.ndarray,
           exempt: bool = True) -> Threat:
    """`everything`: the original's decisions on all calibration samples; `held_out_before/after`: the
    margins of the held-out decisions in the original and the candidate (the same classes); `exempt`: the
    held-out near-ties lost are left out of what is held against the tolerance (--ties exempt; Judged.value)."""
    tie = everything.tie_level()
    live = everything.margins > tie
    ties = int(np.sum((everything.margins > 0) & ~live))
    ties_lost = int(np.sum((held_out_before > 0) & (held_out_before <= tie) & (held_out_after <= 0)))
    shrink = np.maximum(held_out_before - held_out_after, 0.0)
    kept = held_out_before > tie  # a near-tie's shrink says nothing of the model's perturbation elsewhere
    levels, shrink = held_out_before[kept], shrink[kept]
    if not levels.size or not live.any():
        return Threat(0, everything.margins.size, ties, ties_lost, exempt)
    perturbation = _nearest_maximum(levels, shrink, everything.margins[live])
    threatened = int(np.sum(SAFETY * perturbation >= everything.margins[live]))
    return Threat(threatened, everything.margins.size, ties, ties_lost, exempt)


def ties_exempt(ties: str | None, tolerance: float | None) -> bool:
    """Whether near-ties are exempt from the tolerance: as `--ties` says, else only at tolerance 0 (lossless)."""
    return ties == "exempt" if ties is not None else tolerance == 0


def _nearest_maximum(levels: np.ndarray, values: np.ndarray, at: np.ndarray) -> np.ndarray:
    """For each point of `at`, the largest of `values` among the NEIGHBOURS `levels` nearest to it."""
    order = np.argsort(levels)
    levels, values = levels[order], values[order]
    k = min(NEIGHBOURS, levels.size)
    position = np.clip(np.searchsorted(levels, at), 0, levels.size)
    found = np.empty(at.size)
    for i, (point, start) in enumerate(zip(at, position)):
        low, high = start, start  # grow a window of k around the insertion point, nearest side first
        while high - low < k:
            if low == 0 or (high < levels.size and levels[high] - point < point - levels[low - 1]):
                high += 1
            else:
                low -= 1
        found[i] = values[low:high].max()
    return found


def clopper_pearson(lost: int, total: int, confidence: float) -> float:
    """One-sided upper confidence bound on a rate from `lost` events in `total` trials."""
    if total == 0:
        return 1.0
    return 1.0 if lost >= total else float(betaincinv(lost + 1, total - lost, confidence))


def beyond_maximum(total: int, confidence: float) -> float:
    """Upper confidence bound on the fraction of new inputs whose value exceeds the largest of `total` seen."""
    return 1.0 if total == 0 else 1.0 - (1.0 - confidence) ** (1.0 / total)


def bootstrap(metric: str, reference: list[list[np.ndarray]], candidate: list[list[np.ndarray]],
              confidence: float, seed: int = 0, labels: np.ndarray | None = None) -> float:
    """The `confidence` percentile of rel-l2, cosine or perplexity over held-out samples drawn with
    replacement (the worst float output per draw, as the metric takes it; perplexity: the first output,
    against the next-token `labels`)."""
    outputs = [(r, c) for r, c in zip(reference, candidate) if r and np.issubdtype(r[0].dtype, np.floating)]
    count = len(outputs[0][0])
    weights = np.random.default_rng(seed).multinomial(count, np.full(count, 1.0 / count), size=BOOTSTRAP_ROUNDS)
    if metric == "perplexity":
        draws = perplexity_draws(token_nll(reference[0], labels), token_nll(candidate[0], labels), weights)
        return float(np.quantile(draws, confidence))
    worst = np.full(BOOTSTRAP_ROUNDS, -np.inf)
    for ref, cand in outputs:
        pairs = [(r.astype(np.float64).reshape(-1), c.astype(np.float64).reshape(-1)) for r, c in zip(ref, cand)]
        if metric == "rel-l2":
            diff = weights @ np.array([np.sum((c - r) ** 2) for r, c in pairs])
            norm = weights @ np.array([np.sum(r**2) for r, _ in pairs])
            values = np.sqrt(diff / np.where(norm > 0, norm, 1.0))
        else:
            similarity = np.array([cosine_similarity(r, c) for r, c in pairs])
            values = 1.0 - weights @ similarity / count
        worst = np.maximum(worst, values)
    return float(np.quantile(worst, confidence))



def weighted_fit(fit: Sequence[int], margins: np.ndarray) -> list[int]:
    """The fit samples, those of the LOW_MARGIN_SHARE smallest positive margins (one decision per calibration
    sample, `margins` indexed by sample) repeated to count LOW_MARGIN_WEIGHT times: what the statistics are
    taken on. A sample the original gets wrong (margin <= 0) has nothing to lose and is not weighted."""
    decided = [index for index in fit if margins[index] > 0]
    low = sorted(decided, key=lambda index: margins[index])[: int(round(LOW_MARGIN_SHARE * len(decided)))]
    return list(fit) + sorted(low) * (LOW_MARGIN_WEIGHT - 1)
