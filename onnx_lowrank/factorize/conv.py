"""Decompositions of a Conv kernel beyond SVD, each emitted as a chain of Conv nodes.

- tucker2: 1x1 (Cin -> r_in), k x k core (r_in -> r_out, the original strides/pads/dilations), 1x1
  (r_out -> Cout); HOSVD then one HOOI sweep.
- cp (2-D, needs tensorly): 1x1 (Cin -> R), kh x 1 depthwise, 1 x kw depthwise, 1x1 (R -> Cout).
- spatial (2-D): kh x 1 (Cin -> r) then 1 x kw (r -> Cout); for a depthwise conv, per channel: kh x 1
  depthwise with multiplier r, then 1 x kw grouped back to one channel each.
- depthwise: a full conv as a depthwise conv with multiplier m (per input channel SVD) then 1x1.
- block: the output channels in b blocks, each its own rank r: k x k (Cin -> b r), 1x1 grouped (b groups).

Each decomposer offers options (its ranks, their parameters and predicted errors) and builds the factors
of one. Factors are computed on D W (D: a following BatchNormalization's scale) and mapped back. The
predicted error of any option comes from the layer's `OutputError` (exact under the input-patch
statistics, or relative to the weight without data), so options of every method compare fairly.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from ..graph.layers import Layer
from .contracts import Option

if TYPE_CHECKING:
    from ..graph.splice import Emitter
    from .data_aware import OutputError

FRACTIONS = (1 / 16, 1 / 8, 3 / 16, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4)  # of the full ranks, for grids


def rank_grid(largest: int) -> list[tuple[int, ...]]:
    """About 16 ranks from 1 to `largest`, denser at the small end (where the savings are)."""
    grid = {1, 2, 3, 4} | {max(1, round(largest * f)) for f in np.geomspace(0.05, 1.0, 12)}
    return [(rank,) for rank in sorted(r for r in grid if r <= largest)]


@dataclass(frozen=True)
class Step:
    """One Conv node of a chain: its kernel and attributes (group, strides, pads, dilations...)."""

    kernel: np.ndarray
    attrs: dict


@dataclass(frozen=True)
class ConvChain:
    """A factorized conv: Conv nodes applied in order; the last carries the (shifted) bias."""

    method: str
    rank: tuple[int, ...]
    steps: list[Step]
    predicted_error: float
    bias_shift: np.ndarray | None = None
    params: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", int(sum(step.kernel.size for step in self.steps)))

    def reconstruct(self, layer: Layer) -> np.ndarray:
        """The kernel the chain computes, in the layer's (Cout, Cin / g, *k) layout."""
        return _compose(self.steps, layer)

    def in_float32(self) -> ConvChain:
        """The kernels in float32, what a float32 model stores them as anyway: half the memory."""
        steps = [replace(step, kernel=step.kernel.astype(np.float32)) for step in self.steps]
        return ConvChain(self.method, self.rank, steps, self.predicted_error, self.bias_shift)

    def same_op_weight(self) -> np.ndarray | None:
        """None: a chain of Conv nodes of its own (see decompositions.Factorized)."""
        return None

    def emit(self, layer: Layer, emit: Emitter) -> None:
        """The chain's Conv nodes, the last writing the layer's outputs with its (shifted) bias."""
        current = emit.inputs[0]
        for position, step in enumerate(self.steps):
            last = position == len(self.steps) - 1
            inputs = [current, emit.weight(f"{position}", step.kernel)]
            if last:
                inputs += [emit.bias(layer.bias, self.bias_shift)] if self.bias_shift is not None else emit.inputs[2:]
            outputs = emit.outputs if last else [emit.variable(f"mid{position}")]
            emit.node(f"{position}", "Conv", inputs, outputs, step.attrs)
            current = outputs[0]


