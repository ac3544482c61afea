"""Stream calibration batches through the torch graph and accumulate S0, S1, S2 (METHOD.md).

For every dense layer and calibration row r (a sample, or a sample × position):

    c_i(r) = ||J_i(r)||^2 = ||d y / d z_i(r)||^2
    S0_i  = sum_r c_i(r)
    S1_ij = sum_r c_i(r) a_j(r)           (C^T A)
    S2_ij = sum_r c_i(r) a_j(r)^2         (C^T (A∘A))

plus `input_sq_j = sum_r a_j(r)^2` for Wanda and, when labels are given, the loss gradient
`loss_grad_ij = sum_r dL/dz_i(r) a_j(r) = dL/dw_ij` for the gradient-magnitude baseline.
Only these sums are kept across batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from ecprune_onnx.errors import UsageError
from ecprune_onnx.instrument import TensorRoles, TorchGraph
from ecprune_onnx.layers import DenseLayer


@dataclass
class LayerStats:
    """The sums of METHOD.md for one layer, float64."""

    s0: np.ndarray  # [out]
    s1: np.ndarray  # [out, in]
    s2: np.ndarray  # [out, in]
    input_sq: np.ndarray  # [in]
    rows: int = 0
    loss_grad: np.ndarray | None = None  # [out, in]: dL/dw over the calibration set

    @classmethod
    def zeros(cls, layer: DenseLayer) -> LayerStats:
        out_features, in_features = layer.shape
        return cls(
            s0=np.zeros(out_features),
            s1=np.zeros((out_features, in_features)),
            s2=np.zeros((out_features, in_features)),
            input_sq=np.zeros(in_features),
        )


@dataclass(frozen=True)
class ProbePlan:
    """Exact one-hot probes when a sample has at most `probe_count` output elements, else
    `probe_count` Rademacher probes (Hutchinson)."""

    exact: bool
    probe_count: int

    @property
    def label(self) -> str:
        kind = "exact" if self.exact else "Hutchinson"
        return f"{kind}, {self.probe_count} probe vectors"


def plan_probes(output_elements: int, max_probes: int) -> ProbePlan:
    if output_elements <= max_probes:
        return ProbePlan(exact=True, probe_count=output_elements)
    return ProbePlan(exact=False, probe_count=max_probes)


def collect_stats(
    graph: TorchGraph,
    roles: TensorRoles,
    layers: list[DenseLayer],
    batches: Iterable[dict[str, np.ndarray]],
    max_probes: int,
    seed: int,
    progress: Callable[[int], None] | None = None,
    label_batches: Iterable[np.ndarray] | None = None,
) -> tuple[dict[str, LayerStats], ProbePlan | None]:
    """Accumulate the statistics of every layer over all batches (one forward, one batched
    backward per batch; one more backward for the loss gradient when labels are given).
    Returns the stats by layer name and the probe plan used."""
    stats = {layer.name: LayerStats.zeros(layer) for layer in layers}
    generator = torch.Generator().manual_seed(seed)
    labels_iter = iter(label_batches) if label_batches is not None else None
    plan = None
    for feeds in batches:
        tensors = graph(feeds, grad=True)
        outputs = _batched_outputs([tensors[name] for name in roles.outputs], feeds)
        if plan is None:
            plan = plan_probes(sum(_per_sample(y) for y in outputs), max_probes)
        dense = [tensors[roles.dense_outputs[layer.name]] for layer in layers]
        loss_grads = None
        if labels_iter is not None:
            loss = task_loss(outputs[0], torch.from_numpy(next(labels_iter)))
            loss_grads = torch.autograd.grad(loss, dense, retain_graph=True, allow_unused=True)
        probes = _probe_vectors(outputs, plan, generator)
        sensitivities = _squared_jacobian_norms(outputs, dense, probes, plan)
        for index, (layer, c) in enumerate(zip(layers, sensitivities)):
            tap = _rows(tensors[roles.taps[layer.name]].detach(), layer)
            _accumulate(stats[layer.name], layer, c, tap)
            if loss_grads is not None:
                _accumulate_loss_grad(stats[layer.name], layer, loss_grads[index], tap)
        del tensors, outputs, dense, sensitivities
        if progress is not None:
            progress(len(next(iter(feeds.values()))))
    return stats, plan


def _batched_outputs(
    outputs: list[torch.Tensor], feeds: dict[str, np.ndarray]
) -> list[torch.Tensor]:
    """The outputs y that carry the batch and depend on the network's computation.

    An output that is a constant of the graph (e.g. an Identity of an initializer) has no
    rows and no derivative with respect to any z: it adds nothing to c_i(r).
    """
    rows = len(next(iter(feeds.values())))
    batched = [y for y in outputs if y.requires_grad and y.ndim >= 1 and y.shape[0] == rows]
    if not batched:
        raise UsageError(
            "none of the outputs counted as y depends on the inputs along the batch "
            "dimension; name one with --output"
        )
    return batched


def _per_sample(tensor: torch.Tensor) -> int:
    return int(np.prod(tensor.shape[1:], dtype=np.int64))


def _probe_vectors(
    outputs: list[torch.Tensor], plan: ProbePlan, generator: torch.Generator
) -> list[torch.Tensor]:
    """One [P, *y.shape] tensor per output: P vectors v over each sample's output elements.

    Exact: the K one-hot vectors e_k, the same for every sample. Hutchinson: independent
    ±1 entries, drawn on the CPU from the seeded generator so every device gets the same.
    """
    batch = outputs[0].shape[0]
    sizes = [_per_sample(y) for y in outputs]
    total = sum(sizes)
    if plan.exact:
        flat = torch.eye(total, dtype=torch.float64)[:, None, :].expand(total, batch, total)
    else:
        signs = torch.randint(0, 2, (plan.probe_count, batch, total), generator=generator)
        flat = signs.to(torch.float64) * 2 - 1
    vectors, start = [], 0
    for y, size in zip(outputs, sizes):
        piece = flat[:, :, start : start + size].reshape(plan.probe_count, *y.shape)
        vectors.append(piece.to(device=y.device, dtype=y.dtype))
        start += size
    return vectors


def _squared_jacobian_norms(
    outputs: list[torch.Tensor],
    dense: list[torch.Tensor],
    probes: list[torch.Tensor],
    plan: ProbePlan,
) -> list[torch.Tensor]:
    """c_i(r) for every layer: sum (or mean, for Hutchinson) over probes of (v^T J_i(r))^2."""
    try:
        # One backward for all probe vectors at once (vmap over the backward graph).
        grads = torch.autograd.grad(
            outputs, dense, grad_outputs=probes, is_grads_batched=True, allow_unused=True
        )
        squares = [None if g is None else g.double().square().sum(0) for g in grads]
    except RuntimeError:
        # Some converted ops have no batching rule for vmap: one backward per probe.
        squares = [None] * len(dense)
        for index in range(plan.probe_count):
            grads = torch.autograd.grad(
                outputs,
                dense,
                grad_outputs=[v[index] for v in probes],
                retain_graph=index + 1 < plan.probe_count,
                allow_unused=True,
            )
            for layer_index, g in enumerate(grads):
                if g is not None:
                    term = g.double().square()
                    previous = squares[layer_index]
                    squares[layer_index] = term if previous is None else previous + term
    scale = 1.0 if plan.exact else 1.0 / plan.probe_count
    return [
        torch.zeros(z.shape, dtype=torch.float64, device=z.device) if c is None else c * scale
        for c, z in zip(squares, dense)
    ]


def task_loss(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The training loss the labels imply, summed over samples: cross-entropy over the last
    axis for integer class labels, squared error for float targets."""
    if not labels.is_floating_point():
        logits = output.reshape(-1, output.shape[-1]).double()
        return torch.nn.functional.cross_entropy(logits, labels.reshape(-1).long(), reduction="sum")
    target = labels.to(output.device).double().reshape(output.shape)
    return torch.square(output.double() - target).sum()


