"""Whole hidden units: scores, budgets and compensation, as pure functions of arrays.

Removing unit j of a group removes input column j of every consumer k (docs/method.md's notation,
w_kij: weight from input j to unit i of consumer k). For one column, the parabola of docs/method.md
applies to each row i separately (one weight per row goes), so the damage that remains after
each consumer's bias absorbs the unit's sensitivity-weighted mean, δ_ki = w_kij S1_kij / S0_ki,
is the sum of the column's EC importances (structured EC):

    D_j = Σ_k Σ_i w_kij² (S2_kij − S1_kij² / S0_ki)

and without the shift Σ_k Σ_i w_kij² S2_kij. Both are in output-damage units, so one
threshold over the units of all groups spreads the budget by damage. The shifts of the units
removed from one row add up (docs/method.md, independence).

Letting the kept columns move too is the reconstruction of docs/method.md ("from EC to OBS"): per
consumer, least squares of its original output on the kept inputs, centred so that the bias
carries the means (`refit_kept_columns`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ecprune_onnx.scores import bias_shift, ec_importance, sensitivity_importance
from ecprune_onnx.stats import LayerStats

SCOPES = ("global", "layer")  # one budget over all groups by damage; each group to R
# Ridge of the refit, relative to mean(diag C): saturated or dead units make C singular.
REFIT_RIDGE = 1e-4


@dataclass(frozen=True)
class GroupArrays:
    """The arrays one group's scores need: the producer's effective weight [units, in], and
    per consumer its effective weight [out_k, units], its statistics (None without
    calibration) and, for the methods that refit, the centred sum C_k = Σ_r ã ãᵀ of its
    inputs over the calibration rows [units, units]."""

    producer_weight: np.ndarray
    consumer_weights: Sequence[np.ndarray]
    consumer_stats: Sequence[LayerStats | None]
    consumer_covariances: Sequence[np.ndarray] | None = None
    # Consumer columns per unit: 1 for a neuron, head_dim for an attention head (heads.py),
    # whose D columns go together.
    block: int = 1

    def per_unit(self, columns: np.ndarray) -> np.ndarray:
        """Sum a per-column score over each unit's `block` columns."""
        return np.asarray(columns).reshape(-1, self.block).sum(axis=1)

    def columns(self, keep: np.ndarray) -> np.ndarray:
        """A per-unit keep mask spread over the consumers' columns."""
        return np.repeat(np.asarray(keep, dtype=bool), self.block)

    @property
    def row_scales(self) -> list[np.ndarray]:
        """s_ki = S0_ki / rows: consumer k's mean squared output sensitivity (docs/method.md)."""
        return [stats.s0 / max(stats.rows, 1) for stats in self.consumer_stats]


def structured_ec(group: GroupArrays) -> np.ndarray:
    """D_j = Σ_k Σ_i w_kij² (S2_kij − S1_kij²/S0_ki): damage left after the bias shift."""
    return group.per_unit(
        sum(
            ec_importance(w, stats.s0, stats.s1, stats.s2).sum(axis=0)
            for w, stats in zip(group.consumer_weights, group.consumer_stats)
        )
    )


def structured_sensitivity(group: GroupArrays) -> np.ndarray:
    """Σ_k Σ_i w_kij² S2_kij: the damage of removing unit j with no compensation."""
    return group.per_unit(
        sum(
            sensitivity_importance(w, stats.s2).sum(axis=0)
            for w, stats in zip(group.consumer_weights, group.consumer_stats)
        )
    )


def magnitude_norm(group: GroupArrays) -> np.ndarray:
    """The L2 norm of every weight that goes with unit j: its producer row and its consumer
    columns, sqrt(‖W_p[j, :]‖² + Σ_k ‖W_k[:, j]‖²) (Torch-Pruning's group L2 magnitude)."""
    squares = np.square(group.producer_weight).sum(axis=1)
    for w in group.consumer_weights:
        squares = squares + group.per_unit(np.square(w).sum(axis=0))
    return np.sqrt(squares)


