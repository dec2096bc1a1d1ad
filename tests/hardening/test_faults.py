"""Faults while writing and fetching: disk full at several points of the run-folder write, a
server that drops the connection mid-body. Nothing partial is left under OUT or in the cache,
the message says what happened and what to do, and the next run succeeds."""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fetch.test_wayback import FakeWayback
from rasterio.errors import RasterioIOError
from test_cli_fetch import AOI as FETCH_AOI
from test_cli_fetch import _config

from hardening._inputs import AOI, RADIUS_M, assert_clean_outcome, invoke
from pipeline.cli import SEED_AFTER, SEED_BEFORE
from pipeline.report.manifest import verify_manifest

# (module attribute, how the fake failure looks): each writes part of its file, then fails.
WRITE_POINTS = [
    ("pipeline.report.package.write_chips", "enospc"),
    ("pipeline.report.package.write_geojson", "enospc"),
    ("pipeline.report.package.write_cog", "gdal"),
    ("pipeline.report.package.write_gpkg", "enospc"),
    ("pipeline.report.package.atomic_write_text", "edquot"),
    ("pipeline.report.package.write_report", "enospc"),
    ("pipeline.run.write_manifest", "enospc"),
    ("pipeline.run.write_manifest_digest", "enospc"),
]


def _detect(out: Path) -> Any:
    return invoke(["detect", "--aoi", AOI, "--radius-m", RADIUS_M, "--before", str(SEED_BEFORE),
                   "--after", str(SEED_AFTER), "--out", str(out), "-q"])


def _failing(kind: str, written: list[Path]) -> Callable[..., Any]:
    """A writer that leaves a partial file in the run folder, then fails as a full disk does."""

    def write(*args: Any, **kwargs: Any) -> Any:
        target = next((a for a in args if isinstance(a, Path)), None)
        if target is not None:
            partial = target / "partial.bin" if target.is_dir() else target
            partial.write_bytes(b'{"type": "FeatureColl')
            written.append(partial)
        if kind == "gdal":
            raise RasterioIOError("Free disk space available is 0 bytes, whereas 1048576 are "
                                  "at least necessary. No space left on device")
        code = errno.EDQUOT if kind == "edquot" else errno.ENOSPC
        raise OSError(code, os.strerror(code))

    return write


