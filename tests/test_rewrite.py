"""Tests for ecprune_onnx.rewrite: the pruned model is valid ONNX, computes the masked
network with shifted biases, and changes nothing else; plus compress() end to end."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from ecprune_onnx.compress import compress
from ecprune_onnx.layers import DenseLayer, find_dense_layers, node_attribute
from ecprune_onnx.modelio import copy_with_empty_initializers
from ecprune_onnx.rewrite import rewrite
from tests import graphs

PRUNABLE = graphs.prunable_cases()


def _ids(case) -> str:
    return case.name


def _cases_tagged(tag: str) -> list[graphs.Case]:
    return [case for case in PRUNABLE if tag in case.tags]


def _random_plan(
    layers: list[DenseLayer], seed: int = 0
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Keep-masks removing about half of each layer's weights, and nonzero bias shifts."""
    rng = np.random.default_rng(seed)
    masks = {layer.name: rng.random(layer.shape) >= 0.5 for layer in layers}
    shifts = {layer.name: rng.normal(size=layer.out_features) for layer in layers}
    return masks, shifts


def _pruned(case: graphs.Case, seed: int = 0):
    layers = find_dense_layers(case.model).layers
    masks, shifts = _random_plan(layers, seed)
    return layers, masks, shifts, rewrite(case.model, layers, masks, shifts)


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {tensor.name: tensor for tensor in model.graph.initializer}


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(node for node in model.graph.node if node.name == name)


@pytest.mark.parametrize("case", PRUNABLE, ids=_ids)
def test_pruned_model_passes_the_full_checker(case: graphs.Case):
    *_, pruned = _pruned(case)

    onnx.checker.check_model(pruned, full_check=True)


@pytest.mark.parametrize("case", PRUNABLE, ids=_ids)
def test_pruned_model_computes_the_masked_network_with_shifted_biases(case: graphs.Case):
    layers, masks, shifts, pruned = _pruned(case)
    weights = [layer.weight * masks[layer.name] for layer in layers]
    biases = [layer.bias + shifts[layer.name] for layer in layers]

    reference = case.reference(weights, biases)
    actual = graphs.run_onnxruntime(pruned, case.feeds)

    assert set(actual) == set(reference)
    for name, expected in reference.items():
        graphs.assert_close(actual[name], expected, case.rtol, name)
    # The plan really changes the outputs: a rewrite that did nothing would fail above.
    original = case.reference()
    assert any(not np.allclose(reference[name], original[name]) for name in original)


@pytest.mark.parametrize("case", PRUNABLE, ids=_ids)
def test_rescanning_the_pruned_model_finds_the_masked_weights_and_shifted_biases(
    case: graphs.Case,
):
    layers, masks, shifts, pruned = _pruned(case)

    rescanned = find_dense_layers(pruned)

    assert rescanned.skipped == []
    assert [layer.name for layer in rescanned.layers] == [layer.name for layer in layers]
    for before, after in zip(layers, rescanned.layers):
        assert after.weight_dtype == before.weight_dtype
        np.testing.assert_array_equal(after.weight, before.weight * masks[before.name])
        # The new bias is stored in the layer's dtype: exact up to that dtype's rounding.
        expected_bias = before.bias + shifts[before.name]
        stored_bias = expected_bias.astype(before.weight_dtype).astype(np.float64)
        np.testing.assert_array_equal(after.bias, stored_bias)


@pytest.mark.parametrize("case", PRUNABLE, ids=_ids)
def test_interface_opsets_and_metadata_are_unchanged(case: graphs.Case):
    *_, pruned = _pruned(case)

    assert list(pruned.graph.input) == list(case.model.graph.input)
    assert list(pruned.graph.output) == list(case.model.graph.output)
    assert list(pruned.opset_import) == list(case.model.opset_import)
    assert list(pruned.metadata_props) == list(case.model.metadata_props)
    assert {prop.key: prop.value for prop in pruned.metadata_props} == graphs.METADATA
    assert pruned.ir_version == case.model.ir_version
    assert pruned.producer_name == case.model.producer_name


