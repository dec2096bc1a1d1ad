"""pipeline.detect.towers: watchtowers on a compound's wall, as new compact objects.

A watchtower is a small square structure, about 3-8 m across, on the corners of a compound's
wall or along it, casting a shadow. It is visible only at about 1 m per pixel or finer:
coarser, a tower spans fewer than three pixels and this module says so instead of guessing.

Method, in a window around the outline: a top-hat with a square a little larger than the
largest tower keeps the bright and the dark objects narrower than it (roofs, shadows, walls);
the walls and fences themselves (thin lines running straight along the outline's two
directions) are blanked; what is left is kept only where the pixels changed in a way no
one-pixel shift explains. Tower-sized blobs of that (scale-normalised Laplacian of Gaussian)
within ``search_m`` of the wall line are towers, unless they are a stretch of a longer band
(cleared ground, a patrol road); a lit roof counts with a shadow beside it or when it stands
out clearly. Pure: arrays, the outline and the transform in; shapely geometries in the grid
CRS out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import shapely
from affine import Affine

from pipeline.detect.blobs import log_blobs_in, log_sigmas, merge_blobs
from pipeline.detect.lines import line_footprint
from pipeline.detect.minmax import (
    binary_dilation,
    binary_opening,
    disk_tophat,
    square_extreme,
    square_tophat,
)
from pipeline.detect.wall_noise import noise_sigma, robust_scale
from pipeline.detect.walls import as_grey
from pipeline.model import TowerParams, WallParams

__all__ = ["TowerParams", "Tower", "find_watchtowers", "outline_orientation_deg"]


@dataclass(frozen=True)
class Tower:
    """One watchtower: ``point`` its centre, ``polygon`` its square (grid CRS)."""

    point: shapely.Point
    polygon: shapely.Polygon
    size_m: float
    at_corner: bool
    distance_m: float
    contrast: float


def _on_long_lines(mask: np.ndarray, length_px: int, angle_deg: float) -> np.ndarray:
    """Pixels of ``mask`` on a straight run of ``length_px`` along or across ``angle_deg``."""
    out = np.zeros(mask.shape, bool)
    for a in (angle_deg, angle_deg + 90.0):
        out |= binary_opening(mask, line_footprint(length_px, a))
    return out


def _new_compact(before: np.ndarray, after: np.ndarray, *, angle_deg: float, res_m: float,
                 params: TowerParams, walls: WallParams, threshold: float
                 ) -> list[np.ndarray]:
    """``[bright_new, dark_new, bright, dark]``: compact objects of the after image (walls
    included), and the part of each, walls blanked, whose pixels changed in a way no
    one-pixel shift explains (after above the before image's 3 x 3 maximum, or below its
    minimum)."""
    b, a = (np.nan_to_num(g, nan=float(np.nanmean(g))) for g in (before, after))
    size = 2 * (int(math.ceil(params.max_size_m / (2 * res_m))) + 1) + 1
    length = max(3, int(round(params.line_length_m / res_m)))
    widths = (walls.max_wall_width_m, walls.max_shadow_width_m)
    compact, blanked = [], []
    # SciPy's white and black top-hats, to the bit, in fewer passes (`pipeline.detect.minmax`)
    for white, width in zip((True, False), widths, strict=True):
        thin = disk_tophat(a, max(1, int(width / (2 * res_m))), white=white)
        lines = binary_dilation(_on_long_lines(thin > threshold, length, angle_deg))
        compact.append(square_tophat(a, size, white=white))
        blanked.append(np.where(lines, 0.0, compact[-1]))
    return [np.minimum(blanked[0], a - square_extreme(b, 3, low=False)),
            np.minimum(blanked[1], square_extreme(b, 3, low=True) - a), *compact]


def outline_orientation_deg(outline: shapely.Polygon) -> float:
    """Direction of the outline's longest side, degrees counter-clockwise from east."""
    rect = np.asarray(shapely.minimum_rotated_rectangle(outline).exterior.coords)
    sides = rect[1:3] - rect[0:2]
    k = int(np.argmax(np.hypot(sides[:, 0], sides[:, 1])))
    return float(math.degrees(math.atan2(sides[k, 1], sides[k, 0])))


