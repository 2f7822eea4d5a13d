"""What tools/bench.py, tools/bench_latency.py and tools/bench_scale.py share: paths, the benchmark cases
and their data, the machine a run is on, and the rendering of BENCHMARKS.md from every result file.

Imports none of the three (they import it), so that the import graph of the benchmark tools is a tree:
bench_common <- bench_scale <- bench_latency <- bench. Every script rewrites BENCHMARKS.md from every
suite's JSON file after its own run, so the rendering of every suite lives here. Importing this module
puts this repository first on sys.path: the tools import it (bench.py through bench_latency and
bench_scale) before onnx_lowrank, so that they run this checkout's package, not an installed one.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

RESULTS = REPO / "benchmarks"
MODELS = REPO / "models"

# the latency suite's targets: its cases record them, its tables judge rows by them
HALF_TARGET_SPEEDUP = 1.5  # minilm-half, CPU, batch 32
INT8_TARGET_FRACTION = 0.22  # minilm-int8: of the original file ...
INT8_TARGET_COSINE = 0.98  # ... at this eval mean cosine
SCALE_TARGET_SECONDS = 240  # bert-base on 2 cores


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
    "silero": Case("silero", "rel-l2", (0.05,)),  # speech probability and next state, every output
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
    if name == "silero":  # folders of feeds (audio chunks with the state the original carries there)
        return {"model": MODELS / "silero_vad.onnx", "calib": MODELS / "silero_calib", "eval": MODELS / "silero_eval"}
    if name in ("minilm_l2", "minilm_l2_shuffled"):
        return _minilm_l2_split(shuffled=name == "minilm_l2_shuffled")
    if name == "ppocr_cls_lines":  # the small labelled set CI uses (the GPU machine has no cache/)
        return {"model": MODELS / "ppocr_cls.onnx", "calib": MODELS / "ppocr_cls_lines.npz",
                "calib_labels": MODELS / "ppocr_cls_lines_labels.npy", "eval": MODELS / "ppocr_cls_lines_eval.npz",
                "eval_labels": MODELS / "ppocr_cls_lines_eval_labels.npy"}
    if name == "smollm2":  # built by tools/build_smollm2.py (torch, transformers, gguf)
        import build_smollm2

        return build_smollm2.paths()
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


def cpu_model() -> str:
    """The CPU's model name and the instruction sets that set ONNX Runtime's speed on it (rows measured on
    different CPUs of the same core count share a results file; each row says which it ran on)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    present = [label for flag, label in (("amx_int8", "AMX"), ("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI"),
                                         ("avx2", "AVX2")) if flag in flags]
    return f"{name} ({', '.join(present[:2]) or 'no AVX2'})"


def machine(provider: str) -> str:
    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    if provider == "cuda":
        try:
            import subprocess

            gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30, check=False).stdout.strip()
        except OSError:
            gpu = "unknown GPU"
        return f"{gpu} (CUDA EP), {cpu}"
    return cpu

# ------------------------------------------------------------------------------------------- rendering


def render_all() -> None:
    """Rewrite BENCHMARKS.md from every result file in benchmarks/."""
    results = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    (REPO / "BENCHMARKS.md").write_text(render(results))


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
                *([(f"Memory bound (issue 6): 3 x the largest layer's working set "
                   f"({run['layer_working_set_gib']:.2f} GiB: its weight read and decomposed alone, measured) "
                   f"+ one copy of the model ({run['rows'][0]['input_bytes'] / 2**30:.2f} GiB) = "
                   f"{run['memory_bound_gib']:.2f} GiB."), ""] if "memory_bound_gib" in run else []),
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
            lines += render_latency(run)
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
        if run["suite"] == "refit":
            lines += [
                "Size mode at a budget (a fraction of the factorizable parameters), data-aware SVDs, with",
                "`--refit none` and `--refit sequential` (every candidate refit: the factorized layers solved",
                "again in graph order for the inputs the compressed model gives them); same parameters.", "",
                "| model | metric | budget | refit | layers refit | kept | held-out | eval | time |",
                "|---|---|---|---|---|---|---|---|---|",
                *[f"| {r['model']} | {r['metric']} | {r['budget']:g} | {r['refit']} | {r['refit_layers']} | "
                  f"{r['params_after'] / r['params_before']:.1%} | {r['held_out']:.4g} | {r['eval']:.4g} | "
                  f"{r['seconds']:.0f} s |" for r in run["rows"]], "",
            ]
            continue
        if run["suite"] == "quantized":
            from bench_quantized import render_quantized  # it imports this module

            lines += [*render_quantized(run), ""]
            continue
        if run["suite"] == "smollm2":
            lines += render_smollm2(run)
            continue
        if run["suite"] == "methods":
            lines += [
                "Size mode at a budget (a fraction of the factorizable parameters), once per decomposition",
                "(`--method NAME`: layers it cannot shrink stay dense) and once with `--method auto`.", "",
                *render_methods(run), "",
            ]
            continue
        lines += ["Compact mode at each tolerance, objective size (what the objectives cost in parameters is in",
                  "the latency tables), `--method auto`.", ""]
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



