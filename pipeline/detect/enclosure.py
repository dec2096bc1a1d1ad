"""pipeline.detect.enclosure: how much of a compound outline is a new wall, and what is inside.

Given an outline (a compound candidate's rectangle, or one traced from wall segments), the
new wall segments and the new thin-line mask of `pipeline.detect.walls`, this measures the
share of the outline backed by new wall evidence (closure), a second fence line a few metres
inside (double fence) and fences across the inside that split it into yards. Pure: shapely
geometries in the grid CRS and NumPy arrays in, a frozen dataclass out; sizes in metres.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely
from affine import Affine

from pipeline.detect.lines import collinear_groups, merge_collinear
from pipeline.detect.walls import LineMap, WallSegment
from pipeline.model import WallParams

__all__ = ["EnclosureMeasures", "measure_enclosure", "perimeter_samples", "segment_backing",
           "segment_units", "PARALLEL_DEG", "count_sides_backed",
           "SegmentArrays"]

PARALLEL_DEG = 10.0  # a wall segment backs an outline side within this angle (degrees)


@dataclass(frozen=True)
class EnclosureMeasures:
    """Wall evidence along an outline and fences inside it (lengths in metres).

    ``closure_ratio`` is the share of the perimeter within ``tolerance_m`` of a parallel new
    wall segment that lies on new line pixels; ``wall_length_m`` is that share of the
    perimeter; ``sides_backed`` counts the sides (edges of at least a tenth of the perimeter)
    with at least half their length backed. ``double_fence_share`` is the share of the
    wall-backed perimeter with a second line ``double_fence_gap_m`` (median) inside it.
    ``internal_fences`` are new straight lines inside the outline, parallel to a side,
    spanning at least ``internal_min_span`` of it, each end reaching the wall or a fence.
    ``walled`` holds the backed perimeter samples (empty without any).
    """

    outline: shapely.Polygon
    area_m2: float
    perimeter_m: float
    rectangularity: float
    closure_ratio: float
    wall_length_m: float
    longest_gap_m: float
    double_fence: bool
    double_fence_share: float
    double_fence_gap_m: float | None
    internal_fences: tuple[shapely.LineString, ...]
    tolerance_m: float
    sides_backed: int = 0
    sides_total: int = 0
    walled: shapely.MultiPoint = shapely.MultiPoint()  # the backed perimeter samples

    @property
    def internal_fence_count(self) -> int:
        """Number of internal fences."""
        return len(self.internal_fences)

    def as_dict(self) -> dict[str, Any]:
        """The numbers (no geometry), named as in ``Evidence.measurements``."""
        return {
            "area_m2": self.area_m2, "perimeter_m": self.perimeter_m,
            "rectangularity": self.rectangularity, "closure_ratio": self.closure_ratio,
            "wall_length_m": self.wall_length_m, "longest_gap_m": self.longest_gap_m,
            "double_fence": self.double_fence, "double_fence_share": self.double_fence_share,
            "double_fence_gap_m": self.double_fence_gap_m,
            "internal_fence_count": self.internal_fence_count,
            "wall_tolerance_m": self.tolerance_m, "sides_backed": self.sides_backed,
            "sides_total": self.sides_total,
        }


def perimeter_samples(outline: shapely.Polygon, step_m: float
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Points every ``step_m`` along the exterior: points, unit tangents, inward normals, and
    the index of the side (ring edge) each lies on."""
    ring = np.asarray(outline.exterior.coords)
    pts, tangents, sides = [], [], []
    for i, (a, b) in enumerate(zip(ring[:-1], ring[1:], strict=True)):
        length = float(np.hypot(*(b - a)))
        if length <= 0:
            continue
        n = max(1, int(round(length / step_m)))
        t = (np.arange(n) + 0.5) / n
        pts.append(a + t[:, None] * (b - a))
        tangents.append(np.repeat(((b - a) / length)[None, :], n, axis=0))
        sides.append(np.full(n, i))
    p, u = np.vstack(pts), np.vstack(tangents)
    normal = np.column_stack([-u[:, 1], u[:, 0]])
    probe = p + normal * min(step_m, 0.5)
    outside = ~shapely.contains_xy(outline, probe[:, 0], probe[:, 1])
    normal[outside] *= -1
    return p, u, normal, np.concatenate(sides)


def count_sides_backed(backed: np.ndarray, side: np.ndarray, *, min_share: float = 0.5,
                       min_side_share: float = 0.1) -> tuple[int, int]:
    """``(backed, total)`` sides: sides of at least ``min_side_share`` of the samples, and
    how many of them have at least ``min_share`` of their samples backed."""
    counts = np.bincount(side)
    hits = np.bincount(side, weights=backed.astype(float), minlength=len(counts))
    real = counts >= min_side_share * len(side)
    return int(np.sum(real & (hits >= min_share * np.maximum(counts, 1)))), int(real.sum())


