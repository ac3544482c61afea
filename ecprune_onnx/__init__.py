"""ecprune-onnx: post-training elimination-compensation pruning of the dense layers of ONNX models.

    from ecprune_onnx import compress, evaluate

    result = compress("model.onnx", "calib.npz", 0.5)
    print(result.sparsity, result.measured_mse)
    verdict = evaluate("model.onnx", result.output, "test.npz", labels="y", min_accuracy=0.9)

Both return result objects and print nothing; bad input raises `UsageError`.
"""

from importlib import metadata

# Imported eagerly although compress loads torch (about a second): the functions share
# their names with their modules, and a lazy attribute would be shadowed by the submodule
# as soon as anything imported `ecprune_onnx.compress`.
from ecprune_onnx.compress import CompressResult, compress
from ecprune_onnx.errors import UsageError
from ecprune_onnx.evaluate import EvaluateResult, evaluate
from ecprune_onnx.finetune import FinetuneResult, finetune

try:
    __version__ = metadata.version("ecprune-onnx")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0"

__all__ = [
    "CompressResult",
    "EvaluateResult",
    "FinetuneResult",
    "UsageError",
    "__version__",
    "compress",
    "evaluate",
    "finetune",
]
