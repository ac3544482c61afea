"""The spellings real exporters give dense layers, and the inputs real models take.

Each graph here is a small copy of a pattern found in a real export (named in each test):
`normalize` must keep what the graph computes, `find_dense_layers` must then find the
layer, the torch copy must match onnxruntime, and compress must prune it.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from ecprune_onnx import compress
from ecprune_onnx.calib import input_specs, load_calib
from ecprune_onnx.errors import UsageError
from ecprune_onnx.instrument import (
    TorchGraph,
    check_parity,
    choose_outputs,
    float32_noise,
    instrument,
    parity_tolerance,
)
from ecprune_onnx.layers import find_dense_layers
from ecprune_onnx.normalize import einsum_weight_layout, normalize
from tests.graphs import run_onnxruntime

RNG = np.random.default_rng(0)


def weight(*shape: int, name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)


def model_of(nodes, inputs, outputs, initializers) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def floats(name: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def normalized_copy(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    notes = normalize(copy)
    onnx.checker.check_model(copy)
    return copy, notes


def assert_same_outputs(before, after, feeds, rtol=1e-5) -> None:
    expected, actual = run_onnxruntime(before, feeds), run_onnxruntime(after, feeds)
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=rtol, atol=1e-6)


def parity_of(model: onnx.ModelProto, feeds) -> float:
    layers = find_dense_layers(model).layers
    instrumented, _ = instrument(model, layers, choose_outputs(model, []))
    return check_parity(TorchGraph(instrumented, torch.device("cpu")), feeds).deviation


def identity_bias_model() -> onnx.ModelProto:
    """torch's TorchScript exporter: one zero bias shared by two Gemms through Identity
    nodes (BERT's pooler and GPT-2's Conv1D layers)."""
    nodes = [
        helper.make_node("Identity", ["zero"], ["bias1"]),
        helper.make_node("Identity", ["zero"], ["bias2"]),
        helper.make_node("Gemm", ["x", "w1", "bias1"], ["h"], transB=1),
        helper.make_node("Tanh", ["h"], ["t"]),
        helper.make_node("Gemm", ["t", "w2", "bias2"], ["y"], transB=1),
    ]
    initializers = [
        weight(4, 6, name="w1"),
        weight(4, 4, name="w2"),
        numpy_helper.from_array(np.zeros(4, np.float32), "zero"),
    ]
    return model_of(nodes, [floats("x", ["n", 6])], [floats("y", ["n", 4])], initializers)


def test_identity_routed_biases_become_the_initializer_itself():
    model = identity_bias_model()
    feeds = {"x": RNG.standard_normal((8, 6)).astype(np.float32)}
    assert not any(layer.bias_name for layer in find_dense_layers(model).layers)
    fixed, notes = normalized_copy(model)
    assert_same_outputs(model, fixed, feeds)
    assert [layer.bias_name for layer in find_dense_layers(fixed).layers] == ["zero", "zero"]
    assert notes == ["Identity nodes of initializers bypassed: 2"]
    with pytest.raises(UsageError):  # onnx2pytorch passes the Identity's output to Linear
        parity_of(model, feeds)
    assert parity_of(fixed, feeds) < 1e-5


def broadcast_bias_model() -> onnx.ModelProto:
    """jax2tf / tf2onnx: MatMul + Add with a [1, 1, out] bias on a rank-3 activation."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["p"]),
        helper.make_node("Add", ["p", "b"], ["y"]),
    ]
    bias = numpy_helper.from_array(RNG.standard_normal((1, 1, 5)).astype(np.float32), "b")
    return model_of(
        nodes,
        [floats("x", ["n", 3, 6])],
        [floats("y", ["n", 3, 5])],
        [weight(6, 5, name="w"), bias],
    )


