"""The GeoJSON and GeoPackage of a run in real QGIS (Debian's python3-qgis), headless."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pipeline.report.geojson import write_geojson
from pipeline.report.package import write_gis_layers
from pipeline.report.style import GRADE_COLOURS, KIND_COLOURS
from report.test_gpkg import AOI, all_kinds_fc

SYSTEM_PYTHON = "/usr/bin/python3"
PROBE = Path(__file__).with_name("qgis_probe.py")
GEOMETRY_SUBLAYER = {"Polygon": "Polygon", "MultiPolygon": "Polygon", "LineString": "LineString",
                     "MultiLineString": "LineString", "Point": "Point", "MultiPoint": "Point"}
LAYER_KINDS = {"findings": ("compound", "change"), "walls": ("wall",),
               "towers": ("watchtower",), "buildings": ("new_building",)}


def _qgis_env() -> dict[str, str]:
    return {**os.environ, "QT_QPA_PLATFORM": "offscreen", "GDAL_PAM_ENABLED": "NO",
            "XDG_RUNTIME_DIR": os.environ.get("XDG_RUNTIME_DIR", "/tmp")}


def _require_qgis() -> None:
    """Skip, with the reason, where QGIS's Python bindings cannot run."""
    if not Path(SYSTEM_PYTHON).exists():
        pytest.skip(f"{SYSTEM_PYTHON} not found; QGIS's Python bindings need the system Python")
    check = subprocess.run([SYSTEM_PYTHON, "-c", "import qgis.core"], capture_output=True,
                           text=True, timeout=120, env=_qgis_env(), check=False)
    if check.returncode != 0:
        pytest.skip("QGIS Python bindings not importable under /usr/bin/python3; install "
                    "Debian's python3-qgis and qgis-providers (.ci/run does)")


