"""Hostile input through the command line: broken and malicious model files, NPZ files that
lie, empty and mismatched arrays, unwritable output folders and a full disk.

Every refusal must be exit status 2 with exactly one `error:` line naming the culprit and no
traceback; nothing may be left in any folder (no output, no data file, no temporary file);
no input may change (every file is hashed before and after). Inputs live in `in/`, outputs
go to `out/`, and the whole tree is compared.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import pickle
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from ecprune_onnx import runtime
from ecprune_onnx.cli import app
from tests import graphs

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
HUGE = 2**40


# ------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Work:
    """A scratch tree: inputs in `inputs`, outputs in `outputs`."""

    root: Path
    inputs: Path
    outputs: Path

    @property
    def model(self) -> Path:
        return self.inputs / "digits_mlp.onnx"

    @property
    def calib(self) -> Path:
        return self.inputs / "calib.npz"

    @property
    def out(self) -> Path:
        return self.outputs / "pruned.onnx"


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under root (hidden ones too) with the sha256 of each file."""
    state = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            state[key] = "link → " + os.readlink(path)
        elif path.is_file():
            state[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            state[key] = "folder"
    return state


def run_cli(*args: object):
    return CliRunner().invoke(app, [str(arg) for arg in args])


def compress_args(work: Work, model: Path | None = None, calib: Path | None = None, *extra):
    return (
        "compress",
        model or work.model,
        "--calib",
        calib or work.calib,
        "--ratio",
        0.5,
        "-o",
        work.out,
        "--quiet",
        *extra,
    )


def assert_refused(work: Work, before: dict[str, str], result, culprit: str) -> None:
    """Exit 2, one `error:` line naming `culprit`, and the tree exactly as it was."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert culprit in lines[0], lines[0]
    assert snapshot(work.root) == before


def refuses(work: Work, args, culprit: str) -> None:
    before = snapshot(work.root)
    assert_refused(work, before, run_cli(*args), culprit)


@pytest.fixture
def work(tmp_path: Path) -> Work:
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    outputs.mkdir()
    shutil.copy(SAMPLES / "digits_mlp.onnx", inputs / "digits_mlp.onnx")
    shutil.copy(SAMPLES / "calib.npz", inputs / "calib.npz")
    shutil.copy(SAMPLES / "test.npz", inputs / "test.npz")
    return Work(tmp_path, inputs, outputs)


def save_external(model: onnx.ModelProto, path: Path, location: str) -> Path:
    """`model` at `path` with every initializer in `location` beside it."""
    onnx.save_model(model, path, save_as_external_data=True, location=location, size_threshold=0)
    return path


def relocate_external_data(path: Path, **entries: str) -> Path:
    """Rewrite the external-data entries (location, offset, length) of every initializer."""
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key in entries:
                entry.value = entries[entry.key]
    onnx.save(model, path)
    return path


def sample_model() -> onnx.ModelProto:
    return onnx.load(str(SAMPLES / "digits_mlp.onnx"))


def npy_bytes(shape: tuple[int, ...], payload: bytes) -> bytes:
    """A .npy header declaring float32 `shape`, followed by `payload` (whatever its size)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": shape}
    )
    return header.getvalue() + payload


def zip_with(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def two_layer_model(path: Path, x_shape: list, batch: int | str = "n") -> Path:
    """x → Gemm → Relu → Gemm (6 → 5 → 3); x_shape is x's declared shape."""
    builder = graphs.GraphBuilder(0)
    hidden, _ = builder.gemm("l1", "x", (6, 5), trans_b=1)
    activated = builder.node("Relu", [hidden], "act", "act")
    y, _ = builder.gemm("l2", activated, (5, 3))
    model = graphs.make_model(
        builder.nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, [batch, 3])],
        builder.initializers,
    )
    onnx.save(model, path)
    return path


def floats(*shape: int) -> np.ndarray:
    return np.random.default_rng(0).normal(size=shape).astype(np.float32)


