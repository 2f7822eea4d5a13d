"""Which decompositions each unit is offered: `--method auto` (every one that applies), or one forced.

The unit's SVD (weight-only, data-aware, or frequency-weighted for embeddings) is always built: explicit
ranks, the energy threshold and sensitivity probes use it. The Conv decompositions need statistics of
the input patches (or none at all) so that their errors compare with the SVD's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..graph.layers import Unit, detached
from ..observe.statistics import Counts, Moments, Tied
from ..system.parallel import Workers, blas_threads
from .contracts import Decomposer, SpectralDecomposer
from .conv import ConvDecomposer, conv_decomposers
from .coupled import HEADS, PRUNE, Pairing
from .data_aware import OutputError, data_aware_svd
from .heads import ATTENTION_HEADS
from .int4 import (
    INT8_DYNAMIC,
    METHOD_BITS,
    TABLE_METHODS,
    BlockQuantized,
    BlockQuantizedTable,
    BlocksDecomposer,
    TableBlocksDecomposer,
    offers_int4,
    table_blocks,
)
from .menu import UnitDecomposers
from .parking import Shelf
from .prune import PRUNING
from .quantized_svd import FactorsDecomposer, QuantizedFactors
from .svd import PARTIAL_MIN_SIDE, TruncatedSVD

CONV_METHODS = ("tucker2", "cp", "spatial", "depthwise", "block")
PAIRINGS: tuple[Pairing, ...] = (PRUNING, ATTENTION_HEADS)  # coupled units, found at load in this order
METHODS = ("auto", "svd", PRUNE, HEADS, *CONV_METHODS)  # pruning and heads: on the pairs found at load


def decomposers_for(
    units: Sequence[Unit], method: str, statistics: Sequence | None, workers: Workers | None = None,
    eager: bool = False, advance: Callable[[int], None] | None = None, parking: Path | None = None,
    int4_blocks: tuple[int, ...] | None = None,
) -> list[UnitDecomposers]:
    """Per unit, its decomposers under `method`; `statistics` per unit from calibration, or None;
    `int4_blocks`: MatMul, Gemm and table units also offer 4-bit blocks of those sizes with a low-rank
    correction, and 8-bit blocks (int4.py).

    Each unit is worked on detached from the graph (its weight read then), one after the other inline or
    by `workers` (the same results either way); `eager` also computes every option there, which the rank
    search will need (a large weight-only SVD then computes only the shrinking ranks). With a `parking`
    folder each unit's decomposers go to disk as they come back.
    """
    jobs = (
        (detached(unit) for unit in units),  # a generator: a weight is read when its task is submitted
        [method] * len(units),
        list(statistics) if statistics is not None else [None] * len(units),
        [unit.layers[0].adapter.observed(unit.layers[0])[1] for unit in units],
        [eager] * len(units),
        [int4_blocks] * len(units),
    )
    found: list[UnitDecomposers] = []
    shelf = Shelf()

    def settle(candidate: UnitDecomposers) -> None:
        candidate.unit = units[len(found)]
        if parking is not None:
            candidate.park(parking, len(found), shelf)
        found.append(candidate)
        if advance is not None:
            advance(1)

    if workers is not None:
        workers.map(_candidates, *jobs, each=settle)
    else:
        for arguments in zip(*jobs):
            settle(_candidates(*arguments))
    return found


def _candidates(unit: Unit, method: str, stats: Moments | Counts | Tied | None, side: str, eager: bool,
                int4_blocks: tuple[int, ...] | None = None) -> UnitDecomposers:
    with blas_threads(unit.params):
        return _decomposers(unit, method, stats, side, eager, int4_blocks)


def _decomposers(unit: Unit, method: str, stats: Moments | Counts | Tied | None, side: str, eager: bool,
                 int4_blocks: tuple[int, ...] | None = None) -> UnitDecomposers:
    layer = unit.layers[0]
    primary: SpectralDecomposer
    if stats is not None:
        primary = data_aware_svd(unit, stats, side)
    elif eager and min(unit.shape) >= PARTIAL_MIN_SIDE:  # the search picks among shrinking ranks only
        primary = TruncatedSVD(unit.matrices, ranks=max(unit.break_even, 1))
    else:
        primary = TruncatedSVD(unit.matrices)
    exact = stats is None or (isinstance(stats, Moments) and side == "input")
    others: list[Decomposer] = []
    notes: list[str] = []
    if method == PRUNE:
        notes = [f"{PRUNE}: applies to the consumer of a producer -> activation -> consumer pair, and its producers"]
    elif method == HEADS:
        notes = [f"{HEADS}: applies to the query and key projections of attention heads"]
    elif method != "svd":
        wanted = set(CONV_METHODS) if method == "auto" else {method}
        if unit.op == "Conv" and exact:
            moments = stats if isinstance(stats, Moments) else None  # exact: input moments, or no statistics
            convs, notes = conv_decomposers(layer, OutputError(layer, moments), wanted)
            others.extend(convs)
        elif method != "auto":
            why = "applies to Conv only" if unit.op != "Conv" else "needs input-patch statistics (patch too large)"
            notes = [f"{method}: {why}"]
    if int4_blocks:
        blocks = table_blocks(unit, stats, int4_blocks)
        matmul = len(unit.layers) == 1 and offers_int4(layer, stats, side)
        moments = stats if isinstance(stats, Moments) else None
        error = OutputError(layer, moments) if matmul else None  # one for the layer's block menus
        for scheme in METHOD_BITS:  # 4-bit with its corrections, 8-bit weight-only or dynamic: mixed per layer
            if matmul and (scheme != INT8_DYNAMIC or moments is not None):
                others.append(BlocksDecomposer(layer, moments, int4_blocks, scheme, error))
            elif blocks and scheme in TABLE_METHODS:
                others.append(TableBlocksDecomposer(layer, stats if isinstance(stats, Counts | Tied) else None,
                                                    blocks, scheme))
        if matmul:  # and today's SVD, its factors in 4 bits
            others.append(FactorsDecomposer(layer, moments, int4_blocks, error=error))
    candidate = UnitDecomposers(unit, primary, others, include_primary=method in ("auto", "svd"), notes=notes)
    if eager:
        candidate.options()
    return candidate


if TYPE_CHECKING:  # every decomposition keeps its contract (mypy checks these assignments)
    from ..graph.splice import Factorization, Factorized
    from .conv import (
        BlockLowRank,
        CanonicalPolyadic,
        ConvChain,
        ConvDecomposer,
        DepthwiseSeparable,
        SpatialSeparable,
        Tucker2,
    )
    from .data_aware import DataAwareSVD, FrequencyWeightedSVD
    from .heads import HeadScores, HeadSide, QuerySide
    from .parking import Parked, ParkedSpectral
    from .prune import ChannelPruning, KeptOutputs, KeptRows, PrunedInputs
    from .svd import TruncatedSVD

    _spectral_kept: list[type[SpectralDecomposer]] = [TruncatedSVD, DataAwareSVD, FrequencyWeightedSVD, ParkedSpectral]
    _decomposers_kept: list[type[Decomposer]] = [
        ConvDecomposer, Tucker2, CanonicalPolyadic, SpatialSeparable, DepthwiseSeparable, BlockLowRank, Parked,
        ChannelPruning, KeptRows, HeadScores, QuerySide, BlocksDecomposer, TableBlocksDecomposer,
        FactorsDecomposer,
    ]
    _factorized_kept: list[type[Factorized]] = [Factorization, ConvChain, PrunedInputs, KeptOutputs, HeadSide,
                                                BlockQuantized, BlockQuantizedTable, QuantizedFactors]
