"""`--cache DIR`: what a second run on the same model and calibration data need not compute again.

Kept per key (a SHA-256 of everything the result depends on: the model's nodes and constants, the
calibration samples used, provider, batch size, the layers found, method): the calibration statistics
of every layer (the ONNX Runtime pass over the fit samples) and the measured sensitivities (one probe
run per layer). A second run with another tolerance, budget or metric skips both. Files are .npz and
.json written atomically; a damaged or foreign file is ignored and recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

from ..errors import InputError, known
from .calibration import Samples
from .statistics import Counts, Moments, Tied

FORMAT = "onnx-lowrank-cache-1"
_MOMENT_FIELDS = ("total", "outer", "origin", "third", "fourth")


def model_fingerprint(model: onnx.ModelProto) -> str:
    """A digest of the graph and its constants, whatever the model's size (no whole serialization)."""
    digest = hashlib.sha256(FORMAT.encode())
    graph = model.graph
    for part in (*graph.input, *graph.output, *graph.node, *graph.initializer):
        digest.update(part.SerializeToString())
    for entry in model.opset_import:
        digest.update(f"{entry.domain}:{entry.version}".encode())
    return digest.hexdigest()


def samples_fingerprint(samples: Samples, indices: Sequence[int]) -> str:
    digest = hashlib.sha256()
    for index in indices:
        for name, value in sorted(samples.feeds[index].items()):
            array = np.ascontiguousarray(value)
            digest.update(f"{index}:{name}:{array.dtype.str}:{array.shape}".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


def key_of(*parts: object) -> str:
    return hashlib.sha256(json.dumps([str(part) for part in parts]).encode()).hexdigest()[:32]


class Cache:
    """A folder of cached results; `Cache(None)` keeps nothing."""

    def __init__(self, folder: str | os.PathLike | None):
        self.folder = None if folder is None else Path(folder)
        if self.folder is not None:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise InputError(f"cannot use cache folder {self.folder}: {error.strerror or error}") from None
            if not os.access(self.folder, os.W_OK):
                raise InputError(f"cannot use cache folder {self.folder}: it is not writable")

    def statistics(self, key: str | None) -> list[Moments | Counts | Tied] | None:
        path = self._path("statistics", key, ".npz")
        if path is None or not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as stored:
                if str(stored["format"]) != FORMAT:
                    return None
                return [_unpack(stored, f"{i}.") for i in range(int(stored["units"]))]
        except (OSError, ValueError, KeyError):
            return None

    def save_statistics(self, key: str | None, statistics: Sequence[Moments | Counts | Tied]) -> None:
        path = self._path("statistics", key, ".npz")
        if path is None:
            return
        arrays: dict[str, np.ndarray] = {"format": np.array(FORMAT), "units": np.array(len(statistics))}
        for i, entry in enumerate(statistics):
            arrays.update(_pack(entry, f"{i}."))
        self._write(path, lambda stream: np.savez(stream, **arrays))  # type: ignore[arg-type]  # numpy's stub
        # takes the keywords for its allow_pickle flag

    def floats(self, kind: str, key: str) -> list[float] | None:
        path = self._path(kind, key, ".json")
        if path is None or not path.is_file():
            return None
        try:
            stored = json.loads(path.read_text())
            return [float(value) for value in stored["values"]] if stored.get("format") == FORMAT else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save_floats(self, kind: str, key: str, values: Sequence[float]) -> None:
        path = self._path(kind, key, ".json")
        if path is not None:
            text = json.dumps({"format": FORMAT, "values": [float(v) for v in values]})
            self._write(path, lambda stream: stream.write(text.encode()))

    def file(self, name: str) -> Path | None:
        """A file in the cache folder for results keyed by their own content (the latency gate's
        timings, shared by every model: they depend on shapes, not weights)."""
        return None if self.folder is None else self.folder / name

    def _path(self, kind: str, key: str | None, suffix: str) -> Path | None:
        return None if self.folder is None else self.folder / f"{kind}-{key}{suffix}"

    def _write(self, path: Path, write) -> None:
        write_cache_file(path, write)


def write_cache_file(path: Path, write) -> None:
    """`write(stream)` into a temporary file beside `path`, renamed into place; a cache that cannot be
    written only costs time, so failures are dropped."""
    try:
        handle, staged = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError:
        return
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
        os.replace(staged, path)
    except OSError:
        Path(staged).unlink(missing_ok=True)


def _pack(entry: Moments | Counts | Tied, prefix: str) -> dict[str, np.ndarray]:
    if isinstance(entry, Tied):
        return {prefix + "kind": np.array("tied"), **_pack(entry.counts, prefix + "lookup."),
                **_pack(entry.moments, prefix + "head.")}
    if isinstance(entry, Counts):
        return {prefix + "kind": np.array("counts"), prefix + "count": entry.count}
    arrays = {prefix + "kind": np.array("moments"), prefix + "count": np.array(entry.count)}
    for name in _MOMENT_FIELDS:
        value = getattr(entry, name)
        if value is not None:
            arrays[prefix + name] = value
    return arrays


def _unpack(stored, prefix: str) -> Moments | Counts | Tied:
    if str(stored[prefix + "kind"]) == "tied":
        counts, moments = _unpack(stored, prefix + "lookup."), _unpack(stored, prefix + "head.")
        if not isinstance(counts, Counts) or not isinstance(moments, Moments):
            raise ValueError("a stored tied entry holds other statistics")  # read as a cache miss
        return Tied(counts, moments)
    if str(stored[prefix + "kind"]) == "counts":
        return Counts(stored[prefix + "count"].copy())
    fields = {name: stored[prefix + name].copy() if prefix + name in stored.files else None for name in _MOMENT_FIELDS}
    return Moments(int(stored[prefix + "count"]), known(fields["total"], "the stored total"),
                   known(fields["outer"], "the stored outer sum"), fields["origin"], fields["third"], fields["fourth"])
