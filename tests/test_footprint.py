"""footprint.py: raw and gzip sizes of a model with its external data."""

from __future__ import annotations

import gzip

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ecprune_onnx.footprint import file_sizes


def _model(weight: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 256])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 256])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph)


def test_sizes_count_external_data_and_match_gzip(tmp_path):
    weight = np.random.default_rng(0).normal(size=(256, 256)).astype(np.float32)
    path = tmp_path / "m.onnx"
    onnx.save_model(_model(weight), path, save_as_external_data=True, location="m.onnx.data")
    sizes = file_sizes(path)
    files = [path, tmp_path / "m.onnx.data"]
    assert sizes.raw == sum(file.stat().st_size for file in files) > weight.nbytes
    # one gzip stream of both files: within a header of gzip.compress of their concatenation
    expected = len(gzip.compress(b"".join(file.read_bytes() for file in files), 9))
    assert abs(sizes.gzip - expected) <= 16


def test_zeros_compress_and_random_floats_hardly_do(tmp_path):
    for name, weight in (
        ("zeros", np.zeros((256, 256), np.float32)),
        ("random", np.random.default_rng(1).normal(size=(256, 256)).astype(np.float32)),
    ):
        onnx.save_model(_model(weight), tmp_path / f"{name}.onnx")
    zeros, random = file_sizes(tmp_path / "zeros.onnx"), file_sizes(tmp_path / "random.onnx")
    assert zeros.gzip < zeros.raw / 100
    assert random.gzip > random.raw * 0.8
