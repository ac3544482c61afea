"""The names, defaults and model-free checks of the options, kept free of heavy imports.

The command line builds its help from these names and refuses a bad option or a missing
file before it loads numpy, onnx, onnxruntime and torch (seconds); the library runs the
same checks. The registries behind the method names are `scores.METHODS` and
`sequential.RECONSTRUCTORS`; tests/test_options.py checks that they agree with this list.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from ecprune_onnx.errors import UsageError

# Score-and-mask methods (scores.py), then layer-sequential reconstructions (sequential.py).
SCORE_METHODS = ("ec", "sensitivity", "magnitude", "wanda", "random", "gradient")
RECONSTRUCTION_METHODS = ("sparsegpt", "obc", "ecr")
METHOD_NAMES = (*SCORE_METHODS, *RECONSTRUCTION_METHODS)
# The lowest output deviation of every method at every sparsity measured (BENCHMARKS.md,
# "Reconstruction"); `ec`, the paper's criterion, when kept weights must not change.
DEFAULT_METHOD = "ecr"
# --structure neuron orders whole units; `ec` is its recommended method (neurons.py).
DEFAULT_NEURON_METHOD = "ec"
# --structure neuron --weight-ratio: the method of the weight stage.
DEFAULT_WEIGHT_METHOD = "ecr"
# weight: zero single weights; neuron: remove whole hidden units and shrink the matrices.
STRUCTURES = ("weight", "neuron")
SCOPES = ("global", "layer", "row")
# How a global threshold on predicted damage (ec, sensitivity) shares the removals among the
# layers: by damage curves measured in onnxruntime (budget.py), or by the predicted damage;
# auto measures up to budget.MEASURED_MAX_WEIGHTS dense weights.
BUDGETS = ("auto", "measured", "predicted")


def default_method(structure: str) -> str:
    return DEFAULT_NEURON_METHOD if structure == "neuron" else DEFAULT_METHOD


def check_ratio(ratio: float) -> float:
    if not 0.0 <= ratio < 1.0 or math.isnan(ratio):
        raise UsageError(f"--ratio {ratio}: expected a fraction in [0, 1), e.g. 0.5")
    return float(ratio)


def check_method(method: str, flag: str = "--method") -> None:
    if method not in METHOD_NAMES:
        raise UsageError(f"{flag} {method}: expected one of {', '.join(METHOD_NAMES)}")


_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_memory(text: str) -> int:
    """--max-memory: bytes, or a number with K, M, G or T (binary units), e.g. 8G, 1.5G."""
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = value[-1:] if value[-1:] in _SIZE_UNITS and value[-1:] else ""
    try:
        size = float(value[: len(value) - len(unit)]) * _SIZE_UNITS[unit]
    except ValueError:
        size = math.nan
    if not math.isfinite(size) or size < 1:
        raise UsageError(f"--max-memory {text}: expected a size such as 8G, 512M or 2e9 (bytes)")
    return int(size)


def check_max_memory(max_memory: int | None) -> None:
    if max_memory is not None and not max_memory >= 1:
        raise UsageError(f"--max-memory {max_memory}: expected a number of bytes >= 1")


def check_model_file(path: str | os.PathLike) -> None:
    """The model path names an existing file (whether it is a model is onnx's to say)."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: model file not found")
    if not path.is_file():
        raise UsageError(f"{path}: not a file (expected an .onnx model file)")


def check_data_file(path: str | os.PathLike, flag: str) -> None:
    """The NPZ path of --calib or --data names an existing file."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{flag} {path}: file not found; expected an .npz of arrays")
    if not path.is_file():
        raise UsageError(f"{flag} {path}: not a file; expected an .npz of arrays")
