"""pipeline.fetch.xyz: web-map tiles ({z}/{x}/{y} templates) onto the working grid.

The zoom is the coarsest one whose ground resolution at the AOI is at least as fine as the
grid's (never invent detail, never fetch more than needed), clamped to the source's zoom range.
The tiles under the grid (plus a two-pixel margin for the resampling kernel) are fetched through
the verified cache, at most ``max_concurrency`` at a time, decoded with rasterio, mosaicked
into an EPSG:3857 RGBA image (missing tiles transparent) and warped onto the grid with the same
fixed-tile warper as local files (``pipeline.fetch.local``), so transparent pixels become NaN.

``fetch_tiles`` is shared with ``pipeline.fetch.wayback``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import mercantile
import numpy as np
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
from rasterio.enums import ColorInterp, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.io import MemoryFile
from rasterio.transform import Affine
from rasterio.warp import transform_bounds

from pipeline.errors import ConfigError, FetchError, NoValidDataError, ProvenanceWarning
from pipeline.fetch.base import DateWindow, FetchContext, Scene, SourceConfig
from pipeline.fetch.cache import CachedBody, evict, fetch_many_cached
from pipeline.fetch.http import HttpClient
from pipeline.fetch.local import read_window
from pipeline.model import GridPlan, SourceRef

__all__ = ["BANDS", "TileOptions", "TileMosaic", "tile_options", "choose_zoom",
           "tiles_for_plan", "tile_url", "fetch_tiles", "scene_array", "mosaic_info",
           "ground_res_m", "centre_lonlat", "with_client", "fetch"]

log = logging.getLogger(__name__)
T = TypeVar("T")

BANDS = ("red", "green", "blue")
EARTH_CIRCUMFERENCE_M = 2 * math.pi * 6378137.0
WEB_MERCATOR = "EPSG:3857"
WEB_MERCATOR_HALF_M = 20037508.342789244  # half the world's width in EPSG:3857 metres
_MARGIN_PX = 2


@dataclass(frozen=True)
class TileOptions:
    """The tile options of a source entry (see ``configs/sources.toml``)."""

    template: str
    min_zoom: int = 0
    max_zoom: int = 19
    max_tiles: int = 1024
    tile_size: int = 256
    attribution: str = ""


@dataclass(frozen=True)
class TileMosaic:
    """Tiles warped onto the grid, with a record of every tile.

    ``data`` is ``(3, height, width)`` float32, NaN = nodata. ``tiles`` lists ``{z, x, y, url,
    sha256}`` (``sha256`` None for a missing tile); ``sha256`` hashes the sorted tile lines.
    ``requests`` is the client's request count during the fetch (a client shared with other
    threads at the same time inflates it); ``from_cache`` counts tiles read from the cache.
    """

    data: np.ndarray
    zoom: int
    tile_res_m: float
    tiles: list[dict[str, Any]] = field(repr=False)
    sha256: str
    requests: int
    from_cache: int

    @property
    def missing(self) -> list[str]:
        """URLs of the tiles the server does not have."""
        return [t["url"] for t in self.tiles if t["sha256"] is None]


def tile_options(source: SourceConfig, *, template_key: str = "url") -> TileOptions:
    """Read and check a source's tile options; ConfigError names the key."""
    opts = source.options
    template = opts.get(template_key)
    if not isinstance(template, str) or not all(k in template for k in ("{z}", "{x}", "{y}")):
        raise ConfigError(f"sources.{source.name}.{template_key}: expected a tile URL template "
                          f"with {{z}}, {{x}} and {{y}}, got {template!r}.")
    values = {}
    for key, default, low, high in (("min_zoom", 0, 0, 30), ("max_zoom", 19, 0, 30),
                                    ("max_tiles", 1024, 1, 100_000), ("tile_size", 256, 1, 4096)):
        value = opts.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(f"sources.{source.name}.{key}: expected a whole number in "
                              f"{low}..{high}, got {value!r}.")
        values[key] = value
    if values["min_zoom"] > values["max_zoom"]:
        raise ConfigError(f"sources.{source.name}: min_zoom {values['min_zoom']} is above "
                          f"max_zoom {values['max_zoom']}.")
    return TileOptions(template=template, attribution=str(opts.get("attribution", "")), **values)


