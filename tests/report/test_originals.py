"""Tests for pipeline.report.originals and the manifest's checks of originals and itself."""

from __future__ import annotations

import os
import stat
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from pipeline.errors import OutputError
from pipeline.files import sha256_file
from pipeline.model import DetectParams, SourceRef
from pipeline.report import originals
from pipeline.report.manifest import (
    build_manifest,
    verify_manifest,
    write_manifest,
    write_manifest_digest,
)
from pipeline.report.originals import copied, flush_copies, preserve_originals

START = datetime(2026, 11, 25, 10, 46, 22, tzinfo=UTC)


def _source(tmp_path: Path, name: str, data: bytes) -> SourceRef:
    path = tmp_path / "inputs" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    return SourceRef("local", name, acquired=date(2017, 3, 2), path=str(path),
                     sha256=sha256_file(path))


def test_preserve_originals_copies_read_only(tmp_path: Path) -> None:
    """A local input is copied byte for byte, read-only, with its hash; fetched ones noted."""
    stage = tmp_path / "run"
    stage.mkdir()
    ref = _source(tmp_path, "before_2017-03-02.tif", b"\x00\x01 source bytes")
    fetched = SourceRef("wayback", "wayback-10 z17", url="https://example.test/{z}/{y}/{x}")
    entries = preserve_originals(stage, {"before:0": ref, "after:0": fetched})
    copy = stage / "originals" / "before-0_before_2017-03-02.tif"
    assert entries[0]["path"] == "originals/before-0_before_2017-03-02.tif"
    assert copy.read_bytes() == b"\x00\x01 source bytes"
    assert entries[0]["sha256"] == ref.sha256 and entries[0]["how"] == "copy"
    assert not copy.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    assert os.stat(copy).st_ino != os.stat(str(ref.path)).st_ino
    assert entries[1]["path"] is None and entries[1]["how"] == "not preserved"
    assert entries[1]["source_url"] == fetched.url


def test_preserve_originals_hard_links_large_files(tmp_path: Path) -> None:
    """Above the size limit, on one file system, the original is a hard link."""
    stage = tmp_path / "run"
    stage.mkdir()
    ref = _source(tmp_path, "big.tif", b"x" * 100)
    (entry,) = preserve_originals(stage, {"after:0": ref}, link_min_bytes=50)
    assert entry["how"] == "hardlink"
    assert os.stat(stage / entry["path"]).st_ino == os.stat(str(ref.path)).st_ino


@pytest.mark.parametrize("durable", [True, False])
def test_preserve_originals_flushes_its_copies_unless_told(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durable: bool) -> None:
    """The copies (not the hard links: the source's own bytes) are flushed to disk before
    preserve_originals returns; with durable=False they are left to the caller, and `copied`
    names them."""
    flushed: list[list[Path]] = []
    monkeypatch.setattr(originals, "sync_files", lambda paths: flushed.append(list(paths)))
    stage = tmp_path / "run"
    stage.mkdir()
    inputs = {"before:0": _source(tmp_path, "small.tif", b"x" * 10),
              "after:0": _source(tmp_path, "large.tif", b"y" * 100)}
    entries = preserve_originals(stage, inputs, link_min_bytes=50, durable=durable)
    assert [e["how"] for e in entries] == ["copy", "hardlink"]
    assert copied(stage, entries) == [stage / "originals" / "before-0_small.tif"]
    assert flushed == ([copied(stage, entries)] if durable else [])


def test_copied_names_copies_of_files_and_cache_entries_only(tmp_path: Path) -> None:
    """Copies of local files and of cache entries are flushed; hard links (the source's own
    bytes) and what was not preserved are not."""
    entries = [{"path": "originals/a.tif", "how": "copy"},
               {"path": "originals/b.tif", "how": "hardlink"},
               {"path": "originals/c.bin", "how": "copy of cache entry"},
               {"path": None, "how": "not preserved"}]
    assert copied(tmp_path, entries) == [tmp_path / "originals/a.tif",
                                         tmp_path / "originals/c.bin"]


