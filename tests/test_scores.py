"""docs/method.md's formulas, and its exactness checks on a last layer with a linear output."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from ecprune_onnx.compress import compress
from ecprune_onnx.scores import (
    METHODS,
    bias_shift,
    damage_scores,
    ec_importance,
    floor_sensitivity,
    optimal_shift,
    predicted_damage,
    sensitivity_importance,
)
from ecprune_onnx.stats import LayerStats


def _parabola_minimum(w, a, c):
    """Brute force over δ of D(δ) = sum_r c(r) (δ - w a(r))^2: minimiser and minimum."""
    deltas = np.linspace(-5, 5, 200001) * max(abs(w) * np.abs(a).max(), 1e-9)
    damage = ((deltas[:, None] - w * a[None, :]) ** 2 * c[None, :]).sum(1)
    best = damage.argmin()
    return deltas[best], damage[best]


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000))
def test_importance_and_shift_minimise_the_parabola(seed):
    rng = np.random.default_rng(seed)
    rows = 30
    a, c, w = rng.normal(size=rows) + rng.normal(), rng.random(rows), rng.normal()
    s0, s1, s2 = np.array([c.sum()]), np.array([[c @ a]]), np.array([[c @ a**2]])
    delta, minimum = _parabola_minimum(w, a, c)
    got_delta = optimal_shift(np.array([[w]]), s0, s1)[0, 0]
    got_importance = ec_importance(np.array([[w]]), s0, s1, s2)[0, 0]
    step = 10 * max(abs(w) * np.abs(a).max(), 1e-9) / 200000
    assert abs(got_delta - delta) <= step
    assert got_importance == pytest.approx(minimum, rel=1e-6, abs=1e-9)
    assert got_importance <= w * w * s2[0, 0] + 1e-12  # compensation never hurts


def test_dead_units_get_zero_importance_and_shift():
    w = np.ones((2, 3))
    s0 = np.array([0.0, 2.0])
    s1 = np.array([[0.0] * 3, [1.0, 2.0, 3.0]])
    s2 = np.array([[0.0] * 3, [4.0, 4.0, 9.0]])
    assert np.all(ec_importance(w, s0, s1, s2)[0] == 0)
    assert np.all(optimal_shift(w, s0, s1)[0] == 0)
    assert np.all(ec_importance(w, s0, s1, s2) >= 0)


def test_bias_shift_adds_the_shifts_of_removed_weights():
    w = np.array([[1.0, 2.0, 3.0]])
    s0, s1 = np.array([2.0]), np.array([[2.0, 4.0, 6.0]])
    keep = np.array([[True, False, False]])
    assert bias_shift(w, keep, s0, s1)[0] == pytest.approx(2.0 * 2 + 3.0 * 3)


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])  # blocks of 1 row, of 2 rows, all rows
def test_blockwise_importance_and_shift_equal_the_formulas(monkeypatch, chunk):
    monkeypatch.setattr("ecprune_onnx.scores.CHUNK_ELEMENTS", chunk)
    rng = np.random.default_rng(3)
    w, s1 = rng.normal(size=(9, 4)), rng.normal(size=(9, 4))
    s0 = rng.random(9)
    s0[[2, 7]] = 0.0  # dead units
    s2 = s1**2 / np.where(s0 > 0, s0, 1.0)[:, None] + rng.normal(scale=0.1, size=(9, 4))
    keep = rng.random((9, 4)) > 0.5
    live = (s0 > 0)[:, None]
    centred = s2 - np.divide(s1 * s1, s0[:, None], out=np.zeros_like(s1), where=live)
    expected_importance = np.where(live, w * w * np.clip(centred, 0.0, None), 0.0)
    shifts = np.divide(w * s1, s0[:, None], out=np.zeros_like(s1), where=live)
    expected_shift = np.where(keep, 0.0, shifts).sum(axis=1)
    assert np.array_equal(ec_importance(w, s0, s1, s2), expected_importance)
    assert np.array_equal(bias_shift(w, keep, s0, s1), expected_shift)


@pytest.mark.parametrize("compensated", [True, False])
def test_damage_scores_are_the_importances_written_over_s2(compensated):
    rng = np.random.default_rng(4)
    w, s1 = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    s0 = rng.random(6)
    s0[1] = 0.0
    s2 = s1**2 / np.where(s0 > 0, s0, 1.0)[:, None] + rng.random((6, 5))
    stats = LayerStats(s0, s1, s2.copy(), np.ones(5))
    if compensated:
        expected = ec_importance(w, s0, s1, s2)
    else:
        expected = sensitivity_importance(w, s2)
    got = damage_scores(w, stats, compensated)
    assert np.array_equal(got, expected)
    assert np.shares_memory(got, stats.s2)  # no second array of the layer's size


def test_float32_weights_score_exactly_as_their_float64_values():
    # compress passes DenseLayer.compact_weight, float32 for float32 models: every product
    # with w must happen in float64 (w^2 in float32 rounds at 6e-8)
    rng = np.random.default_rng(5)
    w32 = rng.normal(size=(7, 6)).astype(np.float32)
    w64 = w32.astype(np.float64)
    s1, s0 = rng.normal(size=(7, 6)), rng.random(7)
    s2 = s1**2 / s0[:, None] + rng.random((7, 6))
    stats = LayerStats(s0, s1, s2, np.ones(6))
    keep = rng.random((7, 6)) > 0.5
    for narrow, wide in [
        (ec_importance(w32, s0, s1, s2), ec_importance(w64, s0, s1, s2)),
        (sensitivity_importance(w32, s2), sensitivity_importance(w64, s2)),
        (bias_shift(w32, keep, s0, s1), bias_shift(w64, keep, s0, s1)),
    ]:
        assert narrow.dtype == np.float64 and np.array_equal(narrow, wide)
    for compensated in (True, False):
        narrow = predicted_damage(w32, keep, stats, compensated)
        assert narrow == predicted_damage(w64, keep, stats, compensated)


def test_methods_share_one_signature_and_shape():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 6))
    stats = LayerStats(
        s0=rng.random(4) + 0.1,
        s1=rng.normal(size=(4, 6)),
        s2=rng.random((4, 6)) + 5,
        input_sq=rng.random(6),
        loss_grad=rng.normal(size=(4, 6)),
    )
    for name, method in METHODS.items():
        scores = method.score(w, stats, np.random.default_rng(1))
        assert scores.shape == w.shape, name
        assert np.all(np.isfinite(scores)), name
    wanda = METHODS["wanda"].score(w, stats, None)
    np.testing.assert_allclose(wanda, np.abs(w) * np.sqrt(stats.input_sq))


# --- exactness on the last layer of a network with a linear output ---------------------


def _two_layer_model(rng, hidden=8):
    w1, b1 = rng.normal(size=(6, hidden)), rng.normal(size=hidden)
    w2, b2 = rng.normal(size=(hidden, 3)), rng.normal(size=3)
    inits = [
        numpy_helper.from_array(array.astype(np.float32), name)
        for name, array in (("w1", w1.T), ("b1", b1), ("w2", w2.T), ("b2", b2))
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["z1"], name="hidden", transB=1),
        helper.make_node("Tanh", ["z1"], ["h1"]),
        helper.make_node("Gemm", ["h1", "w2", "b2"], ["y"], name="last", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "two",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    return model, [a.astype(np.float32).astype(np.float64) for a in (w1, b1, w2, b2)]


@pytest.fixture
def last_layer_case(tmp_path):
    rng = np.random.default_rng(7)
    model, arrays = _two_layer_model(rng)
    onnx.save(model, tmp_path / "m.onnx")
    x = (rng.normal(size=(64, 6)) + 0.5).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    return tmp_path, x, arrays


def _run(path, x):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0].astype(np.float64)


def test_last_layer_one_weight_per_row_predicted_equals_measured(last_layer_case):
    folder, x, _ = last_layer_case
    result = compress(
        folder / "m.onnx",
        folder / "calib.npz",
        1 / 8,  # scope row: exactly one of each row's 8 weights
        output=folder / "p.onnx",
        scope="row",
        exclude=["hidden"],
    )
    (last,) = result.layers
    assert last.removed == 3
    deviation = ((_run(folder / "p.onnx", x) - _run(folder / "m.onnx", x)) ** 2).sum()
    assert last.predicted_damage == pytest.approx(deviation, rel=1e-4)
    assert result.measured_deviation == pytest.approx(deviation, rel=1e-6)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_last_layer_bias_is_least_squares_optimal(last_layer_case, ratio):
    folder, x, (w1, b1, w2, b2) = last_layer_case
    compress(
        folder / "m.onnx",
        folder / "calib.npz",
        ratio,
        output=folder / "p.onnx",
        scope="layer",
        exclude=["hidden"],
    )
    pruned = {
        t.name: numpy_helper.to_array(t) for t in onnx.load(folder / "p.onnx").graph.initializer
    }
    kept_weight = pruned["w2"].astype(np.float64).T  # stored [out, in] → [in, out]
    removed = (kept_weight == 0) & (w2 != 0)
    assert removed.sum() == round(ratio * w2.size)
    hidden = np.tanh(x.astype(np.float64) @ w1 + b1)
    # least squares over the bias alone: b' = mean_r (z(r) - kept part of z(r))
    target = hidden @ w2 + b2
    optimal_bias = (target - hidden @ kept_weight).mean(axis=0)
    np.testing.assert_allclose(pruned["b2"], optimal_bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("floor", [0.0, 0.3, 2.0])
def test_floored_sums_are_those_of_the_raised_sensitivities(floor):
    """floor_sensitivity equals recomputing S0, S1, S2 from c'(r) = c(r) + floor * mean_r c."""
    rng = np.random.default_rng(3)
    c = rng.random((50, 4)) * (rng.random((50, 4)) < 0.4)  # a ReLU's zeros
    a = rng.normal(size=(50, 6))
    stats = LayerStats(
        s0=c.sum(0), s1=c.T @ a, s2=c.T @ (a * a), input_sq=(a * a).sum(0), rows=50,
        input_sum=a.sum(0),
    )  # fmt: skip
    raised = c + floor * c.mean(0)
    floor_sensitivity(stats, floor)
    np.testing.assert_allclose(stats.s0, raised.sum(0))
    np.testing.assert_allclose(stats.s1, raised.T @ a)
    np.testing.assert_allclose(stats.s2, raised.T @ (a * a))


def test_a_silent_row_moved_across_the_kink_costs_with_the_floor():
    """A unit silent on half the rows: without the floor, removing the weight whose input
    differs between the halves looks free (the bias shift fits the loud rows); with it, it
    does not, and its bias shift moves toward the mean over all rows."""
    a = np.array([[1.0, 1.0], [1.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    c = np.array([[1.0], [1.0], [0.0], [0.0]])  # loud on the first two rows only
    w = np.array([[2.0, 0.5]])

    def sums():
        return LayerStats(
            s0=c.sum(0), s1=c.T @ a, s2=c.T @ (a * a), input_sq=(a * a).sum(0), rows=4,
            input_sum=a.sum(0),
        )  # fmt: skip

    plain, floored = sums(), floor_sensitivity(sums(), 0.3)
    assert ec_importance(w, plain.s0, plain.s1, plain.s2)[0, 0] == 0.0
    assert ec_importance(w, floored.s0, floored.s1, floored.s2)[0, 0] > 0.0
    keep = np.array([[False, True]])
    assert bias_shift(w, keep, plain.s0, plain.s1)[0] == pytest.approx(2.0)
    assert bias_shift(w, keep, floored.s0, floored.s1)[0] < 2.0
