"""Large [out, in] arrays a block of rows at a time: a whole-array temporary (an outer
product, a float64 cast, a difference of two weights) would be a second [out, in] array
(400 MB of float64 at 7069 × 7069) beside the sums and weights that are already the
largest arrays held."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

# Rows taken at a time (58 MB of float64 at 7069 columns).
BLOCK_ROWS = 1024
# Elements of one block of `add_outer`'s temporary (8 MiB of float64): it runs beside S1
# and S2 at EC's peak (`scores.floor_sensitivity`), where 58 MB were the peak's last part.
OUTER_ELEMENTS = 1 << 20
# Elements of one block of a product added to a sum (`add_product`, `add_gram`): 8 MiB of
# float32. The whole product of a 1024-row chunk at 7069 inputs was a 190 MB temporary, at
# ecr's peak in the layer-input passes beside C_pp and W C_op.
PRODUCT_ELEMENTS = 1 << 21


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


def add_product(total: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """total += a^T b in place, for a [rows, m] and b [rows, n], PRODUCT_ELEMENTS of the
    product at a time (a block of total's rows); returns total."""
    for rows in row_blocks(len(total), max(1, PRODUCT_ELEMENTS // max(total.shape[1], 1))):
        total[rows] += a[:, rows].T @ b
    return total


def add_gram(total: np.ndarray, a: np.ndarray) -> np.ndarray:
    """total += a^T a in place, in square blocks of PRODUCT_ELEMENTS: numpy's syrk on the
    diagonal blocks, one GEMM for each pair above it, added to both sides. The same
    multiply-adds as one syrk (half a GEMM's), and a symmetric result; returns total."""
    blocks = list(row_blocks(a.shape[1], max(1, math.isqrt(PRODUCT_ELEMENTS))))
    for index, rows in enumerate(blocks):
        left = a[:, rows]
        total[rows, rows] += left.T @ left
        for columns in blocks[index + 1 :]:
            product = left.T @ a[:, columns]
            total[rows, columns] += product
            total[columns, rows] += product.T
    return total
