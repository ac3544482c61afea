"""`finetune()`: train the surviving weights and biases of a pruned model on labelled data.

Pruning zeroes weights and shifts biases without the original training code; a few epochs
of training on labelled rows recover part of what was lost. The model is converted to torch
(onnx2pytorch, as for the statistics) with the loss tensor as its output; only the weights
and biases of the dense layers that `find_dense_layers` finds train, everything else is
frozen, and every weight that is exactly zero in the input stays exactly zero (its gradient
is masked and the mask is re-applied after each optimizer step). The trained values are
written back into a copy of the ONNX file: same nodes, inputs, outputs, initializer names
and dtypes. Biases are written as `rewrite` writes shifted ones: one per unit ([out]; a
scalar or [1] C widens to [out], a Gemm's beta becomes 1) and a bias initializer that other
nodes also read is cloned first, so that one keeps its value. A layer without a bias (MatMul
alone, Gemm without C) keeps none; float16/bfloat16 layers are refused.

Loss: cross-entropy over the last axis of the loss output for integer labels (class
indices), mean squared error for float labels.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from ecprune_onnx import modelio
from ecprune_onnx.calib import CalibData, input_specs, load_calib
from ecprune_onnx.errors import UsageError
from ecprune_onnx.instrument import (
    TorchGraph,
    check_parity,
    choose_outputs,
    converted_layer,
    resolve_device,
    with_outputs,
)
from ecprune_onnx.layers import DenseLayer, find_dense_layers
from ecprune_onnx.rewrite import replace_parameters

# progress(task, done, total): the CLI draws bars from it.
Progress = Callable[[str, int, int], None]

# Adam on a float16 copy of the weights loses small updates to rounding; training in a
# float32 copy and writing back float16 would need a cast of the whole graph, which
# onnx2pytorch does not offer. So only float32/float64 dense layers are trained.
TRAINABLE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

# The converted nn.Linear holds the weight as onnx2pytorch read it (alpha·B, transposed, in
# the stored dtype); float32 rounding of alpha·B is ~1e-7 relative, a wrong match is O(1).
_MATCH_RTOL = 1e-5


@dataclass(frozen=True)
class FinetuneResult:
    """What finetune did.

    loss: "cross_entropy" (integer labels) or "mse" (float labels), read on `loss_output`.
    Both loss lists are indexed by epoch, epoch 0 being the model as given:
    train_loss: None at 0 (nothing was trained), then the mean loss over each epoch's
    training batches, as they were trained (entries 1..epochs).
    validation_loss: the loss on the held-out rows of the model as given (entry 0) and after
    each epoch (entries 1..epochs); empty when nothing was held out.
    best_epoch: the epoch whose parameters were written, an index into both lists: the one
    with the lowest validation loss (0: the input's own parameters were best), or the last
    without validation.
    layers: the dense layers trained; frozen_zeros: their weights held at zero;
    trainable: the number of weights and biases that trained.
    """

    model: str
    output: str
    loss: str
    loss_output: str
    epochs: int
    best_epoch: int
    train_loss: list[float | None]
    validation_loss: list[float]
    validation_rows: int
    train_rows: int
    layers: list[str]
    frozen_zeros: int
    trainable: int
    device: str
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _TrainedLayer:
    """A dense layer bound to the torch parameters that train in its place.

    keep: 1 where the input model's weight is nonzero, 0 where it must stay zero.
    bias: None where the layer has no bias (MatMul alone, Gemm without C): it keeps none.
    """

    layer: DenseLayer
    weight: torch.nn.Parameter
    bias: torch.nn.Parameter | None
    keep: torch.Tensor

    def parameters(self) -> list[torch.nn.Parameter]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    @property
    def frozen_zeros(self) -> int:
        return int((self.keep == 0).sum())

    @property
    def trainable(self) -> int:
        return int(self.keep.sum()) + (0 if self.bias is None else self.bias.numel())


@dataclass(frozen=True)
class _Rows:
    """Row indices of the data: the training part and the held-out validation part."""

    train: np.ndarray
    validation: np.ndarray


def default_finetune_path(model_path: str | os.PathLike) -> Path:
    """`model.onnx` → `model.finetuned.onnx` beside it."""
    model_path = Path(model_path)
    stem = model_path.stem if model_path.suffix == ".onnx" else model_path.name
    return model_path.with_name(f"{stem}.finetuned.onnx")


def finetune(
    model: str | os.PathLike,
    data: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    labels: str = "y",
    loss_output: str | None = None,
    epochs: int = 20,
    learning_rate: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    validation: float = 0.1,
    device: str = "auto",
    force: bool = False,
    progress: Progress | None = None,
) -> FinetuneResult:
    """Train the dense weights and biases of `model` on the NPZ `data`, masks fixed; write it.

    labels: the NPZ array of targets (integer class indices → cross-entropy, float → MSE).
    loss_output: the tensor the loss reads (any tensor of the graph, e.g. the logits before
    a Softmax); default the first float graph output.
    validation: share of the rows (after a seeded shuffle) held out; the parameters of the
    epoch with the lowest validation loss are written (possibly the input's own, epoch 0),
    or those of the last epoch when validation is 0.
    Adam with `learning_rate`; rows shuffled each epoch by a torch.Generator seeded with
    `seed`, so a run on the CPU is repeatable bit for bit. Raises UsageError for bad input,
    always before training starts.
    """
    started = time.perf_counter()
    _check_options(labels, epochs, learning_rate, batch_size, validation)
    output = modelio.check_output_path(model, output or default_finetune_path(model), force)
    onnx_model = modelio.load_model(model)
    layers = find_dense_layers(onnx_model).layers
    loss_tensor = _choose_loss_output(onnx_model, loss_output)
    calib = load_calib(data, input_specs(onnx_model), labels_key=labels)
    loss = "cross_entropy" if calib.labels.dtype.kind in "iu" else "mse"
    generator = torch.Generator().manual_seed(seed)
    rows = _split_rows(calib, validation, generator)

    torch_device = resolve_device(device)
    graph, trained = _trainable_graph(model, onnx_model, layers, loss_tensor, torch_device)
    first_batch = next(calib.batches(batch_size))
    check_parity(graph, first_batch)
    first_output = graph(first_batch)[loss_tensor]
    _check_targets(calib, labels, loss, loss_tensor, first_output, min(batch_size, calib.rows))

    trainer = _Trainer(graph, trained, calib, loss, loss_tensor, first_output.dtype, batch_size)
    history = trainer.fit(rows, epochs, learning_rate, generator, progress)

    weights = {t.layer.name: weight for t, weight in zip(trained, history.weights)}
    biases = {t.layer.name: bias for t, bias in zip(trained, history.biases) if bias is not None}
    finetuned = replace_parameters(onnx_model, layers, weights, biases)
    external = modelio.file_uses_external_data(model)
    with modelio.stage_model(finetuned, output, external) as staged:
        # Checked as a file (no 2 GB limit); a failure is our bug, not the user's: traceback
        onnx.checker.check_model(str(staged.path))
        staged.commit()
    return FinetuneResult(
        model=str(model),
        output=str(output),
        loss=loss,
        loss_output=loss_tensor,
        epochs=epochs,
        best_epoch=history.best_epoch,
        train_loss=history.train_loss,
        validation_loss=history.validation_loss,
        validation_rows=len(rows.validation),
        train_rows=len(rows.train),
        layers=[t.layer.name for t in trained],
        frozen_zeros=sum(t.frozen_zeros for t in trained),
        trainable=sum(t.trainable for t in trained),
        device=str(torch_device),
        seconds=time.perf_counter() - started,
    )


# --------------------------------------------------------------------- checking the input


def _check_options(
    labels: str | None, epochs: int, learning_rate: float, batch_size: int, validation: float
) -> None:
    """Validate the options before any file is read."""
    if not labels:
        raise UsageError("--labels: finetune needs the name of the labels array of the NPZ")
    if epochs < 1:
        raise UsageError(f"--epochs {epochs}: expected a whole number >= 1")
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise UsageError(f"--lr {learning_rate}: expected a finite number > 0")
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: expected a whole number >= 1")
    if not (math.isfinite(validation) and 0 <= validation < 1):
        raise UsageError(f"--validation {validation}: expected a share of the rows in [0, 1)")


def _choose_loss_output(model: onnx.ModelProto, requested: str | None) -> str:
    """The tensor the loss reads: `--output` (computed by a node) or the first float output."""
    name = choose_outputs(model, [requested] if requested else [])[0]
    if not any(name in node.output for node in model.graph.node):
        raise UsageError(
            f"--output {name}: is an input or initializer of the model; expected a tensor "
            "the model computes (e.g. its logits)"
        )
    return name


def _split_rows(calib: CalibData, validation: float, generator: torch.Generator) -> _Rows:
    """Shuffle the rows once (seeded) and hold out the last `validation` share of them."""
    held_out = round(calib.rows * validation)
    if validation > 0 and not 1 <= held_out < calib.rows:
        raise UsageError(
            f"--validation {validation}: holds out {held_out} of the {calib.rows} rows of "
            f"{calib.path}; expected at least one row for validation and one for training"
        )
    order = torch.randperm(calib.rows, generator=generator).numpy()
    cut = calib.rows - held_out
    return _Rows(train=order[:cut], validation=order[cut:])


def _check_targets(
    calib: CalibData,
    labels_key: str,
    loss: str,
    output_name: str,
    output: torch.Tensor,
    rows: int,
) -> None:
    """The labels fit the loss output (shape, class range); `output` is that of `rows` rows."""
    where = f"{calib.path}: labels {labels_key!r}"
    labels = calib.labels
    if not output.is_floating_point():
        raise UsageError(
            f"--output {output_name}: is a {output.dtype} tensor; the loss needs a float tensor"
        )
    if output.ndim == 0 or output.shape[0] != rows:
        raise UsageError(
            f"--output {output_name}: has shape {list(output.shape)} for a batch of {rows} "
            "rows; expected the rows first"
        )
    shape = f"[rows, {', '.join(str(size) for size in output.shape[1:])}]"
    if loss == "cross_entropy":
        if output.ndim < 2 or _squeeze(labels.shape[1:]) != _squeeze(output.shape[1:-1]):
            raise UsageError(
                f"{where} are integer class indices of shape {list(labels.shape)}; expected "
                f"one per row of output {output_name} {shape} without its class axis "
                "(or float targets, for MSE)"
            )
        classes = output.shape[-1]
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= classes:
            raise UsageError(
                f"{where} range from {low} to {high}; expected class indices in "
                f"[0, {classes}) for the last axis of output {output_name} {shape}"
            )
    elif _squeeze(labels.shape[1:]) != _squeeze(output.shape[1:]):
        raise UsageError(
            f"{where} are float targets of shape {list(labels.shape)}; expected the shape "
            f"of output {output_name} {shape} (trailing dimensions of size 1 aside)"
        )


def _squeeze(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A shape without its trailing dimensions of size 1: [rows, 1] targets fit [rows]."""
    shape = tuple(shape)
    while shape and shape[-1] == 1:
        shape = shape[:-1]
    return shape


# ------------------------------------------------------------ the torch copy and its layers


def _trainable_graph(
    model_path: str | os.PathLike,
    onnx_model: onnx.ModelProto,
    layers: list[DenseLayer],
    loss_output: str,
    device: torch.device,
) -> tuple[TorchGraph, list[_TrainedLayer]]:
    """The torch copy with `loss_output` as its output; every parameter frozen but the layers'.

    The dense layers that do not feed `loss_output` are left out of the copy and untouched.
    """
    copied = with_outputs(onnx_model, [loss_output])
    _bias_adds_after_their_matmuls(copied, layers)
    produced = {name for node in copied.graph.node for name in node.output}
    upstream = [layer for layer in layers if layer.node_output in produced]
    if not upstream:
        raise UsageError(
            f"{model_path}: no dense layer (Gemm or MatMul with an initializer weight) feeds "
            f"--output {loss_output}; nothing to train"
        )
    for layer in upstream:
        if np.dtype(layer.weight_dtype) not in TRAINABLE_DTYPES:
            raise UsageError(
                f"layer {layer.name}: weight {layer.weight_name!r} is {layer.weight_dtype}; "
                "finetune trains float32 or float64 weights"
            )
    graph = TorchGraph(copied, device)
    for parameter in graph.module.parameters():
        parameter.requires_grad_(False)
    trained = [_bind_layer(graph.module, layer, produced) for layer in upstream]
    return graph, trained


def _bias_adds_after_their_matmuls(model: onnx.ModelProto, layers: list[DenseLayer]) -> None:
    """Move each MatMul's bias Add right after it, so onnx2pytorch folds them into one Linear.

    onnx2pytorch 0.6 folds MatMul + Add into nn.Linear(bias=True) only when the Add is the
    next node; otherwise the bias stays a buffer of an Add op that cannot train. The move
    keeps the order topological: the Add reads only the product and an initializer.
    """
    nodes = [copy.deepcopy(node) for node in model.graph.node]
    for layer in layers:
        if layer.kind != "matmul_add":
            continue
        matmul = _position(nodes, layer.node_output)
        add = _position(nodes, layer.output_name)
        if matmul is None or add is None or add == matmul + 1:
            continue
        add_node = nodes.pop(add)
        nodes.insert(_position(nodes, layer.node_output) + 1, add_node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _position(nodes: list[onnx.NodeProto], output: str) -> int | None:
    return next((i for i, node in enumerate(nodes) if output in node.output), None)


def _bind_layer(module: torch.nn.Module, layer: DenseLayer, produced: set[str]) -> _TrainedLayer:
    """The nn.Linear onnx2pytorch made of `layer`, checked against its weight and bias.

    Its weight trains as is ([out, in], as the layer's effective weight); a bias trains as a
    new [out] parameter holding the effective bias (beta·C broadcast), so a [1] or scalar C
    becomes one bias per unit.
    """
    linear = _linear_of(module, layer)
    weight = linear.weight
    expected = torch.as_tensor(layer.weight, dtype=weight.dtype, device=weight.device)
    if weight.shape != expected.shape or not _close(weight, expected):
        raise UsageError(_unmatched(layer, "its nn.Linear holds a different weight"))
    bias = None
    if linear.bias is not None:
        expected_bias = torch.as_tensor(layer.bias, dtype=weight.dtype, device=weight.device)
        found = torch.broadcast_to(linear.bias.detach().reshape(-1), expected_bias.shape)
        if layer.bias_name is None or not _close(found, expected_bias):
            raise UsageError(_unmatched(layer, "its nn.Linear holds a different bias"))
        bias = torch.nn.Parameter(expected_bias.clone())
        linear.bias = bias
    elif layer.bias_name is not None and layer.output_name in produced:
        raise UsageError(_unmatched(layer, "its bias Add was not folded into an nn.Linear"))
    weight.requires_grad_(True)
    keep = (expected != 0).to(weight.dtype)
    # Zero gradient where the mask is 0: Adam then never moves those weights; the mask is
    # re-applied after each step as well, so they stay exactly 0 whatever the optimizer.
    weight.register_hook(lambda grad: grad * keep)
    return _TrainedLayer(layer, weight, bias, keep)


def _linear_of(module: torch.nn.Module, layer: DenseLayer) -> torch.nn.Linear:
    """Gemm → nn.Linear (transA: Sequential(Transpose, Linear)); MatMul(+Add) → nn.Linear."""
    converted = converted_layer(module, layer)
    if not isinstance(converted, torch.nn.Linear):
        found = type(converted).__name__ if converted is not None else "nothing"
        raise UsageError(_unmatched(layer, f"it was converted to {found}, not an nn.Linear"))
    return converted


def _close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    return torch.allclose(actual.detach(), expected, rtol=_MATCH_RTOL, atol=_MATCH_RTOL * scale)


def _unmatched(layer: DenseLayer, reason: str) -> str:
    return (
        f"layer {layer.name}: cannot train it through the onnx2pytorch conversion ({reason}); "
        "nothing was written"
    )


# -------------------------------------------------------------------------------- training


@dataclass
class _History:
    """Per-epoch losses (indexed by epoch, 0: before training) and the parameters of the best
    epoch (numpy, float64)."""

    train_loss: list[float | None]
    validation_loss: list[float]
    best_epoch: int
    weights: list[np.ndarray]
    biases: list[np.ndarray | None]


def _cross_entropy(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every position, the classes on the output's last axis."""
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), labels.reshape(-1))


def _mse(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(output, targets.reshape(output.shape))


LOSSES = {"cross_entropy": _cross_entropy, "mse": _mse}


class _Trainer:
    """Adam over the bound layers' parameters, batches of rows chosen by index."""

    def __init__(
        self,
        graph: TorchGraph,
        trained: list[_TrainedLayer],
        calib: CalibData,
        loss: str,
        loss_output: str,
        output_dtype: torch.dtype,
        batch_size: int,
    ):
        self.graph = graph
        self.trained = trained
        self.calib = calib
        self.loss_function = LOSSES[loss]
        self.loss_output = loss_output
        self.batch_size = batch_size
        # Class indices as int64, what cross_entropy takes; float targets in the output's dtype.
        self.classes = loss == "cross_entropy"
        self.target_dtype = torch.int64 if self.classes else output_dtype

    def fit(
        self,
        rows: _Rows,
        epochs: int,
        learning_rate: float,
        generator: torch.Generator,
        progress: Progress | None,
    ) -> _History:
        parameters = [p for t in self.trained for p in t.parameters()]
        optimizer = torch.optim.Adam(parameters, lr=learning_rate)
        validate = len(rows.validation) > 0
        history = _History([None], [], 0, *self._snapshot())
        if validate:
            history.validation_loss.append(self.mean_loss(rows.validation))
        for epoch in range(1, epochs + 1):
            order = rows.train[torch.randperm(len(rows.train), generator=generator).numpy()]
            task = f"finetune epoch {epoch}/{epochs}"
            history.train_loss.append(self.train_epoch(order, optimizer, task, progress))
            if not math.isfinite(history.train_loss[-1]):
                raise UsageError(
                    f"--lr {learning_rate}: training diverged in epoch {epoch} (loss "
                    f"{history.train_loss[-1]}); nothing was written; try a smaller --lr"
                )
            if validate:
                history.validation_loss.append(self.mean_loss(rows.validation))
            if not validate or history.validation_loss[-1] < min(history.validation_loss[:-1]):
                history.best_epoch = epoch
                history.weights, history.biases = self._snapshot()
        return history

    def train_epoch(
        self,
        order: np.ndarray,
        optimizer: torch.optim.Optimizer,
        task: str,
        progress: Progress | None,
    ) -> float:
        """One pass over the training rows in `order`; the mean loss of its batches, by rows."""
        total, batches = 0.0, math.ceil(len(order) / self.batch_size)
        for done, (feeds, targets) in enumerate(self._batches(order), start=1):
            output = self.graph(feeds, grad=True)[self.loss_output]
            loss = self.loss_function(output, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for t in self.trained:
                    t.weight.mul_(t.keep)
            total += float(loss.detach()) * len(targets)
            if progress is not None:
                progress(task, done, batches)
        return total / len(order)

    def mean_loss(self, indices: np.ndarray) -> float:
        """The loss over the rows `indices`, without training."""
        total = 0.0
        for feeds, targets in self._batches(indices):
            output = self.graph(feeds)[self.loss_output]
            total += float(self.loss_function(output, targets)) * len(targets)
        return total / len(indices)

    def _batches(self, indices: np.ndarray) -> Iterator[tuple[dict[str, np.ndarray], torch.Tensor]]:
        for start in range(0, len(indices), self.batch_size):
            chosen = indices[start : start + self.batch_size]
            feeds = {name: array[chosen] for name, array in self.calib.arrays.items()}
            # Through int64/float64 numpy: torch lacks some unsigned and float types of numpy.
            targets = self.calib.labels[chosen].astype(np.int64 if self.classes else np.float64)
            yield feeds, torch.from_numpy(targets).to(self.graph.device, self.target_dtype)

    def _snapshot(self) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
        weights = [_to_numpy(t.weight) for t in self.trained]
        biases = [None if t.bias is None else _to_numpy(t.bias) for t in self.trained]
        return weights, biases


def _to_numpy(parameter: torch.Tensor) -> np.ndarray:
    return parameter.detach().cpu().numpy().astype(np.float64)
