"""Large [out, in] arrays a block of rows at a time: a whole-array temporary (an outer
product, a float64 cast, a difference of two weights) would be a second [out, in] array
(400 MB of float64 at 7069 × 7069) beside the sums and weights that are already the
largest arrays held."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

# Rows taken at a time (58 MB of float64 at 7069 columns).
BLOCK_ROWS = 1024
# Elements of one block of `add_outer`'s temporary (8 MiB of float64): it runs beside S1
# and S2 at EC's peak (`scores.floor_sensitivity`), where 58 MB were the peak's last part.
OUTER_ELEMENTS = 1 << 20


def row_blocks(rows: int, block: int | None = None) -> Iterator[slice]:
    """Slices of `block` rows (default BLOCK_ROWS) that cover `rows` rows, in order."""
    block = block or BLOCK_ROWS
    return (slice(start, start + block) for start in range(0, rows, block))


def add_outer(total: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """total += left right^T in place, OUTER_ELEMENTS at a time (each element on its own: the
    same bits whatever the block); returns total."""
    for rows in row_blocks(len(total), max(1, OUTER_ELEMENTS // max(len(right), 1))):
        total[rows] += np.multiply.outer(left[rows], right)
    return total
