"""`compress --structure neuron --weight-ratio`: whole units out, then single weights zeroed
in what remains (compress.py's weight stage), on the shipped digits sample."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from ecprune_onnx.cli import app
from ecprune_onnx.compress import compress
from ecprune_onnx.errors import UsageError
from ecprune_onnx.layers import find_dense_layers

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
MODEL, CALIB, TEST = (SAMPLES / name for name in ("digits_mlp.onnx", "calib.npz", "test.npz"))
UNITS, WEIGHTS = 0.3, 0.5


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """30% of the units alone; then half of the remaining weights by ecr in the same run; and
    half of the weights of the units-alone file by a plain ecr run."""
    folder = tmp_path_factory.mktemp("combined")
    units = compress(MODEL, CALIB, UNITS, output=folder / "units.onnx", structure="neuron")
    combined = compress(
        MODEL, CALIB, UNITS, output=folder / "combined.onnx", structure="neuron",
        weight_ratio=WEIGHTS,
    )  # fmt: skip
    plain = compress(units.output, CALIB, WEIGHTS, output=folder / "plain.onnx", method="ecr")
    return {"units": units, "combined": combined, "plain": plain}


def dense_weights(path) -> dict[str, np.ndarray]:
    """Every dense layer's effective [out, in] weight in a written file, by layer name."""
    return {layer.name: layer.weight for layer in find_dense_layers(onnx.load(path)).layers}


def initializers(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}


def test_units_go_as_alone_and_then_half_of_the_remaining_weights_are_zero(runs):
    shrunk, combined = (dense_weights(runs[key].output) for key in ("units", "combined"))
    original = dense_weights(MODEL)
    assert {n: w.shape for n, w in combined.items()} == {n: w.shape for n, w in shrunk.items()}
    assert sum(w.size for w in combined.values()) < 0.6 * sum(w.size for w in original.values())
    remaining = sum(w.size for w in combined.values())
    zeros = sum(int((w == 0).sum()) for w in combined.values())
    assert abs(zeros - WEIGHTS * remaining) <= len(combined)  # rounding, at most 1 per layer
    assert all((w != 0).all() for w in shrunk.values())  # the zeros are the weight stage's


def test_sparsity_counts_the_original_weights_gone_from_the_file(runs):
    result, written = runs["combined"], dense_weights(runs["combined"].output)
    for layer in result.layers:
        assert layer.removed == layer.weights - int(np.count_nonzero(written[layer.name]))
    original = sum(layer.weights for layer in result.layers)
    nonzero = sum(int(np.count_nonzero(w)) for w in written.values())
    assert result.sparsity == pytest.approx((original - nonzero) / original, abs=1e-12)
    assert result.sparsity > runs["units"].sparsity + 0.2


def test_the_weight_stage_is_plain_pruning_of_the_shrunk_model(runs):
    """Same weights as ecr on the units-alone file; removals and damage add up by layer."""
    units, combined, plain = runs["units"], runs["combined"], runs["plain"]
    expected, written = initializers(plain.output), initializers(combined.output)
    assert expected.keys() == written.keys()
    for name, array in expected.items():
        np.testing.assert_array_equal(written[name], array, err_msg=name)
    for before, after, total in zip(units.layers, plain.layers, combined.layers):
        assert total.removed == before.removed + after.removed
        assert total.predicted_damage == pytest.approx(
            before.predicted_damage + after.predicted_damage, rel=1e-9
        )
        assert total.units_removed == before.units_removed
    assert (combined.weight_ratio, combined.weight_method) == (WEIGHTS, "ecr")
    assert (units.weight_ratio, units.weight_method) == (None, None)


def test_the_written_file_is_valid_and_keeps_its_accuracy(runs):
    onnx.checker.check_model(runs["combined"].output, full_check=True)
    test = np.load(TEST)

    def accuracy(path) -> float:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        logits = session.run(["logits"], {"x": test["x"]})[0]
        return float((logits.argmax(axis=1) == test["y"]).mean())

    assert accuracy(runs["combined"].output) >= accuracy(MODEL) - 0.01


