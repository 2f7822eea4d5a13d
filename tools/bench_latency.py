"""The `latency` suite of tools/bench.py: size, error, compression time and end-to-end latency, together.

Run through bench.py (`python tools/bench.py latency [--models digits,...] [--provider cpu|cuda]`); the
cases are LATENCY_CASES:

- objectives (digits, ppocr_det, ppocr_rec, minilm): compact mode at the metric's default tolerance
  (digits: accuracy 0). Rows: the original; weight-only SVD (`no_data`, objective size) at the
  factorizable budget the data-aware size-objective run reached; data-aware (objective size);
  data-aware + latency gate (objective balanced); + int8 (balanced, quantize int8).
- minilm-half: size mode at half the factorizable parameters, data-aware, objectives size and balanced,
  over every op and over MatMul alone (with the embeddings in, the budget may go to the embedding
  table, which saves parameters but no time). Target: 1.5x on CPU at batch 32.
- minilm-int8: compact cosine 0.02, int8, objectives balanced and size, beside int8 quantization alone.
  Target: at most 22% of the original file at mean cosine >= 0.98 on the evaluation set (a file-size
  target: objective size is the mode that asks for the smallest file; balanced keeps only
  factorizations that are not slower, and at the ranks this tolerance allows most are).
- bert-base: compression time and peak memory of a BERT-base-size model with random weights (12
  layers, hidden 768, FFN 3072, vocabulary 30522, sequence 128) at `--target-params 0.5` on random
  calibration data, compressed by the command line in a child process (peak memory: the child's
  maximum resident set, from wait4's rusage). Target: 4 minutes on 2 cores. Random weights have a flat
  spectrum: the errors mean nothing, the time does.

Every figure of a row comes from one run. All the models of a case are timed in ONE
`latency.time_side_by_side` call (interleaved rounds, every ONNX Runtime optimization on, `threads`
intra-op threads) on one feed, the first `batch` samples of the evaluation set. Errors are measured on
the evaluation set the tool never saw (as bench.eval_error). The timing provider is the validation
provider. The tables in BENCHMARKS.md come from bench_common.render_latency.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import bench_scale  # its child-process runner (seconds and the child's peak memory) and synthetic transformer
import numpy as np
import onnx
import onnxruntime as ort
from bench_common import (  # puts this repository on sys.path (bench_scale imported it first)
    CASES,
    HALF_TARGET_SPEEDUP,
    INT8_TARGET_COSINE,
    INT8_TARGET_FRACTION,
    REPO,
    SCALE_TARGET_SECONDS,
    cpu_model,
    data_for,
)

import onnx_lowrank
from onnx_lowrank.check.evaluator import Evaluator
from onnx_lowrank.check.latency import time_side_by_side
from onnx_lowrank.check.metrics import DEFAULT_TOLERANCE
from onnx_lowrank.errors import BoundNotMet, InputError
from onnx_lowrank.graph.model_io import model_stats
from onnx_lowrank.observe.calibration import load_calibration
from onnx_lowrank.quantize.int8 import quantize_int8

ort.set_default_logger_severity(3)  # no warnings about initializers a session optimizes away


@dataclass(frozen=True)
class LatencyCase:
    kind: str  # objectives | half | int8 | scale
    model: str  # a name data_for knows (scale: the builder's)
    metric: str
    tolerance: float | None = None
    batch: int = 16  # samples per ONNX Runtime run and in the timing feed


LATENCY_CASES = {
    "digits": LatencyCase("objectives", "digits", "accuracy", 0.0, CASES["digits"].batch_size),
    "ppocr_det": LatencyCase("objectives", "ppocr_det", "rel-l2", DEFAULT_TOLERANCE["rel-l2"],
                             CASES["ppocr_det"].batch_size),
    "ppocr_rec": LatencyCase("objectives", "ppocr_rec", "top1", DEFAULT_TOLERANCE["top1"],
                             CASES["ppocr_rec"].batch_size),
    "minilm": LatencyCase("objectives", "minilm", "cosine", DEFAULT_TOLERANCE["cosine"], 32),
    "minilm-half": LatencyCase("half", "minilm", "cosine", None, 32),
    "minilm-int8": LatencyCase("int8", "minilm", "cosine", 0.02, 32),
    # MiniLM's first two layers (models/, the GPU machine has no cache/): the same layer shapes
    "minilm_l2": LatencyCase("objectives", "minilm_l2", "cosine", DEFAULT_TOLERANCE["cosine"], 32),
    "minilm_l2-half": LatencyCase("half", "minilm_l2", "cosine", None, 32),
    "bert-base": LatencyCase("scale", "bert-base", "cosine", None, 16),
}

# bert-base: (layers, hidden, ffn, vocabulary, sequence), calibration samples
BERT_BASE = (12, 768, 3072, 30522, 128)
BERT_SAMPLES = 64


@dataclass(frozen=True)
class Timer:
    """How every case times its models: provider, intra-op threads, at least `runs` rounds and `seconds`."""

    provider: str
    threads: int
    runs: int
    seconds: float


def run(names: list[str], timer: Timer) -> list[dict]:
    """One record per case (printed as it completes)."""
    records = []
    for name in names:
        case = LATENCY_CASES[name]
        started = time.perf_counter()
        record = {"case": name, "kind": case.kind, "model": case.model, "metric": case.metric,
                  "tolerance": case.tolerance, "date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_model(),
                  **_KINDS[case.kind](case, timer)}
        record["case_seconds"] = time.perf_counter() - started
        records.append(record)
        print(json.dumps(record), flush=True)
    return records


def merged(records: list[dict], previous_path: Path, machine: str, ort_version: str) -> tuple[list[dict], str | None]:
    """The new records, plus the previous file's records of the cases not re-run when that file came from
    the same machine and onnxruntime (each record keeps its own date); and a note when some were kept."""
    if not previous_path.exists():
        return records, None
    previous = json.loads(previous_path.read_text())
    if previous.get("machine") != machine or previous.get("onnxruntime") != ort_version:
        return records, None
    done = {record["case"] for record in records}
    kept = [record for record in previous.get("rows", []) if record.get("case") not in done]
    if not kept:
        return records, None
    note = "cases measured in separate runs (each case's date is in its heading)"
    order = list(LATENCY_CASES)
    everything = sorted(kept + records, key=lambda r: order.index(r["case"]) if r["case"] in order else len(order))
    return everything, note


# ------------------------------------------------------------------------------------------- helpers


class EvalSet:
    """The evaluation set: errors as bench.eval_error measures them (the original's outputs computed
    once), and the timing feed (its first `batch` samples)."""

    def __init__(self, original: onnx.ModelProto, paths: dict, case: LatencyCase, provider: str):
        self.samples = load_calibration(paths["eval"], original, paths.get("eval_labels"))
        self.evaluator = Evaluator(original, self.samples, provider, case.batch)
        self.metric = case.metric
        self.batch = case.batch

    def error(self, model: onnx.ModelProto) -> float:
        return self.evaluator.error(model, range(len(self.samples)), self.metric, self.samples.labels)

    def feed(self) -> dict[str, np.ndarray]:
        count = min(self.batch, len(self.samples))
        return next(self.samples.batches(list(range(count)), count))[1]


def _feed_batch(feed: dict[str, np.ndarray]) -> int | None:
    first = next(iter(feed.values()), None)
    return int(np.shape(first)[0]) if first is not None and np.ndim(first) else None


def _compress(original: onnx.ModelProto, common: dict, **settings) -> tuple[onnx.ModelProto | None, dict]:
    """One compression: the model (None when refused or the bound is not met) and the row's figures."""
    shown = {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()}
    started = time.perf_counter()
    try:
        model, report = onnx_lowrank.compress(original, **common, **settings)
    except BoundNotMet as failure:
        validation = failure.report.validation
        return None, {"settings": shown, "met": False, "seconds": time.perf_counter() - started,
                      "closest": None if validation is None else validation.value, "why": str(failure)}
    except InputError as refusal:  # e.g. a budget below what the allowed ranks can reach
        return None, {"settings": shown, "met": False, "seconds": time.perf_counter() - started,
                      "unreachable": str(refusal)}
    seconds = time.perf_counter() - started
    removed = sum(layer.params_before - layer.params_after for layer in report.layers)
    total = report.factorizable_params
    embedding = [layer for layer in report.layers if layer.op == "Gather"]
    fusions = report.fusions.to_dict() if report.fusions is not None else {}
    row = {
        "settings": shown, "met": True, "seconds": seconds, "phases": report.phases,
        "params": report.params_after, "file_bytes": model_stats(model).bytes,
        "factorizable_params": total, "factorizable_kept": (total - removed) / total if total else 1.0,
        "layers": len(report.layers),
        "embedding_params": [sum(l.params_before for l in embedding), sum(l.params_after for l in embedding)],
        "held_out": None if report.validation is None else report.validation.value,
        "validation_provider": None if report.validation is None else report.validation.provider,
        "fusions_match": fusions.get("unfactorized_match"),
        "fusions_lost": [entry["kind"] for entry in fusions.get("lost", []) if entry["layer"] is None],
        "fusions_error": fusions.get("error"),
        # the tool's own end-to-end check (its default threads, its feed)
        "tool_latency": None if report.latency is None else report.latency.to_dict(),
        "quantization": None if report.quantization is None else
        {k: v for k, v in report.quantization.to_dict().items() if k != "nodes"},
        "notes": report.notes,
    }
    return model, row


