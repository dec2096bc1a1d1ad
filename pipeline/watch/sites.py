"""pipeline.watch.sites: the watch file (one feature per watched site) to validated ``WatchSite``s.

A watch file is the site file of ``pipeline.aoi`` (GeoJSON or GeoPackage, one feature per site,
a polygon or a point with ``radius_m``, a unique ``name``) with these optional properties:

- ``sources``: which imagery sources to ask, by name in ``configs/sources.toml``, each
  optionally with a working resolution in metres after ``@`` (``"esri-wayback@2"``). A list in
  GeoJSON; a comma-separated text in GeoPackage (which has no list type). Default: the
  ``default_sources`` the caller gives.
- ``every``: how often the site is due, ISO 8601 (``P30D``, ``P1W``, ``PT12H``) or short
  (``30d``, ``2w``, ``12h``). Default one day.
- ``before``: the date or window ``START/END`` whose imagery is the baseline of the first run
  (default: the oldest imagery a source lists).
- ``notes``, and anything else: kept, not interpreted.

Errors name the file, the feature's index and its name, and say how to fix it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from pipeline.aoi import Aoi, load_site_records
from pipeline.errors import ConfigError
from pipeline.fetch.base import DateWindow, SourceConfig

__all__ = ["SiteSource", "WatchSite", "load_watch_sites", "parse_every", "parse_sources",
           "DEFAULT_EVERY"]

DEFAULT_EVERY = timedelta(days=1)
_ISO = re.compile(r"^P(?:(\d+)W)?(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)S)?)?$")
_SHORT = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_SHORT_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_WATCHED_TYPES = ("wayback", "stac", "local")


@dataclass(frozen=True)
class SiteSource:
    """One source asked for a site: its configuration and optional resolution override."""

    name: str
    res_m: float | None = None

    def label(self) -> str:
        """``name`` or ``name@res`` as written in the watch file."""
        return self.name if self.res_m is None else f"{self.name}@{self.res_m:g}"


@dataclass(frozen=True)
class WatchSite:
    """A watched site: where (``aoi``), what to ask (``sources``), how often (``every``)."""

    aoi: Aoi
    sources: tuple[SiteSource, ...]
    every: timedelta = DEFAULT_EVERY
    before: DateWindow | None = None
    notes: str | None = None
    properties: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def id(self) -> str:
        """The site's folder id (unique in the file)."""
        return self.aoi.id

    @property
    def name(self) -> str:
        """The site's name as written in the file."""
        return self.aoi.label


def parse_every(value: Any) -> timedelta:
    """A duration from ISO 8601 (``P30D``, ``PT12H``, ``P1W``) or ``30d``/``12h``/``2w``.

    Raises
    ------
    ValueError
        Not a positive duration in one of those forms.
    """
    text = str(value).strip()
    iso = _ISO.match(text.upper())
    short = _SHORT.match(text.lower())
    try:
        if iso and any(iso.groups()):
            weeks, days, hours, minutes, seconds = (int(g or 0) for g in iso.groups())
            result = timedelta(weeks=weeks, days=days, hours=hours, minutes=minutes,
                               seconds=seconds)
        elif short:
            result = timedelta(seconds=float(short.group(1)) * _SHORT_UNITS[short.group(2)])
        else:
            raise ValueError(f"'every' {value!r} is not a duration; write e.g. 'P30D', "
                             "'PT12H', 'P1W' (ISO 8601) or '30d', '12h', '2w'")
    except OverflowError:
        raise ValueError(f"'every' {value!r} is too long (at most 999999999 days); write a "
                         "shorter duration, e.g. 'P365D'") from None
    if result <= timedelta(0):
        raise ValueError(f"'every' {value!r} must be longer than zero")
    return result


def parse_sources(value: Any) -> tuple[SiteSource, ...]:
    """Site sources from a list of ``name[@res_m]`` or a comma-separated text.

    Raises
    ------
    ValueError
        Empty, not text, or a resolution that is not a positive number.
    """
    items: Iterable[Any]
    if isinstance(value, str):
        items = [part for part in value.split(",") if part.strip()]
    elif isinstance(value, Sequence) or hasattr(value, "tolist"):
        items = list(value.tolist() if hasattr(value, "tolist") else value)
    else:
        raise ValueError(f"'sources' {value!r} is not a list of source names")
    out = []
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"'sources' entry {item!r} is not a source name")
        name, _, res = item.strip().partition("@")
        res_m = None
        if res:
            try:
                res_m = float(res.strip().removesuffix("m"))
            except ValueError:
                res_m = math.nan
            if not (math.isfinite(res_m) and res_m > 0):
                raise ValueError(f"'sources' entry {item!r}: the resolution after '@' must be "
                                 "a positive number of metres, e.g. 'earth-search@10'")
        out.append(SiteSource(name.strip(), res_m))
    if not out:
        raise ValueError("'sources' is empty")
    return tuple(out)


def load_watch_sites(path: str | Path, *, sources: Mapping[str, SourceConfig],
                     default_sources: Sequence[str] = ("esri-wayback",),
                     invalid: list[str] | None = None) -> list[WatchSite]:
    """Read and validate a watch file.

    Parameters
    ----------
    path
        GeoJSON or GeoPackage, one feature per site (see the module docstring).
    sources
        The configured sources (``config.load_sources``); every name used must be one of them
        and of a type that can list its imagery (wayback, stac, local).
    default_sources
        Sources of a site without a ``sources`` property.
    invalid
        If given, each invalid feature's message is appended here and the feature skipped,
        so one bad feature does not stop the others; without it, the first one raises.

    Returns
    -------
    list of WatchSite
        In file order.

    Raises
    ------
    ConfigError, AoiError
        The file is unreadable, or a feature is invalid; the message names the feature.
    """
    records = load_site_records(path, invalid=invalid)
    sites = []
    for index, aoi, props in records:
        where = f"Site file {path}: feature {index} ('{aoi.label}')"
        try:
            sites.append(_site(aoi, props, sources, default_sources))
        except ValueError as e:
            message = (f"{where}: {e}. Fix the property in the file (QGIS: the feature's "
                       "attribute table).")
            if invalid is None:
                raise ConfigError(message) from None
            invalid.append(message)
    return sites


def _site(aoi: Aoi, props: dict[str, Any], sources: Mapping[str, SourceConfig],
          default_sources: Sequence[str]) -> WatchSite:
    """One WatchSite from a feature's Aoi and properties (ValueError on a bad property)."""
    raw_sources = props.get("sources")
    chosen = (parse_sources(raw_sources) if raw_sources is not None
              else tuple(SiteSource(n) for n in default_sources))
    for item in chosen:
        if item.name not in sources:
            raise ValueError(f"source {item.name!r} is not configured (known: "
                             f"{', '.join(sorted(sources))})")
        if sources[item.name].type not in _WATCHED_TYPES:
            raise ValueError(f"source {item.name!r} is of type {sources[item.name].type}, "
                             f"which cannot list its imagery by date; use one of type "
                             f"{', '.join(_WATCHED_TYPES)}")
    every = parse_every(props["every"]) if props.get("every") is not None else DEFAULT_EVERY
    before = None
    if props.get("before") is not None:
        try:
            before = DateWindow.parse(str(props["before"]))
        except ConfigError as e:
            raise ValueError(f"'before' {props['before']!r}: {e}") from None
    notes = props.get("notes")
    return WatchSite(aoi=aoi, sources=chosen, every=every, before=before,
                     notes=str(notes) if notes is not None else None, properties=dict(props))
