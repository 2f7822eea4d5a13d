"""`--quantize int4` with the rest of the tool: menus fitted on a Dask cluster, models with external data (and
the over-2-GB writing path), and the HTML report's search trace in bytes.

One small model built here serves all three: token ids -> an embedding table (GatherBlockQuantized) -> two
MatMuls (MatMulNBits), every weight large enough for 4-bit blocks; at rel-l2 0.1 the compact search keeps the
three layers in 4 bits, the table with a low-rank correction (a Gather and a MatMul beside it). Every model is
run in real ONNX Runtime sessions.
"""

from __future__ import annotations

import itertools
import json
import re
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import onnx_lowrank
from onnx_lowrank.cli import main as command
from onnx_lowrank.graph import model_io
from onnx_lowrank.graph.model_io import save_model
from onnx_lowrank.observe import sessions

ROWS, WIDTH, HIDDEN = 256, 128, 256
TOLERANCE = 0.1
OPTIONS = {"quantize": "int4", "tolerance": TOLERANCE, "metric": "rel-l2", "objective": "size"}
FLAGS = ["--quantize", "int4", "--tolerance", str(TOLERANCE), "--metric", "rel-l2", "--objective", "size"]


def mlp_lm() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weights = {"table": rng.standard_normal((ROWS, WIDTH)),
               "w1": rng.standard_normal((WIDTH, HIDDEN)) / np.sqrt(WIDTH),
               "w2": rng.standard_normal((HIDDEN, WIDTH)) / np.sqrt(HIDDEN)}
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["h0"], name="embed"),
         helper.make_node("MatMul", ["h0", "w1"], ["h1"], name="up"),
         helper.make_node("Tanh", ["h1"], ["h2"], name="act"),
         helper.make_node("MatMul", ["h2", "w2"], ["y"], name="down")], "mlp_lm",
        [helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["N", 5])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 5, WIDTH])],
        [numpy_helper.from_array(value.astype(np.float32), name) for name, value in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def token_ids(count: int = 96) -> np.ndarray:
    """Lookups that favour the first rows (Zipf-like), as token ids do."""
    rng = np.random.default_rng(2)
    return np.minimum(rng.zipf(1.3, size=(count, 5)) - 1, ROWS - 1).astype(np.int64)


def outputs(model: onnx.ModelProto | Path, ids: np.ndarray) -> np.ndarray:
    """The model's output in an ONNX Runtime CPU session (a path: read from its file, external data too)."""
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})[0]


def rel_l2(candidate: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(candidate - reference) / np.linalg.norm(reference))


def quantized_ops(model: onnx.ModelProto) -> list[str]:
    return sorted(n.op_type for n in model.graph.node if n.domain == "com.microsoft")


@pytest.fixture(scope="module")
def inline() -> tuple[onnx.ModelProto, onnx_lowrank.Report]:
    """The reference: the run inline (no workers), in memory."""
    model, report = onnx_lowrank.compress(mlp_lm(), calibration={"input_ids": token_ids()}, jobs=1, **OPTIONS)
    # what the tests below rely on: every layer in 4-bit blocks, one with a correction, both block ops written
    assert [(layer.node, layer.method) for layer in report.layers] == [("embed", "int4"), ("up", "int4"),
                                                                       ("down", "int4")], report.layers
    assert any(layer.quantization["correction_rank"] > 0 for layer in report.layers)
    assert quantized_ops(model) == ["GatherBlockQuantized", "MatMulNBits", "MatMulNBits"]
    assert report.validation.passed and report.trace
    return model, report


def cli(monkeypatch, capsys, *argv: str | Path) -> str:
    """`onnx-lowrank ARGV` through cli.main in this process (so that model_io.TWO_GB can be lowered): exit 0,
    or the failure with its stderr."""
    monkeypatch.delenv("ONNX_LOWRANK_DEBUG", raising=False)
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main sets its own
    code = command.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.err


# ------------------------------------------------------------------------------------------ 1. Dask


