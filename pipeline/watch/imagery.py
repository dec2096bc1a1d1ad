"""pipeline.watch.imagery: what imagery a source has for a site, and which of it to compare.

Each source type lists its imagery as ``Imagery(key, when, label)``, where ``key`` identifies
the imagery within its source and ``when`` orders it:

- ``wayback``: the releases whose imagery really changed at the site's centre tile (the
  ``tilemap`` walk of ``fetch.wayback``); key the release number, ``when`` the release date
  (the acquisition date is read from the metadata layer when the imagery is fetched);
- ``stac``: the items of the search, grouped by acquisition date (one composite per date);
  key and ``when`` the date;
- ``local``: the GeoTIFFs in the folder ``path`` (``{site}`` is replaced by the site id), dated
  from their metadata or name (``fetch.local.acquisition_date``); key the file name.

``imagery_key`` gives the key back from a scene's provenance, so a finished run folder can be
matched with the pair it was asked for.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import mercantile

from pipeline.acquire import Acquisition
from pipeline.aoi import Aoi, plan_grid
from pipeline.errors import ConfigError, FetchError
from pipeline.fetch.base import DateWindow, FetchContext, SourceConfig
from pipeline.fetch.http import HttpClient

__all__ = ["Imagery", "DEFAULT_LOOKBACK_DAYS", "list_imagery", "imagery_key", "acquisition",
           "choose_pair", "local_folder"]

DEFAULT_LOOKBACK_DAYS = 120
_LOCAL_SUFFIXES = (".tif", ".tiff")


@dataclass(frozen=True)
class Imagery:
    """One listed imagery version of a source at a site."""

    key: str
    when: date
    label: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"key": self.key, "when": self.when.isoformat(), "label": self.label}


def list_imagery(aoi: Aoi, source: SourceConfig, *, res_m: float | None, context: FetchContext,
                 today: date, since: date | None, before: DateWindow | None) -> list[Imagery]:
    """All imagery of ``source`` at ``aoi`` worth considering, oldest first.

    Parameters
    ----------
    aoi
        The site.
    source
        A wayback, stac or local source.
    res_m
        The working resolution (chooses the Wayback zoom and the STAC search area); not
        needed for a local source.
    context
        Cache, offline mode, timeouts.
    today
        The end of the search.
    since
        Only imagery after this date is needed (the last analysed); None on a first run.
    before
        On a first run, the window to take the baseline from (STAC searches it too).

    Raises
    ------
    FetchError, NoValidDataError, ConfigError
        The source cannot be asked.
    """
    if source.type == "local":
        found = _local(aoi, source)
    elif source.type in ("wayback", "stac"):
        if res_m is None:
            raise ConfigError(f"sources.{source.name}: a working resolution is needed to list "
                              "its imagery; set res_m.")
        plan = plan_grid(aoi, res_m)
        found = (_wayback(plan, source, context) if source.type == "wayback" else
                 _stac(plan, source, context, today=today, since=since, before=before))
    else:
        raise ConfigError(f"sources.{source.name}: a {source.type} source cannot be watched.")
    return sorted(found, key=lambda i: (i.when, i.key))


def choose_pair(listed: list[Imagery], *, last: Imagery | None,
                before: DateWindow | None) -> tuple[Imagery | None, Imagery | None]:
    """``(before, after)`` to analyse: the newest new imagery against the last analysed.

    On a first run (``last`` None) the baseline is the imagery nearest the middle of
    ``before`` (else the last one before the window, else None), or the oldest listed. Returns
    ``(baseline, None)`` when nothing newer than the baseline exists.
    """
    if last is None:
        base = _baseline(listed, before)
    else:
        base = last
    if base is None:
        return None, None
    newer = [i for i in listed if i.when > base.when]
    return base, (newer[-1] if newer else None)


def acquisition(source: SourceConfig, imagery: Imagery, role: str, aoi: Aoi) -> Acquisition:
    """How ``acquire_pair`` gets exactly this imagery."""
    if source.type == "local":
        return Acquisition(role=role, path=local_folder(source, aoi) / imagery.key)
    return Acquisition(role=role, source=source, window=DateWindow(imagery.when, imagery.when))


def imagery_key(source_type: str, ref: dict[str, Any]) -> str | None:
    """The listing key of a manifest input (``SourceRef.to_dict()``), or None if unknown."""
    if source_type == "wayback":
        number = (ref.get("extra") or {}).get("release_number")
        return None if number is None else str(number)
    if source_type == "stac":
        return ref.get("acquired")
    if source_type == "local":
        return Path(ref["path"]).name if ref.get("path") else None
    return None


def local_folder(source: SourceConfig, aoi: Aoi) -> Path:
    """The folder of a local source for a site (``path`` with ``{site}`` filled in)."""
    template = source.options.get("path")
    if not isinstance(template, str) or not template:
        raise ConfigError(f"sources.{source.name}.path: a watched local source needs a folder, "
                          "e.g. path = \"imagery/{site}\" (one GeoTIFF per date).")
    return Path(template.replace("{site}", aoi.id)).expanduser()


def _baseline(listed: list[Imagery], before: DateWindow | None) -> Imagery | None:
    """The first run's before imagery."""
    if not listed:
        return None
    if before is None:
        return listed[0]
    inside = [i for i in listed if before.start <= i.when <= before.end]
    if inside:
        return min(inside, key=lambda i: (abs((i.when - before.middle).days), i.when))
    earlier = [i for i in listed if i.when < before.start]
    return earlier[-1] if earlier else None


