"""Tests for pipeline.core.change: change magnitude, thresholds and the cleaned mask."""

from __future__ import annotations

import dask.array
import numpy as np
import pytest
import xarray as xr
from numpy.testing import assert_allclose, assert_array_equal

from pipeline.core.change import MASK_NODATA, change_magnitude, change_mask, threshold_value
from pipeline.errors import GridError, NoValidDataError
from pipeline.model import ChangeParams
from pipeline.testing import make_da, make_pair

SHAPE = (96, 96)
BLOCK = np.s_[20:30, 20:30]


def _truth(shape=SHAPE, block=BLOCK):
    truth = np.zeros(shape, np.uint8)
    truth[block] = 1
    return truth


def _iou(mask, truth):
    a, b = mask == 1, truth == 1
    return (a & b).sum() / (a | b).sum()


def test_change_magnitude_values_and_nan():
    """CVA is sqrt(mean over bands of the squared difference); NaN if any band is NaN."""
    before = np.zeros((2, 2, 2), np.float32)
    after = np.array([[[3, 0], [1, np.nan]], [[4, 0], [1, 2]]], np.float32)
    mag = change_magnitude(make_da(before), make_da(after))
    assert mag.dims == ("y", "x") and mag.dtype == np.float32
    assert_allclose(mag.values, [[np.sqrt(12.5), 0.0], [1.0, np.nan]])
    assert mag.rio.crs == "EPSG:32633"


def test_change_magnitude_dask_equals_numpy():
    """Dask input gives a lazy magnitude equal to the NumPy one."""
    before, after = make_pair(shape=SHAPE, nodata_frac=0.1, noise=2.0)
    expected = change_magnitude(before, after)
    lazy = change_magnitude(before.chunk({"band": 1, "y": 40}), after.chunk({"x": 30}))
    assert lazy.chunks is not None
    assert_array_equal(lazy.values, expected.values)


def test_change_magnitude_different_bands_raise():
    """Different band counts raise GridError."""
    before, after = make_pair(shape=(16, 16))
    with pytest.raises(GridError, match="bands"):
        change_magnitude(before, after.isel(band=[0, 1]))


@pytest.mark.parametrize("method", ["otsu", "kittler"])
def test_change_mask_exact_block_without_noise(method):
    """Without noise or smoothing the mask is exactly the changed block."""
    before, after = make_pair(shape=SHAPE)
    params = ChangeParams(threshold_method=method, smooth_sigma_px=0.0)
    mask, _ = change_mask(change_magnitude(before, after), params=params, res_m=10.0)
    assert mask.dtype == np.uint8 and mask.dims == ("y", "x")
    assert_array_equal(mask.values, _truth())


def test_change_mask_default_params_block():
    """Default parameters (smoothing, opening, min area) find the block, losing at most a corner."""
    before, after = make_pair(shape=SHAPE, noise=5.0)
    mask, _ = change_mask(change_magnitude(before, after), params=ChangeParams(), res_m=10.0)
    assert _iou(mask.values, _truth()) > 0.95


@pytest.mark.parametrize("method", ["otsu", "kittler"])
def test_change_mask_with_noise_finds_block(method):
    """With noise, both thresholds find the block (IoU > 0.9)."""
    before, after = make_pair(shape=SHAPE, noise=8.0, seed=1)
    params = ChangeParams(threshold_method=method, smooth_sigma_px=0.0)
    mask, _ = change_mask(change_magnitude(before, after), params=params, res_m=10.0)
    assert _iou(mask.values, _truth()) > 0.9


def test_change_mask_override_threshold():
    """An explicit threshold is used as is."""
    before, after = make_pair(shape=SHAPE)
    mag = change_magnitude(before, after)
    mask, thr = change_mask(mag, params=ChangeParams(threshold=1000.0), res_m=10.0)
    assert thr == 1000.0
    assert (mask.values == 0).all()
    assert threshold_value(mag, method="otsu", threshold=3.5) == 3.5


def test_change_mask_nodata_is_255():
    """Pixels where the magnitude is NaN are 255, and only those."""
    before, after = make_pair(shape=SHAPE, nodata_frac=0.25, change=np.s_[40:60, 40:60])
    mag = change_magnitude(before, after)
    mask, _ = change_mask(mag, params=ChangeParams(), res_m=10.0)
    assert_array_equal(mask.values == MASK_NODATA, np.isnan(mag.values))
    assert (mask.values[40:60, 40:60] == 1).sum() > 300


def test_change_mask_keeps_grid():
    """The mask keeps the magnitude's coords and CRS."""
    before, after = make_pair(shape=SHAPE)
    mag = change_magnitude(before, after)
    mask, _ = change_mask(mag, params=ChangeParams(), res_m=10.0)
    assert mask.rio.crs == before.rio.crs
    assert mask.rio.transform() == before.rio.transform()
    assert_array_equal(mask.x, before.x)