def greedy_obs_losses(group: GroupArrays) -> np.ndarray:
    """Greedy structured OBS (ZipLM, Kurtic et al. 2023) on the centred, sensitivity-weighted
    loss of docs/method.md: Σ_k Σ_i s_ki (w'_ki − w_ki)ᵀ C_k (w'_ki − w_ki). Removing unit j from
    the kept set costs Σ_k Σ_i s_ki w_kij² / [C_k^-1]_jj, and the kept columns then move by
    w_k ← w_k − w_k[:, j] C_k^-1[j, :] / [C_k^-1]_jj (the exact least-squares optimum).

    Returns, per unit, the cumulative loss once it is gone: sorting by it gives the greedy
    order, and it is in output-damage units. C_k gets the refit's ridge (a dead input then
    costs about nothing and goes first, its mean carried by the bias)."""
    if group.block > 1:
        return greedy_block_obs_losses(group)
    weights = [np.array(w, dtype=np.float64) for w in group.consumer_weights]
    hinvs = [np.linalg.inv(_ridged(c)) for c in group.consumer_covariances]
    scales = group.row_scales
    units = weights[0].shape[1]
    losses, gone, total = np.empty(units), np.zeros(units, dtype=bool), 0.0
    for _ in range(units):
        cost = sum((s @ np.square(w)) / np.diag(hinv) for w, hinv, s in zip(weights, hinvs, scales))
        unit = int(np.argmin(np.where(gone, np.inf, cost)))
        total += max(float(cost[unit]), 0.0)
        losses[unit], gone[unit] = total, True
        for w, hinv in zip(weights, hinvs):
            row = hinv[unit].copy()
            w -= np.outer(w[:, unit], row / row[unit])
            hinv -= np.outer(hinv[:, unit], row / row[unit])
            hinv[unit, unit] = 1.0  # row and column are 0 now; keeps the diagonal invertible
    return losses


def greedy_block_obs_losses(group: GroupArrays) -> np.ndarray:
    """greedy_obs_losses with units of `block` columns (ZipLM's heads): removing block B
    costs Σ_k Σ_i s_ki w_ki,B ([C_k^-1]_BB)^-1 w_ki,Bᵀ, and the kept columns then move by
    w_k ← w_k − w_k,B ([C_k^-1]_BB)^-1 C_k^-1[B, :]."""
    weights = [np.array(w, dtype=np.float64) for w in group.consumer_weights]
    hinvs = [np.linalg.inv(_ridged(c)) for c in group.consumer_covariances]
    scales = group.row_scales
    units, block = weights[0].shape[1] // group.block, group.block
    spans = [slice(u * block, (u + 1) * block) for u in range(units)]
    losses, gone, total = np.empty(units), np.zeros(units, dtype=bool), 0.0
    for _ in range(units):
        cost = np.full(units, np.inf)
        for unit in np.flatnonzero(~gone):
            span = spans[unit]
            cost[unit] = sum(
                float(s @ (w[:, span] * np.linalg.solve(h[span, span], w[:, span].T).T).sum(1))
                for w, h, s in zip(weights, hinvs, scales)
            )
        unit = int(np.argmin(cost))
        total += max(float(cost[unit]), 0.0)
        losses[unit], gone[unit] = total, True
        span = spans[unit]
        for w, hinv in zip(weights, hinvs):
            rows = np.linalg.solve(hinv[span, span], hinv[span, :])  # ([H^-1]_BB)^-1 H^-1[B,:]
            w -= w[:, span] @ rows
            hinv -= hinv[:, span] @ rows
            hinv[span, span] = np.eye(block)  # row and columns are 0 now; keeps it invertible
    return losses


def refit_loss(group: GroupArrays, keep: np.ndarray) -> float:
    """The loss left after the least-squares refit of the kept columns, Σ_k Σ_i s_ki
    w_ki,R ([C_k^-1]_RR)^-1 w_ki,Rᵀ over the removed set R (docs/method.md's OBS, all at once)."""
    removed = np.flatnonzero(~group.columns(keep))
    if not len(removed):
        return 0.0
    loss = 0.0
    for w, c, s in zip(group.consumer_weights, group.consumer_covariances, group.row_scales):
        block = np.linalg.inv(_ridged(c))[np.ix_(removed, removed)]
        w_removed = w[:, removed]
        loss += float(s @ (w_removed * np.linalg.solve(block, w_removed.T).T).sum(axis=1))
    return loss


