"""End-to-end tests of the evidence package written by one run of the embedded default."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pyogrio
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import cli
from pipeline.report.chipset import CHIP_KEYS


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run folder of one `sitewatch detect` of the default (seeds/ pair, 'dabancheng')."""
    out = tmp_path_factory.mktemp("out")
    result = CliRunner().invoke(cli, ["detect", "--out", str(out), "-q"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (folder,) = [p for p in out.glob("*/*") if p.is_dir()]
    return folder


@pytest.fixture(scope="module")
def fc(run_dir: Path) -> dict[str, Any]:
    """The run's changes.geojson."""
    return json.loads((run_dir / "changes.geojson").read_text(encoding="utf-8"))


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
    assert counts == [n] if name.endswith("geojson") else sum(counts) == n + 1 + 4


def test_package_chips_for_every_compound(run_dir: Path, fc: dict[str, Any]) -> None:
    """Each compound names four chip PNGs inside the folder; before and after share a size."""
    compounds = [f["properties"] for f in fc["features"] if f["properties"]["kind"] == "compound"]
    assert compounds
    for props in compounds:
        sizes = set()
        for key in CHIP_KEYS:
            path = run_dir / props[key]
            assert path.is_file() and path.parent == run_dir / "chips"
            with Image.open(path) as image:
                sizes.add(image.size)
        assert len(sizes) == 1, props["id"]
    buildings = [f["properties"] for f in fc["features"]
                 if f["properties"]["kind"] == "new_building"]
    assert all(props.get("chip_before") is None for props in buildings)
