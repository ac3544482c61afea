"""Reconstruction (docs/method.md, "Reconstruction: from EC to OBS"): SparseGPT against a literal
Algorithm 1, ExactOBS against a literal greedy and least squares, exact shares and N:M
groups, and the centred variant whose bias carries the mean."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ecprune_onnx import reconstruct
from ecprune_onnx.errors import UsageError
from ecprune_onnx.reconstruct import (
    allocate_removals,
    centred,
    centred_gram,
    dampen,
    gram,
    layer_loss,
    obc,
    obc_traces,
    optimal_for_mask,
    sparsegpt,
)


def _layer(seed, out_features, in_features, rows, mean=0.0):
    """Random weight and correlated activations [rows, in] (Gaussian rows through a random
    mixing with uneven column scales), shifted by `mean` times a random direction."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(in_features, in_features)) * rng.random(in_features)
    a = rng.normal(size=(rows, in_features)) @ mix + mean * rng.normal(size=in_features)
    return rng.normal(size=(out_features, in_features)), a


def _output_error(weight_new, weight, a, shift=0.0):
    """sum_r ||(W' - W) a(r) + δ||^2, measured on the data."""
    residual = a @ (weight_new - weight).T + shift
    return float((residual * residual).sum())


# --- SparseGPT against a literal transcription of its Algorithm 1 ----------------------------


def _algorithm1(w, h, sparsity, pattern, blocksize, dampening=0.01):
    """SparseGPT, Algorithm 1 (Frantar & Alistarh 2023), line by line with loops; the mask
    blocksize B_s is B unstructured and M for N:M (the paper's N:M variant). Returns
    (W, M, loss)."""
    W = np.array(w, dtype=float)
    H = np.array(h, dtype=float)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += dampening * np.mean(np.diag(H)) * np.eye(len(H))
    Hinv = np.linalg.cholesky(np.linalg.inv(H)).T  # Cholesky(H^-1)^T, upper
    d_row, d_col = W.shape
    M = np.ones((d_row, d_col))
    B = blocksize
    B_s = pattern[1] if pattern else B
    loss = 0.0
    for i in range(0, d_col, B):
        E = np.zeros((d_row, B))
        for j in range(i, i + B):
            if j % B_s == 0:
                M[:, j : j + B_s] = _literal_mask(W, Hinv, j, B_s, sparsity, pattern)
            E[:, j - i] = W[:, j] / Hinv[j, j]
            E[:, j - i] = (1 - M[:, j]) * E[:, j - i]
            for r in range(d_row):
                for c in range(j, i + B):
                    W[r, c] -= E[r, j - i] * Hinv[j, c]
        W[:, i + B :] -= E @ Hinv[i : i + B, i + B :]
        loss += float((E**2).sum())
    return W * M, M.astype(bool), loss


