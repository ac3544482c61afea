"""Tests for ecprune_onnx.runtime: providers, sessions, batched runs."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from ecprune_onnx import modelio, runtime
from ecprune_onnx.errors import UsageError
from ecprune_onnx.runtime import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    open_session,
    run_batches,
    session_providers,
    tensor_output_names,
)

FEATURES, UNITS, CLASSES = 3, 5, 4


def _make_model(nodes, inputs, outputs, initializers=(), ml: bool = False) -> onnx.ModelProto:
    # IR 8 / opset 13 load in every onnxruntime the package supports.
    opsets = [helper.make_opsetid("", 13)]
    if ml:
        opsets.append(helper.make_opsetid("ai.onnx.ml", 1))
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


@pytest.fixture
def weight() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(FEATURES, UNITS)).astype(np.float32)


@pytest.fixture
def matmul_model(weight) -> onnx.ModelProto:
    """y = x @ W, x [rows, 3] → y [rows, 5]."""
    return _make_model(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="dense")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", UNITS])],
        [numpy_helper.from_array(weight, "W")],
    )


@pytest.fixture
def zipmap_model() -> onnx.ModelProto:
    """scores = x + 1 as a tensor, and the same as skl2onnx's ZipMap seq(map) output."""
    one = numpy_helper.from_array(np.ones(CLASSES, dtype=np.float32), "one")
    return _make_model(
        [
            helper.make_node("Add", ["x", "one"], ["scores"]),
            helper.make_node(
                "ZipMap",
                ["scores"],
                ["probabilities"],
                domain="ai.onnx.ml",
                classlabels_int64s=list(range(CLASSES)),
            ),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", CLASSES])],
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["rows", CLASSES]),
            helper.make_value_info(
                "probabilities",
                helper.make_sequence_type_proto(
                    helper.make_map_type_proto(
                        TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, [])
                    )
                ),
            ),
        ],
        [one],
        ml=True,
    )


def _no_cuda_here() -> bool:
    import torch

    return not torch.cuda.is_available()


def test_cpu_device_gives_cpu_provider_only():
    assert session_providers("cpu") == [CPU_PROVIDER]


@pytest.mark.skipif(not _no_cuda_here(), reason="this machine has a GPU")
def test_auto_device_without_gpu_is_cpu_only():
    assert session_providers("auto") == [CPU_PROVIDER]


@pytest.mark.skipif(not _no_cuda_here(), reason="this machine has a GPU")
def test_cuda_device_without_gpu_is_a_usage_error():
    with pytest.raises(UsageError, match="cuda"):
        session_providers("cuda")


def test_unknown_device_is_a_usage_error():
    with pytest.raises(UsageError, match="'tpu'"):
        session_providers("tpu")


def test_listed_cuda_provider_that_cannot_run_is_not_usable(monkeypatch):
    # What the GPU wheel does on a machine without a GPU: it lists CUDA, then falls back.
    monkeypatch.setattr(
        onnxruntime, "get_available_providers", lambda: [CUDA_PROVIDER, CPU_PROVIDER]
    )
    runtime.cuda_usable.cache_clear()
    try:
        if CUDA_PROVIDER not in onnxruntime.capi._pybind_state.get_available_providers():
            assert runtime.cuda_usable() is False
            assert session_providers("auto") == [CPU_PROVIDER]
    finally:
        runtime.cuda_usable.cache_clear()


def test_session_from_proto_and_from_path_compute_x_times_w(tmp_path, matmul_model, weight):
    path = tmp_path / "model.onnx"
    onnx.save(matmul_model, path)
    x = np.random.default_rng(1).normal(size=(6, FEATURES)).astype(np.float32)
    for source in (matmul_model, path, str(path)):
        session = open_session(source, device="cpu")
        (y,) = session.run(["y"], {"x": x})
        np.testing.assert_allclose(y, x.astype(np.float64) @ weight, rtol=1e-5, atol=1e-6)
        assert session.get_providers() == [CPU_PROVIDER]


def test_sessions_optimize_fully_and_log_errors_only(matmul_model):
    options = open_session(matmul_model, device="cpu").get_session_options()
    assert options.graph_optimization_level == onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.log_severity_level == 3


