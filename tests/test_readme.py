"""The README runs as written (as onnx-graphsurgeon tests its README examples), so it cannot rot.

Every fenced block of README.md is read in order: a ```python block runs as a script, and every
`onnx-lowrank ...` command in the other blocks (the part after `&&` where a block installs first; the
installs themselves are skipped) runs as `python -m onnx_lowrank ...`. They run once, in README order,
in a temporary folder holding a copy of the `models/` files the README names, so their outputs land
there and the checkout stays clean. A command must exit 0, or the code a trailing `# exit N` documents.
The test command is checked to be the one `.ci/run` runs (running it here would recurse).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest

from onnx_lowrank.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
TEST_COMMAND = "python -m pip install -e '.[test]' && python -m pytest -q"
MAX_LINES = 150
STEP_TIMEOUT = 600  # seconds; the main-job command takes about 1-2 minutes on 2 busy cores

FENCE = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
EXIT = re.compile(r"\s+#\s*exit\s+(\d+)\s*$")
OUTPUT_FLAGS = ("-o", "--output", "--report", "--html")


@dataclass(frozen=True)
class Step:
    kind: str  # "python" (a script) or "command" (an onnx-lowrank command line)
    text: str
    exit_code: int = 0

    @property
    def label(self) -> str:
        first = self.text.strip().splitlines()[0] if self.kind == "command" else "python snippet"
        return first if len(first) <= 70 else first[:67] + "..."


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    return [(match.group(1).lower(), match.group(2)) for match in FENCE.finditer(text)]


def steps_of(text: str) -> list[Step]:
    steps = []
    for language, body in fenced_blocks(text):
        if language in ("python", "py"):
            steps.append(Step("python", body))
            continue
        for line in body.replace("\\\n", " ").splitlines():
            expected = EXIT.search(line)
            line = EXIT.sub("", line)
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith("onnx-lowrank ") or part == "onnx-lowrank":
                    steps.append(Step("command", part, int(expected.group(1)) if expected else 0))
    return steps


STEPS = steps_of(README.read_text(encoding="utf-8"))


def _argv(step: Step) -> list[str]:
    words = shlex.split(step.text)
    return [sys.executable, "-m", "onnx_lowrank", *words[1:]]


def _outputs(step: Step) -> list[str]:
    """The files a step writes: a command's -o/--report/--html, a snippet's np.savez targets."""
    if step.kind == "python":
        return re.findall(r"np\.savez(?:_compressed)?\(\s*[\"']([^\"']+)[\"']", step.text)
    words = shlex.split(step.text)
    return [words[i + 1] for i, word in enumerate(words[:-1]) if word in OUTPUT_FLAGS]


def _snapshot() -> dict[Path, float]:
    """Every entry of the checkout's top folder and of models/, with its modification time."""
    entries = {}
    for folder in (ROOT, ROOT / "models"):
        for path in folder.iterdir():
            entries[path] = path.lstat().st_mtime
    return entries


@pytest.fixture(scope="module")
def readme_runs(tmp_path_factory) -> dict:
    """Run every step once, in README order, in a temporary folder; the results by step index."""
    work = tmp_path_factory.mktemp("readme")
    named = set(re.findall(r"models/[\w.-]+", README.read_text(encoding="utf-8")))
    (work / "models").mkdir()
    for name in sorted(named):
        if (ROOT / name).is_file():
            copy = work / name
            shutil.copyfile(ROOT / name, copy)
            copy.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)  # the tool never writes its inputs
    env = dict(os.environ, ONNX_LOWRANK_DEBUG="1")  # a failure shows its traceback
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    before = _snapshot()
    results = {}
    for index, step in enumerate(STEPS):
        argv = [sys.executable, "-c", step.text] if step.kind == "python" else _argv(step)
        start = time.perf_counter()
        done = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT)
        results[index] = Result(done.returncode, done.stdout, done.stderr, time.perf_counter() - start)
    return {"work": work, "results": results, "before": before, "after": _snapshot()}


def test_readme_has_the_runnable_steps():
    commands = [step for step in STEPS if step.kind == "command"]
    assert any(step.kind == "python" for step in STEPS), "the 'your own model' snippet"
    assert commands and commands[0].text.startswith("onnx-lowrank compress models/"), "the main-job command"
    assert "--calib models/" in commands[0].text, "the main job uses shipped calibration data"


@pytest.mark.parametrize("index", range(len(STEPS)), ids=[f"{i}:{step.label}" for i, step in enumerate(STEPS)])
def test_step_runs_as_documented(readme_runs, index):
    step, result = STEPS[index], readme_runs["results"][index]
    assert result.returncode == step.exit_code, (
        f"{step.label} exited {result.returncode} (expected {step.exit_code}) after {result.seconds:.0f} s\n"
        f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    )
    for output in _outputs(step) if step.exit_code == 0 else []:
        assert (readme_runs["work"] / output).is_file(), f"{step.label} did not write {output}"


def test_main_job_writes_a_valid_model(readme_runs):
    index, step = next((i, s) for i, s in enumerate(STEPS) if s.kind == "command" and "compress" in s.text)
    assert readme_runs["results"][index].returncode == 0  # 0: written and within the bound
    output = readme_runs["work"] / _outputs(step)[0]
    onnx.checker.check_model(str(output), full_check=True)


def test_outputs_are_ignored_by_git():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    outputs = sorted({output for step in STEPS for output in _outputs(step)})
    assert outputs
    for output in outputs:
        done = subprocess.run(["git", "check-ignore", "-q", "--no-index", output], cwd=ROOT)
        assert done.returncode == 0, f"{output}, written by a README step, is not ignored by .gitignore"


def test_checkout_stays_clean(readme_runs):
    before, after = readme_runs["before"], readme_runs["after"]
    models = ROOT / "models"
    assert {p: t for p, t in after.items() if p.parent == models} == \
           {p: t for p, t in before.items() if p.parent == models}, "models/ changed"
    names = {Path(output).name for step in STEPS for output in _outputs(step)}
    touched = [p.name for p, t in after.items() if p.parent == ROOT and p.name in names and before.get(p) != t]
    assert not touched, f"README steps wrote into the checkout: {touched}"


def test_ci_runs_the_readme_test_command():
    assert TEST_COMMAND in README.read_text(encoding="utf-8").splitlines()
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert TEST_COMMAND in ci


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) < MAX_LINES, f"README.md has {len(lines)} lines; move detail to docs/"


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_links_resolve():
    pages = [README, *sorted(DOCS.glob("*.md"))]
    for page in pages:
        text = FENCE.sub("", page.read_text(encoding="utf-8"))
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            assert file.exists(), f"{page.name} links to {target}, which does not exist"
            if anchor and file.suffix == ".md":
                headings = re.findall(r"^#+\s+(.*)$", FENCE.sub("", file.read_text(encoding="utf-8")), re.M)
                assert anchor in {_anchor(h) for h in headings}, f"{page.name} links to missing #{anchor}"


def test_docs_name_every_flag(capsys):
    documented = (DOCS / "command-line.md").read_text(encoding="utf-8")
    for command in (["compress", "--help"], ["inspect", "--help"], ["--help"]):
        assert main(command) == 0
        flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", capsys.readouterr().out))
        missing = sorted(flag for flag in flags if flag not in documented)
        assert not missing, f"docs/command-line.md does not mention {missing} (onnx-lowrank {' '.join(command)})"