def _window(outline: shapely.Polygon, transform: Affine, shape: tuple[int, int],
            margin_m: float) -> tuple[slice, slice]:
    """Row and column slices of the grid around ``outline`` grown by ``margin_m``."""
    minx, miny, maxx, maxy = outline.buffer(margin_m).bounds
    cols, rows = ~transform * (np.array([minx, maxx]), np.array([maxy, miny]))
    r0, r1 = sorted(int(math.floor(v)) for v in rows)
    c0, c1 = sorted(int(math.floor(v)) for v in cols)
    return (slice(max(r0, 0), min(r1 + 1, shape[0])), slice(max(c0, 0), min(c1 + 1, shape[1])))


def _tower_maps(before: np.ndarray, after: np.ndarray, outline: shapely.Polygon, *,
                transform: Affine, res_m: float, params: TowerParams, walls: WallParams
                ) -> tuple[list[np.ndarray], float, float, Affine]:
    """`_new_compact` maps of the window around ``outline``, the contrast threshold, the
    outline's orientation and the window's transform."""
    g_b, g_a = as_grey(before), as_grey(after)
    scale = robust_scale(g_b)
    # Noise and scale from the whole frame: inside the window the new compound dominates.
    threshold = max(params.min_contrast, params.noise_factor * noise_sigma(g_b, g_a) / scale)
    rows, cols = _window(outline, transform, g_a.shape, params.search_m + params.max_extent_m)
    angle = outline_orientation_deg(outline)
    maps = _new_compact(g_b[rows, cols] / scale, g_a[rows, cols] / scale, angle_deg=angle,
                        res_m=res_m, params=params, walls=walls, threshold=threshold)
    return maps, threshold, angle, transform * Affine.translation(cols.start, rows.start)


def find_watchtowers(before: np.ndarray, after: np.ndarray, outline: shapely.Polygon, *,
                     transform: Affine, res_m: float, params: TowerParams = TowerParams(),
                     walls: WallParams = WallParams()) -> tuple[list[Tower], str]:
    """Find new watchtowers on or near the wall line of ``outline``.

    Parameters
    ----------
    before, after
        ``(band, y, x)`` or ``(y, x)`` arrays on the same grid, after co-registered and
        normalized to before; NaN = nodata.
    outline
        The compound's outline (its wall line) in the grid CRS.
    transform
        The grid's affine transform (north up).
    res_m
        Pixel size in metres.
    params
        Tower parameters.
    walls
        Wall parameters: the widths of bright and dark lines (walls, fences, their shadows)
        that are blanked before looking for towers.

    Returns
    -------
    ``(towers, note)``: towers (corners first, then by contrast) and a sentence on what was
    searched; at resolutions coarser than ``params.max_res_m`` the list is empty and the
    note says why.
    """
    if res_m > params.max_res_m:
        return [], (f"at {res_m:g} m a watchtower ({params.min_size_m:g}-{params.max_size_m:g} "
                    "m across) spans fewer than three pixels; towers were not searched")
    maps, threshold, angle, window = _tower_maps(before, after, outline, transform=transform,
                                                 res_m=res_m, params=params, walls=walls)
    towers = _towers(maps, threshold, outline, angle_deg=angle, res_m=res_m, params=params,
                     transform=window)
    note = (f"searched {params.search_m:g} m either side of the outline for new compact "
            f"objects {params.min_size_m:g}-{params.max_size_m:g} m across at {res_m:g} m")
    return towers, note


_NUM_SIGMA = 8  # scales of the blob search, linear from below the smallest to above the largest