def test_a_broadcast_matmul_bias_is_flattened_and_converts():
    model = broadcast_bias_model()
    feeds = {"x": RNG.standard_normal((4, 3, 6)).astype(np.float32)}
    fixed, _ = normalized_copy(model)
    assert list(next(t for t in fixed.graph.initializer if t.name == "b").dims) == [5]
    assert_same_outputs(model, fixed, feeds)
    with pytest.raises(UsageError, match="first (failing|differing) op: (MatMul|Add) node"):
        parity_of(model, feeds)  # onnx2pytorch's fused Linear refuses the [1, 1, 5] bias
    assert parity_of(fixed, feeds) < 1e-5


def test_a_bias_of_higher_rank_than_the_product_is_left_alone():
    """[1, 1, out] added to a rank-2 product makes the sum rank 3: flattening would not."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["p"]),
        helper.make_node("Add", ["p", "b"], ["y"]),
    ]
    bias = numpy_helper.from_array(np.ones((1, 1, 5), np.float32), "b")
    model = model_of(
        nodes, [floats("x", ["n", 6])], [floats("y", [1, "n", 5])], [weight(6, 5, name="w"), bias]
    )
    fixed, notes = normalized_copy(model)
    assert notes == []
    assert list(next(t for t in fixed.graph.initializer if t.name == "b").dims) == [1, 1, 5]


@pytest.mark.parametrize(
    ("equation", "weight_shape", "weight_first", "x_shape"),
    [
        ("bsi,io->bso", (6, 5), False, ["n", 3, 6]),
        ("...i,oi->...o", (5, 6), False, ["n", 3, 6]),
        ("io,bi->bo", (6, 5), True, ["n", 6]),
    ],
)
def test_matrix_product_einsums_become_matmuls(equation, weight_shape, weight_first, x_shape):
    operands = ["w", "x"] if weight_first else ["x", "w"]
    nodes = [helper.make_node("Einsum", operands, ["y"], equation=equation)]
    model = model_of(
        nodes,
        [floats("x", x_shape)],
        [floats("y", [*x_shape[:-1], 5])],
        [weight(*weight_shape, name="w")],
    )
    feeds = {"x": RNG.standard_normal([4 if d == "n" else d for d in x_shape]).astype(np.float32)}
    assert find_dense_layers(model).skipped[0].op_type == "Einsum"
    fixed, _ = normalized_copy(model)
    assert_same_outputs(model, fixed, feeds)
    (layer,) = find_dense_layers(fixed).layers
    assert layer.shape == (5, 6)


@pytest.mark.parametrize(
    "equation", ["bi,bo->io", "bij,jk->bki", "ii,io->o", "bi,io->bi", "bsi,ios->bso"]
)
def test_other_einsums_are_not_layers(equation):
    assert einsum_weight_layout(equation) is None


def if_model(condition_from_input: bool) -> onnx.ModelProto:
    """A voice-activity model's Gemms inside an If: on a constant, or on a scalar input."""
    then_branch = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w1"], ["then_y"], transB=1)],
        "then",
        [],
        [floats("then_y", ["n", 4])],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w2"], ["else_y"], transB=1)],
        "else",
        [],
        [floats("else_y", ["n", 4])],
    )
    inputs = [floats("x", ["n", 6])]
    initializers = [weight(4, 6, name="w1"), weight(4, 6, name="w2")]
    if condition_from_input:
        inputs.append(helper.make_tensor_value_info("sr", TensorProto.INT64, []))
        nodes = [helper.make_node("Equal", ["sr", "rate"], ["cond"])]
        initializers.append(numpy_helper.from_array(np.array(16000, np.int64), "rate"))
    else:
        nodes = [
            helper.make_node(
                "Constant", [], ["cond"], value=numpy_helper.from_array(np.array(True))
            )
        ]
    nodes.append(
        helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch)
    )
    return model_of(nodes, inputs, [floats("y", ["n", 4])], initializers)


def test_an_if_on_a_constant_is_inlined_and_its_gemm_found():
    model = if_model(condition_from_input=False)
    feeds = {"x": RNG.standard_normal((5, 6)).astype(np.float32)}
    fixed, _ = normalized_copy(model)
    assert_same_outputs(model, fixed, feeds)
    assert [layer.weight_name for layer in find_dense_layers(fixed).layers] == ["w1"]


