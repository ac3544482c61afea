"""onnxruntime sessions: the one place that picks providers, opens sessions and runs batches.

CUDA is used only when it really works: the onnxruntime-gpu wheel lists
`CUDAExecutionProvider` on machines without a GPU (or without matching CUDA/cuDNN libraries)
and then logs errors for every session, so availability is probed once with a tiny model.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import onnx
import onnxruntime
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_tensor
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from ecprune_onnx.calib import batch_rows
from ecprune_onnx.errors import UsageError
from ecprune_onnx.held import is_held, mark_held, point_at, values_of_hollow
from ecprune_onnx.modelio import (
    all_initializers,
    copy_with_empty_initializers,
    save_with_external_data,
    tensor_bytes,
    too_large_to_serialise,
)

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
DEVICES = ("auto", "cpu", "cuda")

# Full float32 on the GPU, as torch computes the statistics: onnxruntime's CUDA provider
# otherwise rounds matrix products to TF32 (a 10-bit mantissa), a relative error near 1e-3
# that would swamp small measured damages and the parity check against torch.
CUDA_OPTIONS = {"use_tf32": "0"}

# Initializers of at least this many bytes reach onnxruntime as OrtValues over numpy arrays
# rather than inside the serialised model (`_session_from_proto`).
SHARED_INITIALIZER_BYTES = 1 << 16

# Element types numpy holds natively, which onnxruntime takes from numpy arrays.
_SHAREABLE = frozenset(
    {
        TensorProto.FLOAT,
        TensorProto.DOUBLE,
        TensorProto.FLOAT16,
        TensorProto.INT8,
        TensorProto.INT16,
        TensorProto.INT32,
        TensorProto.INT64,
        TensorProto.UINT8,
    }
)

# onnxruntime's logger levels: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal.
_ERRORS_ONLY = 3

# The failures onnxruntime raises when it cannot load or prepare a model: the user's file
# (an operator or opset this onnxruntime lacks, a broken graph), not a bug of ours.
_MODEL_LOAD_ERRORS = (
    ort_errors.Fail,
    ort_errors.InvalidArgument,
    ort_errors.InvalidGraph,
    ort_errors.InvalidProtobuf,
    ort_errors.NoSuchFile,
    ort_errors.NotFound,
    ort_errors.NotImplemented,
    ort_errors.RuntimeException,
)

# Element types of the outputs whose values we compare; strings, bools, maps and sequences
# (e.g. skl2onnx's ZipMap output, seq(map(int64, tensor(float)))) are left out.
_NUMERIC_TENSOR_TYPES = frozenset(
    f"tensor({element})"
    for element in (
        "float",
        "double",
        "float16",
        "bfloat16",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
    )
)


@functools.cache
def _quiet_onnxruntime_logging() -> None:
    """Lower onnxruntime's process-wide logger to errors only, once."""
    onnxruntime.set_default_logger_severity(_ERRORS_ONLY)


