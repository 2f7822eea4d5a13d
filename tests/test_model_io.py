"""Reading and writing: external data kept, big models forced to external data, atomic writes."""

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import onnx_lowrank
from onnx_lowrank.graph import model_io
from onnx_lowrank.observe import sessions as runtime


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


def test_sessions_of_models_over_two_gigabytes_are_opened_from_a_file(monkeypatch):
    """Serialization over the limit is refused: the session then reads a file with external data."""
    model = linear_model()
    x = np.random.default_rng(2).standard_normal((3, 64)).astype(np.float32)
    expected = runtime.Session(model, "cpu").run({"x": x})
    written = []
    monkeypatch.setattr(model_io, "TWO_GB", 1000)
    monkeypatch.setattr(runtime, "save_model", lambda *a, **k: (written.append(a[1]), model_io.save_model(*a, **k)))
    assert model_io.serialized_or_none(model) is None
    np.testing.assert_array_equal(runtime.Session(model, "cpu").run({"x": x})[0], expected[0])
    assert len(written) == 1


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


def test_model_and_external_data_get_ordinary_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        model_io.save_model(linear_model(), tmp_path / "m.onnx", external_data=True)
    finally:
        os.umask(previous)
    for name in ("m.onnx", "m.onnx.data"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


def stacked_model() -> onnx.ModelProto:
    """Three MatMuls and a large constant no adapter touches (it must be copied across as it is)."""
    rng = np.random.default_rng(2)
    weights = [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), f"w{i}") for i in range(3)]
    shift = numpy_helper.from_array(rng.standard_normal((1, 64)).astype(np.float32) * np.ones((4, 1), np.float32), "shift")
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h0"], name="mm0"),
             helper.make_node("MatMul", ["h0", "w1"], ["h1"], name="mm1"),
             helper.make_node("Add", ["h1", "shift"], ["h2"], name="add"),
             helper.make_node("MatMul", ["h2", "w2"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "stacked", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 64])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 64])], [*weights, shift])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_external_data_is_read_one_weight_at_a_time_and_copied_across(tmp_path, monkeypatch):
    """compress_file never loads a model's external data whole (each weight is read from the file when it
    is used, the untouched ones are copied file to file), and writes what compressing it in memory does."""
    source = tmp_path / "in.onnx"
    onnx.save_model(stacked_model(), source, save_as_external_data=True, location="in.data", size_threshold=0)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    in_memory, _ = onnx_lowrank.compress(source, target_params=0.5, objective="size")

    def refuse(*args, **kwargs):
        raise AssertionError("the whole external data was loaded")

    monkeypatch.setattr(onnx.external_data_helper, "load_external_data_for_model", refuse)
    report = onnx_lowrank.compress_file(source, tmp_path / "out.onnx", target_params=0.5, objective="size")
    monkeypatch.undo()
    assert len(report.layers) == 3 and report.bytes_before > 4 * 64 * 64 * 3
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name in before} == before
    written = onnx.load(tmp_path / "out.onnx")  # its own data file, read in full
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in written.graph.initializer)
    expected = {t.name: numpy_helper.to_array(t) for t in in_memory.graph.initializer}
    assert {t.name: numpy_helper.to_array(t).tobytes() for t in written.graph.initializer} == {
        name: value.tobytes() for name, value in expected.items()}
    x = np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)
    np.testing.assert_array_equal(outputs(tmp_path / "out.onnx", x),
                                  ort.InferenceSession(in_memory.SerializeToString()).run(None, {"x": x})[0])


def test_external_data_without_factorizable_layers_is_copied_through(tmp_path):
    source = tmp_path / "in.onnx"
    onnx.save_model(stacked_model(), source, save_as_external_data=True, location="in.data", size_threshold=0)
    onnx_lowrank.compress_file(source, tmp_path / "out.onnx", ranks={"*": "full"}, ops=["Gather"])
    x = np.random.default_rng(4).standard_normal((4, 64)).astype(np.float32)
    np.testing.assert_array_equal(outputs(tmp_path / "out.onnx", x), outputs(source, x))


def test_external_data_takes_initializers_and_leaves_constant_nodes_inline(tmp_path):
    """As onnx.save_model does: Constant nodes' tensors stay in the model file (not every runtime reads
    external data there), initializers of 1 kB or more go to OUTPUT.data."""
    model = linear_model()
    big = numpy_helper.from_array(np.ones((16, 48), np.float32), "c")
    model.graph.node.insert(0, helper.make_node("Constant", [], ["offset"], value=big, name="const"))
    model.graph.node[1].output[0] = "mm_out"
    model.graph.node.append(helper.make_node("Add", ["mm_out", "offset"], ["y"], name="add"))
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 16
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 16
    model_io.save_model(model, tmp_path / "m.onnx", external_data=True)
    written = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    assert onnx.external_data_helper.uses_external_data(written.graph.initializer[0])
    assert not onnx.external_data_helper.uses_external_data(written.graph.node[0].attribute[0].t)
    x = np.random.default_rng(5).standard_normal((16, 64)).astype(np.float32)
    np.testing.assert_allclose(outputs(tmp_path / "m.onnx", x),
                               ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0], rtol=1e-6)


@pytest.mark.parametrize("keep", [0, 100, 16384 - 4])
def test_truncated_external_data_is_an_input_error_before_any_work(tmp_path, keep):
    """External data is left in its files (read a weight at a time), so a short file is found at load,
    by its size: one line naming the tensor, and nothing written."""
    source = tmp_path / "in.onnx"
    onnx.save_model(linear_model(64, 64), source, save_as_external_data=True, location="in.data", size_threshold=0)
    data = (tmp_path / "in.data").read_bytes()
    (tmp_path / "in.data").write_bytes(data[:keep])
    with pytest.raises(onnx_lowrank.InputError, match=r"tensor 'w' of shape \[64, 64\] needs 16384 bytes"):
        onnx_lowrank.compress_file(source, tmp_path / "out.onnx", target_params=0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.data", "in.onnx"]
