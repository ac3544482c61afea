"""S0/S1/S2 from the instrumented torch graph equal a brute-force per-row computation."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from ecprune_onnx import stats as stats_module
from ecprune_onnx.instrument import TorchGraph, check_parity, instrument
from ecprune_onnx.layers import find_dense_layers
from ecprune_onnx.stats import collect_stats, plan_probes, task_loss


def _mlp(weights, biases, rank3=False) -> onnx.ModelProto:
    """x → MatMul+Add → Tanh → MatMul+Add → y (rank 2 or 3 activations), in the weights'
    float type."""
    in_features, out_features = weights[0].shape[0], weights[-1].shape[1]
    elem_type = helper.np_dtype_to_tensor_dtype(weights[0].dtype)
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
        [helper.make_tensor_value_info("x", elem_type, [*lead, in_features])],
        [helper.make_tensor_value_info("y", elem_type, [*lead, out_features])],
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


def _collect(model, x, max_probes, seed=0, batch_size=5, products_for=None):
    layers = find_dense_layers(model).layers
    instrumented, roles = instrument(model, layers, ["y"])
    graph = TorchGraph(instrumented, torch.device("cpu"))
    batches = [{"x": x[i : i + batch_size]} for i in range(0, len(x), batch_size)]
    check_parity(graph, batches[0])
    stats = collect_stats(
        graph, roles, layers, batches, max_probes, seed, products_for=products_for
    )
    return layers, stats


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


@pytest.mark.parametrize("max_probes", [16, 2], ids=["exact", "hutchinson"])
def test_probes_in_chunks_and_products_in_row_blocks_give_the_same_sums(
    network, monkeypatch, max_probes
):
    """One backward per probe vector, and products 2 rows (of 5 inputs) or 1 row (of 7) of
    the sums at a time, against one backward for all probes and whole products: the same
    sums up to float32 rounding."""
    weights, biases, rng = network
    x = rng.normal(size=(12, 4, 5)).astype(np.float32)
    model = _mlp(weights, biases, rank3=True)
    layers, (whole, plan) = _collect(model, x, max_probes=max_probes)
    assert plan.probe_count > 1
    calls = []
    backward = torch.autograd.grad

    def counted(*args, **kwargs):
        calls.append(kwargs.get("grad_outputs"))
        return backward(*args, **kwargs)

    monkeypatch.setattr(stats_module, "PROBE_CHUNK_BYTES", 1)
    monkeypatch.setattr(stats_module, "PRODUCT_ELEMENTS", 10)  # 2 rows of 5 inputs, 1 of 7
    monkeypatch.setattr(torch.autograd, "grad", counted)
    _, (chunked, _) = _collect(model, x, max_probes=max_probes)

    assert len(calls) == plan.probe_count * 3  # one chunk per probe, for 3 batches of 5
    assert all(len(probes[0]) == 1 for probes in calls)
    for layer in layers:
        for field in ("s0", "s1", "s2", "input_sq"):
            expected = getattr(whole[layer.name], field)
            got = getattr(chunked[layer.name], field)
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


def _parallel_branches(w_a, w_b, scale: float) -> onnx.ModelProto:
    """y = scale · ((x W_a + b_a) + (x W_b + b_b)): two dense layers whose outputs are summed,
    so autograd hands both the Add's gradient, one tensor for the two."""
    inits = [
        numpy_helper.from_array(w_a, "wa"),
        numpy_helper.from_array(np.zeros(w_a.shape[1], np.float32), "ba"),
        numpy_helper.from_array(w_b, "wb"),
        numpy_helper.from_array(np.ones(w_b.shape[1], np.float32), "bb"),
        numpy_helper.from_array(np.array(scale, np.float32), "scale"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "wa"], ["pa"]),
        helper.make_node("Add", ["pa", "ba"], ["za"]),
        helper.make_node("MatMul", ["x", "wb"], ["pb"]),
        helper.make_node("Add", ["pb", "bb"], ["zb"]),
        helper.make_node("Add", ["za", "zb"], ["s"]),
        helper.make_node("Mul", ["s", "scale"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "branches",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", w_a.shape[0]])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", w_a.shape[1]])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


