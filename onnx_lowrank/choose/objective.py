"""What ranks are chosen for (`--objective`): fewest parameters, or parameters that turn into speed.

A factorization that halves a layer's multiply-adds can still run slower: two thin GEMMs use the
hardware worse than one wide one, and odd ranks miss the kernels' tiles. So, except under `size`:
- every rank is a multiple of the provider's tile (RANK_MULTIPLE);
- with calibration data, each unit's factorizations are timed against its dense layer on the
  validation provider (latency.not_slower: a few single-layer timings per unit, cached by shape) and
  only those within MARGIN times the dense time stay on offer. `balanced` (default) keeps what is not
  slower; `latency` keeps what is at least 10% faster. An embedding lookup is a row copy, which a
  factorized table (Gather, then MatMul) can never beat, but its extra microseconds are nothing
  beside the model: `balanced` lets the tables together add up to EMBEDDING_SLACK of the original's
  end-to-end time (an equal share each: BERT's word and position tables had 1% each). Without calibration data there is no activation
  shape to time at, so only the rounding applies (the report's notes say so).
The search then picks among what is left, so the error bound and the size budget still hold.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx

from ..check.latency import LayerTimer, Untimeable, not_slower, time_side_by_side, timed_activations
from ..factorize.contracts import Option
from ..factorize.menu import UnitDecomposers, rank_multiple

OBJECTIVES = ("balanced", "size", "latency")
DEFAULT_OBJECTIVE = "balanced"
RANK_MULTIPLE = {"cpu": 16, "cuda": 64}  # CPU: MLAS packs weights in panels of 16 columns; a rank just past
# a multiple of 16 costs a whole panel more (measured: +5-6% of a 384->r->1536 chain at 33, 49, 65, ...)
# and NCHWc convolutions keep their blocked layout. CUDA: tensor-core tiles.
EMBEDDING_SLACK = 0.01  # balanced: what factorized embedding tables together may add to the model's time
MARGIN = {"balanced": 1.0, "latency": 0.9}  # allowed factorized time, as a fraction of the dense time


def restrict(
    objective: str,
    candidates: Sequence[UnitDecomposers],
    provider: str,
    model: onnx.ModelProto,
    adapters: dict,
    feed: Mapping[str, np.ndarray] | None,
    cache_file=None,
    advance: Callable[[int], None] | None = None,
    others: Iterable[Mapping[str, np.ndarray]] = (),
) -> tuple[LayerTimer | None, list[str]]:
    """Restrict every unit's options to what the objective allows; returns the timer that measured
    them (None when nothing was timed) and notes for the report. Layers timed at their activation on
    `feed`, or on the first of `others` that runs them (an If branch `feed` does not take)."""
    if objective == "size":
        return None, []
    multiple = RANK_MULTIPLE[provider]
    for candidate in candidates:
        candidate.restrict(rank_multiple(multiple), f"no rank that shrinks it is a multiple of {multiple} "
                                                    f"(--objective {objective} on {provider}; size allows any)")
    if feed is None:
        return None, [f"--objective {objective} without calibration data: ranks are multiples of {multiple}, "
                      "but nothing was timed (there is no activation shape to time layers at)"]
    tables = sum(c.unit.op == "Gather" and not c.unit.tied and bool(c.options()) for c in candidates)
    embeddings = objective == "balanced" and tables > 0
    shapes, run_ms = timed_activations(model, [c.unit for c in candidates], feed, provider, timed=embeddings,
                                       others=others)
    timer = LayerTimer(model, adapters, shapes, provider, cache=cache_file)
    slack = 0.0
    if embeddings:  # a 1% allowance needs no precise figure: one warm run of the whole model
        if run_ms is None:
            run_ms = time_side_by_side([model], feed, provider, warmup=1, min_runs=1, min_seconds=0)[0].median_ms
        slack = EMBEDDING_SLACK * run_ms / tables
    for candidate in candidates:
        # a tied embedding table is not timed: its head, most of its work, cannot be cut out alone, and
        # every rank below break-even takes fewer multiply-adds there
        if candidate.options() and not candidate.unit.tied:
            allowed: Callable[[Option], bool]
            try:
                allowed = not_slower(candidate, timer, MARGIN[objective], slack if candidate.unit.op == "Gather" else 0.0)
            except Untimeable as why:
                allowed = _nothing
                note = f"cannot be timed alone ({why}), so kept dense under --objective {objective}"
            else:
                note = f"every factorization is slower than the dense layer on {provider} (measured)"
            candidate.restrict(allowed, note)
        if advance is not None:
            advance(1)
    return timer, []


def _nothing(option: Option) -> bool:
    return False
