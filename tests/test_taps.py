"""Layer inputs read from an earlier tap of the same model: the same values as from the graph
inputs, with only the nodes between the two taps in the session."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ecprune_onnx.calib import input_specs, load_calib
from ecprune_onnx.instrument import with_outputs
from ecprune_onnx.layers import find_dense_layers
from ecprune_onnx.taps import TapReader, TapRecord
from tests import graphs


def _chain(residual: bool) -> onnx.ModelProto:
    """x → fc1 → relu → fc2 → relu (+ x where residual) → fc3 → y, all 6 wide."""
    rng = np.random.default_rng(0)
    nodes, weights = [], []
    last = "x"
    for index in (1, 2, 3):
        weights.append(
            numpy_helper.from_array(rng.normal(size=(6, 6)).astype(np.float32), f"w{index}")
        )
        nodes.append(
            helper.make_node(
                "Gemm", [last, f"w{index}"], [f"z{index}"], name=f"fc{index}", transB=1
            )
        )
        if index < 3:
            nodes.append(helper.make_node("Relu", [f"z{index}"], [f"r{index}"]))
            last = f"r{index}"
    if residual:
        nodes.insert(-1, helper.make_node("Add", ["r2", "x"], ["s2"]))
        nodes[-1].input[0] = "s2"
    return graphs.make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6])],
        [helper.make_tensor_value_info("z3", TensorProto.FLOAT, ["n", 6])],
        weights,
        ir_version=10,
    )


def _taps(model, data, carried_from=None):
    layers = find_dense_layers(model).layers
    carried = None
    if carried_from is not None:
        carried = TapRecord(layers[carried_from].input_name)
        reader = TapReader(model, layers[carried_from], keep=carried)
        for feeds in data.batches(32):
            reader.read(feeds)
    reader = TapReader(model, layers[2], carried=carried)
    return np.concatenate([reader.read(feeds) for feeds in data.batches(32)]), reader


def test_a_tap_read_from_an_earlier_tap_is_the_tap_read_from_the_inputs(tmp_path):
    np.savez(
        tmp_path / "c.npz", x=np.random.default_rng(1).normal(size=(100, 6)).astype(np.float32)
    )
    for residual in (False, True):
        model = _chain(residual)
        data = load_calib(tmp_path / "c.npz", input_specs(model))
        direct, _ = _taps(model, data)
        carried, reader = _taps(model, data, carried_from=1)
        np.testing.assert_array_equal(carried, direct)
        assert reader.carried is not None  # the session starts at fc2's input (x fed too)
        from_inputs, reader = _taps(model, data, carried_from=0)  # x: the feeds hold it
        np.testing.assert_array_equal(from_inputs, direct)
        assert reader.carried is None


def test_given_tensors_cut_the_nodes_that_compute_them():
    model = _chain(residual=False)
    info = helper.make_tensor_value_info("r1", TensorProto.FLOAT, ["n", 6])
    sliced = with_outputs(model, ["r2"], given={"r1": info})
    assert [node.op_type for node in sliced.graph.node] == ["Gemm", "Relu"]
    assert "r1" in {value.name for value in sliced.graph.input}
    assert {t.name for t in sliced.graph.initializer} == {"w2"}
    whole = with_outputs(model, ["r2"])
    assert [node.op_type for node in whole.graph.node] == ["Gemm", "Relu", "Gemm", "Relu"]