def render_generalization(run: dict) -> list[str]:
    lines = [("| model | metric | tolerance | accepted by | kept | held-out | threatened (ties) | promised, 95% | "
             "eval | time |"), "|---|---|---|---|---|---|---|---|---|---|"]
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



def render_smollm2(run: dict) -> list[str]:
    """`tools/bench_smollm2.py`: the compact run and the size-mode curve of SmolLM2-135M."""
    def ratio(row: dict) -> str:
        value = row.get("eval_ratio")
        return "-" if value is None else f"{value:.4f}" if value < 100 else f"{value:.3g}"

    def speed(row: dict) -> str:
        return "-" if row.get("speedup") is None else f"{row['speedup']:.2f}x"

    def prompt(row: dict) -> str:
        return "-" if not row.get("latency_ms") else f"{row['latency_ms'][0]:.0f} ms"

    def took(row: dict) -> str:
        return f"{row['seconds'] / 60:.1f} min" + ("" if row.get("cold_cache") is not False else " (cached)")

    def kept(row: dict) -> str:
        return f"{row['params_after'] / row['params_before']:.1%}"

    def cpu(row: dict) -> str:  # rows before 2026-12-05 10:00 did not record their CPU
        ran = row.get("cpu", "an earlier 2-core x86_64 machine")
        return f"{ran}, {row['date']}" if "date" in row else ran

    def methods(row: dict) -> str:
        return ", ".join(f"{method} {count}" for method, count in sorted(row["methods"].items()))

    compact = [r for r in run["rows"] if r["row"] == "compact"]
    curve = sorted((r for r in run["rows"] if r["row"] == "curve"), key=lambda r: (-r["budget"], r["way"]))
    lines = [
        "`tools/bench_smollm2.py`: SmolLM2-135M-Instruct (`tools/build_smollm2.py`: ONNX with a KV cache,",
        "calibration and evaluation 64 x 128 tokens of disjoint standard-library docstrings), compressed on",
        "the command line in a child process. *eval ratio*: perplexity of the compressed model over the",
        f"original's ({run['original_perplexity']:.3f}) on the evaluation sequences; *held-out*: the tool's",
        "validated perplexity increase, *bound*: its 95% bound for new inputs; *speed*: prompt processing",
        "(128 tokens, batch 1, 2 threads), original over compressed, timed side by side; time and peak",
        "memory of the whole run (statistics, sensitivities, search, write); *(cached)*: the run found the",
        "statistics or sensitivities of its method in the shared `--cache` folder, so its time leaves them out.",
        "*original prompt*: the original's own median in that timing, which says how fast the CPU was (times",
        "of rows run on different CPUs do not compare).", "",
    ]
    if compact:
        lines += ["| mode | objective | refit | kept | held-out | bound | eval ratio | speed | time | peak memory | "
                  "methods | original prompt | CPU |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| compact, tolerance {r['tolerance']:g} | {r['objective']} | {r['refit']} ({r['refit_layers']}) | "
                  f"{kept(r) if r['exit'] == 0 else 'not met'} | {r['held_out']:.4g} | {r['bound']:.4g} | {ratio(r)} | "
                  f"{speed(r)} | {took(r)} | {r['peak_rss_gib']:.1f} GiB | {methods(r)} | {prompt(r)} | {cpu(r)} |"
                  for r in compact]
        lines.append("")
    if curve:
        lines += ["Size mode at a fraction of the factorizable parameters, objective size:", "",
                  "| budget | way | refit | kept | held-out | eval ratio | speed | time | original prompt | CPU |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['budget']:g} | {r['way']} | {r.get('refit') or '-'} ({r.get('refit_layers') or 0}) | "
                  f"{kept(r)} | "
                  f"{'-' if r['held_out'] is None else format(r['held_out'], '.4g')} | {ratio(r)} | {speed(r)} | "
                  f"{took(r)} | {prompt(r)} | {cpu(r)} |" for r in curve]
        lines.append("")
    return lines


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



# ------------------------------------------------------------------------------------------- the latency suite


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def _ms(row: dict) -> tuple[str, str, str]:
    timing = row.get("latency")
    if timing is None:
        return "-", "-", "-"
    return (f"{timing['median_ms']:.3g} ms", f"{timing['p10_ms']:.3g}-{timing['p90_ms']:.3g}",
            f"{row['speedup']:.2f}x")


def _seconds(row: dict) -> str:
    return "-" if row.get("seconds") is None else f"{row['seconds']:.0f} s"


