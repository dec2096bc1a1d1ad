"""Tests for pipeline.detect.grade: grades, reasons and caveats, from numbers and from scenes."""

from __future__ import annotations

from functools import cache

import pytest
import shapely
from _scenes import LOOK_ALIKES, background, real_pair

from pipeline.detect.grade import (
    GradeParams,
    assess_site,
    grade_site,
    resolution_caveats,
    site_features,
)
from pipeline.testing import (
    make_walled_compound,
    synthetic_background,
)

COARSE_CAVEAT = ("at 10 m walls, fences and watchtowers cannot be seen; the outline is the "
                 "footprint of new construction, not a traced wall")


WALLED = {"area_m2": 19200.0, "rectangularity": 1.0, "closure_ratio": 0.68,
          "wall_length_m": 381.0, "perimeter_m": 560.0, "longest_gap_m": 90.0,
          "sides_backed": 4, "sides_total": 4}


def test_grade_site_one_for_a_walled_enclosure():
    """An outline 68 % backed by new walls on four sides is grade 1, and says so in numbers."""
    grade, reasons, caveats = grade_site(WALLED, resolution_m=0.5)
    assert grade == 1
    assert reasons[0].startswith("outline 68 % backed by new wall lines (381 of 560 m")
    assert "walls along 4 of 4 sides" in reasons[0]
    assert not any("cannot be seen" in c for c in caveats)


def test_grade_site_two_for_double_fence_or_yards():
    """A double fence, or an internal fence, lifts an enclosure to grade 2."""
    double = {**WALLED, "double_fence": True, "double_fence_share": 0.8,
              "double_fence_gap_m": 6.2}
    grade, reasons, _ = grade_site(double, resolution_m=1.0)
    assert grade == 2
    assert "double fence along 80 % of the walled perimeter, about 6 m inside the wall" in reasons
    grade, reasons, _ = grade_site({**WALLED, "internal_fence_count": 2}, resolution_m=0.5)
    assert grade == 2
    assert any(r.startswith("2 internal fences") for r in reasons)


def test_grade_site_three_for_watchtowers():
    """Four watchtowers, three at corners, make grade 3; one alone does not."""
    grade, reasons, _ = grade_site({**WALLED, "watchtower_count": 4, "watchtowers_at_corner": 3},
                                   resolution_m=0.5)
    assert grade == 3
    assert "4 watchtowers, 3 at corners" in reasons
    grade, reasons, _ = grade_site({**WALLED, "watchtower_count": 1, "watchtowers_at_corner": 1},
                                   resolution_m=0.5)
    assert grade == 1
    assert any("at least 2 needed" in r for r in reasons)


def test_grade_site_zero_without_closure_or_with_two_walls_only():
    """Low closure, or walls on only two sides, is change without an enclosure (grade 0)."""
    grade, reasons, _ = grade_site({**WALLED, "closure_ratio": 0.4}, resolution_m=0.5)
    assert grade == 0
    assert reasons[0].startswith("change without a traced enclosure")
    assert "needs 60 %" in reasons[0]
    grade, reasons, _ = grade_site({**WALLED, "sides_backed": 2, "watchtower_count": 4},
                                   resolution_m=0.5)
    assert grade == 0
    assert "needs walls along 3 sides" in reasons[0]


def test_grade_site_fences_at_2m_do_not_count():
    """At 2 m a double fence is reported but not graded, and towers were not searched."""
    measures = {**WALLED, "double_fence": True, "double_fence_share": 0.7,
                "watchtower_count": 4, "watchtowers_at_corner": 4}
    grade, reasons, caveats = grade_site(measures, resolution_m=2.0)
    assert grade == 1
    assert any("not used for the grade" in r for r in reasons)
    assert any("at 2 m a watchtower" in c for c in caveats)


def test_coarse_resolution_caps_grade_at_one_with_caveat():
    """At 10 m even a closed, fenced, towered outline is grade 1 at most, with the caveat."""
    measures = {**WALLED, "closure_ratio": 1.0, "double_fence": True, "internal_fence_count": 3,
                "watchtower_count": 6, "watchtowers_at_corner": 4}
    grade, reasons, caveats = grade_site(measures, resolution_m=10.0)
    assert grade == 1
    assert caveats[0] == COARSE_CAVEAT
    assert "1.9 ha" in reasons[0]
    small = {**measures, "area_m2": 6000.0}
    assert grade_site(small, resolution_m=30.0)[0] == 0
    assert resolution_caveats(30.0)[0].startswith("at 30 m walls, fences and watchtowers")


