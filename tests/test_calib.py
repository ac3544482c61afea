"""Tests for ecprune_onnx.calib: input specs, NPZ validation and batching."""

from __future__ import annotations

import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from ecprune_onnx import calib
from ecprune_onnx.calib import CalibData, InputSpec, input_specs, load_calib
from ecprune_onnx.errors import UsageError


def make_model(inputs: list[onnx.ValueInfoProto], initializers=()) -> onnx.ModelProto:
    """A graph passing its first input through, with the given graph inputs."""
    output = helper.make_tensor_value_info("out", TensorProto.FLOAT, None)
    node = helper.make_node("Identity", [inputs[0].name], ["out"])
    graph = helper.make_graph([node], "g", inputs, [output], initializer=list(initializers))
    return helper.make_model(graph)


@pytest.fixture
def one_input() -> list[InputSpec]:
    """One float32 input with a symbolic batch dim and a static second dim."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
    return input_specs(make_model([x]))


@pytest.fixture
def two_inputs() -> list[InputSpec]:
    """A float32 image with static dims, and int64 tokens of symbolic length."""
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 2, 2])
    tokens = helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "seq"])
    return input_specs(make_model([image, tokens]))


@pytest.fixture
def int_input() -> list[InputSpec]:
    """One int64 input whose batch dim is unknown (neither a value nor a name)."""
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [None, 4])
    return input_specs(make_model([ids]))


def write_npz(tmp_path: Path, **arrays: np.ndarray) -> Path:
    path = tmp_path / "calib.npz"
    np.savez(path, **arrays)
    return path


def load_error(path: Path, specs: list[InputSpec], labels_key: str | None = None) -> str:
    """The message load_calib refuses `path` with; checks it is one line naming the file."""
    with pytest.raises(UsageError) as caught:
        load_calib(path, specs, labels_key)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    return message


def floats(*shape: int) -> np.ndarray:
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape)


# --- input_specs -------------------------------------------------------------------------


def test_input_specs_read_dtype_and_dims(two_inputs, int_input):
    assert two_inputs == [
        InputSpec("image", np.dtype(np.float32), ("batch", 2, 2)),
        InputSpec("tokens", np.dtype(np.int64), ("batch", "seq")),
    ]
    assert int_input == [InputSpec("ids", np.dtype(np.int64), (None, 4))]


def test_input_specs_skip_initializers_listed_as_inputs():
    # IR version 3 files list every initializer among the graph inputs.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])
    w_input = helper.make_tensor_value_info("w", TensorProto.FLOAT, [2, 2])
    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 2], [1.0, 0.0, 0.0, 1.0])
    specs = input_specs(make_model([x, w_input], initializers=[w]))
    assert [spec.name for spec in specs] == ["x"]


def test_input_specs_refuse_sequence_input():
    element = helper.make_tensor_type_proto(TensorProto.FLOAT, [3])
    seq = helper.make_value_info("seq", helper.make_sequence_type_proto(element))
    with pytest.raises(UsageError, match=r"model input 'seq' is a sequence; only tensor"):
        input_specs(make_model([seq]))


def test_input_of_unknown_rank_takes_any_rank(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, None)
    specs = input_specs(make_model([x]))
    assert specs[0].shape is None
    assert load_calib(write_npz(tmp_path, x=floats(2, 3, 4, 5)), specs).rows == 2


# --- valid data and batching ---------------------------------------------------------------


def test_two_inputs_load_in_input_order(tmp_path, two_inputs):
    tokens = np.arange(50, dtype=np.int64).reshape(10, 5)
    image = floats(10, 2, 2)
    # Saved in the other order, with an unused array: matched by name, order from the model.
    path = write_npz(tmp_path, tokens=tokens, unused=floats(3), image=image)
    data = load_calib(path, two_inputs)
    assert data.path == path
    assert data.rows == 10
    assert list(data.arrays) == ["image", "tokens"]
    np.testing.assert_array_equal(data.arrays["image"], image)
    np.testing.assert_array_equal(data.arrays["tokens"], tokens)
    assert data.labels is None


def test_batches_slice_consecutive_rows(tmp_path, two_inputs):
    tokens = np.arange(30, dtype=np.int64).reshape(10, 3)
    image = floats(10, 2, 2)
    labels = np.arange(10, dtype=np.int64)
    data = load_calib(write_npz(tmp_path, image=image, tokens=tokens, y=labels), two_inputs, "y")
    batches = list(data.batches(4))
    assert [len(batch["image"]) for batch in batches] == [4, 4, 2]
    assert [len(batch["tokens"]) for batch in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in batches]), image)
    np.testing.assert_array_equal(np.concatenate([b["tokens"] for b in batches]), tokens)
    label_batches = list(data.label_batches(4))
    assert [len(batch) for batch in label_batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(label_batches), labels)


def test_batches_of_fortran_ordered_data_are_contiguous(tmp_path, one_input):
    x = np.asfortranarray(floats(7, 3))
    data = load_calib(write_npz(tmp_path, x=x), one_input)
    for batch in data.batches(3):
        assert batch["x"].flags.c_contiguous


def test_bad_batch_size_is_refused_before_iterating(tmp_path, one_input):
    data = load_calib(write_npz(tmp_path, x=floats(4, 3)), one_input)
    with pytest.raises(UsageError, match="batch size is 0, expected a positive"):
        data.batches(0)


def test_label_batches_without_labels_are_refused(tmp_path, one_input):
    path = write_npz(tmp_path, x=floats(4, 3))
    data = load_calib(path, one_input)
    with pytest.raises(UsageError, match="no labels were loaded"):
        data.label_batches(2)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 300), batch_size=st.integers(1, 350))
def test_batches_partition_the_rows(rows, batch_size):
    x = np.arange(rows * 2, dtype=np.float32).reshape(rows, 2)
    data = CalibData(Path("mem.npz"), {"x": x}, np.arange(rows), rows)
    sizes = [len(batch["x"]) for batch in data.batches(batch_size)]
    assert len(sizes) == -(-rows // batch_size)
    assert all(size == batch_size for size in sizes[:-1])
    assert 1 <= sizes[-1] <= batch_size
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in data.batches(batch_size)]), x)
    np.testing.assert_array_equal(np.concatenate(list(data.label_batches(batch_size))), data.labels)


# --- pairing arrays with inputs ----------------------------------------------------------


def test_one_input_takes_a_lone_array_of_any_name(tmp_path, one_input):
    x = floats(5, 3)
    data = load_calib(write_npz(tmp_path, features=x), one_input)
    assert list(data.arrays) == ["x"]
    np.testing.assert_array_equal(data.arrays["x"], x)


def test_one_input_takes_one_array_besides_the_labels(tmp_path, one_input):
    labels = np.array([0.5, 1.5, 2.5])
    path = write_npz(tmp_path, features=floats(3, 3), target=labels)
    data = load_calib(path, one_input, "target")
    assert list(data.arrays) == ["x"]
    np.testing.assert_array_equal(data.labels, labels)


def test_one_input_with_two_unnamed_arrays_is_refused(tmp_path, one_input):
    message = load_error(write_npz(tmp_path, a=floats(2, 3), b=floats(2, 3)), one_input)
    assert "no array for model input 'x'; arrays present: 'a', 'b'" in message
    assert "also takes an NPZ with a single array besides labels" in message


def test_missing_input_is_named_with_the_arrays_present(tmp_path, two_inputs):
    path = write_npz(tmp_path, image=floats(2, 2, 2), extra=floats(2))
    message = load_error(path, two_inputs)
    assert "no array for model input 'tokens'; arrays present: 'image', 'extra'" in message


def test_empty_npz_lists_no_arrays(tmp_path, two_inputs):
    message = load_error(write_npz(tmp_path), two_inputs)
    assert "no array for model input 'image'; arrays present: none" in message


def test_missing_labels_key_is_named_with_the_arrays_present(tmp_path, one_input):
    message = load_error(write_npz(tmp_path, x=floats(2, 3)), one_input, labels_key="y")
    assert "no labels array 'y'; arrays present: 'x'" in message


# --- rows ---------------------------------------------------------------------------------


def test_inputs_disagreeing_on_rows_are_refused(tmp_path, two_inputs):
    path = write_npz(tmp_path, image=floats(4, 2, 2), tokens=np.zeros((3, 5), np.int64))
    message = load_error(path, two_inputs)
    assert "array 'tokens' has 3 rows, expected 4 like array 'image'" in message


def test_labels_with_other_rows_are_refused(tmp_path, one_input):
    path = write_npz(tmp_path, x=floats(4, 3), y=np.zeros(5, np.int64))
    assert "array 'y' has 5 rows, expected 4 like array 'x'" in load_error(path, one_input, "y")


def test_zero_rows_are_refused(tmp_path, one_input):
    message = load_error(write_npz(tmp_path, x=np.zeros((0, 3), np.float32)), one_input)
    assert "array 'x' has 0 rows, expected at least one" in message


def test_scalar_array_is_refused(tmp_path, one_input):
    message = load_error(write_npz(tmp_path, x=np.float32(1.0)), one_input)
    assert "array 'x' is a scalar, expected an array whose first dimension is the batch" in message


def test_scalar_labels_are_refused(tmp_path, one_input):
    path = write_npz(tmp_path, x=floats(2, 3), y=np.int64(1))
    assert "array 'y' is a scalar" in load_error(path, one_input, "y")


# --- dtypes and shapes --------------------------------------------------------------------


def test_float64_for_float32_input_is_refused_with_the_cast_to_make(tmp_path, one_input):
    message = load_error(write_npz(tmp_path, x=np.zeros((2, 3))), one_input)
    assert (
        "array 'x' has dtype float64, expected float32 (the dtype of model input 'x'); "
        "convert it with .astype(np.float32)"
    ) in message


def test_dtype_message_names_array_and_input_when_they_differ(tmp_path, int_input):
    message = load_error(write_npz(tmp_path, data=np.zeros((2, 4), np.int32)), int_input)
    assert "array 'data' has dtype int32, expected int64" in message
    assert "(the dtype of model input 'ids')" in message
    assert ".astype(np.int64)" in message


def test_int64_input_loads(tmp_path, int_input):
    ids = np.arange(12, dtype=np.int64).reshape(3, 4)
    data = load_calib(write_npz(tmp_path, ids=ids), int_input)
    np.testing.assert_array_equal(data.arrays["ids"], ids)


def test_wrong_rank_is_refused(tmp_path, one_input):
    message = load_error(write_npz(tmp_path, x=floats(2, 3, 1)), one_input)
    assert "array 'x' has shape [2, 3, 1], expected rank 2" in message
    assert "(model input 'x' has shape [batch, 3])" in message


def test_wrong_static_dim_is_refused(tmp_path, two_inputs):
    path = write_npz(tmp_path, image=floats(2, 2, 5), tokens=np.zeros((2, 1), np.int64))
    message = load_error(path, two_inputs)
    assert "array 'image' has shape [2, 2, 5], expected size 2 in dimension 2" in message
    assert "(model input 'image' has shape [batch, 2, 2])" in message


def test_unknown_dim_in_message_is_a_question_mark(tmp_path, int_input):
    message = load_error(write_npz(tmp_path, ids=np.zeros((2, 5), np.int64)), int_input)
    assert "expected size 4 in dimension 1 (model input 'ids' has shape [?, 4])" in message


@pytest.mark.parametrize("seq", [1, 7])
def test_symbolic_dims_take_any_size(tmp_path, two_inputs, seq):
    path = write_npz(tmp_path, image=floats(3, 2, 2), tokens=np.zeros((3, seq), np.int64))
    assert load_calib(path, two_inputs).arrays["tokens"].shape == (3, seq)


@pytest.mark.parametrize("dtype", [np.int32, np.uint8, np.float32, np.float64])
def test_labels_of_any_number_type_load(tmp_path, one_input, dtype):
    labels = np.arange(3).astype(dtype)
    path = write_npz(tmp_path, x=floats(3, 3), y=labels)
    assert load_calib(path, one_input, "y").labels.dtype == dtype


@pytest.mark.parametrize("labels", [np.array([True, False]), np.array(["a", "b"])])
def test_labels_that_are_not_numbers_are_refused(tmp_path, one_input, labels):
    message = load_error(write_npz(tmp_path, x=floats(2, 3), y=labels), one_input, "y")
    assert f"labels array 'y' has dtype {labels.dtype}, expected integer class indices" in message


# --- values -------------------------------------------------------------------------------


def test_non_finite_values_are_counted(tmp_path, one_input):
    x = floats(4, 3)
    x[0, 1], x[2, 2], x[3, 0] = np.nan, np.inf, -np.inf
    message = load_error(write_npz(tmp_path, x=x), one_input)
    assert "array 'x' holds 3 non-finite values (NaN or inf) out of 12" in message


def test_non_finite_values_are_counted_across_blocks(tmp_path, one_input, monkeypatch):
    monkeypatch.setattr(calib, "_FINITE_BLOCK_ELEMENTS", 6)  # two rows per block
    x = floats(5, 3)
    x[:, 0] = np.nan
    assert "holds 5 non-finite values" in load_error(write_npz(tmp_path, x=x), one_input)


def test_non_finite_labels_are_refused(tmp_path, one_input):
    path = write_npz(tmp_path, x=floats(2, 3), y=np.array([0.0, np.nan]))
    assert "array 'y' holds 1 non-finite values" in load_error(path, one_input, "y")


# --- files that are not NPZs --------------------------------------------------------------


def test_missing_file(tmp_path, one_input):
    message = load_error(tmp_path / "calib.npz", one_input)
    assert "cannot read the file (No such file or directory)" in message


def test_text_file(tmp_path, one_input):
    path = tmp_path / "calib.npz"
    path.write_text("x,y\n1,2\n")
    assert "is not an NPZ file, expected a zip archive from np.savez" in load_error(path, one_input)


def test_plain_npy_file(tmp_path, one_input):
    path = tmp_path / "calib.npz"
    with path.open("wb") as file:
        np.save(file, floats(2, 3))
    message = load_error(path, one_input)
    assert "is a single .npy array, expected an .npz archive" in message
    assert "np.savez" in message


def test_truncated_npz(tmp_path, one_input):
    path = write_npz(tmp_path, x=floats(20, 3))
    path.write_bytes(path.read_bytes()[:100])
    assert "is not a readable NPZ archive" in load_error(path, one_input)


def test_member_that_is_not_npy(tmp_path, one_input):
    path = tmp_path / "calib.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", b"not an array")
    message = load_error(path, one_input)
    assert "array 'x' is not a readable .npy member" in message


def test_pickled_object_array_is_refused_without_unpickling(tmp_path, one_input, monkeypatch):
    path = write_npz(tmp_path, x=np.array([{}], dtype=object))

    def tripwire(*args, **kwargs):
        raise AssertionError("calib unpickled a member")

    monkeypatch.setattr(pickle, "load", tripwire)
    monkeypatch.setattr(pickle, "loads", tripwire)
    message = load_error(path, one_input)
    assert "array 'x' holds Python objects (dtype object), which are never unpickled" in message


def write_header_only_npz(path: Path, shape: tuple[int, ...]) -> None:
    """An NPZ whose member declares `shape` of float32 but holds no data."""
    with zipfile.ZipFile(path, "w") as archive, archive.open("x.npy", "w") as member:
        header = {"descr": "<f4", "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_2_0(member, header)


@pytest.mark.parametrize("shape", [(2**31, 4), (2**64, 2**64)])
def test_absurd_declared_size_is_refused_before_allocating(tmp_path, one_input, shape):
    path = tmp_path / "calib.npz"
    write_header_only_npz(path, shape)
    message = load_error(path, one_input)
    assert f"array 'x' declares shape {list(shape)} of float32" in message
    assert "GiB); expected at most 8 GiB" in message


def test_size_limit_applies_to_real_arrays(tmp_path, one_input, monkeypatch):
    monkeypatch.setattr(calib, "MAX_ARRAY_BYTES", 40)
    message = load_error(write_npz(tmp_path, x=floats(4, 3)), one_input)
    assert "array 'x' declares shape [4, 3] of float32" in message


# --- large arrays mapped from the file ----------------------------------------------------


def _mapped(array: np.ndarray) -> bool:
    return calib.file_mapping(array) is not None


def test_large_uncompressed_arrays_are_mapped_and_batch_as_read(tmp_path, two_inputs, monkeypatch):
    monkeypatch.setattr(calib, "MAPPED_MIN_BYTES", 0)
    image, tokens = floats(10, 2, 2), np.arange(50, dtype=np.int64).reshape(10, 5)
    path = write_npz(tmp_path, image=image, tokens=tokens, y=np.arange(10))

    data = load_calib(path, two_inputs, "y")

    assert all(_mapped(array) for array in [*data.arrays.values(), data.labels])
    batches = list(data.batches(4))
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in batches]), image)
    np.testing.assert_array_equal(np.concatenate([b["tokens"] for b in batches]), tokens)
    assert all(b["image"].flags.writeable and b["image"].flags.c_contiguous for b in batches)
    np.testing.assert_array_equal(np.concatenate(list(data.label_batches(4))), np.arange(10))


def test_compressed_fortran_and_small_arrays_are_read(tmp_path, one_input, monkeypatch):
    x = floats(6, 3)
    compressed = tmp_path / "compressed.npz"
    np.savez_compressed(compressed, x=x)
    assert not _mapped(load_calib(write_npz(tmp_path, x=x), one_input).arrays["x"])  # small
    fortran = tmp_path / "fortran.npz"
    np.savez(fortran, x=np.asfortranarray(x))
    monkeypatch.setattr(calib, "MAPPED_MIN_BYTES", 0)
    for path in (compressed, fortran):
        data = load_calib(path, one_input)
        assert not _mapped(data.arrays["x"])
        np.testing.assert_array_equal(data.arrays["x"], x)


# Loads a 256 MiB calibration array, reads every batch, and prints how many MiB the process
# grew by, mapped (the default) or read (a threshold above the array's size).
MAPPED_GROWTH_SCRIPT = """
import sys
import numpy as np
from ecprune_onnx import calib
from ecprune_onnx.calib import InputSpec, load_calib

def resident_mib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) // 1024 for line in status if line.startswith("VmRSS"))

if sys.argv[2] == "read":
    calib.MAPPED_MIN_BYTES = 1 << 40
spec = InputSpec("x", np.dtype(np.float32), ("batch", 1024), 0)
start = resident_mib()
data = load_calib(sys.argv[1], [spec])
for batch in data.batches(256):
    pass
print(resident_mib() - start)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc: Linux only")
def test_a_mapped_calibration_set_is_not_held_in_memory(tmp_path):
    path = write_npz(tmp_path, x=np.ones((1 << 16, 1024), dtype=np.float32))  # 256 MiB

    def growth(mode: str) -> int:
        run = subprocess.run(
            [sys.executable, "-c", MAPPED_GROWTH_SCRIPT, str(path), mode],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return int(run.stdout)

    assert growth("read") > 200
    assert growth("mapped") < 32