def _wayback(plan: Any, source: SourceConfig, context: FetchContext) -> list[Imagery]:
    """Distinct Wayback releases at the plan's centre tile."""
    from pipeline.fetch import wayback, xyz

    opts = xyz.tile_options(source, template_key="tile_url")
    for key in ("config_url", "tilemap_url"):
        if not isinstance(source.options.get(key), str):
            raise ConfigError(f"sources.{source.name}.{key}: required for a wayback source.")
    zoom = xyz.choose_zoom(plan, min_zoom=opts.min_zoom, max_zoom=opts.max_zoom,
                           tile_size=opts.tile_size)
    tile = mercantile.tile(*xyz.centre_lonlat(plan), zoom)
    with HttpClient(context) as client:
        releases = wayback.list_releases(source.options["config_url"], context=context,
                                         client=client, max_age_s=wayback._max_age_s(source))
        found = wayback.distinct_releases(releases, tile, tilemap_url=source.options[
            "tilemap_url"], context=context, client=client)
    return [Imagery(str(r.number), r.released, f"release {r.number} of {r.released}")
            for r in found]


def _stac(plan: Any, source: SourceConfig, context: FetchContext, *, today: date,
          since: date | None, before: DateWindow | None) -> list[Imagery]:
    """STAC items by acquisition date, from ``since`` (or a lookback) to ``today``."""
    from pipeline.fetch.stac import StacOptions, search_items
    from pipeline.fetch.stac_items import prepare_items, profile_for

    options = StacOptions.from_source(source)
    profile = profile_for(options.collection, source.options, source_name=source.name)
    start = since + timedelta(days=1) if since else today - timedelta(DEFAULT_LOOKBACK_DAYS)
    windows = [DateWindow(min(start, today), today)]
    if since is None and before is not None:
        windows.insert(0, before)
    raws: list[dict[str, Any]] = []
    with HttpClient(context) as client:
        for window in windows:
            raws += search_items(plan, window, options, context=context, client=client)
    unique = {str(r.get("id")): r for r in raws}
    items, _ = prepare_items(list(unique.values()), profile, options.bands)
    out = []
    for day, group in itertools.groupby(items, key=lambda i: i.acquired):
        ids = [i.item_id for i in group]
        out.append(Imagery(day.isoformat(), day, f"{len(ids)} item(s): {', '.join(ids[:3])}"))
    return out


def _local(aoi: Aoi, source: SourceConfig) -> list[Imagery]:
    """GeoTIFFs of the site's folder, dated from metadata or file name."""
    from pipeline.fetch.local import acquisition_date, describe_raster

    folder = local_folder(source, aoi)
    if not folder.is_dir():
        raise FetchError(f"The imagery folder {folder} of source {source.name} does not exist "
                         f"for site {aoi.id}; create it and put one GeoTIFF per date in it.")
    out = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in _LOCAL_SUFFIXES or path.name.startswith("."):
            continue
        when, _ = acquisition_date(path, describe_raster(path).tags)
        if when is None:
            raise FetchError(f"{path} has no acquisition date in its metadata or name; name it "
                             "like site_2019-06-01.tif.")
        out.append(Imagery(path.name, when, path.name))
    return out
