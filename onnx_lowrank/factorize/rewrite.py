"""The rewrite: the original model with chosen units replaced by their factor chains, checked as ONNX."""

from __future__ import annotations

from collections.abc import Sequence

import onnx

from ..graph.imported import export, import_graph
from ..graph.layers import find_layers
from ..graph.splice import Factorized, Splice
from .coupled import unmatched
from .menu import Choice, UnitDecomposers


def factors_of(candidates: Sequence[UnitDecomposers], choices: Sequence[Choice]) -> dict[str, Factorized]:
    """The factorization of every unit that is not kept dense, by unit key."""
    return {c.unit.key: c.factorize(ch.option) for c, ch in zip(candidates, choices) if ch.option is not None}


def build(
    original: onnx.ModelProto, adapters: dict, factors: dict[str, Factorized], base_dir: str = "",
    memo: dict | None = None,
) -> onnx.ModelProto:
    """The original with the units named by key replaced by their factor chains (`base_dir`: where the
    original's external data lies, when it was loaded without it; the result then refers to it too;
    `memo`: layers.find_layers', for a caller that builds from one original many times)."""
    problem = unmatched(factors)
    if problem is not None:
        raise RuntimeError(f"cannot write the allocation: {problem}")
    imported = import_graph(original)
    plan = find_layers(imported.graph, original, adapters, base_dir, memo)
    splice = Splice(imported.graph)
    for unit in plan.units:
        if unit.key in factors:
            for layer in unit.layers:
                splice.replace(layer, factors[unit.key])
    return export(imported, original, splice.metadata)



def check_rewritten(model: onnx.ModelProto, full: bool) -> None:
    """Our own output must pass the checker, with strict shape inference where the input did; a failure
    here is a bug, not bad input."""
    try:
        onnx.checker.check_model(model, full_check=full)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise RuntimeError(f"the rewritten model fails the ONNX checker: {error}") from error
