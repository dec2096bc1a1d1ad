"""pipeline.detect.cnn_change: the siamese U-Net's change mask for a detect run (opt-in).

With ``[buildings] model = "cnn"`` the network of `pipeline.detect.convnet` replaces the
change vector analysis as the source of the change mask from which new buildings are
extracted: one pass (no mirrored copies), then the decision rule that `make eval` scores
(`pipeline.detect.learned.change_probability_mask`: Gaussian smoothing, probability above the
model's threshold, small regions dropped). In memory this is exactly `predict_change_cnn`
with ``flips=False``; on Dask arrays it runs block by block with the network's tiles and
margin, each date standardised with whole-scene statistics, so memory stays bounded and the
result is the in-memory one (the statistics may differ in their last bits). Pure: the
caller passes the loaded weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import dask
import dask.array as da
import numpy as np
from scipy import ndimage as ndi

from pipeline.core.change import MASK_NODATA
from pipeline.core.components import select_by_area
from pipeline.detect.convnet import (
    MARGIN_PX,
    TILE_PX,
    predict_change_cnn,
    sigmoid,
    tiled_logits,
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


def _cnn_block(block: np.ndarray, *, weights: Mapping[str, np.ndarray], stats: np.ndarray,
               tile_px: int, margin_px: int, block_info: dict | None = None) -> np.ndarray:
    """Probability of one block's own pixels from its overlapped ``(6, y, x)`` stack."""
    if block_info is None:
        raise ValueError("_cnn_block runs as a Dask block: it needs block_info.")
    loc, n = block_info[0]["chunk-location"], block_info[0]["num-chunks"]
    top = margin_px if loc[1] > 0 else 0
    left = margin_px if loc[2] > 0 else 0
    bottom = block.shape[1] - (margin_px if loc[1] < n[1] - 1 else 0)
    right = block.shape[2] - (margin_px if loc[2] < n[2] - 1 else 0)
    a, b = block[:3], block[3:]
    valid = np.isfinite(a).all(axis=0) & np.isfinite(b).all(axis=0)
    a, b = _standardized(a, valid, stats[0]), _standardized(b, valid, stats[1])
    prob = sigmoid(tiled_logits(a, b, weights, tile_px, margin_px,
                                 region=(top, bottom, left, right)))
    return np.where(valid[top:bottom, left:right], prob, np.float32(np.nan))


def _tile_chunks(n: int, size: int, tile_px: int, margin_px: int) -> tuple[int, ...]:
    """Chunks of an axis of ``n``: whole tiles near ``size``; a last piece under the margin
    joins the chunk before it (an overlap may not be deeper than a chunk)."""
    size = max(tile_px, (size // tile_px) * tile_px)
    chunks = [size] * (n // size)
    rest = n - sum(chunks)
    if rest and chunks and rest < margin_px:
        chunks[-1] += rest
    elif rest:
        chunks.append(rest)
    return tuple(chunks)


def _aligned(x: da.Array, tile_px: int, margin_px: int) -> da.Array:
    """``x`` ``(band, y, x)`` rechunked so that every chunk but the last of an axis is whole
    tiles (the tiles then fall where the in-memory run puts them)."""
    return x.rechunk((x.shape[0], *(_tile_chunks(n, c[0], tile_px, margin_px)
                                   for n, c in zip(x.shape[1:], x.chunks[1:], strict=True))))


def cnn_probability(before: Any, after: Any, *, weights: Mapping[str, np.ndarray],
                    tile_px: int = TILE_PX, margin_px: int = MARGIN_PX) -> Any:
    """One pass of the network: probability that a building appeared, ``(y, x)`` float32.

    Parameters
    ----------
    before, after
        ``(3, y, x)`` red-green-blue float32 on one grid, NaN nodata; NumPy or Dask.
    weights
        The network's arrays (`pipeline.models.load_cnn`).
    tile_px, margin_px
        The network's tiles and their context (`predict_change_cnn`).

    Returns
    -------
    ``(y, x)`` float32 in [0, 1], NaN where either date is nodata. NumPy in, NumPy out
    (`predict_change_cnn` with ``flips=False``); Dask in, lazy Dask out, chunked as the
    input (rechunked to whole tiles if needed), after one computed pass for the whole-scene
    statistics of each date.
    """
    if not isinstance(before, da.Array) and not isinstance(after, da.Array):
        return predict_change_cnn(before, after, weights=weights, flips=False,
                                  tile_px=tile_px, margin_px=margin_px)
    a = _aligned(da.asarray(before).astype(np.float32), tile_px, margin_px)
    b = da.asarray(after).astype(np.float32).rechunk(a.chunks)
    stats = _scene_stats(a, b)
    stack = da.concatenate([a, b], axis=0).rechunk({0: 6})
    padded = da.overlap.overlap(stack, depth={0: 0, 1: margin_px, 2: margin_px},
                                boundary="none")
    return padded.map_blocks(_cnn_block, weights=dict(weights), stats=stats, tile_px=tile_px,
                             margin_px=margin_px, drop_axis=0, chunks=a.chunks[1:],
                             dtype=np.float32, meta=np.empty((0, 0), np.float32))


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
