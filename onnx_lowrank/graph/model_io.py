"""Reading and writing models: clear errors for bad files, external data kept, atomic writes."""

from __future__ import annotations

import collections
import itertools
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from ..errors import InputError
from .bodies import all_graphs

TWO_GB = 2**31
FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.DOUBLE,
}


@dataclass(frozen=True)
class LoadedModel:
    """A model and how it came: its path (None for an in-memory proto) and whether it used external data."""

    model: onnx.ModelProto
    path: Path | None
    external_data: bool
    shapes_consistent: bool = True  # passes strict shape inference (the full checker): so must the output
    base_dir: str = ""  # set when the external data was left in its files: the folder they are in

    def materialized(self) -> LoadedModel:
        """The same model with its external data read in (what ONNX Runtime sessions of it need)."""
        if not self.base_dir:
            return self
        try:
            external_data_helper.load_external_data_for_model(self.model, self.base_dir)
        except (OSError, ValueError) as error:
            raise InputError(f"cannot read the external data of {self.path}: {error}") from None
        return replace(self, base_dir="")


def load_model(model_or_path: onnx.ModelProto | str | os.PathLike, lazy: bool = False) -> LoadedModel:
    """Load and check a model; raise InputError naming the problem when it is not a usable ONNX model.

    `lazy`: leave external data in its files; each weight is then read when it is used, one at a time
    (see weights.Weight.value), and written out by save_model(base_dir=...)."""
    if isinstance(model_or_path, onnx.ModelProto):
        model, path, external = model_or_path, None, False
    else:
        path = Path(model_or_path)
        if not path.is_file():
            raise InputError(f"cannot read model {path}: no such file")
        if path.stat().st_size == 0:
            raise InputError(f"cannot read model {path}: the file is empty")
        try:
            model = onnx.load(str(path), load_external_data=False)
            external = any(
                external_data_helper.uses_external_data(t)
                for t in external_data_helper._get_all_tensors(model)
            )
            if external and not lazy:
                external_data_helper.load_external_data_for_model(model, str(path.parent))
        except DecodeError:
            raise InputError(f"{path} is not an ONNX model (it does not parse as a protobuf ModelProto)") from None
        except (OSError, ValueError) as error:
            raise InputError(f"cannot read model {path}: {error}") from None
    if not model.HasField("graph") or not model.opset_import:
        where = path if path is not None else "the given model"
        raise InputError(f"{where} is not an ONNX model (no graph or no opset import)")
    _check_strings(model)
    left_out = external and lazy
    # a model read whole from one file under 2 GB is under 2 GB: no need to size it (BERT-base: 2.2 s)
    one_small_file = path is not None and not external and path.stat().st_size < TWO_GB
    from_file = path is not None and (left_out or not one_small_file and is_large(model))
    consistent = _check(str(path) if from_file else model)
    _check_opset(model)
    _check_tensors(model)
    base_dir = ""
    if left_out:
        assert path is not None  # external data is left out only of a model read from a file
        _check_external_ranges(model, path)
        base_dir = str(path.parent)
    return LoadedModel(model, path, external, consistent, base_dir)


def _check(target: onnx.ModelProto | str) -> bool:
    """The ONNX checker (InputError when it fails), run once with strict shape inference: whether the
    shapes are consistent too. Models over 2 GB, and those whose external data was left in its files,
    are checked from their file."""
    try:
        onnx.checker.check_model(target, full_check=True)
        return True
    except onnx.shape_inference.InferenceError:  # the checker itself passed: it runs before inference
        return False
    except Exception:  # a ValidationError, or inference tripping over what the checks below name
        pass
    try:  # whether the plain checker fails too, or only the strict one
        onnx.checker.check_model(target)
    except onnx.checker.ValidationError as error:
        first_line = str(error).strip().splitlines()[0]
        raise InputError(f"invalid model: {first_line}") from None
    return False


def is_repeated(field) -> bool:
    """Whether a protobuf field descriptor is a repeated field (protobuf >= 6 says so; older ones by label)."""
    return field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED


