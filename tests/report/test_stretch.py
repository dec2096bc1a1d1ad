"""stretch_pair's integer path (value counts, lookup table) equals the plain float formula."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.report.chips import NODATA_RGB, _counted_percentiles, _integer_codes, stretch_pair


def _plain_stretch(before, after, percentiles=(2.0, 98.0)):
    """The stretch as first written: np.percentile, then the float64 formula per pixel."""
    bands = [0, 1, 2] if before.shape[0] >= 3 else [0, 0, 0]
    out = [np.zeros((*image.shape[1:], 3), np.uint8) for image in (before, after)]
    for channel, band in enumerate(bands):
        both = np.concatenate([before[band].ravel(), after[band].ravel()])
        both = both[np.isfinite(both)]
        low, high = np.percentile(both, percentiles) if both.size else (0.0, 1.0)
        span = high - low if high > low else 1.0
        for image, rgb in zip((before, after), out, strict=True):
            scaled = np.clip((image[band] - low) / span, 0.0, 1.0) * 255.0
            rgb[..., channel] = np.nan_to_num(np.round(scaled), nan=0.0)
    for image, rgb in zip((before, after), out, strict=True):
        rgb[~np.isfinite(image[bands]).all(axis=0)] = NODATA_RGB
    return out


@pytest.mark.parametrize("seed", range(40))
def test_stretch_pair_integer_windows_equal_plain_formula(seed):
    """Integer-valued windows (uint8/uint16 ranges, NaN, inf, flat, float64, odd
    percentiles) give the same RGB bytes as np.percentile and the float formula."""
    rng = np.random.default_rng(seed)
    bands, rows, cols = [1, 3, 4][seed % 3], *rng.integers(1, 90, 2)
    top = [2, 256, 10001, 65536][seed % 4]
    dtype = np.float64 if seed % 5 == 0 else np.float32
    before = rng.integers(0, top, (bands, rows, cols)).astype(dtype)
    after = rng.integers(0, top, (bands, rows, cols)).astype(dtype)
    if seed % 6 == 1:
        before[:, : rows // 2] = np.nan
    if seed % 6 == 2:
        after[0, 0, 0], before[-1, -1, -1] = np.inf, -np.inf
    if seed % 6 == 3:
        before[...], after[...] = 7, 7
    if seed % 6 == 4:
        before[...], after[...] = np.nan, np.nan
    percentiles = (2.0, 98.0) if seed % 2 else tuple(sorted(rng.uniform(0, 100, 2)))
    expected = _plain_stretch(before, after, percentiles)
    got = stretch_pair(before, after, percentiles=percentiles)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])


@pytest.mark.parametrize("odd", [0.5, -1.0, 70000.0])
def test_stretch_pair_other_values_take_the_float_path(odd):
    """A fraction, a negative or a value above 65535 is not counted; the result is still the
    plain formula's."""
    rng = np.random.default_rng(3)
    before = rng.integers(0, 256, (3, 20, 30)).astype(np.float32)
    after = rng.integers(0, 256, (3, 20, 30)).astype(np.float32)
    after[1, 5, 5] = odd
    assert _integer_codes(before[1], after[1]) is None
    got = stretch_pair(before, after)
    expected = _plain_stretch(before, after)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])


@pytest.mark.parametrize("seed", range(30))
def test_counted_percentiles_equal_numpy(seed):
    """Percentiles from value counts are np.percentile's numbers, to the last bit."""
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(1, 50000))
    values = rng.integers(0, [3, 256, 65536][seed % 3], n).astype(np.float32)
    values[rng.random(n) < 0.1] = np.nan
    half = n // 2
    codes = _integer_codes(values[:half], values[half:])
    assert codes is not None
    percentiles = (float(rng.uniform(0, 100)), float(rng.uniform(0, 100)))
    finite = values[np.isfinite(values)]
    got = _counted_percentiles(codes, percentiles, np.float32)
    if finite.size:
        expected = np.percentile(finite, percentiles)
        assert got[0] == expected[0] and got[1] == expected[1]
        assert type(got[0]) is type(expected[0])
    else:
        assert got == (0.0, 1.0)


def test_counted_percentiles_refuse_out_of_range():
    """A percentile outside 0..100 raises NumPy's error."""
    codes = _integer_codes(np.ones((2, 2), np.float32), np.ones((2, 2), np.float32))
    with pytest.raises(ValueError, match="Percentiles must be in the range"):
        _counted_percentiles(codes, (-1.0, 98.0), np.float32)
