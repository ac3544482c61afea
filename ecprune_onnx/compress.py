"""`compress()`: the data path of DESIGN.md from a model file to a pruned model file.

layers → calib → instrument (+ parity check) → stats → scores → masks → bias shifts →
rewrite → save → measured deviation. Returns a `CompressResult`; prints nothing.
"""

from __future__ import annotations

import fnmatch
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from ecprune_onnx import modelio
from ecprune_onnx.calib import CalibData, input_specs, load_calib
from ecprune_onnx.errors import UsageError
from ecprune_onnx.instrument import (
    TorchGraph,
    check_parity,
    choose_outputs,
    instrument,
    resolve_device,
    with_outputs,
)
from ecprune_onnx.layers import DenseLayer, SkippedNode, find_dense_layers
from ecprune_onnx.masks import SCOPES, check_ratio, choose_masks, parse_pattern
from ecprune_onnx.rewrite import rewrite
from ecprune_onnx.runtime import open_session, run_batches
from ecprune_onnx.scores import METHODS, bias_shift, predicted_damage
from ecprune_onnx.stats import LayerStats, collect_stats

# progress(task, done, total): the CLI draws bars from it.
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class LayerReport:
    name: str
    shape: tuple[int, int]
    weights: int
    removed: int
    sparsity: float
    predicted_damage: float | None
    bias_shift_norm: float


@dataclass(frozen=True)
class CompressResult:
    """What compress did: per layer, and predicted vs measured output deviation.

    Deviations are sums over the calibration set of the squared deviation of all output
    elements (the unit of METHOD.md's damage); `measured_mse` is their mean per element.
    """

    model: str
    output: str
    method: str
    ratio: float
    scope: str
    pattern: str | None
    compensate: bool
    layers: list[LayerReport]
    skipped: list[SkippedNode]
    excluded: list[str]
    outputs: list[str]
    calib_rows: int
    probes: str | None
    device: str
    parity_deviation: float | None
    predicted_deviation: float | None
    measured_deviation: float | None
    measured_mse: float | None
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def sparsity(self) -> float:
        weights = sum(layer.weights for layer in self.layers)
        return sum(layer.removed for layer in self.layers) / weights if weights else 0.0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["sparsity"] = self.sparsity
        return data


