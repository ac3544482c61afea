"""ecprune-onnx: post-training elimination-compensation pruning of the dense layers of ONNX models.

    from ecprune_onnx import compress, evaluate

    result = compress("model.onnx", "calib.npz", 0.5)
    print(result.sparsity, result.measured_mse)
    verdict = evaluate("model.onnx", result.output, "test.npz", labels="y", min_accuracy=0.9)

Both return result objects and print nothing; bad input raises `UsageError`.
"""

import importlib
import sys
import types
from importlib import metadata

from ecprune_onnx.errors import UsageError

try:
    __version__ = metadata.version("ecprune-onnx")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0"

# The API by name, and the module that defines it. They load on first use: compress and
# finetune import torch, evaluate onnxruntime (seconds), which `ecprune-onnx --help` must
# not wait for.
_API_MODULES = {
    "compress": "compress",
    "CompressResult": "compress",
    "evaluate": "evaluate",
    "EvaluateResult": "evaluate",
    "finetune": "finetune",
    "FinetuneResult": "finetune",
}


def _load(name: str) -> object:
    return getattr(importlib.import_module(f"{__name__}.{_API_MODULES[name]}"), name)


class _Package(types.ModuleType):
    """The package, whose functions `compress`, `evaluate` and `finetune` share their names
    with their modules. Importing a submodule binds it to the package's attribute of that
    name, which would hide the function; these properties keep the function there."""


def _function_property(name: str) -> property:
    def get(package: types.ModuleType) -> object:
        return _load(name)

    def ignore_submodule(package: types.ModuleType, value: object) -> None:
        if not isinstance(value, types.ModuleType):
            raise AttributeError(f"ecprune_onnx.{name} is read-only")

    return property(get, ignore_submodule)


for _name in ("compress", "evaluate", "finetune"):
    setattr(_Package, _name, _function_property(_name))
del _name
sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> object:
    if name in _API_MODULES:
        return _load(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API_MODULES])


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
