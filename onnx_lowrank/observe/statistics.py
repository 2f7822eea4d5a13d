"""One streaming pass of calibration data through ONNX Runtime that accumulates, per layer, the float64
mean and second moment of the vectors the layer sees (inputs) or makes (output channels).

The observed tensors are exposed as extra graph outputs, a bounded number per pass; each batch's
activations are folded into the sums and dropped, so memory holds the statistics, never the activations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import InputError
from ..graph.layers import Layer, Unit
from .calibration import Samples
from .exposed import Request, exposed, fetch_request, unstacked
from .sessions import session_with_outputs


@dataclass
class Moments:
    """Sums over rows of (G, positions, d) arrays, taken about an origin (the first batch's mean) so
    that a large common offset, such as a bias inside a conv's outputs, does not swamp the spread.
    The third and fourth moments of the row norms say how noisy the covariance is (its shrinkage)."""

    count: int
    total: np.ndarray  # (G, d): sum of a = row - origin
    outer: np.ndarray  # (G, d, d): sum of a a^T
    origin: np.ndarray | None = None  # (G, d)
    third: np.ndarray | None = None  # (G, d): sum of |a|^2 a
    fourth: np.ndarray | None = None  # (G,): sum of |a|^4

    @classmethod
    def empty(cls, groups: int, dim: int) -> Moments:
        return cls(0, np.zeros((groups, dim)), np.zeros((groups, dim, dim)), None, np.zeros((groups, dim)), np.zeros(groups))

    def add(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.float64)
        if rows.shape[1] == 0:
            return
        if self.origin is None:
            self.origin = rows.mean(axis=1)
        centred = rows - self.origin[:, None, :]
        squares = np.sum(centred**2, axis=2)  # (G, P)
        self.count += rows.shape[1]
        self.total += centred.sum(axis=1)
        self.outer += np.swapaxes(centred, 1, 2) @ centred
        if self.third is not None and self.fourth is not None:
            self.third += np.einsum("gp,gpd->gd", squares, centred)
            self.fourth += np.sum(squares**2, axis=1)

    def merged(self, other: Moments) -> Moments:
        """Both sets of sums together, about this one's origin."""
        if other.origin is None:
            return Moments(self.count, self.total.copy(), self.outer.copy(), self.origin,
                           None if self.third is None else self.third.copy(),
                           None if self.fourth is None else self.fourth.copy())
        if self.origin is None:
            return other.merged(self)
        total, outer, third, fourth = other._about(other.origin - self.origin)
        return Moments(
            self.count + other.count, self.total + total, self.outer + outer, self.origin,
            None if third is None or self.third is None else self.third + third,
            None if fourth is None or self.fourth is None else self.fourth + fourth,
        )

    def _about(self, delta: np.ndarray) -> tuple:
        """The sums re-expressed for a + delta (rows measured from origin - delta), exactly."""
        n, t, o = self.count, self.total, self.outer
        total = t + n * delta
        outer = o + t[:, :, None] * delta[:, None, :] + delta[:, :, None] * t[:, None, :] + n * outer_products(delta)
        if self.third is None or self.fourth is None:
            return total, outer, None, None
        terms = self._shift_terms(delta)
        squared, along, trace, o_delta = terms
        third = (self.third + 2 * o_delta + squared[:, None] * t + delta * trace[:, None]
                 + 2 * delta * along[:, None] + n * squared[:, None] * delta)
        return total, outer, third, self._fourth_about(delta, terms)

    def _shift_terms(self, delta: np.ndarray) -> tuple:
        """|delta|^2, delta . T, trace(O) and O delta per group: what the shifted higher sums are made of."""
        squared = np.sum(delta**2, axis=1)
        along = np.einsum("gd,gd->g", delta, self.total)
        return squared, along, np.trace(self.outer, axis1=1, axis2=2), np.einsum("gde,ge->gd", self.outer, delta)

    def _fourth_about(self, delta: np.ndarray, terms: tuple | None = None) -> np.ndarray:
        """The sum of |a + delta|^4 alone (what the shrinkage needs), without the d x d sums; `terms`:
        _shift_terms(delta), when the caller has them."""
        if self.third is None or self.fourth is None:
            raise ValueError("these moments keep no third and fourth sums")
        squared, along, trace, o_delta = self._shift_terms(delta) if terms is None else terms
        return (self.fourth + 4 * np.einsum("gd,gd->g", delta, o_delta) + self.count * squared**2
                + 4 * np.einsum("gd,gd->g", delta, self.third) + 2 * squared * trace + 4 * squared * along)

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

    def shrinkage(self, target: np.ndarray, covariance: np.ndarray | None = None) -> np.ndarray:
        """Ledoit-Wolf intensity (G,) for pulling the covariance towards `target` (G, d, d): the sampling
        variance of the covariance's entries over their squared distance from the target. Near 0 when
        there are many more rows than dimensions; large when a layer sees few vectors (e.g. one per
        sample after a global pooling) and its covariance would otherwise claim a rank it does not have.
        With fewer rows than dimensions the estimate itself degrades, so at least 1 - rows/d is used.
        `covariance`: this one's, when the caller has it already."""
        groups, dim = self.total.shape
        if self.count < 2:
            return np.ones(groups)  # no spread to go on
        if self.third is None or self.fourth is None:
            return np.zeros(groups)  # sums made without the higher moments: taken as they are
        fourth = self._fourth_about(-self.total / self.count)  # about the rows' own mean
        covariance = self.covariance if covariance is None else covariance
        noise = np.maximum(fourth / self.count - np.sum(covariance**2, axis=(1, 2)), 0.0) / self.count
        distance = np.sum((covariance - target) ** 2, axis=(1, 2))
        intensity = np.divide(noise, distance, out=np.ones_like(noise), where=distance > 0)  # 0: already the target
        return np.clip(np.maximum(intensity, 1.0 - self.count / dim), 0.0, 1.0)

    @property
    def second_moment(self) -> np.ndarray:
        """E[v v^T] per group."""
        return self.covariance + outer_products(self.mean)


@dataclass
class Counts:
    """How often each row of an embedding table was looked up: the statistics of a Gather, whose input
    vectors are one-hot (their second moment is diagonal, so the counts are all of it)."""

    count: np.ndarray  # (V,)

    @classmethod
    def empty(cls, rows: int) -> Counts:
        return cls(np.zeros(rows, dtype=np.int64))

    def add(self, indices: np.ndarray) -> None:
        flat = np.asarray(indices, dtype=np.int64).reshape(-1)
        flat = np.where(flat < 0, flat + self.count.size, flat)  # Gather accepts negative indices
        self.count += np.bincount(flat, minlength=self.count.size)[: self.count.size]

    def merged(self, other: Counts) -> Counts:
        return Counts(self.count + other.count)


@dataclass
class Tied:
    """The statistics of a tied embedding table: how often each row was looked up, and the moments of the
    vectors its transposed use (the LM head) multiplies."""

    counts: Counts
    moments: Moments


def outer_products(vectors: np.ndarray) -> np.ndarray:
    """v v^T per group."""
    return vectors[:, :, None] * vectors[:, None, :]


def collect(
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    samples: Samples,
    indices: list[int],
    provider: str,
    batch_size: int = 8,
    max_outputs: int = 64,
    progress: Callable[[int], None] | None = None,
) -> list[Moments | Counts]:
    """Moments of every layer's observed tensor over the given samples (one entry per layer).

    Layers that observe the same tensor the same way (e.g. the Q, K and V projections of one input)
    share one accumulation. A tensor inside an If / Loop / Scan body is fetched through extra outputs
    (subgraphs.py): each iteration's slice counts, an untaken branch's placeholder does not, so a layer
    whose body never ran keeps empty statistics. `progress` is called with the number of samples each
    batch covered.
    """
    jobs: dict[tuple, tuple[Layer, Moments | Counts]] = {}
    requests: dict[tuple, Request] = {}
    keys = []
    for layer in layers:
        tensor, side = layer.adapter.observed(layer)
        request = fetch_request(layer, tensor)
        key = (tensor.name, request.steps, type(layer.adapter).__name__, repr(layer.info),
               repr(sorted(layer.node.attrs.items())))
        if key not in jobs:
            groups, out_dim, in_dim = layer.shape
            if side == "indices":
                jobs[key] = (layer, Counts.empty(in_dim))
            else:
                jobs[key] = (layer, Moments.empty(groups, in_dim if side == "input" else out_dim))
        requests.setdefault(key[:2], request)
        keys.append(key)
    wanted = list(requests.values())
    for start in range(0, max(len(wanted), 1), max_outputs):
        fetched = _fetched(model, wanted[start : start + max_outputs], samples, indices, provider, batch_size)
        for batch_indices, values in fetched:
            for key, (layer, moments) in jobs.items():
                request = requests[key[:2]]
                if request in values:
                    for value in unstacked(values[request], request.depth):
                        moments.add(layer.adapter.rows(layer, value))
            if progress is not None and start == 0:
                progress(len(batch_indices))
    return [jobs[key][1] for key in keys]


def _fetched(model: onnx.ModelProto, requests: list[Request], samples: Samples, indices: list[int], provider: str,
             batch_size: int) -> Iterator[tuple[list[int], dict[Request, np.ndarray]]]:
    """Per batch of samples, the requested tensors' values (graph inputs read from the feed itself)."""
    graph_inputs = {i.name for i in model.graph.input}
    fed = [request for request in requests if not request.steps and request.name in graph_inputs]
    computed = [request for request in requests if request not in fed]
    exposing, outputs = exposed(model, computed)
    session = session_with_outputs(exposing, outputs, provider, source="the input model")  # runnable or InputError
    for batch_indices, feed in samples.batches(indices, batch_size):
        values = {request: feed[request.name] for request in fed}
        if computed:
            for request, value in zip(computed, session.run(feed, outputs)):
                # the inputs were checked when the data were loaded
                if value.dtype.kind == "f" and not np.isfinite(value).all():
                    raise InputError(f"the input model computes NaN or Inf in {request.name!r} on the calibration data")
                values[request] = value
        yield batch_indices, values


def unit_statistics(
    model, units: list[Unit], samples: Samples, fit: list[int], provider: str, batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> list[Moments | Counts | Tied]:
    """Statistics over the fit samples of what each unit's layers observe, merged per unit (shared weights;
    a tied embedding table keeps its lookups' counts and its head's moments side by side)."""
    layers = [layer for unit in units for layer in unit.layers]
    statistics = iter(collect(model, layers, samples, fit, provider, batch_size, progress=progress))
    merged: list[Moments | Counts | Tied] = []
    for unit in units:
        together: Moments | Counts | Tied = next(statistics)
        for layer in unit.layers[1:]:
            other = next(statistics)
            if layer.transposed and isinstance(together, Counts) and isinstance(other, Moments):
                together = Tied(together, other)
            elif isinstance(together, (Moments, Counts)):
                together = _merged(together, other)
            else:
                raise TypeError(f"unit {unit.name} has more than two uses of a tied table")
        merged.append(together)
    return merged


def _merged(first: Moments | Counts, other: Moments | Counts) -> Moments | Counts:
    """The statistics of two layers of one unit (which observe the same kind: moments or counts)."""
    if isinstance(first, Moments) and isinstance(other, Moments):
        return first.merged(other)
    if isinstance(first, Counts) and isinstance(other, Counts):
        return first.merged(other)
    raise TypeError("the layers of one unit observe different kinds of statistics")
