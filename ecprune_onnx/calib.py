"""Load calibration (or evaluation) data from an NPZ, check it against the model's inputs, batch it.

The NPZ holds one array per model input, named after it, all sharing the batch dimension;
a model with one input also takes an NPZ with one array, or one array besides the labels.
The batch is the first dimension of an input unless the model says otherwise: a scalar
input (rank 0, e.g. a sample rate) has none and is fed whole with every batch, and an
input that carries the batch's symbolic dimension elsewhere (a recurrent state
[2, batch, 128]) is batched along that axis. `batch_axes` overrides both.

Every problem with the file is a `UsageError` naming the file, the array and
what was expected, raised before any statistics are computed.
"""

from __future__ import annotations

import math
import mmap
import operator
import struct
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
from onnx import helper

from ecprune_onnx.errors import UsageError, one_line

# A size per dimension: int static, str symbolic (dim_param), None unknown.
Dim = int | str | None

# Arrays declaring more than this are refused before anything is allocated: a corrupt or
# hostile .npy header can declare any shape, and calibration sets are far smaller.
MAX_ARRAY_BYTES = 8 * 1024**3

# What reading a damaged archive or member raises: numpy's format checks (ValueError),
# zipfile and zlib on corrupt data, truncated streams (EOFError, OSError), and zipfile on a
# compression method it does not implement.
_READ_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError)

_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with members; an empty zip

# Elements per block when counting non-finite values: keeps the temporary mask small
# next to a multi-GiB array.
_FINITE_BLOCK_ELEMENTS = 1 << 24
# Arrays of at least this many bytes stored uncompressed are mapped from the file
# (`_mapped_member`); smaller ones are read, which costs nothing worth saving.
MAPPED_MIN_BYTES = 16 << 20
# A zip local file header: 30 bytes, then the name and an extra field of the lengths it gives.
_LOCAL_HEADER_BYTES = 30


@dataclass(frozen=True)
class InputSpec:
    """One graph input the data must feed.

    dtype: the numpy dtype of the input's ONNX elem_type.
    shape: one `Dim` per dimension; None when the model does not declare the rank.
    """

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...] | None
    batch_axis: int | None = 0  # None: no batch axis, the array is fed whole every batch


def input_specs(
    model: onnx.ModelProto, batch_axes: Mapping[str, int | None] | None = None
) -> list[InputSpec]:
    """The graph inputs that are real inputs, in graph order, with their batch axes.

    ONNX IR version 3 required every initializer to be listed as a graph input too, and
    exporters of that era (PyTorch < 1.x, older tf2onnx/keras2onnx) still write files like
    that; those inputs already have values and are not fed.
    """
    initialized = {tensor.name for tensor in model.graph.initializer}
    specs = [_input_spec(value) for value in model.graph.input if value.name not in initialized]
    return _with_batch_axes(specs, dict(batch_axes or {}))


def _with_batch_axes(specs: list[InputSpec], chosen: dict[str, int | None]) -> list[InputSpec]:
    """Each input's batch axis: as chosen, else none for a scalar, else where it holds the
    symbolic dimension most inputs start with, else the first."""
    unknown = sorted(set(chosen) - {spec.name for spec in specs})
    if unknown:
        names = ", ".join(repr(spec.name) for spec in specs)
        raise UsageError(f"--batch-axis {unknown[0]}: no such model input (inputs: {names})")
    starts = [spec.shape[0] for spec in specs if spec.shape and isinstance(spec.shape[0], str)]
    symbol = max(set(starts), key=starts.count) if starts else None
    placed = []
    for spec in specs:
        if spec.name in chosen:
            axis = chosen[spec.name]
            rank = len(spec.shape) if spec.shape is not None else None
            if axis is not None and rank is not None and not 0 <= axis < rank:
                raise UsageError(
                    f"--batch-axis {spec.name}={axis}: model input {spec.name!r} has rank "
                    f"{rank}; expected an axis from 0 to {rank - 1}, or 'none'"
                )
        elif spec.shape == ():
            axis = None
        elif spec.shape and symbol is not None and symbol in spec.shape:
            axis = spec.shape.index(symbol)
        else:
            axis = 0
        placed.append(InputSpec(spec.name, spec.dtype, spec.shape, axis))
    return placed


