"""pipeline.fetch.stac_items: what to read from a STAC item and how to turn its DN into reflectance.

A ``SensorProfile`` (a table in code, overridable per source in ``configs/sources.toml``)
names, for each canonical band (``red``, ``green``, ``blue``, ``nir``, ``swir16``) and for the
cloud mask, the asset keys to look for in order: Earth Search uses ``red``/``scl``, Planetary
Computer's ``sentinel-2-l2a`` uses ``B04``/``SCL``, Landsat Collection 2 ``nir08``/``qa_pixel``.

Scale and offset come from each asset's ``raster:bands`` when present. Sentinel-2 processing
baseline 04.00 (from 2022-01-25) shifts DN by +1000 (BOA_ADD_OFFSET); Earth Search's
``earthsearch:boa_offset_applied`` flag and even ``raster:bands.offset`` are wrong on some items
(cirrus-geo/cirrus-earth-search#33, Element84/earth-search#9, #66), so the offset is decided
from ``s2:processing_baseline``: from 04.00 on it applies (``raster:bands.offset`` if it gives
one, else ``-1000 * scale``); before 04.00 it is 0 whatever the metadata says. A baseline change
between dates therefore never shows up as change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from typing import Any, Literal
from urllib.parse import urljoin, urlsplit

from pipeline.errors import ConfigError, ProvenanceWarning

__all__ = ["MaskKind", "SensorProfile", "PROFILES", "ItemBands", "profile_for", "prepare_items",
           "item_sha256"]

log = logging.getLogger(__name__)

MaskKind = Literal["scl", "qa_pixel", "none"]
S2_BASELINE_OFFSET_FROM = (4, 0)
S2_BOA_ADD_OFFSET_DN = -1000
S2_OFFSET_START = date(2022, 1, 25)
_BASELINE = re.compile(r"^\s*(\d+)\.(\d+)")


@dataclass(frozen=True)
class SensorProfile:
    """How to read one family of collections: asset keys, mask kind and default scaling."""

    name: str
    assets: Mapping[str, tuple[str, ...]]
    mask: MaskKind
    mask_assets: tuple[str, ...]
    scale: float
    offset: float
    nodata: float = 0
    mask_dtype: str = "uint8"
    mask_nodata: int = 0
    s2_baseline: bool = False


PROFILES: dict[str, SensorProfile] = {
    "sentinel-2": SensorProfile(
        name="Sentinel-2",
        assets={"red": ("red", "B04"), "green": ("green", "B03"), "blue": ("blue", "B02"),
                "nir": ("nir", "B08"), "swir16": ("swir16", "B11")},
        mask="scl", mask_assets=("scl", "SCL"), scale=1e-4, offset=0.0, s2_baseline=True),
    "landsat": SensorProfile(
        name="Landsat",
        assets={"red": ("red", "SR_B4"), "green": ("green", "SR_B3"), "blue": ("blue", "SR_B2"),
                "nir": ("nir08", "SR_B5"), "swir16": ("swir16", "SR_B6")},
        mask="qa_pixel", mask_assets=("qa_pixel", "QA_PIXEL"), scale=2.75e-5, offset=-0.2,
        mask_dtype="uint16", mask_nodata=1),
}


@dataclass(frozen=True)
class ItemBands:
    """One item's assets to read and the DN -> reflectance mapping of each canonical band."""

    item_id: str
    when: datetime
    raw: Mapping[str, Any] = field(repr=False)
    keys: Mapping[str, str]
    hrefs: Mapping[str, str]
    scale: Mapping[str, float]
    offset: Mapping[str, float]
    nodata: Mapping[str, float]
    mask_key: str | None
    baseline: str | None
    sha256: str

    @property
    def acquired(self) -> date:
        """UTC acquisition date."""
        return self.when.astimezone(UTC).date()


