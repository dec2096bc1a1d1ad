"""Tests for pipeline.core.quantiles: NumPy's 'linear' quantiles from one sort."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from pipeline.core.quantiles import sorted_quantiles

LEVELS = np.linspace(0.0, 1.0, 1024)


def _values(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "float":
        return rng.normal(100.0, 30.0, n)
    if kind == "integer":  # many ties, as in 8-bit imagery
        return rng.integers(0, 256, n).astype(np.float64)
    if kind == "few":  # a handful of distinct values
        return rng.choice([-3.5, 0.0, 7.25], n)
    return rng.normal(0.0, 1.0, n).astype(np.float32)


@pytest.mark.parametrize("kind", ["float", "integer", "few", "float32"])
@pytest.mark.parametrize("n", [1, 2, 3, 1000, 65_537])
def test_sorted_quantiles_equal_numpy_to_the_bit(kind, n):
    values = _values(kind, n, np.random.default_rng(n))
    for levels in (LEVELS, np.array([0.0, 0.02, 0.5, 0.98, 1.0]), np.array([0.3])):
        got = sorted_quantiles(values, levels)
        want = np.quantile(values, levels)
        assert got.dtype == want.dtype
        assert_array_equal(got, want)


def test_sorted_quantiles_leave_the_input_unsorted():
    values = np.array([3.0, 1.0, 2.0])
    assert sorted_quantiles(values, np.array([0.5]))[0] == 2.0
    assert_array_equal(values, [3.0, 1.0, 2.0])


def test_sorted_quantiles_of_nothing_raise_as_numpy_does():
    with pytest.raises(IndexError):
        np.quantile(np.zeros(0), LEVELS)
    with pytest.raises(IndexError):
        sorted_quantiles(np.zeros(0), LEVELS)


def test_sorted_quantiles_with_both_zeros_equal_numpy_as_numbers():
    """With 0.0 and -0.0 among the values a sort and a partition may order them differently:
    a zero result may differ in sign only, never in value."""
    rng = np.random.default_rng(5)
    values = np.concatenate([np.zeros(400), -np.zeros(400), rng.normal(0.0, 1.0, 201)])
    rng.shuffle(values)
    got, want = sorted_quantiles(values, LEVELS), np.quantile(values, LEVELS)
    assert (got == want).all()
    assert (got[np.signbit(got) != np.signbit(want)] == 0).all()
