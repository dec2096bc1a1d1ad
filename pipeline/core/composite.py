"""pipeline.core.composite: cloud masks, reflectance scaling and per-pixel composites.

Pure kernels on arrays of several observations of one grid: ``time`` indexes observations
(items or acquisition dates), ``band`` the spectral bands. Each public function wraps a NumPy
kernel with ``xr.apply_ufunc(..., dask="parallelized")``, so NumPy and Dask input give the
same values and Dask input stays lazy. Nothing here reads files or computes Dask graphs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import xarray as xr

__all__ = [
    "SCL_MASK_CLASSES",
    "QA_PIXEL_MASK_BITS",
    "scl_clear",
    "qa_pixel_clear",
    "to_reflectance",
    "clear_observations",
    "clear_share",
    "median_composite",
]

#: Sentinel-2 scene classification classes that are not a clear view of the ground:
#: 0 no data, 1 saturated or defective, 3 cloud shadow, 8 cloud medium probability,
#: 9 cloud high probability, 10 thin cirrus, 11 snow or ice.
SCL_MASK_CLASSES: tuple[int, ...] = (0, 1, 3, 8, 9, 10, 11)

#: Landsat Collection 2 ``QA_PIXEL`` bits that make a pixel unusable.
QA_PIXEL_MASK_BITS: Mapping[str, int] = {
    "fill": 0,
    "dilated_cloud": 1,
    "cirrus": 2,
    "cloud": 3,
    "cloud_shadow": 4,
    "snow": 5,
}


def _scl_clear_np(scl: np.ndarray, mask_classes: tuple[int, ...]) -> np.ndarray:
    """True where the SCL class is not one of ``mask_classes`` (NaN counts as masked)."""
    scl = np.asarray(scl)
    clear = ~np.isin(scl, np.asarray(mask_classes))
    if np.issubdtype(scl.dtype, np.floating):
        clear &= np.isfinite(scl)
    return clear


def scl_clear(scl: xr.DataArray, *, mask_classes: Iterable[int] = SCL_MASK_CLASSES) -> xr.DataArray:
    """Clear-view mask from a Sentinel-2 scene classification (SCL) band.

    Parameters
    ----------
    scl
        SCL class codes, any dims (integer, or float with NaN as nodata).
    mask_classes
        Classes to mask (default ``SCL_MASK_CLASSES``).

    Returns
    -------
    xarray.DataArray
        Same dims, bool, True where the pixel is a clear view; lazy for Dask input.
    """
    out = xr.apply_ufunc(_scl_clear_np, scl, kwargs={"mask_classes": tuple(mask_classes)},
                         dask="parallelized", output_dtypes=[bool])
    return out.rename("clear")


def _qa_pixel_clear_np(qa: np.ndarray, bitmask: int) -> np.ndarray:
    """True where none of the ``bitmask`` bits is set (NaN counts as masked)."""
    qa = np.asarray(qa)
    if np.issubdtype(qa.dtype, np.floating):
        finite = np.isfinite(qa)
        bits = np.where(finite, qa, 1).astype(np.uint32)
        return finite & ((bits & np.uint32(bitmask)) == 0)
    return (qa.astype(np.uint32) & np.uint32(bitmask)) == 0


def qa_pixel_clear(qa: xr.DataArray, *,
                   mask_bits: Iterable[int] = tuple(QA_PIXEL_MASK_BITS.values())) -> xr.DataArray:
    """Clear-view mask from a Landsat Collection 2 ``QA_PIXEL`` band.

    Parameters
    ----------
    qa
        ``QA_PIXEL`` bit flags, any dims (integer, or float with NaN as nodata).
    mask_bits
        Bit numbers that make a pixel unusable (default: fill, dilated cloud, cirrus, cloud,
        cloud shadow, snow).

    Returns
    -------
    xarray.DataArray
        Same dims, bool, True where no masking bit is set; lazy for Dask input.
    """
    bitmask = 0
    for bit in mask_bits:
        if not 0 <= int(bit) < 16:
            raise ValueError(f"QA_PIXEL bits are numbered 0..15, got {bit!r}.")
        bitmask |= 1 << int(bit)
    out = xr.apply_ufunc(_qa_pixel_clear_np, qa, kwargs={"bitmask": bitmask},
                         dask="parallelized", output_dtypes=[bool])
    return out.rename("clear")


def _to_reflectance_np(dn: np.ndarray, scale: np.ndarray, offset: np.ndarray,
                       nodata: np.ndarray) -> np.ndarray:
    """``dn * scale + offset`` as float32, NaN where ``dn == nodata`` or ``dn`` is NaN."""
    dn = np.asarray(dn)
    # float64 arithmetic, so (dn + 1000) * 1e-4 - 0.1 and dn * 1e-4 round to the same float32
    out = dn.astype(np.float64) * scale + offset
    invalid = dn == nodata
    if np.issubdtype(dn.dtype, np.floating):
        invalid |= np.isnan(dn)
    return np.where(invalid, np.float32(np.nan), out).astype(np.float32)


def to_reflectance(dn: xr.DataArray, *, scale: float | xr.DataArray,
                   offset: float | xr.DataArray, nodata: float | xr.DataArray) -> xr.DataArray:
    """Digital numbers to reflectance: ``dn * scale + offset``, nodata to NaN.

    Parameters
    ----------
    dn
        Digital numbers, e.g. dims ``("time", "band", "y", "x")``.
    scale, offset
        Scalars, or DataArrays broadcast against ``dn`` by dimension name (e.g. dims
        ``("time", "band")`` for a per-item, per-band offset).
    nodata
        The DN that marks missing pixels (scalar or broadcastable DataArray).

    Returns
    -------
    xarray.DataArray
        ``dn``'s dims, float32, NaN nodata; lazy for Dask input.
    """
    args = [xr.DataArray(np.asarray(v, np.float64)) if not isinstance(v, xr.DataArray) else v
            for v in (scale, offset, nodata)]
    out = xr.apply_ufunc(_to_reflectance_np, dn, *args, dask="parallelized",
                         output_dtypes=[np.float32])
    return out.transpose(*dn.dims, ...).rename(dn.name)


def clear_observations(data: xr.DataArray, clear: xr.DataArray) -> xr.DataArray:
    """Observations that are clear in the mask and valid (finite) in every band.

    Parameters
    ----------
    data
        Reflectance, dims ``("time", "band", "y", "x")``, NaN nodata.
    clear
        Clear-view mask, dims ``("time", "y", "x")``.

    Returns
    -------
    xarray.DataArray
        Dims ``("time", "y", "x")``, bool; lazy for Dask input.
    """
    valid = data.notnull().all(dim="band")
    return (clear.astype(bool) & valid).transpose("time", "y", "x").rename("clear")


def clear_share(clear: xr.DataArray, *, dims: tuple[str, ...] = ("y", "x")) -> xr.DataArray:
    """Share of pixels that are True, over ``dims`` (e.g. per observation).

    Parameters
    ----------
    clear
        A boolean mask.
    dims
        Dimensions to average over.

    Returns
    -------
    xarray.DataArray
        The remaining dims, float64 in [0, 1]; lazy for Dask input.
    """
    return clear.astype(np.float64).mean(dim=list(dims)).rename("clear_share")


def _median_np(stack: np.ndarray, clear: np.ndarray) -> np.ndarray:
    """NaN-median over the last axis of the clear observations; NaN where none is clear."""
    use = clear & ~np.isnan(stack)
    none = ~use.any(axis=-1)
    # Fill pixels without any clear observation with 0 before the median and NaN after:
    # nanmedian would warn on them, and warning filters are not thread-safe under Dask.
    masked = np.where(use | none[..., None], np.where(use, stack, 0), np.nan).astype(np.float32)
    out = np.nanmedian(masked, axis=-1).astype(np.float32)
    out[none] = np.nan
    return out


def median_composite(data: xr.DataArray, clear: xr.DataArray, *,
                     dim: str = "time") -> xr.DataArray:
    """Per-pixel, per-band median of the clear observations.

    Parameters
    ----------
    data
        Reflectance with dims ``(dim, "band", "y", "x")``, NaN nodata.
    clear
        Which observations to use, dims ``(dim, "y", "x")`` (see ``clear_observations``).
    dim
        The observation dimension, reduced away.

    Returns
    -------
    xarray.DataArray
        Dims ``("band", "y", "x")``, float32, NaN where no observation is clear; lazy for
        Dask input (the observation dimension is gathered into one chunk).
    """
    out = xr.apply_ufunc(_median_np, data, clear, input_core_dims=[[dim], [dim]],
                         dask="parallelized", output_dtypes=[np.float32],
                         dask_gufunc_kwargs={"allow_rechunk": True})
    return out.transpose("band", "y", "x").rename(data.name)