def _original_row(original: onnx.ModelProto, paths: dict) -> dict:
    stats = model_stats(original)
    return {"row": "original", "met": True, "params": stats.params, "file_bytes": stats.bytes,
            "disk_bytes": Path(paths["model"]).stat().st_size, "eval": 0.0, "seconds": None}


def _time(rows: list[dict], models: list[onnx.ModelProto | None], feed: dict, timer: Timer) -> dict:
    """Time every row that has a model in one side-by-side call; fills each row's latency and speedup
    (rows[0] is the original) and returns the case's timing facts."""
    timed = [(row, model) for row, model in zip(rows, models) if model is not None]
    facts = {"provider": timer.provider, "batch": _feed_batch(feed), "threads": timer.threads,
             "min_runs": timer.runs, "min_seconds": timer.seconds}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        started = time.perf_counter()
        try:
            timings = time_side_by_side([model for _, model in timed], feed, timer.provider, threads=timer.threads,
                                        min_runs=timer.runs, min_seconds=timer.seconds)
        except Exception as error:  # noqa: BLE001 - onnxruntime's own exception types
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            return {**facts, "error": f"timing failed: {first_line}"}
    facts["timing_seconds"] = time.perf_counter() - started
    facts["timing_provider"] = "cpu" if any("CUDA execution provider failed" in str(w.message) for w in caught) \
        else timer.provider
    facts["runs"] = timings[0].runs
    base = timings[0].median_ms
    for (row, _), timing in zip(timed, timings):
        row["latency"] = timing.to_dict()
        row["speedup"] = base / timing.median_ms
    return facts


