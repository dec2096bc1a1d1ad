"""pipeline.core.indices: spectral indices (NDVI, NDBI, BSI) from surface reflectance.

Inputs are DataArrays with a ``band`` coordinate of band names (``red``, ``green``, ``blue``,
``nir``, ``swir16``), float reflectance with NaN as nodata, NumPy- or Dask-backed. Every index
is NaN where an input is NaN or its denominator is zero, and lazy for Dask input.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr

from pipeline.errors import GridError

__all__ = ["INDEX_BANDS", "normalized_difference", "ndvi", "ndbi", "bsi", "add_indices"]

#: The bands each index needs.
INDEX_BANDS: dict[str, tuple[str, ...]] = {
    "ndvi": ("nir", "red"),
    "ndbi": ("swir16", "nir"),
    "bsi": ("swir16", "red", "nir", "blue"),
}


def _normalized_difference_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(a - b) / (a + b)`` as float32; NaN where the sum is zero or an input is NaN."""
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    total = a + b
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (a - b) / total
    return np.where(total == 0, np.float32(np.nan), out).astype(np.float32)


def normalized_difference(a: xr.DataArray, b: xr.DataArray, *, name: str = "nd") -> xr.DataArray:
    """Normalized difference ``(a - b) / (a + b)`` of two same-shaped arrays.

    Parameters
    ----------
    a, b
        Reflectance arrays on the same grid (NumPy or Dask).
    name
        Name of the result.

    Returns
    -------
    xarray.DataArray
        Same dims as the inputs, float32, NaN where an input is NaN or ``a + b == 0``;
        lazy for Dask input.
    """
    out = xr.apply_ufunc(_normalized_difference_np, a, b, dask="parallelized",
                         output_dtypes=[np.float32], keep_attrs=False)
    return out.rename(name)


def _bands(da: xr.DataArray, index: str) -> list[xr.DataArray]:
    """The bands ``index`` needs, without the band dimension; GridError if one is missing."""
    if "band" not in da.dims:
        raise GridError(f"Computing {index.upper()} needs a 'band' dimension; got dims "
                        f"{da.dims}. Pass a (band, y, x) array with band names.")
    names = [str(b) for b in da["band"].values]
    missing = [b for b in INDEX_BANDS[index] if b not in names]
    if missing:
        raise GridError(f"{index.upper()} needs bands {', '.join(INDEX_BANDS[index])}; "
                        f"{', '.join(missing)} missing from {names}. Load those bands first.")
    return [da.sel(band=b, drop=True) for b in INDEX_BANDS[index]]


def ndvi(da: xr.DataArray) -> xr.DataArray:
    """Normalized difference vegetation index ``(nir - red) / (nir + red)``.

    Parameters
    ----------
    da
        Reflectance with a ``band`` coordinate holding ``nir`` and ``red``.

    Returns
    -------
    xarray.DataArray
        ``da``'s dims without ``band``, float32 in [-1, 1], NaN nodata; lazy for Dask input.

    Raises
    ------
    GridError
        If a needed band is missing.
    """
    nir, red = _bands(da, "ndvi")
    return normalized_difference(nir, red, name="ndvi")


def ndbi(da: xr.DataArray) -> xr.DataArray:
    """Normalized difference built-up index ``(swir16 - nir) / (swir16 + nir)``.

    Parameters
    ----------
    da
        Reflectance with a ``band`` coordinate holding ``swir16`` and ``nir``.

    Returns
    -------
    xarray.DataArray
        ``da``'s dims without ``band``, float32 in [-1, 1], NaN nodata; lazy for Dask input.

    Raises
    ------
    GridError
        If a needed band is missing.
    """
    swir, nir = _bands(da, "ndbi")
    return normalized_difference(swir, nir, name="ndbi")


def bsi(da: xr.DataArray) -> xr.DataArray:
    """Bare soil index ``((swir16 + red) - (nir + blue)) / ((swir16 + red) + (nir + blue))``.

    Parameters
    ----------
    da
        Reflectance with a ``band`` coordinate holding ``swir16``, ``red``, ``nir``, ``blue``.

    Returns
    -------
    xarray.DataArray
        ``da``'s dims without ``band``, float32 in [-1, 1], NaN nodata; lazy for Dask input.

    Raises
    ------
    GridError
        If a needed band is missing.
    """
    swir, red, nir, blue = _bands(da, "bsi")
    return normalized_difference(swir + red, nir + blue, name="bsi")


_INDEX_FUNCS = {"ndvi": ndvi, "ndbi": ndbi, "bsi": bsi}


def add_indices(da: xr.DataArray, names: Sequence[str] = ("ndvi", "ndbi", "bsi")) -> xr.DataArray:
    """Append indices to ``da`` as extra bands named after them.

    Parameters
    ----------
    da
        Reflectance with a ``band`` coordinate of band names.
    names
        Indices to add, from ``INDEX_BANDS``.

    Returns
    -------
    xarray.DataArray
        ``da`` with ``len(names)`` more bands at the end of ``band``, float32, NaN nodata,
        same grid and georeferencing; lazy for Dask input.

    Raises
    ------
    GridError
        If a needed band is missing.
    ValueError
        If an index name is unknown.
    """
    unknown = [n for n in names if n not in _INDEX_FUNCS]
    if unknown:
        raise ValueError(f"Unknown index {', '.join(unknown)}; use any of "
                         f"{', '.join(_INDEX_FUNCS)}.")
    if not names:
        return da
    layers = [_INDEX_FUNCS[n](da).expand_dims(band=[n]) for n in names]
    out = xr.concat([da.astype(np.float32), *layers], dim="band", coords="minimal",
                    compat="override", join="override")
    return out.transpose(*da.dims).assign_attrs(da.attrs)
