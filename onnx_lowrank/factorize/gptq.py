"""GPTQ rounding (Frantar et al., 2022, arXiv 2210.17323) of a MatMul's weight into the asymmetric blocks
int4.py stores: columns (input dimensions) are rounded one at a time, and what each one loses is pushed
onto the columns not yet rounded, weighted by the layer's input second moment H = E[x x^T], so that the
output error ||(W - Q) x|| rather than the weight error is what rounding keeps small. A block's scale and
zero point are set from its weights as they stand when its first column is reached (the original
algorithm's groups); updates are applied lazily, LAZY columns at a time (one matrix product each)."""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg

DAMP = 0.01  # of H's mean diagonal, added to it: rank-deficient statistics stay invertible
LAZY = 128  # columns rounded between two full updates (a multiple of every block size)
HALF = np.float16


def gptq(matrix: np.ndarray, inverse_root: np.ndarray, block: int, bits: int = 4) -> tuple[np.ndarray, ...]:
    """Codes (out, blocks, block), scales and zero points (out, blocks) of `matrix` (out x in) rounded
    against the input second moment, given by `inverse_root` (inverse_cholesky of it); the scales as stored
    (float16 when every one is a normal float16)."""
    levels = 2**bits - 1
    out, width = matrix.shape
    count = math.ceil(width / block)
    weights = np.array(matrix, dtype=np.float64)
    codes = np.zeros((out, count * block))
    scales, zero_points = np.ones((out, count)), np.zeros((out, count))
    for start in range(0, width, LAZY):
        end = min(start + LAZY, width)
        part, lost = weights[:, start:end].copy(), np.zeros((out, end - start))
        root = inverse_root[start:end, start:end]
        for i in range(end - start):
            column = start + i
            group = column // block
            if column % block == 0:
                chunk = part[:, i : i + block]
                low, high = np.minimum(chunk.min(axis=1), 0.0), np.maximum(chunk.max(axis=1), 0.0)
                scales[:, group] = stored_scales((high - low) / levels)
                zero_points[:, group] = np.clip(np.round(-low / scales[:, group]), 0, levels)
            scale, zero = scales[:, group], zero_points[:, group]
            code = np.clip(np.round(part[:, i] / scale) + zero, 0, levels)
            codes[:, column] = code
            error = (part[:, i] - (code - zero) * scale) / root[i, i]
            part[:, i:] -= np.outer(error, root[i, i:])
            lost[:, i] = error
        weights[:, end:] -= lost @ inverse_root[start:end, end:]
    codes[:, width:] = np.repeat(zero_points[:, -1:], count * block - width, axis=1)  # padding: zero
    half = scales.astype(HALF)
    return codes.reshape(out, count, block), (half if np.array_equal(half, scales) else scales), zero_points


def stored_scales(scales: np.ndarray) -> np.ndarray:
    """Scales as they can be stored: rounded up to float16 where that keeps a normal float16 (rounded up,
    no code clips), else to float32; zero scales become 1."""
    scales = np.where(scales > 0, scales, 1.0)
    half = scales.astype(HALF)
    half = np.where(half < scales, np.nextafter(half, HALF(np.inf)), half)
    fits = np.isfinite(half) & (half >= np.finfo(HALF).smallest_normal)
    return np.where(fits, half.astype(np.float64), scales.astype(np.float32).astype(np.float64))


def inverse_cholesky(second: np.ndarray) -> np.ndarray:
    """The upper Cholesky factor of (H + damping)^-1: GPTQ's update weights."""
    hessian = np.array(second, dtype=np.float64)
    diagonal = np.diag(hessian).copy()
    diagonal[diagonal <= 0] = 1.0  # inputs never active: rounded on their own
    np.fill_diagonal(hessian, diagonal + DAMP * float(np.mean(diagonal)))
    inverse = scipy.linalg.cho_solve(scipy.linalg.cho_factor(hessian, lower=True), np.eye(len(hessian)))
    return scipy.linalg.cholesky((inverse + inverse.T) / 2, lower=False)