def test_session_from_path_reads_external_data_beside_the_file(
    tmp_path, matmul_model, weight, monkeypatch
):
    folder = tmp_path / "models"
    folder.mkdir()
    onnx.save(
        matmul_model,
        folder / "model.onnx",
        save_as_external_data=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    assert (folder / "model.onnx.data").is_file()
    monkeypatch.chdir(tmp_path)  # relative to the model file, not to the working directory
    session = open_session(folder / "model.onnx", device="cpu")
    x = np.eye(FEATURES, dtype=np.float32)
    np.testing.assert_allclose(session.run(["y"], {"x": x})[0], weight, rtol=1e-6)


def test_model_onnxruntime_cannot_load_is_a_usage_error(tmp_path):
    unknown_op = _make_model(
        [helper.make_node("NoSuchOp", ["x"], ["y"], domain="example.custom")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    unknown_op.opset_import.append(helper.make_opsetid("example.custom", 1))
    path = tmp_path / "custom.onnx"
    onnx.save(unknown_op, path)
    with pytest.raises(UsageError, match="custom.onnx: onnxruntime cannot load"):
        open_session(path, device="cpu")


def test_run_batches_joins_outputs_and_reports_rows_per_batch(matmul_model, weight):
    session = open_session(matmul_model, device="cpu")
    x = np.random.default_rng(2).normal(size=(10, FEATURES)).astype(np.float32)
    batches = [{"x": x[start : start + 4]} for start in range(0, 10, 4)]
    rows_reported = []
    outputs = run_batches(session, batches, ["y"], progress=rows_reported.append)
    assert rows_reported == [4, 4, 2]
    assert list(outputs) == ["y"]
    assert outputs["y"].shape == (10, UNITS)
    np.testing.assert_allclose(outputs["y"], x.astype(np.float64) @ weight, rtol=1e-5, atol=1e-6)


def test_tensor_output_names_leave_out_zipmap_sequences(zipmap_model):
    session = open_session(zipmap_model, device="cpu")
    assert [output.name for output in session.get_outputs()] == ["scores", "probabilities"]
    assert tensor_output_names(session) == ["scores"]


def test_run_batches_with_a_zipmap_output_in_the_model(zipmap_model):
    session = open_session(zipmap_model, device="cpu")
    x = np.arange(3 * CLASSES, dtype=np.float32).reshape(3, CLASSES)
    batches = [{"x": x[:2]}, {"x": x[2:]}]
    # None runs the tensor outputs only; the seq(map) output cannot be joined.
    for names in (None, ["scores"]):
        outputs = run_batches(session, batches, names)
        assert list(outputs) == ["scores"]
        np.testing.assert_array_equal(outputs["scores"], x + 1)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copied = onnx.ModelProto()
    copied.CopyFrom(model)
    return copied


def _record_sources(monkeypatch) -> list:
    """What every new onnxruntime session is opened on (a path or bytes), from now on."""
    sources = []
    real_session = onnxruntime.InferenceSession

    def recording_session(source, *args, **kwargs):
        sources.append(source)
        return real_session(source, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", recording_session)
    return sources


def test_a_model_past_the_protobuf_limit_runs_through_a_file(monkeypatch, matmul_model, weight):
    # The 2 GB case scaled down, with initializers too small to be handed over as arrays
    # (as bfloat16 ones would be too): such a proto cannot become bytes, so the session
    # reads a temporary copy with external data; the caller's proto keeps its weights.
    model = matmul_model
    feeds = {"x": np.random.default_rng(0).normal(size=(3, FEATURES)).astype(np.float32)}
    expected = open_session(model, "cpu").run(None, feeds)[0]
    monkeypatch.setattr(modelio, "PROTOBUF_LIMIT_BYTES", 10)
    sources = _record_sources(monkeypatch)
    before = [numpy_helper.to_array(t).copy() for t in model.graph.initializer]
    actual = open_session(model, "cpu").run(None, feeds)[0]
    np.testing.assert_array_equal(actual, expected)
    assert len(sources) == 1 and isinstance(sources[0], str)  # a path, not bytes
    for tensor, weights in zip(model.graph.initializer, before):
        assert tensor.data_location == TensorProto.DEFAULT
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), weights)


def test_a_consumed_model_runs_from_a_file_that_is_gone_once_the_session_holds_it(
    monkeypatch, matmul_model
):
    # A throwaway slice's large weights go to a temporary file so that they exist once, in
    # onnxruntime: the session must read a path, give the same outputs, and leave no file;
    # a slice with none (every weight below the threshold) stays in memory.
    feeds = {"x": np.random.default_rng(0).normal(size=(3, FEATURES)).astype(np.float32)}
    expected = open_session(matmul_model, "cpu").run(None, feeds)[0]
    sources = _record_sources(monkeypatch)
    small = open_session(_copy(matmul_model), "cpu", consume=True)
    monkeypatch.setattr(runtime, "SHARED_INITIALIZER_BYTES", 1)
    session = open_session(_copy(matmul_model), "cpu", consume=True)
    for opened in (small, session):
        np.testing.assert_array_equal(opened.run(None, feeds)[0], expected)
    assert isinstance(sources[0], bytes) and isinstance(sources[1], str)
    assert not os.path.exists(os.path.dirname(sources[1]))
    with pytest.raises(ValueError, match="consume"):
        open_session("model.onnx", "cpu", consume=True)


def test_cuda_provider_keeps_full_float32(monkeypatch, matmul_model):
    # TF32 products would differ from torch's float32 statistics by about 1e-3.
    seen = []

    def fake_session(source, sess_options=None, providers=None):
        seen.append(providers)
        raise ort_errors.Fail("stop here")

    monkeypatch.setattr(runtime, "session_providers", lambda device: [CUDA_PROVIDER, CPU_PROVIDER])
    monkeypatch.setattr(onnxruntime, "InferenceSession", fake_session)
    with pytest.raises(UsageError):
        open_session(matmul_model, device="cuda")
    assert seen == [[(CUDA_PROVIDER, {"use_tf32": "0"}), CPU_PROVIDER]]


def test_large_initializers_reach_onnxruntime_beside_the_bytes(monkeypatch):
    # Every initializer counts as large here: the bytes hold none of them, a model past the
    # (lowered) protobuf limit needs no file, and the caller's proto is left as it was.
    import gc

    units = 2000  # 24 kB of weights against a graph of a few hundred bytes
    weight = np.random.default_rng(5).normal(size=(FEATURES, units)).astype(np.float32)
    model = _make_model(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="dense")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", units])],
        [numpy_helper.from_array(weight, "W")],
    )
    feeds = {"x": np.random.default_rng(0).normal(size=(3, FEATURES)).astype(np.float32)}
    expected = open_session(model, "cpu").run(None, feeds)[0]
    before = model.SerializeToString()
    monkeypatch.setattr(runtime, "SHARED_INITIALIZER_BYTES", 1)
    monkeypatch.setattr(modelio, "PROTOBUF_LIMIT_BYTES", 10_000)
    assert modelio.too_large_to_serialise(model)
    sources = _record_sources(monkeypatch)
    session = open_session(model, "cpu")
    gc.collect()  # the arrays must live as long as the session, not as long as the call
    np.testing.assert_array_equal(session.run(None, feeds)[0], expected)
    assert len(sources) == 1 and isinstance(sources[0], bytes)
    shipped = onnx.load_model_from_string(sources[0]).graph.initializer
    assert [t.data_location for t in shipped] == [TensorProto.EXTERNAL] * len(shipped)
    assert not any(t.raw_data for t in shipped)
    assert model.SerializeToString() == before


def test_tensor_bytes_come_from_shape_and_type_without_reading_the_data():
    # reading raw_data copies it (80 ms per 200 MB); the size follows from dims and type
    float32 = numpy_helper.from_array(np.ones((3, 5), dtype=np.float32), "a")
    float16 = numpy_helper.from_array(np.ones((4,), dtype=np.float16), "b")
    typed = helper.make_tensor("c", TensorProto.DOUBLE, [2, 3], np.ones(6).tolist())
    assert not typed.raw_data  # values in double_data, not raw bytes
    strings = helper.make_tensor("d", TensorProto.STRING, [2], [b"ab", b"cde"])
    external = helper.make_tensor("e", TensorProto.FLOAT, [7, 9], np.ones(63).tolist())
    external.ClearField("float_data")
    external.data_location = TensorProto.EXTERNAL
    sizes = [modelio.tensor_bytes(t) for t in (float32, float16, typed, strings, external)]
    assert sizes == [60, 8, 48, strings.ByteSize(), 0]


def test_the_2gb_check_counts_the_graph_besides_the_initializers(monkeypatch, matmul_model):
    # a Constant node's value lives in the graph, not among the initializers
    big = numpy_helper.from_array(np.ones(1000, dtype=np.float32), "c")
    constant = helper.make_node("Constant", [], ["unused"], value=big)
    with_constant = onnx.ModelProto()
    with_constant.CopyFrom(matmul_model)
    with_constant.graph.node.append(constant)
    weights = modelio.weight_bytes(matmul_model)
    monkeypatch.setattr(modelio, "PROTOBUF_LIMIT_BYTES", weights + 1000)
    assert not modelio.too_large_to_serialise(matmul_model)
    assert modelio.too_large_to_serialise(with_constant)  # 4000 bytes of value in a node
