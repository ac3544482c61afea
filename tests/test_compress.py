"""compress() on the shipped sample: compensation helps where the linearisation holds."""

from __future__ import annotations

from pathlib import Path

import pytest

from ecprune_onnx.compress import compress
from ecprune_onnx.evaluate import evaluate

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def _test_mse(tmp_path, method, ratio):
    output = tmp_path / f"{method}-{ratio}.onnx"
    compress(
        SAMPLES / "digits_mlp.onnx", SAMPLES / "calib.npz", ratio, output=output, method=method
    )
    result = evaluate(SAMPLES / "digits_mlp.onnx", output, SAMPLES / "test.npz", labels="y")
    return result.outputs[0].mse


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_ec_beats_magnitude_and_sensitivity_on_the_sample(tmp_path, ratio):
    ec = _test_mse(tmp_path, "ec", ratio)
    assert ec < _test_mse(tmp_path, "magnitude", ratio)
    assert ec < _test_mse(tmp_path, "sensitivity", ratio)


def test_ratio_zero_is_the_identity(tmp_path):
    output = tmp_path / "zero.onnx"
    result = compress(SAMPLES / "digits_mlp.onnx", SAMPLES / "calib.npz", 0.0, output=output)
    assert result.measured_deviation == 0.0
    assert output.read_bytes() == (SAMPLES / "digits_mlp.onnx").read_bytes()
