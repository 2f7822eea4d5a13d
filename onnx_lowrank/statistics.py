"""One streaming pass of calibration data through ONNX Runtime that accumulates, per layer, the float64
mean and second moment of the vectors the layer sees (inputs) or makes (output channels).

The observed tensors are exposed as extra graph outputs, a bounded number per pass; each batch's
activations are folded into the sums and dropped, so memory holds the statistics, never the activations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from .calibration import Samples
from .layers import Layer
from .runtime import Session


@dataclass
class Moments:
    """Sums over rows of (G, positions, d) arrays, taken about an origin (the first batch's mean) so
    that a large common offset, such as a bias inside a conv's outputs, does not swamp the spread."""

    count: int
    total: np.ndarray  # (G, d): sum of (row - origin)
    outer: np.ndarray  # (G, d, d): sum of (row - origin)(row - origin)^T
    origin: np.ndarray | None = None  # (G, d)

    @classmethod
    def empty(cls, groups: int, dim: int) -> Moments:
        return cls(0, np.zeros((groups, dim)), np.zeros((groups, dim, dim)))

    def add(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.float64)
        if rows.shape[1] == 0:
            return
        if self.origin is None:
            self.origin = rows.mean(axis=1)
        centred = rows - self.origin[:, None, :]
        self.count += rows.shape[1]
        self.total += centred.sum(axis=1)
        self.outer += np.swapaxes(centred, 1, 2) @ centred

    def merged(self, other: Moments) -> Moments:
        if other.origin is None:
            return Moments(self.count, self.total.copy(), self.outer.copy(), self.origin)
        if self.origin is None:
            return other.merged(self)
        delta = other.origin - self.origin  # re-express the other's sums about this origin
        total = other.total + other.count * delta
        outer = (other.outer + other.total[:, :, None] * delta[:, None, :] + delta[:, :, None] * other.total[:, None, :]
                 + other.count * delta[:, :, None] * delta[:, None, :])
        return Moments(self.count + other.count, self.total + total, self.outer + outer, self.origin)

    @property
    def mean(self) -> np.ndarray:
        offset = self.total / max(self.count, 1)
        return offset if self.origin is None else self.origin + offset

    @property
    def covariance(self) -> np.ndarray:
        """E[(v - mean)(v - mean)^T] per group (symmetrised against rounding)."""
        offset = self.total / max(self.count, 1)
        covariance = self.outer / max(self.count, 1) - offset[:, :, None] * offset[:, None, :]
        return (covariance + np.swapaxes(covariance, 1, 2)) / 2

    @property
    def second_moment(self) -> np.ndarray:
        """E[v v^T] per group."""
        mean = self.mean
        return self.covariance + mean[:, :, None] * mean[:, None, :]


def collect(
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    samples: Samples,
    indices: list[int],
    provider: str,
    batch_size: int = 8,
    max_outputs: int = 64,
    progress: Callable[[int], None] | None = None,
) -> list[Moments]:
    """Moments of every layer's observed tensor over the given samples (one entry per layer).

    Layers that observe the same tensor the same way (e.g. the Q, K and V projections of one input)
    share one accumulation. `progress` is called with the number of samples each batch covered.
    """
    jobs: dict[tuple, tuple[Layer, Moments]] = {}
    keys = []
    for layer in layers:
        tensor, _ = layer.adapter.observed(layer)
        key = (tensor.name, type(layer.adapter).__name__, repr(layer.info), repr(sorted(layer.node.attrs.items())))
        if key not in jobs:
            groups, out_dim, in_dim = layer.matrices.shape
            dim = in_dim if layer.adapter.observed(layer)[1] == "input" else out_dim
            jobs[key] = (layer, Moments.empty(groups, dim))
        keys.append(key)
    graph_inputs = {i.name for i in model.graph.input}
    names = list(dict.fromkeys(key[0] for key in jobs))
    for start in range(0, max(len(names), 1), max_outputs):
        chunk = names[start : start + max_outputs]
        session = _augmented_session(model, [n for n in chunk if n not in graph_inputs], provider)
        for batch_indices, feed in samples.batches(indices, batch_size):
            fetched = {n: feed[n] for n in chunk if n in graph_inputs}
            wanted = [n for n in chunk if n not in graph_inputs]
            if wanted:
                fetched.update(zip(wanted, session.run(feed, wanted)))
            for key, (layer, moments) in jobs.items():
                if key[0] in fetched:
                    moments.add(layer.adapter.rows(layer, fetched[key[0]]))
            if progress is not None and start == 0:
                progress(len(batch_indices))
    return [jobs[key][1] for key in keys]


def _augmented_session(model: onnx.ModelProto, names: list[str], provider: str) -> Session:
    """A session whose outputs include `names`; the model is restored afterwards (no copy of it is made)."""
    existing = {o.name for o in model.graph.output}
    added = [onnx.ValueInfoProto(name=name) for name in names if name not in existing]
    model.graph.output.extend(added)
    try:
        return Session(model, provider)
    finally:
        del model.graph.output[len(model.graph.output) - len(added) :]
