"""Property tests of compress on random fully-connected graphs.

A drawn network has 1 to 5 dense layers of widths 1 to 64, each a Gemm (any transA, transB,
alpha, beta and shape of C, C absent or given as an empty name), a MatMul + Add (the bias
first or second input) or a bare MatMul, on rank-2 or rank-3 activations (Gemm on rank 2
only), with Relu, Tanh, Sigmoid, Gelu, LeakyRelu or nothing between layers; the output is
the last dense layer's. For every method × scope × ratio:

- the written file passes the full onnx checker and onnxruntime runs it;
- the zeros in the file are the requested share, within one weight per group (all dense
  weights for global scope, each layer for layer scope, each row for row scope), and are
  what the result reports;
- two runs with the same seed write byte-identical files;
- ratio 0 gives onnxruntime's original outputs exactly;
- for `ec`, the last layer's new bias is the least-squares optimal one given its kept
  weights (the other layers excluded, scope layer; see test_scores.py).
"""

from __future__ import annotations

import itertools
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from ecprune_onnx import compress
from ecprune_onnx.instrument import with_outputs
from ecprune_onnx.layers import find_dense_layers
from tests import graphs

# Gelu is an ONNX op from opset 20; onnxruntime 1.31 runs IR 10.
OPSET, IR_VERSION = 20, 10
SEQ = 3
ACTIVATIONS = ("Relu", "Tanh", "Sigmoid", "Gelu", "LeakyRelu", None)
METHODS = ("ec", "sensitivity", "magnitude", "wanda", "random")
SCOPES = ("global", "layer", "row")
C_SHAPES: tuple = (*graphs.GEMM_C_SHAPES, "")  # absent, scalar, [1], [out], [1, out], ""
GEMM_ATTRIBUTES = list(
    itertools.product((0, 1), (0, 1), (1.0, 0.5), (1.0, 2.0, 0.0), range(len(C_SHAPES)))
)
SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass(frozen=True)
class LayerSpec:
    """One dense layer and the activation after it.

    gemm: (transA, transB, alpha, beta, index into C_SHAPES) for kind "gemm".
    """

    kind: str
    width: int
    gemm: tuple[int, int, float, float, int] | None = None
    bias_first: bool = False
    activation: str | None = None


@dataclass(frozen=True)
class Network:
    rank: int
    in_features: int
    layers: tuple[LayerSpec, ...]
    seed: int


@dataclass(frozen=True)
class Built:
    """A network as an ONNX model, with the layers as built and calibration inputs."""

    model: onnx.ModelProto
    expected: list[graphs.ExpectedLayer]
    last_input: str  # the activation reaching the last layer (before any transA Transpose)
    x: np.ndarray
    output: str


@st.composite
def layer_specs(draw, rank: int, last: bool) -> LayerSpec:
    kinds = ("gemm", "matmul_add", "matmul") if rank == 2 else ("matmul_add", "matmul")
    kind = draw(st.sampled_from(kinds))
    return LayerSpec(
        kind=kind,
        width=draw(st.integers(1, 64)),
        gemm=draw(st.sampled_from(GEMM_ATTRIBUTES)) if kind == "gemm" else None,
        bias_first=draw(st.booleans()),
        activation=None if last else draw(st.sampled_from(ACTIVATIONS)),
    )


@st.composite
def networks(draw) -> Network:
    rank = draw(st.sampled_from((2, 3)))
    depth = draw(st.integers(1, 5))
    layers = tuple(draw(layer_specs(rank, last=i == depth - 1)) for i in range(depth))
    return Network(rank, draw(st.integers(1, 64)), layers, draw(st.integers(0, 2**16)))


def _dense(builder: graphs.GraphBuilder, spec: LayerSpec, prefix: str, a: str, n_in: int):
    sizes = (n_in, spec.width)
    if spec.kind == "gemm":
        trans_a, trans_b, alpha, beta, c_index = spec.gemm
        return builder.gemm(prefix, a, sizes, trans_a, trans_b, alpha, beta, C_SHAPES[c_index])
    if spec.kind == "matmul_add":
        return builder.matmul_add(prefix, a, sizes, bias_first=spec.bias_first)
    return builder.matmul(prefix, a, sizes)


def build(network: Network, rows: int = 12) -> Built:
    builder = graphs.GraphBuilder(network.seed)
    lead = ["rows"] if network.rank == 2 else ["batch", SEQ]
    a, n_in, expected = "x", network.in_features, []
    for index, spec in enumerate(network.layers):
        last_input = a
        z, layer = _dense(builder, spec, f"l{index}", a, n_in)
        expected.append(layer)
        a, n_in = z, spec.width
        if spec.activation is not None:
            a = builder.node(spec.activation, [z], f"l{index}_act", f"act{index}")
    model = graphs.make_model(
        builder.nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*lead, network.in_features])],
        [helper.make_tensor_value_info(a, TensorProto.FLOAT, [*lead, n_in])],
        builder.initializers,
        opset=OPSET,
        ir_version=IR_VERSION,
    )
    shape = (rows, network.in_features) if network.rank == 2 else (rows, SEQ, network.in_features)
    return Built(model, expected, last_input, builder.array(shape), a)


