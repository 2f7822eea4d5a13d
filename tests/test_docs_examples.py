"""Every ```python block of README.md and docs/*.md runs as written, saved as a script and run with
`python example.py` in a subprocess (a fresh temporary folder as its working directory).

As a script, not with `python -c`: a script's `__main__` has a file, which multiprocessing's spawn start
method re-imports in every worker process; a library call must work from a plain script without an
`if __name__ == "__main__":` guard (issue 30, item 1). The placeholder file names of the examples
stand for the shipped files of SUBSTITUTES (the only change made to a block); `models/...` paths are
the checkout's models (a read-only link in the working folder).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
TIMEOUT = 300  # seconds per block

# placeholder (as quoted in a block) -> the shipped file it stands for
SUBSTITUTES = {
    "model.onnx": "models/minilm_l2.onnx",
    "calib.npz": "models/minilm_sentences.npz",
}


def blocks() -> list[tuple[str, str]]:
    """(label, code) of every ```python block, in page order."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for number, match in enumerate(FENCE.finditer(text), 1):
            line = text[: match.start()].count("\n") + 1
            found.append((f"{page.relative_to(ROOT)}:{line}", match.group(1)))
    return found


def substituted(code: str) -> str:
    for placeholder, shipped in SUBSTITUTES.items():
        code = re.sub(rf"(?<=[\"']){re.escape(placeholder)}(?=[\"'])", shipped, code)
    return code


BLOCKS = blocks()


def test_the_docs_have_python_examples():
    labels = [label for label, _ in BLOCKS]
    assert any(label.startswith("README.md") for label in labels)
    assert any(label.startswith("docs/python-api.md") for label in labels)


@pytest.mark.parametrize("code", [code for _, code in BLOCKS], ids=[label for label, _ in BLOCKS])
def test_block_runs_as_a_script(code, tmp_path):
    (tmp_path / "models").symlink_to(ROOT / "models", target_is_directory=True)
    script = tmp_path / "example.py"
    script.write_text(substituted(code), encoding="utf-8")
    env = dict(os.environ, ONNX_LOWRANK_DEBUG="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert done.returncode == 0, (f"exit {done.returncode} after {time.perf_counter() - start:.0f} s\n"
                                  f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}")
