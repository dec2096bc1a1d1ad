"""Tests for pipeline.report.geojson and pipeline.report.validate."""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
import subprocess
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pyproj import Geod
from shapely.geometry import LinearRing, MultiPolygon, Polygon, box, shape

from pipeline.errors import OutputError
from pipeline.model import DetectParams, Evidence, SourceRef, params_hash
from pipeline.report.geojson import CORE_PROPERTIES, evidence_to_features, write_geojson
from pipeline.report.validate import validate_geojson

CRS = "EPSG:32645"
X0, Y0 = 604_496.0, 4_803_822.6  # lon 88.29, lat 43.38 in UTM 45N
METHOD = "sitewatch test: phase-correlation coreg, histogram normalization, CVA, Otsu"
BEFORE = SourceRef(
    "wayback", "release-10", acquired=date(2017, 3, 1), release="2017-06-01", sha256="a" * 64
)
AFTER = SourceRef("wayback", "release-42", acquired=None, release="2018-11-07", sha256="b" * 64)


def _clockwise_square(x: float, y: float, size: float) -> Polygon:
    """A square whose exterior runs clockwise (wrong for RFC 7946 on purpose)."""
    return Polygon([(x, y), (x, y + size), (x + size, y + size), (x + size, y), (x, y)])


def _evidence(eid: str, geometry: Any, score: float, measurements: dict | None = None) -> Evidence:
    """Evidence in UTM 45N near Dabancheng."""
    return Evidence(
        id=eid,
        kind="compound",
        geometry=geometry,
        crs=CRS,
        score=score,
        area_m2=geometry.area,
        measurements=measurements or {},
        before=BEFORE,
        after=AFTER,
        params=DetectParams(),
    )


@pytest.fixture
def evidence() -> list[Evidence]:
    """A plain square, a square with a (counter-clockwise) hole, and a small building."""
    outer = _clockwise_square(X0, Y0, 200.0)
    hole = LinearRing(
        [(X0 + 50, Y0 + 50), (X0 + 150, Y0 + 50), (X0 + 150, Y0 + 150), (X0 + 50, Y0 + 150)]
    )
    holed = Polygon(outer.exterior.coords, [hole.coords])
    building = Evidence(
        id="b-001",
        kind="new_building",
        geometry=_clockwise_square(X0 + 10, Y0 + 10, 20.0),
        crs=CRS,
        score=0.51234567,
        area_m2=400.04,
        measurements={"rectangularity": 0.9, "n_pixels": np.int64(4)},
        before=BEFORE,
        after=AFTER,
        params=DetectParams(),
        site_id="c-002",
    )
    return [
        _evidence("c-001", _clockwise_square(X0 + 1000, Y0, 300.0), 0.7, {"fill": 0.33333333}),
        _evidence(
            "c-002", holed, 0.9, {"fill": float("nan"), "ratio": float("inf"), "tiny": 0.000123456}
        ),
        building,
    ]


@pytest.fixture
def fc(evidence: list[Evidence]) -> dict[str, Any]:
    """The FeatureCollection of the fixture evidence."""
    return evidence_to_features(evidence, method=METHOD)


def _positions(geometry: dict[str, Any]) -> list[list[float]]:
    """All positions of a Polygon or MultiPolygon."""
    polys = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
    return [pos for rings in polys for ring in rings for pos in ring]


def test_evidence_to_features_valid_rfc7946(fc: dict[str, Any]) -> None:
    """The output passes the validator with no errors or warnings and has no crs member."""
    ok, errors, warnings = validate_geojson(fc, required_properties=CORE_PROPERTIES)
    assert (ok, errors, warnings) == (True, [], [])
    assert "crs" not in fc
    assert json.loads(json.dumps(fc, allow_nan=False)) == fc


def test_evidence_to_features_lonlat_order(fc: dict[str, Any]) -> None:
    """Positions are [lon, lat] near lon 88.29, lat 43.38."""
    for feature in fc["features"]:
        for lon, lat in _positions(feature["geometry"]):
            assert lon == pytest.approx(88.29, abs=0.02)
            assert lat == pytest.approx(43.38, abs=0.02)
    west, south, east, north = fc["bbox"]
    assert west == pytest.approx(88.29, abs=0.02) and south == pytest.approx(43.38, abs=0.02)
    assert west < east and south < north