def choose_zoom(plan: GridPlan, *, min_zoom: int = 0, max_zoom: int = 19,
                tile_size: int = 256) -> int:
    """The coarsest zoom whose ground resolution at the plan's centre is <= ``plan.res_m``.

    Clamped to ``min_zoom..max_zoom``.
    """
    exact = math.log2(EARTH_CIRCUMFERENCE_M * math.cos(math.radians(_centre_lat(plan)))
                      / (tile_size * plan.res_m))
    return int(min(max(math.ceil(exact - 1e-9), min_zoom), max_zoom))


def ground_res_m(zoom: int, lat: float, tile_size: int = 256) -> float:
    """Ground size in metres of one tile pixel at ``zoom`` and latitude ``lat``."""
    return EARTH_CIRCUMFERENCE_M * math.cos(math.radians(lat)) / (tile_size * 2 ** zoom)


def tiles_for_plan(plan: GridPlan, zoom: int) -> list[mercantile.Tile]:
    """Tiles covering the plan's bounds plus a two-pixel margin, sorted by row then column."""
    pad = _MARGIN_PX * plan.res_m
    minx, miny, maxx, maxy = plan.bounds
    west, south, east, north = transform_bounds(plan.crs, "EPSG:4326", minx - pad, miny - pad,
                                                maxx + pad, maxy + pad, densify_pts=21)
    tiles = mercantile.tiles(west, south, east, north, [zoom])
    return sorted(tiles, key=lambda t: (t.y, t.x))


def tile_url(template: str, tile: mercantile.Tile) -> str:
    """Fill ``{z}``, ``{x}`` and ``{y}`` of a template."""
    return (template.replace("{z}", str(tile.z)).replace("{x}", str(tile.x))
            .replace("{y}", str(tile.y)))


def fetch_tiles(plan: GridPlan, template: str, *, zoom: int, context: FetchContext,
                client: HttpClient, max_tiles: int = 1024, tile_size: int = 256,
                label: str = "tiles") -> TileMosaic:
    """Fetch the tiles under the plan and warp them onto its grid.

    Parameters
    ----------
    plan
        The working grid.
    template
        Tile URL template with ``{z}``, ``{x}``, ``{y}``.
    zoom
        Tile zoom level.
    context
        Cache, offline mode, concurrency.
    client
        HTTP client (its request count goes into ``TileMosaic.requests``).
    max_tiles
        Refuse plans needing more tiles than this.
    tile_size
        Expected tile width and height in pixels.
    label
        Source name for messages.

    Returns
    -------
    TileMosaic
        Eager NumPy data, ``(3, y, x)`` float32, NaN where no tile or transparent.

    Raises
    ------
    FetchError
        Too many tiles, a tile failed or would not decode, offline misses.
    NoValidDataError
        Every tile is missing, or nothing valid lands on the grid.
    """
    tiles = tiles_for_plan(plan, zoom)
    if len(tiles) > max_tiles:
        raise FetchError(f"{label}: the AOI needs {len(tiles)} tiles at zoom {zoom}, more than "
                         f"max_tiles = {max_tiles}; use a smaller AOI or a coarser resolution, "
                         "or raise max_tiles in configs/sources.toml.")
    urls = [tile_url(template, t) for t in tiles]
    before = client.requests_made
    bodies = fetch_many_cached(urls, context=context, client=client, expect="image")
    requests = client.requests_made - before
    if all(body is None for body in bodies.values()):
        raise NoValidDataError(f"{label} has no tiles for the AOI at zoom {zoom}: all {len(urls)} "
                               f"answered 404/204 (e.g. {urls[0]}); try another source or zoom.")
    mosaic, transform = _mosaic(tiles, [bodies[u] for u in urls], context, tile_size)
    data = _warp_to_plan(mosaic, transform, plan)
    if np.isnan(data).all():
        raise NoValidDataError(f"{label}: the tiles at zoom {zoom} hold no valid pixel over the "
                               "AOI (all transparent); try another source or date.")
    records = [{"z": t.z, "x": t.x, "y": t.y, "url": u, "sha256": _sha256_or_none(bodies[u])}
               for t, u in zip(tiles, urls, strict=True)]
    cached = sum(1 for b in bodies.values() if b is not None and b.from_cache)
    log.info("%s: %d tiles at zoom %d (%d missing, %d from cache, %d requests)", label,
             len(tiles), zoom, sum(b is None for b in bodies.values()), cached, requests)
    return TileMosaic(data, zoom, ground_res_m(zoom, _centre_lat(plan), tile_size), records,
                      _combined_sha256(records), requests, cached)