class ConvDecomposer:
    """What the methods share: the layer's kernel (scaled by D), its geometry, options and bias shift."""

    method = ""

    def __init__(self, layer: Layer, error: OutputError) -> None:
        self.layer = layer
        self.error = error  # OutputError: relative error of an approximate kernel
        kernel = np.asarray(layer.weight.value, dtype=np.float64)
        self.scale = error.scale.reshape(-1)  # D per output channel
        self.kernel = kernel * self.scale.reshape(-1, *[1] * (kernel.ndim - 1))
        self.groups = int(layer.node.attrs.get("group", 1))
        self.attrs = dict(layer.node.attrs)
        self._cache: dict[tuple[int, ...], ConvChain] = {}

    def configs(self) -> list[tuple[int, ...]]:
        raise NotImplementedError

    def steps(self, config: tuple[int, ...]) -> list[Step] | None:
        """The chain on the scaled kernel D W (the last step's output channels are scaled by D)."""
        raise NotImplementedError

    def options(self) -> list[Option]:
        """The configurations that shrink the layer, with their predicted errors."""
        dense = self.kernel.size
        found = []
        for config in self.configs():
            if self.params(config) >= dense:
                continue
            chain = self._chain(config)
            if chain is not None:
                found.append(Option(self.method, config, chain.params, chain.predicted_error))
        return found

    def params(self, config: tuple[int, ...]) -> int:
        raise NotImplementedError

    def factorize(self, config: tuple[int, ...]) -> ConvChain:
        """The chain of a configuration; ValueError for one the method rejects (e.g. a diverging CP)."""
        chain = self._chain(config)
        if chain is None:
            raise ValueError(f"{self.method} has no factorization at {tuple(config)}")
        return chain

    def _chain(self, config: tuple[int, ...]) -> ConvChain | None:
        """The chain of a configuration (computed once), or None when the method rejects it."""
        config = tuple(config)
        if config not in self._cache:
            steps = self.steps(config)
            if steps is None:
                return None
            last = steps[-1]
            unscaled = last.kernel / self.scale.reshape(-1, *[1] * (last.kernel.ndim - 1))
            steps = [*steps[:-1], Step(unscaled, last.attrs)]
            approx = _compose(steps, self.layer)
            self._cache[config] = ConvChain(
                self.method, config, steps, self.error(approx), self.error.bias_shift(approx)
            )
        return self._cache[config]


class Tucker2(ConvDecomposer):
    method = "tucker2"

    def __init__(self, layer: Layer, error: OutputError) -> None:
        super().__init__(layer, error)
        out_channels, in_channels = self.kernel.shape[:2]
        self._out_basis = np.linalg.svd(self.kernel.reshape(out_channels, -1), full_matrices=False)[0]
        self._in_basis = np.linalg.svd(np.swapaxes(self.kernel, 0, 1).reshape(in_channels, -1), full_matrices=False)[0]

    def configs(self) -> list[tuple[int, ...]]:
        out_channels, in_channels = self.kernel.shape[:2]
        positions = math.prod(self.kernel.shape[2:])
        grid = set()
        for fraction in FRACTIONS:
            out_rank, in_rank = max(1, math.ceil(fraction * out_channels)), max(1, math.ceil(fraction * in_channels))
            # a core of in_rank x K columns has at most that many independent outputs, and conversely
            grid.add((min(out_rank, in_rank * positions), min(in_rank, out_rank * positions)))
        return sorted(grid)

    def params(self, config: tuple[int, ...]) -> int:
        out_rank, in_rank = config
        out_channels, in_channels = self.kernel.shape[:2]
        return in_channels * in_rank + out_rank * in_rank * math.prod(self.kernel.shape[2:]) + out_channels * out_rank

    def steps(self, config: tuple[int, ...]) -> list[Step] | None:
        out_rank, in_rank = config
        out_basis, in_basis = self._out_basis[:, :out_rank], self._in_basis[:, :in_rank]
        # one HOOI sweep: each basis refitted with the other fixed
        spatial = self.kernel.ndim - 2
        projected = np.einsum("oi...,ir->or...", self.kernel, in_basis)
        out_basis = np.linalg.svd(projected.reshape(projected.shape[0], -1), full_matrices=False)[0][:, :out_rank]
        projected = np.einsum("oi...,or->ri...", self.kernel, out_basis)
        in_basis = np.linalg.svd(np.swapaxes(projected, 0, 1).reshape(projected.shape[1], -1), full_matrices=False)[0][:, :in_rank]
        core = np.einsum("oi...,or,is->rs...", self.kernel, out_basis, in_basis, optimize=True)
        ones = [1] * spatial
        return [
            Step(in_basis.T.reshape(in_rank, -1, *ones), _pointwise(spatial)),
            Step(core, {**self.attrs, "group": 1}),
            Step(out_basis.reshape(-1, out_rank, *ones), _pointwise(spatial)),
        ]


