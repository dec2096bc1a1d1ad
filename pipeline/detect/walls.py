"""pipeline.detect.walls: new perimeter walls and fences as long straight thin lines.

A wall seen from above at 2 m or finer is a thin bright line (its top) beside a dark band (its
shadow). Imagery finer than ``work_res_m`` (1 m) is first averaged to about that size: walls
keep several pixels, while the fine texture that changes between any two dates (grass,
leaves) averages out. Morphological top-hats keep exactly the features narrower than their
disc: bright ones up to ``max_wall_width_m`` (wall tops, fences) and dark ones up to
``max_shadow_width_m`` (shadows). Walls, fences and their shadows respond; roads (5 m and
wider) and step edges (field and roof boundaries) do not. A pixel is new line evidence where
the after top-hat exceeds the before one, both raw and averaged along its best direction
(hysteresis, and never more than a small share of the scene). Line pixels are thinned and
joined into straight segments by a greedy Hough transform (`pipeline.detect.lines`; no AGPL
LSD), collinear pieces are merged, and a segment is kept only if it stands out from its
parallels and the before image had no comparable line along it (``max_before_ratio``): a
field track or an old wall whose contrast changed with the season is not new. Pure: arrays
and the grid's transform in, shapely geometries in the grid CRS out; sizes in metres.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import shapely
from affine import Affine
from scipy import ndimage as ndi
from skimage import morphology

from pipeline.detect.blocks import block_mean
from pipeline.detect.lines import along_lines, collinear_groups, greedy_hough, merge_collinear
from pipeline.detect.wall_noise import fill_value, noise_sigma, robust_scale
from pipeline.model import WallParams

# merge_collinear, collinear_groups: re-exported from lines
__all__ = ["WallParams", "LineMap", "WallSegment", "new_line_map", "find_wall_segments",
           "merge_collinear", "collinear_groups", "as_grey", "drop_small", "describe_segment",
           "keep_walls", "tophat_change", "hough_segments", "line_thresholds"]


_BAND_ROWS = 512  # rows per band of the line-map kernels (memory, not results)


@dataclass(frozen=True)
class LineMap:
    """New thin-line evidence on the wall grid (``transform``, ``res_m``: the input grid, or
    its block average to about ``WallParams.work_res_m`` when the input is finer).

    ``strength`` is the new top-hat response (share of the before image's 2-98 % range, 0 where
    nothing new); ``mask`` holds the pixels where it, and its mean along ``line_average_m`` in
    the best direction, pass half of ``threshold``, connected to a pixel whose mean passes it;
    ``tophat_before`` and ``tophat_after`` are each date's own thin-line response (bright or
    dark), in the same units.
    """

    strength: np.ndarray
    mask: np.ndarray
    threshold: float
    transform: Affine
    res_m: float
    tophat_before: np.ndarray | None = None
    tophat_after: np.ndarray | None = None


@dataclass(frozen=True)
class WallSegment:
    """A straight run of new wall or fence evidence, ``line`` in the grid CRS.

    ``orientation_deg`` is in [0, 180), counter-clockwise from east; ``contrast`` the mean new
    top-hat response along it; ``support`` the share of its length on line pixels;
    ``lineness`` the after image's line contrast along it (its top-hat response along it
    minus that along parallels 5-8 m away: low for a line drawn through clutter);
    ``before_ratio`` the before image's line contrast over the after image's (a line that was
    already there, only fainter, has a high ratio).
    """

    line: shapely.LineString
    length_m: float
    orientation_deg: float
    contrast: float
    support: float
    before_ratio: float = 0.0
    lineness: float = 0.0


def as_grey(image: np.ndarray) -> np.ndarray:
    """Band mean of a ``(band, y, x)`` stack (a 2-D array passes through), float32."""
    a = np.asarray(image, dtype=np.float32)
    return a.mean(axis=0) if a.ndim == 3 else a


def drop_small(mask: np.ndarray, *, min_px: float) -> np.ndarray:
    """``mask`` without its 8-connected components of fewer than ``min_px`` pixels."""
    labels, n = ndi.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_px
    keep[0] = False
    return keep[labels]


def _banded(kernel: Callable[..., tuple[np.ndarray, ...]], inputs: Sequence[np.ndarray], *,
            halo: int, band_rows: int | None = None) -> list[np.ndarray]:
    """``kernel`` applied to bands of rows with ``halo`` rows either side, then stitched.

    For a kernel whose output at a pixel depends on inputs at most ``halo`` rows away, the
    result equals the whole-image one, while its temporaries are band-sized.
    """
    height = inputs[0].shape[0]
    band_rows = band_rows or _BAND_ROWS
    outs: list[np.ndarray] = []
    for r0 in range(0, height, band_rows):
        r1 = min(r0 + band_rows, height)
        lo, hi = max(0, r0 - halo), min(height, r1 + halo)
        parts = kernel(*(x[lo:hi] for x in inputs))
        if not outs:
            outs = [np.empty((height, *p.shape[1:]), p.dtype) for p in parts]
        for out, part in zip(outs, parts, strict=True):
            out[r0:r1] = part[r0 - lo:r1 - lo]
    return outs


def new_line_map(before: np.ndarray, after: np.ndarray, *, transform: Affine, res_m: float,
                 params: WallParams = WallParams()) -> LineMap:
    """Thin bright or dark lines of the after image that the before image lacks.

    Imagery finer than ``params.work_res_m`` is first averaged in whole blocks to about that
    pixel size: a wall with its shadow is still several pixels wide there, while grass, leaves
    and crop rows, whose texture changes between any two dates, average out.

    Parameters
    ----------
    before, after
        ``(band, y, x)`` or ``(y, x)`` arrays on the same grid, after co-registered and
        normalized to before; NaN = nodata.
    transform, res_m
        The input grid's affine transform and pixel size in metres.
    params
        Line widths, contrast, noise and sparsity limits, working resolution.

    Returns
    -------
    A `LineMap` on the wall grid (all zero, empty mask above ``params.max_res_m``).
    """
    g_b, g_a = as_grey(before), as_grey(after)
    factor = int(round(params.work_res_m / res_m)) if res_m < params.work_res_m else 1
    if factor > 1:
        g_b, g_a = (block_mean(g, factor)[0] for g in (g_b, g_a))
        transform, res_m = transform * Affine.scale(factor), res_m * factor
    radii = [max(1, int(math.floor(w / (2 * res_m))))
             for w in (params.max_wall_width_m, params.max_shadow_width_m)]
    if res_m > params.max_res_m:
        zero = np.zeros(g_b.shape, np.float32)
        return LineMap(zero, zero > 0, math.inf, transform, res_m)
    scale = robust_scale(g_b)
    fills = (fill_value(g_b), fill_value(g_a))

    def tophats(b: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, ...]:
        b, a = (np.where(np.isfinite(g), g, f) / scale for g, f in zip((b, a), fills,
                                                                      strict=True))
        return tophat_change(b, a, radii)

    # Band by band (each output pixel sees 2 radii around it): temporaries stay small.
    strength, th_b, th_a = _banded(tophats, [g_b, g_a], halo=2 * max(radii) + 1)
    bad = ~(np.isfinite(g_b) & np.isfinite(g_a))
    strength[ndi.binary_dilation(bad, iterations=radii[1]) if bad.any() else bad] = 0.0
    # Averaged along its best direction, a wall keeps its contrast and texture change fades:
    # the average decides which pixels are line evidence, the raw response keeps it thin.
    n_px = max(3, int(round(params.line_average_m / res_m)))
    along = _banded(lambda x: (along_lines(x, length_px=n_px),), [strength],
                    halo=n_px // 2 + 1)[0]
    threshold, floor = line_thresholds(along[::3, ::3], noise_sigma(g_b, g_a), scale=scale,
                                       n_px=n_px, params=params)
    weak = (strength >= floor) & (along >= floor)
    labels, n = ndi.label(weak, structure=np.ones((3, 3), bool))
    seeded = np.zeros(n + 1, bool)
    seeded[np.unique(labels[weak & (along >= threshold)])] = True
    seeded[0] = False
    return LineMap(strength, seeded[labels], float(threshold), transform, res_m, th_b, th_a)


def tophat_change(b: np.ndarray, a: np.ndarray, radii: list[int]
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(new, before, after)`` thin-line responses: bright lines narrower than a disc of
    ``radii[0]`` (wall tops, fences), dark ones narrower than ``radii[1]`` (shadows)."""
    new = np.zeros(b.shape, np.float32)
    th_b, th_a = np.zeros(b.shape, np.float32), np.zeros(b.shape, np.float32)
    for tophat, r in zip((morphology.white_tophat, morphology.black_tophat), radii, strict=True):
        fp = morphology.disk(r)
        t_b, t_a = tophat(b, fp), tophat(a, fp)
        new = np.maximum(new, t_a - t_b)
        th_b, th_a = np.maximum(th_b, t_b), np.maximum(th_a, t_a)
    return new, th_b, th_a


