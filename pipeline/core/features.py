"""pipeline.core.features: per-pixel feature stack of a before/after pair for a learned detector.

The features describe, at every pixel, what each date looks like (colour, texture, edges, small
dark or bright structures such as shadows and roofs) and how the two dates differ (colour
change at several scales, before and after histogram matching, change of texture and edges,
whether the gradients still point the same way). They are the input of
`pipeline.detect.learned.predict_change`; the names in `FEATURE_NAMES` are part of a trained
model's contract, so changing a feature means retraining (``make train``).

Radiometry is made comparable before anything is measured, so that imagery from another sensor
or season lands in the same ranges: each date is stretched so that its 1st and 99th percentiles
(taken jointly over the three bands, which keeps the hue) become 0 and 1, and a copy of the
after date is histogram-matched to the before date band by band (256 quantiles). Scales are in
pixels: the features assume a pixel of roughly 0.3-1 m (buildings of tens of pixels).
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from scipy import ndimage as ndi
from skimage.color import rgb2lab
from skimage.segmentation import watershed

from pipeline.core.quantiles import quantile_table

__all__ = ["FEATURE_NAMES", "N_FEATURES", "pixel_features", "feature_stack"]

_EPS = 1e-6
_TOPHAT_PX = 9
_N_QUANTILES = 256
_SEED_PX = 12

# One date's features; each is computed for "b" (before) and "a" (after).
_DATE_FEATURES = (
    "r_s1", "g_s1", "b_s1",            # stretched colour, Gaussian sigma 1 px
    "lab_l_s1", "lab_a_s1", "lab_b_s1",  # CIE Lab (L/100, a/128, b/128), sigma 1
    "hsv_s_s1",                        # HSV saturation, sigma 1
    "lab_l_s4", "lab_a_s4", "lab_b_s4",  # Lab context, sigma 4
    "std_l_s2", "std_l_s6",            # local standard deviation of L (texture), sigma 2 and 6
    "grad_s1",                         # gradient magnitude of L (Sobel after sigma 1)
    "edge_density_s4",                 # gradient magnitude averaged over sigma 4
    "coherence_s3",                    # structure-tensor coherence (straight edges), sigma 3
    "black_tophat",                    # closing(L) - L, 9 px: small dark things (shadows)
    "white_tophat",                    # L - opening(L), 9 px: small bright things (roofs)
    "exg_s2",                          # excess green 2g - r - b (vegetation), sigma 2
)
# Features of the pair ("a" is the after date matched to the before date unless "raw").
_PAIR_FEATURES = (
    "cva_s1", "cva_s2", "cva_s4", "cva_s8", "cva_s16",  # colour-change length, matched RGB
    "cva_raw_s2",                      # the same on the stretched but unmatched dates
    "d_lab_l_s2", "d_lab_a_s2", "d_lab_b_s2",  # signed Lab change, sigma 2
    "d_std_l_s2", "d_std_l_s6",        # texture change (after - before)
    "d_edge_density_s4",               # edge-density change
    "log_edge_ratio_s4",               # log((edges_a + e) / (edges_b + e))
    "grad_agreement_s2", "grad_agreement_s6",  # gradient-direction agreement (-1..1)
    "corr_l_s3",                       # local correlation of L between the dates
    "d_exg_s2",                        # vegetation change
    "d_coherence_s3",                  # change of straight-edge structure
    "d_black_tophat",                  # change of small dark structures (new shadows)
    "d_black_tophat_s4",               # the same averaged over sigma 4 (shadow nearby)
)
# Means over superpixels (watershed of both dates' gradients from seeds every _SEED_PX px), so
# that the inside of a new roof gets the evidence of its whole region, not only of its edges.
_SEGMENT_OF = ("cva_s1", "d_lab_l_s2", "d_lab_a_s2", "d_lab_b_s2", "a_std_l_s2", "b_std_l_s2",
               "grad_agreement_s2", "d_black_tophat", "d_exg_s2", "a_lab_l_s1", "a_lab_a_s1",
               "a_lab_b_s1")
_SEGMENT_FEATURES = (*(f"seg_mean_{n}" for n in _SEGMENT_OF),
                     "seg_std_cva_s1",                 # spread of the change inside the region
                     "seg_log_area")                   # log of the region's size in pixels
_PIXEL_NAMES = (*(f"{d}_{n}" for d in ("b", "a") for n in _DATE_FEATURES), *_PAIR_FEATURES)
FEATURE_NAMES: tuple[str, ...] = (*_PIXEL_NAMES, *_SEGMENT_FEATURES)
N_FEATURES = len(FEATURE_NAMES)


def _g(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing with reflected edges, truncated at 3 sigma."""
    return ndi.gaussian_filter(x, sigma, mode="reflect", truncate=3.0)


