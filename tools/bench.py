"""Benchmarks of onnx-lowrank on real models; results go to benchmarks/*.json and BENCHMARKS.md.

Not a test: figures depend on the machine. Every figure in a row is measured in the same run.

    python tools/bench.py error-bound|generalization|methods|latency [--models minilm,ppocr_cls,...] [--provider cpu|cuda]

error-bound: for each model, compact mode at several tolerances (data-aware factors, sensitivity-weighted
allocation, validation in ONNX Runtime), and the weight-only path (--no-data) at the same parameter
budget; errors are measured on an evaluation set the tool never saw. Models come from
tools/real_models.py (cache/) or, for the small ones, models/. Each run writes
benchmarks/<suite>_<provider>.json (with the machine it ran on) and regenerates BENCHMARKS.md from every
JSON file there, so runs on different machines (the GPU one included) end up side by side.

generalization: what compact mode promises for new inputs (the report's confidence bound, the calibration
decisions whose margin is threatened) against what the evaluation set shows, for top1 / accuracy once per
acceptance criterion (margins, and the held-out count alone as before).

methods: for the convnets, size mode at a budget with each decomposition alone and with auto.

latency (tools/bench_latency.py): size, error, compression time and end-to-end latency of the original,
weight-only, data-aware, latency-gated and int8 models, all of a case timed side by side; MiniLM at half
its parameters and with int8; compression time of a BERT-base-size model. `--threads`, `--runs` and
`--seconds` set the timing; `--models` runs some cases, keeping the others' last results.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

import onnx_lowrank  # noqa: E402
from onnx_lowrank.calibration import load_calibration  # noqa: E402
from onnx_lowrank.errors import BoundNotMet  # noqa: E402
from onnx_lowrank.search import Evaluator  # noqa: E402

RESULTS = REPO / "benchmarks"
MODELS = REPO / "models"


@dataclass(frozen=True)
class Case:
    """A model, its calibration and evaluation data, and the bounds to try."""

    name: str
    metric: str
    tolerances: tuple[float, ...]
    batch_size: int = 16


CASES = {
    "digits": Case("digits", "accuracy", (0.0,)),
    "digits-rel": Case("digits", "rel-l2", (0.02, 0.05, 0.1)),
    "ppocr_cls": Case("ppocr_cls", "accuracy", (0.0,)),
    "ppocr_cls_lines": Case("ppocr_cls_lines", "accuracy", (0.0,)),
    "ppocr_rec": Case("ppocr_rec", "top1", (0.03, 0.05)),
    "ppocr_det": Case("ppocr_det", "rel-l2", (0.02, 0.05), batch_size=4),
    "minilm": Case("minilm", "cosine", (0.002, 0.005, 0.01, 0.015), batch_size=32),
    "minilm_l2": Case("minilm_l2", "cosine", (0.002, 0.01), batch_size=32),
}


def data_for(name: str) -> dict[str, Path]:
    """Model and data paths: the small models ship in models/, the others are built in cache/."""
    if name == "digits":
        return {
            "model": MODELS / "digits_cnn.onnx",
            "calib": MODELS / "digits_calib.npz",
            "calib_labels": MODELS / "digits_calib_labels.npy",
            "eval": MODELS / "digits_eval.npz",
            "eval_labels": MODELS / "digits_eval_labels.npy",
        }
    if name in ("minilm_l2", "minilm_l2_shuffled"):
        return _minilm_l2_split(shuffled=name == "minilm_l2_shuffled")
    if name == "ppocr_cls_lines":  # the small labelled set CI uses (the GPU machine has no cache/)
        return {"model": MODELS / "ppocr_cls.onnx", "calib": MODELS / "ppocr_cls_lines.npz",
                "calib_labels": MODELS / "ppocr_cls_lines_labels.npy", "eval": MODELS / "ppocr_cls_lines_eval.npz",
                "eval_labels": MODELS / "ppocr_cls_lines_eval_labels.npy"}
    import real_models  # needs torch, transformers and the model packages

    return real_models.materialize(name)


def _minilm_l2_split(shuffled: bool = False) -> dict[str, Path]:
    """The shipped 600 sentences: the first 200 calibrate, the last 200 evaluate. They are in the order of
    the standard-library modules they come from, so the two differ in kind (the evaluation's are harder);
    `shuffled`: 200 and 200 other ones drawn at random (seed 0), from one distribution."""
    import numpy as np

    folder = REPO / "cache"
    folder.mkdir(exist_ok=True)
    sentences = np.load(MODELS / "minilm_sentences.npz")
    count = len(next(iter(sentences.values())))
    order = np.random.default_rng(0).permutation(count) if shuffled else np.arange(count)
    stem = "minilm_l2_shuffled" if shuffled else "minilm_l2"
    paths = {"model": MODELS / "minilm_l2.onnx", "calib": folder / f"{stem}_calib.npz",
             "eval": folder / f"{stem}_eval.npz"}
    np.savez(paths["calib"], **{k: v[order[:200]] for k, v in sentences.items()})
    np.savez(paths["eval"], **{k: v[order[-200:]] for k, v in sentences.items()})
    return paths


def machine(provider: str) -> str:
    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    if provider == "cuda":
        try:
            import subprocess

            gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30).stdout.strip()
        except OSError:
            gpu = "unknown GPU"
        return f"{gpu} (CUDA EP), {cpu}"
    return cpu


def eval_error(original: onnx.ModelProto, model: onnx.ModelProto, paths, case: Case, provider: str) -> float:
    """The case's metric for `model` against the original on the evaluation set."""
    labels = paths.get("eval_labels")
    samples = load_calibration(paths["eval"], original, labels)
    evaluator = Evaluator(original, samples, provider, case.batch_size)
    return evaluator.error(model, range(len(samples)), case.metric, samples.labels)


def error_bound(case: Case, provider: str) -> list[dict]:
    paths = data_for(case.name)
    original = onnx.load(paths["model"])
    factorizable = sum(row.params for row in onnx_lowrank.inspect(original) if row.reason is None)
    rows = []
    for tolerance in case.tolerances:
        common = dict(calibration=paths["calib"], labels=paths.get("calib_labels"), metric=case.metric,
                      provider=provider, batch_size=case.batch_size)
        started = time.perf_counter()
        try:
            model, report = onnx_lowrank.compress(original, tolerance=tolerance, **common)
        except BoundNotMet as failure:
            rows.append({"model": case.name, "metric": case.metric, "tolerance": tolerance, "met": False,
                         "closest": failure.report.validation.value if failure.report.validation else None})
            continue
        seconds = time.perf_counter() - started
        kept = sum(layer.params_after for layer in report.layers) + sum(
            row.params for row in onnx_lowrank.inspect(original)
            if row.reason is None and row.node not in {n for layer in report.layers for n in layer.nodes}
        )
        fraction = kept / factorizable
        row = {
            "model": case.name, "metric": case.metric, "tolerance": tolerance, "met": True,
            "provider": report.validation.provider, "params_before": report.params_before,
            "params_after": report.params_after, "factorizable_kept": fraction,
            "held_out": report.validation.value, "eval": eval_error(original, model, paths, case, provider),
            "seconds": seconds, "phases": report.phases,
        }
        if fraction < 1:
            # the weight-only path at the same parameter budget, same allocation machinery and validation
            plain, plain_report = onnx_lowrank.compress(original, target_params=fraction, no_data=True, **common)
            row["weight_only_params_after"] = plain_report.params_after
            row["weight_only_eval"] = eval_error(original, plain, paths, case, provider)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


GENERALIZATION_CASES = {  # what a result promises for new inputs against what new inputs then show
    "digits": Case("digits", "accuracy", (0.0,)),
    "ppocr_cls_lines": Case("ppocr_cls_lines", "accuracy", (0.0,)),
    "ppocr_cls": Case("ppocr_cls", "accuracy", (0.0,)),
    "digits-rel": Case("digits", "rel-l2", (0.05,)),
    "minilm_l2": Case("minilm_l2", "cosine", (0.01,), batch_size=32),
    "minilm_l2_shuffled": Case("minilm_l2_shuffled", "cosine", (0.01,), batch_size=32),
}
CRITERIA = ("margins", "count")  # top1 / accuracy: margins threatened (today) or the held-out count alone
SWEEPS = {"ppocr_cls": (0.9, 0.8, 0.7)}  # size mode at these budgets too: what lossless would cost beyond


def generalization(case: Case, provider: str) -> list[dict]:
    """Compact mode (objective size, so that timings do not move the ranks), the validation's promise for
    new inputs, and the evaluation set's verdict; for top1 / accuracy once per acceptance criterion:
    margins threatened (generalization.py) and, as before it, the held-out count alone (SAFETY 0)."""
    from onnx_lowrank import generalization as rule

    paths = data_for(case.name)
    original = onnx.load(paths["model"])
    eval_samples = load_calibration(paths["eval"], original, paths.get("eval_labels"))
    evaluator = Evaluator(original, eval_samples, provider, case.batch_size)
    rows = []
    criteria = CRITERIA if case.metric in rule.DISCRETE else CRITERIA[:1]
    runs = [(criterion, {"tolerance": case.tolerances[0]}) for criterion in criteria] + [
        (f"size {budget:g}", {"target_params": budget}) for budget in SWEEPS.get(case.name, ())]
    for criterion, mode in runs:
        safety, rule.SAFETY = rule.SAFETY, (0.0 if criterion == "count" else rule.SAFETY)
        started = time.perf_counter()
        try:
            model, report = onnx_lowrank.compress(
                original, calibration=paths["calib"], labels=paths.get("calib_labels"), metric=case.metric,
                provider=provider, batch_size=case.batch_size, objective="size", **mode)
        except BoundNotMet as failure:
            model, report = None, failure.report
        finally:
            rule.SAFETY = safety
        check = report.validation
        row = {"model": case.name, "metric": case.metric, "tolerance": mode.get("tolerance"), "criterion": criterion,
               "met": model is not None, "seconds": time.perf_counter() - started,
               "params_before": report.params_before, "params_after": report.params_after,
               "validation": None if check is None else dataclasses.asdict(check)}
        if model is not None:
            judged = evaluator.judge(model, range(len(eval_samples)), case.metric, eval_samples.labels)
            row["eval"], row["eval_samples"] = judged.error, len(eval_samples)
            if judged.threat is not None:  # near-ties of the original on the evaluation set that flipped
                row["eval_ties_lost"] = judged.threat.ties_lost
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def render_generalization(run: dict) -> list[str]:
    lines = ["| model | metric | tolerance | accepted by | kept | held-out | threatened (ties) | promised, 95% | "
             "eval | time |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in run["rows"]:
        check = row["validation"] or {}
        discrete = row["metric"] in ("top1", "accuracy")
        accepted = {"count": "held-out count only", "margins": "margins" if discrete else "error"}.get(
            row["criterion"], f"none ({row['criterion']} of the factorizable)")
        tolerance = "-" if row["tolerance"] is None else f"{row['tolerance']:g}"
        head = f"| {row['model']} | {row['metric']} | {tolerance} | {accepted} |"
        if not row["met"]:
            lines.append(f"{head} not met | | | | | {row['seconds']:.0f} s |")
            continue
        if discrete:
            held = f"{check['lost']} of {check['decisions']} lost"
            threatened = "-" if row["criterion"] == "count" else \
                f"{check['threatened']} of {check['calibration_decisions']} ({check['ties']})"
            promised = f"<= {check['unseen_bound']:.2%} lose"
            ties = f" ({row['eval_ties_lost']} a near-tie)" if row.get("eval_ties_lost") else ""
            unseen = f"{round(row['eval'] * row['eval_samples'])} of {row['eval_samples']} lost{ties}"
        else:
            held, threatened = f"{check['value']:.4g}", "-"
            promised, unseen = f"<= {check['unseen_bound']:.4g}", f"{row['eval']:.4g}"
        lines.append(f"{head} {row['params_after'] / row['params_before']:.1%} | {held} | {threatened} | "
                     f"{promised} | {unseen} | {row['seconds']:.0f} s |")
    return lines + [""] + _criterion_cost(run["rows"])


def _criterion_cost(rows: list[dict]) -> list[str]:
    """One line per model judged both ways: what judging margins costs in parameters, and what it bought."""
    lines = []
    for model in dict.fromkeys(row["model"] for row in rows):
        pair = {row["criterion"]: row for row in rows
                if row["model"] == model and row["met"] and row["metric"] in ("top1", "accuracy")}
        if "margins" not in pair or "count" not in pair:
            continue
        kept = {name: row["params_after"] / row["params_before"] for name, row in pair.items()}
        lost = {name: round(row["eval"] * row["eval_samples"]) for name, row in pair.items()}
        lines.append(f"- {model}: judged by margins, lossless removes {1 - kept['margins']:.1%} of the parameters "
                     f"where the held-out count alone removed {1 - kept['count']:.1%} (it costs "
                     f"{kept['margins'] - kept['count']:.1%} of the model); new inputs lost: {lost['margins']} "
                     f"against {lost['count']} of {pair['margins']['eval_samples']}.")
    return lines


METHOD_CASES = {  # model, metric, budgets (fractions of the factorizable parameters) for the methods suite
    "digits": ("digits", "rel-l2", (0.5, 0.3)),
    "ppocr_cls": ("ppocr_cls", "rel-l2", (0.7, 0.5)),
    "ppocr_det": ("ppocr_det", "rel-l2", (0.8,)),
    "ppocr_rec": ("ppocr_rec", "rel-l2", (0.8,)),
}
SINGLE_METHODS = ("svd", "tucker2", "cp", "spatial", "depthwise", "block")


def methods(name: str, provider: str) -> list[dict]:
    """Size mode at each budget, once per single method and once with auto; errors on the evaluation set."""
    model_name, metric, budgets = METHOD_CASES[name]
    case = CASES.get(model_name, Case(model_name, metric, ()))
    case = Case(model_name, metric, (), case.batch_size)
    paths = data_for(model_name)
    original = onnx.load(paths["model"])
    rows = []
    for budget in budgets:
        for method in (*SINGLE_METHODS, "auto"):
            started = time.perf_counter()
            try:
                model, report = onnx_lowrank.compress(
                    original, calibration=paths["calib"], target_params=budget, method=method, metric=metric,
                    provider=provider, batch_size=case.batch_size,
                )
            except onnx_lowrank.InputError as refusal:  # e.g. the method cannot shrink the layers that far
                row = {"model": model_name, "metric": metric, "budget": budget, "method": method,
                       "unreachable": str(refusal), "seconds": time.perf_counter() - started}
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            used: dict[str, int] = {}
            for layer in report.layers:
                used[layer.method] = used.get(layer.method, 0) + 1
            row = {"model": model_name, "metric": metric, "budget": budget, "method": method,
                   "params_before": report.params_before, "params_after": report.params_after,
                   "held_out": report.validation.value, "eval": eval_error(original, model, paths, case, provider),
                   "layers": used, "seconds": time.perf_counter() - started}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def render_methods(run: dict) -> list[str]:
    lines = ["| model | metric | budget | method | kept | held-out | eval | layers by method | time |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in run["rows"]:
        if "unreachable" in row:
            lines.append(f"| {row['model']} | {row['metric']} | {row['budget']:g} | {row['method']} | - | - | - | "
                         f"cannot reach the budget | {row['seconds']:.0f} s |")
            continue
        used = ", ".join(f"{method} {count}" for method, count in sorted(row["layers"].items()))
        lines.append(f"| {row['model']} | {row['metric']} | {row['budget']:g} | {row['method']} | "
                     f"{row['params_after'] / row['params_before']:.1%} | {row['held_out']:.4g} | {row['eval']:.4g} | "
                     f"{used} | {row['seconds']:.0f} s |")
    return lines


def render(results: list[dict]) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Written by `python tools/bench.py`; every figure in a row comes from one run on the machine named",
        "above its table. Errors are on an evaluation set the tool never saw (the tool validates on a",
        "held-out part of the calibration data). Metrics as in the README: rel-l2, cosine (1 - mean cosine),",
        "top1 (fraction of argmax decisions changed), accuracy (fraction of samples the original gets right",
        "and the compressed model loses; 0 = lossless). *kept* = parameters after / before (whole model);",
        "*factorizable kept*: of the Gemm/MatMul/Conv weights that can be factorized. The weight-only column",
        "is `--no-data` at the same factorizable budget (same allocation, validation and search).",
        "",
    ]
    for run in results:
        lines += [f"## {run['suite']} on {run['machine']} ({run['provider']}, onnxruntime {run['onnxruntime']})",
                  "", f"Run {run['date']}." + (f" Note: {run['note']}." if run.get("note") else ""), ""]
        if run["suite"] == "scale":
            lines += [
                f"`tools/bench_scale.py`: {run['model']}, a synthetic transformer with random weights in an",
                "external-data file, compressed end to end with `--target-params 0.5` (weight-only) in a child",
                "process; peak memory is that process's maximum resident set (wait4; its pool workers count as",
                "the largest of them, Dask workers not at all). *run*: the time each row was measured; rows",
                "of one run ran one after the other.",
                "",
                *([f"Memory bound (issue 6): 3 x the largest layer's working set "
                   f"({run['layer_working_set_gib']:.2f} GiB: its weight read and decomposed alone, measured) "
                   f"+ one copy of the model ({run['rows'][0]['input_bytes'] / 2**30:.2f} GiB) = "
                   f"{run['memory_bound_gib']:.2f} GiB.", ""] if "memory_bound_gib" in run else []),
                "| way | run | params before | params after | input data | output | time | peak memory | factorize phase |",
                "|---|---|---|---|---|---|---|---|---|",
                *[f"| {r['way']} | {r.get('run', '-')} | {r['params_before']:,} | {r['params_after']:,} | {r['input_bytes'] / 2**30:.2f} GiB | "
                  f"{r['output_bytes'] / 2**30:.2f} GiB | {r['seconds']:.0f} s | "
                  f"{r['peak_rss_gib']:.1f} GiB | "
                  f"{r['phases'].get('factorize', float('nan')):.0f} s |" for r in run["rows"]],
                "",
            ]
            continue
        if run["suite"] == "latency":
            import bench_latency

            lines += bench_latency.render_latency(run)
            continue
        if run["suite"] == "generalization":
            lines += [
                "Compact mode, objective size; *held-out*: the validation on the held-out calibration part;",
                "*threatened*: calibration decisions (fit part included) whose margin twice the perturbation",
                "the compressed model causes at that margin level reaches, near-ties of the original in",
                "brackets; *promised*: the report's upper confidence bound for new inputs; *eval*: what the",
                "never-seen evaluation set then showed. *held-out count only*: the acceptance before margins",
                "were judged (no held-out decision lost), for comparison. minilm_l2: calibration and",
                "evaluation are the first and last 200 of the shipped sentences, which follow the order of",
                "the standard-library modules they come from (the evaluation's are harder, a shift the",
                "bound does not cover); minilm_l2_shuffled: 200 and 200 others drawn at random.",
                "*none (size F)*: size mode at F of the factorizable parameters with no tolerance, what",
                "the margins would say of the larger cuts lossless mode refuses.", "",
                *render_generalization(run), "",
            ]
            continue
        if run["suite"] == "methods":
            lines += [
                "Size mode at a budget (a fraction of the factorizable parameters), once per decomposition",
                "(`--method NAME`: layers it cannot shrink stay dense) and once with `--method auto`.", "",
                *render_methods(run), "",
            ]
            continue
        lines.append("| model | metric | tolerance | kept | factorizable kept | held-out | eval | eval, weight-only | time |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for row in run["rows"]:
            if not row["met"]:
                closest = "-" if row["closest"] is None else f"{row['closest']:.4g}"
                lines.append(f"| {row['model']} | {row['metric']} | {row['tolerance']:g} | not met (closest {closest}) "
                             "| | | | | |")
                continue
            plain = row.get("weight_only_eval")
            lines.append(
                f"| {row['model']} | {row['metric']} | {row['tolerance']:g} | "
                f"{row['params_after'] / row['params_before']:.1%} | {row['factorizable_kept']:.1%} | "
                f"{row['held_out']:.4g} | {row['eval']:.4g} | {'-' if plain is None else f'{plain:.4g}'} | "
                f"{row['seconds']:.0f} s |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", choices=["error-bound", "generalization", "methods", "latency", "render"],
                        help="render: only rewrite BENCHMARKS.md")
    parser.add_argument("--models", help="comma-separated cases (default: all of the suite's)")
    parser.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of result JSON files")
    parser.add_argument("--threads", type=int, default=2, help="latency: intra-op threads of the timed sessions "
                        "(0: onnxruntime's default)")
    parser.add_argument("--runs", type=int, default=30, help="latency: timed runs of every model, at least")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="latency: seconds of timing rounds per case, at least")
    args = parser.parse_args()
    if args.suite == "render":
        _render_all()
        return
    if args.suite == "latency":
        _latency(args)
        return
    suites = {"error-bound": (CASES, lambda name: error_bound(CASES[name], args.provider)),
              "generalization": (GENERALIZATION_CASES,
                                 lambda name: generalization(GENERALIZATION_CASES[name], args.provider)),
              "methods": (METHOD_CASES, lambda name: methods(name, args.provider))}
    cases, run_case = suites[args.suite]
    names = args.models.split(",") if args.models else list(cases)
    rows = []
    for name in names:
        rows += run_case(name)
    args.out.mkdir(exist_ok=True)
    run = {"suite": args.suite, "provider": args.provider, "machine": machine(args.provider),
           "onnxruntime": ort.__version__, "date": time.strftime("%Y-%m-%d"), "rows": rows}
    (args.out / f"{args.suite}_{args.provider}.json").write_text(json.dumps(run, indent=1))
    _render_all()


def _latency(args) -> None:
    import bench_latency

    names = args.models.split(",") if args.models else list(bench_latency.LATENCY_CASES)
    unknown = [name for name in names if name not in bench_latency.LATENCY_CASES]
    if unknown:
        raise SystemExit(f"unknown latency case {unknown[0]!r}; choose from {', '.join(bench_latency.LATENCY_CASES)}")
    timer = bench_latency.Timer(args.provider, args.threads, args.runs, args.seconds)
    rows = bench_latency.run(names, timer)
    args.out.mkdir(exist_ok=True)
    path = args.out / f"latency_{args.provider}.json"
    where = machine(args.provider)
    rows, note = bench_latency.merged(rows, path, where, ort.__version__)
    run = {"suite": "latency", "provider": args.provider, "machine": where, "onnxruntime": ort.__version__,
           "date": time.strftime("%Y-%m-%d"), "rows": rows}
    if note:
        run["note"] = note
    path.write_text(json.dumps(run, indent=1))
    _render_all()


def _render_all() -> None:
    results = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    (REPO / "BENCHMARKS.md").write_text(render(results))


if __name__ == "__main__":
    main()
