"""pipeline.report.originals: the source bytes of a run, preserved apart from derived files.

``originals/`` holds each local input file exactly as the run read it (a byte copy, or a hard
link for very large files on the same file system), under ``originals/<role>-<n>_<name>``,
made read-only. Its SHA-256 must equal the one recorded when the run read the file: a file
changed in between is an error, never silently preserved. The manifest lists every original
(``originals`` member) and ``sitewatch verify`` re-hashes them like the outputs.

Fetched inputs are preserved from the download cache, each body copied from its cache entry
only while that entry still has the SHA-256 recorded when the run fetched it (else it is
listed as not preserved, with the reason):

- an XYZ or Wayback input: each tile the run used (``ref.extra["tiles"]``: ``{z, x, y, url,
  sha256}``) as ``originals/<role>-<n>_tiles/<z>-<x>-<y><ext>``;
- a STAC item: the search result page(s) of the STAC API that listed it (JSON as served:
  ``ref.extra["stac_pages"]``) as ``originals/<role>-<n>_stac/search-<hash>.json``; and
  each HTTP body GDAL received while reading the item's COGs for the AOI window
  (``ref.extra["cog_reads"]``: ``{url, range, key, sha256, ...}``, kept by
  ``fetch.stac_record``) as ``originals/<role>-<n>_cog/<asset file>.bytes-<first>-<last>``:
  the bytes at that range of the asset file exactly as the server sent them (the file's
  header and the compressed blocks under the window), not the whole file and not decoded
  pixels. Items read but left out of the composite (no clear pixel) are not inputs of the
  run and are not kept. A STAC item with no recorded reads (a composite cached by an older
  version) is listed as not preserved, naming its URL.
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
from pipeline.files import atomic_path, sha256_file, sync_files
from pipeline.model import SourceRef

__all__ = ["ORIGINALS_DIR", "LINK_MIN_BYTES", "preserve_originals", "copied", "flush_copies"]

log = logging.getLogger(__name__)

ORIGINALS_DIR = "originals"
LINK_MIN_BYTES = 1 << 30  # from 1 GiB, hard-link instead of copying (same file system only)


def preserve_originals(stage: Path, inputs: Mapping[str, SourceRef], *,
                       link_min_bytes: int = LINK_MIN_BYTES,
                       cache_dir: str | Path | None = None,
                       durable: bool = True) -> list[dict[str, Any]]:
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
    durable
        Flush the copies to disk (fsync) before returning. With False the caller flushes
        them itself (`flush_copies`), e.g. while it writes on.

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
        A local input's bytes changed since the run read it, or it cannot be copied or
        flushed to disk.
    """
    entries = []
    for key, ref in inputs.items():
        fetched = _fetched_bodies(key, ref)
        if ref.path:
            entries.append(_preserve(stage, key, ref, link_min_bytes))
        elif fetched and cache_dir is not None:
            entries += [_preserve_cached(stage, key, body, Path(cache_dir))
                        for body in fetched]
            entries += _unread_assets(key, ref)
        else:
            entries.append({"input": key, "path": None, "sha256": ref.sha256,
                            "size_bytes": None, "how": "not preserved",
                            "source_path": None, "source_url": ref.url,
                            "note": "the bytes read were not recorded (or no cache was "
                                    "given); fetch again from source_url"})
    if durable:
        flush_copies(stage, entries)
    return entries


def copied(stage: Path, entries: list[dict[str, Any]]) -> list[Path]:
    """The files `preserve_originals` copied into ``stage`` (not its hard links: those are
    the source's own bytes)."""
    return [stage / e["path"] for e in entries if e["path"] and e["how"] != "hardlink"]


def flush_copies(stage: Path, entries: list[dict[str, Any]]) -> None:
    """Flush the `copied` files to disk (fsync), one by one.

    Raises
    ------
    OutputError
        A flush failed (an I/O error, or a full disk or quota on file systems that report it
        only then), naming the copy.
    """
    for path in copied(stage, entries):
        try:
            sync_files([path])
        except OSError as e:
            raise _cannot_preserve(f"the copy {path.name}", path.parent, e) from e


def _unread_assets(key: str, ref: SourceRef) -> list[dict[str, Any]]:
    """A "not preserved" entry for each COG of a STAC item with no recorded read."""
    extra = ref.extra or {}
    if not isinstance(extra.get("cog_reads"), list) or not isinstance(extra.get("assets"), dict):
        return []
    read = {r.get("url") for r in extra["cog_reads"] if isinstance(r, dict)}
    return [{"input": key, "path": None, "sha256": None, "size_bytes": None,
             "how": "not preserved", "source_path": None, "source_url": str(href),
             "note": "no read of this asset was recorded (not an http(s) URL, or a composite "
                     "cached by an older version); fetch again from source_url"}
            for href in dict.fromkeys(extra["assets"].values()) if href not in read]