def _failed(row: dict) -> str:
    if "unreachable" in row:
        return "budget unreachable"
    if "skipped" in row:
        return f"not run ({row['skipped']})"
    closest = row.get("closest")
    return "bound not met" + ("" if closest is None else f" (closest {closest:.4g})")


def _fusions(row: dict) -> str:
    if row["row"] == "original" or not row.get("met"):
        return "-"
    if row.get("fusions_error"):
        return "not checked"
    match = row.get("fusions_match")
    if match is None:
        return "-"
    return "yes" if match else "no: lost " + ", ".join(row.get("fusions_lost") or ["?"])


def _on(record: dict) -> str:
    return f" on {record['cpu']}" if record.get("cpu") else ""


def _heading(record: dict, run: dict) -> list[str]:
    timing = record.get("timing", {})
    tolerance = "" if record.get("tolerance") is None else f", tolerance {record['tolerance']:g}"
    line = f"### {record['case']}: {record['model']} ({record['metric']}{tolerance}), run {record['date']}{_on(record)}"
    facts = []
    if timing:
        facts.append(f"timed on {timing.get('timing_provider', timing['provider'])}, batch {timing['batch']}, "
                     f"{timing['threads'] or 'default'} threads, {timing.get('runs', '?')} interleaved runs "
                     "of every model")
    if record.get("eval_samples"):
        facts.append(f"eval error on {record['eval_samples']} samples")
    if timing.get("error"):
        facts.append(timing["error"])
    return [line, "", "; ".join(facts) + "." if facts else "", ""]


