"""Tests for pipeline.detect.minmax: SciPy's flat min/max filters and top-hats, to the bit."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage import morphology

from pipeline.detect.minmax import disk_tophat, sliding_extreme, square_extreme, square_tophat


def _images(seed, n=30):
    """Random float32 images of many shapes, every third with plateaus (equal values)."""
    rng = np.random.default_rng(seed)
    for trial in range(n):
        shape = tuple(int(k) for k in rng.integers(1, 90, 2))
        image = rng.normal(size=shape).astype(np.float32)
        if trial % 3 == 0:
            image = np.round(image * 2).astype(np.float32)
        yield rng, image


@pytest.mark.parametrize("seed", range(3))
def test_sliding_extreme_equals_scipy(seed):
    """Windows of 1 to 2 x the line's length, both axes, min and max: SciPy's numbers."""
    for rng, image in _images(seed):
        size = 2 * int(rng.integers(0, max(image.shape) + 2)) + 1
        for axis in (0, 1):
            for low, line in ((True, ndi.minimum_filter1d), (False, ndi.maximum_filter1d)):
                got = sliding_extreme(image, size, axis=axis, low=low)
                assert got.dtype == image.dtype
                np.testing.assert_array_equal(got, line(image, size, axis=axis))
    with pytest.raises(ValueError, match="odd size"):
        sliding_extreme(image, 4, axis=0, low=True)


@pytest.mark.parametrize("seed", range(3))
def test_square_filters_and_tophats_equal_scipy(seed):
    """Square minimum, maximum, white and black top-hats: SciPy's numbers, edges included."""
    for rng, image in _images(seed):
        size = 2 * int(rng.integers(0, 14)) + 1
        np.testing.assert_array_equal(square_extreme(image, size, low=True),
                                      ndi.minimum_filter(image, size=size))
        np.testing.assert_array_equal(square_extreme(image, size, low=False),
                                      ndi.maximum_filter(image, size=size))
        np.testing.assert_array_equal(square_tophat(image, size, white=True),
                                      ndi.white_tophat(image, size=(size, size)))
        np.testing.assert_array_equal(square_tophat(image, size, white=False),
                                      ndi.black_tophat(image, size=(size, size)))


@pytest.mark.parametrize("seed", range(3))
def test_disk_tophat_equals_scipy(seed):
    """Disk top-hats built from runs give SciPy's footprint filter's numbers."""
    for rng, image in _images(seed):
        radius = int(rng.integers(1, 9))
        for white, tophat in ((True, ndi.white_tophat), (False, ndi.black_tophat)):
            expected = tophat(image, footprint=morphology.disk(radius))
            got = disk_tophat(image, radius, white=white)
            assert got.dtype == expected.dtype
            np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("seed", range(4))
def test_binary_opening_equals_scipy(seed):
    """The shifted-copy opening gives SciPy's booleans, borders and long footprints included."""
    from scipy import ndimage as ndi

    from pipeline.detect.lines import line_footprint
    from pipeline.detect.minmax import binary_opening

    rng = np.random.default_rng(seed)
    kept = 0
    for _ in range(40):
        shape = tuple(int(n) for n in rng.integers(1, 90, 2))
        mask = rng.random(shape) < rng.uniform(0.3, 0.97)
        footprint = line_footprint(int(rng.integers(3, 70)), float(rng.uniform(0, 360)))
        if rng.random() < 0.3:  # any odd footprint
            footprint = rng.random((2 * int(rng.integers(0, 4)) + 1,) * 2) < 0.5
        expected = ndi.binary_opening(mask, structure=footprint)
        np.testing.assert_array_equal(binary_opening(mask, footprint), expected)
        kept += int(expected.sum())
    assert kept > 0


@pytest.mark.parametrize("seed", range(3))
def test_binary_dilation_equals_scipy(seed):
    """The shifted-copy dilation (default cross, or a line) gives SciPy's booleans."""
    from scipy import ndimage as ndi

    from pipeline.detect.lines import line_footprint
    from pipeline.detect.minmax import binary_dilation

    rng = np.random.default_rng(seed)
    for _ in range(30):
        shape = tuple(int(n) for n in rng.integers(1, 80, 2))
        mask = rng.random(shape) < rng.uniform(0.01, 0.5)
        np.testing.assert_array_equal(binary_dilation(mask), ndi.binary_dilation(mask))
        footprint = line_footprint(int(rng.integers(3, 30)), float(rng.uniform(0, 360)))
        h, w = footprint.shape
        offsets = [(int(r) - h // 2, int(c) - w // 2) for r, c in zip(*np.nonzero(footprint),
                                                                      strict=True)]
        np.testing.assert_array_equal(binary_dilation(mask, offsets),
                                      ndi.binary_dilation(mask, structure=footprint))
