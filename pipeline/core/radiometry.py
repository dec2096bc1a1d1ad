"""pipeline.core.radiometry: match the after image's radiometry to the before image, per band.

Statistics come from a regular subsample of at most ``_MAX_SAMPLE_PX`` pixels per band (every
k-th row and column, the same for NumPy and Dask input, so both give the same result); the
mapping is then applied to every pixel, lazily for Dask input.
"""

from __future__ import annotations

import math

import dask
import dask.array as da
import numpy as np
import xarray as xr
from scipy.stats import chi2

from pipeline.core.change import _require_same_grid
from pipeline.errors import GridError, NoValidDataError
from pipeline.model import NormalizeMethod

__all__ = ["normalize"]

_MAX_SAMPLE_PX = 1 << 20
_N_QUANTILES = 1024
_N_ITER = 5
_CHI2_KEEP = 0.99


def _sample(before: xr.DataArray, after: xr.DataArray, exclude) -> tuple[np.ndarray, ...]:
    """Strided subsample ``(band, n)`` of both dates and the ``(n,)`` exclusion mask."""
    ny, nx = before.sizes["y"], before.sizes["x"]
    step = max(1, math.ceil(math.sqrt(ny * nx / _MAX_SAMPLE_PX)))
    win = np.s_[::step, ::step]
    parts = [before.transpose("band", "y", "x").data[(slice(None), *win)],
             after.transpose("band", "y", "x").data[(slice(None), *win)]]
    if exclude is not None:
        parts.append(exclude.data[win] if isinstance(exclude, xr.DataArray) else exclude[win])
    if any(isinstance(p, da.Array) for p in parts):
        parts = list(dask.compute(*parts))
    b, a = (np.asarray(p, dtype=np.float64).reshape(p.shape[0], -1) for p in parts[:2])
    ex = np.asarray(parts[2], bool).ravel() if exclude is not None else np.zeros(b.shape[1], bool)
    return b, a, ex


