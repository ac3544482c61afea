"""Verification of the diffusion-sorption solver and its dataset generator."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from benchmarks.diffusion_sorption import (
    DEFAULT_PARAMS,
    _jacobian,
    _rhs,
    erfc_error,
    floor_sensitivity,
    flux_operator,
    integrate,
    make_dataset,
    mass_balance,
    random_initial_condition,
    refinement_errors,
    retardation,
    solve,
    sorbed_floored,
)


@pytest.fixture(scope="module")
def solution():
    """The default problem on a coarse grid, shared by the sanity checks."""
    return solve(cells=64)


def test_retardation_values():
    r = retardation(np.array([1.0, 1e-6, 0.0, -1.0]))
    coefficient = DEFAULT_PARAMS.sorption * DEFAULT_PARAMS.n_f
    assert r[0] == pytest.approx(1.0 + coefficient)
    # Below the floor R is held at its floor value, also for (spurious) negative u.
    assert r[1] == r[2] == r[3] == pytest.approx(1.0 + coefficient * 1e-6 ** (0.874 - 1.0))
    assert retardation(0.5, replace(DEFAULT_PARAMS, k_f=0.0)) == 1.0


def test_floored_sorption_derivative_is_retardation_minus_one():
    u = np.array([1e-7, 5e-7, 3e-6, 0.01, 0.5])
    h = 1e-10
    slope = (sorbed_floored(u + h) - sorbed_floored(u - h)) / (2 * h)
    np.testing.assert_allclose(slope, retardation(u) - 1.0, rtol=1e-5)


def test_analytic_jacobian_matches_finite_differences():
    cells = 12
    a, b = flux_operator(DEFAULT_PARAMS, cells)
    rng = np.random.default_rng(0)
    y = np.concatenate([rng.uniform(1e-4, 1.0, cells), [0.3, 0.1]])
    jac = _jacobian(y, a, b, DEFAULT_PARAMS).toarray()
    numeric = np.empty_like(jac)
    for j in range(y.size):
        step = np.zeros_like(y)
        step[j] = 1e-7 * max(abs(y[j]), 1e-3)
        f_plus, f_minus = _rhs(y + step, a, b, DEFAULT_PARAMS), _rhs(y - step, a, b, DEFAULT_PARAMS)
        numeric[:, j] = (f_plus - f_minus) / (2 * step[j])
    np.testing.assert_allclose(jac, numeric, rtol=1e-5, atol=1e-6 * np.abs(jac).max())


def test_grid_refinement_converges():
    rows = refinement_errors((32, 64, 128))
    coarse, medium = rows
    # Second order gives a ratio of 5 against the finest grid (3 for first order).
    assert coarse["max"] / medium["max"] > 1.5
    assert medium["max"] < 2e-4


def test_mass_balance_closes():
    result = mass_balance(cells=64)
    assert result["inflow"] > 0.5  # the check is not vacuous
    assert result["relative_error"] < 1e-3
    # The floor-consistent mass is what the scheme conserves: only the ODE tolerance remains.
    assert result["relative_error_floored"] < 1e-5


def test_robin_outflow_gives_exact_linear_steady_state():
    # Without sorption the steady state of u_xx = 0, u(0) = 1, u(1) = -D u_x(1) is
    # u = 1 - x / (1 + D); the scheme reproduces linear profiles exactly. By t = 5000 the
    # slowest transient (rate ~ D pi**2) has decayed by ~exp(-24).
    params = replace(DEFAULT_PARAMS, k_f=0.0)
    x, _t, u = solve(params, cells=32, times=np.array([0.0, 5000.0]))
    np.testing.assert_allclose(u[-1], 1.0 - x / (1.0 + params.diffusion), atol=1e-6)


def test_mass_balance_closes_with_large_outflow():
    # The default run loses little through x = 1; this one tests the outflow term.
    params = replace(DEFAULT_PARAMS, k_f=0.0)
    result = mass_balance(params, cells=32, times=np.array([0.0, 5000.0]))
    assert result["outflow"] > 1.0
    assert result["relative_error"] < 1e-5


def test_maximum_principle_and_boundary(solution):
    x, t, u = solution
    assert u.shape == (t.size, x.size) == (101, 64)
    assert u.min() >= 0.0 and u.max() <= 1.0
    # u(0, t) = 1: the first cell centre approaches it and is the maximum at every t > 0.
    assert u[-1, 0] > 0.95
    np.testing.assert_array_equal(u[1:].argmax(axis=1), 0)


def test_front_advances_monotonically(solution):
    _x, _t, u = solution
    # From u(x, 0) = 0 the solution rises in time and falls in x everywhere.
    assert np.diff(u, axis=0).min() >= -1e-12
    assert np.diff(u[1:], axis=1).max() <= 1e-12
    front = (u > 0.01).sum(axis=1)  # cells the 1% front has passed
    assert np.all(np.diff(front) >= 0) and front[-1] > front[1]


def test_linear_diffusion_matches_erfc():
    assert erfc_error(128) < 5e-4
    assert erfc_error(256) < 1.5e-4  # and the error falls with refinement (second order)


def test_floor_has_negligible_effect():
    assert floor_sensitivity(64) < 5e-6


def test_random_initial_condition_is_smooth_nonnegative_and_seeded():
    u0 = random_initial_condition(64, seed=3)
    assert u0.min() == pytest.approx(0.0) and u0.max() == pytest.approx(0.2)
    assert np.abs(np.diff(u0)).max() < 0.05  # smooth on this grid
    np.testing.assert_array_equal(u0, random_initial_condition(64, seed=3))
    assert not np.array_equal(u0, random_initial_condition(64, seed=4))
    sol = integrate(cells=64, times=np.linspace(0, 500, 11), u0=u0)
    assert sol.u.min() >= 0.0 and sol.u.max() <= 1.0
    np.testing.assert_array_equal(sol.u[0], u0)


def test_make_dataset_deterministic_bounded_and_clean_test():
    noise = 0.05
    data = make_dataset(noise, samples=500, seed=7, cells=64)
    again = make_dataset(noise, samples=500, seed=7, cells=64)
    for key, value in data.items():
        np.testing.assert_array_equal(value, again[key])
        assert value.dtype == np.float32
    assert data["points"].shape == (500, 2) and data["targets"].shape == (500, 1)
    assert len(data["train_points"]) == 400 and len(data["test_points"]) == 100
    noise_drawn = data["targets"] - data["clean_targets"]
    assert np.abs(noise_drawn).max() <= noise + 1e-6  # float32 rounding only
    assert np.abs(noise_drawn).max() > 0.8 * noise  # noise was added
    np.testing.assert_array_equal(data["test_targets"], data["clean_targets"][:100])
    assert not np.array_equal(data["points"], make_dataset(noise, 500, 8, 64)["points"])
    # The clean targets are the solution at the sampled grid points.
    x, t, u = solve(cells=64)
    xi = np.searchsorted(x.astype(np.float32), data["points"][:, 0])
    ti = np.searchsorted(t.astype(np.float32), data["points"][:, 1])
    np.testing.assert_allclose(data["clean_targets"][:, 0], u[ti, xi], rtol=1e-6, atol=1e-7)
