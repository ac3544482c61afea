import numpy as np
import pytest
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
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(blockwise, "OUTER_ELEMENTS", block * cols)  # `block` rows at a time
        result = blockwise.add_outer(total, left, right)
    assert result is total
    np.testing.assert_array_equal(total, expected)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 6),
    m=st.integers(1, 9),
    n=st.integers(1, 7),
    elements=st.integers(1, 40),
    seed=st.integers(0, 99),
)
def test_products_in_blocks_are_the_whole_products(rows, m, n, elements, seed):
    # blocks that divide neither side evenly (and blocks of one element) cover every entry
    # once; a^T a comes out symmetric to the bit, as numpy's whole syrk does
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(rows, m)), rng.normal(size=(rows, n))
    start_ab, start_aa = rng.normal(size=(m, n)), rng.normal(size=(m, m))
    start_aa = start_aa + start_aa.T
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(blockwise, "PRODUCT_ELEMENTS", elements)
        product = blockwise.add_product(start_ab.copy(), a, b)
        gram = blockwise.add_gram(start_aa.copy(), a)
    np.testing.assert_allclose(product, start_ab + a.T @ b, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gram, start_aa + a.T @ a, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(gram, gram.T)