@pytest.mark.parametrize("path", ["all probes at once", "one probe a chunk", "fallback"])
def test_layers_that_share_a_gradient_each_get_its_square(network, monkeypatch, path):
    """dy/dz_a = dy/dz_b = 3·I, so c = 9 for every unit of both layers; squaring the one
    gradient tensor in place for the first layer would give the second 81. Through each
    route of `_squared_jacobian_norms`: batched backwards of every probe or of one, and the
    probe-by-probe fallback for ops vmap cannot batch."""
    _, _, rng = network
    w_a, w_b = (rng.normal(size=(5, 4)).astype(np.float32) for _ in range(2))
    x = rng.normal(size=(10, 5)).astype(np.float32)
    if path == "one probe a chunk":
        monkeypatch.setattr(stats_module, "PROBE_CHUNK_BYTES", 1)
    if path == "fallback":
        backward = torch.autograd.grad

        def unbatchable(*args, **kwargs):
            if kwargs.get("is_grads_batched"):
                raise RuntimeError("no batching rule")
            return backward(*args, **kwargs)

        monkeypatch.setattr(torch.autograd, "grad", unbatchable)
    layers, (stats, plan) = _collect(_parallel_branches(w_a, w_b, 3.0), x, max_probes=16)
    assert plan.exact and len(layers) == 2
    for layer in layers:
        np.testing.assert_allclose(stats[layer.name].s0, np.full(4, 9.0 * len(x)), rtol=1e-6)
        s1 = 9.0 * np.tile(x.sum(0, dtype=np.float64), (4, 1))  # [out, in]: sum_r c_i a_j
        np.testing.assert_allclose(stats[layer.name].s1, s1, rtol=1e-5, atol=1e-6)


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


def test_sums_of_a_group_of_layers_are_those_of_all_layers(network):
    """Hutchinson probes (the seeded path): a pass that sums S1/S2 for one layer gives it the
    very bits of a pass for all, and the other layers S0 alone, also the same bits."""
    weights, biases, rng = network
    x = rng.normal(size=(10, 5)).astype(np.float32)
    model = _mlp(weights, biases)
    layers, (every, _) = _collect(model, x, max_probes=2, seed=3)
    first, second = (layer.name for layer in layers)
    _, (group, _) = _collect(model, x, max_probes=2, seed=3, products_for=[second])
    assert group[first].s1 is None and group[first].s2 is None
    np.testing.assert_array_equal(group[first].s0, every[first].s0)
    for key in ("s0", "s1", "s2", "input_sq"):
        np.testing.assert_array_equal(getattr(group[second], key), getattr(every[second], key))


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


def _recorded(monkeypatch, name: str) -> list:
    """Wrap stats.<name>(sums, layer, per-row tensor, activations) to keep, per call, the
    layer's name and copies of the two tensors exactly as the accumulation received them."""
    calls, accumulate = [], getattr(stats_module, name)

    def recording(sums, layer, per_row, activations):
        if per_row is not None:
            rows = per_row.reshape(-1, layer.out_features)
            calls.append((layer.name, rows.clone(), activations.clone()))
        accumulate(sums, layer, per_row, activations)

    monkeypatch.setattr(stats_module, name, recording)
    return calls


def _stacked(calls, layer_name: str) -> tuple[np.ndarray, np.ndarray, np.dtype]:
    """All batches' [rows, out] and [rows, in] tensors of one layer as float64 numpy, and the
    dtype they arrived in."""
    pairs = [(rows, a) for name, rows, a in calls if name == layer_name]
    per_row = torch.cat([rows for rows, _ in pairs]).numpy()
    activations = torch.cat([a for _, a in pairs]).numpy()
    assert per_row.dtype == activations.dtype
    return per_row.astype(np.float64), activations.astype(np.float64), per_row.dtype


