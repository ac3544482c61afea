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

import dataclasses
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import onnx
import torch

from ecprune_onnx import reconstruct
from ecprune_onnx.blockwise import row_blocks
from ecprune_onnx.calib import CalibData
from ecprune_onnx.held import filled, held_weights, hollow_names
from ecprune_onnx.layers import DenseLayer, find_dense_layers
from ecprune_onnx.passes import LayerInputs, cross_mode, layer_inputs
from ecprune_onnx.rewrite import replace_parameters
from ecprune_onnx.stats import LayerStats
from ecprune_onnx.taps import OutputRecord, TapRecord

# ExactOBS costs about out · in^3 multiply-adds per layer; above this, SparseGPT's solver.
EXACT_SOLVE_LIMIT = 6e9
# Grid of sparsities on which a SparseGPT-solved layer's loss curve is sampled for the
# budget allocation (an ExactOBS layer gives its curve at every count from its traces).
CURVE_GRID = np.round(np.arange(0.05, 1.0, 0.05), 2)
# Rows of a layer on which its SparseGPT loss curve is sampled (all of a smaller layer); the
# curve is their sum scaled to all rows. The curve only spreads the budget over layers, so
# it is solved in float32 (half the time of float64 at 7069 inputs; the solves stay float64).
CURVE_ROWS = 256
CURVE_DTYPE = np.float32
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


class _Prepared(NamedTuple):
    """A layer's input sums and, where made already, SparseGPT's factor of them."""

    inputs: LayerInputs
    factor: np.ndarray | None = None


@dataclass
class SequentialResult:
    model: onnx.ModelProto
    removed: dict[str, np.ndarray]
    shift: dict[str, np.ndarray]
    damage: dict[str, float]
    sparsity: dict[str, float]
    # while the layers are solved: the values of the model's hollow weights (held.py)
    held: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


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
    """Prune and refit every layer in graph order; see the module docstring. `model` may be
    hollow (held.py), its weights in `layers`; the result's model is whole."""
    method = RECONSTRUCTORS[method_name]
    original_held = held_weights(layers)
    scales = {layer.name: _row_scale(stats[layer.name]) for layer in layers}
    sparsity = {layer.name: ratio for layer in layers}
    reusable: dict[str, _Prepared] = {}
    records: dict[str, OutputRecord] = {}
    if method.allocate and pattern is None:
        sparsity = allocate_sparsity(
            model, layers, data, scales, ratio, batch_size, method, reusable, records
        )  # fmt: skip
    hollow = hollow_names(model)
    current_held = {name: array for name, array in original_held.items() if name in hollow}
    result = SequentialResult(model, {}, {}, {}, sparsity, current_held)
    graph_inputs = {value.name for value in model.graph.input}
    carried = None  # the last pass's taps of the model pruned so far
    written: set[str] = set()  # weight initializers the solves have replaced
    for index, original in enumerate(layers):
        name = original.name
        layer = _current_layer(result, original, written)
        cross = cross_mode(layer, data.rows) if method.to_original else None
        prepared = reusable.pop(name, None)
        if prepared is None:
            keep = None if layer.input_name in graph_inputs else TapRecord(layer.input_name)
            prepared = _Prepared(
                layer_inputs(
                    model, result.model, layer, data, batch_size, cross,
                    recorded=records.pop(name, None), carried=carried, keep=keep,
                    original_held=original_held, current_held=result.held,
                )
            )  # fmt: skip
            carried = keep or carried  # a graph input is in the feeds: nothing to carry
        _refit(result, layer, prepared, method, sparsity[name], pattern, scales[name])
        written.add(layer.weight_name)
        del layer, prepared  # before the next layer's are made
        if progress is not None:
            progress(index + 1, len(layers))
    result.model, result.held = filled(result.model, result.held), {}
    return result


