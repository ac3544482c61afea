"""Neuron pruning from groups to a shrunk model: scores → budgets → compensation → shrink.

The structured counterpart of `compress`'s score-and-mask rounds:

1. every group's units are scored (structured.NEURON_METHODS); `ec` with the refit scores
   them by greedy structured OBS on the consumers' centred input covariances;
2. the budget is spread over the groups: `--scope layer` the same share each; `--scope
   global` by the *measured* output damage for `ec` (each group's damage curve, measured in
   onnxruntime on the calibration set at a grid of counts with everything else intact, then
   the counts that minimise the summed curves), and by one threshold on the scores for the
   baselines;
3. the model is shrunk group by group in graph order. With compensation each consumer is
   refit on the calibration activations of the model shrunk so far, to the original model's
   output (`refit`: least squares on the kept columns, the bias carrying the means), or only
   its bias shifted by EC's sensitivity-weighted means (`bias`).

Attention heads (heads.HeadGroup) go through the same steps as groups whose units are
heads: D = head_dim consumer columns per unit, the output projection the one consumer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx

from ecprune_onnx import structured
from ecprune_onnx.calib import CalibData
from ecprune_onnx.groups import NeuronGroup
from ecprune_onnx.heads import HeadGroup, shrink_heads
from ecprune_onnx.instrument import with_outputs
from ecprune_onnx.layers import DenseLayer, find_dense_layers
from ecprune_onnx.passes import LayerInputs, layer_inputs
from ecprune_onnx.rewrite import replace_parameters
from ecprune_onnx.runtime import open_session, run_batches
from ecprune_onnx.shrink import shrink
from ecprune_onnx.stats import LayerStats

COMPENSATIONS = ("none", "bias", "refit")
# Shares of a group's units at which its damage curve is measured (plus all but one unit).
CURVE_GRID = np.round(np.arange(0.05, 1.0, 0.05), 2)


@dataclass
class NeuronPruning:
    """The shrunk model and, by layer name, what happened to each layer of the original:
    `removed` [out, in] marks the weights gone (rows of removed units, columns of removed
    inputs), `shift` its bias change on its original rows, `damage` the predicted damage of
    the units it lost, `units_removed` how many. `keep` is by group (producer) name."""

    model: onnx.ModelProto
    keep: dict[str, np.ndarray]
    removed: dict[str, np.ndarray] = field(default_factory=dict)
    shift: dict[str, np.ndarray] = field(default_factory=dict)
    damage: dict[str, float | None] = field(default_factory=dict)
    units_removed: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Calibration:
    """What the data-driven steps need: the calibration set, the outputs whose deviation is
    the damage, the batch size. None where a method runs without data."""

    data: CalibData
    outputs: list[str]
    batch_size: int


def prune_neurons(
    model: onnx.ModelProto,
    groups: list[NeuronGroup],
    stats: dict[str, LayerStats],
    method: str,
    ratio: float,
    scope: str,
    compensation: str,
    seed: int,
    calibration: Calibration | None,
    progress: Callable[[str, int, int], None] | None = None,
) -> NeuronPruning:
    """Remove `ratio` of the units of `groups` by `method`; see the module docstring.

    `groups` may mix NeuronGroups and HeadGroups: `ratio` of the units of each kind go,
    each kind budgeted across its layers, except that the measured budget may trade heads
    for neurons at as many parameters removed (`_candidate_counts`). The shrinking runs over
    all groups in graph order, so that each refit also makes up for what went upstream."""
    if compensation not in COMPENSATIONS:
        raise ValueError(f"compensation {compensation!r}: expected one of {COMPENSATIONS}")
    chosen = structured.NEURON_METHODS[method]
    measured = scope == "global" and chosen.measured_budget
    if calibration is None and (compensation == "refit" or measured):
        raise ValueError("the refit and the measured budget need calibration data")
    report = progress or (lambda task, done, total: None)
    units = [group.units for group in groups]
    kinds = [[i for i, g in enumerate(groups) if isinstance(g, HeadGroup) == h] for h in (0, 1)]
    if all(structured.removal_total([units[i] for i in kind], ratio) == 0 for kind in kinds):
        keep = {group.name: np.ones(group.units, dtype=bool) for group in groups}
        return NeuronPruning(model=model, keep=keep, units_removed=dict.fromkeys(keep, 0))
    original_inputs = {}
    if compensation == "refit":
        original_inputs = _original_inputs(model, groups, calibration)
    arrays = [_group_arrays(group, stats, original_inputs) for group in groups]
    scores = [chosen.score(a, np.random.default_rng([seed, i])) for i, a in enumerate(arrays)]
    curves = None
    if measured:
        curves = _measured_curves(
            model, groups, scores, compensation, original_inputs, stats, calibration, report
        )
    candidates = _candidate_counts(groups, scores, kinds, ratio, scope, curves)
    results = []
    for counts in dict.fromkeys(tuple(c) for c in candidates):
        keep = {g.name: structured.keep_mask(s, n) for g, s, n in zip(groups, scores, counts)}
        result = NeuronPruning(model=model, keep=keep)
        for group, group_arrays in zip(groups, arrays):
            _record(result, group, group_arrays, compensation)
        _shrink_in_order(result, groups, compensation, stats, calibration, report)
        results.append(result)
    if len(results) == 1:
        return results[0]
    # The curves are measured one group at a time; removals interact (a later refit makes
    # up for an earlier loss, two layers' losses compound), so the allocation is checked
    # whole: of the candidates, the shrunk model that deviates least on the calibration set.
    reference = _outputs(model, calibration)
    return min(results, key=lambda r: _deviation(_outputs(r.model, calibration), reference))


def _candidate_counts(groups, scores, kinds, ratio, scope, curves) -> list[list[int]]:
    """The allocations to try: `--scope layer` the same share of each group; otherwise one
    threshold on the scores (baselines), or for the measured budget (`curves`): the counts from the
    damage curves per kind (`ratio` of each kind) and, where both kinds are present, the
    counts from the same curves with neurons and heads competing by damage per parameter
    (at least as many parameters removed) and the uniform counts."""
    units = [group.units for group in groups]
    uniform = [0] * len(groups)
    for kind in kinds:
        kind_uniform = structured.uniform_counts([units[i] for i in kind], ratio)
        uniform = _with_counts(uniform, kind, kind_uniform)
    if scope == "layer":
        return [uniform]
    if curves is None:
        counts = [0] * len(groups)
        for kind in (kind for kind in kinds if kind):
            threshold = structured.threshold_counts([scores[i] for i in kind], ratio)
            counts = _with_counts(counts, kind, threshold)
        return [counts]
    per_kind = [0] * len(groups)
    for kind in (kind for kind in kinds if kind):
        total = structured.removal_total([units[i] for i in kind], ratio)
        per_kind = _with_counts(
            per_kind, kind, structured.curve_counts([curves[i] for i in kind], total)
        )
    if not all(kinds):  # one kind (an MLP): the curves' counts, as before heads existed
        return [per_kind]
    prices = [_unit_parameters(group) for group in groups]
    budget = sum(count * price for count, price in zip(uniform, prices))
    joint = structured.priced_curve_counts(curves, prices, budget)
    return [per_kind, joint, uniform]


def _unit_parameters(group) -> int:
    """The parameters one unit takes with it: a neuron's producer row and bias and its
    consumer columns; a head's D rows (and biases) of q, k, v and its D columns of o."""
    if isinstance(group, HeadGroup):
        rows = sum(p.layer.in_features + 1 for p in group.projections)
        return group.head_dim * (rows + group.output.out_features)
    columns = sum(consumer.out_features for consumer in group.consumers)
    rows = sum(p.in_features + 1 for p in (group.producer, *group.partners))
    return rows + columns