# --------------------------------------------------------------------- model files


def _truncated(work: Work) -> Path:
    path = work.inputs / "truncated.onnx"
    whole = work.model.read_bytes()
    path.write_bytes(whole[: len(whole) // 3])
    return path


def _random_bytes(work: Work) -> Path:
    path = work.inputs / "random.onnx"
    path.write_bytes(np.random.default_rng(1).bytes(50_000))
    return path


def _empty_file(work: Work) -> Path:
    path = work.inputs / "empty.onnx"
    path.write_bytes(b"")
    return path


def _folder(work: Work) -> Path:
    path = work.inputs / "folder.onnx"
    path.mkdir()
    return path


def _data_outside(work: Work) -> Path:
    """External data location '../outside.data': a real file, one folder up."""
    nested = work.inputs / "nested"
    nested.mkdir()
    path = save_external(sample_model(), nested / "escape.onnx", "escape.onnx.data")
    (nested / "escape.onnx.data").rename(work.inputs / "outside.data")
    return relocate_external_data(path, location="../outside.data")


def _data_outside_deep(work: Work) -> Path:
    """The same from a folder whose path alone is longer than a one-line message."""
    deep = work.inputs / ("d" * 120) / ("e" * 120)
    deep.mkdir(parents=True)
    path = save_external(sample_model(), deep / "escape.onnx", "escape.onnx.data")
    (deep / "escape.onnx.data").rename(deep.parent / "outside.data")
    return relocate_external_data(path, location="../outside.data")


def _data_absolute(work: Work) -> Path:
    path = save_external(sample_model(), work.inputs / "absolute.onnx", "absolute.onnx.data")
    return relocate_external_data(path, location=str(work.inputs / "absolute.onnx.data"))


def _data_symlink(work: Work) -> Path:
    """External data through a symbolic link that points outside the model's folder."""
    nested = work.inputs / "nested"
    nested.mkdir()
    path = save_external(sample_model(), nested / "linked.onnx", "linked.onnx.data")
    (nested / "linked.onnx.data").rename(work.inputs / "secret.data")
    (nested / "linked.onnx.data").symlink_to(work.inputs / "secret.data")
    return path


def _data_missing(work: Work) -> Path:
    path = save_external(sample_model(), work.inputs / "nodata.onnx", "nodata.onnx.data")
    (work.inputs / "nodata.onnx.data").unlink()
    return path


def _data_truncated(work: Work) -> Path:
    path = save_external(sample_model(), work.inputs / "short.onnx", "short.onnx.data")
    data = work.inputs / "short.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    return path


def _data_huge_length(work: Work) -> Path:
    path = save_external(sample_model(), work.inputs / "long.onnx", "long.onnx.data")
    return relocate_external_data(path, length=str(HUGE))


def _data_huge_offset(work: Work) -> Path:
    path = save_external(sample_model(), work.inputs / "far.onnx", "far.onnx.data")
    return relocate_external_data(path, offset=str(HUGE))


def _huge_weight_dims(work: Work) -> Path:
    """A weight declaring [2^31, 2^31] elements over its 32 KiB of data."""
    model = sample_model()
    model.graph.initializer[0].dims[:] = [2**31, 2**31]
    path = work.inputs / "hugeweight.onnx"
    onnx.save(model, path)
    return path


def _huge_input_dims(work: Work) -> Path:
    """A model input declaring 2^62 features."""
    model = sample_model()
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 2**62
    path = work.inputs / "hugeinput.onnx"
    onnx.save(model, path)
    return path


def _unreleased_opset(work: Work) -> Path:
    model = sample_model()
    model.opset_import[0].version = 27
    path = work.inputs / "opset27.onnx"
    onnx.save(model, path)
    return path


HOSTILE_MODELS = {
    "truncated": (_truncated, "truncated.onnx: not a readable ONNX model"),
    "random bytes": (_random_bytes, "random.onnx: not a readable ONNX model"),
    "empty file": (_empty_file, "empty.onnx: not an ONNX model with a graph"),
    "a folder": (_folder, "folder.onnx: not a file"),
    "external data outside the folder": (_data_outside, "points outside the directory"),
    "external data outside a deep folder": (_data_outside_deep, "points outside the directory"),
    "external data at an absolute path": (_data_absolute, "should be a relative path"),
    "external data through a symlink": (_data_symlink, "but it is a symbolic link"),
    "external data missing": (_data_missing, "nodata.onnx: not a readable ONNX model"),
    "external data truncated": (_data_truncated, "exceeds available data"),
    "external data of 1 TiB": (_data_huge_length, "exceeds available data"),
    "external data at offset 1 TiB": (_data_huge_offset, "exceeds file size"),
    "weight declaring 2^62 elements": (_huge_weight_dims, "has a shape too large"),
    "input declaring 2^62 features": (_huge_input_dims, "Dimension mismatch"),
    "opset 27": (_unreleased_opset, "onnxruntime cannot load the model"),
}


@pytest.mark.parametrize("kind", list(HOSTILE_MODELS))
def test_compress_refuses_a_hostile_model(work, kind):
    build, culprit = HOSTILE_MODELS[kind]
    refuses(work, compress_args(work, build(work)), culprit)


@pytest.mark.parametrize("kind", ["truncated", "external data outside the folder"])
def test_evaluate_and_inspect_refuse_a_hostile_model(work, kind):
    build, culprit = HOSTILE_MODELS[kind]
    model = build(work)
    data = work.inputs / "test.npz"
    refuses(work, ("evaluate", work.model, model, "--data", data, "--quiet"), culprit)
    refuses(work, ("evaluate", model, work.model, "--data", data, "--quiet"), culprit)
    refuses(work, ("inspect", model), culprit)


def test_a_model_onnxruntime_refuses_is_named_by_its_file(work):
    refuses(work, compress_args(work, _unreleased_opset(work)), "opset27.onnx")


def test_compress_refuses_a_model_with_a_nan_weight(work):
    model = sample_model()
    weight = numpy_helper.to_array(model.graph.initializer[0]).copy()
    weight[0, 0] = np.nan
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(weight, "fc1.weight"))
    path = work.inputs / "nan.onnx"
    onnx.save(model, path)
    refuses(work, compress_args(work, path), "fc1.weight")


@pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")
def test_compress_refuses_a_model_whose_torch_copy_raises(work):
    # onnx2pytorch 0.6 gathers along axis 0 for Gather(axis=-1): docs/SUPPORTED.md.
    builder = graphs.GraphBuilder(0)
    hidden, _ = builder.gemm("l1", "x", (6, 8), trans_b=1)
    indices = builder.initializer("idx", np.array([1, 0, 3], dtype=np.int64))
    picked = builder.node("Gather", [hidden, indices], "picked", "pick", axis=-1)
    y, _ = builder.gemm("l2", picked, (3, 2))
    model = graphs.make_model(
        builder.nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["n", 2])],
        builder.initializers,
    )
    path = work.inputs / "gather.onnx"
    onnx.save(model, path)
    np.savez(work.inputs / "gather.npz", x=floats(16, 6))
    refuses(work, compress_args(work, path, work.inputs / "gather.npz"), "Gather")


