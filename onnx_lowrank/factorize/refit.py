"""Sequential, error-compensating refit: each factorized layer solved again, in graph order, to reproduce
the *original* layer's outputs from the inputs the already-compressed layers before it produce.

The data-aware factors of a layer y = W x minimise E||W x - W' x|| on the original model's inputs x; in the
compressed model the layer sees x~ instead, which carries the error of every factorized layer upstream.
Refitting solves min over rank-r W' of E||D (W x - W' x~) - c|| (D: the following BatchNormalization's
scale, c: an intercept where a bias site can take it) in closed form from streamed cross-moments of x and
x~ (the unconstrained least-squares W* = D W E[x x~^T] E[x~ x~^T]^-1, then its best rank-r part in the
norm of x~), as AA-SVD (arXiv 2604.02119) and AdaSVD (2502.01403) do with gradients.

Cross-moments from a small fit part overfit, so they are shrunk towards today's data-aware solution (the
moments with x~ = x, where W* = W): E[x~ x~^T] -> (1 - l) E[x~ x~^T] + l C and E[x x~^T] likewise, with l
chosen by two-fold cross-validation on the fit samples (the error of each fold's solution on the other).

Layers are refit a stage at a time: a stage holds the layers whose inputs no other unrefit factorized layer
feeds (their depth in factorized layers), so the ONNX Runtime passes grow with the stages, not the layers.
A stage's pass runs only the part of the compressed model before the tensors it observes (runtime.prefix);
the original's tensors, the same for every stage and candidate, are computed in one pass and kept.
Layers at depth 0 see the original inputs and keep their factors. Refit are the two-factor products
(`svd.Factorization`) of layers observed on their input side in the main graph; other chains are kept and
counted upstream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx
import scipy.linalg

from ..errors import known
from ..graph.layers import Layer, Unit
from ..graph.splice import Factorization, Factorized
from ..observe.calibration import Samples
from ..observe.sessions import Session, prefix
from ..observe.statistics import Moments
from ..system.parallel import blas_threads
from . import linalg
from .rewrite import build

REFITS = ("auto", "sequential", "none")
SHRINKAGES = (0.0, 0.25, 0.5, 0.75, 1.0)  # the strengths cross-validation chooses among
ORIGINAL_BYTES = 2 << 30  # the original's observed tensors kept for every stage and candidate up to this
RIDGE = 1e-9  # relative to the trace: keeps E[x~ x~^T] invertible when x~ is rank-deficient


@dataclass
class CrossMoments:
    """Sums over the rows a layer sees in both models, about a common origin (which the affine fit
    does not depend on): x from the original, t (x~) from the compressed model."""

    count: int
    x: np.ndarray  # (G, n) sums
    t: np.ndarray
    tt: np.ndarray  # (G, n, n) sums of t t^T
    xt: np.ndarray  # x t^T
    origin: np.ndarray | None = None

    @classmethod
    def empty(cls, groups: int, dim: int) -> CrossMoments:
        square = np.zeros((groups, dim, dim))
        return cls(0, np.zeros((groups, dim)), np.zeros((groups, dim)), square, square.copy())

    def add(self, x: np.ndarray, t: np.ndarray, centred: bool) -> None:
        """Rows (G, P, n) of the same positions in both models."""
        x, t = np.asarray(x, dtype=np.float64), np.asarray(t, dtype=np.float64)
        if x.shape[1] == 0:
            return
        if self.origin is None:
            self.origin = x.mean(axis=1) if centred else np.zeros(x.shape[::2])
        x, t = x - self.origin[:, None, :], t - self.origin[:, None, :]
        xT, tT = np.swapaxes(x, 1, 2), np.swapaxes(t, 1, 2)  # (E[x x^T] is not needed: the same for all fits)
        self.count += x.shape[1]
        self.x += x.sum(axis=1)
        self.t += t.sum(axis=1)
        self.tt += tT @ t
        self.xt += xT @ t

    def merged(self, other: CrossMoments) -> CrossMoments:
        """Both folds' sums (taken about the same origin: the folds share the first's)."""
        return CrossMoments(self.count + other.count, self.x + other.x, self.t + other.t, self.tt + other.tt,
                            self.xt + other.xt, self.origin)

    def expectations(self) -> tuple[np.ndarray, ...]:
        """Means of x and t and the raw second moments E[t t^T], E[x t^T] (about the origin)."""
        n = max(self.count, 1)
        return self.x / n, self.t / n, self.tt / n, self.xt / n


class Refit:
    """Refits the factorizations of candidate allocations (see the module docstring): one per model."""

    def __init__(self, original: onnx.ModelProto, adapters: dict, units: Sequence[Unit],
                 statistics: Sequence[object], samples: Samples, fit: Sequence[int], provider: str,
                 batch_size: int, base_dir: str = "", memo: dict | None = None):
        self.original, self.adapters, self.base_dir = original, adapters, base_dir
        self.units = {unit.key: unit for unit in units}
        self.moments = {unit.key: s for unit, s in zip(units, statistics) if isinstance(s, Moments)}
        self.provider = provider
        self.folds = [list(fit)[0::2], list(fit)[1::2]]
        self.batches = [[feed for _, feed in samples.batches(fold, batch_size)] for fold in self.folds]
        self.passes = 0  # ONNX Runtime passes made (each over the fit samples, both models)
        self._kept: dict[str, list[list[np.ndarray]]] | None = None  # the original's tensors (_original_tensors)
        self._memo = {} if memo is None else memo  # rewrite.build's for this original (the search's, shared)

    def refittable(self, key: str, factors: Factorized) -> bool:
        return isinstance(factors, Factorization) and self._observable(self.units[key]) and len(self.folds[1]) > 0

    def _observable(self, unit: Unit) -> bool:
        """Observed on its input side in the main graph (a body's tensors are no outputs of a plain pass)."""
        return unit.key in self.moments and all(
            layer.adapter.observed(layer)[1] == "input" and layer.scope is None for layer in unit.layers)

    def __call__(self, factors: dict[str, Factorized]) -> dict[str, Factorized]:
        largest = max((self.units[key].params for key in factors), default=0)
        with blas_threads(largest):  # one BLAS thread for small layers' many small products, as elsewhere
            return self._refit(factors)

    def _refit(self, factors: dict[str, Factorized]) -> dict[str, Factorized]:
        current = dict(factors)
        for stage in stages(self.original, self.units, factors, self.refittable):
            model = build(self.original, self.adapters, current, self.base_dir, self._memo)
            observed = self._observe(model, stage)
            for key in stage:
                current[key] = refit(self.units[key].layers[0], _known_factorization(current[key]),
                                     self.moments[key], observed[key])
        return current

    def _observe(self, model: onnx.ModelProto, keys: Sequence[str]) -> dict[str, list[CrossMoments]]:
        """Per unit of the stage, per fold, the cross-moments of its layers' inputs in both models."""
        layers = {key: self.units[key].layers for key in keys}
        wanted = _observed_names(layers.values(), self.original)
        original = self._original_tensors(wanted)
        compressed = known(self._tensors(model, wanted), "the compressed model's tensors")
        sums = {key: [_empty(ls[0]), _empty(ls[0])] for key, ls in layers.items()}
        for fold, batches in enumerate(self.batches):
            if fold:  # one origin for both folds: their sums add up
                for pair in sums.values():
                    pair[1].origin = pair[0].origin
            for batch, feed in enumerate(batches):
                before = {**feed, **{name: original[name][fold][batch] for name in wanted}}
                after = {**feed, **{name: compressed[name][fold][batch] for name in wanted}}
                for key, unit_layers in layers.items():
                    for layer in unit_layers:
                        name = layer.adapter.observed(layer)[0].name
                        sums[key][fold].add(layer.adapter.rows(layer, before[name]),
                                            layer.adapter.rows(layer, after[name]), layer.bias is not None)
        self.passes += 1
        return sums

    def _original_tensors(self, names: list[str]) -> dict[str, list[list[np.ndarray]]]:
        """The original's tensors, the same for every stage and candidate: on first use every tensor any
        refittable unit observes, kept when they fit in ORIGINAL_BYTES (else each stage's are computed)."""
        if self._kept is None:
            every = _observed_names([unit.layers for unit in self.units.values() if self._observable(unit)],
                                    self.original)
            self._kept = self._tensors(self.original, every, limit=ORIGINAL_BYTES) or {}
        if all(name in self._kept for name in names):
            return self._kept
        return known(self._tensors(self.original, names), "the original's tensors")

    def _tensors(self, model: onnx.ModelProto, names: list[str],
                 limit: float = float("inf")) -> dict[str, list[list[np.ndarray]]] | None:
        """Per name, per fold, per batch of fit samples, the model's tensor (None past `limit` bytes): one
        pass of the part of the model that computes them (runtime.prefix)."""
        found: dict[str, list[list[np.ndarray]]] = {name: [[], []] for name in names}
        if not names:
            return found
        source = "the input model" if model is self.original else None
        session = Session(prefix(model, names), self.provider, source=source)
        size = 0
        for fold, batches in enumerate(self.batches):
            for feed in batches:
                for name, value in zip(names, session.run(feed, names)):
                    found[name][fold].append(value)
                    size += value.nbytes
                if size > limit:
                    return None
        return found


def _observed_names(layer_groups, original: onnx.ModelProto) -> list[str]:
    """The tensors the layers observe, graph inputs aside (the feeds hold them)."""
    inputs = {i.name for i in original.graph.input}
    names = (layer.adapter.observed(layer)[0].name for layers in layer_groups for layer in layers)
    return [name for name in dict.fromkeys(names) if name not in inputs]


def _empty(layer: Layer) -> CrossMoments:
    groups, _, in_dim = layer.shape
    return CrossMoments.empty(groups, in_dim)


def _known_factorization(factors: Factorized) -> Factorization:
    if not isinstance(factors, Factorization):
        raise RuntimeError("only two-factor products are refit")
    return factors


def stages(original: onnx.ModelProto, units: dict[str, Unit], factors: dict[str, Factorized],
           refittable) -> list[list[str]]:
    """The refittable factorized units grouped by depth (1, 2, ...): how many factorized layers lie on the
    longest path to the tensor the unit observes. Depth 0 sees the original's inputs: nothing to refit."""
    changed = {layer.node.outputs[0].name for key in factors for layer in units[key].layers}
    depth: dict[str, int] = {}
    for node in original.graph.node:  # topologically sorted, as ONNX requires
        level = max((depth.get(name, 0) for name in node.input if name), default=0)
        out = level + 1 if any(name in changed for name in node.output) else level
        depth.update((name, out) for name in node.output)
    levels: dict[int, list[str]] = {}
    for key, factor in factors.items():
        level = max(depth.get(layer.adapter.observed(layer)[0].name, 0) for layer in units[key].layers)
        if level > 0 and refittable(key, factor):
            levels.setdefault(level, []).append(key)
    return [levels[level] for level in sorted(levels)]


def refit(layer: Layer, factors: Factorization, moments: Moments, folds: Sequence[CrossMoments]) -> Factorization:
    """The layer's rank-r factors solved against its inputs in the compressed model (module docstring)."""
    problem = _Problem(layer, moments)
    return problem.factors(factors, folds[0].merged(folds[1]), strength_for(problem, factors.rank, folds))


def strength_for(problem: _Problem, rank: int, folds: Sequence[CrossMoments]) -> float:
    """The shrinkage two-fold cross-validation prefers: each fold's solution scored on the other (ties: the
    stronger shrinkage)."""
    first, second = (problem.fold(sums) for sums in folds)
    scores = []
    for strength in SHRINKAGES:
        total = 0.0
        for fitted, other in ((first, second), (second, first)):
            basis, reduced, intercept = problem.fit(rank, fitted, strength)
            total += problem.excess(other, basis, reduced, intercept)
        scores.append(total)
    return SHRINKAGES[min(range(len(SHRINKAGES)), key=lambda i: (scores[i], -i))]


@dataclass(frozen=True)
class _Fold:
    """A fold's expectations and the products every strength's fit and score reuse: raw (about the origin,
    for scoring) and centred where the bias takes the mean (for fitting)."""

    mean_x: np.ndarray
    mean_t: np.ndarray
    tt: np.ndarray  # raw E[t t^T]
    wxt: np.ndarray  # raw D W E[x t^T]
    fit_tt: np.ndarray
    fit_wxt: np.ndarray


class _Problem:
    """One layer's least-squares problem in the scaled output space D W x (D: its error weights)."""

    def __init__(self, layer: Layer, moments: Moments):
        weight = np.asarray(layer.matrices, dtype=np.float64)
        groups, out_dim, in_dim = weight.shape
        self.centred = layer.bias is not None
        self.scale = linalg.safe_scale(layer.output_scale, groups, out_dim)
        self.weight = self.scale[:, :, None] * weight  # D W
        covariance = linalg.shrunk(moments, np.broadcast_to(np.eye(in_dim), (groups, in_dim, in_dim)))
        self.mean = moments.mean
        self.prior = covariance if self.centred else covariance + self.mean[:, :, None] * self.mean[:, None, :]
        self.weight_prior = self.weight @ self.prior

    def fold(self, sums: CrossMoments) -> _Fold:
        mean_x, mean_t, tt, xt = sums.expectations()
        wxt = self.weight @ xt
        if not self.centred:
            return _Fold(mean_x, mean_t, tt, wxt, tt, wxt)
        weighted_mean = np.einsum("gmn,gn->gm", self.weight, mean_x)
        return _Fold(mean_x, mean_t, tt, wxt, tt - mean_t[:, :, None] * mean_t[:, None, :],
                     wxt - weighted_mean[:, :, None] * mean_t[:, None, :])

    def fit(self, rank: int, fold: _Fold, strength: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The rank-r scaled weight W' = P R (P: an orthonormal basis of its outputs, R = P^T W*, W* the
        unconstrained least squares of the shrunk moments, P the top of W* E[t t^T] W*^T) and the
        intercept c (zeros: no bias site)."""
        tt = (1 - strength) * fold.fit_tt + strength * self.prior
        rhs = (1 - strength) * fold.fit_wxt + strength * self.weight_prior
        basis, reduced = [], []
        for group in range(tt.shape[0]):  # Cholesky: E[t t^T] is PSD, ridged to be definite
            factor = scipy.linalg.cho_factor(_ridged(tt[group : group + 1])[0], lower=True, check_finite=False)
            unconstrained = scipy.linalg.cho_solve(factor, rhs[group].T, check_finite=False).T
            top = _output_basis(unconstrained, rhs[group], np.tril(factor[0]), rank)
            basis.append(top)
            reduced.append(top.T @ unconstrained)
        bases, reductions = np.stack(basis), np.stack(reduced)
        intercept = np.einsum("gmn,gn->gm", self.weight, fold.mean_x) - np.einsum(
            "gmr,gr->gm", bases, np.einsum("grn,gn->gr", reductions, fold.mean_t))
        return bases, reductions, intercept if self.centred else np.zeros_like(intercept)

    def solve(self, rank: int, sums: CrossMoments, strength: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The rank-r scaled weight W', its basis P and the intercept c (`fit` on all of `sums`)."""
        basis, reduced, intercept = self.fit(rank, self.fold(sums), strength)
        return basis @ reduced, basis, intercept

    def excess(self, fold: _Fold, basis: np.ndarray, reduced: np.ndarray, intercept: np.ndarray) -> float:
        """E||D W x - W' t - c||^2 on other rows (their sums about the same origin as the fitted fold's), less
        E||D W x||^2, the same for every fit; W' = P R with P orthonormal, so every product is r x n."""
        along = np.swapaxes(basis, 1, 2) @ fold.wxt  # P^T D W E[x t^T]
        predicted = np.einsum("gmn,gn->gm", self.weight, fold.mean_x) - np.einsum(
            "gmr,gr->gm", basis, np.einsum("grn,gn->gr", reduced, fold.mean_t))
        value = (-2 * np.sum(reduced * along) + np.sum((reduced @ fold.tt) * reduced)
                 - 2 * np.sum(intercept * predicted) + np.sum(intercept**2))
        return float(value)

    def factors(self, factors: Factorization, sums: CrossMoments, strength: float) -> Factorization:
        basis, reduced, _ = self.fit(factors.rank, self.fold(sums), strength)
        projected = basis @ reduced
        second = basis / self.scale[:, :, None]
        shift = None
        if self.centred:  # E[W x - W'' t] with the true means (the sums are about their origin)
            mean_x, mean_t = (m + (sums.origin if sums.origin is not None else 0) for m in sums.expectations()[:2])
            shift = (np.einsum("gmn,gn->gm", self.weight, mean_x) - np.einsum("gmn,gn->gm", projected, mean_t))
            shift = shift / self.scale
        return replace(factors, first=reduced, second=second, bias_shift=shift)


def _output_basis(unconstrained: np.ndarray, rhs: np.ndarray, root: np.ndarray, rank: int) -> np.ndarray:
    """An orthonormal basis of the top-`rank` eigenvectors of W* E[t t^T] W*^T (E[t t^T] = L L^T), from an
    eigendecomposition of the smaller side: W* E[t t^T] W*^T = rhs W*^T (m x m) when m <= n, else the top
    right vectors V of A = W* L (from A^T A, n x n), the span of A V."""
    out_dim, in_dim = unconstrained.shape
    if out_dim <= in_dim:
        product = rhs @ unconstrained.T
        return linalg.top_eigen(((product + product.T) / 2)[None], rank)[1][0]
    scaled = unconstrained @ root
    _, right = linalg.top_eigen((scaled.T @ scaled)[None], rank)
    return np.linalg.qr(scaled @ right[0])[0]


def _ridged(matrices: np.ndarray) -> np.ndarray:
    trace = np.trace(matrices, axis1=1, axis2=2) / matrices.shape[1]
    ridge = RIDGE * np.maximum(trace, np.finfo(float).tiny)
    return matrices + ridge[:, None, None] * np.eye(matrices.shape[1])
