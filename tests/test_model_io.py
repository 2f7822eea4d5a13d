"""Reading and writing: external data kept, big models forced to external data, atomic writes."""

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import onnx_lowrank
from onnx_lowrank import model_io


def linear_model(in_dim=64, out_dim=48) -> onnx.ModelProto:
    weight = np.random.default_rng(0).standard_normal((in_dim, out_dim)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "linear",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", in_dim])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", out_dim])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def outputs(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_external_data_in_means_external_data_out(tmp_path):
    source = tmp_path / "in.onnx"
    onnx.save_model(linear_model(), source, save_as_external_data=True, location="in.weights", size_threshold=0)
    target = tmp_path / "out.onnx"
    report = onnx_lowrank.compress_file(source, target, ranks={"*": "full"}, allow_larger=True)
    assert report.layers
    assert (tmp_path / "out.onnx.data").is_file()
    written = onnx.load(target, load_external_data=False)
    assert any(onnx.external_data_helper.uses_external_data(t) for t in written.graph.initializer)
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_allclose(outputs(target, x), outputs(source, x), rtol=1e-4, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "in.weights", "out.onnx", "out.onnx.data"]


def test_models_over_two_gigabytes_are_written_with_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(model_io, "TWO_GB", 1000)  # the rule, not the size: a real 2 GB model is for the benchmark
    model_io.save_model(linear_model(), tmp_path / "big.onnx", external_data=False)
    assert (tmp_path / "big.onnx.data").is_file()
    assert onnx.load(tmp_path / "big.onnx").graph.initializer[0].dims == [64, 48]


def test_in_memory_model_is_left_whole_after_saving_with_external_data(tmp_path):
    model = linear_model()
    model_io.save_model(model, tmp_path / "a.onnx", external_data=True)
    assert not onnx.external_data_helper.uses_external_data(model.graph.initializer[0])
    assert numpy_helper.to_array(model.graph.initializer[0]).shape == (64, 48)


def test_failed_write_leaves_nothing(tmp_path):
    blocked = tmp_path / "out.onnx"
    blocked.mkdir()  # a directory where the file should go: the final rename fails
    with pytest.raises(onnx_lowrank.InputError):
        model_io.save_model(linear_model(), blocked, external_data=False)
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]


def test_compress_accepts_a_proto_and_leaves_it_unchanged():
    model = linear_model()
    before = model.SerializeToString()
    new, report = onnx_lowrank.compress(model, ranks={"*": 8})
    assert model.SerializeToString() == before
    assert report.params_after < report.params_before
    assert [n.op_type for n in new.graph.node] == ["MatMul", "MatMul"]


def test_report_gets_ordinary_permissions(tmp_path):
    """Staged in a private temporary file, the report must still end up readable like any other file."""
    previous = os.umask(0o022)
    try:
        model_io.write_text(tmp_path / "report.json", "{}")
    finally:
        os.umask(previous)
    assert (tmp_path / "report.json").stat().st_mode & 0o777 == 0o644
