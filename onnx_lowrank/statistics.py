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
    """Sums over rows of (G, positions, d) arrays: how many rows, their sum and their outer products."""

    count: int
    total: np.ndarray  # (G, d)
    outer: np.ndarray  # (G, d, d)

    @classmethod
    def empty(cls, groups: int, dim: int) -> Moments:
        return cls(0, np.zeros((groups, dim)), np.zeros((groups, dim, dim)))

    def add(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.float64)
        self.count += rows.shape[1]
        self.total += rows.sum(axis=1)
        self.outer += np.swapaxes(rows, 1, 2) @ rows

    def merged(self, other: Moments) -> Moments:
        return Moments(self.count + other.count, self.total + other.total, self.outer + other.outer)

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)

    @property
    def second_moment(self) -> np.ndarray:
        """E[v v^T] per group."""
        return self.outer / max(self.count, 1)

    @property
    def covariance(self) -> np.ndarray:
        """E[(v - mean)(v - mean)^T] per group (symmetrised against rounding)."""
        mean = self.mean
        covariance = self.second_moment - mean[:, :, None] * mean[:, None, :]
        return (covariance + np.swapaxes(covariance, 1, 2)) / 2


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
