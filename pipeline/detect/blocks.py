"""pipeline.detect.blocks: grey images, block means and crops of NumPy or Dask rasters.

The raster reductions the detectors share: the band mean of a stack (`grey`), NaN-aware means
over square blocks (`block_mean`, chunk by chunk for Dask input) and batched computation of
crops of lazy maps (`compute_crops`). NumPy in, NumPy out; Dask input gives the same values.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import dask
import dask.array as da
import numpy as np

from pipeline.core.components import chunk_borders, overlapping_chunks

__all__ = ["grey", "block_mean", "compute_crops", "crop_batches", "CROP_BATCH_PX",
           "BlockWindows", "block_average_np", "aligned_chunks"]

# Crops (of lazy maps, candidate regions, outlines) are computed and held a batch at a time, of
# about this many values (128 MB of float32): their number grows with the area.
CROP_BATCH_PX = 32 << 20


def _grey_np(stack: np.ndarray) -> np.ndarray:
    """Band mean of a ``(band, y, x)`` block, float32."""
    return np.mean(np.asarray(stack, dtype=np.float32), axis=0)


def grey(stack: Any) -> Any:
    """Band mean of a ``(band, y, x)`` stack, float32, NaN where any band is NaN.

    NumPy in, NumPy out; a Dask stack gives a lazy ``(y, x)`` array with the same values.
    """
    if isinstance(stack, da.Array):
        if stack.numblocks[0] > 1:
            stack = stack.rechunk({0: -1})
        return da.map_blocks(_grey_np, stack, drop_axis=0, dtype=np.float32)
    return _grey_np(stack)


def block_mean(arr: Any, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """NaN-aware mean over ``factor x factor`` blocks; returns ``(mean, valid_fraction)``.

    Trailing rows and columns that do not fill a block are averaged over what they hold.
    Blocks with no valid pixel are NaN. A Dask array is reduced chunk by chunk (chunks are
    first aligned to multiples of ``factor``); the small results are NumPy either way.
    """
    if isinstance(arr, da.Array):
        return _block_means_lazy([arr], factor)[0]
    return _block_mean_np(arr, factor)


def _block_mean_np(arr: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(arr, dtype=np.float32)
    if factor <= 1:
        valid = ~np.isnan(a)
        return a, valid.astype(np.float32)
    count, total = _block_sums(a, factor)
    # Fraction of the block's pixels that exist in the input and are valid.
    starts = (np.arange(count.shape[0]) * factor, np.arange(count.shape[1]) * factor)
    n_inside = np.outer(np.minimum(factor, a.shape[0] - starts[0]),
                        np.minimum(factor, a.shape[1] - starts[1])).astype(np.int64)
    return _mean(count, total), (count / np.maximum(n_inside, 1)).astype(np.float32)


def block_average_np(arr: np.ndarray, factor: int) -> np.ndarray:
    """The mean of `block_mean` alone (NumPy): the same values, without the valid fraction."""
    a = np.asarray(arr, dtype=np.float32)
    return a if factor <= 1 else _mean(*_block_sums(a, factor))


def _mean(count: np.ndarray, total: np.ndarray) -> np.ndarray:
    """float32 ``total / count``, NaN where ``count`` is 0."""
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return mean.astype(np.float32)


def _block_sums(a: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """``(valid pixels, NaN-zeroed float32 sum)`` of each ``factor x factor`` block of the
    float32 ``a``; trailing blocks hold what is there (padded only then)."""
    rows = -(-a.shape[0] // factor) * factor
    cols = -(-a.shape[1] // factor) * factor
    padded = a
    if (rows, cols) != a.shape:
        padded = np.full((rows, cols), np.nan, dtype=np.float32)
        padded[: a.shape[0], : a.shape[1]] = a
    blocks = padded.reshape(rows // factor, factor, cols // factor, factor)
    valid = ~np.isnan(blocks)
    zeroed = np.where(valid, blocks, 0.0)
    if factor <= _SMALL_FACTOR and min(blocks.shape[0], blocks.shape[2]) > 1:
        # counts of at most 16 add up exactly in uint8
        count = _small_block_sum(valid.view(np.uint8), np.uint8).astype(np.int64)
        return count, _small_block_sum(zeroed, np.float32)
    return valid.sum(axis=(1, 3)), zeroed.sum(axis=(1, 3))


# Blocks this small are summed from strided slices: NumPy's reduction over two short axes is
# several times slower, and the slices are added in its own order (each row of a block from
# left to right, then the rows from top to bottom), so the sums are the same to the bit. With a
# single row or column of blocks NumPy merges the two axes and adds in another order: the
# reduction itself is used there (tests/detect/test_texture.py checks both against it).
_SMALL_FACTOR = 4


def _small_block_sum(blocks: np.ndarray, dtype: Any) -> np.ndarray:
    """``blocks.sum(axis=(1, 3))`` of ``(rows, f, cols, f)`` blocks, for small ``f``."""
    factor = blocks.shape[1]
    total = blocks[:, 0, :, 0].astype(dtype)
    for j in range(1, factor):
        total += blocks[:, 0, :, j]
    for i in range(1, factor):
        row = blocks[:, i, :, 0].astype(dtype)
        for j in range(1, factor):
            row += blocks[:, i, :, j]
        total += row
    return total


def aligned_chunks(arr: da.Array, factor: int) -> da.Array:
    """``arr`` rechunked so every chunk but the last of each axis is a multiple of ``factor``."""
    if all(c % factor == 0 for axis in arr.chunks for c in axis[:-1]):
        return arr
    sizes = tuple(max(factor, max(axis) // factor * factor) for axis in arr.chunks)
    return arr.rechunk(sizes)


def _block_means_lazy(arrays: Sequence[da.Array], factor: int
                      ) -> list[tuple[np.ndarray, np.ndarray]]:
    """`block_mean` of several lazy maps, computed together (their inputs are read once)."""
    if factor <= 1:
        stacked = [da.stack([a.astype(np.float32), (~da.isnan(a)).astype(np.float32)])
                   for a in arrays]
    else:
        stacked = []
        for arr in arrays:
            arr = aligned_chunks(arr, factor)
            coarse = tuple(tuple(-(-c // factor) for c in axis) for axis in arr.chunks)
            stacked.append(da.map_blocks(lambda b: np.stack(_block_mean_np(b, factor)), arr,
                                         new_axis=0, chunks=((2,), *coarse), dtype=np.float32))
    return [(s[0], s[1]) for s in dask.compute(*stacked)]


def compute_crops(crops: Sequence[Any]) -> list[np.ndarray]:
    """NumPy versions of crops of (possibly lazy) maps.

    Lazy crops are computed together, in batches of about 2**25 pixels, so the chunks they
    share are read once per batch and memory stays bounded whatever their number.
    """
    out: list[Any] = [c if isinstance(c, da.Array) else np.asarray(c) for c in crops]
    lazy = [i for i, c in enumerate(out) if isinstance(c, da.Array)]
    for part in crop_batches([out[i].size for i in lazy], CROP_BATCH_PX):
        batch = [lazy[k] for k in part]
        for i, value in zip(batch, dask.compute(*(out[i] for i in batch)), strict=True):
            out[i] = np.asarray(value)
    return out


def crop_batches(sizes: Sequence[int], limit: int) -> Iterator[range]:
    """Consecutive index ranges of ``sizes`` (crop values), each adding up to at most
    ``limit`` (a single larger crop makes a batch alone): work on crops a batch at a time."""
    start = 0
    while start < len(sizes):
        stop, total = start + 1, sizes[start]
        while stop < len(sizes) and total + sizes[stop] <= limit:
            total += sizes[stop]
            stop += 1
        yield range(start, stop)
        start = stop


@dataclass(frozen=True)
class BlockWindows:
    """Windows of a lazy 2-D array, as delayed NumPy arrays assembled from its chunks.

    Each window depends on the array's own chunk tasks, so a graph of many windows computes
    every chunk once. (A Dask array sliced straight into a ``dask.delayed`` call is finalised
    on its own: each window recomputed every chunk it touches, the grey images' band means
    about four times over in the texture step.) The values are the array's.
    """

    arr: da.Array
    blocks: np.ndarray = field(init=False, repr=False, compare=False)
    bounds: tuple[np.ndarray, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:  # noqa: D105
        object.__setattr__(self, "blocks", self.arr.to_delayed())
        object.__setattr__(self, "bounds", tuple(chunk_borders(self.arr.chunks)))

    def window(self, rows: slice, cols: slice) -> Any:
        """Delayed ``arr[rows, cols]`` (``start:stop`` slices inside the array)."""
        (r0, r1), (c0, c1) = (rows.start, rows.stop), (cols.start, cols.stop)
        pieces, places = [], []
        for i in overlapping_chunks(self.bounds[0], r0, r1):
            lo, hi = max(r0, self.bounds[0][i]), min(r1, self.bounds[0][i + 1])
            for j in overlapping_chunks(self.bounds[1], c0, c1):
                left, right = max(c0, self.bounds[1][j]), min(c1, self.bounds[1][j + 1])
                if lo >= hi or left >= right:
                    continue
                pieces.append(self.blocks[i, j])
                places.append(((slice(lo - self.bounds[0][i], hi - self.bounds[0][i]),
                                slice(left - self.bounds[1][j], right - self.bounds[1][j])),
                               (slice(lo - r0, hi - r0), slice(left - c0, right - c0))))
        shape = (max(0, r1 - r0), max(0, c1 - c0))
        return dask.delayed(_assemble, pure=True)(pieces, places, shape, self.arr.dtype)


def _assemble(pieces: list[np.ndarray], places: list[tuple], shape: tuple[int, int],
              dtype: Any) -> np.ndarray:
    """A window filled from the chunk pieces that cover it."""
    out = np.empty(shape, dtype)
    for piece, (src, dst) in zip(pieces, places, strict=True):
        out[dst] = np.asarray(piece)[src]
    return out