def _literal_mask(W, Hinv, j, B_s, sparsity, pattern):
    """Keep the weights of W[:, j:j+B_s] with the largest w_c^2 / [H^-1]_cc^2: per row N of
    M, or the block's share of round(sparsity · size) (cumulative rounding, ties by position)."""
    d_row = W.shape[0]
    score = [[W[r, c] ** 2 / Hinv[c, c] ** 2 for c in range(j, j + B_s)] for r in range(d_row)]
    M = np.ones((d_row, B_s))
    if pattern:
        for r in range(d_row):
            for c in sorted(range(B_s), key=lambda c: (score[r][c], c))[: B_s - pattern[0]]:
                M[r, c] = 0
        return M
    quota = round(sparsity * d_row * (j + B_s)) - round(sparsity * d_row * j)
    cells = sorted((score[r][c], r * B_s + c) for r in range(d_row) for c in range(B_s))
    for _, position in cells[:quota]:
        M[position // B_s, position % B_s] = 0
    return M


@pytest.mark.parametrize(
    ("sparsity", "pattern", "blocksize"),
    [(0.5, None, 4), (0.3, None, 4), (0.7, None, 8), (0.0, (2, 4), 4), (0.0, (1, 4), 8)],
)
def test_sparsegpt_matches_algorithm_1(sparsity, pattern, blocksize):
    w, a = _layer(0, 6, 16, 40)
    h = gram(a)
    got = sparsegpt(w, h, sparsity, pattern=pattern, blocksize=blocksize)
    weight, keep, loss = _algorithm1(w, h, sparsity, pattern, blocksize)
    assert np.array_equal(got.keep, keep)
    np.testing.assert_allclose(got.weight, weight, rtol=1e-9, atol=1e-12)
    assert got.loss == pytest.approx(loss, rel=1e-9)


# --- ExactOBS against a literal greedy and against least squares ------------------------------


def _literal_exact_obs(w, h_damp):
    """OBC's greedy for one row, re-inverting H on the kept set at every step."""
    w = np.array(w, dtype=float)
    kept, order, cumulative = list(range(len(w))), [], [0.0]
    while kept:
        hinv = np.linalg.inv(h_damp[np.ix_(kept, kept)])
        scores = [w[q] ** 2 / hinv[k, k] for k, q in enumerate(kept)]
        k = int(np.argmin(scores))
        w[kept] -= w[kept[k]] / hinv[k, k] * hinv[:, k]
        order.append(kept.pop(k))
        cumulative.append(cumulative[-1] + scores[k])
    return order, cumulative


def test_obc_traces_match_the_literal_greedy():
    w, a = _layer(1, 3, 10, 30)
    h = gram(a)
    trace = obc_traces(w, h)
    for row in range(3):
        order, cumulative = _literal_exact_obs(w[row], dampen(h))
        assert trace.order[row].tolist() == order
        np.testing.assert_allclose(trace.cumulative_loss[row], cumulative, rtol=1e-9)


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_obc_kept_weights_are_the_least_squares_optimum(pattern):
    w, a = _layer(2, 8, 16, 50)
    h, lam = gram(a), 0.01
    got = obc(w, h, 0.6, pattern=pattern, dampening=lam)
    # min ||G (w' - w)||^2 with G^T G = H + λ mean(diag H) I, w' on the kept set
    g = np.vstack([a, np.sqrt(lam * np.mean(np.diag(h))) * np.eye(16)])
    for row in range(8):
        kept = got.keep[row]
        expected = np.zeros(16)
        expected[kept] = np.linalg.lstsq(g[:, kept], g @ w[row], rcond=None)[0]
        np.testing.assert_allclose(got.weight[row], expected, rtol=1e-7, atol=1e-9)
    assert got.loss == pytest.approx(layer_loss(got.weight, w, dampen(h, lam)), rel=1e-9)


def test_allocation_takes_the_smallest_increments_across_rows():
    cumulative = np.array([[0.0, 1.0, 2.0, 10.0], [0.0, 0.5, 5.0, 6.0]])
    assert allocate_removals(cumulative, 3).tolist() == [2, 1]
    # as OBC's reference: a row counts its increments among the smallest (here 0.5 and its
    # third step's 1.0) and takes that many first steps, so its second (4.5) comes along
    assert allocate_removals(cumulative, 4).tolist() == [2, 2]
    assert allocate_removals(cumulative, 3, row_scale=np.array([10.0, 1.0])).tolist() == [0, 3]


def test_row_scale_moves_removals_to_insensitive_rows():
    w, a = _layer(3, 4, 12, 40)
    scale = np.array([100.0, 1.0, 1.0, 0.01])
    got = obc(w, gram(a), 0.5, row_scale=scale)
    plain = obc(w, gram(a), 0.5)
    removed, plain_removed = (~got.keep).sum(axis=1), (~plain.keep).sum(axis=1)
    assert removed[0] < plain_removed[0] and removed[3] > plain_removed[3]
    assert removed.sum() == plain_removed.sum() == 24
    assert got.loss == pytest.approx(layer_loss(got.weight, w, dampen(gram(a)), scale), rel=1e-9)


# --- Shares, patterns, and never worse than masking -------------------------------------------


def _solvers(pattern, blocksize=4):
    """Every solver as f(weight, a_rows, sparsity) -> (reconstruction, H it minimises)."""

    def centred_with(solver):
        def run(w, a, sparsity):
            c, mean = centred_gram(a)
            extra = {"blocksize": blocksize} if solver == "sparsegpt" else {}
            return centred(w, c, mean, sparsity, solver=solver, pattern=pattern, **extra), c

        return run

    return {
        "sparsegpt": lambda w, a, s: (
            sparsegpt(w, gram(a), s, pattern=pattern, blocksize=blocksize),
            gram(a),
        ),
        "obc": lambda w, a, s: (obc(w, gram(a), s, pattern=pattern), gram(a)),
        "centred-obc": centred_with("obc"),
        "centred-sparsegpt": centred_with("sparsegpt"),
    }


def _check_against_masking(name, got, w, h):
    """ExactOBS is the optimum for its mask, so never worse than masking alone. SparseGPT
    fixes every kept weight once its column is passed, so it is only at least the optimum:
    on correlated inputs it can lose to plain masking (see the counterexample below)."""
    h_damp = dampen(h)
    loss = layer_loss(got.weight, w, h_damp)
    best = layer_loss(optimal_for_mask(w, h_damp, got.keep), w, h_damp)
    assert loss == pytest.approx(got.loss, rel=1e-8, abs=1e-9), name
    assert loss >= best * (1 - 1e-9) - 1e-9, name
    if "obc" in name:
        assert loss <= layer_loss(w * got.keep, w, h_damp) * (1 + 1e-9) + 1e-9, name


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    shape=st.tuples(st.integers(1, 6), st.integers(1, 12)),
    sparsity=st.floats(0.0, 0.95),
)
def test_unstructured_share_is_exact_and_obc_never_worse_than_masking(seed, shape, sparsity):
    w, a = _layer(seed, *shape, rows=20, mean=1.0)
    for name, solve in _solvers(None).items():
        got, h = solve(w, a, sparsity)
        assert (~got.keep).sum() == round(sparsity * w.size), name
        assert np.all(got.weight[~got.keep] == 0), name
        _check_against_masking(name, got, w, h)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), pattern=st.sampled_from([(2, 4), (1, 4), (3, 4), (1, 2)]))
