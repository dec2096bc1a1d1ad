"""pipeline.detect.outlines: compound outlines traced from new wall segments.

`outline_from_segments` moves each side of a candidate outline (from the site-scale compound
search) onto the new wall nearest it; `propose_outlines` finds, without any candidate, the
rectilinear outlines that new wall segments close or nearly close: pairs of long parallel
walls give a rectangle, each of its sides is snapped onto the walls, and what is well closed
and not nested inside a better outline is kept (an inner fence ring or a yard is nested).
Pure: shapely geometries in the grid CRS in and out; sizes in metres.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import dask
import numpy as np
import shapely

from pipeline.detect.enclosure import (
    PARALLEL_DEG,
    SegmentArrays,
    count_sides_backed,
    perimeter_samples,
)
from pipeline.detect.walls import WallSegment
from pipeline.model import WallParams

__all__ = ["SegmentArrays", "outline_from_segments", "propose_outlines", "segment_closure"]

_SEARCH_M = 30.0  # how far a side may move onto a wall (outline_from_segments)
_SEED_BATCH = 64  # seeds traced per task (a few tens of milliseconds of work); not a result


def _side_line(a: np.ndarray, b: np.ndarray, outward: np.ndarray, segs: SegmentArrays,
               search_m: float, tol: float) -> tuple[np.ndarray, np.ndarray, float] | None:
    """The outermost well-supported wall line near side ``a-b``.

    Returns ``(anchor, direction, weight)``: the weighted mean of the chosen segments'
    midpoints, their weighted direction and their total weight; None without a candidate.
    """
    length = float(np.hypot(*(b - a)))
    u = (b - a) / length
    p, q, v, mid = segs.p, segs.q, segs.direction, segs.mid
    along = v @ u
    offset = (mid - a) @ outward
    tp, tq = (p - a) @ u, (q - a) @ u
    overlap = np.minimum(np.maximum(tp, tq), length) - np.maximum(np.minimum(tp, tq), 0.0)
    ok = ((np.abs(along) >= math.cos(math.radians(PARALLEL_DEG)))
          & (np.abs(offset) <= search_m) & (overlap > 0))
    if not ok.any():
        return None
    weight = overlap[ok] * segs.weight[ok]
    strong = weight >= 0.5 * weight.max()
    outer = offset[ok][strong].max()
    chosen = strong & (offset[ok] >= outer - tol)
    w = weight[chosen]
    anchor = _weighted_mean(mid[ok][chosen], w)
    dirs = v[ok][chosen] * np.where(along[ok][chosen] > 0, 1.0, -1.0)[:, None]
    direction = _weighted_mean(dirs, w)
    return anchor, direction / np.hypot(*direction), float(w.sum())


def _weighted_mean(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``np.average(x, axis=0, weights=w)`` by the same operations, without its checks."""
    wgt = w[:, None]
    total = wgt.sum(axis=0)
    if np.any(total == 0.0):
        raise ZeroDivisionError("Weights sum to zero, can't be normalized")
    return np.multiply(x, wgt).sum(0) / total


def _common_angle(found: list, fallback: float) -> float:
    """Weighted mean direction (radians, modulo 90 degrees) of the snapped sides."""
    vote = sum(f[2] * np.exp(4j * math.atan2(f[1][1], f[1][0])) for f in found if f)
    return float(np.angle(vote) / 4.0) if abs(vote) > 0 else fallback


