"""The package's layering is a contract (pyproject.toml, [tool.importlinter]): folders import only from the
layers below them, TYPE_CHECKING imports included, and no modules of one folder import each other in a
circle. import-linter checks it on the installed package's sources."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "onnx_lowrank"


def _contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_the_import_contracts_are_kept():
    done = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                           "lint_imports_command()", "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_every_folder_and_top_module_has_its_layer():
    """The layers contract names every folder and top-level module (exhaustive), and only the public API,
    the options, the errors and the report types stay at the top."""
    layers = next(c for c in _contracts() if c["type"] == "layers")["layers"]
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    assert modules == {"api", "options", "errors", "report"}
    assert set(layers) == folders | modules


def _lint_copy(tmp_path: Path, module: str, added: str) -> subprocess.CompletedProcess:
    """import-linter on a copy of the package with `added` appended to one of its modules."""
    import shutil

    copy = tmp_path / "onnx_lowrank"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    path = copy / module
    path.write_text(path.read_text() + added)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                           "lint_imports_command()", "--config", str(tmp_path / "pyproject.toml"), "--no-cache"],
                          cwd=tmp_path, capture_output=True, text=True, env={"PYTHONPATH": str(tmp_path),
                                                                              "PATH": "/usr/bin:/bin"})


def test_a_type_checking_import_upwards_breaks_the_contract(tmp_path):
    """The contract sees imports under `if TYPE_CHECKING` too: the graph layer naming a type of the run
    layer that way is refused."""
    done = _lint_copy(tmp_path, "graph/layers.py", "\nimport typing\n\nif typing.TYPE_CHECKING:\n"
                      "    from ..run.stages import Run  # noqa: F401\n")
    assert done.returncode != 0
    assert "onnx_lowrank.graph.layers -> onnx_lowrank.run.stages" in done.stdout


def test_a_circle_inside_a_folder_breaks_the_contract(tmp_path):
    """graph.weights reads graph.model_io: model_io importing weights back closes a circle."""
    done = _lint_copy(tmp_path, "graph/model_io.py", "\nfrom . import weights  # noqa: E402, F401\n")
    assert done.returncode != 0
    assert "No cycles are allowed in onnx_lowrank.graph" in done.stdout
