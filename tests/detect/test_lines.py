"""Tests of pipeline.detect.lines' Hough accumulator and greedy line reading."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage import draw

from pipeline.detect.lines import (
    _Accumulator,
    _vote_index,
    along_lines,
    greedy_hough,
    line_footprint,
)


def test_accumulator_argmax_is_numpy_argmax_through_adds_and_withdrawals() -> None:
    rng = np.random.default_rng(11)
    acc = _Accumulator(3 * _Accumulator.BLOCK + 123)  # a partial last block
    dense = np.zeros(acc.size, np.int64)
    for step in range(300):
        index = rng.integers(0, acc.size, int(rng.integers(0, 400)))
        if step % 3 == 2:  # withdraw votes that were cast (never below 0)
            index = np.repeat(np.flatnonzero(dense), dense[dense > 0])
            index = rng.permutation(index)[: len(index) // 2]
            acc.add(index, sign=-1)
            np.subtract.at(dense, index, 1)
        else:
            acc.add(index)
            np.add.at(dense, index, 1)
        np.testing.assert_array_equal(acc.values, dense)
        assert acc.argmax() == int(np.argmax(dense))
    assert dense.min() >= 0


def test_greedy_hough_reads_each_drawn_line_once() -> None:
    shape = (300, 400)
    image = np.zeros(shape, bool)
    truths = [(20, 10, 20, 380), (50, 40, 280, 60), (290, 100, 150, 390)]  # none crossing
    for r0, c0, r1, c1 in truths:
        rr, cc = draw.line(r0, c0, r1, c1)
        image[rr, cc] = True
    rows, cols = np.nonzero(image)
    runs = greedy_hough(rows.astype(float), cols.astype(float), shape, min_px=20, near_px=1.5,
                        gap_px=3)
    assert len(runs) == len(truths)
    for c0, r0, c1, r1 in runs:
        ends = sorted([(r0, c0), (r1, c1)])
        assert any(np.allclose(ends, sorted([(t[0], t[1]), (t[2], t[3])]), atol=1.5)
                   for t in truths)


def test_vote_index_one_vote_per_angle() -> None:
    index = _vote_index(np.array([3.0, 7.0]), np.array([5.0, 1.0]), offset=20)
    assert index.shape == (2 * 360,)
    assert np.all(np.diff(index[:360] % 360) == 1)


@pytest.mark.parametrize("shape", [(150, 97), (64, 10), (3, 40)])
def test_along_lines_equals_whole_image_sums_and_correlation(shape) -> None:
    """Banded sums equal the whole-image shifted sums exactly, and the dense correlation to
    float32 rounding, on images taller and shorter than a band."""
    rng = np.random.default_rng(shape[0])
    image = rng.random(shape).astype(np.float32)
    length = 9
    got = along_lines(image, length_px=length)
    padded = np.pad(image, length // 2, mode="edge")
    expected = np.zeros(shape, np.float32)
    dense = np.full(shape, -np.inf)
    for k in range(16):
        fp = line_footprint(length, 180.0 * k / 16)
        total = np.zeros(shape, np.float32)
        for r, c in zip(*np.nonzero(fp), strict=True):
            total += padded[r:r + shape[0], c:c + shape[1]]
        expected = np.maximum(expected, total / int(fp.sum()))
        dense = np.maximum(dense, ndi.correlate(image.astype(np.float64), fp / fp.sum(),
                                                mode="nearest"))
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_allclose(got, dense, rtol=1e-5, atol=1e-6)
