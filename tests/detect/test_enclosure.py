"""Tests of pipeline.detect.enclosure's wall backing against GEOS distances."""

from __future__ import annotations

import math

import numpy as np
import shapely
from _backing import backing_of_lines

from pipeline.detect.enclosure import PARALLEL_DEG, segment_backing, segment_units
from pipeline.detect.walls import WallSegment


def _reference(pts: np.ndarray, tangents: np.ndarray, segments: list[WallSegment],
               tol: float) -> np.ndarray:
    """Every point against every segment with GEOS (the definition)."""
    lines = np.array([s.line for s in segments], dtype=object)
    dist = shapely.distance(shapely.points(pts)[:, None], lines[None, :])
    parallel = np.abs(tangents @ segment_units(segments).T) >= math.cos(math.radians(PARALLEL_DEG))
    return np.any((dist <= tol) & parallel, axis=1)


def _scene(rng: np.random.Generator, tol: float) -> tuple[list[WallSegment], np.ndarray,
                                                          np.ndarray]:
    """Segments at UTM-sized coordinates; points near them, some exactly ``tol`` off."""
    segs, pts, tangents = [], [], []
    for _ in range(int(rng.integers(1, 30))):
        x0, y0 = 480000 + rng.uniform(0, 300), 4800000 + rng.uniform(0, 300)
        angle = float(rng.choice([0.0, 90.0, 27.0])) + rng.normal(0, 4)
        length = float(rng.choice([0.0, rng.uniform(2, 90)]))
        u = np.array([math.cos(math.radians(angle)), math.sin(math.radians(angle))])
        x1, y1 = np.array([x0, y0]) + length * u
        coords = [(x0, y0), (x1, y1)]
        if rng.random() < 0.1:  # a line of three points is measured by GEOS
            coords.insert(1, ((x0 + x1) / 2, (y0 + y1) / 2))
        segs.append(WallSegment(shapely.LineString(coords), length, angle % 180.0, 1.0, 1.0))
        for t in rng.uniform(-0.2, 1.2, 8):
            off = float(rng.choice([tol, -tol, rng.uniform(-2 * tol, 2 * tol)]))
            pts.append(np.array([x0, y0]) + t * length * u + off * np.array([-u[1], u[0]]))
            turn = math.radians(angle + float(rng.choice([0.0, 90.0, rng.normal(0, 8)])))
            tangents.append([math.cos(turn), math.sin(turn)])
    return segs, np.array(pts), np.array(tangents)


def test_backing_equals_geos_distances_at_and_around_the_tolerance() -> None:
    rng = np.random.default_rng(7)
    checked = at_edge = 0
    for _ in range(60):
        tol = float(rng.choice([1.0, 2.5, 3.0]))
        segs, pts, tangents = _scene(rng, tol)
        expected = _reference(pts, tangents, segs, tol)
        lines = np.array([s.line for s in segs], dtype=object)
        np.testing.assert_array_equal(
            backing_of_lines(pts, tangents, lines, segment_units(segs), tol), expected)
        np.testing.assert_array_equal(segment_backing(pts, tangents, segs, tol), expected)
        checked += len(pts)
        dist = shapely.distance(shapely.points(pts)[:, None], lines[None, :])
        at_edge += int(np.sum(np.abs(dist - tol) < 1e-6))
    assert checked > 1000
    assert at_edge > 10  # points on the tolerance itself were part of the comparison


def test_backing_of_nothing() -> None:
    pts = np.zeros((3, 2))
    assert not segment_backing(pts, np.ones((3, 2)), [], 3.0).any()
    lines = np.array([shapely.LineString([(0, 0), (10, 0)])], dtype=object)
    assert not backing_of_lines(pts[:0], np.ones((0, 2)), lines, np.array([[1.0, 0.0]]),
                                3.0).any()
