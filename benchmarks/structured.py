"""Structured pruning (whole hidden units): quality, file size and onnxruntime latency.

    python -m benchmarks.structured [--quick] [--seeds 3] [--out benchmarks/results]

For each model (the digits sample's architecture, the diffusion–sorption MLP and a
≥ 1M-parameter MLP), each seed (training init and calibration rows), each share of the
hidden units removed (0.25 / 0.5 / 0.75) and each method row (ROWS), the model is shrunk
and measured on the held-out test split: output MSE against the unpruned model, accuracy
(digits) or MSE against the clean targets (diffusion–sorption), file size, and onnxruntime
latency at batch 1 and batch 512 (median of 30 runs, original and pruned interleaved in
this process, one onnxruntime thread each). Writes `structured.json` and `structured.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from benchmarks.tasks import (
    ModelSpec,
    add_run_arguments,
    chosen_models,
    prepare,
    results_folder,
    run_onnx,
    write_results,
)
from ecprune_onnx import compress
from ecprune_onnx.calib import input_specs, load_calib
from ecprune_onnx.evaluate import measure_latency
from ecprune_onnx.groups import find_neuron_groups
from ecprune_onnx.modelio import load_model
from ecprune_onnx.neurons import prune_neurons
from ecprune_onnx.passes import layer_inputs
from ecprune_onnx.stats import LayerStats

RATIOS = (0.25, 0.5, 0.75)
LATENCY_BATCH = 512
LATENCY_SECONDS = 2.0  # per batch size and model pair, runs interleaved
CALIB_ROWS = 512


MODELS = (
    ModelSpec("digits 64-128-128-10", "digits", 0.0, (64, 128, 128, 10), 60, 3e-3),
    ModelSpec("diffusion-sorption 2-64-64-1", "ds", 0.005, (2, 64, 64, 1), 100, 3e-3),
    ModelSpec("large 64-1024-1024-10", "digits", 0.0, (64, 1024, 1024, 10), 40, 1e-3),
)

# Where the full run's results are committed.
RESULTS = Path(__file__).resolve().parent / "results"
QUICK_MODELS = (ModelSpec("digits 64-16-16-10", "digits", 0.0, (64, 16, 16, 10), 5, 3e-3),)


@dataclass(frozen=True)
class Row:
    """One method row: `compress(structure="neuron")` options, or FLAP's recipe."""

    label: str
    method: str
    scope: str = "global"
    compensate: bool | None = None  # None: the method's default
    flap: bool = False


ROWS = (
    # the recommended mode: greedy structured OBS scores, refit, measured global budget
    Row("ec (refit, measured budget)", "ec"),
    Row("ec --no-compensate", "ec", compensate=False),
    # ZipLM-like: greedy structured OBS + refit, the same share of every layer
    Row("ec --scope layer (≈ ZipLM)", "ec", scope="layer"),
    # FLAP-like: structured EC with c = 1 (fluctuation metric) and bias compensation
    Row("FLAP (c = 1, bias shift, uniform)", "ec", scope="layer", flap=True),
    Row("magnitude", "magnitude"),
    Row("magnitude --compensate", "magnitude", compensate=True),
    Row("random", "random"),
    Row("random --compensate", "random", compensate=True),
)


def unit_weight_stats(model: onnx.ModelProto, consumer, data) -> LayerStats:
    """EC's sums with every output sensitivity c = 1: S0 = rows, S1 = Σ a, S2 = Σ a². Then
    structured EC is ‖W[:, j]‖² · rows · Var(a_j), FLAP's fluctuation metric, and the bias
    shift is W[:, j] · mean(a_j), FLAP's compensation."""
    inputs = layer_inputs(model, model, consumer, data, 256)
    out = consumer.out_features
    sums = inputs.rows * inputs.mean_original
    squares = np.diag(inputs.centred_pp) + inputs.rows * np.square(inputs.mean_original)
    return LayerStats(
        s0=np.full(out, float(inputs.rows)),
        s1=np.broadcast_to(sums, (out, len(sums))).copy(),
        s2=np.broadcast_to(squares, (out, len(squares))).copy(),
        input_sq=squares,
        rows=inputs.rows,
    )


def flap_prune(path: Path, calib: Path, ratio: float, output: Path, seed: int) -> None:
    """FLAP's recipe through neurons.prune_neurons: unit-weighted structured EC scores, the
    removed units' means shifted into the consumers' biases, `ratio` of every layer."""
    model = load_model(path)
    data = load_calib(calib, input_specs(model))
    groups = find_neuron_groups(model).groups
    stats = {c.name: unit_weight_stats(model, c, data) for g in groups for c in g.consumers}
    pruned = prune_neurons(model, groups, stats, "ec", ratio, "layer", "bias", seed, None)
    onnx.save(pruned.model, output)


def prune(row: Row, path: Path, calib: Path, ratio: float, output: Path, seed: int) -> None:
    if row.flap:
        flap_prune(path, calib, ratio, output, seed)
        return
    compress(
        path,
        calib,
        ratio,
        output=output,
        method=row.method,
        scope=row.scope,
        compensate=row.compensate,
        structure="neuron",
        seed=seed,
        force=True,
    )


