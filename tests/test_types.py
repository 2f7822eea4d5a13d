"""The package type-checks: mypy (configured in pyproject.toml) passes on onnx_lowrank/, which also checks that
every decomposition keeps the contracts of onnx_lowrank/decompositions.py."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed (pip install mypy)")
def test_mypy_passes_on_the_package():
    result = subprocess.run([sys.executable, "-m", "mypy", "onnx_lowrank"], cwd=ROOT, capture_output=True, check=False,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