def predicted_damage(group: GroupArrays, keep: np.ndarray, compensation: str) -> float:
    """The linearised damage of removing the units `keep` marks False: without compensation
    Σ w² S2, with EC's bias shift the structured EC damage, with the refit its loss."""
    if compensation == "refit":
        return refit_loss(group, keep)
    damage = structured_ec(group) if compensation == "bias" else structured_sensitivity(group)
    return float(np.asarray(damage)[~keep].sum())


def _ec_score(group: GroupArrays, rng: np.random.Generator) -> np.ndarray:
    """Structured EC; the greedy OBS losses when the consumers are refit (covariances given)."""
    if group.consumer_covariances is not None:
        return greedy_obs_losses(group)
    return structured_ec(group)


@dataclass(frozen=True)
class NeuronMethod:
    """score: per unit, lowest removed first. measured_budget: with --scope global, the
    counts per group come from measured output damage (the driver), not a score threshold."""

    score: Callable[[GroupArrays, np.random.Generator], np.ndarray]
    needs_calibration: bool
    compensates_by_default: bool
    measured_budget: bool


NEURON_METHODS: dict[str, NeuronMethod] = {
    "ec": NeuronMethod(_ec_score, True, True, measured_budget=True),
    "magnitude": NeuronMethod(lambda g, rng: magnitude_norm(g), False, False, False),
    "random": NeuronMethod(
        lambda g, rng: rng.random(g.producer_weight.shape[0]), False, False, False
    ),
}


def removal_total(units: Sequence[int], ratio: float) -> int:
    """Units to remove over all groups: `ratio` of them, each group keeping at least one."""
    return min(int(round(ratio * sum(units))), sum(units) - len(units))


def uniform_counts(units: Sequence[int], ratio: float) -> list[int]:
    """`ratio` of each group's units (--scope layer), at least one kept."""
    return [min(int(round(ratio * size)), size - 1) for size in units]


def threshold_counts(scores: Sequence[np.ndarray], ratio: float) -> list[int]:
    """How many units each group loses under one threshold on the scores of all groups; the
    best unit of each group is not a candidate, so no group loses all its units. Ties go by
    group, then unit index."""
    sizes = [len(score) for score in scores]
    ranked = [np.where(np.arange(len(s)) == np.argmax(s), np.inf, s) for s in scores]
    lowest = np.argsort(np.concatenate(ranked), kind="stable")[: removal_total(sizes, ratio)]
    owners = np.repeat(np.arange(len(sizes)), sizes)
    return np.bincount(owners[lowest], minlength=len(sizes)).tolist()


def curve_counts(curves: Sequence[tuple[np.ndarray, np.ndarray]], total: int) -> list[int]:
    """Counts per group, summing to `total`, that minimise the sum of the groups' damage
    curves (damage measured at some counts, linear in between; a group's curve ends at its
    last count). Exact over the interpolated curves: a min-plus dynamic programme over
    groups, so a curve need not be convex."""
    best = np.full(total + 1, np.inf)
    best[0] = 0.0
    choices = []
    for counts, damage in curves:
        curve = np.interp(np.arange(counts[-1] + 1), counts, damage)
        merged, choice = np.full(total + 1, np.inf), np.zeros(total + 1, dtype=np.int64)
        for count in range(min(len(curve), total + 1)):
            candidate = np.full(total + 1, np.inf)
            candidate[count:] = best[: total + 1 - count] + curve[count]
            better = candidate < merged
            merged[better], choice[better] = candidate[better], count
        best = merged
        choices.append(choice)
    result, left = [], total
    for choice in reversed(choices):
        result.append(int(choice[left]))
        left -= result[-1]
    return result[::-1]


