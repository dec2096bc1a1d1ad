"""pipeline.detect.stored: windows of stored lazy maps, and their exact whole-image statistics.

`StoredBlocks` reads windows of a lazy (usually stored) array block by block, each block
through its own small graph; `WindowedArray` stands in for a whole 2-D map where code reads
windows or points of it. `grid_stats` and `pair_stats` give the nodata fill and the 2-98 %
scale of wall-grid images to the bit of the whole-image functions
(`pipeline.detect.wall_noise`), reading a band at a time. Used by the chunked wall search
(`pipeline.detect.walls_chunked`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, cast

import dask
import dask.array as da
import numpy as np
from dask.local import get_sync

from pipeline.core.components import chunk_borders, overlapping_chunks

__all__ = ["WindowedArray", "StoredBlocks", "grid_stats", "pair_stats"]


class WindowedArray:
    """A read-only 2-D array whose pixels are computed on demand, window by window.

    Indexing with two slices (steps of 1) or with two integer arrays returns NumPy, computing
    only the bounding window of what is asked (``read(rows, cols)``). Stands in for a whole map
    where code reads windows or points of it (`enclosure.measure_enclosure`'s mask).
    """

    def __init__(self, shape: tuple[int, int], dtype: Any,
                 read: Callable[[slice, slice], np.ndarray]) -> None:  # noqa: D107
        self.shape, self.dtype, self.ndim, self._read = shape, np.dtype(dtype), 2, read

    def __getitem__(self, key: Any) -> np.ndarray:
        rows, cols = key
        if isinstance(rows, slice) and isinstance(cols, slice):
            (r0, r1, s0), (c0, c1, s1) = rows.indices(self.shape[0]), cols.indices(self.shape[1])
            if s0 != 1 or s1 != 1:
                raise IndexError("WindowedArray reads windows with steps of 1")
            return self._read(slice(r0, max(r0, r1)), slice(c0, max(c0, c1)))
        r, c = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
        if r.size == 0:
            return np.zeros(r.shape, self.dtype)
        if r.min() < 0 or c.min() < 0 or r.max() >= self.shape[0] or c.max() >= self.shape[1]:
            raise IndexError("WindowedArray takes indices inside the array only")
        r0, c0 = int(r.min()), int(c.min())
        window = self._read(slice(r0, int(r.max()) + 1), slice(c0, int(c.max()) + 1))
        return window[r - r0, c - c0]


class StoredBlocks:
    """Windows of a lazy ``(..., y, x)`` array (leading axes one chunk), read block by block.

    Only the blocks a window touches are computed, each through its own small graph (a read of
    a stored chunk), not through a graph of the whole array, whose cost grows with the number
    of chunks; the last few blocks are kept (reads cluster).
    """

    def __init__(self, arr: da.Array, keep: int = 32) -> None:  # noqa: D107
        self.shape = (int(arr.shape[-2]), int(arr.shape[-1]))
        self.lead = (0,) * (arr.ndim - 2)
        self.delayed = arr.to_delayed()
        self.bounds = chunk_borders(arr.chunks[-2:])
        self.keep = keep
        self.recent: dict[tuple[int, int], np.ndarray] = {}
        self.lock = threading.Lock()

    def _block(self, i: int, j: int) -> np.ndarray:
        # thread-safe: outlines are assessed in parallel threads that read the same maps
        with self.lock:
            if (i, j) in self.recent:
                return self.recent[i, j]
        block = np.asarray(self.delayed[(*self.lead, i, j)].compute(scheduler=get_sync))
        with self.lock:
            if len(self.recent) >= self.keep:
                self.recent.pop(next(iter(self.recent)))
            self.recent[i, j] = block
        return block

    def window(self, rows: slice, cols: slice) -> np.ndarray:
        """``arr[..., rows, cols]`` (steps of 1, inside the array) as NumPy."""
        (r0, r1), (c0, c1) = (rows.start, rows.stop), (cols.start, cols.stop)
        parts = []
        for i in overlapping_chunks(self.bounds[0], r0, r1):
            lo, hi = self.bounds[0][i], self.bounds[0][i + 1]
            line = []
            for j in overlapping_chunks(self.bounds[1], c0, c1):
                left, right = self.bounds[1][j], self.bounds[1][j + 1]
                line.append(self._block(i, j)[..., max(r0, lo) - lo:min(r1, hi) - lo,
                                              max(c0, left) - left:min(c1, right) - left])
            parts.append(np.concatenate(line, axis=-1))
        return np.concatenate(parts, axis=-2)

    def rows(self, rows: slice) -> np.ndarray:
        """Full-width rows ``arr[..., rows, :]`` as NumPy."""
        return self.window(rows, slice(0, self.shape[1]))


class _Flat:
    """Ranges of a stored 2-D array's raster-order (flattened) pixels."""

    def __init__(self, arr: StoredBlocks) -> None:  # noqa: D107
        self.arr, self.width = arr, arr.shape[1]

    def __call__(self, lo: int, hi: int) -> np.ndarray:
        r0, r1 = lo // self.width, -(-hi // self.width)
        rows = self.arr.rows(slice(r0, r1)).ravel()
        return rows[lo - r0 * self.width:hi - r0 * self.width]


def _pairwise_sum(read: _Flat, lo: int, hi: int, leaf_px: int) -> np.float32:
    """``np.sum`` of the NaN-zeroed pixels ``lo..hi`` (raster order), float32, to the bit.

    NumPy sums a contiguous float32 array pairwise: halves (the first a multiple of 8 long)
    summed alone and added. Ranges above ``leaf_px`` are split the same way, so each range
    read is summed by NumPy as the same subtree (tests check it against the whole sum).
    """
    n = hi - lo
    if n <= leaf_px:
        part = read(lo, hi)
        return np.sum(np.where(np.isnan(part), np.float32(0), part))
    half = n // 2
    half -= half % 8
    return np.float32(_pairwise_sum(read, lo, lo + half, leaf_px)
                      + _pairwise_sum(read, lo + half, hi, leaf_px))


def grid_stats(g: da.Array, *, scale: bool, leaf_px: int = 1 << 22,
                counts: tuple[int, int] | None = None) -> tuple[float, float | None]:
    """`wall_noise.fill_value` and (``scale``) `wall_noise.robust_scale` of a lazy wall-grid
    image, to the bit, reading ``leaf_px`` pixels or one chunk row at a time (never the whole
    image). ``counts``: its NaN and finite pixels, when already counted (`pair_stats`)."""
    if counts is None:
        counts = dask.compute(da.isnan(g).sum(), da.isfinite(g).sum())
    n_nan, n_finite = int(counts[0]), int(counts[1])
    if n_finite == 0:
        return 0.0, 1.0 if scale else None
    stored = StoredBlocks(g)
    read = _Flat(stored)
    total = _pairwise_sum(read, 0, g.size, leaf_px)
    fill = float(np.float32(total / np.intp(g.size - n_nan)))  # `np.nanmean`'s own steps
    if not scale:
        return fill, None
    step = max(1, n_finite // 250_000)  # robust_scale's sample: every step-th valid pixel
    sample, seen, r0 = [], 0, 0
    for rows in g.chunks[0]:
        band = stored.rows(slice(r0, r0 + rows))
        values = band[np.isfinite(band)]
        sample.append(values[(-seen) % step::step])
        seen, r0 = seen + values.size, r0 + rows
    lo, hi = np.percentile(np.concatenate(sample), [2, 98])
    return fill, float(hi - lo) if hi > lo else 1.0


def pair_stats(g_b: da.Array, g_a: da.Array) -> tuple[float, float, float]:
    """``(fill before, fill after, scale of before)``: `grid_stats` of both wall-grid images,
    the pixel counts in one pass, then the two images' sums and sample as two parallel tasks
    on the configured Dask scheduler (each reads its own blocks synchronously)."""
    counts = dask.compute(*(f(g).sum() for g in (g_b, g_a) for f in (da.isnan, da.isfinite)))

    def stats(g: da.Array, scale: bool, n: tuple[int, int]) -> tuple[float, float | None]:
        return grid_stats(g, scale=scale, counts=n)

    # the arrays travel inside closures: a Dask array argument would be computed whole
    (fill_b, spread), (fill_a, _) = dask.compute(
        dask.delayed(lambda: stats(g_b, True, counts[:2]), pure=False)(),
        dask.delayed(lambda: stats(g_a, False, counts[2:]), pure=False)())
    return fill_b, fill_a, cast(float, spread)
