"""pipeline.fetch.cache: an on-disk, verified cache of HTTP bodies keyed by URL.

Layout under ``FetchContext.cache_dir``::

    http/ab/cd/<sha256 of the URL>.body   the body, byte for byte
    http/ab/cd/<sha256 of the URL>.json   {url, sha256, size, fetched_utc, content_type, ...}

Both files are written atomically (``files.atomic_path``), body first, so a killed run leaves
either a whole entry or none (a body without its sidecar is a miss). Every hit is verified: the
body's SHA-256 must match the sidecar, and it must still pass the body check; a corrupt entry is
logged, deleted and fetched again, never used.

Missing resources (404, 410, 204) are cached as negative entries (a sidecar with ``status`` and
no body) for ``NEGATIVE_TTL_S`` (7 days), so a rerun asks nothing for tiles known to be empty;
offline, negative entries are honoured whatever their age. Entries never expire otherwise,
unless the caller passes ``max_age_s`` (e.g. for a release list that grows).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.errors import FetchError
from pipeline.fetch.base import FetchContext
from pipeline.fetch.http import (
    MISSING_STATUS,
    Expect,
    HttpClient,
    NotFound,
    Response,
    check_body,
    check_url,
    map_concurrent,
)
from pipeline.files import atomic_path, is_disk_full

__all__ = ["CachedBody", "NEGATIVE_TTL_S", "cache_paths", "fetch_cached", "fetch_many_cached",
           "evict", "store_body"]

log = logging.getLogger(__name__)

NEGATIVE_TTL_S = 7 * 24 * 3600.0
FORMAT_VERSION = 1
_SHOW_MISSING = 10

Validate = Callable[[bytes], None]


@dataclass(frozen=True)
class CachedBody:
    """A verified body: from the cache (``from_cache``) or freshly fetched and stored.

    ``path`` is the cached body file, ``sha256`` the hex SHA-256 of ``content``.
    """

    url: str
    content: bytes
    sha256: str
    from_cache: bool
    path: Path
    content_type: str
    fetched_utc: str

    @property
    def size(self) -> int:
        """Body length in bytes."""
        return len(self.content)


@dataclass(frozen=True)
class _Missing:
    """A negative cache hit."""

    status: int


def cache_paths(url: str, *, context: FetchContext) -> tuple[Path, Path]:
    """``(body_path, sidecar_path)`` of ``url``'s entry (two-level fan-out by URL hash)."""
    _check_cache_root(Path(context.cache_dir))
    key = hashlib.sha256(url.encode("utf-8")).hexdigest()
    folder = Path(context.cache_dir) / "http" / key[:2] / key[2:4]
    return folder / f"{key}.body", folder / f"{key}.json"


def _check_cache_root(root: Path) -> None:
    """FetchError when the cache folder, or the nearest existing folder above it, is a file
    (every read and write under it would fail with NotADirectoryError).

    A root found good is not checked again in this process: walking up the folders took
    about 40 us, half of `cache_paths`' time, on every tile.
    """
    if root in _GOOD_ROOTS:
        return
    for path in (root, *root.parents):
        if path.exists():
            if not path.is_dir():
                raise FetchError(
                    f"The download cache {root} cannot be a folder: {path} is a file. Set "
                    "[fetch] cache_dir (or $SITEWATCH_CACHE) to a folder, or move that file.")
            _GOOD_ROOTS.add(root)
            return


_GOOD_ROOTS: set[Path] = set()  # cache roots `_check_cache_root` passed


def fetch_cached(url: str, *, context: FetchContext, client: HttpClient, expect: Expect = "any",
                 max_age_s: float | None = None, validate: Validate | None = None) -> CachedBody:
    """Return ``url``'s body from the cache, or fetch, check and store it.

    Parameters
    ----------
    url
        An http(s) URL; the cache key is its exact text.
    context
        ``cache_dir`` and ``offline``.
    client
        Used on a miss.
    expect
        Body check (see ``HttpClient.fetch``), applied to fresh and cached bodies.
    max_age_s
        Refetch entries older than this when online (``None``: never expire).
    validate
        Extra check of a fresh body; raising FetchError keeps it out of the cache.

    Returns
    -------
    CachedBody

    Raises
    ------
    NotFound
        The server said the URL does not exist (possibly remembered by a negative entry).
    FetchError
        Offline and not cached, or the fetch failed.
    """
    check_url(url)
    hit = _lookup(url, context=context, expect=expect, max_age_s=max_age_s)
    if isinstance(hit, CachedBody):
        return hit
    if isinstance(hit, _Missing):
        raise NotFound(url, hit.status, cached=True)
    if context.offline:
        raise FetchError(_offline_message([url], context))
    return _download(url, context=context, client=client, expect=expect, validate=validate)


