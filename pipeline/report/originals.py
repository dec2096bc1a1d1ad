"""pipeline.report.originals: the source bytes of a run, preserved apart from derived files.

``originals/`` holds each local input file exactly as the run read it (a byte copy, or a hard
link for very large files on the same file system), under ``originals/<role>-<n>_<name>``,
made read-only. Its SHA-256 must equal the one recorded when the run read the file: a file
changed in between is an error, never silently preserved. The manifest lists every original
(``originals`` member) and ``sitewatch verify`` re-hashes them like the outputs.

Tiles of an XYZ or Wayback input are preserved from the download cache: each tile the run
used (``ref.extra["tiles"]``: ``{z, x, y, url, sha256}``) is copied from its cache entry to
``originals/<role>-<n>_tiles/<z>-<x>-<y><ext>`` when the entry still has the recorded hash;
a tile whose entry is gone or differs is listed as not preserved, with the reason. A STAC
input was read window by window over HTTP and is not copied; its entry names the URL and
item, so the data can be fetched again.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.errors import OutputError
from pipeline.fetch.base import FetchContext
from pipeline.fetch.cache import cache_paths
from pipeline.files import atomic_path, sha256_file
from pipeline.model import SourceRef

__all__ = ["ORIGINALS_DIR", "LINK_MIN_BYTES", "preserve_originals"]

log = logging.getLogger(__name__)

ORIGINALS_DIR = "originals"
LINK_MIN_BYTES = 1 << 30  # from 1 GiB, hard-link instead of copying (same file system only)


def preserve_originals(stage: Path, inputs: Mapping[str, SourceRef], *,
                       link_min_bytes: int = LINK_MIN_BYTES,
                       cache_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Copy (or hard-link) every local input into ``stage/originals``; describe each input.

    Parameters
    ----------
    stage
        The run folder being written.
    inputs
        ``{"before:0": ref, ...}`` as the run read them (``ref.sha256`` is the hash then).
    link_min_bytes
        Files of at least this size are hard-linked when on the same file system.
    cache_dir
        The download cache the run fetched through; tiles are copied from it.

    Returns
    -------
    list of dict
        One entry per input file or tile: ``input`` (its key), ``path`` (relative, or None
        when not preserved), ``sha256``, ``size_bytes``, ``how`` (``copy``, ``hardlink``,
        ``copy of cache entry`` or ``not preserved``), ``source_path``, ``source_url``,
        ``note``.

    Raises
    ------
    OutputError
        A local input's bytes changed since the run read it, or it cannot be copied.
    """
    entries = []
    for key, ref in inputs.items():
        tiles = (ref.extra or {}).get("tiles")
        if ref.path:
            entries.append(_preserve(stage, key, ref, link_min_bytes))
        elif isinstance(tiles, list) and tiles and cache_dir is not None:
            entries += [_preserve_tile(stage, key, tile, Path(cache_dir)) for tile in tiles
                        if isinstance(tile, dict) and tile.get("sha256")]
        else:
            entries.append({"input": key, "path": None, "sha256": ref.sha256,
                            "size_bytes": None, "how": "not preserved",
                            "source_path": None, "source_url": ref.url,
                            "note": "fetched over HTTP window by window; fetch again from "
                                    "source_url"})
    return entries


def _preserve(stage: Path, key: str, ref: SourceRef, link_min_bytes: int) -> dict[str, Any]:
    """Copy or link one local input and check its hash."""
    source = Path(str(ref.path))
    rel = f"{ORIGINALS_DIR}/{key.replace(':', '-')}_{source.name}"
    target = stage / rel
    target.parent.mkdir(exist_ok=True)
    size = source.stat().st_size
    how = "copy"
    try:
        if size >= link_min_bytes and _same_device(source, target.parent):
            os.link(source, target)
            how = "hardlink"
        else:
            _copy_read_only(source, target)
    except OSError as e:
        raise _cannot_preserve(f"the input {source}", target, e) from e
    digest = sha256_file(target)
    if ref.sha256 and digest != ref.sha256:
        raise OutputError(
            f"The input {source} changed while the run was using it (SHA-256 {digest[:12]}… "
            f"now, {ref.sha256[:12]}… when read): the evidence would not match its source. "
            "Keep the input unchanged and run again."
        )
    log.info("Preserved %s as %s (%s, %d bytes)", source, rel, how, size)
    return {"input": key, "path": rel, "sha256": digest, "size_bytes": size, "how": how,
            "source_path": str(source), "source_url": ref.url,
            "note": "hard link: the same bytes as source_path; never edit either" if
                    how == "hardlink" else None}


def _preserve_tile(stage: Path, key: str, tile: dict[str, Any], cache_dir: Path
                   ) -> dict[str, Any]:
    """Copy one tile's cache entry if it still holds the bytes the run used."""
    url, recorded = str(tile["url"]), str(tile["sha256"])
    body, _ = cache_paths(url, context=FetchContext(cache_dir=cache_dir))
    entry: dict[str, Any] = {"input": key, "path": None, "sha256": recorded, "size_bytes": None,
                             "how": "not preserved", "source_path": str(body),
                             "source_url": url, "note": None}
    if not body.is_file():
        entry["note"] = "the cache entry is gone (evicted or cleared); fetch source_url again"
        return entry
    digest = sha256_file(body)
    if digest != recorded:
        entry["note"] = (f"the cache entry now holds other bytes (SHA-256 {digest[:12]}…); "
                         "the tile the run used is not available")
        return entry
    suffix = Path(url.split("?")[0]).suffix[:5] if "." in url.rsplit("/", 1)[-1] else ""
    rel = (f"{ORIGINALS_DIR}/{key.replace(':', '-')}_tiles/"
           f"{tile.get('z')}-{tile.get('x')}-{tile.get('y')}{suffix}")
    target = stage / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        _copy_read_only(body, target)
    except OSError as e:
        raise _cannot_preserve(f"the tile {url}", target, e) from e
    return {**entry, "path": rel, "size_bytes": target.stat().st_size,
            "how": "copy of cache entry"}


def _same_device(a: Path, b: Path) -> bool:
    """Whether two paths are on one file system (a hard link is possible)."""
    return a.stat().st_dev == b.stat().st_dev


def _copy_read_only(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` atomically and make the copy read-only."""
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
    target.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)


def _cannot_preserve(what: str, target: Path, error: OSError) -> OutputError:
    return OutputError(f"Cannot preserve {what} in {target}: {error}. Choose another --out "
                       "with room for the originals.")
