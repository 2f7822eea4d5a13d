"""The input patches a Conv multiplies by its kernel (im2col), so that a conv layer's statistics can be
taken on its inputs like a MatMul's: every decomposition's output error is then exact, not only that
of projections. Follows ONNX Conv semantics: pads or auto_pad, strides, dilations, groups, 1-D to 3-D.
"""

from __future__ import annotations

import math

import numpy as np

MAX_ROWS = 16384  # patches kept per batch (a seeded random subset beyond that: unbiased, bounded cost)


def conv_pads(attrs: dict, spatial: tuple[int, ...], kernel: tuple[int, ...]) -> tuple[list[int], list[int]]:
    """Begin and end padding per spatial axis, auto_pad resolved for this input size."""
    rank = len(kernel)
    strides = list(attrs.get("strides", [1] * rank))
    dilations = list(attrs.get("dilations", [1] * rank))
    auto_pad = attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, k, s, d in zip(spatial, kernel, strides, dilations):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else large)
            end.append(large if auto_pad == "SAME_UPPER" else small)
        return begin, end
    if auto_pad == "VALID":
        return [0] * rank, [0] * rank
    pads = list(attrs.get("pads", [0] * 2 * rank))
    return pads[:rank], pads[rank:]


def conv_patches(x: np.ndarray, kernel: tuple[int, ...], attrs: dict, groups: int, seed: int = 0) -> np.ndarray:
    """Patches of x (N, C, *spatial) as rows (groups, positions, C / groups * prod(kernel)), ordered like
    the kernel's flattened (C / groups, *kernel) so that a row times a flattened kernel is one output."""
    rank = len(kernel)
    strides = list(attrs.get("strides", [1] * rank))
    dilations = list(attrs.get("dilations", [1] * rank))
    begin, end = conv_pads(attrs, x.shape[2:], kernel)
    padded = np.pad(x, [(0, 0), (0, 0)] + list(zip(begin, end)))
    spans = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    axes = tuple(range(2, 2 + rank))
    windows = np.lib.stride_tricks.sliding_window_view(padded, spans, axis=axes)  # (N, C, *out_all, *spans)
    windows = windows[(slice(None), slice(None), *[slice(None, None, s) for s in strides],
                       *[slice(None, None, d) for d in dilations])]  # (N, C, *out, *kernel)
    positions = windows.shape[0] * math.prod(windows.shape[2 : 2 + rank])
    grid = np.indices((windows.shape[0], *windows.shape[2 : 2 + rank])).reshape(rank + 1, -1)
    if positions > MAX_ROWS:
        grid = grid[:, np.random.default_rng(seed).choice(positions, MAX_ROWS, replace=False)]
    picked = windows[(grid[0], slice(None), *grid[1:])]  # (P, C, *kernel)
    rows = picked.reshape(picked.shape[0], groups, -1)
    return np.ascontiguousarray(rows.swapaxes(0, 1))