def test_coarse_scene_assessed_at_most_grade_one():
    """A walled, towered compound seen at 10 m is graded 1 from its footprint, not its walls."""
    res = 10.0
    before, after, truth = make_walled_compound(
        synthetic_background((24, 24), res_m=res, seed=1), res_m=res, double_fence_gap_m=6.0,
        internal_fences=2, towers="corners_and_sides")
    site = assess_site(before, after, truth.wall_polygon, transform=truth.transform,
                       res_m=res)
    assert site.grade == 1
    assert site.caveats[0] == COARSE_CAVEAT
    assert site.towers == () and site.measurements["closure_ratio"] == 0.0


@cache
def assessed(kind: str, res_m: float, **layout):
    """The assessment of a new compound from a rough seed rectangle (cached)."""
    before, after, truth = make_walled_compound(background(kind, res_m), res_m=res_m, **layout)
    seed = truth.wall_polygon.buffer(5.0, join_style="mitre")
    return assess_site(before, after, seed, transform=truth.transform, res_m=res_m), truth


@pytest.mark.parametrize("res_m", [0.5, 1.0])
@pytest.mark.parametrize("share", [0.35, 0.5, 0.65])
def test_towers_count_only_along_the_walled_stretches(res_m, share):
    """An outline over part of a towerless compound (three sides on its walls, the fourth
    across its rows of buildings, as a texture seed over some of its blocks is traced) finds
    no watchtowers: the tower-like pieces of roofs by the unwalled side are left out, and
    the note says so (before this rule, four of these six made grade 3)."""
    before, after, truth = make_walled_compound(background("synthetic", res_m), res_m=res_m,
                                                towers=None, buildings=(3, 4))
    x0, y0, x1, y1 = truth.wall_polygon.bounds
    part = shapely.box(x0, y0, x0 + share * (x1 - x0), y1)
    site = assess_site(before, after, part, transform=truth.transform, res_m=res_m)
    assert site.enclosure.sides_backed == 3 and site.enclosure.closure_ratio < 0.8
    assert site.towers == () and site.grade == 1
    # the walled samples: on the outline, none along its side across the buildings
    xy = shapely.get_coordinates(site.enclosure.walled)
    assert len(xy) and shapely.distance(shapely.points(xy), site.outline.exterior).max() < 1e-6
    east = site.outline.bounds[2]
    assert not ((xy[:, 0] > east - 2.0) & (xy[:, 1] > y0 + 10) & (xy[:, 1] < y1 - 10)).any()


@pytest.mark.parametrize("kind", ["real", "synthetic"])
@pytest.mark.parametrize("res_m", [0.5, 1.0])
def test_assess_site_fenced_towered_compound_is_grade_3(kind, res_m):
    """A closed wall, double fence, yards and watchtowers at 0.5-1 m give grade 3."""
    site, truth = assessed(kind, res_m, double_fence_gap_m=6.0, internal_fences=2,
                           towers="corners_and_sides")
    m = site.measurements
    assert site.grade == 3
    assert m["closure_ratio"] >= 0.9 and m["double_fence"] and m["internal_fence_count"] == 2
    # Exact counts are tested on the true wall line (test_towers); on the traced outline a
    # lit corridor between wall and inner fence can add one.
    assert abs(m["watchtower_count"] - len(truth.towers)) <= 1
    assert m["watchtowers_at_corner"] == 4
    assert {"grade", "grade_reasons", "grade_caveats", "resolution_m"} <= set(m)


def test_site_features_walls_and_towers():
    """Wall segments come with their role, towers as points, for separate evidence."""
    site, truth = assessed("real", 1.0, double_fence_gap_m=6.0, internal_fences=2,
                           towers="corners_and_sides")
    features = site_features(site)
    roles = {f["measurements"]["role"] for f in features if f["kind"] == "wall"}
    towers = [f for f in features if f["kind"] == "watchtower"]
    assert {"perimeter", "inner_fence", "internal_fence"} <= roles
    assert len(towers) == site.measurements["watchtower_count"]
    # a point at the tower's centre (a marker in QGIS at any zoom), its side in size_m
    assert all(f["geometry"].geom_type == "Point" for f in towers)
    assert all(3.0 <= f["measurements"]["size_m"] <= 8.0 for f in towers)
    perimeter = sum(f["measurements"]["length_m"] for f in features
                    if f["kind"] == "wall" and f["measurements"]["role"] == "perimeter")
    assert perimeter == pytest.approx(truth.wall_length_m, rel=0.15)
    assert all(0.0 <= f["score"] <= 1.0 and f["geometry"].is_valid for f in features)


