"""Tests for pipeline.detect.walls, enclosure and outlines: synthetic compounds on real ground."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
import shapely
from _scenes import LOOK_ALIKES, background
from affine import Affine

from pipeline.detect.enclosure import measure_enclosure
from pipeline.detect.outlines import outline_from_segments, propose_outlines
from pipeline.detect.wall_noise import noise_sigma
from pipeline.detect.walls import find_wall_segments, merge_collinear, new_line_map
from pipeline.testing import make_field_boundaries, make_road_grid, make_walled_compound


def measure(before, after, truth, seed_outline, res_m):
    """Segments, the snapped outline and its enclosure measures, as the pipeline runs them."""
    lm = new_line_map(before, after, transform=truth.transform, res_m=res_m)
    segs = find_wall_segments(before, after, transform=truth.transform, res_m=res_m,
                              line_map=lm)
    outline, _ = outline_from_segments(segs, seed=seed_outline, res_m=lm.res_m)
    enc = measure_enclosure(outline, segs, lm)
    return segs, outline, enc


def loose_seed(truth) -> shapely.Polygon:
    """The wall ring grown by 5 m and stretched: a compound search's rough rectangle."""
    grown = truth.wall_polygon.buffer(5.0, join_style="mitre")
    return shapely.affinity.scale(grown, 1.03, 0.97)


def ndi_smooth(x: np.ndarray) -> np.ndarray:
    """Ground texture: ``x`` smoothed with a 3-pixel Gaussian."""
    from scipy import ndimage

    return ndimage.gaussian_filter(x, 3.0)


@cache
def compound_pair(kind: str, res_m: float, **layout):
    """A new walled compound's pair and truth (cached)."""
    return make_walled_compound(background(kind, res_m), res_m=res_m, **layout)


@cache
def compound(kind: str, res_m: float, **layout):
    """A new walled compound (cached: several tests read one scene) and its measures."""
    before, after, truth = compound_pair(kind, res_m, **layout)
    segs, outline, enc = measure(before, after, truth, loose_seed(truth), res_m)
    return truth, segs, outline, enc


FENCED = {"internal_fences": 2, "double_fence_gap_m": 6.0}
ROWS = {"buildings": (3, 4), "sun_azimuth_deg": 210.0, "sun_elevation_deg": 45.0, "seed": 1}


@pytest.mark.parametrize("kind", ["real", "synthetic"])
@pytest.mark.parametrize("res_m", [0.5, 1.0, 2.0])
def test_wall_length_within_10_percent_of_truth(kind, res_m):
    """A closed new wall is measured within 10 % of its length and closure within 0.1."""
    truth, _, outline, enc = compound(kind, res_m)
    assert enc.wall_length_m == pytest.approx(truth.wall_length_m, rel=0.10)
    assert abs(enc.closure_ratio - truth.closure_ratio) <= 0.1
    assert outline.hausdorff_distance(truth.wall_polygon) <= max(3.0, 3 * res_m)


@pytest.mark.parametrize("res_m", [0.5, 1.0, 2.0])
def test_closure_ratio_with_gap_within_0_1(res_m):
    """A wall with a 60 m gap has its closure ratio measured within 0.1 (low sun, SW)."""
    truth, _, _, enc = compound("real", res_m, wall_gap_m=60.0, sun_azimuth_deg=210.0,
                                sun_elevation_deg=45.0, seed=1)
    assert truth.closure_ratio == pytest.approx(500 / 560)
    assert abs(enc.closure_ratio - truth.closure_ratio) <= 0.1
    assert enc.longest_gap_m == pytest.approx(60.0, abs=12.0)


@pytest.mark.parametrize("kind", ["real", "synthetic"])
@pytest.mark.parametrize("res_m", [0.5, 1.0])
def test_double_fence_detected_when_present(kind, res_m):
    """A fence ring 6 m inside the wall is reported as a double fence about 6 m in."""
    _, _, _, enc = compound(kind, res_m, **FENCED)
    assert enc.double_fence
    assert enc.double_fence_share >= 0.5
    assert enc.double_fence_gap_m == pytest.approx(6.0, abs=2.0)


