"""pipeline.core.change: pixel-wise change magnitude, its threshold and the cleaned change mask."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import dask
import dask.array as da
import numpy as np
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from skimage.morphology import disk

from pipeline.core.components import select_by_area
from pipeline.errors import GridError, NoValidDataError
from pipeline.model import ChangeParams, ThresholdMethod

__all__ = ["change_magnitude", "threshold_value", "change_mask", "require_same_grid", "MASK_NODATA"]

MASK_NODATA = 255
_N_BINS = 512
_STRIP_PX = 1 << 18  # pixels per strip in kernels: small temporaries, few page faults
_SMOOTH_TILE_PX = 256  # tiles of `_smoothed_valid_np`: only those near nodata are filtered


def require_same_grid(before: xr.DataArray, after: xr.DataArray) -> None:
    """Raise GridError unless both rasters share CRS, shape and x/y pixel centres."""
    crs_b, crs_a = before.rio.crs, after.rio.crs
    if crs_b is not None and crs_a is not None and crs_b != crs_a:
        raise GridError(
            f"Rasters are on different grids: 'before' is {crs_b.to_string()}, 'after' is "
            f"{crs_a.to_string()}. Align both to one grid first."
        )
    shape_b = (before.sizes.get("y"), before.sizes.get("x"))
    shape_a = (after.sizes.get("y"), after.sizes.get("x"))
    if None in shape_b or shape_b != shape_a:
        raise GridError(
            f"Rasters are on different grids: 'before' is {shape_b} (y, x) pixels, 'after' is "
            f"{shape_a}. Align both to one grid first."
        )
    for dim in ("y", "x"):
        cb, ca = np.asarray(before[dim]), np.asarray(after[dim])
        tol = 1e-6 * max(abs(float(cb[1] - cb[0])) if cb.size > 1 else 1.0, 1e-12)
        if not np.allclose(cb, ca, rtol=0.0, atol=tol):
            raise GridError(
                f"Rasters are on different grids: their {dim} pixel centres differ (first "
                f"{cb[0]!r} vs {ca[0]!r}). Align both to one grid first."
            )


def _cva_np(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Change-vector length over the last axis, divided by sqrt(n bands); NaN if any NaN.

    Accumulates ``(after - before)**2`` band by band in float32, a strip of rows at a time,
    so no float64 or whole-stack temporary is made.
    """
    n_bands = before.shape[-1]
    out = np.empty(before.shape[:-1], np.float32)
    if out.ndim == 0:
        return _cva_np(before[None], after[None]).reshape(())
    row_px = max(1, int(np.prod(out.shape[1:])))
    step = max(1, _STRIP_PX // row_px)
    for r in range(0, before.shape[0], step):
        acc = out[r:r + step]
        diff = np.empty(acc.shape, np.float32)
        for band in range(n_bands):
            np.subtract(after[r:r + step, ..., band], before[r:r + step, ..., band], out=diff,
                        dtype=np.float32)
            diff *= diff
            if band == 0:
                acc[...] = diff
            else:
                acc += diff
        acc /= np.float32(n_bands)
        np.sqrt(acc, out=acc)
    return out


def change_magnitude(before: xr.DataArray, after: xr.DataArray) -> xr.DataArray:
    """Change vector analysis: per-pixel length of the band-difference vector.

    Parameters
    ----------
    before, after
        Rasters on the same grid with the same bands, dims ``("band", "y", "x")``, NaN
        nodata, NumPy or Dask, radiometrically comparable (see `normalize`).

    Returns
    -------
    xarray.DataArray
        Dims ``("y", "x")``, float32, ``sqrt(mean_b (after_b - before_b)**2)`` (the
        Euclidean norm over sqrt(n bands), so in the data's units); NaN where either date is
        NaN in any band. Keeps the grid coords; lazy for Dask input.

    Raises
    ------
    GridError
        If the rasters are not on the same grid or have different band counts.
    """
    require_same_grid(before, after)
    if before.sizes["band"] != after.sizes["band"]:
        raise GridError(
            f"'before' has {before.sizes['band']} bands, 'after' has {after.sizes['band']}. "
            "Select the same bands from both dates."
        )
    after = after.assign_coords(x=before.x, y=before.y, band=before.band)
    out = xr.apply_ufunc(
        _cva_np,
        before,
        after,
        input_core_dims=[["band"], ["band"]],
        dask="parallelized",
        output_dtypes=[np.float32],
        dask_gufunc_kwargs={"allow_rechunk": True},
    )
    return out.transpose("y", "x").rename("change_magnitude")


def _kittler_np(counts: np.ndarray, edges: np.ndarray) -> float:
    """Kittler-Illingworth minimum-error threshold: upper edge of the last background bin."""
    p = counts.astype(np.float64) / counts.sum()
    centres = 0.5 * (edges[:-1] + edges[1:])
    width2 = (edges[1] - edges[0]) ** 2 / 12.0  # spread within a bin keeps variances > 0
    p1 = np.cumsum(p)[:-1]
    s1 = np.cumsum(p * centres)[:-1]
    q1 = np.cumsum(p * centres**2)[:-1]
    p2 = 1.0 - p1
    with np.errstate(divide="ignore", invalid="ignore"):
        m1, m2 = s1 / p1, (s1[-1] + p[-1] * centres[-1] - s1) / p2
        v1 = q1 / p1 - m1**2 + width2
        v2 = (q1[-1] + p[-1] * centres[-1] ** 2 - q1) / p2 - m2**2 + width2
        crit = (p1 * np.log(v1) + p2 * np.log(v2)
                - 2.0 * (p1 * np.log(p1) + p2 * np.log(p2)))
    ok = (p1 > 0) & (p2 > 1e-12) & (v1 > 0) & (v2 > 0)
    if not ok.any():
        return float(edges[1])
    return float(edges[int(np.argmin(np.where(ok, crit, np.inf))) + 1])


def _stats_np(block: np.ndarray) -> tuple[float, float, int]:
    """``(min, max, count)`` of the non-NaN values (``(inf, -inf, 0)`` when there are none)."""
    n_valid = int(np.count_nonzero(~np.isnan(block)))
    if n_valid == 0:
        return math.inf, -math.inf, 0
    return float(np.nanmin(block)), float(np.nanmax(block)), n_valid


def _histogram(data) -> tuple[np.ndarray, np.ndarray] | float:
    """Histogram of the non-NaN values, or the single value if they are all equal."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "All-NaN", RuntimeWarning)
        if isinstance(data, da.Array):  # one pass over the blocks for the three
            parts = dask.compute(*map(dask.delayed(_stats_np), data.to_delayed().ravel()))
            stats = (min(p[0] for p in parts), max(p[1] for p in parts),
                     sum(p[2] for p in parts))
        else:
            stats = (np.nanmin(data), np.nanmax(data), (~np.isnan(data)).sum()) if data.size else (
                np.nan, np.nan, 0)
    lo, hi, n_valid = (float(s) for s in stats)
    if n_valid == 0:
        raise NoValidDataError(
            "The change magnitude has no valid pixel to threshold: the two dates share no "
            "valid data. Check the nodata masks, the AOI and the dates."
        )
    if lo == hi:
        return lo
    edges = np.linspace(lo, hi, _N_BINS + 1)
    if isinstance(data, da.Array):
        counts = da.histogram(data, bins=edges)[0].compute()
    else:
        counts = np.histogram(data[~np.isnan(data)], bins=edges)[0]
    return counts, edges


def threshold_value(
    magnitude: xr.DataArray, *, method: ThresholdMethod, threshold: float | None = None
) -> float:
    """Return the change threshold: ``threshold`` if given, else Otsu's or Kittler-Illingworth's.

    Both automatic methods work on a 512-bin histogram of the valid values between their
    minimum and maximum. For Dask input this computes three reductions (a concrete number is
    the point of this function). Pixels with ``magnitude > threshold`` are change.

    Parameters
    ----------
    magnitude
        Change magnitude, any dims, NaN nodata, NumPy or Dask.
    method
        ``"otsu"`` (scikit-image, returns a bin centre) or ``"kittler"`` (minimum error,
        returns the upper edge of the last no-change bin).
    threshold
        Explicit threshold; returned as is when not None.

    Returns
    -------
    float
        The threshold. If every valid value is equal, that value (so nothing is change).

    Raises
    ------
    NoValidDataError
        If ``magnitude`` has no valid pixel (and no ``threshold`` is given).
    ValueError
        If ``method`` is unknown.
    """
    if threshold is not None:
        return float(threshold)
    if method not in ("otsu", "kittler"):
        raise ValueError(f"Unknown threshold method {method!r}; use 'otsu' or 'kittler'.")
    hist = _histogram(magnitude.data)
    if isinstance(hist, float):
        return hist
    counts, edges = hist
    if method == "kittler":
        return _kittler_np(counts, edges)
    return float(threshold_otsu(hist=(counts, 0.5 * (edges[:-1] + edges[1:]))))


def _smoothed_ones_np(shape: tuple[int, int], sigma: float) -> np.ndarray:
    """``gaussian_filter(ones(shape), sigma, mode="constant")``, bit for bit, made narrow.

    Along rows the all-ones input gives one value per row, so in the second (column) pass every
    column farther than the kernel radius from both edges gets the same value: only the edge
    columns and one interior column are filtered, then the interior one is repeated.
    """
    radius = int(4.0 * float(sigma) + 0.5)  # scipy's truncate=4.0
    ny, nx = shape
    narrow_nx = 4 * radius + 3
    if nx <= narrow_nx:
        return ndi.gaussian_filter(np.ones(shape), sigma, mode="constant")
    narrow = ndi.gaussian_filter(np.ones((ny, narrow_nx)), sigma, mode="constant")
    out = np.empty(shape)
    out[:, :radius] = narrow[:, :radius]
    out[:, radius:nx - radius] = narrow[:, 2 * radius + 1:2 * radius + 2]
    out[:, nx - radius:] = narrow[:, narrow_nx - radius:]
    return out


def _smoothed_valid_np(valid: np.ndarray, sigma: float) -> np.ndarray:
    """``gaussian_filter(valid.astype(float64), sigma, mode="constant")`` where it matters.

    Bit for bit at every valid pixel (elsewhere the smoothing is NaN anyway). The separable
    filter gives a pixel from the inputs within the kernel radius ``r`` on each axis, so in a
    tile whose neighbourhood (``r`` pixels around) holds no invalid pixel the weights equal
    those of an all-valid grid (`_smoothed_ones_np`); only tiles with both valid pixels and
    invalid ones in reach are filtered, each from its own window (the tile and ``r`` around).
    """
    radius = int(4.0 * float(sigma) + 0.5)  # scipy's truncate=4.0
    den = _smoothed_ones_np(valid.shape, sigma)
    if valid.all():
        return den
    ny, nx = valid.shape
    for r0 in range(0, ny, _SMOOTH_TILE_PX):
        r1 = min(r0 + _SMOOTH_TILE_PX, ny)
        for c0 in range(0, nx, _SMOOTH_TILE_PX):
            c1 = min(c0 + _SMOOTH_TILE_PX, nx)
            wr0, wr1 = max(0, r0 - radius), min(ny, r1 + radius)
            wc0, wc1 = max(0, c0 - radius), min(nx, c1 + radius)
            window = valid[wr0:wr1, wc0:wc1]
            if window.all() or not valid[r0:r1, c0:c1].any():
                continue
            filtered = ndi.gaussian_filter(window.astype(np.float64), sigma, mode="constant")
            den[r0:r1, c0:c1] = filtered[r0 - wr0:r1 - wr0, c0 - wc0:c1 - wc0]
    return den


def _smooth_np(mag: np.ndarray, sigma: float) -> np.ndarray:
    """NaN-aware Gaussian smoothing (normalized convolution); NaN stays NaN.

    ndimage filters in float64 whatever the input type, so the float32 values go in as they
    are (no float64 copy) and only the filtered result is float64.
    """
    valid = ~np.isnan(mag)
    fill = np.where(valid, mag, mag.dtype.type(0))
    num = ndi.gaussian_filter(fill, sigma, mode="constant", output=np.float64)
    del fill
    if mag.ndim == 2:  # the weights need be filtered only near invalid pixels
        den = _smoothed_valid_np(valid, sigma)
    else:
        den = ndi.gaussian_filter(valid.astype(np.float64), sigma, mode="constant")
    with np.errstate(invalid="ignore", divide="ignore"):
        np.divide(num, den, out=num)
    out = num.astype(np.float32)
    out[~valid] = np.nan
    return out


def _square3_np(binary: np.ndarray, *, erode: bool) -> np.ndarray:
    """Erosion (pixels outside count as False) or dilation by the full 3x3 square, separably.

    The same pixels as ``ndimage.binary_erosion`` / ``binary_dilation`` with a 3x3 structure
    and ``border_value=0``, from whole-array boolean operations.
    """
    out = binary.copy()
    for axis in (0, 1):
        src = out.copy()
        lo = [slice(None)] * 2
        hi = [slice(None)] * 2
        lo[axis], hi[axis] = slice(1, None), slice(None, -1)
        if erode:
            out[tuple(lo)] &= src[tuple(hi)]
            out[tuple(hi)] &= src[tuple(lo)]
            edge: list[slice | int] = [slice(None)] * 2
            for index in (0, -1):
                edge[axis] = index
                out[tuple(edge)] = False
        else:
            out[tuple(lo)] |= src[tuple(hi)]
            out[tuple(hi)] |= src[tuple(lo)]
    return out


def _open_np(binary: np.ndarray, radius: int) -> np.ndarray:
    """Binary opening with a disk (corners of 3x3 kept, so rectangles survive radius 1)."""
    footprint = disk(radius, strict_radius=False).astype(bool)
    if footprint.shape == (3, 3) and footprint.all() and binary.ndim == 2:
        # radius 1 is the full 3x3 square: separable, several times faster than ndimage
        return _square3_np(_square3_np(binary, erode=True), erode=False)
    return ndi.binary_opening(binary, structure=footprint)


def _map2d(kernel: Callable, data, depth: int, dtype, **kwargs):
    """Apply a 2-D neighbourhood kernel to NumPy, or chunk-wise with overlap to Dask."""
    if isinstance(data, da.Array):
        return data.map_overlap(kernel, depth=depth, boundary="none", dtype=dtype, **kwargs)
    return kernel(data, **kwargs)


def _sizes_np(labels: np.ndarray, n: int) -> np.ndarray:
    """Pixel count of each label ``0..n``, a strip at a time (bincount wants int64 labels)."""
    counts = np.zeros(n + 1, np.int64)
    step = max(1, _STRIP_PX // max(1, labels.shape[-1]))
    for r in range(0, labels.shape[0], step):
        counts += np.bincount(labels[r:r + step].ravel(), minlength=n + 1)
    return counts


def _remove_small_np(mask: np.ndarray, min_px: float) -> np.ndarray:
    """Drop 8-connected objects and fill 4-connected holes smaller than ``min_px`` pixels."""
    labels, n = ndi.label(mask, structure=np.ones((3, 3), bool))
    keep = _sizes_np(labels, n) >= min_px
    keep[0] = False
    mask = keep[labels]
    del labels  # int32 labels are 4 bytes a pixel: free them before labelling the holes
    holes, n = ndi.label(~mask)
    fill = _sizes_np(holes, n) < min_px
    fill[0] = False
    return mask | fill[holes]


def _remove_small_chunked(mask: da.Array, min_px: float,
                          persist: Callable[[da.Array], da.Array] | None) -> da.Array:
    """`_remove_small_np` chunk by chunk: components merged across chunk borders; lazy.

    Only the components' pixel counts are needed (`select_by_area`), not their labels.
    """
    kept = select_by_area(mask, lambda area: area >= min_px, connectivity=2, persist=persist)
    holes = select_by_area(~kept, lambda area: area < min_px, connectivity=1, persist=persist)
    return kept | holes


def change_mask(
    magnitude: xr.DataArray,
    *,
    params: ChangeParams,
    res_m: float,
    persist: Callable[[da.Array], da.Array] | None = None,
) -> tuple[xr.DataArray, float]:
    """Threshold and clean a change magnitude into a change mask.

    Steps: NaN-aware Gaussian smoothing (``params.smooth_sigma_px``, 0 to skip); threshold
    (`threshold_value` with ``params.threshold_method`` / ``params.threshold``, computed on
    the smoothed values); binary opening with a disk of ``params.opening_radius_px``; removal
    of 8-connected objects, and filling of 4-connected holes, smaller than
    ``params.min_region_area_m2 / res_m**2`` pixels.

    Parameters
    ----------
    magnitude
        Change magnitude, dims ``("y", "x")``, NaN nodata, NumPy or Dask.
    params
        Change parameters.
    res_m
        Pixel size in metres.
    persist
        For Dask input: applied to the smoothed magnitude, which the threshold and the mask
        then read three times, and to the per-chunk labels of the objects and holes that
        the size filter labels (`pipeline.core.components.select_by_area`); a function that
        computes an array once and returns it stored (e.g. on disk, chunk by chunk) saves
        the repeated passes. None recomputes them.

    Returns
    -------
    tuple
        ``(mask, threshold)``. ``mask`` has dims ``("y", "x")``, uint8: 1 change, 0 no
        change, 255 (``MASK_NODATA``) where ``magnitude`` is NaN, with ``magnitude``'s coords.
        For Dask input it is lazy and Dask-backed: smoothing and opening run chunk-wise with
        overlap, and the size filter uses connected components merged across chunk borders,
        so no step holds the whole grid (it reads what ``persist`` stored: keep those until
        the mask is computed).
        ``threshold`` is the float used, on the smoothed scale.

    Raises
    ------
    NoValidDataError
        If ``magnitude`` has no valid pixel.
    """
    if magnitude.dims != ("y", "x"):
        raise ValueError(f"change_mask expects dims ('y', 'x'), got {magnitude.dims}")
    data = magnitude.data
    sigma = params.smooth_sigma_px
    if sigma > 0:
        data = _map2d(_smooth_np, data, int(4.0 * sigma + 0.5) + 1, np.float32, sigma=sigma)
    if persist is not None and isinstance(data, da.Array):
        data = persist(data)
    thr = threshold_value(magnitude.copy(data=data), method=params.threshold_method,
                          threshold=params.threshold)
    valid = ~np.isnan(data)
    binary = valid & (data > thr)  # NaN compares False
    radius = params.opening_radius_px
    if radius > 0:
        binary = _map2d(_open_np, binary, 2 * radius + 1, bool, radius=radius)
    min_px = params.min_region_area_m2 / res_m**2
    if isinstance(binary, da.Array):
        if min_px > 1:
            binary = _remove_small_chunked(binary, min_px, persist)
        out = da.where(valid, binary.astype(np.uint8), np.uint8(MASK_NODATA)).astype(np.uint8)
    else:
        if min_px > 1:
            binary = _remove_small_np(binary, min_px)
        out = np.where(valid, binary.astype(np.uint8), np.uint8(MASK_NODATA)).astype(np.uint8)
    mask = xr.DataArray(out, dims=("y", "x"), coords=magnitude.coords, name="change_mask")
    mask.attrs.update({"threshold": thr, "nodata": MASK_NODATA})
    return mask, thr