def line_thresholds(along_sample: np.ndarray, sigma: float, *, scale: float, n_px: int,
                    params: WallParams) -> tuple[float, float]:
    """``(threshold, floor)`` of the line evidence: a pixel whose line average reaches
    ``threshold`` seeds a line, one above ``floor`` joins the line it touches.

    New walls are sparse: where a whole scene's texture changed (season, haze), the top
    ``max_line_share`` of the pixels (``along_sample``: every third row and column of the line
    averages) at most may count as new lines; the threshold is also above the images' noise
    ``sigma`` (grey levels) averaged over ``n_px`` pixels. Hysteresis: faint stretches of a
    line (a wall along the sun, with no shadow) count when they connect to a clear stretch
    (never more than twice the share).
    """
    share = params.max_line_share
    top, low = np.quantile(along_sample, [1.0 - share, 1.0 - 2 * share])
    noise = params.noise_factor * sigma / scale / math.sqrt(n_px)
    threshold = max(params.min_contrast, float(top), noise)
    return threshold, max(0.5 * threshold, float(low))


def find_wall_segments(before: np.ndarray, after: np.ndarray, *, transform: Affine, res_m: float,
                       params: WallParams = WallParams(),
                       line_map: LineMap | None = None) -> list[WallSegment]:
    """Straight segments of new thin-line evidence at least ``params.min_length_m`` long.

    The thinned line pixels vote in a Hough transform (lines then carry the angle of their
    whole length, not of a few pixels); along each voted line, runs of line pixels with gaps
    up to ``params.gap_m`` become segments, and collinear overlapping segments are merged.

    Parameters
    ----------
    before, after
        ``(band, y, x)`` or ``(y, x)`` arrays on the same grid (see `new_line_map`).
    transform, res_m
        The input grid's affine transform (pixel corners) and pixel size; segments come out
        in its CRS.
    params
        Wall parameters.
    line_map
        A `new_line_map` result for this pair, to avoid computing it twice (its own grid is
        used).

    Returns
    -------
    Segments sorted by length, longest first; empty above ``params.max_res_m`` (walls are
    below a pixel there).
    """
    if res_m > params.max_res_m:
        return []
    lm = line_map if line_map is not None else new_line_map(
        before, after, transform=transform, res_m=res_m, params=params)
    transform, res_m = lm.transform, lm.res_m
    skeleton = morphology.skeletonize(drop_small(lm.mask, min_px=max(3.0, 3.0 / res_m)))
    rows, cols = np.nonzero(skeleton)
    merged = hough_segments(rows, cols, skeleton.shape, transform=transform, res_m=res_m,
                            params=params)
    out = [describe_segment(s, lm, transform, params.existing_tolerance_m) for s in merged]
    return keep_walls(out, threshold=lm.threshold, res_m=res_m, params=params)