def test_n_of_m_holds_exactly_and_obc_never_worse_than_masking(seed, pattern):
    w, a = _layer(seed, 5, 16, 30, mean=1.0)
    for name, solve in _solvers(pattern).items():
        got, h = solve(w, a, 0.0)
        groups = got.keep.reshape(5, -1, pattern[1]).sum(axis=2)
        assert np.all(groups == pattern[0]), name
        _check_against_masking(name, got, w, h)


def test_sparsegpt_can_lose_to_masking_for_its_own_mask():
    """H^-1 = L L^T with L = [[1,0,0],[1,1,0],[10,10,1]]; w = (1, 2, 0.01) loses w_0 and w_2.
    SparseGPT (as Algorithm 1 above) keeps w_1 after its update and pays (10 - 0.01)^2 on
    w_2; masking alone moves w_1 by nothing and pays about 2."""
    lower = np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [10.0, 10.0, 1.0]])
    h, w = np.linalg.inv(lower @ lower.T), np.array([[1.0, 2.0, 0.01]])
    got = sparsegpt(w, h, 2 / 3, dampening=0.0)
    assert got.keep.tolist() == [[False, True, False]]
    assert got.loss == pytest.approx(1 + 9.99**2)
    assert layer_loss(w * got.keep, w, h) == pytest.approx(2.0001)
    assert obc(w, h, 2 / 3, dampening=0.0).loss < 2.0


def test_pattern_must_divide_the_inputs():
    w, a = _layer(4, 2, 6, 10)
    with pytest.raises(UsageError, match="not a multiple of 4"):
        obc(w, gram(a), 0.0, pattern=(2, 4))
    with pytest.raises(UsageError, match="not a multiple of 4"):
        sparsegpt(w, gram(a), 0.0, pattern=(2, 4))


# --- The centred variant: the bias carries the mean --------------------------------------------