def _rows(tap: torch.Tensor, layer: DenseLayer) -> torch.Tensor:
    """The layer's input as [rows, in] float64 (rows: samples × positions)."""
    if layer.transpose_input:  # Gemm transA=1: the activation arrives as [in, rows]
        tap = tap.transpose(0, 1)
    return tap.reshape(-1, layer.in_features).double()


def _accumulate_loss_grad(
    stats: LayerStats, layer: DenseLayer, grad: torch.Tensor | None, activations: torch.Tensor
) -> None:
    """dL/dw_ij = sum_r dL/dz_i(r) a_j(r): one GEMM per batch."""
    if stats.loss_grad is None:
        stats.loss_grad = np.zeros(layer.shape)
    if grad is not None:
        g = grad.reshape(-1, layer.out_features).double()
        stats.loss_grad += (g.T @ activations).cpu().numpy()


def _accumulate(
    stats: LayerStats, layer: DenseLayer, c: torch.Tensor, activations: torch.Tensor
) -> None:
    """Add one batch's rows: S0 += sum_r c, S1 += C^T A, S2 += C^T (A∘A), input_sq += sum_r A∘A."""
    c = c.reshape(-1, layer.out_features)
    squares = activations.square()
    stats.s0 += c.sum(0).cpu().numpy()
    stats.s1 += (c.T @ activations).cpu().numpy()
    stats.s2 += (c.T @ squares).cpu().numpy()
    stats.input_sq += squares.sum(0).cpu().numpy()
    stats.rows += activations.shape[0]
