"""Explicit ranks (`--ranks`): the ranks file read and checked, and the allocation it names (by node name,
then weight name, then "*")."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import InputError
from ..factorize.menu import Choice, UnitDecomposers
from .allocation import keep_if_smaller

FULL = "full"


def load_ranks_file(path: str | Path) -> dict[str, int | str]:
    """Read `{"node or weight name" | "*": int | "full"}`; InputError for anything else."""
    try:
        table = json.loads(Path(path).read_text())
    except OSError as error:
        raise InputError(f"cannot read ranks file {path}: {error.strerror or error}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"ranks file {path} is not valid JSON: {error}") from None
    return validate_ranks(table, f"ranks file {path}")


def validate_ranks(table: object, where: str = "ranks") -> dict[str, int | str]:
    if not isinstance(table, dict):
        raise InputError(f"{where} must be a JSON object mapping names to ranks")
    for name, rank in table.items():
        ok = rank == FULL or (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1)
        if not ok:
            raise InputError(f"{where}: rank for {name!r} must be a positive integer or \"full\", got {rank!r}")
    return dict(table)


def explicit(
    candidates: Sequence[UnitDecomposers], table: Mapping[str, int | str], known: set[str], allow_larger: bool
) -> list[Choice]:
    """Ranks by node name, then weight name, then "*"; units not named stay dense."""
    unknown = sorted(set(table) - known - {"*"})
    if unknown:
        raise InputError(f"ranks name {unknown[0]!r}, which is neither a node nor a weight of the model")
    choices = []
    for candidate in candidates:
        unit = candidate.unit
        named = {table[layer.node.name] for layer in unit.layers if layer.node.name in table}
        if len(named) > 1:
            raise InputError(f"nodes sharing weight {unit.weight.name} were given different ranks {sorted(map(str, named))}")
        wanted = named.pop() if named else table.get(unit.weight.name, table.get("*"))
        if wanted is None:
            choices.append(Choice(None, "no rank given"))
            continue
        rank = unit.full_rank if wanted == FULL else min(int(wanted), unit.full_rank)
        choices.append(keep_if_smaller(candidate, rank, allow_larger))
    return choices
