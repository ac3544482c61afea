"""Tests for ecprune_onnx.held: a hollow model, whose dense weights live in the layer records,
gives the same sessions, rewrites and refits as the whole model, and never a file."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ecprune_onnx import sequential
from ecprune_onnx.calib import input_specs, load_calib
from ecprune_onnx.held import filled, held_weights, hollow_names, hollowed
from ecprune_onnx.layers import find_dense_layers
from ecprune_onnx.rewrite import rewrite
from ecprune_onnx.runtime import open_session
from ecprune_onnx.stats import LayerStats
from tests import graphs

PRUNABLE = graphs.prunable_cases()


def _hollow(model: onnx.ModelProto):
    layers = find_dense_layers(model).layers
    held = held_weights(layers, min_elements=0)
    return layers, held, hollowed(model, held)


def _values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_only_weights_whose_record_holds_their_stored_values_are_held():
    kinds = {"held": 0, "scaled": 0, "widened": 0}
    for case in PRUNABLE:
        layers = find_dense_layers(case.model).layers
        held = held_weights(layers, min_elements=0)
        for layer in layers:
            scaled, widened = layer.alpha != 1.0, layer.weight_dtype == np.float16
            assert (layer.weight_name in held) == (not scaled and not widened)
            kinds["scaled"] += scaled
            kinds["widened"] += widened
            kinds["held"] += layer.weight_name in held
        assert held_weights(layers) == {}  # the test graphs' weights are all small
    assert min(kinds.values()) > 0


@pytest.mark.parametrize("case", PRUNABLE, ids=lambda case: case.name)
def test_a_filled_hollow_model_has_the_values_of_the_whole_one(case):
    layers, held, hollow = _hollow(case.model)

    assert hollow_names(hollow) == set(held)
    emptied = [t.raw_data for t in hollow.graph.initializer if t.name in held]
    assert emptied == [b""] * len(held)
    whole = filled(hollow, held)
    onnx.checker.check_model(whole, full_check=True)
    expected, actual = _values(case.model), _values(whole)
    assert list(actual) == list(expected)
    for name, values in expected.items():
        np.testing.assert_array_equal(actual[name], values)


@pytest.mark.parametrize("case", PRUNABLE, ids=lambda case: case.name)
def test_a_rewrite_of_a_hollow_model_is_that_of_the_whole_one(case):
    layers, held, hollow = _hollow(case.model)
    rng = np.random.default_rng(3)
    masks = {layer.name: rng.random(layer.shape) >= 0.5 for layer in layers}
    masks[layers[0].name][:] = True  # a layer left whole is written from its record too
    shifts = {layer.name: rng.normal(size=layer.out_features) for layer in layers}

    from_hollow = rewrite(hollow, layers, masks, shifts)

    assert not hollow_names(from_hollow)
    expected = rewrite(case.model, layers, masks, shifts)
    assert _values(from_hollow).keys() == _values(expected).keys()
    for name, values in _values(expected).items():
        np.testing.assert_array_equal(_values(from_hollow)[name], values)


@pytest.mark.parametrize("consume", [False, True], ids=["in-memory", "through-a-file"])
@pytest.mark.parametrize("case", PRUNABLE, ids=lambda case: case.name)
def test_a_session_on_a_hollow_model_runs_the_whole_one(case, consume):
    _, held, hollow = _hollow(case.model)
    expected = open_session(case.model).run(None, case.feeds)

    actual = open_session(hollowed(case.model, held), consume=consume, held=held).run(
        None, case.feeds
    )

    for a, e in zip(actual, expected):
        np.testing.assert_array_equal(a, e)
    if held:
        with pytest.raises(ValueError, match="hollow initializers without values"):
            open_session(hollow, consume=consume)


def _mlp(rng) -> onnx.ModelProto:
    """x [n, 40] → MatMul + Add → Relu → Gemm (transB) → y [n, 30]: weights past the size
    that held_weights holds by default."""
    w1 = rng.normal(size=(40, 48)).astype(np.float32)
    w2 = rng.normal(size=(30, 48)).astype(np.float32) / 7
    b1, b2 = (rng.normal(size=size).astype(np.float32) for size in (48, 30))
    named = [(w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2")]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "b1"], ["z"], name="fc1_add"),
        helper.make_node("Relu", ["z"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2", transB=1),
    ]
    return graphs.make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 40])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 30])],
        [numpy_helper.from_array(array, name) for array, name in named],
    )


@pytest.mark.parametrize("method", ["ecr", "sparsegpt"])
def test_a_refit_of_a_hollow_model_writes_the_same_model(tmp_path, method):
    rng = np.random.default_rng(5)
    model = _mlp(rng)
    np.savez(tmp_path / "c.npz", x=rng.normal(size=(200, 40)).astype(np.float32))
    data = load_calib(tmp_path / "c.npz", input_specs(model))
    layers = find_dense_layers(model).layers
    stats = {
        layer.name: LayerStats(
            s0=rng.random(layer.out_features) + 0.5,
            s1=None,
            s2=None,
            input_sq=np.zeros(layer.in_features),
            rows=200,
        )
        for layer in layers
    }
    held = held_weights(layers)
    assert set(held) == {"w1", "w2"}

    def refit(start: onnx.ModelProto) -> onnx.ModelProto:
        refitted = sequential.reconstruct_layers(start, layers, data, stats, method, 0.5, None, 64)
        return refitted.model

    from_hollow = refit(hollowed(model, held))

    assert not hollow_names(from_hollow)
    assert from_hollow.SerializeToString() == refit(model).SerializeToString()
    assert np.mean(numpy_helper.to_array(from_hollow.graph.initializer[0]) == 0) > 0.3
