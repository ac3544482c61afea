"""The torch copy: parity with onnxruntime, and clear refusals when the converter fails."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from ecprune_onnx.errors import UsageError
from ecprune_onnx.instrument import (
    TorchGraph,
    check_parity,
    choose_outputs,
    converted_layer,
    instrument,
    resolve_device,
    with_outputs,
)
from ecprune_onnx.layers import find_dense_layers
from ecprune_onnx.modelio import _weightless

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def _gemm_act_gemm(activation: str, domain: str = "") -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)
        for name, shape in (("w1", (4, 3)), ("b1", (4,)), ("w2", (2, 4)), ("b2", (2,)))
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["z1"], name="fc1", transB=1),
        helper.make_node(activation, ["z1"], ["h1"], name="act", domain=domain),
        helper.make_node("Gemm", ["h1", "w2", "b2"], ["y"], name="fc2", transB=1),
    ]
    return _x_to_y(nodes, inits, [helper.make_opsetid(domain, 1)] if domain else [])


def _x_to_y(nodes, inits, extra_opsets=()) -> onnx.ModelProto:
    """A model from x [n, 3] to y [n, 2] through `nodes`, at opset 17 (and `extra_opsets`)."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])],
        inits,
    )
    opsets = [helper.make_opsetid("", 17), *extra_opsets]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def _graph(model):
    layers = find_dense_layers(model).layers
    instrumented, _ = instrument(model, layers, choose_outputs(model, []))
    return TorchGraph(instrumented, torch.device("cpu"))


FEEDS = {"x": np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)}


def test_parity_holds_on_the_sample():
    model = onnx.load(SAMPLES / "digits_mlp.onnx")
    x = np.load(SAMPLES / "calib.npz")["x"][:32]
    assert check_parity(_graph(model), {"x": x}).deviation < 1e-5


def test_an_op_the_converter_lacks_is_named():
    # FastGelu is an onnxruntime contrib op: onnxruntime runs it, onnx2pytorch cannot.
    model = _gemm_act_gemm("FastGelu", domain="com.microsoft")
    with pytest.raises(UsageError, match="FastGelu node 'act' is not supported"):
        _graph(model)


def test_a_wrong_conversion_is_caught_and_its_op_named(monkeypatch):
    # A deliberately broken converter: Tanh computed as sigmoid.
    monkeypatch.setattr(torch, "tanh", torch.sigmoid)
    graph = _graph(_gemm_act_gemm("Tanh"))
    with pytest.raises(UsageError, match="first differing op: Tanh node 'act'"):
        check_parity(graph, FEEDS)


def test_output_must_name_a_tensor_of_the_model():
    model = _gemm_act_gemm("Tanh")
    assert choose_outputs(model, ["h1"]) == ["h1"]
    with pytest.raises(UsageError, match="--output nope: no tensor of that name"):
        choose_outputs(model, ["nope"])


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UsageError, match="--device gpu"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(UsageError, match="--device cuda"):
            resolve_device("cuda")


def _matmul_reshape_model() -> onnx.ModelProto:
    """x [n, 8] → MatMul by a 2048-element weight → Reshape by an initializer shape."""
    weight = np.ones((8, 256), dtype=np.float32)
    shape = np.array([-1, 16, 16], dtype=np.int64)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["z"], name="mm"),
        helper.make_node("Reshape", ["z", "shape"], ["y"], name="reshape"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(shape, "shape")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_outputs_are_typed_by_inference_without_the_weights():
    """Inference sees the weight as an input of its shape, and still the Reshape's values."""
    model = _matmul_reshape_model()
    full = onnx.shape_inference.infer_shapes(model).graph
    expected = {value.name: value for value in [*full.value_info, *full.output]}
    exposed = {value.name: value for value in with_outputs(model, ["z", "y"]).graph.output}
    assert exposed == {"z": expected["z"], "y": expected["y"]}
    dims = exposed["y"].type.tensor_type.shape.dim
    assert [dim.dim_value for dim in dims[1:]] == [16, 16]  # the Reshape's values were read
    light = _weightless(model)
    assert [tensor.name for tensor in light.graph.initializer] == ["shape"]
    assert len(model.graph.initializer) == 2  # the model itself is untouched


def test_the_converted_module_holds_each_dense_weight_once():
    """onnx2pytorch registers every initializer as a buffer besides the nn.Linear's copy;
    the buffers only a Linear reads are dropped, and one another op reads (the Mul's scale)
    stays, so the module still runs as onnxruntime does."""
    model = _gemm_act_gemm("Relu")
    scale = numpy_helper.from_array(np.array([2.0], dtype=np.float32), "scale")
    model.graph.initializer.append(scale)
    model.graph.node[-1].output[0] = "y_unscaled"
    model.graph.node.append(helper.make_node("Mul", ["y_unscaled", "scale"], ["y"], name="mul"))
    graph = _graph(model)
    buffers = dict(graph.module.named_buffers())
    assert list(buffers) == ["_initializer_scale"]
    held = sum(p.numel() for p in graph.module.parameters()) + sum(
        b.numel() for b in buffers.values()
    )
    assert held == sum(int(np.prod(init.dims)) for init in model.graph.initializer)
    assert check_parity(graph, FEEDS).deviation < 1e-5


def _four_dense_layers() -> onnx.ModelProto:
    """Gemm [in, out] (transB=0), MatMul + Add, Gemm with alpha 0.5, Gemm [out, in]."""
    rng = np.random.default_rng(2)
    shapes = {"w1": (3, 4), "w2": (4, 5), "b2": (5,), "w3": (6, 5), "w4": (2, 6)}
    inits = [
        numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)
        for name, shape in shapes.items()
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w1"], ["z1"], name="fc1"),
        helper.make_node("Relu", ["z1"], ["h1"]),
        helper.make_node("MatMul", ["h1", "w2"], ["p2"], name="mm2"),
        helper.make_node("Add", ["p2", "b2"], ["z2"], name="add2"),
        helper.make_node("Gemm", ["z2", "w3"], ["z3"], name="fc3", transB=1, alpha=0.5),
        helper.make_node("Gemm", ["z3", "w4"], ["y"], name="fc4", transB=1),
    ]
    return _x_to_y(nodes, inits)


def test_shared_weights_leave_the_module_no_copy_of_the_float32_dense_weights():
    model = _four_dense_layers()
    layers = find_dense_layers(model).layers
    graph = _graph(model)
    before = graph(FEEDS)
    graph.share_weights(layers)
    shared = {
        layer.name: np.shares_memory(
            converted_layer(graph.module, layer).weight.detach().numpy(), layer.compact_weight
        )
        for layer in layers
    }
    # alpha·B is float64 in the layer record and float32 in the module: not the same values
    assert shared == {"fc1": True, "mm2": True, "fc3": False, "fc4": True}
    after = graph(FEEDS)
    assert all(torch.equal(before[name], after[name]) for name in before)
