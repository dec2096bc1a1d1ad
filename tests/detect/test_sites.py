"""Tests for pipeline.detect: texture evidence, objects and compound evidence."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
from _scenes import LEVIR_TILES, LOOK_ALIKES, background, levir_tile, real_pair
from affine import Affine
from numpy.testing import assert_array_equal

from pipeline.detect.objects import extract_objects, is_building_like
from pipeline.detect.sites import detect_sites
from pipeline.detect.texture import block_mean, texture_gain
from pipeline.model import DetectParams, SourceRef
from pipeline.testing import (
    detect_pair,
    make_existing_compound,
    make_walled_compound,
    resample_background,
)

RES = 2.0
TRANSFORM = Affine(RES, 0, 500000.0, 0, -RES, 4800000.0)
REF = SourceRef(provider="test", item_id="synthetic")


def _scene(seed=0, shape=(300, 300)):
    """Smooth ground with mild noise, three bands."""
    rng = np.random.default_rng(seed)
    base = 100 + rng.normal(0, 2, size=shape).astype(np.float32)
    return np.stack([base, base * 0.9, base * 1.1]).astype(np.float32)


def _with_compound(before):
    """After: a walled rectangle (rows 80-199, cols 60-239) holding 4 x 3 bright blocks."""
    after = before.copy()
    after[:, 80:200, 60:240] += 15.0  # graded ground inside the wall
    after[:, 80:82, 60:240] = 220
    after[:, 198:200, 60:240] = 220
    after[:, 80:200, 60:62] = 220
    after[:, 80:200, 238:240] = 220
    for r in range(95, 190, 32):
        for c in range(75, 230, 40):
            after[:, r : r + 14, c : c + 24] = 200.0
    return after


def _mask_from(before, after, thr=30.0):
    mag = np.sqrt(((after - before) ** 2).mean(axis=0)).astype(np.float32)
    return (mag > thr).astype(np.uint8), mag


def test_block_mean_ignores_nan_and_reports_valid_share():
    """Block means skip NaN; the valid share counts only existing pixels."""
    a = np.arange(16, dtype=np.float32).reshape(4, 4)
    a[0, 0] = np.nan
    mean, valid = block_mean(a, 2)
    assert mean[0, 0] == pytest.approx((1 + 4 + 5) / 3)
    assert valid[0, 0] == pytest.approx(0.75)
    assert valid[1, 1] == 1.0


def test_texture_gain_zero_for_identical_pair():
    """Identical dates give zero texture gain everywhere."""
    before = _scene()
    gain = texture_gain(before, before.copy(), factor=5, sigma_cells=2.0)
    np.testing.assert_allclose(gain, 0.0, atol=1e-6)


def test_texture_gain_rises_over_construction():
    """Texture gain inside the new compound exceeds log(2), and stays near 0 far from it."""
    before = _scene()
    gain = texture_gain(before, _with_compound(before), factor=5, sigma_cells=2.0)
    assert np.nanmean(gain[20:36, 16:44]) > np.log(2)
    assert abs(np.nanmean(gain[0:8, 0:8])) < 0.1


def test_extract_objects_measures_rectangular_block():
    """A planted 10 x 20 px block is one building-like object of 800 m2."""
    mask = np.zeros((60, 60), np.uint8)
    mask[10:20, 10:30] = 1
    mag = mask.astype(np.float32) * 50
    objs = extract_objects(mask, mag, mag, transform=TRANSFORM, threshold=25.0, min_area_m2=10)
    assert len(objs) == 1
    o = objs[0]
    assert o.area_m2 == pytest.approx(800.0)
    assert o.rectangularity > 0.95 and o.solidity > 0.95
    assert o.contrast == pytest.approx(2.0)
    assert is_building_like(o, min_area_m2=100, max_area_m2=2000, min_solidity=0.6,
                            min_rectangularity=0.5)


def test_detect_sites_finds_synthetic_compound():
    """The walled block of buildings is one compound whose outline overlaps the wall (IoU > 0.7)."""
    import shapely

    before = _scene()
    after = _with_compound(before)
    mask, mag = _mask_from(before, after)
    found = detect_sites(before, after, mask, mag, transform=TRANSFORM, crs="EPSG:32633",
                         threshold=30.0, params=DetectParams(), before_ref=REF, after_ref=REF)
    compounds = [e for e in found if e.kind == "compound"]
    assert len(compounds) == 1
    x0, y0 = TRANSFORM @ (60, 80)
    x1, y1 = TRANSFORM @ (240, 200)
    wall = shapely.box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
    c = compounds[0]
    assert c.geometry.intersection(wall).area / c.geometry.union(wall).area > 0.7
    assert 0 <= c.score <= 1
    buildings = [e for e in found if e.kind == "new_building"]
    assert c.measurements["building_count"] == len([b for b in buildings if b.site_id == c.id])
    assert c.measurements["building_count"] >= 10
    # the blocks stand in 3 rows of 4 (rows and columns of like blocks)
    assert c.measurements["building_rows"] >= 6
    assert c.measurements["buildings_in_rows_share"] >= 0.9


def test_detect_sites_nothing_on_identical_pair():
    """No compound and no building when after equals before."""
    before = _scene()
    mask, mag = _mask_from(before, before.copy())
    found = detect_sites(before, before.copy(), mask, mag, transform=TRANSFORM, crs="EPSG:32633",
                         threshold=30.0, params=DetectParams(), before_ref=REF, after_ref=REF)
    assert found == []


def test_texture_gain_dask_equals_numpy():
    """Texture gain from chunked (unaligned, NaN-edged) Dask input equals the NumPy one."""
    import dask.array

    before = _scene()
    after = _with_compound(before)
    before[:, :, :12] = np.nan
    expected = texture_gain(before, after, factor=5, sigma_cells=2.0)
    lazy = texture_gain(dask.array.from_array(before, chunks=(3, 128, 96)),
                        dask.array.from_array(after, chunks=(1, 128, 96)),
                        factor=5, sigma_cells=2.0)
    assert isinstance(lazy, np.ndarray) and lazy.shape == (60, 60)
    assert_array_equal(lazy, expected)


def test_new_edges_lazy_crop_equals_whole_map():
    """A lazy new-edge crop (grey window plus halo) equals the same window of whole maps."""
    import dask.array

    from pipeline.detect.texture import compute_crops, edge_maps, grey, new_edges

    before = _scene()
    after = _with_compound(before)
    after[:, 290:, :] = np.nan
    eager = edge_maps(grey(before), grey(after))
    lazy = edge_maps(grey(dask.array.from_array(before, chunks=(3, 100, 100))),
                     grey(dask.array.from_array(after, chunks=(3, 100, 100))))
    assert isinstance(lazy.after, dask.array.Array) and eager.scale == lazy.scale
    windows = [(slice(70, 130), slice(50, 250)), (slice(0, 20), slice(280, 300)),
               (slice(250, 300), slice(0, 300))]
    crops = compute_crops([new_edges(lazy, r, c) for r, c in windows])
    for (rows, cols), crop in zip(windows, crops, strict=True):
        assert_array_equal(crop, new_edges(eager, rows, cols))
    assert crops[0].max() > 0


def test_extract_objects_dask_equals_numpy():
    """Per-object means summed chunk by chunk equal the in-memory ones."""
    import dask.array

    before = _scene()
    after = _with_compound(before)
    mask, mag = _mask_from(before, after)
    delta = after.mean(axis=0) - before.mean(axis=0)
    expected = extract_objects(mask, mag, delta, transform=TRANSFORM, threshold=30.0,
                               min_area_m2=50)
    got = extract_objects(mask, dask.array.from_array(mag, chunks=70),
                          dask.array.from_array(delta, chunks=(90, 64)), transform=TRANSFORM,
                          threshold=30.0, min_area_m2=50)
    assert len(got) == len(expected) > 5
    for e, g in zip(expected, got, strict=True):
        assert (g.label, g.area_m2, g.solidity) == (e.label, e.area_m2, e.solidity)
        assert g.polygon.equals(e.polygon)
        assert g.mean_magnitude == pytest.approx(e.mean_magnitude, rel=1e-9)
        assert g.brightness_change == pytest.approx(e.brightness_change, rel=1e-9, abs=1e-9)


def test_detect_sites_dask_equals_numpy():
    """detect_sites on Dask stacks (chunked, lazy) gives the NumPy evidence."""
    import dask.array

    before = _scene()
    after = _with_compound(before)
    mask, mag = _mask_from(before, after)
    kwargs = dict(transform=TRANSFORM, crs="EPSG:32633", threshold=30.0, params=DetectParams(),
                  before_ref=REF, after_ref=REF)
    expected = detect_sites(before, after, mask, mag, **kwargs)
    got = detect_sites(dask.array.from_array(before, chunks=(3, 128, 128)),
                       dask.array.from_array(after, chunks=(3, 128, 128)), mask,
                       dask.array.from_array(mag, chunks=128), **kwargs)
    assert [e.id for e in got] == [e.id for e in expected]
    for e, g in zip(expected, got, strict=True):
        assert g.geometry.equals(e.geometry) and g.score == e.score and g.site_id == e.site_id
        for key, value in e.measurements.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                assert g.measurements[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
            else:
                assert g.measurements[key] == value, key


def test_outline_window_holds_polygon_with_margin():
    """The window holds the outline plus the margin, clipped to the grid, with its transform."""
    import shapely

    from pipeline.detect.compounds import outline_window

    x0, y0 = TRANSFORM * (60, 80)
    x1, y1 = TRANSFORM * (240, 200)
    poly = shapely.box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
    rows, cols, transform = outline_window(poly, TRANSFORM, (3, 300, 250), margin_px=20)
    assert (rows.start, rows.stop, cols.start, cols.stop) == (60, 220, 40, 250)
    assert transform * (0, 0) == TRANSFORM * (40, 60)


COMPOUND_KEYS = {"grade", "grade_reasons", "wall_length_m", "closure_ratio", "double_fence",
                 "watchtower_count", "building_count", "building_area_m2", "resolution_m",
                 "building_rows", "buildings_in_rows_share", "building_size_cv",
                 "building_orientation_spread_deg"}


def _iou(a, b) -> float:
    return a.intersection(b).area / a.union(b).area


@cache
def _walled(kind: str, res_m: float, **layout):
    """Evidence of detect_sites on a new walled compound (cached), and the truth."""
    before, after, truth = make_walled_compound(background(kind, res_m), res_m=res_m, **layout)
    timings: dict[str, float] = {}
    found = detect_pair(before, after, transform=truth.transform, timings=timings)
    return found, truth, timings


@pytest.mark.parametrize("kind", ["real", "synthetic"])
def test_detect_sites_walled_compound_with_walls_and_towers(kind):
    """At 1 m a towered compound is one grade-3 compound on its wall, with its walls and
    towers as features of their own pointing at it (site_id)."""
    found, truth, _ = _walled(kind, 1.0)
    compounds = [e for e in found if e.kind == "compound"]
    assert len(compounds) == 1
    c = compounds[0]
    assert _iou(c.geometry, truth.wall_polygon) >= 0.9
    assert COMPOUND_KEYS <= set(c.measurements) and c.site_id == c.id
    m = c.measurements
    assert m["grade"] == 3 and m["resolution_m"] == 1.0
    assert m["wall_length_m"] == pytest.approx(truth.wall_length_m, rel=0.10)
    assert m["watchtower_count"] == len(truth.towers) == 4
    assert "4 watchtowers" in m["grade_reasons"]
    towers = [e for e in found if e.kind == "watchtower"]
    walls = [e for e in found if e.kind == "wall"]
    assert len(towers) == 4 and all(t.site_id == c.id for t in towers)
    assert walls and all(w.site_id == c.id and w.geometry.geom_type == "LineString"
                         for w in walls)
    perimeter = sum(w.measurements["length_m"] for w in walls
                    if w.measurements["role"] == "perimeter")
    assert perimeter == pytest.approx(truth.wall_length_m, rel=0.15)
    assert all(0 <= w.measurements["orientation_deg"] < 180 for w in walls)
    inside = [e for e in found if e.kind == "new_building" and e.site_id == c.id]
    assert m["building_count"] == len(inside)
    assert m["building_area_m2"] == pytest.approx(sum(b.area_m2 for b in inside))


@pytest.mark.parametrize("kind", ["real", "synthetic"])
@pytest.mark.parametrize("res_m", [0.5, 1.0, 2.0])
def test_detect_sites_walled_compound_without_buildings_found_by_its_walls(kind, res_m):
    """A walled compound with no building (little texture gain) is found from its walls."""
    found, truth, _ = _walled(kind, res_m, buildings=None)
    compounds = [e for e in found if e.kind == "compound"]
    assert len(compounds) == 1
    c = compounds[0]
    assert c.measurements["outline_source"] == "walls"
    assert _iou(c.geometry, truth.wall_polygon) >= 0.9
    assert c.measurements["grade"] >= 1
    assert abs(c.measurements["closure_ratio"] - truth.closure_ratio) <= 0.1


def test_detect_sites_at_2m_towers_not_shown():
    """At 2 m towers are not searched: the count is null, not 0, and the caveat says why."""
    found, _, timings = _walled("synthetic", 2.0)
    c = next(e for e in found if e.kind == "compound")
    assert c.measurements["watchtower_count"] is None
    assert "towers were not searched" in c.measurements["grade_caveats"]
    assert not [e for e in found if e.kind == "watchtower"]
    assert {"objects", "compounds", "walls", "grade"} <= set(timings)
    assert all(v >= 0 for v in timings.values())


@pytest.mark.parametrize("case", sorted(LOOK_ALIKES))
@pytest.mark.parametrize("kind,res_m", [("real", 0.5), ("real", 1.0), ("synthetic", 1.0),
                                        ("synthetic", 2.0)])
def test_detect_sites_look_alikes_are_not_compounds(case, kind, res_m):
    """Roads, field boundaries, bare new roofs and an old compound with new roofs (sun moved)
    give no compound, wall or watchtower; their changes stay buildings or change of no site."""
    before, after, truth = LOOK_ALIKES[case](background(kind, res_m), res_m=res_m, seed=1)
    found = detect_pair(before, after, transform=truth.transform)
    assert [e.kind for e in found if e.kind in ("compound", "wall", "watchtower")] == []
    assert all(e.site_id is None for e in found)


def test_detect_sites_existing_compound_over_seasonal_ground_is_not_new():
    """An old compound whose roofs changed, over real ground that changed with the season,
    is not a new compound: only its changes are reported."""
    before, after, truth = make_existing_compound(real_pair(1.0), res_m=1.0)
    found = detect_pair(before, after, transform=truth.transform)
    assert not [e for e in found if e.kind in ("compound", "wall", "watchtower")]
    assert [e for e in found if e.kind in ("new_building", "change")]


def test_detect_sites_new_compound_over_seasonal_ground_is_found():
    """The same ground with a new towered compound instead gives the compound."""
    before, after, truth = make_walled_compound(real_pair(1.0), res_m=1.0,
                                                double_fence_gap_m=6.0, internal_fences=2)
    found = detect_pair(before, after, transform=truth.transform)
    compounds = [e for e in found if e.kind == "compound"]
    assert len(compounds) == 1 and compounds[0].measurements["grade"] >= 2
    assert _iou(compounds[0].geometry, truth.wall_polygon) >= 0.9


def test_detect_sites_coarse_compound_carries_null_wall_measures():
    """At 10 m a compound has every issue key; walls, fences and towers are null, with the
    resolution caveat, and there is no wall or tower feature."""
    transform = Affine(10.0, 0, 500000.0, 0, -10.0, 4800000.0)
    before = _scene()
    after = _with_compound(before)
    mask, mag = _mask_from(before, after)
    timings: dict[str, float] = {}
    found = detect_sites(before, after, mask, mag, transform=transform, crs="EPSG:32633",
                         threshold=30.0, params=DetectParams(), before_ref=REF, after_ref=REF,
                         timings=timings)
    compounds = [e for e in found if e.kind == "compound"]
    assert len(compounds) == 1
    m = compounds[0].measurements
    assert COMPOUND_KEYS <= set(m) and m["resolution_m"] == 10.0
    assert m["grade"] in (0, 1)
    assert all(m[k] is None for k in ("wall_length_m", "closure_ratio", "double_fence",
                                      "watchtower_count"))
    assert "walls, fences and watchtowers cannot be seen" in m["grade_caveats"]
    assert not [e for e in found if e.kind in ("wall", "watchtower")]
    assert "walls" not in timings and {"objects", "compounds", "grade"} <= set(timings)


@pytest.mark.parametrize("res_m", [0.5, 2.0])
def test_detect_sites_nothing_when_after_equals_before_fine(res_m):
    """A towered compound standing at both dates (after = before) flags nothing."""
    before, _, truth = make_walled_compound(background("synthetic", res_m), res_m=res_m)
    assert detect_pair(before, before.copy(), transform=truth.transform) == []


def test_detect_sites_fine_score_counts_the_wall():
    """At 1 m a compound's score is the mean of its construction score and its wall closure."""
    found, _, _ = _walled("synthetic", 1.0, buildings=None)
    c = next(e for e in found if e.kind == "compound")
    m = c.measurements
    assert m["score_walls"] == pytest.approx(m["closure_ratio"])
    assert c.score == pytest.approx((m["score_construction"] + m["score_walls"]) / 2, abs=1e-4)
    assert c.score >= DetectParams().objects.min_score


