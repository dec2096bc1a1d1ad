"""Tests for pipeline.detect.blobs: scikit-image's LoG blobs and peaks, found faster."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage import feature

from pipeline.detect.blobs import local_peaks, log_blobs, log_sigmas

SCALES = {"min_sigma": 1.44, "max_sigma": 8.64, "num_sigma": 8}


def _image(shape, *, seed, density, dtype=np.float32):
    """Non-negative clutter: squares of several sizes and strengths on a faint background."""
    rng = np.random.default_rng(seed)
    img = np.zeros(shape, np.float64)
    for _ in range(int(density * shape[0] * shape[1] / 100)):
        r, c = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        h = int(rng.integers(1, 12))
        img[r:r + h, c:c + h] += rng.uniform(0.05, 0.6)
    img += np.clip(rng.normal(0, 0.02, shape), 0, None)
    return np.clip(ndi.uniform_filter(img, 2), 0, None).astype(dtype)


@pytest.mark.parametrize("shape", [(200, 300), (130, 47), (20, 25)])
@pytest.mark.parametrize("density", [0.5, 5.0])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_log_blobs_equal_skimage(shape, density, dtype):
    """Rows (values, order, dtype) equal skimage's blob_log at overlap 1.0, edges included."""
    image = _image(shape, seed=sum(shape), density=density, dtype=dtype)
    for threshold in (0.02, 0.108):
        expected = feature.blob_log(image, threshold=threshold, overlap=1.0,
                                    exclude_border=False, **SCALES)
        got = log_blobs(image, threshold=threshold, **SCALES)
        assert len(expected) > 0 or threshold > 0.1
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)


def _reference_peaks(cube, threshold):
    return feature.peak_local_max(cube.transpose(1, 2, 0), threshold_abs=threshold,
                                  exclude_border=False, footprint=np.ones((3, 3, 3)))


@pytest.mark.parametrize("seed", range(4))
def test_local_peaks_equal_peak_local_max_with_plateaus_and_ties(seed):
    """Quantised values (plateaus, equal peaks, peaks on every face): same rows, same order."""
    rng = np.random.default_rng(seed)
    cube = np.round(rng.random((5, 23, 31)) * 6).astype(np.float32) / 6
    cube[:, :, :3] = 1.0  # a plateau on an edge
    cube[2, 10, 15] = 2.0
    cube[0, 0, 30] = 2.0  # equal to the peak above, in a corner
    for threshold in (0.0, 0.5, 0.9):
        np.testing.assert_array_equal(local_peaks(cube, threshold),
                                      _reference_peaks(cube, threshold))


def test_local_peaks_constant_cube_has_none():
    """A constant cube above the threshold has no peak (peak_local_max's trivial case)."""
    cube = np.full((3, 8, 8), 0.7, np.float32)
    assert len(_reference_peaks(cube, 0.1)) == 0
    assert local_peaks(cube, 0.1).shape == (0, 3)


def test_log_blobs_rejects_bad_input():
    """Non-finite or non-2-D images are refused with a clear message."""
    image = _image((40, 40), seed=5, density=5.0)
    image[3, 3] = np.nan
    with pytest.raises(ValueError, match="finite"):
        log_blobs(image, threshold=0.01, **SCALES)
    with pytest.raises(ValueError, match="2-D"):
        log_blobs(np.zeros((2, 4, 4), np.float32), threshold=0.01, **SCALES)


@pytest.mark.parametrize("wanted", [[0, 1, 1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0],
                                    [0, 0, 0, 0, 0, 0, 0, 1], [0, 0, 1, 0, 1, 0, 0, 0],
                                    [0] * 8])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_log_blobs_wanted_scales_are_the_full_search_filtered(wanted, dtype):
    """Asking for some scales gives the rows of the full search at those scales, in the same
    order, to the bit (the scales beyond their neighbours are not filtered)."""
    wanted = np.array(wanted, bool)
    found = 0
    for seed, density, threshold in [(1, 5.0, 0.05), (2, 0.5, 0.02), (3, 5.0, 0.2)]:
        img = _image((160, 210), seed=seed, density=density, dtype=dtype)
        full = log_blobs(img, threshold=threshold, **SCALES)
        sigmas = log_sigmas(SCALES["min_sigma"], SCALES["max_sigma"], 8, dtype)
        assert set(full[:, 2]) <= set(sigmas)
        keep = np.isin(full[:, 2], sigmas[wanted])
        got = log_blobs(img, threshold=threshold, wanted=wanted, **SCALES)
        np.testing.assert_array_equal(got, full[keep])
        assert got.dtype == full.dtype
        found += len(got)
        assert len(full) > 0
    assert found > 0 or not wanted[:7].any()  # (the largest scale may hold no blob)


