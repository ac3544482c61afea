"""Compare an original and a pruned model on held-out data.

Both files run in onnxruntime on the same batches; the result holds the deviation of every
output, the task metric (accuracy or MSE against labels), the sparsity of the pruned dense
layers, the size of both models (parameters, FLOPs per sample, file bytes), side-by-side
latency at batch 1 and at the evaluation batch with its spread, and the quality gates.
Nothing here prints.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import onnxruntime

from ecprune_onnx.calib import CalibData, input_specs, load_calib
from ecprune_onnx.errors import UsageError
from ecprune_onnx.footprint import file_sizes
from ecprune_onnx.layers import DenseLayer, find_dense_layers
from ecprune_onnx.modelio import copy_with_empty_initializers, file_size, load_model
from ecprune_onnx.runtime import open_session, run_batches, tensor_output_names

# Each timed sample is a block of runs lasting at least this long: a small model runs in
# tens of microseconds, where single timings scatter by ±30% (seen on the sample).
_MIN_SAMPLE_SECONDS = 0.002
# Runs per session before timing: the first runs allocate memory and pick kernels.
_WARMUP_RUNS = 3
# Timed pairs taken even past the budget: fewer give no quartiles worth the name.
_MIN_PAIRS = 5
# Seconds of latency measurement by default, shared by batch 1 and the evaluation batch.
DEFAULT_LATENCY_BUDGET = 4.0

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class OutputDeviation:
    """How far one output of the pruned model is from the original's.

    relative = ||pruned - original||_2 / ||original||_2 (0 when both are 0).
    """

    name: str
    mse: float
    max_abs: float
    relative: float


@dataclass(frozen=True)
class LayerSparsity:
    """Zeroed weights of one dense layer of the pruned model."""

    name: str
    shape: tuple[int, int]
    zeros: int
    sparsity: float


@dataclass(frozen=True)
class GateResult:
    """One quality gate: `value` checked against `threshold`."""

    name: str
    threshold: float
    value: float
    passed: bool


@dataclass(frozen=True)
class ModelFootprint:
    """How big one model is.

    parameters: elements of every initializer of the graph (dense weights and biases, and any
    other stored constant, e.g. a PRelu slope or a Reshape's shape; Constant nodes aside).
    flops_per_sample: 2 · Σ in · out over the dense layers (one multiply and one add per
    weight) for one row of their input: a sample of a 2-D model, a position of a sequence
    model. Biases, activations and other per-unit ops add O(Σ out), left out as negligible.
    file_bytes: the .onnx file plus its external data files; gzip_bytes: the same after
    gzip -9 (footprint.py), where quantized codes and pruned zeros show.
    """

    parameters: int
    flops_per_sample: int
    file_bytes: int
    gzip_bytes: int | None = None


@dataclass(frozen=True)
class Latency:
    """Milliseconds per run of one model: median and quartiles over the timed samples."""

    median_ms: float
    q1_ms: float
    q3_ms: float


@dataclass(frozen=True)
class LatencyComparison:
    """Both models timed at one batch size, their runs interleaved.

    ratio: the median over the timed pairs of pruned / original, each pair run back to back
    (below 1: the pruned model is faster); ratio_q1 / ratio_q3: its quartiles.
    within_noise: the two models' interquartile ranges overlap, so the ratio is not a
    difference this measurement can tell from the machine's noise.
    """

    batch: int
    original: Latency
    pruned: Latency
    pairs: int
    ratio: float
    ratio_q1: float
    ratio_q3: float

    @property
    def within_noise(self) -> bool:
        return self.pruned.q1_ms <= self.original.q3_ms and self.original.q1_ms <= self.pruned.q3_ms


@dataclass(frozen=True)
class EvaluateResult:
    """Everything `evaluate` measured; `passed` is False when any gate failed.

    latency: batch 1, then `latency_batch` rows (the evaluation batch); empty when the
    latency budget was 0.
    """

    outputs: list[OutputDeviation]
    task_output: str
    top1_agreement: float | None
    metric: str | None
    metric_original: float | None
    metric_pruned: float | None
    layers: list[LayerSparsity]
    size_original: int
    size_pruned: int
    latency: list[LatencyComparison]
    latency_batch: int
    provider: str
    gates: list[GateResult]
    footprint_original: ModelFootprint
    footprint_pruned: ModelFootprint

    @property
    def passed(self) -> bool:
        return all(gate.passed for gate in self.gates)

    def to_dict(self) -> dict:
        """Plain JSON-ready data; NaN and infinities become None (strict JSON has neither)."""
        data = asdict(self)
        for comparison, row in zip(self.latency, data["latency"]):
            row["within_noise"] = comparison.within_noise
        return _json_ready({**data, "passed": self.passed})


@dataclass(frozen=True)
class _TaskMetric:
    name: str | None
    original: float | None
    pruned: float | None


def evaluate(
    original: str | os.PathLike,
    pruned: str | os.PathLike,
    data: str | os.PathLike,
    labels: str | None = None,
    *,
    output: str | None = None,
    max_mse: float | None = None,
    min_accuracy: float | None = None,
    max_accuracy_drop: float | None = None,
    batch_size: int = 256,
    latency_budget: float = DEFAULT_LATENCY_BUDGET,
    device: str = "auto",
    progress: Progress | None = None,
    batch_axes: Mapping[str, int | None] | None = None,
) -> EvaluateResult:
    """Run both models on the NPZ `data` and compare them; `labels` names the labels array.

    output: the output the task metrics read (default: the first numeric tensor output).
    max_mse / min_accuracy / max_accuracy_drop: quality gates (None: not checked).
    latency_budget: seconds of latency timing at batch 1 and at `batch_size` together
    (0: no latency measured).
    progress(task, done, total) is called as batches (and latency pairs) finish.
    """
    _check_options(batch_size, latency_budget, max_mse, min_accuracy, max_accuracy_drop)
    original_model = load_model(original)
    pruned_model = load_model(pruned)
    _check_same_interface(original, original_model, pruned, pruned_model)
    held_out = load_calib(data, input_specs(original_model, batch_axes), labels)
    _check_accuracy_gates_have_labels(held_out.labels, min_accuracy, max_accuracy_drop)

    original_session = open_session(original, device)
    pruned_session = open_session(pruned, device)
    output_names = tensor_output_names(original_session)
    task_output = _task_output_name(output, output_names, _output_names(original_model))

    original_outputs = _run_held_out(
        original_session, held_out, output_names, batch_size, "evaluate original", progress
    )
    pruned_outputs = _run_held_out(
        pruned_session, held_out, output_names, batch_size, "evaluate pruned", progress
    )
    deviations = [
        output_deviation(name, original_outputs[name], pruned_outputs[name])
        for name in output_names
    ]
    metric = _task_metric(
        held_out.labels,
        labels,
        task_output,
        original_outputs[task_output],
        pruned_outputs[task_output],
    )
    first_batch = next(iter(held_out.batches(batch_size)))
    latency = _latencies(
        original_session, pruned_session, first_batch, output_names, latency_budget, progress
    )
    input_shapes = {name: array.shape[1:] for name, array in first_batch.items()}
    return EvaluateResult(
        outputs=deviations,
        task_output=task_output,
        top1_agreement=top1_agreement(original_outputs[task_output], pruned_outputs[task_output]),
        metric=metric.name,
        metric_original=metric.original,
        metric_pruned=metric.pruned,
        layers=[layer_sparsity(layer) for layer in find_dense_layers(pruned_model).layers],
        size_original=file_size(original),
        size_pruned=file_size(pruned),
        latency=latency,
        latency_batch=min(batch_size, held_out.rows),
        provider=original_session.get_providers()[0],
        gates=_gates(deviations, metric, max_mse, min_accuracy, max_accuracy_drop),
        footprint_original=model_footprint(original_model, original, input_shapes),
        footprint_pruned=model_footprint(pruned_model, pruned, input_shapes),
    )


def parameter_count(model: onnx.ModelProto) -> int:
    """Elements of every initializer (dims only: external data need not be read)."""
    return sum(math.prod(tensor.dims) for tensor in model.graph.initializer)


def dense_flops_per_sample(
    model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None
) -> int:
    """2 · Σ in · out · positions over the dense layers: a multiply and an add per weight at
    every position of one sample a layer runs at (a MatMul on a [batch, seq, in] activation
    runs seq times per sample). Positions come from onnx's shape inference with the graph
    inputs fixed to `input_shapes` (one sample's shape, batch dimension left out); a layer
    whose activation shape stays unknown counts once."""
    layers = find_dense_layers(model).layers
    shapes = _activation_shapes(model, [layer.input_name for layer in layers], input_shapes)
    return sum(
        2 * layer.in_features * layer.out_features * _positions(layer, shapes.get(layer.input_name))
        for layer in layers
    )


def _positions(layer: DenseLayer, shape: list[int | None] | None) -> int:
    """Rows of one sample a dense layer multiplies: the activation's dimensions other than
    the batch and the features (the features lead when a Gemm takes it transposed)."""
    if shape is None or len(shape) <= 2:
        return 1
    inner = shape[1:-1] if not layer.transpose_input else shape[2:]
    return math.prod(inner) if all(isinstance(size, int) for size in inner) else 1


def _activation_shapes(
    model: onnx.ModelProto,
    names: list[str],
    input_shapes: dict[str, tuple[int, ...]] | None,
) -> dict[str, list[int | None]]:
    """The inferred shape of each tensor in `names`, on a copy of the graph whose weights hold
    only their shape (no copy of the values, no 2 GB limit), its inputs fixed to one sample."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    copied = copy_with_empty_initializers(model, initializers)
    for value in copied.graph.input:
        sample_shape = (input_shapes or {}).get(value.name)
        if sample_shape is not None and value.type.HasField("tensor_type"):
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(list(dims)[1:], sample_shape):
                dim.dim_value = int(size)
    try:
        inferred = onnx.shape_inference.infer_shapes(copied)
    except Exception:  # a graph onnx cannot infer: each layer counts once
        return {}
    wanted, shapes = set(names), {}
    for value in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        if value.name in wanted and value.type.tensor_type.HasField("shape"):
            dims = value.type.tensor_type.shape.dim
            shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return shapes


def model_footprint(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
) -> ModelFootprint:
    return ModelFootprint(
        parameters=parameter_count(model),
        flops_per_sample=dense_flops_per_sample(model, input_shapes),
        file_bytes=file_size(path),
        gzip_bytes=file_sizes(path).gzip,
    )


def _check_options(
    batch_size: int,
    latency_budget: float,
    max_mse: float | None,
    min_accuracy: float | None,
    max_accuracy_drop: float | None,
) -> None:
    """Refuse option values that cannot mean anything, before any model is loaded."""
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: expected at least 1")
    if not latency_budget >= 0:  # NaN fails too
        raise UsageError(f"--latency-budget {latency_budget}: expected seconds >= 0 (0: skip)")
    if max_mse is not None and not max_mse >= 0:
        raise UsageError(f"--max-mse {max_mse}: expected a number >= 0")
    for flag, value in (
        ("--min-accuracy", min_accuracy),
        ("--max-accuracy-drop", max_accuracy_drop),
    ):
        if value is not None and not 0 <= value <= 1:
            raise UsageError(f"{flag} {value}: expected a fraction between 0 and 1")


def _input_names(model: onnx.ModelProto) -> list[str]:
    """Graph inputs the caller feeds (IR < 4 also lists initializers as inputs)."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    return [value.name for value in model.graph.input if value.name not in initializers]


def _output_names(model: onnx.ModelProto) -> list[str]:
    return [value.name for value in model.graph.output]


def _check_same_interface(
    original_path: str | os.PathLike,
    original_model: onnx.ModelProto,
    pruned_path: str | os.PathLike,
    pruned_model: onnx.ModelProto,
) -> None:
    """Both models must take the same inputs and give the same outputs, by name."""
    for kind, names_of in (("inputs", _input_names), ("outputs", _output_names)):
        expected, found = names_of(original_model), names_of(pruned_model)
        if set(expected) != set(found):
            missing = [name for name in expected if name not in found]
            unexpected = [name for name in found if name not in expected]
            raise UsageError(
                f"{os.fspath(pruned_path)}: its {kind} differ from those of "
                f"{os.fspath(original_path)} (missing {missing}, unexpected {unexpected})"
            )


def _is_class_labels(labels: np.ndarray | None) -> bool:
    return labels is not None and np.issubdtype(labels.dtype, np.integer)


def _check_accuracy_gates_have_labels(
    labels: np.ndarray | None, min_accuracy: float | None, max_accuracy_drop: float | None
) -> None:
    """Accuracy gates need integer class labels; say so before running anything."""
    for flag, threshold in (
        ("--min-accuracy", min_accuracy),
        ("--max-accuracy-drop", max_accuracy_drop),
    ):
        if threshold is not None and not _is_class_labels(labels):
            raise UsageError(f"{flag} needs --labels with integer class labels")


def _task_output_name(requested: str | None, tensor_names: list[str], all_names: list[str]) -> str:
    """The output the task metrics read: `requested`, or the first numeric tensor output."""
    if not tensor_names:
        raise UsageError(f"the model has no float or integer tensor output to compare: {all_names}")
    if requested is None:
        return tensor_names[0]
    if requested in tensor_names:
        return requested
    if requested in all_names:
        raise UsageError(
            f"--output {requested!r} is not a float or integer tensor; "
            f"expected one of {tensor_names}"
        )
    raise UsageError(f"--output {requested!r}: no such output; the model's outputs are {all_names}")


def _run_held_out(
    session: onnxruntime.InferenceSession,
    held_out: CalibData,
    output_names: list[str],
    batch_size: int,
    task: str,
    progress: Progress | None,
) -> dict[str, np.ndarray]:
    """All outputs of one model on the held-out rows, reporting rows done to `progress`."""
    rows_done = 0

    def advance(batch_rows: int) -> None:
        nonlocal rows_done
        rows_done += batch_rows
        progress(task, rows_done, held_out.rows)

    if progress is not None:
        progress(task, 0, held_out.rows)
    return run_batches(
        session,
        held_out.batches(batch_size),
        output_names,
        advance if progress else None,
        source=held_out.path,
    )


def output_deviation(name: str, original: np.ndarray, pruned: np.ndarray) -> OutputDeviation:
    """MSE, max |difference| and relative L2 error of `pruned` against `original` (float64)."""
    if original.shape != pruned.shape:
        raise UsageError(
            f"output {name!r}: the pruned model gives shape {pruned.shape}, "
            f"the original {original.shape}"
        )
    reference = original.astype(np.float64).ravel()
    difference = pruned.astype(np.float64).ravel() - reference
    if difference.size == 0:
        return OutputDeviation(name, 0.0, 0.0, 0.0)
    difference_norm = float(np.linalg.norm(difference))
    reference_norm = float(np.linalg.norm(reference))
    if reference_norm > 0:
        relative = difference_norm / reference_norm
    else:
        relative = 0.0 if difference_norm == 0 else math.inf
    return OutputDeviation(
        name=name,
        mse=float(np.mean(difference**2)),
        max_abs=float(np.max(np.abs(difference))),
        relative=relative,
    )


def _squeeze_trailing_ones(array: np.ndarray) -> np.ndarray:
    """[n, 1] → [n], [n, k, 1] → [n, k]; the batch dimension always stays."""
    while array.ndim > 1 and array.shape[-1] == 1:
        array = array[..., 0]
    return array


def predicted_classes(output: np.ndarray) -> np.ndarray | None:
    """Class predictions an output stands for, or None when it holds none.

    Float scores with a last dimension of at least 2: argmax over it. Integer outputs are
    class indices already (e.g. the `label` output of skl2onnx classifiers).
    """
    if np.issubdtype(output.dtype, np.integer):
        return _squeeze_trailing_ones(output)
    if output.ndim >= 2 and output.shape[-1] >= 2:
        return np.argmax(output, axis=-1)
    return None


def top1_agreement(original: np.ndarray, pruned: np.ndarray) -> float | None:
    """Share of predictions (argmax over the last axis) on which both models agree."""
    original_classes = predicted_classes(original)
    pruned_classes = predicted_classes(pruned)
    if original_classes is None or pruned_classes is None or original_classes.size == 0:
        return None
    return float(np.mean(original_classes == pruned_classes))


def _check_label_shape(
    labels_key: str | None, labels: np.ndarray, output_name: str, values: np.ndarray
) -> None:
    if labels.shape != values.shape:
        raise UsageError(
            f"labels {labels_key!r} have shape {labels.shape} but output {output_name!r} "
            f"gives {values.shape}; expected the same shape (trailing 1-dims aside)"
        )


def accuracy(
    labels_key: str | None, labels: np.ndarray, output_name: str, output: np.ndarray
) -> float:
    """Share of rows whose predicted class equals the integer label."""
    classes = predicted_classes(output)
    if classes is None:
        raise UsageError(
            f"labels {labels_key!r} are integer classes but output {output_name!r} has shape "
            f"{output.shape}; expected class scores [rows, classes] or class indices"
        )
    labels = _squeeze_trailing_ones(labels)
    _check_label_shape(labels_key, labels, output_name, classes)
    return float(np.mean(classes == labels))


def mean_squared_error(
    labels_key: str | None, labels: np.ndarray, output_name: str, output: np.ndarray
) -> float:
    """MSE between a regression output and float targets (float64)."""
    targets = _squeeze_trailing_ones(labels)
    predictions = _squeeze_trailing_ones(output)
    _check_label_shape(labels_key, targets, output_name, predictions)
    return float(np.mean((predictions.astype(np.float64) - targets.astype(np.float64)) ** 2))


def _task_metric(
    labels: np.ndarray | None,
    labels_key: str | None,
    output_name: str,
    original: np.ndarray,
    pruned: np.ndarray,
) -> _TaskMetric:
    """Accuracy for integer labels, MSE for float labels, nothing without labels."""
    if labels is None:
        return _TaskMetric(None, None, None)
    if _is_class_labels(labels):
        metric_name, metric = "accuracy", accuracy
    elif np.issubdtype(labels.dtype, np.floating):
        metric_name, metric = "mse", mean_squared_error
    else:
        raise UsageError(
            f"labels {labels_key!r} have dtype {labels.dtype}; "
            "expected integer class labels or float targets"
        )
    return _TaskMetric(
        metric_name,
        metric(labels_key, labels, output_name, original),
        metric(labels_key, labels, output_name, pruned),
    )


def _latencies(
    original: onnxruntime.InferenceSession,
    pruned: onnxruntime.InferenceSession,
    batch: dict[str, np.ndarray],
    output_names: list[str],
    budget_seconds: float,
    progress: Progress | None,
) -> list[LatencyComparison]:
    """Batch 1 and the evaluation batch, each given half of the budget; none for 0."""
    if budget_seconds == 0:
        return []
    one_row = {name: array[:1] for name, array in batch.items()}
    half = budget_seconds / 2
    return [
        measure_latency(
            original, pruned, one_row, output_names, half, progress, "latency, batch 1"
        ),
        measure_latency(original, pruned, batch, output_names, half, progress),
    ]


def measure_latency(
    original: onnxruntime.InferenceSession,
    pruned: onnxruntime.InferenceSession,
    batch: dict[str, np.ndarray],
    output_names: list[str],
    budget_seconds: float,
    progress: Progress | None = None,
    task: str = "measure latency",
) -> LatencyComparison:
    """Milliseconds per run of each session on the same batch, runs interleaved, for about
    `budget_seconds` (at least `_MIN_PAIRS` pairs).

    Interleaving (and swapping which goes first every pair) exposes both models to the
    same machine state, so load from elsewhere or clock changes do not favour either, and
    each pair's ratio compares runs seconds apart. Each timed sample is a block of runs
    lasting about `_MIN_SAMPLE_SECONDS`.
    """
    sessions = {"original": original, "pruned": pruned}
    runs = max(_runs_per_sample(session, batch, output_names) for session in sessions.values())
    milliseconds: dict[str, list[float]] = {"original": [], "pruned": []}
    started = time.perf_counter()
    budget_ms = max(1, round(budget_seconds * 1000))
    while True:
        pair = len(milliseconds["original"])
        order = ("original", "pruned") if pair % 2 == 0 else ("pruned", "original")
        for which in order:
            begin = time.perf_counter()
            for _ in range(runs):
                sessions[which].run(output_names, batch)
            milliseconds[which].append((time.perf_counter() - begin) * 1000.0 / runs)
        spent_ms = round((time.perf_counter() - started) * 1000)
        if progress is not None:
            progress(task, min(spent_ms, budget_ms), budget_ms)
        if spent_ms >= budget_ms and pair + 1 >= _MIN_PAIRS:
            break
    return _comparison(len(next(iter(batch.values()))), milliseconds)


def _runs_per_sample(
    session: onnxruntime.InferenceSession, batch: dict[str, np.ndarray], output_names: list[str]
) -> int:
    """Warm the session up, then count the runs that fill `_MIN_SAMPLE_SECONDS`."""
    for _ in range(_WARMUP_RUNS):
        start = time.perf_counter()
        session.run(output_names, batch)
        elapsed = time.perf_counter() - start
    return max(1, math.ceil(_MIN_SAMPLE_SECONDS / max(elapsed, 1e-9)))


def _comparison(rows: int, milliseconds: dict[str, list[float]]) -> LatencyComparison:
    original, pruned = (np.asarray(milliseconds[key]) for key in ("original", "pruned"))
    ratios = pruned / original
    return LatencyComparison(
        batch=rows,
        original=_quartiles(original),
        pruned=_quartiles(pruned),
        pairs=len(ratios),
        ratio=float(np.median(ratios)),
        ratio_q1=float(np.percentile(ratios, 25)),
        ratio_q3=float(np.percentile(ratios, 75)),
    )


def _quartiles(milliseconds: np.ndarray) -> Latency:
    q1, median, q3 = np.percentile(milliseconds, [25, 50, 75])
    return Latency(median_ms=float(median), q1_ms=float(q1), q3_ms=float(q3))


def layer_sparsity(layer: DenseLayer) -> LayerSparsity:
    """How many weights of a dense layer are exactly zero."""
    zeros = int(np.count_nonzero(layer.compact_weight == 0))
    out_features, in_features = layer.shape
    return LayerSparsity(
        name=layer.name,
        shape=(int(out_features), int(in_features)),
        zeros=zeros,
        sparsity=zeros / layer.compact_weight.size if layer.compact_weight.size else 0.0,
    )


def _gates(
    deviations: list[OutputDeviation],
    metric: _TaskMetric,
    max_mse: float | None,
    min_accuracy: float | None,
    max_accuracy_drop: float | None,
) -> list[GateResult]:
    """The quality gates asked for, each with the value it checked."""
    gates = []
    if max_mse is not None:
        for deviation in deviations:
            gates.append(
                GateResult(
                    f"max_mse[{deviation.name}]", max_mse, deviation.mse, deviation.mse <= max_mse
                )
            )
    # The accuracy gates were checked to have integer labels, so metric is accuracy here.
    if min_accuracy is not None:
        gates.append(
            GateResult("min_accuracy", min_accuracy, metric.pruned, metric.pruned >= min_accuracy)
        )
    if max_accuracy_drop is not None:
        drop = metric.original - metric.pruned
        gates.append(
            GateResult("max_accuracy_drop", max_accuracy_drop, drop, drop <= max_accuracy_drop)
        )
    return gates


def _json_ready(value: object) -> object:
    """Recursively: tuples to lists, numpy scalars to Python numbers, non-finite floats to None."""
    if isinstance(value, dict):
        return {str(key): _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
