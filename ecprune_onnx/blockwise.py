"""In-place updates of large [out, in] float64 sums a block of rows at a time: the whole
outer product at once would be a second [out, in] float64 array (400 MB at 7069 × 7069)
beside sums that are already the largest arrays held."""

from __future__ import annotations

import numpy as np

# Rows of the outer product made at a time (58 MB of float64 at 7069 columns).
BLOCK_ROWS = 1024


def add_outer(total: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """total += left right^T in place; returns total."""
    for start in range(0, len(total), BLOCK_ROWS):
        rows = slice(start, start + BLOCK_ROWS)
        total[rows] += np.multiply.outer(left[rows], right)
    return total
