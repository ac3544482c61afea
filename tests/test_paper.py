"""The paper-reproduction benchmark: its quick run end to end, and the non-linear baseline."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from scipy.optimize import minimize_scalar

from benchmarks import paper, tasks
from benchmarks.nonlinear import nonlinear_scores
from ecprune_onnx.layers import find_dense_layers

REPOSITORY = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_mlp(tmp_path_factory):
    """A random 5-7-6-3 tanh MLP exported to ONNX, and 40 calibration rows."""
    torch.manual_seed(0)
    model = tasks.MLP([5, 7, 6, 3]).eval()
    path = tmp_path_factory.mktemp("nonlinear") / "mlp.onnx"
    tasks.export_onnx(model, path)
    x = np.random.default_rng(1).normal(size=(40, 5)).astype(np.float32)
    return path, x, find_dense_layers(onnx.load(str(path))).layers


def _activations(layers, x: np.ndarray) -> list[np.ndarray]:
    """Input of every dense layer on the calibration rows (tanh between the layers)."""
    a, inputs = x.astype(np.float64), []
    for layer in layers:
        inputs.append(a)
        a = np.tanh(a @ layer.weight.T + layer.bias)
    return inputs


def test_nonlinear_equals_ec_on_the_linear_last_layer(tiny_mlp):
    # y = W a + b on the last layer: removing w_ij and shifting b_i moves output i by
    # δ - w_ij a_j(r) and nothing else, so c_i(r) = 1, S0 = rows, and the true damage is
    # exactly the EC parabola: its minimum w²(S2 - S1²/S0) at δ = w S1 / S0.
    path, x, layers = tiny_mlp
    scores = nonlinear_scores(path, x)
    last = layers[-1]
    a = _activations(layers, x)[-1]
    s0, s1, s2 = len(a), a.sum(axis=0)[None, :], (a * a).sum(axis=0)[None, :]
    ec = last.weight**2 * (s2 - s1**2 / s0)
    np.testing.assert_allclose(scores.importance[last.name], ec, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(scores.shift[last.name], last.weight * s1 / s0, atol=1e-12)


def test_nonlinear_matches_a_brute_force_minimisation_on_a_hidden_layer(tiny_mlp):
    path, x, layers = tiny_mlp
    scores = nonlinear_scores(path, x)

    def outputs(weights, biases):
        a = x.astype(np.float64)
        for k, (w, b) in enumerate(zip(weights, biases)):
            a = a @ w.T + b
            a = np.tanh(a) if k < len(weights) - 1 else a
        return a

    weights, biases = [lay.weight for lay in layers], [lay.bias for lay in layers]
    y0 = outputs(weights, biases)
    for i, j in [(0, 0), (3, 4), (6, 2)]:

        def damage(delta, i=i, j=j):
            w = [m.copy() for m in weights]
            b = [v.copy() for v in biases]
            w[0][i, j], b[0][i] = 0.0, b[0][i] + delta
            return float(np.square(outputs(w, b) - y0).sum())

        best = minimize_scalar(damage, bracket=(-1.0, 1.0), tol=1e-12)
        name = layers[0].name
        assert scores.importance[name][i, j] == pytest.approx(best.fun, rel=1e-8, abs=1e-14)
        assert scores.shift[name][i, j] == pytest.approx(best.x, abs=1e-6)


def test_dense_width_matches_the_weight_budget():
    sizes = [64, 64, 64, 10]
    total = tasks.dense_weight_count(sizes)
    for ratio in paper.RATIOS:
        width = paper.dense_width(sizes, (1 - ratio) * total)
        kept = tasks.dense_weight_count([64, width, width, 10])
        assert abs(kept - (1 - ratio) * total) <= 2 * 64 + 10 + 2 * width + 1


def _git_status() -> str:
    completed = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
    )
    return completed.stdout if completed.returncode == 0 else "no git checkout"


def test_quick_run_writes_figures_and_tables_with_every_method(capsys):
    # Without --out: the quick run must go to a temporary folder, never over the committed
    # figures of the full run, and leave nothing behind in the checkout.
    before = _git_status()
    assert paper.main(["--quick"]) == 0
    assert _git_status() == before
    tmp_path = Path(capsys.readouterr().out.split("wrote ")[-1].rsplit(" in ", 1)[0])
    assert REPOSITORY not in tmp_path.resolve().parents
    results = json.loads((tmp_path / "paper_results.json").read_text())
    assert {row["method"] for row in results["rows"]} == {*paper.METHODS, paper.UNPRUNED}
    tables = (tmp_path / "paper_tables.md").read_text()
    for method in paper.METHODS:
        assert f"| {method} |" in tables, method
    pngs = sorted(tmp_path.glob("*.png"))
    assert len(pngs) == 2
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size < 200_000
    for row in results["rows"]:
        assert np.isfinite(row["loss"]) and np.isfinite(row["loss_ft"])