def test_evidence_to_features_reorients_rings(fc: dict[str, Any]) -> None:
    """Clockwise input exteriors come out counter-clockwise, holes clockwise, rings closed."""
    holed = next(f for f in fc["features"] if f["id"] == "c-002")["geometry"]
    exterior, hole = holed["coordinates"]
    assert LinearRing(exterior).is_ccw and not LinearRing(hole).is_ccw
    assert exterior[0] == exterior[-1] and hole[0] == hole[-1]
    for feature in fc["features"]:
        assert LinearRing(feature["geometry"]["coordinates"][0]).is_ccw


@pytest.mark.parametrize("precision", [7, 5])
def test_evidence_to_features_rounds_coordinates(evidence: list[Evidence], precision: int) -> None:
    """No coordinate has more decimals than asked for."""
    fc = evidence_to_features(evidence, method=METHOD, precision=precision)
    for feature in fc["features"]:
        for value in (v for pos in _positions(feature["geometry"]) for v in pos):
            assert round(value, precision) == value
    assert validate_geojson(fc, max_decimals=precision)[0]


def test_evidence_to_features_keeps_area(fc: dict[str, Any], evidence: list[Evidence]) -> None:
    """The geodesic area of each reprojected polygon matches the grid area within 0.5 %."""
    geod = Geod(ellps="WGS84")
    by_id = {e.id: e for e in evidence}
    for feature in fc["features"]:
        area = abs(geod.geometry_area_perimeter(shape(feature["geometry"]))[0])
        assert area == pytest.approx(by_id[feature["id"]].geometry.area, rel=5e-3)


def test_evidence_to_features_property_schema(fc: dict[str, Any]) -> None:
    """Every feature carries the core properties with the expected values and types."""
    feature = next(f for f in fc["features"] if f["id"] == "b-001")
    props = feature["properties"]
    assert set(CORE_PROPERTIES) <= set(props)
    assert props["id"] == feature["id"] == "b-001"
    assert props["kind"] == "new_building" and props["site_id"] == "c-002"
    assert props["score"] == 0.5123 and props["area_m2"] == 400.0
    assert props["before_date"] == "2017-03-01" and props["after_date"] is None
    assert props["before_release"] == "2017-06-01" and props["after_release"] == "2018-11-07"
    assert props["before_source"] == "wayback:release-10"
    assert props["after_source"] == "wayback:release-42"
    assert props["before_sha256"] == "a" * 64 and props["after_sha256"] == "b" * 64
    assert props["method"] == METHOD
    assert props["params_hash"] == params_hash(DetectParams())
    assert props["params"] == json.loads(json.dumps(DetectParams().to_dict()))
    assert props["n_pixels"] == 4 and type(props["n_pixels"]) is int


def test_evidence_to_features_measurements_json_safe(fc: dict[str, Any]) -> None:
    """NaN and inf become null; floats are rounded to 4 decimals or 4 significant digits."""
    props = {f["id"]: f["properties"] for f in fc["features"]}
    assert props["c-002"]["fill"] is None and props["c-002"]["ratio"] is None
    assert props["c-002"]["tiny"] == 0.0001235
    assert props["c-001"]["fill"] == 0.3333


def test_evidence_to_features_sorted_by_score_then_id(evidence: list[Evidence]) -> None:
    """Features come out by score descending, ties broken by id, whatever the input order."""
    tie = _evidence("c-000", _clockwise_square(X0 - 1000, Y0, 100.0), 0.7)
    fc = evidence_to_features([*evidence[::-1], tie], method=METHOD)
    assert [f["id"] for f in fc["features"]] == ["c-002", "c-000", "c-001", "b-001"]
    assert fc == evidence_to_features([tie, *evidence], method=METHOD)


def test_evidence_to_features_empty() -> None:
    """No evidence gives a valid, empty FeatureCollection."""
    fc = evidence_to_features([], method=METHOD)
    assert fc == {"type": "FeatureCollection", "features": []}
    assert validate_geojson(fc)[0]


def test_evidence_to_features_rejects_duplicate_ids(evidence: list[Evidence]) -> None:
    """Repeated evidence ids are an error naming each repeated id once, sorted."""
    with pytest.raises(ValueError, match="unique"):
        evidence_to_features([*evidence, evidence[0]], method=METHOD)
    twice = [evidence[-1], *evidence, evidence[0], evidence[0]]
    expected = sorted({evidence[0].id, evidence[-1].id})
    with pytest.raises(ValueError, match=re.escape(f"repeated: {expected}")):
        evidence_to_features(twice, method=METHOD)


