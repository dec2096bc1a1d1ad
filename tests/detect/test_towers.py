"""Tests for pipeline.detect.towers: watchtowers on synthetic compounds over real ground."""

from __future__ import annotations

from functools import cache

import pytest
import shapely
from _scenes import background

from pipeline.detect.grade import GradeParams
from pipeline.detect.towers import TowerParams, find_watchtowers
from pipeline.testing import (
    make_existing_compound,
    make_walled_compound,
)


@cache
def towers_in(kind: str, res_m: float, **layout):
    """Towers found along the wall ring of a new compound (cached), and the truth."""
    before, after, truth = make_walled_compound(background(kind, res_m), res_m=res_m, **layout)
    found, note = find_watchtowers(before, after, truth.wall_polygon,
                                   transform=truth.transform, res_m=res_m)
    return found, note, truth


@pytest.mark.parametrize("kind", ["real", "synthetic"])
@pytest.mark.parametrize("res_m", [0.5, 1.0])
@pytest.mark.parametrize("layout", ["corners", "corners_and_sides"])
def test_tower_count_exact(kind, res_m, layout):
    """Every tower is found once, near its true place, and corner towers are flagged."""
    found, _, truth = towers_in(kind, res_m, towers=layout, internal_fences=2,
                                double_fence_gap_m=6.0)
    assert len(found) == len(truth.towers)
    assert sum(t.at_corner for t in found) == sum(truth.towers_at_corner) == 4
    true_points = shapely.MultiPoint(list(truth.towers))
    assert max(t.point.distance(true_points) for t in found) <= 3.0
    assert all(abs(t.size_m - truth.tower_size_m) <= 2.0 for t in found)


@pytest.mark.parametrize("res_m", [0.5, 1.0])
def test_tower_count_exact_low_sun_rows_of_buildings(res_m):
    """Four 4 m corner towers among rows of buildings, sun low in the south-west: four found."""
    found, _, truth = towers_in("real", res_m, towers="corners", tower_size_m=4.0,
                                buildings=(3, 4), sun_azimuth_deg=210.0,
                                sun_elevation_deg=45.0, seed=1)
    assert len(found) == len(truth.towers) == 4
    assert all(t.at_corner for t in found)


@pytest.mark.parametrize("res_m", [0.5, 1.0])
def test_no_towers_on_a_wall_without_towers(res_m):
    """Wall corners, fence junctions and buildings on real ground are not taken for towers."""
    found, _, _ = towers_in("real", res_m, towers=None, buildings=(3, 4), internal_fences=2,
                            double_fence_gap_m=6.0)
    assert found == []


@pytest.mark.parametrize("res_m", [0.5, 1.0])
def test_towerless_wall_on_synthetic_ground_never_reaches_grade_3(res_m):
    """On synthetic ground, false towers stay fewer than grade 3 needs (one lit corner at 1 m)."""
    found, _, _ = towers_in("synthetic", res_m, towers=None, buildings=(3, 4),
                            internal_fences=2, double_fence_gap_m=6.0)
    assert len(found) < GradeParams().min_towers


@pytest.mark.parametrize("res_m", [0.5, 1.0])
def test_existing_towers_are_not_new(res_m):
    """Towers standing at both dates (roofs recoloured, sun moved) are not reported."""
    before, after, truth = make_existing_compound(background("real", res_m), res_m=res_m)
    found, _ = find_watchtowers(before, after, truth.wall_polygon, transform=truth.transform,
                                res_m=res_m)
    assert len(truth.towers) == 4
    assert found == []


def test_coarse_resolution_returns_reason():
    """At 2 m a tower is under three pixels: nothing is searched and the note says so."""
    found, note, _ = towers_in("synthetic", 2.0, towers="corners")
    assert found == []
    assert "at 2 m" in note and "not searched" in note
    assert TowerParams().max_res_m < 2.0



def _towers_both_ways(before, after, outline, transform, res_m, params=None):
    """Towers of `_towers` searching the band along the outline, and the whole window."""
    from pipeline.detect.towers import WallParams, _tower_maps, _towers

    params = params or TowerParams()
    maps, threshold, angle, window = _tower_maps(before, after, outline, transform=transform,
                                                 res_m=res_m, params=params, walls=WallParams())
    return [_towers(maps, threshold, outline, angle_deg=angle, res_m=res_m, params=params,
                    transform=window, whole=whole) for whole in (False, True)]


@pytest.mark.parametrize("res_m", [0.5, 1.0])
@pytest.mark.parametrize("angle_deg", [0.0, 27.0])
@pytest.mark.parametrize("layout", [{"towers": "corners_and_sides"},
                                    {"towers": "corners", "tower_size_m": 4.0, "buildings": (3, 4),
                                     "sun_azimuth_deg": 210.0, "sun_elevation_deg": 45.0},
                                    {"towers": None, "buildings": (3, 4), "internal_fences": 2}])
def test_band_search_equals_whole_window(res_m, angle_deg, layout):
    """Searching blobs only along the wall (and around weak roofs) finds the towers a search
    of the whole window finds: the same points, sizes, contrasts and flags, to the bit."""
    before, after, truth = make_walled_compound(background("synthetic", res_m), res_m=res_m,
                                                angle_deg=angle_deg, **layout)
    banded, whole = _towers_both_ways(before, after, truth.wall_polygon, truth.transform, res_m)
    assert banded == whole
    assert len(whole) >= len(truth.towers) - 1  # (the test is of the equality, not the count)
    # a lower threshold: many weak roofs, whose shadows and rival roofs are searched around them
    loose = TowerParams(min_contrast=0.03, noise_factor=1.0, peak_factor=6.0)
    banded, whole = _towers_both_ways(before, after, truth.wall_polygon, truth.transform, res_m,
                                      loose)
    assert banded == whole
    assert len(whole) > 0
