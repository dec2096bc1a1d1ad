"""pipeline.fetch.wayback: Esri World Imagery Wayback releases onto the working grid.

Wayback publishes the World Imagery mosaic as numbered releases. Release numbers are not in
date order, and most releases carry the same imagery as the one before at any one place, so:

1. the release list (``config_url``, waybackconfig.json) is read and each release dated from
   its title ("World Imagery (Wayback 2017-03-02)");
2. the ``tilemap`` endpoint is walked from the newest release back: its ``select`` names the
   release in which the imagery at the AOI's centre tile last changed, so the candidates are
   the distinct imagery versions, each dated by the release that introduced it;
3. the candidate for a window is the one released nearest the window's middle among those
   released inside it; if none was, the version Wayback showed during the window (the last
   one released before it); if the window predates every version, the first one, with a
   ``ProvenanceWarning``;
4. the acquisition metadata (``SRC_DATE2``, provider, resolution, accuracy) is read from the
   release's metadata MapServer, layer ``23 - zoom`` (10..23 -> 13..0), at the AOI's centre;
5. tiles are fetched and warped exactly as for XYZ sources (``pipeline.fetch.xyz``).

The release date and the acquisition date are both kept: ``SourceRef.release`` is
``"YYYY-MM-DD (release N)"`` and ``SourceRef.acquired`` the ``SRC_DATE2`` date, or ``None`` with
a ``ProvenanceWarning``. Every host fetched comes from ``configs/sources.toml``: the release
list only contributes numbers, dates and metadata service names.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

import mercantile

from pipeline.errors import ConfigError, FetchError, NoValidDataError, ProvenanceWarning
from pipeline.fetch.base import DateWindow, FetchContext, Scene, SourceConfig
from pipeline.fetch.cache import fetch_cached
from pipeline.fetch.http import HttpClient
from pipeline.fetch.xyz import (
    WEB_MERCATOR,
    TileOptions,
    centre_lonlat,
    choose_zoom,
    fetch_tiles,
    mosaic_info,
    scene_array,
    tile_options,
    with_client,
)
from pipeline.model import GridPlan, SourceRef

__all__ = ["Release", "ImageryMetadata", "parse_releases", "list_releases",
           "distinct_releases", "pick_release", "read_metadata", "fetch", "same_imagery",
           "check_distinct"]

log = logging.getLogger(__name__)

_TITLE_DATE = re.compile(r"(\d{4}-\d{2}-\d{2})")
_SERVICE = re.compile(r"/services/([^/]+)/MapServer", re.IGNORECASE)
_METADATA_MAX_ZOOM, _METADATA_MIN_ZOOM = 23, 10
_EARLIEST = date(1970, 1, 1)


@dataclass(frozen=True)
class Release:
    """One Wayback release: number, release date (from its title) and metadata service name."""

    number: int
    released: date
    title: str
    item_url: str = ""
    metadata_service: str | None = None


@dataclass(frozen=True)
class ImageryMetadata:
    """Acquisition metadata of the imagery at a point (the metadata layer's attributes)."""

    acquired: date | None
    provider: str | None = None
    source: str | None = None
    resolution_m: float | None = None
    accuracy_m: float | None = None
    attributes: dict[str, Any] = field(default_factory=dict, compare=False)


class _ServiceError(FetchError):
    """An ArcGIS service answered 200 with an error document (never cached)."""


def parse_releases(config: Any, *, config_url: str = "the release list") -> list[Release]:
    """Releases of a waybackconfig.json document, sorted by release date then number.

    Raises
    ------
    FetchError
        Not a dict of releases, or no release with a date in its title.
    """
    if not isinstance(config, dict):
        raise FetchError(f"{config_url} is not a Wayback release list (a JSON object keyed by "
                         f"release number); got {type(config).__name__}.")
    releases = []
    for key, item in config.items():
        title = item.get("itemTitle", "") if isinstance(item, dict) else ""
        match = _TITLE_DATE.search(str(title))
        try:
            number, released = int(key), date.fromisoformat(match.group(1)) if match else None
        except ValueError:
            released = None
        if released is None:
            log.warning("Skipping Wayback release %r: no date in its title %r", key, title)
            continue
        service = _SERVICE.search(str(item.get("metadataLayerUrl", "")))
        releases.append(Release(number, released, str(title), str(item.get("itemURL", "")),
                                service.group(1) if service else None))
    if not releases:
        raise FetchError(f"{config_url} lists no Wayback release with a dated title.")
    return sorted(releases, key=lambda r: (r.released, r.number))


def list_releases(config_url: str, *, context: FetchContext, client: HttpClient,
                  max_age_s: float | None = 24 * 3600.0) -> list[Release]:
    """Read (through the cache, re-read after ``max_age_s``) and parse the release list."""
    body = fetch_cached(config_url, context=context, client=client, expect="json",
                        max_age_s=max_age_s)
    return parse_releases(json.loads(body.content), config_url=config_url)


def distinct_releases(releases: list[Release], tile: mercantile.Tile, *, tilemap_url: str,
                      context: FetchContext, client: HttpClient) -> list[Release]:
    """The releases that introduced new imagery at ``tile``, oldest first.

    Walks ``tilemap_url`` (``{release}``, ``{z}``, ``{y}``, ``{x}``) from the newest release:
    ``data[0] == 1`` means the release has imagery there, ``select[0]`` the release that
    introduced it; the walk continues from the release before that one. At most one request per
    release; tilemap answers never change, so they are cached for good.
    """
    order = sorted(releases, key=lambda r: (r.released, r.number))
    index = {r.number: i for i, r in enumerate(order)}
    found: list[Release] = []
    position = len(order) - 1
    while position >= 0:
        current = order[position]
        data, select = _tilemap(current, tile, tilemap_url, context, client)
        if not data:
            break
        changed = index.get(select, position) if select is not None else position
        if changed > position:  # a select newer than the release asked about is malformed
            log.warning("Tilemap of release %d selects newer release %s; ignoring it",
                        current.number, select)
            changed = position
        found.append(order[changed])
        position = changed - 1
    return found[::-1]


def pick_release(candidates: list[Release], window: DateWindow) -> tuple[Release, str | None]:
    """Choose the imagery version for a window; return it and a note when outside the window.

    Raises
    ------
    NoValidDataError
        No candidates.
    """
    if not candidates:
        raise NoValidDataError("Wayback has no imagery at this place and zoom.")
    inside = [c for c in candidates if window.start <= c.released <= window.end]
    if inside:
        return min(inside, key=lambda c: (abs((c.released - window.middle).days), c.released)), None
    before = [c for c in candidates if c.released < window.start]
    if before:
        chosen = before[-1]
        return chosen, (f"no new imagery was released here in {window}; release {chosen.number} "
                        f"(released {chosen.released}) is what Wayback showed during it")
    chosen = candidates[0]
    return chosen, (f"the first imagery here was released on {chosen.released} (release "
                    f"{chosen.number}), after the window {window}")


def read_metadata(release: Release, lon: float, lat: float, zoom: int, *, metadata_url: str,
                  context: FetchContext, client: HttpClient) -> tuple[ImageryMetadata | None, str]:
    """Query the release's metadata layer at a point; return the metadata (or None) and the URL.

    A missing service name, an empty answer or an ArcGIS error document give ``None`` (the
    caller warns); transport failures raise FetchError.
    """
    if release.metadata_service is None:
        return None, ""
    layer = _METADATA_MAX_ZOOM - min(max(zoom, _METADATA_MIN_ZOOM), _METADATA_MAX_ZOOM)
    base = metadata_url.replace("{service}", release.metadata_service).rstrip("/")
    url = (f"{base}/{layer}/query?geometry={lon:.6f},{lat:.6f}&geometryType=esriGeometryPoint"
           "&inSR=4326&spatialRel=esriSpatialRelIntersects&outFields=*&returnGeometry=false&f=json")
    try:
        body = fetch_cached(url, context=context, client=client, expect="json",
                            validate=_check_arcgis)
    except _ServiceError as e:
        log.warning("%s", e)
        return None, url
    answer = json.loads(body.content)
    features = answer.get("features") if isinstance(answer, dict) else None
    first = features[0] if isinstance(features, list) and features else None
    attributes = first.get("attributes") if isinstance(first, dict) else None
    if not isinstance(attributes, dict) or not attributes:
        return None, url
    return _metadata(attributes), url


def fetch(plan: GridPlan, window: DateWindow, source: SourceConfig, *, role: str,
          context: FetchContext, client: HttpClient | None = None) -> Scene:
    """Fetch the Wayback imagery version chosen for ``window`` onto the plan's grid.

    Parameters
    ----------
    plan
        The working grid.
    window
        Dates the imagery should come from (see the module docstring for the choice).
    source
        A ``type = "wayback"`` entry: ``config_url``, ``tile_url``, ``tilemap_url``,
        ``metadata_url``, optional ``min_zoom``, ``max_zoom``, ``max_tiles``, ``tile_size``,
        ``config_max_age_h``, ``attribution``.
    role
        ``"before"`` or ``"after"``.
    context
        Cache, offline mode, timeouts, concurrency.
    client
        A shared HTTP client; one is made otherwise.

    Returns
    -------
    Scene
        ``data`` ``(band, y, x)`` float32 red/green/blue, NaN = nodata, eager; one SourceRef
        with ``release`` and ``acquired`` kept apart; ``acquired`` is ``SRC_DATE2`` or None.

    Raises
    ------
    ConfigError, FetchError, NoValidDataError

    Warns
    -----
    ProvenanceWarning
        Unknown acquisition date, acquisition outside the window, or no release in the window.
    """
    opts = tile_options(source, template_key="tile_url")
    for key in ("config_url", "tilemap_url", "metadata_url"):
        if not isinstance(source.options.get(key), str):
            raise ConfigError(f"sources.{source.name}.{key}: required for a wayback source.")
    return with_client(context, client,
                       lambda c: _fetch(plan, window, source, role, context, c, opts))


def same_imagery(ref_a: SourceRef, ref_b: SourceRef) -> bool:
    """True if two refs show the same imagery, so no change can be measured between them.

    Same when: the tile hashes match; or both name the same Wayback release; or provider and
    item match; or both have the same known acquisition date and the same metadata source id.
    """
    if ref_a.sha256 is not None and ref_a.sha256 == ref_b.sha256:
        return True
    number_a, number_b = ref_a.extra.get("release_number"), ref_b.extra.get("release_number")
    if number_a is not None and number_a == number_b:
        return True
    if ref_a.provider == ref_b.provider and ref_a.item_id == ref_b.item_id:
        return True
    source_a = (ref_a.extra.get("metadata") or {}).get("source")
    source_b = (ref_b.extra.get("metadata") or {}).get("source")
    return (ref_a.acquired is not None and ref_a.acquired == ref_b.acquired
            and source_a is not None and source_a == source_b)


def check_distinct(before: Scene, after: Scene) -> None:
    """Raise FetchError if the before and after scenes show the same imagery."""
    for a in before.refs:
        for b in after.refs:
            if same_imagery(a, b):
                number = a.extra.get("release_number")
                what = f"release {number}" if number is not None else (a.release or a.item_id)
                raise FetchError(
                    f"before and after resolve to the same imagery ({what}, acquired "
                    f"{a.acquired or 'unknown'}): no change can be measured; widen the windows "
                    "or choose dates further apart.")


def _fetch(plan: GridPlan, window: DateWindow, source: SourceConfig, role: str,
           context: FetchContext, client: HttpClient, tile_opts: TileOptions) -> Scene:
    """The body of ``fetch`` once the client and tile options are known."""
    opts, start = source.options, client.requests_made
    zoom = choose_zoom(plan, min_zoom=tile_opts.min_zoom, max_zoom=tile_opts.max_zoom,
                       tile_size=tile_opts.tile_size)
    lon, lat = centre_lonlat(plan)
    releases = list_releases(opts["config_url"], context=context, client=client,
                             max_age_s=_max_age_s(source))
    tile = mercantile.tile(lon, lat, zoom)
    candidates = distinct_releases(releases, tile, tilemap_url=opts["tilemap_url"],
                                   context=context, client=client)
    if not candidates:
        raise NoValidDataError(f"{source.name} has no imagery at lon {lon:.5f}, lat {lat:.5f} at "
                               f"zoom {zoom} (tile {tile.z}/{tile.x}/{tile.y}) in any of its "
                               f"{len(releases)} releases; use a coarser grid or another source.")
    release, note = pick_release(candidates, window)
    meta, meta_url = read_metadata(release, lon, lat, zoom, metadata_url=opts["metadata_url"],
                                   context=context, client=client)
    template = opts["tile_url"].replace("{release}", str(release.number))
    tiles = fetch_tiles(plan, template, zoom=zoom, context=context, client=client,
                        max_tiles=tile_opts.max_tiles, tile_size=tile_opts.tile_size,
                        label=f"{source.name} release {release.number}")
    acquired = meta.acquired if meta else None
    _warn_provenance(source.name, role, window, release, acquired, note)
    extra = {"release_number": release.number, "release_date": release.released.isoformat(),
             "release_title": release.title, "zoom": zoom, "tiles": tiles.tiles,
             "candidates": [{"number": c.number, "released": c.released.isoformat()}
                            for c in candidates],
             "choice_note": note, "metadata": _metadata_dict(meta), "metadata_url": meta_url,
             "attribution": tile_opts.attribution, "requests": client.requests_made - start}
    ref = SourceRef(provider=source.name, item_id=f"wayback-{release.number} z{zoom}",
                    acquired=acquired, release=f"{release.released} (release {release.number})",
                    url=template, sha256=tiles.sha256, crs=WEB_MERCATOR,
                    res_m=(meta.resolution_m if meta and meta.resolution_m else tiles.tile_res_m),
                    date_source="metadata" if acquired else None, extra=extra)
    info = {**mosaic_info(tiles), "release": release.number, "requests": extra["requests"]}
    log.info("%s %s: release %d (%s), acquired %s", source.name, role, release.number,
             release.released, acquired or "unknown")
    return Scene(scene_array(tiles.data, plan, role=role), [ref], acquired, info=info)


def _max_age_s(source: SourceConfig) -> float:
    """``config_max_age_h`` in seconds (default 24 h); ConfigError if not a positive number."""
    hours = source.options.get("config_max_age_h", 24)
    if isinstance(hours, bool) or not isinstance(hours, int | float) or not hours > 0:
        raise ConfigError(f"sources.{source.name}.config_max_age_h: expected a positive number "
                          f"of hours, got {hours!r}.")
    return float(hours) * 3600.0


def _tilemap(release: Release, tile: mercantile.Tile, template: str, context: FetchContext,
             client: HttpClient) -> tuple[bool, int | None]:
    """``(has imagery, release that introduced it or None)`` from one tilemap answer."""
    url = (template.replace("{release}", str(release.number)).replace("{z}", str(tile.z))
           .replace("{y}", str(tile.y)).replace("{x}", str(tile.x)))
    answer = json.loads(fetch_cached(url, context=context, client=client, expect="json").content)
    data = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(data, list):
        raise FetchError(f"{url} is not a Wayback tilemap answer (no 'data' list).")
    select = answer.get("select") or []
    try:
        chosen = int(select[0]) if select else None
    except (TypeError, ValueError):
        chosen = None
    return bool(data and data[0]), chosen


def _check_arcgis(body: bytes) -> None:
    """Raise _ServiceError for an ArcGIS error document (kept out of the cache)."""
    answer = json.loads(body)
    if isinstance(answer, dict) and "error" in answer:
        error = answer["error"] if isinstance(answer["error"], dict) else {}
        raise _ServiceError(f"Wayback metadata service error {error.get('code')}: "
                            f"{error.get('message')}")


def _metadata(attributes: dict[str, Any]) -> ImageryMetadata:
    """ImageryMetadata from a metadata layer's attributes."""
    acquired = _parse_src_date(attributes.get("SRC_DATE2"))
    if acquired is None:
        acquired = _parse_src_date(attributes.get("SRC_DATE"))
    return ImageryMetadata(acquired, _text(attributes.get("NICE_DESC")),
                           _text(attributes.get("SRC_DESC")), _number(attributes.get("SAMP_RES")),
                           _number(attributes.get("SRC_ACC")), dict(attributes))


def _parse_src_date(value: Any) -> date | None:
    """A date from epoch milliseconds, YYYYMMDD (number or text) or ISO text; None if invalid."""
    found = None
    text = str(value).strip() if value is not None else ""
    try:
        if re.fullmatch(r"\d{8}", text):
            found = date(int(text[:4]), int(text[4:6]), int(text[6:]))
        elif re.fullmatch(r"-?\d+(\.\d+)?", text):
            found = datetime.fromtimestamp(float(text) / 1000.0, UTC).date()
        elif text:
            found = date.fromisoformat(text[:10])
    except (ValueError, OverflowError, OSError):
        return None
    return found if found and _EARLIEST <= found <= date.today() else None


def _warn_provenance(name: str, role: str, window: DateWindow, release: Release,
                     acquired: date | None, note: str | None) -> None:
    """Warn about what an investigator must know about this scene's dates."""
    where = f"{name} {role} scene (release {release.number}, released {release.released})"
    if note:
        warnings.warn(f"{where}: {note}.", ProvenanceWarning, stacklevel=4)
    if acquired is None:
        warnings.warn(f"{where}: acquisition date unknown (no SRC_DATE2 in the metadata layer); "
                      "the release date is not an acquisition date.", ProvenanceWarning,
                      stacklevel=4)
    elif not window.start <= acquired <= window.end:
        warnings.warn(f"{where}: imagery acquired on {acquired}, outside the window {window}.",
                      ProvenanceWarning, stacklevel=4)


def _metadata_dict(meta: ImageryMetadata | None) -> dict[str, Any] | None:
    """JSON-ready metadata for SourceRef.extra."""
    if meta is None:
        return None
    return {"acquired": meta.acquired.isoformat() if meta.acquired else None,
            "provider": meta.provider, "source": meta.source, "resolution_m": meta.resolution_m,
            "accuracy_m": meta.accuracy_m, "attributes": meta.attributes}


def _text(value: Any) -> str | None:
    """Stripped text or None."""
    return str(value).strip() or None if value is not None else None


def _number(value: Any) -> float | None:
    """A float or None."""
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None
