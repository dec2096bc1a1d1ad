"""pipeline.core.coreg_windows: the windows co-registration measures its shift in.

Windows are chosen on a subsampled band mean of both dates: textured in both, mostly valid,
overlapping little, so that each gives a nearly independent measurement of the shift. Frames
smaller than two windows a side get smaller windows (down to ``MIN_WINDOW_PX``), so that even a
small frame yields several measurements whose agreement can be checked.
"""

from __future__ import annotations

import math

import dask
import numpy as np
import xarray as xr
from scipy import ndimage as ndi

from pipeline.errors import NoValidDataError

__all__ = ["MAX_WINDOWS", "MIN_WINDOW_PX", "band_mean", "window_size_px", "select_windows"]

MAX_WINDOWS = 5
MIN_WINDOW_PX = 64
_MIN_VALID_FRAC = 0.75
_MAX_OVERLAP = 0.25
_SCORE_MAX_PX = 1 << 22


def band_mean(stack: xr.DataArray, rows: slice, cols: slice):
    """Band mean of a window of a ``(band, y, x)`` stack, sliced first: only the window is read.

    Returns the window's data (NumPy or lazy Dask), NaN where any band is NaN.
    """
    return stack.isel(y=rows, x=cols).mean("band", skipna=False).data


def window_size_px(ny: int, nx: int, window_px: int) -> tuple[int, int]:
    """Side ``(h, w)`` of the measuring windows on a ``ny`` x ``nx`` frame.

    ``window_px``, but no more than half the shorter side (so that at least four windows fit),
    and no less than ``MIN_WINDOW_PX``; never more than the frame.
    """
    side = min(window_px, max(MIN_WINDOW_PX, min(ny, nx) // 2))
    return min(side, ny), min(side, nx)


def _window_starts(n: int, size: int) -> list[int]:
    """Start offsets of windows of ``size`` along an axis of ``n``, half-overlapping."""
    step = max(1, size // 2)
    return sorted({*range(0, n - size + 1, step), n - size})


def _texture_np(img: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Gradient magnitude relative to its mean over ``ok``; zero where not ``ok``."""
    fill = np.where(ok, img, img[ok].mean())
    grad = np.hypot(ndi.sobel(fill, 0), ndi.sobel(fill, 1))
    grad = np.where(ndi.binary_erosion(ok, iterations=2, border_value=1), grad, 0.0)
    return grad / max(grad[ok].mean(), 1e-12)


def _integral(img: np.ndarray) -> np.ndarray:
    """Summed-area table of ``img`` (float64), a zero row and column first."""
    return np.pad(np.asarray(img, np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))


def _subsampled(before: xr.DataArray, after: xr.DataArray, exclude, step: int):
    """Both dates' band means every ``step`` pixels and where both are usable."""
    every = slice(None, None, step)
    sub_r, sub_m = (np.asarray(a, dtype=np.float64) for a in dask.compute(
        band_mean(before, every, every), band_mean(after, every, every)))
    ok = np.isfinite(sub_r) & np.isfinite(sub_m)
    if exclude is not None:
        ok &= ~np.asarray(exclude[::step, ::step], dtype=bool)
    if ok.sum() < 16:
        raise NoValidDataError(
            "No overlap of valid pixels between 'before' and 'after' to co-register on. "
            "Check the nodata masks and the AOI, or disable co-registration (coreg.enabled)."
        )
    return sub_r, sub_m, ok


def select_windows(
    before: xr.DataArray, after: xr.DataArray, exclude, window_px: int
) -> list[tuple[int, int, int, int]]:
    """Up to ``MAX_WINDOWS`` windows ``(y0, x0, h, w)`` textured in both dates, mostly valid.

    Parameters
    ----------
    before, after
        Rasters on the same grid, dims ``("band", "y", "x")``, NaN nodata, NumPy or Dask.
    exclude
        ``(y, x)`` boolean array of pixels not to register on, or None.
    window_px
        Largest window side (`window_size_px`).

    Returns
    -------
    list
        Windows in full-resolution pixels, best first: ranked by the weaker date's texture
        among windows at least 75% valid, overlapping each other by at most 25%.

    Raises
    ------
    NoValidDataError
        If no valid pixel is shared by both dates.
    """
    ny, nx = before.sizes["y"], before.sizes["x"]
    step = max(1, math.ceil(math.sqrt(ny * nx / _SCORE_MAX_PX)))
    sub_r, sub_m, ok = _subsampled(before, after, exclude, step)
    # both dates' textures, and the valid pixels' integral image, in parallel
    texture, integral = (dask.delayed(f, pure=False) for f in (_texture_np, _integral))
    tex_r, tex_m, integ_ok = dask.compute(texture(sub_r, ok), texture(sub_m, ok), integral(ok))
    integ = [_integral(np.minimum(tex_r, tex_m)), integ_ok]
    h_full, w_full = window_size_px(ny, nx, window_px)
    hy, hx = max(1, h_full // step), max(1, w_full // step)
    cands = []
    for y0 in _window_starts(ok.shape[0], hy):
        for x0 in _window_starts(ok.shape[1], hx):
            t, v = (c[y0 + hy, x0 + hx] - c[y0, x0 + hx] - c[y0 + hy, x0] + c[y0, x0]
                    for c in integ)
            enough = v / (hy * hx) >= _MIN_VALID_FRAC
            # rank mostly-valid windows by texture; failing that, by valid pixels
            cands.append((enough, t / max(v, 1.0) if enough else v, y0, x0))
    cands.sort(reverse=True)
    chosen: list[tuple[int, int]] = []
    for _, _, y0, x0 in cands:
        overlap = [max(0, hy - abs(y0 - cy)) * max(0, hx - abs(x0 - cx)) for cy, cx in chosen]
        if all(o <= _MAX_OVERLAP * hy * hx for o in overlap):
            chosen.append((y0, x0))
        if len(chosen) == MAX_WINDOWS or not cands[0][0]:
            break
    return [(min(y0 * step, ny - h_full), min(x0 * step, nx - w_full), h_full, w_full)
            for y0, x0 in chosen]