def hough_segments(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int], *,
                   transform: Affine, res_m: float, params: WallParams) -> np.ndarray:
    """Straight runs through skeleton pixels, in map units, collinear pieces merged.

    Returns an ``(n, 4)`` float64 array of ``x0, y0, x1, y1`` (``n`` may be 0).
    """
    runs = greedy_hough(rows.astype(np.float64), cols.astype(np.float64), shape,
                        min_px=params.min_length_m / res_m / 2, near_px=max(1.5, 1.5 / res_m),
                        gap_px=max(2.0, params.gap_m / res_m))
    if not runs:
        return np.empty((0, 4), dtype=np.float64)
    px = np.asarray(runs, dtype=np.float64) + 0.5  # (col, row) of pixel centres
    xs, ys = transform * (px[:, [0, 2]].T, px[:, [1, 3]].T)  # type: ignore[operator]
    segs = np.column_stack([xs[0], ys[0], xs[1], ys[1]])
    return merge_collinear(segs, angle_tol_deg=params.angle_tol_deg,
                           offset_m=max(2 * res_m, 1.5), gap_m=params.gap_m)


def keep_walls(segments: list[WallSegment], *, threshold: float, res_m: float,
               params: WallParams) -> list[WallSegment]:
    """The segments that are new, line-like and long enough (alone or with their line)."""
    out = [w for w in segments if w.length_m >= params.min_length_m / 2
           and w.support >= params.min_support and w.before_ratio <= params.max_before_ratio
           and w.lineness >= params.min_lineness * threshold]
    if not out:
        return []
    # A dashed line (gates, faint stretches) keeps its pieces when together they are long.
    ends = np.array([np.asarray(w.line.coords).ravel() for w in out])
    labels = collinear_groups(ends, angle_tol_deg=params.angle_tol_deg,
                              offset_m=max(2 * res_m, 1.5), gap_m=5 * params.gap_m)
    total = np.bincount(labels, weights=[w.length_m for w in out])
    out = [w for w, k in zip(out, labels, strict=True) if total[k] >= params.min_length_m]
    return sorted(out, key=lambda w: -w.length_m)