def fetch_many_cached(urls: Iterable[str], *, context: FetchContext, client: HttpClient,
                      expect: Expect = "any",
                      validate: Validate | None = None) -> dict[str, CachedBody | None]:
    """``fetch_cached`` for many URLs, fetching misses at most ``max_concurrency`` at a time.

    Returns
    -------
    dict
        URL to ``CachedBody`` in the order given (duplicates once); ``None`` where the server
        said the URL does not exist.

    Raises
    ------
    FetchError
        Offline with misses (one message listing them), or a fetch failed.
    """
    unique = [check_url(u) for u in dict.fromkeys(urls)]
    found: dict[str, CachedBody | None] = {}
    misses = []
    for url in unique:
        hit = _lookup(url, context=context, expect=expect, max_age_s=None)
        if hit is None:
            misses.append(url)
        else:
            found[url] = hit if isinstance(hit, CachedBody) else None
    if misses and context.offline:
        raise FetchError(_offline_message(misses, context))

    def one(url: str) -> CachedBody | None:
        try:
            return _download(url, context=context, client=client, expect=expect,
                             validate=validate)
        except NotFound:
            return None

    fetched = map_concurrent(one, misses, max_workers=context.max_concurrency,
                             progress=context.progress)
    found.update(zip(misses, fetched, strict=True))
    log.debug("%d of %d URLs from the cache", len(unique) - len(misses), len(unique))
    return {url: found[url] for url in unique}


def evict(url: str, *, context: FetchContext) -> None:
    """Delete ``url``'s cache entry if there is one (e.g. a body that would not decode)."""
    body_path, meta_path = cache_paths(url, context=context)
    for path in (meta_path, body_path):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _lookup(url: str, *, context: FetchContext, expect: Expect,
            max_age_s: float | None) -> CachedBody | _Missing | None:
    """A verified hit, a live negative entry, or None (miss, stale or corrupt: deleted)."""
    body_path, meta_path = cache_paths(url, context=context)
    meta = _read_sidecar(url, meta_path)
    if meta is None:
        return None
    age_s = _age_s(meta.get("fetched_utc"))
    if meta.get("status") in MISSING_STATUS:
        if context.offline or age_s < NEGATIVE_TTL_S:
            return _Missing(int(meta["status"]))
        return None
    if not context.offline and max_age_s is not None and age_s > max_age_s:
        log.info("Cached %s is %.0f s old (limit %.0f s); fetching it again", url, age_s, max_age_s)
        return None
    try:
        body = body_path.read_bytes()
    except OSError as e:
        _corrupt(url, context, f"its body cannot be read ({e})")
        return None
    digest = hashlib.sha256(body).hexdigest()
    if digest != meta.get("sha256") or len(body) != meta.get("size"):
        _corrupt(url, context, f"SHA-256 {digest[:16]}... and {len(body)} bytes, expected "
                               f"{str(meta.get('sha256'))[:16]}... and {meta.get('size')}")
        return None
    try:
        check_body(url, body, str(meta.get("content_type", "")), expect=expect)
    except FetchError as e:
        _corrupt(url, context, str(e))
        return None
    return CachedBody(url, body, digest, True, body_path, str(meta.get("content_type", "")),
                      str(meta.get("fetched_utc", "")))