def _fetched_bodies(key: str, ref: SourceRef) -> list[dict[str, Any]]:
    """The cached bodies an input was made from: ``{cache_key, sha256, url, rel, note}``."""
    extra, role = ref.extra or {}, key.replace(":", "-")
    tiles, reads = extra.get("tiles"), extra.get("cog_reads")
    bodies = []
    for tile in tiles if isinstance(tiles, list) else []:
        if isinstance(tile, dict) and tile.get("sha256"):
            url = str(tile["url"])
            suffix = Path(url.split("?")[0]).suffix[:5] if "." in url.rsplit("/", 1)[-1] else ""
            bodies.append({"cache_key": url, "sha256": str(tile["sha256"]), "url": url,
                           "rel": f"{ORIGINALS_DIR}/{role}_tiles/{tile.get('z')}-"
                                  f"{tile.get('x')}-{tile.get('y')}{suffix}",
                           "note": "the tile as the server sent it"})
    pages = extra.get("stac_pages")
    for page in pages if isinstance(pages, list) else []:
        if isinstance(page, dict) and page.get("sha256") and page.get("url"):
            bodies.append({"cache_key": str(page["url"]), "sha256": str(page["sha256"]),
                           "url": str(page["url"]),
                           "rel": f"{ORIGINALS_DIR}/{role}_stac/search-"
                                  f"{str(page['sha256'])[:16]}.json",
                           "note": "the STAC API's search result page that listed this item "
                                   "(its metadata and asset links), as the server sent it"})
    for read in reads if isinstance(reads, list) else []:
        if isinstance(read, dict) and read.get("sha256") and read.get("key"):
            url, span = str(read["url"]), str(read.get("range", "all"))
            name = Path(url.split("?")[0]).name or "asset"
            bodies.append({"cache_key": str(read["key"]), "sha256": str(read["sha256"]),
                           "url": url, "range": span,
                           "rel": f"{ORIGINALS_DIR}/{role}_cog/{name}.bytes-{span}",
                           "note": f"bytes {span} of source_url exactly as the server sent "
                                   "them to GDAL (the header and the compressed blocks read "
                                   "for the AOI window; not the whole file, not decoded)"})
    return list({b["rel"]: b for b in bodies}.values())  # a range GDAL read twice: once


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


def _preserve_cached(stage: Path, key: str, body: dict[str, Any], cache_dir: Path
                     ) -> dict[str, Any]:
    """Copy one fetched body's cache entry if it still holds the bytes the run used."""
    url, recorded = body["url"], body["sha256"]
    cached, _ = cache_paths(body["cache_key"], context=FetchContext(cache_dir=cache_dir))
    entry: dict[str, Any] = {"input": key, "path": None, "sha256": recorded, "size_bytes": None,
                             "how": "not preserved", "source_path": str(cached),
                             "source_url": url, "note": None}
    if "range" in body:
        entry["range"] = body["range"]
    if not cached.is_file():
        entry["note"] = "the cache entry is gone (evicted or cleared); fetch source_url again"
        return entry
    target = stage / body["rel"]
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        _copy_read_only(cached, target)
    except OSError as e:
        raise _cannot_preserve(f"the body of {url}", target, e) from e
    # hash the copy, not the cache entry: another run may rewrite the entry meanwhile
    digest = sha256_file(target)
    if digest != recorded:
        target.unlink()
        entry["note"] = (f"the cache entry now holds other bytes (SHA-256 {digest[:12]}…); "
                         "the bytes the run used are not available")
        return entry
    return {**entry, "path": body["rel"], "size_bytes": target.stat().st_size,
            "how": "copy of cache entry", "note": body["note"]}


def _same_device(a: Path, b: Path) -> bool:
    """Whether two paths are on one file system (a hard link is possible)."""
    return a.stat().st_dev == b.stat().st_dev


def _copy_read_only(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` atomically and make the copy read-only (flushed to disk
    by `preserve_originals`)."""
    with atomic_path(target, durable=False) as tmp:
        shutil.copyfile(source, tmp)
    target.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)


def _cannot_preserve(what: str, target: Path, error: OSError) -> OutputError:
    return OutputError(f"Cannot preserve {what} in {target}: {error}. Choose another --out "
                       "with room for the originals.")