@pytest.mark.parametrize(
    ("measurements", "match"),
    [({"score": 1.0}, "clashes"), ({"hist": [1, 2]}, "JSON scalar")],
)
def test_evidence_to_features_rejects_bad_measurements(measurements: dict, match: str) -> None:
    """Measurements may not shadow core properties or be non-scalars."""
    bad = _evidence("x", box(X0, Y0, X0 + 50, Y0 + 50), 0.5, measurements)
    with pytest.raises(ValueError, match=match):
        evidence_to_features([bad], method=METHOD)


def test_evidence_to_features_multipolygon(fc: dict[str, Any]) -> None:
    """Every part of a MultiPolygon is reoriented and the result validates."""
    parts = MultiPolygon([box(X0, Y0, X0 + 10, Y0 + 10), _clockwise_square(X0 + 100, Y0, 10.0)])
    out = evidence_to_features([_evidence("m", parts, 0.5)], method=METHOD)
    geometry = out["features"][0]["geometry"]
    assert geometry["type"] == "MultiPolygon"
    assert all(LinearRing(rings[0]).is_ccw for rings in geometry["coordinates"])
    assert validate_geojson(out) == (True, [], [])


def test_evidence_to_features_repairs_rounding_artifacts() -> None:
    """A 3 mm notch that self-intersects once rounded to 1 cm is snapped to a valid polygon."""
    notch = Polygon(
        [
            (X0, Y0),
            (X0 + 100, Y0),
            (X0 + 100, Y0 + 100),
            (X0 + 50.003, Y0 + 100),
            (X0 + 50.003, Y0 + 10),
            (X0 + 50.0, Y0 + 10),
            (X0 + 50.0, Y0 + 100),
            (X0, Y0 + 100),
        ]
    )
    out = evidence_to_features([_evidence("n", notch, 0.5)], method=METHOD)
    assert validate_geojson(out) == (True, [], [])
    area = abs(
        Geod(ellps="WGS84").geometry_area_perimeter(shape(out["features"][0]["geometry"]))[0]
    )
    assert area == pytest.approx(notch.area, rel=5e-3)


def test_evidence_to_features_rejects_collapsing_geometry() -> None:
    """A polygon smaller than the rounding grid is an error, not a silent drop."""
    tiny = _evidence("t", box(X0, Y0, X0 + 0.001, Y0 + 0.001), 0.5)
    with pytest.raises(ValueError, match="collapses"):
        evidence_to_features([tiny], method=METHOD)


@pytest.mark.parametrize("precision", [8, -1, 2.5])
def test_evidence_to_features_rejects_bad_precision(evidence: list[Evidence], precision) -> None:
    """Precision must be an integer from 0 to 7."""
    with pytest.raises(ValueError, match="precision"):
        evidence_to_features(evidence, method=METHOD, precision=precision)