def _assert_within_terms(got, c, a, expected, rtol):
    """|got - expected| <= rtol * (|C|^T |A|): float rounding of a sum of products is relative
    to the size of its terms, not to the sum, which cancels where a changes sign."""
    bound = rtol * (np.abs(c).T @ np.abs(a)) + 1e-300
    assert np.all(np.abs(got - expected) <= bound), np.max(np.abs(got - expected) / bound) * rtol


def test_float32_products_add_up_in_float64(network, monkeypatch):
    """A float32 model: each batch's products are float32, their sums float64, so the sums
    match a float64 reference from the same activations and sensitivities to the rounding of
    one two-row batch: at most 3 roundings of 2^-24 (a², c·a², their sum), 1.8e-7, so 4e-7.
    Summed in float32 across these 1000 batches instead, S0 drifts to 1.2e-6 (each addition
    rounds relative to the grown sum)."""
    rtol = 4e-7
    weights, biases, rng = network
    x = (rng.normal(size=(2000, 5)) + 3).astype(np.float32)  # offset: the sums only grow
    targets = rng.normal(size=(2000, 3)).astype(np.float32)
    sensitivities = _recorded(monkeypatch, "_accumulate")
    loss_grads = _recorded(monkeypatch, "_accumulate_loss_grad")
    monkeypatch.setattr(stats_module, "STAGE_ELEMENTS", 12)  # staged in ragged chunks
    model = _mlp(weights, biases)
    layers = find_dense_layers(model).layers
    instrumented, roles = instrument(model, layers, ["y"])
    graph = TorchGraph(instrumented, torch.device("cpu"))
    batches = [{"x": x[i : i + 2]} for i in range(0, len(x), 2)]
    label_batches = [targets[i : i + 2] for i in range(0, len(x), 2)]
    stats, _ = collect_stats(graph, roles, layers, batches, 16, 0, None, label_batches)
    for layer in layers:
        got = stats[layer.name]
        for array in (got.s0, got.s1, got.s2, got.input_sq, got.loss_grad):
            assert isinstance(array, np.ndarray) and array.dtype == np.float64
        c, a, product_dtype = _stacked(sensitivities, layer.name)
        assert product_dtype == np.float32 and got.rows == len(a) == 2000
        np.testing.assert_allclose(got.s0, c.sum(0), rtol=rtol)
        _assert_within_terms(got.s1, c, a, c.T @ a, rtol=rtol)
        np.testing.assert_allclose(got.s2, c.T @ (a * a), rtol=rtol)
        np.testing.assert_allclose(got.input_sq, (a * a).sum(0), rtol=rtol)
        g, a, _ = _stacked(loss_grads, layer.name)
        _assert_within_terms(got.loss_grad, g, a, g.T @ a, rtol=rtol)


def test_float64_model_stays_float64(network):
    """A float64 model: forward, probes, products and sums all in float64, so the statistics
    equal the float64 brute force to ~1e-12 (float32 anywhere would show as ~1e-7)."""
    weights, biases, rng = network
    weights = [w.astype(np.float64) for w in weights]
    biases = [b.astype(np.float64) for b in biases]
    x = rng.normal(size=(12, 5))
    layers, (stats, _) = _collect(_mlp(weights, biases), x, max_probes=16)
    for layer, (a, c) in zip(layers, _brute_force(weights, biases, x)):
        s0, s1, s2 = _sums(a, c)
        got = stats[layer.name]
        np.testing.assert_allclose(got.s0, s0, rtol=1e-12)
        _assert_within_terms(got.s1, c, a, s1, rtol=1e-12)
        np.testing.assert_allclose(got.s2, s2, rtol=1e-12)
        np.testing.assert_allclose(got.input_sq, (a * a).sum(0), rtol=1e-12)


def test_available_memory_is_read_on_this_host():
    free = stats_module._available_bytes(torch.device("cpu"))
    if sys.platform.startswith("linux"):  # /proc/meminfo's MemAvailable, in bytes
        with open("/proc/meminfo") as meminfo:
            kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemAvail"))
        assert abs(free - kib * 1024) <= 256 * 2**20  # read twice, a moment apart
    else:
        assert free is None or free > 0
