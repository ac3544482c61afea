"""budget.py: layer budgets from measured damage curves."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ecprune_onnx.budget import allocate, curve_counts, measured_masks


def interpolated(curve: tuple[np.ndarray, np.ndarray], count: int) -> float:
    return float(np.interp(count, *curve))


@st.composite
def convex_curves(draw):
    """Two or three layers' damage curves: convex, rising, starting at (0, 0)."""
    curves = {}
    for layer in range(draw(st.integers(2, 3))):
        size = draw(st.integers(2, 12))
        slopes = sorted(draw(st.lists(st.floats(0, 10), min_size=size, max_size=size)))
        damage = np.concatenate([[0.0], np.cumsum(slopes)])
        curves[f"layer{layer}"] = (np.arange(size + 1), damage)
    return curves


@settings(max_examples=60, deadline=None)
@given(convex_curves(), st.floats(0, 1))
def test_allocation_is_the_cheapest_split_of_convex_curves(curves, share):
    total = int(share * sum(points[-1] for points, _ in curves.values()))
    counts = allocate(curves, total)
    assert sum(counts.values()) == total
    cost = sum(interpolated(curves[name], count) for name, count in counts.items())
    ranges = [range(points[-1] + 1) for points, _ in curves.values()]
    best = min(
        sum(interpolated(curve, count) for curve, count in zip(curves.values(), split))
        for split in itertools.product(*ranges)
        if sum(split) == total
    )
    assert cost == pytest.approx(best, abs=1e-9)


def test_allocation_follows_the_hull_past_a_bump():
    """A layer whose damage jumps at 2 removals and then stays flat is worth emptying to 4
    before the other layer's steady cost: its hull is cheaper from the start."""
    bumpy = (np.array([0, 2, 4]), np.array([0.0, 5.0, 5.0]))
    steady = (np.array([0, 4]), np.array([0.0, 8.0]))
    assert allocate({"bumpy": bumpy, "steady": steady}, 4) == {"bumpy": 4, "steady": 0}


def test_curve_counts_start_after_earlier_removals():
    counts = curve_counts(100, gone=50)
    assert counts[0] == 50 and counts[-1] == 98
    assert (np.diff(counts) > 0).all()


def test_masks_remove_each_layers_lowest_scores_in_the_measured_shares():
    rng = np.random.default_rng(0)
    scores = {"cheap": rng.random((4, 10)), "costly": rng.random((4, 10))}
    scores["cheap"][0, :3] = -np.inf  # removed in an earlier round
    cost = {"cheap": 1.0, "costly": 100.0}

    def damage(name, keep):
        return cost[name] * float((~keep).sum()) ** 2

    masks = measured_masks(scores, 0.5, damage)
    removed = {name: int((~keep).sum()) for name, keep in masks.items()}
    assert sum(removed.values()) == 40
    assert removed["cheap"] > removed["costly"]
    for name, keep in masks.items():
        kept, gone = scores[name][keep], scores[name][~keep]
        assert gone.max() <= kept.min()  # the lowest scores go first
    assert not masks["cheap"][0, :3].any()  # earlier removals stay removed


def test_nothing_is_measured_where_there_is_nothing_to_share():
    def damage(name, keep):
        raise AssertionError("measured")

    scores = {"only": np.arange(10.0).reshape(2, 5)}
    masks = measured_masks(scores, 0.3, damage)
    assert masks["only"].sum() == 7 and not masks["only"].flat[:3].any()
    two = {"a": np.ones((2, 2)), "b": np.ones((2, 2))}
    assert all(keep.all() for keep in measured_masks(two, 0.0, damage).values())