def _session_options() -> onnxruntime.SessionOptions:
    """Options every session shares: full graph optimization, errors-only logging."""
    _quiet_onnxruntime_logging()
    options = onnxruntime.SessionOptions()
    options.log_severity_level = _ERRORS_ONLY
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def _probe_model() -> onnx.ModelProto:
    """A one-node Identity model, just enough to make a provider allocate and run."""
    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "cuda_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    # IR 8 / opset 13 load in every onnxruntime this package supports (>= 1.18).
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _nvidia_driver_present() -> bool:
    """Whether the CUDA driver library loads: without it the CUDA provider cannot start."""
    library = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
    try:
        ctypes.CDLL(library)
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _silenced_native_stderr():
    """Send the C++ side's stderr to /dev/null: onnxruntime prints provider load failures
    there directly (onnxruntime-gpu 1.31), past its own log-severity setting."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@functools.cache
def cuda_usable() -> bool:
    """Whether onnxruntime can really run on CUDA here (probed once per process)."""
    if CUDA_PROVIDER not in onnxruntime.get_available_providers():
        return False
    if not _nvidia_driver_present():
        return False
    try:
        # onnxruntime warns (Python warnings) when it falls back from a listed provider.
        with warnings.catch_warnings(), _silenced_native_stderr():
            warnings.simplefilter("ignore")
            session = onnxruntime.InferenceSession(
                _probe_model().SerializeToString(),
                sess_options=_session_options(),
                providers=with_options([CUDA_PROVIDER, CPU_PROVIDER]),
            )
            if session.get_providers()[0] != CUDA_PROVIDER:
                return False
            session.run(None, {"x": np.zeros(1, dtype=np.float32)})
    except Exception:
        # Any failure (missing libcudart/cuDNN, no device, driver too old) means no CUDA.
        return False
    return True


def session_providers(device: str = "auto") -> list[str]:
    """The onnxruntime providers for `device`: "cpu", "cuda" (must work) or "auto"."""
    if device not in DEVICES:
        raise UsageError(f"device {device!r}: expected one of {', '.join(DEVICES)}")
    if device == "cpu":
        return [CPU_PROVIDER]
    if cuda_usable():
        return [CUDA_PROVIDER, CPU_PROVIDER]
    if device == "cuda":
        raise UsageError(
            "device 'cuda': onnxruntime cannot run on CUDA here "
            "(needs onnxruntime-gpu, an NVIDIA GPU and matching CUDA/cuDNN); use --device cpu"
        )
    return [CPU_PROVIDER]


def with_options(providers: list[str]) -> list[str | tuple[str, dict[str, str]]]:
    """`providers` as onnxruntime takes them, the CUDA provider with its options."""
    return [(name, CUDA_OPTIONS) if name == CUDA_PROVIDER else name for name in providers]


def open_session(
    model: onnx.ModelProto | str | os.PathLike,
    device: str = "auto",
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    consume: bool = False,
    held: Mapping[str, np.ndarray] | None = None,
) -> onnxruntime.InferenceSession:
    """An onnxruntime session for a model file or an in-memory model on `device`.

    A path lets onnxruntime read external data relative to the file itself. `transform`
    (in-memory models only) maps every initializer's values to those the session runs with,
    leaving the model as it is. `held`: the values of the model's hollow initializers
    (held.py), by name.

    `consume`: `model` is a throwaway copy (a slice from `instrument.with_outputs`) whose
    weights may go. Where it has initializers large enough to be handed over as arrays,
    they are moved to a temporary file that onnxruntime reads, so they exist once while the
    session lives, in onnxruntime. An in-memory session holds them twice: onnxruntime 1.31
    copies the arrays `add_external_initializers` gives it, and we keep those arrays alive,
    as its API asks (`benchmarks/session_memory.py`: 389 against 199 MiB for a 191 MiB
    weight). A small slice stays in memory: the file costs ~2.5 ms a session.
    """
    providers = session_providers(device)
    if isinstance(model, onnx.ModelProto):
        culprit = f"model {model.graph.name!r}"
        held = _held_values(model, held or {})
        large = any(_is_shared(t) or is_held(t) for t in model.graph.initializer)
        if consume and transform is None and large:
            return _session_through_file(model, providers, culprit, restore=False, held=held)
        return _session_from_proto(model, providers, culprit, transform, held)
    if transform is not None or consume or held:
        raise ValueError("transform, consume, held: only for an in-memory model")
    source = os.fspath(model)
    return _new_session(source, providers, source)


def _held_values(model: onnx.ModelProto, held: Mapping[str, np.ndarray]) -> dict:
    """The arrays of the model's hollow initializers, contiguous (`values_of_hollow`)."""
    return {
        name: np.ascontiguousarray(array) for name, array in values_of_hollow(model, held).items()
    }


def _session_from_proto(
    model: onnx.ModelProto,
    providers: list[str],
    culprit: str,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    held: Mapping[str, np.ndarray] | None = None,
) -> onnxruntime.InferenceSession:
    """A session on an in-memory model whose large initializers reach onnxruntime beside the
    serialised graph, as OrtValues over numpy arrays (`_shared_initializers`; a hollow one's
    held array): the bytes hold no copy of them, and a model past protobuf's 2 GB limit
    needs no temporary file. At 600M weights the file took 14.5 s of a compress."""
    shared = {**_shared_initializers(model), **(held or {})}
    light = copy_with_empty_initializers(model, set(shared))
    for tensor in light.graph.initializer:
        if tensor.name in shared:
            _mark_external(tensor)
        elif transform is not None:
            values = transform(numpy_helper.to_array(tensor))
            tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    if transform is not None:
        shared = {name: np.ascontiguousarray(transform(array)) for name, array in shared.items()}
    if too_large_to_serialise(light):  # large tensors of a type numpy cannot hand over
        return _session_through_file(model, providers, culprit, held=held)
    values = [onnxruntime.OrtValue.ortvalue_from_numpy(array) for array in shared.values()]
    options = _session_options()
    if values:
        options.add_external_initializers(list(shared), values)
    session = _new_session(light.SerializeToString(), providers, culprit, options)
    session.shared_initializers = values  # onnxruntime reads them while the session lives
    return session


