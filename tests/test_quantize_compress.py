"""compress(quantize=...) on the shipped sample: the files, their error, their size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from graphs import one_matmul

from ecprune_onnx import quantize
from ecprune_onnx.compress import compress
from ecprune_onnx.errors import UsageError
from ecprune_onnx.layers import find_dense_layers
from ecprune_onnx.qformat import write_quantized
from ecprune_onnx.quantize import QuantSpec

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
MODEL, CALIB = SAMPLES / "digits_mlp.onnx", SAMPLES / "calib.npz"


def _logits(path_or_model, x):
    model = (
        path_or_model if isinstance(path_or_model, onnx.ModelProto) else onnx.load(path_or_model)
    )
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return session.run(None, {"x": x})[0].astype(np.float64)


def _rounded(spec: QuantSpec) -> onnx.ModelProto:
    """The sample with every weight rounded to nearest on the same grids: nothing refit."""
    model = onnx.load(MODEL)
    layers = find_dense_layers(model).layers
    quantized = {layer.name: quantize.rtn(layer.weight, None, spec) for layer in layers}
    return write_quantized(model, layers, quantized, "nbits")


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_file_runs_and_beats_rounding_on_held_out_rows(tmp_path, bits):
    output = tmp_path / f"int{bits}.onnx"
    result = compress(MODEL, CALIB, quantize=f"int{bits}", output=output)
    nodes = [node for node in onnx.load(output).graph.node if node.op_type == "MatMulNBits"]
    # MatMulNBits at int8 too (qformat.DEFAULT_FORMAT)
    assert [onnx.helper.get_node_attr_value(node, "bits") for node in nodes] == [bits] * 3
    x = np.load(SAMPLES / "test.npz")["x"]
    reference = _logits(MODEL, x)
    ours = np.square(_logits(output, x) - reference).mean()
    spec = QuantSpec(bits, 32 if bits == 4 else None, symmetric=result.symmetric)
    rounded = np.square(_logits(_rounded(spec), x) - reference).mean()
    assert ours < 0.7 * rounded
    assert result.size_output.raw < result.size_original.raw / (3 if bits == 8 else 4.5)
    assert result.size_output.gzip < result.size_output.raw
    assert result.measured_mse > 0


def _dequantized_weights(path, feeds=None) -> list[np.ndarray]:
    """The outputs of the file's DequantizeLinear nodes, as onnxruntime computes them."""
    model = onnx.load(path)
    names = [n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"]
    model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    feeds = feeds or {"x": np.load(SAMPLES / "test.npz")["x"][:1]}
    return session.run(names, feeds)


def test_pruning_and_quantizing_in_one_pass_keeps_the_zeros(tmp_path):
    output = tmp_path / "pruned-int8.onnx"
    result = compress(MODEL, CALIB, 0.5, quantize="int8", quant_format="qdq", output=output)
    assert result.sparsity == pytest.approx(0.5, abs=1e-3)
    weights = _dequantized_weights(output)
    assert len(weights) == len(result.layers)
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros >= sum(layer.removed for layer in result.layers)


def test_neuron_structure_then_quantization(tmp_path):
    output = tmp_path / "units-int4.onnx"
    result = compress(MODEL, CALIB, 0.25, quantize="int4", structure="neuron", output=output)
    assert sum(layer.units_removed or 0 for layer in result.layers) > 0
    x = np.load(SAMPLES / "test.npz")["x"]
    assert _logits(output, x).shape == (len(x), 10)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"quantize": "int3"}, "int8, int4"),
        ({"quantize": "int4", "quant_format": "qdq"}, "opset 21"),
        ({"quantize": "int4", "block_size": 24}, "power of two"),
        ({"quant_format": "nbits"}, "--quantize"),
    ],
)
def test_bad_quantize_options_leave_nothing_behind(tmp_path, options, message):
    output = tmp_path / "never.onnx"
    with pytest.raises(UsageError, match=message):
        compress(MODEL, CALIB, output=output, **options)
    assert not output.exists()
    assert list(tmp_path.iterdir()) == []


def test_quantize_needs_calibration(tmp_path):
    with pytest.raises(UsageError, match="calib"):
        compress(MODEL, None, quantize="int8", output=tmp_path / "never.onnx")


def test_the_command_line_quantizes_and_refuses_a_bad_width(tmp_path):
    from typer.testing import CliRunner

    from ecprune_onnx.cli import app

    output = tmp_path / "cli.int4.onnx"
    args = ["compress", MODEL, "--calib", CALIB, "--quantize", "int4", "-o", output]
    result = CliRunner().invoke(app, [str(arg) for arg in args])
    assert result.exit_code == 0, result.output
    assert "quantized int4 (blocks of 32, asymmetric) as nbits" in result.stderr
    assert output.is_file()
    bad = ["compress", MODEL, "--calib", CALIB, "--quantize", "int2", "-o", tmp_path / "x.onnx"]
    result = CliRunner().invoke(app, [str(arg) for arg in bad])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == ["error: --quantize int2: expected one of int8, int4"]
    assert not (tmp_path / "x.onnx").exists()


def test_pruning_in_the_pass_keeps_inputs_that_are_constant_on_the_calibration_rows(tmp_path):
    """An input that is 0 on every calibration row is not 0 on every row: its large weights
    are not free to remove (the solvers alone would remove them first)."""
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(16, 8)).astype(np.float32)
    weight[0] = 3.0  # input 0: the largest weights, dead on the calibration rows
    source = tmp_path / "one.onnx"
    onnx.save(one_matmul(weight), source)
    x = rng.normal(size=(256, 16)).astype(np.float32)
    x[:, 0] = 0.0
    np.savez(tmp_path / "calib.npz", x=x)
    output = tmp_path / "out.onnx"
    compress(
        source, tmp_path / "calib.npz", 0.25, quantize="int8", quant_format="qdq", output=output
    )
    (dequantized,) = _dequantized_weights(output, {"x": x[:1]})
    assert (dequantized[0] != 0).all()
    assert (dequantized == 0).sum() >= 0.25 * dequantized.size - 1
