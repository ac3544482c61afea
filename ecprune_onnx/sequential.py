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
from typing import NamedTuple

import numpy as np
import onnx
import torch

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
# Rows of a layer on which its SparseGPT loss curve is sampled (all of a smaller layer); the
# curve is their sum scaled to all rows. The curve only spreads the budget over layers.
CURVE_ROWS = 256
# Rows of layer inputs gathered for one product of the [in, in] sums (`_CrossSum`).
CHUNK_ROWS = 1024
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


@dataclass
class LayerInputs:
    """Sums over the calibration rows of a layer's inputs in the original (o) and the
    pruned-so-far (p) model: C_pp = Σ ã_p ã_p^T, C_op = Σ ã_o ã_p^T (centred).

    Not frozen: a refit drops C_op once W* is computed (`_refit`), the largest array left
    that the solve does not need."""

    centred_pp: np.ndarray
    centred_op: np.ndarray | None
    mean_pruned: np.ndarray
    mean_original: np.ndarray
    rows: int

    @property
    def gram(self) -> np.ndarray:
        """H = Σ a_p a_p^T, uncentred (the rivals' H), made when asked for."""
        return self.centred_pp + self.rows * np.outer(self.mean_pruned, self.mean_pruned)


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
    reusable: dict[str, _Prepared] = {}
    if method.allocate and pattern is None:
        sparsity = allocate_sparsity(
            model, layers, data, scales, ratio, batch_size, method, reusable
        )  # fmt: skip
    result = SequentialResult(model, {}, {}, {}, sparsity)
    names = [layer.name for layer in layers]
    for index, name in enumerate(names):
        (layer,) = find_dense_layers(result.model, only={name}).layers
        prepared = reusable.pop(name, None) or _Prepared(
            layer_inputs(model, result.model, layer, data, batch_size)
        )
        _refit(result, layer, prepared, method, sparsity[name], pattern, scales[name])
        del layer, prepared  # before the next layer's are made
        if progress is not None:
            progress(index + 1, len(names))
    return result


def _row_scale(stats: LayerStats) -> np.ndarray:
    """s_i = S0_i / rows: the mean squared output sensitivity of unit i (docs/method.md)."""
    return stats.s0 / max(stats.rows, 1)


def _refit(result, layer, prepared, method, sparsity, pattern, scale) -> None:
    """Solve one layer and write its new weight and bias into the result's model."""
    solver = solver_for(layer, method)
    weight = layer.weight  # float64, one copy for all uses below
    inputs = prepared.inputs
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
            factor=prepared.factor,
        )
        bias = layer.bias + weight @ inputs.mean_original - solved.weight @ inputs.mean_pruned
        damage = reconstruct.undamped_loss(solved, target, inputs.centred_pp, scale)
    else:
        run = reconstruct.obc if solver == "obc" else reconstruct.sparsegpt
        gram = inputs.gram
        solved = run(weight, gram, sparsity, pattern=pattern)
        bias = layer.bias
        damage = reconstruct.undamped_loss(solved, weight, gram, scale)
    result.model = replace_parameters(
        result.model, [layer], {layer.name: solved.weight}, {layer.name: bias}
    )
    result.removed[layer.name] = ~solved.keep
    result.shift[layer.name] = bias - layer.bias
    result.damage[layer.name] = damage


def _dense_optimum(weight: np.ndarray, inputs: LayerInputs) -> np.ndarray:
    """W* = W C_op (C_pp + λ)^-1: the dense weight that best maps the pruned model's centred
    inputs onto the original layer's centred output (W itself while nothing upstream changed).
    Drops C_op from `inputs` once used: the solve that follows does not need it.

    λ = 1e-4 · mean(diag C_pp): saturated units make C_pp nearly singular, and without a
    ridge W* fits noise directions with huge weights (the 1024-wide MLP at 0.9 collapsed to
    1.3 output MSE); the solvers' 1% would shrink W* towards 0 in every layer instead, an
    error that does not fall with the ratio (diffusion–sorption stuck at 7e-6).
    """
    c_pp, c_op = inputs.centred_pp, inputs.centred_op
    inputs.centred_op = None
    if c_op is c_pp or np.array_equal(c_op, c_pp):  # unchanged
        return weight  # the caller's float64 copy, read and never written
    target = torch.from_numpy(c_op.T @ weight.T)  # (W C_op)^T, [in, out]
    del c_op  # each [in, in] or [in, out] array is 400 MB at 7071 wide
    # C_pp + λ is positive definite: a Cholesky solve, in torch (see reconstruct._hinv_cholesky),
    # as two triangular solves written over the right-hand side (cholesky_solve allocates one)
    lower = torch.linalg.cholesky(torch.from_numpy(reconstruct.dampen(c_pp, DENSE_REFIT_RIDGE)))
    torch.linalg.solve_triangular(lower, target, upper=False, out=target)
    torch.linalg.solve_triangular(lower.mT, target, upper=True, out=target)
    return target.numpy().T  # [out, in], a transposed view: no copy


