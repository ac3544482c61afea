"""Turn scores into boolean keep-masks: ratio, scope and N:M pattern (docs/method.md, "Choosing
the mask"). Ties are broken by position, so the same scores always give the same mask."""

from __future__ import annotations

import re

import numpy as np

from ecprune_onnx.errors import UsageError
from ecprune_onnx.options import SCOPES

# Scores sampled to bracket the global threshold (_lowest); fewer than 4x this are
# partitioned whole.
SAMPLE_SIZE = 1 << 16


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

    The threshold is found in linear time (a stable sort of 10^8 scores took 36% of a
    100M-weight compress, BENCHMARKS.md), without a copy of all scores (`_lowest`).
    """
    if count == 0:
        return [np.ones(score.shape, dtype=bool) for score in scores]
    threshold = _lowest(scores, count)
    ties_left = count
    keep = []
    for score in scores:
        # written into the mask itself: a comparison's own result is one more bool array
        mask = np.less(score, threshold, out=np.empty(score.shape, dtype=bool))
        ties_left -= int(np.count_nonzero(mask))
        keep.append(np.logical_not(mask, out=mask))
    for mask, score in zip(keep, scores):
        if ties_left <= 0:
            break
        ties = np.flatnonzero(score.ravel() == threshold)[:ties_left]
        mask.ravel()[ties] = False
        ties_left -= ties.size
    return keep


def _lowest(scores: list[np.ndarray], count: int) -> float:
    """The `count`-th lowest of all scores (NaN sorts last), without a copy of them all.

    A strided sample of about SAMPLE_SIZE scores brackets the value; one pass over the
    scores, a block at a time, counts those below the bracket and at its ends and gathers
    those inside it, and the value is found exactly among the few gathered. Where the
    bracket misses (a sample that does not look like the whole, NaN at the threshold),
    `_lowest_by_copy`.
    At 10^8 scores 0.15 s against 1.3 s for the copy (its fresh pages fault in), and no
    float32 copy of all scores: 4 bytes per weight less at the peak of a large compress.
    """
    total = sum(score.size for score in scores)
    if total <= 4 * SAMPLE_SIZE:
        return _lowest_by_copy(scores, count)
    low, high = _bracket(scores, count / total, max(1, total // SAMPLE_SIZE))
    below, at_low, inside, at_high = _split(scores, low, high)
    rank = count - 1 - below  # 0-based rank of the value sought among those >= low
    if 0 <= rank < at_low:
        return low
    rank -= at_low
    if 0 <= rank < inside.size:
        inside.partition(rank)
        return inside[rank]
    if 0 <= rank - inside.size < at_high:
        return high
    return _lowest_by_copy(scores, count)


def _split(scores: list[np.ndarray], low: float, high: float):
    """How many scores lie below `low`, equal `low`, equal `high` (when above `low`), and
    the scores strictly between, gathered. Ties at the ends are counted, not gathered: the
    -inf of weights removed in earlier rounds, or the zeros of dead units, can be most of
    the scores."""
    below = at_low = at_high = 0
    inside = []
    for block in _blocks(scores):
        below += int(np.count_nonzero(block < low))
        at_low += int(np.count_nonzero(block == low))
        if high > low:
            at_high += int(np.count_nonzero(block == high))
        inside.append(block[(block > low) & (block < high)])
    return below, at_low, np.concatenate(inside), at_high


def _bracket(scores: list[np.ndarray], share: float, stride: int) -> tuple[float, float]:
    """Sample values around the `share` quantile, far enough apart (8 standard deviations of
    a sampled rank) that the true quantile lies between them unless the sample misleads."""
    sample = np.sort(np.concatenate([score.reshape(-1)[::stride] for score in scores]))
    rank = share * sample.size
    margin = 8.0 * np.sqrt(sample.size * share * (1.0 - share)) + 2.0
    low_rank, high_rank = int(np.floor(rank - margin)), int(np.ceil(rank + margin))
    low = sample[low_rank] if low_rank >= 0 else -np.inf
    high = sample[high_rank] if high_rank < sample.size else np.inf
    return low, high


def _blocks(scores: list[np.ndarray]):
    """Every score, in flat blocks of at most SAMPLE_SIZE * 16 elements: views of each array
    (a non-contiguous one is flattened into a copy first)."""
    step = SAMPLE_SIZE * 16
    for score in scores:
        flat = score.reshape(-1)
        for start in range(0, flat.size, step):
            yield flat[start : start + step]


def _lowest_by_copy(scores: list[np.ndarray], count: int) -> float:
    """`_lowest` by partitioning a float32 copy of all scores (half the memory of a float64
    one): rounding to float32 keeps the order (x <= y gives f(x) <= f(y); past float32's
    range, to ±inf), so the value sought is among the scores that round to the float32
    answer, and its rank among them is what the lower ones leave."""
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