def parse_batch_axes(texts: Iterable[str]) -> dict[str, int | None]:
    """`NAME=AXIS` (or `NAME=none`) options as a mapping, or UsageError."""
    axes: dict[str, int | None] = {}
    for text in texts:
        name, sep, axis = text.rpartition("=")
        if not sep or not name or not (axis.isdigit() or axis == "none"):
            raise UsageError(f"--batch-axis {text}: expected NAME=AXIS (e.g. state=1) or NAME=none")
        axes[name] = None if axis == "none" else int(axis)
    return axes


def _input_spec(value: onnx.ValueInfoProto) -> InputSpec:
    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        found = kind.removesuffix("_type").replace("_", " ") if kind else "value with no type"
        raise UsageError(
            f"model input {value.name!r} is a {found}; only tensor inputs are supported"
        )
    tensor_type = value.type.tensor_type
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
    except KeyError:
        raise UsageError(
            f"model input {value.name!r} has ONNX element type {tensor_type.elem_type}, "
            "which has no numpy dtype; expected a numeric tensor"
        ) from None
    shape = None
    if tensor_type.HasField("shape"):
        shape = tuple(_dim(dim) for dim in tensor_type.shape.dim)
    return InputSpec(value.name, dtype, shape)


def _dim(dim: onnx.TensorShapeProto.Dimension) -> Dim:
    which = dim.WhichOneof("value")
    if which == "dim_value":
        return dim.dim_value
    if which == "dim_param":
        return dim.dim_param or None
    return None


@dataclass(frozen=True, eq=False)  # eq=False: comparing dicts of arrays has no truth value
class CalibData:
    """Validated data: one array per model input, and optional labels, sharing `rows`.

    arrays: keyed by the model's input names, in input order, as loaded from `path`.
    batch_axes: the axis of each array that holds the rows (None: fed whole every batch).
    """

    path: Path
    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None
    rows: int
    fixed_batch: int | None = None  # a model exported with a static batch size takes only that
    batch_axes: dict[str, int | None] = field(default_factory=dict)

    def batches(self, batch_size: int) -> Iterator[Batch]:
        """Consecutive slices of `batch_size` rows (the last may be smaller), in order; of
        exactly `fixed_batch` rows when the model fixes its batch size.

        Each array is made contiguous, as onnxruntime and torch want; a slice of a
        C-ordered array along its first axis is already, and costs no copy.
        """
        batch_size = self.fixed_batch or batch_size
        starts = _batch_starts(self.rows, batch_size)
        return (
            Batch(
                {
                    name: self._rows_of(name, array, start, start + batch_size)
                    for name, array in self.arrays.items()
                },
                rows=min(batch_size, self.rows - start),
            )
            for start in starts
        )

    def _rows_of(self, name: str, array: np.ndarray, start: int, stop: int) -> np.ndarray:
        axis = self.batch_axes.get(name, 0)
        if axis is None:
            return array
        rows = array[(slice(None),) * axis + (slice(start, stop),)]
        if file_mapping(array) is None:
            return np.ascontiguousarray(rows)
        rows = np.array(rows, order="C")  # a copy: the mapping's pages go back now
        release_pages(array)
        return rows

    def label_batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """The labels, sliced exactly as `batches` slices the inputs."""
        batch_size = self.fixed_batch or batch_size
        if self.labels is None:
            raise UsageError(f"{self.path}: no labels were loaded; expected a labels key")
        labels = self.labels
        starts = _batch_starts(self.rows, batch_size)
        return (np.ascontiguousarray(labels[start : start + batch_size]) for start in starts)


class Batch(dict):
    """One batch of feeds by input name, and how many rows it holds (an input's first
    dimension is not always the batch)."""

    def __init__(self, feeds: dict[str, np.ndarray], rows: int):
        super().__init__(feeds)
        self.rows = rows


def batch_rows(feeds: dict[str, np.ndarray]) -> int:
    """The rows of a batch: as `CalibData.batches` counted them, else the first dimension
    of its first array."""
    if isinstance(feeds, Batch):
        return feeds.rows
    first = next(iter(feeds.values()))
    return int(first.shape[0]) if first.ndim else 1


def _batch_starts(rows: int, batch_size: int) -> range:
    # Checked here, not at the first next(), so a bad --batch-size fails before any work.
    batch_size = operator.index(batch_size)
    if batch_size < 1:
        raise UsageError(f"batch size is {batch_size}, expected a positive number of rows")
    return range(0, rows, batch_size)