def test_int4_menus_fitted_on_a_dask_cluster_write_the_inline_model(inline):
    """--scheduler: each unit's menu (4- and 8-bit blocks, their corrections, the SVD) is fitted in a Dask
    worker process and sent back; the search then chooses the same options and writes the same model."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as cluster:
        model, report = onnx_lowrank.compress(mlp_lm(), calibration={"input_ids": token_ids()},
                                              scheduler=cluster.scheduler_address, **OPTIONS)
        # the menus went through the cluster: one task per unit, each computed by a worker
        fitted = {name: dict(prefix.state_counts) for name, prefix in cluster.scheduler.task_prefixes.items()}
    (counts,) = [counts for name, counts in fitted.items() if "candidates" in name]
    assert counts["memory"] == len(report.layers) == 3, fitted
    expected_model, expected = inline
    chosen = [(layer.node, layer.method, layer.rank, layer.quantization, layer.bytes_after) for layer in report.layers]
    assert chosen == [(layer.node, layer.method, layer.rank, layer.quantization, layer.bytes_after)
                      for layer in expected.layers]
    assert report.validation.value == expected.validation.value and report.bytes_after == expected.bytes_after
    ids = token_ids(16)
    np.testing.assert_allclose(outputs(model, ids), outputs(expected_model, ids), rtol=1e-6, atol=1e-6)
    assert model.SerializeToString() == expected_model.SerializeToString()


# ------------------------------------------------------------------------------------------ 2. external data


def stored(model: onnx.ModelProto) -> dict[str, tuple]:
    """Every initializer by name: its element type, shape and bytes."""
    return {t.name: (t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes()) for t in model.graph.initializer}


def _constant(model: onnx.ModelProto, name: str) -> np.ndarray:
    """An initializer's value, read through the Cast that turns stored float16 scales to float32."""
    casts = {node.output[0]: node.input[0] for node in model.graph.node if node.op_type == "Cast"}
    name = casts.get(name, name)
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def _unpacked(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Codes along the last axis, `count` of them: at 4 bits two a byte, the low nibble first."""
    if bits == 8:
        return packed[..., :count].astype(np.int64)
    nibbles = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)
    return nibbles[..., :count].astype(np.int64)


def dequantized(model: onnx.ModelProto, node: onnx.NodeProto) -> np.ndarray:
    """The (out x in) matrix a MatMulNBits or GatherBlockQuantized node computes with, decoded here from its
    constants by the contrib ops' layout (not by onnx_lowrank's code): (code - zero point) * scale per block."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    bits, block = attrs["bits"], attrs["block_size"]
    if node.op_type == "MatMulNBits":
        data, scales, zero_points = (_constant(model, name) for name in (node.input[1], node.input[2], node.input[3]))
        rows, width = attrs["N"], attrs["K"]
    else:  # GatherBlockQuantized: data, indices, scales, zero points
        data, scales, zero_points = (_constant(model, name) for name in (node.input[0], node.input[2], node.input[3]))
        rows, width = data.shape[0], data.shape[1] * 8 // bits
    blocks = -(-width // block)
    codes = _unpacked(data.reshape(rows, -1), bits, blocks * block).reshape(rows, blocks, block)
    zero = _unpacked(zero_points.reshape(rows, -1), bits, blocks)
    values = (codes - zero[:, :, None]) * scales.reshape(rows, blocks)[:, :, None].astype(np.float64)
    return values.reshape(rows, -1)[:, :width]


@pytest.mark.parametrize("input_external, over_two_gb", [(True, False), (False, True), (True, True)],
                         ids=["external-input", "over-2gb", "external-input-over-2gb"])
def test_int4_of_a_model_with_external_data(inline, tmp_path, monkeypatch, capsys, input_external, over_two_gb):
    """The command line on a model whose weights lie in a side file (and / or one "over 2 GB": the limit
    lowered as tests/test_model_io.py does, which forces external data on the output and sends every ONNX
    Runtime session through a file): the input is left as it was, the output's external data lies where the
    output says, ONNX Runtime runs it from its file, its 4-bit constants decode to the original weights, and it
    is the model the same run writes in memory."""
    original = mlp_lm()
    source, calib, out, report_path = (tmp_path / name for name in ("in.onnx", "calib.npz", "out.onnx", "r.json"))
    if input_external:  # (onnx.save_model moves the tensors of the proto it is given out: a copy)
        onnx.save_model(mlp_lm(), source, save_as_external_data=True, location="in.weights", size_threshold=0)
    else:
        onnx.save_model(original, source)
    np.savez(calib, input_ids=token_ids())
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    if over_two_gb:
        size = sum(len(data) for data in before.values())
        monkeypatch.setattr(model_io, "TWO_GB", 1000)  # the rule, not the size (as test_model_io.py)
        assert model_io.is_large(original) and size > 100 * model_io.TWO_GB
    through_files = []  # sessions of models "over 2 GB" are opened from a file with external data
    monkeypatch.setattr(sessions, "save_model", lambda *a, **k: (through_files.append(a[1]), save_model(*a, **k)))
    cli(monkeypatch, capsys, "compress", source, "-o", out, "--calib", calib, *FLAGS, "--report", report_path,
        "--quiet")
    monkeypatch.undo()
    assert bool(through_files) == over_two_gb

    assert {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.name in before} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([*before, "out.onnx", "out.onnx.data",
                                                                      "r.json"])
    # where the output says its tensors are: out.onnx.data, each tensor's range inside it
    header = onnx.load(out, load_external_data=False)
    data_size = (tmp_path / "out.onnx.data").stat().st_size
    external = {}
    for tensor in header.graph.initializer:
        if onnx.external_data_helper.uses_external_data(tensor):
            info = onnx.external_data_helper.ExternalDataInfo(tensor)
            assert info.location == "out.onnx.data", (tensor.name, info.location)
            assert info.offset is not None and info.length and info.offset + info.length <= data_size
            external[tensor.name] = (info.offset, info.length)
    spans = sorted(external.values())
    assert all(start + length <= following for (start, length), (following, _) in itertools.pairwise(spans))
    block_ops = [node for node in header.graph.node if node.domain == "com.microsoft"]
    assert sorted(node.op_type for node in block_ops) == ["GatherBlockQuantized", "MatMulNBits", "MatMulNBits"]
    packed = [node.input[0 if node.op_type == "GatherBlockQuantized" else 1] for node in block_ops]
    assert set(packed) <= set(external)  # the 4-bit weights went to the side file
    onnx.checker.check_model(str(out))

    written = onnx.load(out)  # its external data read from out.onnx.data
    weights = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in original.graph.initializer}
    for node in block_ops:  # the table's rows, and W^T of each MatMul, in 4-bit blocks (of 128 here): about
        matrix = dequantized(written, node)  # 0.13 off (a misread byte range decodes to noise: about 1.4)
        target = weights["table"] if node.op_type == "GatherBlockQuantized" else \
            next(w.T for name, w in weights.items() if name != "table" and w.T.shape == matrix.shape)
        assert rel_l2(matrix, target) < 0.2, node.name
    expected_model, expected = inline
    assert stored(written) == stored(expected_model)
    ids = token_ids()
    compressed = outputs(out, ids)
    np.testing.assert_array_equal(compressed, outputs(expected_model, ids))
    report = json.loads(report_path.read_text())
    assert report["validation"]["passed"] and report["validation"]["value"] == expected.validation.value
    assert rel_l2(compressed, outputs(source, ids)) <= TOLERANCE  # all the calibration samples, held-out ones too
    assert report["bytes_after"] < 0.25 * report["bytes_before"]


