"""Stream calibration batches through the torch graph and accumulate S0, S1, S2 (docs/method.md).

For every dense layer and calibration row r (a sample, or a sample × position):

    c_i(r) = ||J_i(r)||^2 = ||d y / d z_i(r)||^2
    S0_i  = sum_r c_i(r)
    S1_ij = sum_r c_i(r) a_j(r)           (C^T A)
    S2_ij = sum_r c_i(r) a_j(r)^2         (C^T (A∘A))

plus `input_sq_j = sum_r a_j(r)^2` for Wanda, `input_sum_j = sum_r a_j(r)` for the
sensitivity floor (scores.floored) and, when labels are given, the loss gradient
`loss_grad_ij = sum_r dL/dz_i(r) a_j(r) = dL/dw_ij` for the gradient-magnitude baseline.
Only these sums are kept across batches: float64, on the graph's device until the last batch.
Each batch's products are in the model's precision (`_product_dtype`); on the CPU the float32
forward, probe backward and products run through oneDNN (`onednn.py`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ecprune_onnx import heap, onednn
from ecprune_onnx.blockwise import row_blocks
from ecprune_onnx.calib import batch_rows
from ecprune_onnx.errors import UsageError
from ecprune_onnx.instrument import TensorRoles, TorchGraph
from ecprune_onnx.layers import DenseLayer

# Elements of a float32 product staged in float64 at a time (_add_to_float64): 2 MiB. For a
# 2048×2048 product 2^18 and 2^20 took 1.6 and 1.7 ms, 2^16 3.2 ms, 2^22 (32 MiB) 14 ms.
STAGE_ELEMENTS = 1 << 18
# Elements of one block of a batch's [out, in] products (_add_product): 8 MiB of float32.
PRODUCT_ELEMENTS = 1 << 21
# Gradients of the layers' outputs z taken in one batched backward (_squared_jacobian_norms):
# 1 of 10 probes at perf.py's 100M MLP (7069 units a layer, 256 rows a batch), 3 at 10M.
PROBE_CHUNK_BYTES = 16 << 20


@dataclass
class LayerStats:
    """The sums of docs/method.md for one layer, float64."""

    s0: np.ndarray  # [out]
    s1: np.ndarray | None  # [out, in]; None where only S0 was asked for (`collect_stats`)
    s2: np.ndarray | None  # [out, in]; compress sets it to None once its scores use it up
    input_sq: np.ndarray  # [in]
    rows: int = 0
    loss_grad: np.ndarray | None = None  # [out, in]: dL/dw over the calibration set
    input_sum: np.ndarray | None = None  # [in]


@contextlib.contextmanager
def s1_on_disk(stats: dict[str, LayerStats]) -> Iterator[None]:
    """Every layer's S1 waits in a temporary file while inside (`s1` None), and is read back
    on leaving: for the steps between the scores and the bias shifts, which do not read it
    (8 bytes per weight, at a large compress's peak while the masks are chosen)."""
    with tempfile.TemporaryFile() as file:
        aside = {}
        for name, layer_stats in stats.items():
            if layer_stats.s1 is not None:
                file.write(memoryview(np.ascontiguousarray(layer_stats.s1)).cast("B"))
                aside[name] = (layer_stats.s1.shape, layer_stats.s1.dtype)
                layer_stats.s1 = None
        yield
        file.seek(0)
        for name, (shape, dtype) in aside.items():
            s1 = np.empty(shape, dtype=dtype)
            file.readinto(memoryview(s1).cast("B"))
            stats[name].s1 = s1


@dataclass
class _RunningSums:
    """One layer's sums while the batches stream: float64 torch tensors on the graph's device,
    so a batch adds to them where it was computed; LayerStats (numpy) only at the end."""

    s0: torch.Tensor
    s1: torch.Tensor | None  # None: S0 only (collect_stats' `products_for`)
    s2: torch.Tensor | None
    input_sq: torch.Tensor
    rows: int = 0
    loss_grad: torch.Tensor | None = None
    input_sum: torch.Tensor | None = None

    @classmethod
    def zeros(cls, layer: DenseLayer, device: torch.device, products: bool) -> _RunningSums:
        out_features, in_features = layer.shape

        def matrix() -> torch.Tensor | None:
            if not products:
                return None
            return torch.zeros(out_features, in_features, dtype=torch.float64, device=device)

        return cls(
            s0=torch.zeros(out_features, dtype=torch.float64, device=device),
            s1=matrix(),
            s2=matrix(),
            input_sq=torch.zeros(in_features, dtype=torch.float64, device=device),
            input_sum=torch.zeros(in_features, dtype=torch.float64, device=device),
        )

    def to_layer_stats(self) -> LayerStats:
        def host(tensor: torch.Tensor | None) -> np.ndarray | None:
            return None if tensor is None else tensor.cpu().numpy()

        return LayerStats(
            host(self.s0),
            host(self.s1),
            host(self.s2),
            host(self.input_sq),
            self.rows,
            host(self.loss_grad),
            input_sum=host(self.input_sum),
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


def batch_rows_that_fit(layers: list[DenseLayer], probes: int, device: torch.device) -> int | None:
    """The most calibration rows per batch whose working set fits half the memory free on
    `device` now, or None where that memory cannot be read.

    Per row the loop holds about (2 + probes) float32 values for every input and output
    unit of every dense layer: the forward's tensors kept for autograd, then one layer's
    [probes, rows, width] gradients of the batched backward. This overestimates (measured
    ≈ 230 KB per row for perf.py's 10M MLP with 10 probes, against 760 KB from the formula),
    so it only binds for very wide layers.
    """
    available = _available_bytes(device)
    if available is None:
        return None
    units = sum(layer.in_features + layer.out_features for layer in layers)
    per_row = 4 * (2 + probes) * max(units, 1)
    return max(1, available // 2 // per_row)


def host_memory_available() -> int | None:
    """The host memory free for this process now (`_available_bytes`), or None."""
    return _available_bytes(torch.device("cpu"))


def _available_bytes(device: torch.device) -> int | None:
    """Memory free for this process on `device`: CUDA's free memory, or the host's available
    memory (Linux's MemAvailable, which counts the page cache the kernel would give back;
    the free pages alone can be half of it)."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError, RuntimeError):  # no /proc or sysconf, ...
        return None


def collect_stats(
    graph: TorchGraph,
    roles: TensorRoles,
    layers: list[DenseLayer],
    batches: Iterable[dict[str, np.ndarray]],
    max_probes: int,
    seed: int,
    progress: Callable[[int], None] | None = None,
    label_batches: Iterable[np.ndarray] | None = None,
    products_for: Collection[str] | None = None,
) -> tuple[dict[str, LayerStats], ProbePlan | None]:
    """Accumulate the statistics of every layer over all batches (one forward, one batched
    backward per batch; one more backward for the loss gradient when labels are given).
    Returns the stats by layer name and the probe plan used.

    `products_for`: the layers that get S1 and S2 (default: all); the others get S0,
    input_sq and rows only, the same values, with s1 = s2 = None. What the reconstructions
    need (S0), and how compress takes the [out, in] sums in groups of layers
    (`grouping.py`): every pass draws the same probes from `seed` and sums the same batches
    in the same order, so each layer's sums do not depend on the group it was in."""
    wanted = None if products_for is None else set(products_for)
    sums = {
        layer.name: _RunningSums.zeros(layer, graph.device, wanted is None or layer.name in wanted)
        for layer in layers
    }
    generator = torch.Generator().manual_seed(seed)
    labels_iter = iter(label_batches) if label_batches is not None else None
    plan = None
    with onednn.routed(graph.module), graph.gradients_from(roles.dense_outputs.values()):
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
            heap.trim()  # the temporaries freed since the last batch's backward
            sensitivities = _squared_jacobian_norms(outputs, dense, probes, plan)
            taps = [tensors[roles.taps[layer.name]].detach() for layer in layers]
            del tensors, outputs, dense, probes  # the products read the taps and c alone
            _add_products(sums, layers, taps, sensitivities, loss_grads)
            if progress is not None:
                progress(batch_rows(feeds))
    return {name: layer_sums.to_layer_stats() for name, layer_sums in sums.items()}, plan


def _add_products(
    sums: dict[str, _RunningSums],
    layers: list[DenseLayer],
    taps: list[torch.Tensor],
    sensitivities: list[torch.Tensor],
    loss_grads: tuple[torch.Tensor | None, ...] | None,
) -> None:
    """Add one batch's products layer by layer, letting go of each layer's input and c once
    they are added: at a 7069-wide layer each is 7 MiB of the batch's working set. The two
    lists are emptied; a tap two layers share lives while either needs it."""
    for index, layer in enumerate(layers):
        tap, c = _rows(taps[index], layer), sensitivities[index]
        taps[index] = sensitivities[index] = None
        _accumulate(sums[layer.name], layer, c, tap)
        if loss_grads is not None and sums[layer.name].s1 is not None:
            _accumulate_loss_grad(sums[layer.name], layer, loss_grads[index], tap)
        del tap, c


def _batched_outputs(
    outputs: list[torch.Tensor], feeds: dict[str, np.ndarray]
) -> list[torch.Tensor]:
    """The outputs y that carry the batch and depend on the network's computation.

    An output that is a constant of the graph (e.g. an Identity of an initializer) has no
    rows and no derivative with respect to any z: it adds nothing to c_i(r).
    """
    rows = batch_rows(feeds)
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
    Both are built in float32, where 0 and ±1 are exact (so is every other float type), and
    cast once to each output's dtype.
    """
    batch = outputs[0].shape[0]
    sizes = [_per_sample(y) for y in outputs]
    total = sum(sizes)
    if plan.exact:
        flat = torch.eye(total)[:, None, :].expand(total, batch, total)
    else:
        # randint draws the same values as an int64 draw would: the seeded probes of earlier
        # versions, without a [P, batch, total] int64 and float64 copy per batch.
        shape = (plan.probe_count, batch, total)
        flat = torch.randint(0, 2, shape, generator=generator, dtype=torch.float32)
        flat = flat.mul_(2).sub_(1)
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
    """c_i(r) for every layer: sum (or mean, for Hutchinson) over probes of (v^T J_i(r))^2,
    in the product precision of z (_product_dtype).

    One backward for a chunk of probe vectors at once (vmap over the backward graph), as
    many probes per chunk as fit PROBE_CHUNK_BYTES of gradients: all of them for most
    models, while at 7069 units per layer the gradients of 10 probes were 150 MB at the
    batch loop's peak."""
    chunk = _probe_chunk(dense, plan.probe_count)
    squares: list[torch.Tensor | None] = [None] * len(dense)
    try:
        for start in range(0, plan.probe_count, chunk):
            grads = torch.autograd.grad(
                outputs,
                dense,
                grad_outputs=[v[start : start + chunk] for v in probes],
                retain_graph=start + chunk < plan.probe_count,
                is_grads_batched=True,
                allow_unused=True,
            )
            _add_squares(squares, [None if g is None else _probe_sum(g) for g in _squares(grads)])
            del grads
            heap.trim()  # this chunk's gradients, before the next chunk's are allocated
    except RuntimeError:
        # Some converted ops have no batching rule for vmap: one backward per probe.
        squares = _squares_probe_by_probe(outputs, dense, probes, plan)
    if not plan.exact:  # Hutchinson's mean over the probes; the sums are ours to scale
        for c in squares:
            if c is not None:
                c.mul_(1.0 / plan.probe_count)
    return [
        torch.zeros(z.shape, dtype=_product_dtype(z.dtype), device=z.device) if c is None else c
        for c, z in zip(squares, dense)
    ]


def _squares_probe_by_probe(
    outputs: list[torch.Tensor],
    dense: list[torch.Tensor],
    probes: list[torch.Tensor],
    plan: ProbePlan,
) -> list[torch.Tensor | None]:
    """Sum over probes of (v^T J_i(r))^2 with one backward per probe vector."""
    squares = [None] * len(dense)
    for index in range(plan.probe_count):
        grads = torch.autograd.grad(
            outputs,
            dense,
            grad_outputs=[v[index] for v in probes],
            retain_graph=index + 1 < plan.probe_count,
            allow_unused=True,
        )
        _add_squares(squares, _squares(grads))
    return squares


def _add_squares(squares: list[torch.Tensor | None], terms: list[torch.Tensor | None]) -> None:
    """squares[i] += terms[i], where a term exists (in place after the first)."""
    for index, term in enumerate(terms):
        if term is not None:
            previous = squares[index]
            squares[index] = term if previous is None else previous.add_(term)


def _probe_chunk(dense: list[torch.Tensor], probe_count: int) -> int:
    """Probe vectors per batched backward: as many as PROBE_CHUNK_BYTES of the layers'
    output gradients hold, at least one."""
    per_probe = sum(z.numel() * z.element_size() for z in dense)
    return max(1, min(probe_count, PROBE_CHUNK_BYTES // max(per_probe, 1)))


def _squares(grads: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """g∘g for each gradient in the product precision: float16 would overflow above 256 and
    round at 1e-3. The sum over the probe axis then stays in that precision too: at most
    --probes positive terms, so float32 rounds it at ~1e-7 like the products that use it, and
    summing into float64 instead (sum(dtype=float64)) took 13 ms against 1.7 ms for
    [10, 256, 2048].

    In place where a gradient is a whole tensor of its own (a fresh one: 7 MiB less at a
    7069-wide layer's probe chunk). Not where autograd handed over a view (an expanded one,
    one element for many; the probe vector itself, an output's gradient with respect to
    itself), nor where two gradients share memory (z_a + z_b: both get the Add's gradient)."""
    wide = [None if g is None else g.to(_product_dtype(g.dtype)) for g in grads]
    memory = Counter(g.untyped_storage().data_ptr() for g in wide if g is not None)
    return [
        None if g is None else _square(g, alone=memory[g.untyped_storage().data_ptr()] == 1)
        for g in wide
    ]


def _square(g: torch.Tensor, alone: bool) -> torch.Tensor:
    if alone and g._base is None and g.is_contiguous():
        return g.square_()
    return g.square()


def _probe_sum(squares: torch.Tensor) -> torch.Tensor:
    """The sum over the leading probe axis; the one probe itself, a view, where it holds one."""
    return squares[0] if len(squares) == 1 else squares.sum(0)


def task_loss(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The training loss the labels imply, summed over samples: cross-entropy over the last
    axis for integer class labels, squared error for float targets."""
    labels = labels.to(output.device)  # labels come from numpy, the output maybe from a GPU
    if not labels.is_floating_point():
        logits = output.reshape(-1, output.shape[-1]).double()
        return torch.nn.functional.cross_entropy(logits, labels.reshape(-1).long(), reduction="sum")
    target = labels.double().reshape(output.shape)
    return torch.square(output.double() - target).sum()


def _product_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision of one batch's products C^T A, C^T (A∘A) and (dL/dZ)^T A: float64 for
    float64 models, float32 for every other float type; the sums across batches are float64.

    Why float32: float64 products were a third of the batch loop, and float32 GEMMs run ~2x
    faster on the CPU (far more on GPUs). Each product sums one batch's rows in float32
    (relative rounding ~1e-7); adding it to float64 sums keeps that error from growing with
    the number of batches. Measured with `benchmarks/stats_precision.py --baseline` (perf.py's
    MLP, 2048-wide input and hidden layers, 4096 rows in batches of 256, --probes 16; a 2-core
    shared VM, torch 2.14 on the CPU, best of 3), collect_stats before this change (float64
    products, float64 casts of every gradient, per-batch numpy sums) and after:
    10 outputs (10 exact probes) 4.76 s -> 3.21 s, 1000 outputs (16 Hutchinson probes)
    9.56 s -> 6.80 s (on one H200 with --device cuda, torch 2.11: 1.77 s -> 0.12 s and
    2.58 s -> 0.39 s, the sums no longer crossing to the host per batch). Against the same
    loop with float64 products, the largest relative error over the layers was 3.1e-7 for S1
    (on ReLU inputs, where S1 cannot cancel), 2.9e-7 for S2 and 1.2e-6 for S2 - S1^2/S0 (on
    the H200 at most 2.9e-7, 3.0e-7, 1.3e-6), and no 50% EC mask decision changed.

    This assumes IEEE float32 matmuls, torch's default float32 matmul precision "highest";
    a caller that allows TF32 or bfloat16 matmuls makes these products round at ~1e-3.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(tap: torch.Tensor, layer: DenseLayer) -> torch.Tensor:
    """The layer's input as [rows, in] in the product precision (rows: samples × positions)."""
    if layer.transpose_input:  # Gemm transA=1: the activation arrives as [in, rows]
        tap = tap.transpose(0, 1)
    return tap.reshape(-1, layer.in_features).to(_product_dtype(tap.dtype))


def _accumulate_loss_grad(
    sums: _RunningSums, layer: DenseLayer, grad: torch.Tensor | None, activations: torch.Tensor
) -> None:
    """dL/dw_ij = sum_r dL/dz_i(r) a_j(r): one GEMM per batch, added to a float64 sum."""
    if sums.loss_grad is None:
        sums.loss_grad = torch.zeros(layer.shape, dtype=torch.float64, device=sums.s0.device)
    if grad is not None:
        g = grad.reshape(-1, layer.out_features).to(activations.dtype)
        _add_product(sums.loss_grad, g, activations)


def _accumulate(
    sums: _RunningSums, layer: DenseLayer, c: torch.Tensor, activations: torch.Tensor
) -> None:
    """Add one batch's rows: S0 += sum_r c, S1 += C^T A, S2 += C^T (A∘A), input_sq += sum_r A∘A,
    input_sum += sum_r A.

    The products are in the activations' precision (_product_dtype), the sums float64.
    """
    c = c.reshape(-1, layer.out_features).to(activations.dtype)
    squares = activations.square()
    sums.s0 += c.sum(0, dtype=torch.float64)
    if sums.s1 is not None:
        _add_product(sums.s1, c, activations)
        _add_product(sums.s2, c, squares)
    sums.input_sq += squares.sum(0, dtype=torch.float64)
    sums.input_sum += activations.sum(0, dtype=torch.float64)
    sums.rows += activations.shape[0]


def _add_product(total: torch.Tensor, c: torch.Tensor, a: torch.Tensor) -> None:
    """total += c^T a for c [rows, out] and a [rows, in], PRODUCT_ELEMENTS at a time: the
    whole product would be one more [out, in] array (200 MB at 7069 × 7069 in float32) for
    every layer's sums, at the batch loop's peak."""
    rows = max(1, PRODUCT_ELEMENTS // total.shape[1])
    for block in row_blocks(total.shape[0], rows):
        _add_to_float64(total[block], onednn.transposed_product(c[:, block], a))


def _add_to_float64(total: torch.Tensor, product: torch.Tensor) -> None:
    """total += product, for a float64 [out, in] total and a product of any float type.

    On the CPU, torch's add_ of a float32 tensor into a float64 one is slow: 2.7 ms at best,
    11 ms typically for 2048×2048 on the 2-core VM, as long as the float32 GEMM itself,
    against 1.6 to 1.8 ms for a copy_ into float64 followed by a float64 add_ (a fresh
    .double() copy is slower still: its new pages fault in). So the product is staged
    STAGE_ELEMENTS at a time through a small buffer that stays in cache. CUDA casts inside
    its one add kernel at the speed of memory.
    """
    if product.dtype == total.dtype or total.device.type != "cpu":
        total.add_(product)
        return
    rows = max(1, STAGE_ELEMENTS // product.shape[1])
    stage = torch.empty(rows, product.shape[1], dtype=total.dtype)
    for start in range(0, product.shape[0], rows):
        part = product[start : start + rows]
        total[start : start + rows].add_(stage[: len(part)].copy_(part))
