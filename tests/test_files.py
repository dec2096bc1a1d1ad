"""pipeline.files: the one full-disk test every writer uses; atomic writes and their flush."""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from pipeline import files
from pipeline.errors import FetchError
from pipeline.files import atomic_path, is_disk_full, sync_files


def _sqlite_error(tmp_path: Path, *, fill: bool) -> sqlite3.Error:
    """A real SQLite error: a write past ``max_page_count`` (full) or a syntax error."""
    con = sqlite3.connect(tmp_path / f"{fill}.db")
    try:
        con.execute("CREATE TABLE t (x BLOB)")
        con.execute("PRAGMA max_page_count = 3")
        with pytest.raises(sqlite3.Error) as caught:
            if fill:
                con.execute("INSERT INTO t VALUES (?)", (b"x" * 100_000,))
            else:
                con.execute("SELEC 1")
        return caught.value
    finally:
        con.close()


def test_is_disk_full_os_errors_by_errno() -> None:
    """ENOSPC and EDQUOT are a full disk; a refused permission or a missing file are not."""
    assert is_disk_full(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    assert is_disk_full(OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)))
    assert not is_disk_full(PermissionError(errno.EACCES, os.strerror(errno.EACCES)))
    assert not is_disk_full(FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT)))


def test_is_disk_full_real_write_to_dev_full() -> None:
    """The error the kernel gives a write to /dev/full (always full) is recognised."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    with pytest.raises(OSError) as caught, open("/dev/full", "wb", buffering=0) as fh:
        fh.write(b"x")
    assert is_disk_full(caught.value)


def test_is_disk_full_sqlite_by_result_code(tmp_path: Path) -> None:
    """SQLITE_FULL (a write past the page limit) is a full disk; a syntax error is not."""
    full = _sqlite_error(tmp_path, fill=True)
    assert full.sqlite_errorcode == sqlite3.SQLITE_FULL  # type: ignore[attr-defined]
    assert is_disk_full(full)
    assert not is_disk_full(_sqlite_error(tmp_path, fill=False))


def test_is_disk_full_message_without_errno() -> None:
    """GDAL's full disk has no errno (only text); other messages without errno are not full."""
    assert is_disk_full(RuntimeError("Write error: No space left on device"))
    assert is_disk_full(FetchError("Cannot store x: No space left on device. Free space."))
    assert not is_disk_full(RuntimeError("TIFFWriteEncodedTile: write failed"))
    assert not is_disk_full(ValueError("bad value"))


def test_is_disk_full_errno_wins_over_text() -> None:
    """An OS error with another errno is not a full disk because its text mentions space."""
    assert not is_disk_full(OSError(errno.EACCES, "disk space reserved for root"))


@pytest.mark.parametrize("durable", [True, False])
def test_atomic_path_flushes_before_the_rename_unless_told(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durable: bool) -> None:
    """The temporary file is flushed (fsync) before it takes the final name; with
    durable=False it is not (the caller flushes it later)."""
    flushed: list[tuple[str, bool]] = []
    target = tmp_path / "out.txt"

    def record(paths: list[Path]) -> None:
        flushed.extend((Path(p).name, target.exists()) for p in paths)

    monkeypatch.setattr(files, "sync_files", record)
    with atomic_path(target, durable=durable) as tmp:
        tmp.write_text("evidence")
    assert target.read_text() == "evidence"
    assert flushed == ([(tmp.name, False)] if durable else [])


def test_sync_files_flushes_read_only_files_and_raises_for_missing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Read-only copies (as the originals are) can be flushed: the file is opened for reading
    only (root may open a 0444 file for writing, so the mode is checked, not just the call);
    a missing file is an error."""
    copy = tmp_path / "copy.tif"
    copy.write_bytes(b"bytes")
    copy.chmod(0o444)
    modes: list[str] = []

    def recording_open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        modes.append(mode)
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(files, "open", recording_open, raising=False)
    sync_files([copy])
    assert modes == ["rb"]
    with pytest.raises(FileNotFoundError):
        sync_files([tmp_path / "gone.tif"])