@pytest.mark.parametrize("tile", LEVIR_TILES)
def test_detect_sites_real_new_housing_is_not_a_compound(tile):
    """Real new housing estates at 0.5 m (LEVIR-CD tiles, no wall around them) give new
    buildings and change, and no compound, wall or watchtower."""
    before, after = levir_tile(tile)
    found = detect_pair(before, after, transform=Affine(0.5, 0, 500000.0, 0, -0.5, 4800000.0))
    assert [e for e in found if e.kind in ("new_building", "change")]
    assert not [e for e in found if e.kind in ("compound", "wall", "watchtower")]


@pytest.mark.parametrize("res_m", [0.5, 1.0])
def test_detect_sites_walled_compound_amid_real_construction(res_m):
    """A walled compound drawn over a real tile pair with new housing is found on its wall."""
    a, b = (x[:, :480, :480] for x in levir_tile("test_4"))
    if res_m != 0.5:
        a, b = (resample_background(x, from_res_m=0.5, to_res_m=res_m) for x in (a, b))
    before, after, truth = make_walled_compound((a, b), res_m=res_m, buildings=None)
    compounds = [e for e in detect_pair(before, after, transform=truth.transform)
                 if e.kind == "compound"]
    assert len(compounds) == 1
    assert _iou(compounds[0].geometry, truth.wall_polygon) >= 0.9
    assert compounds[0].measurements["grade"] >= 1


