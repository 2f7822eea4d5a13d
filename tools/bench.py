"""Benchmarks of onnx-lowrank on real models; results go to benchmarks/*.json and BENCHMARKS.md.

Not a test: figures depend on the machine. Every figure in a row is measured in the same run.

    python tools/bench.py error-bound|generalization|methods|refit|quantized|latency [--models minilm,ppocr_cls,...] [--provider cpu|cuda]
    python tools/bench.py quantized --models smollm2 --ways peers   # or ours, nncf, gptq, ...: some ways only

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

refit: size mode at budgets with --refit none and sequential (factorize/refit.py), the same parameters, eval errors.

quantized (tools/bench_quantized.py): --quantize int4 and int8 against ONNX Runtime's weight-only quantizer
and NNCF, file sizes and eval errors. `--ways` (ours, peers, or part of a way's name; comma-separated) runs
some ways only, keeping the other ways' last rows.

latency (tools/bench_latency.py): size, error, compression time and end-to-end latency of the original,
weight-only, data-aware, latency-gated and int8 models, all of a case timed side by side; MiniLM at half
its parameters and with int8; compression time of a BERT-base-size model. `--threads`, `--runs` and
`--seconds` set the timing; `--models` runs some cases, keeping the others' last results.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import bench_common
import bench_latency
import onnx
import onnxruntime as ort
from bench_common import CASES, RESULTS, Case, data_for, machine, render_all  # puts this repository on sys.path
from bench_quantized import QUANTIZED_CASES, quantized, selected

import onnx_lowrank
from onnx_lowrank.check.evaluator import Evaluator
from onnx_lowrank.errors import BoundNotMet
from onnx_lowrank.observe.calibration import load_calibration, next_token_targets


def eval_error(original: onnx.ModelProto, model: onnx.ModelProto, paths, case: Case, provider: str) -> float:
    """The case's metric for `model` against the original on the evaluation set."""
    labels = paths.get("eval_labels")
    samples = load_calibration(paths["eval"], original, labels)
    if case.metric == "perplexity":  # a language model's text is its own label
        samples.labels = next_token_targets(samples)
    evaluator = Evaluator(original, samples, provider, case.batch_size)
    return evaluator.error(model, range(len(samples)), case.metric, samples.labels)