@pytest.mark.parametrize("solver", ["obc", "sparsegpt"])
def test_centred_loss_is_the_output_error_with_the_bias_shift(solver):
    w, a = _layer(5, 6, 16, 60, mean=3.0)
    c, mean = centred_gram(a)
    got = centred(w, c, mean, 0.5, solver=solver, blocksize=8, dampening=0.0)
    error = _output_error(got.weight, w, a, got.bias_shift)
    assert error == pytest.approx(got.loss, rel=1e-8)
    assert error == pytest.approx(layer_loss(got.weight, w, c), rel=1e-8)


@pytest.mark.parametrize("solver", ["obc", "sparsegpt"])
def test_centred_beats_the_uncentred_rival_on_data_with_a_mean(solver):
    w, a = _layer(6, 8, 32, 100, mean=3.0)
    c, mean = centred_gram(a)
    rival = obc if solver == "obc" else sparsegpt
    uncentred = rival(w, gram(a), 0.5)
    own = centred(w, c, mean, 0.5, solver=solver)
    own_error = _output_error(own.weight, w, a, own.bias_shift)
    assert own_error < _output_error(uncentred.weight, w, a)


def test_optimal_bias_never_hurts_for_a_fixed_mask():
    """With the mask fixed, the optimum over (w', δ) is at most the optimum over w' alone."""
    w, a = _layer(7, 5, 12, 40, mean=2.0)
    c, mean = centred_gram(a)
    keep = np.random.default_rng(7).random(w.shape) < 0.5
    with_bias = optimal_for_mask(w, c, keep)
    without = optimal_for_mask(w, gram(a), keep)
    shift = -(with_bias - w) @ mean
    assert _output_error(with_bias, w, a, shift) <= _output_error(without, w, a) + 1e-9


@pytest.mark.parametrize("solver", ["obc", "sparsegpt"])
def test_dead_and_constant_inputs_go_first_and_the_bias_carries_the_constant(solver):
    w, a = _layer(8, 4, 8, 30)
    a[:, 2] = 0.0  # dead: H_22 = 0
    a[:, 5] = 1.5  # constant: C_55 = 0
    uncentred = (obc if solver == "obc" else sparsegpt)(w, gram(a), 0.25)
    assert not uncentred.keep[:, 2].any() and np.isfinite(uncentred.loss)
    c, mean = centred_gram(a)
    own = centred(w, c, mean, 0.25, solver=solver)
    assert not own.keep[:, 2].any() and not own.keep[:, 5].any()
    error = _output_error(own.weight, w, a, own.bias_shift)
    assert error == pytest.approx(layer_loss(own.weight, w, c), rel=1e-8)


def test_per_row_means_give_per_row_shifts():
    w, a = _layer(9, 3, 8, 30, mean=1.0)
    c, mean = centred_gram(a)
    means = np.stack([mean, 2 * mean, np.zeros(8)])
    shared = centred(w, c, mean, 0.5)
    per_row = centred(w, c, means, 0.5)
    np.testing.assert_allclose(per_row.bias_shift, shared.bias_shift * [1, 2, 0])


# --- Speed ------------------------------------------------------------------------------------


def test_obc_on_a_256_layer_takes_seconds():
    """About 1 s on one core of the shared 2-core machine; 10 s leaves room for load."""
    rng = np.random.default_rng(0)
    w, a = rng.normal(size=(256, 256)), rng.normal(size=(1024, 256))
    start = time.perf_counter()
    got = obc(w, gram(a), 0.5)
    assert time.perf_counter() - start < 10.0
    assert (~got.keep).sum() == 256 * 128


# --- The fast paths: the same numbers as the direct ones ------------------------------------


def test_hinv_factor_is_the_upper_cholesky_factor_of_the_inverse():
    _, a = _layer(4, 1, 30, rows=50)
    h_damp = dampen(gram(a))
    u = reconstruct.hinv_factor(gram(a))
    assert np.allclose(u, np.triu(u)) and np.all(np.diag(u) > 0)
    np.testing.assert_allclose(u.T @ u, np.linalg.inv(h_damp), rtol=1e-8, atol=1e-12)


