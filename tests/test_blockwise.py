import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ecprune_onnx import blockwise


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 9), cols=st.integers(1, 5), block=st.integers(1, 4), seed=st.integers(0, 99)
)
def test_add_outer_in_blocks_is_the_whole_outer_product(rows, cols, block, seed):
    # blocks of rows that do not divide the rows evenly must still cover every row once
    rng = np.random.default_rng(seed)
    total = rng.normal(size=(rows, cols))
    left, right = rng.normal(size=rows), rng.normal(size=cols)
    expected = total + np.outer(left, right)
    saved, blockwise.BLOCK_ROWS = blockwise.BLOCK_ROWS, block
    try:
        result = blockwise.add_outer(total, left, right)
    finally:
        blockwise.BLOCK_ROWS = saved
    assert result is total
    np.testing.assert_array_equal(total, expected)
