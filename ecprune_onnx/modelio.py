"""Read and write ONNX files: clear errors on bad input, atomic writes, external data kept."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import Message
from onnx.external_data_helper import set_external_data

from ecprune_onnx.errors import OutputExistsError, UsageError, one_line
from ecprune_onnx.options import check_model_file

# protobuf refuses to serialise a message of 2 GiB or more; stay clear of it.
PROTOBUF_LIMIT_BYTES = 1_800_000_000


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX model with its external data, or raise UsageError saying what is wrong."""
    path = Path(path)
    check_model_file(path)
    try:
        model = onnx.load(str(path), load_external_data=True)
    except PermissionError as err:
        raise UsageError(f"{path}: cannot read the model ({err.strerror})") from err
    except Exception as err:  # protobuf's DecodeError, onnx's ValidationError, OSError, ...
        raise UsageError(f"{path}: not a readable ONNX model ({one_line(err)})") from err
    if not model.graph.node:
        raise UsageError(f"{path}: not an ONNX model with a graph (no nodes found)")
    try:
        # Checked on the file, not the loaded proto: the in-memory check serialises the whole
        # model (seconds at 100M weights) and fails past protobuf's 2 GB limit.
        onnx.checker.check_model(str(path))
    except Exception as err:
        raise UsageError(f"{path}: invalid ONNX model ({one_line(err)})") from err
    return model


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes the initializers hold in memory (cheap: no serialisation)."""
    return sum(tensor_bytes(tensor) for tensor in model.graph.initializer)


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes a tensor's values take in memory, from its shape and element type: reading
    `raw_data` would copy them (protobuf hands out a new bytes object, 80 ms per 200 MB).
    External data not loaded takes none; strings count as serialised."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return 0
    if tensor.data_type == onnx.TensorProto.STRING:
        return tensor.ByteSize()
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return math.prod(tensor.dims) * itemsize


def too_large_to_serialise(model: onnx.ModelProto) -> bool:
    """Whether `model` must be written with external data to become a file or bytes: its
    initializers' values, plus the rest sized on a copy without them (`ByteSize` on the
    whole model encodes it, about 0.16 s per 200 MB of weights)."""
    weights = weight_bytes(model)
    if weights > PROTOBUF_LIMIT_BYTES:
        return True
    names = {tensor.name for tensor in model.graph.initializer}
    rest = copy_with_empty_initializers(model, names).ByteSize()
    return weights + rest > PROTOBUF_LIMIT_BYTES


def copy_with_empty_initializers(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """A copy of `model` in which the initializers `names` hold only their name, type and
    shape, for the caller to fill. Copying a weight only to overwrite it would hold it twice
    until the copy is freed: protobuf's upb runtime keeps the overwritten bytes in the
    message's arena (4 bytes per weight at the end of a compress)."""
    copied = onnx.ModelProto()
    copy_fields(model, copied, skip={"graph"})
    copy_fields(model.graph, copied.graph, skip={"initializer"})
    for tensor in model.graph.initializer:
        if tensor.name in names:
            copied.graph.initializer.add(
                name=tensor.name, data_type=tensor.data_type, dims=tensor.dims
            )
        else:
            copied.graph.initializer.append(tensor)
    return copied


def copy_fields(source, target, skip: set[str]) -> None:
    """Every set field of one message into another of the same type, but those in `skip`."""
    for descriptor, value in source.ListFields():
        if descriptor.name in skip:
            continue
        if isinstance(value, Message):
            getattr(target, descriptor.name).CopyFrom(value)
        elif hasattr(value, "extend"):  # a repeated field
            getattr(target, descriptor.name).extend(value)
        else:
            setattr(target, descriptor.name, value)


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
    """Refuse an output that is the input, exists (without force) or cannot be written.

    The output's external-data file `<output>.data` counts as part of the output when the
    input keeps external data: it must not exist without --force and may never be one of
    the input's own data files.
    """
    output = Path(output)
    if output.resolve() == Path(model_path).resolve():
        raise UsageError(f"{output}: the output would overwrite the input model; choose another -o")
    targets = [output]
    if _readable_with_external_data(model_path):
        data = data_path(output)
        if data.resolve() in {p.resolve() for p in external_data_files(model_path)}:
            raise UsageError(
                f"{data}: the output's data file would overwrite the input's external data; "
                "choose another -o"
            )
        targets.append(data)
    for target in targets:
        if target.exists() and not force:
            raise OutputExistsError(target)
        if target.exists() and not target.is_file():
            raise UsageError(f"{target}: exists and is not a file")
    folder = output.parent
    if not folder.is_dir():
        raise UsageError(f"{output}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{output}: folder {folder} is not writable")
    return output


def _readable_with_external_data(model_path: str | os.PathLike) -> bool:
    """False for a file that is not a readable model: `load_model` says what is wrong."""
    try:
        return Path(model_path).is_file() and file_uses_external_data(model_path)
    except Exception:
        return False


def data_path(output: str | os.PathLike) -> Path:
    """Where the external data of a model written to `output` goes."""
    output = Path(output)
    return output.with_name(f"{output.name}.data")


