"""Tests for pipeline.report.manifest."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

import pipeline
from pipeline.errors import OutputError
from pipeline.files import sha256_file
from pipeline.model import DetectParams, SourceRef, params_hash
from pipeline.report.manifest import (
    MANIFEST_NAME,
    build_manifest,
    verify_manifest,
    write_manifest,
)

START = datetime(2026, 11, 25, 10, 46, 22, tzinfo=UTC)
BEFORE = SourceRef(
    "local",
    "before.tif",
    acquired=date(2017, 3, 1),
    path="/data/before.tif",
    sha256="a" * 64,
    crs="EPSG:32645",
    res_m=0.6,
    date_source="metadata",
)
AFTER = SourceRef("wayback", "release-42", release="2018-11-07", crs="EPSG:3857", res_m=0.6)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run folder with two outputs, one in a sub-folder."""
    run = tmp_path / "run"
    (run / "chips").mkdir(parents=True)
    (run / "evidence.geojson").write_text('{"type": "FeatureCollection", "features": []}\n')
    (run / "chips" / "c-001.png").write_bytes(b"\x89PNG fake")
    return run


def _manifest(run_dir: Path, **overrides: Any) -> dict[str, Any]:
    """A manifest for the fixture run folder."""
    kwargs: dict[str, Any] = {
        "run_id": "20261125T104622Z-abcdef12",
        "run_dir": run_dir,
        "aoi": {"id": "dabancheng", "bbox_lonlat": [88.28, 43.37, 88.31, 43.39]},
        "inputs": {"before": BEFORE, "after": AFTER},
        "outputs": [run_dir / "evidence.geojson", Path("chips/c-001.png")],
        "config": {"out": Path("out"), "change": {"threshold": None}},
        "params": DetectParams(),
        "steps": [
            {"name": "fetch", "seconds": 1.23456, "details": {"tiles": 4}},
            {"name": "detect"},
        ],
        "started_utc": START,
        "finished_utc": START + timedelta(seconds=90.5),
    }
    kwargs.update(overrides)
    return build_manifest(**kwargs)


def test_build_manifest_hashes_outputs(run_dir: Path) -> None:
    """Outputs are listed relative to the run folder, sorted, with correct SHA-256 and size."""
    manifest = _manifest(run_dir)
    assert [o["path"] for o in manifest["outputs"]] == ["chips/c-001.png", "evidence.geojson"]
    for entry in manifest["outputs"]:
        file = run_dir / entry["path"]
        assert entry["sha256"] == sha256_file(file)
        assert entry["size_bytes"] == file.stat().st_size


def test_build_manifest_records_provenance(run_dir: Path) -> None:
    """Inputs, software, params, steps and UTC timestamps are recorded."""
    manifest = _manifest(run_dir)
    before, after = manifest["inputs"]
    assert before["role"] == "before" and before["acquired"] == "2017-03-01"
    assert before["sha256"] == "a" * 64 and before["date_source"] == "metadata"
    assert after["role"] == "after" and after["acquired"] is None
    assert after["release"] == "2018-11-07"
    software = manifest["software"]
    for key in ("python", "sitewatch", "numpy", "scipy", "rasterio", "GDAL", "pyproj", "PROJ"):
        assert software[key], key
    for key in ("shapely", "GEOS", "scikit-image", "xarray", "dask"):
        assert software[key], key
    assert software["sitewatch"] == pipeline.__version__
    assert manifest["params_hash"] == params_hash(DetectParams())
    assert manifest["steps"] == [
        {"name": "fetch", "seconds": 1.235, "details": {"tiles": 4}},
        {"name": "detect", "seconds": None, "details": {}},
    ]
    assert manifest["started_utc"] == "2026-11-25T10:46:22Z"
    assert manifest["finished_utc"] == "2026-11-25T10:47:52Z"
    assert manifest["duration_s"] == 90.5


def test_build_manifest_roles_from_sequence(run_dir: Path) -> None:
    """In a sequence of inputs the role comes from SourceRef.extra['role']."""
    ref = SourceRef("local", "x.tif", extra={"role": "after"})
    manifest = _manifest(run_dir, inputs=[ref, BEFORE])
    assert [i["role"] for i in manifest["inputs"]] == ["after", None]


def test_build_manifest_converts_timezones(run_dir: Path) -> None:
    """Aware timestamps in other zones are written in UTC with a Z."""
    tz = timezone(timedelta(hours=8))
    manifest = _manifest(
        run_dir, started_utc=START.astimezone(tz), finished_utc=START.astimezone(tz)
    )
    assert manifest["started_utc"] == "2026-11-25T10:46:22Z"


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"started_utc": datetime(2026, 1, 1)}, "time zone"),
        ({"outputs": [Path("../escape.txt")]}, "not inside"),
        ({"outputs": [Path("missing.tif")]}, "does not exist"),
        ({"steps": [{"seconds": 1.0}]}, "name"),
        ({"extra": {"run_id": "x"}}, "clash"),
    ],
)
def test_build_manifest_rejects_bad_input(run_dir: Path, override: dict, match: str) -> None:
    """Naive times, outputs outside the run, nameless steps and clashing extras raise."""
    (run_dir.parent / "escape.txt").write_text("x")
    with pytest.raises(ValueError, match=match):
        _manifest(run_dir, **override)


