"""Tests for pipeline.aoi: AOI forms, their errors, site files, UTM zones and grid plans."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import geopandas
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from shapely.geometry import Point, box

from pipeline.aoi import Aoi, _utm_code, aoi_polygon_in, load_sites, parse_aoi, plan_grid, utm_crs
from pipeline.errors import AoiError, ConfigError, GridError

SAFE_ID = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
DABANCHENG = "88.28994,43.38385"


def _write_geojson(path: Path, features: list[dict]) -> Path:
    """Write a FeatureCollection of (geometry, properties) dicts."""
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def _feature(geometry: dict | None, **props: object) -> dict:
    return {"type": "Feature", "properties": props, "geometry": geometry}


def _square(lon: float, lat: float, d: float = 0.01) -> dict:
    ring = [[lon, lat], [lon + d, lat], [lon + d, lat + d], [lon, lat + d], [lon, lat]]
    return {"type": "Polygon", "coordinates": [ring]}


@pytest.fixture
def sites(tmp_path: Path) -> dict[str, Aoi]:
    path = _write_geojson(
        tmp_path / "sites.geojson",
        [
            _feature({"type": "Point", "coordinates": [88.28994, 43.38385]}, name="dabancheng",
                     radius_m=2000),
            _feature(_square(87.5, 43.7), name="Ürümqi Box"),
        ],
    )
    return load_sites(path)


# --- forms ----------------------------------------------------------------------------------


def test_parse_aoi_point_is_metric_circle():
    """A lon,lat point becomes a 64-segment circle of radius_m metres in its UTM zone."""
    aoi = parse_aoi(DABANCHENG, radius_m=2000)
    projected = aoi_polygon_in(aoi, "EPSG:32645")
    assert aoi.id == "pt-43.38385n-88.28994e-r2000"
    assert aoi.label == DABANCHENG
    assert len(aoi.geometry.exterior.coords) == 65
    assert projected.area == pytest.approx(math.pi * 2000**2, rel=0.01)
    assert aoi.geometry.centroid.distance(Point(88.28994, 43.38385)) < 1e-4


def test_parse_aoi_point_allows_whitespace():
    """Whitespace around the numbers is ignored."""
    assert parse_aoi("  88.28994 ,  43.38385 ").geometry.equals(parse_aoi(DABANCHENG).geometry)


def test_parse_aoi_bbox_gives_box():
    """minlon,minlat,maxlon,maxlat gives that box in lon/lat with a bbox- id."""
    aoi = parse_aoi("88.25, 43.37, 88.32, 43.40")
    assert aoi.geometry.bounds == pytest.approx((88.25, 43.37, 88.32, 43.40))
    assert aoi.id == "bbox-43.37n-88.25e-43.4n-88.32e"


def test_parse_aoi_southwest_point_id_uses_s_and_w():
    """Negative coordinates are written with s/w in the id, never a minus sign."""
    aoi = parse_aoi("-70.5,-33.25", radius_m=500)
    assert aoi.id == "pt-33.25s-70.5w-r500"


def test_parse_aoi_geojson_unions_polygons(tmp_path: Path):
    """All polygon features of a GeoJSON file are unioned; the id is the file stem."""
    path = _write_geojson(
        tmp_path / "Two Parts.geojson",
        [_feature(_square(88.0, 43.0)), _feature(_square(88.1, 43.0))],
    )
    aoi = parse_aoi(str(path))
    assert aoi.geometry.geom_type == "MultiPolygon"
    assert aoi.geometry.area == pytest.approx(2e-4)
    assert aoi.id == "two-parts"


def test_parse_aoi_geopackage_reprojected_to_lonlat(tmp_path: Path):
    """A GeoPackage in UTM is reprojected to lon/lat."""
    path = tmp_path / "utm.gpkg"
    frame = geopandas.GeoDataFrame(geometry=[box(603000, 4803000, 604000, 4804000)],
                                   crs="EPSG:32645")
    frame.to_file(path, driver="GPKG")
    aoi = parse_aoi(str(path))
    minx, miny, maxx, maxy = aoi.geometry.bounds
    assert 88.2 < minx < maxx < 88.4 and 43.3 < miny < maxy < 43.5


def test_parse_aoi_file_of_points_rejected(tmp_path: Path):
    """A file whose features are points is an AoiError naming the geometry type."""
    path = _write_geojson(tmp_path / "pts.geojson",
                          [_feature({"type": "Point", "coordinates": [88.0, 43.0]})])
    with pytest.raises(AoiError, match="feature 0 .* is a Point; only polygons"):
        parse_aoi(str(path))


def test_parse_aoi_self_intersecting_polygon_made_valid(tmp_path: Path):
    """A bow-tie polygon is repaired with make_valid, not rejected."""
    bowtie = {"type": "Polygon",
              "coordinates": [[[88, 43], [88.1, 43.1], [88.1, 43], [88, 43.1], [88, 43]]]}
    aoi = parse_aoi(str(_write_geojson(tmp_path / "bowtie.geojson", [_feature(bowtie)])))
    assert aoi.geometry.is_valid and aoi.geometry.area > 0


def test_parse_aoi_site_name_case_insensitive(sites: dict[str, Aoi]):
    """A site name matches regardless of case and returns the site's Aoi."""
    assert parse_aoi("DabanCheng", sites=sites) is sites["dabancheng"]


