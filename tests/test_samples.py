"""Checks of the shipped sample model and data in ``samples/`` (no retraining, except
the regeneration test, which reruns ``samples/make_samples.py`` in a temporary folder)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
ONNX_PATH = SAMPLES / "digits_mlp.onnx"
NPZ_SHAPES = {"calib.npz": 512, "test.npz": 500}
GEMM_SHAPES = [((128, 64), (128,)), ((128, 128), (128,)), ((10, 128), (10,))]


def _load_npz(name: str) -> dict[str, np.ndarray]:
    with np.load(SAMPLES / name, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def _dims(value_info: onnx.ValueInfoProto) -> list[str | int]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_onnx_passes_checker_and_has_three_gemms():
    onnx.checker.check_model(str(ONNX_PATH), full_check=True)
    model = onnx.load(str(ONNX_PATH))
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    assert len(gemms) == 3
    for node, (w_shape, b_shape) in zip(gemms, GEMM_SHAPES, strict=True):
        assert inits.get(node.input[1]) == w_shape, node.name
        assert inits.get(node.input[2]) == b_shape, node.name
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs.get("transB") == 1
    assert [i.name for i in model.graph.input] == ["x"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert _dims(model.graph.input[0]) == ["batch", 64]
    assert _dims(model.graph.output[0]) == ["batch", 10]


def test_onnxruntime_test_accuracy():
    test = _load_npz("test.npz")
    sess = ort.InferenceSession(str(ONNX_PATH), providers=["CPUExecutionProvider"])
    (logits,) = sess.run(["logits"], {"x": test["x"]})
    assert logits.shape == (500, 10)
    assert (logits.argmax(axis=1) == test["y"]).mean() >= 0.95


@pytest.mark.parametrize("name", sorted(NPZ_SHAPES))
def test_npz_arrays(name: str):
    data = _load_npz(name)
    n = NPZ_SHAPES[name]
    assert sorted(data) == ["x", "y"]
    x, y = data["x"], data["y"]
    assert x.dtype == np.float32 and x.shape == (n, 64)
    assert y.dtype == np.int64 and y.shape == (n,)
    assert np.isfinite(x).all()
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert set(np.unique(y)) == set(range(10))


def test_calibration_rows_not_in_test_set():
    calib, test = _load_npz("calib.npz"), _load_npz("test.npz")
    test_rows = {row.tobytes() for row in test["x"]}
    shared = sum(row.tobytes() in test_rows for row in calib["x"])
    # digits holds a few duplicate images, so a rare coincidence is not a leak.
    assert shared < 0.01 * len(calib["x"])


def test_regeneration_is_byte_identical(tmp_path: Path):
    torch = pytest.importorskip("torch")
    recorded = {p.key: p.value for p in onnx.load(str(ONNX_PATH)).metadata_props}
    subprocess.run(
        [sys.executable, str(SAMPLES / "make_samples.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    for name in NPZ_SHAPES:
        assert _sha256(tmp_path / name) == _sha256(SAMPLES / name), name
    if recorded.get("torch_version") != torch.__version__:
        # Another torch trains to other floats; only the data files must still match.
        pytest.skip(f"samples made with torch {recorded.get('torch_version')}")
    # The same torch on another CPU (its kernels for AVX2 or AVX-512) rounds the training's
    # sums differently: the same graph, and weights that differ by float32 rounding (4e-7
    # between two cloud CPUs), never bytes that match everywhere.
    shipped, regenerated = onnx.load(str(ONNX_PATH)), onnx.load(str(tmp_path / ONNX_PATH.name))
    assert regenerated.graph.node == shipped.graph.node
    assert regenerated.metadata_props == shipped.metadata_props
    for ours, theirs in zip(regenerated.graph.initializer, shipped.graph.initializer, strict=True):
        assert ours.name == theirs.name
        expected = onnx.numpy_helper.to_array(theirs)
        np.testing.assert_allclose(onnx.numpy_helper.to_array(ours), expected, rtol=0, atol=1e-5)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