def test_gemms_inside_an_if_on_an_input_are_each_listed_with_the_reason():
    model = if_model(condition_from_input=True)
    fixed, _ = normalized_copy(model)
    scan = find_dense_layers(fixed)
    assert scan.layers == []
    assert len(scan.skipped) == 2
    for node in scan.skipped:
        assert "inside the" in node.reason and "'sr'" in node.reason


def token_model() -> onnx.ModelProto:
    """Token ids → embedding Gather → MatMul + Add → Relu → Gemm: every NLP model's inputs
    are integers, which start no gradient."""
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["e"]),
        helper.make_node("MatMul", ["e", "w1"], ["p"]),
        helper.make_node("Add", ["p", "b1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("ReduceMean", ["r"], ["m"], axes=[1], keepdims=0),
        helper.make_node("Gemm", ["m", "w2"], ["y"], transB=1),
    ]
    initializers = [
        weight(20, 6, name="table"),
        weight(6, 8, name="w1"),
        weight(8, name="b1"),
        weight(3, 8, name="w2"),
    ]
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", "seq"])
    return model_of(nodes, [ids], [floats("y", ["n", 3])], initializers)


def test_a_token_id_model_compresses(tmp_path):
    path = tmp_path / "tokens.onnx"
    onnx.save(token_model(), path)
    np.savez(tmp_path / "calib.npz", ids=RNG.integers(0, 20, (64, 5)))
    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        result = compress(path, tmp_path / "calib.npz", 0.5, method="ec")
    assert not [w for w in escaped if "non-tuple sequence" in str(w.message)]
    assert sum("torch copy warned" in note for note in result.notes) == 1
    assert result.sparsity == pytest.approx(0.5, abs=0.01)
    assert all(layer.predicted_damage > 0 for layer in result.layers)
    assert result.measured_deviation > 0


def state_model() -> onnx.ModelProto:
    """A recurrent state [2, batch, 4] (batch not first) and a scalar input."""
    nodes = [
        helper.make_node("ReduceSum", ["state", "axis0"], ["s"], keepdims=0),
        helper.make_node("Concat", ["x", "s"], ["xs"], axis=1),
        helper.make_node("Mul", ["xs", "scale"], ["z"]),
        helper.make_node("Gemm", ["z", "w"], ["y"], transB=1),
    ]
    inputs = [floats("x", ["batch", 6]), floats("state", [2, "batch", 4]), floats("scale", [])]
    initializers = [
        weight(3, 10, name="w"),
        numpy_helper.from_array(np.array([0], np.int64), "axis0"),
    ]
    return model_of(nodes, inputs, [floats("y", ["batch", 3])], initializers)


def test_batch_axes_come_from_the_model_and_scalars_are_fed_whole(tmp_path):
    specs = input_specs(state_model())
    assert [spec.batch_axis for spec in specs] == [0, 1, None]
    arrays = {
        "x": RNG.standard_normal((10, 6)).astype(np.float32),
        "state": RNG.standard_normal((2, 10, 4)).astype(np.float32),
        "scale": np.array(0.5, np.float32),
    }
    np.savez(tmp_path / "calib.npz", **arrays)
    batches = list(load_calib(tmp_path / "calib.npz", specs).batches(4))
    assert [batch.rows for batch in batches] == [4, 4, 2]
    np.testing.assert_array_equal(batches[1]["state"], arrays["state"][:, 4:8])
    assert batches[2]["scale"].shape == ()
    path = tmp_path / "state.onnx"
    onnx.save(state_model(), path)
    result = compress(path, tmp_path / "calib.npz", 0.5, method="ec", batch_size=4)
    assert result.calib_rows == 10 and result.measured_deviation > 0


def test_a_batch_axis_option_overrides_and_is_checked(tmp_path):
    model = state_model()
    assert input_specs(model, {"state": 2})[1].batch_axis == 2
    with pytest.raises(UsageError, match="rank 3"):
        input_specs(model, {"state": 3})
    with pytest.raises(UsageError, match="no such model input"):
        input_specs(model, {"nope": 0})


def cancelling_layernorm_model() -> onnx.ModelProto:
    """jax2tf's LayerNorm: variance as E[x²] - E[x]², which cancels when the mean is large."""
    nodes = [
        helper.make_node("Gemm", ["x", "w"], ["h"], transB=1),
        helper.make_node("Add", ["h", "offset"], ["a"]),
        helper.make_node("ReduceMean", ["a"], ["mean"], axes=[1]),
        helper.make_node("Mul", ["a", "a"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["mean_sq"], axes=[1]),
        helper.make_node("Mul", ["mean", "mean"], ["mean2"]),
        helper.make_node("Sub", ["mean_sq", "mean2"], ["var"]),
        helper.make_node("Sub", ["a", "mean"], ["centred"]),
        helper.make_node("Div", ["centred", "var"], ["y"]),
    ]
    offset = numpy_helper.from_array(np.array(300.0, np.float32), "offset")
    return model_of(
        nodes, [floats("x", ["n", 6])], [floats("y", ["n", 8])], [weight(8, 6, name="w"), offset]
    )


def test_the_parity_tolerance_follows_the_models_own_rounding_noise():
    feeds = {"x": RNG.standard_normal((16, 6)).astype(np.float32)}
    cancelling = cancelling_layernorm_model()
    plain = identity_bias_model()
    normalize(plain)
    noisy = float32_noise(cancelling, feeds, run_onnxruntime(cancelling, feeds))
    quiet = float32_noise(plain, feeds, run_onnxruntime(plain, feeds))
    assert noisy > 100 * quiet
    assert parity_tolerance(np.dtype(np.float32), quiet) == 1e-3
    assert parity_tolerance(np.dtype(np.float32), noisy) == pytest.approx(10 * noisy)


def test_an_sklearn_scaler_becomes_sub_and_mul_and_converts():
    """skl2onnx's StandardScaler: ai.onnx.ml Scaler, which onnx2pytorch lacks."""
    nodes = [
        helper.make_node(
            "Scaler",
            ["x"],
            ["s"],
            domain="ai.onnx.ml",
            offset=[1.0, -2.0, 0.5, 0, 3, 1],
            scale=[0.5, 2.0, 1.0, 3, 0.25, 1],
        ),
        helper.make_node("Gemm", ["s", "w"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "g", [floats("x", ["n", 6])], [floats("y", ["n", 4])], [weight(4, 6, name="w")]
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    feeds = {"x": RNG.standard_normal((8, 6)).astype(np.float32)}
    fixed, notes = normalized_copy(model)
    assert notes == ["ai.onnx.ml Scaler nodes rewritten as Sub and Mul: 1"]
    assert_same_outputs(model, fixed, feeds)
    with pytest.raises(UsageError, match="Scaler"):
        parity_of(model, feeds)
    assert parity_of(fixed, feeds) < 1e-5


def test_a_layer_feeding_the_next_directly_gets_its_gradient(tmp_path):
    """skl2onnx's PCA then MLP: MatMul → MatMul with nothing between. The first layer's
    output is a leaf that requires a gradient; the second must pass that gradient on (it
    did not, and every weight of the PCA looked free to remove)."""
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["p"]),
        helper.make_node("MatMul", ["p", "w2"], ["q"]),
        helper.make_node("Add", ["q", "b2"], ["y"]),
    ]
    initializers = [weight(6, 5, name="w1"), weight(5, 4, name="w2"), weight(4, name="b2")]
    path = tmp_path / "chain.onnx"
    onnx.save(model_of(nodes, [floats("x", ["n", 6])], [floats("y", ["n", 4])], initializers), path)
    np.savez(tmp_path / "calib.npz", x=RNG.standard_normal((64, 6)).astype(np.float32))
    result = compress(path, tmp_path / "calib.npz", 0.5, method="ec")
    assert all(layer.predicted_damage > 0 for layer in result.layers)
    assert all(layer.sparsity < 1 for layer in result.layers)