def outline_from_segments(segments: Sequence[WallSegment] | SegmentArrays, *,
                          seed: shapely.Polygon,
                          res_m: float, params: WallParams = WallParams(),
                          search_m: float = _SEARCH_M) -> tuple[shapely.Polygon, int]:
    """Snap each side of ``seed``'s minimum rotated rectangle onto the wall segments near it.

    For each side, the parallel segments within ``search_m`` that overlap it are candidates;
    the side moves onto the outermost of those with at least half the best weight (overlap
    times contrast times support: the outer wall, not a fence inside it nor a faint line
    outside it). All sides then take the walls' common direction (weighted over the four
    sides, so short pieces do not tilt a side): the outline stays a rectangle. Sides without a
    candidate stay where the seed rectangle has them; with no side on a wall, ``seed`` itself
    comes back.

    Parameters
    ----------
    segments
        New wall segments (`pipeline.detect.walls.find_wall_segments`).
    seed
        A rough outline in the grid CRS (a ``CompoundCandidate.polygon``).
    res_m
        Pixel size of the wall grid (``LineMap.res_m``); sets the tolerance with
        ``params.tolerance_m``.
    params
        Wall parameters.
    search_m
        How far a side may move onto a wall.

    Returns
    -------
    ``(outline, n_snapped)``: the rectangle and how many of its four sides met a wall.
    """
    rect = shapely.minimum_rotated_rectangle(seed)
    segs = SegmentArrays.of(segments)
    if rect.geom_type != "Polygon" or not segs.items:
        return seed, 0
    c = np.asarray(shapely.geometry.polygon.orient(rect, 1.0).exterior.coords)[:4]
    centre = c.mean(axis=0)
    tol = max(2 * res_m, params.tolerance_m)
    sides, found = [], []
    for i in range(4):
        a, b = c[i], c[(i + 1) % 4]
        u = (b - a) / np.hypot(*(b - a))
        outward = np.array([u[1], -u[0]])
        if outward @ ((a + b) / 2 - centre) < 0:
            outward = -outward
        sides.append(((a + b) / 2, u))
        found.append(_side_line(a, b, outward, segs, search_m, tol))
    theta = _common_angle(found, math.atan2(sides[0][1][1], sides[0][1][0]))
    lines = []
    for (mid, u), f in zip(sides, found, strict=True):
        # The common direction (or its right angle) nearest this side's own.
        k = round((math.atan2(u[1], u[0]) - theta) / (math.pi / 2))
        d = np.array([math.cos(theta + k * math.pi / 2), math.sin(theta + k * math.pi / 2)])
        lines.append((f[0] if f else mid, d))
    corners = []
    for i in range(4):
        (p1, d1), (p2, d2) = lines[i - 1], lines[i]
        det = d1[0] * -d2[1] + d2[0] * d1[1]
        if abs(det) < 1e-6:
            return seed, 0
        t = ((p2 - p1)[0] * -d2[1] + d2[0] * (p2 - p1)[1]) / det
        corners.append(p1 + t * d1)
    poly, snapped = shapely.Polygon(corners), sum(f is not None for f in found)
    if snapped == 0 or not poly.is_valid or poly.area <= 0:
        return seed, 0
    return poly, snapped


def segment_closure(outline: shapely.Polygon, segments: Sequence[WallSegment] | SegmentArrays,
                    *, tolerance_m: float) -> tuple[float, int]:
    """Share of the outline within ``tolerance_m`` of a parallel wall segment (no pixels),
    and how many of its sides have at least half their length so backed."""
    pts, tangents, _, side = perimeter_samples(outline, max(tolerance_m / 3, 0.5))
    backed = SegmentArrays.of(segments).backing(pts, tangents, tolerance_m)
    return float(backed.mean()), count_sides_backed(backed, side)[0]


def _families(segments: Sequence[WallSegment], tol_deg: float) -> list[float]:
    """Orientations (degrees, modulo 90) of the groups of mutually square segments."""
    angles: list[tuple[float, float]] = []  # (angle, total length)
    for s in sorted(segments, key=lambda s: -s.length_m):
        a = s.orientation_deg % 90.0
        for i, (b, w) in enumerate(angles):
            d = (a - b + 45.0) % 90.0 - 45.0
            if abs(d) <= tol_deg:
                angles[i] = ((b + d * s.length_m / (w + s.length_m)) % 90.0, w + s.length_m)
                break
        else:
            angles.append((a, s.length_m))
    return [a for a, _ in angles]