def _shared_initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The main graph's initializers of at least SHARED_INITIALIZER_BYTES in a dtype numpy
    holds natively, as contiguous arrays by name."""
    return {
        tensor.name: np.ascontiguousarray(numpy_helper.to_array(tensor))
        for tensor in model.graph.initializer
        if _is_shared(tensor) and not is_held(tensor)
    }


def _is_shared(tensor: onnx.TensorProto) -> bool:
    """Whether `_session_from_proto` hands `tensor` over as an array (read from its size and
    type, not its data); a hollow one's held array is handed over anyway."""
    return tensor_bytes(tensor) >= SHARED_INITIALIZER_BYTES and tensor.data_type in _SHAREABLE


def _mark_external(tensor: onnx.TensorProto) -> None:
    """Point an emptied initializer at external data that `add_external_initializers` gives."""
    point_at(tensor, f"{tensor.name}.shared")


def _session_through_file(
    model: onnx.ModelProto,
    providers: list[str],
    culprit: str,
    restore: bool = True,
    held: Mapping[str, np.ndarray] | None = None,
) -> onnxruntime.InferenceSession:
    """onnxruntime reads `model` from a temporary file with external data, removed once the
    session holds the weights: for a model past protobuf's 2 GB limit, which cannot become
    bytes, and for a throwaway one (`restore=False`: its weights stay in the file). A hollow
    initializer's held array is written to a file of its own, and the model points there."""
    with tempfile.TemporaryDirectory(prefix="ecprune-session-", ignore_cleanup_errors=True) as tmp:
        path = os.path.join(tmp, "model.onnx")
        hollow = _point_at_held_files(model, held or {}, tmp)
        save_with_external_data(model, path)
        if restore:  # the caller's proto gets its weights back, and its hollow ones stay so
            for tensor in all_initializers(model.graph):
                if tensor.name in hollow:
                    mark_held(tensor)
                elif tensor.data_location == TensorProto.EXTERNAL:
                    load_external_data_for_tensor(tensor, tmp)
        return _new_session(path, providers, culprit)


def _point_at_held_files(
    model: onnx.ModelProto, held: Mapping[str, np.ndarray], folder: str
) -> set[str]:
    """Write each hollow initializer's array to a file in `folder`, point it there, and
    return their names."""
    hollow = [tensor for tensor in model.graph.initializer if is_held(tensor)]
    for index, tensor in enumerate(hollow):
        location = f"held-{index}.bin"
        with open(os.path.join(folder, location), "wb") as file:
            file.write(memoryview(held[tensor.name]).cast("B"))
        point_at(tensor, location)
    return {tensor.name for tensor in hollow}


def _new_session(
    source: str | bytes,
    providers: list[str],
    culprit: str,
    options: onnxruntime.SessionOptions | None = None,
) -> onnxruntime.InferenceSession:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return onnxruntime.InferenceSession(
                source,
                sess_options=options or _session_options(),
                providers=with_options(providers),
            )
    except _MODEL_LOAD_ERRORS as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"{culprit}: onnxruntime cannot load the model: {reason}") from error


def tensor_output_names(session: onnxruntime.InferenceSession) -> list[str]:
    """Names of the session's float and integer tensor outputs, in graph order."""
    return [output.name for output in session.get_outputs() if output.type in _NUMERIC_TENSOR_TYPES]


def _join_batches(pieces: list[np.ndarray]) -> np.ndarray:
    """One array from per-batch outputs; a scalar output per batch becomes one row each."""
    if pieces[0].ndim == 0:
        return np.stack(pieces)
    return np.concatenate(pieces, axis=0)


def run(
    session: onnxruntime.InferenceSession,
    names: list[str],
    feeds: dict[str, np.ndarray],
    source: str | os.PathLike = "the data",
) -> list[np.ndarray]:
    """session.run, with onnxruntime's refusal of the inputs (a width or a fixed dimension
    the data does not have) turned into a UsageError that names the data."""
    try:
        return session.run(names, feeds)
    except _MODEL_LOAD_ERRORS as error:
        reason = " ".join(str(error).split())[:240] or type(error).__name__
        raise UsageError(f"{source}: onnxruntime cannot run the model on it: {reason}") from error


def run_batches(
    session: onnxruntime.InferenceSession,
    batches: Iterable[dict[str, np.ndarray]],
    output_names: list[str] | None = None,
    progress: Callable[[int], None] | None = None,
    source: str | os.PathLike = "the data",
) -> dict[str, np.ndarray]:
    """Run every batch and join each output along axis 0.

    output_names: None runs the numeric tensor outputs (`tensor_output_names`), since maps
    and sequences cannot be joined. progress(rows of the batch) is called after each batch.
    `source` names the data in errors.
    """
    names = tensor_output_names(session) if output_names is None else list(output_names)
    pieces: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for batch in batches:
        for name, value in zip(names, run(session, names, batch, source), strict=True):
            pieces[name].append(np.asarray(value))
        if progress is not None:
            progress(batch_rows(batch))
    return {name: _join_batches(values) for name, values in pieces.items() if values}