def test_change_mask_all_nan_raises():
    """An all-NaN magnitude raises NoValidDataError."""
    mag = xr.DataArray(np.full((8, 8), np.nan, np.float32), dims=("y", "x"))
    with pytest.raises(NoValidDataError, match="no valid pixel"):
        change_mask(mag, params=ChangeParams(), res_m=10.0)
    with pytest.raises(NoValidDataError):
        threshold_value(mag, method="kittler")


def test_change_mask_identical_dates_no_change():
    """Identical before and after give no change pixel."""
    before, _ = make_pair(shape=SHAPE, nodata_frac=0.1)
    mag = change_magnitude(before, before)
    mask, thr = change_mask(mag, params=ChangeParams(), res_m=10.0)
    assert thr == 0.0
    assert (mask.values[mask.values != MASK_NODATA] == 0).all()


def test_change_mask_removes_small_objects_and_fills_holes():
    """Objects and holes below min_region_area_m2 are removed and filled."""
    mag = np.zeros((40, 40), np.float32)
    mag[5:15, 5:15] = 10.0
    mag[9, 9] = 0.0  # 1-pixel hole
    mag[30, 30] = 10.0  # 1-pixel object
    da = xr.DataArray(mag, dims=("y", "x"))
    params = ChangeParams(smooth_sigma_px=0.0, opening_radius_px=0, min_region_area_m2=400.0)
    mask, _ = change_mask(da, params=params, res_m=10.0)
    expected = np.zeros((40, 40), np.uint8)
    expected[5:15, 5:15] = 1
    assert_array_equal(mask.values, expected)


def test_threshold_kittler_between_modes():
    """Kittler-Illingworth puts the threshold between two Gaussian populations."""
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(10, 2, 9000), rng.normal(40, 5, 1000)])
    mag = xr.DataArray(values.astype(np.float32).reshape(100, 100), dims=("y", "x"))
    for method in ("kittler", "otsu"):
        assert 15.0 < threshold_value(mag, method=method) < 32.0


@pytest.mark.parametrize("method", ["otsu", "kittler"])
def test_change_mask_dask_equals_numpy(method):
    """Chunked (map_overlap) smoothing and opening give exactly the NumPy mask."""
    before, after = make_pair(shape=(120, 120), change=np.s_[25:70, 35:80], noise=6.0,
                              nodata_frac=0.1)
    params = ChangeParams(threshold_method=method, opening_radius_px=2, smooth_sigma_px=1.5)
    mag = change_magnitude(before, after)
    expected, thr = change_mask(mag, params=params, res_m=10.0)
    got, thr_lazy = change_mask(mag.chunk({"y": 32, "x": 50}), params=params, res_m=10.0)
    assert thr_lazy == thr
    assert_array_equal(got.values, expected.values)


def test_cva_float32_band_by_band_close_to_float64():
    """The float32 band-by-band CVA is within float32 rounding of a float64 one; NaN kept."""
    from pipeline.core.change import _cva_np

    rng = np.random.default_rng(0)
    before = rng.normal(100, 30, (300, 200, 3)).astype(np.float32)
    after = rng.normal(100, 30, (300, 200, 3)).astype(np.float32)
    after[3, 4, 1] = np.nan
    expected = np.sqrt(((after.astype(np.float64) - before) ** 2).mean(axis=-1))
    got = _cva_np(before, after)
    assert got.dtype == np.float32
    assert_array_equal(np.isnan(got), np.isnan(expected))
    assert_allclose(got, expected, rtol=1e-6, equal_nan=True)


def test_change_magnitude_dask_stays_lazy():
    """change_magnitude keeps Dask input lazy."""
    import dask.array

    before, after = make_pair(shape=SHAPE, change=BLOCK)
    mag = change_magnitude(before.chunk({"y": 40}), after.chunk({"y": 40}))
    assert isinstance(mag.data, dask.array.Array)


def test_change_mask_persist_hook_same_mask():
    """A persist hook (here: an in-memory store) sees the smoothed magnitude and the size
    filter's chunk labels; same mask."""
    import dask.array

    before, after = make_pair(shape=(120, 120), change=np.s_[25:70, 35:80], noise=6.0)
    mag = change_magnitude(before, after).chunk({"y": 50, "x": 50})
    seen = []

    def persist(arr):
        seen.append(arr)
        return dask.array.from_array(arr.compute(), chunks=arr.chunks)

    expected, thr = change_mask(mag, params=ChangeParams(), res_m=10.0)
    got, thr_hook = change_mask(mag, params=ChangeParams(), res_m=10.0, persist=persist)
    # the smoothed magnitude, then the chunk labels of the size filter's objects and holes
    assert [a.dtype for a in seen] == [np.float32, np.int32, np.int32] and thr_hook == thr
    assert_array_equal(got.values, expected.values)


@pytest.mark.parametrize("shape", [(64, 64), (40, 19), (19, 40), (5, 200), (1, 30), (200, 7)])
@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.3])
def test_smoothed_ones_equals_gaussian_of_ones(shape, sigma):
    """The narrow filtering of an all-ones block is bit for bit scipy's full filtering."""
    from scipy import ndimage as ndi

    from pipeline.core.change import _smoothed_ones_np

    expected = ndi.gaussian_filter(np.ones(shape), sigma, mode="constant")
    assert_array_equal(_smoothed_ones_np(shape, sigma), expected)


