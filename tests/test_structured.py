"""structured.py: unit scores, budgets and compensation against their definitions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ecprune_onnx import structured
from ecprune_onnx.stats import LayerStats

ROWS, UNITS, OUT = 200, 6, 4


def _activations(rng, rows=ROWS, units=UNITS) -> np.ndarray:
    """Correlated inputs with non-zero means, as hidden units after an activation are."""
    mixing = rng.normal(size=(units, units))
    return np.tanh(rng.normal(size=(rows, units)) @ mixing + rng.normal(size=units))


def _stats(c: np.ndarray, a: np.ndarray) -> LayerStats:
    """docs/method.md's sums from per-row sensitivities c [rows, out] and inputs a [rows, in]."""
    return LayerStats(
        s0=c.sum(0), s1=c.T @ a, s2=c.T @ (a * a), input_sq=(a * a).sum(0), rows=len(a)
    )


def _group(rng, c=None, a=None, covariance=False) -> structured.GroupArrays:
    a = _activations(rng) if a is None else a
    c = rng.uniform(0.2, 2.0, size=(len(a), OUT)) if c is None else c
    centred = a - a.mean(0)
    return structured.GroupArrays(
        producer_weight=rng.normal(size=(UNITS, 3)),
        consumer_weights=[rng.normal(size=(OUT, UNITS))],
        consumer_stats=[_stats(c, a)],
        consumer_covariances=[centred.T @ centred] if covariance else None,
    )


def test_structured_ec_is_the_damage_left_after_each_rows_best_bias_shift():
    rng = np.random.default_rng(0)
    a, c = _activations(rng), rng.uniform(0.2, 2.0, size=(ROWS, OUT))
    group = _group(rng, c, a)
    w = group.consumer_weights[0]
    expected = np.zeros(UNITS)
    for i, j in itertools.product(range(OUT), range(UNITS)):
        change = w[i, j] * a[:, j]  # what removing w_ij takes from z_i(r)
        delta = (c[:, i] * change).sum() / c[:, i].sum()  # weighted least squares for δ
        expected[j] += (c[:, i] * (delta - change) ** 2).sum()
    np.testing.assert_allclose(structured.structured_ec(group), expected, rtol=1e-9)
    uncompensated = [(c * (w[:, j] * a[:, j : j + 1]) ** 2).sum() for j in range(UNITS)]
    np.testing.assert_allclose(structured.structured_sensitivity(group), uncompensated)


def test_bias_shift_is_the_least_squares_bias_for_a_layer_feeding_a_linear_output():
    # The consumer's output is the network's output: c_i(r) = 1 for every row and unit.
    rng = np.random.default_rng(1)
    a = _activations(rng)
    w, b = rng.normal(size=(OUT, UNITS)), rng.normal(size=OUT)
    keep = np.array([True, False, True, False, False, True])
    shift = structured.unit_bias_shift(w, keep, _stats(np.ones((ROWS, OUT)), a))
    np.testing.assert_allclose(shift, w[:, ~keep] @ a[:, ~keep].mean(0), rtol=1e-12)
    target = a @ w.T + b - a[:, keep] @ w[:, keep].T  # what the new bias must match
    optimum = np.linalg.lstsq(np.ones((ROWS, 1)), target, rcond=None)[0][0]
    np.testing.assert_allclose(b + shift, optimum, rtol=1e-10)


@pytest.mark.parametrize("seed", range(4))
def test_refit_is_the_least_squares_optimum_and_never_worse_than_the_bias_shift(seed):
    rng = np.random.default_rng(seed)
    a = _activations(rng)
    w, b = rng.normal(size=(OUT, UNITS)), rng.normal(size=OUT)
    keep = rng.permutation(np.arange(UNITS) < 3)
    mean, centred = a.mean(0), a - a.mean(0)
    cov = centred.T @ centred
    refit = structured.refit_kept_columns(w, b, keep, cov, cov, mean, mean)
    target = a @ w.T + b
    _assert_least_squares_optimum(refit, a[:, keep], target)
    bias_only = b + w[:, ~keep] @ mean[~keep]
    error = _fit_error(a[:, keep], target)
    assert error(refit.weight, refit.bias) < error(w[:, keep], bias_only)


def _fit_error(inputs, target):
    """The squared error of weight, bias mapping `inputs` onto `target`."""
    return lambda weight, bias: float(np.square(inputs @ weight.T + bias - target).sum())


