"""Calibration data: loading, checking against the model's inputs, and the fit / validation split.

Sources: an .npz of arrays keyed by input name with axis 0 indexing samples (batched by the tool), a
folder of .npz files each holding one complete feed (used as is: for inputs with no batch axis, scalar
inputs, recurrent state), an onnxruntime CalibrationDataReader, or any iterable of feed dicts (each one
a sample, used as is).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from ..errors import InputError

MIN_FIT = 8  # samples that fit the statistics, at least
MIN_VALIDATION = 8  # held-out samples that validate, at least
# statistics need few samples (every position counts); validation needs many, and metrics that count
# discrete decisions (top1, accuracy) more still: one borderline sample is a whole error quantum
VALIDATION_FRACTION = 0.5
DISCRETE_VALIDATION_FRACTION = 0.75


@dataclass
class Samples:
    """Calibration samples, each a complete feed. `batched`: every feed holds one sample on axis 0 (from
    an .npz), so feeds may be concatenated into batches; otherwise each feed runs on its own."""

    feeds: list[dict[str, np.ndarray]]
    batched: bool
    labels: np.ndarray | None = None  # one label (or label array) per sample
    max_batch: int | None = None  # the model fixes its batch at 1: stacked samples run one at a time

    def __len__(self) -> int:
        return len(self.feeds)

    def batches(self, indices: list[int], batch_size: int) -> Iterator[tuple[list[int], dict[str, np.ndarray]]]:
        """Feeds to run for these samples: concatenated `batch_size` at a time when batched."""
        step = min(batch_size, self.max_batch or batch_size) if self.batched else 1
        for start in range(0, len(indices), step):
            chunk = indices[start : start + step]
            if self.batched:
                names = self.feeds[chunk[0]].keys()
                yield chunk, {name: np.concatenate([self.feeds[i][name] for i in chunk]) for name in names}
            else:
                yield chunk, self.feeds[chunk[0]]


@dataclass(frozen=True)
class Split:
    fit: list[int]
    validation: list[int]


def model_inputs(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """The inputs a feed must provide (graph inputs that are not initializers)."""
    initializers = {t.name for t in model.graph.initializer}
    return {v.name: v for v in model.graph.input if v.name not in initializers}


def load_calibration(source, model: onnx.ModelProto, labels=None) -> Samples:
    """Read calibration data from any supported source and check it against the model's inputs."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            files = sorted(path.glob("*.npz"))
            if not files:
                raise InputError(f"calibration folder {path} has no .npz files")
            samples = Samples([_read_npz(f) for f in files], batched=False)
        elif path.is_file():
            samples = _split_samples(_read_npz(path), path)
        else:
            raise InputError(f"cannot read calibration data {path}: no such file or folder")
    elif hasattr(source, "get_next"):
        samples = Samples(list(iter(source.get_next, None)), batched=False)
    elif isinstance(source, Mapping):
        samples = _split_samples({k: np.asarray(v) for k, v in source.items()}, "the calibration arrays")
    elif isinstance(source, Iterable):
        samples = Samples([dict(feed) for feed in source], batched=False)
    else:
        raise InputError(f"calibration must be a path, a CalibrationDataReader or feed dicts, not {type(source).__name__}")
    if not samples.feeds:
        raise InputError("the calibration set is empty")
    _check_feeds(samples, model)
    if samples.batched:
        samples.max_batch = _fixed_batch(model)
    if labels is not None:
        samples.labels = _load_labels(labels, len(samples))
    return samples


def split(samples: Samples, seed: int, fraction: float = VALIDATION_FRACTION) -> Split:
    """A seeded shuffle: `fraction` of the samples (at least MIN_VALIDATION) validates, the rest fits."""
    count = len(samples)
    held_out = max(MIN_VALIDATION, round(fraction * count))
    held_out = min(held_out, count - MIN_FIT) if count >= MIN_FIT + MIN_VALIDATION else held_out
    if count - held_out < MIN_FIT:
        raise InputError(f"too few calibration samples ({count}): need at least {MIN_FIT + MIN_VALIDATION} "
                         f"({MIN_FIT} to fit the statistics, {MIN_VALIDATION} to validate){_split_words(fraction)}")
    order = np.random.default_rng(seed).permutation(count).tolist()
    return Split(fit=sorted(order[held_out:]), validation=sorted(order[:held_out]))


def _split_words(fraction: float) -> str:
    """How the samples are split at `fraction` held out, from how many on, in words (too-few-samples message)."""
    share = {0.5: "half", 0.75: "three quarters"}.get(fraction, f"{fraction:.0%}")
    full = next(n for n in range(MIN_FIT + MIN_VALIDATION, 10_000) if n - round(fraction * n) >= MIN_FIT)
    held = round(fraction * full)
    if full == MIN_FIT + MIN_VALIDATION:
        return f"; {share} are held out to validate"
    return (f"; {share} are held out to validate from {full} samples on ({held} validate, {full - held} fit), "
            f"fewer below so that {MIN_FIT} fit")


TOKEN_INPUT = "input_ids"  # the graph input the perplexity metric reads the text from ...
MASK_INPUT = "attention_mask"  # ... and the one marking valid positions (optional; its last columns)


