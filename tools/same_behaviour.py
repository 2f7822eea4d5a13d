"""Shows that a change to the code changed nothing a user sees: compresses the reference cases with the code of a
git revision and with the working tree, then compares the written models byte for byte and the JSON reports
apart from what timing decides (seconds, phases, latencies).

    python tools/same_behaviour.py               # HEAD against the working tree
    python tools/same_behaviour.py --before REV
    python tools/same_behaviour.py --more        # also the paths the four reference cases do not reach

Every case runs with --objective size: the other objectives choose ranks by timing layers, which no two runs
share. Exit status 0 when every case is identical, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"

CASES = {
    "digits lossless": ["digits_cnn.onnx", "--calib", "digits_calib.npz", "--labels", "digits_calib_labels.npy",
                        "--metric", "accuracy"],
    "ppocr_cls size 0.7": ["ppocr_cls.onnx", "--calib", "ppocr_cls_lines.npz", "--labels",
                           "ppocr_cls_lines_labels.npy", "--metric", "accuracy", "--target-params", "0.7"],
    "minilm_l2 compact cosine 0.01": ["minilm_l2.onnx", "--calib", "minilm_sentences.npz", "--metric", "cosine",
                                      "--tolerance", "0.01"],
    "minilm_l2 target 0.7, no data": ["minilm_l2.onnx", "--target-params", "0.7"],
}
MORE = {  # int8 with its fallback, the refit, pruned pairs and attention heads, control-flow bodies
    "minilm_l2 compact cosine 0.02 int8": ["minilm_l2.onnx", "--calib", "minilm_sentences.npz", "--metric", "cosine",
                                           "--tolerance", "0.02", "--quantize", "int8"],
    "minilm_l2 target 0.6 refit": ["minilm_l2.onnx", "--calib", "minilm_sentences.npz", "--metric", "cosine",
                                   "--target-params", "0.6", "--refit", "sequential"],
    "minilm_l2 heads compact 0.01": ["minilm_l2.onnx", "--calib", "minilm_sentences.npz", "--metric", "cosine",
                                     "--tolerance", "0.01", "--method", "heads"],
    "ppocr_cls prune target 0.8": ["ppocr_cls.onnx", "--calib", "ppocr_cls_lines.npz", "--labels",
                                   "ppocr_cls_lines_labels.npy", "--metric", "accuracy", "--method", "prune",
                                   "--target-params", "0.8"],
    "silero_vad compact rel-l2 0.05": ["silero_vad.onnx", "--calib", "silero_calib", "--metric", "rel-l2",
                                       "--tolerance", "0.05"],
    "ppocr_cls int8 compact 0.01": ["ppocr_cls.onnx", "--calib", "ppocr_cls_lines.npz", "--labels",
                                    "ppocr_cls_lines_labels.npy", "--metric", "accuracy", "--tolerance", "0.01",
                                    "--quantize", "int8"],
    "digits int8 compact 0.01": ["digits_cnn.onnx", "--calib", "digits_calib.npz", "--labels",
                                 "digits_calib_labels.npy", "--metric", "accuracy", "--tolerance", "0.01",
                                 "--quantize", "int8"],
}
MODEL_ARGUMENTS = {"--calib", "--labels"}  # followed by a file in models/
TIMED = {"seconds", "phases", "latency"}  # report keys that timing decides


def compress(code: Path, case: list[str], out: Path) -> tuple[int, bytes | None, dict | None]:
    """One case with the package found at `code`: its exit status, the model's bytes and the report."""
    arguments = [str(MODELS / case[0])]
    for previous, word in zip(case, case[1:]):
        arguments.append(str(MODELS / word) if previous in MODEL_ARGUMENTS else word)
    out.mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=str(code), ONNX_LOWRANK_DEBUG="1")
    done = subprocess.run(
        [sys.executable, "-m", "onnx_lowrank", "compress", *arguments, "-o", "model.onnx", "--report",
         "report.json", "--objective", "size", "--quiet"], cwd=out, env=env, capture_output=True, text=True)
    if done.returncode not in (0, 1):
        print(done.stderr[-2000:], file=sys.stderr)
    model = out / "model.onnx"
    report = out / "report.json"
    return (done.returncode, model.read_bytes() if model.exists() else None,
            json.loads(report.read_text()) if report.exists() else None)


def untimed(report: dict | None) -> dict | None:
    """The report without what timing decides."""
    if report is None:
        return None
    kept = {key: value for key, value in report.items() if key not in TIMED}
    kept["layers"] = [{k: v for k, v in layer.items() if k != "latency"} for layer in report.get("layers", [])]
    kept["notes"] = [note for note in report.get("notes", []) if "ran slower" not in note]
    fallback = (kept.get("quantization") or {}).get("fallback")
    if isinstance(fallback, dict):  # the int8 fallback search's own duration
        kept["quantization"] = {**kept["quantization"], "fallback": {k: v for k, v in fallback.items()
                                                                     if k != "seconds"}}
    return kept


def differences(before, after, path: str = "") -> list[str]:
    """Where two JSON values differ, as paths."""
    if isinstance(before, dict) and isinstance(after, dict):
        return [found for key in sorted(set(before) | set(after))
                for found in differences(before.get(key), after.get(key), f"{path}.{key}")]
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        return [found for i, (b, a) in enumerate(zip(before, after)) for found in differences(b, a, f"{path}[{i}]")]
    return [] if before == after else [path or "."]


def checkout(revision: str, into: Path) -> Path:
    """The package as it is at `revision`, unpacked into a folder."""
    archive = subprocess.run(["git", "archive", revision, "onnx_lowrank"], cwd=ROOT, capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="HEAD", help="the git revision to compare with (default HEAD)")
    parser.add_argument("--case", action="append", choices=[*CASES, *MORE], help="only these cases (default all)")
    parser.add_argument("--more", action="store_true", help="also the cases of MORE (several minutes more)")
    args = parser.parse_args()
    cases = {**CASES, **MORE}
    same = True
    with tempfile.TemporaryDirectory(prefix="same-behaviour-") as work:
        old = checkout(args.before, Path(work))
        for number, name in enumerate(args.case or (cases if args.more else CASES)):
            status_before, model_before, report_before = compress(old, cases[name], Path(work, f"{number}-before"))
            status_after, model_after, report_after = compress(ROOT, cases[name], Path(work, f"{number}-after"))
            changed = differences(untimed(report_before), untimed(report_after))
            if status_before != status_after:
                changed.insert(0, f"exit status {status_before} -> {status_after}")
            if model_before != model_after:
                changed.insert(0, "model bytes")
            same &= not changed
            size = "no model" if model_after is None else f"{len(model_after):,} bytes"
            print(f"{name:32s} exit {status_after}, {size}: " + ("identical" if not changed else
                                                                   "DIFFERS in " + ", ".join(changed[:8])))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
