"""Masks: the requested share removed per scope, N:M groups, deterministic ties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ecprune_onnx import masks
from ecprune_onnx.errors import UsageError
from ecprune_onnx.masks import choose_masks, parse_pattern


def _scores(seed, shapes):
    rng = np.random.default_rng(seed)
    return {f"layer{i}": rng.random(shape) for i, shape in enumerate(shapes)}


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 1000),
    ratio=st.floats(0, 0.99),
    shapes=st.lists(st.tuples(st.integers(1, 9), st.integers(1, 9)), min_size=1, max_size=4),
)
def test_each_scope_removes_the_requested_share(seed, ratio, shapes):
    scores = _scores(seed, shapes)
    total = sum(s.size for s in scores.values())
    masks = choose_masks(scores, ratio, "global")
    assert sum((~m).sum() for m in masks.values()) == round(ratio * total)
    for mask in choose_masks(scores, ratio, "layer").values():
        assert (~mask).sum() == round(ratio * mask.size)
    for mask in choose_masks(scores, ratio, "row").values():
        assert np.all((~mask).sum(axis=1) == round(ratio * mask.shape[1]))


def test_global_removes_the_lowest_scores_across_layers():
    scores = {"a": np.array([[0.1, 5.0]]), "b": np.array([[0.2, 0.3, 9.0]])}
    masks = choose_masks(scores, 0.6, "global")
    assert masks["a"].tolist() == [[False, True]]
    assert masks["b"].tolist() == [[False, False, True]]


def test_ties_are_broken_by_position():
    scores = {"a": np.zeros((2, 4))}
    first = choose_masks(scores, 0.5, "global")["a"]
    assert first.ravel().tolist() == [False] * 4 + [True] * 4
    assert np.array_equal(first, choose_masks(scores, 0.5, "global")["a"])


def test_pattern_keeps_n_best_of_every_m():
    score = np.array([[4.0, 1.0, 3.0, 2.0, 0.0, 9.0, 8.0, 7.0]])
    mask = choose_masks({"a": score}, 0.0, pattern=(2, 4))["a"]
    assert mask.tolist() == [[True, False, True, False, False, True, True, False]]


def test_pattern_rejects_inputs_not_a_multiple_of_m():
    with pytest.raises(UsageError, match="'a' has 6 inputs"):
        choose_masks({"a": np.ones((2, 6))}, 0.0, pattern=(2, 4))


@pytest.mark.parametrize("text", ["2-4", "a:b", "0:4", "5:4", "2:0", ""])
def test_malformed_or_impossible_patterns_are_refused(text):
    with pytest.raises(UsageError, match="--pattern"):
        parse_pattern(text)


@settings(max_examples=60, deadline=None)
@given(
    scores=st.lists(st.sampled_from([-np.inf, 0.0, 0.5, 1.0, 2.0]), min_size=1, max_size=40),
    ratio=st.floats(0, 0.99),
)
def test_the_threshold_removes_what_a_stable_sort_would(scores, ratio):
    # many ties on purpose: the partition must break them by position like a stable sort
    score = np.array(scores)
    count = round(ratio * score.size)
    expected = np.ones(score.size, dtype=bool)
    expected[np.argsort(score, kind="stable")[:count]] = False
    got = choose_masks({"a": score.reshape(1, -1)}, ratio, "global")["a"].ravel()
    assert np.array_equal(got, expected)


@settings(max_examples=60, deadline=None)
@given(
    # offsets far below float32's resolution at 1.0: many scores round to the same float32
    steps=st.lists(st.integers(-3, 3), min_size=2, max_size=60),
    split=st.integers(1, 59),
    ratio=st.floats(0, 0.99),
)
def test_float64_scores_that_float32_cannot_tell_apart_are_still_ranked_exactly(
    steps, split, ratio
):
    score = 1.0 + np.array(steps, dtype=np.float64) * 1e-12
    score[::5] = 1.0 + np.arange(len(score[::5])) * 0.25  # and some that float32 can
    split = min(split, len(score) - 1)
    layers = {"a": score[:split].reshape(1, -1), "b": score[split:].reshape(1, -1)}
    count = round(ratio * score.size)
    expected = np.ones(score.size, dtype=bool)
    expected[np.argsort(score, kind="stable")[:count]] = False
    masks = choose_masks(layers, ratio, "global")
    assert np.array_equal(np.concatenate([masks["a"].ravel(), masks["b"].ravel()]), expected)


def test_scores_past_float32s_range_are_ranked_exactly_and_quietly():
    import warnings

    score = np.array([[1e300, -1e300, 3.4028236e38, 1.0, np.inf, 2e300]])
    expected_order = np.argsort(score.ravel(), kind="stable")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the float32 copy overflows to ±inf on purpose
        for count in range(1, score.size):
            mask = choose_masks({"a": score}, count / score.size, "global")["a"].ravel()
            assert set(np.flatnonzero(~mask)) == set(expected_order[:count])


SPECIAL = [-np.inf, -1.0, 0.0, 0.5, 1.0, 1.0 + 1e-12, 2.0, 3.4028236e38, np.inf, np.nan]


@settings(max_examples=120, deadline=None)
@given(
    values=st.lists(st.sampled_from(SPECIAL) | st.floats(allow_nan=True), min_size=1, max_size=120),
    split=st.integers(0, 120),
    position=st.floats(0, 1),
    sample=st.sampled_from([1, 2, 8]),
)
def test_the_sampled_threshold_is_the_exact_count_th_lowest(values, split, position, sample):
    # a tiny SAMPLE_SIZE sends small arrays through the sampled bracket, and its misses
    # (ties, NaN, ±inf at the edges) through the fallback: both must give numpy's answer
    joined = np.array(values, dtype=np.float64)
    split = min(split, joined.size)
    arrays = [part.reshape(1, -1) for part in (joined[:split], joined[split:]) if part.size]
    count = 1 + int(position * (joined.size - 1))
    expected = np.sort(joined)[count - 1]  # NaN sorts last
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(masks, "SAMPLE_SIZE", sample)
        got = masks._lowest(arrays, count)
    assert got == expected or (np.isnan(got) and np.isnan(expected))


def test_the_sampled_threshold_copies_no_scores_when_the_sample_is_representative(
    sampled_threshold,
):
    sampled_threshold()
    rng = np.random.default_rng(7)
    arrays = [rng.random((300, 170)), rng.exponential(size=(120, 333)), np.zeros((40, 41))]
    joined = np.sort(np.concatenate([a.ravel() for a in arrays]))
    for count in (1, 777, joined.size // 2, joined.size - 1, joined.size):
        assert masks._lowest(arrays, count) == joined[count - 1]


def test_ties_at_the_bracket_ends_are_counted_not_gathered(sampled_threshold):
    # a later round of --steps: the weights removed before score -inf, dead units score 0
    sampled_threshold()
    rng = np.random.default_rng(8)
    score = rng.random(40_000)
    score[:24_000] = -np.inf
    score[24_000:30_000] = 0.0
    rng.shuffle(score)
    below, at_low, inside, at_high = masks._split([score], -np.inf, 0.0)
    assert (below, at_low, inside.size, at_high) == (0, 24_000, 0, 6_000)
    ordered = np.sort(score)
    for count in (1, 24_000, 24_001, 30_000, 30_001, 31_000):
        assert masks._lowest([score.reshape(200, 200)], count) == ordered[count - 1]
