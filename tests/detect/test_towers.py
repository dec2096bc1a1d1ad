"""Tests for pipeline.detect.towers: watchtowers on synthetic compounds over real ground."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pytest
import shapely

from pipeline.detect.grade import GradeParams
from pipeline.detect.towers import TowerParams, find_watchtowers
from pipeline.testing_compounds import (
    make_existing_compound,
    make_walled_compound,
    resample_background,
    synthetic_background,
)

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
REAL = [DATA / "levir_cd_tiles" / "A" / "levircd_test_1.png",
        DATA / "levir_cd" / "A" / "train_386_0512_0768.png"]
SIZE_PX = 480  # 240 m of ground at 0.5 m


@cache
def _real_image() -> np.ndarray | None:
    """A 480 x 480 crop (0.5 m, RGB) of real LEVIR-CD ground, or None without the data."""
    from skimage import io

    for path in REAL:
        if path.exists():
            img = io.imread(path)[:SIZE_PX, :SIZE_PX, :3].transpose(2, 0, 1).astype(np.float32)
            pad = [(0, 0), (0, SIZE_PX - img.shape[1]), (0, SIZE_PX - img.shape[2])]
            return np.pad(img, pad, mode="reflect")
    return None


def background(kind: str, res_m: float) -> np.ndarray:
    """Ground at ``res_m``: a real crop (skips the test when absent) or synthetic texture."""
    if kind == "synthetic":
        return synthetic_background((int(240 / res_m),) * 2, res_m=res_m, seed=3)
    img = _real_image()
    if img is None:
        pytest.skip(f"no real background under {DATA} (levir_cd_tiles or levir_cd)")
    return img if res_m == 0.5 else resample_background(img, from_res_m=0.5, to_res_m=res_m)


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