def test_parse_aoi_file_not_a_vector_file(tmp_path: Path):
    """A text file given as the AOI is an AoiError saying GDAL cannot read it."""
    path = tmp_path / "notes.geojson"
    path.write_text("not json at all")
    with pytest.raises(AoiError, match="not a vector file GDAL can read"):
        parse_aoi(str(path))


# --- errors ---------------------------------------------------------------------------------


def test_parse_aoi_latitude_out_of_range_lists_forms():
    """Latitude 200 is rejected with the offending value and the accepted forms."""
    with pytest.raises(AoiError) as info:
        parse_aoi("91,200")
    message = str(info.value)
    assert "AOI '91,200' is not valid: latitude 200 is outside -90..90" in message
    assert "'minlon,minlat,maxlon,maxlat'" in message and "GeoJSON/GeoPackage" in message


def test_parse_aoi_swapped_lat_lon_gets_hint():
    """Typing lat,lon (Dabancheng) is caught and the swapped order suggested."""
    with pytest.raises(AoiError, match=r"did you mean '88\.28994,43\.38385'"):
        parse_aoi("43.38385,88.28994")


def test_parse_aoi_latitude_over_90_gets_swap_hint():
    """A 'latitude' above 90 that would be a valid longitude gets the lon,lat hint."""
    with pytest.raises(AoiError, match=r"outside -90..90 \(the order is lon,lat"):
        parse_aoi("43.38385,120.5")


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("181,0", "longitude 181 is outside -180..180"),
        ("nan,1", "'nan' is not a finite number"),
        ("inf,1", "'inf' is not a finite number"),
        ("1,2,3", "expected 2 or 4 comma-separated numbers, got 3"),
        ("a,b", "'a' is not a number"),
        ("88.3,43.4,88.2,43.5", "minlon 88.3 must be < maxlon 88.2"),
        ("88.2,43.4,88.3,43.4", "minlat 43.4 < maxlat 43.4"),
        ("", "it is empty"),
        ("nope/aoi.geojson", "does not exist"),
        ("179.9999,10", "crosses the antimeridian"),
        ("10,-85", "outside -80..84"),
    ],
)
def test_parse_aoi_invalid_text_raises_aoierror(text: str, phrase: str):
    """Each malformed or out-of-range AOI raises AoiError with a specific phrase."""
    with pytest.raises(AoiError, match=re.escape(phrase)):
        parse_aoi(text, radius_m=2000)


@pytest.mark.parametrize("radius", [0.0, -5.0, 100_001.0, math.nan, math.inf])
def test_parse_aoi_bad_radius_raises(radius: float):
    """A radius that is not in (0, 100 km] is rejected."""
    with pytest.raises(AoiError, match="radius"):
        parse_aoi(DABANCHENG, radius_m=radius)


