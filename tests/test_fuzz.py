"""Fuzz: mutated models and calibration files must meet the bad-input contract, whatever the mutation.

Each example runs the real command in-process (`cli.main`) on a mutated copy of a small model (bytes
flipped, cut or inserted; or a field of the protobuf changed: an attribute, a weight's shape or type, a
node's inputs or op type, the opset) or of a calibration file. The contract: exit 0 with a valid model, or
exit 2 (bad input) / 1 (bound not met) with exactly one line on stderr, no traceback, nothing written, and
the input files never changed. Exit 3 (an internal error) is a bug the fuzzer found.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from onnx import helper
from test_calibration import two_input_data, two_input_model
from test_cli import tiny_model

from onnx_lowrank.cli.main import main as cli_main

FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 120)), deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TINY = tiny_model()
TINY_BYTES = TINY.SerializeToString()
TWO_INPUT_BYTES = two_input_model().SerializeToString()


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(argv)
    return code, out.getvalue(), err.getvalue()


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _passes_full_check(path: Path) -> bool:
    """The output must be as valid as the input: fully checked (strict shape inference) where it was."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError):
        return False
    return True


def _check_contract(model_bytes: bytes, options: list[str], calib: bytes | None = None) -> int:
    """Run compress on the given files; assert the contract; return the exit code."""
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (folder / "in").mkdir()
        (folder / "out").mkdir()
        model = folder / "in" / "model.onnx"
        model.write_bytes(model_bytes)
        argv = ["compress", str(model), "-o", str(folder / "out" / "new.onnx"), *options]
        if calib is not None:
            (folder / "in" / "calib.npz").write_bytes(calib)
            argv += ["--calib", str(folder / "in" / "calib.npz")]
        inputs = _digest(folder / "in")
        code, stdout, stderr = _run(argv)
        event(f"exit {code}")
        assert code in (0, 1, 2), f"exit {code}: {stderr.strip()}"
        assert "Traceback" not in stderr + stdout
        assert _digest(folder / "in") == inputs, "an input file changed"
        written = sorted(p.name for p in (folder / "out").iterdir())
        if code == 0:
            assert written == ["new.onnx"], written
            onnx.checker.check_model(str(folder / "out" / "new.onnx"), full_check=_passes_full_check(model))
        else:
            assert written == [], f"exit {code} left {written}"
            lines = stderr.splitlines()
            assert len(lines) == 1, stderr
            prefix = "onnx-lowrank: error: " if code == 2 else "onnx-lowrank: bound not met"
            assert lines[0].startswith(prefix), lines[0]
        return code


# ------------------------------------------------------------------------------------------- bytes


@st.composite
def mutated_bytes(draw, data: bytes) -> bytes:
    data = bytearray(data)
    steps = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "zero"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        steps.append(f"{kind}@{at}")
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "cut":
            del data[at: at + draw(st.integers(1, 64))]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif data:
            data[at] = 0
    mutated = Mutated(data)
    mutated.steps = tuple(steps)
    return mutated


@FUZZ
@given(mutated_bytes(TINY_BYTES))
def test_mutated_model_bytes(data: bytes):
    _check_contract(data, ["--energy", "0.95"])


# ------------------------------------------------------------------------------------------- fields


def _set_attribute(model: onnx.ModelProto, draw) -> None:
    node = draw(st.sampled_from(list(model.graph.node)))
    name = draw(st.sampled_from(["group", "transA", "transB", "alpha", "beta", "strides", "pads", "dilations",
                                 "kernel_shape", "auto_pad", "output_padding", "axis"]))
    for index, attribute in enumerate(node.attribute):
        if attribute.name == name:
            del node.attribute[index]
            break
    if name in ("alpha", "beta"):
        value = draw(st.sampled_from([0.0, -1.0, 2.5, float("nan"), 1e30]))
    elif name == "auto_pad":
        value = draw(st.sampled_from(["SAME_UPPER", "SAME_LOWER", "VALID", "NOTSET", "BOGUS"]))
    elif name in ("group", "transA", "transB", "axis"):
        value = draw(st.integers(-2, 17))
    else:
        value = draw(st.lists(st.integers(-1, 5), min_size=0, max_size=6))
    kind = onnx.AttributeProto.INTS if isinstance(value, list) else None
    node.attribute.append(helper.make_attribute(name, value, attr_type=kind))


def _reshape_weight(model: onnx.ModelProto, draw) -> None:
    tensor = draw(st.sampled_from(list(model.graph.initializer)))
    dims = draw(st.lists(st.integers(0, 12), min_size=0, max_size=4))
    if draw(st.booleans()):  # a consistent array of another shape
        tensor.CopyFrom(onnx.numpy_helper.from_array(np.ones(dims, np.float32), tensor.name))
    else:  # dims that disagree with the payload
        del tensor.dims[:]
        tensor.dims.extend(dims)


def _retype_weight(model: onnx.ModelProto, draw) -> None:
    tensor = draw(st.sampled_from(list(model.graph.initializer)))
    tensor.data_type = draw(st.sampled_from([onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                                             onnx.TensorProto.INT64, onnx.TensorProto.BFLOAT16,
                                             onnx.TensorProto.STRING, 0, 99]))