def _current_layer(result: SequentialResult, original: DenseLayer, written: set[str]) -> DenseLayer:
    """`original`'s layer in the model pruned so far (its node, names and bias there). Its
    weight is a view of the held array where the model holds it hollow, else the original
    record's array where no solve has replaced that initializer yet: the same values, and
    no second copy beside the layer-input pass (200 MB at 7069 wide)."""
    (layer,) = find_dense_layers(result.model, only={original.name}, held=result.held).layers
    if layer.weight_name in written or layer.weight_name in result.held:
        return layer
    return dataclasses.replace(layer, compact_weight=original.compact_weight)


def _row_scale(stats: LayerStats) -> np.ndarray:
    """s_i = S0_i / rows: the mean squared output sensitivity of unit i (docs/method.md)."""
    return stats.s0 / max(stats.rows, 1)


def _refit(result, layer, prepared, method, sparsity, pattern, scale) -> None:
    """Solve one layer and write its new weight and bias into the result's model."""
    solver = solver_for(layer, method)
    inputs = prepared.inputs
    if method.to_original:
        target = _dense_optimum(layer, inputs)
        h, factor = _solver_inputs(layer, inputs, solver, prepared.factor)
        solved = reconstruct.centred(
            target,
            h,
            inputs.mean_pruned,
            sparsity,
            solver=solver,
            pattern=pattern,
            row_scale=scale if solver == "obc" else None,
            factor=factor,
            dtype=_solve_dtype(layer),
        )
        del factor
        bias = (
            layer.bias
            + _product(layer.compact_weight, inputs.mean_original)
            - _product(solved.weight, inputs.mean_pruned)
        )
        damage = reconstruct.undamped_loss(solved, target, h, scale)
    else:
        run = reconstruct.obc if solver == "obc" else reconstruct.sparsegpt
        weight, gram = layer.weight, inputs.gram
        solved = run(weight, gram, sparsity, pattern=pattern)
        bias = layer.bias
        damage = reconstruct.undamped_loss(solved, weight, gram, scale)
    weights = {layer.name: solved.weight}
    if layer.weight_name in result.held:  # the model stays hollow: the solve's array holds it
        result.held[layer.weight_name] = _stored(layer, solved.weight)
        weights = {}
    result.model = replace_parameters(result.model, [layer], weights, {layer.name: bias})
    result.removed[layer.name] = ~solved.keep
    result.shift[layer.name] = bias - layer.bias
    result.damage[layer.name] = damage


def _stored(layer: DenseLayer, weight: np.ndarray) -> np.ndarray:
    """An effective [out, in] weight as the layer's initializer stores it, contiguous (the
    sessions that read it take contiguous arrays: one copy here, not one per session)."""
    oriented = weight if layer.stored_as_out_in else weight.T
    return np.ascontiguousarray(oriented, dtype=layer.weight_dtype)


def _solver_inputs(layer, inputs, solver, factor) -> tuple[np.ndarray, np.ndarray | None]:
    """What ecr's solve reads of C_pp: all of it for OBC; for SparseGPT its factor (made in
    C_pp's own memory where the allocation did not leave one) and its diagonal, and C_pp
    itself is dropped from `inputs`: 400 MB less through the solve at 7069 inputs."""
    if solver != "sparsegpt":
        return inputs.centred_pp, None
    diagonal = np.diag(inputs.centred_pp).copy()
    if factor is None:
        factor = reconstruct.hinv_factor_in_place(inputs.centred_pp)
    inputs.centred_pp = None
    return diagonal, factor.astype(_solve_dtype(layer), copy=False)


def _solve_dtype(layer: DenseLayer) -> type:
    """ecr's SparseGPT works in float32 where the model's weights are float32 or narrower:
    they are written back as float32, and a 7069-wide solve takes half the time and memory
    (the reference code's precision; the losses still add up in float64)."""
    return np.float32 if layer.compact_weight.dtype == np.float32 else np.float64


