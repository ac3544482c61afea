"""Layer-sequential reconstruction: prune each dense layer in graph order and refit its kept
weights on the calibration activations of the model pruned so far (docs/method.md,
"Reconstruction: from EC to OBS").

Three methods share the driver, each one row of `RECONSTRUCTORS`:

- `sparsegpt`, `obc`: the rivals, as their papers run them: H = X_p X_p^T of the pruned
  model's inputs to the layer, the same share removed from every layer.
- `ecr`, the tool's own: the layer is refit to the *original* model's layer output,
  W' ã_p ≈ W ã_o on centred inputs, with the bias carrying the means
  (b' = b + W μ_o - W' μ_p). The dense optimum is W* = W C_op C_pp^-1 and the loss of any
  W' is (W' - W*) C_pp (W' - W*)^T + const, so OBS runs on C_pp with W* as its start.
  Rows are weighted by EC's output sensitivity s_i = S0_i / rows, so losses of all layers
  are in units of output damage, and the removals are spread over layers by those losses
  (a global threshold on the layers' loss curves) instead of a uniform share.
  Layers small enough get the exact OBC solver, larger ones SparseGPT's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from ecprune_onnx import reconstruct
from ecprune_onnx.calib import CalibData
from ecprune_onnx.instrument import with_outputs
from ecprune_onnx.layers import DenseLayer, find_dense_layers
from ecprune_onnx.rewrite import replace_parameters
from ecprune_onnx.runtime import open_session
from ecprune_onnx.stats import LayerStats

# ExactOBS costs about out · in^3 multiply-adds per layer; above this, SparseGPT's solver.
EXACT_SOLVE_LIMIT = 6e9
# Grid of sparsities on which a SparseGPT-solved layer's loss curve is sampled for the
# budget allocation (an ExactOBS layer gives its curve at every count from its traces).
CURVE_GRID = np.round(np.arange(0.05, 1.0, 0.05), 2)
# Ridge of the dense refit target W* (see `_dense_optimum`), relative to mean(diag C_pp).
DENSE_REFIT_RIDGE = 1e-4


@dataclass(frozen=True)
class Reconstructor:
    """One layer-sequential method: refits to the original output (`to_original`), moves
    removals across layers (`allocate`), weights rows by output sensitivity."""

    to_original: bool
    allocate: bool
    solver: str | None  # None: by layer size


RECONSTRUCTORS: dict[str, Reconstructor] = {
    "sparsegpt": Reconstructor(to_original=False, allocate=False, solver="sparsegpt"),
    "obc": Reconstructor(to_original=False, allocate=False, solver="obc"),
    "ecr": Reconstructor(to_original=True, allocate=True, solver=None),
}


@dataclass(frozen=True)
class LayerInputs:
    """Sums over the calibration rows of a layer's inputs in the original (o) and the
    pruned-so-far (p) model: C_pp = Σ ã_p ã_p^T, C_op = Σ ã_o ã_p^T (centred), H = Σ a_p a_p^T."""

    gram: np.ndarray
    centred_pp: np.ndarray
    centred_op: np.ndarray
    mean_pruned: np.ndarray
    mean_original: np.ndarray
    rows: int


@dataclass
class SequentialResult:
    model: onnx.ModelProto
    removed: dict[str, np.ndarray]
    shift: dict[str, np.ndarray]
    damage: dict[str, float]
    sparsity: dict[str, float]


def solver_for(layer: DenseLayer, method: Reconstructor) -> str:
    if method.solver is not None:
        return method.solver
    out_features, in_features = layer.shape
    return "obc" if out_features * in_features**3 <= EXACT_SOLVE_LIMIT else "sparsegpt"


def reconstruct_layers(
    model: onnx.ModelProto,
    layers: list[DenseLayer],
    data: CalibData,
    stats: dict[str, LayerStats],
    method_name: str,
    ratio: float,
    pattern: tuple[int, int] | None,
    batch_size: int,
    progress: Callable[[int, int], None] | None = None,
) -> SequentialResult:
    """Prune and refit every layer in graph order; see the module docstring."""
    method = RECONSTRUCTORS[method_name]
    scales = {layer.name: _row_scale(stats[layer.name]) for layer in layers}
    sparsity = {layer.name: ratio for layer in layers}
    if method.allocate and pattern is None:
        sparsity = allocate_sparsity(model, layers, data, scales, ratio, batch_size, method)
    result = SequentialResult(model, {}, {}, {}, sparsity)
    names = [layer.name for layer in layers]
    for index, name in enumerate(names):
        layer = {found.name: found for found in find_dense_layers(result.model).layers}[name]
        inputs = layer_inputs(model, result.model, layer, data, batch_size)
        _refit(result, layer, inputs, method, sparsity[name], pattern, scales[name])
        if progress is not None:
            progress(index + 1, len(names))
    return result


def _row_scale(stats: LayerStats) -> np.ndarray:
    """s_i = S0_i / rows: the mean squared output sensitivity of unit i (docs/method.md)."""
    return stats.s0 / max(stats.rows, 1)


def _refit(result, layer, inputs, method, sparsity, pattern, scale) -> None:
    """Solve one layer and write its new weight and bias into the result's model."""
    solver = solver_for(layer, method)
    weight = layer.weight  # float64, one copy for all uses below
    if method.to_original:
        target = _dense_optimum(weight, inputs)
        solved = reconstruct.centred(
            target,
            inputs.centred_pp,
            inputs.mean_pruned,
            sparsity,
            solver=solver,
            pattern=pattern,
            row_scale=scale if solver == "obc" else None,
        )
        bias = layer.bias + weight @ inputs.mean_original - solved.weight @ inputs.mean_pruned
        damage = reconstruct.layer_loss(solved.weight, target, inputs.centred_pp, scale)
    else:
        run = reconstruct.obc if solver == "obc" else reconstruct.sparsegpt
        solved = run(weight, inputs.gram, sparsity, pattern=pattern)
        bias = layer.bias
        damage = reconstruct.layer_loss(solved.weight, weight, inputs.gram, scale)
    result.model = replace_parameters(
        result.model, [layer], {layer.name: solved.weight}, {layer.name: bias}
    )
    result.removed[layer.name] = ~solved.keep
    result.shift[layer.name] = bias - layer.bias
    result.damage[layer.name] = damage