def _common(paths: dict, case: LatencyCase, provider: str) -> dict:
    return dict(calibration=paths["calib"], labels=paths.get("calib_labels"), metric=case.metric,
                provider=provider, batch_size=case.batch)


# ------------------------------------------------------------------------------------------- the cases


def objectives(case: LatencyCase, timer: Timer) -> dict:
    """Item 1: original, weight-only, data-aware (size), + latency gate (balanced), + int8."""
    paths = data_for(case.model)
    original = onnx.load(paths["model"])
    common = _common(paths, case, timer.provider)
    compact = dict(tolerance=case.tolerance)
    size_model, size_row = _compress(original, common, objective="size", **compact)
    fraction = size_row.get("factorizable_kept")
    if fraction is not None and fraction < 1:
        plain_model, plain_row = _compress(original, common, no_data=True, objective="size", target_params=fraction)
    else:
        plain_model, plain_row = None, {"met": False, "skipped": "the data-aware size run kept every parameter"
                                        if fraction is not None else "the data-aware size run did not meet the bound"}
    gate_model, gate_row = _compress(original, common, objective="balanced", **compact)
    int8_model, int8_row = _compress(original, common, objective="balanced", quantize="int8", **compact)
    rows = [_original_row(original, paths), {"row": "weight-only SVD", **plain_row},
            {"row": "data-aware", **size_row}, {"row": "data-aware + latency gate", **gate_row},
            {"row": "+ int8", **int8_row}]
    models = [original, plain_model, size_model, gate_model, int8_model]
    return _measure(original, paths, case, timer, rows, models)