def _profiles(mask: np.ndarray, transform: Affine, pts: np.ndarray, normal: np.ndarray,
              offsets: np.ndarray) -> np.ndarray:
    """``mask`` read at ``pts + offset * normal`` (nearest pixel), shape (points, offsets)."""
    xy = pts[:, None, :] + offsets[None, :, None] * normal[:, None, :]
    cols, rows = ~transform * (xy[..., 0], xy[..., 1])
    r, c = np.floor(rows).astype(int), np.floor(cols).astype(int)
    inside = (r >= 0) & (r < mask.shape[0]) & (c >= 0) & (c < mask.shape[1])
    out = np.zeros(r.shape, bool)
    out[inside] = mask[r[inside], c[inside]]
    return out


def segment_backing(pts: np.ndarray, tangents: np.ndarray,
                    segments: Sequence[WallSegment] | SegmentArrays, tol: float) -> np.ndarray:
    """Whether each point lies within ``tol`` of a segment parallel to its tangent."""
    return SegmentArrays.of(segments).backing(pts, tangents, tol)


def segment_units(segments: Sequence[WallSegment]) -> np.ndarray:
    """``(n, 2)`` unit vectors of the segments' ``orientation_deg``."""
    return np.array([[math.cos(math.radians(s.orientation_deg)),
                      math.sin(math.radians(s.orientation_deg))] for s in segments],
                    dtype=float).reshape(-1, 2)


def _backed_pairs(pts: np.ndarray, ii: np.ndarray, jj: np.ndarray, lines: np.ndarray,
                  a: np.ndarray, b: np.ndarray, simple: np.ndarray, tol: float) -> np.ndarray:
    """Whether each point is within ``tol`` of a line it is paired with (point ``ii[k]``,
    line ``jj[k]``); lines with ``simple`` True are the segments ``a-b`` (NumPy distance,
    GEOS within `_EXACT_BAND_M` of ``tol``), the others are measured by GEOS."""
    out = np.zeros(len(pts), bool)
    if not len(ii):
        return out
    dist = _point_segment_distance(pts[ii], a[jj], b[jj])
    exact = ~simple[jj] | (np.abs(dist - tol) <= _EXACT_BAND_M)
    if exact.any():
        dist[exact] = shapely.distance(shapely.points(pts[ii[exact]]), lines[jj[exact]])
    out[ii[dist <= tol]] = True
    return out


@dataclass(frozen=True)
class SegmentArrays:
    """Wall segments as arrays (endpoints, weights, directions) and a spatial index, built once
    when many outlines are matched against the same segments."""

    items: tuple[WallSegment, ...]
    p: np.ndarray  # (n, 2) start points
    q: np.ndarray  # (n, 2) end points
    weight: np.ndarray  # contrast x support
    lines: np.ndarray  # the LineStrings (object array)
    unit: np.ndarray  # (n, 2) unit vectors of the segments' orientation (`segment_units`)
    tree: shapely.STRtree
    direction: np.ndarray  # (n, 2) unit vectors from p to q
    mid: np.ndarray  # (n, 2) midpoints
    simple: np.ndarray  # (n,) lines of two points (p-q); the others are measured by GEOS

    @classmethod
    def of(cls, segments: Sequence[WallSegment] | SegmentArrays) -> SegmentArrays:
        if isinstance(segments, SegmentArrays):
            return segments
        items = tuple(segments)
        lines = np.array([s.line for s in items], dtype=object)
        # first and last vertex (wall segments have two; other lines are measured by GEOS)
        coords, index = shapely.get_coordinates(lines, return_index=True)
        counts = np.bincount(index, minlength=len(items))
        last = np.cumsum(counts) - 1
        p, q = coords[last - counts + 1], coords[last]
        direction = (q - p) / np.maximum(np.hypot(*(q - p).T), 1e-9)[:, None]
        return cls(items, p, q, np.array([s.contrast * s.support for s in items], float),
                   lines, segment_units(items), shapely.STRtree(lines), direction, (p + q) / 2,
                   counts == 2)

    def backing(self, pts: np.ndarray, tangents: np.ndarray, tol: float) -> np.ndarray:
        """`segment_backing` of these segments: each run of `_RUN_PX` consecutive points is
        measured only against the parallel segments whose bounding box comes within ``tol`` of
        the run (the others cannot be within ``tol``); the pairs are listed, never a dense
        points x segments matrix, so a long outline in a large scene costs what its
        neighbourhood holds."""
        if not self.items or not len(pts):
            return np.zeros(len(pts), bool)
        starts = np.arange(0, len(pts), _RUN_PX)
        lo = np.minimum.reduceat(pts, starts, axis=0) - tol
        hi = np.maximum.reduceat(pts, starts, axis=0) + tol
        k, hit = self.tree.query(shapely.box(lo[:, 0], lo[:, 1], hi[:, 0], hi[:, 1]))
        if not len(k):
            return np.zeros(len(pts), bool)
        # every point of run k paired with each segment hit by its box
        size = np.minimum(_RUN_PX, len(pts) - starts[k])
        first = np.cumsum(size) - size
        ii = np.repeat(starts[k] - first, size) + np.arange(int(size.sum()))
        jj = np.repeat(hit, size)
        # parallel: a perimeter's tangents come in runs (one per side), tested once a run
        change = np.any(tangents[1:] != tangents[:-1], axis=1)
        group = np.concatenate([[0], np.cumsum(change)])
        heads = tangents[np.concatenate([[True], change])]
        parallel = np.abs(heads @ self.unit.T) >= math.cos(math.radians(PARALLEL_DEG))
        keep = parallel[group[ii], jj]
        return _backed_pairs(pts, ii[keep], jj[keep], self.lines, self.p, self.q,
                             self.simple, tol)