def test_build_manifest_extra_members(run_dir: Path) -> None:
    """Extra members are merged at the top level."""
    assert _manifest(run_dir, extra={"skipped_tiles": 2})["skipped_tiles"] == 2


def test_write_manifest_sorted_and_atomic(run_dir: Path) -> None:
    """The file is JSON with sorted keys and a trailing newline; no temp file remains."""
    path = write_manifest(_manifest(run_dir), run_dir / MANIFEST_NAME)
    text = path.read_text(encoding="utf-8")
    data = json.loads(text)
    assert list(data) == sorted(data) and text.endswith("}\n")
    assert data["config"]["out"] == "out"
    assert sorted(p.name for p in run_dir.iterdir()) == ["chips", "evidence.geojson", MANIFEST_NAME]


def test_write_manifest_never_overwrites(run_dir: Path) -> None:
    """An existing manifest is kept unless overwrite=True."""
    path = run_dir / MANIFEST_NAME
    path.write_text("old")
    with pytest.raises(OutputError, match="--overwrite"):
        write_manifest(_manifest(run_dir), path)
    assert path.read_text() == "old"
    write_manifest(_manifest(run_dir), path, overwrite=True)
    assert json.loads(path.read_text())["run_id"]


def test_verify_manifest_untouched(run_dir: Path) -> None:
    """A run folder as written verifies clean."""
    write_manifest(_manifest(run_dir), run_dir / MANIFEST_NAME)
    assert verify_manifest(run_dir) == (True, [], [])


def test_verify_manifest_detects_modified_file(run_dir: Path) -> None:
    """A changed output is an error, also when its size is unchanged."""
    write_manifest(_manifest(run_dir), run_dir / MANIFEST_NAME)
    geojson = run_dir / "evidence.geojson"
    text = geojson.read_text()
    geojson.write_text(text.replace("[]", "[ ]"))
    (run_dir / "chips" / "c-001.png").write_bytes(b"\x89PNG FAKE")
    ok, errors, _ = verify_manifest(run_dir)
    assert not ok
    assert any(e.startswith("evidence.geojson: changed (size") for e in errors)
    assert any(e.startswith("chips/c-001.png: changed (SHA-256") for e in errors)


def test_verify_manifest_detects_deleted_file(run_dir: Path) -> None:
    """A deleted output is reported missing."""
    write_manifest(_manifest(run_dir), run_dir / MANIFEST_NAME)
    (run_dir / "evidence.geojson").unlink()
    ok, errors, _ = verify_manifest(run_dir)
    assert not ok and errors == ["evidence.geojson: missing"]


def test_verify_manifest_warns_on_unlisted_file(run_dir: Path) -> None:
    """A file the manifest does not list is a warning, not an error."""
    write_manifest(_manifest(run_dir), run_dir / MANIFEST_NAME)
    (run_dir / "notes.txt").write_text("added later")
    ok, errors, warnings = verify_manifest(run_dir)
    assert ok and errors == []
    assert warnings == ["notes.txt: present but not listed in the manifest"]


def test_verify_manifest_rejects_escaping_paths(run_dir: Path) -> None:
    """A manifest entry pointing outside the run folder is an error."""
    manifest = _manifest(run_dir)
    manifest["outputs"].append({"path": "../x", "sha256": "0", "size_bytes": 0})
    write_manifest(manifest, run_dir / MANIFEST_NAME)
    ok, errors, _ = verify_manifest(run_dir)
    assert not ok and "not inside the run folder" in errors[0]


def test_verify_manifest_missing_manifest(tmp_path: Path) -> None:
    """A folder without a manifest fails with a message, not an exception."""
    ok, errors, _ = verify_manifest(tmp_path)
    assert not ok and "cannot be read" in errors[0]


def test_write_manifest_turns_non_finite_into_null(tmp_path):
    """NaN and infinities (unknown figures) are written as null, never as invalid JSON."""
    import json

    import numpy as np

    from pipeline.report.manifest import write_manifest

    path = write_manifest({"a": float("nan"), "b": [np.float32("inf"), 1.5], "c": {"d": 2}},
                          tmp_path / "manifest.json")
    assert json.loads(path.read_text()) == {"a": None, "b": [None, 1.5], "c": {"d": 2}}