def test_smooth_all_valid_equals_normalized_convolution():
    """A block without NaN is smoothed exactly as the two-filter normalized convolution."""
    from scipy import ndimage as ndi

    from pipeline.core.change import _smooth_np

    mag = np.random.default_rng(0).random((50, 70)).astype(np.float32) * 40
    num = ndi.gaussian_filter(mag.astype(np.float64), 1.0, mode="constant")
    den = ndi.gaussian_filter(np.ones(mag.shape), 1.0, mode="constant")
    assert_array_equal(_smooth_np(mag, 1.0), (num / den).astype(np.float32))


@pytest.mark.parametrize("shape", [(600, 530), (300, 7), (1, 400), (257, 256)])
@pytest.mark.parametrize("nodata", ["edge", "speckle", "corner", "none", "all"])
@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.3])
def test_smooth_with_nodata_equals_normalized_convolution(shape, nodata, sigma, monkeypatch):
    """NaN edges, speckle or corners: the tiled weights give scipy's two-filter result
    at every valid pixel (NaN elsewhere), with tiles smaller than the kernel too."""
    from scipy import ndimage as ndi

    import pipeline.core.change as change

    rng = np.random.default_rng(sum(shape))
    mag = (rng.random(shape) * 40).astype(np.float32)
    rows, cols = np.mgrid[:shape[0], :shape[1]]
    invalid = {"edge": rows * 0.7 + cols < shape[1] * 0.4, "speckle": rng.random(shape) < 0.002,
               "corner": (rows > shape[0] * 0.8) & (cols < 3), "none": np.zeros(shape, bool),
               "all": np.ones(shape, bool)}[nodata]
    mag[invalid] = np.nan
    valid = ~invalid
    num = ndi.gaussian_filter(np.where(valid, mag, 0).astype(np.float64), sigma, mode="constant")
    den = ndi.gaussian_filter(valid.astype(np.float64), sigma, mode="constant")
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = np.where(valid, (num / den).astype(np.float32), np.float32(np.nan))
    for tile in (256, 5):
        monkeypatch.setattr(change, "_SMOOTH_TILE_PX", tile)
        assert_array_equal(change._smooth_np(mag, sigma), expected)


@pytest.mark.parametrize("shape", [(64, 64), (1, 9), (9, 1), (2, 2), (3, 5), (1, 1)])
@pytest.mark.parametrize("share", [0.3, 0.7, 0.95])
def test_open_radius_1_equals_ndimage(shape, share):
    """The separable 3x3 opening gives exactly scipy's binary_opening, borders included."""
    from scipy import ndimage as ndi

    from pipeline.core.change import _open_np

    binary = np.random.default_rng(len(shape) + shape[0]).random(shape) < share
    expected = ndi.binary_opening(binary, structure=np.ones((3, 3), bool))
    assert_array_equal(_open_np(binary, 1), expected)


@pytest.mark.parametrize("chunks", [7, 16, 45])
def test_change_mask_dask_size_filter_across_chunk_borders(chunks):
    """Small objects and holes straddling chunk borders are removed/filled as in memory."""
    rng = np.random.default_rng(11)
    values = np.where(rng.random((90, 90)) < 0.45, 50.0, 0.0).astype(np.float32)
    values[30:60, 30:60] = 50.0  # a big object with holes of every size across borders
    values[40:42, 40:43] = values[50:56, 44:52] = 0.0
    values[:4, :] = np.nan
    mag = xr.DataArray(values, dims=("y", "x"))
    params = ChangeParams(threshold=25.0, smooth_sigma_px=0.0, opening_radius_px=0,
                          min_region_area_m2=1200.0)  # 12 px at 10 m
    expected, _ = change_mask(mag, params=params, res_m=10.0)
    got, _ = change_mask(mag.chunk({"y": chunks, "x": chunks}), params=params, res_m=10.0)
    assert isinstance(got.data, dask.array.Array)
    assert_array_equal(got.values, expected.values)


def test_threshold_dask_blocks_all_nan_equals_numpy():
    """Statistics of Dask blocks (some all NaN) give NumPy's threshold exactly."""
    rng = np.random.default_rng(5)
    values = rng.gamma(2.0, 3.0, (60, 80)).astype(np.float32)
    values[:30, :40] = np.nan  # a whole chunk of nodata
    mag = xr.DataArray(values, dims=("y", "x"))
    lazy = mag.copy(data=dask.array.from_array(values, chunks=(30, 40)))
    for method in ("otsu", "kittler"):
        assert threshold_value(lazy, method=method) == threshold_value(mag, method=method)
    empty = xr.DataArray(dask.array.full((4, 4), np.nan, np.float32, chunks=2), dims=("y", "x"))
    with pytest.raises(NoValidDataError):
        threshold_value(empty, method="otsu")