def error_bound(case: Case, provider: str) -> list[dict]:
    paths = data_for(case.name)
    original = onnx.load(paths["model"])
    factorizable = sum(row.params for row in onnx_lowrank.inspect(original) if row.reason is None)
    rows = []
    for tolerance in case.tolerances:
        # objective size: the parameters a tolerance allows (what the latency suite's objectives cost is its own)
        common = dict(calibration=paths["calib"], labels=paths.get("calib_labels"), metric=case.metric,
                      provider=provider, batch_size=case.batch_size, objective="size")
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
    margins threatened (check/generalization.py) and, as before it, the held-out count alone (SAFETY 0)."""
    from onnx_lowrank.check import generalization as rule

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



METHOD_CASES = {  # model, metric, budgets (fractions of the factorizable parameters) for the methods suite
    "digits": ("digits", "rel-l2", (0.5, 0.3)),
    "ppocr_cls": ("ppocr_cls", "rel-l2", (0.7, 0.5)),
    "ppocr_det": ("ppocr_det", "rel-l2", (0.8,)),
    "ppocr_rec": ("ppocr_rec", "rel-l2", (0.8,)),
}
SINGLE_METHODS = ("svd", "tucker2", "cp", "spatial", "depthwise", "block")


def _budget_case(model_name: str, metric: str) -> tuple[Case, dict, onnx.ModelProto]:
    """A size-mode case of a model in a metric (its batch size from CASES), its data and the original."""
    batch_size = CASES.get(model_name, Case(model_name, metric, ())).batch_size
    paths = data_for(model_name)
    return Case(model_name, metric, (), batch_size), paths, onnx.load(paths["model"])


def methods(name: str, provider: str) -> list[dict]:
    """Size mode at each budget, once per single method and once with auto; errors on the evaluation set."""
    model_name, metric, budgets = METHOD_CASES[name]
    case, paths, original = _budget_case(model_name, metric)
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


REFIT_CASES = {  # model, metric, budgets (fractions of the factorizable parameters) for the refit suite
    "digits": ("digits", "rel-l2", (0.5, 0.3, 0.2)),
    "ppocr_cls_lines": ("ppocr_cls_lines", "rel-l2", (0.7, 0.5)),
    "minilm_l2": ("minilm_l2", "cosine", (0.8, 0.6)),
}


def refit(name: str, provider: str) -> list[dict]:
    """Size mode at each budget with --refit none and sequential (data-aware SVDs); errors on the evaluation
    set, both at the same parameter count."""
    model_name, metric, budgets = REFIT_CASES[name]
    case, paths, original = _budget_case(model_name, metric)
    rows = []
    for budget in budgets:
        for mode in ("none", "sequential"):
            started = time.perf_counter()
            model, report = onnx_lowrank.compress(
                original, calibration=paths["calib"], target_params=budget, method="svd", metric=metric,
                provider=provider, batch_size=case.batch_size, objective="size", refit=mode)
            row = {"model": model_name, "metric": metric, "budget": budget, "refit": mode,
                   "refit_layers": report.refit_layers, "params_before": report.params_before,
                   "params_after": report.params_after, "held_out": report.validation.value,
                   "eval": eval_error(original, model, paths, case, provider), "seconds": time.perf_counter() - started}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", choices=["error-bound", "generalization", "methods", "refit", "quantized", "latency",
                                          "render"],
                        help="render: only rewrite BENCHMARKS.md")
    parser.add_argument("--models", help="comma-separated cases (default: all of the suite's)")
    parser.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of result JSON files")
    parser.add_argument("--threads", type=int, default=2, help="latency: intra-op threads of the timed sessions "
                        "(0: onnxruntime's default)")
    parser.add_argument("--runs", type=int, default=30, help="latency: timed runs of every model, at least")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="latency: seconds of timing rounds per case, at least")
    parser.add_argument("--ways", help="quantized: the ways to run, comma-separated: ours (onnx-lowrank's), peers, "
                        "or part of a way's name (nncf, gptq, ...); the others' last rows stay")
    args = parser.parse_args()
    if args.ways and args.suite != "quantized":
        parser.error("--ways is for the quantized suite")
    if args.suite == "render":
        render_all()
        return
    if args.suite == "latency":
        _latency(args)
        return
    suites = {"error-bound": (CASES, lambda name: error_bound(CASES[name], args.provider)),
              "generalization": (GENERALIZATION_CASES,
                                 lambda name: generalization(GENERALIZATION_CASES[name], args.provider)),
              "methods": (METHOD_CASES, lambda name: methods(name, args.provider)),
              "refit": (REFIT_CASES, lambda name: refit(name, args.provider)),
              "quantized": (QUANTIZED_CASES, lambda name: quantized(name, args.provider, eval_error, args.ways))}
    cases, run_case = suites[args.suite]
    names = args.models.split(",") if args.models else list(cases)
    rows = []
    for name in names:
        rows += run_case(name)
    args.out.mkdir(exist_ok=True)
    path = args.out / f"{args.suite}_{args.provider}.json"
    run = {"suite": args.suite, "provider": args.provider, "machine": machine(args.provider),
           "onnxruntime": ort.__version__, "date": time.strftime("%Y-%m-%d"), "rows": rows}
    if (args.models or args.ways) and path.exists():  # some cases (ways) re-run: the others' rows stay, in the note
        run.update(_merged(json.loads(path.read_text()), run, args.ways))
    path.write_text(json.dumps(run, indent=1))
    render_all()


def _merged(previous: dict, run: dict, ways: str | None = None) -> dict:
    """The previous run's rows of the models and metrics not re-run, then the new rows, each with the date it
    was run on, and a note saying which ran when; only when the previous run came from the same machine and
    onnxruntime (as bench_latency.merged). A row carries its own date, so merging again never nests notes.
    With `ways` (the quantized suite's --ways), a re-run model keeps its rows of the ways not selected, and
    its new rows take the place of the first row they replace (after its last row where none)."""
    rows = [{**row, "date": run["date"], "cpu": bench_common.cpu_model()} for row in run["rows"]]
    if (previous.get("machine"), previous.get("onnxruntime")) != (run["machine"], run["onnxruntime"]):
        return {"rows": rows}
    case = lambda row: (row.get("model"), row.get("metric"))  # noqa: E731
    ran = {case(row) for row in rows}
    stays = [case(row) not in ran or bool(ways and not selected(row.get("way", ""), ways)) for row in previous["rows"]]
    kept = [{"date": previous["date"], **row} for row, stay in zip(previous["rows"], stays) if stay]
    if not kept:
        return {"rows": rows}
    if not ways:
        return {"rows": kept + rows, "note": dated(kept + rows)}
    placed, emitted = [], set()
    for row, stay in zip(previous["rows"], stays):  # a case's new rows where the first row they replace was
        if stay:
            placed.append({"date": previous["date"], **row})
        elif case(row) not in emitted:
            emitted.add(case(row))
            placed += [new for new in rows if case(new) == case(row)]
    for new in rows:  # a case none of whose previous rows was replaced: after its last row, or at the end
        if case(new) not in emitted:
            last = max((i for i, row in enumerate(placed) if case(row) == case(new)), default=len(placed) - 1)
            placed.insert(last + 1, new)
    return {"rows": placed, "note": dated(placed)}


def dated(rows: list[dict]) -> str:
    """Which models ran when, and on which CPU where a row says (one machine name can stand for several CPUs)."""
    by_run: dict[tuple[str, str], dict[str, None]] = {}
    for row in rows:
        by_run.setdefault((row["date"], row.get("cpu", "")), {})[row["model"]] = None
    return "; ".join(f"{', '.join(models)} run {date}" + (f" on {cpu}" if cpu else "")
                     for (date, cpu), models in sorted(by_run.items()))


def _latency(args) -> None:
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
    render_all()


if __name__ == "__main__":
    main()