def _read_sidecar(url: str, meta_path: Path) -> dict[str, Any] | None:
    """The sidecar dict if it exists, parses and names ``url``; else None."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("Cache sidecar %s is unreadable (%s); deleting it", meta_path, e)
        meta_path.unlink(missing_ok=True)
        return None
    if not isinstance(meta, dict) or meta.get("url") != url:
        log.warning("Cache sidecar %s does not describe %s; deleting it", meta_path, url)
        meta_path.unlink(missing_ok=True)
        return None
    return meta


def _corrupt(url: str, context: FetchContext, why: str) -> None:
    """Log and delete a corrupt entry."""
    log.warning("Cached copy of %s is corrupt (%s); deleting it and fetching it again", url, why)
    evict(url, context=context)
    return None


def _download(url: str, *, context: FetchContext, client: HttpClient, expect: Expect,
              validate: Validate | None) -> CachedBody:
    """Fetch, check and store one URL (a NotFound is stored as a negative entry, then raised)."""
    try:
        response = client.fetch(url, expect=expect)
    except NotFound as e:
        _store_missing(url, e.status, context)
        raise
    if validate is not None:
        validate(response.content)
    return _store(url, response, context)


def store_body(key: str, response: Response, *, context: FetchContext) -> CachedBody:
    """Store a body fetched elsewhere (e.g. a COG range GDAL read) under ``key``.

    ``key`` is any string naming the body uniquely (for a range: ``href#bytes=a-b``);
    ``cache_paths(key)`` finds it again. Raises FetchError when the disk refuses it.
    """
    return _store(key, response, context)


def _store(url: str, response: Response, context: FetchContext) -> CachedBody:
    """Write body then sidecar atomically; return the stored entry."""
    body_path, meta_path = cache_paths(url, context=context)
    body_path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(response.content).hexdigest()
    fetched = _now()
    meta = {"format": FORMAT_VERSION, "url": url, "final_url": response.final_url,
            "status": response.status, "sha256": digest, "size": len(response.content),
            "content_type": response.content_type, "fetched_utc": fetched}
    try:
        with atomic_path(body_path, overwrite=True) as tmp:
            tmp.write_bytes(response.content)
        _write_json(meta_path, meta)
    except OSError as e:
        with contextlib.suppress(OSError):
            body_path.unlink(missing_ok=True)  # never a body without its sidecar
        fix = ("The disk is full: free some space there, or set [fetch] cache_dir (or "
               "$SITEWATCH_CACHE) to a folder on another disk." if is_disk_full(e) else
               "Check that folder, or set [fetch] cache_dir (or $SITEWATCH_CACHE) elsewhere.")
        raise FetchError(f"Cannot store {url} in the download cache {context.cache_dir}: "
                         f"{e.strerror or e}. {fix}") from e
    return CachedBody(url, response.content, digest, False, body_path, response.content_type,
                      fetched)


def _store_missing(url: str, status: int, context: FetchContext) -> None:
    """Write a negative entry (sidecar only) for a URL the server says does not exist."""
    body_path, meta_path = cache_paths(url, context=context)
    meta_path.parent.mkdir(parents=True, exist_ok=True)
    body_path.unlink(missing_ok=True)
    _write_json(meta_path, {"format": FORMAT_VERSION, "url": url, "status": status,
                            "fetched_utc": _now(), "ttl_s": NEGATIVE_TTL_S})


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically write a JSON sidecar."""
    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")


def _offline_message(urls: list[str], context: FetchContext) -> str:
    """One message naming every URL an offline run lacks."""
    shown = ", ".join(urls[:_SHOW_MISSING])
    more = f" and {len(urls) - _SHOW_MISSING} more" if len(urls) > _SHOW_MISSING else ""
    what = f"offline and not cached: {shown}" if len(urls) == 1 else (
        f"offline and {len(urls)} URLs are not cached: {shown}{more}")
    return (f"{what}; run once online first (without --offline) to fill the cache at "
            f"{context.cache_dir}.")


def _now() -> str:
    """Current UTC time, ISO 8601 with a Z."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _age_s(fetched_utc: Any) -> float:
    """Seconds since an ISO UTC timestamp; infinite when it cannot be parsed."""
    try:
        when = datetime.strptime(str(fetched_utc), "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    except ValueError:
        return float("inf")
    return (datetime.now(UTC) - when).total_seconds()
