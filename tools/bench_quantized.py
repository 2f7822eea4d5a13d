"""The quantized suite (`python tools/bench.py quantized [--models minilm_l2,minilm,smollm2] [--ways ...]`):
onnx-lowrank's `--quantize int4` (4-bit and 8-bit blocks, 4-bit with a low-rank correction in float16 or 8
bits, SVDs with 4-bit factors, chosen per layer beside the factorizations) against ONNX Runtime's own weight-only quantizer (`matmul_nbits_quantizer`: RTN
at block 32 and 128, HQQ, GPTQ at block 32 on the calibration data, 8 bits) and NNCF's ONNX weight
compression (int4 symmetric, group 64, AWQ and scale estimation on the same calibration data, or data-free;
embeddings and the last MatMul 8-bit, its default), every way in the same run, each judged on the
evaluation set the tool never saw. *file*: the written model's bytes over the original's; ours run on the
command line in a child process (time and peak memory of the whole run), the peers in this process (time
only). NNCF cannot read a MatMul weight that reaches it through a Transpose (SmolLM2's head reads the
embedding table so, tied): it is given the model with that head reading its own transposed float copy
("head untied"), as its user would do, and the copy's bytes count in its file.

`--ways` (comma-separated) runs some ways only: `ours` (the onnx-lowrank rows), `peers` (the others), or
any part of a way's name (`nncf`, `gptq`, `block 32`); the other ways' rows of the models run stay as they
were in benchmarks/quantized_<provider>.json.
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
    "smollm2": ("smollm2", "perplexity", None, (0.05,), (0.2, 0.43)),  # SmolLM2-135M; target: 20% at x1.05
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


def onnxruntime_weight_only(original: onnx.ModelProto, config, **options) -> onnx.ModelProto:
    """ONNX Runtime's MatMulNBits quantizer as a user calls it (it leaves Gather tables float); `options`: the
    quantizer's own (GPTQ takes the block size from them, not from its config)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    copy = onnx.ModelProto()
    copy.CopyFrom(original)
    quantizer = MatMulNBitsQuantizer(copy, algo_config=config, **options)
    quantizer.process()
    return quantizer.model.model


def samples(original: onnx.ModelProto, calibration: Path) -> list[dict]:
    """The calibration samples one by one, as the peers with a data-aware method are fed them."""
    stored = np.load(calibration)
    names = [value.name for value in original.graph.input]
    return [{name: stored[name][i : i + 1] for name in names} for i in range(len(stored[names[0]]))]


def onnxruntime_gptq(original: onnx.ModelProto, calibration: Path) -> onnx.ModelProto:
    """ONNX Runtime's GPTQ (int4, block 32, asymmetric: the RTN block-32 row's format) fed the calibration
    samples one by one. ONNX Runtime ships the Intel Neural Compressor code it runs
    (`onnxruntime.quantization.neural_compressor`, which imports torch), and that code packs the zero points
    of a weight whose rows make an odd number of blocks wrongly (a reshape error: MiniLM's 384 rows and
    SmolLM2's 576 at block 128), hence block 32 (both even). Its GPTQ update reads the upper Cholesky factor
    of the inverse Hessian by column (`np.linalg.cholesky(...).T`, then `Hinv1[i:, i]`), which is zero below
    the diagonal: no error is carried to the rows not yet quantized, and the weights come out exactly as
    round-to-nearest's (checked on MiniLM-L6's MatMuls); the calibration passes (the whole model once per
    weight input and sample) are its whole cost."""
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    class Reader(CalibrationDataReader):  # the quantizer reads a deep copy of it
        def __init__(self, fed: list[dict]):
            self.fed, self.at = fed, 0

        def get_next(self) -> dict | None:
            self.at += 1
            return self.fed[self.at - 1] if self.at <= len(self.fed) else None

    config = nbits.GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader(samples(original, calibration)))
    return onnxruntime_weight_only(original, config, block_size=32)


def transposed_weights(original: onnx.ModelProto) -> list[onnx.NodeProto]:
    """MatMul / Gemm nodes reading a weight through a Transpose of an initializer (a head tied to the embedding
    table): NNCF's graph counts such a weight, but its compression reads the Transpose's output as an
    initializer and fails ("There is no tensor with the name ...")."""
    initializers = {tensor.name for tensor in original.graph.initializer}
    producers = {output: node for node in original.graph.node for output in node.output}
    return [node for node in original.graph.node if node.op_type in ("MatMul", "Gemm") and any(
        producers.get(name) is not None and producers[name].op_type == "Transpose"
        and producers[name].input[0] in initializers for name in node.input[:2])]