def test_dampen_in_reversed_order_is_the_reversed_dampened_matrix():
    h = gram(_layer(4, 1, 30, rows=50)[1])
    h[3, :] = h[:, 3] = 0.0  # a dead input
    np.testing.assert_array_equal(dampen(h, reversed_order=True), dampen(h)[::-1, ::-1])
    np.testing.assert_array_equal(reconstruct.damping(h, 0.01), np.diag(dampen(h)) - np.diag(h))


def test_reversing_in_place_is_reversing_rows_and_columns():
    for size in (1, 4, 5):
        square = np.arange(size * size, dtype=np.float64).reshape(size, size)
        expected = square[::-1, ::-1].copy()
        assert reconstruct._reverse_in_place(square) is square
        np.testing.assert_array_equal(square, expected)


def test_lowest_takes_ties_by_position_as_a_stable_sort():
    score = np.random.default_rng(0).integers(0, 4, size=(7, 9)).astype(float)
    for count in range(score.size + 1):
        order = np.argsort(score, axis=None, kind="stable")[:count]
        expected = np.zeros(score.size, dtype=bool)
        expected[order] = True
        np.testing.assert_array_equal(reconstruct._lowest(score, count).ravel(), expected)


@pytest.mark.parametrize("solver", ["sparsegpt", "obc"])
def test_undamped_loss_is_the_layer_loss(solver):
    w, a = _layer(5, 6, 20, rows=40)
    a[:, 3] = 0.0  # a dead input: H_jj = 0, dampened to 1
    h = gram(a)
    scale = np.random.default_rng(1).random(6)
    got = sparsegpt(w, h, 0.6, blocksize=8) if solver == "sparsegpt" else obc(w, h, 0.6)
    expected = layer_loss(got.weight, w, h, scale)
    assert reconstruct.undamped_loss(got, w, h, scale) == pytest.approx(expected, rel=1e-9)


def test_stacked_sparsegpt_losses_are_those_of_single_runs():
    w, a = _layer(6, 5, 24, rows=40, mean=1.0)
    h = gram(a)
    shares = np.array([0.1, 0.5, 0.8])
    got = reconstruct.sparsegpt_losses(w, h, shares, blocksize=8)
    for share, row_losses in zip(shares, got):
        single = sparsegpt(w, h, share, blocksize=8)
        diff = single.weight - w
        np.testing.assert_allclose(row_losses, ((diff @ h) * diff).sum(axis=1), rtol=1e-9)


def test_float32_loss_curves_are_the_float64_ones_to_float32_rounding():
    w, a = _layer(8, 12, 64, rows=200, mean=0.5)
    h = gram(a)
    shares = np.array([0.2, 0.5, 0.8])
    exact = reconstruct.sparsegpt_losses(w, h, shares, blocksize=16)
    single = reconstruct.sparsegpt_losses(w, h, shares, blocksize=16, dtype=np.float32)
    np.testing.assert_allclose(single.sum(axis=1), exact.sum(axis=1), rtol=1e-5)


def test_the_factor_made_in_place_is_the_factor_and_a_diagonal_stands_for_h():
    w, a = _layer(9, 6, 30, rows=50)
    a[:, 4] = 0.0  # a dead input
    h = gram(a)
    factor = reconstruct.hinv_factor(h)
    np.testing.assert_array_equal(reconstruct.hinv_factor_in_place(h.copy()), factor)
    full = sparsegpt(w, h, 0.5, blocksize=8, factor=factor)
    diagonal = sparsegpt(w, np.diag(h).copy(), 0.5, blocksize=8, factor=factor)
    np.testing.assert_array_equal(diagonal.weight, full.weight)
    assert reconstruct.undamped_loss(diagonal, w, np.diag(h).copy()) == reconstruct.undamped_loss(
        full, w, h
    )
    with pytest.raises(ValueError, match="needs the factor"):
        sparsegpt(w, np.diag(h).copy(), 0.5)