def layer_inputs(
    original: onnx.ModelProto,
    current: onnx.ModelProto,
    layer: DenseLayer,
    data: CalibData,
    batch_size: int,
) -> LayerInputs:
    """Stream the calibration set through both models (onnxruntime) and sum the layer's
    input statistics; only [in, in] sums are kept, never the activations.

    Each batch's products are in the activations' precision and added to float64 sums, as
    the statistics' are (stats._product_dtype: float32 GEMMs run ~2x faster on the CPU and
    round each batch at ~1e-7). Where both models give the layer the same input (the same
    model, or an input of the graph itself) one tap and one product serve for both."""
    same = original is current or layer.input_name in {v.name for v in original.graph.input}
    taps = [_TapReader(original, layer)] + ([] if same else [_TapReader(current, layer)])
    size = layer.in_features
    sums = {key: _CrossSum(size) for key in ("pp",) + (() if same else ("op",))}
    totals = {key: np.zeros(size) for key in ("o", "p")}
    rows = 0
    for feeds in data.batches(batch_size):
        a_o = taps[0].read(feeds)
        a_p = a_o if same else taps[1].read(feeds)
        if a_p is not a_o and np.array_equal(a_o, a_p):  # unchanged so far: the same sums,
            a_p = a_o  # bit for bit (a.T @ a is numpy's syrk, a.T @ b a GEMM)
        sums["pp"].add(a_p, a_p)
        if not same:
            sums["op"].add(a_o, a_p)
        totals["o"] += a_o.sum(0, dtype=np.float64)
        totals["p"] += a_p.sum(0, dtype=np.float64)
        rows += len(a_p)
    mean_o, mean_p = totals["o"] / rows, totals["p"] / rows
    centred_pp = _subtract_outer(sums.pop("pp").result(), rows * mean_p, mean_p)
    return LayerInputs(
        centred_pp=centred_pp,
        centred_op=centred_pp
        if same
        else _subtract_outer(sums["op"].result(), rows * mean_o, mean_p),
        mean_pruned=mean_p,
        mean_original=mean_o,
        rows=rows,
    )


