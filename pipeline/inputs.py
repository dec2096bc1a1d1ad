"""pipeline.inputs: the read stage's checks of a before/after pair on the working grid.

Pixels outside the AOI polygon become NaN (so nothing beyond it is analysed or reported),
each date must have a valid pixel inside the AOI and the two must overlap there, and before
must not be later than after. NumPy scenes are checked in memory; Dask scenes lazily, block
by block, so the checks can share one pass with storing the masked inputs.
"""

from __future__ import annotations

from datetime import date
from typing import Any

import dask
import dask.array
import numpy as np
import xarray as xr
from affine import Affine
from rasterio import features
from shapely.geometry import box

from pipeline.aoi import Aoi, aoi_polygon_in
from pipeline.errors import FetchError, NoValidDataError
from pipeline.model import GridPlan, SourceRef

__all__ = ["mask_outside", "validity", "check_validity", "check_dates"]


def _nan_outside_np(block: np.ndarray, geometry: Any, transform: Affine,
                    block_info: dict | None = None) -> np.ndarray:
    """A ``(..., y, x)`` block with NaN outside ``geometry`` (new array for Dask blocks)."""
    ny, nx = block.shape[-2:]
    if block_info is not None:  # a Dask block: its own window of the grid
        (row0, _), (col0, _) = block_info[0]["array-location"][-2:]
        transform = transform * Affine.translation(col0, row0)
    (x0, x1), (y0, y1) = zip(transform * (0, 0), transform * (nx, ny), strict=True)
    if geometry.contains(box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))):
        return block  # every pixel (its centre half a pixel inside the block) is inside
    outside = features.geometry_mask([geometry], out_shape=(ny, nx), transform=transform)
    if outside.any():
        if block_info is not None:  # never write into a Dask input block
            block = block.copy()
        np.copyto(block, block.dtype.type(np.nan), where=outside)
    return block


def mask_outside(da: xr.DataArray, aoi: Aoi, plan: GridPlan) -> xr.DataArray:
    """NaN outside the AOI polygon, so nothing beyond it is analysed or reported.

    NumPy data are masked in place (the run owns the scenes ``load`` returns), so no second
    copy of the image exists; Dask data lazily, each block rasterising its own window.
    """
    geometry = aoi_polygon_in(aoi, plan.crs)
    data = da.data
    if da.dims[-2:] != ("y", "x") or not np.issubdtype(data.dtype, np.floating):
        outside = features.geometry_mask([geometry], out_shape=plan.shape,
                                         transform=plan.transform)
        return da.where(~xr.DataArray(outside, dims=("y", "x")))
    if isinstance(data, dask.array.Array):
        masked = dask.array.map_blocks(_nan_outside_np, data, geometry=geometry,
                                       transform=plan.transform, dtype=data.dtype)
        return da.copy(data=masked)
    if not data.flags.writeable:
        data = data.copy()
    return da.copy(data=_nan_outside_np(data, geometry, plan.transform), deep=False)


def validity(before: xr.DataArray, after: xr.DataArray) -> tuple[Any, Any, Any]:
    """Whether some pixel is valid in every band of before, of after, and of both.

    Lazy (Dask) results for Dask input, one small task per pair of blocks, so they share a
    pass with other work; plain booleans for NumPy.
    """
    b = before.transpose(..., "y", "x").data
    a = after.transpose(..., "y", "x").data
    if not (isinstance(b, dask.array.Array) or isinstance(a, dask.array.Array)):
        return _valid_np(b, a)
    b, a = dask.array.asarray(b), dask.array.asarray(a)
    if b.ndim != 3 or a.ndim != 3 or b.numblocks[0] != 1 or a.numblocks[0] != 1:
        b, a = (x.reshape((-1, *x.shape[-2:])).rechunk({0: -1}) for x in (b, a))
    if b.chunks[1:] != a.chunks[1:]:
        a = a.rechunk({1: b.chunks[1], 2: b.chunks[2]})
    # per pair of blocks, the three flags along a first axis of 3 (an array, not Delayed:
    # optimized with the other arrays of the pass, so the blocks are read once)
    flags = dask.array.map_blocks(
        _valid_block, b, a, dtype=bool,
        chunks=((3,), (1,) * b.numblocks[1], (1,) * b.numblocks[2]))
    found = flags.any(axis=(1, 2))
    return found[0], found[1], found[2]


def _valid_block(b: np.ndarray, a: np.ndarray) -> np.ndarray:
    """`_valid_np` of one pair of blocks as a ``(3, 1, 1)`` boolean array."""
    return np.array(_valid_np(b, a), bool).reshape(3, 1, 1)


def _valid_np(b: np.ndarray, a: np.ndarray) -> tuple[bool, bool, bool]:
    """`validity` of NumPy arrays ``(..., y, x)``, made one band at a time."""
    valid = []
    for data in (b, a):
        ok = np.ones(data.shape[-2:], bool)
        for index in np.ndindex(data.shape[:-2]):
            ok &= np.isfinite(data[index])
        valid.append(ok)
    if (valid[0] & valid[1]).any():
        return True, True, True
    return bool(valid[0].any()), bool(valid[1].any()), False


def check_validity(valid: tuple[Any, Any, Any], before_ref: SourceRef,
                    after_ref: SourceRef) -> None:
    """NoValidDataError when a date has no valid pixel in the AOI, or the two do not overlap."""
    for ok, role, ref in zip(valid[:2], ("before", "after"), (before_ref, after_ref), strict=True):
        if not ok:
            raise NoValidDataError(
                f"The {role} image {ref.path or ref.item_id} has no valid pixel inside the AOI: "
                "every pixel there is nodata (nodata value, masks or alpha). Choose an AOI over "
                "the image's valid area or another image."
            )
    if not valid[2]:
        raise NoValidDataError(
            f"The before image {before_ref.path or before_ref.item_id} and the after image "
            f"{after_ref.path or after_ref.item_id} have no valid pixel in "
            f"common inside the AOI: they do not overlap there. Choose images that both cover "
            f"the AOI, or an AOI where they overlap."
        )


def check_dates(before: date | None, after: date | None) -> None:
    """FetchError when both dates are known and before is later than after."""
    if before and after and before > after:
        raise FetchError(
            f"The before image is dated {before} and the after image {after}: before is later. "
            f"Swap --before and --after (or fix --before-date/--after-date)."
        )
