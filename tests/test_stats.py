"""S0/S1/S2 from the instrumented torch graph equal a brute-force per-row computation."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from ecprune_onnx.instrument import TorchGraph, check_parity, instrument
from ecprune_onnx.layers import find_dense_layers
from ecprune_onnx.stats import collect_stats, plan_probes, task_loss


def _mlp(weights, biases, rank3=False) -> onnx.ModelProto:
    """x → MatMul+Add → Tanh → MatMul+Add → y (rank 2 or 3 activations)."""
    in_features, out_features = weights[0].shape[0], weights[-1].shape[1]
    lead = ["batch", "seq"] if rank3 else ["batch"]
    inits, nodes, current = [], [], "x"
    for index, (w, b) in enumerate(zip(weights, biases)):
        inits += [numpy_helper.from_array(w, f"w{index}"), numpy_helper.from_array(b, f"b{index}")]
        nodes.append(helper.make_node("MatMul", [current, f"w{index}"], [f"p{index}"]))
        nodes.append(helper.make_node("Add", [f"p{index}", f"b{index}"], [f"z{index}"]))
        current = f"z{index}"
        if index + 1 < len(weights):
            nodes.append(helper.make_node("Tanh", [current], [f"h{index}"]))
            current = f"h{index}"
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*lead, in_features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*lead, out_features])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _brute_force(weights, biases, x):
    """Per row r: a(r), and c_i(r) = ||d y(sample of r) / d z_i(r)||^2 by explicit Jacobians.

    The network acts position-wise, so the outputs of a sample that depend on z(r) are the
    ones at r's position: J is the [out, units] Jacobian of one position's MLP.
    """
    rows = x.reshape(-1, x.shape[-1]).astype(np.float64)
    w0, w1 = (w.astype(np.float64) for w in weights)
    b0 = biases[0].astype(np.float64)
    z0 = rows @ w0 + b0
    h0 = np.tanh(z0)
    # layer 0: dy/dz0 = W1^T diag(1 - tanh^2); column i's squared norm
    c0 = (1 - h0**2) ** 2 * (w1**2).sum(axis=1)[None, :]
    c1 = np.ones((rows.shape[0], w1.shape[1]))  # the last layer's output is y itself
    return [(rows, c0), (h0, c1)]


def _sums(a, c):
    return c.sum(0), c.T @ a, c.T @ (a * a)


def _collect(model, x, max_probes, seed=0, batch_size=5):
    layers = find_dense_layers(model).layers
    instrumented, roles = instrument(model, layers, ["y"])
    graph = TorchGraph(instrumented, torch.device("cpu"))
    batches = [{"x": x[i : i + batch_size]} for i in range(0, len(x), batch_size)]
    check_parity(graph, batches[0])
    return layers, collect_stats(graph, roles, layers, batches, max_probes, seed)


@pytest.fixture
def network():
    rng = np.random.default_rng(0)
    weights = [
        rng.normal(size=(5, 7)).astype(np.float32),
        rng.normal(size=(7, 3)).astype(np.float32),
    ]
    biases = [rng.normal(size=7).astype(np.float32), rng.normal(size=3).astype(np.float32)]
    return weights, biases, rng


@pytest.mark.parametrize("rank3", [False, True])
def test_exact_probes_match_brute_force(network, rank3):
    weights, biases, rng = network
    x = rng.normal(size=(12, 4, 5) if rank3 else (12, 5)).astype(np.float32)
    layers, (stats, plan) = _collect(_mlp(weights, biases, rank3), x, max_probes=16)
    assert plan.exact and plan.probe_count == (4 * 3 if rank3 else 3)  # elements per sample
    for layer, (a, c) in zip(layers, _brute_force(weights, biases, x)):
        s0, s1, s2 = _sums(a, c)
        got = stats[layer.name]
        assert got.rows == a.shape[0]
        np.testing.assert_allclose(got.s0, s0, rtol=1e-5)
        np.testing.assert_allclose(got.s1, s1, rtol=1e-5, atol=1e-6 * np.abs(s1).max())
        np.testing.assert_allclose(got.s2, s2, rtol=1e-5)
        np.testing.assert_allclose(got.input_sq, (a * a).sum(0), rtol=1e-5)


def test_hutchinson_approaches_exact_as_probes_grow(network):
    _, _, rng = network
    # 600 output elements per sample: more than any probe count below, so all are estimates
    weights = [
        rng.normal(size=(5, 7)).astype(np.float32),
        rng.normal(size=(7, 600)).astype(np.float32),
    ]
    biases = [rng.normal(size=7).astype(np.float32), rng.normal(size=600).astype(np.float32)]
    x = rng.normal(size=(40, 5)).astype(np.float32)
    model = _mlp(weights, biases)
    (a, c), _ = _brute_force(weights, biases, x)
    exact_s0 = c.sum(0)
    errors = {}
    for probes in (2, 32, 512):
        layers, (stats, plan) = _collect(model, x, max_probes=probes, batch_size=40)
        assert not plan.exact and plan.probe_count == probes
        estimate = stats[layers[0].name].s0
        errors[probes] = np.abs(estimate - exact_s0).sum() / exact_s0.sum()
    assert errors[512] < 0.05
    assert errors[512] < errors[32] < errors[2]


def test_hutchinson_is_seeded(network):
    weights, biases, rng = network
    x = rng.normal(size=(10, 5)).astype(np.float32)
    model = _mlp(weights, biases)
    first = _collect(model, x, max_probes=2, seed=3)[1][0]
    again = _collect(model, x, max_probes=2, seed=3)[1][0]
    other = _collect(model, x, max_probes=2, seed=4)[1][0]
    name = next(iter(first))
    assert np.array_equal(first[name].s0, again[name].s0)
    assert not np.array_equal(first[name].s0, other[name].s0)


def test_probe_plan_switches_at_the_limit():
    assert plan_probes(16, 16).exact
    assert not plan_probes(17, 16).exact
    assert plan_probes(17, 16).probe_count == 16


@pytest.mark.parametrize("classes", [True, False])
def test_loss_gradient_equals_autograd_on_the_weights(network, classes):
    weights, biases, rng = network
    x = rng.normal(size=(12, 5)).astype(np.float32)
    if classes:
        labels = rng.integers(0, 3, size=12)
    else:
        labels = rng.normal(size=(12, 3)).astype(np.float32)
    model = _mlp(weights, biases)
    layers = find_dense_layers(model).layers
    instrumented, roles = instrument(model, layers, ["y"])
    graph = TorchGraph(instrumented, torch.device("cpu"))
    batches = [{"x": x[i : i + 5]} for i in range(0, 12, 5)]
    label_batches = [labels[i : i + 5] for i in range(0, 12, 5)]
    stats, _ = collect_stats(graph, roles, layers, batches, 16, 0, None, label_batches)
    # reference: the same network in torch, float64, gradient of the summed loss on W
    w = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in weights]
    b = [torch.tensor(a, dtype=torch.float64) for a in biases]
    y = torch.tanh(torch.tensor(x, dtype=torch.float64) @ w[0] + b[0]) @ w[1] + b[1]
    loss = task_loss(y, torch.from_numpy(labels))
    loss.backward()
    for layer, weight in zip(layers, w):
        expected = weight.grad.numpy().T  # effective [out, in]
        np.testing.assert_allclose(stats[layer.name].loss_grad, expected, rtol=1e-4, atol=1e-6)