def one_thread_session(path: Path) -> ort.InferenceSession:
    """One intra-op thread: the machine's cores are shared, and both models get the same."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def latencies(
    original: Path, pruned: Path, x: np.ndarray, budget_seconds: float
) -> dict[str, float]:
    """Median ms at batch 1 and LATENCY_BATCH, both models interleaved (evaluate's way)."""
    sessions = one_thread_session(original), one_thread_session(pruned)
    rows = np.resize(x, (LATENCY_BATCH, x.shape[1])).astype(np.float32)
    record = {}
    for batch, label in ((rows[:1], "1"), (rows, str(LATENCY_BATCH))):
        timing = measure_latency(*sessions, {"x": batch}, ["y"], budget_seconds)
        record[f"latency_original_b{label}_ms"] = timing.original.median_ms
        record[f"latency_pruned_b{label}_ms"] = timing.pruned.median_ms
    return record


def task_metric(task, out: np.ndarray) -> float:
    if task.classification:
        return float((out.argmax(1) == task.y_test).mean())
    return float(np.mean((out.astype(np.float64) - task.y_test) ** 2))


def measure(task, path, calib, row: Row, ratio: float, seed: int, folder, latency_seconds) -> dict:
    """Prune once; quality on the test split, size and latency side by side."""
    output = folder / f"{path.stem}-{ROWS.index(row)}-{ratio}.onnx"
    started = time.perf_counter()
    prune(row, path, calib, ratio, output, seed)
    seconds = time.perf_counter() - started
    original, pruned = run_onnx(path, task.x_test), run_onnx(output, task.x_test)
    record = {
        "method": row.label,
        "ratio": ratio,
        "seconds": seconds,
        "output_mse": float(np.mean((pruned.astype(np.float64) - original) ** 2)),
        "metric": task_metric(task, pruned),
        "metric_original": task_metric(task, original),
        "size_original": os.path.getsize(path),
        "size_pruned": os.path.getsize(output),
        **latencies(path, output, task.x_test, latency_seconds),
    }
    output.unlink()
    return record


def run(models, seeds: int, ratios=RATIOS, latency_seconds=LATENCY_SECONDS, log=None) -> list[dict]:
    records = []
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        # seeds outermost: an interrupted run still has every model at seed 0
        for seed in range(seeds):
            for spec in models:
                task, path, calib = prepare(spec, seed, folder, CALIB_ROWS)
                for ratio in ratios:
                    for row in ROWS:
                        record = measure(
                            task, path, calib, row, ratio, seed, folder, latency_seconds
                        )
                        records.append({"model": spec.name, "seed": seed, **record})
                        print(json.dumps(records[-1]), flush=True, file=log)
    return records


def _mean_std(values: list[float]) -> str:
    if len(values) > 1:
        return f"{np.mean(values):.3g} ± {np.std(values):.1g}"
    return f"{values[0]:.3g}"


def _speed(record: dict, batch: str) -> float:
    return record[f"latency_original_b{batch}_ms"] / record[f"latency_pruned_b{batch}_ms"]


FIELDS = (
    ("output_mse", "output MSE vs the unpruned model", lambda r: r["output_mse"]),
    ("metric", None, lambda r: r["metric"]),
    ("size", "file size, original / pruned (×)", lambda r: r["size_original"] / r["size_pruned"]),
    ("speed_b1", "onnxruntime speed-up, batch 1 (×)", lambda r: _speed(r, "1")),
    (
        "speed_bN",
        f"onnxruntime speed-up, batch {LATENCY_BATCH} (×)",
        lambda r: _speed(r, str(LATENCY_BATCH)),
    ),
)


def tables(records: list[dict]) -> str:
    """One block per model: rows = methods, columns = ratios; mean ± std over seeds."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in records):
        rows = [r for r in records if r["model"] == model]
        metric = "test MSE vs clean targets" if model.startswith("diffusion") else "test accuracy"
        original = np.mean([r["metric_original"] for r in rows])
        lines += [f"#### {model}", "", f"Unpruned {metric}: {original:.4g}.", ""]
        lines += _latency_line(rows)
        ratios = list(dict.fromkeys(r["ratio"] for r in rows))
        for _, title, value in FIELDS:
            title = title or metric
            lines += [f"**{title}**", "", "| method | " + " | ".join(f"{x:g}" for x in ratios)]
            lines[-1] += " |"
            lines.append("|---" * (len(ratios) + 1) + "|")
            for method in dict.fromkeys(r["method"] for r in rows):
                cells = [
                    _mean_std([value(r) for r in rows if r["method"] == method and r["ratio"] == x])
                    for x in ratios
                ]
                lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def _latency_line(rows: list[dict]) -> list[str]:
    """The original model's absolute latency and file size, for scale."""
    b1 = np.median([r["latency_original_b1_ms"] for r in rows])
    bn = np.median([r[f"latency_original_b{LATENCY_BATCH}_ms"] for r in rows])
    size = rows[0]["size_original"]
    return [
        f"Original: {size:,} B; median latency {b1:.3g} ms at batch 1, {bn:.3g} ms at batch "
        f"{LATENCY_BATCH} (onnxruntime CPU, 1 thread).",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser, quick_help="one tiny model, ratio 0.5, 0.2 s of latency timing")
    args = parser.parse_args()
    models = chosen_models(args, MODELS, QUICK_MODELS)
    started = time.perf_counter()
    ratios = (0.5,) if args.quick else RATIOS
    latency_seconds = 0.2 if args.quick else LATENCY_SECONDS
    records = run(models, 1 if args.quick else args.seeds, ratios, latency_seconds)
    stem = "structured-quick" if args.quick else "structured"
    seconds = time.perf_counter() - started
    out = results_folder(args.out, args.quick, RESULTS, "structured")
    print(write_results(out, stem, records, tables(records), seconds))


if __name__ == "__main__":
    main()