# ------------------------------------------------------------------------ NPZ files


def _object_array(work: Work) -> Path:
    path = work.inputs / "objects.npz"
    np.savez(path, x=np.array([{"a": 1}] * 4, dtype=object))
    return path


def _pickle_file(work: Work) -> Path:
    path = work.inputs / "pickle.npz"
    path.write_bytes(pickle.dumps({"x": floats(4, 64)}))
    return path


def _pickle_member(work: Work) -> Path:
    return zip_with(work.inputs / "member.npz", {"x.npy": pickle.dumps(floats(4, 64))})


def _empty_npz_file(work: Work) -> Path:
    path = work.inputs / "empty.npz"
    path.write_bytes(b"")
    return path


def _no_arrays(work: Work) -> Path:
    path = work.inputs / "none.npz"
    np.savez(path)
    return path


def _huge_header(work: Work) -> Path:
    """A header declaring 2^40 rows (256 TiB) over 64 bytes of data."""
    member = npy_bytes((HUGE, 64), b"\0" * 64)
    return zip_with(work.inputs / "huge.npz", {"x.npy": member})


def _short_data(work: Work) -> Path:
    """A header declaring 100 rows over the bytes of one."""
    member = npy_bytes((100, 64), b"\0" * 256)
    return zip_with(work.inputs / "short.npz", {"x.npy": member})


