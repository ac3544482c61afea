"""Tests for ecprune_onnx.layers: which Gemm/MatMul nodes are dense layers, and their
effective weight w_ij and bias b_i (docs/method.md, "Notation")."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from ecprune_onnx.layers import find_dense_layers, node_attribute
from tests import graphs

PRUNABLE = graphs.prunable_cases()
SKIPPED = graphs.skip_cases()


def _ids(case) -> str:
    return case.name


@pytest.mark.parametrize("case", PRUNABLE, ids=_ids)
def test_finds_exactly_the_expected_layers(case: graphs.Case):
    scan = find_dense_layers(case.model)

    assert scan.skipped == []
    assert [layer.name for layer in scan.layers] == [layer.name for layer in case.layers]
    for found, expected in zip(scan.layers, case.layers):
        assert found.kind == expected.kind
        assert found.weight_name == expected.weight_name
        assert found.bias_name == expected.bias_name
        assert found.input_name == expected.input_name
        assert found.output_name == expected.output_name
        assert found.weight_dtype == expected.weight_dtype
        assert found.transpose_input == expected.transpose_input
        assert found.stored_as_out_in == expected.stored_as_out_in


@pytest.mark.parametrize("case", PRUNABLE, ids=_ids)
def test_effective_weight_and_bias_match_the_hand_computed_ones(case: graphs.Case):
    scan = find_dense_layers(case.model)

    for found, expected in zip(scan.layers, case.layers, strict=True):
        assert found.weight.dtype == np.float64 and found.bias.dtype == np.float64
        assert found.shape == expected.weight.shape
        assert (found.out_features, found.in_features) == expected.weight.shape
        # alpha and beta are powers of two, so alpha·B and beta·C are exact in float64.
        np.testing.assert_array_equal(found.weight, expected.weight)
        np.testing.assert_array_equal(found.bias, expected.bias)


@pytest.mark.parametrize("case", PRUNABLE, ids=_ids)
def test_compact_weight_is_float32_wherever_that_holds_the_effective_weight_exactly(case):
    # float32 halves the largest copy a compress keeps of the model (BENCHMARKS.md, memory)
    nodes = {node.output[0]: node for node in case.model.graph.node}
    for found in find_dense_layers(case.model).layers:
        alpha = node_attribute(nodes[found.node_output], "alpha", 1.0)
        wide = np.dtype(found.weight_dtype).itemsize > 4 or alpha != 1.0
        assert found.compact_weight.dtype == (np.float64 if wide else np.float32)
        np.testing.assert_array_equal(found.compact_weight.astype(np.float64), found.weight)


@pytest.mark.parametrize("case", PRUNABLE, ids=_ids)
def test_numpy_chain_of_effective_layers_reproduces_onnxruntime(case: graphs.Case):
    """z = a @ W_eff.T + b_eff with the scanned W_eff, b_eff gives the model's outputs."""
    scan = find_dense_layers(case.model)
    weights = [layer.weight for layer in scan.layers]
    biases = [layer.bias for layer in scan.layers]

    reference = case.reference(weights, biases)
    actual = graphs.run_onnxruntime(case.model, case.feeds)

    assert set(actual) == set(reference)
    for name, expected in reference.items():
        graphs.assert_close(actual[name], expected, case.rtol, name)


@pytest.mark.parametrize("case", SKIPPED, ids=_ids)
def test_non_prunable_nodes_are_skipped_with_the_reason(case: graphs.SkipCase):
    scan = find_dense_layers(case.model)

    reasons = {node.node: node.reason for node in scan.skipped}
    assert set(reasons) == set(case.skipped)
    for node, key_word in case.skipped.items():
        assert key_word.lower() in reasons[node].lower(), reasons[node]
    assert [layer.name for layer in scan.layers] == case.prunable
    op_types = {node.name: node.op_type for node in case.model.graph.node}
    assert all(node.op_type == op_types[node.node] for node in scan.skipped)


def test_missing_and_repeated_node_names_are_made_unique():
    builder = graphs.GraphBuilder(seed=7)
    builder.matmul("a", "x", (3, 3), node_name="dense")
    builder.matmul("b", "a_z", (3, 3), node_name="dense")
    builder.matmul("c", "b_z", (3, 2), node_name="")
    model = graphs.make_model(
        builder.nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", 3])],
        [helper.make_tensor_value_info("c_z", TensorProto.FLOAT, ["rows", 2])],
        builder.initializers,
    )

    names = [layer.name for layer in find_dense_layers(model).layers]

    assert names == ["MatMul_a_z", "MatMul_b_z", "MatMul_c_z"]


def test_matmul_whose_product_is_a_graph_output_keeps_its_add_out_of_the_layer():
    """The product is read outside the layer, so the Add cannot be folded into it."""
    builder = graphs.GraphBuilder(seed=8)
    _, layer = builder.matmul_add("l1", "x", (3, 2))
    model = graphs.make_model(
        builder.nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", 3])],
        [
            helper.make_tensor_value_info("l1_xw", TensorProto.FLOAT, ["rows", 2]),
            helper.make_tensor_value_info("l1_z", TensorProto.FLOAT, ["rows", 2]),
        ],
        builder.initializers,
    )

    (found,) = find_dense_layers(model).layers

    assert found.kind == "matmul"
    assert found.output_name == "l1_xw"
    np.testing.assert_array_equal(found.bias, np.zeros(2))
    np.testing.assert_array_equal(found.weight, layer.weight)
