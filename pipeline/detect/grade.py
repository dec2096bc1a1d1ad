"""pipeline.detect.grade: a security grade for a new compound, with its reasons and caveats.

Grades count what is seen from above, in increasing order of security features:

- 0: change without a traced enclosure (or a coarse footprint too small or too irregular);
- 1: a new enclosure: at least ``min_closure_ratio`` of the outline backed by new wall lines
  and walls along at least ``min_sides_backed`` sides, or, in coarse imagery, a rectilinear
  footprint of new construction of at least ``coarse_min_area_m2``;
- 2: an enclosure with internal fences splitting it into yards, or a double fence;
- 3: an enclosure with watchtowers (at least ``min_towers``).

The reasons are sentences with the numbers behind the grade; the caveats say what the
resolution could and could not show. Coarse imagery (walls below a pixel) never grades above
1. `assess_site` runs the wall, enclosure and tower measures and the grade for one outline.
Pure: numbers, arrays and shapely geometries in; no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import shapely
from affine import Affine

from pipeline.detect.enclosure import EnclosureMeasures, SegmentArrays, measure_enclosure
from pipeline.detect.outlines import outline_from_segments
from pipeline.detect.towers import Tower, find_watchtowers
from pipeline.detect.walls import LineMap, WallSegment, find_wall_segments, new_line_map
from pipeline.model import GradeParams, TowerParams, WallParams

__all__ = ["GradeParams", "SiteAssessment", "grade_site", "resolution_caveats", "assess_site",
           "site_features"]


def _pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def resolution_caveats(resolution_m: float, thresholds: GradeParams = GradeParams()) -> list[str]:
    """What imagery of ``resolution_m`` metres per pixel can and cannot show of a compound."""
    res, t = resolution_m, thresholds
    if res > t.max_wall_res_m:
        return [f"at {res:g} m walls, fences and watchtowers cannot be seen; the outline is the "
                "footprint of new construction, not a traced wall",
                "a coarse footprint can at most be graded 1 (a new enclosure)"]
    out = []
    if res > t.max_fence_res_m:
        out.append(f"at {res:g} m walls show mostly through their shadows (a wall running along "
                   "the sun direction may be missed) and fences under 1 m thick cannot be told "
                   "apart; double and internal fences were not used for the grade")
    if res > t.max_tower_res_m:
        out.append(f"at {res:g} m a watchtower (3-8 m across) spans fewer than three pixels; "
                   "towers were not searched and grade 3 was not possible")
    out.append("a feature not found is not shown to be absent: trees, shadows, haze and the "
               "image edge can hide walls, fences and towers")
    return out


def _coarse_grade(m: Mapping[str, Any], res: float, t: GradeParams) -> tuple[int, list[str]]:
    area, rect = float(m.get("area_m2", 0.0)), float(m.get("rectangularity", 0.0))
    text = (f"new construction over {area / 1e4:.1f} ha with a rectilinear outline "
            f"(rectangularity {rect:.2f})")
    if area >= t.coarse_min_area_m2 and rect >= t.coarse_min_rectangularity:
        return 1, [text + f"; at {res:g} m a possible enclosure from its footprint alone"]
    return 0, [f"new construction over {area / 1e4:.1f} ha (rectangularity {rect:.2f}) is below "
               f"the {t.coarse_min_area_m2 / 1e4:g} ha, {t.coarse_min_rectangularity:.2f} "
               "needed for a coarse enclosure"]


def _fence_reasons(m: Mapping[str, Any], res: float, t: GradeParams) -> tuple[bool, list[str]]:
    """Whether fencing lifts the grade to 2, and the sentences about it."""
    used = res <= t.max_fence_res_m
    note = "" if used else f" (seen at {res:g} m, not used for the grade)"
    reasons = []
    if m.get("double_fence"):
        gap = m.get("double_fence_gap_m")
        where = f", about {gap:.0f} m inside the wall" if gap is not None else ""
        reasons.append(f"double fence along {_pct(float(m.get('double_fence_share', 0.0)))} of "
                       f"the walled perimeter{where}{note}")
    n = int(m.get("internal_fence_count", 0))
    if n:
        reasons.append(f"{n} internal fence{'s' if n > 1 else ''} across the compound, "
                       f"splitting it into {n + 1} or more yards{note}")
    return used and bool(reasons), reasons


def _tower_reasons(m: Mapping[str, Any], res: float, t: GradeParams) -> tuple[bool, list[str]]:
    """Whether watchtowers lift the grade to 3, and the sentence about them."""
    n, corners = int(m.get("watchtower_count", 0)), int(m.get("watchtowers_at_corner", 0))
    if n == 0 or res > t.max_tower_res_m:
        return False, []
    text = f"{n} watchtower{'s' if n > 1 else ''}, {corners} at corners"
    if n < t.min_towers:
        return False, [text + f" (at least {t.min_towers} needed for grade 3)"]
    return True, [text]


def grade_site(measures: Mapping[str, Any], *, resolution_m: float,
               thresholds: GradeParams = GradeParams()) -> tuple[int, list[str], list[str]]:
    """Grade one compound outline from its measurements.

    Parameters
    ----------
    measures
        Named measurements, as in ``Evidence.measurements``: ``area_m2``, ``rectangularity``,
        ``closure_ratio``, ``sides_backed``, ``sides_total``, ``wall_length_m``,
        ``perimeter_m``, ``longest_gap_m``,
        ``double_fence``, ``double_fence_share``, ``double_fence_gap_m``,
        ``internal_fence_count``, ``watchtower_count``, ``watchtowers_at_corner``. Missing
        keys count as nothing seen.
    resolution_m
        Pixel size of the imagery the measures come from.
    thresholds
        Grade thresholds.

    Returns
    -------
    ``(grade, reasons, caveats)``: grade 0-3, sentences with the numbers behind it, and what
    the resolution could and could not show.
    """
    t, res = thresholds, float(resolution_m)
    caveats = resolution_caveats(res, t)
    if res > t.max_wall_res_m:
        grade, reasons = _coarse_grade(measures, res, t)
        return grade, reasons, caveats
    closure = float(measures.get("closure_ratio", 0.0))
    area = float(measures.get("area_m2", 0.0))
    wall = float(measures.get("wall_length_m", 0.0))
    perimeter = float(measures.get("perimeter_m", 0.0))
    backed = (f"outline {_pct(closure)} backed by new wall lines ({wall:.0f} of "
              f"{perimeter:.0f} m")
    sides, n_sides = int(measures.get("sides_backed", 0)), int(measures.get("sides_total", 0))
    backed += f", walls along {sides} of {n_sides} sides"
    why = (f"needs {_pct(t.min_closure_ratio)}" if closure < t.min_closure_ratio
           else f"needs walls along {t.min_sides_backed} sides" if sides < t.min_sides_backed
           else f"encloses {area:.0f} m2, under {t.min_area_m2:.0f} m2"
           if area < t.min_area_m2 else "")
    if why:
        return 0, [f"change without a traced enclosure: {backed}; {why})"], caveats
    gap = float(measures.get("longest_gap_m", 0.0))
    reasons = [backed + (f", longest gap {gap:.0f} m)" if gap > 0 else ", closed)")]
    fenced, fence_text = _fence_reasons(measures, res, t)
    towered, tower_text = _tower_reasons(measures, res, t)
    grade = 3 if towered else 2 if fenced else 1
    return grade, reasons + fence_text + tower_text, caveats


@dataclass(frozen=True)
class SiteAssessment:
    """Walls, fences and towers of one outline, and its grade (geometries in the grid CRS)."""

    outline: shapely.Polygon
    sides_on_walls: int
    enclosure: EnclosureMeasures
    towers: tuple[Tower, ...]
    tower_note: str
    grade: int
    reasons: tuple[str, ...]
    caveats: tuple[str, ...]
    measurements: dict[str, Any] = field(default_factory=dict)
    segments: tuple[WallSegment, ...] = ()


def assess_site(before: np.ndarray, after: np.ndarray, seed: shapely.Polygon, *,
                transform: Affine, res_m: float, walls: WallParams = WallParams(),
                towers: TowerParams = TowerParams(), grades: GradeParams = GradeParams(),
                line_map: LineMap | None = None,
                segments: Sequence[WallSegment] | SegmentArrays | None = None
                ) -> SiteAssessment:
    """Measure walls, fences and towers around ``seed`` (a compound outline) and grade it.

    The seed's sides are moved onto the new walls near them (`outline_from_segments`), the
    enclosure is measured on that outline and towers are searched along it.

    Parameters
    ----------
    before, after
        ``(band, y, x)`` or ``(y, x)`` arrays on the same grid, after co-registered and
        normalized to before; NaN = nodata.
    seed
        The compound's outline in the grid CRS (a ``CompoundCandidate.polygon``).
    transform, res_m
        The grid's affine transform and pixel size in metres.
    walls, towers, grades
        Parameters of each step.
    line_map, segments
        `new_line_map` and `find_wall_segments` results for the whole pair, when several
        outlines share them (computed here otherwise); the segments best as one
        `SegmentArrays` for all the outlines.

    Returns
    -------
    A `SiteAssessment` whose ``measurements`` are ready for ``Evidence.measurements``; its
    ``segments`` are the new wall segments on or inside the outline.
    """
    lm = line_map if line_map is not None else new_line_map(
        before, after, transform=transform, res_m=res_m, params=walls)
    # arrays and a spatial index of the segments: made once when the caller passes them so,
    # each outline then visits only the segments near it
    segs = SegmentArrays.of(segments if segments is not None else find_wall_segments(
        before, after, transform=transform, res_m=res_m, params=walls, line_map=lm))
    outline, snapped = outline_from_segments(segs, seed=seed, res_m=lm.res_m, params=walls)
    enc = measure_enclosure(outline, segs, lm, params=walls)
    found, note = find_watchtowers(before, after, outline, transform=transform, res_m=res_m,
                                   params=towers, walls=walls)
    found, note = _on_walls(found, note, enc, walls)
    m = {**enc.as_dict(), "sides_on_walls": snapped, "watchtower_count": len(found),
         "watchtowers_at_corner": sum(t.at_corner for t in found), "resolution_m": res_m}
    grade, reasons, caveats = grade_site(m, resolution_m=res_m, thresholds=grades)
    m.update(grade=grade, grade_reasons=list(reasons), grade_caveats=list(caveats),
             watchtower_note=note)
    near = outline.buffer(enc.tolerance_m, join_style="mitre")
    # segments whose box meets the buffer's, in their order, then the same test as one by one
    idx = np.sort(segs.tree.query(near))
    idx = idx[shapely.intersects(segs.lines[idx], near)]
    return SiteAssessment(outline=outline, sides_on_walls=snapped, enclosure=enc,
                          towers=tuple(found), tower_note=note, grade=grade,
                          reasons=tuple(reasons), caveats=tuple(caveats), measurements=m,
                          segments=tuple(segs.items[i] for i in idx))


def _on_walls(found: list[Tower], note: str, enc: EnclosureMeasures, walls: WallParams
              ) -> tuple[list[Tower], str]:
    """The towers that stand on the walled stretches of the outline, and the note.

    A watchtower stands on the wall or in a gap of it no longer than the wall search bridges
    (``walls.gap_m``: the tower itself interrupts the wall line); tower-like objects beside
    an unwalled stretch (an outline side that crosses a row of buildings) are not counted,
    and the note says how many were left out.
    """
    if not found:
        return found, note
    near = (shapely.distance(np.array([t.point for t in found], dtype=object), enc.walled)
            <= walls.gap_m
            if not enc.walled.is_empty else np.zeros(len(found), bool))
    kept = [t for t, ok in zip(found, near, strict=True) if ok]
    if len(kept) < len(found):
        note = (f"{note}; {len(found) - len(kept)} tower-like object(s) more than "
                f"{walls.gap_m:g} m from the walled stretches of the outline not counted")
    return kept, note


def _segment_role(seg: WallSegment, site: SiteAssessment, walls: WallParams) -> str:
    """Where a segment lies: on the perimeter, a fence along it, across it, or elsewhere."""
    tol = site.enclosure.tolerance_m
    middle = seg.line.interpolate(0.5, normalized=True)
    if any(f.distance(middle) <= tol for f in site.enclosure.internal_fences):
        return "internal_fence"
    depth = float(site.outline.exterior.distance(middle))
    if depth <= tol:
        return "perimeter"
    if site.outline.contains(middle) and depth <= walls.double_gap_max_m + tol:
        return "inner_fence"
    return "inside"


def site_features(site: SiteAssessment, *, walls: WallParams = WallParams()
                  ) -> list[dict[str, Any]]:
    """The separate wall and watchtower features of an assessed site, for ``Evidence``.

    Returns
    -------
    One dict per feature: ``kind`` (``"wall"`` or ``"watchtower"``), ``geometry`` (grid CRS:
    the segment's line; the tower's centre as a point, its square's side in ``size_m``, so
    that GIS tools draw it as a marker at any zoom), ``score`` in [0, 1] (a wall's support:
    the share of its length on new line pixels; a tower's contrast, as a share of the image's 2-98 %
    range, capped at 1) and ``measurements`` (a wall's ``role``: ``"perimeter"``,
    ``"inner_fence"``, ``"internal_fence"`` or ``"inside"``).
    """
    out = []
    for seg in site.segments:
        out.append({"kind": "wall", "geometry": seg.line, "score": min(1.0, seg.support),
                    "measurements": {
                        "role": _segment_role(seg, site, walls), "length_m": seg.length_m,
                        "orientation_deg": seg.orientation_deg, "contrast": seg.contrast,
                        "support": seg.support, "lineness": seg.lineness,
                        "before_ratio": seg.before_ratio}})
    for tower in site.towers:
        out.append({"kind": "watchtower", "geometry": tower.point,
                    "score": min(1.0, tower.contrast),
                    "measurements": {"size_m": tower.size_m, "at_corner": tower.at_corner,
                                     "distance_to_wall_m": tower.distance_m,
                                     "contrast": tower.contrast}})
    return out

