"""pipeline.fetch.stac: Sentinel-2 L2A and Landsat C2 L2 scenes from a STAC API.

``fetch`` searches a STAC API (pystac-client) for items of one collection over the AOI, the
date window and ``eo:cloud_cover <= max_cloud``; reads only the AOI window of their COGs with
odc-stac onto the working grid; turns DN into reflectance (Sentinel-2 baseline offset decided
in ``stac_items``); masks clouds, shadows and snow (SCL or QA_PIXEL); and composites the clear
observations (``composite = "median"`` or ``"clearest"``). Spectral indices are appended.

Network use: STAC JSON goes through the shared HTTP cache (GET searches, so the URL is the
key); the composite is cached as a verified GeoTIFF (``stac_window``), so a rerun of the same
job makes no request, and an offline run works from the cache or says what is missing.
"""

from __future__ import annotations

import json
import logging
import statistics
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import date
from typing import Any, get_args

import numpy as np
import requests
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
from pystac_client import Client
from pystac_client.conformance import ConformanceClasses
from pystac_client.errors import ClientTypeError
from pystac_client.exceptions import APIError
from pystac_client.stac_api_io import StacApiIO
from rasterio.warp import transform_bounds

from pipeline.core.indices import INDEX_BANDS, add_indices
from pipeline.errors import ConfigError, FetchError, NoValidDataError, PipelineWarning
from pipeline.fetch.base import DateWindow, FetchContext, Scene, SourceConfig
from pipeline.fetch.cache import fetch_cached
from pipeline.fetch.http import HttpClient
from pipeline.fetch.signing import make_signer
from pipeline.fetch.stac_items import ItemBands, SensorProfile, prepare_items, profile_for
from pipeline.fetch.stac_load import (
    CompositeMethod,
    CompositeResult,
    composite_items,
    load_items,
    rasterio_env,
)
from pipeline.fetch.stac_record import RangeRecorder
from pipeline.fetch.stac_window import read_window, window_key, write_window
from pipeline.model import GridPlan, SourceRef

__all__ = ["StacOptions", "DEFAULT_BANDS", "fetch", "search_items"]

log = logging.getLogger(__name__)

DEFAULT_BANDS = ("red", "green", "blue", "nir", "swir16")
WARN_CLEAR_SHARE = 0.8
_OTHER_KEYS = {"url", "collection", "token_url", "sign_hosts", "assets", "mask", "mask_asset",
               "sensor", "attribution", "description"}


@dataclass(frozen=True)
class StacOptions:
    """A ``type = "stac"`` source's options (see ``configs/sources.toml``)."""

    url: str
    collection: str
    max_cloud: float = 60.0
    composite: CompositeMethod = "median"
    bands: tuple[str, ...] = DEFAULT_BANDS
    indices: tuple[str, ...] = ("ndvi", "ndbi", "bsi")
    resampling: str = "bilinear"
    sign: str | None = None
    max_items: int = 100
    search_max_age_h: float = 24.0
    min_clear_share: float = 0.0
    chunk_px: int = 2048

    @classmethod
    def from_source(cls, source: SourceConfig) -> StacOptions:
        """Validated options of ``source``; ConfigError names the offending key."""
        opts, name = dict(source.options), source.name
        unknown = set(opts) - set(cls.__dataclass_fields__) - _OTHER_KEYS
        if unknown:
            raise ConfigError(f"sources.{name}: unknown option(s) {', '.join(sorted(unknown))} "
                              f"for a stac source; check the spelling.")
        for key in ("url", "collection"):
            if not isinstance(opts.get(key), str) or not opts[key]:
                raise ConfigError(f"sources.{name}.{key}: required for a stac source.")
        kwargs = {k: opts[k] for k in cls.__dataclass_fields__ if k in opts}
        for key in ("bands", "indices"):
            if key in kwargs:
                if isinstance(kwargs[key], str) or not isinstance(kwargs[key], list | tuple):
                    raise ConfigError(f"sources.{name}.{key}: expected a list of names, e.g. "
                                      f"[\"red\", \"nir\"], got {kwargs[key]!r}.")
                kwargs[key] = tuple(kwargs[key])
        for key in ("max_cloud", "search_max_age_h", "min_clear_share"):
            if key in kwargs and (isinstance(kwargs[key], bool)
                                  or not isinstance(kwargs[key], int | float)):
                raise ConfigError(f"sources.{name}.{key}: expected a number, "
                                  f"got {kwargs[key]!r}.")
        out = cls(**kwargs)
        out._validate(name)
        return out

    def _validate(self, name: str) -> None:
        """Raise ConfigError for values out of range."""
        checks = [
            ("max_cloud", 0 <= self.max_cloud <= 100, "0 <= max_cloud <= 100"),
            ("composite", self.composite in get_args(CompositeMethod), "median or clearest"),
            ("bands", bool(self.bands) and set(self.bands) <= set(DEFAULT_BANDS),
             f"a non-empty subset of {', '.join(DEFAULT_BANDS)}"),
            ("indices", all(i in INDEX_BANDS and set(INDEX_BANDS[i]) <= set(self.bands)
                            for i in self.indices),
             f"indices from {', '.join(INDEX_BANDS)} whose bands are all in bands"),
            ("max_items", isinstance(self.max_items, int) and self.max_items > 0, "an integer > 0"),
            ("search_max_age_h", self.search_max_age_h >= 0, "hours >= 0"),
            ("min_clear_share", 0 <= self.min_clear_share < 1, "0 <= x < 1"),
            ("chunk_px", isinstance(self.chunk_px, int) and self.chunk_px >= 64,
             "an integer >= 64"),
        ]
        for key, ok, expected in checks:
            if not ok:
                raise ConfigError(f"sources.{name}.{key}: expected {expected}, "
                                  f"got {getattr(self, key)!r}.")