# Points measured against one set of nearby segments (perimeter samples are 1 m apart or
# less: runs of a few tens of metres keep their boxes tight). Not a result.
_RUN_PX = 16


# NumPy's point-to-segment distance differs from GEOS's by rounding only (about 1e-9 m at
# UTM coordinates); pairs this close to the tolerance are measured by GEOS instead.
_EXACT_BAND_M = 1e-6


def _point_segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distance from points ``p`` to segments ``a-b`` (all ``(n, 2)``)."""
    ab = b - a
    len2 = np.einsum("ij,ij->i", ab, ab)
    ap = p - a
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.clip(np.einsum("ij,ij->i", ap, ab) / len2, 0.0, 1.0)
    t = np.where(len2 > 0, t, 0.0)
    nearest = a + t[:, None] * ab
    return np.hypot(p[:, 0] - nearest[:, 0], p[:, 1] - nearest[:, 1])


def _longest_run(flags: np.ndarray) -> int:
    """Length of the longest run of True in a circular sequence."""
    if flags.all():
        return len(flags)
    rolled = np.roll(flags, -int(np.argmin(flags)))  # start on a False
    edges = np.flatnonzero(np.diff(np.concatenate([[0], rolled.astype(np.int8), [0]])))
    return int((edges[1::2] - edges[::2]).max()) if len(edges) else 0


def _second_line(prof: np.ndarray, offsets: np.ndarray, tol: float, gap_min: float,
                 gap_max: float) -> np.ndarray:
    """Offset of the centre of a second line inside the wall's own run, NaN where none.

    The wall's run is the run of True through the offsets within ``tol`` of the outline; the
    second line is the first True after at least one False beyond it, at an offset in
    ``[gap_min, gap_max + tol]``.
    """
    n, k = prof.shape
    near = np.abs(offsets) <= tol
    # Last index of the wall's run: from the innermost near-True, walk while True.
    idx = np.arange(k)
    start = np.where(prof & near[None, :], idx[None, :], -1).max(axis=1)
    after_run = np.where(~prof & (idx[None, :] > start[:, None]), idx[None, :], k).min(axis=1)
    ok = (prof & (idx[None, :] > after_run[:, None]) & (offsets[None, :] >= gap_min)
          & (offsets[None, :] <= gap_max + tol))
    first = np.where(ok, idx[None, :], k).min(axis=1)
    last = np.where(~prof & (idx[None, :] > first[:, None]), idx[None, :], k).min(axis=1) - 1
    found = (start >= 0) & (first < k)
    centre = (offsets[np.minimum(first, k - 1)] + offsets[np.clip(last, 0, k - 1)]) / 2
    return np.where(found, centre, np.nan)


def _fence_lines(outline: shapely.Polygon, segments: SegmentArrays, params: WallParams,
                 tol: float) -> list[shapely.LineString]:
    """Lines of new wall pieces inside the outline, parallel to a side, spanning most of it.

    Pieces on one line count together (a fence has gates): their summed length must reach
    ``params.internal_min_span`` of the outline's extent along that side.
    """
    rect = np.asarray(shapely.minimum_rotated_rectangle(outline).exterior.coords)
    sides = [(rect[i + 1] - rect[i]) for i in range(2)]
    keep = []
    # only segments whose box meets the outline's can cross it (in their order: the same
    # pieces as a pass over all of the scene's segments)
    for i in np.sort(segments.tree.query(outline)):
        s = segments.items[i]
        part = shapely.intersection(s.line, outline)
        if part.geom_type == "LineString" and part.length > 0 and s.support >= 0.6:
            keep.append(np.asarray(part.coords).ravel()[:4])
    if not keep:
        return []
    segs = np.array(keep)
    labels = collinear_groups(segs, angle_tol_deg=PARALLEL_DEG / 2, offset_m=tol, gap_m=1e9)
    lines = []
    for k in range(int(labels.max()) + 1):
        group = segs[labels == k]
        total = float(np.hypot(group[:, 2] - group[:, 0], group[:, 3] - group[:, 1]).sum())
        line = merge_collinear(group, angle_tol_deg=PARALLEL_DEG / 2, offset_m=tol, gap_m=1e9)[0]
        middle = shapely.Point((line[:2] + line[2:]) / 2)
        if shapely.distance(middle, outline.exterior) <= params.double_gap_max_m + tol:
            continue  # the wall itself, or a double fence along it
        u = (line[2:] - line[:2]) / max(float(np.hypot(*(line[2:] - line[:2]))), 1e-9)
        for side in sides:
            span = float(np.hypot(*side))
            parallel = abs(u @ side) / span >= math.cos(math.radians(PARALLEL_DEG))
            if parallel and total >= params.internal_min_span * span:
                lines.append(shapely.LineString([line[:2], line[2:]]))
                break
    return lines


def _internal_fences(outline: shapely.Polygon, segments: SegmentArrays,
                     params: WallParams, tol: float) -> tuple[shapely.LineString, ...]:
    """Fence lines that split the outline into yards: each end reaches the wall or a fence.

    A line along a row of buildings (lit ground between a roof and the next row's shadow) stops
    short of the walls and is not a fence.
    """
    lines = _fence_lines(outline, segments, params, tol)
    reach = params.double_gap_max_m + tol
    fences = []
    for i, line in enumerate(lines):
        others = [ln for j, ln in enumerate(lines) if j != i] + [outline.exterior]
        ends = shapely.points(np.asarray(line.coords))
        if all(min(float(shapely.distance(e, o)) for o in others) <= reach for e in ends):
            fences.append(line)
    return tuple(fences)


def measure_enclosure(outline: shapely.Polygon,
                      segments: Sequence[WallSegment] | SegmentArrays, line_map: LineMap, *,
                      params: WallParams = WallParams()) -> EnclosureMeasures:
    """Measure how far new walls close ``outline``, and the fences along and inside it.

    Parameters
    ----------
    outline
        The compound outline in the grid CRS.
    segments
        New wall segments (`pipeline.detect.walls.find_wall_segments`); as `SegmentArrays`
        when many outlines are measured against the same segments (only those near the
        outline are then visited).
    line_map
        The new thin-line evidence (`pipeline.detect.walls.new_line_map`); its mask is read
        on its own grid, and its pixel size sets the backing tolerance,
        ``max(2 * res_m, params.tolerance_m)``.
    params
        Wall parameters (tolerance, double-fence gaps and share, internal fence span).

    Returns
    -------
    `EnclosureMeasures`; where walls are below a pixel (no segment) every wall measure is 0.
    """
    res_m, transform, line_mask = line_map.res_m, line_map.transform, line_map.mask
    segments = SegmentArrays.of(segments)
    tol = max(2 * res_m, params.tolerance_m)
    rect = shapely.minimum_rotated_rectangle(outline)
    step = min(res_m, 1.0)
    pts, tangents, normal, side = perimeter_samples(outline, step)
    offsets = np.arange(-tol, params.double_gap_max_m + tol + 1e-9, min(res_m / 2, 0.5))
    prof = _profiles(line_mask, transform, pts, normal, offsets)
    near = prof[:, np.abs(offsets) <= tol].any(axis=1)
    backed = near & segment_backing(pts, tangents, segments, tol)
    second = _second_line(prof, offsets, tol, params.double_gap_min_m, params.double_gap_max_m)
    double = backed & np.isfinite(second)
    share = float(double.sum() / backed.sum()) if backed.any() else 0.0
    closure = float(backed.mean())
    n_backed, n_sides = count_sides_backed(backed, side)
    return EnclosureMeasures(
        outline=outline, area_m2=float(outline.area), perimeter_m=float(outline.length),
        rectangularity=float(outline.area / rect.area) if rect.area > 0 else 0.0,
        closure_ratio=closure, wall_length_m=closure * float(outline.length),
        longest_gap_m=_longest_run(~backed) * float(outline.length) / len(backed),
        double_fence=bool(backed.any() and share >= params.double_min_share),
        double_fence_share=share,
        double_fence_gap_m=float(np.median(second[double])) if double.any() else None,
        internal_fences=_internal_fences(outline, segments, params, tol), tolerance_m=tol,
        sides_backed=n_backed, sides_total=n_sides, walled=shapely.multipoints(pts[backed]))