@pytest.mark.parametrize("case", PRUNABLE, ids=_ids)
def test_initializers_outside_pruned_layers_are_byte_identical(case: graphs.Case):
    layers, _, _, pruned = _pruned(case)
    owned = {layer.weight_name for layer in layers} | {layer.bias_name for layer in layers}
    before, after = _initializers(case.model), _initializers(pruned)

    for name, tensor in before.items():
        if name not in owned:
            assert after[name].SerializeToString() == tensor.SerializeToString(), name


@pytest.mark.parametrize("case", PRUNABLE, ids=_ids)
def test_stored_dtypes_are_unchanged(case: graphs.Case):
    layers, _, _, pruned = _pruned(case)
    before, after = _initializers(case.model), _initializers(pruned)

    assert set(before) <= set(after)
    for name, tensor in before.items():
        assert after[name].data_type == tensor.data_type, name
    for layer in layers:
        assert after[layer.weight_name].dims == before[layer.weight_name].dims
    weight_types = {tensor.data_type for tensor in before.values()}
    for name in set(after) - set(before):  # created biases and clones
        assert after[name].data_type in weight_types, name


@pytest.mark.parametrize("case", PRUNABLE, ids=_ids)
def test_keeping_everything_without_shifts_leaves_the_model_unchanged(case: graphs.Case):
    layers = find_dense_layers(case.model).layers
    masks = {layer.name: np.ones(layer.shape, dtype=bool) for layer in layers}
    shifts = {layer.name: np.zeros(layer.out_features) for layer in layers}

    pruned = rewrite(case.model, layers, masks, shifts)

    assert pruned.SerializeToString() == case.model.SerializeToString()
    assert rewrite(case.model, layers, {}, {}).SerializeToString() == pruned.SerializeToString()


@pytest.mark.parametrize("case", PRUNABLE, ids=_ids)
def test_rewrite_leaves_its_input_model_alone(case: graphs.Case):
    original = copy.deepcopy(case.model)

    _pruned(case)

    assert case.model.SerializeToString() == original.SerializeToString()


@pytest.mark.parametrize("case", PRUNABLE, ids=_ids)
def test_zero_shifts_change_only_the_weights(case: graphs.Case):
    layers = find_dense_layers(case.model).layers
    masks, _ = _random_plan(layers)
    shifts = {layer.name: np.zeros(layer.out_features) for layer in layers}

    pruned = rewrite(case.model, layers, masks, shifts)

    assert list(pruned.graph.node) == list(case.model.graph.node)
    before, after = _initializers(case.model), _initializers(pruned)
    assert set(after) == set(before)
    weight_names = {layer.weight_name for layer in layers}
    for name in set(before) - weight_names:
        assert after[name].SerializeToString() == before[name].SerializeToString(), name


@pytest.mark.parametrize("case", _cases_tagged("matmul"), ids=_ids)
def test_matmul_without_bias_gets_an_add_under_its_output_name(case: graphs.Case):
    layers, _, shifts, pruned = _pruned(case)
    consumers = {}
    for node in pruned.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    producers = {output: node for node in pruned.graph.node for output in node.output}
    initializers = _initializers(pruned)

    assert len(pruned.graph.node) == len(case.model.graph.node) + len(layers)
    for layer in layers:
        add = producers[layer.output_name]
        assert add.op_type == "Add"
        product, bias_name = add.input
        assert producers[product].op_type == "MatMul"
        assert list(producers[product].input) == [layer.input_name, layer.weight_name]
        assert [node.name for node in consumers[product]] == [add.name]
        bias = numpy_helper.to_array(initializers[bias_name])
        assert bias.dtype == layer.weight_dtype
        np.testing.assert_allclose(bias, shifts[layer.name].astype(layer.weight_dtype))
    assert [value.name for value in pruned.graph.output] == [
        value.name for value in case.model.graph.output
    ]
    node_names = [node.name for node in pruned.graph.node if node.name]
    assert len(node_names) == len(set(node_names))


