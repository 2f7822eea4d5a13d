"""Which decompositions each unit is offered: `--method auto` (every one that applies), or one forced.

The unit's SVD (weight-only, data-aware, or frequency-weighted for embeddings) is always built: explicit
ranks, the energy threshold and sensitivity probes use it. The Conv decompositions need statistics of
the input patches (or none at all) so that their errors compare with the SVD's.
"""

from __future__ import annotations

from collections.abc import Sequence

from .conv_methods import conv_decomposers
from .data_aware import OutputError, data_aware_svd
from .layers import Unit
from .ranks import Candidates
from .statistics import Moments
from .svd import TruncatedSVD

CONV_METHODS = ("tucker2", "cp", "spatial", "depthwise", "block")
METHODS = ("auto", "svd", *CONV_METHODS)


def candidates_for(units: Sequence[Unit], method: str, statistics: Sequence | None) -> list[Candidates]:
    """Per unit, its decomposers under `method`; `statistics` per unit from calibration, or None."""
    found = []
    for position, unit in enumerate(units):
        layer = unit.layers[0]
        stats = None if statistics is None else statistics[position]
        primary = TruncatedSVD(unit.matrices) if stats is None else data_aware_svd(unit, stats)
        exact = stats is None or (isinstance(stats, Moments) and layer.adapter.observed(layer)[1] == "input")
        others, notes = [], []
        if method != "svd":
            wanted = set(CONV_METHODS) if method == "auto" else {method}
            if unit.op == "Conv" and exact:
                others, notes = conv_decomposers(layer, OutputError(layer, stats), wanted)
            elif method != "auto":
                why = "applies to Conv only" if unit.op != "Conv" else "needs input-patch statistics (patch too large)"
                notes = [f"{method}: {why}"]
        found.append(Candidates(unit, primary, others, include_primary=method in ("auto", "svd"), notes=notes))
    return found