class SpatialSeparable(ConvDecomposer):
    method = "spatial"

    def __init__(self, layer: Layer, error: OutputError) -> None:
        super().__init__(layer, error)
        out_channels, per_group, height, width = self.kernel.shape
        self.depthwise = self.groups > 1
        if self.depthwise:  # per channel: its kh x kw filter
            matrices = self.kernel.reshape(out_channels, height, width)
        else:  # rows (cin, i), columns (cout, j)
            matrices = self.kernel.transpose(1, 2, 0, 3).reshape(1, per_group * height, out_channels * width)
        self._u, self._s, self._vt = np.linalg.svd(matrices, full_matrices=False)
        self._first, self._second = _split_pair(self.attrs, height, width)

    def configs(self) -> list[tuple[int, ...]]:
        return rank_grid(self._s.shape[1])

    def params(self, config: tuple[int, ...]) -> int:
        out_channels, per_group, height, width = self.kernel.shape
        if self.depthwise:
            return out_channels * config[0] * (height + width)
        return config[0] * (per_group * height + out_channels * width)

    def steps(self, config: tuple[int, ...]) -> list[Step] | None:
        (rank,) = config
        out_channels, per_group, height, width = self.kernel.shape
        root = np.sqrt(self._s[:, :rank])
        left = self._u[:, :, :rank] * root[:, None, :]  # (G, rows, r)
        right = root[:, :, None] * self._vt[:, :rank, :]  # (G, r, cols)
        if self.depthwise:  # left: (C, kh, r), right: (C, r, kw)
            vertical = np.swapaxes(left, 1, 2).reshape(out_channels * rank, 1, height, 1)
            horizontal = right.reshape(out_channels, rank, 1, width)
            return [
                Step(vertical, {**self._first, "group": out_channels}),
                Step(horizontal, {**self._second, "group": out_channels}),
            ]
        vertical = left[0].T.reshape(rank, per_group, height, 1)
        horizontal = right[0].reshape(rank, out_channels, width).transpose(1, 0, 2)[:, :, None, :]
        return [Step(vertical, {**self._first, "group": 1}), Step(horizontal, {**self._second, "group": 1})]


class DepthwiseSeparable(ConvDecomposer):
    method = "depthwise"

    def __init__(self, layer: Layer, error: OutputError) -> None:
        super().__init__(layer, error)
        out_channels, in_channels = self.kernel.shape[:2]
        per_channel = np.swapaxes(self.kernel.reshape(out_channels, in_channels, -1), 0, 1)  # (Cin, Cout, K)
        self._u, self._s, self._vt = np.linalg.svd(per_channel, full_matrices=False)

    def configs(self) -> list[tuple[int, ...]]:
        return rank_grid(self._s.shape[1])

    def params(self, config: tuple[int, ...]) -> int:
        out_channels, in_channels = self.kernel.shape[:2]
        return in_channels * config[0] * (math.prod(self.kernel.shape[2:]) + out_channels)

    def steps(self, config: tuple[int, ...]) -> list[Step] | None:
        (multiplier,) = config
        out_channels, in_channels = self.kernel.shape[:2]
        spatial = self.kernel.shape[2:]
        root = np.sqrt(self._s[:, :multiplier])
        mixing = self._u[:, :, :multiplier] * root[:, None, :]  # (Cin, Cout, m)
        filters = root[:, :, None] * self._vt[:, :multiplier, :]  # (Cin, m, K)
        return [
            Step(filters.reshape(in_channels * multiplier, 1, *spatial), {**self.attrs, "group": in_channels}),
            Step(mixing.transpose(1, 0, 2).reshape(out_channels, in_channels * multiplier, *[1] * len(spatial)),
                 _pointwise(len(spatial))),
        ]