def _dense_optimum(weight: np.ndarray, inputs: LayerInputs) -> np.ndarray:
    """W* = W C_op (C_pp + λ)^-1: the dense weight that best maps the pruned model's centred
    inputs onto the original layer's centred output (W itself while nothing upstream changed).

    λ = 1e-4 · mean(diag C_pp): saturated units make C_pp nearly singular, and without a
    ridge W* fits noise directions with huge weights (the 1024-wide MLP at 0.9 collapsed to
    1.3 output MSE); the solvers' 1% would shrink W* towards 0 in every layer instead, an
    error that does not fall with the ratio (diffusion–sorption stuck at 7e-6).
    """
    c_pp = inputs.centred_pp
    if np.array_equal(inputs.centred_op, c_pp):
        return np.array(weight, dtype=np.float64)
    ridged = reconstruct.dampen(c_pp, DENSE_REFIT_RIDGE)
    return np.linalg.solve(ridged, (weight @ inputs.centred_op).T).T


def layer_inputs(
    original: onnx.ModelProto,
    current: onnx.ModelProto,
    layer: DenseLayer,
    data: CalibData,
    batch_size: int,
) -> LayerInputs:
    """Stream the calibration set through both models (onnxruntime) and sum the layer's
    input statistics; only [in, in] sums are kept, never the activations."""
    taps = [_TapReader(model, layer) for model in (original, current)]
    size = layer.in_features
    sums = {key: np.zeros((size, size)) for key in ("pp", "op")}
    totals = {key: np.zeros(size) for key in ("o", "p")}
    rows = 0
    for feeds in data.batches(batch_size):
        a_o, a_p = (tap.read(feeds) for tap in taps)
        sums["pp"] += a_p.T @ a_p
        sums["op"] += a_o.T @ a_p
        totals["o"] += a_o.sum(0)
        totals["p"] += a_p.sum(0)
        rows += len(a_p)
    mean_o, mean_p = totals["o"] / rows, totals["p"] / rows
    return LayerInputs(
        gram=sums["pp"],
        centred_pp=sums["pp"] - rows * np.outer(mean_p, mean_p),
        centred_op=sums["op"] - rows * np.outer(mean_o, mean_p),
        mean_pruned=mean_p,
        mean_original=mean_o,
        rows=rows,
    )


