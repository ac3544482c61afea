"""Layer-input passes: stream the calibration set through the original and the pruned-so-far
model (onnxruntime) and sum a layer's input statistics for its refit (sequential.py):
C_pp = Σ ã_p ã_p^T and, as asked, C_op = Σ ã_o ã_p^T or W C_op (docs/method.md,
"Reconstruction: from EC to OBS"). Only sums are kept, never the activations; what one
pass keeps for a later one is on disk (taps.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from ecprune_onnx.blockwise import add_gram, add_outer, add_product, row_blocks
from ecprune_onnx.calib import CalibData
from ecprune_onnx.layers import DenseLayer
from ecprune_onnx.taps import OutputRecord, ProductWeight, TapReader, TapRecord, digest

# Rows of layer inputs gathered for one product of the [in, in] sums (`_CrossSum`).
CHUNK_ROWS = 1024


@dataclass
class LayerInputs:
    """Sums over the calibration rows of a layer's inputs in the original (o) and the
    pruned-so-far (p) model: C_pp = Σ ã_p ã_p^T (centred) and, as `layer_inputs` was
    asked, C_op = Σ ã_o ã_p^T [in, in] or W C_op = Σ (W ã_o) ã_p^T [out, in].

    Not frozen: ecr's refit drops the cross sum once W* is computed and C_pp once its
    factor is made (sequential.py), the largest arrays left that the solve does not need."""

    centred_pp: np.ndarray
    centred_op: np.ndarray | None
    mean_pruned: np.ndarray
    mean_original: np.ndarray
    rows: int
    weighted_op: np.ndarray | None = None
    unchanged: bool = False  # both models gave the layer the same input, bit for bit

    @property
    def gram(self) -> np.ndarray:
        """H = Σ a_p a_p^T, uncentred (the rivals' H), made when asked for."""
        return self.centred_pp + self.rows * np.outer(self.mean_pruned, self.mean_pruned)


def layer_inputs(
    original: onnx.ModelProto,
    current: onnx.ModelProto,
    layer: DenseLayer,
    data: CalibData,
    batch_size: int,
    cross: str | None = "full",
    *,
    record: OutputRecord | None = None,
    recorded: OutputRecord | None = None,
    carried: TapRecord | None = None,
    keep: TapRecord | None = None,
    original_held: Mapping[str, np.ndarray] | None = None,
    current_held: Mapping[str, np.ndarray] | None = None,
) -> LayerInputs:
    """Stream the calibration set through both models (onnxruntime) and sum the layer's
    input statistics; only sums are kept, never the activations.

    `cross`: "full" sums C_op [in, in]; "weighted" sums W C_op [out, in] from the original
    layer's outputs W ã_o, what ecr's refit needs (`cross_mode`); None neither (the rivals'
    H is C_pp alone). `record` keeps the current model's layer outputs for a later call's
    `recorded`, which then reads them instead of running the original model up to the layer
    ("weighted" only). `carried` is an earlier tap of `current` that its session may start
    from, and `keep` receives this pass's taps of `current` (taps.TapReader).
    `original_held`, `current_held`: the values of each model's hollow weights (held.py).

    Each batch's products are in the activations' precision and added to float64 sums, as
    the statistics' are (stats._product_dtype: float32 GEMMs run ~2x faster on the CPU and
    round each batch at ~1e-7)."""
    same = original is current or layer.input_name in {v.name for v in original.graph.input}
    side = _original_side(original, original_held, layer, cross, same, recorded)
    reader = TapReader(current, layer, carried, keep, held=current_held)
    size = layer.in_features
    pp = _CrossSum(size, size)
    op = None if same or cross is None else _CrossSum(side.width, size)
    total_p, rows, unchanged = np.zeros(size), 0, True
    for feeds in data.batches(batch_size):
        a_p = reader.read(feeds)
        left, equal = side.read(feeds, a_p)
        unchanged = unchanged and equal
        pp.add(a_p, a_p)
        if op is not None:
            op.add(left, a_p)
        if record is not None:
            record.write(a_p)
        total_p += a_p.sum(0, dtype=np.float64)
        rows += len(a_p)
    if record is not None:
        record.input_sum = total_p
    mean_p = total_p / rows
    mean_o = mean_p if same else side.input_sum / rows
    centred_pp = add_outer(pp.result(), -rows * mean_p, mean_p)
    centred_cross = None
    if op is not None:
        centred_cross = add_outer(op.result(), -side.left_sum, mean_p)
    return LayerInputs(
        centred_pp=centred_pp,
        centred_op=(centred_pp if same else centred_cross) if cross == "full" else None,
        mean_pruned=mean_p,
        mean_original=mean_o,
        rows=rows,
        weighted_op=centred_cross if cross == "weighted" else None,
        unchanged=same or unchanged,
    )


def cross_mode(layer: DenseLayer, rows: int) -> str:
    """The cheaper cross sum for ecr's refit W* = W C_op (C_pp + λ)^-1, in multiply-adds
    with float64 at twice float32's cost: "weighted" makes W ã_o and sums it against ã_p,
    2 · rows · out · in; "full" sums C_op (rows · in²) and then multiplies W C_op in float64
    (2 · out · in²). At 7069 inputs and outputs and 4096 rows "weighted" is half the work
    and an [in, in] array less; a layer with 4 times more outputs than inputs (a
    transformer's FFN up projection) over many rows is cheaper "full"."""
    out_features, in_features = layer.shape
    weighted = 2 * rows * out_features * in_features
    full = rows * in_features**2 + 4 * out_features * in_features**2
    return "weighted" if weighted <= full else "full"


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
    (a, a) of another sum over the same batches (`quantize.anchored_refit` tells an
    unchanged input by C_op equal to C_pp)."""

    def __init__(self, rows: int, columns: int):
        self.total = np.zeros((rows, columns))
        self.left: list[np.ndarray] = []
        self.right: list[np.ndarray] = []
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        if a.dtype == np.float64:
            self._add_product(a, b)
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
        # centred in place: the concatenations are this chunk's own (the same bits as a copy)
        centre_a = a.mean(0)
        x = np.subtract(a, centre_a, out=a)
        if symmetric:
            centre_b, y = centre_a, x
        else:
            centre_b = b.mean(0)
            y = np.subtract(b, centre_b, out=b)
        self._add_product(x, y)
        centre_a, centre_b = centre_a.astype(np.float64), centre_b.astype(np.float64)
        self.left += [x.sum(0, dtype=np.float64) + len(a) * centre_a, centre_a]
        self.right += [centre_b, y.sum(0, dtype=np.float64)]

    def _add_product(self, a: np.ndarray, b: np.ndarray) -> None:
        """total += a^T b a block at a time (blockwise): the whole product would be one more
        [in, in] array. a^T a the same way for every sum, so an unchanged input still gives
        C_op equal to C_pp bit for bit."""
        if a is b:
            add_gram(self.total, a)
        else:
            add_product(self.total, a, b)

    def result(self) -> np.ndarray:
        self._add_pending()
        if self.left:
            left, right = np.stack(self.left), np.stack(self.right)
            for rows in row_blocks(len(self.total)):  # no [in, in] temporary
                self.total[rows] += left[:, rows].T @ right
            self.left, self.right = [], []
        return self.total


def _original_side(original, held, layer, cross, same, recorded):
    """Where a pass gets the original model's side of the layer's input (see the classes)."""
    if same:
        return _SameInput()
    if recorded is not None:
        return _RecordedOutputs(recorded)
    return _TappedInput(original, held, layer, weighted=cross == "weighted")


class _SameInput:
    """Both models give the layer the same input (one model, or an input of the graph)."""

    width = 0
    input_sum = left_sum = None

    def read(self, feeds, a_p):
        return a_p, True


class _TappedInput:
    """The original model's input a_o to the layer, read by a session of its own; the left
    factor of the cross sum is a_o itself or the layer's output W a_o (`weighted`)."""

    def __init__(self, original: onnx.ModelProto, held, layer: DenseLayer, weighted: bool):
        self.reader = TapReader(original, layer, held=held)
        self.weight = ProductWeight(layer.compact_weight) if weighted else None
        self.width = layer.out_features if weighted else layer.in_features
        self.input_sum = self.left_sum = 0.0

    def read(self, feeds, a_p) -> tuple[np.ndarray, bool]:
        a_o = self.reader.read(feeds)
        equal = np.array_equal(a_o, a_p)
        if equal:  # the same sums bit for bit (add_gram's syrk blocks round unlike a GEMM)
            a_o = a_p
        self.input_sum = self.input_sum + a_o.sum(0, dtype=np.float64)
        left = a_o if self.weight is None else self.weight.outputs(a_o)
        self.left_sum = self.left_sum + left.sum(0, dtype=np.float64)
        return left, equal


class _RecordedOutputs:
    """The original layer's outputs W a_o from an `OutputRecord`, batch by batch; the input is
    unchanged where the pruned model's has the recorded one's digest."""

    def __init__(self, record: OutputRecord):
        self.batches = record.read()
        self.width = record.width
        self.input_sum = record.input_sum
        self.left_sum = 0.0

    def read(self, feeds, a_p) -> tuple[np.ndarray, bool]:
        left, recorded = next(self.batches)
        self.left_sum = self.left_sum + left.sum(0, dtype=np.float64)
        return left, recorded == digest(a_p)
