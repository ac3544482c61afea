"""PDEBench's 1D diffusion-sorption problem: a verified solver and a dataset generator.

The PDE is ``u_t = D / R(u) * u_xx`` on ``x in (0, 1)``, ``t in (0, 500]``, with the Freundlich
retardation factor ``R(u) = 1 + (1 - phi) / phi * rho_s * k * n_f * u**(n_f - 1)``, the Dirichlet
inflow ``u(0, t) = 1`` and the Cauchy (Robin) outflow ``u(1, t) = -D * u_x(1, t)``: the outward
flux ``-D u_x`` equals the boundary concentration. PDEBench's paper prints ``u = D u_x``; its
code (a ghost cell equal to ``D * (u[-2] - u[-1]) / dx``) implements the sign used here, and the
printed sign would make mass flow *into* the domain at x = 1 and the problem unstable.

Discretisation: cell-centred finite volumes on the conservative form
``d/dt (u + s(u)) = -d/dx (-D u_x)``, with ``s'(u) = R(u) - 1``, so each cell obeys
``R(u_i) du_i/dt = (F_{i-1/2} - F_{i+1/2}) / dx``; the method of lines is integrated with
scipy's BDF and an analytic sparse (tridiagonal) Jacobian. Two extra ODE components accumulate
the boundary fluxes, so the mass balance can be checked to the ODE tolerance.

``u**(n_f - 1)`` is infinite at u = 0, so R is evaluated at ``max(u, u_floor)``. The default
initial condition is ``u(x, 0) = 0`` (PDEBench draws a random constant in [0, 0.2]);
:func:`random_initial_condition` gives a seeded smooth nonnegative alternative.

Run ``python -m benchmarks.diffusion_sorption --cells 512`` for the verification tables; the
numbers are recorded in ``benchmarks/DIFFUSION_SORPTION.md``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
from scipy import sparse
from scipy.integrate import solve_ivp
from scipy.special import erfc

PDEBENCH_TIMES = np.linspace(0.0, 500.0, 101)
PDEBENCH_TIMES.flags.writeable = False  # a shared default argument must not be mutable


@dataclass(frozen=True)
class DiffusionSorption:
    """Constants of the problem (PDEBench's values); ``u_floor`` regularises R at u = 0."""

    diffusion: float = 5e-4  # D
    porosity: float = 0.29  # phi
    rho_s: float = 2880.0  # dry bulk density
    k_f: float = 3.5e-4  # Freundlich coefficient k
    n_f: float = 0.874  # Freundlich exponent
    u_left: float = 1.0  # Dirichlet value at x = 0
    u_floor: float = 1e-6  # R is evaluated at max(u, u_floor)

    @property
    def sorption(self) -> float:
        """``(1 - phi) / phi * rho_s * k``: sorbed amount per unit ``u**n_f``."""
        return (1.0 - self.porosity) / self.porosity * self.rho_s * self.k_f


DEFAULT_PARAMS = DiffusionSorption()


@dataclass(frozen=True)
class Solution:
    """A run of the solver: states at ``t`` and the cumulative boundary fluxes."""

    x: np.ndarray  # cell centres [cells]
    t: np.ndarray  # output times [n_t]
    u: np.ndarray  # u[t_index, x_index]
    inflow: np.ndarray  # integral of the flux through x = 0 from t[0] to t[i]
    outflow: np.ndarray  # integral of the flux through x = 1 from t[0] to t[i]
    nfev: int
    njev: int


def retardation(u: np.ndarray, params: DiffusionSorption = DEFAULT_PARAMS) -> np.ndarray:
    """Freundlich retardation factor ``R(u)``, evaluated at ``max(u, u_floor)``."""
    u = np.maximum(np.asarray(u, dtype=float), params.u_floor)
    return 1.0 + params.sorption * params.n_f * u ** (params.n_f - 1.0)


def _retardation_slope(u: np.ndarray, params: DiffusionSorption) -> np.ndarray:
    """``dR/du``; zero below the floor, where R is held constant."""
    clipped = np.maximum(u, params.u_floor)
    slope = params.sorption * params.n_f * (params.n_f - 1.0) * clipped ** (params.n_f - 2.0)
    return np.where(u > params.u_floor, slope, 0.0)


def sorbed(u: np.ndarray, params: DiffusionSorption = DEFAULT_PARAMS) -> np.ndarray:
    """Sorbed amount per pore volume, ``(1 - phi) / phi * rho_s * k * u**n_f`` (no floor)."""
    return params.sorption * np.maximum(np.asarray(u, dtype=float), 0.0) ** params.n_f


def sorbed_floored(u: np.ndarray, params: DiffusionSorption = DEFAULT_PARAMS) -> np.ndarray:
    """The sorbed amount whose derivative is exactly the floored ``R - 1``.

    Above the floor it is :func:`sorbed`; below it is the tangent line at the floor, so the
    discrete mass ``u + s(u)`` is conserved by the scheme up to the ODE tolerance.
    """
    u = np.asarray(u, dtype=float)
    f = params.u_floor
    below = sorbed(f, params) + (retardation(f, params) - 1.0) * (u - f)
    return np.where(u > f, sorbed(u, params), below)


def cell_centres(cells: int) -> np.ndarray:
    """Centres of ``cells`` equal cells on [0, 1]."""
    return (np.arange(cells) + 0.5) / cells


def _outflow_factor(params: DiffusionSorption, cells: int) -> float:
    """``beta`` with boundary value (= outflow) ``u_face = beta * u_last``.

    From ``u_face = -D (u_face - u_last) / (dx / 2)``: the one-sided gradient over half a cell.
    """
    g = 2.0 * params.diffusion * cells
    return g / (1.0 + g)


def flux_operator(params: DiffusionSorption, cells: int) -> tuple[sparse.csr_matrix, np.ndarray]:
    """``A``, ``b`` with ``(A u + b)_i = (F_{i-1/2} - F_{i+1/2}) / dx``, F = -D u_x.

    Interior faces use the central difference; the Dirichlet face uses the half-cell gradient
    to the boundary value, and the Robin face its outflow ``beta * u_last``.
    """
    dx = 1.0 / cells
    c = params.diffusion / dx**2
    main = np.full(cells, -2.0 * c)
    main[0] = -3.0 * c  # half-cell distance to the Dirichlet face doubles its conductance
    main[-1] = -c - _outflow_factor(params, cells) / dx
    off = np.full(cells - 1, c)
    a = sparse.diags([off, main, off], [-1, 0, 1], format="csr")
    b = np.zeros(cells)
    b[0] = 2.0 * c * params.u_left
    return a, b


def _rhs(
    y: np.ndarray, a: sparse.csr_matrix, b: np.ndarray, params: DiffusionSorption
) -> np.ndarray:
    """Time derivative of ``[u, inflow, outflow]``."""
    u = y[:-2]
    cells = u.size
    div = a @ u + b
    inflow = 2.0 * params.diffusion * cells * (params.u_left - u[0])
    outflow = _outflow_factor(params, cells) * u[-1]
    return np.concatenate([div / retardation(u, params), [inflow, outflow]])


def _jacobian(
    y: np.ndarray, a: sparse.csr_matrix, b: np.ndarray, params: DiffusionSorption
) -> sparse.csc_matrix:
    """Analytic Jacobian of :func:`_rhs`: ``diag(1/R) A - diag(R' / R**2 * (A u + b))``."""
    u = y[:-2]
    cells = u.size
    r = retardation(u, params)
    du = a.multiply(1.0 / r[:, None]) - sparse.diags(
        _retardation_slope(u, params) / r**2 * (a @ u + b)
    )
    flux_rows = sparse.csr_matrix(
        (
            [-2.0 * params.diffusion * cells, _outflow_factor(params, cells)],
            ([0, 1], [0, cells - 1]),
        ),
        shape=(2, cells),
    )
    # The flux accumulators feed nothing back: their two columns are zero.
    return sparse.hstack([sparse.vstack([du, flux_rows]), sparse.csr_matrix((cells + 2, 2))], "csc")


def integrate(
    params: DiffusionSorption = DEFAULT_PARAMS,
    cells: int = 256,
    times: np.ndarray = PDEBENCH_TIMES,
    u0: np.ndarray | None = None,
    rtol: float = 1e-6,
    atol: float = 1e-9,
) -> Solution:
    """Integrate the method-of-lines system with BDF; see :func:`solve`."""
    times = np.asarray(times, dtype=float)
    u0 = np.zeros(cells) if u0 is None else np.asarray(u0, dtype=float)
    if u0.shape != (cells,):
        raise ValueError(f"u0 has shape {u0.shape}, expected ({cells},)")
    a, b = flux_operator(params, cells)
    y0 = np.concatenate([u0, [0.0, 0.0]])
    result = solve_ivp(
        lambda _t, y: _rhs(y, a, b, params),
        (times[0], times[-1]),
        y0,
        method="BDF",
        t_eval=times,
        jac=lambda _t, y: _jacobian(y, a, b, params),
        rtol=rtol,
        atol=atol,
    )
    if not result.success:
        raise RuntimeError(f"solve_ivp failed: {result.message}")
    y = result.y.T
    return Solution(
        cell_centres(cells), result.t, y[:, :-2], y[:, -2], y[:, -1], result.nfev, result.njev
    )


def solve(
    params: DiffusionSorption = DEFAULT_PARAMS,
    cells: int = 256,
    times: np.ndarray = PDEBENCH_TIMES,
    u0: np.ndarray | None = None,
    rtol: float = 1e-6,
    atol: float = 1e-9,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Solve the diffusion-sorption problem.

    Args:
        params: problem constants.
        cells: number of finite-volume cells on [0, 1].
        times: output times, increasing; integration runs from ``times[0]`` to ``times[-1]``.
        u0: initial cell values; ``None`` means ``u(x, 0) = 0``.
        rtol, atol: BDF tolerances.

    Returns:
        ``x`` (cell centres), ``t`` (= times) and ``u[t_index, x_index]``.
    """
    sol = integrate(params, cells, times, u0, rtol, atol)
    return sol.x, sol.t, sol.u


def random_initial_condition(
    cells: int, seed: int, amplitude: float = 0.2, modes: int = 4
) -> np.ndarray:
    """A seeded smooth nonnegative ``u(x, 0)`` with values in ``[0, amplitude]``.

    A random sum of ``modes`` sine modes with decaying weights, shifted and scaled onto
    ``[0, amplitude]``; ``amplitude = 0.2`` matches the range of PDEBench's random constants.
    """
    rng = np.random.default_rng(seed)
    x = cell_centres(cells)
    k = np.arange(1, modes + 1)
    g = (rng.standard_normal(modes) / k) @ np.sin(
        np.pi * np.outer(k, x) + rng.uniform(0, np.pi, (modes, 1))
    )
    return amplitude * (g - g.min()) / max(g.max() - g.min(), 1e-12)


def restrict(u: np.ndarray, factor: int) -> np.ndarray:
    """Average groups of ``factor`` fine cells along the last axis onto the coarse grid."""
    return u.reshape(*u.shape[:-1], u.shape[-1] // factor, factor).mean(axis=-1)


def refinement_errors(
    grids: tuple[int, ...], params: DiffusionSorption = DEFAULT_PARAMS, t_end: float = 500.0
) -> list[dict[str, float]]:
    """Max and RMS differences at ``t_end`` between each grid and the finest (the last).

    The finest solution is averaged onto each coarser grid; grid sizes must divide it.
    """
    finals = {n: solve(params, n, np.array([0.0, t_end]))[2][-1] for n in grids}
    reference = finals[grids[-1]]
    rows = []
    for n in grids[:-1]:
        diff = finals[n] - restrict(reference, grids[-1] // n)
        rows.append(
            {"cells": n, "max": float(np.abs(diff).max()), "rms": float(np.sqrt((diff**2).mean()))}
        )
    return rows


def mass_balance(
    params: DiffusionSorption = DEFAULT_PARAMS,
    cells: int = 256,
    times: np.ndarray = PDEBENCH_TIMES,
    u0: np.ndarray | None = None,
) -> dict[str, float]:
    """Integrated mass balance ``M(T) - M(0) = int (flux in - flux out) dt``.

    ``M = int u + s(u) dx`` with the exact sorbed amount ``s`` (:func:`sorbed`) gives
    ``relative_error``; with the floor-consistent ``s`` (:func:`sorbed_floored`), the quantity
    the scheme conserves, ``relative_error_floored``. Fluxes are integrated inside the ODE.
    """
    sol = integrate(params, cells, times, u0)
    dx = 1.0 / cells
    net = sol.inflow[-1] - sol.outflow[-1]
    errors = {}
    for name, s in (("relative_error", sorbed), ("relative_error_floored", sorbed_floored)):
        mass = dx * (sol.u + s(sol.u, params)).sum(axis=1)
        errors[name] = float(abs(mass[-1] - mass[0] - net) / abs(net))
    return {"inflow": float(sol.inflow[-1]), "outflow": float(sol.outflow[-1]), **errors}


def erfc_error(cells: int, times: tuple[float, ...] = (10.0, 25.0)) -> float:
    """Max error against ``erfc(x / (2 sqrt(D t)))`` with no sorption (``k = 0``, R = 1).

    At these times the front is far from x = 1 (erfc(1 / (2 sqrt(D t))) < 1e-12 at t = 25), so
    the half-space similarity solution is the exact reference.
    """
    params = replace(DEFAULT_PARAMS, k_f=0.0)
    x, t, u = solve(params, cells, np.array([0.0, *times]))
    exact = erfc(x / (2.0 * np.sqrt(params.diffusion * t[1:, None])))
    return float(np.abs(u[1:] - exact).max())


def floor_sensitivity(cells: int = 256, floors: tuple[float, float] = (1e-6, 1e-8)) -> float:
    """Max change of the whole solution ``u(x, t)`` when ``u_floor`` changes."""
    a, b = (solve(replace(DEFAULT_PARAMS, u_floor=f), cells)[2] for f in floors)
    return float(np.abs(a - b).max())


@lru_cache(maxsize=4)
def _cached_solution(params: DiffusionSorption, cells: int, times: tuple[float, ...]):
    """Read-only solution, reused across :func:`make_dataset` calls with equal arguments."""
    x, t, u = solve(params, cells, np.array(times))
    for array in (x, t, u):
        array.flags.writeable = False
    return x, t, u


def make_dataset(
    noise: float,
    samples: int,
    seed: int,
    cells: int = 256,
    *,
    test_fraction: float = 0.2,
    params: DiffusionSorption = DEFAULT_PARAMS,
    times: np.ndarray = PDEBENCH_TIMES,
) -> dict[str, np.ndarray]:
    """Sample ``samples`` distinct space-time grid points of one solution (``u(x, 0) = 0``).

    Targets get additive noise ``d ~ U(-noise, noise)``; the points are split at random into
    train (noisy targets) and test (clean targets) sets. The same seed gives the same arrays.

    Returns float32 arrays: ``points`` [n, 2] (columns x, t), ``targets`` [n, 1] (noisy),
    ``clean_targets`` [n, 1], and ``train_points``, ``train_targets`` (noisy),
    ``test_points``, ``test_targets`` (clean).
    """
    x, t, u = _cached_solution(params, cells, tuple(float(v) for v in times))
    if not 0 < samples <= u.size:
        raise ValueError(f"samples must be in [1, {u.size}], got {samples}")
    rng = np.random.default_rng(seed)
    ti, xi = np.unravel_index(rng.choice(u.size, size=samples, replace=False), u.shape)
    points = np.stack([x[xi], t[ti]], axis=1).astype(np.float32)
    clean = u[ti, xi, None]
    noisy = clean + rng.uniform(-noise, noise, size=clean.shape)
    n_test = int(round(test_fraction * samples))
    # The sample order is already random, so the first n_test points form the test set.
    test, train = slice(0, n_test), slice(n_test, samples)
    clean32, noisy32 = clean.astype(np.float32), noisy.astype(np.float32)
    return {
        "points": points,
        "targets": noisy32,
        "clean_targets": clean32,
        "train_points": points[train],
        "train_targets": noisy32[train],
        "test_points": points[test],
        "test_targets": clean32[test],
    }


def _timed_integrate(cells: int) -> tuple[Solution, float]:
    start = time.perf_counter()
    sol = integrate(cells=cells)
    return sol, time.perf_counter() - start


def _print_runs(grids: tuple[int, ...]) -> None:
    print(
        f"{'cells':>6} {'seconds':>8} {'nfev':>6} {'njev':>5} {'min u,t>0':>10} {'max u':>9} "
        f"{'mass err':>9} {'(floored)':>9} {'erfc err':>9}"
    )
    for n in grids:
        sol, seconds = _timed_integrate(n)
        mb = mass_balance(cells=n)
        print(
            f"{n:>6} {seconds:>8.3f} {sol.nfev:>6} {sol.njev:>5} {sol.u[1:].min():>10.2e} "
            f"{sol.u.max():>9.6f} {mb['relative_error']:>9.2e} "
            f"{mb['relative_error_floored']:>9.2e} {erfc_error(n):>9.2e}"
        )


def _print_refinement(grids: tuple[int, ...]) -> None:
    rows = refinement_errors(grids)
    print(f"\nrefinement at t = 500 against {grids[-1]} cells (averaged onto each grid)")
    print(f"{'cells':>6} {'max diff':>10} {'rms diff':>10} {'ratio':>6} {'order':>6}")
    for prev, row in zip([None, *rows], rows):
        ratio = prev["max"] / row["max"] if prev else float("nan")
        print(
            f"{row['cells']:>6} {row['max']:>10.3e} {row['rms']:>10.3e} {ratio:>6.2f} "
            f"{np.log2(ratio):>6.2f}"
        )


def main(argv: list[str] | None = None) -> None:
    """Print timings, mass balance, erfc and refinement tables (finest grid = ``--cells``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=512, help="finest grid; a power of two")
    parser.add_argument("--levels", type=int, default=4, help="coarser grids (halving each)")
    args = parser.parse_args(argv)
    grids = tuple(args.cells // 2**k for k in range(args.levels, -1, -1))
    print("runs on [0, 500] with 101 output times, u(x, 0) = 0, rtol 1e-6, atol 1e-9")
    print("mass err: exact sorbed amount; (floored): the floor-consistent one; erfc: k = 0")
    _print_runs(grids)
    # A reference 4x finer than every listed grid, so the last ratio is not inflated by the
    # reference's own error.
    _print_refinement((*grids, 4 * args.cells))
    finest = grids[-1]
    tight = solve(cells=finest, rtol=1e-8, atol=1e-11)[2]
    rtol_change = np.abs(tight - solve(cells=finest)[2]).max()
    print(f"\n{finest} cells, max over x and t of the change in u:")
    print(f"  rtol 1e-6 -> 1e-8 (atol 1e-9 -> 1e-11): {rtol_change:.2e}")
    print(f"  u_floor 1e-6 -> 1e-8: {floor_sensitivity(finest):.2e}")


if __name__ == "__main__":
    main()
