"""The quantized suite (`python tools/bench.py quantized [--models minilm_l2,minilm,smollm2]`): onnx-lowrank's
`--quantize int4` (4-bit and 8-bit blocks, 4-bit with a low-rank correction, chosen per layer beside the
factorizations) against ONNX Runtime's own weight-only quantizer
(`matmul_nbits_quantizer`: RTN at block 32 and 128, HQQ, 8 bits) and NNCF's ONNX weight compression (int4
symmetric, group 64, AWQ and scale estimation on the same calibration data; embeddings and the last
MatMul 8-bit, its default), every way in the same run, each judged on the evaluation set the tool never
saw. *file*: the written model's bytes over the original's; ours run on the command line in a child
process (time and peak memory of the whole run), the peers in this process (time only).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

import bench_scale  # its child-process runner (seconds and the child's peak memory)
import numpy as np
import onnx
from bench_common import Case, data_for

QUANTIZED_CASES = {  # model, metric, batch size (None: the tool's), compact tolerances, --target-bytes fractions
    "minilm_l2": ("minilm_l2", "cosine", 32, (0.01, 0.005), (0.15, 0.2, 0.3)),
    "minilm": ("minilm", "cosine", 32, (0.01,), (0.15,)),  # all-MiniLM-L6-v2; the target: 15% at 0.01
    "smollm2": ("smollm2", "perplexity", None, (0.05,), (0.2,)),  # SmolLM2-135M; target: 20% at x1.05
}


def ours(paths: dict, metric: str, batch: int | None, folder: Path, name: str, *options: str) -> tuple:
    """`onnx-lowrank compress` as a user runs it, objective size, in a child process."""
    output, report = folder / f"{name}.onnx", folder / f"{name}.json"
    argv = ["compress", str(paths["model"]), "--calib", str(paths["calib"]), "--metric", metric,
            "--objective", "size", *options, "-o", str(output), "--report", str(report), "--quiet"]
    if batch:
        argv += ["--batch-size", str(batch)]
    measured = bench_scale.run(argv, log=folder / f"{name}.log", accepted=(0, 1))
    found = json.loads(report.read_text())
    validation = found.get("validation") or {}
    extra = {"held_out": validation.get("value"), "bound": validation.get("unseen_bound"),
             "seconds": measured["seconds"], "peak_gib": measured["peak_rss_gib"]}
    if measured["exit"] != 0:
        raise RuntimeError(f"bound not met (held-out {validation.get('value')})")
    return onnx.load(str(output)), extra


def onnxruntime_weight_only(original: onnx.ModelProto, config) -> onnx.ModelProto:
    """ONNX Runtime's MatMulNBits quantizer as a user calls it (it leaves Gather tables float)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    copy = onnx.ModelProto()
    copy.CopyFrom(original)
    quantizer = MatMulNBitsQuantizer(copy, algo_config=config)
    quantizer.process()
    return quantizer.model.model


def nncf_int4(original: onnx.ModelProto, calibration: Path | None) -> onnx.ModelProto:
    """NNCF's ONNX weight compression (int4 symmetric, group 64), with its data-aware methods (AWQ, scale
    estimation) fed the calibration samples one by one, or data-free without `calibration`."""
    import nncf

    copy = onnx.ModelProto()
    copy.CopyFrom(original)
    if calibration is None:
        return nncf.compress_weights(copy, mode=nncf.CompressWeightsMode.INT4_SYM, group_size=64)
    stored = np.load(calibration)
    names = [value.name for value in original.graph.input]
    count = len(stored[names[0]])
    samples = [{name: stored[name][i : i + 1] for name in names} for i in range(count)]
    return nncf.compress_weights(copy, mode=nncf.CompressWeightsMode.INT4_SYM, group_size=64,
                                 dataset=nncf.Dataset(samples), awq=True, scale_estimation=True)