def _with_counts(counts: list[int], kind: list[int], option: list[int]) -> list[int]:
    counts = list(counts)
    for index, count in zip(kind, option):
        counts[index] = count
    return counts


def _shrink_in_order(result, groups, compensation, stats, calibration, report) -> None:
    """Shrink the groups one after the other, each refit on the model shrunk so far."""
    original = result.model
    for index, group in enumerate(groups):
        keep, inputs = result.keep[group.name], {}
        if compensation == "refit" and not keep.all():
            inputs = _current_inputs(original, result.model, group, calibration)
        result.model, shifts = _shrink_group(result.model, group, keep, compensation, inputs, stats)
        result.shift.update(shifts)
        report("shrink", index + 1, len(groups))


def _group_arrays(group, stats, original_inputs) -> structured.GroupArrays:
    covariances = None
    if original_inputs:
        covariances = [original_inputs[c.name].centred_pp for c in group.consumers]
    return structured.GroupArrays(
        producer_weight=_producer_rows(group),
        consumer_weights=[consumer.weight for consumer in group.consumers],
        consumer_stats=[stats.get(consumer.name) for consumer in group.consumers],
        consumer_covariances=covariances,
        block=group.head_dim if isinstance(group, HeadGroup) else 1,
    )


def _producer_rows(group) -> np.ndarray:
    """The producer weights that go with each unit, one row per unit: a neuron's row, or a
    head's D rows of each of q, k and v side by side."""
    if not isinstance(group, HeadGroup):  # a gated unit: its gate and up rows side by side
        return np.hstack([p.weight for p in (group.producer, *group.partners)])
    parts = []
    for projection in group.projections:
        span = slice(projection.offset, projection.offset + group.heads * group.head_dim)
        rows = projection.layer.weight[span]
        parts.append(rows.reshape(group.heads, -1))
    return np.concatenate(parts, axis=1)


