"""Speed and precision of `collect_stats` (the statistics batch loop) on the perf MLP.

    python benchmarks/stats_precision.py [--width 2048] [--rows 4096] [--outputs 10 1000]
                                         [--repeats 3] [--baseline OLD_STATS_PY] [--device cpu]

Builds benchmarks/perf.py's three-layer MLP (x → Gemm → Relu → Gemm → Relu → Gemm → y, the
input and both hidden layers `--width` wide) and `--rows` random calibration rows, then runs
`collect_stats` in batches of 256 (compress's default) with 16 probes (compress's default
--probes: exact probes for 10 outputs, Hutchinson for 1000) and prints per case

- seconds: best of `--repeats` runs of the current `ecprune_onnx.stats` and, with
  `--baseline`, of another version of the module (e.g. `git show HEAD~1:ecprune_onnx/stats.py
  > /tmp/old.py`), interleaved in one process so machine load hits both alike;
- precision: the current per-batch products (float32 for a float32 model) against the same
  loop with the products forced to float64, on the same activations and probes: max relative
  error of S1, S2 and S2 − S1²/S0 over every layer (`precision`), and the largest share of a
  layer's 50% EC mask decisions (w² (S2 − S1²/S0) against its median) that change.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perf import BATCH_SIZE, EXACT_PROBE_LIMIT, build_model, write_calib  # noqa: E402

from ecprune_onnx import stats as current  # noqa: E402
from ecprune_onnx.instrument import TorchGraph, instrument  # noqa: E402
from ecprune_onnx.layers import find_dense_layers  # noqa: E402
from ecprune_onnx.scores import ec_importance  # noqa: E402


def load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("baseline_stats", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def prepare(folder: Path, width: int, rows: int, outputs: int, device: torch.device):
    """The perf MLP with hidden width `width` (perf sizes it by weight count) and its data."""
    path, built = build_model(folder, 2 * width * width + width * outputs, outputs)
    assert built == width
    model = onnx.load(path)
    layers = find_dense_layers(model).layers
    instrumented, roles = instrument(model, layers, ["y"])
    graph = TorchGraph(instrumented, device)
    x = np.load(write_calib(folder, rows, width))["x"]
    batches = [{"x": x[start : start + BATCH_SIZE]} for start in range(0, rows, BATCH_SIZE)]
    return layers, graph, roles, batches


def best_seconds(modules: dict[str, ModuleType], case, repeats: int) -> dict[str, float]:
    layers, graph, roles, batches = case
    best = dict.fromkeys(modules, float("inf"))
    for _ in range(repeats):
        for name, module in modules.items():
            started = time.perf_counter()
            module.collect_stats(graph, roles, layers, batches, EXACT_PROBE_LIMIT, 0)
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def float64_products(case):
    """The statistics with every product in float64: `_product_dtype` patched."""
    layers, graph, roles, batches = case
    chosen = current._product_dtype
    current._product_dtype = lambda dtype: torch.float64
    try:
        return current.collect_stats(graph, roles, layers, batches, EXACT_PROBE_LIMIT, 0)[0]
    finally:
        current._product_dtype = chosen


def precision(case) -> dict[str, float]:
    """Max relative errors over all layers. S1 changes sign where the activations do (the
    first layer's input), so its elementwise error is taken on the ReLU inputs, and over all
    layers relative to the largest |S1| of the row."""
    layers, graph, roles, batches = case
    stats = current.collect_stats(graph, roles, layers, batches, EXACT_PROBE_LIMIT, 0)[0]
    reference = float64_products(case)
    errors = dict.fromkeys(ERRORS, 0.0)
    for index, layer in enumerate(layers):
        got, ref = stats[layer.name], reference[layer.name]
        centred = got.s2 - got.s1**2 / got.s0[:, None]
        ref_centred = ref.s2 - ref.s1**2 / ref.s0[:, None]
        row_scale = np.abs(ref.s1).max(axis=1, keepdims=True)
        layer_errors = {
            "S1, ReLU inputs": relative(got.s1, ref.s1) if index > 0 else 0.0,
            "S1 / row max": relative(got.s1 / row_scale, ref.s1 / row_scale, absolute=True),
            "S2": relative(got.s2, ref.s2),
            "S2 − S1²/S0": relative(centred, ref_centred),
            "mask decisions changed": changed_decisions(layer.weight, got, ref),
        }
        errors = {name: max(errors[name], layer_errors[name]) for name in ERRORS}
    return errors


ERRORS = ["S1, ReLU inputs", "S1 / row max", "S2", "S2 − S1²/S0", "mask decisions changed"]


def changed_decisions(weight: np.ndarray, got, ref) -> float:
    """The share of the layer's 50% EC mask decisions (score against its median) that flip."""
    score = ec_importance(weight, got.s0, got.s1, got.s2)
    ref_score = ec_importance(weight, ref.s0, ref.s1, ref.s2)
    return float(np.mean((score <= np.median(score)) != (ref_score <= np.median(ref_score))))


def relative(value: np.ndarray, reference: np.ndarray, absolute: bool = False) -> float:
    scale = 1.0 if absolute else np.maximum(np.abs(reference), 1e-300)
    return float(np.max(np.abs(value - reference) / scale))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--outputs", type=int, nargs="+", default=[10, 1000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="another stats.py to time against")
    parser.add_argument("--device", default="cpu", help="the torch graph's device (cpu, cuda)")
    args = parser.parse_args(argv)
    modules = {"current": current}
    if args.baseline:
        modules["baseline"] = load_module(args.baseline)
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {where}")
    print("| outputs | probes | " + " | ".join(f"{name} s" for name in modules), end="")
    print(" | " + " | ".join(ERRORS) + " |")
    with tempfile.TemporaryDirectory() as folder:
        for outputs in args.outputs:
            case = prepare(Path(folder), args.width, args.rows, outputs, torch.device(args.device))
            seconds = best_seconds(modules, case, args.repeats)
            errors = precision(case)
            plan = current.plan_probes(outputs, EXACT_PROBE_LIMIT)
            cells = [str(outputs), plan.label] + [f"{seconds[name]:.2f}" for name in modules]
            cells += [f"{value:.1e}" for value in errors.values()]
            print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