def _files_under(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*") if p.is_file())


@pytest.mark.parametrize(("target", "kind"), WRITE_POINTS,
                         ids=[t.rsplit(".", 1)[1] for t, _ in WRITE_POINTS])
def test_disk_full_while_writing_leaves_nothing_and_next_run_works(
        target: str, kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Disk full at one writer: exit 1 naming the full disk and the fix, no file left under
    OUT; the next run writes a complete run folder that verifies."""
    out = tmp_path / "out"
    written: list[Path] = []
    monkeypatch.setattr(target, _failing(kind, written))
    result = _detect(out)
    assert_clean_outcome(result, allow_success=False)
    assert result.exit_code == 1, result.output
    message = result.output.lower()
    assert "full" in message and "free" in message, result.output
    assert str(out) in result.output, result.output
    assert written, "the fake writer was never reached"
    assert _files_under(out) == [], _files_under(out)
    monkeypatch.undo()
    again = _detect(out)
    assert again.exit_code == 0, again.output
    (run_dir,) = [p for p in out.glob("*/*") if p.is_dir()]
    ok, errors, _ = verify_manifest(run_dir)
    assert ok, errors


def test_other_write_error_names_the_folder(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Another OS error while writing (EIO) is an OutputError naming it, not a traceback."""
    out = tmp_path / "out"

    def broken(*_: Any, **__: Any) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr("pipeline.report.package.write_geojson", broken)
    result = _detect(out)
    assert_clean_outcome(result, allow_success=False)
    assert result.exit_code == 1 and "Input/output error" in result.output, result.output
    assert _files_under(out) == []


def _cache_files(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("*") if p.is_file()) if cache.exists() else []


def _wayback_detect(config: Path, out: Path) -> list[str]:
    """CLI arguments of a detect run from the loopback Wayback (two dated releases)."""
    return ["detect", *FETCH_AOI, "--source", "test-wayback", "--config", str(config),
            "--out", str(out), "-q", "--before-date", "2017-03-01/2017-06-30",
            "--after-date", "2018-10-01/2018-12-31"]


def test_server_drops_connection_mid_body(fake: FakeWayback, tmp_path: Path) -> None:
    """Every tile body cut half-way: detect fails with a fetch message, nothing lands in OUT,
    the cache keeps no body of a cut tile; once the server is healthy the run succeeds."""
    config = _config(fake, tmp_path)
    tiles = [p for p in fake.server.files if p.startswith("/tile/")]
    for path in tiles:
        fake.server.fault(path, "truncate")
    out = tmp_path / "out"
    args = _wayback_detect(config, out)
    result = invoke(args)
    assert_clean_outcome(result, allow_success=False)
    assert result.exit_code == 1, result.output
    # the message names a cut tile, says its body was cut off on every attempt, and the fix
    said = re.search(r"Could not fetch http://127\.0\.0\.1:\d+(/tile/\S+): the body was cut "
                     r"off\b.*? (once|twice|\w+ times); the connection or the server is "
                     r"unreliable\. Try again later or use --offline with a cache\.",
                     " ".join(result.output.split()))
    assert said and said.group(1) in tiles, result.output
    assert not out.exists() or _files_under(out) == []
    cache = tmp_path / "cache"
    cut = {len(body) for path, (body, _) in fake.server.files.items() if path in tiles}
    for entry in _cache_files(cache):
        assert not entry.name.endswith((".part", ".tmp")), entry
        assert entry.stat().st_size not in {n // 2 for n in cut}, f"half a tile cached: {entry}"
    fake.server.faults.clear()
    again = invoke(args)
    assert again.exit_code == 0, again.output
    assert len([p for p in out.glob("*/*") if p.is_dir()]) == 1


def test_disk_already_full_fails_before_reading(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk at the write probe stops the run before any input is read, saying so."""
    def full(*_: Any, **__: Any) -> Any:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("pipeline.report.rundir.tempfile.mkstemp", full)
    read: list[int] = []
    monkeypatch.setattr("pipeline.run.read_to_grid", lambda *a, **k: read.append(1))
    result = _detect(tmp_path / "out")
    assert_clean_outcome(result, allow_success=False)
    assert result.exit_code == 1 and "disk is full" in result.output, result.output
    assert not read


@pytest.mark.parametrize("where", ["body", "sidecar"])
def test_cache_full_keeps_no_partial_entry(where: str, fake: FakeWayback,
                                           tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk while storing a download: exit 1 saying the disk is full, no temporary
    file and no body without its sidecar in the cache; the next run fills it and succeeds."""
    import pipeline.fetch.cache as cache_module

    real_atomic = cache_module.atomic_path

    def full(*_: Any, **__: Any) -> Any:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if where == "sidecar":
        monkeypatch.setattr(cache_module, "_write_json", full)
    else:
        from contextlib import contextmanager

        @contextmanager
        def half_written(path: Path, **kwargs: Any) -> Any:
            with real_atomic(path, **kwargs) as tmp:
                yield tmp
                tmp.write_bytes(tmp.read_bytes()[:10])
                full()

        monkeypatch.setattr(cache_module, "atomic_path", half_written)
    config = _config(fake, tmp_path)
    out = tmp_path / "out"
    args = _wayback_detect(config, out)
    result = invoke(args)
    assert_clean_outcome(result, allow_success=False)
    assert result.exit_code == 1 and "full" in result.output.lower(), result.output
    assert not out.exists() or _files_under(out) == []
    entries = _cache_files(tmp_path / "cache")
    assert not [p for p in entries if p.name.endswith(".part")], entries
    sidecars = {p.name for p in entries if p.suffix == ".json"}
    bodies = [p for p in entries if p.suffix != ".json"]
    assert all(any(s.startswith(p.name) or s.startswith(p.stem) for s in sidecars)
               for p in bodies), entries
    monkeypatch.undo()
    again = invoke(args)
    assert again.exit_code == 0, again.output