def profile_for(collection: str, options: Mapping[str, Any], *, source_name: str) -> SensorProfile:
    """The profile of ``collection`` (by name prefix), with the source's overrides applied.

    Overrides: ``sensor`` (a key of ``PROFILES``), ``assets`` (table canonical band -> asset
    key), ``mask`` (``"scl"``, ``"qa_pixel"``, ``"none"``), ``mask_asset``.

    Raises
    ------
    ConfigError
        Unknown collection family without ``sensor``, or malformed overrides.
    """
    family = options.get("sensor") or next(
        (k for k in PROFILES if collection.lower().startswith(k)), None)
    if family not in PROFILES:
        raise ConfigError(f"sources.{source_name}: collection {collection!r} is not a known "
                          f"Sentinel-2 or Landsat collection; set sensor = one of "
                          f"{', '.join(PROFILES)} and, if needed, an assets table.")
    profile = PROFILES[family]
    assets = options.get("assets", {})
    if not isinstance(assets, Mapping) or not all(
            k in profile.assets and isinstance(v, str) for k, v in assets.items()):
        raise ConfigError(f"sources.{source_name}.assets: expected a table of "
                          f"{', '.join(profile.assets)} -> asset key, got {assets!r}.")
    merged = {k: ((assets[k],) if k in assets else v) for k, v in profile.assets.items()}
    mask = options.get("mask", profile.mask)
    if mask not in ("scl", "qa_pixel", "none"):
        raise ConfigError(f"sources.{source_name}.mask: expected scl, qa_pixel or none, "
                          f"got {mask!r}.")
    mask_assets = (options["mask_asset"],) if "mask_asset" in options else profile.mask_assets
    if mask != profile.mask and "mask_asset" not in options and mask != "none":
        raise ConfigError(f"sources.{source_name}.mask_asset: required when mask = {mask!r} "
                          f"differs from the {profile.name} default.")
    return replace(profile, assets=merged, mask=mask, mask_assets=mask_assets)