def test_log_blobs_wanted_scales_of_a_constant_part():
    """A constant image (constant filtered scales) gives what the full search gives."""
    for value in (0.0, 0.3):
        img = np.full((40, 50), value, np.float32)
        wanted = np.array([0, 1, 1, 0, 0, 0, 0, 0], bool)
        full = log_blobs(img, threshold=-1.0, **SCALES)
        got = log_blobs(img, threshold=-1.0, wanted=wanted, **SCALES)
        np.testing.assert_array_equal(got, full[np.isin(full[:, 2], full[:0, 2])])


def _in_boxes(blobs, boxes):
    inside = np.zeros(len(blobs), bool)
    for r0, r1, c0, c1 in boxes:
        inside |= ((blobs[:, 0] >= r0) & (blobs[:, 0] < r1) & (blobs[:, 1] >= c0)
                   & (blobs[:, 1] < c1))
    return inside


@pytest.mark.parametrize("seed", range(6))
def test_log_blobs_in_boxes_equal_the_whole_search_there(seed):
    """Blobs searched in boxes (overlapping, at the edges, beyond them) are the whole image's
    blobs in those boxes, in the same order, to the bit; boxes searched in two goes and
    merged give the same rows."""
    from pipeline.detect.blobs import log_blobs_in, merge_blobs

    rng = np.random.default_rng(seed)
    found = 0
    for trial in range(8):
        shape = tuple(int(n) for n in rng.integers(12, 200, 2))
        dtype = (np.float32, np.float64)[trial % 2]
        img = _image(shape, seed=seed * 10 + trial, density=5.0, dtype=dtype)
        wanted = None if trial % 3 == 0 else rng.random(8) < 0.6
        boxes = []
        for _ in range(int(rng.integers(1, 6))):
            r0, c0 = (int(rng.integers(-8, n)) for n in shape)
            boxes.append((r0, r0 + int(rng.integers(1, 90)), c0, c0 + int(rng.integers(1, 90))))
        full = log_blobs(img, threshold=0.03, wanted=wanted, **SCALES)
        got, response = log_blobs_in(img, boxes, threshold=0.03, wanted=wanted, **SCALES)
        np.testing.assert_array_equal(got, full[_in_boxes(full, boxes)])
        assert got.dtype == full.dtype and response.shape == (len(got),)
        assert np.all(response > 0.03)
        halves = [log_blobs_in(img, part, threshold=0.03, wanted=wanted, **SCALES)
                  for part in (boxes[::2], boxes[1::2] or boxes[:1])]
        np.testing.assert_array_equal(merge_blobs(halves)[0], got)
        found += len(got)
    assert found > 0


def test_log_blobs_in_constant_image_as_the_whole_search():
    """A constant image in boxes gives what the whole search gives (none above the threshold)."""
    from pipeline.detect.blobs import log_blobs_in

    boxes = [(5, 20, 0, 70), (40, 60, 30, 50)]
    for value, threshold in ((0.0, 0.01), (0.4, -1.0)):
        img = np.full((60, 70), value, np.float32)
        full = log_blobs(img, threshold=threshold, **SCALES)
        got, _ = log_blobs_in(img, boxes, threshold=threshold, **SCALES)
        np.testing.assert_array_equal(got, full[_in_boxes(full, boxes)])


def test_log_blobs_in_top_scale_decides_the_peaks_below_it():
    """With the largest scale only a neighbour (filtered just around the peaks of the scale
    below it), the blobs are the whole search's: including where that scale beats a peak."""
    from pipeline.detect.blobs import _log_cube, _peak_voxels, log_blobs_in

    wanted = np.array([0, 1, 1, 1, 1, 1, 0, 0], bool)
    sigmas = log_sigmas(SCALES["min_sigma"], SCALES["max_sigma"], 8, np.float32)
    beaten = 0
    for seed in range(12):
        img = _image((120, 150), seed=seed, density=5.0)
        full = log_blobs(img, threshold=0.03, wanted=wanted, **SCALES)
        got, _ = log_blobs_in(img, [(0, 60, 0, 150), (60, 120, 0, 150)], threshold=0.03,
                              wanted=wanted, **SCALES)
        np.testing.assert_array_equal(got, full)
        # peaks of scale 5 without scale 6 beside them: those scale 6 beats are not blobs
        s, r, c, _ = _peak_voxels(_log_cube(img, sigmas[0:6]), 0.03)
        at5 = {(float(r[k]), float(c[k])) for k in np.flatnonzero(s == 5)}
        beaten += len(at5 - {(b[0], b[1]) for b in full if b[2] == sigmas[5]})
    assert beaten > 0