def _line_contrast(seg: np.ndarray, image: np.ndarray, transform: Affine,
                   shift_m: float) -> float:
    """How much ``image`` stands out along segment ``seg`` from parallel lines 5-8 m away.

    The mean along the segment (its middle 80 %, best of lateral shifts up to ``shift_m``)
    minus the median of the means along parallels at 5, 6, 7 and 8 m on either side.
    """
    x0, y0, x1, y1 = seg
    length = float(math.hypot(x1 - x0, y1 - y0))
    res = abs(transform.a)
    u = np.array([x1 - x0, y1 - y0]) / max(length, 1e-9)
    normal = np.array([-u[1], u[0]])
    t = np.linspace(0.1, 0.9, max(2, int(0.8 * length / res)))
    base = np.array([x0, y0]) + t[:, None] * (np.array([x1, y1]) - np.array([x0, y0]))
    near = np.arange(-shift_m, shift_m + 1e-9, max(res / 2, 0.25))
    far = np.array([-8.0, -7.0, -6.0, -5.0, 5.0, 6.0, 7.0, 8.0])
    offsets = np.concatenate([near, far])
    xy = base[None, :, :] + offsets[:, None, None] * normal[None, None, :]
    cols, rows = ~transform * (xy[..., 0], xy[..., 1])
    vals = ndi.map_coordinates(image, [rows.ravel() - 0.5, cols.ravel() - 0.5], order=1,
                               mode="nearest").reshape(len(offsets), -1).mean(axis=1)
    return float(vals[: len(near)].max() - np.median(vals[len(near):]))


def describe_segment(seg: np.ndarray, lm: LineMap, transform: Affine, shift_m: float
                     ) -> WallSegment:
    """Length, orientation, contrast, support and before ratio of one segment."""
    x0, y0, x1, y1 = seg
    length = float(math.hypot(x1 - x0, y1 - y0))
    n = max(2, int(length / abs(transform.a)) + 1)
    t = np.linspace(0.0, 1.0, n)
    cols, rows = ~transform * (x0 + t * (x1 - x0), y0 + t * (y1 - y0))
    r = np.clip(np.floor(rows).astype(int), 0, lm.mask.shape[0] - 1)
    c = np.clip(np.floor(cols).astype(int), 0, lm.mask.shape[1] - 1)
    window = np.s_[max(r.min() - 1, 0):r.max() + 2, max(c.min() - 1, 0):c.max() + 2]
    at = (r - max(r.min() - 1, 0), c - max(c.min() - 1, 0))
    # One pixel of slack either side: a straight segment through a slightly wavy line.
    contrast = ndi.maximum_filter(lm.strength[window], size=3)[at]
    on_line = ndi.maximum_filter(lm.mask[window], size=3)[at]
    ratio, after = 0.0, float(contrast.mean())
    if lm.tophat_before is not None and lm.tophat_after is not None:
        after = _line_contrast(seg, lm.tophat_after, transform, shift_m)
        before = _line_contrast(seg, lm.tophat_before, transform, shift_m)
        ratio = max(before, 0.0) / after if after > 0 else math.inf
    return WallSegment(
        line=shapely.LineString([(x0, y0), (x1, y1)]), length_m=length,
        orientation_deg=float(math.degrees(math.atan2(y1 - y0, x1 - x0)) % 180.0),
        contrast=float(contrast.mean()), support=float(on_line.mean()), before_ratio=ratio,
        lineness=after)