def compress(
    model: str | os.PathLike,
    calib: str | os.PathLike | None,
    ratio: float | None = None,
    *,
    labels: str | None = None,
    output: str | os.PathLike | None = None,
    method: str = "ec",
    scope: str = "global",
    pattern: str | None = None,
    exclude: Sequence[str] = (),
    outputs: Sequence[str] = (),
    probes: int = 16,
    batch_size: int = 256,
    device: str = "auto",
    seed: int = 0,
    compensate: bool | None = None,
    scores: Mapping[str, np.ndarray] | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> CompressResult:
    """Prune the dense layers of `model` and write the result; see DESIGN.md for options.

    `scores` (research use, e.g. a benchmark's own criterion): importances by layer name,
    shaped like each layer's effective [out, in] weight, used instead of the method's.
    """
    started = time.perf_counter()
    options = _check_options(ratio, method, scope, pattern, probes, batch_size, compensate)
    ratio, keep_pattern, compensate = options
    output = modelio.check_output_path(model, output or modelio.default_output_path(model), force)
    onnx_model = modelio.load_model(model)
    scan = find_dense_layers(onnx_model)
    layers, excluded = _apply_exclusions(scan.layers, exclude)
    if not layers:
        raise UsageError(_no_layer_message(model, scan.skipped, excluded))
    y_names = choose_outputs(onnx_model, outputs)
    needs_data = METHODS[method].needs_calibration or compensate
    if needs_data and calib is None:
        raise UsageError(f"--method {method} needs calibration data: pass --calib NPZ")
    if METHODS[method].needs_labels and labels is None:
        raise UsageError(
            f"--method {method} needs labels: pass --labels KEY naming the labels array "
            "of the calibration NPZ"
        )
    data = None
    if calib is not None:
        data = load_calib(calib, input_specs(onnx_model), labels if needs_labels(method) else None)

    torch_device = resolve_device(device)
    stats, probe_label, parity = {}, None, None
    if data is not None:
        stats, probe_label, parity = _statistics(
            onnx_model, layers, y_names, data, probes, batch_size, torch_device, seed, progress
        )
    if scores is None:
        scores = _method_scores(layers, stats, method, seed)
    masks = choose_masks(_checked_scores(scores, layers), ratio, scope, keep_pattern)
    shifts = _bias_shifts(layers, stats, masks, compensate)
    pruned = rewrite(onnx_model, layers, masks, shifts)
    onnx.checker.check_model(pruned)  # a failure here is our bug, not the user's: traceback
    modelio.save_model(pruned, output, external_data=modelio.file_uses_external_data(model))

    reports = [
        _layer_report(layer, masks[layer.name], shifts, stats, compensate) for layer in layers
    ]
    measured = _measured_deviation(model, output, y_names, data, batch_size, progress)
    predicted = _sum_or_none([report.predicted_damage for report in reports]) if stats else None
    return CompressResult(
        model=str(model),
        output=str(output),
        method=method,
        ratio=float(1 - keep_pattern[0] / keep_pattern[1]) if keep_pattern else ratio,
        scope="pattern" if keep_pattern else scope,
        pattern=pattern,
        compensate=compensate,
        layers=reports,
        skipped=scan.skipped,
        excluded=excluded,
        outputs=y_names,
        calib_rows=data.rows if data is not None else 0,
        probes=probe_label,
        device=str(torch_device),
        parity_deviation=parity,
        predicted_deviation=predicted,
        measured_deviation=measured[0] if measured else None,
        measured_mse=measured[1] if measured else None,
        seconds=time.perf_counter() - started,
    )


def needs_labels(method: str) -> bool:
    return METHODS[method].needs_labels


def _check_options(ratio, method, scope, pattern, probes, batch_size, compensate):
    """Validate the options before any file is read; returns (ratio, pattern, compensate)."""
    if method not in METHODS:
        raise UsageError(f"--method {method}: expected one of {', '.join(METHODS)}")
    if scope not in SCOPES:
        raise UsageError(f"--scope {scope}: expected one of {', '.join(SCOPES)}")
    keep_pattern = parse_pattern(pattern)
    if ratio is None and keep_pattern is None:
        raise UsageError("--ratio is required (or give --pattern N:M)")
    if ratio is not None and keep_pattern is not None:
        implied = 1 - keep_pattern[0] / keep_pattern[1]
        if abs(ratio - implied) > 1e-9:
            raise UsageError(
                f"--ratio {ratio} contradicts --pattern {pattern} (which removes {implied:g}); "
                "give one of them"
            )
    ratio = check_ratio(ratio if ratio is not None else 0.0)
    if probes < 1:
        raise UsageError(f"--probes {probes}: expected a whole number >= 1")
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: expected a whole number >= 1")
    if compensate is None:
        compensate = METHODS[method].compensates_by_default
    return ratio, keep_pattern, compensate


def _apply_exclusions(
    layers: list[DenseLayer], patterns: Sequence[str]
) -> tuple[list[DenseLayer], list[str]]:
    """Drop layers whose node, weight or output name matches an --exclude glob."""
    kept, excluded = [], []
    for layer in layers:
        names = (layer.name, layer.weight_name, layer.output_name)
        matched = any(fnmatch.fnmatchcase(name, glob) for glob in patterns for name in names)
        (excluded if matched else kept).append(layer if not matched else layer.name)
    return kept, excluded


def _no_layer_message(model, skipped: list[SkippedNode], excluded: list[str]) -> str:
    details = [f"{node.node}: {node.reason}" for node in skipped[:3]]
    if excluded:
        details.append(f"{len(excluded)} excluded by --exclude")
    suffix = f" ({'; '.join(details)})" if details else ""
    return f"{model}: no prunable dense layer (Gemm or MatMul with an initializer weight){suffix}"


def _statistics(onnx_model, layers, y_names, data, probes, batch_size, device, seed, progress):
    """Instrument, check the conversion on the first batch, then stream all batches."""
    instrumented, roles = instrument(onnx_model, layers, y_names)
    graph = TorchGraph(instrumented, device)
    parity = check_parity(graph, next(data.batches(batch_size)))
    done = 0

    def advance(rows: int) -> None:
        nonlocal done
        done += rows
        if progress is not None:
            progress("calibrate", done, data.rows)

    labels = data.label_batches(batch_size) if data.labels is not None else None
    stats, plan = collect_stats(
        graph, roles, layers, data.batches(batch_size), probes, seed, advance, labels
    )
    return stats, plan.label, parity


def _method_scores(layers, stats, method, seed) -> dict[str, np.ndarray]:
    """Every layer's importances by the method's score function (METHODS)."""
    score = METHODS[method].score
    return {
        layer.name: score(layer.weight, stats.get(layer.name), np.random.default_rng([seed, i]))
        for i, layer in enumerate(layers)
    }


def _checked_scores(scores, layers) -> dict[str, np.ndarray]:
    """Precomputed scores must cover every layer with its weight's shape."""
    checked = {}
    for layer in layers:
        if layer.name not in scores:
            raise UsageError(f"scores: no importances for layer '{layer.name}'")
        array = np.asarray(scores[layer.name], dtype=np.float64)
        if array.shape != layer.shape:
            raise UsageError(
                f"scores: layer '{layer.name}' has shape {list(array.shape)}, "
                f"expected {list(layer.shape)}"
            )
        checked[layer.name] = array
    return checked


def _bias_shifts(layers, stats, masks, compensate) -> dict[str, np.ndarray]:
    """δ of METHOD.md for each layer's mask; zero without compensation or statistics."""
    shifts = {}
    for layer in layers:
        layer_stats = stats.get(layer.name)
        if compensate and layer_stats is not None:
            keep = masks[layer.name]
            shifts[layer.name] = bias_shift(layer.weight, keep, layer_stats.s0, layer_stats.s1)
        else:
            shifts[layer.name] = np.zeros(layer.out_features)
    return shifts


def _layer_report(
    layer: DenseLayer,
    keep: np.ndarray,
    shifts: dict[str, np.ndarray],
    stats: dict[str, LayerStats],
    compensate: bool,
) -> LayerReport:
    layer_stats = stats.get(layer.name)
    damage = None
    if layer_stats is not None:
        damage = predicted_damage(layer.weight, keep, layer_stats, compensate)
    removed = int((~keep).sum())
    return LayerReport(
        name=layer.name,
        shape=layer.shape,
        weights=keep.size,
        removed=removed,
        sparsity=removed / keep.size,
        predicted_damage=damage,
        bias_shift_norm=float(np.linalg.norm(shifts[layer.name])),
    )


def _measured_deviation(model, output, y_names, data: CalibData | None, batch_size, progress):
    """Run both files in onnxruntime on the calibration set: (sum of squares, mean square)."""
    if data is None:
        return None
    results = []
    for task, path in (("measure original", model), ("measure pruned", output)):
        session = open_session(with_outputs(modelio.load_model(path), y_names))
        done = 0

        def advance(rows: int, task=task) -> None:
            nonlocal done
            done += rows
            if progress is not None:
                progress(task, done, data.rows)

        results.append(run_batches(session, data.batches(batch_size), y_names, progress=advance))
    original, pruned = results
    squares = sum(
        float(np.square(pruned[n].astype(np.float64) - original[n].astype(np.float64)).sum())
        for n in y_names
    )
    elements = sum(original[n].size for n in y_names)
    return squares, squares / max(elements, 1)


def _sum_or_none(values: list[float | None]) -> float | None:
    return None if any(value is None for value in values) else float(sum(values))
