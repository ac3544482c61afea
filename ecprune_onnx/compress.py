"""`compress()`: the data path of docs/design.md from a model file to a pruned model file.

layers → calib → instrument (+ parity check) → stats → scores → masks → bias shifts →
rewrite → save → measured deviation. Returns a `CompressResult`; prints nothing.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import onnx

from ecprune_onnx import modelio, qformat, qtables
from ecprune_onnx.budget import MEASURED_MAX_WEIGHTS as MEASURED_MAX
from ecprune_onnx.budget import LayerDamage, measured_masks
from ecprune_onnx.calib import CalibData, input_specs, load_calib
from ecprune_onnx.errors import UsageError, temporary_space
from ecprune_onnx.footprint import FileSizes, file_sizes
from ecprune_onnx.grouping import StatsPlan, collect_in_groups, plan_groups
from ecprune_onnx.groups import SkippedGroup
from ecprune_onnx.heads import find_unit_groups
from ecprune_onnx.held import filled, held_weights, hollowed
from ecprune_onnx.instrument import (
    Parity,
    TorchGraph,
    check_parity,
    choose_outputs,
    float_outputs,
    instrument,
    resolve_device,
    softmax_input,
    with_outputs,
)
from ecprune_onnx.layers import DenseLayer, SkippedNode, find_dense_layers
from ecprune_onnx.masks import choose_masks, parse_pattern
from ecprune_onnx.neurons import Calibration, prune_neurons
from ecprune_onnx.normalize import normalize
from ecprune_onnx.options import (
    BUDGETS,
    DEFAULT_WEIGHT_METHOD,
    SCOPES,
    STRUCTURES,
    check_max_memory,
    check_method,
    check_ratio,
    default_method,
)
from ecprune_onnx.qsequential import quantize_layers
from ecprune_onnx.quantize import QuantSpec
from ecprune_onnx.rewrite import rewrite
from ecprune_onnx.runtime import open_session, run_batches, tensor_output_names
from ecprune_onnx.scores import (
    METHODS,
    bias_shift,
    damage_method,
    damage_scores,
    floor_sensitivity,
    predicted_damage,
)
from ecprune_onnx.sequential import RECONSTRUCTORS, allocate_sparsity, reconstruct_layers
from ecprune_onnx.stats import (
    batch_rows_that_fit,
    collect_stats,
    host_memory_available,
    s1_on_disk,
)
from ecprune_onnx.structured import NEURON_METHODS
from ecprune_onnx.structured import SCOPES as NEURON_SCOPES

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
    units_removed: int | None = None  # --structure neuron: the layer's own units removed


@dataclass(frozen=True)
class CompressResult:
    """What compress did: per layer, and predicted vs measured output deviation.

    Deviations are sums over the calibration set of the squared deviation of all output
    elements (the unit of docs/method.md's damage); `measured_mse` is their mean per element.
    """

    model: str
    output: str
    method: str
    ratio: float
    scope: str
    pattern: str | None
    compensate: bool
    steps: int
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
    structure: str = "weight"
    skipped_groups: list[SkippedGroup] = field(default_factory=list)
    # --structure neuron --weight-ratio: the share of the weights left after removing the
    # units that `weight_method` then zeroed (None when there was no such stage)
    weight_ratio: float | None = None
    weight_method: str | None = None
    # the parity check's tolerance, and the float rounding noise of the model it came from
    parity_tolerance: float | None = None
    parity_noise: float | None = None
    # how ec's (sensitivity's) layer shares were chosen: "measured" (damage curves,
    # budget.py) or "predicted" (one threshold); None where --budget does not apply
    budget: str | None = None
    # --quantize: the grid, the file format, and the sizes of the input and written files
    quantize: str | None = None
    quant_format: str | None = None
    block_size: int | None = None
    symmetric: bool | None = None
    size_original: FileSizes | None = None
    size_output: FileSizes | None = None

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
    method: str | None = None,
    scope: str = "global",
    pattern: str | None = None,
    steps: int = 1,
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
    structure: str = "weight",
    weight_ratio: float | None = None,
    weight_method: str | None = None,
    parity_tolerance: float | None = None,
    batch_axes: Mapping[str, int | None] | None = None,
    budget: str = "auto",
    max_memory: int | None = None,
    quantize: str | None = None,
    block_size: int = 32,
    quant_format: str | None = None,
    symmetric: bool | None = None,
) -> CompressResult:
    """Prune the dense layers of `model` and write the result; see docs/design.md for options.

    `method` defaults to `ecr` (`ec` with `structure="neuron"`).

    `steps` > 1 reaches the ratio in that many rounds (`ratio_schedule`), recomputing the
    statistics on the partly pruned model each round; bias shifts accumulate.
    `scores` (research use, e.g. a benchmark's own criterion): importances by layer name,
    shaped like each layer's effective [out, in] weight, used instead of the method's.
    `budget` (`ec`, `sensitivity`, global scope): "measured" shares the removals among the
    layers by measured damage curves (budget.py), "predicted" by one threshold, "auto"
    measures up to budget.MEASURED_MAX_WEIGHTS dense weights.
    `structure="neuron"`: `ratio` is the share of the hidden units removed (neurons.py);
    then `weight_ratio` of the weights left in the shrunk matrices are zeroed by
    `weight_method` (default `ecr`), on statistics of the shrunk model.
    `max_memory` (bytes; default half the memory available): where a score method's S1/S2
    sums of all layers would take more, they are taken in groups of layers, one pass of the
    calibration data each, and kept on disk (grouping.py); the written model is the same.
    `quantize="int8"|"int4"` stores the dense weights quantized (qsequential.py); `ratio`
    may then be left out (no pruning). int4 groups `block_size` inputs; `quant_format`
    and `symmetric` default per bit width (`qformat.default_format`, `DEFAULT_SYMMETRIC`).
    """
    started = time.perf_counter()
    method = method or default_method(structure)
    check_max_memory(max_memory)
    quant = _check_quantize(quantize, block_size, quant_format, symmetric, calib, scores)
    if quant is not None and ratio is None and pattern is None and weight_ratio is None:
        ratio = 0.0  # quantization alone
    options = _check_options(
        ratio, method, scope, pattern, steps, probes, batch_size, seed, compensate, structure,
        weight_ratio=weight_ratio, weight_method=weight_method, parity_tolerance=parity_tolerance,
        budget=budget,
    )  # fmt: skip
    if structure == "neuron" and scores is not None:
        raise UsageError("scores: precomputed importances are per weight; use structure='weight'")
    if method in RECONSTRUCTORS and scores is not None:
        raise UsageError(
            f"scores: precomputed importances need a score method (e.g. method='ec'), "
            f"not the reconstruction {method}"
        )
    output = modelio.check_output_path(model, output or modelio.default_output_path(model), force)
    onnx_model = modelio.load_model(model)
    if quant is not None:
        bits, group = quant.spec.bits, quant.spec.group_size
        qformat.check_format(quant.format, bits, group, qformat.model_opset(onnx_model))
    session = open_session(model)  # onnxruntime must run the file: refuse it here, by its path
    rewrites = normalize(onnx_model)
    scan = find_dense_layers(onnx_model)
    layers, excluded = _apply_exclusions(scan.layers, exclude)
    if not layers:
        raise UsageError(_no_layer_message(model, scan.skipped, excluded))
    _check_finite(model, layers)
    y_names = choose_outputs(onnx_model, outputs)
    data = _calibration_data(calib, labels, onnx_model, options, batch_axes)
    torch_device = resolve_device(device)
    options, notes = _fit_batches_to_memory(options, layers, data, torch_device)
    options, notes = _plan_statistics(options, layers, data, max_memory, notes)
    notes = [f"rewritten for pruning: {note}" for note in rewrites] + notes
    notes += _logits_notes(onnx_model, outputs, y_names)
    original = _original_outputs(session, onnx_model, y_names, data, options, progress)
    del session  # it holds the weights once more
    if quant is None and structure == "weight":
        # the dense weights in `layers` alone from here (held.py): 4 bytes per weight less
        onnx_model = hollowed(onnx_model, held_weights(layers))
    with temporary_space():  # taps, tap sessions, spilled and grouped sums go to disk
        if quant is None:
            pruning = _prune(
                onnx_model, layers, y_names, data, options, scores, torch_device, progress
            )
        else:
            pruning = _prune_and_quantize(
                onnx_model, layers, y_names, data, options, quant, torch_device, progress
            )
    external = modelio.file_uses_external_data(model)
    with modelio.stage_model(pruning.model, output, external) as staged:
        # Checked as a file: no copy of the weights, and no 2 GB limit. A failure here is our
        # bug, not the user's: keep the traceback.
        onnx.checker.check_model(str(staged.path))
        # measured on the written file before it is moved into place: a failure leaves nothing
        measured = _measured_deviation(original, staged.path, y_names, data, options, progress)
        staged.commit()
    reports = [_layer_report(layer, pruning) for layer in layers]
    return CompressResult(
        model=str(model),
        output=str(output),
        method=method,
        ratio=options.ratio,
        scope="pattern" if options.pattern else scope,
        pattern=pattern,
        compensate=options.compensate,
        steps=options.steps,
        layers=reports,
        skipped=scan.skipped,
        excluded=excluded,
        outputs=y_names,
        calib_rows=data.rows if data is not None else 0,
        probes=pruning.probe_label,
        device=str(torch_device),
        parity_deviation=pruning.parity.deviation if pruning.parity else None,
        parity_tolerance=pruning.parity.tolerance if pruning.parity else None,
        parity_noise=pruning.parity.noise if pruning.parity else None,
        predicted_deviation=_sum_or_none([report.predicted_damage for report in reports]),
        measured_deviation=measured[0] if measured else None,
        measured_mse=measured[1] if measured else None,
        seconds=time.perf_counter() - started,
        notes=notes + pruning.notes + _warning_notes(pruning.parity),
        structure=structure,
        skipped_groups=pruning.skipped_groups,
        weight_ratio=options.weight_stage.ratio if options.weight_stage else None,
        weight_method=options.weight_stage.method if options.weight_stage else None,
        budget=pruning.budget,
        **_quantize_report(quant, model, output),
    )


@dataclass(frozen=True)
class _Options:
    """The validated options of one compress run."""

    ratio: float
    pattern: tuple[int, int] | None
    method: str
    scope: str
    steps: int
    probes: int
    batch_size: int
    seed: int
    compensate: bool
    structure: str = "weight"
    parity_tolerance: float | None = None  # None: from the model's own rounding noise
    # ec's and sensitivity's layer shares from measured damage curves (budget.py): "measured",
    # "predicted", or "auto" (measured up to budget.MEASURED_MAX_WEIGHTS dense weights)
    budget: str = "auto"
    # --structure neuron --weight-ratio: the options of the weight stage that follows
    weight_stage: _Options | None = None
    # the S1/S2 sums in groups of layers, one pass each (grouping.py); None: one pass
    stats_plan: StatsPlan | None = None


@dataclass
class _Pruning:
    """The model as pruning goes, and what was removed and shifted so far, by layer name."""

    model: onnx.ModelProto
    removed: dict[str, np.ndarray]
    shift: dict[str, np.ndarray]
    damage: dict[str, float | None]
    probe_label: str | None = None
    parity: Parity | None = None
    budget: str | None = None  # "measured" or "predicted" where --budget applied
    units_removed: dict[str, int] = field(default_factory=dict)
    skipped_groups: list[SkippedGroup] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # --quantize: its embedding tables


def ratio_schedule(ratio: float, steps: int) -> list[float]:
    """The sparsity after each of `steps` rounds: the kept share shrinks geometrically,
    (1 - R)^(k / N), so every round removes the same fraction of the weights still there.

    Why geometric: the linearisation behind EC is about the weights still present; removing
    a constant share of them keeps each round's perturbation of the model alike, where a
    linear schedule would make the last rounds the most disruptive. The last entry is R.
    """
    return [1 - (1 - ratio) ** (k / steps) for k in range(1, steps)] + [ratio]


@dataclass(frozen=True)
class _Quant:
    """The validated --quantize options."""

    name: str  # int8 | int4
    spec: QuantSpec
    format: str


QUANTIZE = {"int8": 8, "int4": 4}


def _check_quantize(quantize, block_size, quant_format, symmetric, calib, scores) -> _Quant | None:
    """--quantize and its companions, before any file is read."""
    if quantize is None:
        for flag, value in (("--quant-format", quant_format), ("--symmetric", symmetric)):
            if value is not None:
                raise UsageError(f"{flag}: give --quantize int8|int4 too")
        return None
    if quantize not in QUANTIZE:
        raise UsageError(f"--quantize {quantize}: expected one of {', '.join(QUANTIZE)}")
    if calib is None:
        raise UsageError(f"--quantize {quantize} needs calibration data: pass --calib NPZ")
    if scores is not None:
        raise UsageError("scores: precomputed importances do not apply with quantize")
    bits = QUANTIZE[quantize]
    if bits == 4 and not block_size >= 1:
        raise UsageError(f"--block-size {block_size}: expected a whole number >= 1, e.g. 32")
    fmt = quant_format or qformat.DEFAULT_FORMAT[bits]
    if fmt not in qformat.FORMATS:
        raise UsageError(f"--quant-format {fmt}: expected one of {', '.join(qformat.FORMATS)}")
    symmetric = qformat.DEFAULT_SYMMETRIC[bits] if symmetric is None else symmetric
    spec = QuantSpec(bits=bits, group_size=block_size if bits == 4 else None, symmetric=symmetric)
    return _Quant(quantize, spec, fmt)


def _prune_and_quantize(onnx_model, layers, y_names, data, options, quant, device, progress):
    """`ecr` (the default) prunes and quantizes in one layer-sequential pass, refitting to
    the input model; any other pruning runs first as without --quantize, and the pass then
    quantizes the pruned model, refitting to it, its zeros kept (qsequential.py)."""
    names = [layer.name for layer in layers]
    for layer in layers:
        if layer.compact_weight.dtype != np.float32 or layer.weight_dtype != np.float32:
            raise UsageError(
                f"--quantize: layer '{layer.name}' has {layer.weight_dtype} weights; "
                "only float32 models are quantized"
            )
    joint = options.structure == "weight" and options.method == "ecr"
    if joint:
        pruning, current = _fresh_pruning(onnx_model, layers, data), layers
    else:
        pruning = _prune(onnx_model, layers, y_names, data, options, None, device, progress)
        current = _layers_named(pruning.model, names)
    stats, label, parity = _statistics(
        pruning.model, current, y_names, data, options, device, _bar(progress, "calibrate")
    )
    pruning.probe_label = pruning.probe_label or label
    pruning.parity = _worse(pruning.parity, parity)
    scales = {name: stats[name].s0 / max(stats[name].rows, 1) for name in names}
    del stats
    sparsity = None
    if joint and options.ratio > 0 and options.pattern is None:
        sparsity = allocate_sparsity(
            pruning.model, current, data, scales, options.ratio, options.batch_size,
            RECONSTRUCTORS["ecr"],
        )  # fmt: skip
    # tables first: the dense layers are then refit to make up for their error
    tables, pruning.notes = qtables.quantize_tables(pruning.model, quant.spec, quant.format)
    pruning.notes += [qtables.describe(table) for table in tables]
    grid = functools.partial(qformat.layer_spec, quant.spec, quant.format)
    result = quantize_layers(
        pruning.model, current, data, grid, scales, options.batch_size, sparsity,
        options.pattern if joint else None, _bar(progress, "quantize"),
        start=qtables.with_dequantized(pruning.model, tables) if tables else None,
    )  # fmt: skip
    final = _layers_named(result.model, names)
    written = qformat.write_quantized(result.model, final, result.quantized, quant.format)
    pruning.model = qtables.write_tables(written, tables)
    _merge_quantization(pruning, result, joint)
    return pruning


def _merge_quantization(pruning, result, joint) -> None:
    """The pass's removals (joint pass only), bias shifts and damage, in the coordinates of
    the input layers (a unit removed before has no row in the pass)."""
    for name, shift in result.shift.items():
        if joint:
            pruning.removed[name] |= result.removed[name]
        rows = (
            ~pruning.removed[name].all(axis=1)
            if len(shift) != len(pruning.shift[name])
            else slice(None)
        )
        pruning.shift[name][rows] += shift
        pruning.damage[name] = _sum_or_none([pruning.damage[name], result.damage[name]])


def _quantize_report(quant, model, output) -> dict:
    """The CompressResult fields of --quantize (file sizes measured on both files)."""
    if quant is None:
        return {}
    return {
        "quantize": quant.name,
        "quant_format": quant.format,
        "block_size": quant.spec.group_size,
        "symmetric": quant.spec.symmetric,
        "size_original": file_sizes(model),
        "size_output": file_sizes(output),
    }


def _prune(onnx_model, layers, y_names, data, options, scores, device, progress) -> _Pruning:
    """Whole units and then, with a weight stage, single weights; or single weights alone."""
    pruning = _fresh_pruning(onnx_model, layers, data)
    if options.structure != "neuron":
        return _prune_weights(pruning, layers, y_names, data, options, scores, device, progress)
    pruning = _prune_neurons(pruning, layers, y_names, data, options, device, progress)
    stage = options.weight_stage
    if stage is not None and stage.ratio > 0:
        _prune_weights_after_neurons(pruning, layers, y_names, data, stage, device, progress)
    return pruning


def _fresh_pruning(onnx_model, layers, data) -> _Pruning:
    """Nothing removed or shifted yet; damage 0, or None where there are no statistics."""
    return _Pruning(
        model=onnx_model,
        removed={layer.name: np.zeros(layer.shape, dtype=bool) for layer in layers},
        shift={layer.name: np.zeros(layer.out_features) for layer in layers},
        damage={layer.name: 0.0 if data is not None else None for layer in layers},
    )


def _prune_weights(pruning, layers, y_names, data, options, scores, device, progress) -> _Pruning:
    """A layer-sequential reconstruction, or rounds of statistics → scores → masks → bias
    shifts → rewrite on the current model."""
    if options.method in RECONSTRUCTORS:
        return _reconstruct(pruning, layers, y_names, data, options, device, progress)
    names = [layer.name for layer in layers]
    for step, step_ratio in enumerate(ratio_schedule(options.ratio, options.steps), start=1):
        # the caller's layers are those of the model as it comes in: reading them again
        # would hold a second copy of every weight (4 bytes per weight)
        current = layers if step == 1 else _layers_named(pruning.model, names)
        stats = {}
        if data is not None:
            task = "calibrate" if options.steps == 1 else f"calibrate {step}/{options.steps}"
            stats, pruning.probe_label, parity = _statistics(
                pruning.model, current, y_names, data, options, device, _bar(progress, task)
            )
            pruning.parity = _worse(pruning.parity, parity)
        damage_of = None
        if _shares_by_budget(stats, options, scores):
            pruning.budget = _budget_for(options.budget, current)
        if pruning.budget == "measured":
            model = filled(pruning.model, held_weights(current))
            damage_of = _layer_damage(model, current, stats, y_names, data, options)
            damage_of.progress = _bar(progress, "measure layer budgets")
        _prune_round(pruning, current, stats, step_ratio, options, scores, damage_of)
    return pruning


def _reconstruct(pruning, layers, y_names, data, options, device, progress) -> _Pruning:
    """Layer-sequential refits (sequential.py); EC's statistics weight the rows by output
    sensitivity and give the predicted damage in the same units as the other methods. They
    need S0 alone: no [out, in] sums (16 bytes per weight, and two GEMMs per batch)."""
    stats, pruning.probe_label, pruning.parity = _statistics(
        pruning.model, layers, y_names, data, options, device, _bar(progress, "calibrate"), ()
    )
    result = reconstruct_layers(
        pruning.model,
        layers,
        data,
        stats,
        options.method,
        options.ratio,
        options.pattern,
        options.batch_size,
        _bar(progress, "reconstruct"),
    )
    pruning.model = result.model
    pruning.removed.update(result.removed)
    pruning.shift.update(result.shift)
    pruning.damage.update(result.damage)
    return pruning


def _prune_neurons(pruning, layers, y_names, data, options, device, progress) -> _Pruning:
    """Remove whole hidden units (neurons.py); the statistics of every dense layer are
    those of the consumers that lose input columns."""
    scan = find_unit_groups(pruning.model, layers)
    pruning.skipped_groups = scan.skipped
    if not scan.groups and options.ratio > 0:
        reasons = "; ".join(f"{s.layer}: {s.reason}" for s in scan.skipped[:3])
        raise UsageError(f"--structure neuron: no layer has removable units ({reasons})")
    stats = {}
    if data is not None:
        stats, pruning.probe_label, pruning.parity = _statistics(
            pruning.model, layers, y_names, data, options, device, _bar(progress, "calibrate")
        )
    calibration = Calibration(data, y_names, options.batch_size) if data is not None else None
    result = prune_neurons(
        pruning.model,
        scan.groups,
        stats,
        options.method,
        options.ratio,
        options.scope,
        "refit" if options.compensate else "none",
        options.seed,
        calibration,
        progress,
    )
    pruning.model = result.model
    for name, removed in result.removed.items():
        pruning.removed[name] |= removed
    pruning.shift.update(result.shift)
    pruning.damage.update(result.damage)
    pruning.units_removed.update(result.units_removed)
    return pruning


def _prune_weights_after_neurons(pruning, layers, y_names, data, stage, device, progress) -> None:
    """The weight stage of --structure neuron: `stage.method` prunes `stage.ratio` of the
    weights of the shrunk layers, on statistics of the shrunk model, as it would prune an
    unshrunk one. Its removals, bias shifts and damage join the units' in the coordinates
    of the original layers, so `removed` counts every original weight that is gone."""
    shrunk = _layers_named(pruning.model, [layer.name for layer in layers])
    weights = _fresh_pruning(pruning.model, shrunk, data)
    weights = _prune_weights(
        weights, shrunk, y_names, data, stage, None, device, _prefixed(progress, "weights: ")
    )
    pruning.model = weights.model
    pruning.probe_label = pruning.probe_label or weights.probe_label
    pruning.parity = _worse(pruning.parity, weights.parity)
    for name, stage_removed in weights.removed.items():
        # the units' removals are whole rows (a producer's) and whole columns (a consumer's)
        rows = ~pruning.removed[name].all(axis=1)
        columns = ~pruning.removed[name].all(axis=0)
        pruning.removed[name][np.ix_(rows, columns)] |= stage_removed
        pruning.shift[name][rows] += weights.shift[name]
        pruning.damage[name] = _sum_or_none([pruning.damage[name], weights.damage[name]])


def _shares_by_budget(stats, options, scores) -> bool:
    """Whether --budget decides the layers' shares: one threshold over the layers on EC's
    (or sensitivity's) predicted damage."""
    predicted_scores = scores is None and options.method == damage_method(options.compensate)
    return bool(stats) and predicted_scores and options.scope == "global" and not options.pattern


def _budget_for(budget: str, layers) -> str:
    """measured or predicted; auto measures up to MEASURED_MAX dense weights."""
    if budget != "auto":
        return budget
    weights = sum(layer.compact_weight.size for layer in layers)
    return "measured" if weights <= MEASURED_MAX else "predicted"


def _layer_damage(model, layers, stats, y_names, data, options) -> LayerDamage:
    """The measurement behind measured layer budgets (budget.py)."""

    def shift_of(layer, keep):
        return _bias_shifts([layer], stats, {layer.name: keep}, options.compensate)[layer.name]

    return LayerDamage(model, layers, shift_of, y_names, data, options.batch_size)


def _prune_round(pruning, layers, stats, ratio, options, scores, damage_of=None) -> None:
    """One round: weights removed in earlier rounds stay removed (they score -inf).
    With `damage_of`, the share each layer loses comes from measured damage curves
    (budget.py), the weights within a layer still by their scores.

    It empties `stats` as it goes: the statistics are the largest arrays held (16 bytes per
    weight), and after the bias shifts only the masks, the shifts and the model are needed.
    EC's scores take S2's place, and S1 waits on disk while the masks and the predicted
    damage are found (`s1_on_disk`): the scores, the masks and S1 together were the peak
    of a 100M-weight compress.
    """
    for layer_stats in stats.values():
        floor_sensitivity(layer_stats)
    scores_are_damage = scores is None and options.method == damage_method(options.compensate)
    if scores_are_damage:
        scores = _damage_scores(layers, stats, options.compensate)
    elif scores is None:
        scores = _method_scores(layers, stats, options.method, options.seed)
    checked = _checked_scores(scores, layers)
    ranked = {name: _ranked(s, pruning.removed[name]) for name, s in checked.items()}
    # the measured budget's masks take bias shifts; other scores' damage reads S1 and S2
    aside = scores_are_damage and damage_of is None
    with s1_on_disk(stats) if aside else contextlib.nullcontext():
        if damage_of is not None:
            masks = measured_masks(ranked, ratio, damage_of, damage_of.progress)
        else:
            masks = choose_masks(ranked, ratio, options.scope, options.pattern)
        for layer in layers:
            layer_stats = stats.get(layer.name)
            if layer_stats is not None:  # weights removed before are 0 here: they add nothing
                importance = checked[layer.name] if scores_are_damage else None
                pruning.damage[layer.name] += predicted_damage(
                    layer.compact_weight, masks[layer.name], layer_stats, options.compensate,
                    importance,
                )  # fmt: skip
        del scores, checked, ranked
    shifts = _bias_shifts(layers, stats, masks, options.compensate)
    for layer in layers:
        pruning.removed[layer.name] |= ~masks[layer.name]
        pruning.shift[layer.name] += shifts[layer.name]
    stats.clear()
    pruning.model = rewrite(pruning.model, layers, masks, shifts)


def _damage_scores(layers, stats, compensated) -> dict[str, np.ndarray]:
    """EC's scores (sensitivity's, uncompensated), written over each layer's S2, which they
    use up; they are also the predicted damage, and the bias shifts need only S0 and S1."""
    scores = {}
    for layer in layers:
        scores[layer.name] = damage_scores(layer.compact_weight, stats[layer.name], compensated)
        stats[layer.name] = replace(stats[layer.name], s2=None)
    return scores


def _ranked(scores: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """Scores with earlier removals at -inf; no copy in the first round (memory at scale)."""
    return np.where(removed, -np.inf, scores) if removed.any() else scores


def _layers_named(model: onnx.ModelProto, names: list[str]) -> list[DenseLayer]:
    """The layers of a (partly pruned) model, in the given order, by name."""
    found = {layer.name: layer for layer in find_dense_layers(model).layers}
    return [found[name] for name in names]


def _calibration_data(calib, labels, onnx_model, options: _Options, batch_axes=None):
    """The calibration NPZ, with labels when a method needs them; None if not given."""
    needs_labels = False
    for flag, stage in _stages(options):
        method = METHODS.get(stage.method)
        needs_calibration = method is None or method.needs_calibration or stage.compensate
        if needs_calibration and calib is None:
            raise UsageError(f"{flag} {stage.method} needs calibration data: pass --calib NPZ")
        if method is not None and method.needs_labels and labels is None:
            raise UsageError(
                f"{flag} {stage.method} needs labels: pass --labels KEY naming the labels "
                "array of the calibration NPZ"
            )
        needs_labels = needs_labels or (method is not None and method.needs_labels)
    if calib is None:
        return None
    specs = input_specs(onnx_model, batch_axes)
    return load_calib(calib, specs, labels if needs_labels else None)


def _stages(options: _Options) -> list[tuple[str, _Options]]:
    """The stages that run, each with the option that names its method."""
    stages = [("--method", options)]
    if options.weight_stage is not None and options.weight_stage.ratio > 0:
        stages.append(("--weight-method", options.weight_stage))
    return stages


def _prefixed(progress: Progress | None, prefix: str) -> Progress | None:
    """The caller's progress reporting, with the tasks of a second stage told apart."""
    if progress is None:
        return None
    return lambda task, done, total: progress(f"{prefix}{task}", done, total)


def _bar(progress: Progress | None, task: str) -> Callable[[int, int], None]:
    """A (done, total) callback for one task of the caller's progress reporting."""

    def report(done: int, total: int) -> None:
        if progress is not None:
            progress(task, done, total)

    return report


def _fit_batches_to_memory(options, layers, data, device) -> tuple[_Options, list[str]]:
    """--batch-size, lowered where one batch of the statistics would not fit in the memory
    free on the device (very wide layers, many probes); a note says so."""
    if data is None or data.fixed_batch:  # a fixed batch dimension takes only its own size
        return options, []
    fits = batch_rows_that_fit(layers, options.probes, device)
    if fits is None or fits >= options.batch_size:
        return options, []
    stage = options.weight_stage
    fitted = replace(
        options,
        batch_size=fits,
        weight_stage=replace(stage, batch_size=fits) if stage is not None else None,
    )
    note = (
        f"batches of {fits} rows: --batch-size {options.batch_size} would not fit in the "
        f"memory free on {device}"
    )
    return fitted, [note]


def _plan_statistics(options, layers, data, max_memory, notes) -> tuple[_Options, list[str]]:
    """Groups of layers for the S1/S2 sums of a score method, where all of them at once
    would take more than `max_memory` or half the memory available now; with a note."""
    reconstructs = options.method in RECONSTRUCTORS  # these sum S0 alone
    if data is None or reconstructs or options.structure != "weight":
        return options, notes
    budget = max_memory
    if budget is None:
        available = host_memory_available()
        if available is None:  # no /proc: one pass, as before
            return options, notes
        budget = available // 2
    plan = plan_groups(layers, budget, with_gradient=data.labels is not None)
    if plan.passes == 1:
        return options, notes
    source = "--max-memory" if max_memory is not None else "half the memory available"
    return replace(options, stats_plan=plan), [*notes, plan.note(source)]


def _check_options(
    ratio, method, scope, pattern, steps, probes, batch_size, seed, compensate, structure="weight",
    *, weight_ratio=None, weight_method=None, parity_tolerance=None, budget="auto",
) -> _Options:  # fmt: skip
    """Validate the options before any file is read."""
    if structure not in STRUCTURES:
        raise UsageError(f"--structure {structure}: expected one of {', '.join(STRUCTURES)}")
    _check_weight_stage(structure, weight_ratio, weight_method)
    if structure == "neuron":
        _check_neuron_options(method, scope, pattern, steps)
    check_method(method)
    if scope not in SCOPES:
        raise UsageError(f"--scope {scope}: expected one of {', '.join(SCOPES)}")
    if budget not in BUDGETS:
        raise UsageError(f"--budget {budget}: expected one of {', '.join(BUDGETS)}")
    keep_pattern = parse_pattern(pattern)
    if ratio is None and keep_pattern is None:
        raise UsageError("--ratio is required (or give --pattern N:M)")
    if keep_pattern is not None:
        implied = 1 - keep_pattern[0] / keep_pattern[1]
        if ratio is not None and abs(ratio - implied) > 1e-9:
            raise UsageError(
                f"--ratio {ratio} contradicts --pattern {pattern} (which removes {implied:g}); "
                "give one of them"
            )
        if steps != 1:
            raise UsageError(f"--steps {steps}: N:M patterns are reached in one step; use 1")
        ratio = implied
    if method in RECONSTRUCTORS and steps != 1:
        raise UsageError(f"--steps {steps}: --method {method} refits layer by layer; use 1")
    if method in RECONSTRUCTORS and compensate is not None:
        raise UsageError(f"--method {method} sets the biases itself; drop --[no-]compensate")
    if parity_tolerance is not None and not 0 < parity_tolerance < float("inf"):
        raise UsageError(
            f"--parity-tolerance {parity_tolerance}: expected a relative deviation > 0, e.g. 1e-2"
        )
    for name, value in (("--steps", steps), ("--probes", probes), ("--batch-size", batch_size)):
        if value < 1:
            raise UsageError(f"{name} {value}: expected a whole number >= 1")
    options = _Options(
        structure=structure,
        ratio=check_ratio(ratio),
        pattern=keep_pattern,
        method=method,
        scope=scope,
        steps=steps,
        probes=probes,
        batch_size=batch_size,
        seed=seed,
        compensate=_compensates(method, structure) if compensate is None else compensate,
        parity_tolerance=parity_tolerance,
        budget=budget,
    )
    if weight_ratio is None:
        return options
    weight_stage = _weight_stage_options(options, weight_ratio, weight_method, compensate)
    return replace(options, weight_stage=weight_stage)


def _check_weight_stage(structure, weight_ratio, weight_method) -> None:
    """--weight-ratio zeroes single weights of the matrices that removing units left, so it
    goes with --structure neuron only; --weight-method only with it."""
    if weight_ratio is None:
        if weight_method is not None:
            raise UsageError(
                f"--weight-method {weight_method}: give --weight-ratio W too "
                "(the share of the remaining weights it zeroes)"
            )
        return
    if structure != "neuron":
        raise UsageError(
            f"--weight-ratio {weight_ratio}: only with --structure neuron (zeroes that share "
            f"of the weights left after removing units); with --structure {structure} use --ratio"
        )
    if not 0.0 <= weight_ratio < 1.0:  # NaN fails the comparison too
        raise UsageError(f"--weight-ratio {weight_ratio}: expected a fraction in [0, 1), e.g. 0.5")
    if weight_method is not None:
        check_method(weight_method, "--weight-method")


def _weight_stage_options(units: _Options, weight_ratio, weight_method, compensate) -> _Options:
    """The weight stage prunes the shrunk model as plain weight pruning would, with the unit
    stage's scope, probes and seed, in one step. An explicit --[no-]compensate holds for it
    too, unless its method is a reconstruction (which sets the biases itself)."""
    method = weight_method or DEFAULT_WEIGHT_METHOD
    if compensate is None or method in RECONSTRUCTORS:
        compensate = _compensates(method)
    return replace(
        units, structure="weight", method=method, ratio=float(weight_ratio), compensate=compensate
    )


def _check_neuron_options(method, scope, pattern, steps) -> None:
    """--structure neuron has its own methods and scopes, and no patterns or rounds."""
    if method not in NEURON_METHODS:
        raise UsageError(
            f"--method {method}: with --structure neuron expected one of "
            f"{', '.join(NEURON_METHODS)}"
        )
    if scope not in NEURON_SCOPES:
        raise UsageError(
            f"--scope {scope}: with --structure neuron expected one of {', '.join(NEURON_SCOPES)}"
        )
    if pattern is not None:
        raise UsageError(
            "--pattern N:M: removing units changes the layers' input counts; drop it with "
            "--structure neuron (--weight-ratio zeroes single weights afterwards)"
        )
    if steps != 1:
        raise UsageError(f"--steps {steps}: --structure neuron runs in one step; use 1")


def _compensates(method: str, structure: str = "weight") -> bool:
    if structure == "neuron":
        return NEURON_METHODS[method].compensates_by_default
    if method in RECONSTRUCTORS:
        return RECONSTRUCTORS[method].to_original
    return METHODS[method].compensates_by_default


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


def _check_finite(model, layers: list[DenseLayer]) -> None:
    """A NaN or inf weight makes every statistic meaningless: refuse the model."""
    for layer in layers:
        for name, values in (
            (layer.weight_name, layer.compact_weight),
            (layer.bias_name, layer.bias),
        ):
            if not np.all(np.isfinite(values)):
                raise UsageError(
                    f"{model}: initializer '{name}' of layer '{layer.name}' holds NaN or inf; "
                    "expected finite weights"
                )


def _no_layer_message(model, skipped: list[SkippedNode], excluded: list[str]) -> str:
    details = [f"{node.node}: {node.reason}" for node in skipped[:3]]
    if excluded:
        details.append(f"{len(excluded)} excluded by --exclude")
    suffix = f" ({'; '.join(details)})" if details else ""
    return f"{model}: no prunable dense layer (Gemm or MatMul with an initializer weight){suffix}"


def _statistics(onnx_model, layers, y_names, data, options, device, report, products_for=None):
    """Instrument, check the conversion on the first batch, then stream all batches
    (S1 and S2 for the layers in `products_for`, default all: `collect_stats`)."""
    instrumented, roles = instrument(onnx_model, layers, y_names)
    graph = TorchGraph(instrumented, device, held_weights(layers))
    graph.share_weights(layers)  # before the parity check, which then checks them too
    first_batch = next(data.batches(options.batch_size))
    parity = check_parity(graph, first_batch, data.path, options.parity_tolerance)
    del instrumented, first_batch
    graph.drop_model()
    done, plans = 0, []
    grouped = options.stats_plan if products_for is None else None  # S0 alone: one pass
    passes = grouped.passes if grouped is not None else 1

    def advance(rows: int) -> None:
        nonlocal done
        done += rows
        report(done, data.rows * passes)

    def collect(names):
        labels = data.label_batches(options.batch_size) if data.labels is not None else None
        batches = data.batches(options.batch_size)
        stats, plan = collect_stats(
            graph, roles, layers, batches, options.probes, options.seed, advance, labels, names
        )
        plans.append(plan)
        return stats

    if passes > 1:
        stats = collect_in_groups(grouped, collect)
    else:
        stats = collect(products_for)
    return stats, plans[0].label, replace(parity, warnings=tuple(graph.warnings))


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
    """δ of docs/method.md for each layer's mask; zero without compensation or statistics."""
    shifts = {}
    for layer in layers:
        layer_stats = stats.get(layer.name)
        if compensate and layer_stats is not None:
            keep = masks[layer.name]
            weight = layer.compact_weight
            shifts[layer.name] = bias_shift(weight, keep, layer_stats.s0, layer_stats.s1)
        else:
            shifts[layer.name] = np.zeros(layer.out_features)
    return shifts


def _layer_report(layer: DenseLayer, pruning: _Pruning) -> LayerReport:
    removed = int(pruning.removed[layer.name].sum())
    return LayerReport(
        name=layer.name,
        shape=layer.shape,
        weights=layer.compact_weight.size,
        removed=removed,
        sparsity=removed / layer.compact_weight.size,
        predicted_damage=pruning.damage[layer.name],
        bias_shift_norm=float(np.linalg.norm(pruning.shift[layer.name])),
        units_removed=pruning.units_removed.get(layer.name),
    )


def _original_outputs(session, onnx_model, y_names, data: CalibData | None, options, progress):
    """The input model's outputs y on the calibration set, for the measured deviation, run
    by the session that vetted the file: opening it a second time at the end was one of
    three sessions that took 10-12 s together at 600M weights. None without calibration
    data."""
    if data is None:
        return None
    session = _exposing(session, y_names, onnx_model)
    return _run_calibration(session, y_names, data, options, progress, "measure original")


def _measured_deviation(original, output, y_names, data: CalibData | None, options, progress):
    """Run the written file in onnxruntime on the calibration set and compare its outputs
    with the input model's (`_original_outputs`): (sum of squares, mean square).

    The session opens the file itself: no copy of the weights in Python, no 2 GB limit.
    """
    if original is None:
        return None
    session = _exposing(open_session(output), y_names, output)
    pruned = _run_calibration(session, y_names, data, options, progress, "measure pruned")
    squares = sum(
        float(np.square(pruned[n].astype(np.float64) - original[n].astype(np.float64)).sum())
        for n in y_names
    )
    elements = sum(original[n].size for n in y_names)
    return squares, squares / max(elements, 1)


def _exposing(session, y_names, model):
    """`session`, or, where y includes inner tensors (--output), a session on a copy of
    `model` (a proto or a path) that exposes them."""
    if set(y_names) <= set(tensor_output_names(session)):
        return session
    proto = model if isinstance(model, onnx.ModelProto) else modelio.load_model(model)
    return open_session(with_outputs(proto, y_names))


def _run_calibration(session, y_names, data: CalibData, options, progress, task: str):
    """y of every calibration row by one onnxruntime session, batch by batch, reported as
    `task`."""
    report, done = _bar(progress, task), 0

    def advance(rows: int) -> None:
        nonlocal done
        done += rows
        report(done, data.rows)

    batches = data.batches(options.batch_size)
    return run_batches(session, batches, y_names, advance, source=data.path)


def _logits_notes(onnx_model, requested, y_names) -> list[str]:
    """Say where the default y is the logits under a graph output's Softmax."""
    if requested:
        return []
    return [
        f"y is '{name}', the logits that Softmax output '{output}' is computed from (a "
        "saturated Softmax hides the layers' influence); --output names another"
        for output in float_outputs(onnx_model)
        for name in [softmax_input(onnx_model, output)]
        if name is not None
    ]


def _warning_notes(parity: Parity | None) -> list[str]:
    """One note for what the converted ops warned, however often they warned it."""
    if parity is None or not parity.warnings:
        return []
    more = f" (and {len(parity.warnings) - 1} other messages)" if len(parity.warnings) > 1 else ""
    return [f"the torch copy warned while it ran: {parity.warnings[0]}{more}"]


def _worse(first: Parity | None, second: Parity | None) -> Parity | None:
    """The parity check of two rounds with the larger deviation against its tolerance."""
    checks = [check for check in (first, second) if check is not None]
    return max(checks, key=lambda check: check.deviation / check.tolerance, default=None)


def _sum_or_none(values: list[float | None]) -> float | None:
    return None if any(value is None for value in values) else float(sum(values))
