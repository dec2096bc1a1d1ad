"""A minimal STAC API on the loopback server of ``servers.py``, plus COG and item factories.

``StacApi(items).install(server)`` answers::

    /                       landing page with conformsTo (core, item-search, query)
    /conformance            the same classes
    /collections            every collection named by an item
    /collections/{id}       one collection
    /search                 GET or POST: collections, bbox (intersects), datetime (closed
                            interval), query {"eo:cloud_cover": {"lte": x}}, limit, with a
                            ``next`` link (GET) when more items match than ``limit``

Items are plain dicts whose asset hrefs are server paths (``/cogs/a/red.tif``); they are made
absolute when served, so the server's port never leaks into the test data. COG bodies are added
with ``server.add`` and served with Range support by ``servers.py``.
"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlencode

import numpy as np
from affine import Affine
from fetch.servers import LoopbackServer, Request
from rasterio.io import MemoryFile
from rasterio.shutil import copy as rio_copy
from rasterio.warp import transform_bounds

__all__ = ["StacApi", "CONFORMANCE", "cog_bytes", "make_item", "read_profile", "S2_ASSETS",
           "LANDSAT_ASSETS"]

CONFORMANCE = [
    "https://api.stacspec.org/v1.0.0/core",
    "https://api.stacspec.org/v1.0.0/item-search",
    "https://api.stacspec.org/v1.0.0/item-search#query",
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/core",
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/geojson",
]
S2_ASSETS = ("red", "green", "blue", "nir", "swir16", "scl")
LANDSAT_ASSETS = ("red", "green", "blue", "nir08", "swir16", "qa_pixel")
_JSON = {"Content-Type": "application/geo+json"}


def cog_bytes(data: np.ndarray, transform: Affine, crs: str, *, nodata: float | None = 0,
              blocksize: int = 256) -> bytes:
    """A (y, x) or (band, y, x) array as a DEFLATE COG with internal overviews, in memory."""
    data = data[None] if data.ndim == 2 else data
    profile = dict(driver="GTiff", width=data.shape[2], height=data.shape[1],
                   count=data.shape[0], dtype=data.dtype, crs=crs, transform=transform,
                   nodata=nodata)
    with MemoryFile() as tmp, MemoryFile() as out:
        with tmp.open(**profile) as ds:
            ds.write(data)
        rio_copy(tmp.name, out.name, driver="COG", blocksize=blocksize, compress="DEFLATE",
                 overview_resampling="nearest")
        return out.read()


def make_item(item_id: str, when: datetime, *, collection: str, crs: str, bounds: tuple,
              shape: tuple[int, int], assets: dict[str, str], cloud_cover: float,
              properties: dict[str, Any] | None = None,
              raster_bands: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """A STAC item dict whose assets are server paths; ``raster_bands`` per asset key."""
    lonlat = transform_bounds(crs, "EPSG:4326", *bounds, densify_pts=21)
    ring = [[lonlat[0], lonlat[1]], [lonlat[2], lonlat[1]], [lonlat[2], lonlat[3]],
            [lonlat[0], lonlat[3]], [lonlat[0], lonlat[1]]]
    transform = [*(Affine(bounds[2] - bounds[0], 0, bounds[0], 0, bounds[1] - bounds[3],
                          bounds[3]) @ Affine.scale(1 / shape[1], 1 / shape[0]))][:6]
    props = {"datetime": when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
             "eo:cloud_cover": cloud_cover, "proj:code": crs, **(properties or {})}
    out_assets = {}
    for key, href in assets.items():
        asset: dict[str, Any] = {"href": href, "type": "image/tiff; application=geotiff; "
                                 "profile=cloud-optimized", "roles": ["data"],
                                 "proj:shape": list(shape), "proj:transform": transform}
        if raster_bands and key in raster_bands:
            asset["raster:bands"] = [raster_bands[key]]
        out_assets[key] = asset
    return {
        "type": "Feature", "stac_version": "1.0.0", "id": item_id, "collection": collection,
        "stac_extensions": ["https://stac-extensions.github.io/projection/v2.0.0/schema.json",
                            "https://stac-extensions.github.io/eo/v1.1.0/schema.json",
                            "https://stac-extensions.github.io/raster/v1.1.0/schema.json"],
        "bbox": list(lonlat), "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": props, "assets": out_assets, "links": [],
    }


class StacApi:
    """Routes of a tiny STAC API over ``items`` (see the module docstring)."""

    def __init__(self, items: list[dict[str, Any]], *, page_limit: int = 10,
                 conformance: list[str] | None = None) -> None:
        self.items = items
        self.page_limit = page_limit
        self.conformance = CONFORMANCE if conformance is None else conformance
        self.server: LoopbackServer | None = None
        self.searches: list[dict[str, Any]] = []

    def install(self, server: LoopbackServer) -> StacApi:
        """Register the API's routes on ``server``; return self."""
        self.server = server
        server.route("/", self._landing)
        server.route("/conformance",
                     lambda r: (200, _JSON, _dump({"conformsTo": self.conformance})))
        server.route("/collections", self._collections)
        for cid in self._collection_ids():
            server.route(f"/collections/{cid}", self._collection_route(cid))
        server.route("/search", self._search)
        return self

    @property
    def url(self) -> str:
        """The API root URL."""
        return self._abs("/")

    def _abs(self, path: str) -> str:
        if self.server is None:
            raise RuntimeError("install() the API on a server first")
        return self.server.url(path)

    def _collection_ids(self) -> list[str]:
        return sorted({item["collection"] for item in self.items})

    def _landing(self, request: Request) -> tuple[int, dict[str, str], bytes]:
        links = [{"rel": "self", "href": self._abs("/"), "type": "application/json"},
                 {"rel": "root", "href": self._abs("/"), "type": "application/json"},
                 {"rel": "conformance", "href": self._abs("/conformance")},
                 {"rel": "data", "href": self._abs("/collections")},
                 {"rel": "search", "href": self._abs("/search"), "method": "GET",
                  "type": "application/geo+json"},
                 {"rel": "search", "href": self._abs("/search"), "method": "POST",
                  "type": "application/geo+json"}]
        body = {"type": "Catalog", "stac_version": "1.0.0", "id": "loopback",
                "description": "Loopback STAC API", "conformsTo": self.conformance, "links": links}
        return 200, _JSON, _dump(body)

    def _collection(self, cid: str) -> dict[str, Any]:
        return {"type": "Collection", "stac_version": "1.0.0", "id": cid,
                "description": f"Test collection {cid}", "license": "proprietary",
                "extent": {"spatial": {"bbox": [[-180, -90, 180, 90]]},
                           "temporal": {"interval": [[None, None]]}},
                "links": [{"rel": "self", "href": self._abs(f"/collections/{cid}")},
                          {"rel": "root", "href": self._abs("/")}]}

    def _collections(self, request: Request) -> tuple[int, dict[str, str], bytes]:
        body = {"collections": [self._collection(c) for c in self._collection_ids()],
                "links": []}
        return 200, _JSON, _dump(body)

    def _collection_route(self, cid: str):  # noqa: ANN202
        return lambda request: (200, _JSON, _dump(self._collection(cid)))

    def _search(self, request: Request) -> tuple[int, dict[str, str], bytes]:
        params = _search_params(request)
        self.searches.append(params)
        found = [item for item in self.items if _matches(item, params)]
        found.sort(key=lambda i: (i["properties"]["datetime"], i["id"]))
        limit = int(params.get("limit") or self.page_limit)
        page = int(params.get("page") or 0)
        chunk = found[page * limit:(page + 1) * limit]
        links = []
        if (page + 1) * limit < len(found) and request.method == "GET":
            query = {k: v for k, v in parse_qs(request.query).items()}
            query["page"] = [str(page + 1)]
            links.append({"rel": "next", "href": self._abs("/search") + "?" +
                          urlencode(query, doseq=True), "type": "application/geo+json"})
        features = [self._absolute(item) for item in chunk]
        body = {"type": "FeatureCollection", "features": features, "links": links,
                "numberMatched": len(found), "numberReturned": len(features)}
        return 200, _JSON, _dump(body)

    def _absolute(self, item: dict[str, Any]) -> dict[str, Any]:
        out = copy.deepcopy(item)
        for asset in out["assets"].values():
            if asset["href"].startswith("/"):
                asset["href"] = self._abs(asset["href"])
        out["links"] = [{"rel": "self", "type": "application/geo+json",
                         "href": self._abs(f"/collections/{item['collection']}/items/"
                                           f"{item['id']}")}]
        return out


