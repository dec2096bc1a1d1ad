"""Tests for pipeline.report.gpkg and pipeline.report.style (GeoPackage layers, QML)."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import xml.etree.ElementTree as ET
from contextlib import closing
from dataclasses import fields
from datetime import date
from pathlib import Path
from typing import Any

import pyogrio
import pytest
from shapely.geometry import LineString, Point, box

from pipeline.errors import OutputError
from pipeline.model import DetectParams, Evidence, SourceRef
from pipeline.report.geojson import evidence_to_features
from pipeline.report.gpkg import layer_geometries, layer_of, write_gpkg
from pipeline.report.package import write_gis_layers
from pipeline.report.style import GRADE_COLOURS, findings_qml

CRS = "EPSG:32645"
X0, Y0 = 604_496.0, 4_803_822.6  # lon 88.29, lat 43.38 in UTM 45N
BEFORE = SourceRef("local", "before.tif", acquired=date(2017, 3, 2), sha256="a" * 64)
AFTER = SourceRef("local", "after.tif", acquired=date(2018, 10, 11), sha256="b" * 64)
AOI = {"id": "test-site", "label": "88.29,43.38",
       "geometry": box(88.28, 43.37, 88.31, 43.39).__geo_interface__}


# the field naming a part's site: ``site_id`` (``parent`` before the walls work renamed it)
SITE_FIELD = "site_id" if "site_id" in {f.name for f in fields(Evidence)} else "parent"


def _evidence(eid: str, kind: str, geometry: Any, score: float, measures: dict,
              parent: str | None = None) -> Evidence:
    return Evidence(id=eid, kind=kind, geometry=geometry, crs=CRS,  # type: ignore[arg-type]
                    score=score, area_m2=float(geometry.area), measurements=measures,
                    before=BEFORE, after=AFTER, params=DetectParams(), **{SITE_FIELD: parent})


@pytest.fixture
def fc() -> dict[str, Any]:
    """Every kind: a graded compound, a change region, buildings, a wall and a watchtower."""
    return all_kinds_fc()


def all_kinds_fc() -> dict[str, Any]:
    """A FeatureCollection of every kind near Dabancheng (also used by the QGIS test)."""
    evidence = [
        _evidence("compound-0001", "compound", box(X0, Y0, X0 + 400, Y0 + 300), 0.9,
                  {"grade": 2, "grade_reasons": "walls", "closure_ratio": None}),
        _evidence("change-0001", "change", box(X0 + 600, Y0, X0 + 700, Y0 + 80), 0.4,
                  {"mean_magnitude": 12.5}),
        _evidence("new_building-0001", "new_building", box(X0 + 10, Y0 + 10, X0 + 40, Y0 + 30),
                  0.8, {"rectangularity": 0.9}, parent="compound-0001"),
        _evidence("new_building-0002", "new_building", box(X0 + 900, Y0, X0 + 930, Y0 + 20),
                  0.7, {"rectangularity": 0.8}),
        _evidence("wall-0001", "wall", LineString([(X0, Y0), (X0 + 400, Y0)]), 0.6,
                  {"length_m": 400.0}, parent="compound-0001"),
        _evidence("watchtower-0001", "watchtower", Point(X0, Y0), 0.5, {"height_px": 3},
                  parent="compound-0001"),
    ]
    return evidence_to_features(evidence, method="test method")


def _geojson_props(fc: dict[str, Any], kinds: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    return {f["id"]: f["properties"] for f in fc["features"] if f["properties"]["kind"] in kinds}


def test_write_gpkg_layers_hold_geojson_ids_and_attributes(fc: dict, tmp_path: Path) -> None:
    """Each layer holds its kinds with the GeoJSON's ids and attribute values."""
    path = write_gpkg(fc, tmp_path / "changes.gpkg", aoi=AOI)
    expected_layers = {"findings": ("compound", "change"), "walls": ("wall",),
                       "towers": ("watchtower",), "buildings": ("new_building",)}
    listed = {name for name, _ in pyogrio.list_layers(path)}
    assert listed == {*expected_layers, "aoi"}
    for layer, kinds in expected_layers.items():
        frame = pyogrio.read_dataframe(path, layer=layer)
        expected = _geojson_props(fc, kinds)
        assert sorted(frame["id"]) == sorted(expected)
        for _, row in frame.iterrows():
            for key, value in expected[row["id"]].items():
                got = row[key]
                if isinstance(value, dict):
                    assert json.loads(got) == value
                elif value is None:
                    assert got is None or got != got  # None or NaN
                else:
                    assert got == value, (layer, row["id"], key)
    aoi = pyogrio.read_dataframe(path, layer="aoi")
    assert list(aoi["id"]) == ["test-site"]
    assert aoi.crs.to_epsg() == 4326
    assert aoi.geometry.iloc[0].bounds == pytest.approx((88.28, 43.37, 88.31, 43.39))


def test_write_gpkg_geometries_in_lonlat(fc: dict, tmp_path: Path) -> None:
    """Layer geometries equal the GeoJSON's lon/lat geometries (EPSG:4326, x = lon)."""
    path = write_gpkg(fc, tmp_path / "changes.gpkg")
    frame = pyogrio.read_dataframe(path, layer="findings")
    assert frame.crs.to_epsg() == 4326
    geo = {f["id"]: f["geometry"] for f in fc["features"]}
    for _, row in frame.iterrows():
        minx, miny, maxx, maxy = row.geometry.bounds
        assert 88.0 < minx < maxx < 89.0 and 43.0 < miny < maxy < 44.0
        ring = geo[row["id"]]["coordinates"][0]
        assert row.geometry.geoms[0].exterior.coords[0] == pytest.approx(tuple(ring[0]))


