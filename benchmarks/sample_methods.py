"""Every method on the shipped digits sample at a few ratios: test output MSE and accuracy.

    python benchmarks/sample_methods.py [--ratios 0.3 0.5 0.7] [--out /tmp/sample_methods.md]

Prints a markdown table (the one in README.md). One run per cell: the methods are
deterministic for a seed, and `random` uses seed 0. Global scope for the score methods.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from ecprune_onnx import compress, evaluate
from ecprune_onnx.options import METHOD_NAMES

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def measure(method: str, ratio: float, folder: Path) -> dict:
    """Compress the sample with one method and evaluate it on the held-out test set."""
    output = folder / f"{method}-{ratio}.onnx"
    started = time.perf_counter()
    compress(
        SAMPLES / "digits_mlp.onnx",
        SAMPLES / "calib.npz",
        ratio,
        labels="y",  # only `gradient` reads them
        output=output,
        method=method,
    )
    seconds = time.perf_counter() - started
    result = evaluate(SAMPLES / "digits_mlp.onnx", output, SAMPLES / "test.npz", labels="y")
    return {
        "mse": result.outputs[0].mse,
        "accuracy": result.metric_pruned,
        "baseline": result.metric_original,
        "seconds": seconds,
    }


def table(ratios: list[float]) -> str:
    rows = ["| method | " + " | ".join(f"ratio {r:g}: MSE / acc." for r in ratios) + " |"]
    rows.append("|---" * (len(ratios) + 1) + "|")
    baseline = None
    with tempfile.TemporaryDirectory() as folder:
        for method in METHOD_NAMES:
            cells = []
            for ratio in ratios:
                result = measure(method, ratio, Path(folder))
                baseline = result["baseline"]
                cells.append(f"{result['mse']:.3g} / {100 * result['accuracy']:.1f}%")
            rows.append(f"| `{method}` | " + " | ".join(cells) + " |")
    rows.append("")
    rows.append(f"Unpruned test accuracy: {100 * baseline:.1f}%.")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    text = table(args.ratios)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