def _columns(group, keep: np.ndarray) -> np.ndarray:
    """The consumers' columns that the kept units keep."""
    return group.columns(keep) if isinstance(group, HeadGroup) else keep


def _producer_removed(group, keep: np.ndarray) -> dict[str, np.ndarray]:
    """By producer name, the output units (rows) the removed units take."""
    if isinstance(group, HeadGroup):
        return {p.name: ~group.rows(p.name, keep) for p in group.producers}
    return {p.name: ~keep for p in (group.producer, *group.partners)}


def _shrunk(model, group, keep):
    if isinstance(group, HeadGroup):
        return shrink_heads(model, group, keep)
    return shrink(model, [group], {group.name: keep})


def _original_inputs(model, groups, calibration: Calibration) -> dict[str, LayerInputs]:
    """Every consumer's input sums in the original model, by consumer name."""
    return {
        consumer.name: layer_inputs(
            model, model, consumer, calibration.data, calibration.batch_size
        )
        for group in groups
        for consumer in group.consumers
    }


def _current_inputs(original, current, group, calibration) -> dict[str, LayerInputs]:
    """The consumers' input sums in the original and the model shrunk so far."""
    layers = _layers_by_name(current)
    return {
        consumer.name: layer_inputs(
            original, current, layers[consumer.name], calibration.data, calibration.batch_size
        )
        for consumer in group.consumers
    }


def _shrink_group(model, group, keep, compensation, inputs, stats):
    """`model` without the units of `group` that `keep` marks False, its consumers
    compensated: refit on `inputs` (LayerInputs by consumer name) or shifted by EC's δ.
    Returns the model and the consumers' bias changes (on their rows as they were)."""
    if keep.all():
        return model, {}
    weights, biases = {}, {}
    columns = _columns(group, keep)
    for consumer in group.consumers:
        if compensation == "refit":
            refit = _refit(consumer, columns, inputs[consumer.name])
            weights[consumer.name], biases[consumer.name] = refit.weight, refit.bias
        elif compensation == "bias":
            shift = structured.unit_bias_shift(consumer.weight, columns, stats[consumer.name])
            biases[consumer.name] = consumer.bias + shift
    model = _shrunk(model, group, keep)
    if biases:
        shrunk = _layers_by_name(model)
        model = replace_parameters(
            model, [shrunk[c.name] for c in group.consumers], weights, biases
        )
    return model, {name: bias - _consumer(group, name).bias for name, bias in biases.items()}


