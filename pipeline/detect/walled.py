"""pipeline.detect.walled: walls of a whole scene, wall-traced outlines, and site grades.

At about 2.5 m or finer, walls are resolvable: the new-wall search runs once over the whole
scene (on its grey image, averaged to about ``WallParams.work_res_m``), its segments propose
outlines that the texture-gain search can miss (a walled compound with few buildings), and
every outline is graded on a crop of the pair around it with the scene's wall segments.
Coarser, the footprint rules of `pipeline.detect.grade.grade_site` apply. Pure: arrays (NumPy
or Dask) and shapely geometries in the grid CRS in, numbers and geometries out.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np
import shapely
from affine import Affine

from pipeline.detect.blocks import CROP_BATCH_PX, crop_batches
from pipeline.detect.compounds import outline_window
from pipeline.detect.enclosure import SegmentArrays
from pipeline.detect.grade import SiteAssessment, assess_site, grade_site
from pipeline.detect.outlines import propose_outlines
from pipeline.detect.texture import block_mean, compute_crops, grey
from pipeline.detect.walls import LineMap, WallSegment, find_wall_segments, new_line_map
from pipeline.detect.walls_chunked import Persist, scene_walls_chunked
from pipeline.model import DetectParams

__all__ = ["SceneWalls", "scene_walls", "wall_outlines", "assess_outlines", "coarse_grade",
           "is_fine", "overlaps", "parts_of_rings", "site_measures", "GRADE_MARGIN_M"]

# Margin around an outline for grading: walls the seed outline misses by up to this much are
# still found (texture seeds come from ~10 m cells), and towers just outside it.
GRADE_MARGIN_M = 60.0
# Outlines are graded a batch at a time, of about this many crop values (both dates, all
# bands): the crops of a large scene's outlines would not fit together.
GRADE_BATCH_PX = CROP_BATCH_PX


@dataclass(frozen=True)
class SceneWalls:
    """The new-line map and wall segments of a whole scene (on the wall grid)."""

    line_map: LineMap
    segments: tuple[WallSegment, ...]


def is_fine(res_m: float, params: DetectParams) -> bool:
    """Whether walls are resolvable at ``res_m`` (the grade's wall rules apply)."""
    return res_m <= params.grade.max_wall_res_m


def scene_walls(before: Any, after: Any, *, transform: Affine, res_m: float,
                params: DetectParams, persist: Persist | None = None) -> SceneWalls:
    """New wall segments over the whole scene.

    Parameters
    ----------
    before, after
        ``(band, y, x)`` NumPy or Dask stacks on the working grid, after co-registered and
        normalized, or their grey images (`texture.grey`, ``(y, x)``: the search reads only
        those, so stored ones save recomputing them); NaN = nodata. A Dask pair is searched
        chunk by chunk
        (`walls_chunked.scene_walls_chunked`: same segments), so no wall-grid map is held
        whole beyond a moment; its line map's mask is then read window by window.
    transform, res_m
        The working grid's affine transform and pixel size.
    params
        Detection parameters (``params.walls`` is used).
    persist
        For a Dask pair: stores a lazy wall-grid map once (see `scene_walls_chunked`).

    Returns
    -------
    A `SceneWalls`: the line map on the wall grid and the segments in the grid CRS.
    """
    walls = params.walls
    if isinstance(before, da.Array) or isinstance(after, da.Array):
        lm, segments = scene_walls_chunked(da.asarray(before), da.asarray(after),
                                           transform=transform, res_m=res_m, params=walls,
                                           persist=persist)
        return SceneWalls(lm, tuple(segments))
    factor = int(round(walls.work_res_m / res_m)) if res_m < walls.work_res_m else 1
    g_b, g_a = (x if x.ndim == 2 else grey(x) for x in (before, after))
    if factor > 1:
        g_b, g_a = block_mean(g_b, factor)[0], block_mean(g_a, factor)[0]
        transform, res_m = transform * Affine.scale(factor), res_m * factor
    else:
        g_b, g_a = compute_crops([g_b, g_a])
    lm = new_line_map(g_b, g_a, transform=transform, res_m=res_m, params=walls)
    segments = find_wall_segments(g_b, g_a, transform=transform, res_m=res_m, params=walls,
                                  line_map=lm)
    return SceneWalls(lm, tuple(segments))


def wall_outlines(scene: SceneWalls, *, params: DetectParams) -> list[shapely.Polygon]:
    """Outlines that the scene's new walls close or nearly close (``params.grade``'s closure,
    sides and area), best closed and largest first; none nested in a better one."""
    g = params.grade
    found = propose_outlines(scene.segments, res_m=scene.line_map.res_m, params=params.walls,
                             min_area_m2=g.min_area_m2, min_closure=g.min_closure_ratio,
                             min_sides=g.min_sides_backed)
    return [outline for outline, _ in found]


def overlaps(outline: shapely.Polygon, others: Sequence[shapely.Polygon]) -> bool:
    """Whether ``outline`` shares half of its area, or of another's, with any of ``others``.

    Only the others whose bounding box meets the outline's are intersected: the rest share
    no area, which is half of an area only when that area is 0 (kept in the test). A site's
    check against the kept ones no longer costs a GEOS intersection per kept site.
    """
    if not len(others):
        return False
    polygons = np.asarray(others, dtype=object)
    areas = shapely.area(polygons)
    box = shapely.bounds(polygons)
    x0, y0, x1, y1 = outline.bounds
    test = ((box[:, 0] <= x1) & (box[:, 2] >= x0) & (box[:, 1] <= y1) & (box[:, 3] >= y0)
            ) | (areas <= 0) | (outline.area <= 0)
    if not test.any():
        return False
    shared = shapely.area(shapely.intersection(outline, polygons[test]))
    return bool(np.any(shared >= 0.5 * np.minimum(outline.area, areas[test])))


def parts_of_rings(sites: Sequence[SiteAssessment], *, min_inside: float = 0.9,
                   max_area: float = 0.8) -> set[int]:
    """Indices of the assessed outlines that lie inside a better-closed enclosure (grade 1
    or more): parts of that site, not sites of their own.

    A part lies mostly (``min_inside`` of its area) inside the other outline and covers at
    most ``max_area`` of it (else it is the same ring, snapped a little differently): a
    texture seed over some of a compound's blocks traced onto the compound's walls on some
    sides and across its buildings on the others, or an inner rectangle whose sides run
    along rows of new blocks (their roof edges pass for walls, and pieces of roofs along
    them for towers). The facility is its outermost well-closed wall; what stands inside is
    measured on it (its internal fences, its buildings), and an inner ring (a prison's inner
    fence) never replaces it. An outer ring that is less closed than the outline inside it
    does not take it over.
    """
    outlines = np.array([s.outline for s in sites], dtype=object)
    parts: set[int] = set()
    if len(outlines) < 2:
        return parts
    inner, outer = shapely.STRtree(outlines).query(outlines, predicate="intersects")
    for i, j in zip(inner.tolist(), outer.tolist(), strict=True):
        a, b = sites[i], sites[j]
        if (i == j or b.grade < 1 or b.enclosure.closure_ratio <= a.enclosure.closure_ratio
                or a.outline.area > max_area * b.outline.area):
            continue
        if shapely.intersection(a.outline, b.outline).area >= min_inside * a.outline.area:
            parts.add(i)
    return parts


def assess_outlines(before: Any, after: Any, outlines: Sequence[shapely.Polygon], *,
                    transform: Affine, res_m: float, params: DetectParams,
                    scene: SceneWalls) -> list[SiteAssessment]:
    """Walls, fences, towers and grade of each outline, on a crop of the pair around it.

    The crops (outline plus `GRADE_MARGIN_M`) are computed together, a batch of outlines of
    about `GRADE_BATCH_PX` crop pixels at a time (only one batch of crops is held: their
    number grows with the area); the scene's line map and segments are shared by all
    outlines.
    """
    margin_px = max(1, round(GRADE_MARGIN_M / res_m))
    windows = [outline_window(o, transform, before.shape, margin_px=margin_px) for o in outlines]
    sizes = [2 * math.prod(before.shape[:-2]) * (r.stop - r.start) * (c.stop - c.start)
             for r, c, _ in windows]
    segments = SegmentArrays.of(scene.segments)  # built once: each outline visits its own
    # the shared objects are bound to the function, not passed as a task's arguments: Dask
    # walks the arguments of every call (dataclasses and tuples included), which for the
    # scene's segments cost time in proportion to their number, once per outline
    shared = functools.partial(assess_site, res_m=res_m, walls=params.walls,
                               towers=params.towers, grades=params.grade,
                               line_map=scene.line_map, segments=segments)
    assess = dask.delayed(shared, pure=False)  # not hashed: the crops are large
    out: list[SiteAssessment] = []
    for part in crop_batches(sizes, GRADE_BATCH_PX):
        crops = compute_crops([x[..., rows, cols] for rows, cols, _ in windows[part.start:part.stop]
                               for x in (before, after)])
        # the outlines of a batch in parallel, on the configured Dask scheduler (each
        # assessment is independent; the shared maps' chunk caches are thread-safe)
        out += dask.compute(*(assess(crops[2 * (k - part.start)], crops[2 * (k - part.start) + 1],
                                     outlines[k], transform=windows[k][2]) for k in part))
        del crops
    return out


def site_measures(site: SiteAssessment, *, res_m: float, params: DetectParams
                  ) -> dict[str, Any]:
    """The grade and wall measures of a fine-resolution site, for ``Evidence.measurements``.

    A watchtower count is None where towers were not searched (coarser than
    ``params.towers.max_res_m``): the resolution could not show them.
    """
    m = dict(site.measurements)
    for key in ("area_m2", "resolution_m", "perimeter_m"):
        m.pop(key, None)
    if res_m > params.towers.max_res_m:
        m["watchtower_count"] = m["watchtowers_at_corner"] = None
    m["grade_reasons"] = "; ".join(m["grade_reasons"])
    m["grade_caveats"] = "; ".join(m["grade_caveats"])
    return m


def coarse_grade(polygon: shapely.Polygon, evidence_fill: float, *, res_m: float,
                 params: DetectParams) -> dict[str, Any]:
    """Footprint grade of a coarse compound: walls, fences and towers are below a pixel.

    Rectangularity is the share of the outline covered by construction evidence. The wall,
    fence and tower measures are None (not measurable at ``res_m``).
    """
    m = {"area_m2": float(polygon.area), "rectangularity": evidence_fill}
    grade, reasons, caveats = grade_site(m, resolution_m=res_m, thresholds=params.grade)
    return {"grade": grade, "grade_reasons": "; ".join(reasons),
            "grade_caveats": "; ".join(caveats), "closure_ratio": None, "wall_length_m": None,
            "double_fence": None, "watchtower_count": None}