def test_parse_aoi_unknown_site_suggests_close_match(sites: dict[str, Aoi]):
    """An unknown site name lists the known names and suggests the closest one."""
    with pytest.raises(AoiError) as info:
        parse_aoi("dabancheg", sites=sites)
    assert "did you mean 'dabancheng'?" in str(info.value)
    assert "known: dabancheng, Ürümqi Box" in str(info.value)


@pytest.mark.parametrize("name", ["My Site; rm -rf ~.geojson", "..geojson", "$(x)`y`.geojson"])
def test_aoi_id_file_stem_is_safe_folder_name(tmp_path: Path, name: str):
    """Ids made from hostile file names hold only safe characters and no '..'."""
    path = _write_geojson(tmp_path / name, [_feature(_square(88.0, 43.0))])
    aoi = parse_aoi(str(path))
    assert SAFE_ID.match(aoi.id) and ".." not in aoi.id


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.text(),
    st.lists(st.one_of(st.floats(), st.integers(-1000, 1000), st.text(max_size=3)), max_size=5)
    .map(lambda xs: ",".join(str(x) for x in xs)),
))
def test_parse_aoi_arbitrary_text_raises_only_aoierror(text: str):
    """Any text either parses into a safe, valid Aoi or raises AoiError, never anything else."""
    known = {"dabancheng": parse_aoi(DABANCHENG)}
    try:
        aoi = parse_aoi(text, sites=known)
    except AoiError:
        return
    assert SAFE_ID.match(aoi.id) and ".." not in aoi.id
    assert aoi.geometry.is_valid and not aoi.geometry.is_empty


# --- site files -----------------------------------------------------------------------------


def test_load_sites_points_and_polygons(sites: dict[str, Aoi]):
    """Point sites become circles of radius_m; polygon sites keep their shape; ids are safe."""
    assert list(sites) == ["dabancheng", "Ürümqi Box"]
    assert sites["Ürümqi Box"].id == "urumqi-box"
    circle = aoi_polygon_in(sites["dabancheng"], "EPSG:32645")
    assert circle.area == pytest.approx(math.pi * 2000**2, rel=0.01)


def test_load_sites_missing_file_raises_configerror(tmp_path: Path):
    """A missing site file is a ConfigError naming the path."""
    path = tmp_path / "nope.geojson"
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_sites(path)


def test_load_sites_folder_or_pipe_is_not_a_regular_file(tmp_path: Path):
    """A folder or a named pipe as the site file is named as such, not as missing."""
    pipe = tmp_path / "sites.geojson"
    os.mkfifo(pipe)
    for path in (tmp_path, pipe):
        with pytest.raises(ConfigError, match="is not a regular file"):
            load_sites(path)


@pytest.mark.parametrize(
    ("feature", "phrase"),
    [
        (_feature(_square(1, 1)), "feature 1 has no 'name'"),
        (_feature({"type": "Point", "coordinates": [1, 1]}, name="pt"),
         "feature 1 ('pt'): it is a point without a 'radius_m'"),
        (_feature({"type": "Point", "coordinates": [1, 1]}, name="neg", radius_m=-3),
         "feature 1 ('neg'): radius -3"),
        (_feature({"type": "LineString", "coordinates": [[1, 1], [2, 2]]}, name="road"),
         "feature 1 ('road'): it is a LineString"),
        (_feature(_square(1, 1), name="ok"), "feature 1 ('ok') repeats a name"),
        (_feature(None, name="empty"), "feature 1 ('empty'): it has no geometry"),
    ],
)
def test_load_sites_bad_feature_named(tmp_path: Path, feature: dict, phrase: str):
    """A bad feature raises AoiError naming its index and name."""
    path = _write_geojson(tmp_path / "s.geojson", [_feature(_square(0, 0), name="ok"), feature])
    with pytest.raises(AoiError, match=re.escape(phrase)):
        load_sites(path)


def test_load_sites_geopackage(tmp_path: Path):
    """Sites load from a GeoPackage too."""
    path = tmp_path / "sites.gpkg"
    frame = geopandas.GeoDataFrame({"name": ["a"], "radius_m": [500.0]},
                                   geometry=[Point(88.0, 43.0)], crs="EPSG:4326")
    frame.to_file(path, driver="GPKG")
    assert load_sites(path)["a"].id == "a"