def _poison_weight(model: onnx.ModelProto, draw) -> None:
    tensor = draw(st.sampled_from(list(model.graph.initializer)))
    try:
        value = onnx.numpy_helper.to_array(tensor).copy()
    except (ValueError, TypeError, KeyError):  # an earlier mutation broke the tensor already
        return
    if value.size and value.dtype.kind == "f":
        value.flat[draw(st.integers(0, value.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e38]))
    tensor.CopyFrom(onnx.numpy_helper.from_array(value, tensor.name))


def _rewire_node(model: onnx.ModelProto, draw) -> None:
    node = draw(st.sampled_from(list(model.graph.node)))
    names = [i.name for i in model.graph.input] + [t.name for t in model.graph.initializer]
    names += [o for n in model.graph.node for o in n.output] + ["", "nowhere"]
    if node.input and draw(st.booleans()):
        node.input[draw(st.integers(0, len(node.input) - 1))] = draw(st.sampled_from(names))
    elif draw(st.booleans()) and node.input:
        del node.input[-1]
    else:
        node.input.append(draw(st.sampled_from(names)))


def _change_op(model: onnx.ModelProto, draw) -> None:
    node = draw(st.sampled_from(list(model.graph.node)))
    node.op_type = draw(st.sampled_from(["Gemm", "MatMul", "Conv", "ConvTranspose", "Relu", "Gather", "Nope"]))


def _change_opset(model: onnx.ModelProto, draw) -> None:
    model.opset_import[0].version = draw(st.integers(-1, 40))


def _change_names(model: onnx.ModelProto, draw) -> None:
    node = draw(st.sampled_from(list(model.graph.node)))
    node.name = draw(st.sampled_from(["", model.graph.node[0].name, "conv", "x", "y", "a b/c:0"]))


def _change_input_shape(model: onnx.ModelProto, draw) -> None:
    graph_input = model.graph.input[0]
    dims = graph_input.type.tensor_type.shape.dim
    del dims[:]
    for value in draw(st.lists(st.one_of(st.integers(-1, 9), st.just("N")), max_size=5)):
        dim = dims.add()
        if isinstance(value, str):
            dim.dim_param = value
        else:
            dim.dim_value = value


MUTATIONS = [_set_attribute, _reshape_weight, _retype_weight, _poison_weight, _rewire_node, _change_op, _change_opset,
             _change_names, _change_input_shape]


class Mutated(bytes):
    """Serialized model bytes that print as the mutations made (hypothesis shows failing examples)."""

    steps: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"Mutated({', '.join(self.steps)})"


@st.composite
def mutated_model(draw, base: onnx.ModelProto) -> Mutated:
    model = onnx.ModelProto()
    model.CopyFrom(base)
    steps = []
    for _ in range(draw(st.integers(1, 3))):
        mutation = draw(st.sampled_from(MUTATIONS))
        mutation(model, draw)
        steps.append(mutation.__name__)
    data = Mutated(model.SerializeToString())
    data.steps = tuple(steps)
    return data


@FUZZ
@given(mutated_model(TINY), st.sampled_from([["--energy", "0.95"], ["--target-params", "0.6"],
                                              ["--ranks-star"], ["--method", "auto", "--target-params", "0.5"]]))
def test_mutated_model_fields(data: bytes, options: list[str]):
    if options == ["--ranks-star"]:
        options = ["--energy", "0.999", "--allow-larger"]
    _check_contract(data, options)


# ------------------------------------------------------------------------------------------- calibration


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


@st.composite
def mutated_calibration(draw) -> bytes:
    arrays = dict(two_input_data(48))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["dtype", "shape", "nonfinite", "drop", "extra", "count", "bytes"]))
        name = draw(st.sampled_from(sorted(arrays) or ["x"]))
        if kind == "bytes":
            return draw(mutated_bytes(_npz(arrays)))
        if name not in arrays:
            continue
        if kind == "dtype":
            arrays[name] = arrays[name].astype(draw(st.sampled_from([np.float64, np.float16, np.int32, np.bool_])))
        elif kind == "shape":
            shape = draw(st.lists(st.integers(0, 20), min_size=0, max_size=4))
            arrays[name] = np.ones(shape, np.float32)
        elif kind == "nonfinite":
            array = arrays[name].copy()
            if array.size:
                array.flat[draw(st.integers(0, array.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
            arrays[name] = array
        elif kind == "drop":
            del arrays[name]
        elif kind == "extra":
            arrays[draw(st.sampled_from(["z", "x ", "M"]))] = np.zeros((48, 16), np.float32)
        elif arrays[name].ndim:  # a "shape" mutation may have left a scalar, which has no count to cut
            arrays[name] = arrays[name][: draw(st.integers(0, 47))]
    return _npz(arrays)


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 30)), deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_calibration())
def test_mutated_calibration(calib: bytes):
    _check_contract(TWO_INPUT_BYTES, ["--tolerance", "0.05"], calib)


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 40)), deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_model(two_input_model()))
def test_mutated_model_with_calibration(data: bytes):
    """The model is run in ONNX Runtime here: a mutated model it cannot load or run is bad input too."""
    _check_contract(data, ["--tolerance", "0.05"], _npz(two_input_data(48)))