def load_calib(
    path: str | Path, specs: list[InputSpec], labels_key: str | None = None
) -> CalibData:
    """Load the NPZ at `path` and check it against the model inputs `specs`.

    The arrays are kept as np.load returns them (no casts, no copies), or mapped from the
    file where large and stored uncompressed (`_mapped_member`). Raises UsageError
    on the first problem: file, pairing of arrays with inputs, dtype, shape, rows, values.
    """
    path = Path(path)
    if not specs:
        raise UsageError(f"{path}: the model has no inputs to feed (all are initializers)")
    loaded, array_for_input = _read_npz(path, specs, labels_key)
    for spec in specs:
        array_name = array_for_input[spec.name]
        _check_input_array(path, array_name, loaded[array_name], spec)
    if labels_key is not None:
        _check_labels(path, labels_key, loaded[labels_key])
    axes = {array_for_input[spec.name]: spec.batch_axis for spec in specs}
    if labels_key is not None:
        axes[labels_key] = 0
    rows = _shared_rows(path, loaded, axes)
    for name, array in loaded.items():
        _check_finite(path, name, array)
        release_pages(array)
    arrays = {spec.name: loaded[array_for_input[spec.name]] for spec in specs}
    labels = None if labels_key is None else loaded[labels_key]
    batch_axes = {spec.name: spec.batch_axis for spec in specs}
    return CalibData(path, arrays, labels, rows, _fixed_batch(path, specs, rows), batch_axes)


def _fixed_batch(path: Path, specs: list[InputSpec], rows: int) -> int | None:
    """The static batch size the model's inputs declare, if any; the rows must fill whole
    batches of it (onnxruntime refuses any other first dimension)."""
    for spec in specs:
        if (
            spec.shape
            and spec.batch_axis is not None
            and isinstance(spec.shape[spec.batch_axis], int)
        ):
            fixed = spec.shape[spec.batch_axis]
            if rows % fixed:
                raise UsageError(
                    f"{path}: {rows} rows, but model input {spec.name!r} has a fixed batch of "
                    f"{fixed}; expected a multiple of {fixed} rows"
                )
            return fixed
    return None


