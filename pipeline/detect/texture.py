"""pipeline.detect.texture: construction evidence at site scale from texture gain.

New construction replaces smooth ground with walls, roofs, roads and their shadows: the local
density of image edges rises. The texture gain is the log ratio of after to before edge density,
averaged over cells of ``cell_m`` and smoothed at site scale. Unlike a per-pixel difference it
also lights up the spaces between new blocks, so a compound shows as one block of evidence.
All kernels here are NumPy in, NumPy out; the coarse grid keeps site-scale work small.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

__all__ = ["grey", "edge_strength", "block_mean", "texture_gain"]


def grey(stack: np.ndarray) -> np.ndarray:
    """Band mean of a ``(band, y, x)`` stack, float32, NaN where any band is NaN."""
    return np.mean(np.asarray(stack, dtype=np.float32), axis=0)


def edge_strength(image: np.ndarray, *, sigma_px: float = 1.0) -> np.ndarray:
    """Sobel gradient magnitude of a lightly smoothed image; NaN where the input is NaN.

    NaN pixels are filled with the image mean before filtering (so they add no edges) and put
    back afterwards, together with the one-pixel rim that touched them.
    """
    img = np.asarray(image, dtype=np.float32)
    nan = np.isnan(img)
    fill = float(np.nanmean(img)) if not nan.all() else 0.0
    filled = np.where(nan, fill, img)
    if sigma_px > 0:
        filled = ndi.gaussian_filter(filled, sigma_px)
    mag = np.hypot(ndi.sobel(filled, axis=0), ndi.sobel(filled, axis=1)) / 8.0
    bad = ndi.binary_dilation(nan, iterations=1) if nan.any() else nan
    return np.where(bad, np.nan, mag).astype(np.float32)


def block_mean(arr: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """NaN-aware mean over ``factor x factor`` blocks; returns ``(mean, valid_fraction)``.

    Trailing rows and columns that do not fill a block are averaged over what they hold.
    Blocks with no valid pixel are NaN.
    """
    a = np.asarray(arr, dtype=np.float32)
    if factor <= 1:
        valid = ~np.isnan(a)
        return a, valid.astype(np.float32)
    rows = -(-a.shape[0] // factor) * factor
    cols = -(-a.shape[1] // factor) * factor
    padded = np.full((rows, cols), np.nan, dtype=np.float32)
    padded[: a.shape[0], : a.shape[1]] = a
    blocks = padded.reshape(rows // factor, factor, cols // factor, factor)
    valid = ~np.isnan(blocks)
    count = valid.sum(axis=(1, 3))
    total = np.where(valid, blocks, 0.0).sum(axis=(1, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    # Fraction of the block's pixels that exist in the input and are valid.
    inside = np.zeros((rows, cols), dtype=bool)
    inside[: a.shape[0], : a.shape[1]] = True
    n_inside = inside.reshape(rows // factor, factor, cols // factor, factor).sum(axis=(1, 3))
    return mean.astype(np.float32), (count / np.maximum(n_inside, 1)).astype(np.float32)


def _robust_scale(image: np.ndarray) -> float:
    values = image[np.isfinite(image)]
    if values.size == 0:
        return 1.0
    lo, hi = np.percentile(values, [2, 98])
    return float(hi - lo) if hi > lo else 1.0


def texture_gain(
    before: np.ndarray,
    after: np.ndarray,
    *,
    factor: int,
    sigma_cells: float,
    eps: float = 0.01,
) -> np.ndarray:
    """Log ratio of after to before edge density on a grid of ``factor``-pixel cells.

    Parameters
    ----------
    before, after
        ``(band, y, x)`` stacks on the same grid, radiometrically matched, NaN = nodata.
    factor
        Cell size in pixels.
    sigma_cells
        Gaussian smoothing of the cell densities (site scale), in cells.
    eps
        Edge strength, as a share of the before image's 2-98 % range, added to both densities
        so that flat ground in both dates gives a ratio near 1, not noise.

    Returns
    -------
    Float32 array ``(ceil(y / factor), ceil(x / factor))``; NaN where a cell has no valid pixel.
    0 means unchanged texture, ``log(2)`` twice the edge density.
    """
    g_before = grey(before)
    g_after = grey(after)
    scale = _robust_scale(g_before)
    e_before, valid = block_mean(edge_strength(g_before / scale), factor)
    e_after, _ = block_mean(edge_strength(g_after / scale), factor)
    ok = np.isfinite(e_before) & np.isfinite(e_after)
    smoothed = []
    for e in (e_before, e_after):
        num = ndi.gaussian_filter(np.where(ok, e, 0.0), sigma_cells)
        den = ndi.gaussian_filter(ok.astype(np.float32), sigma_cells)
        with np.errstate(invalid="ignore", divide="ignore"):
            smoothed.append(num / den)
    gain = np.log((smoothed[1] + eps) / (smoothed[0] + eps))
    return np.where(ok & (valid > 0.5), gain, np.nan).astype(np.float32)