@pytest.mark.parametrize("kind", ["real", "synthetic"])
@pytest.mark.parametrize("res_m", [0.5, 1.0])
def test_double_fence_absent_for_single_wall(kind, res_m):
    """A single wall with rows of buildings inside (low sun) is not a double fence."""
    _, _, _, enc = compound(kind, res_m, **ROWS)
    assert not enc.double_fence
    assert enc.double_fence_share < 0.2


@pytest.mark.parametrize("kind", ["real", "synthetic"])
@pytest.mark.parametrize("res_m", [0.5, 1.0])
def test_internal_fences_counted(kind, res_m):
    """Two fences across the compound are counted as two; rows of buildings are not fences."""
    truth, _, _, enc = compound(kind, res_m, **FENCED)
    assert enc.internal_fence_count == len(truth.internal_fences) == 2
    truth, _, _, enc = compound(kind, res_m, **ROWS)
    assert enc.internal_fence_count == len(truth.internal_fences) == 0


@pytest.mark.parametrize("res_m", [0.5, 1.0])
def test_rotated_compound_outline_and_closure(res_m):
    """A compound turned 20 degrees, noisier, sun in the ESE, is traced within 3 m, closed."""
    truth, _, outline, enc = compound("real", res_m, angle_deg=20.0, noise=5.0,
                                      double_fence_gap_m=8.0, sun_azimuth_deg=120.0)
    assert outline.hausdorff_distance(truth.wall_polygon) <= 3.0
    assert enc.closure_ratio >= 0.9
    assert enc.sides_backed == 4


@pytest.mark.parametrize("res_m", [0.5, 1.0])
def test_propose_outlines_finds_compound_without_seed(res_m):
    """New wall segments alone give one outline, the wall ring, not the inner fence ring."""
    truth, segs, _, _ = compound("real", res_m, **FENCED)
    found = propose_outlines(segs, res_m=res_m)
    assert len(found) == 1
    outline, closure = found[0]
    assert outline.hausdorff_distance(truth.wall_polygon) <= 4.0
    assert closure >= 0.9




@pytest.mark.parametrize("case", sorted(LOOK_ALIKES))
@pytest.mark.parametrize("res_m", [0.5, 1.0, 2.0])
def test_look_alikes_are_not_walled_enclosures(case, res_m):
    """Roads, field tracks, bare roofs and an old compound with new roofs give no enclosure."""
    before, after, truth = LOOK_ALIKES[case](background("real", res_m), res_m=res_m, seed=1)
    outline = truth.extra["outline"]
    segs, _, enc = measure(before, after, truth, outline, res_m)
    assert enc.closure_ratio < 0.45
    assert propose_outlines(segs, res_m=res_m) == []


@pytest.mark.parametrize("seed", [2, 3])
def test_field_tracks_changing_with_the_crops_are_not_new_walls(seed):
    """Field tracks whose contrast changes with the crops yield no wall segment at 1 m."""
    before, after, truth = make_field_boundaries(background("synthetic", 1.0), res_m=1.0,
                                                 seed=seed)
    segs = find_wall_segments(before, after, transform=truth.transform, res_m=1.0)
    assert sum(s.length_m for s in segs) < 60.0


def test_merge_collinear_joins_pieces_and_keeps_parallels():
    """Collinear pieces with a 5 m gap merge; a parallel line 6 m away stays apart."""
    segs = np.array([[0, 0, 40, 0.3], [45, 0.2, 90, 0.0], [0, 6, 90, 6]], dtype=float)
    merged = merge_collinear(segs, angle_tol_deg=3.0, offset_m=1.5, gap_m=10.0)
    lengths = sorted(np.hypot(merged[:, 2] - merged[:, 0], merged[:, 3] - merged[:, 1]))
    assert len(merged) == 2
    np.testing.assert_allclose(lengths, [90.0, 90.0], atol=0.1)


def test_find_wall_segments_empty_at_coarse_resolution():
    """At 10 m walls are below a pixel: no segment, an empty line mask."""
    rng = np.random.default_rng(0)
    img = rng.normal(100, 5, (3, 50, 50)).astype(np.float32)
    after = img.copy()
    after[:, 20, 5:45] = 250.0
    transform = Affine(10.0, 0, 500000.0, 0, -10.0, 4800000.0)
    assert find_wall_segments(img, after, transform=transform, res_m=10.0) == []
    assert not new_line_map(img, after, transform=transform, res_m=10.0).mask.any()


