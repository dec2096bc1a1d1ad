"""Tests for pipeline.core.coreg: shift estimation, trust checks and applying the shift."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from scipy import ndimage as ndi

from pipeline.core.coreg import apply_shift, coregister, estimate_shift
from pipeline.errors import CoregistrationError, GridError, PipelineWarning
from pipeline.model import CoregParams
from pipeline.testing import make_da, make_pair

TOL_PX = 0.15


def _error_px(result, shift):
    return math.hypot(result.dy - shift[0], result.dx - shift[1])


def test_make_pair_shift_convention():
    """make_pair's after, shifted by `shift` with scipy, lands on before."""
    before, after = make_pair(shape=(96, 96), change=None, shift=(1.37, -0.62))
    back = ndi.shift(after.values[0].astype(float), (1.37, -0.62), order=3)
    inner = np.s_[8:-8, 8:-8]
    assert np.abs(back[inner] - before.values[0][inner]).max() < 1.0


@pytest.mark.parametrize("shift", [(1.37, -0.62), (-3.2, 2.5), (0.4, 0.3)])
def test_estimate_shift_recovers_subpixel_shift(shift):
    """A known sub-pixel shift is recovered within 0.15 px and trusted."""
    before, after = make_pair(shape=(192, 192), change=None, shift=shift, noise=1.0)
    result = estimate_shift(before, after, params=CoregParams())
    assert result.applied
    assert _error_px(result, shift) < TOL_PX
    assert result.peak_ratio >= CoregParams().min_peak_ratio


def test_estimate_shift_ignores_change_and_gain():
    """A large bright new block and a brightness gain do not bias the shift."""
    shift = (-2.3, 1.6)
    before, after = make_pair(shape=(192, 192), change=np.s_[40:110, 60:140], shift=shift,
                              gain=1.4, offset=-30.0, noise=2.0)
    result = estimate_shift(before, after, params=CoregParams())
    assert result.applied
    assert _error_px(result, shift) < TOL_PX


def test_estimate_shift_handles_nodata_border():
    """NaN borders (different in each date) neither fail nor bias the estimate."""
    shift = (1.37, -0.62)
    before, after = make_pair(shape=(192, 192), shift=shift, nodata_frac=0.2, noise=2.0)
    result = estimate_shift(before, after, params=CoregParams())
    assert result.applied
    assert _error_px(result, shift) < TOL_PX


def test_estimate_shift_uses_several_windows_on_large_frames():
    """Frames larger than window_px are registered in several agreeing windows."""
    shift = (0.8, -1.1)
    before, after = make_pair(shape=(200, 300), shift=shift, noise=1.0)
    result = estimate_shift(before, after, params=CoregParams(window_px=96))
    assert result.applied and "windows agree" in result.note
    assert int(result.note.split()[0]) >= 2
    assert _error_px(result, shift) < TOL_PX


def test_estimate_shift_dask_equals_numpy():
    """Dask-backed inputs give exactly the NumPy result."""
    before, after = make_pair(shape=(128, 160), shift=(1.2, 0.7), noise=1.0)
    params = CoregParams()
    expected = estimate_shift(before, after, params=params)
    got = estimate_shift(before.chunk({"x": 50, "y": 40}), after.chunk({"x": 50}), params=params)
    assert got == expected


def test_estimate_shift_over_limit_raises():
    """A trusted shift above max_shift_px raises with the shift and the fix."""
    before, after = make_pair(shape=(128, 128), shift=(5.0, -4.0), change=None)
    params = CoregParams(max_shift_px=3.0, on_excess="raise")
    with pytest.raises(CoregistrationError, match=r"max_shift_px.*georeferencing"):
        estimate_shift(before, after, params=params)


def test_coregister_over_limit_warns_and_does_not_apply():
    """With on_excess='warn' an over-limit shift warns and after is returned unchanged."""
    before, after = make_pair(shape=(128, 128), shift=(5.0, -4.0), change=None)
    params = CoregParams(max_shift_px=3.0, on_excess="warn")
    with pytest.warns(PipelineWarning, match="max_shift_px"):
        aligned, result = coregister(before, after, params=params)
    assert not result.applied
    assert abs(result.dy - 5.0) < 0.3 and abs(result.dx + 4.0) < 0.3
    assert aligned is after


def test_coregister_weak_peak_not_applied():
    """Two unrelated noise images give a weak peak: warned, not applied."""
    rng = np.random.default_rng(3)
    before = make_da(rng.normal(100, 20, (3, 128, 128)).astype(np.float32))
    after = make_da(rng.normal(100, 20, (3, 128, 128)).astype(np.float32))
    with pytest.warns(PipelineWarning, match="weak correlation peak"):
        aligned, result = coregister(before, after, params=CoregParams())
    assert not result.applied
    assert "shift not applied" in result.note
    assert result.peak_ratio < CoregParams().min_peak_ratio
    assert aligned is after


