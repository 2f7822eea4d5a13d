"""Data-aware factorization: the rank-r weight that minimises the layer's *output* error on calibration data.

For y = W x (+ b), the optimum is W_r = P_r P_r^T W with P_r the top-r eigenvectors of the second moment
of W x: in output form, eigh of the measured output statistics (out x out, no inverse); in input form,
eigh of W C W^T with C the input statistics, or (when the output side is the larger) the left singular
vectors of W S with S S^T = C.
Where the layer has a place for it (a BiasSite), the statistics are centred and the mean of the dropped
subspace moves into the bias: the affine optimum. Elsewhere they stay uncentred, so the mean direction is
kept like any other. Where the data are thin for a layer's size (few vectors per dimension, e.g. after a
global pooling) the covariance is shrunk towards the weight-only prior (white inputs) by the Ledoit-Wolf
intensity, so that its top directions are not those of the calibration samples alone and the predicted
errors are those to expect on new data. Predicted errors are relative to the energy of W x. Everything
in float64; eigenvalues are floored relative to the largest, so rank-deficient statistics are fine.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..graph.layers import Layer, Unit
from ..graph.splice import Factorization
from ..observe.statistics import Counts, Moments, Tied, outer_products
from . import linalg
from .contracts import Option, RankedOptions, Spectrum


class DataAwareSVD(RankedOptions):
    """Factors of one unit from its weight matrices and the moments of what its layer observes."""

    method = "svd-data"

    def __init__(self, layer: Layer, moments: Moments, side: str):
        weight = np.asarray(layer.matrices, dtype=np.float64)  # (G, m, n)
        self._matrix_shape = weight.shape
        groups, out_dim, in_dim = weight.shape
        centred = layer.bias is not None
        # errors are weighed by how a following BatchNormalization scales each output channel: the
        # optimum for D W (D = diag(scale)) is mapped back through D^-1
        self._scale = linalg.safe_scale(layer.output_scale, groups, out_dim)
        scaled = self._scale[:, :, None] * weight
        if side == "output":
            # moments of y = W x + b: the mean of W x is the mean of y less the layer's own bias
            own_bias = layer.bias.value.reshape(groups, out_dim) if layer.bias is not None else np.zeros((groups, out_dim))
            self._mean = moments.mean - own_bias
            covariance = linalg.shrunk(moments, weight @ np.swapaxes(weight, 1, 2))  # prior: white inputs
            covariance = covariance * self._scale[:, :, None] * self._scale[:, None, :]
            mean = self._scale * self._mean
            target = covariance if centred else covariance + outer_products(mean)
            energies, vectors = linalg.top_eigen(target, min(out_dim, in_dim))
            linear_energy = np.trace(covariance, axis1=1, axis2=2).sum() + np.sum(mean**2)
        else:
            self._mean = np.einsum("gmn,gn->gm", weight, moments.mean)
            covariance = linalg.shrunk(moments, np.broadcast_to(np.eye(in_dim), (groups, in_dim, in_dim)))
            second_moment = covariance + outer_products(moments.mean)
            observed = covariance if centred else second_moment
            if out_dim <= in_dim:  # left singular vectors of D W S are the eigenvectors of D W C W^T D
                energies, vectors = linalg.top_eigen(linalg.sandwich(scaled, observed), out_dim)
            else:  # the smaller problem is on the input side: S (in x in), then the SVD of D W S
                u, s, _ = np.linalg.svd(scaled @ linalg.sqrt_psd(observed), full_matrices=False)
                energies, vectors = s**2, u
            linear_energy = linalg.energy(scaled, second_moment)
        self._vectors = linalg.fix_signs(vectors)
        self._weight = scaled
        self._centred = centred
        self.spectrum = Spectrum(np.maximum(energies, 0.0), total=float(linear_energy))

    def _shape(self) -> tuple[int, int, int]:
        return self._matrix_shape

    def factorize(self, rank: int | tuple[int, ...]) -> Factorization:
        rank = rank[0] if isinstance(rank, tuple) else rank
        if not 1 <= rank <= self._vectors.shape[2]:
            raise ValueError(f"rank {rank} outside 1..{self._vectors.shape[2]}")
        basis = self._vectors[:, :, :rank]  # (G, m, r), orthonormal columns
        first = np.swapaxes(basis, 1, 2) @ self._weight  # (G, r, n): P^T D W
        second = basis / self._scale[:, :, None]  # D^-1 P
        shift = None
        if self._centred:
            mean = self._scale * self._mean
            kept = np.einsum("gmr,gr->gm", basis, np.einsum("gmr,gm->gr", basis, mean))
            shift = (mean - kept) / self._scale  # D^-1 (I - P P^T) D E[W x]
        return Factorization(self.method, rank, first, second, float(self.spectrum.dropped[rank]), bias_shift=shift)


class OutputError:
    """The relative output error of any approximation of a layer's kernel: E||D (W - W') x - shift||^2 over
    E||D W x||^2 under the layer's (shrunk) input statistics, with the shift that a bias site absorbs.
    Without statistics, the weight's own relative error ||W - W'||^2 / ||W||^2 (and no shift)."""

    def __init__(self, layer: Layer, moments: Moments | None = None):
        weight = np.asarray(layer.matrices, dtype=np.float64)
        groups, out_dim, in_dim = weight.shape
        self._shape = weight.shape
        self._weight = weight
        self.scale = linalg.safe_scale(layer.output_scale, groups, out_dim) if moments is not None else np.ones((groups, out_dim))
        self._mean = None
        if moments is None:
            self._root = None
            self._energy = float(np.sum(weight**2))
            return
        covariance = linalg.shrunk(moments, np.broadcast_to(np.eye(in_dim), (groups, in_dim, in_dim)))
        second_moment = covariance + outer_products(moments.mean)
        self._mean = moments.mean if layer.bias is not None else None
        self._root = linalg.sqrt_psd(covariance if layer.bias is not None else second_moment)
        scaled = self.scale[:, :, None] * weight
        self._energy = linalg.energy(scaled, second_moment)

    @property
    def energy(self) -> float:
        """E||D W x||^2: what the errors are relative to."""
        return self._energy

    def _delta(self, approx: np.ndarray) -> np.ndarray:
        return self._weight - np.asarray(approx, dtype=np.float64).reshape(self._shape)

    def __call__(self, approx: np.ndarray) -> float:
        delta = self.scale[:, :, None] * self._delta(approx)
        if self._root is not None:
            delta = delta @ self._root
        return float(np.sum(delta**2) / self._energy) if self._energy > 0 else 0.0

    def bias_shift(self, approx: np.ndarray) -> np.ndarray | None:
        """E[(W - W') x] per group: what the bias gains (None where no bias site can take it)."""
        if self._mean is None:
            return None
        return np.einsum("gmn,gn->gm", self._delta(approx), self._mean)



class FrequencyWeightedSVD(RankedOptions):
    """An embedding table's factors weighted by how often calibration looked each row up.

    The Gather's inputs are one-hot, so the input-form optimum is the SVD of W diag(sqrt(w)) (W = table^T):
    rows used often are kept best. A share UNSEEN_SHARE of the weight is spread evenly over all rows, and a
    rank is offered only where no row loses more than ROW_FLOOR of its energy, or ROW_BOUND times what a
    plain SVD of the table leaves that same row at that rank if that is more: rows calibration never used (rare tokens, long
    positions) stay bounded. The predicted error is the expected relative error of the looked-up vectors.
    """

    method = "svd-freq"
    UNSEEN_SHARE = 0.1
    ROW_BOUND = 2.0
    ROW_FLOOR = 0.5

    def __init__(self, layer: Layer, counts: Counts):
        self._fit(np.asarray(layer.matrices, dtype=np.float64), counts)  # (1, d, V)

    def _fit(self, weight: np.ndarray, counts: Counts) -> None:
        self._matrix_shape = weight.shape
        self.row_weights = row_weights(counts, weight.shape[2])
        energies, basis = linalg.left_singular(weight * np.sqrt(self.row_weights))
        self._basis = linalg.fix_signs(basis)
        self._weight = weight
        self.spectrum = Spectrum(np.maximum(energies, 0.0), total=float(np.sum(weight**2 * self.row_weights)))
        _, plain = linalg.left_singular(weight)
        rows = _row_errors(weight[0].T, self._basis[0])  # (V, k + 1): every row at every rank
        bound = np.maximum(self.ROW_BOUND * _row_errors(weight[0].T, plain[0]), self.ROW_FLOOR)
        self.worst_row = rows.max(axis=0)
        self._allowed = np.all(rows <= bound, axis=0)

    def _shape(self) -> tuple[int, int, int]:
        return self._matrix_shape

    def options(self) -> list[Option]:
        return [option for option in super().options() if self._allowed[option.config[0]]]

    def factorize(self, rank: int | tuple[int, ...]) -> Factorization:
        rank = rank[0] if isinstance(rank, tuple) else rank
        if not 1 <= rank <= self._basis.shape[2]:
            raise ValueError(f"rank {rank} outside 1..{self._basis.shape[2]}")
        basis = self._basis[:, :, :rank]
        first = np.swapaxes(basis, 1, 2) @ self._weight
        return Factorization(self.method, rank, first, basis, float(self.spectrum.dropped[rank]))


class TiedSVD(FrequencyWeightedSVD):
    """A tied embedding table (the lookup's W = table^T, d x V, and the LM head's W^T) factorized once for
    both uses: W ~ A^-1 U_r U_r^T A W, from the SVD of A W B. B weighs the rows (tokens) as the lookup's
    frequency weighting does; A weighs the d side, half evenly (a looked-up vector's error counts in every
    direction) and half by the head's input second moment C (its logit errors are x^T (W - W') per token):
    A^2 = I / (2 d) + C / (2 tr C). The row bound and the predicted error are those of the frequency
    weighting, measured in A's metric. The Gather looks up in (W')^T's V x r factor and rebuilds with its
    r x d factor; the head multiplies by the same two factors transposed."""

    method = "svd-tied"

    def __init__(self, layer: Layer, statistics: Tied):
        weight = np.asarray(layer.matrices, dtype=np.float64)  # (1, d, V)
        metric = tied_metric(statistics.moments, weight.shape[1])[None]  # A, symmetric
        self._unmetric = np.linalg.inv(metric)
        self._fit(metric @ weight, statistics.counts)

    def factorize(self, rank: int | tuple[int, ...]) -> Factorization:
        found = super().factorize(rank)  # of A W: (U_r^T A W, U_r)
        return replace(found, second=self._unmetric @ found.second)


def tied_metric(moments: Moments, width: int) -> np.ndarray:
    """A tied table's metric on its d side (d x d, symmetric): A^2 = I / (2 d) + C / (2 tr C), half even
    (the lookups' error counts in every direction), half the head's input second moment C."""
    second = linalg.shrunk(moments, np.eye(width)[None]) + outer_products(moments.mean)
    trace = max(float(np.trace(second[0])), np.finfo(float).tiny)
    return linalg.sqrt_psd(np.eye(width)[None] / (2 * width) + second / (2 * trace))[0]


def row_weights(counts: Counts | None, rows: int) -> np.ndarray:
    """How much each table row weighs: its lookup frequency, with FrequencyWeightedSVD.UNSEEN_SHARE spread
    evenly over every row (all of it without lookups or counts), so rows never seen stay bounded."""
    total = 0 if counts is None else int(counts.count.sum())
    frequency = np.zeros(rows) if counts is None else counts.count / max(total, 1)
    uniform = np.full(rows, 1.0 / rows)
    share = FrequencyWeightedSVD.UNSEEN_SHARE if total else 1.0
    return (1 - share) * frequency + share * uniform


def _row_errors(table: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """The relative error of every row of `table` (V, d) projected on the first r columns of `basis`
    (d, k), for r = 0..k: (V, k + 1)."""
    norms = np.sum(table**2, axis=1)
    kept = np.concatenate([np.zeros((table.shape[0], 1)), np.cumsum((table @ basis) ** 2, axis=1)], axis=1)
    relative = (norms[:, None] - kept) / np.where(norms > 0, norms, 1.0)[:, None]
    return np.maximum(relative, 0.0)


def data_aware_svd(unit: Unit, statistics: Moments | Counts | Tied, side: str) -> DataAwareSVD | FrequencyWeightedSVD:
    """The unit's data-aware SVD; `side` is what its layer observes (input, output or indices)."""
    layer = unit.layers[0]
    if isinstance(statistics, Tied):
        return TiedSVD(layer, statistics)
    if side == "indices" and isinstance(statistics, Counts):
        return FrequencyWeightedSVD(layer, statistics)
    if side != "indices" and isinstance(statistics, Moments):
        return DataAwareSVD(layer, statistics, side)
    raise TypeError(f"{type(statistics).__name__} are no statistics of a layer observing its {side}")