@pytest.mark.parametrize("kind", ["real", "synthetic"])
@pytest.mark.parametrize("res_m", [0.5, 1.0, 2.0])
def test_road_grid_is_not_a_wall(kind, res_m):
    """New 7 m roads on a 60 m grid (about 960 m of road) yield under 60 m of wall segments."""
    before, after, truth = make_road_grid(background(kind, res_m), res_m=res_m, seed=1)
    segs = find_wall_segments(before, after, transform=truth.transform, res_m=res_m)
    assert sum(s.length_m for s in segs) < 60.0


def test_new_line_map_in_bands_equals_whole_image(monkeypatch):
    """The line map computed in bands of 37 rows equals the one computed in one band."""
    import pipeline.detect.walls as walls

    before, after, truth = compound_pair("synthetic", 1.0)
    before = before.copy()
    before[:, :25, :] = np.nan  # nodata at an edge
    whole = new_line_map(before, after, transform=truth.transform, res_m=1.0)
    monkeypatch.setattr(walls, "_BAND_ROWS", 37)
    banded = new_line_map(before, after, transform=truth.transform, res_m=1.0)
    for name in ("strength", "mask", "tophat_before", "tophat_after"):
        np.testing.assert_array_equal(getattr(banded, name), getattr(whole, name), name)
    assert banded.threshold == whole.threshold and whole.mask.any()


@pytest.mark.parametrize("max_blocks", [16384, 50])
def test_noise_sigma_recovers_noise_whole_or_sampled(max_blocks):
    """Independent noise of 3 DN per date is measured within 10 %, every block or 50."""
    rng = np.random.default_rng(4)
    ground = ndi_smooth(rng.normal(100, 20, (400, 300)))
    b, a = (ground + rng.normal(0, 3.0, ground.shape) for _ in range(2))
    # The 3 x 3 high-pass keeps (1 + 1/9 - 2/9) of the variance of white noise.
    expected = 3.0 * np.sqrt(8 / 9)
    assert noise_sigma(b.astype(np.float32), a.astype(np.float32),
                       max_blocks=max_blocks) == pytest.approx(expected, rel=0.10)


@pytest.mark.parametrize("shape", [(400, 300), (37, 500), (10, 10), (2000, 40)])
@pytest.mark.parametrize("n_parts", [2, 3, 7, 500])
def test_noise_sigma_in_parts_equals_whole(shape, n_parts):
    """The noise estimate from parts (the chunked search's parallel tasks) equals noise_sigma
    exactly, sampled or not, with NaN holes and with a date of NaN only."""
    from pipeline.detect.wall_noise import noise_parts, sigma_of_spreads

    rng = np.random.default_rng(sum(shape) + n_parts)
    b = rng.normal(100, 20, shape).astype(np.float32)
    a = (b + rng.normal(0, 3.0, shape)).astype(np.float32)
    b[rng.random(shape) < 0.3] = np.nan
    for max_blocks in (16384, 50):
        parts = noise_parts(b, a, max_blocks=max_blocks, n_parts=n_parts)
        assert 1 <= len(parts) <= n_parts
        assert sigma_of_spreads([part() for part in parts]) == noise_sigma(
            b, a, max_blocks=max_blocks)
    empty = np.full(shape, np.nan, np.float32)
    assert sigma_of_spreads([part() for part in noise_parts(empty, a, n_parts=n_parts)]) == 0.0


@pytest.mark.parametrize("n", [1, 2, 255, 256])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nanmedian_rows_equals_numpy(n, dtype):
    """Row medians equal np.nanmedian's exactly (NaN rows, even and odd lengths, ties)."""
    import warnings

    from pipeline.detect.wall_noise import nanmedian_rows

    rng = np.random.default_rng(n)
    x = rng.normal(size=(300, n)).astype(dtype)
    x[::7, ::3] = np.nan
    x[5] = np.round(x[5])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the all-NaN rows of n = 1
        expected = np.nanmedian(x, axis=1)
        got = nanmedian_rows(x)
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)