def _quantile_table_np(b: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quantile mapping table ``(xp, fp)`` sending the values ``a`` onto the values ``b``."""
    levels = np.linspace(0.0, 1.0, _N_QUANTILES)
    qa, qb = np.quantile(a, levels), np.quantile(b, levels)
    # tied after-quantiles (integer data) map to the mean of their before-quantiles
    xp, inverse = np.unique(qa, return_inverse=True)
    fp = np.bincount(inverse, weights=qb) / np.bincount(inverse)
    return xp, fp


def _quantile_map_np(arr: np.ndarray, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """Piecewise-linear mapping of ``arr`` through ``(xp, fp)``, clamped at the ends; NaN kept."""
    out = np.interp(arr, xp, fp).astype(np.float32)
    out[np.isnan(arr)] = np.nan
    return out


def _tls_fit(b: np.ndarray, a: np.ndarray) -> tuple[float, float]:
    """Orthogonal (total least squares) fit ``b ~ gain * a + offset``, positive gain."""
    ma, mb = a.mean(), b.mean()
    sxx, syy = a.var(), b.var()
    sxy = ((a - ma) * (b - mb)).mean()
    if sxy > 0:
        gain = (syy - sxx + math.sqrt((syy - sxx) ** 2 + 4.0 * sxy**2)) / (2.0 * sxy)
    else:  # uncorrelated or inverted: fall back to matching the spreads
        gain = math.sqrt(syy / sxx) if sxx > 0 else 1.0
    return gain, mb - gain * ma


def _robust_sigma(x: np.ndarray) -> np.ndarray:
    """Per-row scaled median absolute deviation, floored to keep divisions finite."""
    mad = np.median(np.abs(x - np.median(x, axis=1, keepdims=True)), axis=1)
    return np.maximum(1.4826 * mad, 1e-6 * (np.abs(x).max() + 1.0))


def _fit_linear_np(b: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-band ``(gain, offset)`` mapping ``a`` onto ``b`` (both ``(band, n)``, all valid).

    Invariant pixels in the spirit of IR-MAD: start from a median/MAD fit, then repeat
    ``_N_ITER`` times: keep pixels whose squared standardized residuals summed over bands
    are below the ``_CHI2_KEEP`` chi-square quantile, and refit by orthogonal regression.
    """
    nb = b.shape[0]
    gain = _robust_sigma(b) / _robust_sigma(a)
    offset = np.median(b, axis=1) - gain * np.median(a, axis=1)
    cut = chi2.ppf(_CHI2_KEEP, df=nb)
    for _ in range(_N_ITER):
        resid = b - (gain[:, None] * a + offset[:, None])
        score = ((resid / _robust_sigma(resid)[:, None]) ** 2).sum(axis=0)
        keep = score < cut
        if keep.sum() < 2:
            break
        fits = [_tls_fit(b[i, keep], a[i, keep]) for i in range(nb)]
        gain = np.array([f[0] for f in fits])
        offset = np.array([f[1] for f in fits])
    return gain, offset


def _no_data_error(band) -> NoValidDataError:
    """The error for a band with no pixel valid in both dates."""
    return NoValidDataError(
        f"Band {band!r} has no pixel valid in both dates (outside 'exclude'), so the radiometry "
        "cannot be matched. Check the nodata masks and the AOI, or use normalize='none'."
    )


def _histogram_match(before, after, exclude) -> xr.DataArray:
    """Per-band quantile mapping of ``after`` onto ``before``."""
    b, a, ex = _sample(before, after, exclude)
    bands = []
    for i, band in enumerate(after["band"].values):
        ok = np.isfinite(b[i]) & np.isfinite(a[i]) & ~ex
        if not ok.any():
            raise _no_data_error(band)
        xp, fp = _quantile_table_np(b[i, ok], a[i, ok])
        bands.append(xr.apply_ufunc(
            _quantile_map_np, after.isel(band=i), kwargs={"xp": xp, "fp": fp},
            dask="parallelized", output_dtypes=[np.float32], keep_attrs=True,
        ))
    return xr.concat(bands, dim="band").transpose(*after.dims)


def _linear_match(before, after, exclude) -> xr.DataArray:
    """Per-band gain and offset fitted on invariant pixels, applied to ``after``."""
    b, a, ex = _sample(before, after, exclude)
    ok = np.isfinite(b).all(axis=0) & np.isfinite(a).all(axis=0) & ~ex
    if ok.sum() < 2:
        raise _no_data_error("all")
    gain, offset = _fit_linear_np(b[:, ok], a[:, ok])
    g = xr.DataArray(gain.astype(np.float32), dims="band", coords={"band": after["band"]})
    o = xr.DataArray(offset.astype(np.float32), dims="band", coords={"band": after["band"]})
    out = (after.astype(np.float32) * g + o).transpose(*after.dims)
    return out.assign_attrs(after.attrs)


def normalize(
    before: xr.DataArray,
    after: xr.DataArray,
    *,
    method: NormalizeMethod,
    exclude: xr.DataArray | np.ndarray | None = None,
) -> xr.DataArray:
    """Radiometrically match ``after`` to ``before``, band by band.

    Parameters
    ----------
    before, after
        Rasters on the same grid with the same bands, dims ``("band", "y", "x")``, NaN
        nodata, NumPy or Dask.
    method
        ``"histogram"``: quantile mapping (1024 quantiles) of after's values onto before's,
        both taken on the pixels valid in both dates. ``"linear"``: per-band gain and offset
        fitted by orthogonal regression on invariant pixels, chosen iteratively by a
        chi-square cut on the standardized residuals (IR-MAD-like; not the full canonical
        MAD transform). ``"none"``: ``after`` is returned unchanged.
    exclude
        Optional ``(y, x)`` boolean mask (True = leave out of the statistics), e.g. known
        change or cloud.

    Returns
    -------
    xarray.DataArray
        ``after`` matched to ``before``: same dims, coords and grid, float32, NaN where
        ``after`` is NaN. Lazy for Dask input; the statistics are computed from a regular
        subsample of at most about 2**20 pixels per band.

    Raises
    ------
    GridError
        If the rasters are not on the same grid or have different bands.
    NoValidDataError
        If no pixel is valid in both dates.
    ValueError
        If ``method`` is unknown.
    """
    if method == "none":
        return after
    if method not in ("histogram", "linear"):
        raise ValueError(
            f"Unknown normalize method {method!r}; use 'histogram', 'linear' or 'none'."
        )
    _require_same_grid(before, after)
    if before.sizes["band"] != after.sizes["band"]:
        raise GridError(
            f"'before' has {before.sizes['band']} bands, 'after' has {after.sizes['band']}. "
            "Select the same bands from both dates."
        )
    if method == "histogram":
        return _histogram_match(before, after, exclude)
    return _linear_match(before, after, exclude)
