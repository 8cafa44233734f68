"""Float64 row sums in NumPy's order of additions, on any device."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_normcheck.core.measure.rowsums import float64_row_sums, numpy_order_row_sums


@pytest.mark.parametrize(
    "length", [1, 7, 8, 9, 127, 128, 129, 1000, 8191, 8192, 8193, 3 * 8192, 20001, 123457]
)
def test_torch_additions_are_numpys_bit_for_bit(length):
    rng = np.random.default_rng(length)
    # Probabilities over many magnitudes (sigmoid of wide logits), where the order shows most.
    rows = (1 / (1 + np.exp(-rng.normal(0, 20, size=(3, length))))).astype(np.float32)
    expected = rows.sum(axis=1, dtype=np.float64)
    got = numpy_order_row_sums(torch.from_numpy(rows))
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(float64_row_sums(torch.from_numpy(rows)), expected)
    np.testing.assert_array_equal(float64_row_sums(rows), expected)


def test_the_order_matters_so_the_test_can_fail():
    """Torch's own float64 sum of the same rows differs from NumPy's in the last bits."""
    rng = np.random.default_rng(0)
    rows = (1 / (1 + np.exp(-rng.normal(0, 20, size=(4, 2**20 + 5))))).astype(np.float32)
    expected = rows.sum(axis=1, dtype=np.float64)
    own = torch.from_numpy(rows).sum(dim=1, dtype=torch.float64).numpy()
    assert not np.array_equal(own, expected)
    np.testing.assert_array_equal(numpy_order_row_sums(torch.from_numpy(rows)), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_sums_are_numpys():
    rng = np.random.default_rng(1)
    rows = rng.random((2, 5 * 8192 + 77), dtype=np.float32)
    got = float64_row_sums(torch.from_numpy(rows).cuda())
    np.testing.assert_array_equal(got, rows.sum(axis=1, dtype=np.float64))