def test_write_gpkg_version_read_by_qgis_3_22(fc: dict, tmp_path: Path) -> None:
    """The file is GeoPackage 1.2 (user_version 10200), not GDAL 3.12's default 1.4."""
    path = write_gpkg(fc, tmp_path / "changes.gpkg")
    with closing(sqlite3.connect(path)) as con:
        assert con.execute("PRAGMA application_id").fetchone()[0] == 0x47504B47  # "GPKG"
        assert con.execute("PRAGMA user_version").fetchone()[0] == 10200


def test_write_gpkg_empty_collection_keeps_every_layer(tmp_path: Path) -> None:
    """No findings still gives all five layers, four of them empty."""
    path = write_gpkg({"type": "FeatureCollection", "features": []}, tmp_path / "e.gpkg",
                      aoi=AOI)
    counts = {name: pyogrio.read_info(path, layer=name)["features"]
              for name, _ in pyogrio.list_layers(path)}
    assert counts == {"findings": 0, "walls": 0, "towers": 0, "buildings": 0, "aoi": 1}


def test_write_gpkg_refuses_to_overwrite(fc: dict, tmp_path: Path) -> None:
    """An existing file is an OutputError without overwrite, and is left as it was."""
    path = tmp_path / "changes.gpkg"
    path.write_bytes(b"earlier evidence")
    with pytest.raises(OutputError, match="not overwriting"):
        write_gpkg(fc, path)
    assert path.read_bytes() == b"earlier evidence"
    assert [p.name for p in tmp_path.iterdir()] == ["changes.gpkg"]


def test_layer_of_unknown_kind_goes_to_findings() -> None:
    """A kind the writer does not know yet is kept, in the findings layer."""
    assert layer_of("fence") == "findings"
    assert layer_of("watchtower") == "towers"


def test_write_gis_layers_styles_every_layer(fc: dict, tmp_path: Path) -> None:
    """layer_styles holds one default style per layer, matching its geometry type."""
    names = write_gis_layers(tmp_path, fc, aoi=AOI)
    assert names == ["changes.gpkg", "changes.qml"]
    with closing(sqlite3.connect(tmp_path / "changes.gpkg")) as con:
        rows = con.execute("SELECT f_table_name, f_geometry_column, useAsDefault, styleQML "
                           "FROM layer_styles").fetchall()
        registered = con.execute("SELECT data_type FROM gpkg_contents "
                                 "WHERE table_name = 'layer_styles'").fetchone()
    assert registered == ("attributes",)
    styles = {r[0]: r for r in rows}
    assert set(styles) == {"findings", "walls", "towers", "buildings", "aoi"}
    assert all(r[1] == "geom" and r[2] == 1 for r in rows)
    symbol_types = {layer: {s.get("type") for s in ET.fromstring(r[3]).iter("symbol")}
                    for layer, r in styles.items()}
    assert symbol_types == {"findings": {"fill"}, "buildings": {"fill"}, "walls": {"line"},
                            "towers": {"marker"}, "aoi": {"fill"}}
    assert layer_geometries(fc)["walls"] == "line"
    assert (tmp_path / "changes.qml").read_text(encoding="utf-8") == findings_qml(geometry="any")


def test_geojson_qml_draws_each_kind_with_its_geometry() -> None:
    """changes.qml (any geometry): walls lines, towers markers, the rest fills; no layer type."""
    root = ET.fromstring(findings_qml(geometry="any"))
    symbols = {s.get("name"): s.get("type") for s in root.iter("symbol")}
    by_label: dict[str, set[str]] = {}
    for rule in root.iter("rule"):
        by_label.setdefault(rule.get("label", ""), set()).add(symbols[rule.get("symbol")])
    assert by_label["wall"] == {"line"} and by_label["watchtower"] == {"marker"}
    assert by_label["new_building"] == by_label["grade 2: walls or fences"] == {"fill"}
    assert by_label["other"] == {"fill", "line", "marker"}
    # QGIS refuses a style whose layerGeometryType differs from the layer's: none is named
    assert root.find("layerGeometryType") is None
    assert findings_qml().count("<layerGeometryType>2</layerGeometryType>") == 1


def test_findings_qml_grades_and_labels() -> None:
    """The QML is well-formed, has one rule per grade and an ELSE rule, and labels on."""
    root = ET.fromstring(findings_qml())
    assert root.tag == "qgis" and root.get("labelsEnabled") == "1"
    filters = [r.get("filter") for r in root.iter("rule")]
    for grade in GRADE_COLOURS:
        assert f"attribute('grade') = {grade}" in filters
    assert filters[-1] == "ELSE"
    text_style = root.find("labeling/settings/text-style")
    assert text_style is not None and text_style.get("isExpression") == "1"
    assert all(w in text_style.get("fieldName", "") for w in ("'kind'", "'grade'", "'score'"))


def test_write_gis_layers_ogrinfo_clean(fc: dict, tmp_path: Path) -> None:
    """GDAL's ogrinfo reads the GeoPackage with exit 0, no warning, the right counts."""
    ogrinfo = shutil.which("ogrinfo")
    if ogrinfo is None:
        pytest.skip("ogrinfo not found; install Debian's gdal-bin to run this check")
    write_gis_layers(tmp_path, fc, aoi=AOI)
    proc = subprocess.run([ogrinfo, "-so", "-al", str(tmp_path / "changes.gpkg")],
                          capture_output=True, text=True, timeout=60, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "Warning" not in output and "ERROR" not in output, output
    for layer, count in {"findings": 2, "walls": 1, "towers": 1, "buildings": 2, "aoi": 1,
                         "layer_styles": 5}.items():
        assert f"Layer name: {layer}\n" in output
        block = output.split(f"Layer name: {layer}\n", 1)[1]
        assert f"Feature Count: {count}\n" in block.split("Layer name:", 1)[0]