def item_sha256(raw: Mapping[str, Any]) -> str:
    """SHA-256 of an item's JSON as received, canonicalised (sorted keys, compact)."""
    blob = json.dumps(raw, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def prepare_items(raws: Sequence[Mapping[str, Any]], profile: SensorProfile,
                  bands: Sequence[str]) -> tuple[list[ItemBands], list[str]]:
    """Resolve assets and scaling of each item, sorted by ``(datetime, id)``.

    Items must share one set of asset keys (the first item's): odc-stac loads by key. A search
    result without an id, properties, a readable datetime or assets, or whose needed assets have
    no http(s) href (relative hrefs resolved against its self link), is skipped, never read.

    Returns
    -------
    tuple
        ``(items, skipped)``: usable items, and one message per skipped item.
    """
    checked = [(raw, _malformed(raw)) for raw in raws]
    skipped = [problem for _, problem in checked if problem is not None]
    readable = [raw for raw, problem in checked if problem is None]
    ordered = sorted(readable, key=lambda r: (_when(r), str(r.get("id"))))
    items, keys = [], None
    for raw in ordered:
        found = _keys(raw, profile, bands)
        if isinstance(found, str):
            skipped.append(found)
            continue
        keys = keys or found
        if found != keys:
            skipped.append(f"{raw['id']}: asset keys {found} differ from {keys}")
            continue
        try:
            items.append(_item_bands(raw, profile, found))
        except (TypeError, ValueError) as e:
            skipped.append(f"{raw['id']}: unreadable raster:bands scale, offset or nodata ({e})")
    for message in skipped:
        log.warning("Skipping STAC item %s", message)
    return items, skipped


def _malformed(raw: Any) -> str | None:
    """What makes a search result unusable as an item (a message), or None."""
    if not isinstance(raw, Mapping):
        return f"a search result that is not a JSON object ({type(raw).__name__})"
    item_id, props = raw.get("id"), raw.get("properties")
    if not isinstance(item_id, str) or not item_id:
        return f"an item without an id (got {item_id!r})"
    if not isinstance(props, Mapping):
        return f"{item_id}: no properties object"
    if not isinstance(raw.get("assets", {}), Mapping):
        return f"{item_id}: its assets are not a JSON object"
    try:
        _when(raw)
    except (TypeError, ValueError, OverflowError):
        return (f"{item_id}: its datetime {props.get('datetime')!r} is not an ISO 8601 date "
                "and time")
    return None


def _when(raw: Mapping[str, Any]) -> datetime:
    """The item's datetime (or start_datetime) as an aware datetime."""
    props = raw.get("properties", {})
    text = props.get("datetime") or props.get("start_datetime")
    when = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _keys(raw: Mapping[str, Any], profile: SensorProfile,
          bands: Sequence[str]) -> dict[str, str] | str:
    """Canonical band (and ``"mask"``) -> asset key, or a message naming what is missing."""
    assets = raw.get("assets", {})
    wanted = {b: profile.assets[b] for b in bands}
    if profile.mask != "none":
        wanted["mask"] = profile.mask_assets
    keys, missing = {}, []
    for band, candidates in wanted.items():
        key = next((c for c in candidates if c in assets), None)
        if key is None:
            missing.append(f"{band} (looked for {'/'.join(candidates)})")
        else:
            keys[band] = key
    if missing:
        return f"{raw.get('id')}: no asset for {', '.join(missing)}"
    for key in keys.values():
        problem = _href_problem(raw, key)
        if problem:
            return f"{raw.get('id')}: asset {key} {problem}"
    return keys


def _href_problem(raw: Mapping[str, Any], key: str) -> str | None:
    """Why asset ``key``'s href cannot be read over http(s) (pystac resolves a relative href
    against the item's self link), or None."""
    asset = raw["assets"][key]
    href = asset.get("href") if isinstance(asset, Mapping) else None
    if not isinstance(href, str) or not href:
        return "has no href"
    if urlsplit(_absolute_href(raw, href)).scheme.lower() not in ("http", "https"):
        return (f"href {href!r} is not an http(s) URL; only http(s) assets are read (no local "
                "files, no s3:// or other schemes)")
    return None


def _absolute_href(raw: Mapping[str, Any], href: str) -> str:
    """``href`` resolved against the item's self link when it is relative."""
    if urlsplit(href).scheme:
        return href
    links = raw.get("links")
    self_href = next((lk.get("href") for lk in links if isinstance(lk, Mapping)
                      and lk.get("rel") == "self" and isinstance(lk.get("href"), str)),
                     None) if isinstance(links, list) else None
    return urljoin(self_href, href) if self_href else href


def _raster_band(asset: Mapping[str, Any]) -> Mapping[str, Any]:
    """The asset's first ``raster:bands`` entry, or an empty mapping."""
    rb = asset.get("raster:bands") or []
    return rb[0] if rb and isinstance(rb[0], Mapping) else {}


def _item_bands(raw: Mapping[str, Any], profile: SensorProfile,
                keys: Mapping[str, str]) -> ItemBands:
    """Scaling of every band of one item (see the module docstring for the S2 offset rule)."""
    assets, props = raw["assets"], raw.get("properties", {})
    when = _when(raw)
    baseline = props.get("s2:processing_baseline")
    scale, offset, nodata = {}, {}, {}
    for band, key in keys.items():
        if band == "mask":
            continue
        rb = _raster_band(assets[key])
        scale[band] = float(rb.get("scale", profile.scale))
        nodata[band] = float(rb.get("nodata", profile.nodata))
        if profile.s2_baseline:
            offset[band] = _s2_offset(raw, band, rb, scale[band], when)
        else:
            offset[band] = float(rb.get("offset", profile.offset))
    hrefs = {band: _absolute_href(raw, str(assets[key]["href"])) for band, key in keys.items()}
    return ItemBands(item_id=str(raw["id"]), when=when, raw=raw,
                     keys={b: k for b, k in keys.items() if b != "mask"}, hrefs=hrefs,
                     scale=scale, offset=offset, nodata=nodata, mask_key=keys.get("mask"),
                     baseline=str(baseline) if baseline is not None else None,
                     sha256=item_sha256(raw))


def _s2_offset(raw: Mapping[str, Any], band: str, rb: Mapping[str, Any], scale: float,
               when: datetime) -> float:
    """Reflectance offset of one Sentinel-2 band, decided by the processing baseline."""
    props = raw.get("properties", {})
    applies = _baseline_offset_applies(props.get("s2:processing_baseline"))
    if applies is None:
        applies = when.date() >= S2_OFFSET_START
        warnings.warn(f"STAC item {raw['id']} has no s2:processing_baseline; assuming the "
                      f"{'04.00+ offset' if applies else 'pre-04.00 scaling'} from its date "
                      f"{when.date()}. Check its reflectance.", ProvenanceWarning, stacklevel=4)
    given = rb.get("offset")
    if applies:
        if given is not None and float(given) != 0.0:
            return float(given)
        if "earthsearch:boa_offset_applied" in props:
            log.info("Item %s: baseline %s, applying the BOA offset whatever "
                     "earthsearch:boa_offset_applied says", raw["id"],
                     props.get("s2:processing_baseline"))
        return S2_BOA_ADD_OFFSET_DN * scale
    if given is not None and float(given) != 0.0:
        log.warning("Item %s band %s: raster:bands offset %s ignored, baseline %s predates the "
                    "04.00 offset", raw["id"], band, given, props.get("s2:processing_baseline"))
    return 0.0


def _baseline_offset_applies(baseline: Any) -> bool | None:
    """True from baseline 04.00, False before, None when missing or unreadable."""
    m = _BASELINE.match(str(baseline)) if baseline is not None else None
    if not m:
        return None
    return (int(m.group(1)), int(m.group(2))) >= S2_BASELINE_OFFSET_FROM