def _product(matrix: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """matrix @ vector in float64, a block of rows at a time: numpy would cast a whole
    float32 matrix to float64 first (400 MB at 7069 × 7069)."""
    return np.concatenate(
        [np.asarray(matrix[rows], dtype=np.float64) @ vector for rows in row_blocks(len(matrix))]
    )


def _dense_optimum(layer: DenseLayer, inputs: LayerInputs) -> np.ndarray:
    """W* = W C_op (C_pp + λ)^-1: the dense weight that best maps the pruned model's centred
    inputs onto the original layer's centred output (W itself while nothing upstream changed).
    Drops the cross sum from `inputs` once used: the solve that follows does not need it.

    λ = 1e-4 · mean(diag C_pp): saturated units make C_pp nearly singular, and without a
    ridge W* fits noise directions with huge weights (the 1024-wide MLP at 0.9 collapsed to
    1.3 output MSE); the solvers' 1% would shrink W* towards 0 in every layer instead, an
    error that does not fall with the ratio (diffusion–sorption stuck at 7e-6).
    """
    c_op, weighted = inputs.centred_op, inputs.weighted_op
    inputs.centred_op = inputs.weighted_op = None
    if inputs.unchanged:
        return layer.weight  # float64
    # (W C_op)^T, [in, out]; each [in, in] or [in, out] array is 400 MB at 7071 wide
    target = torch.from_numpy(weighted.T if c_op is None else c_op.T @ layer.weight.T)
    del c_op, weighted
    # C_pp + λ = U^T U is positive definite: U written over C_pp itself, which waits in a
    # temporary file meanwhile (a dampened copy was 400 MB at the refit's peak), then two
    # triangular solves written over the right-hand side (cholesky_solve allocates one)
    c_pp = inputs.centred_pp
    with tempfile.TemporaryFile() as spill:
        spill.write(memoryview(c_pp).cast("B"))
        damped = reconstruct.dampen_in_place(c_pp, DENSE_REFIT_RIDGE)
        upper = torch.from_numpy(reconstruct.cholesky_in_place(damped))
        torch.linalg.solve_triangular(upper.mT, target, upper=False, out=target)
        torch.linalg.solve_triangular(upper, target, upper=True, out=target)
        del upper
        spill.seek(0)
        spill.readinto(memoryview(c_pp).cast("B"))
    return target.numpy().T  # [out, in], a transposed view: no copy


def allocate_sparsity(
    model, layers, data, scales, ratio, batch_size, method, reusable=None, records=None
) -> dict[str, float]:
    """Per-layer sparsities that reach `ratio` overall with the least total loss: every
    layer's loss curve (sensitivity-weighted, so all in output-damage units) is cut into
    per-weight increments, and the smallest increments over all layers are taken.

    `reusable` (a dict) receives, by layer name, the sums and factor of the layers whose
    input is a graph input: pruning changes nothing upstream of them, so their solve can
    take these instead of another pass and factorisation (8 s each at 7071 inputs).
    `records` (a dict) receives the `OutputRecord` of each other layer whose refit sums
    W C_op (`cross_mode`): this pass reads its original input anyway."""
    total = int(round(ratio * sum(layer.compact_weight.size for layer in layers)))
    held = held_weights(layers)
    graph_inputs = {value.name for value in model.graph.input}
    steps: dict[int, _Increments] = {}
    # layers fed by a graph input last: what they leave in `reusable` is then not held
    # while the other layers' sums and factors are made
    order = sorted(range(len(layers)), key=lambda i: layers[i].input_name in graph_inputs)
    carried = None  # the last pass's taps of the model
    for index in order:
        layer = layers[index]
        record = None
        keep = None if layer.input_name in graph_inputs else TapRecord(layer.input_name)
        refit_reads_outputs = cross_mode(layer, data.rows) == "weighted"
        if records is not None and layer.input_name not in graph_inputs and refit_reads_outputs:
            record = records[layer.name] = OutputRecord(layer)
        inputs = layer_inputs(
            model, model, layer, data, batch_size, None, record=record, carried=carried,
            keep=keep, original_held=held, current_held=held,
        )  # fmt: skip
        carried = keep or carried  # a graph input is in the feeds: nothing to carry
        solver = solver_for(layer, method)
        factor = None
        if solver == "sparsegpt":  # rebound: the float64 factor goes at once
            factor = reconstruct.hinv_factor(inputs.centred_pp).astype(_solve_dtype(layer))
        steps[index] = _loss_increments(layer, inputs, scales[layer.name], solver, factor)
        if reusable is not None and layer.input_name in graph_inputs:
            reusable[layer.name] = _Prepared(inputs, factor)
        del inputs, factor
    values = np.concatenate([steps[i].values for i in range(len(layers))])
    lengths = np.concatenate([steps[i].lengths for i in range(len(layers))])
    owners = np.concatenate([np.full(len(steps[i].values), i) for i in range(len(layers))])
    counts = _take_smallest(values, lengths, total)
    counts = np.bincount(owners, weights=counts, minlength=len(layers))
    return {
        layer.name: int(counts[i]) / layer.compact_weight.size for i, layer in enumerate(layers)
    }


class _Increments(NamedTuple):
    """A layer's loss curve as runs of equal per-weight increments: removals 1 … N of the
    layer add values[0] each for lengths[0] removals, then values[1] … (N = sum(lengths))."""

    values: np.ndarray
    lengths: np.ndarray


def _take_smallest(values: np.ndarray, lengths: np.ndarray, total: int) -> np.ndarray:
    """How many of each run the `total` smallest increments take, ties by position: the same
    choice as a stable sort of every weight's increment, without an array of them (which
    was 8 bytes per weight, and the sort's order 8 more)."""
    order = np.argsort(values, kind="stable")
    before = np.cumsum(lengths[order]) - lengths[order]
    taken = np.zeros(len(values), dtype=np.int64)
    taken[order] = np.clip(total - before, 0, lengths[order])
    return taken


def _curve_rows(rows: int) -> np.ndarray:
    """CURVE_ROWS rows evenly spread over the layer (all of them in a smaller layer):
    deterministic, and without a seed the loss curve would have to be given one."""
    if rows <= CURVE_ROWS:
        return np.arange(rows)
    return np.linspace(0, rows - 1, CURVE_ROWS).round().astype(np.int64)


def _loss_increments(layer, inputs, scale, solver, factor) -> _Increments:
    """The added loss of each further removal, for removals 1 … N of the layer (`factor`:
    SparseGPT's of the inputs' sums, `reconstruct.hinv_factor`; None for obc)."""
    weight = layer.compact_weight  # the sampled rows are copied in the curve's precision
    if solver == "obc":
        trace = reconstruct.obc_traces(layer.weight, inputs.centred_pp)
        steps = np.diff(trace.cumulative_loss, axis=1) * scale[:, None]
        steps = np.sort(steps, axis=None)
        return _Increments(steps, np.ones(len(steps), dtype=np.int64))
    size = weight.size
    counts = [0] + [int(round(share * size)) for share in CURVE_GRID] + [size]
    sample = _curve_rows(len(weight))
    per_row = reconstruct.sparsegpt_losses(
        weight[sample], inputs.centred_pp, CURVE_GRID, factor=factor, dtype=CURVE_DTYPE
    )
    losses = [0.0, *(per_row @ scale[sample] * (len(weight) / len(sample)))]
    losses.append(losses[-1] * 10 + 1.0)  # removing everything: never cheaper than 95%
    losses = np.maximum.accumulate(losses)  # a curve that drops is noise: keep it monotone
    lengths = np.diff(counts)
    return _Increments(np.diff(losses) / np.maximum(lengths, 1), lengths)
