"""The `onnx-lowrank` command line, run for real in a subprocess (`python -m onnx_lowrank ...`).

Success paths: a tiny four-layer model built here (Conv, ConvTranspose, Gemm, MatMul with nearly rank-2
weights) and the real PaddleOCR classifier in models/. Every bad input must end with exit code 2, exactly one
`onnx-lowrank: error: ...` line on stderr naming the problem, no traceback, and nothing changed on disk:
the input byte-identical, no output, no temporary file left behind.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import tomllib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_lowrank.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
PPOCR = ROOT / "models" / "ppocr_cls.onnx"
PREFIX = "onnx-lowrank: error:"

# ---------------------------------------------------------------------------------------------- helpers


def child(*args: str | os.PathLike, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m onnx_lowrank ARGS` in a child process, run in `cwd`."""
    env = {k: v for k, v in os.environ.items() if k != "ONNX_LOWRANK_DEBUG"}
    return subprocess.run(
        [sys.executable, "-m", "onnx_lowrank", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def cli(*args: str | os.PathLike, cwd: Path) -> subprocess.CompletedProcess:
    """What child(ARGS) gives, from main() in this process (a child costs 2-3 s of interpreter start and
    imports): run in `cwd`, stdout and stderr captured at the file descriptors, so that ONNX Runtime's own
    writes count too."""
    argv = [str(arg) for arg in args]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
            pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        patch.delenv("ONNX_LOWRANK_DEBUG", raising=False)
        patch.setattr(sys, "stdout", out)
        patch.setattr(sys, "stderr", err)
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1), os.dup2(err.fileno(), 2)
        try:
            code = main(argv)
        finally:
            out.flush(), err.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])
        out.seek(0), err.seek(0)
        return subprocess.CompletedProcess(argv, code, out.read(), err.read())


def low_rank(rng: np.random.Generator, shape: tuple[int, ...], rank: int = 2, noise: float = 0.01) -> np.ndarray:
    """A weight whose (rows x rest) matrix is rank `rank` plus a little noise: energy 0.99 keeps rank <= 2."""
    rows, cols = shape[0], int(np.prod(shape[1:]))
    matrix = rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols)) / np.sqrt(cols)
    matrix += noise * rng.standard_normal((rows, cols)) / np.sqrt(cols)
    return matrix.reshape(shape).astype(np.float32)


def tiny_model() -> onnx.ModelProto:
    """x[2,8,6,6] -> Conv 3x3 -> Relu -> ConvTranspose 2x2/2 -> GAP -> Flatten -> Gemm(transB) -> MatMul -> y[2,24]."""
    rng = np.random.default_rng(1234)
    weights = {
        "conv_w": low_rank(rng, (16, 8, 3, 3)),
        "conv_b": rng.standard_normal(16).astype(np.float32),
        # ConvTranspose W is (Cin, Cout, k, k); the map per group is Cout x (Cin * k * k)
        "deconv_w": low_rank(rng, (8, 16, 2, 2)).transpose(1, 0, 2, 3).copy(),
        "gemm_w": low_rank(rng, (32, 8)),
        "gemm_c": rng.standard_normal(32).astype(np.float32),
        "matmul_w": low_rank(rng, (24, 32)).T.copy(),
    }
    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c1"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node("ConvTranspose", ["r1", "deconv_w"], ["d1"], name="deconv", strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["d1"], ["p1"], name="pool"),
        helper.make_node("Flatten", ["p1"], ["f1"], name="flatten"),
        helper.make_node("Gemm", ["f1", "gemm_w", "gemm_c"], ["g1"], name="gemm", transB=1),
        helper.make_node("MatMul", ["g1", "matmul_w"], ["y"], name="matmul"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 24])],
        [numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


TINY_LAYERS = {"conv": "Conv", "deconv": "ConvTranspose", "gemm": "Gemm", "matmul": "MatMul"}


def run_model(model: onnx.ModelProto | Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else Path(model).read_bytes()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"]).run(None, feeds)


def tiny_feeds() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(7).standard_normal((2, 8, 6, 6)).astype(np.float32)}


def tree(root: Path) -> dict[str, str]:
    """Every path under root (hidden ones too) -> sha256 of a file, or 'dir'."""
    found = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        found[key] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


REPORT_KEYS = {"params_before", "params_after", "bytes_before", "bytes_after", "seconds", "layers", "validation"}
LAYER_KEYS = {"node", "op", "method", "rank", "params_before", "params_after", "predicted_error"}


def check_report(path: Path) -> dict:
    report = json.loads(path.read_text())
    assert REPORT_KEYS <= set(report), f"report lacks {REPORT_KEYS - set(report)}"
    for key in ("params_before", "params_after", "bytes_before", "bytes_after"):
        assert isinstance(report[key], int) and report[key] > 0, (key, report[key])
    assert isinstance(report["seconds"], (int, float)) and report["seconds"] >= 0
    assert report["validation"] is None
    assert isinstance(report["layers"], list)
    for layer in report["layers"]:
        assert LAYER_KEYS <= set(layer), f"layer entry lacks {LAYER_KEYS - set(layer)}: {layer}"
        assert layer["method"] == "svd"
        assert isinstance(layer["rank"], int) and layer["rank"] >= 1
        assert isinstance(layer["params_before"], int) and isinstance(layer["params_after"], int)
        assert 0.0 <= layer["predicted_error"] <= 1.0
    return report


def check_written_model(path: Path) -> onnx.ModelProto:
    assert path.is_file(), f"{path} was not written"
    onnx.checker.check_model(str(path), full_check=True)
    return onnx.load(str(path))


@pytest.fixture()
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_model(), str(path))
    return path


