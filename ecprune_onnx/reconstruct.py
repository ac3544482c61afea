"""Remove weights and move the kept ones to make up for them (docs/method.md, "Reconstruction:
from EC to OBS"): pure functions of arrays.

Every solver attacks, row by row, the same quadratic layer loss

    L_i(w') = (w' - w)^T H (w' - w),      w' zero on the removed set of row i,

with H = sum_r a(r) a(r)^T (`gram`), dampened by λ · mean(diag H) (`dampen`):

- `sparsegpt`: SparseGPT (Frantar & Alistarh 2023, Algorithm 1), the scalable one;
- `obc`: ExactOBS of Optimal Brain Compression (Frantar, Singh & Alistarh 2022: its
  Algorithm 1 per row, and its global mask selection across rows), the exact greedy one;
- `centred`: the tool's own. Either solver on the centred covariance C, the bias taking
  δ_i = -(w'_i - w_i) · μ, so the reconstruction only fights the covariance.

Dead inputs (H_jj = 0) follow the reference code of both papers: H_jj is set to 1 and
the weight column to 0 before solving, so they are removed first at no cost. In the
centred case the bias shift is taken against the original weight and carries their mean.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import torch

from ecprune_onnx.blockwise import row_blocks
from ecprune_onnx.errors import UsageError

SOLVERS = ("obc", "sparsegpt")


@dataclass(frozen=True)
class Reconstruction:
    """What a solver returns for one layer."""

    weight: np.ndarray  # new effective weight [out, in], zeros where removed
    keep: np.ndarray  # bool [out, in]
    bias_shift: np.ndarray  # [out] (zeros for the uncentred rivals)
    # sum_i s_i (w'_i - w_i)^T H (w'_i - w_i) as the solver adds it up: on the dampened H,
    # from the weight with its dead-input columns zeroed
    loss: float
    # the same per row, without s_i ([out]): `undamped_loss` turns it into L_i on H itself
    row_loss: np.ndarray | None = None


class ObcTrace(NamedTuple):
    """Each row's greedy ExactOBS sequence: `order[i, k]` is the input removed at step k,
    `cumulative_loss[i, k]` the loss of row i after its first k removals ([out, steps + 1])."""

    order: np.ndarray
    cumulative_loss: np.ndarray


def gram(a_rows: np.ndarray) -> np.ndarray:
    """H = X X^T = sum_r a(r) a(r)^T from [rows, in] activations, in float64 (the papers scale
    it by 2 / rows; the scale changes neither the mask nor the weights)."""
    a = np.asarray(a_rows, dtype=np.float64)
    return a.T @ a


def centred_gram(a_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """C = sum_r (a(r) - μ)(a(r) - μ)^T and the input mean μ (docs/method.md, shared-μ case)."""
    a = np.asarray(a_rows, dtype=np.float64)
    mean = a.mean(axis=0)
    return gram(a - mean), mean


def dampen(h: np.ndarray, fraction: float = 0.01, *, reversed_order: bool = False) -> np.ndarray:
    """H + λ · mean(diag H) · I, after setting dead diagonal entries (H_jj = 0) to 1.

    Both are from the reference `fasterprune` of SparseGPT (λ = `percdamp` = 0.01); the dead
    inputs must be given weight 0 as well (`_zero_dead_inputs`). `reversed_order` gives it
    with rows and columns reversed, P H P, without a second copy (see `_hinv_cholesky`).
    """
    diagonal = np.diag(h) + damping(h, fraction)
    damped = np.array(h[::-1, ::-1] if reversed_order else h, dtype=np.float64)
    np.einsum("jj->j", damped)[:] = diagonal[::-1] if reversed_order else diagonal
    return damped


def dampen_in_place(h: np.ndarray, fraction: float = 0.01) -> np.ndarray:
    """`dampen(h, fraction)` written over h itself, the same bits; returns h."""
    np.einsum("jj->j", h)[:] += damping(h, fraction)
    return h


def layer_loss(
    weight_new: np.ndarray, weight: np.ndarray, h: np.ndarray, row_scale: np.ndarray | None = None
) -> float:
    """sum_i s_i (w'_i - w_i)^T H (w'_i - w_i): the layer-output error on the calibration rows
    when H = X X^T (docs/method.md's L_i with c_i(r) = s_i); s_i = 1 without `row_scale`."""
    diff = np.asarray(weight_new, dtype=np.float64) - weight
    per_row = ((diff @ h) * diff).sum(axis=1)  # a GEMM; einsum's 3-operand path is slow
    return float(per_row.sum() if row_scale is None else per_row @ row_scale)


def undamped_loss(
    solved: Reconstruction,
    weight: np.ndarray,
    h: np.ndarray,
    row_scale: np.ndarray | None = None,
    dampening: float = 0.01,
) -> float:
    """`layer_loss(solved.weight, weight, h, row_scale)` from the solver's own per-row loss,
    in O(out · in) instead of a GEMM of out · in² (the cost of the solve itself).

    The solvers add up (w' - w0)^T H_d (w' - w0) on the dampened H_d = H + D, D diagonal
    (`dampen`), w0 the weight with dead columns zeroed; so L_i on H is that minus
    sum_j D_jj (w'_ij - w0_ij)^2. Dead columns add nothing on H (its row and column are 0).
    """
    added = damping(h, dampening)
    dead = diagonal_of(h) == 0
    per_row = np.array(solved.row_loss, dtype=np.float64)
    for rows in row_blocks(len(per_row)):  # no [out, in] temporaries
        diff = solved.weight[rows] - weight[rows]
        diff[:, dead] = solved.weight[rows][:, dead]  # against w0, whose dead columns are 0
        per_row[rows] -= (diff * diff) @ added
    return float(per_row.sum() if row_scale is None else per_row @ row_scale)


def diagonal_of(h: np.ndarray) -> np.ndarray:
    """H's diagonal. Where a solver is given its factor, H is read only through its
    diagonal, and the caller may pass that alone (`sequential._solver_inputs` frees the
    [in, in] matrix once the factor is made from it)."""
    return h if h.ndim == 1 else np.diag(h)


def damping(h: np.ndarray, dampening: float) -> np.ndarray:
    """The diagonal D that `dampen` adds to H (dead inputs included: 0 → 1 + λ mean), from
    the diagonal alone (a dampened copy of H is 400 MB at 7071 inputs)."""
    diagonal = diagonal_of(h).astype(np.float64)
    damped = np.where(diagonal == 0, 1.0, diagonal)
    damped += dampening * damped.mean()
    return damped - diagonal


def optimal_for_mask(weight: np.ndarray, h: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The optimum of every row for a fixed mask: w'_F = H_FF^-1 (H w)_F on the kept set F,
    0 elsewhere (the normal equations of L_i restricted to F; any sequence of exact OBS
    steps ends here). Rows with the same kept count are solved in one batch."""
    target = np.asarray(weight, dtype=np.float64) @ h  # (H w_i)^T for every row, H symmetric
    result = np.zeros_like(target)
    counts = keep.sum(axis=1)
    for count in np.unique(counts[counts > 0]):
        rows = np.flatnonzero(counts == count)
        kept = np.nonzero(keep[rows])[1].reshape(len(rows), count)
        h_kept = torch.from_numpy(h[kept[:, :, None], kept[:, None, :]])
        rhs = torch.from_numpy(np.take_along_axis(target[rows], kept, axis=1))[:, :, None]
        with _single_thread():
            solved = torch.cholesky_solve(rhs, torch.linalg.cholesky(h_kept))[:, :, 0].numpy()
        result[rows[:, None], kept] = solved
    return result


def _removal_count(size: int, sparsity: float) -> int:
    """Same rounding as `masks.choose_masks`, so the achieved share is the requested one."""
    return int(round(sparsity * size))


def _check_pattern(in_features: int, pattern: tuple[int, int] | None) -> None:
    if pattern is not None and in_features % pattern[1]:
        raise UsageError(
            f"pattern {pattern[0]}:{pattern[1]}: a layer has {in_features} inputs, "
            f"not a multiple of {pattern[1]}"
        )


def _zero_dead_inputs(weight: np.ndarray, h: np.ndarray, dtype: type = np.float64) -> np.ndarray:
    """A copy of the weight with the columns of dead inputs (H_jj = 0) set to 0."""
    w = np.array(weight, dtype=dtype, order="C")
    w[:, diagonal_of(h) == 0] = 0.0
    return w


@contextmanager
def _single_thread() -> Iterator[None]:
    """Torch on one thread: ExactOBS is thousands of small ops and memory-bound GEMMs, and
    intra-op threads cost more than they give (measured on a 2-core machine shared with
    other jobs: a 256 x 256 layer 0.7-1 s on one thread, 1.7-20 s on two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# --- SparseGPT (Frantar & Alistarh 2023) -----------------------------------------------------


def sparsegpt(
    weight: np.ndarray,
    h: np.ndarray,
    sparsity: float,
    *,
    pattern: tuple[int, int] | None = None,
    blocksize: int = 128,
    dampening: float = 0.01,
    factor: np.ndarray | None = None,
    dtype: type = np.float64,
) -> Reconstruction:
    """SparseGPT, Algorithm 1: blocks of `blocksize` columns, each with an adaptive mask
    chosen from w_c^2 / [chol(H^-1)]_cc^2 on the current weights, column-by-column OBS
    updates inside the block (rows of the Cholesky factor) and a lazy batch update of the
    later columns.

    `pattern=(keep_n, group_m)` keeps N of every M inputs of a row (the paper's N:M variant:
    mask blocks of M columns, chosen per row) and ignores `sparsity`; `blocksize` is then
    rounded down to a multiple of M. Unstructured, each block loses its share of the layer's
    removal count, by cumulative rounding so that the layer total is exact (the reference
    `fasterprune` removes `int(numel * sparsity) + 1` per block, its `<=` threshold).
    `dtype`: of the weights, the factor and the updates (the reference code's is float32;
    the losses add up in float64).
    """
    rows, in_features = weight.shape
    _check_pattern(in_features, pattern)
    if pattern:  # a group of M must not straddle two blocks
        blocksize = max(pattern[1], blocksize - blocksize % pattern[1])
    # One H solved at many sparsities (sequential.py's loss curves) shares the factor. It is
    # made before the copy of the weight: the factorisation's temporaries peak first. Given
    # the factor, H may be its diagonal alone (`diagonal_of`).
    if factor is None and h.ndim == 1:
        raise ValueError("sparsegpt: H's diagonal alone needs the factor")
    u = hinv_factor(h, dampening) if factor is None else factor
    u = np.asarray(u, dtype=dtype)  # rebound: a float64 factor made here is gone
    w = _zero_dead_inputs(weight, h, dtype)
    removed = np.zeros(w.shape, dtype=bool)
    row_loss = np.zeros(rows)
    lazy = _LazyUpdates(w, u, blocksize)
    for start in range(0, in_features, blocksize):
        stop = min(start + blocksize, in_features)
        u_block = u[start:stop, start:stop]
        chosen = None
        if not pattern:  # the adaptive mask: the block's lowest saliencies
            quota = _block_quota(rows, start, stop, sparsity)
            chosen = _lowest(_saliency(w[:, start:stop], u_block), quota)
        block, removed[:, start:stop], errors = _prune_block(
            w[:, start:stop], u_block, chosen, pattern
        )
        w[:, start:stop] = block
        lazy.after_block(start, stop, errors)
        row_loss += (errors * errors).sum(axis=1, dtype=np.float64)
    return Reconstruction(w, ~removed, np.zeros(rows), float(row_loss.sum()), row_loss)


def hinv_factor(h: np.ndarray, dampening: float = 0.01) -> np.ndarray:
    """The upper Cholesky factor of the dampened H^-1 that `sparsegpt` works with."""
    return _hinv_cholesky(dampen(h, dampening, reversed_order=True))


def _lapack():
    """scipy's LAPACK, imported on first use: the score methods never reach it, and its
    import is 16 MiB of a compress's memory (in `ec`'s peak, where every MiB at 100M
    weights is 0.01 byte per weight)."""
    from scipy.linalg import lapack

    return lapack


def hinv_factor_in_place(h: np.ndarray, dampening: float = 0.01) -> np.ndarray:
    """`hinv_factor(h, dampening)`, the same bits, made in h's own memory (h is gone)."""
    return _hinv_cholesky(_reverse_in_place(dampen_in_place(h, dampening)))


def cholesky_in_place(a: np.ndarray) -> np.ndarray:
    """The upper Cholesky factor U of a symmetric positive definite float64 `a` (a = U^T U),
    written over `a` by LAPACK's potrf: a C-order `a` is read as its column-major transpose,
    the same matrix, and U comes back column-major in a's memory, zero below the diagonal.
    torch's Cholesky returns a new matrix (400 MB more at 7069 inputs) and took 1.9 s
    against potrf's 1.3 s on the 2-core VM."""
    upper, info = _lapack().dpotrf(a.T, lower=0, overwrite_a=1, clean=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"Cholesky: leading minor {info} is not positive definite")
    return upper


def sparsegpt_losses(
    weight: np.ndarray,
    h: np.ndarray,
    sparsities: np.ndarray,
    *,
    blocksize: int = 128,
    dampening: float = 0.01,
    factor: np.ndarray | None = None,
    dtype: type = np.float64,
) -> np.ndarray:
    """L_i on H (undampened) of `sparsegpt` run unstructured at each of `sparsities`:
    [len(sparsities), out]. The runs are stacked into one: each keeps its own mask and
    quota per block, and they share the column loop and one GEMM per lazy update (one run
    at a time spent most of its time in Python per column, 19 times over). `dtype`: of
    the weights and updates (the losses add up in float64)."""
    rows, in_features = weight.shape
    u = hinv_factor(h, dampening) if factor is None else factor
    u = np.asarray(u, dtype=dtype)
    start_weight = _zero_dead_inputs(weight, h, dtype)
    w = np.tile(start_weight, (len(sparsities), 1))
    row_loss = np.zeros(len(w))
    lazy = _LazyUpdates(w, u, blocksize)
    for start in range(0, in_features, blocksize):
        stop = min(start + blocksize, in_features)
        u_block = u[start:stop, start:stop]
        saliency = _saliency(w[:, start:stop], u_block).reshape(len(sparsities), rows, -1)
        chosen = np.concatenate(
            [
                _lowest(run, _block_quota(rows, start, stop, sparsity))
                for run, sparsity in zip(saliency, sparsities)
            ]
        )
        w[:, start:stop], _, errors = _prune_block(w[:, start:stop], u_block, chosen, None)
        lazy.after_block(start, stop, errors)
        row_loss += (errors * errors).sum(axis=1, dtype=np.float64)
    added = damping(h, dampening)
    w -= np.tile(start_weight, (len(sparsities), 1))
    return (row_loss - (w * w) @ added.astype(dtype)).reshape(len(sparsities), rows)


def _hinv_cholesky(reversed_damped: np.ndarray) -> np.ndarray:
    """Upper Cholesky factor U of H^-1 (H^-1 = U^T U): row j of U / U_jj is the OBS update
    of the columns after j once the columns before j are fixed (as in SparseGPT and GPTQ).
    Written over `reversed_damped`, the dampened H reversed (P H P, P the reversal).

    Without forming H^-1: with P H P = L L^T, H^-1 = (P L^-T P)(P L^-1 P), so U = P L^-1 P
    (upper, positive diagonal: the unique factor). One Cholesky and one triangular inverse,
    n^3 / 3 each, against 5 n^3 / 3 for Cholesky, inverse and Cholesky again (the reference
    code's route), both LAPACK in place: L^T column-major is L row-major, and trtri inverts
    it to (L^T)^-1 = (L^-1)^T column-major, L^-1 row-major (torch has no triangular inverse,
    and its triangular solve against I costs n^3: 4.5 s against 1.7 s at 7069 inputs).
    """
    inverse, info = _lapack().dtrtri(cholesky_in_place(reversed_damped), lower=0, overwrite_c=1)
    if info != 0:  # a Cholesky factor has a positive diagonal: not reached
        raise np.linalg.LinAlgError(f"trtri failed: info {info}")
    return _reverse_in_place(inverse.T)


def _reverse_in_place(square: np.ndarray) -> np.ndarray:
    """P A P (rows and columns reversed) in A's own memory: row i and row n-1-i swap, each
    reversed; `flip` or a contiguous copy of A[::-1, ::-1] would hold A twice."""
    size = len(square)
    for top in range((size + 1) // 2):
        bottom = size - 1 - top
        upper = square[top, ::-1].copy()
        square[top] = square[bottom, ::-1]
        square[bottom] = upper
    return square


# Blocks of columns whose lazy batch updates of the later columns go out together
# (`_LazyUpdates`).
PANEL_BLOCKS = 4


class _LazyUpdates:
    """Algorithm 1's lazy batch updates, by panels of PANEL_BLOCKS blocks: a pruned block's
    OBS updates reach the rest of its panel at once, and the columns after the panel once
    per panel, one GEMM with the errors of all its blocks. The same sums, grouped as GPTQ
    groups them: a pass over all later columns per block of 128 was half of a 7069-wide
    layer's solve (rank-128 updates run at memory speed)."""

    def __init__(self, w: np.ndarray, u: np.ndarray, blocksize: int):
        self.w, self.u = w, u
        self.panel = blocksize * PANEL_BLOCKS
        self.errors: list[np.ndarray] = []

    def after_block(self, start: int, stop: int, errors: np.ndarray) -> None:
        """Blocks come in order, each starting at a multiple of the block size."""
        first = start - start % self.panel
        end = min(first + self.panel, self.w.shape[1])
        _subtract_product(self.w[:, stop:end], errors, self.u[start:stop, stop:end])
        self.errors.append(errors)
        if stop == end:
            panel_errors = np.concatenate(self.errors, axis=1)
            self.errors = []
            _subtract_product(self.w[:, end:], panel_errors, self.u[first:end, end:])


def _subtract_product(target: np.ndarray, left: np.ndarray, right: np.ndarray) -> None:
    """target -= left @ right in target's own memory (a strided view): one GEMM with
    beta = 1 in torch, where numpy makes the product, then subtracts it, a pass over a
    temporary as large as the target (5.4 s against 3.6 s for a 7069-wide layer's updates)."""
    if target.size:
        torch.from_numpy(target).addmm_(torch.from_numpy(left), torch.from_numpy(right), alpha=-1)


def _block_quota(rows: int, start: int, stop: int, sparsity: float) -> int:
    """Removals in columns [start, stop): cumulative rounding of sparsity · rows · columns."""
    return _removal_count(rows * stop, sparsity) - _removal_count(rows * start, sparsity)


# Columns whose OBS updates are applied one by one inside a block; the rest of the block
# gets them as one GEMM per such run (the block's column loop was most of a solve).
_RUN = 16


def _prune_block(
    block: np.ndarray,
    u_block: np.ndarray,
    chosen: np.ndarray | None,
    pattern: tuple[int, int] | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One block of Algorithm 1 with the unstructured mask `chosen` (None with a pattern,
    whose groups are chosen as the columns come): (pruned block, removed mask, errors
    E = (w - q) / U_jj). The updates of a column reach the next columns of its run of
    _RUN at once, and the columns after the run together with the run's other updates:
    the same sums, in another order (runs hold whole groups of M)."""
    block = block.copy()
    errors = np.zeros_like(block)
    removed = np.zeros(block.shape, dtype=bool) if chosen is None else chosen
    width = block.shape[1]
    run = max(pattern[1], _RUN - _RUN % pattern[1]) if pattern else _RUN
    for first in range(0, width, run):
        end = min(first + run, width)
        for col in range(first, end):
            if pattern and col % pattern[1] == 0:
                group = slice(col, col + pattern[1])
                group_scores = _saliency(block[:, group], u_block[group, group])
                removed[:, group] = _lowest_per_row(group_scores, pattern[1] - pattern[0])
            errors[:, col] = np.where(removed[:, col], block[:, col], 0.0) / u_block[col, col]
            block[:, col:end] -= errors[:, col, None] * u_block[col, col:end]  # OBS update
        block[:, end:] -= errors[:, first:end] @ u_block[first:end, end:]
    block[removed] = 0.0  # exact zeros, not roundoff
    return block, removed, errors


def _saliency(w: np.ndarray, u: np.ndarray) -> np.ndarray:
    """w_c^2 / [chol(H^-1)]_cc^2, SparseGPT's mask-selection score."""
    return w * w / np.diag(u)[None, :] ** 2


def _lowest(score: np.ndarray, count: int) -> np.ndarray:
    """Mask of the `count` lowest scores of the array, ties by (row-major) position.

    A partition finds the count-th value (a stable sort of every block was a third of a
    SparseGPT solve); all below it are chosen, and of those equal to it the first ones."""
    flat = score.ravel()
    if count <= 0:
        return np.zeros(score.shape, dtype=bool)
    if count >= flat.size:
        return np.ones(score.shape, dtype=bool)
    value = np.partition(flat, count - 1)[count - 1]
    chosen = flat < value
    ties = np.flatnonzero(flat == value)[: count - int(chosen.sum())]
    chosen[ties] = True
    return chosen.reshape(score.shape)


def _lowest_per_row(score: np.ndarray, count: int) -> np.ndarray:
    order = np.argsort(score, axis=1, kind="stable")
    chosen = np.zeros(score.shape, dtype=bool)
    np.put_along_axis(chosen, order[:, :count], True, axis=1)
    return chosen


# --- ExactOBS (Frantar & Alistarh 2022) ------------------------------------------------------


def obc(
    weight: np.ndarray,
    h: np.ndarray,
    sparsity: float,
    *,
    pattern: tuple[int, int] | None = None,
    dampening: float = 0.01,
    row_scale: np.ndarray | None = None,
) -> Reconstruction:
    """ExactOBS: per row, greedy OBS removals (`obc_traces`); the layer's removal count is
    spread over the rows by OBC's global mask selection (`allocate_removals`), and each row
    takes its greedy weights at its count, recomputed exactly (`optimal_for_mask`).

    `row_scale` s_i multiplies row i's losses (docs/method.md: c_i(r) ≈ s_i), which moves
    removals towards insensitive rows. `pattern=(keep_n, group_m)` keeps N of every M inputs
    of a row (OBC's N:M greedy, a group closed once full) and ignores `sparsity`.
    """
    rows, in_features = weight.shape
    _check_pattern(in_features, pattern)
    scale = np.ones(rows) if row_scale is None else np.asarray(row_scale, dtype=np.float64)
    if pattern:
        steps = in_features // pattern[1] * (pattern[1] - pattern[0])
        trace = obc_traces(weight, h, pattern=pattern, steps=steps, dampening=dampening)
        counts = np.full(rows, steps)
    else:
        trace = obc_traces(weight, h, dampening=dampening)
        total = _removal_count(weight.size, sparsity)
        counts = allocate_removals(trace.cumulative_loss, total, scale)
    keep = np.ones(weight.shape, dtype=bool)
    for row, count in enumerate(counts):
        keep[row, trace.order[row, :count]] = False
    h_damp = dampen(h, dampening)
    w = optimal_for_mask(_zero_dead_inputs(weight, h), h_damp, keep)
    row_loss = trace.cumulative_loss[np.arange(rows), counts]
    return Reconstruction(w, keep, np.zeros(rows), float(scale @ row_loss), row_loss)


def allocate_removals(
    cumulative_loss: np.ndarray, total: int, row_scale: np.ndarray | None = None
) -> np.ndarray:
    """Removals per row from OBC's global mask selection (reference `prune_blocked`): sort
    every row's per-step loss increments s_i ΔL_ik together, take the `total` smallest (ties
    by position); row i removes the first greedy steps, as many as it has among them."""
    increments = np.diff(cumulative_loss, axis=1)
    if row_scale is not None:
        increments = increments * row_scale[:, None]
    chosen = np.argsort(increments, axis=None, kind="stable")[:total]
    return np.bincount(chosen // increments.shape[1], minlength=len(increments))


def obc_traces(
    weight: np.ndarray,
    h: np.ndarray,
    *,
    pattern: tuple[int, int] | None = None,
    steps: int | None = None,
    dampening: float = 0.01,
) -> ObcTrace:
    """Greedy ExactOBS on every row for `steps` removals (default: all inputs), OBC's
    Algorithm 1: remove p = argmin w_p^2 / [H^-1]_pp (the OBS saliency), then
    w <- w - w_p / [H^-1]_pp H^-1_:,p (the OBS update) and
    H^-1 <- H^-1 - H^-1_:,p H^-1_p,: / [H^-1]_pp (OBC's Lemma 1, row and column removal).
    Rows go in batches of [rows, in, in] float64 inverses (the reference's `parallel`)."""
    rows, in_features = weight.shape
    steps = in_features if steps is None else steps
    h_damp = dampen(h, dampening)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(torch.from_numpy(h_damp)))
    w = torch.from_numpy(_zero_dead_inputs(weight, h))
    batch = max(1, 2**25 // max(in_features * in_features, 1))  # ≈ 256 MB of inverses
    order = np.zeros((rows, steps), dtype=np.int64)
    increments = np.zeros((rows, steps))
    with _single_thread():
        for start in range(0, rows, batch):
            part = slice(start, min(start + batch, rows))
            order[part], increments[part] = _greedy_rows(w[part], hinv, steps, pattern)
    cumulative = np.concatenate([np.zeros((rows, 1)), np.cumsum(increments, axis=1)], axis=1)
    return ObcTrace(order, cumulative)


_FOLD = 32  # greedy steps between two rank-_FOLD updates of the inverses (one batched GEMM)


def _greedy_rows(
    w: torch.Tensor, hinv: torch.Tensor, steps: int, pattern: tuple[int, int] | None
) -> tuple[np.ndarray, np.ndarray]:
    """ExactOBS steps on a batch of rows. The rank-1 downdates of eq. 4 are collected and
    applied every _FOLD steps as one in-place GEMM (exact: they add up); removed inputs are
    dropped from the [rows, n, n] inverses now and then, so the work shrinks as rows empty."""
    rows, in_features = w.shape
    state = _GreedyState(
        w=w.clone(),
        hinv=hinv.expand(rows, -1, -1).clone(),
        columns=torch.arange(in_features).expand(rows, -1).clone(),
        removed=torch.zeros(rows, in_features, dtype=torch.bool),
        group_removed=torch.zeros(
            rows, in_features // pattern[1] if pattern else 1, dtype=torch.long
        ),
    )
    order = torch.zeros(rows, steps, dtype=torch.long)
    increments = torch.zeros(rows, steps, dtype=w.dtype)
    for start in range(0, steps, _FOLD):
        stop = min(start + _FOLD, steps)
        order[:, start:stop], increments[:, start:stop] = state.run(stop - start, pattern)
    return order.numpy(), increments.numpy()


@dataclass
class _GreedyState:
    """A batch of rows during ExactOBS: weights, inverse Hessians (folded up to the last
    round), the original column of every position, which positions are removed (all rows
    have removed as many) and, for N:M, removals per group of M."""

    w: torch.Tensor  # [rows, n]
    hinv: torch.Tensor  # [rows, n, n]
    columns: torch.Tensor  # [rows, n]
    removed: torch.Tensor  # [rows, n]
    group_removed: torch.Tensor  # [rows, in / M]

    def run(self, count: int, pattern: tuple[int, int] | None) -> tuple[torch.Tensor, ...]:
        """`count` greedy steps, then fold their downdates into H^-1 (one pass over it, the
        bottleneck) and drop the removed positions once they are a quarter of them."""
        rows, n = self.w.shape
        downdates = torch.zeros(rows, count, n, dtype=self.w.dtype)
        order, increments = self._steps(downdates, pattern)
        self.hinv.baddbmm_(downdates.mT, downdates, alpha=-1.0)
        if 4 * int(self.removed[0].sum()) >= n:
            self._drop()
        return order, increments

    def _steps(
        self, downdates: torch.Tensor, pattern: tuple[int, int] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The OBS steps of one round: the downdates u = H^-1_:,p / sqrt([H^-1]_pp) go to
        `downdates`, `hinv` itself stays as it was at the start of the round."""
        rows, count, _ = downdates.shape
        every = torch.arange(rows)
        diag = self.hinv.diagonal(dim1=1, dim2=2).clone()
        order = torch.zeros(rows, count, dtype=torch.long)
        increments = torch.zeros(rows, count, dtype=self.w.dtype)
        for step in range(count):
            score = (self.w * self.w / diag).masked_fill(self._blocked(pattern), torch.inf)
            p = score.argmin(dim=1)
            increments[:, step], order[:, step] = score[every, p], self.columns[every, p]
            # row p of the current H^-1: the folded one minus this round's downdates
            hinv_p = self.hinv[every, p] - torch.bmm(
                downdates[every, :step, p].unsqueeze(1), downdates[:, :step]
            ).squeeze(1)
            d = hinv_p[every, p]
            self.w -= (self.w[every, p] / d).unsqueeze(1) * hinv_p
            self.removed[every, p] = True  # its w and H^-1 entries are now roundoff, unread
            downdates[:, step] = hinv_p / d.sqrt().unsqueeze(1)
            diag -= downdates[:, step] ** 2
            if pattern:
                self.group_removed[every, order[:, step] // pattern[1]] += 1
        return order, increments

    def _blocked(self, pattern: tuple[int, int] | None) -> torch.Tensor:
        """Removed positions and, for N:M, those whose group has lost its M - N already."""
        if not pattern:
            return self.removed
        full = self.group_removed >= pattern[1] - pattern[0]
        return self.removed | full.gather(1, self.columns // pattern[1])

    def _drop(self) -> None:
        """Keep only the active positions."""
        rows = len(self.w)
        active = (~self.removed).nonzero()[:, 1].reshape(rows, -1)
        self.w = self.w.gather(1, active)
        self.columns = self.columns.gather(1, active)
        self.removed = torch.zeros(active.shape, dtype=torch.bool)
        every = torch.arange(rows)[:, None, None]
        self.hinv = self.hinv[every, active.unsqueeze(2), active.unsqueeze(1)]


# --- The tool's own: centred reconstruction (docs/method.md) --------------------------------------


def centred(
    weight: np.ndarray,
    h_centred: np.ndarray,
    mean: np.ndarray,
    sparsity: float,
    *,
    solver: str = "obc",
    pattern: tuple[int, int] | None = None,
    blocksize: int = 128,
    dampening: float = 0.01,
    row_scale: np.ndarray | None = None,
    factor: np.ndarray | None = None,
    dtype: type = np.float64,
) -> Reconstruction:
    """Reconstruction with the bias carrying the mean (docs/method.md): the solver runs on the
    centred covariance C = sum_r (a(r) - μ)(a(r) - μ)^T, then δ_i = -(w'_i - w_i) · μ_i.

    `mean` is the shared input mean μ [in], or one μ_i = S1_i / S0_i per row [out, in].
    Then sum_r ||(W' - W) a(r) + δ||^2 = sum_i (w'_i - w_i)^T C (w'_i - w_i) on the
    calibration rows. Constant inputs (C_jj = 0) are removed first at no cost and their
    w_ij μ_j goes into δ_i. `row_scale` (obc only) is as in `obc`; `factor` (sparsegpt only)
    is `hinv_factor(h_centred, dampening)` where the caller has it already, and `dtype`
    its working precision.
    """
    if solver == "obc":
        result = obc(
            weight, h_centred, sparsity, pattern=pattern, dampening=dampening, row_scale=row_scale
        )
    elif solver == "sparsegpt":
        if row_scale is not None:
            raise ValueError("row_scale applies to the obc solver only")
        result = sparsegpt(
            weight, h_centred, sparsity, pattern=pattern, blocksize=blocksize,
            dampening=dampening, factor=factor, dtype=dtype,
        )  # fmt: skip
    else:
        raise UsageError(f"solver {solver!r}: expected one of {', '.join(SOLVERS)}")
    return replace(result, bias_shift=_mean_shift(result.weight, weight, np.asarray(mean)))


def _mean_shift(new: np.ndarray, old: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """δ_i = -(w'_i - w_i) · μ_i, a block of rows at a time (no [out, in] temporary)."""
    shift = np.empty(len(new))
    for rows in row_blocks(len(new)):
        diff = np.asarray(new[rows], dtype=np.float64) - old[rows]
        means = np.broadcast_to(mean if mean.ndim == 1 else mean[rows], diff.shape)
        shift[rows] = -np.einsum("ij,ij->i", diff, means)
    return shift