class BlockLowRank(ConvDecomposer):
    method = "block"

    def __init__(self, layer: Layer, error: OutputError, blocks: int) -> None:
        super().__init__(layer, error)
        self.method = f"block{blocks}"
        self.blocks = blocks
        out_channels = self.kernel.shape[0]
        rows = self.kernel.reshape(blocks, out_channels // blocks, -1)
        self._u, self._s, self._vt = np.linalg.svd(rows, full_matrices=False)

    def configs(self) -> list[tuple[int, ...]]:
        return rank_grid(self._s.shape[1])

    def params(self, config: tuple[int, ...]) -> int:
        out_channels, in_channels = self.kernel.shape[:2]
        return config[0] * (self.blocks * in_channels * math.prod(self.kernel.shape[2:]) + out_channels)

    def steps(self, config: tuple[int, ...]) -> list[Step] | None:
        (rank,) = config
        out_channels, in_channels = self.kernel.shape[:2]
        spatial = self.kernel.shape[2:]
        root = np.sqrt(self._s[:, :rank])
        first = (root[:, :, None] * self._vt[:, :rank, :]).reshape(self.blocks * rank, in_channels, *spatial)
        second = (self._u[:, :, :rank] * root[:, None, :]).reshape(out_channels, rank, *[1] * len(spatial))
        return [Step(first, {**self.attrs, "group": 1}), Step(second, {**_pointwise(len(spatial)), "group": self.blocks})]


class CanonicalPolyadic(ConvDecomposer):
    """CP through tensorly's parafac (deterministic: SVD initialisation, fixed seed); configurations whose
    components diverge (their norms far above the kernel's, cancelling each other) are rejected."""

    method = "cp"
    DIVERGENCE = 10.0

    def __init__(self, layer: Layer, error: OutputError) -> None:
        super().__init__(layer, error)
        out_channels, in_channels, height, width = self.kernel.shape
        self._first, self._second = _split_pair(self.attrs, height, width)
        self.rejected: list[str] = []

    def configs(self) -> list[tuple[int, ...]]:
        out_channels, in_channels = self.kernel.shape[:2]
        largest = min(out_channels, in_channels)  # more components than channels rarely converge
        return sorted({(max(1, math.ceil(f * largest)),) for f in (1 / 8, 1 / 4, 1 / 2, 3 / 4, 1.0)})

    def params(self, config: tuple[int, ...]) -> int:
        return config[0] * sum(self.kernel.shape)

    def steps(self, config: tuple[int, ...]) -> list[Step] | None:
        import tensorly
        from tensorly.decomposition import parafac

        (rank,) = config
        out_channels, in_channels, height, width = self.kernel.shape
        tensorly.set_backend("numpy")
        if not np.any(self.kernel):
            self.rejected.append("an all-zero kernel has no CP")
            return None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tensorly's notes on SVD sizes and convergence
                weights, (outs, ins, verticals, horizontals) = parafac(
                    self.kernel, rank=rank, init="svd", n_iter_max=100, tol=1e-6, random_state=0
                )
        except np.linalg.LinAlgError:
            self.rejected.append(f"rank {rank}: the least-squares steps are singular")
            return None
        component_norms = (np.abs(weights) * np.linalg.norm(outs, axis=0) * np.linalg.norm(ins, axis=0)
                           * np.linalg.norm(verticals, axis=0) * np.linalg.norm(horizontals, axis=0))
        if not np.all(np.isfinite(component_norms)) or component_norms.sum() > self.DIVERGENCE * np.linalg.norm(self.kernel):
            self.rejected.append(f"rank {rank}: components diverge (degenerate CP)")
            return None
        return [
            Step(ins.T.reshape(rank, in_channels, 1, 1), _pointwise(2)),
            Step(verticals.T.reshape(rank, 1, height, 1), {**self._first, "group": rank}),
            Step(horizontals.T.reshape(rank, 1, 1, width), {**self._second, "group": rank}),
            Step((outs * weights).reshape(out_channels, rank, 1, 1), _pointwise(2)),
        ]


def conv_decomposers(layer: Layer, error: OutputError, methods: set[str]) -> tuple[list[ConvDecomposer], list[str]]:
    """The decomposers that apply to a Conv layer among `methods`, and why the others do not."""
    kernel = layer.weight.value
    groups = int(layer.node.attrs.get("group", 1))
    spatial = kernel.ndim - 2
    positions = math.prod(kernel.shape[2:])
    depthwise = groups > 1 and kernel.shape[1] == 1
    found: list[ConvDecomposer] = []
    reasons: list[str] = []

    def offer(name: str, applies: bool, why: str, make: Callable[[], ConvDecomposer]) -> None:
        if name not in methods:
            return
        if applies:
            found.append(make())
        else:
            reasons.append(f"{name}: {why}")

    plain = groups == 1 and positions > 1
    offer("tucker2", plain, "needs group 1 and a kernel wider than 1x1", lambda: Tucker2(layer, error))
    offer("depthwise", plain, "needs group 1 and a kernel wider than 1x1", lambda: DepthwiseSeparable(layer, error))
    separable = spatial == 2 and min(kernel.shape[2:]) > 1 and _split_axes(layer.node.attrs, *kernel.shape[2:])[0] is not None
    spatial_ok = separable and (groups == 1 or (depthwise and kernel.shape[0] == groups))
    offer("spatial", spatial_ok, "needs a 2-D kh x kw kernel (kh, kw > 1), explicit or stride-1 padding, and group 1 "
          "or depthwise with one filter per channel", lambda: SpatialSeparable(layer, error))
    if "cp" in methods:
        if importlib.util.find_spec("tensorly") is None:
            reasons.append("cp: needs tensorly (pip install 'onnx-lowrank[cp]')")
        else:
            offer("cp", separable and groups == 1, "needs a 2-D kernel (kh, kw > 1) and group 1",
                  lambda: CanonicalPolyadic(layer, error))
    if "block" in methods:
        fitting = [b for b in (2, 4) if groups == 1 and kernel.shape[0] % b == 0 and kernel.shape[0] >= 4 * b]
        found.extend(BlockLowRank(layer, error, blocks) for blocks in fitting)
        if not fitting:
            reasons.append("block: needs group 1 and at least 8 output channels in 2 or 4 equal blocks")
    return found, reasons


def _pointwise(spatial: int) -> dict:
    return {"kernel_shape": [1] * spatial}


def _split_pair(attrs: dict, height: int, width: int) -> tuple[dict, dict]:
    """_split_axes of a conv that conv_decomposers found separable."""
    vertical, horizontal = _split_axes(attrs, height, width)
    if vertical is None or horizontal is None:
        raise ValueError("the conv's padding depends on its input size: it does not split into kh x 1 and 1 x kw")
    return vertical, horizontal


def _split_axes(attrs: dict, height: int, width: int) -> tuple[dict | None, dict | None]:
    """Attributes of a kh x 1 conv then a 1 x kw conv that together do what the 2-D conv does, or None
    when its padding depends on the input size (auto_pad SAME with a stride)."""
    strides = list(attrs.get("strides", [1, 1]))
    dilations = list(attrs.get("dilations", [1, 1]))
    auto_pad = attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if strides != [1, 1]:
            return None, None
        pads = []
        for k, d in zip((height, width), dilations):
            total = (k - 1) * d
            small, large = total // 2, total - total // 2
            pads.append((small, large) if auto_pad == "SAME_UPPER" else (large, small))
        begin, end = [p[0] for p in pads], [p[1] for p in pads]
    elif auto_pad == "VALID":
        begin, end = [0, 0], [0, 0]
    else:
        all_pads = list(attrs.get("pads", [0, 0, 0, 0]))
        begin, end = all_pads[:2], all_pads[2:]
    vertical = {"kernel_shape": [height, 1], "strides": [strides[0], 1], "dilations": [dilations[0], 1],
                "pads": [begin[0], 0, end[0], 0]}
    horizontal = {"kernel_shape": [1, width], "strides": [1, strides[1]], "dilations": [1, dilations[1]],
                  "pads": [0, begin[1], 0, end[1]]}
    return vertical, horizontal


def _compose(steps: list[Step], layer: Layer) -> np.ndarray:
    """The single kernel a chain of convs amounts to (every chain here has one non-pointwise stage,
    or two 1-D stages along different axes), in the layer's (Cout, Cin / g, *k) layout."""
    shape = layer.weight.shape
    out_channels, per_group = shape[:2]
    groups = int(layer.node.attrs.get("group", 1))
    spatial = shape[2:]
    # apply the chain to every unit impulse of one group's input patch: the responses are the kernel
    eye = np.eye(per_group * math.prod(spatial)).reshape(-1, per_group, *spatial)
    kernel = np.zeros(shape)
    for group in range(groups):
        patch = np.zeros((eye.shape[0], per_group * groups, *spatial))
        patch[:, group * per_group : (group + 1) * per_group] = eye
        response = patch
        for step in steps:
            response = _conv_valid(response, step)
        columns = response.reshape(eye.shape[0], out_channels)  # one output position: (impulse, Cout)
        block = slice(group * (out_channels // groups), (group + 1) * (out_channels // groups))
        kernel[block] = columns[:, block].T.reshape(-1, per_group, *spatial)
    return kernel


def _conv_valid(x: np.ndarray, step: Step) -> np.ndarray:
    """A grouped convolution of x (N, C, *s) with the step's kernel, no padding, stride 1, dilation 1
    (composition only looks at how kernels combine, not where they are applied)."""
    kernel = step.kernel
    groups = int(step.attrs.get("group", 1))
    out_channels, per_group = kernel.shape[:2]
    spatial = kernel.shape[2:]
    windows = np.lib.stride_tricks.sliding_window_view(x, spatial, axis=tuple(range(2, x.ndim)))
    # windows: (N, C, *out, *k)
    n = x.shape[0]
    out_shape = windows.shape[2 : 2 + len(spatial)]
    grouped = windows.reshape(n, groups, per_group, *out_shape, *spatial)
    weights = kernel.reshape(groups, out_channels // groups, per_group, *spatial)
    letters = "xyz"[: len(spatial)]
    positions = "pqr"[: len(spatial)]
    result = np.einsum(f"ngc{positions}{letters},goc{letters}->ngo{positions}", grouped, weights)
    return result.reshape(n, out_channels, *out_shape)