def test_coregister_disabled_returns_after():
    """coreg.enabled=False measures nothing and returns after itself."""
    before, after = make_pair()
    aligned, result = coregister(before, after, params=CoregParams(enabled=False))
    assert aligned is after
    assert (result.dy, result.dx, result.applied, result.note) == (0.0, 0.0, False, "disabled")


def test_coregister_aligns_after_onto_before():
    """The aligned after matches before inside the frame and keeps the grid."""
    before, after = make_pair(shape=(160, 160), change=None, shift=(2.4, -1.3))
    aligned, result = coregister(before, after, params=CoregParams())
    assert result.applied
    assert aligned.rio.crs == before.rio.crs
    assert aligned.rio.transform() == before.rio.transform()
    inner = np.s_[:, 10:-10, 10:-10]
    # bilinear resampling smooths a little: compare to the spread of the texture (about 30)
    assert np.abs(aligned.values[inner] - before.values[inner]).mean() < 1.5
    assert np.isnan(aligned.values[:, :2, :]).all()  # shifted in from outside the frame


def test_estimate_shift_rejects_different_grids():
    """Rasters on different grids raise GridError."""
    before, _ = make_pair(shape=(64, 64))
    _, after = make_pair(shape=(64, 80))
    with pytest.raises(GridError, match="different grids"):
        estimate_shift(before, after, params=CoregParams())


@pytest.mark.parametrize("shift", [(1.37, -0.62), (-3.2, 2.5), (2.0, -1.0), (0.0, 0.0)])
def test_apply_shift_matches_scipy_bilinear(shift):
    """apply_shift equals scipy.ndimage.shift(order=1), NaN where not fully valid."""
    rng = np.random.default_rng(0)
    arr = rng.normal(size=(2, 40, 50)).astype(np.float32)
    arr[0, 5, 7] = np.nan
    got = apply_shift(make_da(arr), *shift).values
    filled = np.nan_to_num(arr)
    expected = ndi.shift(filled, (0, *shift), order=1, mode="constant", cval=np.nan)
    valid = ndi.shift(np.isfinite(arr).astype(float), (0, *shift), order=1, mode="constant",
                      cval=0.0) > 1 - 1e-6
    expected[~valid] = np.nan
    assert_array_equal(np.isnan(got), np.isnan(expected))
    assert_allclose(got, expected, atol=1e-5, equal_nan=True)


def test_apply_shift_dask_equals_numpy():
    """Applying a shift chunk-wise (map_overlap) gives exactly the NumPy result."""
    before, after = make_pair(shape=(100, 120), nodata_frac=0.1, noise=1.0)
    expected = apply_shift(after, -3.3, 2.6)
    lazy = apply_shift(after.chunk({"band": 1, "y": 30, "x": 45}), -3.3, 2.6)
    assert lazy.chunks is not None
    assert_array_equal(lazy.values, expected.values)
    assert lazy.rio.crs == after.rio.crs


# --- real imagery: Dabancheng, Sentinel-2 true colour, 3.5 m pixels --------------------------


def _read_real(folder, name):
    """Read a real GeoTIFF (test-only I/O) as a float32 DataArray with NaN nodata."""
    rasterio = pytest.importorskip("rasterio")
    path = folder / name
    if not path.exists():
        pytest.skip(f"real test image {path} is absent (the shared data folder beside the project)")
    with rasterio.open(path) as src:
        arr = src.read().astype(np.float32)
        transform = src.transform
    arr[:, (arr == 0).any(axis=0)] = np.nan  # nodata 0; valid pixels are >= 1
    return make_da(arr, res_m=transform.a, crs="EPSG:32645", origin=(transform.c, transform.f))


def test_estimate_shift_real_image_known_shift(dabancheng_dir):
    """The real 2018 image against a copy shifted by (1.37, -0.62) px: error < 0.2 px."""
    after = _read_real(dabancheng_dir, "dabancheng_2018-10-11.tif")
    arr = after.values
    valid = np.isfinite(arr).all(axis=0)
    moved = np.stack([ndi.shift(np.where(valid, band, 0.0), (1.37, -0.62), order=3)
                      for band in arr])
    moved_valid = ndi.shift(valid.astype(float), (1.37, -0.62), order=1) > 1 - 1e-6
    moved[:, ~moved_valid] = np.nan
    result = estimate_shift(after, after.copy(data=moved.astype(np.float32)), params=CoregParams())
    assert result.applied
    assert _error_px(result, (-1.37, 0.62)) < 0.2


