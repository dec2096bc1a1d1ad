"""pipeline.detect.wall_noise: a scene's scale, noise level and nodata fill for the line search.

The new-line thresholds are set in units of the scene's contrast (`robust_scale`, the 2-98 %
range) and of the noise of the date difference (`noise_sigma`, also as parallel parts,
`noise_parts`); `fill_value` stands in for nodata in the morphology. Used by the whole-scene
search (`pipeline.detect.walls`), the chunked one (`pipeline.detect.walls_chunked`) and the
tower search. Pure: NumPy in, numbers out.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage as ndi

__all__ = ["robust_scale", "noise_sigma", "noise_parts", "sigma_of_spreads", "fill_value",
           "nanmedian_rows"]


def robust_scale(grey_before: np.ndarray) -> float:
    """The 2-98 % range of the valid before pixels (1.0 for a flat or empty image)."""
    v = grey_before[np.isfinite(grey_before)]
    if v.size == 0:
        return 1.0
    lo, hi = np.percentile(v[:: max(1, v.size // 250_000)], [2, 98])
    return float(hi - lo) if hi > lo else 1.0


def noise_sigma(g_before: np.ndarray, g_after: np.ndarray, *, block_px: int = 16,
                max_blocks: int = 16384) -> float:
    """Per-date noise level: the calmer quarter of blockwise spreads of the date difference.

    The difference is high-passed (minus its 3 x 3 mean); its robust spread (1.4826 MAD) is
    taken in blocks of ``block_px`` and the 25th percentile over blocks is kept, so that
    texture which changed between the dates (trees, crops) does not pass for noise. A scene
    of more than ``max_blocks`` blocks is sampled on a regular grid of blocks (every k-th
    block row and column) to about that many; the difference is formed one block row at a
    time, so memory stays a few rows of the scene.
    """
    parts = noise_parts(g_before, g_after, block_px=block_px, max_blocks=max_blocks)
    return sigma_of_spreads([part() for part in parts])


def noise_parts(g_before: np.ndarray, g_after: np.ndarray, *, block_px: int = 16,
                max_blocks: int = 16384, n_parts: int = 1) -> list[Callable[[], np.ndarray]]:
    """`noise_sigma`'s work as up to ``n_parts`` independent calls (to run in parallel): each
    gives the spreads of a run of the sampled block rows; `sigma_of_spreads` of their results,
    in order, is `noise_sigma`."""
    height, width = g_before.shape
    h, w = (max(n // block_px, 1) * block_px for n in (height, width))
    if h > height or w > width:  # smaller than one block: one spread
        block_px, h, w = min(height, width), min(height, width), min(height, width)
    n_rows, n_cols = h // block_px, w // block_px
    step = max(1, math.ceil(math.sqrt(n_rows * n_cols / max_blocks)))

    def spreads(starts: range) -> np.ndarray:
        rows = []
        for i in starts:
            r0 = i * block_px
            lo, hi = max(0, r0 - 1), min(height, r0 + block_px + 1)  # the 3 x 3 mean's halo
            d = g_after[lo:hi] - g_before[lo:hi]
            d = np.where(np.isfinite(d), d - ndi.uniform_filter(np.nan_to_num(d), 3), np.nan)
            band = d[r0 - lo:r0 - lo + block_px, :w].reshape(block_px, n_cols, block_px)
            rows.append(band.transpose(1, 0, 2)[::step].reshape(-1, block_px * block_px))
        blocks = np.concatenate(rows)
        blocks = blocks[np.isfinite(blocks).sum(axis=1) >= blocks.shape[1] // 2]  # mostly valid
        if len(blocks) == 0:
            return np.zeros(0)
        med = nanmedian_rows(blocks)[:, None]
        spread = 1.4826 * nanmedian_rows(np.abs(blocks - med))
        return spread[np.isfinite(spread)]

    starts = range(0, n_rows, step)
    cuts = np.linspace(0, len(starts), min(n_parts, len(starts)) + 1).round().astype(int)
    return [functools.partial(spreads, starts[c0:c1])
            for c0, c1 in itertools.pairwise(cuts.tolist())]


def sigma_of_spreads(spreads: Sequence[np.ndarray]) -> float:
    """`noise_sigma` from the spreads of its parts (`noise_parts`), in order."""
    found = [x for x in spreads if x.size]  # an empty part must not change the type
    if not found:
        return 0.0
    return float(np.percentile(np.concatenate(found), 25) / math.sqrt(2.0))


def nanmedian_rows(x: np.ndarray) -> np.ndarray:
    """``np.nanmedian(x, axis=1)``, the same values, faster.

    NumPy takes the median of short rows with NaN through masked arrays (a full sort);
    rows without NaN (nearly all) take ``np.median`` (a partition): both average the same
    two middle values in the input's type.
    """
    out = np.empty(len(x), dtype=np.result_type(x.dtype, np.float16))
    has_nan = np.isnan(x).any(axis=1)
    if not has_nan.all():
        out[~has_nan] = np.median(x[~has_nan], axis=1)
    if has_nan.any():
        out[has_nan] = np.nanmedian(x[has_nan], axis=1)
    return out


def fill_value(g: np.ndarray) -> float:
    """What stands in for nodata in the morphology: the mean of the valid pixels (or 0)."""
    return float(np.nanmean(g)) if np.isfinite(g).any() else 0.0