@pytest.mark.parametrize("kind", ["real", "synthetic"])
def test_assess_site_at_2m_is_grade_1_with_caveats(kind):
    """The same compound at 2 m is a new enclosure (grade 1) with what 2 m cannot show."""
    site, _ = assessed(kind, 2.0, double_fence_gap_m=6.0, internal_fences=2,
                       towers="corners_and_sides")
    assert site.grade == 1
    assert site.measurements["closure_ratio"] >= 0.9
    assert any("fences under 1 m thick cannot be told apart" in c for c in site.caveats)
    assert any("towers were not searched" in c for c in site.caveats)




@pytest.mark.parametrize("case", sorted(LOOK_ALIKES))
@pytest.mark.parametrize("kind,res_m", [("real", 1.0), ("real", 2.0), ("synthetic", 1.0)])
def test_look_alikes_are_grade_0(case, kind, res_m):
    """Roads, fields, bare new roofs and a re-roofed old compound are not new enclosures."""
    before, after, truth = LOOK_ALIKES[case](background(kind, res_m), res_m=res_m, seed=1)
    site = assess_site(before, after, truth.extra["outline"], transform=truth.transform,
                       res_m=res_m)
    assert site.grade == 0
    assert site.measurements["closure_ratio"] < GradeParams().min_closure_ratio
    assert site.reasons[0].startswith("change without a traced enclosure")




def test_real_date_pair_compound_is_an_enclosure():
    """Over real ground that changed with the season, a new walled compound is still found."""
    before, after, truth = make_walled_compound(real_pair(1.0), res_m=1.0,
                                                double_fence_gap_m=6.0, internal_fences=2,
                                                towers="corners_and_sides")
    seed = truth.wall_polygon.buffer(5.0, join_style="mitre")
    site = assess_site(before, after, seed, transform=truth.transform, res_m=1.0)
    assert site.grade >= 1
    assert site.measurements["closure_ratio"] >= 0.8
    assert site.outline.hausdorff_distance(truth.wall_polygon) <= 4.0


@pytest.mark.parametrize("case", sorted(LOOK_ALIKES))
def test_real_date_pair_look_alikes_are_grade_0(case):
    """Over real ground that changed with the season, look-alikes stay grade 0."""
    before, after, truth = LOOK_ALIKES[case](real_pair(1.0), res_m=1.0, seed=1)
    site = assess_site(before, after, truth.extra["outline"], transform=truth.transform,
                       res_m=1.0)
    assert site.grade == 0



def test_assess_site_segment_arrays_and_far_segments_give_the_same_assessment():
    """Segments passed once as SegmentArrays, with far-away segments added among them, give
    the same assessment as the site's own segment list (each outline visits only the
    segments near it; a scene's other walls change nothing)."""
    import dataclasses

    import shapely

    from pipeline.detect.enclosure import SegmentArrays
    from pipeline.detect.walls import find_wall_segments, new_line_map

    res_m = 1.0
    before, after, truth = make_walled_compound(background("real", res_m), res_m=res_m,
                                                double_fence_gap_m=6.0, internal_fences=2,
                                                towers="corners_and_sides")
    seed = truth.wall_polygon.buffer(5.0, join_style="mitre")
    lm = new_line_map(before, after, transform=truth.transform, res_m=res_m)
    segs = find_wall_segments(before, after, transform=truth.transform, res_m=res_m,
                              line_map=lm)
    assert len(segs) > 4
    far = [dataclasses.replace(s, line=shapely.affinity.translate(s.line, 5000.0, -3000.0))
           for s in segs]
    mixed = [x for pair in zip(far, segs, strict=True) for x in pair]
    kwargs = dict(transform=truth.transform, res_m=res_m, line_map=lm)
    alone = assess_site(before, after, seed, segments=segs, **kwargs)
    shared = assess_site(before, after, seed, segments=SegmentArrays.of(mixed), **kwargs)
    assert shared.measurements == alone.measurements
    assert shared.outline.equals_exact(alone.outline, 0.0)
    assert shared.segments == alone.segments and len(alone.segments) > 0
    assert shared.enclosure.internal_fences == alone.enclosure.internal_fences
    assert shared.towers == alone.towers