def external_data_files(path: str | os.PathLike) -> list[Path]:
    """The files the ONNX model at `path` keeps its external tensors in."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    locations = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entries = {entry.key: entry.value for entry in tensor.external_data}
            locations.add(entries.get("location", ""))
    return [path.parent / location for location in sorted(locations) if location]


class StagedModel:
    """A model written next to its destination but not yet in place (see `stage_model`).

    `path` can be opened (e.g. by onnxruntime) before `commit()` moves it into place;
    `discard()` removes it. Used as a context manager, it is discarded unless committed.
    """

    def __init__(self, output: Path, staging: Path, files: list[str]):
        self.output = output
        self.staging = staging
        self.files = files  # names inside staging: the model, then its data file if any
        self.path = staging / output.name

    def commit(self) -> None:
        """Move the files into place; on failure, put back whatever they replaced."""
        moved, backups = [], []
        try:
            for name in self.files:
                final = self.output.parent / name
                if final.exists():
                    backup = self.staging / f"previous.{name}"
                    os.replace(final, backup)
                    backups.append((backup, final))
            for name in reversed(self.files):  # the data file first, the model last
                os.replace(self.staging / name, self.output.parent / name)
                moved.append(self.output.parent / name)
        except OSError as err:
            for placed in moved:
                placed.unlink(missing_ok=True)
            for backup, final in backups:
                os.replace(backup, final)
            raise UsageError(f"{self.output}: cannot write the model ({_os_reason(err)})") from err
        finally:
            self.discard()

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> StagedModel:
        return self

    def __exit__(self, *exc_info) -> None:
        self.discard()


def stage_model(
    model: onnx.ModelProto, output: str | os.PathLike, external_data: bool
) -> StagedModel:
    """Write `model` into a temporary folder next to `output` (external data when asked, or
    when protobuf's 2 GB limit forces it, to `<output name>.data`)."""
    output = Path(output)
    external_data = external_data or too_large_to_serialise(model)
    staging = None
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
        staged = staging / output.name
        if external_data:
            save_with_external_data(model, staged)
        else:
            onnx.save_model(model, str(staged))
    except OSError as err:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise UsageError(f"{output}: cannot write the model ({_os_reason(err)})") from err
    files = [output.name] + (
        [data_path(output).name] if (staging / data_path(output).name).exists() else []
    )
    return StagedModel(output, staging, files)


def save_with_external_data(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write `model` to `path` with its tensors in `<path name>.data` beside it. onnx moves
    the weights out of the proto while it writes them (`onnx.load_external_data_for_model`
    puts them back).

    The tensors are marked here rather than by `save_model(save_as_external_data=True)`:
    onnx 1.23 refuses that when a file of the data file's name exists in the *current*
    folder (it tests the location relative to the working directory, not to `path`), so
    `--force` from the output's own folder failed."""
    location = data_path(path).name
    for tensor in all_initializers(model.graph):
        if tensor.HasField("raw_data") and tensor_bytes(tensor) >= EXTERNAL_DATA_MIN_BYTES:
            set_external_data(tensor, location)
    onnx.save_model(model, os.fspath(path))


# Tensors of at least this many bytes go to the data file (onnx's own default threshold).
EXTERNAL_DATA_MIN_BYTES = 1024


def subgraphs(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    """The bodies of an If, Loop or Scan node, each with the attribute that holds it."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.name, attr.g
        for graph in attr.graphs:
            yield attr.name, graph


def all_initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """The initializers of `graph` and of the subgraphs nested in it."""
    yield from graph.initializer
    for node in graph.node:
        for _, subgraph in subgraphs(node):
            yield from all_initializers(subgraph)


def _os_reason(err: OSError) -> str:
    return err.strerror or str(err) or type(err).__name__


def file_size(path: str | os.PathLike) -> int:
    """Bytes of an ONNX file plus the external data files it references."""
    files = [Path(path), *external_data_files(path)]
    return sum(file.stat().st_size for file in files if file.is_file())


def value_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Type and shape of every tensor that shape inference can tell."""
    try:
        inferred = onnx.shape_inference.infer_shapes(_weightless(model)).graph
    except Exception:  # inference is a convenience here: outputs may go untyped
        inferred = model.graph
    infos = {}
    for value in [*inferred.value_info, *inferred.input, *inferred.output]:
        infos.setdefault(value.name, value)
    return infos


# Initializers up to this many elements keep their values for shape inference (a Reshape's
# shape, a Slice's starts); larger ones are weights, of which inference needs only the shape.
INFERENCE_VALUE_ELEMENTS = 1024


def _weightless(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model for shape inference, with every large initializer replaced by a graph input
    of its type and shape. Inference serialises the model it is given and returns a parsed
    copy: with the weights that was four copies of them (2.5 s at 100M weights)."""
    graph = model.graph
    light = onnx.ModelProto(ir_version=model.ir_version)
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    light_graph = light.graph
    for field in ("node", "input", "output", "value_info", "sparse_initializer"):
        getattr(light_graph, field).extend(getattr(graph, field))
    inputs = {value.name for value in graph.input}
    for tensor in graph.initializer:
        if np.prod(tensor.dims, dtype=np.int64) <= INFERENCE_VALUE_ELEMENTS:
            light_graph.initializer.append(tensor)
        elif tensor.name not in inputs:  # IR 3 lists initializers among the inputs already
            info = onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
            light_graph.input.append(info)
    return light
