"""A loopback Esri Wayback for watch tests: several sites, releases added while it runs.

The imagery is synthetic (``pipeline.testing.compounds``): textured ground over a strip of UTM
45N near Dabancheng holding ``SITES`` 1.6 km apart. Release 1 (2017-01-10) is the ground;
release 2 (2018-06-20) adds rows of new roofs at every site; ``add_release`` publishes a later
release that changes only the sites named (new roofs beside the old ones), as Wayback does: the
tilemap of the new release selects it at those sites' tiles and the older release elsewhere.
Tiles are rendered on request from the release images (EPSG:3857 PNG, alpha 0 outside).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mercantile
import numpy as np
from fetch.servers import LoopbackServer, Request, serve
from pyproj import Transformer
from rasterio.enums import Resampling
from rasterio.io import MemoryFile
from rasterio.transform import from_bounds, from_origin
from rasterio.warp import reproject

from pipeline.testing.compounds import make_new_roofs, synthetic_background

CRS = "EPSG:32645"
RES_M = 2.0
SITES = {"alpha": (88.24, 43.384), "bravo": (88.26, 43.384), "charlie": (88.28, 43.384)}
RADIUS_M = 250
SOURCE_RES_M = 4.0
_HALF_PX = 300  # each site's patch: 1.2 km square
_JSON = {"Content-Type": "application/json"}


@dataclass
class Release:
    """One release: number, date and which release's imagery it shows at each site."""

    number: int
    day: str
    acquired: str
    shows: dict[str, int]  # site -> release that introduced the imagery shown there


@dataclass
class FakeWayback:
    """The loopback server, the releases so far and the images behind them."""

    server: LoopbackServer
    images: dict[tuple[str, int], np.ndarray]  # (site, introduced release) -> (3, y, x) uint8
    sites: dict[str, tuple[float, float]] = field(default_factory=lambda: dict(SITES))
    releases: list[Release] = field(default_factory=list)
    tiles: dict[tuple[int, int, int, int], bytes] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def source_toml(self, name: str = "fake-wayback") -> str:
        """The ``[sources.<name>]`` table pointing at this server."""
        url = self.server.url
        return (f'[sources.{name}]\ntype = "wayback"\n'
                f'config_url = "{url("/config.json")}"\n'
                f'tile_url = "{url("/tile/{release}/{z}/{y}/{x}")}"\n'
                f'tilemap_url = "{url("/tilemap/{release}/{z}/{y}/{x}")}"\n'
                f'metadata_url = "{url("/metadata/{service}/MapServer")}"\n'
                f"res_m = {SOURCE_RES_M}\nconfig_max_age_h = 0.000001\n")

    def add_release(self, number: int, day: str, acquired: str, changed: list[str],
                    seed: int = 7) -> None:
        """Publish a release whose imagery is new only at the ``changed`` sites."""
        previous = self.releases[-1]
        shows = dict(previous.shows)
        for site in changed:
            old = self.images[(site, previous.shows[site])]
            _, after, _ = make_new_roofs((old.astype(np.float32),) * 2, res_m=RES_M,
                                         rect_m=(380.0, 700.0, 560.0, 800.0), buildings=(2, 3),
                                         noise=1.0, seed=seed)
            self.images[(site, number)] = _to_uint8(after)
            shows[site] = number
        with self.lock:
            self.releases.append(Release(number, day, acquired, shows))


def build_images(sites: dict[str, tuple[float, float]] | None = None, *,
                 variants: int | None = None) -> dict[tuple[str, int], np.ndarray]:
    """Release 1 (ground) and 2 (new roofs at every site) of each site's patch.

    With ``variants``, only that many different patches are drawn and shared among the sites
    in turn (quick for hundreds of sites).
    """
    images: dict[tuple[str, int], np.ndarray] = {}
    names = list(sites or SITES)
    for index, site in enumerate(names):
        if variants and index >= variants:
            for release in (1, 2):
                images[(site, release)] = images[(names[index % variants], release)]
            continue
        ground = synthetic_background((2 * _HALF_PX, 2 * _HALF_PX), res_m=RES_M, seed=index)
        before, after, _ = make_new_roofs(ground, res_m=RES_M,
                                          rect_m=(460.0, 480.0, 680.0, 660.0), buildings=(3, 4),
                                          noise=1.0, seed=index)
        images[(site, 1)] = _to_uint8(before)
        images[(site, 2)] = _to_uint8(after)
    return images


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(image), 1, 255).astype(np.uint8)


