"""pipeline.testing.pairs: synthetic before/after pairs with a known changed block.

Every scene is deterministic from its ``seed``. Values are in digital-number-like units: a
textured background of mean about 100 and standard deviation about 25, and a changed block of
level ``CHANGE_LEVEL`` in every band of the after date.
"""

from __future__ import annotations

import math

import numpy as np
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
from affine import Affine

from pipeline.model import DetectParams, Evidence, GridPlan, SourceRef

__all__ = ["CHANGE_LEVEL", "make_grid", "make_da", "make_pair", "detect_pair"]

CHANGE_LEVEL = 230.0
_FINE_SIGMA_PX = 2.0
_COARSE_SIGMA_PX = 8.0


def make_grid(
    shape: tuple[int, int] = (32, 32),
    res_m: float = 10.0,
    crs: str = "EPSG:32633",
    origin: tuple[float, float] = (500000.0, 4800000.0),
) -> GridPlan:
    """Return the grid plan of a ``shape`` raster whose top-left corner is ``origin``.

    Parameters
    ----------
    shape
        ``(height, width)`` in pixels.
    res_m
        Pixel size in metres.
    crs
        Authority code of the grid CRS.
    origin
        ``(minx, maxy)`` of the top-left pixel corner.

    Returns
    -------
    GridPlan
        Bounds ``(minx, maxy - height*res, minx + width*res, maxy)``.
    """
    ny, nx = shape
    x0, y0 = origin
    return GridPlan(crs=crs, bounds=(x0, y0 - ny * res_m, x0 + nx * res_m, y0), res_m=res_m)


def make_da(
    array: np.ndarray,
    *,
    res_m: float = 10.0,
    crs: str = "EPSG:32633",
    origin: tuple[float, float] = (500000.0, 4800000.0),
) -> xr.DataArray:
    """Wrap a ``(band, y, x)`` array as a georeferenced DataArray.

    Parameters
    ----------
    array
        NumPy or Dask array of shape ``(band, y, x)``; a 2-D array gets one band.
    res_m, crs, origin
        As in `make_grid`.

    Returns
    -------
    xarray.DataArray
        Dims ``("band", "y", "x")``, bands numbered from 1, x/y coordinates at pixel centres,
        rioxarray ``spatial_ref`` coordinate carrying ``crs`` and the transform. Same backing
        array (no copy, no compute).
    """
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise ValueError(f"make_da expects a (band, y, x) array, got shape {array.shape}")
    plan = make_grid(array.shape[1:], res_m=res_m, crs=crs, origin=origin)
    x0, y0 = origin
    xs = x0 + (np.arange(array.shape[2]) + 0.5) * res_m
    ys = y0 - (np.arange(array.shape[1]) + 0.5) * res_m
    da = xr.DataArray(
        array,
        dims=("band", "y", "x"),
        coords={"band": np.arange(1, array.shape[0] + 1), "y": ys, "x": xs},
    )
    return da.rio.write_crs(crs).rio.write_transform(plan.transform)


def _lowpass_spectrum(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float):
    """Spectrum of unit-variance white noise low-passed by a Gaussian of ``sigma_px``."""
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.fftfreq(shape[1])[None, :]
    spec = np.fft.fft2(rng.standard_normal(shape))
    spec *= np.exp(-2.0 * math.pi**2 * sigma_px**2 * (fy**2 + fx**2))
    field = np.fft.ifft2(spec).real
    return spec / field.std()


def _render(spec: np.ndarray, shift: tuple[float, float]) -> np.ndarray:
    """Real field of ``spec`` with its content moved by ``shift`` (exact Fourier shift)."""
    fy = np.fft.fftfreq(spec.shape[0])[:, None]
    fx = np.fft.fftfreq(spec.shape[1])[None, :]
    phase = np.exp(-2j * math.pi * (fy * shift[0] + fx * shift[1]))
    return np.fft.ifft2(spec * phase).real