def _assert_least_squares_optimum(refit, inputs, target):
    """The refit's weights and error are the least-squares fit of `target` on `inputs` and
    a bias; the 1e-4 ridge moves the weights of nearly collinear inputs a little, not the
    error."""
    error = _fit_error(inputs, target)
    design = np.hstack([inputs, np.ones((len(inputs), 1))])
    optimum = np.linalg.lstsq(design, target, rcond=None)[0]
    assert error(refit.weight, refit.bias) <= error(optimum[:-1].T, optimum[-1]) * (1 + 1e-4)
    np.testing.assert_allclose(refit.weight, optimum[:-1].T, rtol=0.02, atol=0.02)


def test_refit_after_upstream_changes_maps_the_pruned_inputs_onto_the_original_output():
    rng = np.random.default_rng(5)
    a_original = _activations(rng)
    a_pruned = a_original + 0.3 * _activations(rng)  # what upstream pruning did to the inputs
    w, b = rng.normal(size=(OUT, UNITS)), rng.normal(size=OUT)
    keep = np.array([True, True, False, True, False, True])
    mean_o, mean_p = a_original.mean(0), a_pruned.mean(0)
    centred_o, centred_p = a_original - mean_o, a_pruned - mean_p
    refit = structured.refit_kept_columns(
        w, b, keep, centred_o.T @ centred_p, centred_p.T @ centred_p, mean_o, mean_p
    )
    target = a_original @ w.T + b
    _assert_least_squares_optimum(refit, a_pruned[:, keep], target)


def test_greedy_obs_losses_are_the_refit_losses_of_the_greedy_sets():
    rng = np.random.default_rng(2)
    group = _group(rng, covariance=True)
    losses = structured.greedy_obs_losses(group)
    order = np.argsort(losses, kind="stable")
    for count in range(1, UNITS):
        keep = structured.keep_mask(losses, count)
        assert set(np.flatnonzero(~keep)) == set(order[:count])
        assert losses[order[count - 1]] == pytest.approx(structured.refit_loss(group, keep))
    # the first unit is the cheapest single removal after the refit
    singles = [structured.refit_loss(group, np.arange(UNITS) != j) for j in range(UNITS)]
    assert order[0] == int(np.argmin(singles))


def test_greedy_obs_removes_a_dead_unit_first_for_free():
    rng = np.random.default_rng(3)
    a = _activations(rng)
    a[:, 4] = 0.7  # constant: its mean goes into the bias, nothing else is lost
    group = _group(rng, a=a, covariance=True)
    losses = structured.greedy_obs_losses(group)
    # it costs only the ridge's share: s w² λ, with λ = 1e-4 · mean(diag C)
    assert np.argmin(losses) == 4 and losses[4] < 1e-2 * np.sort(losses)[1]


def test_refit_loss_matches_the_weighted_error_of_the_refit():
    rng = np.random.default_rng(4)
    a = _activations(rng)
    c = np.tile(rng.uniform(0.5, 2.0, size=OUT), (ROWS, 1))  # c_i(r) = s_i: the shared case
    group = _group(rng, c, a, covariance=True)
    w, keep, mean = group.consumer_weights[0], np.arange(UNITS) % 3 != 0, a.mean(0)
    cov = group.consumer_covariances[0]
    refit = structured.refit_kept_columns(w, np.zeros(OUT), keep, cov, cov, mean, mean)
    error = np.square(a[:, keep] @ refit.weight.T + refit.bias - a @ w.T)  # [rows, out]
    expected = float((error * c).sum())
    assert structured.refit_loss(group, keep) == pytest.approx(expected, rel=1e-3)
    assert structured.predicted_damage(group, keep, "refit") == pytest.approx(expected, rel=1e-3)


def test_magnitude_norm_is_the_l2_norm_of_the_units_weights():
    rng = np.random.default_rng(6)
    group = structured.GroupArrays(
        rng.normal(size=(UNITS, 3)),
        [rng.normal(size=(2, UNITS)), rng.normal(size=(5, UNITS))],
        [None, None],
    )
    expected = [
        np.linalg.norm(
            np.concatenate([group.producer_weight[j], *(w[:, j] for w in group.consumer_weights)])
        )
        for j in range(UNITS)
    ]
    np.testing.assert_allclose(structured.magnitude_norm(group), expected)


