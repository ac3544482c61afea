"""Which step of a compress sets its memory peak: the kernel's high-water mark (VmHWM),
reset on entry to each watched function and read on its exit, so a spike too short for
perf.py's 5 ms RSS sampler is still caught. Linux only (/proc/self/clear_refs).

    python -m benchmarks.peak_steps --size 1e8 --rows 4096 --method ecr

A watched function that calls another watched one loses the part of its peak before the
inner call's reset; the innermost step that holds the peak reports it exactly. Builds
perf.py's MLP of that size (in a temporary folder) and compresses it at ratio 0.5.
"""

from __future__ import annotations

import argparse
import importlib
import tempfile
from pathlib import Path

from benchmarks import perf

# (module, function): the steps watched, as named in the module that calls them.
STEPS = [
    ("ecprune_onnx.compress", "_statistics"),
    ("ecprune_onnx.stats", "_accumulate"),
    ("ecprune_onnx.stats", "_squared_jacobian_norms"),
    ("ecprune_onnx.compress", "_damage_scores"),
    ("ecprune_onnx.compress", "choose_masks"),
    ("ecprune_onnx.compress", "_bias_shifts"),
    ("ecprune_onnx.compress", "rewrite"),
    ("ecprune_onnx.sequential", "allocate_sparsity"),
    ("ecprune_onnx.sequential", "_current_layer"),
    ("ecprune_onnx.sequential", "layer_inputs"),
    ("ecprune_onnx.passes", "TapReader"),
    ("ecprune_onnx.passes", "add_gram"),
    ("ecprune_onnx.passes", "add_product"),
    ("ecprune_onnx.passes", "add_outer"),
    ("ecprune_onnx.sequential", "_dense_optimum"),
    ("ecprune_onnx.sequential", "_solver_inputs"),
    ("ecprune_onnx.reconstruct", "centred"),
    ("ecprune_onnx.sequential", "replace_parameters"),
    ("ecprune_onnx.compress", "_measured_deviation"),
]


def resident_gib() -> float:
    return perf.rss_bytes() / perf.GIB


def high_water_gib() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM"))
    return int(line.split()[1]) * 1024 / perf.GIB


def reset_high_water() -> None:
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


def watch(peaks: dict[str, tuple[float, float]]) -> None:
    """Wrap every step of STEPS to record (its peak, the resident size on entry), in GiB."""
    for module_name, name in STEPS:
        module = importlib.import_module(module_name)
        function = getattr(module, name)

        def watched(*args, _function=function, _name=name, **kwargs):
            reset_high_water()
            entry = resident_gib()
            try:
                return _function(*args, **kwargs)
            finally:
                peaks[_name] = max(peaks.get(_name, (0.0, 0.0)), (high_water_gib(), entry))

        setattr(module, name, watched)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=float, default=1e8, help="dense weights of the MLP")
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--method", default="ecr")
    args = parser.parse_args()
    import ecprune_onnx

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        model, width = perf.build_model(folder, args.size, 10)
        calib = perf.write_calib(folder, args.rows, width)
        peaks: dict[str, tuple[float, float]] = {}
        watch(peaks)
        baseline = resident_gib()
        ecprune_onnx.compress(
            str(model), str(calib), output=str(folder / "out.onnx"), method=args.method,
            ratio=0.5, device="cpu", force=True,
        )  # fmt: skip
    case = f"{args.method}, {args.size:.0e} weights, {args.rows} rows"
    print(f"{case}; resident before compress {baseline:.2f} GiB")
    print("| step | peak GiB | resident on entry GiB |")
    print("|---|---|---|")
    for name, (peak, entry) in sorted(peaks.items(), key=lambda item: -item[1][0]):
        print(f"| {name} | {peak:.2f} | {entry:.2f} |")


if __name__ == "__main__":
    main()