def _candidate_on_whole_grid(px, angle, gain, *, threshold, transform, factor, cell_m):
    """The compound measures as first written: both masks and the means on the whole grid."""
    import shapely
    from rasterio import features

    from pipeline.detect.compounds import CompoundCandidate

    xs = transform.a * px[:, 1] + transform.b * px[:, 0] + transform.c
    ys = transform.d * px[:, 1] + transform.e * px[:, 0] + transform.f
    polygon = shapely.Polygon(np.column_stack([xs, ys]))
    cells = transform @ Affine.scale(factor)
    inside = features.rasterize([polygon], out_shape=gain.shape, transform=cells) > 0
    grown = polygon.buffer(2.5 * cell_m, join_style="mitre")
    ring = (features.rasterize([grown], out_shape=gain.shape, transform=cells) > 0) & ~inside
    g = np.where(np.isfinite(gain), gain, np.nan)
    sides = sorted(float(np.hypot(xs[i + 1] - xs[i], ys[i + 1] - ys[i])) for i in range(2))
    return CompoundCandidate(
        polygon=polygon, orientation_deg=angle, length_m=sides[1], width_m=sides[0],
        evidence_fill=float(np.mean(g[inside] > threshold)) if inside.any() else 0.0,
        gain_inside=float(np.nanmean(g[inside])) if inside.any() else 0.0,
        gain_outside=float(np.nanmean(g[ring])) if ring.any() else 0.0,
        gain_threshold=threshold, cell_m=cell_m)


