"""pipeline.detect.walls_chunked: a lazy scene's new walls, chunk by chunk, as the whole search.

The chunked counterpart of `walls.new_line_map` followed by `walls.find_wall_segments` on a Dask
pair: no wall-grid map is held whole. The grey wall-grid images are stored, and the scene's
scale and nodata fills read from them band by band to the bit (`_grid_stats`). The top-hat
responses and their line averages are made per chunk with a halo that covers everything they
depend on, so they equal the whole-scene maps pixel for pixel; the scene's thresholds come from
the same samples. The hysteresis components are labelled chunk by
chunk and merged across borders (`pipeline.core.components.label_regions`), so a component is
seeded, and dropped when small, as a whole; each 8-connected component is skeletonized on its
own window (thinning looks at 3 x 3 neighbourhoods, which never hold another component's
pixels), and the skeleton pixels vote in one Hough transform over the scene, in raster order.
Each segment is then described on a crop of the maps around it. Outline grading reads the
hysteresis mask through `WindowedArray`, which computes only the pixels asked for.

Same segments and the same line-map values as the whole-scene functions (tests/test_chunked.py);
the crops' georeferencing is the grid's shifted by whole pixels, exact for the usual
power-of-two pixel sizes (0.5, 1, 2 m; elsewhere a crop's coordinates may differ from the
whole grid's in the last bits).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any, cast

import dask
import dask.array as da
import numpy as np
from affine import Affine
from scipy import ndimage as ndi
from skimage import morphology

from pipeline.core.components import Regions, label_regions
from pipeline.detect.blocks import _aligned, block_average_np, grey
from pipeline.detect.lines import along_lines
from pipeline.detect.walls import (
    LineMap,
    WallSegment,
    _describe,
    _keep_walls,
    _tophat_change,
    hough_segments,
    line_thresholds,
    noise_parts,
    sigma_of_spreads,
)
from pipeline.model import WallParams

__all__ = ["WindowedArray", "scene_walls_chunked"]

Persist = Callable[[da.Array], da.Array]
_NOISE_PARTS = 4  # tasks the noise estimate is split into (speed only, not results)
_DESCRIBE_BATCH = 16  # segments described per task at most (speed only, not results)


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


def _wall_grey(stack: da.Array, factor: int) -> da.Array:
    """Lazy grey image on the wall grid: `texture.grey` (a ``(y, x)`` input is taken as the
    grey image itself), block-averaged by ``factor`` per chunk (the chunk results
    `texture.block_mean` computes and joins)."""
    g = grey(stack) if stack.ndim == 3 else stack
    if factor <= 1:
        return g
    g = _aligned(g, factor)
    coarse = tuple(tuple(-(-c // factor) for c in axis) for axis in g.chunks)
    return da.map_blocks(lambda b: block_average_np(b, factor), g, chunks=coarse,
                         dtype=np.float32)


class _Stored:
    """Windows of a lazy ``(..., y, x)`` array (leading axes one chunk), read block by block.

    Only the blocks a window touches are computed, each through its own small graph (a read of
    a stored chunk), not through a graph of the whole array, whose cost grows with the number
    of chunks; the last few blocks are kept (reads cluster).
    """

    def __init__(self, arr: da.Array, keep: int = 32) -> None:  # noqa: D107
        self.shape = (int(arr.shape[-2]), int(arr.shape[-1]))
        self.lead = (0,) * (arr.ndim - 2)
        self.delayed = arr.to_delayed()
        self.bounds = [np.concatenate([[0], np.cumsum(c)]) for c in arr.chunks[-2:]]
        self.keep = keep
        self.recent: dict[tuple[int, int], np.ndarray] = {}
        self.lock = threading.Lock()

    def _block(self, i: int, j: int) -> np.ndarray:
        # thread-safe: outlines are assessed in parallel threads that read the same maps
        with self.lock:
            if (i, j) in self.recent:
                return self.recent[i, j]
        block = np.asarray(self.delayed[(*self.lead, i, j)].compute(scheduler="synchronous"))
        with self.lock:
            if len(self.recent) >= self.keep:
                self.recent.pop(next(iter(self.recent)))
            self.recent[i, j] = block
        return block

    def window(self, rows: slice, cols: slice) -> np.ndarray:
        """``arr[..., rows, cols]`` (steps of 1, inside the array) as NumPy."""
        (r0, r1), (c0, c1) = (rows.start, rows.stop), (cols.start, cols.stop)
        parts = []
        for i in range(np.searchsorted(self.bounds[0], r0, "right") - 1,
                       np.searchsorted(self.bounds[0], r1, "left")):
            lo, hi = self.bounds[0][i], self.bounds[0][i + 1]
            line = []
            for j in range(np.searchsorted(self.bounds[1], c0, "right") - 1,
                           np.searchsorted(self.bounds[1], c1, "left")):
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

    def __init__(self, arr: _Stored) -> None:  # noqa: D107
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


def _grid_stats(g: da.Array, *, scale: bool, leaf_px: int = 1 << 22,
                counts: tuple[int, int] | None = None) -> tuple[float, float | None]:
    """`walls._fill_value` and (``scale``) `walls.robust_scale` of a lazy wall-grid image, to
    the bit, reading ``leaf_px`` pixels or one chunk row at a time (never the whole image).
    ``counts``: its NaN and finite pixels, when already counted (`_pair_stats`)."""
    if counts is None:
        counts = dask.compute(da.isnan(g).sum(), da.isfinite(g).sum())
    n_nan, n_finite = int(counts[0]), int(counts[1])
    if n_finite == 0:
        return 0.0, 1.0 if scale else None
    stored = _Stored(g)
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


def _pair_stats(g_b: da.Array, g_a: da.Array) -> tuple[float, float, float]:
    """``(fill before, fill after, scale of before)``: `_grid_stats` of both wall-grid images,
    the pixel counts in one pass, then the two images' sums and sample as two parallel tasks
    on the configured Dask scheduler (each reads its own blocks synchronously)."""
    counts = dask.compute(*(f(g).sum() for g in (g_b, g_a) for f in (da.isnan, da.isfinite)))

    def stats(g: da.Array, scale: bool, n: tuple[int, int]) -> tuple[float, float | None]:
        return _grid_stats(g, scale=scale, counts=n)

    # the arrays travel inside closures: a Dask array argument would be computed whole
    (fill_b, spread), (fill_a, _) = dask.compute(
        dask.delayed(lambda: stats(g_b, True, counts[:2]), pure=False)(),
        dask.delayed(lambda: stats(g_a, False, counts[2:]), pure=False)())
    return fill_b, fill_a, cast(float, spread)


def _min_chunks(chunks: tuple[int, ...], depth: int) -> tuple[int, ...]:
    """Chunk sizes with any chunk under ``depth`` merged into its neighbour (one chunk stays)."""
    out: list[int] = []
    for c in chunks:
        if out and (c < depth or out[-1] < depth):
            out[-1] += c
        else:
            out.append(c)
    return tuple(out)


def _line_block(b: np.ndarray, a: np.ndarray, *, depth: int, scale: float,
                fills: tuple[float, float], radii: list[int], n_px: int,
                block_info: dict | None = None) -> np.ndarray:
    """``(strength, tophat before, tophat after, along)`` of one chunk from its haloed greys."""
    info = (block_info or {0: {"chunk-location": (0, 0), "num-chunks": (1, 1)}})[0]
    loc, num = info["chunk-location"], info["num-chunks"]
    lo = [depth if loc[k] > 0 else 0 for k in range(2)]
    hi = [b.shape[k] - (depth if loc[k] < num[k] - 1 else 0) for k in range(2)]
    bb, aa = (np.where(np.isfinite(g), g, f) / scale for g, f in zip((b, a), fills, strict=True))
    strength, th_b, th_a = _tophat_change(bb, aa, radii)
    bad = ~(np.isfinite(b) & np.isfinite(a))
    if bad.any():
        strength[ndi.binary_dilation(bad, iterations=radii[1])] = 0.0
    along = along_lines(strength, length_px=n_px)
    return np.stack([strength, th_b, th_a, along])[:, lo[0]:hi[0], lo[1]:hi[1]]


class _Rows:
    """Row bands of a stored 2-D array as NumPy (`walls.noise_sigma` reads full-width bands)."""

    def __init__(self, arr: da.Array) -> None:  # noqa: D107
        self.arr = _Stored(arr)
        self.shape = self.arr.shape

    def __getitem__(self, rows: slice) -> np.ndarray:
        return self.arr.rows(slice(*rows.indices(self.shape[0])[:2]))


def _seeded(regions: Regions, seeds: da.Array) -> np.ndarray:
    """Per global label ``0..n``: whether any of its pixels is in ``seeds`` (0 never)."""
    local, seed = regions.local.to_delayed(), seeds.to_delayed()

    def found(lab: np.ndarray, s: np.ndarray, lut: np.ndarray) -> np.ndarray:
        return np.unique(lut[lab[s]])

    parts = dask.compute(*(dask.delayed(found)(local[i], seed[i], regions.luts[i])
                           for i in np.ndindex(*regions.local.numblocks)))
    seeded = np.zeros(regions.n + 1, bool)
    seeded[np.concatenate([np.zeros(0, np.int64), *parts])] = True
    seeded[0] = False
    return seeded


def _skeleton_pixels(regions: Regions, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raster-ordered ``(rows, cols)`` of the skeletons of the kept components (labels).

    Components inside one chunk are thinned with the chunk; those across chunk borders on
    their own bounding-box windows.
    """
    bounds = [np.concatenate([[0], np.cumsum(c)]) for c in regions.chunks]
    box = regions.bbox
    chunk_r = np.searchsorted(bounds[0], box[:, 0], side="right") - 1
    chunk_c = np.searchsorted(bounds[1], box[:, 1], side="right") - 1
    inside = ((box[:, 2] <= bounds[0][chunk_r + 1]) & (box[:, 3] <= bounds[1][chunk_c + 1]))
    alone = np.concatenate([[False], keep[1:] & inside])
    local = regions.local.to_delayed()

    def thin(lab: np.ndarray, lut: np.ndarray, r0: int, c0: int) -> np.ndarray:
        rr, cc = np.nonzero(morphology.skeletonize(alone[lut[lab]]))
        return np.column_stack([rr + r0, cc + c0])

    parts = list(dask.compute(*(dask.delayed(thin)(local[i], regions.luts[i],
                                                   int(bounds[0][i[0]]), int(bounds[1][i[1]]))
                                for i in np.ndindex(*regions.local.numblocks))))
    for label in np.flatnonzero(keep[1:] & ~inside) + 1:
        r0, c0, r1, c1 = (int(v) for v in box[label - 1])
        image = regions.window(slice(r0, r1), slice(c0, c1)) == label
        rr, cc = np.nonzero(morphology.skeletonize(image))
        parts.append(np.column_stack([rr + r0, cc + c0]))
    px = np.concatenate([np.zeros((0, 2), np.int64), *parts]).astype(np.int64)
    px = px[np.argsort(px[:, 0] * regions.shape[1] + px[:, 1], kind="stable")]
    return px[:, 0], px[:, 1]


