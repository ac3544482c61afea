"""Smoke test of benchmarks/perf.py: the --quick cases run and every number is positive."""

from __future__ import annotations

import math

import pytest

from benchmarks import perf


def test_quick_run_reports_every_case(capsys):
    results = perf.main(["--quick"])
    printed = capsys.readouterr().out

    expected = {
        (size, rows, outputs)
        for size in perf.QUICK["sizes"]
        for rows in perf.QUICK["rows"]
        for outputs in perf.QUICK["outputs"]
    }
    assert {(r.case.params, r.case.rows, r.case.outputs) for r in results} == expected
    for result in results:
        assert result.status == "ok", result.status
        for value in (
            result.compress_s,
            result.ort_s,
            result.peak_rss_gib,
            result.method_flops,
            result.ort_rate,
            result.ratio,
        ):
            assert math.isfinite(value) and value > 0
        assert result.stages["statistics"]["seconds"] > 0

    table_rows = [
        line for line in printed.splitlines() if line.startswith("| ") and "| ok |" in line
    ]
    assert len(table_rows) == len(expected)
    fits = perf.exponents(results)
    assert [fit[0] for fit in fits] == ["rows"]
    assert all(math.isfinite(total) and math.isfinite(loop) for _, _, total, loop in fits)


def test_exponents_fit_rows_and_parameters():
    """Compress time ∝ rows × parameters gives exponent 1 in both, for the whole run and
    for the batch loop."""
    results = []
    for params in (1e6, 1e7):
        for rows in (256, 1024):
            result = perf.Result(case=perf.Case(params, rows, 10), weights=int(params))
            result.compress_s = 1e-9 * rows * params
            result.stages = {perf.STREAM: {"seconds": 0.5e-9 * rows * params}}
            results.append(result)
    fits = perf.exponents(results)
    assert {fit[0] for fit in fits} == {"rows", "parameters"}
    for _, _, total, loop in fits:
        assert total == pytest.approx(1.0) and loop == pytest.approx(1.0)


def test_hidden_width_matches_the_requested_size():
    for params, outputs in ((1e6, 10), (1e7, 1000), (1e8, 10)):
        width = perf.hidden_width(params, outputs)
        assert abs(2 * width * width + outputs * width - params) / params < 2e-3


def test_fit_exponent_recovers_a_power_law():
    xs = [256, 1024, 4096]
    assert perf.fit_exponent(xs, [3 * x**1.5 for x in xs]) == pytest.approx(1.5, rel=1e-9)


def test_marginal_cost_cancels_the_fixed_costs():
    """Compress time = 5 s fixed + 1.2 × F/R: the marginal cost of rows is 1.2 whatever the
    fixed part, and the batch loop's ratio is read from its stage."""
    results = []
    for rows in (1024, 4096):
        result = perf.Result(case=perf.Case(1e7, rows, 10), weights=10**7, probes=10)
        result.ort_s = 2.0 * rows * 1e7 / 100e9  # onnxruntime at 100 GFLOP/s
        ideal = result.method_flops / result.ort_rate
        result.compress_s = 5.0 + 1.2 * ideal
        result.stages = {perf.STREAM: {"seconds": 0.9 * ideal}}
        results.append(result)

    assert perf.marginal_costs(results) == [("10M/10", 1024, 4096, pytest.approx(1.2))]
    table = perf.time_targets_table(results)
    assert "| 10M/4096/10 |" in table and "| 0.90 |" in table
