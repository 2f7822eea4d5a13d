"""The shape docs/ARCHITECTURE.md promises: short functions, api.py holding only the entry points, and no
rank-mode tests outside rank_modes.py."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "onnx_lowrank"
MAX_LINES = 60


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_no_function_is_longer_than_60_lines():
    long = [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in sorted(PACKAGE.rglob("*.py")) for node in _functions(path)
            if node.end_lineno - node.lineno + 1 > MAX_LINES]
    assert not long, "\n".join(long)


def test_api_holds_only_the_entry_points():
    public = {node.name for node in ast.parse((PACKAGE / "api.py").read_text()).body
              if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_")}
    assert public == {"compress", "compress_file"}


def test_modes_are_compared_in_one_module_only():
    """The options pick the rank mode once (rank_modes.rank_mode_for); nothing else asks which it is."""
    comparison = re.compile(r"""mode\s*(==|!=|in)\s*[("']""")
    found = [f"{path.name}:{number}" for path in sorted(PACKAGE.rglob("*.py")) if path.name != "rank_modes.py"
             for number, line in enumerate(path.read_text().splitlines(), 1) if comparison.search(line)]
    assert not found, found
