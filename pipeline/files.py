"""pipeline.files: hashing, atomic file writes and the full-disk test shared by every writer."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["sha256_file", "atomic_path", "atomic_write_bytes", "atomic_write_text",
           "sync_files", "is_disk_full", "is_utf8"]

_CHUNK = 1 << 20
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# GDAL (through rasterio) reports a full disk in its message text only, without an errno
_DISK_FULL_TEXTS = ("No space left", "disk space")


def is_utf8(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8: a path holding bytes that are not (Python keeps them
    as lone surrogates) cannot be passed to GDAL nor written into the UTF-8 manifest."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | Path, *, overwrite: bool = False, durable: bool = True
                ) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    The temporary file lives in the same folder (same file system), so the final
    ``os.replace`` is atomic: readers see the old file or the whole new one, never a part.
    With ``overwrite=False`` an existing ``path`` raises ``FileExistsError`` before anything
    is written. The file is flushed to disk (fsync) before the rename; with
    ``durable=False`` it is not, and the caller flushes it (`sync_files`) before anything
    depends on its surviving a crash (e.g. inside a staged run folder, before publishing).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; refusing to overwrite it")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    # mkstemp creates 0600; evidence is meant to be shared, so use the usual umask mode.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_name, 0o666 & ~umask)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if durable:
            sync_files([tmp])
        if not overwrite and path.exists():
            raise FileExistsError(f"{path} appeared while writing; refusing to overwrite it")
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def sync_files(paths: Iterable[str | Path]) -> None:
    """Flush each file's bytes to disk (fsync); an OSError (e.g. EIO) propagates."""
    for path in paths:
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())


def atomic_write_bytes(path: str | Path, data: bytes, *, overwrite: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically; return the path."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, *, overwrite: bool = False) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; return the path."""
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` says the disk (or the user's quota) is full.

    True for an ``OSError`` with ``ENOSPC`` or ``EDQUOT``, a SQLite error whose result code is
    ``SQLITE_FULL``, and an error without an errno whose message says so (GDAL's, e.g.
    "No space left on device"; rasterio's ``CPLE_*`` errors carry GDAL's error class, not an
    OS errno). Callers name the full disk and how to free it; anything else is a different
    failure.
    """
    if isinstance(error, sqlite3.Error):
        code = getattr(error, "sqlite_errorcode", None)
        return code is not None and code & 0xFF == sqlite3.SQLITE_FULL
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno in _DISK_FULL_ERRNOS
    return any(text in str(error) for text in _DISK_FULL_TEXTS)
