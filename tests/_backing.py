"""The wall backing as it was computed before `SegmentArrays.backing` listed (point,
segment) pairs: a dense (points, lines) mask. Kept for tests as the reference."""

from __future__ import annotations

import math

import numpy as np
import shapely

from pipeline.detect.enclosure import PARALLEL_DEG, _backed_pairs


def backing_of_lines(pts: np.ndarray, tangents: np.ndarray, lines: np.ndarray,
                     units: np.ndarray, tol: float, near: np.ndarray | None = None
                     ) -> np.ndarray:
    """`segment_backing` of ``lines`` (LineStrings) with their unit directions ``units``, as
    it was before `SegmentArrays.backing` (a dense points x lines mask).

    Distances are measured only between a point and the segments parallel to its tangent
    (and, with ``near``, a ``(points, lines)`` boolean mask, only for its True pairs: the
    caller vouches that the others are farther apart than ``tol``). Two-point lines are
    measured with NumPy; where that distance is within ``_EXACT_BAND_M`` of ``tol`` (or a
    line has more points), GEOS measures it, so the answer is GEOS's own.
    """
    out = np.zeros(len(pts), bool)
    if not len(lines) or not len(pts):
        return out
    parallel = np.abs(tangents @ units.T) >= math.cos(math.radians(PARALLEL_DEG))
    if near is not None:
        parallel &= near
    ii, jj = np.nonzero(parallel)
    coords, index = shapely.get_coordinates(lines, return_index=True)
    counts = np.bincount(index, minlength=len(lines))
    start = np.zeros(len(lines), int)
    start[1:] = np.cumsum(counts)[:-1]
    simple = counts == 2
    a, b = coords[np.where(simple, start, 0)], coords[np.where(simple, start + 1, 0)]
    return _backed_pairs(pts, ii, jj, lines, a, b, simple, tol)