def _textures(
    rng: np.random.Generator, shape: tuple[int, int], bands: int, shift: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Background of both dates on a padded periodic canvas, cropped to ``shape``."""
    margin = int(math.ceil(max(abs(shift[0]), abs(shift[1])))) + 4 * int(_COARSE_SIGMA_PX)
    canvas = (shape[0] + 2 * margin, shape[1] + 2 * margin)
    fine = _lowpass_spectrum(rng, canvas, _FINE_SIGMA_PX)
    coarse = _lowpass_spectrum(rng, canvas, _COARSE_SIGMA_PX)
    per_band = [_lowpass_spectrum(rng, canvas, _FINE_SIGMA_PX) for _ in range(bands)]
    crop = np.s_[margin : margin + shape[0], margin : margin + shape[1]]
    out = []
    # after = before's content moved by -shift, so ndimage.shift(after, shift) ~ before
    for move in ((0.0, 0.0), (-shift[0], -shift[1])):
        low = _render(coarse, move)
        stack = [
            100.0 + 18.0 * _render(fine + 0.3 * pb, move) + 15.0 * (1 + 0.2 * b) * low
            for b, pb in enumerate(per_band)
        ]
        out.append(np.stack(stack)[(slice(None), *crop)])
    return out[0], out[1]


def make_pair(
    shape: tuple[int, int] = (64, 64),
    bands: int = 3,
    change: tuple[slice, slice] | None = np.s_[20:30, 20:30],
    noise: float = 0.0,
    nodata_frac: float = 0.0,
    shift: tuple[float, float] = (0.0, 0.0),
    gain: float = 1.0,
    offset: float = 0.0,
    seed: int = 0,
    res_m: float = 10.0,
    crs: str = "EPSG:32633",
) -> tuple[xr.DataArray, xr.DataArray]:
    """Return a synthetic ``(before, after)`` pair with a known changed block.

    Parameters
    ----------
    shape
        ``(height, width)`` in pixels.
    bands
        Number of bands.
    change
        ``(rows, cols)`` slices of the changed block in the after image (set to
        ``CHANGE_LEVEL`` in every band, after gain and offset), or None for no change.
    noise
        Standard deviation of independent Gaussian noise added to each date.
    nodata_frac
        Fraction of the frame set to NaN: that many leftmost columns of the after image and
        topmost rows of the before image.
    shift
        ``(dy, dx)`` in pixels in the `CoregResult` sign convention: the after background is
        displaced so that ``scipy.ndimage.shift(after, shift)`` lands on before. A correct
        co-registration returns exactly ``shift``. Sub-pixel shifts are exact Fourier shifts.
    gain, offset
        Radiometric change of the after date: ``after = gain * background + offset``.
    seed
        Seed of the random generator; equal arguments give equal arrays.
    res_m, crs
        Grid of both images (origin ``(500000, 4800000)``).

    Returns
    -------
    tuple of xarray.DataArray
        ``(before, after)``, dims ``("band", "y", "x")``, float32, NaN nodata, NumPy-backed,
        on the same grid.
    """
    rng = np.random.default_rng(seed)
    before, after = _textures(rng, shape, bands, shift)
    after = gain * after + offset
    if change is not None:
        after[(slice(None), *change)] = CHANGE_LEVEL
    if noise > 0:
        before = before + rng.normal(0.0, noise, before.shape)
        after = after + rng.normal(0.0, noise, after.shape)
    before, after = before.astype(np.float32), after.astype(np.float32)
    if nodata_frac > 0:
        after[:, :, : int(round(nodata_frac * shape[1]))] = np.nan
        before[:, : int(round(nodata_frac * shape[0])), :] = np.nan
    return make_da(before, res_m=res_m, crs=crs), make_da(after, res_m=res_m, crs=crs)


def detect_pair(
    before: np.ndarray,
    after: np.ndarray,
    *,
    transform: Affine,
    crs: str = "EPSG:32633",
    params: DetectParams | None = None,
    timings: dict[str, float] | None = None,
) -> list[Evidence]:
    """Change mask and site detection on an aligned ``(band, y, x)`` pair, as ``detect`` runs
    them after co-registration and normalization (neither is applied here).

    Returns
    -------
    The `pipeline.detect.sites.detect_sites` evidence (sources named ``synthetic``).
    """
    from pipeline.core.change import change_magnitude, change_mask
    from pipeline.detect.sites import detect_sites

    params = params or DetectParams()
    res_m = abs(transform.a)
    origin = (transform.c, transform.f)
    b, a = (make_da(x, res_m=res_m, crs=crs, origin=origin) for x in (before, after))
    magnitude = change_magnitude(b, a)
    mask, threshold = change_mask(magnitude, params=params.change, res_m=res_m)
    ref = SourceRef(provider="synthetic", item_id="pair")
    return detect_sites(before, after, np.asarray(mask.values), np.asarray(magnitude.values),
                        transform=transform, crs=crs, threshold=threshold, params=params,
                        before_ref=ref, after_ref=ref, timings=timings)
