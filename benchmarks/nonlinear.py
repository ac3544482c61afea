"""The paper's "non-linear" baseline: elimination-compensation without linearisation.

For every weight w_ij of a dense layer, the network is re-run with w_ij removed and the bias
of unit i shifted by δ, and δ is chosen to minimise the true output damage

    D_ij(δ) = sum_r || y(x_r; w_ij = 0, b_i + δ) - y(x_r) ||²

over the calibration rows. Its minimum is the importance; its minimiser is the bias shift.
EC (docs/method.md) is this criterion with the network linearised around the unpruned weights;
for the last layer of a network with a linear output the two coincide exactly.

The 1-D minimisation is Gauss-Newton on δ (the residual's derivative in δ comes from one
forward-mode pass), started at 0 and safeguarded by keeping the best iterate; on a linear
residual the first step is the exact optimum. All weights of a layer are processed in
vectorised chunks, in float64. The networks are the benchmark's tanh MLPs: a chain of
dense layers read from the ONNX file, tanh between them, none after the last.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ecprune_onnx.layers import find_dense_layers

GAUSS_NEWTON_STEPS = 4


@dataclass(frozen=True)
class NonlinearScores:
    """Per layer name: importances [out, in] and the optimal bias shift of each weight."""

    importance: dict[str, np.ndarray]
    shift: dict[str, np.ndarray]


def _chain(model: onnx.ModelProto) -> list:
    """The dense layers in graph order; each must feed the next (the benchmark's MLPs)."""
    layers = find_dense_layers(model).layers
    if not layers:
        raise ValueError("no dense layer found")
    return layers


def _downstream(weights: list[torch.Tensor], biases: list[torch.Tensor], start: int):
    """(y, dy) from (z, dz) of layer ``start``: the forward pass and its tangent (tanh
    between layers). 2-D matmuls over stacked rows; the tangent is propagated by hand
    because torch.func.jvp is several times slower on these small matrices."""

    def run(z: torch.Tensor, dz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = z.shape[:-1]
        z, dz = z.reshape(-1, z.shape[-1]), dz.reshape(-1, dz.shape[-1])
        for w, b in zip(weights[start + 1 :], biases[start + 1 :]):
            a = torch.tanh(z)
            z, dz = torch.addmm(b, a, w.T), ((1 - a * a) * dz) @ w.T
        return z.reshape(*shape, -1), dz.reshape(*shape, -1)

    return run


def _unit_response(pre: list[torch.Tensor], weights, biases, layer: int):
    """y and dy/dp for a perturbation p [k, rows] of one unit's pre-activation.

    Only unit i moves, so the next layer's pre-activation changes by a rank-one term,
    (tanh(z_i + p) - tanh(z_i)) times column i of the next weight: the costly matmul of
    the next layer is never redone. Returns ``response(p, units) -> (y, dy)``, both
    [k, rows, outputs].
    """
    if layer == len(weights) - 1:  # the output layer: y moves by p in output i alone

        def last(p: torch.Tensor, units: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            onehot = torch.nn.functional.one_hot(units, pre[layer].shape[1]).to(p.dtype)
            slope = onehot[:, None, :].expand(-1, p.shape[1], -1)
            return pre[layer][None] + p[:, :, None] * slope, slope

        return last
    z, z_next, w_next = pre[layer], pre[layer + 1], weights[layer + 1]
    run = _downstream(weights, biases, layer + 1)

    def hidden(p: torch.Tensor, units: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z_i = z[:, units].T  # [k, rows]
        moved = torch.tanh(z_i + p)
        column = w_next[:, units].T[:, None, :]  # [k, 1, next]
        z_moved = z_next[None] + (moved - torch.tanh(z_i))[:, :, None] * column
        return run(z_moved, (1 - moved * moved)[:, :, None] * column)

    return hidden


def _layer_scores(
    a: torch.Tensor, w: torch.Tensor, y0: torch.Tensor, response, chunk: int
) -> tuple[np.ndarray, np.ndarray]:
    """Importance and optimal shift of every weight of one layer.

    a: the layer's inputs [rows, in]; w: its weight [out, in]; y0: the unpruned outputs.
    """
    out_f, in_f = w.shape
    units, inputs = np.divmod(np.arange(out_f * in_f), in_f)
    importance = np.empty(out_f * in_f)
    shift = np.empty(out_f * in_f)
    for start in range(0, out_f * in_f, chunk):
        sl = slice(start, min(start + chunk, out_f * in_f))
        i = torch.from_numpy(units[sl])
        j = torch.from_numpy(inputs[sl])
        # removed[k, r] = w_ij a_j(r): what the removal takes out of z_i(r)
        removed = w[i, j][:, None] * a[:, j].T
        importance[sl], shift[sl] = _minimise(removed, i, y0, response)
    return importance.reshape(out_f, in_f), shift.reshape(out_f, in_f)


def _minimise(removed, units, y0, response) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Newton on δ for a chunk of weights; returns the best loss and δ seen."""
    delta = torch.zeros(removed.shape[0], dtype=removed.dtype)
    best_loss = torch.full_like(delta, torch.inf)
    best_delta = delta.clone()
    for _ in range(GAUSS_NEWTON_STEPS + 1):
        y, dy = response(delta[:, None] - removed, units)
        residual = (y - y0[None]).reshape(len(delta), -1)
        slope = dy.reshape(len(delta), -1)
        loss = residual.square().sum(1)
        better = loss < best_loss
        best_loss = torch.where(better, loss, best_loss)
        best_delta = torch.where(better, delta, best_delta)
        curvature = slope.square().sum(1)
        step = (residual * slope).sum(1) / torch.where(curvature > 0, curvature, 1.0)
        delta = delta - step
    return best_loss.numpy(), best_delta.numpy()


def nonlinear_scores(model_path: Path, x_calib: np.ndarray, chunk: int = 512) -> NonlinearScores:
    """The non-linear importances and shifts of every dense layer of ``model_path``."""
    layers = _chain(onnx.load(str(model_path)))
    weights = [torch.from_numpy(layer.weight) for layer in layers]
    biases = [torch.from_numpy(layer.bias) for layer in layers]
    importance, shift = {}, {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # benchmark workers run side by side; more threads thrash
    try:
        _fill(layers, weights, biases, x_calib, chunk, importance, shift)
    finally:
        torch.set_num_threads(threads)
    return NonlinearScores(importance, shift)


def _fill(layers, weights, biases, x_calib, chunk, importance, shift) -> None:
    with torch.no_grad():
        a = torch.from_numpy(np.asarray(x_calib, np.float64))
        inputs, pre = [], []
        for w, b in zip(weights, biases):
            inputs.append(a)
            pre.append(a @ w.T + b)
            a = torch.tanh(pre[-1])
        y0 = pre[-1]
    for index, layer in enumerate(layers):
        response = _unit_response(pre, weights, biases, index)
        importance[layer.name], shift[layer.name] = _layer_scores(
            inputs[index], weights[index], y0, response, chunk
        )


def apply_shifts(pruned_path: Path, scores: NonlinearScores) -> None:
    """Add to each bias the sum of the 1-D optimal shifts of its row's removed weights.

    The pruned file comes from ``compress(scores=..., compensate=False)``: the removed
    weights are its zeros. Layers are the benchmark's Gemm nodes with a bias and beta = 1.
    """
    model = onnx.load(str(pruned_path))
    inits = {t.name: t for t in model.graph.initializer}
    for layer in find_dense_layers(model).layers:
        removed = layer.weight == 0
        delta = np.where(removed, scores.shift[layer.name], 0.0).sum(axis=1)
        tensor = inits[layer.bias_name]
        bias = numpy_helper.to_array(tensor)
        if not np.allclose(bias, layer.bias):
            raise ValueError(f"{layer.name}: effective bias is not the stored one (beta != 1)")
        tensor.CopyFrom(numpy_helper.from_array((bias + delta).astype(bias.dtype), tensor.name))
    onnx.save(model, str(pruned_path))
