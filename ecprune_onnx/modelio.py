"""Read and write ONNX files: clear errors on bad input, atomic writes, external data kept."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx

from ecprune_onnx.errors import UsageError

# protobuf refuses to serialise a message of 2 GiB or more; stay clear of it.
PROTOBUF_LIMIT_BYTES = 1_800_000_000


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX model with its external data, or raise UsageError saying what is wrong."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: model file not found")
    if not path.is_file():
        raise UsageError(f"{path}: not a file (expected an .onnx model file)")
    try:
        model = onnx.load(str(path), load_external_data=True)
    except PermissionError as err:
        raise UsageError(f"{path}: cannot read the model ({err.strerror})") from err
    except Exception as err:  # protobuf's DecodeError, onnx's ValidationError, OSError, ...
        raise UsageError(f"{path}: not a readable ONNX model ({_one_line(err)})") from err
    if not model.graph.node:
        raise UsageError(f"{path}: not an ONNX model with a graph (no nodes found)")
    try:
        onnx.checker.check_model(model)
    except Exception as err:
        raise UsageError(f"{path}: invalid ONNX model ({_one_line(err)})") from err
    return model


def uses_external_data(model: onnx.ModelProto) -> bool:
    """Whether the model was stored with external data (checked before it is loaded in)."""
    return any(
        tensor.data_location == onnx.TensorProto.EXTERNAL for tensor in model.graph.initializer
    )


def file_uses_external_data(path: str | os.PathLike) -> bool:
    """Whether the ONNX file at `path` keeps any initializer in an external file."""
    return uses_external_data(onnx.load(str(path), load_external_data=False))


def default_output_path(model_path: str | os.PathLike) -> Path:
    """`model.onnx` → `model.pruned.onnx` beside it."""
    model_path = Path(model_path)
    stem = model_path.stem if model_path.suffix == ".onnx" else model_path.name
    return model_path.with_name(f"{stem}.pruned.onnx")


def check_output_path(
    model_path: str | os.PathLike, output: str | os.PathLike, force: bool
) -> Path:
    """Refuse an output that is the input, exists (without force) or cannot be written."""
    output = Path(output)
    if output.resolve() == Path(model_path).resolve():
        raise UsageError(f"{output}: the output would overwrite the input model; choose another -o")
    if output.exists() and not force:
        raise UsageError(f"{output}: already exists; pass --force to overwrite it")
    if output.exists() and not output.is_file():
        raise UsageError(f"{output}: exists and is not a file")
    folder = output.parent
    if not folder.is_dir():
        raise UsageError(f"{output}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{output}: folder {folder} is not writable")
    return output


def save_model(model: onnx.ModelProto, output: str | os.PathLike, external_data: bool) -> None:
    """Write `model` to `output` atomically: nothing at `output` changes unless all went well.

    With external data (asked for, or forced by protobuf's 2 GB limit) the tensors go to
    `<output name>.data` beside it. Both files are written in a temporary folder next to
    the target and renamed into place, the data file first.
    """
    output = Path(output)
    external_data = external_data or model.ByteSize() > PROTOBUF_LIMIT_BYTES
    data_name = f"{output.name}.data"
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        staged = staging / output.name
        if external_data:
            onnx.save_model(
                model,
                str(staged),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=1024,
            )
        else:
            onnx.save_model(model, str(staged))
        if (staging / data_name).exists():
            os.replace(staging / data_name, output.parent / data_name)
        os.replace(staged, output)
    except OSError as err:
        raise UsageError(f"{output}: cannot write the model ({err.strerror or err})") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def file_size(path: str | os.PathLike) -> int:
    """Bytes of an ONNX file plus the external data files it references."""
    path = Path(path)
    total = path.stat().st_size
    model = onnx.load(str(path), load_external_data=False)
    locations = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entries = {entry.key: entry.value for entry in tensor.external_data}
            locations.add(entries.get("location", ""))
    for location in locations:
        data_path = path.parent / location
        if location and data_path.is_file():
            total += data_path.stat().st_size
    return total


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."