def _zero_rows(work: Work) -> Path:
    path = work.inputs / "zero.npz"
    np.savez(path, x=np.zeros((0, 64), np.float32))
    return path


def _infinity(work: Work) -> Path:
    x = floats(8, 64)
    x[3, 7] = np.inf
    path = work.inputs / "inf.npz"
    np.savez(path, x=x)
    return path


HOSTILE_NPZ = {
    "object array": (_object_array, "objects.npz: array 'x' holds Python objects"),
    "a pickle": (_pickle_file, "pickle.npz: is not an NPZ file"),
    "a pickle inside the zip": (_pickle_member, "member.npz: array 'x' is not a readable .npy"),
    "empty file": (_empty_npz_file, "empty.npz: is not an NPZ file"),
    "no arrays": (_no_arrays, "none.npz: no array for model input 'x'"),
    "header declaring 256 TiB": (_huge_header, "declares shape [1099511627776, 64]"),
    "header declaring more rows than stored": (_short_data, "short.npz: array 'x' cannot be read"),
    "zero rows": (_zero_rows, "zero.npz: array 'x' has 0 rows"),
    "an infinity": (_infinity, "inf.npz: array 'x' holds 1 non-finite values"),
}


@pytest.mark.parametrize("kind", list(HOSTILE_NPZ))
def test_compress_refuses_hostile_calibration_data(work, kind):
    build, culprit = HOSTILE_NPZ[kind]
    refuses(work, compress_args(work, calib=build(work)), culprit)


@pytest.mark.parametrize("kind", ["object array", "header declaring 256 TiB"])
def test_evaluate_refuses_hostile_data(work, kind):
    build, culprit = HOSTILE_NPZ[kind]
    args = ("evaluate", work.model, work.model, "--data", build(work), "--quiet")
    refuses(work, args, culprit)


def test_mismatched_batch_sizes_of_two_inputs_are_refused(work):
    builder = graphs.GraphBuilder(1)
    builder.node("Concat", ["x1", "x2"], "x", "join", axis=1)
    y, _ = builder.gemm("l1", "x", (6, 4), trans_b=1)
    model = graphs.make_model(
        builder.nodes,
        [
            helper.make_tensor_value_info("x1", TensorProto.FLOAT, ["n", 3]),
            helper.make_tensor_value_info("x2", TensorProto.FLOAT, ["n", 3]),
        ],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["n", 4])],
        builder.initializers,
    )
    path = work.inputs / "two.onnx"
    onnx.save(model, path)
    np.savez(work.inputs / "two.npz", x1=floats(10, 3), x2=floats(9, 3))
    refuses(work, compress_args(work, path, work.inputs / "two.npz"), "'x2' has 9 rows")


def test_evaluate_refuses_labels_of_another_batch_size(work):
    np.savez(work.inputs / "labels.npz", x=floats(10, 64), y=np.zeros(11, np.int64))
    args = ("evaluate", work.model, work.model, "--data", work.inputs / "labels.npz")
    refuses(work, (*args, "--labels", "y", "--quiet"), "'y' has 11 rows")


# The model's feature dimension is symbolic, so the NPZ cannot be checked against it and
# onnxruntime is the first to notice; its InvalidArgument is not turned into a UsageError.


