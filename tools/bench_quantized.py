"""The quantized suite (`python tools/bench.py quantized`): onnx-lowrank's `--quantize int4` (4-bit blocks
with a low-rank correction, chosen per layer beside the factorizations) and `--quantize int8` against ONNX
Runtime's own weight-only quantizer (`matmul_nbits_quantizer`: RTN at block 32 and 128, HQQ, 8 bits), every
way in the same run, each judged on the evaluation set the tool never saw. *file*: the written model's
bytes over the original's. NNCF is not installed here (its ONNX int4 needs the package): not compared yet.
"""

from __future__ import annotations

import json
import logging
import time

import onnx
from bench_common import Case, data_for

import onnx_lowrank

QUANTIZED_CASES = {  # model, metric, batch size, compact tolerances, --target-bytes fractions
    "minilm_l2": ("minilm_l2", "cosine", 32, (0.01, 0.005), (0.15, 0.2, 0.3)),
}


def ours(original: onnx.ModelProto, paths: dict, metric: str, batch: int, **options) -> tuple[onnx.ModelProto, dict]:
    model, report = onnx_lowrank.compress(original, calibration=paths["calib"], metric=metric, batch_size=batch,
                                          objective="size", **options)
    return model, {"held_out": report.validation.value if report.validation else None}


def onnxruntime_weight_only(original: onnx.ModelProto, config) -> onnx.ModelProto:
    """ONNX Runtime's MatMulNBits quantizer as a user calls it (it leaves Gather tables float)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    copy = onnx.ModelProto()
    copy.CopyFrom(original)
    quantizer = MatMulNBitsQuantizer(copy, algo_config=config)
    quantizer.process()
    return quantizer.model.model


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
    case = Case(model_name, metric, (), batch)
    before = len(original.SerializeToString())
    ways = {**{f"onnx-lowrank int4, compact {t:g}": lambda t=t: ours(original, paths, metric, batch, quantize="int4",
                                                                      tolerance=t) for t in tolerances},
            **{f"onnx-lowrank int4, --target-bytes {s:g}": lambda s=s: ours(original, paths, metric, batch,
                                                                           quantize="int4", target_bytes=s)
               for s in sizes},
            f"onnx-lowrank int8, compact {tolerances[0]:g}": lambda: ours(original, paths, metric, batch,
                                                                        quantize="int8", tolerance=tolerances[0])}
    ways.update({way: lambda config=config: (onnxruntime_weight_only(original, config()), {"held_out": None})
                 for way, config in peers().items()})
    rows = []
    for way, make in ways.items():
        started = time.perf_counter()
        try:
            model, extra = make()
        except Exception as error:  # noqa: BLE001 - a peer that cannot run here is a row saying so
            row = {"model": model_name, "metric": metric, "way": way, "failed": str(error).splitlines()[0][:200]}
        else:
            row = {"model": model_name, "metric": metric, "way": way, **extra,
                   "file": len(model.SerializeToString()) / before,
                   "eval": eval_error(original, model, paths, case, provider), "seconds": time.perf_counter() - started}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def render_quantized(run: dict) -> list[str]:
    lines = [__doc__.split("\n\n")[0].replace("\n", " "), "",
             "| model | metric | way | file | held-out | eval | time |", "|---|---|---|---|---|---|---|"]
    for row in run["rows"]:
        if "failed" in row:
            lines.append(f"| {row['model']} | {row['metric']} | {row['way']} | failed: {row['failed']} | | | |")
            continue
        held = "-" if row.get("held_out") is None else f"{row['held_out']:.4g}"
        lines.append(f"| {row['model']} | {row['metric']} | {row['way']} | {row['file']:.1%} | {held} | "
                     f"{row['eval']:.4g} | {row['seconds']:.0f} s |")
    return lines