def test_flush_copies_names_the_copy_that_failed(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A flush that fails is an OutputError naming the copy, as a failed copy is."""
    def flush(paths: list[Path]) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(originals, "sync_files", flush)
    with pytest.raises(OutputError, match=r"Cannot preserve the copy a\.tif in .*originals"):
        flush_copies(tmp_path, [{"path": "originals/a.tif", "how": "copy"}])


def test_preserve_originals_refuses_a_changed_input(tmp_path: Path) -> None:
    """An input whose bytes differ from the hash taken when read is an OutputError."""
    stage = tmp_path / "run"
    stage.mkdir()
    ref = _source(tmp_path, "before.tif", b"as read")
    Path(str(ref.path)).write_bytes(b"as read, then edited")
    with pytest.raises(OutputError, match="changed while the run was using it"):
        preserve_originals(stage, {"before:0": ref})


def _package(tmp_path: Path) -> Path:
    """A run folder with one output, one original, the manifest and its digest."""
    stage = tmp_path / "run"
    stage.mkdir()
    (stage / "changes.geojson").write_text('{"type": "FeatureCollection", "features": []}\n')
    ref = _source(tmp_path, "before.tif", b"original bytes")
    originals = preserve_originals(stage, {"before:0": ref})
    manifest = build_manifest(
        run_id="r", run_dir=stage, aoi={"id": "x"}, inputs={"before:0": ref},
        outputs=["changes.geojson"], config={}, params=DetectParams(), steps=[],
        started_utc=START, finished_utc=START, originals=originals)
    write_manifest(manifest, stage / "manifest.json")
    write_manifest_digest(stage)
    return stage


def test_verify_manifest_checks_originals(tmp_path: Path) -> None:
    """verify passes on a fresh folder and names an original whose byte changed."""
    stage = _package(tmp_path)
    assert verify_manifest(stage) == (True, [], [])
    original = stage / "originals" / "before-0_before.tif"
    original.chmod(0o644)
    data = bytearray(original.read_bytes())
    data[0] ^= 1
    original.write_bytes(bytes(data))
    ok, errors, _ = verify_manifest(stage)
    assert not ok and errors == ["originals/before-0_before.tif: changed (SHA-256 differs "
                                 "from the manifest)"]


def test_verify_manifest_checks_its_digest(tmp_path: Path) -> None:
    """A changed manifest no longer matches manifest.json.sha256."""
    stage = _package(tmp_path)
    path = stage / "manifest.json"
    path.write_text(path.read_text().replace('"run_id": "r"', '"run_id": "s"'))
    ok, errors, _ = verify_manifest(stage)
    assert not ok and "manifest.json: changed" in errors[0]


def test_preserve_originals_copies_tiles_from_the_cache(tmp_path: Path) -> None:
    """Fetched tiles are copied from their cache entries when the hash still matches."""
    from pipeline.fetch.base import FetchContext
    from pipeline.fetch.cache import cache_paths

    cache = tmp_path / "cache"
    tiles = []
    for x, data in ((10, b"tile ten"), (11, b"tile eleven"), (12, b"tile twelve")):
        url = f"http://127.0.0.1:1/wayback/17/20/{x}.jpg"
        body, _ = cache_paths(url, context=FetchContext(cache_dir=cache))
        body.parent.mkdir(parents=True, exist_ok=True)
        body.write_bytes(data)
        tiles.append({"z": 17, "x": x, "y": 20, "url": url, "sha256": sha256_file(body)})
    body.write_bytes(b"refetched, other bytes")  # the third entry changed since the run
    tiles.append({"z": 17, "x": 13, "y": 20, "url": "http://127.0.0.1:1/none", "sha256": None})
    ref = SourceRef("esri-wayback", "wayback-10 z17", url="http://127.0.0.1:1/{z}/{y}/{x}",
                    extra={"tiles": tiles})
    stage = tmp_path / "run"
    stage.mkdir()
    entries = preserve_originals(stage, {"after:0": ref}, cache_dir=cache)
    assert [e["how"] for e in entries] == ["copy of cache entry", "copy of cache entry",
                                           "not preserved"]
    assert entries[0]["path"] == "originals/after-0_tiles/17-10-20.jpg"
    assert (stage / entries[0]["path"]).read_bytes() == b"tile ten"
    assert entries[1]["sha256"] == sha256_file(stage / entries[1]["path"])
    assert entries[2]["path"] is None and "other bytes" in entries[2]["note"]


def test_preserve_originals_names_stac_assets_without_reads(tmp_path: Path) -> None:
    """A STAC item's asset with no recorded read is listed as not preserved, by its URL."""
    from pipeline.fetch.base import FetchContext
    from pipeline.fetch.cache import store_body
    from pipeline.fetch.http import Response

    stage = tmp_path / "run"
    stage.mkdir()
    context = FetchContext(cache_dir=tmp_path / "cache")
    key = "https://h.test/item/red.tif#bytes=0-3"
    stored = store_body(key, Response(key, key, 206, b"II*\x00", "image/tiff"), context=context)
    ref = SourceRef("stac", "item", url="https://h.test/items/item", extra={
        "assets": {"red": "https://h.test/item/red.tif", "scl": "s3://bucket/item/scl.tif"},
        "cog_reads": [{"url": "https://h.test/item/red.tif", "range": "0-3", "key": key,
                       "sha256": stored.sha256, "size_bytes": 4}]})
    entries = preserve_originals(stage, {"after:0": ref}, cache_dir=tmp_path / "cache")
    kept, missing = entries
    assert kept["path"] == "originals/after-0_cog/red.tif.bytes-0-3"
    assert (stage / kept["path"]).read_bytes() == b"II*\x00"
    assert missing["path"] is None and missing["how"] == "not preserved"
    assert missing["source_url"] == "s3://bucket/item/scl.tif"
