"""pipeline.detect.cnn_change: the siamese U-Net's change mask for a detect run (opt-in).

With ``[buildings] model = "cnn"`` the network of `pipeline.detect.convnet` replaces the
change vector analysis as the source of the change mask from which new buildings are
extracted: the network's probability (by default averaged over each tile and its three
mirrorings, as `make eval` scores it; ``[buildings] mirrorings = false`` for one pass at a
quarter of the CPU), then the decision rule that `make eval` scores
(`pipeline.detect.learned.change_probability_mask`: Gaussian smoothing, probability above the
model's threshold, small regions dropped). In memory this is exactly `predict_change_cnn`;
on Dask arrays it runs block by block, each block's task reading its
tiles' windows (the network's tiles and margin, where the in-memory run puts them) one at a
time, each date standardised with whole-scene statistics, so memory stays bounded whatever
the grid's size and the result is the in-memory one (the statistics may differ in their last
bits). Pure: the caller passes the loaded weights.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import dask
import dask.array as da
import numpy as np
from dask.local import get_sync
from scipy import ndimage as ndi

from pipeline.core.change import MASK_NODATA
from pipeline.core.components import select_by_area
from pipeline.detect.convnet import (
    MARGIN_PX,
    TILE_PX,
    predict_change_cnn,
    window_probability,
)
from pipeline.detect.learned import change_probability_mask
from pipeline.errors import ConfigError

__all__ = ["CNN_BANDS", "check_cnn_input", "cnn_probability", "cnn_change_mask", "MASK_NODATA"]

CNN_BANDS = 3  # red, green, blue, as the network was trained
_TRUNCATE = 4.0  # scipy's default Gaussian truncation, in sigmas


def check_cnn_input(res_m: float, n_bands: int, *, max_res_m: float) -> None:
    """Refuse imagery the network was not made for.

    Raises
    ------
    ConfigError
        If the working grid is coarser than ``max_res_m`` (the network saw 0.5 m pixels,
        rescaled by 0.7-1.4, in training), or the images do not have three (red, green, blue)
        bands. The message names ``buildings.model`` and the fix.
    """
    if res_m > max_res_m:
        raise ConfigError(
            f"buildings.model = 'cnn' needs imagery of {max_res_m:g} m or finer "
            f"(buildings.max_res_m); the working grid is {res_m:g} m. The network was trained "
            "on 0.5 m aerial imagery and sees nothing it knows at this scale. Run with "
            "--building-model none (the default change analysis), or give imagery of about "
            "1 m or finer.")
    if n_bands != CNN_BANDS:
        raise ConfigError(
            f"buildings.model = 'cnn' needs red-green-blue images (3 bands); these have "
            f"{n_bands}. Give true-colour GeoTIFFs (bands red, green, blue in that order), or "
            "run with --building-model none.")


def _band_sums(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per date and band: valid count, sum and sum of squares (float64), ``(2, 3, 3)``."""
    valid = np.isfinite(a).all(axis=0) & np.isfinite(b).all(axis=0)
    out = np.zeros((2, a.shape[0], 3), np.float64)
    for d, image in enumerate((a, b)):
        for k, band in enumerate(image):
            values = band[valid].astype(np.float64)
            out[d, k] = (values.size, values.sum(), np.square(values).sum())
    return out


def _scene_stats(a: da.Array, b: da.Array) -> np.ndarray:
    """Mean and standard deviation per band of both dates over pixels valid in both.

    ``(2, 3, 2)``: date, band, (mean, std); a std of 0 becomes 1 (as `standardize`). One
    pass over the blocks.
    """
    parts = [dask.delayed(_band_sums)(x, y)
             for x, y in zip(a.to_delayed().ravel(), b.to_delayed().ravel(), strict=True)]
    sums = np.sum(dask.compute(*parts), axis=0)
    n = np.maximum(sums[..., 0], 1.0)
    mean = sums[..., 1] / n
    std = np.sqrt(np.maximum(sums[..., 2] / n - mean * mean, 0.0))
    return np.stack([mean, np.where(std > 0, std, 1.0)], axis=-1)


def _standardized(image: np.ndarray, valid: np.ndarray, stats: np.ndarray) -> np.ndarray:
    """`convnet.standardize` with given (whole-scene) statistics."""
    out = np.zeros(image.shape, np.float32)
    for k, band in enumerate(image):
        out[k][valid] = (band[valid].astype(np.float64) - stats[k, 0]) / stats[k, 1]
    return out