def _crop_map(maps: _Stored, mask: WindowedArray, lm: LineMap, rows: slice, cols: slice
              ) -> LineMap:
    """The line map on ``[rows, cols]`` (its transform shifted there)."""
    crop = maps.window(rows, cols)
    return LineMap(crop[0], mask[rows, cols], lm.threshold,
                   lm.transform * Affine.translation(cols.start, rows.start), lm.res_m,
                   crop[1], crop[2])


def _segments(maps: _Stored, mask: WindowedArray, lm: LineMap, regions: Regions,
              keep: np.ndarray, params: WallParams) -> list[WallSegment]:
    """`walls.find_wall_segments` on the stored maps: one Hough transform, crops to describe."""
    transform, res_m = lm.transform, lm.res_m
    rows, cols = _skeleton_pixels(regions, keep)
    height, width = regions.shape[0], regions.shape[1]
    merged = hough_segments(rows, cols, (height, width), transform=transform, res_m=res_m,
                            params=params)
    if not len(merged):
        return []
    # a crop holds everything `_describe` reads: the segment, 8 m parallels, shifts, slack
    margin = int(math.ceil((8.0 + params.existing_tolerance_m) / res_m)) + 4
    cs, rs = ~transform * (merged[:, [0, 2]].T, merged[:, [1, 3]].T)
    boxes = np.column_stack([np.maximum(0, np.floor(rs.min(axis=0)) - margin),
                             np.maximum(0, np.floor(cs.min(axis=0)) - margin),
                             np.minimum(height, np.ceil(rs.max(axis=0)) + margin + 1),
                             np.minimum(width, np.ceil(cs.max(axis=0)) + margin + 1)]
                            ).astype(np.int64)
    # described block by block (the blocks read stay cached), in groups of at most
    # _DESCRIBE_BATCH segments in parallel on the configured Dask scheduler (the chunk caches
    # are thread-safe: segments crowd into few blocks), listed in the merged order
    chunk = max(maps.bounds[0][1], 1), max(maps.bounds[1][1], 1)
    key = (boxes[:, 0] // chunk[0]) * (width // chunk[1] + 1) + boxes[:, 1] // chunk[1]
    order = np.argsort(key, kind="stable")
    groups = [part for group in np.split(order, np.flatnonzero(np.diff(key[order])) + 1)
              for part in np.array_split(group, -(-len(group) // _DESCRIBE_BATCH))]

    def describe(ks: np.ndarray) -> list[WallSegment | None]:
        found: list[WallSegment | None] = []
        for k in ks.tolist():
            r0, c0, r1, c1 = (int(v) for v in boxes[k])
            crop = _crop_map(maps, mask, lm, slice(r0, r1), slice(c0, c1))
            found.append(_describe(merged[k], crop, crop.transform, params.existing_tolerance_m))
        return found

    out: list[WallSegment | None] = [None] * len(merged)
    described = dask.compute(*(dask.delayed(describe, pure=False)(ks) for ks in groups))
    for ks, found in zip(groups, described, strict=True):
        for k, wall in zip(ks.tolist(), found, strict=True):
            out[k] = wall
    return _keep_walls([w for w in out if w is not None], threshold=lm.threshold, res_m=res_m,
                       params=params)


def scene_walls_chunked(before: da.Array, after: da.Array, *, transform: Affine, res_m: float,
                        params: WallParams, persist: Persist | None = None
                        ) -> tuple[LineMap, list[WallSegment]]:
    """`walls.new_line_map` and `walls.find_wall_segments` of a lazy pair, chunk by chunk.

    Parameters
    ----------
    before, after
        ``(band, y, x)`` Dask stacks on the working grid (co-registered, normalized; NaN =
        nodata).
    transform, res_m
        The working grid's transform and pixel size (finer than ``params.max_res_m``).
    params
        Wall parameters.
    persist
        Computes a lazy wall-grid array once and returns it stored (e.g. one file per chunk);
        five float32 maps and the int32 chunk labels of the wall grid go through it. None keeps
        them in memory (Dask ``persist``).

    Returns
    -------
    ``(line_map, segments)``: the line map's ``mask`` is a `WindowedArray` (pixels computed
    on demand), its other maps are None; segments as `find_wall_segments` returns them.
    """
    keep_lazy: Persist = persist or (lambda a: a.persist())
    factor = int(round(params.work_res_m / res_m)) if res_m < params.work_res_m else 1
    if factor > 1:
        transform, res_m = transform * Affine.scale(factor), res_m * factor
    if res_m > params.max_res_m:  # walls are below a pixel: an empty map, no segment
        shape = tuple(-(-n // factor) for n in before.shape[-2:])
        empty = WindowedArray((shape[0], shape[1]), bool,
                              lambda r, c: np.zeros((r.stop - r.start, c.stop - c.start), bool))
        return LineMap(cast(np.ndarray, empty), cast(np.ndarray, empty), math.inf, transform,
                       res_m), []
    g_b, g_a = (keep_lazy(_wall_grey(x, factor)) for x in (before, after))
    fill_b, fill_a, scale = _pair_stats(g_b, g_a)
    radii = [max(1, int(math.floor(w / (2 * res_m))))
             for w in (params.max_wall_width_m, params.max_shadow_width_m)]
    n_px = max(3, int(round(params.line_average_m / res_m)))
    depth = max(2 * max(radii) + 1, radii[1]) + n_px // 2 + 1
    chunks = tuple(_min_chunks(c, depth) for c in g_b.chunks)
    halo = [da.overlap.overlap(g.rechunk(chunks), depth={0: depth, 1: depth}, boundary="none")
            for g in (g_b, g_a)]
    maps = keep_lazy(da.map_blocks(
        _line_block, *halo, new_axis=0, chunks=((4,), *chunks), dtype=np.float32, depth=depth,
        scale=scale, fills=(fill_b, fill_a), radii=radii, n_px=n_px))
    strength, along = maps[0], maps[3]
    stored = _Stored(maps)
    # the noise (read from the grey images, in parts) beside the line averages' sample, in
    # parallel on the configured scheduler
    parts = noise_parts(cast(np.ndarray, _Rows(g_b)), cast(np.ndarray, _Rows(g_a)),
                        n_parts=_NOISE_PARTS)
    *spreads, sample = dask.compute(*(dask.delayed(part, pure=False)() for part in parts),
                                    along[::3, ::3])
    threshold, floor = line_thresholds(np.asarray(sample), sigma_of_spreads(spreads),
                                       scale=scale, n_px=n_px, params=params)
    weak = (strength >= floor) & (along >= floor)
    regions = label_regions(weak, connectivity=2, persist=keep_lazy)
    seeded = _seeded(regions, weak & (along >= threshold))
    shape = (regions.shape[0], regions.shape[1])
    mask = WindowedArray(shape, bool, lambda r, c: seeded[regions.window(r, c)])
    lm = LineMap(cast(np.ndarray, WindowedArray(shape, np.float32,
                                                lambda r, c: stored.window(r, c)[0])),
                 cast(np.ndarray, mask), float(threshold), transform, res_m)
    keep = seeded & (np.concatenate([[0], regions.area_px]) >= max(3.0, 3.0 / res_m))
    return lm, _segments(stored, mask, lm, regions, keep, params)