def _check_strings(message) -> None:
    """Protobuf parses onnx's (proto2) strings without checking them; one that is not UTF-8 fails later,
    anywhere (the checker, onnx-graphsurgeon)."""
    for field, value in message.ListFields():
        repeated = is_repeated(field)
        if field.type == field.TYPE_MESSAGE:
            for item in value if repeated else [value]:
                _check_strings(item)
        elif field.type == field.TYPE_STRING:  # upb hands back undecodable strings as bytes
            if any(isinstance(item, bytes) for item in (value if repeated else [value])):
                raise InputError(f"invalid model: a {field.name} string in it is not valid UTF-8")


def _check_opset(model: onnx.ModelProto) -> None:
    """The checker accepts any opset number; the rewrite needs the op schemas of the model's opset."""
    newest = onnx.defs.onnx_opset_version()
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx") and not 1 <= entry.version <= newest:
            raise InputError(f"unsupported opset {entry.version} (onnx-lowrank handles 1 to {newest})")


_TYPED_FIELD: dict[int, str] = {
    onnx.TensorProto.FLOAT: "float_data",
    onnx.TensorProto.DOUBLE: "double_data",
    onnx.TensorProto.FLOAT16: "int32_data",
    onnx.TensorProto.BFLOAT16: "int32_data",
}


def _check_tensors(model: onnx.ModelProto) -> None:
    """Floating-point constants whose payload disagrees with their shape: the checker lets them pass."""
    known = set(onnx.TensorProto.DataType.values()) - {onnx.TensorProto.UNDEFINED}
    for tensor in external_data_helper._get_all_tensors(model):
        if tensor.data_type not in known:
            raise InputError(f"invalid model: tensor {tensor.name!r} has unknown element type {tensor.data_type}")
        if tensor.data_type not in FLOAT_TYPES or tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue
        if any(dim < 0 for dim in tensor.dims):
            raise InputError(f"invalid model: tensor {tensor.name!r} has a negative dimension {list(tensor.dims)}")
        count = math.prod(tensor.dims)
        if tensor.HasField("raw_data"):
            size = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
            found, expected, unit = len(tensor.raw_data), count * size, "bytes"
        else:
            found, expected, unit = len(getattr(tensor, _TYPED_FIELD[tensor.data_type])), count, "values"
        if found != expected:
            raise InputError(f"invalid model: tensor {tensor.name!r} of shape {list(tensor.dims)} "
                             f"holds {found} {unit}, not {expected}")


def _check_external_ranges(model: onnx.ModelProto, path: Path) -> None:
    """What reading external data left in its files would find wrong, found now without reading it (the
    checker has seen that the files exist): a tensor whose bytes are not all in its file, or whose length
    is not its shape's."""
    for tensor in external_data_helper._get_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = external_data_helper.ExternalDataInfo(tensor)
        size = os.path.getsize(path.parent / info.location)
        offset = info.offset or 0
        length = info.length if info.length is not None else size - offset
        expected = length  # sub-byte and other element types: only the range is checked
        if tensor.data_type in FLOAT_TYPES:
            expected = math.prod(tensor.dims) * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        if length != expected or offset + length > size:
            raise InputError(f"cannot read model {path}: tensor {tensor.name!r} of shape {list(tensor.dims)} needs "
                             f"{expected} bytes at offset {offset} of {info.location}, which holds {size} bytes")


def serialized_or_none(model: onnx.ModelProto) -> bytes | None:
    """The model's bytes, or None when it is too big for one protobuf message (2 GB). Serializing
    directly: sizing it first (is_large) walks a large model as long as serializing does."""
    try:
        serialized = model.SerializeToString()
    except Exception:  # ValueError / EncodeError: over the limit
        return None
    return serialized if len(serialized) < TWO_GB else None


def is_large(model: onnx.ModelProto) -> bool:
    """Whether the model is too big for one protobuf message (2 GB): protobuf refuses even to size it."""
    try:
        return model.ByteSize() >= TWO_GB
    except Exception:  # EncodeError: over the limit
        return True