def test_estimate_shift_real_pair_no_wild_shift(dabancheng_dir):
    """The real 2017/2018 pair (co-registered to about 1 px) gives ~0 px or is not applied."""
    before = _read_real(dabancheng_dir, "dabancheng_2017-03-02.tif")
    after = _read_real(dabancheng_dir, "dabancheng_2018-10-11.tif")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PipelineWarning)
        result = estimate_shift(before, after, params=CoregParams())
    if result.applied:
        assert math.hypot(result.dy, result.dx) < 2.0


def _apply_shift_reference(arr, dy, dx):
    """The former whole-stack implementation (padded copy, per-corner NaN masks)."""
    ky, kx = math.floor(-dy), math.floor(-dx)
    fy, fx = -dy - ky, -dx - kx
    pad = max(abs(ky), abs(kx)) + 2
    widths = [(0, 0)] * (arr.ndim - 2) + [(pad, pad), (pad, pad)]
    src = np.pad(arr, widths, constant_values=np.nan)
    ny, nx = arr.shape[-2:]
    out = np.zeros(arr.shape, dtype=np.result_type(arr.dtype, np.float32))
    bad = np.zeros(arr.shape, dtype=bool)
    for oy, wy in ((0, 1.0 - fy), (1, fy)):
        for ox, wx in ((0, 1.0 - fx), (1, fx)):
            if wy * wx == 0.0:
                continue
            y0, x0 = pad + ky + oy, pad + kx + ox
            part = src[..., y0 : y0 + ny, x0 : x0 + nx]
            bad |= np.isnan(part)
            out += np.asarray(wy * wx, out.dtype) * np.nan_to_num(part)
    out[bad] = np.nan
    return out


@pytest.mark.parametrize("shift", [(0.37, -0.61), (1.5, 2.25), (0.0, 0.0), (0.0, 0.5),
                                   (-2.0, 0.0), (3.9, -7.2), (-0.999, 0.001), (60.0, 0.0)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_apply_shift_band_by_band_equals_whole_stack(shift, dtype):
    """The band-by-band shift equals the former padded whole-stack one (within 1e-6)."""
    from pipeline.core.coreg import _apply_shift_np

    rng = np.random.default_rng(1)
    arr = rng.normal(100, 30, (3, 50, 45)).astype(dtype)
    arr[0, 10:20, 30:40] = np.nan
    arr[1, 0, :] = np.nan
    got = _apply_shift_np(arr, *shift)
    expected = _apply_shift_reference(arr, *shift)
    assert got.dtype == expected.dtype
    assert_array_equal(np.isnan(got), np.isnan(expected))
    assert_allclose(got, expected, rtol=0, atol=1e-6, equal_nan=True)
    assert_allclose(_apply_shift_np(arr[0], *shift), expected[0], rtol=0, atol=1e-6,
                    equal_nan=True)


def test_coregister_dask_stays_lazy():
    """With Dask input, the aligned after image is returned lazy (only windows computed)."""
    import dask.array

    before, after = make_pair(shape=(160, 160), change=None, shift=(1.3, -0.6))
    aligned, result = coregister(before.chunk({"y": 64, "x": 64}), after.chunk({"y": 64, "x": 64}),
                                 params=CoregParams(window_px=128))
    assert result.applied and isinstance(aligned.data, dask.array.Array)


def test_apply_shift_in_row_strips_equals_one_strip(monkeypatch):
    """Shifting a strip of rows at a time gives exactly the one-strip result."""
    import pipeline.core.coreg as coreg

    rng = np.random.default_rng(2)
    arr = rng.normal(100, 30, (2, 61, 45)).astype(np.float32)
    arr[1, 5:9, 3:30] = np.nan
    for shift in [(0.37, -0.61), (-2.5, 1.25), (0.0, 0.0), (7.0, -3.0)]:
        whole = coreg._apply_shift_np(arr, *shift)
        monkeypatch.setattr(coreg, "_SHIFT_STRIP_PX", 100)  # 2-row strips
        assert_array_equal(coreg._apply_shift_np(arr, *shift), whole)
        monkeypatch.undo()


def test_estimate_shift_threaded_windows_equal_synchronous():
    """Windows registered in parallel on Dask threads give the serial result exactly."""
    import dask

    before, after = make_pair(shape=(200, 300), shift=(0.8, -1.1), noise=1.0)
    params = CoregParams(window_px=96)
    with dask.config.set(scheduler="synchronous"):
        expected = estimate_shift(before, after, params=params)
    with dask.config.set(scheduler="threads", num_workers=2):
        got = estimate_shift(before.chunk({"x": 100}), after.chunk({"x": 100}), params=params)
    assert int(expected.note.split()[0]) >= 2
    assert got == expected