def next_token_targets(samples: Samples) -> np.ndarray:
    """Per sample, the id each position of `input_ids` should predict: the next id, or -1 where there is
    none or the attention mask marks that position or the next one as padding. The perplexity metric's
    targets: a language model's calibration text is its own label."""
    targets = []
    for feed in samples.feeds:
        if TOKEN_INPUT not in feed:
            raise InputError(f"the perplexity metric reads the token ids from a model input named {TOKEN_INPUT!r}, "
                             f"which the calibration data lacks (it has {', '.join(feed)})")
        ids = np.asarray(feed[TOKEN_INPUT])
        if ids.dtype.kind not in "iu" or ids.ndim < 1:
            raise InputError(f"perplexity: input {TOKEN_INPUT!r} must hold integer token ids, not {ids.dtype}{list(ids.shape)}")
        valid = np.ones(ids.shape, dtype=bool)
        if MASK_INPUT in feed:
            mask = np.asarray(feed[MASK_INPUT])
            if mask.shape[:-1] != ids.shape[:-1] or mask.shape[-1] < ids.shape[-1]:
                raise InputError(f"perplexity: {MASK_INPUT!r} of shape {list(mask.shape)} does not cover "
                                 f"{TOKEN_INPUT!r} of shape {list(ids.shape)}")
            valid = mask[..., mask.shape[-1] - ids.shape[-1]:] != 0  # a mask over past + new tokens
        target = np.full(ids.shape, -1, dtype=np.int64)
        target[..., :-1] = np.where(valid[..., :-1] & valid[..., 1:], ids[..., 1:], -1)
        targets.append(target)
    if len({target.shape for target in targets}) > 1:
        raise InputError(f"perplexity: the calibration feeds' {TOKEN_INPUT!r} differ in shape; give them one shape")
    return np.stack(targets)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            raise InputError(f"calibration file {path} holds one unnamed array (.npy); use an .npz keyed by input name")
        with loaded as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise InputError(f"cannot read calibration file {path}: {error}") from None


def _split_samples(arrays: dict[str, np.ndarray], where) -> Samples:
    """One .npz of stacked samples: axis 0 of every array indexes samples."""
    if not arrays:
        raise InputError(f"{where} holds no arrays")
    counts = {name: (array.shape[0] if array.ndim else None) for name, array in arrays.items()}
    if None in counts.values():
        scalar = next(name for name, count in counts.items() if count is None)
        raise InputError(f"calibration array {scalar!r} in {where} is a scalar; stacked samples need axis 0 "
                         "(use a folder of .npz feeds for scalar inputs)")
    if len(set(counts.values())) > 1:
        raise InputError(f"calibration arrays in {where} disagree on the number of samples: {counts}")
    count = next(iter(counts.values()))
    assert count is not None  # no scalars (above)
    feeds = [{name: array[i : i + 1] for name, array in arrays.items()} for i in range(count)]
    return Samples(feeds, batched=True)


def _fixed_batch(model: onnx.ModelProto) -> int | None:
    """1 when an input fixes axis 0 at 1 (stacked samples then run one by one); an InputError when an
    input fixes it at more, since rows of an .npz cannot be grouped into a batch the model accepts."""
    fixed = set()
    for name, info in model_inputs(model).items():
        dims = info.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            fixed.add((name, dims[0].dim_value))
    wider = [(name, size) for name, size in fixed if size > 1]
    if wider:
        name, size = wider[0]
        raise InputError(f"model input {name!r} has a fixed batch of {size}; stacked .npz samples cannot fill it, "
                         "give a folder of .npz files each holding one complete feed")
    return 1 if fixed else None


def _check_feeds(samples: Samples, model: onnx.ModelProto) -> None:
    expected = model_inputs(model)
    for position, feed in enumerate(samples.feeds):
        where = "calibration data" if samples.batched else f"calibration feed {position}"
        missing = sorted(set(expected) - set(feed))
        if missing:
            raise InputError(f"{where} lacks model input {missing[0]!r}")
        unknown = sorted(set(feed) - set(expected))
        if unknown:
            raise InputError(f"{where} has {unknown[0]!r}, which is not a model input ({', '.join(expected)})")
        for name, array in feed.items():
            _check_array(name, np.asarray(array), expected[name], where, check_first_axis=not samples.batched)


def _check_array(name: str, array: np.ndarray, info: onnx.ValueInfoProto, where: str, check_first_axis: bool) -> None:
    tensor_type = info.type.tensor_type
    want = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
    if array.dtype != want:
        raise InputError(f"{where}: input {name!r} has dtype {array.dtype}, the model expects {np.dtype(want)}")
    if tensor_type.HasField("shape"):
        dims = tensor_type.shape.dim
        if array.ndim != len(dims):
            raise InputError(f"{where}: input {name!r} has {array.ndim} dimensions, the model expects {len(dims)}")
        for axis, (size, dim) in enumerate(zip(array.shape, dims)):
            fixed = dim.HasField("dim_value") and dim.dim_value > 0
            if fixed and size != dim.dim_value and (axis > 0 or check_first_axis):
                raise InputError(f"{where}: input {name!r} has size {size} on axis {axis}, the model expects {dim.dim_value}")
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        raise InputError(f"{where}: input {name!r} contains NaN or Inf")


LABELS_FORMAT = "labels must be a .npy array of one integer class per calibration sample"


def _load_labels(labels, count: int) -> np.ndarray:
    if isinstance(labels, (str, os.PathLike)):
        try:
            loaded = np.load(labels, allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:
            raise InputError(f"cannot read labels {labels}: {error}") from None
        if isinstance(loaded, np.lib.npyio.NpzFile):  # an archive of arrays (a calibration .npz?), not labels
            loaded.close()
            raise InputError(f"{LABELS_FORMAT} ({count} here); {labels} is an .npz archive of arrays")
        labels = loaded
    labels = np.asarray(labels)
    if labels.ndim == 0 or labels.shape[0] != count:
        raise InputError(f"labels hold {labels.shape[0] if labels.ndim else 'no'} entries for {count} calibration "
                         f"samples: {LABELS_FORMAT}")
    if labels.dtype.kind not in "iu" and not (labels.dtype.kind == "f" and np.all(np.mod(labels, 1) == 0)):
        raise InputError(f"{LABELS_FORMAT}, not {labels.dtype} values")
    return labels
