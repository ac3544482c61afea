"""neurons.py and `compress --structure neuron`: whole units out, on the shipped sample."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from ecprune_onnx.calib import input_specs, load_calib
from ecprune_onnx.cli import app
from ecprune_onnx.compress import compress
from ecprune_onnx.errors import UsageError
from ecprune_onnx.evaluate import evaluate
from ecprune_onnx.groups import find_neuron_groups
from ecprune_onnx.instrument import TorchGraph, instrument, with_outputs
from ecprune_onnx.layers import find_dense_layers
from ecprune_onnx.neurons import prune_neurons
from ecprune_onnx.runtime import open_session
from ecprune_onnx.stats import collect_stats

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
MODEL, CALIB, TEST = (SAMPLES / name for name in ("digits_mlp.onnx", "calib.npz", "test.npz"))


@pytest.fixture(scope="module")
def at_half(tmp_path_factory) -> dict:
    """The sample at 0.5 of its units by each mode, evaluated on the held-out digits."""
    folder = tmp_path_factory.mktemp("neurons")
    runs = {}
    for label, method, compensate in (
        ("ec", "ec", None),
        ("ec-uncompensated", "ec", False),
        ("magnitude", "magnitude", None),
    ):
        output = folder / f"{label}.onnx"
        result = compress(
            MODEL, CALIB, 0.5, output=output, method=method, compensate=compensate,
            structure="neuron",
        )  # fmt: skip
        runs[label] = (result, evaluate(MODEL, output, TEST, labels="y"))
    return runs


def test_recommended_mode_beats_magnitude_and_uncompensated_ec_at_half(at_half):
    ec = at_half["ec"][1]
    for rival in ("ec-uncompensated", "magnitude"):
        assert ec.outputs[0].mse < at_half[rival][1].outputs[0].mse / 10
        assert ec.metric_pruned > at_half[rival][1].metric_pruned
    assert ec.metric_pruned >= ec.metric_original - 0.01


def test_half_the_units_make_a_file_at_least_1_9_times_smaller(at_half):
    result, evaluation = at_half["ec"]
    assert evaluation.size_original >= 1.9 * evaluation.size_pruned
    units = {layer.name: layer.units_removed for layer in result.layers}
    assert units["/fc1/Gemm"] + units["/fc2/Gemm"] == 128 and units["/fc3/Gemm"] is None
    assert [g.layer for g in result.skipped_groups] == ["/fc3/Gemm"]
    # the budget follows measured damage, not a uniform share
    assert units["/fc1/Gemm"] != 64
    shapes = {t.name: list(t.dims) for t in onnx.load(result.output).graph.initializer}
    assert shapes["fc2.weight"] == [128 - units["/fc2/Gemm"], 128 - units["/fc1/Gemm"]]
    assert result.measured_deviation > 0 and result.predicted_deviation > 0


def test_ratio_zero_is_the_identity(tmp_path):
    output = tmp_path / "zero.onnx"
    result = compress(MODEL, CALIB, 0.0, output=output, structure="neuron")
    assert result.measured_deviation == 0.0
    assert output.read_bytes() == MODEL.read_bytes()
    assert all(layer.units_removed in (0, None) for layer in result.layers)


def test_bias_shift_is_the_least_squares_bias_of_the_last_hidden_layer():
    model = onnx.load(MODEL)
    layers = find_dense_layers(model).layers
    data = load_calib(CALIB, input_specs(model), None)
    graph_model, roles = instrument(model, layers, ["logits"])
    # exact probes: the logits are fc3's output, so c_i(r) = 1 for fc3 and S1/S0 is the mean
    stats, _ = collect_stats(
        TorchGraph(graph_model, torch.device("cpu")), roles, layers, data.batches(256), 16, 0
    )
    groups = find_neuron_groups(model, layers).groups
    result = prune_neurons(model, groups, stats, "ec", 0.5, "layer", "bias", 0, None)
    keep = result.keep["/fc2/Gemm"]
    hidden = open_session(with_outputs(model, ["/act2/Tanh_output_0"])).run(None, data.arrays)[0]
    fc3 = {layer.name: layer for layer in layers}["/fc3/Gemm"]
    expected = fc3.bias + fc3.weight[:, ~keep] @ hidden[:, ~keep].astype(np.float64).mean(0)
    new_bias = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer}
    np.testing.assert_allclose(new_bias["fc3.bias"], expected, rtol=1e-5, atol=1e-6)
    # ... which is the least-squares optimum of the bias with the kept weights fixed
    residual = hidden[:, ~keep].astype(np.float64) @ fc3.weight[:, ~keep].T + fc3.bias
    optimum = np.linalg.lstsq(np.ones((len(hidden), 1)), residual, rcond=None)[0][0]
    np.testing.assert_allclose(new_bias["fc3.bias"], optimum, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("options", "culprit"),
    [
        ({"method": "wanda"}, "--method wanda"),
        ({"scope": "row"}, "--scope row"),
        ({"pattern": "2:4"}, "--pattern"),
        ({"steps": 2}, "--steps 2"),
        ({"structure": "channel"}, "--structure channel"),
    ],
)
def test_options_that_do_not_apply_to_units_are_refused(tmp_path, options, culprit):
    options = {"structure": "neuron", **options}
    ratio = None if "pattern" in options else 0.5
    with pytest.raises(UsageError, match=culprit):
        compress(MODEL, CALIB, ratio, output=tmp_path / "out.onnx", **options)


def test_cli_compress_and_inspect_show_the_units(tmp_path):
    runner, output = CliRunner(), tmp_path / "out.onnx"
    args = ["compress", str(MODEL), "--calib", str(CALIB), "--ratio", "0.3", "-o", str(output)]
    result = runner.invoke(app, [*args, "--structure", "neuron", "--method", "magnitude"])
    assert result.exit_code == 0, result.output
    assert "units removed" in result.stderr and "units not removable: /fc3/Gemm" in result.stderr
    assert find_neuron_groups(onnx.load(output)).groups[0].units < 128
    shown = runner.invoke(app, ["inspect", str(MODEL), "--json"])
    groups = json.loads(shown.stdout)["neuron_groups"]
    assert [(g["producer"], g["units"], g["consumers"]) for g in groups] == [
        ("/fc1/Gemm", 128, ["/fc2/Gemm"]),
        ("/fc2/Gemm", 128, ["/fc3/Gemm"]),
    ]
    assert "neuron groups" in runner.invoke(app, ["inspect", str(MODEL)]).stdout
