"""Tests for pipeline.core.indices: NDVI, NDBI, BSI on named bands, NaN-safe, NumPy or Dask."""

from __future__ import annotations

import dask.array
import numpy as np
import pytest
from numpy.testing import assert_allclose

from pipeline.core.indices import add_indices, bsi, ndbi, ndvi, normalized_difference
from pipeline.errors import GridError
from pipeline.testing import make_da

NAMES = ["red", "green", "blue", "nir", "swir16"]


def _bands(dask_backed: bool = False):
    """Five named bands, 2 x 3 px: a plain pixel, zeros, a NaN, and bright vegetation."""
    red = [[0.1, 0.0, np.nan], [0.05, 0.2, 0.3]]
    green = [[0.1, 0.0, 0.1], [0.08, 0.2, 0.3]]
    blue = [[0.05, 0.0, 0.1], [0.04, 0.2, 0.3]]
    nir = [[0.3, 0.0, 0.4], [0.5, 0.2, 0.1]]
    swir = [[0.2, 0.0, 0.3], [0.2, 0.2, 0.5]]
    arr = np.array([red, green, blue, nir, swir], np.float32)
    if dask_backed:
        arr = dask.array.from_array(arr, chunks=(5, 1, 2))
    return make_da(arr).assign_coords(band=NAMES)


@pytest.mark.parametrize("dask_backed", [False, True])
def test_ndvi_values_zero_and_nan(dask_backed):
    """NDVI is (nir-red)/(nir+red); 0/0 and NaN inputs give NaN; Dask stays lazy."""
    out = ndvi(_bands(dask_backed))
    assert isinstance(out.data, dask.array.Array) == dask_backed
    assert out.dims == ("y", "x") and out.dtype == np.float32 and out.name == "ndvi"
    assert_allclose(out.values, [[0.5, np.nan, np.nan], [0.9 / 1.1, 0.0, -0.5]], rtol=1e-6)


def test_ndbi_and_bsi_values():
    """NDBI = (swir-nir)/(swir+nir); BSI = ((swir+red)-(nir+blue))/((swir+red)+(nir+blue))."""
    da = _bands()
    assert_allclose(ndbi(da).values[0, 0], (0.2 - 0.3) / 0.5, rtol=1e-6)
    assert_allclose(bsi(da).values[0, 0], (0.3 - 0.35) / 0.65, rtol=1e-6)
    assert np.isnan(bsi(da).values[0, 1]) and np.isnan(bsi(da).values[0, 2])


@pytest.mark.parametrize("dask_backed", [False, True])
def test_add_indices_appends_bands_and_keeps_grid(dask_backed):
    """Indices become extra named bands; CRS and transform survive; NumPy equals Dask."""
    da = _bands(dask_backed)
    out = add_indices(da)
    assert list(out.band.values) == [*NAMES, "ndvi", "ndbi", "bsi"]
    assert out.dims == ("band", "y", "x") and out.dtype == np.float32
    assert out.rio.crs == "EPSG:32633" and out.rio.transform() == da.rio.transform()
    assert_allclose(out.sel(band="ndvi").values, ndvi(_bands()).values)
    assert_allclose(out.sel(band=NAMES).values, _bands().values)


def test_indices_need_their_bands():
    """A missing band or an unknown index is an error naming it."""
    da = _bands().sel(band=["red", "green", "blue"])
    with pytest.raises(GridError, match="NDVI needs bands nir, red; nir missing"):
        ndvi(da)
    with pytest.raises(ValueError, match="Unknown index evi"):
        add_indices(_bands(), ["evi"])
    assert add_indices(da, []) is da


def test_normalized_difference_broadcasts():
    """The generic kernel works on any two same-shaped arrays."""
    da = _bands()
    out = normalized_difference(da.sel(band="nir"), da.sel(band="swir16"), name="x")
    assert out.name == "x" and out.shape == (2, 3)