def scene_array(data: np.ndarray, plan: GridPlan, *, role: str,
                bands: tuple[str, ...] = BANDS) -> xr.DataArray:
    """Wrap ``(band, y, x)`` pixels on the plan with pixel-centre coordinates and rioxarray CRS."""
    minx, _, _, maxy = plan.bounds
    coords = {"band": list(bands),
              "y": maxy - (np.arange(plan.height) + 0.5) * plan.res_m,
              "x": minx + (np.arange(plan.width) + 0.5) * plan.res_m}
    da = xr.DataArray(data, dims=("band", "y", "x"), coords=coords, name=role,
                      attrs={"role": role})
    da = da.rio.write_crs(plan.crs).rio.write_transform(plan.transform)
    return da.rio.write_nodata(np.nan, encoded=False)


def fetch(plan: GridPlan, window: DateWindow, source: SourceConfig, *, role: str,
          context: FetchContext, client: HttpClient | None = None) -> Scene:
    """Fetch current imagery from an XYZ tile service onto the plan's grid.

    Parameters
    ----------
    plan
        The working grid.
    window
        Ignored for selection (a tile service shows one current mosaic); recorded in messages.
    source
        A ``type = "xyz"`` entry: ``url`` template, ``min_zoom``, ``max_zoom``, ``max_tiles``,
        ``tile_size``, ``attribution``.
    role
        ``"before"`` or ``"after"``.
    context
        Cache, offline mode, timeouts, concurrency.
    client
        A shared HTTP client (to count requests across scenes); one is made otherwise.

    Returns
    -------
    Scene
        ``data`` ``(band, y, x)`` float32, bands red/green/blue, NaN = nodata, eager; one
        ``SourceRef`` with ``acquired=None`` and the tiles' hashes in ``extra``.

    Raises
    ------
    ConfigError, FetchError, NoValidDataError

    Warns
    -----
    ProvenanceWarning
        Always: the acquisition date of current imagery is unknown.
    """
    opts = tile_options(source)
    zoom = choose_zoom(plan, min_zoom=opts.min_zoom, max_zoom=opts.max_zoom,
                       tile_size=opts.tile_size)
    tiles = with_client(context, client, lambda c: fetch_tiles(
        plan, opts.template, zoom=zoom, context=context, client=c, max_tiles=opts.max_tiles,
        tile_size=opts.tile_size, label=source.name))
    warnings.warn(f"{source.name} serves current imagery: acquisition date unknown for the {role} "
                  f"scene, so the window {window} cannot be checked; use a dated source "
                  "(wayback, stac) for evidence.", ProvenanceWarning, stacklevel=2)
    extra = {"zoom": zoom, "tiles": tiles.tiles, "requests": tiles.requests,
             "attribution": opts.attribution, "tile_res_m": tiles.tile_res_m}
    ref = SourceRef(provider=source.name, item_id=f"{source.name} z{zoom}", acquired=None,
                    release=None, url=opts.template, sha256=tiles.sha256, crs=WEB_MERCATOR,
                    res_m=tiles.tile_res_m, extra=extra)
    return Scene(scene_array(tiles.data, plan, role=role), [ref], None, info=mosaic_info(tiles))


def mosaic_info(tiles: TileMosaic) -> dict[str, Any]:
    """Scene.info figures of a tile fetch."""
    return {"zoom": tiles.zoom, "tiles": len(tiles.tiles), "missing_tiles": len(tiles.missing),
            "requests": tiles.requests, "from_cache": tiles.from_cache,
            "tile_res_m": tiles.tile_res_m}


def with_client(context: FetchContext, client: HttpClient | None,
                work: Callable[[HttpClient], T]) -> T:
    """Run ``work(client)`` with the given client, or with a new one closed afterwards."""
    if client is not None:
        return work(client)
    with HttpClient(context) as own:
        return work(own)


def centre_lonlat(plan: GridPlan) -> tuple[float, float]:
    """Lon/lat of the plan's centre."""
    minx, miny, maxx, maxy = plan.bounds
    cx, cy = (minx + maxx) / 2, (miny + maxy) / 2
    lon, lat = transform_bounds(plan.crs, "EPSG:4326", cx, cy, cx, cy)[:2]
    return float(lon), float(lat)


def _centre_lat(plan: GridPlan) -> float:
    """Latitude of the plan's centre."""
    return centre_lonlat(plan)[1]