def _refit(consumer: DenseLayer, keep: np.ndarray, inputs: LayerInputs) -> structured.Refit:
    """The consumer's original weight and bias refit on its kept inputs (the consumer's
    columns change only with this group, so its weight is still the original one)."""
    return structured.refit_kept_columns(
        consumer.weight,
        consumer.bias,
        keep,
        inputs.centred_op,
        inputs.centred_pp,
        inputs.mean_original,
        inputs.mean_pruned,
    )


def _measured_curves(model, groups, scores, compensation, inputs, stats, calibration, report):
    """Each group's output damage (sum of squared deviations of the outputs over the
    calibration set, onnxruntime) with its lowest-scored units removed and compensated,
    every other group intact, at the counts of CURVE_GRID."""
    reference = _outputs(model, calibration)
    plans = [_curve_points(group.units) for group in groups]
    total, done = sum(len(points) - 1 for points in plans), 0
    curves = []
    for group, score, points in zip(groups, scores, plans):
        damage = [0.0]
        for count in points[1:]:
            keep = structured.keep_mask(score, int(count))
            candidate, _ = _shrink_group(model, group, keep, compensation, inputs, stats)
            damage.append(_deviation(_outputs(candidate, calibration), reference))
            done += 1
            report("allocate", done, total)
        # more removals never help: a dip is noise of the measurement, not a gift
        curves.append((points, np.maximum.accumulate(damage)))
    return curves


def _curve_points(units: int) -> np.ndarray:
    """0, the grid's counts and all units but one: where a damage curve is measured."""
    grid = np.round(CURVE_GRID * units).astype(np.int64)
    return np.unique(np.clip(np.concatenate([[0], grid, [units - 1]]), 0, units - 1))


def _outputs(model: onnx.ModelProto, calibration: Calibration) -> dict[str, np.ndarray]:
    session = open_session(with_outputs(model, calibration.outputs))
    batches = calibration.data.batches(calibration.batch_size)
    return run_batches(session, batches, calibration.outputs, source=calibration.data.path)


def _deviation(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    return sum(
        float(np.square(outputs[n].astype(np.float64) - reference[n].astype(np.float64)).sum())
        for n in reference
    )


def _record(result: NeuronPruning, group, arrays, compensation: str) -> None:
    """The weights a group's removals take from its producer (rows) and consumers (columns),
    and the predicted damage of the units its producer loses."""
    keep = result.keep[group.name]
    producers = (
        group.producers if isinstance(group, HeadGroup) else (group.producer, *group.partners)
    )
    for layer in (*producers, *group.consumers):
        result.removed.setdefault(layer.name, np.zeros(layer.shape, dtype=bool))
    for name, rows in _producer_removed(group, keep).items():
        result.removed[name][rows, :] = True
        result.units_removed[name] = result.units_removed.get(name, 0) + int(rows.sum())
    for consumer in group.consumers:
        result.removed[consumer.name][:, ~_columns(group, keep)] = True
    has_stats = all(s is not None for s in arrays.consumer_stats)
    result.damage[group.name] = (
        structured.predicted_damage(arrays, keep, compensation) if has_stats else None
    )


def _consumer(group: NeuronGroup, name: str) -> DenseLayer:
    return next(consumer for consumer in group.consumers if consumer.name == name)


def _layers_by_name(model: onnx.ModelProto) -> dict[str, DenseLayer]:
    return {layer.name: layer for layer in find_dense_layers(model).layers}