@pytest.mark.parametrize("res_m, factor", [(0.5, 20), (0.3, 33), (10.0, 1)])
def test_candidate_measures_equal_the_whole_grid_ones(res_m, factor):
    """A candidate's fill and texture gains, taken on the cells around its outline, equal
    those taken on the whole cell grid: rotated and axis-aligned outlines, sides on cell
    centres, outlines across the grid's edge, NaN cells."""
    from pipeline.detect.compounds import corner_candidate

    rng = np.random.default_rng(7)
    gain = rng.normal(0.2, 0.3, (120, 150)).astype(np.float32)
    gain[rng.random(gain.shape) < 0.05] = np.nan
    transform = Affine(res_m, 0, 602385.5, 0, -res_m, 4805934.5)
    cell_m = factor * res_m
    n_px = np.array(gain.shape) * factor
    filled = 0
    for k in range(40):
        centre = rng.uniform(-0.1, 1.1, 2) * n_px
        half = rng.uniform(2, 25, 2) * factor
        angle = 0.0 if k % 3 == 0 else rng.uniform(0, 180)
        corners = np.array([[-1, -1], [-1, 1], [1, 1], [1, -1]]) * half
        if k % 3 == 0:  # sides through cell centres
            centre = (np.round(centre / factor) + 0.5) * factor
            corners = np.round(corners / factor) * factor
        a = np.radians(angle)
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        px = centre + corners @ rot.T
        kwargs = dict(threshold=0.25, transform=transform, factor=factor, cell_m=cell_m)
        got = corner_candidate(px, angle, gain, **kwargs)
        want = _candidate_on_whole_grid(px, angle, gain, **kwargs)
        assert got.polygon.equals_exact(want.polygon, 0.0)
        measures = [(c.evidence_fill, c.gain_inside, c.gain_outside) for c in (got, want)]
        assert_array_equal(*measures)  # to the bit (NaN where a ring has no valid cell)
        filled += want.evidence_fill > 0
    assert filled >= 10