class _CachedStacIO(StacApiIO):
    """pystac-client I/O through the shared HttpClient (retries) and disk cache (GET only)."""

    def __init__(self, *, context: FetchContext, client: HttpClient, max_age_s: float) -> None:
        super().__init__()
        self.context, self.client, self.max_age_s = context, client, max_age_s
        self.pages: list[dict[str, Any]] = []  # search result pages: {url, sha256, ids}

    def request(self, href: str, method: str | None = None,
                headers: dict[str, str] | None = None,
                parameters: dict[str, Any] | None = None) -> str:
        """GET through the cache (the full URL is the key); POST (a paging link) uncached."""
        if (method or "GET").upper() == "GET":
            url = requests.Request("GET", href, params=parameters or {}).prepare().url or href
            body = fetch_cached(url, context=self.context, client=self.client, expect="json",
                                max_age_s=self.max_age_s)
            _check_object(url, body.content)
            self._note_page(url, body.sha256, body.content)
            return body.content.decode("utf-8")
        if self.context.offline:
            raise FetchError(f"offline and {href} needs a POST request, which is never cached; "
                             "run once online first.")
        content = self.client.fetch(href, expect="json", method="POST", json_body=parameters,
                                    headers=headers).content
        _check_object(href, content)
        return content.decode("utf-8")

    def get_pages(self, url: str, method: str | None = None,
                  parameters: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """pystac-client's paging, with each page's shape checked and a ``next`` link that
        comes back (a paging loop) ending the search instead of repeating it forever."""
        seen: set[str] = set()
        for page in super().get_pages(url, method, parameters):
            features, links = page.get("features", []), page.get("links", [])
            if not isinstance(features, list) or not isinstance(links, list) or not all(
                    isinstance(link, dict) for link in links):
                raise FetchError(f"A search page from {url} is not a STAC FeatureCollection "
                                 "(its features or links are not lists of objects); check url "
                                 "in configs/sources.toml.")
            yield page
            following = next((link for link in links if link.get("rel") == "next"), None)
            key = json.dumps(following, sort_keys=True)
            if following is not None and key in seen:
                log.warning("STAC search at %s: the next link %s came back; stopping there",
                            url, following.get("href"))
                return
            seen.add(key)


    def _note_page(self, url: str, sha256: str, content: bytes) -> None:
        """Remember a search result page (a FeatureCollection) and the item ids it lists."""
        try:
            doc = json.loads(content)
        except ValueError:
            return
        if isinstance(doc, dict) and isinstance(doc.get("features"), list):
            ids = [f.get("id") for f in doc["features"] if isinstance(f, dict)]
            self.pages.append({"url": url, "sha256": sha256, "ids": ids})


def _check_object(url: str, content: bytes) -> None:
    """FetchError unless ``content`` is a JSON object (a list or a string is no STAC document)."""
    doc = json.loads(content)
    if not isinstance(doc, dict):
        raise FetchError(f"{url} answered JSON that is not an object ({type(doc).__name__}), "
                         "so it is no STAC API document; check url in configs/sources.toml.")


def search_items(plan: GridPlan, window: DateWindow, options: StacOptions, *,
                 context: FetchContext, client: HttpClient,
                 pages: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Items of ``options.collection`` over the plan's area and ``window``, as JSON dicts.

    Parameters
    ----------
    plan
        The working grid; its bounds, in lon/lat, are the search bbox.
    window
        Acquisition dates, inclusive.
    options
        ``url``, ``collection``, ``max_cloud``, ``max_items``, ``search_max_age_h``.
    context, client
        Cache, offline mode and HTTP client.
    pages
        When given, each GET result page is appended as ``{url, sha256, ids}``: the body is
        in the HTTP cache under ``url`` (for the run's originals).

    Returns
    -------
    list of dict
        The items as the API returned them (no order guaranteed).

    Raises
    ------
    FetchError
        The API is unreachable, answers an error or invalid JSON, or (offline) the search is
        not cached; the message names the URL.
    """
    bbox = transform_bounds(plan.crs, "EPSG:4326", *plan.bounds, densify_pts=21)
    stac_io = _CachedStacIO(context=context, client=client,
                            max_age_s=float(options.search_max_age_h) * 3600)
    max_cloud = float(options.max_cloud)
    try:
        catalog = Client.open(options.url, stac_io=stac_io)
        # An API without the query extension is searched unfiltered and filtered here.
        has_query = catalog.conforms_to(ConformanceClasses.QUERY)
        search = catalog.search(
            collections=[options.collection], bbox=[round(v, 7) for v in bbox],
            datetime=str(window), method="GET", max_items=options.max_items,
            query={"eo:cloud_cover": {"lte": max_cloud}} if has_query else None,
            limit=min(100, options.max_items))
        raws = list(search.items_as_dicts())
        if pages is not None:
            pages += stac_io.pages
    except (APIError, ClientTypeError, NotImplementedError, ValueError, KeyError) as e:
        raise FetchError(f"The STAC API at {options.url} could not be searched: {e}. Check "
                         "url and collection in configs/sources.toml.") from e
    unique: dict[str, Any] = {}
    for raw in raws:  # a paging loop or a sloppy API lists an item twice: keep the first
        unique.setdefault(_item_key(raw), raw)
    raws = list(unique.values())
    if not has_query:
        raws = [r for r in raws if _cloud_cover(r) <= max_cloud]
    log.info("STAC search %s %s %s: %d items", options.url, options.collection, window, len(raws))
    if len(raws) >= options.max_items:
        warnings.warn(f"The STAC search returned max_items = {options.max_items} items; later "
                      "ones were left out. Narrow the window or raise max_items.",
                      PipelineWarning, stacklevel=2)
    return raws


def _item_key(raw: Any) -> str:
    """Identity of a search result for de-duplication: its id, else its JSON."""
    if isinstance(raw, dict) and isinstance(raw.get("id"), str):
        return raw["id"]
    return json.dumps(raw, sort_keys=True, default=str)


def _cloud_cover(raw: Any) -> float:
    """An item's eo:cloud_cover, 100 when missing or not a number."""
    props = raw.get("properties") if isinstance(raw, dict) else None
    value = props.get("eo:cloud_cover", 100.0) if isinstance(props, dict) else 100.0
    try:
        return float(value)
    except (TypeError, ValueError):
        return 100.0


def fetch(plan: GridPlan, window: DateWindow, source: SourceConfig, *, role: str,
          context: FetchContext) -> Scene:
    """One date's Sentinel-2 or Landsat composite on the working grid, with provenance.

    Parameters
    ----------
    plan
        The working grid; pixels land exactly on it.
    window
        Acquisition dates to search.
    source
        A ``type = "stac"`` source (options: see ``StacOptions`` and ``configs/sources.toml``).
    role
        ``"before"`` or ``"after"``, for messages and attrs.
    context
        Cache, offline mode, User-Agent, timeouts and retries.

    Returns
    -------
    Scene
        ``data`` dims ``("band", "y", "x")``, float32 reflectance (NaN nodata and where no
        clear observation), eager, x/y at pixel centres, ``band`` = the bands then the
        indices; ``refs`` one per item used; ``acquired`` the median (low) item date;
        ``info`` with ``clear_share``, ``n_items``, ``composite`` and cache figures.

    Raises
    ------
    NoValidDataError
        No item found, or no clear pixel (clear share at most ``min_clear_share``).
    FetchError
        The API or COGs are unreachable, or offline and not cached.
    ConfigError
        Bad source options.
    """
    options = StacOptions.from_source(source)
    profile = profile_for(options.collection, source.options, source_name=source.name)
    with HttpClient(context) as client:
        pages: list[dict[str, Any]] = []
        raws = search_items(plan, window, options, context=context, client=client, pages=pages)
        items, skipped = prepare_items(raws, profile, options.bands)
        if not items:
            raise NoValidDataError(_no_items_message(profile, source, window, options, skipped))
        params = {"collection": options.collection, "bands": list(options.bands),
                  "composite": options.composite, "mask": profile.mask,
                  "resampling": options.resampling}
        key, material = window_key(items, plan, params=params)
        hit = read_window(key, plan, options.bands, context=context)
        if hit is None:
            if context.offline:
                raise FetchError(_offline_message(items, source, window, key, context))
            result = _read_pixels(items, plan, window, options, profile, source,
                                  context=context, client=client)
            digest = write_window(key, plan, options.bands, result, context=context,
                                  material=material)
        else:
            result, digest = hit
        n_requests = client.requests_made
    _check_clear(result, profile, source, window, options)
    info = {"clear_share": result.clear_share, "n_items": len(result.used),
            "composite": result.method, "items_found": len(items), "items_skipped": skipped,
            "collection": options.collection, "window": str(window), "cache_key": key,
            "window_sha256": digest, "from_cache": hit is not None, "stac_requests": n_requests}
    return _scene(result, items, plan, options, source, role, info, pages)


def _read_pixels(items: list[ItemBands], plan: GridPlan, window: DateWindow,
                 options: StacOptions, profile: SensorProfile, source: SourceConfig, *,
                 context: FetchContext, client: HttpClient) -> CompositeResult:
    """Load and composite inside the fetch's GDAL environment."""
    signer = make_signer(options.sign, source.options, collection=options.collection,
                         client=client, source_name=source.name)
    # GDAL reads through a loopback relay that keeps the bytes (for the run's originals/)
    with RangeRecorder(context, signer=signer) as relay, rasterio_env(context):
        data, clear = load_items(items, plan, profile, resampling=options.resampling,
                                 chunk_px=options.chunk_px, signer=relay.patch_url)
        try:
            result = composite_items(items, data, clear, method=options.composite,
                                     middle=window.middle, progress=context.progress,
                                     url_names=relay.names())
        except FetchError:
            # the cache refused a body, or a range changed mid-read: say so, not "read failed"
            if relay.error is not None:
                raise relay.error from None
            raise
        result = replace(result, reads=relay.reads())
    log.info("Composited %d of %d %s items (%s): %.1f %% clear", len(result.used), len(items),
             options.collection, result.method, 100 * result.clear_share)
    return result


def _check_clear(result: CompositeResult, profile: SensorProfile, source: SourceConfig,
                 window: DateWindow, options: StacOptions) -> None:
    """NoValidDataError when nothing (or too little) is clear; a warning when much is not."""
    share = result.clear_share
    if share <= 0 or share < options.min_clear_share:
        per_item = ", ".join(f"{k} {v:.1%}" for k, v in result.item_clear_share.items())
        raise NoValidDataError(
            f"Every {profile.name} scene in {source.name} for {window} is cloudy, shadowed, "
            f"snowy or nodata over the AOI: clear share {share:.1%} (minimum "
            f"{options.min_clear_share:.1%}; per scene: {per_item}). Widen the window, raise "
            "max_cloud, or use composite = \"median\".")
    if share < WARN_CLEAR_SHARE:
        warnings.warn(f"Only {share:.1%} of the AOI has a clear {profile.name} view in "
                      f"{source.name} for {window}; the rest is NaN and cannot show change. "
                      "Widen the window to fill it.", PipelineWarning, stacklevel=3)


def _scene(result: CompositeResult, items: list[ItemBands], plan: GridPlan,
           options: StacOptions, source: SourceConfig, role: str,
           info: dict[str, Any], pages: list[dict[str, Any]]) -> Scene:
    """Wrap the composite, its indices and provenance into a Scene."""
    used = [i for i in items if i.item_id in result.used]
    acquired = date.fromordinal(statistics.median_low(i.acquired.toordinal() for i in used))
    da = _to_dataarray(result.data, plan, options.bands, role, source.name, acquired)
    da = add_indices(da, options.indices)
    da = da.rio.write_crs(plan.crs).rio.write_transform(plan.transform)
    refs = [_ref(i, source, options, result.item_clear_share.get(i.item_id), result.reads,
                 [{"url": p["url"], "sha256": p["sha256"]} for p in pages
                  if i.item_id in p["ids"]]) for i in used]
    return Scene(data=da, refs=refs, acquired=acquired, info=info)


def _ref(item: ItemBands, source: SourceConfig, options: StacOptions, share: float | None,
         reads: Mapping[str, list[dict[str, Any]]], pages: list[dict[str, Any]]) -> SourceRef:
    """Provenance of one item (unsigned hrefs only), the COG bodies read of it and the search
    pages that listed it."""
    props = item.raw.get("properties", {})
    self_url = next((lk.get("href") for lk in item.raw.get("links", [])
                     if isinstance(lk, Mapping) and lk.get("rel") == "self"), None)
    url = self_url or f"{options.url.rstrip('/')}/collections/{options.collection}/items/" \
                      f"{item.item_id}"
    extra = {"processing_baseline": item.baseline, "cloud_cover": props.get("eo:cloud_cover"),
             "assets": dict(item.hrefs), "item_sha256": item.sha256, "clear_share": share,
             "datetime": item.when.isoformat(), "scale": dict(item.scale),
             "offset": dict(item.offset), "platform": props.get("platform"),
             "cog_reads": [row for href in dict.fromkeys(item.hrefs.values())
                           for row in reads.get(href, [])],
             "stac_pages": pages}
    return SourceRef(provider=source.name, item_id=item.item_id, acquired=item.acquired,
                     release=options.collection, url=url, crs=props.get("proj:code")
                     or (f"EPSG:{props['proj:epsg']}" if props.get("proj:epsg") else None),
                     date_source="stac", extra=extra)


def _to_dataarray(data: np.ndarray, plan: GridPlan, bands: tuple[str, ...], role: str,
                  source_name: str, acquired: date) -> xr.DataArray:
    """Pixel-centre coordinates and rioxarray georeferencing of the plan."""
    minx, _, _, maxy = plan.bounds
    coords = {"band": list(bands), "y": maxy - (np.arange(plan.height) + 0.5) * plan.res_m,
              "x": minx + (np.arange(plan.width) + 0.5) * plan.res_m}
    attrs = {"role": role, "source": source_name, "acquired": acquired.isoformat()}
    da = xr.DataArray(data, dims=("band", "y", "x"), coords=coords, name=role, attrs=attrs)
    da = da.rio.write_crs(plan.crs).rio.write_transform(plan.transform)
    return da.rio.write_nodata(np.nan, encoded=False)


def _no_items_message(profile: SensorProfile, source: SourceConfig, window: DateWindow,
                      options: StacOptions, skipped: list[str]) -> str:
    """NoValidDataError text for an empty search."""
    text = (f"No {profile.name} scene in {source.name} for {window} with cloud cover <= "
            f"{options.max_cloud:g} % over the AOI: widen the window or raise max_cloud")
    if skipped:
        text += (f" ({len(skipped)} item(s) were found but cannot be used, e.g. "
                 f"{skipped[0]}; if assets are missing, check the assets table of "
                 f"sources.{source.name})")
    return text + "."


def _offline_message(items: list[ItemBands], source: SourceConfig, window: DateWindow,
                     key: str, context: FetchContext) -> str:
    """FetchError text for an offline run whose composite is not cached."""
    ids = ", ".join(i.item_id for i in items[:10]) + (" ..." if len(items) > 10 else "")
    return (f"offline and the pixels of {len(items)} {source.name} item(s) for {window} over "
            f"this AOI are not cached: {ids} (composite key {key[:16]}... under "
            f"{context.cache_dir}/stac); run once online first (without --offline).")