def _fill_nan(img: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Replace invalid pixels by each band's median of the valid ones (0 if none)."""
    out = img.copy()
    for band in out:
        vals = band[valid]
        band[~valid] = np.median(vals) if vals.size else 0.0
    return out


def _stretch(img: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Joint 1-99 % stretch of a (3, y, x) image over its valid pixels; not clipped."""
    vals = img[:, valid]
    if vals.size == 0:
        return np.zeros_like(img)
    lo, hi = np.percentile(vals[:, :: max(1, vals.shape[1] // 250_000)], [1.0, 99.0])
    return ((img - lo) / max(hi - lo, _EPS)).astype(np.float32)


def _match(src: np.ndarray, ref: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Quantile-map each band of ``src`` onto ``ref`` using the valid pixels."""
    out = np.empty_like(src)
    levels = np.linspace(0.0, 1.0, _N_QUANTILES)
    step = max(1, int(valid.sum()) // 250_000)
    for i in range(src.shape[0]):
        if not valid.any():
            out[i] = src[i]
            continue
        xp, fp = quantile_table(src[i][valid][::step], ref[i][valid][::step], levels)
        out[i] = np.interp(src[i], xp, fp) if xp.size > 1 else fp[0]
    return out


def _local_std(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-weighted local standard deviation."""
    m = _g(x, sigma)
    return np.sqrt(np.maximum(_g(x * x, sigma) - m * m, 0.0))


def _lab_sat(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scaled CIE Lab (L/100, a/128, b/128) and HSV saturation of a stretched date (clipped 0-1)."""
    clipped = np.moveaxis(np.clip(rgb, 0.0, 1.0), 0, -1)
    lab = np.moveaxis(rgb2lab(clipped), -1, 0).astype(np.float32)
    lab *= np.array([1 / 100.0, 1 / 128.0, 1 / 128.0], np.float32)[:, None, None]
    mx, mn = clipped.max(axis=-1), clipped.min(axis=-1)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, _EPS), 0.0).astype(np.float32)
    return lab, sat


def _structure(rgb: np.ndarray) -> dict[str, np.ndarray]:
    """Named per-date maps that the pair features also need (Lab, gradients, texture, edges)."""
    lab, sat = _lab_sat(rgb)
    lum = lab[0]
    s = _g(lum, 1.0)
    gy, gx = ndi.sobel(s, axis=0) / 8.0, ndi.sobel(s, axis=1) / 8.0
    jxx, jyy, jxy = _g(gx * gx, 3.0), _g(gy * gy, 3.0), _g(gx * gy, 3.0)
    grad = np.hypot(gy, gx)
    return {
        "lab": lab, "sat": sat, "gy": gy, "gx": gx, "grad": grad,
        "edges": _g(grad, 4.0),
        # structure-tensor coherence (l1 - l2) / (l1 + l2): 1 along one straight edge
        "coh": np.sqrt((jxx - jyy) ** 2 + 4.0 * jxy**2) / (jxx + jyy + 1e-4),
        "black": ndi.grey_closing(lum, size=_TOPHAT_PX) - lum,
        "white": lum - ndi.grey_opening(lum, size=_TOPHAT_PX),
        "exg": _g(2.0 * rgb[1] - rgb[0] - rgb[2], 2.0),
        "std2": _local_std(lum, 2.0), "std6": _local_std(lum, 6.0),
    }


def _date_features(rgb: np.ndarray, k: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The `_DATE_FEATURES` of one stretched (3, y, x) date, in order."""
    lab = k["lab"]
    return [*(_g(c, 1.0) for c in rgb), *(_g(c, 1.0) for c in lab), _g(k["sat"], 1.0),
            *(_g(c, 4.0) for c in lab), k["std2"], k["std6"], k["grad"], k["edges"], k["coh"],
            k["black"], k["white"], k["exg"]]


def _grad_agreement(kb: dict, ka: dict, sigma: float) -> np.ndarray:
    """Smoothed normalised dot product of the two dates' gradients: 1 same, 0 unrelated."""
    dot = _g(kb["gy"] * ka["gy"] + kb["gx"] * ka["gx"], sigma)
    nb = _g(kb["gy"] ** 2 + kb["gx"] ** 2, sigma)
    na = _g(ka["gy"] ** 2 + ka["gx"] ** 2, sigma)
    return dot / np.sqrt(nb * na + 1e-8)


def _local_corr(x: np.ndarray, y: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-weighted local Pearson correlation of two images."""
    mx, my = _g(x, sigma), _g(y, sigma)
    cov = _g(x * y, sigma) - mx * my
    vx = np.maximum(_g(x * x, sigma) - mx * mx, 0.0)
    vy = np.maximum(_g(y * y, sigma) - my * my, 0.0)
    return cov / np.sqrt(vx * vy + 1e-6)


def _pair_features(b: np.ndarray, a: np.ndarray, a_matched: np.ndarray, kb: dict, ka: dict,
                   valid: np.ndarray) -> list[np.ndarray]:
    """The `_PAIR_FEATURES` (``ka`` are the matched after date's maps)."""
    diff = a_matched - b
    sq = (diff * diff).mean(axis=0)
    cva = [np.sqrt(_g(sq, s)) for s in (1.0, 2.0, 4.0, 8.0, 16.0)]
    raw = a - b
    cva_raw = np.sqrt(_g((raw * raw).mean(axis=0), 2.0))
    dlab = [_g(ka["lab"][i] - kb["lab"][i], 2.0) for i in range(3)]
    return [
        *cva, cva_raw, *dlab,
        ka["std2"] - kb["std2"], ka["std6"] - kb["std6"], ka["edges"] - kb["edges"],
        np.log((ka["edges"] + 0.005) / (kb["edges"] + 0.005)),
        _grad_agreement(kb, ka, 2.0), _grad_agreement(kb, ka, 6.0),
        _local_corr(kb["lab"][0], ka["lab"][0], 3.0),
        ka["exg"] - kb["exg"], ka["coh"] - kb["coh"], ka["black"] - kb["black"],
        _g(ka["black"] - kb["black"], 4.0),
    ]


def _superpixels(kb: dict, ka: dict) -> np.ndarray:
    """Watershed regions of the summed gradient of both dates, seeded on a regular grid."""
    grad = kb["grad"] + ka["grad"]
    markers = np.zeros(grad.shape, np.int32)
    rows = np.arange(_SEED_PX // 2, grad.shape[0], _SEED_PX)
    cols = np.arange(_SEED_PX // 2, grad.shape[1], _SEED_PX)
    markers[np.ix_(rows, cols)] = np.arange(1, rows.size * cols.size + 1).reshape(
        rows.size, cols.size)
    return watershed(grad, markers=markers) - 1


def _segment_features(named: dict[str, np.ndarray], labels: np.ndarray) -> list[np.ndarray]:
    """The `_SEGMENT_FEATURES`: per-region means (and spread, size) broadcast back to pixels."""
    flat = labels.ravel()
    n = int(flat.max()) + 1
    area = np.bincount(flat, minlength=n).astype(np.float64)
    area[area == 0] = 1.0
    out = []
    for name in _SEGMENT_OF:
        out.append((np.bincount(flat, weights=named[name].ravel(), minlength=n) / area)[labels])
    cva = named["cva_s1"].ravel().astype(np.float64)
    mean = np.bincount(flat, weights=cva, minlength=n) / area
    var = np.bincount(flat, weights=cva * cva, minlength=n) / area - mean**2
    out.append(np.sqrt(np.maximum(var, 0.0))[labels])
    out.append(np.log(area)[labels])
    return [o.astype(np.float32) for o in out]


def pixel_features(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Per-pixel features of an RGB before/after pair (NumPy kernel).

    Parameters
    ----------
    before, after
        ``(3, y, x)`` arrays of the same shape, bands red, green, blue, any numeric dtype and
        scale (each date is stretched on its own); NaN is nodata.

    Returns
    -------
    numpy.ndarray
        ``(N_FEATURES, y, x)`` float32 in the order of `FEATURE_NAMES`; NaN at pixels that are
        nodata in either date. Nodata pixels are filled with the band median before filtering,
        so features near them are approximate.

    Raises
    ------
    ValueError
        If the arrays are not ``(3, y, x)`` of one shape.
    """
    before = np.asarray(before, dtype=np.float32)
    after = np.asarray(after, dtype=np.float32)
    if before.ndim != 3 or before.shape[0] != 3 or before.shape != after.shape:
        raise ValueError(
            f"pixel_features expects two (3, y, x) RGB arrays of one shape, got {before.shape} "
            f"and {after.shape}. Select the red, green and blue bands of both dates."
        )
    valid = np.isfinite(before).all(axis=0) & np.isfinite(after).all(axis=0)
    b = _stretch(_fill_nan(before, valid), valid)
    a = _stretch(_fill_nan(after, valid), valid)
    a_matched = _match(a, b, valid)
    kb, ka = _structure(b), _structure(a)
    feats = [*_date_features(b, kb), *_date_features(a, ka)]
    labels = _superpixels(kb, ka)
    del ka
    feats += _pair_features(b, a, a_matched, kb, _structure(a_matched), valid)
    feats += _segment_features(dict(zip(_PIXEL_NAMES, feats, strict=True)), labels)
    out = np.empty((len(feats), *valid.shape), np.float32)
    for i, f in enumerate(feats):
        out[i] = f
    out[:, ~valid] = np.nan
    return out


def feature_stack(before: xr.DataArray, after: xr.DataArray) -> xr.DataArray:
    """Per-pixel features of two RGB DataArrays on one grid (see `pixel_features`).

    Parameters
    ----------
    before, after
        Dims ``("band", "y", "x")`` with three bands (red, green, blue), NaN nodata, same grid.

    Returns
    -------
    xarray.DataArray
        Dims ``("feature", "y", "x")`` with ``feature`` coordinate `FEATURE_NAMES`, float32,
        NaN where either date is nodata, the input's x/y and ``spatial_ref`` coordinates.
        Computed (NumPy-backed): the per-image percentiles and quantiles need the whole frame.
    """
    data = pixel_features(np.asarray(before.transpose("band", "y", "x").values),
                          np.asarray(after.transpose("band", "y", "x").values))
    coords = {k: v for k, v in before.coords.items() if "band" not in v.dims}
    return xr.DataArray(data, dims=("feature", "y", "x"),
                        coords={**coords, "feature": list(FEATURE_NAMES)}, name="features")