def _subtract_outer(total: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """total -= left right^T in place, a block of rows at a time (no [in, in] temporary)."""
    for start in range(0, len(total), 1024):
        total[start : start + 1024] -= np.outer(left[start : start + 1024], right)
    return total


class _CrossSum:
    """sum_r a(r) b(r)^T over the batches, float64, from products in the batch's precision.

    A float32 batch is centred on its column means c_a, c_b (float32 values, exact in
    float64) before its product, so the product rounds at 1e-7 of the spread, not of the
    mean (an input of mean 100 and spread 0.01 would lose its covariance when the mean is
    taken out at the end otherwise). With x = a - c_a, y = b - c_b:
    a^T b = x^T y + (sum x + n c_a) c_b^T + c_a (sum y)^T; the rank-1 terms are kept as
    vectors and added in float64 by one GEMM at the end (a rank-1 update per batch cost
    twice the batch's product).

    Batches are gathered into chunks of at least CHUNK_ROWS rows before their product: at
    7071 inputs a 256-row product and its addition to the float64 sum cost 0.31 s, a
    1024-row one 0.17 s per 256 rows where a is b (x^T x is numpy's syrk, half a GEMM).
    A chunk of batches where b is a is such a product: the same bits as for the pairs
    (a, a) of another sum over the same batches (see `_dense_optimum`)."""

    def __init__(self, size: int):
        self.total = np.zeros((size, size))
        self.left: list[np.ndarray] = []
        self.right: list[np.ndarray] = []
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        if a.dtype == np.float64:
            self.total += a.T @ b
            return
        self.pending.append((a, b))
        if sum(len(first) for first, _ in self.pending) >= CHUNK_ROWS:
            self._add_pending()

    def _add_pending(self) -> None:
        if not self.pending:
            return
        symmetric = all(first is second for first, second in self.pending)
        a = np.concatenate([first for first, _ in self.pending])
        b = a if symmetric else np.concatenate([second for _, second in self.pending])
        self.pending = []
        centre_a = a.mean(0)
        x = a - centre_a
        if symmetric:
            centre_b, y = centre_a, x
        else:
            centre_b = b.mean(0)
            y = b - centre_b
        self.total += x.T @ y
        centre_a, centre_b = centre_a.astype(np.float64), centre_b.astype(np.float64)
        self.left += [x.sum(0, dtype=np.float64) + len(a) * centre_a, centre_a]
        self.right += [centre_b, y.sum(0, dtype=np.float64)]

    def result(self) -> np.ndarray:
        self._add_pending()
        if self.left:
            left, right = np.stack(self.left), np.stack(self.right)
            for start in range(0, len(self.total), 1024):  # no [in, in] temporary
                self.total[start : start + 1024] += left[:, start : start + 1024].T @ right
            self.left, self.right = [], []
        return self.total


class _TapReader:
    """Reads a layer's input activation as [rows, in] from one model, float32 for float32
    and narrower activations and float64 for float64 (stats._product_dtype's rule)."""

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
        dtype = np.float64 if tap.dtype == np.float64 else np.float32
        return np.asarray(tap, dtype=dtype).reshape(-1, self.layer.in_features)


def allocate_sparsity(
    model, layers, data, scales, ratio, batch_size, method, reusable=None
) -> dict[str, float]:
    """Per-layer sparsities that reach `ratio` overall with the least total loss: every
    layer's loss curve (sensitivity-weighted, so all in output-damage units) is cut into
    per-weight increments, and the smallest increments over all layers are taken.

    `reusable` (a dict) receives, by layer name, the sums and factor of the layers whose
    input is a graph input: pruning changes nothing upstream of them, so their solve can
    take these instead of another pass and factorisation (8 s each at 7071 inputs)."""
    total = int(round(ratio * sum(layer.compact_weight.size for layer in layers)))
    graph_inputs = {value.name for value in model.graph.input}
    values, lengths, owners = [], [], []
    for index, layer in enumerate(layers):
        inputs = layer_inputs(model, model, layer, data, batch_size)
        solver = solver_for(layer, method)
        factor = reconstruct.hinv_factor(inputs.centred_pp) if solver == "sparsegpt" else None
        steps = _loss_increments(layer, inputs, scales[layer.name], solver, factor)
        if reusable is not None and layer.input_name in graph_inputs:
            reusable[layer.name] = _Prepared(inputs, factor)
        del inputs, factor
        values.append(steps.values)
        lengths.append(steps.lengths)
        owners.append(np.full(len(steps.values), index))
    counts = _take_smallest(np.concatenate(values), np.concatenate(lengths), total)
    counts = np.bincount(np.concatenate(owners), weights=counts, minlength=len(layers))
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
    weight = layer.weight  # float64, one copy for all uses below
    if solver == "obc":
        trace = reconstruct.obc_traces(weight, inputs.centred_pp)
        steps = np.diff(trace.cumulative_loss, axis=1) * scale[:, None]
        steps = np.sort(steps, axis=None)
        return _Increments(steps, np.ones(len(steps), dtype=np.int64))
    size = weight.size
    counts = [0] + [int(round(share * size)) for share in CURVE_GRID] + [size]
    sample = _curve_rows(len(weight))
    per_row = reconstruct.sparsegpt_losses(
        weight[sample], inputs.centred_pp, CURVE_GRID, factor=factor
    )
    losses = [0.0, *(per_row @ scale[sample] * (len(weight) / len(sample)))]
    losses.append(losses[-1] * 10 + 1.0)  # removing everything: never cheaper than 95%
    losses = np.maximum.accumulate(losses)  # a curve that drops is noise: keep it monotone
    lengths = np.diff(counts)
    return _Increments(np.diff(losses) / np.maximum(lengths, 1), lengths)
