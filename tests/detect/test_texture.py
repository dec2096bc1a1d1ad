"""Tests of pipeline.detect.texture's block means."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.detect.blocks import _block_mean_np, block_mean


def _reference(a: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """The definition: NaN-aware sums over whole padded blocks with NumPy's reduction."""
    rows, cols = (-(-n // factor) * factor for n in a.shape)
    padded = np.full((rows, cols), np.nan, np.float32)
    padded[: a.shape[0], : a.shape[1]] = a
    blocks = padded.reshape(rows // factor, factor, cols // factor, factor)
    valid = ~np.isnan(blocks)
    count = valid.sum(axis=(1, 3))
    total = np.where(valid, blocks, 0.0).sum(axis=(1, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    inside = np.zeros((rows, cols), bool)
    inside[: a.shape[0], : a.shape[1]] = True
    n_inside = inside.reshape(rows // factor, factor, cols // factor, factor).sum(axis=(1, 3))
    return mean.astype(np.float32), (count / np.maximum(n_inside, 1)).astype(np.float32)


@pytest.mark.parametrize("factor", [2, 3, 4, 5, 20])
def test_block_mean_is_numpy_reduction_to_the_bit(factor: int) -> None:
    rng = np.random.default_rng(factor)
    shapes = [(1, 1), (factor, 7 * factor), (7 * factor + 1, factor - 1), (2 * factor, 1)]
    shapes += [tuple(int(n) for n in rng.integers(1, 3 * factor + 40, 2)) for _ in range(60)]
    for shape in shapes:
        a = (rng.random(shape, dtype=np.float32) * rng.choice([1e-3, 1.0, 1e3])).astype(
            np.float32)
        a[rng.random(shape) < rng.choice([0.0, 0.05, 0.6, 1.0])] = np.nan
        mean, valid = _block_mean_np(a, factor)
        ref_mean, ref_valid = _reference(a, factor)
        assert mean.dtype == np.float32 and valid.dtype == np.float32
        np.testing.assert_array_equal(mean, ref_mean)  # NaNs at the same places
        np.testing.assert_array_equal(valid, ref_valid)


@pytest.mark.parametrize("factor", [1, 2, 3, 5])
def test_block_average_equals_block_mean(factor: int) -> None:
    """The mean-only block average (the wall grid's) equals block_mean's mean to the bit,
    on whole and partial blocks and on strided views."""
    from pipeline.detect.blocks import block_average_np

    rng = np.random.default_rng(10 + factor)
    for shape in [(4 * factor, 6 * factor), (4 * factor + 1, 3 * factor - 1), (1, 1)]:
        big = rng.normal(100.0, 30.0, (2 * shape[0], 2 * shape[1])).astype(np.float32)
        big[rng.random(big.shape) < 0.2] = np.nan
        for a in (big[: shape[0], : shape[1]], big[::2, ::2], big[: shape[0], : shape[1]].copy()):
            expected = _block_mean_np(a, factor)[0]
            np.testing.assert_array_equal(block_average_np(a, factor), expected)


def test_block_mean_values() -> None:
    a = np.arange(30, dtype=np.float32).reshape(5, 6)
    a[0, 0] = np.nan
    mean, valid = block_mean(a, 2)
    assert mean.shape == (3, 3)
    assert mean[0, 0] == pytest.approx((1 + 6 + 7) / 3)
    assert valid[0, 0] == pytest.approx(0.75)
    assert mean[2, 2] == pytest.approx((28 + 29) / 2) and valid[2, 2] == 1.0  # partial block


def test_sobel_in_bands_is_the_same_to_the_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any band height gives the whole image's bytes, and the values are SciPy's Sobel."""
    from scipy import ndimage as ndi

    from pipeline.detect import texture

    rng = np.random.default_rng(2)
    for shape in [(1, 1), (2, 7), (33, 40), (97, 64)]:
        img = (rng.random(shape) * 9).astype(np.float32)
        monkeypatch.setattr(texture, "_SOBEL_BAND_ROWS", 10_000)
        whole = texture._sobel_magnitude_np(img)
        for rows in (1, 5, 32):
            monkeypatch.setattr(texture, "_SOBEL_BAND_ROWS", rows)
            np.testing.assert_array_equal(texture._sobel_magnitude_np(img), whole)
        wide = img.astype(np.float64)
        expected = np.hypot(ndi.sobel(wide, 0), ndi.sobel(wide, 1))
        np.testing.assert_allclose(whole, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (40, 300), (300, 41)])
def test_gaussian_bands_equal_scipy(monkeypatch, shape):
    """The column pass in bands gives SciPy's gaussian_filter exactly, for any band width."""
    from scipy import ndimage as ndi

    from pipeline.detect import texture

    img = (np.random.default_rng(shape[1]).random(shape) * 5).astype(np.float32)
    expected = ndi.gaussian_filter(img, 1.0)
    for cols in (1, 7, 256, 10_000):
        monkeypatch.setattr(texture, "_GAUSS_BAND_COLS", cols)
        got = texture._gaussian_np(img, 1.0)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expected)


def test_block_windows_equal_slices_and_compute_each_chunk_once() -> None:
    """Windows from BlockWindows equal the array's slices (across chunk borders, at the
    edges, empty), and a graph of many windows computes each chunk once."""
    import threading

    import dask
    import dask.array as da

    from pipeline.detect.blocks import BlockWindows

    calls = []
    lock = threading.Lock()

    def counted(block: np.ndarray) -> np.ndarray:
        with lock:
            calls.append(block.shape)
        return block * np.float32(2)

    values = np.random.default_rng(3).random((70, 90)).astype(np.float32)
    arr = da.from_array(values, chunks=(20, 25)).map_blocks(counted, dtype=np.float32)
    windows = BlockWindows(arr)
    boxes = [(0, 70, 0, 90), (15, 45, 20, 60), (0, 1, 89, 90), (19, 21, 24, 26), (30, 30, 5, 9)]
    boxes += [(r, r + 33, c, c + 41) for r in range(0, 37, 6) for c in range(0, 49, 8)]
    got = dask.compute(*(windows.window(slice(r0, r1), slice(c0, c1))
                         for r0, r1, c0, c1 in boxes))
    for (r0, r1, c0, c1), window in zip(boxes, got, strict=True):
        np.testing.assert_array_equal(window, values[r0:r1, c0:c1] * np.float32(2))
        assert window.dtype == np.float32
    assert len([c for c in calls if min(c) > 0]) == arr.npartitions  # (Dask's meta probe: 0 x 0)