# ------------------------------------------------------------------------------------------ 3. HTML report


TRACE_IMAGE = re.compile(r'<img [^>]*src="data:image/png;base64,[A-Za-z0-9+/=]+" '
                         r'alt="error versus (\w+) traced by the rank search">')


@pytest.mark.parametrize("quantize", [True, False], ids=["int4", "no-quantize"])
def test_html_trace_is_in_bytes_under_int4_and_in_parameters_without(tmp_path, monkeypatch, capsys, quantize):
    """--html: under --quantize int4 an option's cost is its bytes (in float-weight units), so the search trace
    plots validated error against bytes (its axis, caption and table say so); without --quantize it plots
    parameters. The axis label is drawn into the PNG, so it is read off matplotlib as it is set."""
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    source, calib, out, page_path = (tmp_path / name for name in ("in.onnx", "calib.npz", "out.onnx", "r.html"))
    onnx.save_model(mlp_lm(), source)
    np.savez(calib, input_ids=token_ids())
    labels: list[str] = []
    set_xlabel = Axes.set_xlabel

    def recorded(self, label, *args, **kwargs):
        labels.append(str(label))
        return set_xlabel(self, label, *args, **kwargs)

    monkeypatch.setattr(Axes, "set_xlabel", recorded)
    flags = FLAGS if quantize else [flag for flag in FLAGS if flag not in ("--quantize", "int4")]
    cli(monkeypatch, capsys, "compress", source, "-o", out, "--calib", calib, *flags, "--html", page_path, "--quiet")
    page = page_path.read_text(encoding="utf-8")
    assert quantized_ops(onnx.load(out)) == (["GatherBlockQuantized", "MatMulNBits", "MatMulNBits"] if quantize
                                             else [])

    unit = "bytes" if quantize else "parameters"
    other = "parameters" if quantize else "bytes"
    assert TRACE_IMAGE.findall(page) == ["bytes" if quantize else "size"]  # the trace, drawn once
    traced = [label for label in labels if "of the factorizable layers" in label]
    assert len(traced) == 1 and traced[0].startswith(f"{unit} of the factorizable layers"), labels
    search = page[page.index('<section id="search">'):page.index("</section>", page.index('<section id="search">'))]
    assert f"Fewer {unit} to the left" in search and f"Fewer {other} to the left" not in search
    header = "bytes of the units, in float weights" if quantize else "params of the units"
    assert f">{header}</th>" in search, search[-2000:]