def test_load_sites_not_vector_raises_configerror(tmp_path: Path):
    """A site file GDAL cannot read is a ConfigError."""
    path = tmp_path / "sites.geojson"
    path.write_text("{broken")
    with pytest.raises(ConfigError, match="not a vector file"):
        load_sites(path)


# --- UTM and grid ---------------------------------------------------------------------------


def test_utm_crs_northern_hemisphere():
    """Dabancheng (88.3 E, 43.4 N) is in UTM zone 45 north."""
    assert utm_crs(parse_aoi(DABANCHENG)) == "EPSG:32645"


def test_utm_crs_southern_hemisphere():
    """Sydney (151.2 E, 33.9 S) is in UTM zone 56 south."""
    assert utm_crs(parse_aoi("151.2,-33.9")) == "EPSG:32756"


def test_utm_code_longitude_180_is_zone_60():
    """Longitude 180 falls in zone 60, and -180 in zone 1."""
    assert _utm_code(180.0, 10.0) == "EPSG:32660"
    assert _utm_code(-180.0, -10.0) == "EPSG:32701"


def test_utm_crs_norway_and_svalbard_exceptions():
    """Western Norway uses zone 32V; Svalbard uses 33X."""
    assert utm_crs(parse_aoi("5.3,60.4")) == "EPSG:32632"
    assert utm_crs(parse_aoi("15.6,78.2")) == "EPSG:32633"


def test_utm_crs_polar_aoi_raises():
    """An Aoi centred beyond 84 N has no UTM zone."""
    with pytest.raises(AoiError, match="outside the UTM range"):
        utm_crs(Aoi(id="north", geometry=box(10, 85, 11, 86), label="north"))


def test_plan_grid_snapped_and_covers_aoi():
    """The plan is in the UTM zone, snapped to res_m and covers the AOI."""
    aoi = parse_aoi(DABANCHENG, radius_m=2000)
    plan = plan_grid(aoi, 3.5)
    assert plan.crs == "EPSG:32645" and plan.res_m == 3.5
    for value in plan.bounds:
        assert value / 3.5 == pytest.approx(round(value / 3.5), abs=1e-9)
    assert box(*plan.bounds).contains(aoi_polygon_in(aoi, plan.crs))
    assert plan.width == plan.height == 1162


def test_plan_grid_explicit_crs_normalised():
    """An explicit metric CRS is accepted and written as an authority code."""
    plan = plan_grid(parse_aoi(DABANCHENG), 10, crs="epsg:32644")
    assert plan.crs == "EPSG:32644"


@pytest.mark.parametrize(("res", "crs", "phrase"), [
    (0.0, None, "positive number"),
    (math.nan, None, "positive number"),
    (10.0, "EPSG:4326", "projected in metres"),
    (10.0, "EPSG:999999", "not a known CRS"),
])
def test_plan_grid_bad_input_raises_griderror(res: float, crs: str | None, phrase: str):
    """Bad resolutions and non-metric or unknown CRSs raise GridError."""
    with pytest.raises(GridError, match=phrase):
        plan_grid(parse_aoi(DABANCHENG), res, crs=crs)


def test_aoi_polygon_in_lonlat_is_identity():
    """Asking for EPSG:4326 returns the lon/lat geometry itself."""
    aoi = parse_aoi(DABANCHENG)
    assert aoi_polygon_in(aoi, "EPSG:4326") is aoi.geometry


def test_parse_aoi_rejects_polygon_with_no_area(tmp_path: Path):
    """A degenerate polygon (all points on a line) is rejected after make_valid."""
    flat = {"type": "Polygon", "coordinates": [[[88, 43], [88.1, 43], [88.2, 43], [88, 43]]]}
    path = _write_geojson(tmp_path / "flat.geojson", [_feature(flat)])
    with pytest.raises(AoiError, match="no polygon area"):
        parse_aoi(str(path))