def test_shared_bias_is_cloned_and_the_other_reader_keeps_the_original():
    (case,) = [case for case in PRUNABLE if case.name == "shared-bias-add"]
    layers, _, shifts, pruned = _pruned(case)
    bias_name = layers[0].bias_name
    original = _initializers(case.model)[bias_name]

    reader = _node(pruned, "bias_reader")
    add = _node(pruned, "l1_add")

    assert list(reader.input) == [bias_name]
    assert _initializers(pruned)[bias_name].SerializeToString() == original.SerializeToString()
    (clone,) = [name for name in add.input if name != "l1_xw"]
    assert clone != bias_name
    clone_bias = numpy_helper.to_array(_initializers(pruned)[clone])
    expected = (layers[0].bias + shifts[layers[0].name]).astype(np.float32)
    np.testing.assert_array_equal(clone_bias, expected)
    output = graphs.run_onnxruntime(pruned, case.feeds)["bias_copy"]
    np.testing.assert_array_equal(output, numpy_helper.to_array(original))


def test_bias_shared_by_two_layers_gives_each_layer_its_own():
    (case,) = [case for case in PRUNABLE if case.name == "shared-bias-gemm"]
    layers, _, _, pruned = _pruned(case)

    c_inputs = [_node(pruned, layer.name).input[2] for layer in layers]

    assert len(set(c_inputs)) == 2
    assert all(name in _initializers(pruned) for name in c_inputs)


@pytest.mark.parametrize("case", _cases_tagged("beta-scalar-C"), ids=_ids)
def test_gemm_with_beta_and_scalar_c_stores_the_effective_bias_with_beta_one(case: graphs.Case):
    layers, _, shifts, pruned = _pruned(case)

    for layer in layers:
        node = _node(pruned, layer.name)
        assert node_attribute(node, "beta", 1.0) == 1.0
        c = numpy_helper.to_array(_initializers(pruned)[node.input[2]])
        assert c.dtype == layer.weight_dtype
        expected = (layer.bias + shifts[layer.name]).astype(c.dtype)
        np.testing.assert_array_equal(np.broadcast_to(c, (layer.out_features,)), expected)
        for name in ("alpha", "transA", "transB"):
            original = _node(case.model, layer.name)
            assert node_attribute(node, name, None) == node_attribute(original, name, None)


def test_bfloat16_weights_and_biases_stay_bfloat16():
    """onnxruntime has no CPU kernels for bfloat16 Gemm/MatMul: checked by a re-scan instead."""
    bfloat16 = onnx.helper.tensor_dtype_to_np_dtype(onnx.TensorProto.BFLOAT16)

    def dense(builder, prefix, a, sizes):
        if prefix == "l1":
            return builder.gemm(prefix, a, sizes, trans_b=1, beta=2.0, c_shape=())
        return builder.matmul(prefix, a, sizes)

    case = graphs.chain_case("bfloat16", dense, dtype=bfloat16)
    layers, masks, shifts, pruned = _pruned(case)

    onnx.checker.check_model(pruned, full_check=True)
    assert {tensor.data_type for tensor in pruned.graph.initializer} == {onnx.TensorProto.BFLOAT16}
    for before, after in zip(layers, find_dense_layers(pruned).layers):
        np.testing.assert_array_equal(after.weight, before.weight * masks[before.name])
        expected_bias = (before.bias + shifts[before.name]).astype(bfloat16).astype(np.float64)
        np.testing.assert_array_equal(after.bias, expected_bias)


def test_created_biases_are_valid_in_an_ir3_model():
    case = graphs.ir3_case()
    layers, masks, shifts, pruned = _pruned(case)

    onnx.checker.check_model(pruned, full_check=True)
    weights = [layer.weight * masks[layer.name] for layer in layers]
    biases = [layer.bias + shifts[layer.name] for layer in layers]
    reference = case.reference(weights, biases)
    actual = graphs.run_onnxruntime(pruned, case.feeds)
    for name, expected in reference.items():
        graphs.assert_close(actual[name], expected, case.rtol, name)


# compress() end to end, on a 2-layer MatMul + Add graph with [batch, seq, in] activations.