class _Windows:
    """The two dates as Dask arrays, read one window at a time by the task that needs it.

    Held by a task as a plain object, not a Dask dependency: a window is computed (with the
    synchronous scheduler, inside the task) only when the task runs and is released with it,
    so memory holds one tile window a thread however many blocks wait. As a dependency, the
    threaded scheduler loaded every block's overlapped input ahead of the network's slow
    tasks (2 GB more at 8192 x 8192, measured).
    """

    __slots__ = ("a", "b", "stats")

    def __init__(self, a: da.Array, b: da.Array, stats: np.ndarray) -> None:
        self.a, self.b, self.stats = a, b, stats

    def __dask_tokenize__(self) -> tuple:
        return (self.a.name, self.b.name, self.stats.tobytes())

    def __call__(self, ys: slice, xs: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A window's before and after, standardised with the whole-scene statistics, and
        its pixels valid in both."""
        a, b = (np.asarray(x, np.float32) for x in dask.compute(
            self.a[:, ys, xs], self.b[:, ys, xs], scheduler=get_sync))
        valid = np.asarray(np.isfinite(a).all(axis=0) & np.isfinite(b).all(axis=0))
        return (_standardized(a, valid, self.stats[0]),
                _standardized(b, valid, self.stats[1]), valid)


def _tile_chunks(n: int, size: int, tile_px: int, margin_px: int) -> tuple[int, ...]:
    """Chunks of an axis of ``n``: whole tiles near ``size``; a last piece under the margin
    joins the chunk before it."""
    size = max(tile_px, (size // tile_px) * tile_px)
    chunks = [size] * (n // size)
    rest = n - sum(chunks)
    if rest and chunks and rest < margin_px:
        chunks[-1] += rest
    elif rest:
        chunks.append(rest)
    return tuple(chunks)


def cnn_probability(before: Any, after: Any, *, weights: Mapping[str, np.ndarray],
                    flips: bool = True, tile_px: int = TILE_PX,
                    margin_px: int = MARGIN_PX) -> Any:
    """The network's probability that a building appeared, ``(y, x)`` float32.

    Parameters
    ----------
    before, after
        ``(3, y, x)`` red-green-blue float32 on one grid, NaN nodata; NumPy or Dask.
    weights
        The network's arrays (`pipeline.models.load_cnn`).
    flips
        Average each tile's probability over it and its three mirrorings (the rule `make
        eval` scores), else one pass at a quarter of the work (`predict_change_cnn`).
    tile_px, margin_px
        The network's tiles and their context (`predict_change_cnn`).

    Returns
    -------
    ``(y, x)`` float32 in [0, 1], NaN where either date is nodata. NumPy in, NumPy out
    (`predict_change_cnn`); Dask in, lazy Dask out after one computed
    pass for the whole-scene statistics of each date, chunked near the input's chunks in
    whole tiles. Each chunk is one task that reads its tiles' windows from ``before`` and
    ``after`` itself, one at a time (so give inputs that are cheap to read by windows, e.g.
    stored ones: a lazy input is computed again for every window that touches a chunk).
    """
    if not isinstance(before, da.Array) and not isinstance(after, da.Array):
        return predict_change_cnn(before, after, weights=weights, flips=flips,
                                  tile_px=tile_px, margin_px=margin_px)
    a, b = da.asarray(before), da.asarray(after)
    if a.shape != b.shape:
        raise ValueError(f"before {a.shape} and after {b.shape} must be on one grid.")
    windows = _Windows(a, b, _scene_stats(a, b))
    rows, cols = (_tile_chunks(n, c[0], tile_px, margin_px)
                  for n, c in zip(a.shape[1:], a.chunks[1:], strict=True))
    # one task per output chunk; what the tasks share is bound once (Dask walks and hashes
    # a task's arguments at every call); each task reads its tiles' windows itself
    run = dask.delayed(functools.partial(window_probability, windows, a.shape[1:],
                                         dict(weights), tile_px, margin_px, flips=flips),
                       pure=True)
    blocks: list[list[da.Array]] = []
    for y0, h in zip(np.cumsum((0, *rows[:-1])), rows, strict=True):
        blocks.append([])
        for x0, w in zip(np.cumsum((0, *cols[:-1])), cols, strict=True):
            region = (int(y0), int(y0 + h), int(x0), int(x0 + w))
            task = run(region)
            blocks[-1].append(da.from_delayed(task, (h, w), dtype=np.float32,
                                              meta=np.empty((0, 0), np.float32)))
    return da.block(blocks)


def _smooth_block(prob: np.ndarray, *, sigma: float) -> np.ndarray:
    """The decision rule's smoothing: NaN as 0, Gaussian, reflect at the grid's edges."""
    filled = np.where(np.isfinite(prob), prob, 0.0).astype(np.float32)
    return ndi.gaussian_filter(filled, sigma, mode="reflect") if sigma > 0 else filled


def cnn_change_mask(probability: Any, *, threshold: float, smooth_sigma_px: float,
                    min_area_px: int,
                    persist: Callable[[da.Array], da.Array] | None = None) -> Any:
    """The model's decision rule as a change mask: 1 change, 0 none, ``MASK_NODATA`` nodata.

    `change_probability_mask` (smoothing, threshold, 8-connected regions under
    ``min_area_px`` dropped); on Dask input block by block with overlap, regions merged across
    block borders (`select_by_area`, ``persist`` gets its per-block labels), same mask.

    Returns
    -------
    ``(y, x)`` uint8, NumPy or lazy Dask as ``probability``.
    """
    valid = np.isfinite(probability)
    if not isinstance(probability, da.Array):
        mask = change_probability_mask(probability, threshold=threshold,
                                       min_area_px=min_area_px, smooth_sigma_px=smooth_sigma_px)
        return np.where(valid, mask.astype(np.uint8), np.uint8(MASK_NODATA))
    depth = int(_TRUNCATE * smooth_sigma_px + 0.5) + 1
    smooth = probability.map_overlap(_smooth_block, depth=depth, boundary="none",
                                     dtype=np.float32, sigma=smooth_sigma_px)
    binary = valid & (smooth > threshold)
    if min_area_px > 1:
        binary = select_by_area(binary, lambda area: area >= min_area_px, connectivity=2,
                                persist=persist)
    return da.where(valid, binary.astype(np.uint8), np.uint8(MASK_NODATA)).astype(np.uint8)
