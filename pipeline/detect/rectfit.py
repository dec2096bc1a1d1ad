"""pipeline.detect.rectfit: rectilinear outlines fitted to an evidence map.

A compound is a rectangle-like block of new construction. Given a per-cell evidence map
``v`` (positive where construction evidence exceeds its threshold, negative elsewhere), the
outline is the rectangle, aligned with the site's dominant orientation, that maximises the sum
of ``v`` inside it: the 2-D maximum-sum sub-array. It needs no shape prior beyond "rectilinear"
and gives up area only where the evidence is below threshold.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

__all__ = ["max_sum_rectangle", "dominant_orientation_deg", "fit_oriented_rectangle",
           "snap_window", "snap_sides"]


def max_sum_rectangle(values: np.ndarray) -> tuple[float, int, int, int, int]:
    """Return ``(gain, row0, row1, col0, col1)`` of the sub-array with the largest sum.

    Rows and columns are inclusive. NaN counts as 0. Cost is ``O(rows**2 * cols)``, vectorised
    over columns and end rows (Kadane's algorithm per start row).
    """
    v = np.nan_to_num(np.asarray(values, dtype=np.float64))
    if v.ndim != 2 or v.size == 0:
        raise ValueError(f"max_sum_rectangle needs a non-empty 2-D array, got shape {v.shape}")
    n_rows, n_cols = v.shape
    row_cumsum = np.vstack([np.zeros((1, n_cols)), np.cumsum(v, axis=0)])
    col_index = np.arange(n_cols + 1)
    best = (-math.inf, 0, 0, 0, 0)
    for r0 in range(n_rows):
        strip = row_cumsum[r0 + 1 :] - row_cumsum[r0]  # (end rows, cols): column sums r0..r1
        prefix = np.hstack([np.zeros((strip.shape[0], 1)), np.cumsum(strip, axis=1)])
        run_min = np.minimum.accumulate(prefix, axis=1)
        at_min = np.where(prefix == run_min, col_index[None, :], 0)
        arg_min = np.maximum.accumulate(at_min, axis=1)
        gain = prefix[:, 1:] - run_min[:, :-1]
        k_row, k_col = np.unravel_index(int(np.argmax(gain)), gain.shape)
        if gain[k_row, k_col] > best[0]:
            best = (
                float(gain[k_row, k_col]),
                r0,
                r0 + int(k_row),
                int(arg_min[k_row, k_col]),
                int(k_col),
            )
    return best


def dominant_orientation_deg(grey: np.ndarray, weight: np.ndarray | None = None) -> float:
    """Dominant rectilinear orientation of the structures in ``grey``, in degrees in [-45, 45).

    Gradient directions are folded with period 90 degrees (angle times four), so walls and
    blocks at right angles vote together; votes are weighted by gradient magnitude squared.
    Positive angles are counter-clockwise from the image x axis (east).
    """
    g = np.nan_to_num(np.asarray(grey, dtype=np.float64))
    gy = ndi.sobel(g, axis=0)
    gx = ndi.sobel(g, axis=1)
    w = gx**2 + gy**2
    if weight is not None:
        w = w * weight
    # rows grow southwards, so a row gradient is a negative y gradient.
    phi = np.arctan2(-gy, gx)
    vote = np.sum(w * np.exp(4j * phi))
    if abs(vote) == 0:
        return 0.0
    angle = math.degrees(np.angle(vote) / 4.0)
    return float((angle + 45.0) % 90.0 - 45.0)


def fit_oriented_rectangle(
    values: np.ndarray, angle_deg: float
) -> tuple[float, np.ndarray] | None:
    """Fit the maximum-sum rectangle to ``values`` in a frame rotated by ``angle_deg``.

    Returns ``(gain, corners)`` with ``corners`` a (4, 2) array of (row, col) positions in
    the input array's pixel-corner coordinates, or None when no rectangle has positive gain.
    """
    v = np.nan_to_num(np.asarray(values, dtype=np.float64))
    theta = math.radians(angle_deg)
    rows, cols = v.shape
    centre = np.array([(rows - 1) / 2.0, (cols - 1) / 2.0])
    # Rotating the map by -angle makes the site's structures axis-aligned.
    rotated = ndi.rotate(v, -angle_deg, reshape=True, order=1, mode="constant", cval=np.nan)
    inside = ndi.rotate(np.ones_like(v), -angle_deg, reshape=True, order=0, cval=0.0) > 0.5
    negative_floor = float(min(v.min(), 0.0))
    rotated = np.where(inside, np.nan_to_num(rotated, nan=negative_floor), negative_floor)
    gain, r0, r1, c0, c1 = max_sum_rectangle(rotated)
    if gain <= 0:
        return None
    r_centre = np.array([(rotated.shape[0] - 1) / 2.0, (rotated.shape[1] - 1) / 2.0])
    box = np.array([[r0 - 0.5, c0 - 0.5], [r0 - 0.5, c1 + 0.5], [r1 + 0.5, c1 + 0.5],
                    [r1 + 0.5, c0 - 0.5]])
    # Map rotated (row, col) back: undo the rotation about the centres.
    d = box - r_centre
    # In (x=col, y=-row) space the map was rotated by -theta; rotate back by +theta.
    x, y = d[:, 1], -d[:, 0]
    xr = x * math.cos(theta) - y * math.sin(theta)
    yr = x * math.sin(theta) + y * math.cos(theta)
    corners = np.column_stack([-yr, xr]) + centre
    return gain, corners


def _side_samples(corners: np.ndarray, search_px: float):
    """Per side: ``(index, normal, points)``, points ``(offsets, along, 2)`` as pixel indexes."""
    c = np.asarray(corners, dtype=np.float64)
    centre = c.mean(axis=0)
    offsets = np.arange(-search_px, search_px + 0.25, 0.5)
    sides = []
    for i in range(4):
        a, b = c[i], c[(i + 1) % 4]
        along = b - a
        length = float(np.hypot(*along))
        if length < 2:
            continue
        normal = np.array([-along[1], along[0]]) / length
        if np.dot(normal, (a + b) / 2 - centre) < 0:
            normal = -normal
        t = np.linspace(0.05, 0.95, max(8, int(length)))
        base = a[None, :] + t[:, None] * along[None, :]
        # Pixel centres sit at corner coordinates + 0.5.
        pts = base[None, :, :] + offsets[:, None, None] * normal[None, None, :] - 0.5
        sides.append((i, normal, pts))
    return offsets, sides


def snap_window(corners: np.ndarray, shape: tuple[int, int], *, search_px: float
                ) -> tuple[slice, slice]:
    """The window of an edge map of ``shape`` that `snap_sides` reads for these corners.

    Pass the crop ``edges[window]`` with ``origin=(window[0].start, window[1].start)`` to get
    the same result as with the whole map.
    """
    _, sides = _side_samples(corners, search_px)
    if not sides:
        return slice(0, 0), slice(0, 0)
    pts = np.concatenate([p.reshape(-1, 2) for _, _, p in sides])
    # bilinear sampling reads the pixel at floor(p) and the next one
    lo = np.floor(pts.min(axis=0)).astype(int)
    hi = np.floor(pts.max(axis=0)).astype(int) + 2
    r0, c0 = max(0, int(lo[0])), max(0, int(lo[1]))
    r1, c1 = min(shape[0], int(hi[0])), min(shape[1], int(hi[1]))
    return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))


def snap_sides(corners: np.ndarray, edges: np.ndarray, *, search_px: float,
               origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Move each side of a rectangle along its normal onto the strongest line of ``edges``.

    Walls and outer rows of buildings make long straight lines of new edges; site-scale
    smoothing blurs an evidence rectangle outwards by about its smoothing scale. For each
    side the mean of ``edges`` along the side, offset by ``s`` pixels along its normal for
    ``|s| <= search_px``, is a profile; the side moves to the profile's peak when that peak
    stands out (above the profile's median plus twice its median absolute deviation).

    Parameters
    ----------
    corners
        ``(4, 2)`` rectangle corners as ``(row, col)`` in the full edge map's pixel-corner
        coordinates, in order around the rectangle.
    edges
        Non-negative new-edge strength (after minus before) on the fine grid; NaN counts as 0.
        Either the whole map, or a crop of it covering `snap_window` (then ``origin``).
    search_px
        How far a side may move, in pixels.
    origin
        ``(row, col)`` of ``edges``' first pixel in the full map, when it is a crop.

    Returns
    -------
    The ``(4, 2)`` adjusted corners.
    """
    c = np.asarray(corners, dtype=np.float64)
    if origin == (0, 0):  # the whole map: read only the window the sides reach
        rows, cols = snap_window(c, edges.shape, search_px=search_px)
        edges, origin = edges[rows, cols], (rows.start, cols.start)
    e = np.nan_to_num(np.asarray(edges, dtype=np.float64))
    offsets, sides = _side_samples(c, search_px)
    moves = np.zeros((4, 2))
    for i, normal, pts in sides:
        samples = ndi.map_coordinates(
            e, [pts[..., 0].ravel() - origin[0], pts[..., 1].ravel() - origin[1]], order=1,
            mode="constant", cval=0.0)
        profile = samples.reshape(len(offsets), -1).mean(axis=1)
        k = int(np.argmax(profile))
        med = float(np.median(profile))
        mad = float(np.median(np.abs(profile - med)))
        if profile[k] > med + 2 * mad and profile[k] > 0:
            moves[i] = offsets[k] * normal
    # A corner lies on side i-1 and side i: it takes both sides' moves.
    return c + moves + np.roll(moves, 1, axis=0)
