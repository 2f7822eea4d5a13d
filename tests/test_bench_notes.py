"""tools/bench.py merges a partial re-run into the suite's results: the rows not re-run stay, each row says
the date it was run on, and the note says which ran when, however often cases are re-run (it once nested
the previous note inside the new one at every partial re-run)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import bench  # noqa: E402
from bench import _merged  # noqa: E402


def run(date: str, *models: str, machine: str = "x86_64, 2 cores") -> dict:
    return {"machine": machine, "onnxruntime": "1.32.0", "date": date,
            "rows": [{"model": model, "metric": "accuracy", "removed": 0.1} for model in models]}


def test_partial_reruns_keep_a_date_per_row_and_never_nest_the_note(monkeypatch):
    monkeypatch.setattr(bench.bench_common, "cpu_model", lambda: "")  # the CPU: the next test
    first = run("2026-12-04", "digits", "ppocr", "minilm")
    second = {**first, **_merged(first, run("2026-12-05", "ppocr"))}
    assert [(row["model"], row["date"]) for row in second["rows"]] == [
        ("digits", "2026-12-04"), ("minilm", "2026-12-04"), ("ppocr", "2026-12-05")]
    assert second["note"] == "digits, minilm run 2026-12-04; ppocr run 2026-12-05"
    third = _merged(second, run("2026-12-06", "digits"))
    assert third["note"] == "minilm run 2026-12-04; ppocr run 2026-12-05; digits run 2026-12-06"
    assert [row["date"] for row in third["rows"]] == ["2026-12-04", "2026-12-05", "2026-12-06"]


def test_a_full_rerun_or_another_machine_has_no_note():
    first = run("2026-12-04", "digits", "ppocr")
    assert "note" not in _merged(first, run("2026-12-05", "digits", "ppocr"))
    elsewhere = _merged(first, run("2026-12-05", "digits", machine="aarch64, 4 cores"))
    assert "note" not in elsewhere and [row["model"] for row in elsewhere["rows"]] == ["digits"]


def test_the_note_names_the_cpu_each_row_ran_on(monkeypatch):
    """A machine name (architecture, cores) can stand for CPUs of very different speed: rows say theirs."""
    first = run("2026-12-04", "digits", "ppocr")  # rows from before rows named their CPU
    monkeypatch.setattr(bench.bench_common, "cpu_model", lambda: "Xeon (AMX, AVX-512 VNNI)")
    merged = _merged(first, run("2026-12-05", "ppocr"))
    assert merged["note"] == "digits run 2026-12-04; ppocr run 2026-12-05 on Xeon (AMX, AVX-512 VNNI)"
    assert [row.get("cpu") for row in merged["rows"]] == [None, "Xeon (AMX, AVX-512 VNNI)"]