def test_data_of_the_wrong_width_for_a_symbolic_dimension_is_refused(work):
    path = two_layer_model(work.inputs / "symbolic.onnx", ["n", "features"])
    np.savez(work.inputs / "wide.npz", x=floats(10, 7))
    refuses(work, compress_args(work, path, work.inputs / "wide.npz"), "wide.npz")


def test_evaluate_refuses_data_of_the_wrong_width_for_a_symbolic_dimension(work):
    path = two_layer_model(work.inputs / "symbolic.onnx", ["n", "features"])
    np.savez(work.inputs / "wide.npz", x=floats(10, 7))
    refuses(work, ("evaluate", path, path, "--data", work.inputs / "wide.npz", "--quiet"), "wide")


def test_empty_feature_dimension_is_refused(work):
    path = two_layer_model(work.inputs / "symbolic.onnx", ["n", "features"])
    np.savez(work.inputs / "empty.npz", x=np.zeros((10, 0), np.float32))
    refuses(work, compress_args(work, path, work.inputs / "empty.npz"), "empty.npz")


def test_calibration_rows_against_a_fixed_batch_dimension(work):
    path = two_layer_model(work.inputs / "fixed.onnx", [4, 6], batch=4)
    np.savez(work.inputs / "ten.npz", x=floats(10, 6))
    refuses(work, compress_args(work, path, work.inputs / "ten.npz"), "ten.npz")


def test_a_short_last_batch_against_a_fixed_batch_dimension(work):
    path = two_layer_model(work.inputs / "fixed.onnx", [4, 6], batch=4)
    np.savez(work.inputs / "ten.npz", x=floats(10, 6))
    args = compress_args(work, path, work.inputs / "ten.npz", "--batch-size", 4)
    refuses(work, args, "ten.npz")


# ---------------------------------------------------------------- output and the disk


def test_output_folder_that_is_not_writable(work, monkeypatch):
    # Tests run as root, whom chmod does not stop: make access() say what it would say.
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if Path(path) == work.outputs and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    refuses(work, compress_args(work), "folder " + str(work.outputs) + " is not writable")


def test_output_path_under_a_file(work):
    args = list(compress_args(work))
    args[args.index("-o") + 1] = work.calib / "pruned.onnx"
    refuses(work, args, "calib.npz does not exist")


def test_output_that_is_a_folder(work):
    work.out.mkdir()
    refuses(work, compress_args(work, None, None, "--force"), "exists and is not a file")


def _disk_full_after(written: bytes, under: Path):
    """An onnx.save_model that, for a file under `under`, writes `written` to it and then
    finds the disk full (ecr's tap sessions save their slices elsewhere, in the
    temporary folder)."""
    real_save = onnx.save_model

    def save_model(model, path, *args, **kwargs):
        if not Path(path).is_relative_to(under):
            return real_save(model, path, *args, **kwargs)
        Path(path).write_bytes(written)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    return save_model


@pytest.mark.parametrize("external", [False, True], ids=["one file", "external data"])
def test_disk_full_while_writing_the_model(work, monkeypatch, external):
    model = work.model
    if external:
        model = save_external(sample_model(), work.inputs / "ext.onnx", "ext.onnx.data")
    monkeypatch.setattr(onnx, "save_model", _disk_full_after(b"\x08\x07partial", work.outputs))
    refuses(work, compress_args(work, model), "pruned.onnx: cannot write the model (No space")


def test_a_full_temporary_folder_names_it_and_how_to_move_it(work, monkeypatch, tmp_path_factory):
    # ecr's layer-input passes write taps and session slices to the temporary folder (one
    # outside the work tree: torch may make its own cache folder there too)
    folder = tmp_path_factory.mktemp("scratch")
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    monkeypatch.setattr(runtime, "SHARED_INITIALIZER_BYTES", 1)  # every slice to a file
    monkeypatch.setattr(onnx, "save_model", _disk_full_after(b"", folder))
    refuses(
        work, compress_args(work, None, None, "--method", "ecr"), f"temporary files in {folder}"
    )


