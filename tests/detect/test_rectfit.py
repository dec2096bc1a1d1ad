"""Tests for pipeline.detect.rectfit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import shapely
from numpy.testing import assert_array_equal
from skimage.draw import polygon as draw_polygon

from pipeline.detect.rectfit import (
    dominant_orientation_deg,
    fit_oriented_rectangle,
    max_sum_rectangle,
)


def _rotated_rectangle(shape, centre, half_x, half_y, angle_deg):
    """Corners (row, col) of a rectangle rotated counter-clockwise by angle_deg."""
    t = math.radians(angle_deg)
    corners = []
    for x, y in [(-half_x, -half_y), (half_x, -half_y), (half_x, half_y), (-half_x, half_y)]:
        xr = x * math.cos(t) - y * math.sin(t)
        yr = x * math.sin(t) + y * math.cos(t)
        corners.append((centre[0] - yr, centre[1] + xr))
    return np.array(corners)


def test_max_sum_rectangle_finds_planted_block():
    """The maximum-sum sub-array is exactly the planted positive block."""
    v = -np.ones((30, 40))
    v[5:12, 20:33] = 1.0
    gain, r0, r1, c0, c1 = max_sum_rectangle(v)
    assert (r0, r1, c0, c1) == (5, 11, 20, 32)
    assert gain == pytest.approx(7 * 13)


def test_max_sum_rectangle_rejects_empty():
    """An empty array is a ValueError, not a silent zero."""
    with pytest.raises(ValueError, match="non-empty 2-D"):
        max_sum_rectangle(np.zeros((0, 3)))


@pytest.mark.parametrize("angle", [0.0, 17.0, -31.0, 40.0])
def test_fit_oriented_rectangle_recovers_rotated_block(angle):
    """Orientation within 3 degrees and outline IoU above 0.9 for a rotated rectangle."""
    corners = _rotated_rectangle((120, 160), (60, 80), 45, 20, angle)
    rr, cc = draw_polygon(corners[:, 0], corners[:, 1], (120, 160))
    block = np.zeros((120, 160))
    block[rr, cc] = 1.0
    estimate = dominant_orientation_deg(block)
    diff = (estimate - angle + 45) % 90 - 45
    assert abs(diff) < 3.0
    fit = fit_oriented_rectangle(block * 2 - 1, estimate)
    assert fit is not None
    truth = shapely.Polygon(corners[:, ::-1])
    found = shapely.Polygon(fit[1][:, ::-1])
    assert truth.intersection(found).area / truth.union(found).area > 0.9


def test_fit_oriented_rectangle_none_without_evidence():
    """No positive evidence gives no rectangle."""
    assert fit_oriented_rectangle(-np.ones((20, 20)), 0.0) is None


def test_snap_sides_crop_with_origin_equals_whole_map():
    """Snapping on the crop snap_window gives (with its origin) equals snapping on the map."""
    from pipeline.detect.rectfit import snap_sides, snap_window

    rng = np.random.default_rng(2)
    edges = rng.random((200, 240)) * 0.2
    edges[40:42, 30:200] = 3.0  # a wall above the rectangle's top side
    edges[150:152, 30:200] = 3.0
    corners = np.array([[45.0, 35.0], [45.0, 195.0], [146.0, 195.0], [146.0, 35.0]])
    whole = snap_sides(corners, edges, search_px=8.0)
    rows, cols = snap_window(corners, edges.shape, search_px=8.0)
    assert rows.stop - rows.start < edges.shape[0] or cols.stop - cols.start < edges.shape[1]
    crop = snap_sides(corners, edges[rows, cols], search_px=8.0,
                      origin=(rows.start, cols.start))
    assert_array_equal(crop, whole)
    assert whole[0, 0] == pytest.approx(41.0, abs=1.0)  # the top side moved onto the wall
    # near the map's edge the window is clipped, and the result still equals the whole map's
    edge_corners = corners - [40.0, 30.0]
    rows, cols = snap_window(edge_corners, edges.shape, search_px=8.0)
    assert rows.start == 0 and cols.start == 0
    assert_array_equal(snap_sides(edge_corners, edges[rows, cols], search_px=8.0,
                                  origin=(0, 0)),
                       snap_sides(edge_corners, edges, search_px=8.0))