def _dump(body: Any) -> bytes:
    return json.dumps(body).encode()


def _search_params(request: Request) -> dict[str, Any]:
    """Search parameters of a GET query string or a POST JSON body, normalised."""
    if request.method == "POST":
        params = json.loads(request.body or b"{}")
    else:
        params = {k: v[-1] for k, v in parse_qs(request.query).items()}
        if isinstance(params.get("query"), str):
            params["query"] = json.loads(params["query"])
    for key in ("collections", "bbox"):
        if isinstance(params.get(key), str):
            params[key] = params[key].split(",")
    if params.get("bbox") is not None:
        params["bbox"] = [float(v) for v in params["bbox"]]
    return params


def _matches(item: dict[str, Any], params: dict[str, Any]) -> bool:
    """True if the item passes the collection, bbox, datetime and query filters."""
    if params.get("collections") and item["collection"] not in params["collections"]:
        return False
    bbox = params.get("bbox")
    if bbox is not None:
        ib = item["bbox"]
        if ib[0] > bbox[2] or ib[2] < bbox[0] or ib[1] > bbox[3] or ib[3] < bbox[1]:
            return False
    if params.get("datetime") and not _in_interval(item, str(params["datetime"])):
        return False
    ops = {"lt": float.__lt__, "lte": float.__le__, "gt": float.__gt__, "gte": float.__ge__,
           "eq": float.__eq__}
    for prop, tests in (params.get("query") or {}).items():
        value = item["properties"].get(prop)
        for op, limit in tests.items():
            if value is None or not ops[op](float(value), float(limit)):
                return False
    return True


def _in_interval(item: dict[str, Any], interval: str) -> bool:
    """True if the item's datetime lies in a closed ``start/end`` interval (``..`` open)."""
    when = _parse(item["properties"]["datetime"])
    start, _, end = interval.partition("/")
    if not end:
        end = start
    if start not in ("", "..") and when < _parse(start):
        return False
    return end in ("", "..") or when <= _parse(end)


def _parse(text: str) -> datetime:
    text = text.replace("Z", "+00:00")
    if "T" not in text:
        text += "T00:00:00+00:00"
    return datetime.fromisoformat(text)


def read_profile(body: bytes) -> dict[str, Any]:
    """Profile of a COG held in memory (for tests that check what they serve)."""
    with MemoryFile(body) as mem, mem.open() as ds:
        return dict(ds.profile)

