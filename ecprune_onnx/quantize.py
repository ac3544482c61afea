"""Quantize a layer's weights on a grid and move the weights not yet quantized to make up for
it (docs/method.md, "Quantization"): pure functions of arrays.

The loss is the reconstruction's (reconstruct.py): per row, (w' - w)^T H (w' - w), here with
w' on an integer grid, w'_ij = scale_ig · (q_ij - zero_ig) for the group g that holds
column j. GPTQ (Frantar et al. 2023, Algorithm 1) quantizes column after column and spreads
each column's error over the later ones through the Cholesky factor of H^-1, the same OBS
step SparseGPT takes for a removal; a weight the mask removed is quantized to exactly 0.

Grids (`QuantSpec`): int8 one group per output channel (a whole row), int4 groups of
`group_size` consecutive inputs of a row (the block layout of MatMulNBits and of blocked
DequantizeLinear). Each group's scale is chosen from a few clipping ratios by the error it
leaves, weighted by diag(H) (the loss of each column if it moved alone).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ecprune_onnx import reconstruct

# Clipping ratios tried for each group's range (1: the full range); more buys little.
CLIP_RATIOS = np.linspace(1.0, 0.55, 10)
# Columns per lazy batch update of GPTQ (its reference `blocksize`).
GPTQ_BLOCK = 128


@dataclass(frozen=True)
class QuantSpec:
    """An integer grid: `bits` wide, one group per row (`group_size` None) or groups of
    `group_size` inputs, symmetric (zero point fixed at the middle) or asymmetric."""

    bits: int
    group_size: int | None
    symmetric: bool

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def signed(self) -> bool:
        """Symmetric int8 codes are int8 with zero point 0 (the QDQ convention); every
        other grid stores unsigned codes with a zero point (MatMulNBits' convention)."""
        return self.symmetric and self.bits == 8

    def groups(self, in_features: int) -> int:
        size = self.group_size or in_features
        return -(-in_features // size)


@dataclass(frozen=True)
class Quantized:
    """A quantized weight [out, in]: codes in [qmin, qmax], float32 scale and integer zero
    point per (row, group)."""

    codes: np.ndarray  # int32 [out, in]
    scale: np.ndarray  # float32 [out, groups]
    zero_point: np.ndarray  # int32 [out, groups]
    spec: QuantSpec
    loss: float = 0.0  # GPTQ's sum of (w - q)^2 / [U]_jj^2, the H-loss it took on

    def dequantize(self) -> np.ndarray:
        """scale · (q - zero) in float32, as DequantizeLinear and MatMulNBits compute it,
        returned as float64 [out, in]."""
        size = self.spec.group_size or self.codes.shape[1]
        scale = np.repeat(self.scale, size, axis=1)[:, : self.codes.shape[1]]
        zero = np.repeat(self.zero_point, size, axis=1)[:, : self.codes.shape[1]]
        return ((self.codes - zero).astype(np.float32) * scale).astype(np.float64)


# λ of `anchored_refit`, relative to mean(diag C_pp).
REFIT_ANCHOR = 1e-2


def anchored_refit(
    weight: np.ndarray, c_pp: np.ndarray, c_op: np.ndarray, anchor: float = REFIT_ANCHOR
) -> np.ndarray:
    """W* = (W C_op + λ W)(C_pp + λ I)^-1: the weight that maps the quantized model's
    centred inputs onto the original layer's centred output, pulled towards W by λ.

    Why towards W and not towards 0 (sequential.py's ridge): with fewer calibration rows
    than inputs (256 rows, 1024 inputs in the benchmark's MLP) the plain refit fits the
    rows' noise along directions they never span, and the held-out output MSE at int8 was
    800 times its calibration MSE; a ridge to 0 shrinks every weight instead. Pulled to W,
    the unseen directions keep the trained weights: 1.1e-7 held-out MSE instead of 8.7e-5.
    """
    if np.array_equal(c_op, c_pp):
        return np.array(weight, dtype=np.float64)
    lam = anchor * np.trace(c_pp) / max(len(c_pp), 1)
    ridged = c_pp + lam * np.eye(len(c_pp))
    return np.linalg.solve(ridged, (weight @ c_op + lam * weight).T).T


def fit_grid(
    w: np.ndarray, spec: QuantSpec, importance: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of each row of `w` [rows, cols] (one group per row): the range of
    the row, shrunk by the clipping ratio whose rounding error sum_j importance_j (w_j -
    q_j)^2 is smallest. The range always holds 0, so a removed weight stays exactly 0."""
    w = np.asarray(w, dtype=np.float64)
    importance = np.ones(w.shape[1]) if importance is None else importance
    best_scale = best_zero = best_error = None
    for ratio in CLIP_RATIOS:
        scale, zero = _grid_for_range(w, spec, ratio)
        error = (np.square(w - _fake_quant(w, scale, zero, spec)) * importance).sum(axis=1)
        if best_error is None:
            best_scale, best_zero, best_error = scale, zero, error
            continue
        better = error < best_error
        best_scale = np.where(better, scale, best_scale)
        best_zero = np.where(better, zero, best_zero)
        best_error = np.minimum(error, best_error)
    return best_scale, best_zero


def _grid_for_range(w: np.ndarray, spec: QuantSpec, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """float32 scale and int zero point of each row for its range times `ratio`."""
    low = np.minimum(w.min(axis=1), 0.0) * ratio
    high = np.maximum(w.max(axis=1), 0.0) * ratio
    if spec.symmetric:
        # the positive half has one code fewer: [-7, 7] of [-8, 7] keeps the grid symmetric
        half = 2 ** (spec.bits - 1) - 1
        scale = np.maximum(np.abs(low), high) / half
        zero = np.full(len(w), 0 if spec.signed else 2 ** (spec.bits - 1))
    else:
        scale = (high - low) / (spec.qmax - spec.qmin)
        zero = None
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)  # an all-zero row: any scale
    if zero is None:
        zero = np.clip(np.round(spec.qmin - low / scale), spec.qmin, spec.qmax)
    return scale, zero.astype(np.int32)


def _codes(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """Round-to-nearest codes of w [rows, cols] on per-row grids."""
    scaled = np.round(w / scale[:, None].astype(np.float64)) + zero[:, None]
    return np.clip(scaled, spec.qmin, spec.qmax).astype(np.int32)


def _fake_quant(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, spec: QuantSpec):
    codes = _codes(w, scale, zero, spec)
    return ((codes - zero[:, None]).astype(np.float32) * scale[:, None]).astype(np.float64)


def rtn(weight: np.ndarray, h: np.ndarray | None, spec: QuantSpec) -> Quantized:
    """Round to nearest on each group's grid, nothing compensated: the baseline GPTQ beats.
    With `h`, the grids are chosen by the diag(H)-weighted error, as in `gptq`."""
    weight = np.asarray(weight, dtype=np.float64)
    rows, in_features = weight.shape
    importance = np.ones(in_features) if h is None else np.diag(h)
    size = spec.group_size or in_features
    codes = np.zeros(weight.shape, dtype=np.int32)
    scales, zeros = [], []
    for start in range(0, in_features, size):
        part = slice(start, min(start + size, in_features))
        scale, zero = fit_grid(weight[:, part], spec, importance[part])
        codes[:, part] = _codes(weight[:, part], scale, zero, spec)
        scales.append(scale)
        zeros.append(zero)
    return Quantized(codes, np.stack(scales, axis=1), np.stack(zeros, axis=1), spec)


def gptq(
    weight: np.ndarray,
    h: np.ndarray,
    spec: QuantSpec,
    *,
    keep: np.ndarray | None = None,
    dampening: float = 0.01,
    act_order: bool = False,
) -> Quantized:
    """GPTQ, Algorithm 1, on the loss (w' - w)^T H (w' - w) of every row: columns in order,
    q_j = quant(w_j), error e_j = (w_j - q_j) / U_jj, later columns w_k -= e_j U_jk, where U
    is the upper Cholesky factor of the dampened H^-1 (`reconstruct.hinv_factor`); the
    updates of later blocks are batched (lazy batch updates). A group's grid is fitted on the
    weights as they are when its first column comes up (GPTQ's grouping). Where `keep` is
    False the weight is quantized to exactly 0 (its zero point), as SparseGPT's joint mode
    does, and its error is compensated like any other.

    `act_order`: columns in decreasing H_jj (GPTQ's "act-order"), the grids then fitted on
    the starting weights of each group (its "static groups"), since a group's columns no
    longer come up together.
    """
    rows, in_features = weight.shape
    size = spec.group_size or in_features
    keep = np.ones(weight.shape, dtype=bool) if keep is None else keep
    importance = np.diag(h)
    order = np.argsort(-importance, kind="stable") if act_order else np.arange(in_features)
    # Dead inputs (H_jj = 0) keep their rounded weight rather than the 0 of SparseGPT's
    # reference: constant on the calibration rows is not constant on every row (the corner
    # pixels of the digits sample are 0 in its calibration set and not in its test set).
    grids = _static_grids(np.where(keep, weight, 0.0), importance, spec) if act_order else []
    w = np.array(weight, dtype=np.float64)[:, order]
    keep = keep[:, order]
    u = reconstruct.hinv_factor(h[np.ix_(order, order)], dampening)
    codes = np.zeros(w.shape, dtype=np.int32)
    loss = 0.0
    for start in range(0, in_features, GPTQ_BLOCK):
        stop = min(start + GPTQ_BLOCK, in_features)
        errors = np.zeros((rows, stop - start))
        for col in range(start, stop):
            if not act_order and col % size == 0:  # columns in order: fit as the group starts
                group = slice(col, min(col + size, in_features))
                grids.append(fit_grid(w[:, group] * keep[:, group], spec, importance[group]))
            scale, zero = grids[order[col] // size]
            column = np.where(keep[:, col], w[:, col], 0.0)
            codes[:, col] = _codes(column[:, None], scale, zero, spec)[:, 0]
            q = (codes[:, col] - zero).astype(np.float32) * scale
            error = (w[:, col] - q) / u[col, col]
            w[:, col:stop] -= np.outer(error, u[col, col:stop])  # OBS update within the block
            errors[:, col - start] = error
        w[:, stop:] -= errors @ u[start:stop, stop:]  # lazy batch update
        loss += float((errors * errors).sum())
    unpermuted = np.empty_like(codes)
    unpermuted[:, order] = codes
    scales, zeros = (np.stack([grid[part] for grid in grids], axis=1) for part in (0, 1))
    return Quantized(unpermuted, scales, zeros, spec, loss)


def _static_grids(w: np.ndarray, importance: np.ndarray, spec: QuantSpec) -> list:
    """Every group's (scale, zero) fitted on `w` as it is, in input order."""
    size = spec.group_size or w.shape[1]
    return [
        fit_grid(w[:, start : start + size], spec, importance[start : start + size])
        for start in range(0, w.shape[1], size)
    ]