class _FullFile:
    """What os.fdopen returns on a full disk: half the text is written, then ENOSPC."""

    real_fdopen = os.fdopen

    def __init__(self, handle, *args, **kwargs):
        self.file = _FullFile.real_fdopen(handle, *args, **kwargs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def write(self, text):
        self.file.write(text[: len(text) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")


def _full_text_files(handle, mode="r", *args, **kwargs):
    """os.fdopen where a text file (the JSON report) meets a full disk; binary ones (the
    external data of ecr's tap sessions, in the temporary folder) open as usual."""
    if "b" in mode:
        return _FullFile.real_fdopen(handle, mode, *args, **kwargs)
    return _FullFile(handle, mode, *args, **kwargs)


def test_disk_full_while_writing_the_evaluate_report(work, monkeypatch):
    monkeypatch.setattr(os, "fdopen", _full_text_files)
    report = work.outputs / "report.json"
    args = ("evaluate", work.model, work.model, "--data", work.inputs / "test.npz")
    refuses(work, (*args, "--quiet", "--report", report), "cannot write it (No space left")


def _mkdtemp_failing_in(folder: Path, error: OSError):
    """tempfile.mkdtemp raising `error` for a folder made in `folder` (the output's staging
    folder); the temporary folder that ecr's tap sessions use still works."""
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp(suffix=None, prefix=None, dir=None):
        if dir is not None and Path(dir) == folder:
            raise error
        return real_mkdtemp(suffix, prefix, dir)

    return mkdtemp


def test_permission_denied_creating_the_staging_folder(work, monkeypatch):
    denied = PermissionError(errno.EACCES, "Permission denied", str(work.outputs))
    monkeypatch.setattr(tempfile, "mkdtemp", _mkdtemp_failing_in(work.outputs, denied))
    refuses(work, compress_args(work), "Permission denied")


def test_read_only_file_system_found_at_write_time(work, monkeypatch):
    read_only = OSError(errno.EROFS, "Read-only file system", str(work.outputs))
    monkeypatch.setattr(tempfile, "mkdtemp", _mkdtemp_failing_in(work.outputs, read_only))
    refuses(work, compress_args(work), "Read-only file system")


def test_disk_full_while_writing_the_compress_report(work, monkeypatch):
    monkeypatch.setattr(os, "fdopen", _full_text_files)
    args = compress_args(work, None, None, "--report", work.outputs / "report.json")
    refuses(work, args, "cannot write it (No space left")


def test_failure_between_the_two_renames_leaves_no_data_file(work, monkeypatch):
    model = save_external(sample_model(), work.inputs / "ext.onnx", "ext.onnx.data")
    real_replace = os.replace
    calls = []

    def replace(source, target):
        calls.append(target)
        if len(calls) == 2:
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    refuses(work, compress_args(work, model), "Input/output error")


def test_output_data_file_that_is_the_inputs_external_data(work):
    # An input whose data file is named like the output's: e.g. renamed after export.
    model = save_external(sample_model(), work.outputs / "exported.onnx", "pruned.onnx.data")
    refuses(work, compress_args(work, model), "pruned.onnx.data")


def test_existing_output_data_file_is_kept_without_force(work):
    model = save_external(sample_model(), work.inputs / "ext.onnx", "ext.onnx.data")
    (work.outputs / "pruned.onnx.data").write_bytes(b"somebody else's weights")
    refuses(work, compress_args(work, model), "--force")


# ------------------------------------------------------------ successful runs, too


def test_a_successful_run_changes_no_input_and_leaves_no_temporary_file(work):
    model = save_external(sample_model(), work.inputs / "ext.onnx", "ext.onnx.data")
    before = snapshot(work.inputs)
    result = run_cli(*compress_args(work, model))
    assert result.exit_code == 0, result.output
    assert snapshot(work.inputs) == before
    assert sorted(path.name for path in work.outputs.iterdir()) == [
        "pruned.onnx",
        "pruned.onnx.data",
    ]
