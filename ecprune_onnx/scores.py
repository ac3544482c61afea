"""Importance of every weight and the optimal bias shifts: pure functions of arrays
(docs/method.md).

Each method takes the same arguments (the layer's effective weight [out, in], float32 or
float64 and computed on in float64, its statistics or None, a seeded generator) and returns
scores of the weight's shape; low scores go first. `METHODS` maps the CLI names to them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from ecprune_onnx.blockwise import add_outer
from ecprune_onnx.stats import LayerStats

# Elements of a layer scored at a time (ec_importance): its temporaries stay this small.
CHUNK_ELEMENTS = 1 << 20
# Every calibration row's sensitivity is raised by this share of its unit's mean
# (floor_sensitivity); chosen on the corpus, docs/method.md "The sensitivity floor".
SENSITIVITY_FLOOR = 0.3


def floor_sensitivity(stats: LayerStats, floor: float = SENSITIVITY_FLOOR) -> LayerStats:
    """The sums of c'_i(r) = c_i(r) + floor · S0_i / N, in place: S0 += floor S0,
    S1 += floor (S0 / N) sum_r a, S2 += floor (S0 / N) sum_r a^2 (N: calibration rows).

    Why: the linearisation sees no sensitivity where a ReLU is off or a softmax saturates.
    EC then scores weights by the other rows alone and shifts the bias by their means, which
    moves the silent rows freely, across the kink: in the corpus's tf2onnx byte classifier
    the ReLU layer's measured damage was 5e4 times the predicted, and EC at 50 % lost to
    magnitude pruning by 3x in output MSE. A floor keeps every row in the sums.
    """
    if stats.input_sum is None or stats.rows == 0 or floor == 0.0:
        return stats
    extra = floor * stats.s0 / stats.rows  # [out]: the added sensitivity of every row
    add_outer(stats.s1, extra, stats.input_sum)  # [out, in] float64: no temporary of it
    if stats.s2 is not None:
        add_outer(stats.s2, extra, stats.input_sq)
    stats.s0 += extra * stats.rows
    return stats


def ec_importance(
    w: np.ndarray, s0: np.ndarray, s1: np.ndarray, s2: np.ndarray, out: np.ndarray | None = None
) -> np.ndarray:
    """I_ij = w_ij^2 (S2_ij - S1_ij^2 / S0_i) >= 0; rows with S0_i = 0 get I = 0.

    Computed in place, a block of rows at a time: the plain expression's seven full-size
    temporaries took 3.4 s and 5.6 GB at 100M weights. The same operations on the same
    values, so the same bits. `out` may be `s2` itself (`damage_scores`).
    """
    if out is None:
        out = np.empty(s1.shape, dtype=np.result_type(w, s1, s2, np.float64))
    for rows in _row_blocks(s1.shape):
        _ec_rows(w[rows], s0[rows], s1[rows], s2[rows], out[rows])
    return out


def _row_blocks(shape: tuple[int, int]) -> Iterator[slice]:
    """Slices of rows of about CHUNK_ELEMENTS elements each, covering all rows."""
    step = max(1, CHUNK_ELEMENTS // max(shape[1], 1))
    return (slice(start, start + step) for start in range(0, shape[0], step))


def _ec_rows(w, s0, s1, s2, out: np.ndarray) -> None:
    live = s0 > 0
    explained = np.square(s1)  # S1^2 / S0: what the bias shift takes back
    np.divide(explained, s0[:, None], out=explained, where=live[:, None])
    np.subtract(s2, explained, out=out)
    np.maximum(out, 0.0, out=out)
    out *= np.square(w, dtype=np.float64)  # w may be float32: square it in float64
    out[~live] = 0.0


def sensitivity_importance(
    w: np.ndarray, s2: np.ndarray, out: np.ndarray | None = None
) -> np.ndarray:
    """w_ij^2 S2_ij: the damage of removing w_ij without compensation (δ = 0)."""
    return np.multiply(np.square(w, dtype=np.float64), s2, out=out)


def damage_terms(
    w: np.ndarray, stats: LayerStats, compensated: bool, out: np.ndarray | None = None
) -> np.ndarray:
    """The damage of removing each weight alone: I with compensation, w^2 S2 without."""
    if compensated:
        return ec_importance(w, stats.s0, stats.s1, stats.s2, out=out)
    return sensitivity_importance(w, stats.s2, out=out)


def damage_scores(w: np.ndarray, stats: LayerStats, compensated: bool) -> np.ndarray:
    """`damage_terms` written over `stats.s2`, which they use up: nothing needs S2 after
    these scores, and a fresh array would hold 8 more bytes per weight at the peak of a
    large compress."""
    return damage_terms(w, stats, compensated, out=stats.s2)


def optimal_shift(w: np.ndarray, s0: np.ndarray, s1: np.ndarray) -> np.ndarray:
    """δ*_ij = w_ij S1_ij / S0_i, the best bias shift for removing w_ij alone; 0 where S0_i = 0."""
    s0_col = s0[:, None]
    return np.divide(w * s1, s0_col, out=np.zeros_like(s1), where=s0_col > 0)


def bias_shift(w: np.ndarray, keep: np.ndarray, s0: np.ndarray, s1: np.ndarray) -> np.ndarray:
    """δ_i = sum over removed j of δ*_ij: the shifts of a row's removed weights add up.

    A block of rows at a time, like ec_importance (2.6 s at 100M weights as one expression).
    """
    shift = np.empty(s1.shape[0], dtype=np.result_type(w, s1, np.float64))
    for rows in _row_blocks(s1.shape):
        removed_shifts = optimal_shift(w[rows], s0[rows], s1[rows])
        removed_shifts[keep[rows]] = 0.0
        shift[rows] = removed_shifts.sum(axis=1)
    return shift


def predicted_damage(
    w: np.ndarray,
    keep: np.ndarray,
    stats: LayerStats,
    compensated: bool,
    importance: np.ndarray | None = None,
) -> float:
    """Sum over removed weights of their linearised damage (`damage_terms`). `importance`:
    those terms already computed (the scores of the method `damage_method(compensated)`),
    so they are not computed twice."""
    if importance is None:
        importance = damage_terms(w, stats, compensated)
    # where= rather than importance[~keep]: no copy of the removed terms (4 bytes per
    # weight of the layer at 50 %, the peak of a large compress)
    return float(np.sum(importance, where=~keep))


def damage_method(compensated: bool) -> str:
    """The method whose scores are the predicted damage of removing each weight alone."""
    return "ec" if compensated else "sensitivity"


def _ec(w: np.ndarray, stats: LayerStats | None, rng: np.random.Generator) -> np.ndarray:
    return ec_importance(w, stats.s0, stats.s1, stats.s2)


def _sensitivity(w: np.ndarray, stats: LayerStats | None, rng: np.random.Generator) -> np.ndarray:
    return sensitivity_importance(w, stats.s2)


def _magnitude(w: np.ndarray, stats: LayerStats | None, rng: np.random.Generator) -> np.ndarray:
    return np.abs(w)


def _wanda(w: np.ndarray, stats: LayerStats | None, rng: np.random.Generator) -> np.ndarray:
    """|w_ij| * ||a_j||_2 over the calibration rows (Sun et al. 2023)."""
    return np.abs(w) * np.sqrt(stats.input_sq)[None, :]


def _gradient(w: np.ndarray, stats: LayerStats | None, rng: np.random.Generator) -> np.ndarray:
    """|sum_r dL/dw_ij| over the calibration set: the paper's gradient-magnitude baseline."""
    return np.abs(stats.loss_grad)


def _random(w: np.ndarray, stats: LayerStats | None, rng: np.random.Generator) -> np.ndarray:
    return rng.random(w.shape)


@dataclass(frozen=True)
class Method:
    score: Callable[[np.ndarray, LayerStats | None, np.random.Generator], np.ndarray]
    needs_calibration: bool
    compensates_by_default: bool
    needs_labels: bool = False


METHODS: dict[str, Method] = {
    "ec": Method(_ec, needs_calibration=True, compensates_by_default=True),
    "sensitivity": Method(_sensitivity, needs_calibration=True, compensates_by_default=False),
    "magnitude": Method(_magnitude, needs_calibration=False, compensates_by_default=False),
    "wanda": Method(_wanda, needs_calibration=True, compensates_by_default=False),
    "random": Method(_random, needs_calibration=False, compensates_by_default=False),
    "gradient": Method(
        _gradient, needs_calibration=True, compensates_by_default=False, needs_labels=True
    ),
}
