"""Tests for pipeline.core.composite: SCL/QA masks, DN scaling, clear shares, median composite."""

from __future__ import annotations

import dask.array
import numpy as np
import pytest
import xarray as xr
from numpy.testing import assert_allclose, assert_array_equal

from pipeline.core.composite import (
    SCL_MASK_CLASSES,
    clear_observations,
    clear_share,
    median_composite,
    qa_pixel_clear,
    scl_clear,
    to_reflectance,
)


def _stack(values, dask_backed=False):
    """A (time, band, y, x) DataArray."""
    arr = np.asarray(values, np.float32)
    if dask_backed:
        arr = dask.array.from_array(arr, chunks=(1, arr.shape[1], 1, arr.shape[3]))
    return xr.DataArray(arr, dims=("time", "band", "y", "x"),
                        coords={"band": [f"b{i}" for i in range(arr.shape[1])]})


def _mask(values, dask_backed=False):
    arr = np.asarray(values, bool)
    if dask_backed:
        arr = dask.array.from_array(arr, chunks=(1, 1, arr.shape[2]))
    return xr.DataArray(arr, dims=("time", "y", "x"))


def test_scl_clear_masks_every_listed_class():
    """Classes 0, 1, 3, 8, 9, 10, 11 are masked; vegetation, soil, water, dark are clear."""
    scl = xr.DataArray(np.arange(12, dtype=np.uint8).reshape(3, 4), dims=("y", "x"))
    out = scl_clear(scl)
    expected = np.array([c not in SCL_MASK_CLASSES for c in range(12)]).reshape(3, 4)
    assert_array_equal(out.values, expected)
    assert out.dtype == bool
    floats = scl.astype(np.float32).where(scl != 4)
    assert not scl_clear(floats).values[1, 0]  # NaN (was 4) is not clear


@pytest.mark.parametrize("dask_backed", [False, True])
def test_qa_pixel_clear_bits(dask_backed):
    """Fill, dilated cloud, cirrus, cloud, shadow and snow bits mask; clear/water do not."""
    values = np.array([[1 << 6, 1 << 7, 1, 1 << 1], [1 << 2, 1 << 3, 1 << 4, 1 << 5]],
                      np.uint16)
    arr = dask.array.from_array(values, chunks=1) if dask_backed else values
    out = qa_pixel_clear(xr.DataArray(arr, dims=("y", "x")))
    assert isinstance(out.data, dask.array.Array) == dask_backed
    assert_array_equal(out.values, [[True, True, False, False], [False] * 4])
    only_cloud = qa_pixel_clear(xr.DataArray(values, dims=("y", "x")), mask_bits=[3])
    assert_array_equal(only_cloud.values, [[True, True, True, True], [True, False, True, True]])
    with pytest.raises(ValueError, match="0..15"):
        qa_pixel_clear(xr.DataArray(values, dims=("y", "x")), mask_bits=[16])


def test_to_reflectance_per_item_offset_and_nodata():
    """dn * scale + offset per (time, band); nodata becomes NaN; baselines harmonise."""
    dn = xr.DataArray(np.array([[[[1000, 0]]], [[[2000, 0]]]], np.uint16),
                      dims=("time", "band", "y", "x"))
    offset = xr.DataArray([[0.0], [-0.1]], dims=("time", "band"))
    out = to_reflectance(dn, scale=1e-4, offset=offset, nodata=0)
    assert out.dtype == np.float32 and out.dims == dn.dims
    assert_allclose(out.values[:, 0, 0, 0], [0.1, 0.1], atol=1e-7)
    assert np.isnan(out.values[:, 0, 0, 1]).all()
    assert out.values[0, 0, 0, 0] == out.values[1, 0, 0, 0]


@pytest.mark.parametrize("dask_backed", [False, True])
def test_median_composite_fills_masked_pixels(dask_backed):
    """A cloud in one observation is filled from the others; no clear view gives NaN."""
    data = _stack([[[[0.1, 0.2, 0.3]]], [[[0.9, 0.4, 0.5]]], [[[0.3, 0.6, np.nan]]]],
                  dask_backed)
    clear = _mask([[[True, True, False]], [[False, True, False]], [[True, True, True]]],
                  dask_backed)
    obs = clear_observations(data, clear)
    out = median_composite(data, obs)
    assert isinstance(out.data, dask.array.Array) == dask_backed
    assert out.dims == ("band", "y", "x") and out.dtype == np.float32
    assert_allclose(out.values[0, 0], [0.2, 0.4, np.nan], atol=1e-7)
    assert_allclose(clear_share(obs).values, [2 / 3, 1 / 3, 2 / 3])


def test_clear_observations_requires_every_band_valid():
    """A NaN in any band makes the observation unusable even if the mask says clear."""
    data = _stack([[[[0.1, np.nan]], [[0.2, 0.3]]]])
    obs = clear_observations(data, _mask([[[True, True]]]))
    assert_array_equal(obs.values, [[[True, False]]])


def test_median_composite_numpy_equals_dask():
    """Random stacks give identical composites with NumPy and Dask."""
    rng = np.random.default_rng(1)
    values = rng.random((4, 3, 8, 8)).astype(np.float32)
    flags = rng.random((4, 8, 8)) > 0.4
    a = median_composite(_stack(values), clear_observations(_stack(values), _mask(flags)))
    b = median_composite(_stack(values, True), clear_observations(_stack(values, True),
                                                                   _mask(flags, True)))
    assert_array_equal(a.values, b.values)
