"""Layer budgets from measured output damage: how many weights each layer loses, chosen on
damage curves that onnxruntime measures, the weights themselves in EC's order (docs/method.md,
"Layer budgets").

EC's importance is a linearised prediction, weight by weight, of the output damage. Summed
over the weights a mask removes, it falls short of the damage measured with that mask, by a
factor that differs from layer to layer and grows with the share removed. One layer at a time
pruned to 50 % in the corpus's trained digits ViT: 1.1 for the patch embedding, 15 to 26 for
the last block's layers; 5e4 for the ReLU layer of a tf2onnx byte classifier, whose bias
shift moves rows across the kink where the linearisation sees no sensitivity; in an skl2onnx
MLP whose y is a saturated softmax, 2.6e5 for the first layer. One global threshold on the
predicted damage then strips the layers it underestimates; rescaling each layer's scores by
one measured factor oscillates between rounds, since the factor depends on the share.

So each layer's damage is measured at the shares of CURVE_SHARES (its lowest-scored weights
removed and compensated, every other layer intact), and the counts that minimise the summed
curves are taken: on the curves' lower convex hulls, segments in order of damage per weight
removed, the last one in part (exact for the convexified curves).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ecprune_onnx.instrument import with_outputs
from ecprune_onnx.rewrite import rewrite
from ecprune_onnx.runtime import open_session, run_batches

# Shares of a layer's (remaining) weights at which its damage curve is measured.
CURVE_SHARES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
# Calibration rows each measurement runs: the curves need the damage's size, not its last
# digit, and len(CURVE_SHARES) measurements per layer must stay cheap beside the statistics
# (on the corpus's skl2onnx MLP and byte classifier, 128 and 256 rows chose the same masks;
# 6 shares instead of 10 left 3.4x the output MSE at 70 %).
MEASURE_ROWS = 128
# --budget auto measures up to this many dense weights. Each measurement writes the layer
# into a copy of the model and onnxruntime loads that copy: 8 bytes per weight more while
# the statistics are held, and about 2 s per measurement at 100M weights (30 for an MLP of
# three layers), where the statistics pass itself fits in 24 bytes per weight.
MEASURED_MAX_WEIGHTS = 25_000_000


def measured_masks(
    scores: dict[str, np.ndarray],
    ratio: float,
    layer_damage: Callable[[str, np.ndarray], float],
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, np.ndarray]:
    """Keep-masks removing `ratio` of all scored weights, each layer's lowest scores first,
    the counts per layer from measured damage curves. Earlier removals score -inf and stay
    removed. layer_damage(name, keep): the output damage of that layer's mask alone."""
    orders = {name: np.argsort(score, axis=None, kind="stable") for name, score in scores.items()}
    gone = {name: int(np.isneginf(score).sum()) for name, score in scores.items()}
    total = max(
        int(round(ratio * sum(score.size for score in scores.values()))), sum(gone.values())
    )
    if len(scores) == 1 or total == sum(gone.values()):  # nothing to share out
        counts = {name: total if len(scores) == 1 else gone[name] for name in scores}
        return {name: _keep(orders[name], scores[name].shape, counts[name]) for name in scores}
    curves, done = {}, 0
    for name, score in scores.items():
        counts = curve_counts(score.size, gone[name])
        damage = [0.0]
        for count in counts[1:]:
            damage.append(layer_damage(name, _keep(orders[name], score.shape, count)))
            done += 1
            if progress is not None:
                progress(done, len(scores) * (len(counts) - 1))
        # more removals never help: a dip is noise of the measurement, not a gift
        curves[name] = (counts, np.maximum.accumulate(damage))
    counts = allocate(curves, total)
    return {name: _keep(orders[name], scores[name].shape, counts[name]) for name in scores}


def curve_counts(size: int, gone: int) -> np.ndarray:
    """Where a layer's curve is measured: `gone` (no new damage), CURVE_SHARES of the rest."""
    shares = np.round(gone + np.array(CURVE_SHARES) * (size - gone)).astype(np.int64)
    return np.unique(np.concatenate([[gone], shares]))


def allocate(curves: dict[str, tuple[np.ndarray, np.ndarray]], total: int) -> dict[str, int]:
    """Removal counts per layer, summing to `total` (capped by the curves' ends), that
    minimise the summed damage over the lower convex hulls of the curves."""
    counts = {name: int(points[0]) for name, (points, _) in curves.items()}
    segments = []  # (damage per weight, layer, weights in the segment)
    for name, (points, damage) in curves.items():
        hull = _lower_hull(points, damage)
        for (c0, d0), (c1, d1) in zip(hull, hull[1:]):
            segments.append(((d1 - d0) / (c1 - c0), name, c1 - c0))
    left = total - sum(counts.values())
    # convex hulls: within a layer the slopes rise, so slope order takes each layer's
    # segments in order; ties go by layer order, then position
    for _, name, weights in sorted(segments, key=lambda s: s[0]):
        if left <= 0:
            break
        taken = min(weights, left)
        counts[name] += taken
        left -= taken
    return counts


def _lower_hull(points: np.ndarray, damage: np.ndarray) -> list[tuple[int, float]]:
    """The lower convex hull of a curve's points, left to right (Andrew's monotone chain)."""
    hull: list[tuple[int, float]] = []
    for point in zip(points.tolist(), damage.tolist()):
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], point) <= 0:
            hull.pop()
        hull.append(point)
    return hull


def _cross(o, a, b) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def _keep(order: np.ndarray, shape: tuple[int, ...], count: int) -> np.ndarray:
    keep = np.ones(int(np.prod(shape)), dtype=bool)
    keep[order[:count]] = False
    return keep.reshape(shape)


class LayerDamage:
    """layer_damage for `measured_masks`: one layer's mask and bias shift written into a
    copy of `model`, run by onnxruntime on the first MEASURE_ROWS calibration rows, the sum
    of squared deviations of y from `model`'s own, scaled to all calibration rows (the
    units of the predicted damage)."""

    def __init__(self, model, layers, shift_of, y_names, data, batch_size: int):
        self.model = model
        self.layers = {layer.name: layer for layer in layers}
        self.shift_of = shift_of  # (layer, keep) -> the bias shift of that mask
        self.y_names = list(y_names)
        self.batches = list(_first_rows(data, batch_size, MEASURE_ROWS))
        measured_rows = sum(batch.rows for batch in self.batches)
        self.row_scale = data.rows / max(measured_rows, 1)
        self.reference = self._outputs(model)
        self.progress: Callable[[int, int], None] | None = None  # (done, total) of measurements

    def __call__(self, name: str, keep: np.ndarray) -> float:
        layer = self.layers[name]
        candidate = rewrite(self.model, [layer], {name: keep}, {name: self.shift_of(layer, keep)})
        outputs = self._outputs(candidate)
        squares = sum(
            float(np.square(outputs[n].astype(np.float64) - self.reference[n]).sum())
            for n in self.y_names
        )
        return squares * self.row_scale

    def _outputs(self, model) -> dict[str, np.ndarray]:
        session = open_session(with_outputs(model, self.y_names))
        outputs = run_batches(session, self.batches, self.y_names)
        return {n: value.astype(np.float64) for n, value in outputs.items()}


def _first_rows(data, batch_size: int, limit: int):
    """The calibration batches up to `limit` rows (at least one batch)."""
    taken = 0
    for batch in data.batches(batch_size):
        if taken >= limit:
            return
        yield batch
        taken += batch.rows