def _render_objectives(record: dict, run: dict) -> list[str]:
    lines = _heading(record, run) + [
        ("| row | params | file | factorizable kept | eval error | compression | median | p10-p90 | speedup "
        "| fusions kept |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in record["rows"]:
        if not row.get("met"):
            lines.append(f"| {row['row']} | {_failed(row)} | | | | {_seconds(row)} | | | | |")
            continue
        kept = row.get("factorizable_kept")
        median, spread, speedup = _ms(row)
        lines.append(f"| {row['row']} | {row['params']:,} | {_bytes(row['file_bytes'])} | "
                     f"{'-' if kept is None else f'{kept:.1%}'} | {row['eval']:.4g} | {_seconds(row)} | "
                     f"{median} | {spread} | {speedup} | {_fusions(row)} |")
    return lines + [""]


def _render_half(record: dict, run: dict) -> list[str]:
    target = record.get("target_speedup", HALF_TARGET_SPEEDUP)
    lines = _heading(record, run) + [
        f"Size mode, `target_params=0.5` of the factorizable parameters of the ops named (target: {target:g}x).", "",
        ("| row | kept (model) | factorizable kept | embedding kept | file | eval cosine | compression | median | "
        f"p10-p90 | speedup | >= {target:g}x |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    before = record["rows"][0]["params"]
    for row in record["rows"]:
        if not row.get("met"):
            lines.append(f"| {row['row']} | {_failed(row)} | | | | | {_seconds(row)} | | | | |")
            continue
        median, spread, speedup = _ms(row)
        embedding = row.get("embedding_params") or [0, 0]
        shown = "-" if row["row"] == "original" else (
            f"{embedding[1] / embedding[0]:.1%}" if embedding[0] else "100% (not factorized)")
        kept = row.get("factorizable_kept")
        met = "-" if row["row"] == "original" or "speedup" not in row else ("yes" if row["speedup"] >= target else "no")
        lines.append(f"| {row['row']} | {row['params'] / before:.1%} | {'-' if kept is None else f'{kept:.1%}'} | "
                     f"{shown} | {_bytes(row['file_bytes'])} | {1 - row['eval']:.4f} | {_seconds(row)} | {median} | "
                     f"{spread} | {speedup} | {met} |")
    return lines + [""]


def _render_int8(record: dict, run: dict) -> list[str]:
    fraction = record.get("target_fraction", INT8_TARGET_FRACTION)
    cosine = record.get("target_cosine", INT8_TARGET_COSINE)
    lines = _heading(record, run) + [
        f"Target: at most {fraction:.0%} of the original file at eval mean cosine >= {cosine:g}.", "",
        ("| row | file | of original | eval mean cosine | held-out error | compression | median | p10-p90 | speedup "
        "| target met |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    original = record["rows"][0]["file_bytes"]
    for row in record["rows"]:
        if not row.get("met"):
            lines.append(f"| {row['row']} | {_failed(row)} | | | | {_seconds(row)} | | | | |")
            continue
        share = row["file_bytes"] / original
        median, spread, speedup = _ms(row)
        held = row.get("held_out")
        met = "-" if row["row"] == "original" else ("yes" if share <= fraction and 1 - row["eval"] >= cosine else "no")
        lines.append(f"| {row['row']} | {_bytes(row['file_bytes'])} | {share:.1%} | {1 - row['eval']:.4f} | "
                     f"{'-' if held is None else f'{held:.4g}'} | {_seconds(row)} | {median} | {spread} | "
                     f"{speedup} | {met} |")
    for row in record["rows"]:
        quantization = row.get("quantization") or {}
        kept, found = quantization.get("fallback_nodes"), quantization.get("fallback")
        if kept and found:
            nodes = ", ".join(f"`{node['node']}` {node['scheme']} (-{node['error_reduction']:.4g}, "
                              f"+{_bytes(node['extra_bytes'])})" for node in kept)
            lines += ["", (f"{row['row']}: int8 alone {found['error_int8_all']:.4g} > share {found['share']:.4g}; taken "
                          f"out of dynamic int8 (measured error reduction, bytes added): {nodes}; int8 alone then "
                          f"{found['error_int8_fallback']:.4g} ({found['nodes_measured']} nodes measured, "
                          f"{found['seconds']:.0f} s).")]
    return lines + [""]


def _render_scale(record: dict, run: dict) -> list[str]:
    target = record.get("target_seconds", SCALE_TARGET_SECONDS)
    lines = [f"### {record['case']}: compression time at scale, run {record['date']}{_on(record)}", ""]
    for row in record["rows"]:
        dims = row["dims"]
        phases = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in row["phases"].items() if seconds >= 0.5)
        lines += [
            f"{row['builder']}: {dims['layers']} layers, hidden {dims['hidden']}, FFN {dims['ffn']}, "
            + (f"vocabulary {dims['vocab']}, " if dims.get("vocab") else "")
            + f"sequence {dims['seq']}; `onnx-lowrank {' '.join(_short(a) for a in row['argv'])}` "
            "in a child process (peak memory: its maximum resident set, wait4). Random weights have a flat "
            f"spectrum: only the time means something. Target: {target / 60:g} minutes.", "",
            "| params before | params after | file | time | peak memory | within target | phases |",
            "|---|---|---|---|---|---|---|",
            (f"| {row['params_before']:,} | {row['params_after']:,} | {_bytes(row['file_bytes'])} | "
            f"{row['seconds']:.0f} s | "
            f"{row['peak_rss_gib']:.1f} GiB | {'yes' if row['seconds'] <= target else 'no'} | {phases} |"), "",
        ]
    return lines


def _short(argument: str) -> str:
    """A path as its file name (the table names no folders of the machine it ran on)."""
    return Path(argument).name if "/" in argument else argument


def _render_growth(run: dict) -> list[str]:
    """Compression time against model size: every case's data-aware, latency-gated compression."""
    entries = []
    for record in run["rows"]:
        for row in record["rows"]:
            if record["kind"] == "scale":
                entries.append((record["model"], row["params_before"],
                                f"target-params 0.5, {row.get('objective') or 'balanced'}", row["seconds"]))
            elif row.get("met") and row.get("seconds") is not None and (
                    row["row"] == "data-aware + latency gate" or row["row"] == "every op, balanced"):
                params = record["rows"][0]["params"]
                mode = "target-params 0.5, balanced" if record["kind"] == "half" \
                    else f"compact {record['metric']} {record['tolerance']:g}, balanced"
                entries.append((record["model"], params, mode, row["seconds"]))
    if len(entries) < 2:
        return []
    lines = ["### Compression time by model size", "",
             ("Data-aware, objective balanced (the default), end to end (the tool's own latency and fusion checks "
             "included), from the rows above."), "",
             "| model | params | settings | time | per million params |", "|---|---|---|---|---|"]
    for model, params, mode, seconds in sorted(entries, key=lambda e: e[1]):
        lines.append(f"| {model} | {params:,} | {mode} | {seconds:.0f} s | {seconds / params * 1e6:.2f} s |")
    return lines + [""]


_RENDERERS = {"objectives": _render_objectives, "half": _render_half, "int8": _render_int8, "scale": _render_scale}


def render_latency(run: dict) -> list[str]:
    lines = [
        "Per case, every model is timed in one `time_side_by_side` call (interleaved rounds, all ONNX Runtime",
        "optimizations on) on one feed: the first samples of the evaluation set. *speedup*: original median /",
        "row median. *compression*: wall time of `compress`, its own checks included. *file*: serialized",
        "size. *factorizable kept*: of the factorizable parameters (for the weight-only row, the budget the",
        "data-aware row reached). *fusions kept*: ONNX Runtime fuses the unfactorized part of the graph as in",
        "the original (`report.fusions`). Rows: weight-only = `no_data`, objective size; data-aware =",
        "objective size; + latency gate = objective balanced; + int8 = balanced with `quantize=\"int8\"`.",
        "",
    ]
    for record in run["rows"]:
        lines += _RENDERERS[record["kind"]](record, run)
    return lines + _render_growth(run)