def test_claimed_buildings_are_those_every_building_was_tested_for():
    """The centroid index finds, for any outline, the buildings whose centroid it contains
    (as testing each building did), in the buildings' order, never a claimed one: convex and
    concave outlines, outlines with holes, centroids on an outline's edge, empty lists."""
    from types import SimpleNamespace

    import shapely

    from pipeline.detect.sites import _Centroids, _claim

    rng = np.random.default_rng(9)
    buildings = []
    for label in range(1, 400):
        x, y = rng.uniform(0, 1000, 2)
        w, h = rng.uniform(4, 40, 2)
        buildings.append(SimpleNamespace(label=label, polygon=shapely.box(x, y, x + w, y + h)))
    # centroids exactly on an outline's edge (contains leaves the boundary out)
    buildings.append(SimpleNamespace(label=400, polygon=shapely.box(90, 90, 110, 110)))
    centroids = _Centroids(buildings)  # type: ignore[arg-type]
    outlines = [shapely.box(100, 0, 300, 300), shapely.box(0, 0, 1000, 1000),
                shapely.Polygon([(0, 0), (600, 0), (600, 600), (300, 200), (0, 600)]),
                shapely.box(0, 0, 800, 800).difference(shapely.box(200, 200, 600, 600)),
                shapely.box(2000, 2000, 2100, 2100)]
    for _ in range(30):
        x, y = rng.uniform(-100, 900, 2)
        outlines.append(shapely.affinity.rotate(shapely.box(x, y, x + rng.uniform(50, 400),
                                                            y + rng.uniform(50, 400)),
                                                float(rng.uniform(0, 90))))
    found = 0
    for outline in outlines:
        claimed = {int(v) for v in rng.integers(1, 401, 50)}
        cand = SimpleNamespace(polygon=outline)
        expected = [b for b in buildings
                    if b.label not in claimed and outline.contains(b.polygon.centroid)]
        got = _claim(cand, centroids, claimed)  # type: ignore[arg-type]
        assert [b.label for b in got] == [b.label for b in expected]
        found += len(got)
    assert found > 300
    assert all(b.label != 400 for b in _claim(SimpleNamespace(polygon=outlines[0]),  # type: ignore[arg-type]
                                              centroids, set()))
    assert _Centroids([]).inside(outlines[1]) == []
