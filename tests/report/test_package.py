"""End-to-end tests of the evidence package written by one run of the embedded default."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pyogrio
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import cli
from pipeline.report.chipset import CHIP_KEYS


def test_package_gpkg_matches_geojson(run_dir: Path, fc: dict[str, Any]) -> None:
    """Every GeoJSON feature is in exactly one GeoPackage layer, with the same attributes."""
    by_id = {f["id"]: f["properties"] for f in fc["features"]}
    seen: list[str] = []
    for layer in ("findings", "walls", "towers", "buildings"):
        frame = pyogrio.read_dataframe(run_dir / "changes.gpkg", layer=layer)
        seen += list(frame["id"])
        for _, row in frame.iterrows():
            props = by_id[row["id"]]
            assert row["kind"] == props["kind"] and row["score"] == props["score"]
            assert row["area_m2"] == props["area_m2"]
    assert sorted(seen) == sorted(by_id)
    aoi = pyogrio.read_dataframe(run_dir / "changes.gpkg", layer="aoi")
    assert list(aoi["id"]) == ["dabancheng"]


@pytest.mark.parametrize("name", ["changes.geojson", "changes.gpkg"])
def test_package_ogrinfo_reads_without_warnings(run_dir: Path, fc: dict[str, Any],
                                                 name: str) -> None:
    """GDAL's ogrinfo reads both vector files with exit 0 and no warning."""
    ogrinfo = shutil.which("ogrinfo")
    if ogrinfo is None:
        pytest.skip("ogrinfo not found; install Debian's gdal-bin to run this check")
    proc = subprocess.run([ogrinfo, "-so", "-al", str(run_dir / name)], capture_output=True,
                          text=True, timeout=60, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "Warning" not in output and "ERROR" not in output, output
    counts = [int(line.split(":")[1]) for line in output.splitlines()
              if line.startswith("Feature Count:")]
    n = len(fc["features"])
    # the GeoJSON is one layer; the GeoPackage splits it into layers (+ aoi, + layer_styles)
    assert counts == [n] if name.endswith("geojson") else sum(counts) == n + 1 + 5


def test_package_chips_for_every_compound(run_dir: Path, fc: dict[str, Any]) -> None:
    """Each compound names four chip PNGs inside the folder; before and after share a size."""
    compounds = [f["properties"] for f in fc["features"] if f["properties"]["kind"] == "compound"]
    assert compounds
    manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    for props in compounds:
        sizes = set()
        for key in CHIP_KEYS:
            path = run_dir / props[key]
            assert path.is_file() and path.parent == run_dir / "chips"
            with Image.open(path) as image:
                sizes.add(image.size)
        assert len(sizes) == 1, props["id"]
        _assert_caption(run_dir, props, manifest)
    (chips_step,) = [s for s in manifest["steps"] if s["name"] == "write:chips"]
    changes = [f["properties"] for f in fc["features"] if f["properties"]["kind"] == "change"]
    unchipped = sum(p.get("chip_before") is None for p in changes)
    assert chips_step["details"]["change_regions_without_chips"] == unchipped
    buildings = [f["properties"] for f in fc["features"]
                 if f["properties"]["kind"] == "new_building"]
    assert all(props.get("chip_before") is None for props in buildings)


def _assert_caption(run_dir: Path, props: dict[str, Any], manifest: dict[str, Any]) -> None:
    """Each chip's caption band names date, source, provider, resolution, scale and north."""
    inputs = {i["role"].split(":")[0]: i for i in manifest["inputs"]}
    grid_m = manifest["grid"]["res_m"]
    for key in CHIP_KEYS:
        role = "before" if "before" in key else "after"
        with Image.open(run_dir / props[key]) as image:
            text = dict(image.text)  # the caption band's text, as PNG text chunks
            pixels = np.asarray(image.convert("RGB"))
        caption = text["Description"].splitlines()
        source = inputs[role]
        assert caption[0] == f"{role.upper()} {props[f'{role}_date']}"  # the date
        assert caption[1].startswith(f"{source['provider']}:{source['item_id']}")  # source
        assert re.fullmatch(rf"{grid_m:g} m grid \({source['res_m']:g} m source\) · "
                            r"shown at [\d.]+ m/px", caption[2])  # resolution
        assert caption[3].startswith(f"{props['id']} · compound · grade {props['grade']}")
        assert re.fullmatch(r"\d+(\.\d+)? k?m", text["Sitewatch-Scale-Bar"])  # scale bar
        assert abs(float(text["Sitewatch-North-Deg"])) < 3  # true north near grid up in UTM
        band = pixels[-(len(caption) * 16):]
        assert (band > 200).any() and (band < 40).any()  # light text and bar on the dark band


def _flip_one_byte(path: Path) -> None:
    """Change one byte in the middle of a file (made writable first)."""
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("target", ["chip", "changes.geojson", "original"])
def test_package_verify_fails_after_one_byte(run_dir: Path, fc: dict[str, Any],
                                             tmp_path: Path, target: str) -> None:
    """`sitewatch verify` passes on a fresh copy and exits 1 naming the one changed file."""
    copy = Path(shutil.copytree(run_dir, tmp_path / "copy"))
    runner = CliRunner()
    fresh = runner.invoke(cli, ["verify", str(copy)])
    assert fresh.exit_code == 0, fresh.output
    if target == "chip":
        rel = fc["features"][0]["properties"].get("chip_after") or next(
            f["properties"]["chip_after"] for f in fc["features"]
            if f["properties"].get("chip_after"))
    elif target == "original":
        rel = next(p for p in copy.glob("originals/*")).relative_to(copy).as_posix()
    else:
        rel = target
    _flip_one_byte(copy / rel)
    result = runner.invoke(cli, ["verify", str(copy)])
    assert result.exit_code == 1
    assert rel in result.output and "changed" in result.output


def test_package_manifest_records_provenance(run_dir: Path) -> None:
    """The manifest lists steps in order with UTC starts, originals, versions and sources."""
    manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    names = [s["name"] for s in manifest["steps"]]
    assert names[:5] == ["read", "coregister", "normalize", "change", "detect"]
    detection = manifest["steps"][:5]
    assert all(s["started_utc"].endswith("Z") for s in detection)
    assert sorted(s["started_utc"] for s in detection) == [s["started_utc"] for s in detection]
    # each step with the parameters it ran with (the sections of the manifest's params)
    assert detection[1]["params"] == {"coreg": manifest["params"]["coreg"]}
    assert detection[3]["params"] == {"change": manifest["params"]["change"]}
    assert set(detection[4]["params"]) == {"objects", "walls", "towers", "grade"}
    assert detection[3]["details"]["threshold"] is not None
    # the shift with its uncertainty, whether it was applied and why
    coreg = detection[1]["details"]
    assert {"dy_px", "dx_px", "uncertainty_px", "applied", "note"} <= set(coreg)
    assert coreg["uncertainty_px"] is None or coreg["uncertainty_px"] > 0
    writes = [s for s in manifest["steps"] if s["name"].startswith("write:")]
    assert [s["name"] for s in writes] == ["write:originals", "write:chips", "write:geojson",
                                           "write:rasters", "write:gis_layers", "write:report"]
    assert all(s["started_utc"].endswith("Z") for s in writes)
    # the rasters may be written beside the other steps (report.package), which run in order
    in_turn = [s["started_utc"] for s in writes if s["name"] != "write:rasters"]
    assert sorted(in_turn) == in_turn and writes[3]["started_utc"] <= writes[4]["started_utc"]
    roles = {o["input"]: o for o in manifest["originals"]}
    assert set(roles) == {"before:0", "after:0"}
    inputs = {i["role"]: i for i in manifest["inputs"]}
    for key, original in roles.items():
        assert original["sha256"] == inputs[key]["sha256"]
        assert original["size_bytes"] == inputs[key]["size_bytes"] > 0
        assert (run_dir / original["path"]).is_file()
    assert inputs["before:0"]["acquired"] == "2017-03-02"
    assert manifest["software"]["pillow"] and manifest["software"]["GDAL (pyogrio)"]
    listed = {o["path"] for o in manifest["outputs"]}
    assert {"changes.gpkg", "changes.qml"} <= listed
    assert {p.relative_to(run_dir).as_posix() for p in (run_dir / "chips").iterdir()} <= listed
