"""pipeline.detect.regularity: how regular a site's new buildings are (rows of like blocks).

Dormitory and prison blocks are built to one plan: same-sized blocks, one orientation, in
rows. A village or a market grows block by block. This measures the first from the
footprints of a site's new buildings: their size spread, their orientation spread, and which
of them stand in a row (or a column) of at least ``min_in_row`` aligned blocks of about the
same size, each at most one block length from the next. Pure: shapely polygons in the grid CRS
(metres) in, numbers out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import shapely

__all__ = ["building_layout"]


def _rectangles(footprints: Sequence[shapely.Geometry]) -> tuple[np.ndarray, ...]:
    """``(centres (n, 2), long-axis angles in [0, 180), lengths, widths)`` of the footprints'
    minimum rotated rectangles."""
    rects = shapely.minimum_rotated_rectangle(np.asarray(footprints, dtype=object))
    # a degenerate footprint's rectangle is a line or a point: its box has four corners
    corners = np.stack([shapely.get_coordinates(r if shapely.area(r) > 0 else
                                                 shapely.box(*shapely.bounds(r)))[:4]
                        for r in rects])
    a, b = corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 1]
    la, lb = np.hypot(*a.T), np.hypot(*b.T)
    long_side = np.where((la >= lb)[:, None], a, b)
    angles = np.degrees(np.arctan2(long_side[:, 1], long_side[:, 0])) % 180.0
    return corners.mean(axis=1), angles, np.maximum(la, lb), np.minimum(la, lb)


def _axial_spread(angles_deg: np.ndarray) -> tuple[float, float]:
    """Mean direction and circular standard deviation (degrees) of axial angles (mod 180)."""
    doubled = np.radians(2.0 * angles_deg)
    c, s = float(np.cos(doubled).mean()), float(np.sin(doubled).mean())
    r = min(1.0, math.hypot(c, s))
    spread = math.degrees(math.sqrt(max(0.0, -2.0 * math.log(r))) / 2.0) if r > 1e-12 else 90.0
    return math.degrees(math.atan2(s, c)) / 2.0 % 180.0, spread


def _runs(across: np.ndarray, along: np.ndarray, *, tolerance: float, max_gap: float
          ) -> list[np.ndarray]:
    """Indices in lines: centres within ``tolerance`` across (each line spans at most that,
    from its first centre), split along the line where consecutive centres are more than
    ``max_gap`` apart."""
    order = np.argsort(across, kind="stable")
    out: list[np.ndarray] = []
    start = 0
    for k in range(1, len(order) + 1):
        if k < len(order) and across[order[k]] - across[order[start]] <= tolerance:
            continue
        line = order[start:k][np.argsort(along[order[start:k]], kind="stable")]
        breaks = np.flatnonzero(np.diff(along[line]) > max_gap) + 1
        out += np.split(line, breaks)
        start = k
    return out


def building_layout(footprints: Sequence[shapely.Geometry], *, min_in_row: int = 3,
                    size_tolerance: float = 0.25, angle_tolerance_deg: float = 10.0
                    ) -> dict[str, Any]:
    """Regularity measures of a site's new-building footprints (grid CRS, metres).

    A row (or column) is at least ``min_in_row`` blocks whose long axes are within
    ``angle_tolerance_deg`` of the site's main orientation, with areas within
    ``size_tolerance`` (a share) of the row's median, centres on one line (within half the
    median block width), each at most one block length from the next.

    Returns ``building_rows`` (the rows and columns found), ``buildings_in_rows_share``
    (share of the footprints in one), ``building_size_cv`` (standard deviation over mean
    of the footprint areas) and ``building_orientation_spread_deg`` (circular standard
    deviation of the long axes); the last two are None for no footprint.
    """
    n = len(footprints)
    if n == 0:
        return {"building_rows": 0, "buildings_in_rows_share": 0.0, "building_size_cv": None,
                "building_orientation_spread_deg": None}
    areas = shapely.area(np.asarray(footprints, dtype=object))
    centres, angles, lengths, widths = _rectangles(footprints)
    main, spread = _axial_spread(angles)
    off = np.abs((angles - main + 90.0) % 180.0 - 90.0)
    aligned = np.flatnonzero(off <= angle_tolerance_deg)
    in_row = np.zeros(n, dtype=bool)
    rows = 0
    if len(aligned) >= min_in_row:
        theta = math.radians(main)
        u = np.array([math.cos(theta), math.sin(theta)])  # the blocks' long axis
        v = np.array([-u[1], u[0]])
        length, width = float(np.median(lengths[aligned])), float(np.median(widths[aligned]))
        # rows run along the long axis (blocks end to end), columns across it (side by side,
        # as dormitories with yards between them); neighbours in a line are at most one block
        # length apart
        for across, along in ((v, u), (u, v)):
            for run in _runs(centres[aligned] @ across, centres[aligned] @ along,
                             tolerance=0.5 * width, max_gap=2.0 * length):
                members = aligned[run]
                like = members[np.abs(areas[members] / np.median(areas[members]) - 1.0)
                               <= size_tolerance]
                if len(like) >= min_in_row:
                    rows += 1
                    in_row[like] = True
    return {"building_rows": rows, "buildings_in_rows_share": float(in_row.mean()),
            "building_size_cv": float(areas.std() / areas.mean()) if areas.mean() > 0 else 0.0,
            "building_orientation_spread_deg": round(spread, 3)}