def _probe(folder: Path) -> dict:
    """Run the probe on ``folder``; check QGIS wrote nothing beside the files."""
    before = {p.name for p in folder.iterdir()}
    proc = subprocess.run([SYSTEM_PYTHON, str(PROBE), str(folder)], capture_output=True,
                          text=True, timeout=300, env=_qgis_env(), check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name for p in folder.iterdir()} == before  # no .aux.xml, no lock left behind
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def qgis_view(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """What QGIS saw loading a copy of the run's files."""
    _require_qgis()
    copy = Path(shutil.copytree(run_dir, tmp_path_factory.mktemp("qgis") / "run"))
    return copy, _probe(copy)


def test_qgis_loads_geojson_with_style(qgis_view: tuple[Path, dict], fc: dict[str, Any]) -> None:
    """The GeoJSON is a valid EPSG:4326 layer of every feature, styled by changes.qml."""
    _, view = qgis_view
    layer = view["layers"]["geojson"]
    assert layer["valid"] and layer["features"] == len(fc["features"])
    assert layer["crs"] == "EPSG:4326"
    assert layer["renderer"] == "RuleRenderer" and layer["labels"]
    _assert_rules(layer["rule_labels"], fc)


def test_qgis_loads_gpkg_layers_with_styles(qgis_view: tuple[Path, dict],
                                            fc: dict[str, Any]) -> None:
    """Each GeoPackage layer is valid, holds its kinds, and has its stored style applied."""
    _, view = qgis_view
    for name, kinds in LAYER_KINDS.items():
        layer = view["layers"][f"gpkg:{name}"]
        expected = sum(f["properties"]["kind"] in kinds for f in fc["features"])
        assert layer["valid"] and layer["features"] == expected, name
        assert layer["crs"] == "EPSG:4326"
        assert layer["renderer"] == "RuleRenderer" and layer["labels"], name
        assert len(layer["rule_labels"]) == expected
        if expected:
            _assert_rules(layer["rule_labels"], fc)
    aoi = view["layers"]["gpkg:aoi"]
    assert aoi["valid"] and aoi["features"] == 1
    assert aoi["renderer"] == "singleSymbol" and not aoi["labels"]  # its own stored style
    assert not [m for m in view["messages"] if "GeoPackage" in m or "gpkg" in m.lower()]


def test_qgis_styles_walls_and_towers_layers(tmp_path: Path) -> None:
    """With every kind present, the walls layer is a styled line layer, towers points."""
    _require_qgis()
    fc = all_kinds_fc()
    write_geojson(fc, tmp_path / "changes.geojson")
    write_gis_layers(tmp_path, fc, aoi=AOI)
    view = _probe(tmp_path)
    walls, towers = view["layers"]["gpkg:walls"], view["layers"]["gpkg:towers"]
    assert walls["valid"] and walls["features"] == 1 and walls["geometry"] == 1  # line
    assert towers["valid"] and towers["features"] == 1 and towers["geometry"] == 0  # point
    assert walls["rule_labels"]["wall-0001"][0] == "wall"
    assert towers["rule_labels"]["watchtower-0001"][0] == "watchtower"
    assert view["layers"]["gpkg:findings"]["rule_labels"]["compound-0001"][0].startswith(
        "grade 2:")


def _assert_rules(rule_labels: dict[str, list], fc: dict[str, Any]) -> None:
    """Graded features are drawn by their grade's rule, the others by their kind's."""
    assert rule_labels
    props = {f["id"]: f["properties"] for f in fc["features"]}
    for fid, labels in rule_labels.items():
        labels = [label for label in labels if label]
        grade = props[fid].get("grade")
        if grade is not None:
            assert labels and labels[0].startswith(f"grade {grade}:"), (fid, labels)
        else:
            assert labels == [props[fid]["kind"]], (fid, labels)


def _by_geometry(fc: dict[str, Any]) -> dict[str, list[str]]:
    """The kinds of the features, by the GeoJSON sublayer QGIS puts them in."""
    out: dict[str, list[str]] = {}
    for f in fc["features"]:
        out.setdefault(GEOMETRY_SUBLAYER[f["geometry"]["type"]], []).append(
            f["properties"]["kind"])
    return {k: sorted(v) for k, v in out.items()}


def _pixels_near(colours: dict[str, int], rgb: str, tolerance: int = 40) -> int:
    """Rendered pixels within ``tolerance`` of ``rgb`` on every channel."""
    target = [int(v) for v in rgb.split(",")]
    return sum(n for key, n in colours.items()
               if all(abs(int(a) - b) <= tolerance for a, b in zip(key.split(","), target,
                                                                   strict=True)))


def _assert_sublayers(view: dict, fc: dict[str, Any]) -> dict[str, dict]:
    """QGIS offers one styled EPSG:4326 sublayer per geometry type, holding the right kinds."""
    subs = {s["type"]: s for s in view["geojson_sublayers"]}
    expected = _by_geometry(fc)
    assert set(subs) == set(expected)
    # a file of one geometry type is one plain layer; a mixed one is split by type (Polygon
    # and MultiPolygon together make one "Polygon" sublayer, named so)
    mixed = len({f["geometry"]["type"] for f in fc["features"]}) > 1
    for kind, sub in subs.items():
        assert sub["valid"] and sub["crs"] == "EPSG:4326", sub["uri"]
        suffix = f"|geometrytype={kind}" if mixed else ""
        assert sub["uri"].endswith(f"changes.geojson{suffix}")
        assert sub["features"] == len(expected[kind])
        if mixed:  # QGIS counts a mixed file's sublayers when it lists them
            assert sub["listed_features"] == len(expected[kind])
        assert sub["kinds"] == expected[kind]
        assert sub["renderer"] == "RuleRenderer" and sub["labels"]
        _assert_rules(sub["rule_labels"], fc)
    return subs


def test_qgis_geojson_sublayers_show_walls_and_towers(tmp_path: Path) -> None:
    """changes.geojson: QGIS's sublayers hold walls (lines) and towers (points), drawn styled."""
    _require_qgis()
    fc = all_kinds_fc()
    write_geojson(fc, tmp_path / "changes.geojson")
    write_gis_layers(tmp_path, fc, aoi=AOI)
    subs = _assert_sublayers(_probe(tmp_path), fc)
    assert subs["LineString"]["kinds"] == ["wall"] and subs["Point"]["kinds"] == ["watchtower"]
    # changes.qml draws each kind with a symbol of its geometry: the pixels show its colour
    assert _pixels_near(subs["LineString"]["colours"], KIND_COLOURS["wall"]) > 20
    assert _pixels_near(subs["Point"]["colours"], KIND_COLOURS["watchtower"]) > 10
    assert _pixels_near(subs["Polygon"]["colours"], GRADE_COLOURS[2]) > 20
    assert _pixels_near(subs["Polygon"]["colours"], KIND_COLOURS["new_building"]) > 0


def test_qgis_run_geojson_sublayers(qgis_view: tuple[Path, dict], fc: dict[str, Any]) -> None:
    """The default run's GeoJSON (polygons only at 10 m) loads as one styled sublayer."""
    _, view = qgis_view
    _assert_sublayers(view, fc)