def priced_curve_counts(
    curves: Sequence[tuple[np.ndarray, np.ndarray]],
    prices: Sequence[float],
    budget: float,
    resolution: int = 2048,
) -> list[int]:
    """Counts per group that remove at least `budget` (a unit of group g costs prices[g],
    e.g. its parameters) and minimise the sum of the groups' damage curves, so that units of
    different kinds (neurons, heads) compete by damage per parameter. A min-plus dynamic
    programme over the spend, in steps of budget / resolution and capped at the budget."""
    step = budget / resolution
    best = np.full(resolution + 1, np.inf)
    best[0] = 0.0
    trail = []  # per group: for each spend, the count taken and the spend before it
    for (counts, damage), price in zip(curves, prices):
        curve = np.interp(np.arange(counts[-1] + 1), counts, damage)
        merged = np.full(resolution + 1, np.inf)
        taken = np.zeros(resolution + 1, dtype=np.int64)
        before = np.zeros(resolution + 1, dtype=np.int64)
        for count, cost in enumerate(curve):
            shift = min(int(round(count * price / step)), resolution)
            candidate = np.full(resolution + 1, np.inf)
            source = np.arange(resolution + 1)
            candidate[shift:] = best[: resolution + 1 - shift] + cost
            source[shift:] = np.arange(resolution + 1 - shift)
            capped = best[resolution + 1 - shift :] + cost  # spends past the budget
            if len(capped) and capped.min() < candidate[resolution]:
                candidate[resolution] = capped.min()
                source[resolution] = resolution + 1 - shift + int(np.argmin(capped))
            better = candidate < merged
            merged[better], taken[better], before[better] = candidate[better], count, source[better]
        best = merged
        trail.append((taken, before))
    result, spend = [], resolution
    for taken, before in reversed(trail):
        result.append(int(taken[spend]))
        spend = int(before[spend])
    return result[::-1]


def keep_mask(score: np.ndarray, count: int) -> np.ndarray:
    """All units but the `count` lowest-scored (ties by index)."""
    keep = np.ones(len(score), dtype=bool)
    keep[np.argsort(score, kind="stable")[:count]] = False
    return keep


def _ridged(c: np.ndarray) -> np.ndarray:
    """C + λ I with λ = REFIT_RIDGE · mean(diag C) (a tiny floor when C is all zero)."""
    ridge = REFIT_RIDGE * max(float(np.mean(np.diag(c))), np.finfo(float).tiny)
    return c + ridge * np.eye(len(c))


def unit_bias_shift(w: np.ndarray, keep: np.ndarray, stats: LayerStats) -> np.ndarray:
    """δ_i = Σ_{removed j} w_ij S1_ij / S0_i: a consumer's bias shift for the units it loses."""
    return bias_shift(w, np.broadcast_to(keep[None, :], w.shape), stats.s0, stats.s1)


@dataclass(frozen=True)
class Refit:
    weight: np.ndarray  # [out, kept]: the new weight on the kept inputs
    bias: np.ndarray  # [out]


def refit_kept_columns(
    w: np.ndarray,
    b: np.ndarray,
    keep: np.ndarray,
    centred_op: np.ndarray,
    centred_pp: np.ndarray,
    mean_original: np.ndarray,
    mean_pruned: np.ndarray,
) -> Refit:
    """Least squares of the consumer's original output W a_o + b on the kept inputs a_p,F of
    the model pruned so far, on the calibration rows (docs/method.md, reconstruction):

        W'_F = W C_op[:, F] (C_pp[F, F] + λ I)^-1,    b' = b + W μ_o − W'_F μ_p,F

    with centred sums C_op = Σ ã_o ã_pᵀ, C_pp = Σ ã_p ã_pᵀ and λ = 1e-4 · mean(diag C_pp).
    Before anything upstream changed (a_p = a_o) this is W'_F = W C[:, F] C_FF^-1. The rows of
    the consumer are independent, so its output sensitivities do not change the optimum.
    """
    kept = np.flatnonzero(keep)
    gram = _ridged(centred_pp)[np.ix_(kept, kept)]
    weight = np.linalg.solve(gram, (w @ centred_op[:, kept]).T).T
    bias = b + w @ mean_original - weight @ mean_pruned[kept]
    return Refit(weight=weight, bias=bias)