def _measure(original, paths, case: LatencyCase, timer: Timer, rows: list[dict], models: list) -> dict:
    evaluation = EvalSet(original, paths, case, timer.provider)
    for row, model in zip(rows[1:], models[1:]):
        if model is not None:
            row["eval"] = evaluation.error(model)
    timing = _time(rows, models, evaluation.feed(), timer)
    return {"timing": timing, "eval_samples": len(evaluation.samples), "rows": rows}


def half(case: LatencyCase, timer: Timer) -> dict:
    """Item 2: size mode at half the factorizable parameters, objectives size and balanced, every op and
    MatMul alone."""
    paths = data_for(case.model)
    original = onnx.load(paths["model"])
    common = _common(paths, case, timer.provider)
    rows, models = [_original_row(original, paths)], [original]
    for ops, label in ((None, "every op"), (("MatMul",), "MatMul only")):
        for objective in ("size", "balanced"):
            extra = {} if ops is None else {"ops": ops}
            model, row = _compress(original, common, target_params=0.5, objective=objective, **extra)
            rows.append({"row": f"{label}, {objective}", "ops": label, "objective": objective, **row})
            models.append(model)
    return {**_measure(original, paths, case, timer, rows, models), "target_speedup": HALF_TARGET_SPEEDUP}


def int8(case: LatencyCase, timer: Timer) -> dict:
    """Item 3: compact cosine 0.02, int8, objectives balanced and size; beside int8 quantization alone."""
    paths = data_for(case.model)
    original = onnx.load(paths["model"])
    calibration = load_calibration(paths["calib"], original)
    started = time.perf_counter()
    feeds = [feed for _, feed in calibration.batches(list(range(len(calibration))), case.batch)]
    alone = quantize_int8(original, feeds)
    alone_row = {"row": "int8 alone", "met": True, "seconds": time.perf_counter() - started,
                 "params": model_stats(alone.model).params, "file_bytes": model_stats(alone.model).bytes}
    common = _common(paths, case, timer.provider)
    rows, models = [_original_row(original, paths), alone_row], [original, alone.model]
    for objective in ("balanced", "size"):
        model, row = _compress(original, common, tolerance=case.tolerance, objective=objective, quantize="int8")
        rows.append({"row": f"factorized + int8, {objective}", **row})
        models.append(model)
    result = _measure(original, paths, case, timer, rows, models)
    return {**result, "target_fraction": INT8_TARGET_FRACTION, "target_cosine": INT8_TARGET_COSINE}