@dataclass
class _Routes:
    """Request handlers over a FakeWayback."""

    fake: FakeWayback

    def config(self, request: Request) -> tuple[int, dict[str, str], bytes]:
        with self.fake.lock:
            body = {str(r.number): {
                "itemTitle": f"World Imagery (Wayback {r.day})",
                "metadataLayerUrl": "https://example.invalid/arcgis/rest/services/"
                                    f"Meta_{r.number}/MapServer"} for r in self.fake.releases}
        return 200, _JSON, json.dumps(body).encode()

    def tilemap(self, request: Request) -> tuple[int, dict[str, str], bytes]:
        number, z, y, x = (int(v) for v in request.path.split("/")[2:6])
        release = self._release(number)
        site = _site_of(mercantile.Tile(x, y, z), self.fake.sites)
        if release is None or site is None:
            return 200, _JSON, json.dumps({"data": [0], "select": [], "valid": True}).encode()
        body = {"data": [1], "select": [release.shows[site]], "valid": True}
        return 200, _JSON, json.dumps(body).encode()

    def tile(self, request: Request) -> tuple[int, dict[str, str], bytes]:
        number, z, y, x = (int(v) for v in request.path.split("/")[2:6])
        release = self._release(number)
        tile = mercantile.Tile(x, y, z)
        site = _site_of(tile, self.fake.sites)
        if release is None or site is None:
            return 404, {"Content-Type": "text/plain"}, b"no tile"
        key = (release.shows[site], z, x, y)
        with self.fake.lock:
            body = self.fake.tiles.get(key)
        if body is None:
            body = _render(self.fake.images[(site, release.shows[site])],
                           self.fake.sites[site], tile)
            with self.fake.lock:
                self.fake.tiles[key] = body
        return 200, {"Content-Type": "image/png"}, body

    def metadata(self, request: Request) -> tuple[int, dict[str, str], bytes]:
        number = int(request.path.split("/")[2].split("_")[1])
        release = self._release(number)
        attrs = {"SRC_DATE2": release.acquired.replace("-", ""), "NICE_DESC": "Synthetic",
                 "SRC_DESC": f"SYN-{number}", "SAMP_RES": 0.5} if release else {}
        body = {"features": [{"attributes": attrs}] if attrs else []}
        return 200, _JSON, json.dumps(body).encode()

    def _release(self, number: int) -> Release | None:
        with self.fake.lock:
            return next((r for r in self.fake.releases if r.number == number), None)


_TO_UTM = Transformer.from_crs("EPSG:4326", CRS, always_xy=True)


def _site_of(tile: mercantile.Tile, sites: dict[str, tuple[float, float]]) -> str | None:
    """The site nearest the tile's centre, if its patch is near enough to matter."""
    west, south, east, north = mercantile.bounds(tile)
    x, y = _TO_UTM.transform((west + east) / 2, (south + north) / 2)
    best, best_d = None, _HALF_PX * RES_M + 500
    for site, lonlat in sites.items():
        cx, cy = _TO_UTM.transform(*lonlat)
        d = max(abs(x - cx), abs(y - cy))
        if d <= best_d:
            best, best_d = site, d
    return best


def _render(image: np.ndarray, lonlat: tuple[float, float], tile: mercantile.Tile) -> bytes:
    """The tile as RGBA PNG, warped from the patch centred on ``lonlat``."""
    cx, cy = _TO_UTM.transform(*lonlat)
    half = _HALF_PX * RES_M
    src_transform = from_origin(cx - half, cy + half, RES_M, RES_M)
    rgb = np.zeros((3, 256, 256), np.uint8)
    reproject(image, rgb, src_transform=src_transform, src_crs=CRS, src_nodata=0,
              dst_transform=from_bounds(*mercantile.xy_bounds(tile), 256, 256),
              dst_crs="EPSG:3857", dst_nodata=0, resampling=Resampling.bilinear)
    alpha = np.where((rgb > 0).any(axis=0), 255, 0).astype(np.uint8)
    with MemoryFile() as mem:
        with mem.open(driver="PNG", width=256, height=256, count=4, dtype="uint8") as dst:
            dst.write(np.concatenate([rgb, alpha[None]]))
        return mem.read()


def serve_fake(images: dict[tuple[str, int], np.ndarray],
               sites: dict[str, tuple[float, float]] | None = None) -> Iterator[FakeWayback]:
    """Run the fake with releases 1 and 2 (a generator for a pytest fixture)."""
    sites = dict(sites or SITES)
    with serve() as server:
        fake = FakeWayback(server, dict(images), sites)
        fake.releases = [Release(1, "2017-01-10", "2016-11-02", {s: 1 for s in sites}),
                         Release(2, "2018-06-20", "2018-05-30", {s: 2 for s in sites})]
        routes = _Routes(fake)
        server.route("/config.json", routes.config)
        _prefix_routes(server, routes)
        yield fake


def _prefix_routes(server: LoopbackServer, routes: _Routes) -> None:
    """Route every /tilemap/, /tile/ and /metadata/ path (the server matches exact paths)."""
    handlers = {"/tilemap/": routes.tilemap, "/tile/": routes.tile, "/metadata/": routes.metadata}

    class PrefixRoutes(dict):
        def __contains__(self, path: object) -> bool:
            return dict.__contains__(self, path) or any(
                str(path).startswith(p) for p in handlers)

        def __getitem__(self, path: str):  # noqa: ANN204
            if dict.__contains__(self, path):
                return dict.__getitem__(self, path)
            return next(h for p, h in handlers.items() if path.startswith(p))

    server.routes = PrefixRoutes(server.routes)


def grid_sites(count: int, *, spacing_deg: float = 0.02) -> dict[str, tuple[float, float]]:
    """``count`` site centres on a grid (20 a row) east and north of the first test site."""
    lon0, lat0 = SITES["alpha"]
    return {f"site-{i:04d}": (round(lon0 + (i % 20) * spacing_deg, 6),
                              round(lat0 + (i // 20) * spacing_deg, 6)) for i in range(count)}


def sites_geojson(path: Path, names: list[str] | None = None, *, every: str = "P1D",
                  source: str = "fake-wayback",
                  sites: dict[str, tuple[float, float]] | None = None) -> Path:
    """A watch file of the fake's sites (points with RADIUS_M)."""
    sites = sites or SITES
    features = [{"type": "Feature", "geometry": {"type": "Point", "coordinates": list(sites[n])},
                 "properties": {"name": n, "radius_m": RADIUS_M, "sources": [source],
                                "every": every, "notes": "synthetic"}}
                for n in (names or list(sites))]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path