def check_output_path(output: str | os.PathLike, source: Path | None) -> Path:
    """Fail early (before any work) when the output cannot be written or would overwrite the input."""
    output = Path(output)
    if output.is_dir():
        raise InputError(f"cannot write {output}: it is a directory")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"cannot write {output}: directory {parent} does not exist")
    try:  # a real file, not os.access: root passes that check even on a read-only file system
        handle, probe = tempfile.mkstemp(prefix=f".{output.name}.", dir=parent)
    except OSError:
        raise InputError(f"cannot write {output}: directory {parent} is not writable") from None
    os.close(handle)
    os.unlink(probe)
    if source is not None and output.resolve() == source.resolve():
        raise InputError(f"output {output} is the input model; choose another path")
    return output


def save_model(
    model: onnx.ModelProto, output: str | os.PathLike, external_data: bool, base_dir: str = "",
    check: bool | None = None,
) -> None:
    """Write the model atomically: into a temporary folder beside the target, then rename into place.

    With external data (asked for, forced by a model over 2 GB, or tensors still in the input's files
    under `base_dir`) the tensors go to OUTPUT.data, one at a time, and the caller's model is left as it
    was. `check`: run the ONNX checker on the written file (True: with strict shape inference) before
    it takes the output's place; for models that cannot be checked in memory.
    """
    output = Path(output)
    external_data = external_data or bool(base_dir) or is_large(model)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        staged = staging / output.name
        data_name = output.name + ".data"
        if external_data:
            _save_with_external_data(model, staged, data_name, base_dir)
        else:
            onnx.save_model(model, str(staged))
        if check is not None:
            try:
                onnx.checker.check_model(str(staged), full_check=check)
            except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
                raise RuntimeError(f"the rewritten model fails the ONNX checker: {error}") from error
        if (staging / data_name).exists():
            os.replace(staging / data_name, output.parent / data_name)
        os.replace(staged, output)
    except OSError as error:
        raise InputError(f"cannot write {output}: {error.strerror or error}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


EXTERNAL_THRESHOLD = 1024  # bytes: smaller tensors stay in the model file
_CHUNK = 64 * 2**20


def _save_with_external_data(model: onnx.ModelProto, staged: Path, data_name: str, base_dir: str) -> None:
    """Every tensor of EXTERNAL_THRESHOLD bytes or more into one data file beside `staged`, streamed: a
    tensor in memory is written and dropped from the proto, one still in the input's files (under
    `base_dir`) is copied across in chunks. Afterwards the proto is put back as it was."""
    moved: list[tuple[onnx.TensorProto, list[tuple[str, str]] | None, int, int]] = []
    # like onnx.save_model: initializers (of subgraphs too) go out, Constant nodes' tensors stay in
    tensors = itertools.chain(((t, True) for t in external_data_helper._get_initializer_tensors(model)),
                              ((t, False) for t in external_data_helper._get_attribute_tensors(model)))
    try:
        with open(staged.parent / data_name, "wb") as data:
            for tensor, initializer in tensors:
                if external_data_helper.uses_external_data(tensor):
                    previous = [(entry.key, entry.value) for entry in tensor.external_data]
                    offset = data.tell()
                    _copy_external(tensor, base_dir, data)
                elif initializer and tensor.HasField("raw_data") and len(tensor.raw_data) >= EXTERNAL_THRESHOLD:
                    previous, offset = None, data.tell()
                    data.write(tensor.raw_data)
                    tensor.ClearField("raw_data")
                else:
                    continue
                length = data.tell() - offset
                moved.append((tensor, previous, offset, length))
                _point_to(tensor, [("location", data_name), ("offset", str(offset)), ("length", str(length))])
                tensor.data_location = onnx.TensorProto.EXTERNAL
        onnx.save_model(model, str(staged))
    finally:
        if moved:
            with open(staged.parent / data_name, "rb") as data:
                for tensor, previous, offset, length in moved:
                    _point_to(tensor, previous or [])
                    if previous is None:  # back into the proto, from the file just written
                        tensor.data_location = onnx.TensorProto.DEFAULT
                        data.seek(offset)
                        tensor.raw_data = data.read(length)


def _point_to(tensor: onnx.TensorProto, entries: list[tuple[str, str]]) -> None:
    del tensor.external_data[:]
    for key, value in entries:
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _copy_external(tensor: onnx.TensorProto, base_dir: str, data) -> None:
    """A tensor's bytes from its external file into `data`, in chunks."""
    info = external_data_helper.ExternalDataInfo(tensor)
    path = os.path.join(base_dir, info.location)
    offset = info.offset or 0
    left = info.length or os.path.getsize(path) - offset  # no length: to the end of the file
    with open(path, "rb") as source:
        source.seek(offset)
        while left > 0:
            chunk = source.read(min(_CHUNK, left))
            if not chunk:
                break
            data.write(chunk)
            left -= len(chunk)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a small text file (the JSON report) atomically."""
    path = Path(path)
    handle, staged = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.chmod(staged, 0o666 & ~_umask())  # mkstemp makes it private; a report is an ordinary file
        os.replace(staged, path)
    except OSError as error:
        Path(staged).unlink(missing_ok=True)
        raise InputError(f"cannot write {path}: {error.strerror or error}") from None


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


@dataclass(frozen=True)
class ModelStats:
    """What the before/after summary compares."""

    params: int
    bytes: int
    ops: dict[str, int]


def model_stats(model: onnx.ModelProto) -> ModelStats:
    """Parameters (elements of floating-point and 8-bit integer constants: quantized weights, with their
    zero points; two a byte where MatMulNBits or GatherBlockQuantized read them as 4-bit), serialized bytes
    and node counts by op type, bodies of If / Loop / Scan included."""
    nibbles = _four_bit_constants(model)
    params = 0
    for tensor in _constant_tensors(model.graph):
        if tensor.data_type in FLOAT_TYPES or tensor.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
            count = 2 if tensor.name in nibbles else 1
            for dim in tensor.dims:
                count *= dim
            params += count
    ops = collections.Counter(node.op_type for graph in all_graphs(model.graph) for node in graph.node)
    return ModelStats(params=params, bytes=_serialized_bytes(model), ops=dict(sorted(ops.items())))


FOUR_BIT_INPUTS = {"MatMulNBits": (1, 3), "GatherBlockQuantized": (0, 3)}  # weights and zero points


def _four_bit_constants(model: onnx.ModelProto) -> set[str]:
    """Names of the constants com.microsoft's block-quantized ops read as packed 4-bit values (a Reshape
    between them and the op, as a tied head reads its table's, included)."""
    graphs = list(all_graphs(model.graph))
    reshaped = {node.output[0]: node.input[0] for graph in graphs for node in graph.node if node.op_type == "Reshape"}
    found = set()
    for graph in graphs:
        for node in graph.node:
            bits = next((attribute.i for attribute in node.attribute if attribute.name == "bits"), 4)
            if node.domain == "com.microsoft" and node.op_type in FOUR_BIT_INPUTS and bits == 4:
                for position in FOUR_BIT_INPUTS[node.op_type]:
                    if position < len(node.input) and node.input[position]:
                        name = node.input[position]
                        found.add(reshaped.get(name, name))
    return found


def _constant_tensors(graph: onnx.GraphProto):
    """Initializers and Constant nodes' values, in the graph and its If / Loop / Scan bodies."""
    for inner in all_graphs(graph):
        yield from inner.initializer
        for node in inner.node:
            if node.op_type == "Constant":
                for attribute in node.attribute:
                    if attribute.name == "value":
                        yield attribute.t


def _serialized_bytes(model: onnx.ModelProto) -> int:
    """The model file's size plus what its tensors still in external files hold."""
    outside = sum(external_data_helper.ExternalDataInfo(t).length or 0
                  for t in _constant_tensors(model.graph) if external_data_helper.uses_external_data(t))
    try:
        return model.ByteSize() + outside
    except Exception:  # protobuf refuses to size messages over 2 GB; count the tensor payloads instead
        return sum(len(t.raw_data) for t in _constant_tensors(model.graph)) + outside