def run(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    return graphs.run_onnxruntime(onnx.load(str(path)), {"x": x})


def effective_layers(path: Path) -> dict[str, object]:
    """The dense layers of a model file by name, with effective weights and biases."""
    return {layer.name: layer for layer in find_dense_layers(onnx.load(str(path))).layers}


def assert_sparsity(weights: list[np.ndarray], ratio: float, scope: str) -> None:
    """Zeros are the requested share within one weight per group of the scope."""
    zeros = [weight == 0 for weight in weights]
    if scope == "global":
        total = sum(weight.size for weight in weights)
        assert abs(sum(int(z.sum()) for z in zeros) - ratio * total) <= 1
    elif scope == "layer":
        for z in zeros:
            assert abs(int(z.sum()) - ratio * z.size) <= 1
    else:
        for z in zeros:
            assert np.all(np.abs(z.sum(axis=1) - ratio * z.shape[1]) <= 1)


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory(prefix="ecprune-properties-") as folder:
        yield Path(folder)


def _files(scratch: Path, built: Built) -> tuple[Path, Path]:
    model, calib = scratch / "model.onnx", scratch / "calib.npz"
    onnx.save(built.model, model)
    np.savez(calib, x=built.x)
    return model, calib


@SETTINGS
@given(
    network=networks(),
    method=st.sampled_from(METHODS),
    scope=st.sampled_from(SCOPES),
    ratio=st.floats(0.05, 0.95),
    seed=st.integers(0, 1000),
)
def test_compress_writes_a_valid_file_of_the_requested_sparsity(
    scratch, network, method, scope, ratio, seed
):
    built = build(network)
    model, calib = _files(scratch, built)
    first, second = scratch / "first.onnx", scratch / "second.onnx"
    options = {"method": method, "scope": scope, "seed": seed, "force": True}

    result = compress(model, calib, ratio, output=first, **options)

    onnx.checker.check_model(str(first), full_check=True)
    outputs = run(first, built.x)
    assert outputs[built.output].shape == run(model, built.x)[built.output].shape
    layers = effective_layers(first)
    assert [report.name for report in result.layers] == [layer.name for layer in built.expected]
    weights = [layers[expected.name].weight for expected in built.expected]
    # The drawn weights are never exactly 0: every zero was written by the pruning.
    assert not any(np.any(expected.weight == 0) for expected in built.expected)
    assert [int((w == 0).sum()) for w in weights] == [r.removed for r in result.layers]
    assert_sparsity(weights, ratio, scope)

    compress(model, calib, ratio, output=second, **options)
    assert first.read_bytes() == second.read_bytes()


@SETTINGS
@given(network=networks(), method=st.sampled_from(METHODS), scope=st.sampled_from(SCOPES))
def test_ratio_zero_is_the_identity(scratch, network, method, scope):
    built = build(network)
    model, calib = _files(scratch, built)
    output = scratch / "zero.onnx"

    result = compress(model, calib, 0.0, output=output, method=method, scope=scope, force=True)

    assert all(layer.removed == 0 for layer in result.layers)
    original, pruned = run(model, built.x), run(output, built.x)
    assert np.array_equal(pruned[built.output], original[built.output])


def last_layer_input(built: Built, model: onnx.ModelProto) -> np.ndarray:
    """The activation reaching the last dense layer on every calibration row, [rows, in]."""
    name = built.last_input
    if name == "x":
        a = built.x
    else:
        a = graphs.run_onnxruntime(with_outputs(model, [name]), {"x": built.x})[name]
    return a.astype(np.float64).reshape(-1, a.shape[-1])


def assert_last_bias_is_least_squares_optimal(built: Built, pruned_path: Path) -> None:
    """b' = mean over rows of (W a + b − W_kept a): with y = z every row weighs 1."""
    last = built.expected[-1]
    pruned = effective_layers(pruned_path)[last.name]
    a = last_layer_input(built, built.model)
    kept = pruned.weight
    assert np.array_equal(kept != 0, (kept != 0) & (last.weight != 0))
    optimal = (a @ last.weight.T + last.bias - a @ kept.T).mean(axis=0)
    scale = max(1.0, float(np.abs(optimal).max()))
    np.testing.assert_allclose(pruned.bias, optimal, rtol=1e-4, atol=1e-4 * scale)


@SETTINGS
@given(network=networks(), ratio=st.floats(0.1, 0.9))
def test_ec_gives_the_last_layer_its_least_squares_bias(scratch, network, ratio):
    built = build(network)
    model, calib = _files(scratch, built)
    output = scratch / "ec.onnx"
    others = [layer.name for layer in built.expected[:-1]]

    result = compress(model, calib, ratio, output=output, scope="layer", exclude=others, force=True)

    (last,) = result.layers
    assert last.removed == round(ratio * built.expected[-1].weight.size)
    assert_last_bias_is_least_squares_optimal(built, output)


@pytest.mark.parametrize("attributes", GEMM_ATTRIBUTES, ids=str)
def test_every_gemm_attribute_combination_on_one_layer(scratch, attributes):
    """Each of the 144 combinations once: a lone Gemm is its network's last layer."""
    spec = LayerSpec("gemm", width=5, gemm=attributes)
    seed = GEMM_ATTRIBUTES.index(attributes)
    built = build(Network(rank=2, in_features=7, layers=(spec,), seed=seed))
    model, calib = _files(scratch, built)
    output = scratch / "gemm.onnx"

    result = compress(model, calib, 0.4, output=output, scope="layer", force=True)

    onnx.checker.check_model(str(output), full_check=True)
    assert result.layers[0].removed == 14
    assert_last_bias_is_least_squares_optimal(built, output)
