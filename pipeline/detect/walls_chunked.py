"""pipeline.detect.walls_chunked: a lazy scene's new walls, chunk by chunk, as the whole search.

The chunked counterpart of `walls.new_line_map` followed by `walls.find_wall_segments` on a Dask
pair: no wall-grid map is held whole. The grey wall-grid images are stored, and the scene's
scale and nodata fills read from them band by band to the bit (`stored.grid_stats`). The top-hat
responses and their line averages are made per chunk with a halo that covers everything they
depend on, so they equal the whole-scene maps pixel for pixel; the scene's thresholds come from
the same samples. The hysteresis components are labelled chunk by
chunk and merged across borders (`pipeline.core.components.label_regions`), so a component is
seeded, and dropped when small, as a whole; each 8-connected component is skeletonized on its
own window (thinning looks at 3 x 3 neighbourhoods, which never hold another component's
pixels), and the skeleton pixels vote in one Hough transform over the scene, in raster order.
Each segment is then described on a crop of the maps around it. Outline grading reads the
hysteresis mask through `stored.WindowedArray`, which computes only the pixels asked for.

Same segments and the same line-map values as the whole-scene functions (tests/test_chunked.py);
the crops' georeferencing is the grid's shifted by whole pixels, exact for the usual
power-of-two pixel sizes (0.5, 1, 2 m; elsewhere a crop's coordinates may differ from the
whole grid's in the last bits).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import dask
import dask.array as da
import numpy as np
from affine import Affine
from scipy import ndimage as ndi
from skimage import morphology

from pipeline.core.components import Regions, chunk_borders, label_regions
from pipeline.detect.blocks import aligned_chunks, block_average_np, grey
from pipeline.detect.lines import along_lines
from pipeline.detect.stored import StoredBlocks, WindowedArray, pair_stats
from pipeline.detect.wall_noise import noise_parts, sigma_of_spreads
from pipeline.detect.walls import (
    LineMap,
    WallSegment,
    describe_segment,
    hough_segments,
    keep_walls,
    line_thresholds,
    tophat_change,
)
from pipeline.model import WallParams

__all__ = ["scene_walls_chunked", "Persist"]

Persist = Callable[[da.Array], da.Array]
_NOISE_PARTS = 4  # tasks the noise estimate is split into (speed only, not results)
_DESCRIBE_BATCH = 16  # segments described per task at most (speed only, not results)


def _wall_grey(stack: da.Array, factor: int) -> da.Array:
    """Lazy grey image on the wall grid: `texture.grey` (a ``(y, x)`` input is taken as the
    grey image itself), block-averaged by ``factor`` per chunk (the chunk results
    `texture.block_mean` computes and joins)."""
    g = grey(stack) if stack.ndim == 3 else stack
    if factor <= 1:
        return g
    g = aligned_chunks(g, factor)
    coarse = tuple(tuple(-(-c // factor) for c in axis) for axis in g.chunks)
    return da.map_blocks(lambda b: block_average_np(b, factor), g, chunks=coarse,
                         dtype=np.float32)


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
    strength, th_b, th_a = tophat_change(bb, aa, radii)
    bad = ~(np.isfinite(b) & np.isfinite(a))
    if bad.any():
        strength[ndi.binary_dilation(bad, iterations=radii[1])] = 0.0
    along = along_lines(strength, length_px=n_px)
    return np.stack([strength, th_b, th_a, along])[:, lo[0]:hi[0], lo[1]:hi[1]]


class _Rows:
    """Row bands of a stored 2-D array as NumPy (`wall_noise.noise_sigma` reads full-width
    bands)."""

    def __init__(self, arr: da.Array) -> None:  # noqa: D107
        self.arr = StoredBlocks(arr)
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
    bounds = chunk_borders(regions.chunks)
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


def _crop_map(maps: StoredBlocks, mask: WindowedArray, lm: LineMap, rows: slice, cols: slice
              ) -> LineMap:
    """The line map on ``[rows, cols]`` (its transform shifted there)."""
    crop = maps.window(rows, cols)
    return LineMap(crop[0], mask[rows, cols], lm.threshold,
                   lm.transform * Affine.translation(cols.start, rows.start), lm.res_m,
                   crop[1], crop[2])


def _segments(maps: StoredBlocks, mask: WindowedArray, lm: LineMap, regions: Regions,
              keep: np.ndarray, params: WallParams) -> list[WallSegment]:
    """`walls.find_wall_segments` on the stored maps: one Hough transform, crops to describe."""
    transform, res_m = lm.transform, lm.res_m
    rows, cols = _skeleton_pixels(regions, keep)
    height, width = regions.shape[0], regions.shape[1]
    merged = hough_segments(rows, cols, (height, width), transform=transform, res_m=res_m,
                            params=params)
    if not len(merged):
        return []
    # a crop holds everything `walls.describe_segment` reads: the segment, 8 m parallels,
    # shifts, slack
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
            found.append(describe_segment(merged[k], crop, crop.transform,
                                          params.existing_tolerance_m))
        return found

    out: list[WallSegment | None] = [None] * len(merged)
    described = dask.compute(*(dask.delayed(describe, pure=False)(ks) for ks in groups))
    for ks, found in zip(groups, described, strict=True):
        for k, wall in zip(ks.tolist(), found, strict=True):
            out[k] = wall
    return keep_walls([w for w in out if w is not None], threshold=lm.threshold, res_m=res_m,
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
    fill_b, fill_a, scale = pair_stats(g_b, g_a)
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
    stored = StoredBlocks(maps)
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
