"""Scale benchmark: a synthetic transformer whose external-data file exceeds 2 GB, compressed end to end.

Not a test. Builds (once, into cache/scale/) a stack of random-weight transformer blocks (four d x d
projections and a d -> 4d -> d feed-forward per block, residual adds) saved with external data, then runs
`onnx-lowrank compress --target-params 0.5` on it in a child process three ways: `--jobs 1`, `--jobs 2`
and on a two-worker Dask LocalCluster. Records time, the child's peak resident memory
(resource.getrusage), and the output's size; writes benchmarks/scale_cpu.json and BENCHMARKS.md.
The memory bound (issue 6: at most 3x the largest layer's working set plus one copy of the model) is
measured too: the largest weight read and decomposed alone, as compress does, in a child process (its
peak less the peak of a child that only imports the same modules).

    python tools/bench_scale.py [--blocks 11] [--width 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from bench_common import REPO, RESULTS, machine, render_all
from onnx import TensorProto, helper, numpy_helper


def build(path: Path, blocks: int, width: int) -> None:
    """The model at `path` (+ .data), tokens x [N, width] -> y."""
    rng = np.random.default_rng(0)
    nodes, weights = [], []
    current = "x"
    for block in range(blocks):
        def matmul(name: str, source: str, rows: int, cols: int) -> str:
            weight = (rng.standard_normal((rows, cols), dtype=np.float32) / np.sqrt(rows)).astype(np.float32)
            weights.append(numpy_helper.from_array(weight, f"b{block}.{name}.w"))
            nodes.append(helper.make_node("MatMul", [source, f"b{block}.{name}.w"], [f"b{block}.{name}"],
                                          name=f"b{block}.{name}"))
            return f"b{block}.{name}"

        q = matmul("q", current, width, width)
        k = matmul("k", current, width, width)
        v = matmul("v", current, width, width)
        nodes.append(helper.make_node("Sum", [q, k, v], [f"b{block}.qkv"], name=f"b{block}.mix"))
        attended = matmul("o", f"b{block}.qkv", width, width)
        nodes.append(helper.make_node("Add", [current, attended], [f"b{block}.res1"], name=f"b{block}.add1"))
        up = matmul("up", f"b{block}.res1", width, 4 * width)
        nodes.append(helper.make_node("Relu", [up], [f"b{block}.act"], name=f"b{block}.relu"))
        down = matmul("down", f"b{block}.act", 4 * width, width)
        nodes.append(helper.make_node("Add", [f"b{block}.res1", down], [f"b{block}.out"], name=f"b{block}.add2"))
        current = f"b{block}.out"
    nodes.append(helper.make_node("Identity", [current], ["y"], name="output"))
    graph = helper.make_graph(nodes, "synthetic", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data")


def run(argv: list[str], log: Path | None = None, accepted: tuple[int, ...] = (0,)) -> dict:
    """One compression in a child process: exit code, seconds and the child's own peak resident memory
    (wait4: the largest of it and its reaped worker processes, not their sum; Dask workers are not its
    children). `log`: where its output goes (else its stderr is kept only to report a failure); an exit
    code not `accepted` stops the benchmark."""
    started = time.perf_counter()
    with (open(log, "w+b") if log else tempfile.TemporaryFile()) as errors:
        child = subprocess.Popen([sys.executable, "-m", "onnx_lowrank", *argv], cwd=REPO,
                                 stdout=errors if log else subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(child.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - started
        if code not in accepted:
            errors.seek(0)
            raise SystemExit(f"compress failed ({code}): {errors.read().decode().strip()[-2000:]}")
    return {"exit": code, "seconds": seconds, "peak_rss_gib": usage.ru_maxrss / 2**20}


LAYER_SCRIPT = """
import pathlib, sys
import onnx, numpy as np
from onnx import numpy_helper
from onnx_lowrank.factorize.svd import PARTIAL_MIN_SIDE, TruncatedSVD

def status(key):  # kB, from this process's own memory map (rusage would count its parent's, from before exec)
    line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
    return int(line.split()[1])

path = pathlib.Path(sys.argv[1])
model = onnx.load(str(path), load_external_data=False)
largest = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
before = status("VmRSS")
matrices = numpy_helper.to_array(largest, str(path.parent)).astype(np.float64).T[None]
rows, cols = matrices.shape[1:]
ranks = rows * cols // (rows + cols) if min(rows, cols) >= PARTIAL_MIN_SIDE else None
TruncatedSVD(matrices, ranks=ranks).factorize(max(1, (ranks or min(rows, cols)) // 2))
print((status("VmHWM") - before) / 2**20)
"""


def layer_working_set(model: Path) -> float:
    """GiB: the peak of reading and decomposing the largest weight alone, as compress does, above what
    the process held before (in a child process)."""
    done = subprocess.run([sys.executable, "-c", LAYER_SCRIPT, str(model)], cwd=REPO, capture_output=True,
                          text=True, check=True)
    return float(done.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=11)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--ways", default="jobs 1,jobs 2,dask",
                        help="a subset re-measures only those; the other rows are kept from the last run")
    args = parser.parse_args()
    wanted = [way.strip() for way in args.ways.split(",")]
    folder = REPO / "cache" / "scale"
    model = folder / f"synthetic_{args.blocks}x{args.width}.onnx"
    if not model.exists():
        build(model, args.blocks, args.width)
    data_bytes = (folder / (model.name + ".data")).stat().st_size
    rows = []
    ways = [(way, ["--jobs", way.split()[1]]) for way in ("jobs 1", "jobs 2") if way in wanted]
    cluster = None
    if "dask" in wanted:
        from distributed import LocalCluster
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address=None)
        ways.append(("dask LocalCluster, 2 workers", ["--scheduler", cluster.scheduler_address]))
    try:
        for label, extra in ways:
            out = folder / "compressed.onnx"
            result = run(["compress", str(model), "-o", str(out), "--target-params", "0.5", "--quiet",
                          "--report", str(folder / "report.json"), *extra])
            report = json.loads((folder / "report.json").read_text())
            written = out.stat().st_size + sum(p.stat().st_size for p in folder.glob("compressed.onnx.data"))
            row = {"way": label, "run": time.strftime("%H:%M"), "params_before": report["params_before"], "params_after": report["params_after"],
                   "input_bytes": data_bytes, "output_bytes": written, "phases": report.get("phases", {}), **result}
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        if cluster is not None:
            cluster.close()
    RESULTS.mkdir(exist_ok=True)
    previous = RESULTS / "scale_cpu.json"
    if previous.exists() and len(wanted) < 3:
        measured = {row["way"] for row in rows}
        rows = [row for row in json.loads(previous.read_text())["rows"] if row["way"] not in measured] + rows
    record = {"suite": "scale", "provider": "cpu", "machine": machine("cpu"), "onnxruntime": ort.__version__,
              "date": time.strftime("%Y-%m-%d"), "model": model.name, "rows": rows}
    layer = layer_working_set(model)
    record["layer_working_set_gib"] = layer
    record["memory_bound_gib"] = 3 * layer + data_bytes / 2**30
    (RESULTS / "scale_cpu.json").write_text(json.dumps(record, indent=1))
    render_all()


if __name__ == "__main__":
    main()