def _read_npz(
    path: Path, specs: list[InputSpec], labels_key: str | None
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The arrays needed, by their name in the file, and which array feeds each input."""
    with _open_npz(path) as npz:
        members = {member.removesuffix(".npy"): member for member in npz.zip.namelist()}
        array_for_input = _match_inputs(path, specs, list(members), labels_key)
        wanted = [*array_for_input.values(), *([] if labels_key is None else [labels_key])]
        loaded = {name: _read_array(path, npz, name, members[name]) for name in wanted}
    return loaded, array_for_input


def _open_npz(path: Path) -> np.lib.npyio.NpzFile:
    # The magic is checked first: np.load would read a whole .npy into memory, and try to
    # unpickle anything else, before we could tell it is not an NPZ.
    magic = _read_magic(path)
    if magic.startswith(_NPY_MAGIC):
        raise UsageError(
            f"{path}: is a single .npy array, expected an .npz archive of arrays named "
            "after the model's inputs (write it with np.savez)"
        )
    if not magic.startswith(_ZIP_MAGICS):
        raise UsageError(f"{path}: is not an NPZ file, expected a zip archive from np.savez")
    try:
        return np.load(path, allow_pickle=False)
    except _READ_ERRORS as error:
        raise UsageError(
            f"{path}: is not a readable NPZ archive ({one_line(error)}); "
            "expected a file written by np.savez"
        ) from error


def _read_magic(path: Path) -> bytes:
    try:
        with path.open("rb") as file:
            return file.read(len(_NPY_MAGIC))
    except OSError as error:
        raise UsageError(
            f"{path}: cannot read the file ({error.strerror or one_line(error)}); "
            "expected an .npz of arrays"
        ) from error


def _match_inputs(
    path: Path, specs: list[InputSpec], array_names: list[str], labels_key: str | None
) -> dict[str, str]:
    """Which array of the file feeds each model input."""
    present = ", ".join(repr(name) for name in array_names) or "none"
    if labels_key is not None and labels_key not in array_names:
        raise UsageError(f"{path}: no labels array {labels_key!r}; arrays present: {present}")
    data_names = [name for name in array_names if name != labels_key]
    if len(specs) == 1 and specs[0].name not in array_names and len(data_names) == 1:
        # One input, one array: no naming convention needed.
        return {specs[0].name: data_names[0]}
    for spec in specs:
        if spec.name not in array_names:
            hint = ""
            if len(specs) == 1:
                hint = " (a one-input model also takes an NPZ with a single array besides labels)"
            raise UsageError(
                f"{path}: no array for model input {spec.name!r}; arrays present: {present}{hint}"
            )
    return {spec.name: spec.name for spec in specs}


def _read_array(path: Path, npz: np.lib.npyio.NpzFile, name: str, member: str) -> np.ndarray:
    """One array of the archive, once its header shows it is safe to load."""
    header = _array_header(path, npz, name, member)
    shape, dtype = header.shape, header.dtype
    if dtype.hasobject:
        raise UsageError(
            f"{path}: array {name!r} holds Python objects (dtype {dtype}), which are never "
            "unpickled; expected a numeric array"
        )
    # Python ints do not overflow, so even an absurd declared shape gives its true size.
    declared_bytes = math.prod(shape) * dtype.itemsize
    if declared_bytes > MAX_ARRAY_BYTES:
        raise UsageError(
            f"{path}: array {name!r} declares shape {list(shape)} of {dtype} "
            f"({declared_bytes / 1024**3:.3g} GiB); expected at most "
            f"{MAX_ARRAY_BYTES / 1024**3:.3g} GiB"
        )
    if declared_bytes >= MAPPED_MIN_BYTES:
        mapped = _mapped_member(path, npz.zip.getinfo(member), header)
        if mapped is not None:
            return mapped
    try:
        return npz[name]
    except _READ_ERRORS as error:
        raise UsageError(
            f"{path}: array {name!r} cannot be read ({one_line(error)}); "
            "expected an array written by np.savez"
        ) from error


def _mapped_member(path: Path, info: zipfile.ZipInfo, header: _Header) -> np.ndarray | None:
    """An archive member's array mapped from the file, read-only, rather than read into
    memory: its pages come in as batches are sliced and go again after (`release_pages`),
    so a large calibration set is not held through a compress (0.1 GiB, 1.2 bytes per weight,
    for perf.py's 100M-weight MLP at 4096 rows). None where the member is compressed, in
    Fortran order or cannot be mapped; np.load reads it then."""
    count = math.prod(header.shape)
    if (
        not hasattr(mmap, "MADV_DONTNEED")  # pages could not be given back
        or info.compress_type != zipfile.ZIP_STORED
        or header.fortran_order
        or count == 0
    ):
        return None
    try:
        with path.open("rb") as file:
            file.seek(info.header_offset)
            local = file.read(_LOCAL_HEADER_BYTES)
            names, extra = struct.unpack("<HH", local[26:30])
            start = info.header_offset + _LOCAL_HEADER_BYTES + names + extra + header.data_offset
            aligned = start - start % mmap.ALLOCATIONGRANULARITY
            length = start - aligned + count * header.dtype.itemsize
            mapping = mmap.mmap(file.fileno(), length, access=mmap.ACCESS_READ, offset=aligned)
    except _READ_ERRORS:
        return None
    return np.frombuffer(mapping, header.dtype, count, offset=start - aligned).reshape(header.shape)


def release_pages(array: np.ndarray) -> None:
    """Give back the pages of a file-mapped array (`_mapped_member`) that reading touched:
    the file keeps them, and a later read maps them in again. Other arrays: nothing."""
    mapping = file_mapping(array)
    if mapping is not None:
        mapping.madvise(mmap.MADV_DONTNEED)


def file_mapping(array: np.ndarray) -> mmap.mmap | None:
    """The file mapping an array's memory belongs to (`_mapped_member`), or None."""
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):  # np.frombuffer keeps the buffer's memoryview
        base = base.obj
    return base if isinstance(base, mmap.mmap) else None


class _Header(NamedTuple):
    """A .npy member's header: its array's shape, order and dtype, and where its data
    starts within the member."""

    shape: tuple[int, ...]
    fortran_order: bool
    dtype: np.dtype
    data_offset: int


def _array_header(path: Path, npz: np.lib.npyio.NpzFile, name: str, member: str) -> _Header:
    """The .npy header of one archive member, without its data."""
    try:
        with npz.zip.open(member) as stream:
            version = np.lib.format.read_magic(stream)
            if version == (1, 0):
                header = np.lib.format.read_array_header_1_0(stream)
            else:
                header = np.lib.format.read_array_header_2_0(stream)
            return _Header(*header, data_offset=stream.tell())
    except _READ_ERRORS as error:
        raise UsageError(
            f"{path}: array {name!r} is not a readable .npy member ({one_line(error)}); "
            "expected an array written by np.savez"
        ) from error


def _check_input_array(path: Path, name: str, array: np.ndarray, spec: InputSpec) -> None:
    """Dtype, rank and static dimensions, which must match the input exactly."""
    if spec.batch_axis is not None:
        _check_not_scalar(path, name, array)
    if array.dtype != spec.dtype:
        raise UsageError(
            f"{path}: array {name!r} has dtype {array.dtype}, expected {spec.dtype} "
            f"(the dtype of model input {spec.name!r}); convert it with "
            f".astype({_dtype_expression(spec.dtype)})"
        )
    if spec.shape is None:
        return
    expected = f"(model input {spec.name!r} has shape {_shape_text(spec.shape)})"
    if array.ndim != len(spec.shape):
        raise UsageError(
            f"{path}: array {name!r} has shape {list(array.shape)}, "
            f"expected rank {len(spec.shape)} {expected}"
        )
    # The batch axis holds the rows: the data decides how many there are.
    for axis in range(array.ndim):
        size = spec.shape[axis]
        if axis == spec.batch_axis:
            continue
        if isinstance(size, int) and array.shape[axis] != size:
            raise UsageError(
                f"{path}: array {name!r} has shape {list(array.shape)}, "
                f"expected size {size} in dimension {axis} {expected}"
            )


def _check_labels(path: Path, name: str, labels: np.ndarray) -> None:
    _check_not_scalar(path, name, labels)
    if labels.dtype.kind not in "iuf":
        raise UsageError(
            f"{path}: labels array {name!r} has dtype {labels.dtype}, "
            "expected integer class indices or float targets"
        )


def _check_not_scalar(path: Path, name: str, array: np.ndarray) -> None:
    if array.ndim == 0:
        raise UsageError(
            f"{path}: array {name!r} is a scalar, expected an array whose first "
            "dimension is the batch (rows)"
        )


def _shared_rows(path: Path, arrays: dict[str, np.ndarray], axes: dict[str, int | None]) -> int:
    """The batch dimension all batched arrays share; at least one row."""
    batched = {name: array for name, array in arrays.items() if axes.get(name, 0) is not None}
    if not batched:
        return 1  # only scalars: one row, fed once
    first_name, first = next(iter(batched.items()))
    rows = first.shape[axes.get(first_name, 0)]
    for name, array in batched.items():
        axis = axes.get(name, 0)
        if array.shape[axis] != rows:
            where = "," if axis == 0 else f" in dimension {axis}, its batch axis,"
            raise UsageError(
                f"{path}: array {name!r} has {array.shape[axis]} rows{where} expected {rows} "
                f"like array {first_name!r} (all arrays share the first, batch dimension, "
                "unless --batch-axis NAME=AXIS says otherwise)"
            )
    if rows == 0:
        raise UsageError(f"{path}: array {first_name!r} has 0 rows, expected at least one")
    return rows


def _check_finite(path: Path, name: str, array: np.ndarray) -> None:
    if array.dtype.kind not in "fc":
        return
    array = array.reshape(1) if array.ndim == 0 else array
    row_elements = max(1, math.prod(array.shape[1:]))
    rows_per_block = max(1, _FINITE_BLOCK_ELEMENTS // row_elements)
    nonfinite = sum(
        int(np.count_nonzero(~np.isfinite(array[start : start + rows_per_block])))
        for start in range(0, array.shape[0], rows_per_block)
    )
    if nonfinite:
        raise UsageError(
            f"{path}: array {name!r} holds {nonfinite} non-finite values (NaN or inf) "
            f"out of {array.size}, expected finite values"
        )


def _shape_text(shape: tuple[Dim, ...]) -> str:
    return "[" + ", ".join("?" if size is None else str(size) for size in shape) + "]"


def _dtype_expression(dtype: np.dtype) -> str:
    # Types from ml_dtypes (bfloat16, float8) have no np.<name>; astype takes their name.
    return f"np.{dtype.name}" if hasattr(np, dtype.name) else repr(dtype.name)