class _BlobSearch:
    """Tower-sized blobs of one polarity's new response, searched box by box (`log_blobs_in`).

    `search` adds boxes (each searched once); `candidates` gives the blobs of all the boxes
    searched so far as rows ``(row, col, size_px, contrast)`` in the order a search of the
    whole window gives them. Scale-normalised Laplacian-of-Gaussian blobs of the new
    response (a square of side ``s`` answers best at ``sigma = s / 2.5``, with about 0.72 of
    its contrast); contrast is the mean new response over the blob's square.
    """

    def __init__(self, new: np.ndarray, threshold: float, *, res_m: float,
                 params: TowerParams) -> None:
        self.r = np.clip(new, 0, None)
        self.threshold, self.res_m, self.params = threshold, res_m, params
        self.parts: list[tuple[np.ndarray, np.ndarray]] = []
        self.done: set[tuple[int, int, int, int]] = set()
        self.integral: np.ndarray | None = None  # of r, for the blobs' contrast
        # Scales reach beyond the accepted sizes, so that smaller or larger clutter peaks at
        # its own scale (and is dropped) instead of at the nearest accepted one.
        self.lo = 0.6 * params.min_size_m / 2.5 / res_m
        self.hi = 1.2 * params.max_size_m / 2.5 / res_m
        # Only blobs of accepted sizes are asked for (the scales searched are the same; the
        # largest, a neighbour of no accepted one, is then not filtered): the same blobs.
        sigmas = log_sigmas(self.lo, self.hi, _NUM_SIGMA,
                            self.r.dtype if self.r.dtype.kind == "f" else np.float64)
        size_m = 2.5 * sigmas * res_m  # as the blobs' sizes are computed below
        self.wanted = (size_m >= params.min_size_m) & (size_m <= params.max_size_m)
        self.reach_px = int(4.0 * self.hi + 0.5) + 1  # the largest scale's filter reach

    def search(self, boxes: list[tuple[int, int, int, int]]) -> None:
        """Search ``boxes`` ``(row0, row1, col0, col1)`` not searched before."""
        todo = [b for b in dict.fromkeys(boxes) if b not in self.done]
        if todo:
            # No pruning of overlapping blobs: a large band would hide the tower beside it.
            self.parts.append(log_blobs_in(self.r, todo, min_sigma=self.lo, max_sigma=self.hi,
                                           num_sigma=_NUM_SIGMA, wanted=self.wanted,
                                           threshold=0.72 * self.threshold))
            self.done.update(todo)

    def candidates(self) -> np.ndarray:
        """Rows ``(row, col, size_px, contrast)`` of the accepted sizes, strongest first."""
        blobs = merge_blobs(self.parts)[0] if self.parts else np.zeros((0, 3))
        sizes = 2.5 * blobs[:, 2] * self.res_m if len(blobs) else np.zeros(0)
        blobs = blobs[(sizes >= self.params.min_size_m) & (sizes <= self.params.max_size_m)]
        if len(blobs) == 0:
            return np.zeros((0, 4))
        r = self.r
        size_px = 2.5 * blobs[:, 2]
        if self.integral is None:
            self.integral = np.pad(r, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
        integral = self.integral
        h = np.maximum(1, np.round(size_px / 2)).astype(int)
        r0, c0 = (np.clip(blobs[:, k].astype(int) - h, 0, r.shape[k]) for k in (0, 1))
        r1, c1 = (np.clip(blobs[:, k].astype(int) + h + 1, 0, r.shape[k]) for k in (0, 1))
        total = integral[r1, c1] - integral[r0, c1] - integral[r1, c0] + integral[r0, c0]
        return np.column_stack([blobs[:, 0], blobs[:, 1], size_px,
                                total / np.maximum((r1 - r0) * (c1 - c0), 1)])


def _band_boxes(outline: shapely.Polygon, transform: Affine, shape: tuple[int, int], *,
                half_width_px: float, reach_px: int) -> list[tuple[int, int, int, int]]:
    """Pixel boxes covering every pixel within ``half_width_px`` of the outline's ring.

    Each side is cut into pieces whose boxes cost least to filter: a box of ``h x w`` is
    filtered over about ``(h + 2 reach)(w + 2 reach) + h (w + 2 reach)`` pixels (two passes,
    each reaching ``reach_px`` beyond it), so a side along a grid axis stays whole and a
    slanted one is cut into squares a few reaches wide.
    """
    ring = np.asarray(outline.exterior.coords)
    cols, rows = ~transform * (ring[:, 0], ring[:, 1])  # pixel centres at index + 0.5
    pts = np.column_stack([np.asarray(rows) - 0.5, np.asarray(cols) - 0.5])
    w, boxes = half_width_px + 1.0, []
    for p, q in zip(pts[:-1], pts[1:], strict=True):
        length = float(np.hypot(*(q - p)))
        best: tuple[float, int] | None = None
        for n in range(1, max(1, int(math.ceil(length / 8))) + 1):
            h, wd = np.abs(q - p) / n + 2 * w
            cost = n * ((h + 2 * reach_px) * (wd + 2 * reach_px) + h * (wd + 2 * reach_px))
            best = (cost, n) if best is None or cost < best[0] else best
        n = best[1] if best else 1
        for k in range(n):
            a, b = p + (q - p) * k / n, p + (q - p) * (k + 1) / n
            lo, hi = np.minimum(a, b) - w, np.maximum(a, b) + w
            r0, c0 = (max(0, int(math.floor(v))) for v in lo)
            r1 = min(shape[0], int(math.ceil(hi[0])) + 1)
            c1 = min(shape[1], int(math.ceil(hi[1])) + 1)
            if r0 < r1 and c0 < c1:
                boxes.append((r0, r1, c0, c1))
    return boxes


def _around(cands: np.ndarray, radius_px: int, shape: tuple[int, int]
            ) -> list[tuple[int, int, int, int]]:
    """A box of ``radius_px`` around each candidate's centre."""
    out = []
    for row, col in cands[:, :2].astype(int):
        out.append((max(0, row - radius_px), min(shape[0], row + radius_px + 1),
                    max(0, col - radius_px), min(shape[1], col + radius_px + 1)))
    return out


def _in_band(compact: np.ndarray, cand: np.ndarray, *, angle_deg: float, res_m: float) -> bool:
    """Whether a blob is a stretch of a band along ``angle_deg`` (cleared ground, a road).

    Along that direction, the after image's compact response (walls included) stays above
    3/4 of its value at the blob on most of 2-8 m beyond the blob's square, on both sides. A
    tower stands out from the wall it sits on; a patch of a bright strip along the wall does
    not.
    """
    row, col, size_px, _ = cand
    r0, c0, h = int(round(row)), int(round(col)), max(1, int(round(size_px / 4)))
    level = float(np.mean(compact[max(r0 - h, 0):r0 + h + 1, max(c0 - h, 0):c0 + h + 1]))
    steps = np.arange(size_px / 2 + 2.0 / res_m, size_px / 2 + 8.0 / res_m, 1.0)
    # Rows grow southwards: a direction at angle a is (-sin a, cos a) in (row, col).
    d = np.array([-math.sin(math.radians(angle_deg)), math.cos(math.radians(angle_deg))])
    sides = []
    for sign in (-1, 1):
        rr = np.clip(np.rint(row + sign * steps * d[0]).astype(int), 0, compact.shape[0] - 1)
        cc = np.clip(np.rint(col + sign * steps * d[1]).astype(int), 0, compact.shape[1] - 1)
        sides.append(np.mean(compact[rr, cc] >= 0.75 * level))
    return min(sides) >= 0.7


def _side_angle(outline: shapely.Polygon, point: shapely.Point) -> float:
    """Direction (degrees) of the outline side nearest ``point``."""
    ring = np.asarray(outline.exterior.coords)
    sides = shapely.linestrings(np.stack([ring[:-1], ring[1:]], axis=1))
    k = int(np.argmin(shapely.distance(sides, point)))
    d = ring[k + 1] - ring[k]
    return float(math.degrees(math.atan2(d[1], d[0])))


def _with_shadow(bright: np.ndarray, dark: np.ndarray, *, res_m: float,
                 params: TowerParams) -> np.ndarray:
    """Whether each bright blob has a dark blob (its shadow) touching it.

    Touching: the centres are at least a third of the roof apart (not the same spot) and at
    most half the two sizes plus 4 m (the shadow starts at the roof's edge). A shadow is
    given to the nearest roof it touches only.
    """
    if len(bright) == 0 or len(dark) == 0:
        return np.zeros(len(bright), bool)
    d = np.hypot(bright[:, None, 0] - dark[None, :, 0], bright[:, None, 1] - dark[None, :, 1])
    reach = (bright[:, None, 2] + dark[None, :, 2]) / 2 + 4.0 / res_m
    near = (d >= 0.3 * bright[:, None, 2]) & (d <= reach)
    # A shadow belongs to one roof: the nearest of those it touches.
    owner = np.where(near.any(axis=0), np.argmin(np.where(near, d, np.inf), axis=0), -1)
    return np.isin(np.arange(len(bright)), owner[owner >= 0])


def _candidates(maps: list[np.ndarray], threshold: float, outline: shapely.Polygon, *,
                transform: Affine, res_m: float, params: TowerParams, whole: bool = False
                ) -> tuple[np.ndarray, np.ndarray]:
    """Bright and dark blobs (`_BlobSearch.candidates` rows) that can decide a tower.

    A tower is a blob within ``search_m`` of the outline (the band); a weak lit roof there
    counts only with a shadow: a dark blob within reach of it that no nearer roof owns
    (`_with_shadow`). So the blobs searched are: both kinds in the band; dark ones around
    each weak bright one in the band; bright ones around each of those dark ones (all the
    roofs that could own it). The towers are those of a search of the whole window
    (``whole``), at a fraction of its cost: the filters run on the band, not the inside.
    """
    shape = maps[0].shape
    searches = [_BlobSearch(maps[k], threshold, res_m=res_m, params=params) for k in (0, 1)]
    if whole:
        for search in searches:
            search.search([(0, shape[0], 0, shape[1])])
        return searches[0].candidates(), searches[1].candidates()
    band = _band_boxes(outline, transform, shape, half_width_px=params.search_m / res_m + 1,
                       reach_px=searches[0].reach_px)
    for search in searches:
        search.search(band)
    bright = searches[0].candidates()
    # as `_towers` places and measures them; a pixel more: boxes around more blobs than needed
    xy = [transform * (col + 0.5, row + 0.5) for row, col in bright[:, :2]]
    centres = shapely.points(np.reshape(np.asarray(xy, float), (-1, 2)))
    in_band = shapely.distance(centres, outline.exterior) <= params.search_m + res_m
    weak = bright[in_band & (bright[:, 3] < params.peak_factor * threshold)]
    reach = int(math.ceil((params.max_size_m + 4.0) / res_m)) + 2  # `_with_shadow`'s reach
    searches[1].search(_around(weak, reach, shape))
    dark = searches[1].candidates()
    if len(weak) and len(dark):
        d = np.hypot(weak[:, None, 0] - dark[None, :, 0], weak[:, None, 1] - dark[None, :, 1])
        searches[0].search(_around(dark[(d <= reach).any(axis=0)], reach, shape))
    return searches[0].candidates(), dark


def _towers(maps: list[np.ndarray], threshold: float, outline: shapely.Polygon, *,
            angle_deg: float, transform: Affine, res_m: float,
            params: TowerParams, whole: bool = False) -> list[Tower]:
    """Tower-sized new blobs near the outline, one per tower.

    A lit roof (bright blob) counts when it has a shadow (a dark blob) beside it, or when it
    is ``params.peak_factor`` times above the threshold; a dark blob alone (a dark roof with
    its shadow) only in the second case. Bright blobs are taken first; a candidate within
    ``params.max_extent_m / 2`` of an accepted one is its shadow or a duplicate. Blobs are
    searched near the outline only (`_candidates`), or over the whole window with ``whole``:
    the same towers.
    """
    bright, dark = _candidates(maps, threshold, outline, transform=transform, res_m=res_m,
                               params=params, whole=whole)
    shadowed = _with_shadow(bright, dark, res_m=res_m, params=params)
    strong = params.peak_factor * threshold
    cands = sorted(((c, bool(ok) or c[3] >= strong, 2) for c, ok in zip(bright, shadowed,
                                                                        strict=True)),
                   key=lambda t: -t[0][3])
    cands += sorted(((c, c[3] >= strong, 3) for c in dark), key=lambda t: -t[0][3])
    corners = shapely.points(np.asarray(outline.exterior.coords)[:-1])
    towers: list[Tower] = []
    for cand, accept, k in cands:
        row, col, size_px, contrast = cand
        centre = shapely.Point(*(transform * (col + 0.5, row + 0.5)))
        dist = float(shapely.distance(centre, outline.exterior))
        if not accept or dist > params.search_m or any(
                centre.distance(t.point) < params.max_extent_m / 2 for t in towers):
            continue
        if _in_band(maps[k], cand, angle_deg=_side_angle(outline, centre), res_m=res_m):
            continue
        square = shapely.affinity.rotate(centre.buffer(size_px * res_m / 2, cap_style="square"),
                                         angle_deg, origin=centre)
        towers.append(Tower(
            point=centre, polygon=square, size_m=float(size_px * res_m),
            at_corner=float(shapely.distance(centre, corners).min()) <= params.corner_m,
            distance_m=dist, contrast=float(contrast)))
    return sorted(towers, key=lambda t: (not t.at_corner, -t.contrast))