def scale(case: LatencyCase, timer: Timer, dims: tuple[int, int, int, int, int] = BERT_BASE,
          samples: int = BERT_SAMPLES) -> dict:
    """Item 4: a BERT-base-size random-weight model, compressed end to end by the command line in a child
    process at --target-params 0.5 (defaults otherwise: data-aware, objective balanced)."""
    layers, hidden, ffn, vocab, seq = dims
    folder = REPO / "cache" / "scale"
    stem = f"bert_{layers}x{hidden}x{ffn}_v{vocab}_s{seq}"
    model_path, calib = folder / f"{stem}.onnx", folder / f"{stem}_calib{samples}.npz"
    builder = _build_bert(model_path, calib, dims, samples)
    out, report_path = folder / f"{stem}_compressed.onnx", folder / f"{stem}_report.json"
    argv = ["compress", str(model_path), "-o", str(out), "--calib", str(calib), "--metric", case.metric,
            "--target-params", "0.5", "--provider", timer.provider, "--batch-size", str(case.batch),
            "--quiet", "--report", str(report_path)]
    measured = bench_scale.run(argv)
    report = json.loads(report_path.read_text())
    shape = dict(zip(("layers", "hidden", "ffn", "vocab", "seq"), dims))
    if builder.startswith("bench_scale"):  # no embedding, FFN 4 x hidden
        shape.update(vocab=None, ffn=4 * hidden)
    row = {"row": "target-params 0.5", "argv": argv[1:], "builder": builder, "dims": shape,
           "calibration_samples": samples,
        "params_before": report["params_before"], "params_after": report["params_after"],
        "file_bytes": model_path.stat().st_size + sum(p.stat().st_size for p in folder.glob(model_path.name + ".data")),
        "file_bytes_after": out.stat().st_size + sum(p.stat().st_size for p in folder.glob(out.name + ".data")),
        "phases": report.get("phases", {}), "tool_latency": report.get("latency"),
        "objective": report.get("objective"), **measured}
    for path in (out, report_path, *folder.glob(out.name + ".data")):
        path.unlink(missing_ok=True)
    return {"rows": [row], "target_seconds": SCALE_TARGET_SECONDS}


def _build_bert(path: Path, calib: Path, dims: tuple[int, int, int, int, int], samples: int) -> str:
    """Build (once) a BERT encoder with random weights, exported as the MiniLM models are (transformers'
    BertModel, mean pooling; tools/build_models.py), and random token ids for calibration. Without
    torch / transformers, bench_scale's synthetic transformer at the same layers and widths stands in
    (no attention, no embedding: its input is the hidden states). Returns which builder made it."""
    layers, hidden, ffn, vocab, seq = dims
    marker = path.with_suffix(".builder")
    if path.exists() and calib.exists() and marker.exists():
        return marker.read_text()
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    try:
        import build_models
        import torch
        from transformers import BertConfig, BertModel
    except ImportError:
        bench_scale.build(path, layers, hidden)
        np.savez(calib, x=rng.standard_normal((samples * seq, hidden), dtype=np.float32))
        builder = f"bench_scale synthetic transformer ({layers} blocks, width {hidden}, FFN {4 * hidden}; " \
                  f"{samples} x {seq} random token vectors)"
    else:
        torch.manual_seed(0)
        config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=max(hidden // 64, 1), intermediate_size=ffn,
                            max_position_embeddings=max(512, seq), attn_implementation="eager")
        model = build_models.SentenceEncoder(BertModel(config, add_pooling_layer=False)).eval()
        ids = rng.integers(len(build_models.SPECIAL_TOKENS), vocab, (samples, seq), dtype=np.int64)
        mask = np.ones((samples, seq), dtype=np.int64)
        with torch.no_grad():
            build_models.export_onnx(model, (torch.from_numpy(ids[:2]), torch.from_numpy(mask[:2])), str(path))
        np.savez(calib, input_ids=ids, attention_mask=mask)
        builder = f"transformers BertModel, random init, mean pooling ({samples} x {seq} random token ids)"
    marker.write_text(builder)
    return builder


_KINDS = {"objectives": objectives, "half": half, "int8": int8, "scale": scale}