def test_weight_ratio_zero_writes_the_units_alone_file(runs, tmp_path):
    output = tmp_path / "zero.onnx"
    result = compress(
        MODEL, CALIB, UNITS, output=output, structure="neuron", weight_ratio=0.0
    )  # fmt: skip
    assert output.read_bytes() == Path(runs["units"].output).read_bytes()
    assert result.sparsity == runs["units"].sparsity


@pytest.mark.parametrize("method", ["ec", "magnitude", "ecr"])
def test_without_units_removed_it_is_plain_weight_pruning(tmp_path, method):
    staged = compress(
        MODEL, CALIB, 0.0, output=tmp_path / "staged.onnx", structure="neuron",
        weight_ratio=0.4, weight_method=method,
    )  # fmt: skip
    plain = compress(MODEL, CALIB, 0.4, output=tmp_path / "plain.onnx", method=method)
    expected, written = initializers(plain.output), initializers(staged.output)
    assert expected.keys() == written.keys()
    for name, array in expected.items():
        np.testing.assert_array_equal(written[name], array, err_msg=name)
    assert staged.sparsity == plain.sparsity > 0.39


def test_a_score_method_with_layer_scope_zeroes_the_share_of_each_shrunk_layer(tmp_path):
    result = compress(
        MODEL, CALIB, UNITS, output=tmp_path / "out.onnx", structure="neuron", scope="layer",
        weight_ratio=WEIGHTS, weight_method="magnitude",
    )  # fmt: skip
    for name, weight in dense_weights(result.output).items():
        assert abs(int((weight == 0).sum()) - WEIGHTS * weight.size) <= 1, name


@pytest.mark.parametrize(
    ("options", "culprit"),
    [
        ({"weight_ratio": 0.5}, "--weight-ratio 0.5: only with --structure neuron"),
        ({"structure": "neuron", "weight_ratio": 1.5}, "--weight-ratio 1.5"),
        ({"structure": "neuron", "weight_ratio": float("nan")}, "--weight-ratio nan"),
        ({"structure": "neuron", "weight_method": "ecr"}, "--weight-method ecr: give --weight-r"),
        ({"structure": "neuron", "weight_ratio": 0.5, "weight_method": "x"}, "--weight-method x"),
    ],
)
def test_bad_weight_stage_options_are_refused_before_any_file_is_read(tmp_path, options, culprit):
    with pytest.raises(UsageError, match=culprit):
        compress(tmp_path / "missing.onnx", None, 0.3, output=tmp_path / "out.onnx", **options)
    assert not list(tmp_path.iterdir())


def test_a_weight_method_that_needs_calibration_is_refused_without_it(tmp_path):
    with pytest.raises(UsageError, match="--weight-method ecr needs calibration data"):
        compress(
            MODEL, None, UNITS, output=tmp_path / "out.onnx", structure="neuron",
            method="magnitude", weight_ratio=WEIGHTS,
        )  # fmt: skip
    assert not list(tmp_path.iterdir())


def test_cli_reports_the_weight_stage(tmp_path):
    output, report = tmp_path / "out.onnx", tmp_path / "report.json"
    result = CliRunner().invoke(
        app,
        [
            "compress", str(MODEL), "--calib", str(CALIB), "--structure", "neuron",
            "--ratio", "0.3", "--weight-ratio", "0.5", "--weight-method", "sparsegpt",
            "-o", str(output), "--report", str(report),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "then sparsegpt on 50% of the weights left" in result.stderr
    data = json.loads(report.read_text())
    assert (data["weight_ratio"], data["weight_method"], data["structure"]) == (
        0.5, "sparsegpt", "neuron"
    )  # fmt: skip
    removed = sum(layer["removed"] for layer in data["layers"])
    assert data["sparsity"] == removed / sum(layer["weights"] for layer in data["layers"])