class _TapReader:
    """Reads a layer's input activation as [rows, in] float64 from one model."""

    def __init__(self, model: onnx.ModelProto, layer: DenseLayer):
        self.layer = layer
        inputs = {value.name for value in model.graph.input}
        self.from_feeds = layer.input_name in inputs
        if not self.from_feeds:
            self.session = open_session(with_outputs(model, [layer.input_name]))

    def read(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        if self.from_feeds:
            tap = feeds[self.layer.input_name]
        else:
            tap = self.session.run([self.layer.input_name], feeds)[0]
        if self.layer.transpose_input:
            tap = tap.T
        return np.asarray(tap, dtype=np.float64).reshape(-1, self.layer.in_features)


def allocate_sparsity(model, layers, data, scales, ratio, batch_size, method) -> dict[str, float]:
    """Per-layer sparsities that reach `ratio` overall with the least total loss: every
    layer's loss curve (sensitivity-weighted, so all in output-damage units) is cut into
    per-weight increments, and the smallest increments over all layers are taken."""
    total = int(round(ratio * sum(layer.compact_weight.size for layer in layers)))
    increments, owners = [], []
    for index, layer in enumerate(layers):
        inputs = layer_inputs(model, model, layer, data, batch_size)
        steps = _loss_increments(layer, inputs, scales[layer.name], solver_for(layer, method))
        increments.append(steps)
        owners.append(np.full(len(steps), index))
    order = np.argsort(np.concatenate(increments), kind="stable")[:total]
    counts = np.bincount(np.concatenate(owners)[order], minlength=len(layers))
    return {layer.name: counts[i] / layer.compact_weight.size for i, layer in enumerate(layers)}


def _loss_increments(layer, inputs, scale, solver) -> np.ndarray:
    """The added loss of each further removal, for removals 1 … N of the layer (sorted)."""
    weight = layer.weight  # float64, one copy for all uses below
    if solver == "obc":
        trace = reconstruct.obc_traces(weight, inputs.centred_pp)
        steps = np.diff(trace.cumulative_loss, axis=1) * scale[:, None]
        return np.sort(steps, axis=None)
    size = weight.size
    counts = [0] + [int(round(share * size)) for share in CURVE_GRID] + [size]
    losses = [0.0]
    factor = reconstruct.hinv_factor(inputs.centred_pp)
    for share in CURVE_GRID:
        solved = reconstruct.sparsegpt(weight, inputs.centred_pp, float(share), hinv_factor=factor)
        losses.append(reconstruct.layer_loss(solved.weight, weight, inputs.centred_pp, scale))
    losses.append(losses[-1] * 10 + 1.0)  # removing everything: never cheaper than 95%
    losses = np.maximum.accumulate(losses)  # a curve that drops is noise: keep it monotone
    pieces = [
        np.full(after - before, (loss_after - loss_before) / max(after - before, 1))
        for before, after, loss_before, loss_after in zip(counts, counts[1:], losses, losses[1:])
    ]
    return np.concatenate(pieces)