def _mosaic(tiles: list[mercantile.Tile], bodies: list[Any], context: FetchContext,
            tile_size: int) -> tuple[np.ndarray, Affine]:
    """RGBA uint8 EPSG:3857 mosaic of decoded tiles (alpha 0 where missing) and its transform."""
    xs, ys = [t.x for t in tiles], [t.y for t in tiles]
    x0, y0 = min(xs), min(ys)
    out = np.zeros((4, (max(ys) - y0 + 1) * tile_size, (max(xs) - x0 + 1) * tile_size), np.uint8)
    for tile, body in zip(tiles, bodies, strict=True):
        if body is None:
            continue
        rgba = _decode(body.content, body.url, context, tile_size)
        row, col = (tile.y - y0) * tile_size, (tile.x - x0) * tile_size
        out[:, row:row + tile_size, col:col + tile_size] = rgba
    left, _, _, top = mercantile.xy_bounds(mercantile.Tile(x0, y0, tiles[0].z))
    px = 2 * WEB_MERCATOR_HALF_M / (tile_size * 2 ** tiles[0].z)
    return out, Affine(px, 0.0, left, 0.0, -px, top)


def _decode(content: bytes, url: str, context: FetchContext, tile_size: int) -> np.ndarray:
    """Decode one tile to RGBA uint8 ``(4, size, size)``; a bad tile is evicted from the cache."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with MemoryFile(content) as mem, mem.open() as src:
                data, interp = src.read(), list(src.colorinterp)
                cmap = src.colormap(1) if interp[0] == ColorInterp.palette else None
    except (RasterioIOError, ValueError) as e:
        evict(url, context=context)
        raise FetchError(f"Tile {url} could not be decoded as an image: {e}. It was removed "
                         "from the cache; run again to fetch it anew.") from e
    if data.dtype != np.uint8 or data.shape[1:] != (tile_size, tile_size):
        evict(url, context=context)  # a one-off placeholder must not stick: fetch it anew
        raise FetchError(f"Tile {url} is {data.shape[2]}x{data.shape[1]} px {data.dtype}, expected "
                         f"{tile_size}x{tile_size} px 8-bit; set tile_size for this source if "
                         "all its tiles are that size, else run again (it was removed from the "
                         "cache).")
    return _to_rgba(data, interp, cmap)


def _to_rgba(data: np.ndarray, interp: list[ColorInterp], cmap: dict | None) -> np.ndarray:
    """Grey, grey+alpha, palette, RGB or RGBA bands as RGBA."""
    if cmap is not None:
        lut = np.zeros((256, 4), np.uint8)
        for index, colour in cmap.items():
            lut[index] = colour
        return np.moveaxis(lut[data[0]], -1, 0)
    alpha = next((data[i] for i, c in enumerate(interp) if c == ColorInterp.alpha), None)
    colour = [data[i] for i, c in enumerate(interp) if c != ColorInterp.alpha]
    if alpha is None and len(colour) in (2, 4):  # an unlabelled last band is alpha
        alpha, colour = colour[-1], colour[:-1]
    if len(colour) == 1:
        colour = colour * 3
    full = np.full(data.shape[1:], 255, np.uint8)
    return np.stack([*colour[:3], full if alpha is None else alpha])


def _warp_to_plan(mosaic: np.ndarray, transform: Affine, plan: GridPlan) -> np.ndarray:
    """Bilinear warp of the RGBA mosaic onto the plan (alpha 0 -> NaN), via the local warper."""
    profile = {"driver": "GTiff", "width": mosaic.shape[2], "height": mosaic.shape[1],
               "count": 4, "dtype": "uint8", "crs": WEB_MERCATOR, "transform": transform,
               "photometric": "RGB", "alpha": "YES"}
    with MemoryFile() as mem:
        with mem.open(**profile) as dst:
            dst.write(mosaic)
            dst.colorinterp = (ColorInterp.red, ColorInterp.green, ColorInterp.blue,
                               ColorInterp.alpha)
        return read_window(mem.name, plan, Resampling.bilinear, [1, 2, 3],
                            (0, 0, plan.width, plan.height))


def _sha256_or_none(body: CachedBody | None) -> str | None:
    """A tile body's SHA-256, None for a missing tile."""
    return body.sha256 if body is not None else None


def _combined_sha256(records: list[dict[str, Any]]) -> str:
    """SHA-256 over sorted ``z/x/y sha256`` lines (``missing`` for absent tiles)."""
    lines = sorted(f"{r['z']}/{r['x']}/{r['y']} {r['sha256'] or 'missing'}" for r in records)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()
