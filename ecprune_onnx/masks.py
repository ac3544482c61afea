"""Turn scores into boolean keep-masks: ratio, scope and N:M pattern (METHOD.md, "Choosing
the mask"). Ties are broken by position, so the same scores always give the same mask."""

from __future__ import annotations

import re

import numpy as np

from ecprune_onnx.errors import UsageError

SCOPES = ("global", "layer", "row")


def parse_pattern(text: str | None) -> tuple[int, int] | None:
    """`"2:4"` → (2, 4): keep N of every M consecutive inputs of a row."""
    if text is None:
        return None
    found = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if not found:
        raise UsageError(f"--pattern {text}: expected N:M with whole numbers, e.g. 2:4")
    keep, group = int(found.group(1)), int(found.group(2))
    if group < 1 or keep < 1 or keep > group:
        raise UsageError(f"--pattern {text}: expected 1 <= N <= M, e.g. 2:4")
    return keep, group


def check_ratio(ratio: float) -> float:
    if not 0.0 <= ratio < 1.0 or np.isnan(ratio):
        raise UsageError(f"--ratio {ratio}: expected a fraction in [0, 1), e.g. 0.5")
    return float(ratio)


def choose_masks(
    scores: dict[str, np.ndarray],
    ratio: float,
    scope: str = "global",
    pattern: tuple[int, int] | None = None,
) -> dict[str, np.ndarray]:
    """Keep-masks (True = keep) for every scored layer; the lowest scores are removed.

    With a pattern the ratio is implied (1 - N/M) and `scope` is ignored.
    """
    if pattern is not None:
        return {name: _pattern_mask(name, score, *pattern) for name, score in scores.items()}
    if scope == "global":
        return _global_masks(scores, ratio)
    if scope == "layer":
        return {name: _lowest_removed(score, ratio) for name, score in scores.items()}
    if scope == "row":
        return {name: _row_mask(score, ratio) for name, score in scores.items()}
    raise UsageError(f"--scope {scope}: expected one of {', '.join(SCOPES)}")


def _removal_count(size: int, ratio: float) -> int:
    return int(round(ratio * size))


def _lowest_removed(score: np.ndarray, ratio: float) -> np.ndarray:
    """Remove the `ratio` share of the lowest scores of one array; ties go by position."""
    return _keep_above_lowest([score], _removal_count(score.size, ratio))[0]


def _global_masks(scores: dict[str, np.ndarray], ratio: float) -> dict[str, np.ndarray]:
    """One threshold over all layers: EC scores are all squared output deviations."""
    names = list(scores)
    count = _removal_count(sum(scores[name].size for name in names), ratio)
    return dict(zip(names, _keep_above_lowest([scores[name] for name in names], count)))


def _keep_above_lowest(scores: list[np.ndarray], count: int) -> list[np.ndarray]:
    """Keep-masks that remove the `count` lowest scores of all arrays together; ties at the
    threshold go by position (array by array, then row-major), like a stable sort.

    A partition finds the threshold in linear time (a stable sort of 10^8 scores took 36% of
    a 100M-weight compress, BENCHMARKS.md). It runs in place on the one joined copy, which
    is dropped before the masks are made from the arrays themselves: one float64 copy of
    all scores at a time, not two.
    """
    keep = [np.ones(score.shape, dtype=bool) for score in scores]
    if count == 0:
        return keep
    threshold = _lowest(scores, count)
    ties_left = count
    for mask, score in zip(keep, scores):
        below = score < threshold
        mask[below] = False
        ties_left -= int(below.sum())
    for mask, score in zip(keep, scores):
        if ties_left <= 0:
            break
        ties = np.flatnonzero(score.ravel() == threshold)[:ties_left]
        mask.ravel()[ties] = False
        ties_left -= ties.size
    return keep


def _lowest(scores: list[np.ndarray], count: int) -> float:
    """The `count`-th lowest of all scores, found on a float32 copy (half the memory of a
    float64 one, the peak of a large compress): rounding to float32 keeps the order (x <= y
    gives f(x) <= f(y); past float32's range, to ±inf), so the value sought is among the
    scores that round to the float32 answer, and its rank among them is what the lower ones
    leave."""
    with np.errstate(over="ignore"):  # scores past float32's range round to ±inf: in order
        joined = np.empty(sum(score.size for score in scores), dtype=np.float32)
        start = 0
        for score in scores:
            joined[start : start + score.size] = score.ravel()
            start += score.size
        joined.partition(count - 1)
        rounded = joined[count - 1]
        below = int(np.count_nonzero(joined < rounded))
        del joined
        if np.isnan(rounded):  # NaN scores sort last, as in a float64 partition
            return rounded
        # every score that rounds to `rounded` lies between its float32 neighbours
        low, high = (np.nextafter(rounded, np.float32(side)) for side in (-np.inf, np.inf))
        near = np.concatenate([score[(score >= low) & (score <= high)] for score in scores])
        candidates = near[near.astype(np.float32) == rounded]
    candidates.partition(count - below - 1)
    return candidates[count - below - 1]


def _row_mask(score: np.ndarray, ratio: float) -> np.ndarray:
    """Each output unit (row) loses the same share of its inputs (Wanda's grouping)."""
    order = np.argsort(score, axis=1, kind="stable")
    removed = order[:, : _removal_count(score.shape[1], ratio)]
    keep = np.ones(score.shape, dtype=bool)
    np.put_along_axis(keep, removed, False, axis=1)
    return keep


def _pattern_mask(name: str, score: np.ndarray, keep_count: int, group: int) -> np.ndarray:
    """In every group of `group` consecutive inputs of a row, keep the `keep_count` best."""
    rows, inputs = score.shape
    if inputs % group:
        raise UsageError(
            f"--pattern {keep_count}:{group}: layer '{name}' has {inputs} inputs, "
            f"not a multiple of {group}; exclude it with --exclude or choose another M"
        )
    grouped = score.reshape(rows, inputs // group, group)
    order = np.argsort(grouped, axis=2, kind="stable")
    keep = np.ones(grouped.shape, dtype=bool)
    np.put_along_axis(keep, order[:, :, : group - keep_count], False, axis=2)
    return keep.reshape(rows, inputs)