@pytest.fixture(scope="module")
def rank3_files(tmp_path_factory) -> tuple[graphs.Case, str, str]:
    def dense(builder, prefix, a, sizes):
        return builder.matmul_add(prefix, a, sizes)

    case = graphs.chain_case("compress-rank3", dense, "Relu", rank=3, seed=900)
    folder = tmp_path_factory.mktemp("compress")
    model_path, calib_path = folder / "model.onnx", folder / "calib.npz"
    onnx.save(case.model, model_path)
    np.savez(calib_path, x=case.feeds["x"])
    return case, str(model_path), str(calib_path)


@pytest.mark.parametrize("method", ["magnitude", "ec"])
def test_compress_writes_a_runnable_model_with_the_requested_sparsity(
    rank3_files, tmp_path, method
):
    case, model_path, calib_path = rank3_files
    output = tmp_path / "pruned.onnx"

    result = compress(
        model_path,
        calib_path,
        0.5,
        output=output,
        method=method,
        compensate=False if method == "magnitude" else None,
    )

    weights = sum(layer.weights for layer in result.layers)
    removed = sum(layer.removed for layer in result.layers)
    assert weights == sum(layer.weight.size for layer in case.layers)
    assert abs(removed - 0.5 * weights) <= 1
    pruned = onnx.load(output)
    zeros = {
        tensor.name: int((numpy_helper.to_array(tensor) == 0).sum())
        for tensor in pruned.graph.initializer
    }
    for report, layer in zip(result.layers, case.layers):
        assert report.name == layer.name
        assert zeros[layer.weight_name] == report.removed
    outputs = graphs.run_onnxruntime(pruned, case.feeds)
    assert outputs["l2_z"].shape == case.reference()["l2_z"].shape
    assert np.isfinite(outputs["l2_z"]).all()


@pytest.mark.parametrize("method", ["magnitude", "ec"])
def test_compress_with_ratio_zero_gives_the_original_outputs(rank3_files, tmp_path, method):
    case, model_path, calib_path = rank3_files
    output = tmp_path / "pruned.onnx"

    result = compress(model_path, calib_path, 0.0, output=output, method=method)

    assert all(layer.removed == 0 for layer in result.layers)
    original = graphs.run_onnxruntime(case.model, case.feeds)
    pruned = graphs.run_onnxruntime(onnx.load(output), case.feeds)
    assert np.array_equal(pruned["l2_z"], original["l2_z"])


@pytest.mark.parametrize("method", ["magnitude", "ec"])
def test_compress_runs_on_an_ir3_model(tmp_path, method):
    case = graphs.ir3_case()
    model_path, calib_path = tmp_path / "model.onnx", tmp_path / "calib.npz"
    onnx.save(case.model, model_path)
    np.savez(calib_path, x=case.feeds["x"])

    result = compress(model_path, calib_path, 0.5, output=tmp_path / "pruned.onnx", method=method)

    assert sum(layer.removed for layer in result.layers) == 25
    pruned = onnx.load(tmp_path / "pruned.onnx")
    assert np.isfinite(graphs.run_onnxruntime(pruned, case.feeds)["l2_z"]).all()


@pytest.mark.parametrize("case", PRUNABLE, ids=_ids)
def test_a_copy_with_empty_initializers_differs_only_in_their_data(case: graphs.Case):
    model = copy.deepcopy(case.model)
    model.doc_string, model.graph.doc_string = "model notes", "graph notes"
    emptied = model.graph.initializer[0]

    assert copy_with_empty_initializers(model, set()).SerializeToString() == (
        model.SerializeToString()
    )
    copied = copy_with_empty_initializers(model, {emptied.name})
    first, *others = copied.graph.initializer
    assert (first.name, first.data_type, list(first.dims)) == (
        emptied.name,
        emptied.data_type,
        list(emptied.dims),
    )
    assert not first.raw_data and not first.float_data
    assert others == list(model.graph.initializer)[1:]
    first.CopyFrom(emptied)
    assert copied.SerializeToString() == model.SerializeToString()