def peers() -> dict:
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    return {
        "onnxruntime int4 RTN, block 32": lambda: nbits.DefaultWeightOnlyQuantConfig(block_size=32),
        "onnxruntime int4 RTN, block 128": lambda: nbits.DefaultWeightOnlyQuantConfig(block_size=128),
        "onnxruntime int4 HQQ, block 128": lambda: nbits.HQQWeightOnlyQuantConfig(block_size=128),
        "onnxruntime 8-bit weight-only, block 128": lambda: nbits.DefaultWeightOnlyQuantConfig(block_size=128, bits=8),
    }


def quantized(name: str, provider: str, eval_error) -> list[dict]:
    """Every way on one case; `eval_error(original, model, paths, case, provider)` judges the written models."""
    model_name, metric, batch, tolerances, sizes = QUANTIZED_CASES[name]
    paths = data_for(model_name)
    original = onnx.load(paths["model"])
    case = Case(model_name, metric, (), batch or 16)
    before = Path(paths["model"]).stat().st_size
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-quantized-") as scratch:
        folder = Path(scratch)
        ways = {**{f"onnx-lowrank int4, compact {t:g}": lambda t=t: ours(
                       paths, metric, batch, folder, f"compact-{t:g}", "--quantize", "int4", "--tolerance", str(t))
                   for t in tolerances},
                **{f"onnx-lowrank int4, --target-bytes {f:g}": lambda f=f: ours(
                       paths, metric, batch, folder, f"bytes-{f:g}", "--quantize", "int4", "--target-bytes", str(f))
                   for f in sizes}}
        if model_name == "minilm_l2":
            ways[f"onnx-lowrank int8, compact {tolerances[0]:g}"] = lambda: ours(
                paths, metric, batch, folder, "int8", "--quantize", "int8", "--tolerance", str(tolerances[0]))
        ways.update({way: lambda config=config: (onnxruntime_weight_only(original, config()), {})
                     for way, config in peers().items()})
        ways["NNCF int4 sym, group 64, AWQ + scale estimation"] = lambda: (nncf_int4(original, paths["calib"]), {})
        ways["NNCF int4 sym, group 64, data-free"] = lambda: (nncf_int4(original, None), {})
        for way, make in ways.items():
            started = time.perf_counter()
            try:
                model, extra = make()
            except Exception as error:  # noqa: BLE001 - a way that cannot run here is a row saying so
                row = {"model": model_name, "metric": metric, "way": way, "failed": str(error).splitlines()[0][:200]}
            else:
                seconds = time.perf_counter() - started
                row = {"model": model_name, "metric": metric, "way": way, "seconds": seconds, **extra,
                       "file": len(model.SerializeToString()) / before}
                try:
                    row["eval"] = eval_error(original, model, paths, case, provider)
                except Exception as error:  # noqa: BLE001 - a written model ONNX Runtime refuses
                    row["failed"] = "ONNX Runtime cannot run it: " + str(error).splitlines()[0][:160]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def render_quantized(run: dict) -> list[str]:
    lines = [__doc__.split("\n\n")[0].replace("\n", " "), "",
             "*held-out* and *bound*: the tool's validated error on its held-out calibration samples and its 95% "
             "bound for new inputs; *eval*: the metric on the evaluation set (perplexity: the ratio less 1).", "",
             "| model | metric | way | file | held-out | bound | eval | time | peak memory |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in run["rows"]:
        if "failed" in row and "file" not in row:
            lines.append(f"| {row['model']} | {row['metric']} | {row['way']} | failed: {row['failed']} | | | | | |")
            continue
        held, bound = (("-" if row.get(key) is None else f"{row[key]:.4g}") for key in ("held_out", "bound"))
        evaluated = f"{row['eval']:.4g}" if "eval" in row else row.get("failed", "-")
        peak = f"{row['peak_gib']:.1f} GiB" if row.get("peak_gib") else "-"
        lines.append(f"| {row['model']} | {row['metric']} | {row['way']} | {row['file']:.1%} | {held} | {bound} | "
                     f"{evaluated} | {row['seconds']:.0f} s | {peak} |")
    return lines