def test_threshold_counts_take_the_lowest_scores_and_leave_every_group_a_unit():
    scores = [np.array([5.0, 1.0, 2.0]), np.array([0.5, 0.1]), np.array([3.0, 4.0, 0.2, 9.0])]
    assert structured.threshold_counts(scores, 0.0) == [0, 0, 0]
    # the 4 lowest candidates: 0.1, 0.2, 1.0, 2.0; 0.5 is group 1's best and stays
    assert structured.threshold_counts(scores, 4 / 9) == [2, 1, 1]
    assert structured.threshold_counts(scores, 0.99) == [2, 1, 3]
    assert structured.uniform_counts([3, 2, 4], 0.5) == [2, 1, 2]
    assert structured.uniform_counts([1, 10], 0.9) == [0, 9]


def test_curve_counts_minimise_the_summed_curves_exactly():
    rng = np.random.default_rng(7)
    for _ in range(20):
        curves = []
        for units in (4, 6, 3):
            points = np.unique(np.concatenate([[0], rng.integers(1, units, size=2), [units - 1]]))
            damage = np.concatenate([[0.0], np.cumsum(rng.uniform(0, 3, size=len(points) - 1))])
            curves.append((points, damage))  # increasing, not convex
        dense = [np.interp(np.arange(p[-1] + 1), p, d) for p, d in curves]
        for total in range(0, 3 + 5 + 2 + 1):
            counts = structured.curve_counts(curves, total)
            assert sum(counts) == total
            best = min(
                sum(curve[k] for curve, k in zip(dense, combo))
                for combo in itertools.product(*(range(len(curve)) for curve in dense))
                if sum(combo) == total
            )
            assert sum(curve[k] for curve, k in zip(dense, counts)) == pytest.approx(best)


def test_keep_mask_removes_the_lowest_and_breaks_ties_by_index():
    keep = structured.keep_mask(np.array([2.0, 1.0, 1.0, 0.5]), 2)
    np.testing.assert_array_equal(keep, [True, False, True, False])


def test_greedy_block_obs_losses_are_the_refit_losses_of_the_greedy_head_sets():
    """Heads: blocks of 2 columns removed together (ZipLM); the cumulative loss after each
    greedy step is the exact refit loss of the removed blocks, and the first block is the
    cheapest single one."""
    rng = np.random.default_rng(5)
    group = _group(rng, covariance=True)
    heads = structured.GroupArrays(
        producer_weight=rng.normal(size=(UNITS // 2, 6)),
        consumer_weights=group.consumer_weights,
        consumer_stats=group.consumer_stats,
        consumer_covariances=group.consumer_covariances,
        block=2,
    )
    losses = structured.greedy_obs_losses(heads)
    order = np.argsort(losses, kind="stable")
    for count in range(1, UNITS // 2):
        keep = structured.keep_mask(losses, count)
        assert losses[order[count - 1]] == pytest.approx(structured.refit_loss(heads, keep))
    singles = [structured.refit_loss(heads, np.arange(UNITS // 2) != j) for j in range(3)]
    assert order[0] == int(np.argmin(singles))
    # block scores sum their columns: structured EC of a head is that of its two units
    np.testing.assert_allclose(
        structured.structured_ec(heads), structured.structured_ec(group).reshape(3, 2).sum(1)
    )


def test_priced_curve_counts_buy_the_cheapest_damage_per_price_and_meet_the_budget():
    """Two kinds: a 'head' group whose units cost 4 and a 'neuron' group whose units cost 1.
    Brute force over all count pairs that spend at least the budget agrees with the DP."""
    rng = np.random.default_rng(7)
    heads = (np.arange(5), np.concatenate([[0.0], np.cumsum(rng.uniform(0.5, 3.0, 4))]))
    neurons = (np.array([0, 4, 8, 12]), np.array([0.0, 1.0, 5.0, 20.0]))
    for budget in (4.0, 9.0, 14.0):
        counts = structured.priced_curve_counts([heads, neurons], [4.0, 1.0], budget)
        spent = 4 * counts[0] + counts[1]
        damage = np.interp(counts[0], *heads) + np.interp(counts[1], *neurons)
        options = [
            np.interp(h, *heads) + np.interp(n, *neurons)
            for h, n in itertools.product(range(5), range(13))
            if 4 * h + n >= budget
        ]
        assert spent >= budget and damage == pytest.approx(min(options))