def test_write_geojson_reads_back(fc: dict[str, Any], tmp_path: Path) -> None:
    """The file parses as JSON and with pyogrio/geopandas as EPSG:4326, same count."""
    path = write_geojson(fc, tmp_path / "evidence.geojson")
    assert json.loads(path.read_text(encoding="utf-8")) == fc
    gpd = pytest.importorskip("geopandas")
    gdf = gpd.read_file(path)
    assert len(gdf) == len(fc["features"])
    assert gdf.crs.to_epsg() == 4326
    assert sorted(gdf["id"]) == sorted(f["id"] for f in fc["features"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evidence.geojson"]


def test_write_geojson_never_overwrites(fc: dict[str, Any], tmp_path: Path) -> None:
    """An existing file is kept unless overwrite=True."""
    path = tmp_path / "evidence.geojson"
    path.write_text("old", encoding="utf-8")
    with pytest.raises(OutputError, match="--overwrite"):
        write_geojson(fc, path)
    assert path.read_text(encoding="utf-8") == "old"
    write_geojson(fc, path, overwrite=True)
    assert json.loads(path.read_text(encoding="utf-8")) == fc
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evidence.geojson"]


def test_write_geojson_refuses_invalid_and_nan(fc: dict[str, Any], tmp_path: Path) -> None:
    """Invalid GeoJSON and NaN values are refused and nothing is written."""
    bad = copy.deepcopy(fc)
    bad["crs"] = {"type": "name"}
    with pytest.raises(ValueError, match="crs"):
        write_geojson(bad, tmp_path / "a.geojson")
    nan = copy.deepcopy(fc)
    nan["features"][0]["properties"]["score"] = math.nan
    with pytest.raises(ValueError):
        write_geojson(nan, tmp_path / "b.geojson")
    assert list(tmp_path.iterdir()) == []


def test_write_geojson_ogrinfo_clean(fc: dict[str, Any], tmp_path: Path) -> None:
    """GDAL's ogrinfo reads the file with exit 0 and no warning or error."""
    ogrinfo = shutil.which("ogrinfo")
    if ogrinfo is None:
        pytest.skip("ogrinfo not found; install Debian's gdal-bin to run this check")
    path = write_geojson(fc, tmp_path / "evidence.geojson")
    proc = subprocess.run(
        [ogrinfo, "-so", "-al", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "Warning" not in output and "ERROR" not in output, output
    assert f"Feature Count: {len(fc['features'])}" in output


# --- validate_geojson: every rule with a failing case ------------------------------------


def _first_geometry(obj: dict[str, Any]) -> dict[str, Any]:
    """The geometry of the holed compound (features[0], highest score)."""
    return obj["features"][0]["geometry"]


def _set_position(obj: dict[str, Any], position: list[float]) -> None:
    """Replace the first and last position of the exterior ring (keeps it closed)."""
    ring = _first_geometry(obj)["coordinates"][0]
    ring[0] = list(position)
    ring[-1] = list(position)


ERROR_CASES = {
    "not a FeatureCollection": (lambda o: o.update(type="Feature"), "FeatureCollection"),
    "features not a list": (lambda o: o.update(features={}), "'features' must be a list"),
    "feature type": (lambda o: o["features"][0].update(type="Point"), "type 'Feature'"),
    "crs member top": (lambda o: o.update(crs={"type": "name"}), "'crs' member"),
    "crs member feature": (lambda o: o["features"][1].update(crs={}), "'crs' member"),
    "crs member geometry": (lambda o: _first_geometry(o).update(crs={}), "'crs' member"),
    "no geometry": (lambda o: o["features"][0].pop("geometry"), "no 'geometry'"),
    "no properties": (lambda o: o["features"][0].pop("properties"), "no 'properties'"),
    "properties not object": (
        lambda o: o["features"][0].update(properties=[1]),
        "properties must be an object",
    ),
    "unknown geometry type": (lambda o: _first_geometry(o).update(type="Circle"), "unknown"),
    "malformed coordinates": (
        lambda o: _first_geometry(o).update(coordinates=[[1, 2, 3]]),
        "not a well-formed",
    ),
    "string coordinate": (
        lambda o: _first_geometry(o).update(type="Point", coordinates=["88.29", 43.38]),
        "not a well-formed",
    ),
    "lat out of range": (lambda o: _set_position(o, [88.29, 91.0]), "outside lon"),
    "lon out of range": (lambda o: _set_position(o, [188.29, 43.38]), "outside lon"),
    "8 decimals": (lambda o: _set_position(o, [88.29000001, 43.38]), "more than 7 decimals"),
    "clockwise exterior": (
        lambda o: _first_geometry(o)["coordinates"][0].reverse(),
        "exterior ring is clockwise",
    ),
    "counter-clockwise hole": (
        lambda o: _first_geometry(o)["coordinates"][1].reverse(),
        "interior ring 1 is counter-clockwise",
    ),
    "unclosed ring": (lambda o: _first_geometry(o)["coordinates"][0].pop(), "not closed"),
    "too few positions": (
        lambda o: _first_geometry(o).update(
            coordinates=[[[88.0, 43.0], [88.1, 43.0], [88.0, 43.0]]]
        ),
        "at least 4",
    ),
    "zero area": (
        lambda o: _first_geometry(o).update(
            coordinates=[[[88.0, 43.0], [88.1, 43.0], [88.2, 43.0], [88.0, 43.0]]]
        ),
        "zero area",
    ),
    "self-intersection": (
        lambda o: _first_geometry(o).update(
            coordinates=[
                [[88.0, 43.0], [88.1, 43.0], [88.1, 43.1], [88.0, 43.1], [88.0, 43.0]],
                [[88.2, 43.0], [88.2, 43.1], [88.3, 43.1], [88.3, 43.0], [88.2, 43.0]],
            ]
        ),
        "Hole lies outside shell",
    ),
    "short line": (
        lambda o: _first_geometry(o).update(type="LineString", coordinates=[[88.0, 43.0]]),
        "at least 2 positions",
    ),
    "duplicate ids": (lambda o: o["features"][1].update(id=o["features"][0]["id"]), "unique"),
    "bool id": (lambda o: o["features"][0].update(id=True), "string or number"),
    "bbox length": (lambda o: o.update(bbox=[88.0, 43.0, 89.0]), "bbox must be"),
    "bbox range": (lambda o: o.update(bbox=[88.0, 43.0, 89.0, 95.0]), "bbox"),
    "bbox south>north": (lambda o: o.update(bbox=[88.0, 44.0, 89.0, 43.0]), "south > north"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_validate_geojson_catches_violation(fc: dict[str, Any], case: str) -> None:
    """Each RFC 7946 violation is reported as an error naming the problem."""
    mutate, match = ERROR_CASES[case]
    bad = copy.deepcopy(fc)
    mutate(bad)
    ok, errors, _ = validate_geojson(bad)
    assert not ok
    assert any(match in e for e in errors), errors


def test_validate_geojson_not_an_object() -> None:
    """A non-object top level is an error, not an exception."""
    assert validate_geojson([1, 2]) == (False, ["top level: expected a JSON object, got list"], [])


def test_validate_geojson_required_properties(fc: dict[str, Any]) -> None:
    """A missing required property is an error."""
    bad = copy.deepcopy(fc)
    del bad["features"][0]["properties"]["params_hash"]
    ok, errors, _ = validate_geojson(bad, required_properties=CORE_PROPERTIES)
    assert not ok and "params_hash" in errors[0]


WARNING_CASES = {
    "null geometry": (lambda o: o["features"][0].update(geometry=None), "geometry is null"),
    "no id": (lambda o: o["features"][0].pop("id"), "has no id"),
    "null properties": (lambda o: o["features"][0].update(properties=None), "properties is null"),
    "nested collection": (
        lambda o: o["features"][0].update(
            geometry={
                "type": "GeometryCollection",
                "geometries": [{"type": "GeometryCollection", "geometries": []}],
            }
        ),
        "nested GeometryCollection",
    ),
    "4-element positions": (
        lambda o: _first_geometry(o).update(type="Point", coordinates=[88.0, 43.0, 1.0, 2.0]),
        "more than 3",
    ),
}


@pytest.mark.parametrize("case", list(WARNING_CASES))
def test_validate_geojson_warns(fc: dict[str, Any], case: str) -> None:
    """Allowed-but-suspicious constructs are warnings, and the collection stays ok."""
    mutate, match = WARNING_CASES[case]
    odd = copy.deepcopy(fc)
    mutate(odd)
    ok, errors, warnings = validate_geojson(odd)
    assert ok, errors
    assert any(match in w for w in warnings), warnings


def test_validate_geojson_reads_parsed_file(fc: dict[str, Any], tmp_path: Path) -> None:
    """A file written and parsed back validates the same as the in-memory dict."""
    path = write_geojson(fc, tmp_path / "e.geojson")
    assert validate_geojson(json.loads(path.read_text(encoding="utf-8"))) == (True, [], [])


def test_evidence_to_features_walls_and_towers_point_at_their_site() -> None:
    """A wall (LineString) and a watchtower keep their kind and site_id, and validate."""
    from shapely.geometry import LineString

    wall = Evidence(id="wall-0001", kind="wall", crs=CRS, score=0.8, area_m2=0.0,
                    geometry=LineString([(X0, Y0), (X0 + 160.0, Y0)]),
                    measurements={"length_m": 160.0, "orientation_deg": 0.0,
                                  "role": "perimeter"},
                    before=BEFORE, after=AFTER, params=DetectParams(), site_id="compound-0001")
    tower = Evidence(id="watchtower-0001", kind="watchtower", crs=CRS, score=0.6, area_m2=25.0,
                     geometry=box(X0 - 2.5, Y0 - 2.5, X0 + 2.5, Y0 + 2.5),
                     measurements={"size_m": 5.0, "at_corner": True}, before=BEFORE,
                     after=AFTER, params=DetectParams(), site_id="compound-0001")
    site = _evidence("compound-0001", box(X0, Y0 - 120.0, X0 + 160.0, Y0), 0.5,
                     {"grade": 3, "watchtower_count": 1, "closure_ratio": None})
    fc = evidence_to_features([site, wall, tower], method=METHOD)
    assert validate_geojson(fc, required_properties=CORE_PROPERTIES)[:2] == (True, [])
    by_id = {f["id"]: f for f in fc["features"]}
    assert by_id["wall-0001"]["geometry"]["type"] == "LineString"
    assert by_id["wall-0001"]["properties"]["kind"] == "wall"
    assert by_id["watchtower-0001"]["properties"]["site_id"] == "compound-0001"
    assert by_id["wall-0001"]["properties"]["site_id"] == "compound-0001"
    assert by_id["compound-0001"]["properties"]["closure_ratio"] is None
    assert "parent" not in by_id["wall-0001"]["properties"]
