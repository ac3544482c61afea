"""Reconstruction methods side by side: output MSE, task metric and compress time.

    python -m benchmarks.reconstruction [--quick] [--seeds 3] [--models PREFIX ...]
                                        [--methods M ...] [--settings S ...] [--out DIR]

For each model (the paper tasks' digits and diffusion–sorption MLPs, and a ≥ 1M-parameter
MLP with a 1024-wide layer), each seed (training init and calibration rows), each setting
(sparsity 0.5 / 0.7 / 0.8 / 0.9 and the 2:4 pattern) and each method, the model is
compressed with the CLI's library call and evaluated on the held-out test set with
onnxruntime: output MSE against the unpruned model, and accuracy (digits) or MSE against
the clean targets (diffusion–sorption). Methods run one after another in one process, so
their compress times are measured side by side. Writes `reconstruction.json` and
`reconstruction.md` (the tables of BENCHMARKS.md) to --out.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

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
from ecprune_onnx.layers import find_dense_layers
from ecprune_onnx.modelio import load_model

METHODS = ("magnitude", "wanda", "ec", "sparsegpt", "obc", "ecr")
SETTINGS = ("0.5", "0.7", "0.8", "0.9", "2:4")


MODELS = (
    ModelSpec("digits 64-64-64-10", "digits", 0.0, (64, 64, 64, 10), 60, 3e-3),
    ModelSpec("diffusion-sorption 2-64-64-1", "ds", 0.005, (2, 64, 64, 1), 100, 3e-3),
    # ≥ 1M weights with a 1024-wide layer; its consumer has 10 outputs, which keeps the
    # exact OBC rival (cost ~ out · in^3 per layer) within minutes on a 2-core CPU.
    ModelSpec(
        "large 64-512x4-1024-10", "digits", 0.0, (64, 512, 512, 512, 512, 1024, 10), 40, 1e-3
    ),
)
QUICK_MODELS = (
    ModelSpec("digits 64-16-16-10", "digits", 0.0, (64, 16, 16, 10), 5, 3e-3),
    ModelSpec("diffusion-sorption 2-16-16-1", "ds", 0.005, (2, 16, 16, 1), 5, 3e-3),
)

# Where the full run's results are committed.
RESULTS = Path(__file__).resolve().parent / "results"
CALIB_ROWS = 512


def pattern_exclusions(path: Path, group: int) -> list[str]:
    """Layers whose input count is not a multiple of M cannot take an N:M pattern."""
    layers = find_dense_layers(load_model(path)).layers
    return [layer.name for layer in layers if layer.in_features % group]


def measure(task, path: Path, calib: Path, method: str, setting: str, folder: Path) -> dict:
    """Compress once and evaluate the result on the held-out test set."""
    output = folder / f"{path.stem}-{method}-{setting.replace(':', 'of')}.onnx"
    pattern = setting if ":" in setting else None
    ratio = None if pattern else float(setting)
    exclude = pattern_exclusions(path, 4) if pattern else []
    started = time.perf_counter()
    result = compress(
        path,
        calib,
        ratio,
        pattern=pattern,
        exclude=exclude,
        output=output,
        method=method,
        force=True,
    )
    seconds = time.perf_counter() - started
    original, pruned = run_onnx(path, task.x_test), run_onnx(output, task.x_test)
    record = {
        "method": method,
        "setting": setting,
        "seconds": seconds,
        "sparsity": result.sparsity,
        "output_mse": float(np.mean((pruned.astype(np.float64) - original) ** 2)),
    }
    if task.classification:
        record["metric"] = float((pruned.argmax(1) == task.y_test).mean())
        record["metric_original"] = float((original.argmax(1) == task.y_test).mean())
    else:
        record["metric"] = float(np.mean((pruned - task.y_test) ** 2))
        record["metric_original"] = float(np.mean((original - task.y_test) ** 2))
    output.unlink()
    return record


def run(models, seeds: int, methods=METHODS, settings=SETTINGS) -> list[dict]:
    records = []
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        for spec in models:
            for seed in range(seeds):
                task, path, calib = prepare(spec, seed, folder, CALIB_ROWS)
                for setting in settings:
                    for method in methods:
                        record = measure(task, path, calib, method, setting, folder)
                        records.append({"model": spec.name, "seed": seed, **record})
                        print(json.dumps(records[-1]), flush=True)
    return records


def _mean_std(values: list[float]) -> str:
    return (
        f"{np.mean(values):.3g} ± {np.std(values):.1g}" if len(values) > 1 else f"{values[0]:.3g}"
    )


def tables(records: list[dict]) -> str:
    """One table per model: rows = methods, columns = settings; output MSE, task metric and
    compress time, mean ± std over seeds."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in records):
        rows = [r for r in records if r["model"] == model]
        classification = "digits" in model or "large" in model
        metric = "test accuracy" if classification else "test MSE vs clean targets"
        original = np.mean([r["metric_original"] for r in rows])
        lines += [f"### {model}", "", f"Unpruned {metric}: {original:.4g}.", ""]
        settings = list(dict.fromkeys(r["setting"] for r in rows))
        for field, title in (
            ("output_mse", "output MSE vs the unpruned model"),
            ("metric", metric),
            ("seconds", "compress time, s"),
        ):
            lines += [
                f"**{title}**",
                "",
                "| method | " + " | ".join(settings) + " |",
                "|---" * (len(settings) + 1) + "|",
            ]
            for method in dict.fromkeys(r["method"] for r in rows):
                cells = [
                    _mean_std(
                        [r[field] for r in rows if r["method"] == method and r["setting"] == s]
                    )
                    for s in settings
                ]
                lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser, quick_help="tiny models, one seed")
    parser.add_argument("--methods", nargs="*", choices=METHODS, help="a subset of the methods")
    parser.add_argument("--settings", nargs="*", choices=SETTINGS, help="a subset of them")
    args = parser.parse_args()
    models = chosen_models(args, MODELS, QUICK_MODELS)
    started = time.perf_counter()
    records = run(
        models, 1 if args.quick else args.seeds, args.methods or METHODS, args.settings or SETTINGS
    )
    stem = "reconstruction-quick" if args.quick else "reconstruction"
    seconds = time.perf_counter() - started
    out = results_folder(args.out, args.quick, RESULTS, "reconstruction")
    print(write_results(out, stem, records, tables(records), seconds))


if __name__ == "__main__":
    main()