def _pair_frames(segments: Sequence[WallSegment], angle_deg: float, *, tol_deg: float,
                 min_side_m: float) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The rectangles spanned by pairs of parallel segments of one orientation family, per
    axis: ``(axis, other, frames)`` with ``frames`` rows ``(lo, hi, a, b)``, the extent along
    ``axis`` and across it (along ``other``) of each pair, in pair order."""
    t = math.radians(angle_deg)
    u, v = np.array([math.cos(t), math.sin(t)]), np.array([-math.sin(t), math.cos(t)])
    out = []
    for axis, other in ((u, v), (v, u)):
        lines = []
        for s in segments:
            p, q = (np.asarray(c) for c in s.line.coords)
            d = (q - p) / max(s.length_m, 1e-9)
            if abs(float(d @ axis)) >= math.cos(math.radians(tol_deg)):
                lo, hi = sorted([float(p @ axis), float(q @ axis)])
                lines.append((lo, hi, float((p + q) @ other) / 2))
        frames = [np.empty((0, 4))]
        arr = np.array(lines, float).reshape(-1, 3)
        for i, (lo1, hi1, o1) in enumerate(arr):  # each with the lines after it
            lo2, hi2, o2 = arr[i + 1:].T
            overlap = np.minimum(hi1, hi2) - np.maximum(lo1, lo2)
            ok = (np.abs(o1 - o2) >= min_side_m) & (
                overlap >= 0.5 * np.minimum(hi1 - lo1, hi2 - lo2))
            frames.append(np.column_stack([np.minimum(lo1, lo2[ok]), np.maximum(hi1, hi2[ok]),
                                           np.minimum(o1, o2[ok]), np.maximum(o1, o2[ok])]))
        out.append((axis, other, np.vstack(frames)))
    return out


def _frame_polygons(axis: np.ndarray, other: np.ndarray, frames: np.ndarray,
                    grow: np.ndarray | float = 0.0) -> np.ndarray:
    """The rectangles of ``frames`` (rows ``lo, hi, a, b``), each side moved out by ``grow``."""
    lo, hi, a, b = (frames.T + np.array([-1.0, 1.0, -1.0, 1.0])[:, None] * grow)
    corners = [lo[:, None] * axis + a[:, None] * other, hi[:, None] * axis + a[:, None] * other,
               hi[:, None] * axis + b[:, None] * other, lo[:, None] * axis + b[:, None] * other]
    return shapely.polygons(np.stack(corners, axis=1))


def _pair_seeds(segments: Sequence[WallSegment], angle_deg: float, *, tol_deg: float,
                min_side_m: float) -> list[shapely.Polygon]:
    """Rectangles spanned by pairs of parallel segments of one orientation family."""
    return [seed for axis, other, frames in _pair_frames(segments, angle_deg, tol_deg=tol_deg,
                                                         min_side_m=min_side_m)
            for seed in _frame_polygons(axis, other, frames)]


def _may_close(axis: np.ndarray, other: np.ndarray, frames: np.ndarray, segs: SegmentArrays,
               *, tol: float, search_m: float, min_closure: float, min_sides: int
               ) -> np.ndarray:
    """Whether each seed rectangle of ``frames`` can give an outline that propose_outlines
    keeps: a necessary condition, so a seed that fails it is skipped without changing the
    result.

    Where the outline's two sides across the pair (at ``lo`` and ``hi``) can lie is bounded
    from what `outline_from_segments` can do: each side moves at most ``search_m`` onto a
    wall, and all turn by the walls' common direction, which deviates from the seed's axes by
    at most the largest deviation ``delta`` among the segments that can be chosen (a weighted
    mean of directions stays within their range). Only the segments parallel to a cross side
    that come within ``tol`` of where it can lie can back its perimeter samples, each at most
    its length plus ``2 tol`` (and one sample). With ``min_sides`` >= 3 one cross side must
    be half backed (the pair's own sides are only two); and the share of all samples backed
    must reach ``min_closure`` even if the pair's sides were backed in full. All bounds are
    generous; the test checks that every skipped seed fails the full search.
    """
    n = len(frames)
    if not n or not segs.items:
        return np.zeros(n, bool)
    lo, hi, a, b = frames.T
    h = float(np.hypot(*(segs.q - segs.p).T).max()) / 2
    delta = _deviation_bound(axis, other, frames, segs, max(search_m, h))
    t, sin, cos = np.tan(np.radians(delta)), np.sin(np.radians(delta)), np.cos(np.radians(delta))
    width, length, s = b - a, hi - lo, search_m
    # how far the cross sides' points can lie from the seed's, across and along them
    out_v = (s * (1 + t) + t * t * (width + h) + t * (length + h)) / (1 - t * t)
    out_u = (s * (1 + t) + t * t * (length + h) + t * (width + h)) / (1 - t * t)
    side_min = np.maximum(0.0, (width - 2 * s) * cos - (length + 2 * h) * sin)
    pair_side_max = length + 2 * s + (width + 2 * h) * sin
    # perimeter samples (segment_closure): n = round(side / step), at least one
    step = max(tol / 3, 0.5)
    spacing_min = step / (1 + 0.5 * step / np.maximum(side_min, 1e-9))
    n_cross_min = side_min / step - 0.5
    n_pair_max = pair_side_max / step + 0.5
    across = np.abs((np.degrees(np.arctan2(segs.unit @ axis, segs.unit @ other)) + 90.0)
                    % 180.0 - 90.0)  # from the cross sides' direction (``other``)
    backed = []  # at most, on the cross side at lo and at hi
    for end in (lo, hi):
        band = np.column_stack([end - out_u - tol, end + out_u + tol,
                                a - out_v - tol, b + out_v + tol])
        k, j = segs.tree.query(_frame_polygons(axis, other, band), predicate="intersects")
        ok = across[j] <= PARALLEL_DEG + delta[k] + 1e-6
        reach = shapely.length(segs.lines[j[ok]]) + 2 * tol
        backed.append(np.bincount(k[ok], weights=reach / spacing_min[k[ok]] + 1.0,
                                  minlength=n))
    keep = (side_min <= step) | (
        (1 - min_closure) * 2 * n_pair_max + backed[0] + backed[1]
        >= min_closure * 2 * n_cross_min)
    if min_sides >= 3:
        keep &= (side_min <= step) | (np.maximum(backed[0], backed[1]) >= 0.5 * n_cross_min)
    return keep


def _deviation_bound(axis: np.ndarray, other: np.ndarray, frames: np.ndarray,
                     segs: SegmentArrays, reach: float) -> np.ndarray:
    """Per seed, the largest deviation (degrees) from the seed's axes of the segments
    `_side_line` may choose for one of its sides: within `PARALLEL_DEG` of a side, midpoint
    within ``reach`` (``search_m`` across a side, half a segment along it) of the seed."""
    dev = np.abs((np.degrees(np.arctan2(segs.direction @ other, segs.direction @ axis))
                  + 45.0) % 90.0 - 45.0)  # from the nearer axis
    chosen = dev <= PARALLEL_DEG + 1e-6
    k, j = shapely.STRtree(shapely.points(segs.mid[chosen])).query(
        _frame_polygons(axis, other, frames, reach), predicate="intersects")
    delta = np.full(len(frames), 1e-6)
    np.maximum.at(delta, k, dev[chosen][j] + 1e-6)
    return delta


def propose_outlines(segments: Sequence[WallSegment], *, res_m: float,
                     params: WallParams = WallParams(), min_area_m2: float = 2500.0,
                     min_closure: float = 0.6, min_sides: int = 3
                     ) -> list[tuple[shapely.Polygon, float]]:
    """Rectilinear outlines that new wall segments close or nearly close.

    Parameters
    ----------
    segments
        New wall segments (`pipeline.detect.walls.find_wall_segments`).
    res_m
        Pixel size of the wall grid (``LineMap.res_m``); sets the tolerance with
        ``params.tolerance_m``.
    params
        Wall parameters.
    min_area_m2
        Smaller outlines are not proposed.
    min_closure
        Share of the outline that must lie on parallel wall segments.
    min_sides
        Number of sides that must have at least half their length on wall segments (two
        parallel walls alone do not enclose anything).

    Returns
    -------
    ``(outline, closure)`` pairs, best closed and largest first; an outline mostly inside a
    better one (an inner fence ring, a yard) is left out.
    """
    tol = max(2 * res_m, params.tolerance_m)
    long = [s for s in segments if s.length_m >= params.min_length_m]
    arrays = SegmentArrays.of(segments)  # built once for every seed
    seeds = []
    for angle in _families(long, PARALLEL_DEG / 2):
        for axis, other, frames in _pair_frames(long, angle, tol_deg=PARALLEL_DEG / 2,
                                                min_side_m=params.min_length_m):
            # a seed that cannot give a kept outline is not traced
            frames = frames[_may_close(axis, other, frames, arrays, tol=tol, search_m=_SEARCH_M,
                                       min_closure=min_closure, min_sides=min_sides)]
            seeds += list(_frame_polygons(axis, other, frames))

    def trace(batch: list[shapely.Polygon]) -> list[tuple[shapely.Polygon, float]]:
        out = []
        for seed in batch:
            outline, _ = outline_from_segments(arrays, seed=seed, res_m=res_m, params=params)
            if outline.area < min_area_m2:
                continue
            closure, sides = segment_closure(outline, arrays, tolerance_m=tol)
            if closure >= min_closure and sides >= min_sides:
                out.append((outline, closure))
        return out

    # seeds are independent: batches of them in parallel on the configured Dask scheduler,
    # their outlines joined in the seeds' order
    batches = [seeds[i:i + _SEED_BATCH] for i in range(0, len(seeds), _SEED_BATCH)]
    found = [f for part in dask.compute(*(dask.delayed(trace, pure=False)(b) for b in batches))
             for f in part]
    found.sort(key=lambda f: -f[1] * f[0].length)
    kept: list[tuple[shapely.Polygon, float]] = []
    boxes = np.empty((0, 4))  # of the kept outlines: one whose box misses shares no area
    for outline, closure in found:
        b = np.asarray(outline.bounds)
        meet = ((boxes[:, 0] <= b[2]) & (boxes[:, 2] >= b[0]) & (boxes[:, 1] <= b[3])
                & (boxes[:, 3] >= b[1])) | (outline.area <= 0)  # (0 < 0 fails: test all)
        if all(shapely.intersection(outline, kept[i][0]).area < 0.5 * outline.area
               for i in np.flatnonzero(meet)):
            kept.append((outline, closure))
            boxes = np.vstack([boxes, b])
    return kept