def untied(original: onnx.ModelProto) -> onnx.ModelProto:
    """A copy where every weight read through a Transpose of an initializer is its own initializer holding the
    transposed values (a float copy of a tied table), the Transposes left unread removed."""
    from onnx import numpy_helper

    copy = onnx.ModelProto()
    copy.CopyFrom(original)
    graph = copy.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    made: dict[str, str] = {}
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        for port, name in enumerate(node.input[:2]):
            transpose = producers.get(name)
            if transpose is None or transpose.op_type != "Transpose" or transpose.input[0] not in initializers:
                continue
            if name not in made:
                perm = next((list(attribute.ints) for attribute in transpose.attribute if attribute.name == "perm"),
                            None)
                table = numpy_helper.to_array(initializers[transpose.input[0]])
                made[name] = f"{name}_untied"
                graph.initializer.append(numpy_helper.from_array(
                    np.ascontiguousarray(np.transpose(table, perm)), made[name]))
            node.input[port] = made[name]
    read = {name for node in graph.node for name in node.input} | {value.name for value in graph.output}
    kept = [node for node in graph.node if node.op_type != "Transpose" or any(name in read for name in node.output)]
    del graph.node[:]
    graph.node.extend(kept)
    return copy


def nncf_int4(original: onnx.ModelProto, calibration: Path | None) -> onnx.ModelProto:
    """NNCF's ONNX weight compression (int4 symmetric, group 64), with its data-aware methods (AWQ, scale
    estimation) fed the calibration samples one by one, or data-free without `calibration`; on `untied`
    (a copy of the original where there is nothing to untie)."""
    import nncf

    copy = untied(original)
    if calibration is None:
        return nncf.compress_weights(copy, mode=nncf.CompressWeightsMode.INT4_SYM, group_size=64)
    return nncf.compress_weights(copy, mode=nncf.CompressWeightsMode.INT4_SYM, group_size=64,
                                 dataset=nncf.Dataset(samples(original, calibration)), awq=True, scale_estimation=True)


def selected(way: str, ways: str | None) -> bool:
    """Whether `--ways` (comma-separated: ours, peers, or a part of the way's name, any case) runs `way`."""
    if not ways:
        return True
    ours_way = way.startswith("onnx-lowrank")
    return any((wanted == "ours" and ours_way) or (wanted == "peers" and not ours_way) or wanted in way.lower()
               for wanted in (part.strip().lower() for part in ways.split(",")) if wanted)


GPTQ = "onnxruntime int4 GPTQ, block 32 (no-op update: RTN's weights)"
GPTQ_NOT_RUN = {  # cases where the GPTQ row says why instead of running (measured once; see onnxruntime_gptq)
    "smollm2": "not run: it runs the whole model once per weight input and sample (120 x 64 runs of 0.31 s here, "
               "about 40 min) and its update is a no-op (it writes RTN block 32's weights)",
}


def _not_run(reason: str):
    raise RuntimeError(reason)


def peers() -> dict:
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    return {
        "onnxruntime int4 RTN, block 32": lambda: nbits.DefaultWeightOnlyQuantConfig(block_size=32),
        "onnxruntime int4 RTN, block 128": lambda: nbits.DefaultWeightOnlyQuantConfig(block_size=128),
        "onnxruntime int4 HQQ, block 128": lambda: nbits.HQQWeightOnlyQuantConfig(block_size=128),
        "onnxruntime 8-bit weight-only, block 128": lambda: nbits.DefaultWeightOnlyQuantConfig(block_size=128, bits=8),
    }


def quantized(name: str, provider: str, eval_error, ways: str | None = None) -> list[dict]:
    """Every way on one case (those `ways` selects, see `selected`); `eval_error(original, model, paths, case,
    provider)` judges the written models."""
    model_name, metric, batch, tolerances, sizes = QUANTIZED_CASES[name]
    paths = data_for(model_name)
    original = onnx.load(paths["model"])
    case = Case(model_name, metric, (), batch or 16)
    before = Path(paths["model"]).stat().st_size
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-quantized-") as scratch:
        folder = Path(scratch)
        run = {**{f"onnx-lowrank int4, compact {t:g}": lambda t=t: ours(
                      paths, metric, batch, folder, f"compact-{t:g}", "--quantize", "int4", "--tolerance", str(t))
                  for t in tolerances},
               **{f"onnx-lowrank int4, --target-bytes {f:g}": lambda f=f: ours(
                      paths, metric, batch, folder, f"bytes-{f:g}", "--quantize", "int4", "--target-bytes", str(f))
                  for f in sizes}}
        if model_name == "minilm_l2":
            run[f"onnx-lowrank int8, compact {tolerances[0]:g}"] = lambda: ours(
                paths, metric, batch, folder, "int8", "--quantize", "int8", "--tolerance", str(tolerances[0]))
        run.update({way: lambda config=config: (onnxruntime_weight_only(original, config()), {})
                    for way, config in peers().items()})
        run[GPTQ] = lambda: (onnxruntime_gptq(original, paths["calib"]), {})
        if model_name in GPTQ_NOT_RUN:
            run[GPTQ] = lambda: _not_run(GPTQ_NOT_RUN[model_name])
        untie = ", head untied (its own float copy of the table)" if transposed_weights(original) else ""
        run[f"NNCF int4 sym, group 64, AWQ + scale estimation{untie}"] = lambda: (
            nncf_int4(original, paths["calib"]), {})
        run[f"NNCF int4 sym, group 64, data-free{untie}"] = lambda: (nncf_int4(original, None), {})
        chosen = {way: make for way, make in run.items() if selected(way, ways)}
        if not chosen:
            raise SystemExit(f"--ways {ways!r} selects no way of {model_name}: {'; '.join(run)}")
        for way, make in chosen.items():
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