# ---------------------------------------------------------------------------------------------- success


def test_compress_tiny_with_report(tiny: Path, tmp_path: Path):
    out, report_path = tmp_path / "tiny.small.onnx", tmp_path / "report.json"
    before = tiny.read_bytes()
    done = cli("compress", tiny, "-o", out, "--energy", "0.99", "--report", report_path, "--objective", "size",
               cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "parameters" in done.stdout
    assert tiny.read_bytes() == before

    model = check_written_model(out)
    report = check_report(report_path)
    assert {layer["node"]: layer["op"] for layer in report["layers"]} == TINY_LAYERS
    for layer in report["layers"]:
        assert layer["rank"] <= 2, layer  # every weight is rank 2 + 1% noise
        assert layer["params_after"] < layer["params_before"], layer
        assert layer["predicted_error"] < 0.01, layer
    assert report["params_after"] < report["params_before"]
    assert report["bytes_after"] < report["bytes_before"]
    assert report["bytes_after"] == len(out.read_bytes())

    reference = run_model(tiny, tiny_feeds())[0]
    got = run_model(model, tiny_feeds())[0]
    assert got.shape == reference.shape == (2, 24)
    assert np.linalg.norm(got - reference) <= 0.05 * np.linalg.norm(reference)


def test_compress_tiny_full_rank_is_exact(tiny: Path, tmp_path: Path):
    ranks, out = tmp_path / "ranks.json", tmp_path / "full.onnx"
    ranks.write_text(json.dumps({"*": "full"}))
    done = cli("compress", tiny, "-o", out, "--ranks", ranks, "--allow-larger", "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    model = check_written_model(out)
    names = {node.name for node in model.graph.node}
    assert not names & set(TINY_LAYERS), "the original layers should all have been replaced"
    reference = run_model(tiny, tiny_feeds())[0]
    np.testing.assert_allclose(run_model(model, tiny_feeds())[0], reference, rtol=1e-4,
                               atol=1e-5 * np.abs(reference).max())


def test_quiet_prints_nothing(tiny: Path, tmp_path: Path):
    out = tmp_path / "q.onnx"
    done = cli("compress", tiny, "-o", out, "--target-params", "0.5", "--objective", "size", "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert done.stderr == ""
    check_written_model(out)


def test_module_and_console_script_agree(tiny: Path, tmp_path: Path):
    """`python -m onnx_lowrank` is the same program as the installed `onnx-lowrank` script."""
    script = Path(sys.executable).with_name("onnx-lowrank")
    if not script.exists():
        pytest.skip("no onnx-lowrank console script beside the interpreter")
    done = subprocess.run([str(script), "inspect", str(tiny)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == child("inspect", tiny, cwd=tmp_path).stdout


def test_ranks_file_by_node_weight_and_star(tiny: Path, tmp_path: Path):
    ranks, out, report_path = tmp_path / "ranks.json", tmp_path / "r.onnx", tmp_path / "r.json"
    # node name "conv", weight name "gemm_w" (its node is "gemm"), "*" for the rest
    ranks.write_text(json.dumps({"conv": 2, "gemm_w": 3, "*": 1}))
    done = cli("compress", tiny, "-o", out, "--ranks", ranks, "--report", report_path, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    check_written_model(out)
    report = check_report(report_path)
    assert {layer["node"]: layer["rank"] for layer in report["layers"]} == {
        "conv": 2, "gemm": 3, "deconv": 1, "matmul": 1
    }


def test_ops_conv_only_touches_conv(tiny: Path, tmp_path: Path):
    out, report_path = tmp_path / "c.onnx", tmp_path / "c.json"
    done = cli("compress", tiny, "-o", out, "--energy", "0.9", "--ops", "Conv", "--report", report_path,
               cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    model = check_written_model(out)
    report = check_report(report_path)
    assert [(layer["node"], layer["op"]) for layer in report["layers"]] == [("conv", "Conv")]

    original = onnx.load(str(tiny))
    untouched = {n.name: n for n in original.graph.node if n.op_type in ("ConvTranspose", "Gemm", "MatMul")}
    written = {n.name: n for n in model.graph.node if n.op_type in ("ConvTranspose", "Gemm", "MatMul")}
    assert written.keys() == untouched.keys()
    for name, node in untouched.items():
        assert list(written[name].input) == list(node.input), name
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for name in ("deconv_w", "gemm_w", "gemm_c", "matmul_w"):
        expected = next(numpy_helper.to_array(t) for t in original.graph.initializer if t.name == name)
        np.testing.assert_array_equal(weights[name], expected)
    assert "conv" not in {n.name for n in model.graph.node}


def test_inspect_tiny_lists_layers(tiny: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # wide enough for one line per layer (a file gets 100 columns)
    done = cli("inspect", tiny, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    for node, op in TINY_LAYERS.items():
        assert any(node in line and op in line for line in done.stdout.splitlines()), (node, done.stdout)
    for column in ("weight shape", "params", "break-even"):
        assert column in done.stdout
    assert tree(tmp_path) == {"tiny.onnx": hashlib.sha256(tiny.read_bytes()).hexdigest()}, "inspect wrote files"


def test_inspect_ops_filter(tiny: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # wide enough for one line per layer (a file gets 100 columns)
    done = cli("inspect", tiny, "--ops", "Gemm,MatMul", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if "│" in line]
    assert any("gemm" in row for row in rows) and any("matmul" in row for row in rows)
    assert not any("Conv" in row for row in rows), done.stdout


def test_inspect_ppocr(tmp_path: Path):
    done = cli("inspect", PPOCR, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    # weights live in Constant nodes: the convs and the final MatMul are found; the depthwise convs'
    # only shrinking decomposition is the spatial one
    assert "Conv@0" in done.stdout and "MatMul@0" in done.stdout
    assert "spatial" in done.stdout
    assert "factorizable layers" in done.stdout


def test_compress_ppocr_target_params(tmp_path: Path):
    source = tmp_path / "in" / "ppocr_cls.onnx"
    source.parent.mkdir()
    source.write_bytes(PPOCR.read_bytes())
    out, report_path = tmp_path / "ppocr.small.onnx", tmp_path / "ppocr.json"
    done = cli("compress", source, "-o", out, "--target-params", "0.7", "--no-data", "--method", "svd",
               "--report", report_path, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "parameters" in done.stdout
    assert source.read_bytes() == PPOCR.read_bytes()
    model = check_written_model(out)
    report = check_report(report_path)
    assert report["layers"], "the Constant-node weights of ppocr should be found"
    assert report["params_after"] < report["params_before"]
    assert report["bytes_after"] < report["bytes_before"]
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 48, 192)).astype(np.float32)
    probabilities = run_model(model, {"x": x})[0]
    assert probabilities.shape == (2, 2) and np.all(np.isfinite(probabilities))


def test_compress_ppocr_energy_099(tmp_path: Path):
    out, report_path = tmp_path / "e.onnx", tmp_path / "e.json"
    done = cli("compress", PPOCR, "-o", out, "--energy", "0.99", "--report", report_path, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "parameters" in done.stdout
    check_written_model(out)
    report = check_report(report_path)
    # at 99% energy every kept factorization must be below break-even (no --allow-larger)
    for layer in report["layers"]:
        assert layer["params_after"] < layer["params_before"], layer
    assert report["params_after"] <= report["params_before"]


def test_compress_ppocr_ops_conv(tmp_path: Path):
    out, report_path = tmp_path / "c.onnx", tmp_path / "c.json"
    done = cli("compress", PPOCR, "-o", out, "--energy", "0.9", "--ops", "Conv", "--report", report_path,
               cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    model = check_written_model(out)
    report = check_report(report_path)
    assert report["layers"] and {layer["op"] for layer in report["layers"]} == {"Conv"}
    assert "MatMul@0" not in {layer["node"] for layer in report["layers"]}
    original = onnx.load(str(PPOCR))
    assert [n for n in model.graph.node if n.op_type == "MatMul"] == [
        n for n in original.graph.node if n.op_type == "MatMul"
    ]


# ---------------------------------------------------------------------------------------------- bad input


@dataclass(frozen=True)
class Bad:
    """A failing invocation: `make` prepares files under tmp_path and returns the argv after the program."""

    make: Callable[[Path, Path], list[str]]  # (tmp_path, valid tiny model path) -> argv
    names: tuple[str, ...]  # each must appear (case-insensitive) in the error line


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _checker_failing_model() -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    node = helper.make_node("MatMul", ["x", "nosuch_tensor"], ["y"], name="mm")
    model = helper.make_model(helper.make_graph([node], "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString()


def _with_versions(ir_version: int | None = None, opset: int | None = None) -> bytes:
    model = tiny_model()
    if ir_version is not None:
        model.ir_version = ir_version
    if opset is not None:
        model.opset_import[0].version = opset
    return model.SerializeToString()


def _long_weight() -> bytes:
    """gemm_w declared 32 x 8 but holding 257 floats: the checker only minds payloads too small."""
    model = tiny_model()
    tensor = next(t for t in model.graph.initializer if t.name == "gemm_w")
    tensor.raw_data = tensor.raw_data + bytes(4)
    return model.SerializeToString()


def _not_utf8() -> bytes:
    """A node input name in Latin-1: protobuf parses it, anything that reads it as text fails."""
    data = tiny_model().SerializeToString()
    return data.replace(b"\x06conv_w", b"\x06c\xf6nv_w", 1)


def _ranks(text: str, *extra: str) -> Callable[[Path, Path], list[str]]:
    def make(tmp: Path, model: Path) -> list[str]:
        ranks = _write(tmp / "ranks.json", text)
        return ["compress", str(model), "-o", "out/compressed.onnx", "--ranks", str(ranks), *extra]

    return make


def _compress(*options: str, output: str = "out/compressed.onnx") -> Callable[[Path, Path], list[str]]:
    return lambda tmp, model: ["compress", str(model), "-o", output, *options]


def _bad_model(data: Callable[[], bytes], name: str = "bad.onnx") -> Callable[[Path, Path], list[str]]:
    def make(tmp: Path, model: Path) -> list[str]:
        bad = _write(tmp / "in" / name, data())
        return ["compress", str(bad), "-o", "out/compressed.onnx", "--energy", "0.9"]

    return make


BAD = {
    "missing-file": Bad(lambda tmp, model: ["compress", "in/absent.onnx", "-o", "out/compressed.onnx",
                                            "--energy", "0.9"], ("absent.onnx", "no such file")),
    "empty-file": Bad(_bad_model(lambda: b"", "empty.onnx"), ("empty.onnx", "empty")),
    "random-bytes": Bad(_bad_model(lambda: np.random.default_rng(3).bytes(4096), "noise.onnx"),
                        ("noise.onnx", "not an onnx model")),
    "truncated-protobuf": Bad(_bad_model(lambda: PPOCR.read_bytes()[: PPOCR.stat().st_size // 2], "half.onnx"),
                              ("half.onnx",)),
    "fails-checker": Bad(_bad_model(_checker_failing_model, "unchecked.onnx"), ("invalid", "nosuch_tensor")),
    "ir-version-99": Bad(_bad_model(lambda: _with_versions(ir_version=99), "ir99.onnx"), ("ir_version", "99")),
    "opset-99": Bad(_bad_model(lambda: _with_versions(opset=99), "opset99.onnx"), ("unsupported opset 99",)),
    "opset-0": Bad(_bad_model(lambda: _with_versions(opset=0), "opset0.onnx"), ("domain_version of 0",)),
    "payload-disagrees-with-shape": Bad(_bad_model(_long_weight, "short.onnx"), ("gemm_w", "holds")),
    "not-utf8-name": Bad(_bad_model(_not_utf8, "latin1.onnx"), ("utf-8",)),
    "inspect-missing-file": Bad(lambda tmp, model: ["inspect", "in/absent.onnx"], ("absent.onnx",)),
    "inspect-random-bytes": Bad(
        lambda tmp, model: ["inspect", str(_write(tmp / "in" / "noise.onnx", np.random.default_rng(4).bytes(999)))],
        ("noise.onnx",)),
    "method-foo": Bad(_compress("--energy", "0.9", "--method", "foo"), ("method", "foo")),
    "method-nowhere": Bad(_compress("--method", "heads", "--target-params", "0.9"), ("--method heads", "no layer")),
    "ops-Foo": Bad(_compress("--energy", "0.9", "--ops", "Conv,Foo"), ("Foo",)),
    "inspect-ops-Foo": Bad(lambda tmp, model: ["inspect", str(model), "--ops", "Foo"], ("Foo",)),
    "target-params-0": Bad(_compress("--target-params", "0"), ("target-params", "0")),
    "target-params-1.5": Bad(_compress("--target-params", "1.5"), ("target-params", "1.5")),
    "target-params-nan": Bad(_compress("--target-params", "nan"), ("target-params", "nan")),
    "target-params-abc": Bad(_compress("--target-params", "abc"), ("target-params", "abc")),
    "energy-0": Bad(_compress("--energy", "0"), ("energy",)),
    "energy-1.5": Bad(_compress("--energy", "1.5"), ("energy", "1.5")),
    "no-rank-option": Bad(_compress(), ("--ranks", "--target-params", "--energy")),
    "two-rank-options": Bad(_compress("--energy", "0.9", "--target-params", "0.5"), ("--energy", "--target-params")),
    "unknown-option": Bad(_compress("--energy", "0.9", "--frobnicate"), ("--frobnicate",)),
    "no-output-option": Bad(lambda tmp, model: ["compress", str(model), "--energy", "0.9"], ("-o",)),
    "ranks-not-json": Bad(_ranks("{not json"), ("ranks.json", "JSON")),
    "ranks-not-object": Bad(_ranks("[1, 2]"), ("ranks.json", "object")),
    "ranks-negative": Bad(_ranks('{"*": -3}'), ("ranks.json", "-3")),
    "ranks-zero": Bad(_ranks('{"conv": 0}'), ("ranks.json", "conv", "0")),
    "ranks-abc": Bad(_ranks('{"*": "abc"}'), ("ranks.json", "abc")),
    "ranks-float": Bad(_ranks('{"*": 2.5}'), ("ranks.json", "2.5")),
    "ranks-missing-file": Bad(
        lambda tmp, model: ["compress", str(model), "-o", "out/compressed.onnx", "--ranks", "absent.json"],
        ("absent.json",)),
    "ranks-unknown-node": Bad(_ranks('{"conv": 2, "no_such_node": 3}'), ("no_such_node",)),
    "target-params-below-rank-1": Bad(_compress("--target-params", "0.001"), ("target-params",)),
    "output-dir-missing": Bad(_compress("--energy", "0.9", output="nowhere/compressed.onnx"),
                              ("nowhere", "does not exist")),
    "output-is-input": Bad(lambda tmp, model: ["compress", str(model), "-o", str(model), "--energy", "0.9"],
                           ("input",)),
    "output-is-input-relative": Bad(
        lambda tmp, model: ["compress", str(model), "-o", f"out/../{model.relative_to(tmp)}", "--energy", "0.9"],
        ("input",)),
    "output-is-input-dot": Bad(
        lambda tmp, model: ["compress", f"./{model.relative_to(tmp)}", "-o", str(model), "--energy", "0.9"],
        ("input",)),
    "output-is-directory": Bad(_compress("--energy", "0.9", output="out"), ("out", "directory")),
    "report-dir-missing": Bad(_compress("--energy", "0.9", "--report", "nowhere/r.json"), ("nowhere",)),
    "ties-on-rel-l2": Bad(_compress("--energy", "0.9", "--ties", "count"), ("--ties", "top1", "rel-l2")),
    "ties-foo": Bad(_compress("--energy", "0.9", "--ties", "foo"), ("--ties", "foo")),
    "accept-bound-max-abs": Bad(_compress("--energy", "0.9", "--metric", "max-abs", "--accept", "bound"),
                                ("--accept bound", "max-abs")),
    "accept-bound-without-tolerance": Bad(_compress("--energy", "0.9", "--accept", "bound"),
                                          ("--accept bound", "--tolerance")),
    "report-is-input": Bad(lambda tmp, model: ["compress", str(model), "-o", "out/c.onnx", "--energy", "0.9",
                                               "--report", str(model)], ("input",)),
}


# the cases run in a child process as well as in this one
IN_A_CHILD = ("missing-file", "truncated-protobuf", "unknown-option", "ranks-unknown-node", "output-is-input")


@pytest.mark.parametrize(("case", "in_a_child"), [pytest.param(case, False, id=name) for name, case in BAD.items()]
                         + [pytest.param(BAD[name], True, id=f"{name}-child") for name in IN_A_CHILD])
def test_bad_input_exits_2_with_one_line(case: Bad, in_a_child: bool, tiny: Path, tmp_path: Path):
    (tmp_path / "out").mkdir()
    argv = case.make(tmp_path, tiny)
    tiny_bytes = tiny.read_bytes()
    snapshot = tree(tmp_path)

    done = (child if in_a_child else cli)(*argv, cwd=tmp_path)

    assert done.returncode == 2, f"exit {done.returncode}; stderr: {done.stderr!r}"
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, f"stderr should be one line, got {len(lines)}: {done.stderr!r}"
    line = lines[0]
    assert line.startswith(PREFIX), line
    for name in case.names:
        assert name.lower() in line.lower(), f"{name!r} not named in {line!r}"
    assert done.stdout == "", done.stdout
    assert tiny.read_bytes() == tiny_bytes, "the input model changed"
    assert not (tmp_path / "out" / "compressed.onnx").exists()
    assert tree(tmp_path) == snapshot, "files were created, removed or changed (partial output or temp files?)"


def test_failed_run_leaves_existing_output_untouched(tiny: Path, tmp_path: Path):
    """The run fails only after the model was loaded and the output path checked: nothing is written."""
    out = _write(tmp_path / "out" / "compressed.onnx", b"precious bytes, not a model")
    report = _write(tmp_path / "out" / "report.json", '{"old": true}')
    ranks = _write(tmp_path / "ranks.json", '{"*": 2, "missing_node": 1}')
    snapshot = tree(tmp_path)
    for options in (["--ranks", str(ranks)], ["--target-params", "0.001"]):
        done = cli("compress", tiny, "-o", out, "--report", report, *options, cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith(PREFIX), done.stderr
        assert tree(tmp_path) == snapshot, f"{options}: existing files changed or temp files left"


def test_bad_model_leaves_existing_output_untouched(tmp_path: Path):
    bad = _write(tmp_path / "bad.onnx", PPOCR.read_bytes()[:1000])
    out = _write(tmp_path / "out.onnx", b"keep me")
    snapshot = tree(tmp_path)
    done = cli("compress", bad, "-o", out, "--energy", "0.9", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(PREFIX) and len(done.stderr.splitlines()) == 1, done.stderr
    assert tree(tmp_path) == snapshot


def test_report_path_equal_to_output_is_refused(tiny: Path, tmp_path: Path):
    """`--report` naming the same file as `-o` must not replace the written model with JSON.

    Either refuse it as bad usage (exit 2, nothing written) or keep a valid model at OUTPUT; exiting 0 with
    the model overwritten by the report is wrong.
    """
    out = tmp_path / "same.onnx"
    done = cli("compress", tiny, "-o", out, "--energy", "0.99", "--report", out, cwd=tmp_path)
    if done.returncode == 2:
        assert done.stderr.startswith(PREFIX) and len(done.stderr.splitlines()) == 1, done.stderr
        assert not out.exists()
    else:
        assert done.returncode == 0, done.stderr
        holds_report = out.read_bytes().lstrip().startswith(b"{")
        assert not holds_report, f"exit 0 but {out.name} now holds the JSON report instead of the model"
        onnx.checker.check_model(str(out), full_check=True)


def _unwritable_as_root() -> Path | None:
    """A folder even root cannot write into (sysfs; read-only in containers), or None."""
    try:
        handle, probe = tempfile.mkstemp(dir="/sys")
    except OSError:
        return Path("/sys")
    os.close(handle)
    os.unlink(probe)
    return None


def test_read_only_output_directory(tiny: Path, tmp_path: Path):
    """A folder with no write permission; as root (who may write anywhere permissions forbid) a folder
    of a file system that refuses files."""
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    locked = _unwritable_as_root() if root else tmp_path / "locked"
    if locked is None:
        pytest.skip("running as root and no folder refuses root's files here")
    if not root:
        locked.mkdir()
        locked.chmod(0o555)
    before = sorted(locked.iterdir())
    try:
        done = cli("compress", tiny, "-o", locked / "c.onnx", "--energy", "0.9", cwd=tmp_path)
    finally:
        if not root:
            locked.chmod(0o755)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(PREFIX) and "not writable" in done.stderr and len(done.stderr.splitlines()) == 1
    assert sorted(locked.iterdir()) == before


# ---------------------------------------------------------------------------------------------- usage


def test_version(tmp_path: Path):
    from onnx_lowrank.system.installation import version

    done = cli("--version", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"onnx-lowrank {version()}\n"
    assert re.fullmatch(r"onnx-lowrank \d+\.\d+\.\d+\S*\n", done.stdout), done.stdout
    with open(ROOT / "pyproject.toml", "rb") as file:
        assert version() == tomllib.load(file)["project"]["version"]  # the tests run from the checkout


def test_version_from_a_checkout_its_pyproject_else_the_metadata(tmp_path: Path, monkeypatch):
    from onnx_lowrank.system import installation

    checkout = _fake_checkout(tmp_path / "src", version="9.8.7")
    assert installation.version(checkout / "onnx_lowrank") == "9.8.7"
    installed = tmp_path / "site-packages" / "onnx_lowrank"
    installed.mkdir(parents=True)
    monkeypatch.setattr(installation.importlib.metadata, "version", lambda name: "1.2.3")
    assert installation.version(installed) == "1.2.3"

    def absent(name: str) -> str:
        raise installation.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(installation.importlib.metadata, "version", absent)
    assert installation.version(installed) == "unknown"


def test_bare_command_prints_usage_and_commands(tmp_path: Path):
    done = cli(cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr.startswith("usage: onnx-lowrank"), done.stderr
    assert "error" not in done.stderr and "required" not in done.stderr, done.stderr
    commands = [line.split()[0] for line in done.stderr.splitlines() if line.startswith("    ")]
    assert commands == ["compress", "inspect"], done.stderr
    assert "--version" in done.stderr


def _examples(epilog: str) -> list[list[str]]:
    """The example commands of a help text, continuation lines joined, as argv lists."""
    text = epilog.split("examples:\n", 1)[1].split("\n\n", 1)[0].replace("\\\n", " ")
    return [shlex.split(line) for line in text.splitlines() if line.strip()]


def test_compress_help_ends_with_examples_and_exit_codes(tmp_path: Path):
    from onnx_lowrank.cli import main as command

    done = cli("compress", "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    # the flags keep their help
    for flag, words in (("--tolerance T", "held-out"), ("--calib PATH", ".npz"), ("--html FILE.html", "HTML"),
                        ("--objective", "balanced")):
        assert flag in text and words in text, (flag, words)
    # then two examples, line breaks kept, that name shipped files and parse
    assert text.index("examples:\n") > text.index("--quiet")
    examples = _examples(text)
    assert len(examples) == 2, examples
    for argv in examples:
        assert argv[:2] == ["onnx-lowrank", "compress"], argv
        args = command._parser().parse_args(argv[1:])
        for path in (args.input, args.calib, args.labels):
            if path is not None:
                assert (ROOT / path).is_file(), path
        assert args.calib is not None and args.metric in ("accuracy", "cosine"), argv
    assert {Path(argv[2]).name for argv in examples} == {"digits_cnn.onnx", "minilm_l2.onnx"}
    # and the exit codes, one line each, last
    codes = text.split("exit codes:\n", 1)[1].rstrip("\n").splitlines()
    assert [line.split()[0] for line in codes] == ["0", "1", "2", "3"], codes
    assert "written" in codes[0] and "bound" in codes[1] and "bad input" in codes[2] and "internal" in codes[3]


def test_top_level_help_lists_the_commands(tmp_path: Path):
    done = cli("--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "compress" in done.stdout and "inspect" in done.stdout and "--version" in done.stdout


# ---------------------------------------------------------------------------------------------- install hints


def _fake_checkout(root: Path, name: str = "onnx-lowrank", version: str = "0.1.0") -> Path:
    (root / "onnx_lowrank").mkdir(parents=True)
    (root / "pyproject.toml").write_text(f'[project]\nname = "{name}"\nversion = "{version}"\n')
    return root


def test_install_hint_from_a_checkout(tmp_path: Path):
    from onnx_lowrank.system.installation import install_hint, source_checkout

    root = _fake_checkout(tmp_path / "my checkout")
    assert source_checkout(root / "onnx_lowrank") == root.resolve()
    here = shlex.quote(str(root.resolve()))
    assert install_hint("html", root / "onnx_lowrank") == f"cd {here} && pip install '.[html]'"
    underscored = _fake_checkout(tmp_path / "other", name="ONNX_Lowrank")  # names compare normalized
    assert install_hint("cp", underscored / "onnx_lowrank").endswith("pip install '.[cp]'")


def test_install_hint_when_installed(tmp_path: Path):
    from onnx_lowrank.system.installation import install_hint, source_checkout

    installed = tmp_path / "site-packages" / "onnx_lowrank"
    installed.mkdir(parents=True)
    assert source_checkout(installed) is None
    assert install_hint("html", installed) == "pip install 'onnx-lowrank[html]'"
    stranger = _fake_checkout(tmp_path / "vendored", name="someone-else")  # another project's pyproject.toml
    assert install_hint("dask", stranger / "onnx_lowrank") == "pip install 'onnx-lowrank[dask]'"
    broken = tmp_path / "broken"
    (broken / "onnx_lowrank").mkdir(parents=True)
    (broken / "pyproject.toml").write_text("[project\nname = ")
    assert install_hint("gpu", broken / "onnx_lowrank") == "pip install 'onnx-lowrank[gpu]'"


def test_install_hint_keeps_an_editable_install_editable(tmp_path: Path, monkeypatch):
    """`pip install '.[html]'` over an editable install would replace it with a copy: keep `-e`."""
    from onnx_lowrank.system import installation

    root = _fake_checkout(tmp_path / "src").resolve()

    class Installed:
        def __init__(self, origin: dict):
            self.origin = origin

        def read_text(self, name: str) -> str | None:
            return json.dumps(self.origin) if name == "direct_url.json" else None

    def distributions(origin: dict):
        return lambda name: [Installed(origin)] if name == "onnx-lowrank" else []

    editable = {"url": root.as_uri(), "dir_info": {"editable": True}}
    monkeypatch.setattr(installation.importlib.metadata, "distributions", distributions(editable))
    hint = installation.install_hint("html", root / "onnx_lowrank")
    assert hint == f"cd {shlex.quote(str(root))} && pip install -e '.[html]'"
    elsewhere = {"url": (tmp_path / "another").as_uri(), "dir_info": {"editable": True}}
    monkeypatch.setattr(installation.importlib.metadata, "distributions", distributions(elsewhere))
    assert installation.install_hint("html", root / "onnx_lowrank").endswith("&& pip install '.[html]'")


def test_html_without_matplotlib_gives_the_install_hint(tiny: Path, tmp_path: Path, monkeypatch, capsys):
    from onnx_lowrank.cli import main as command
    from onnx_lowrank.system.installation import install_hint

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == "matplotlib" else real(name, *rest))
    code, out, err = _main(monkeypatch, capsys, "compress", tiny, "-o", tmp_path / "c.onnx", "--energy", "0.9",
                           "--html", tmp_path / "r.html")
    assert code == 2 and out == ""
    assert err == f"{PREFIX} --html needs matplotlib: {install_hint('html')}\n"
    assert not (tmp_path / "c.onnx").exists()
    assert command.install_hint is install_hint


# ---------------------------------------------------------------------------------------------- internal errors


def _main(monkeypatch, capsys, *argv: str | os.PathLike) -> tuple[int, str, str]:
    """cli.main in this process (so that internals can be patched): exit code, stdout, stderr."""
    from onnx_lowrank.cli import main as command

    monkeypatch.delenv("ONNX_LOWRANK_DEBUG", raising=False)
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main sets its own
    code = command.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture()
def tiny_calib(tmp_path: Path) -> Path:
    """16 feeds of the tiny model (its batch is fixed at 2): 8 to fit, 8 to validate."""
    folder = tmp_path / "calib"
    folder.mkdir()
    rng = np.random.default_rng(11)
    for i in range(16):
        np.savez(folder / f"{i:02d}.npz", x=rng.standard_normal((2, 8, 6, 6)).astype(np.float32))
    return folder


def _internal_error_line(code: int, err: str) -> str:
    assert code == 3, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("onnx-lowrank: internal error in "), line
    assert line.endswith("please report it with the command and ONNX_LOWRANK_DEBUG=1 output"), line
    return line


def test_an_internal_failure_is_exit_3_naming_it(tiny: Path, tiny_calib: Path, tmp_path: Path, monkeypatch, capsys):
    from onnx_lowrank.run import stages as pipeline

    def build(*args, **kwargs):
        raise RuntimeError("splice lost tensor 'gemm_w'\nsecond line of detail")

    monkeypatch.setattr(pipeline, "build", build)
    out, report = tmp_path / "out" / "c.onnx", tmp_path / "out" / "c.json"
    out.parent.mkdir()
    code, stdout, err = _main(monkeypatch, capsys, "compress", tiny, "-o", out, "--energy", "0.99", "--calib",
                              tiny_calib, "--objective", "size", "--report", report)
    line = _internal_error_line(code, err)
    assert "onnx_lowrank.run.stages._rewrite" in line, line
    assert "RuntimeError: splice lost tensor 'gemm_w';" in line and "second line" not in line, line
    assert stdout == ""
    assert list(out.parent.iterdir()) == [], "nothing is written: no model, no report, no temporary file"

    monkeypatch.setenv("ONNX_LOWRANK_DEBUG", "1")  # and with the variable, the traceback
    from onnx_lowrank.cli import main as command

    with pytest.raises(RuntimeError, match="splice lost tensor"):
        command.main(["compress", str(tiny), "-o", str(out), "--energy", "0.99", "--calib", str(tiny_calib),
                      "--objective", "size"])


def _unrunnable(original: onnx.ModelProto) -> onnx.ModelProto:
    """The original's input and output, a Reshape between them that ONNX Runtime cannot do (576 into 7 rows)."""
    shape = numpy_helper.from_array(np.array([7, -1], dtype=np.int64), "bad_shape")
    node = helper.make_node("Reshape", ["x", "bad_shape"], ["y"], name="broken")
    graph = helper.make_graph([node], "broken", list(original.graph.input), list(original.graph.output), [shape])
    return helper.make_model(graph, opset_imports=list(original.opset_import), ir_version=original.ir_version)


def test_onnxruntime_failing_on_our_candidate_is_exit_3(tiny: Path, tiny_calib: Path, tmp_path: Path, monkeypatch,
                                                         capsys):
    """The input model loaded and ran; a model onnx-lowrank built failing in ONNX Runtime is our bug, not bad input."""
    from onnx_lowrank.choose import search

    monkeypatch.setattr(search, "build", lambda original, *args, **kwargs: _unrunnable(original))
    out = tmp_path / "out" / "c.onnx"
    out.parent.mkdir()
    code, stdout, err = _main(monkeypatch, capsys, "compress", tiny, "-o", out, "--energy", "0.99", "--calib",
                              tiny_calib, "--objective", "size")
    line = _internal_error_line(code, err)
    assert "onnx_lowrank." in line and "(raised by onnxruntime)" in line, line
    assert list(out.parent.iterdir()) == []


def test_onnxruntime_failing_on_our_fed_values_is_exit_3(tiny: Path, tiny_calib: Path, tmp_path: Path, monkeypatch,
                                                         capsys):
    """Sensitivity probes feed a factorization to the input model's own session: a failure then is ours too."""
    from onnx_lowrank.check import overrides

    real = overrides.Override.feed
    fed = []

    def feed(self, factors):
        values = real(self, factors)
        fed.append(values is not None)
        return None if values is None else {name: value.reshape(-1) for name, value in values.items()}  # wrong rank

    monkeypatch.setattr(overrides.Override, "feed", feed)
    out = tmp_path / "out" / "c.onnx"
    out.parent.mkdir()
    code, stdout, err = _main(monkeypatch, capsys, "compress", tiny, "-o", out, "--target-params", "0.5",
                              "--calib", tiny_calib, "--objective", "size")
    assert any(fed), "no unit of the tiny model was probed through its overrides"
    line = _internal_error_line(code, err)
    assert "probe_error_fed" in line and "overridden initializers" in line, line
    assert list(out.parent.iterdir()) == []


# ------------------------------------------------------------------------ flags generated from Options


def test_every_option_is_a_flag_with_its_help_and_choices():
    """The compress flags come from the fields of Options (options.Flag in their metadata): each field with one is
    on the command line, under its name, with its help text and its choices."""
    import dataclasses

    from onnx_lowrank.cli import main as command
    from onnx_lowrank.options import Options

    parser = command._parser()
    compress = parser._subparsers._group_actions[0].choices["compress"]
    flags = {action.dest: action for action in compress._actions}
    for option in dataclasses.fields(Options):
        flag = option.metadata.get("flag")
        if flag is None:
            assert option.name not in flags, option.name  # e.g. progress: set from --quiet and the terminal
            continue
        action = flags[option.name]
        assert action.option_strings == ["--" + option.name.replace("_", "-")]
        assert action.help == flag.help and action.help
        assert tuple(action.choices or ()) == tuple(flag.choices or ())


def test_flags_reach_options_converted(tmp_path: Path):
    """What the command line parses is what Options holds: converted (--ops, --ranks) and defaulted alike."""
    from onnx_lowrank.cli import main as command
    from onnx_lowrank.options import Options

    ranks = tmp_path / "ranks.json"
    ranks.write_text(json.dumps({"*": 4, "fc": "full"}))
    args = command._parser().parse_args(["compress", "in.onnx", "-o", "out.onnx", "--ranks", str(ranks),
                                          "--ops", "MatMul, Gemm", "--no-data", "--seed", "3", "--metric", "cosine"])
    given = Options(**command._options(args))
    assert given == Options(ranks={"*": 4, "fc": "full"}, ops=("MatMul", "Gemm"), no_data=True, seed=3,
                            metric="cosine")
    defaults = command._parser().parse_args(["compress", "in.onnx", "-o", "out.onnx"])
    assert Options(**command._options(defaults)) == Options()


@pytest.mark.parametrize("extra, words", [(["--outputs", "nothing"], ("--outputs", "'nothing'", "not an output")),
                                          (["--outputs", ""], None)])
def test_outputs_names_known_graph_outputs(tiny: Path, tiny_calib: Path, tmp_path: Path, monkeypatch, capsys,
                                           extra, words):
    """--outputs names graph outputs: an unknown one is bad input (exit 2, one line, before any pass); an empty
    list is the default (every output)."""
    out = tmp_path / "out.onnx"
    code, _, err = _main(monkeypatch, capsys, "compress", tiny, "-o", out, "--energy", "0.99", "--calib", tiny_calib,
                         "--objective", "size", *extra)
    if words is None:
        assert code == 0, err
        return
    assert code == 2 and len(err.splitlines()) == 1 and not out.exists(), err
    assert all(word in err for word in words), err


def test_outputs_without_calibration_is_bad_input(tiny: Path, tmp_path: Path, monkeypatch, capsys):
    code, _, err = _main(monkeypatch, capsys, "compress", tiny, "-o", tmp_path / "o.onnx", "--energy", "0.9",
                         "--outputs", "y")
    assert code == 2 and "--outputs" in err and "--calib" in err, err


@pytest.mark.parametrize("labels", ["models/minilm_sentences.npz", "floats.npy"])
def test_labels_that_are_not_integer_classes_say_what_labels_are(labels: str, tmp_path: Path):
    """`--labels` given a calibration .npz (or fractional values): one line saying that labels are a .npy
    array of one integer class per sample, exit 2 (issue 30, item 6)."""
    np.save(tmp_path / "floats.npy", np.linspace(0, 1, 600))
    path = ROOT / labels if labels.startswith("models/") else tmp_path / labels
    done = cli("compress", ROOT / "models" / "minilm_l2.onnx", "-o", "out.lowrank.onnx", "--calib",
               ROOT / "models" / "minilm_sentences.npz", "--labels", path, "--metric", "accuracy", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX), done.stderr
    assert ".npy array of one integer class per calibration sample" in lines[0]
    assert not (tmp_path / "out.lowrank.onnx").exists()


def test_columns_is_honoured_off_a_terminal(tmp_path: Path, monkeypatch):
    """Written to a file: COLUMNS where it is set, else 100 columns; `compress --help` (its examples and
    exit codes included) fits 80 columns (issue 30, item 7)."""
    model = ROOT / "models" / "minilm_l2.onnx"
    monkeypatch.setenv("COLUMNS", "80")
    for argv in (("inspect", model), ("compress", "--help"), ("inspect", "--help"), ("--help",)):
        done = cli(*argv, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        wide = [line for line in done.stdout.splitlines() if len(line) > 80]
        assert not wide, (argv, wide)
    monkeypatch.delenv("COLUMNS")
    done = cli("inspect", model, cwd=tmp_path)
    widths = [len(line) for line in done.stdout.splitlines()]
    assert done.returncode == 0 and 80 < max(widths) <= 100, max(widths)
