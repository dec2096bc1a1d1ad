"""Tests for pipeline.fetch.stac: STAC search, COG window reads, masking, compositing, caching.

A loopback STAC API (``stac_server.py`` on ``servers.py``) serves items whose COGs are the real
Dabancheng Sentinel-2 bands warped to EPSG:32645 at 10 m and scaled to uint16 DN, with a
synthetic SCL band. No internet.
"""

from __future__ import annotations

import json
import logging
import socket
import warnings
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from fetch.servers import LoopbackServer, serve
from fetch.stac_server import S2_ASSETS, StacApi, cog_bytes, make_item
from numpy.testing import assert_allclose, assert_array_equal
from rasterio.io import MemoryFile
from rasterio.warp import Resampling, reproject, transform_bounds

from pipeline.errors import ConfigError, FetchError, NoValidDataError, PipelineWarning
from pipeline.fetch import stac
from pipeline.fetch.base import DateWindow, FetchContext, SourceConfig
from pipeline.fetch.http import HttpClient
from pipeline.fetch.stac_items import PROFILES, prepare_items
from pipeline.fetch.stac_load import geobox_of, load_items, rasterio_env
from pipeline.fetch.stac_window import window_paths
from pipeline.model import GridPlan

S2_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "dabancheng_s2_2020"
CRS = "EPSG:32645"
COLLECTION = "sentinel-2-c1-l2a"
BANDS = {"blue": "B02", "green": "B03", "red": "B04", "nir": "B08", "swir16": "B11"}
WINDOW = DateWindow(date(2020, 6, 1), date(2020, 6, 30))
# Interior blocks of the warped image, in pixels of its 10 m grid.
CLOUD = np.s_[310:330, 305:325]
SHADOW = np.s_[335:350, 330:350]


@pytest.fixture(scope="module")
def surface() -> dict:
    """Real S2 bands on a 10 m UTM 45N grid as uint16 DN (baseline 03.01 scaling)."""
    if not S2_DIR.exists():
        pytest.skip(f"real Sentinel-2 bands not found at {S2_DIR}")
    with rasterio.open(S2_DIR / "Sentinel-2_L2A_B04_Raw.tiff") as src:
        b = transform_bounds(src.crs, CRS, *src.bounds)
    minx, maxy = np.ceil(b[0] / 10) * 10, np.floor(b[3] / 10) * 10
    width, height = int((np.floor(b[2] / 10) * 10 - minx) / 10), int((maxy - np.ceil(b[1] / 10)
                                                                       * 10) / 10)
    transform = Affine(10, 0, minx, 0, -10, maxy)
    dn = {}
    for name, band in BANDS.items():
        with rasterio.open(S2_DIR / f"Sentinel-2_L2A_{band}_Raw.tiff") as src:
            out = np.zeros((height, width), np.uint8)
            reproject(rasterio.band(src, 1), out, dst_transform=transform, dst_crs=CRS,
                      resampling=Resampling.bilinear)
        dn[name] = (500 + out.astype(np.uint16) * 20).astype(np.uint16)
    return {"dn": dn, "transform": transform, "shape": (height, width)}


def _bounds(transform: Affine, shape: tuple[int, int]) -> tuple[float, ...]:
    return (transform.c, transform.f - 10 * shape[0], transform.c + 10 * shape[1], transform.f)


@pytest.fixture(scope="module")
def catalogue(surface: dict) -> dict:
    """COG bodies and item dicts: a cloudy 03.01 item, a shadowed 04.00 item and decoys."""
    t, shape = surface["transform"], surface["shape"]
    files, items = {}, []
    cloudy = {k: v.copy() for k, v in surface["dn"].items()}
    for v in cloudy.values():
        v[CLOUD] = 9000
    shadowed = {k: v + 1000 for k, v in surface["dn"].items()}
    for v in shadowed.values():
        v[SHADOW] = 1100
    scl_a, scl_b = np.full(shape, 4, np.uint8), np.full(shape, 5, np.uint8)
    scl_a[CLOUD], scl_b[SHADOW] = 9, 3
    specs = [("S2A_45TXK_20200602_0_L2A", datetime(2020, 6, 2, 5, 10, tzinfo=UTC), 20.0,
              "03.01", cloudy, scl_a, {}),
             ("S2B_45TXK_20200607_0_L2A", datetime(2020, 6, 7, 5, 10, tzinfo=UTC), 5.0,
              "04.00", shadowed, scl_b, {"earthsearch:boa_offset_applied": True})]
    for item_id, when, cover, baseline, dn, scl, extra in specs:
        assets = {}
        for key in S2_ASSETS:
            path = f"/cogs/{item_id}/{key}.tif"
            files[path] = cog_bytes(scl if key == "scl" else dn[key], t, CRS)
            assets[key] = path
        rb = {k: {"data_type": "uint16", "nodata": 0, "scale": 0.0001} for k in S2_ASSETS}
        rb["scl"] = {"data_type": "uint8", "nodata": 0}
        items.append(make_item(item_id, when, collection=COLLECTION, crs=CRS,
                               bounds=_bounds(t, shape), shape=shape, assets=assets,
                               cloud_cover=cover, raster_bands=rb,
                               properties={"s2:processing_baseline": baseline, **extra}))
    decoys = [("S2A_45TXK_20200612_0_L2A", datetime(2020, 6, 12, 5, 10, tzinfo=UTC), 90.0),
              ("S2A_45TXK_20200715_0_L2A", datetime(2020, 7, 15, 5, 10, tzinfo=UTC), 1.0)]
    for item_id, when, cover in decoys:
        items.append({**json.loads(json.dumps(items[0])), "id": item_id,
                      "properties": {**items[0]["properties"], "eo:cloud_cover": cover,
                                     "datetime": when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")}})
    return {"files": files, "items": items}


@pytest.fixture
def api(catalogue: dict) -> Iterator[tuple[LoopbackServer, StacApi]]:
    """A fresh loopback STAC API serving the catalogue (new port: no GDAL cache carry-over)."""
    with serve(catalogue["files"]) as server:
        yield server, StacApi(catalogue["items"]).install(server)


@pytest.fixture
def plan(surface: dict) -> GridPlan:
    """A 600 m x 600 m AOI inside one 256 px block of the COGs, covering cloud and shadow."""
    t = surface["transform"]
    return GridPlan(CRS, (t.c + 3000, t.f - 3600, t.c + 3600, t.f - 3000), 10.0)


def _context(tmp_path: Path, **kw) -> FetchContext:
    return FetchContext(cache_dir=tmp_path / "cache", **{"timeout_s": 2.0, "max_retries": 1, **kw})


def _source(server: LoopbackServer, **options) -> SourceConfig:
    return SourceConfig("loopback-stac", "stac", {"url": server.url("/"),
                                                  "collection": COLLECTION, **options})


def _expected(surface: dict, plan: GridPlan) -> np.ndarray:
    """The true surface reflectance (baseline 03.01 scaling) under the plan."""
    t = surface["transform"]
    col, row = int((plan.bounds[0] - t.c) / 10), int((t.f - plan.bounds[3]) / 10)
    win = np.s_[row:row + plan.height, col:col + plan.width]
    return np.stack([surface["dn"][b][win] * 1e-4 for b in stac.DEFAULT_BANDS]).astype(np.float32)


def test_search_items_filters_date_and_cloud(api, plan, tmp_path):
    """The search keeps items inside the window with cloud cover <= max_cloud."""
    server, stac_api = api
    options = stac.StacOptions(url=server.url("/"), collection=COLLECTION, max_cloud=60)
    with HttpClient(_context(tmp_path)) as client:
        raws = stac.search_items(plan, WINDOW, options, context=_context(tmp_path),
                                 client=client)
    assert sorted(r["id"] for r in raws) == ["S2A_45TXK_20200602_0_L2A",
                                             "S2B_45TXK_20200607_0_L2A"]
    assert stac_api.searches[-1]["query"] == {"eo:cloud_cover": {"lte": 60.0}}


def test_search_items_without_query_extension_filters_locally(catalogue, plan, tmp_path):
    """An API that lacks the query extension gets no query; cloud cover is filtered here."""
    conformance = [c for c in StacApi([]).conformance if not c.endswith("#query")]
    with serve(catalogue["files"]) as server:
        stac_api = StacApi(catalogue["items"], conformance=conformance).install(server)
        options = stac.StacOptions(url=server.url("/"), collection=COLLECTION, max_cloud=60)
        with HttpClient(_context(tmp_path)) as client:
            raws = stac.search_items(plan, WINDOW, options, context=_context(tmp_path),
                                     client=client)
    assert "query" not in stac_api.searches[-1]
    assert sorted(r["id"] for r in raws) == ["S2A_45TXK_20200602_0_L2A",
                                             "S2B_45TXK_20200607_0_L2A"]


def test_load_items_grid_matches_plan(api, plan, tmp_path, catalogue):
    """odc-stac loads exactly onto the plan: transform, shape and pixel-centre coordinates."""
    profile = PROFILES["sentinel-2"]
    raws = [i for i in catalogue["items"] if i["id"].endswith(("0602_0_L2A", "0607_0_L2A"))]
    items, _ = prepare_items([StacApi(raws).install(api[0])._absolute(r) for r in raws],
                             profile, stac.DEFAULT_BANDS)
    with rasterio_env(_context(tmp_path)):
        data, clear = load_items(items, plan, profile, resampling="nearest", chunk_px=2048,
                                 signer=None)
    assert geobox_of(plan).transform == plan.transform
    assert data.odc.geobox.transform == plan.transform and data.odc.geobox.shape == plan.shape
    assert_allclose(data.x, plan.bounds[0] + 5 + 10 * np.arange(plan.width))
    assert_allclose(data.y, plan.bounds[3] - 5 - 10 * np.arange(plan.height))
    assert data.dims == ("time", "band", "y", "x") and clear.dims == ("time", "y", "x")


def test_fetch_median_fills_cloud_and_harmonises_baseline(api, plan, tmp_path, surface):
    """Cloud (item 1) and shadow (item 2) are masked and filled; baselines 03.01/04.00 agree."""
    server, _ = api
    scene = stac.fetch(plan, WINDOW, _source(server), role="before", context=_context(tmp_path))
    expected = _expected(surface, plan)
    got = scene.data.sel(band=list(stac.DEFAULT_BANDS)).values
    assert_allclose(got, expected, atol=1e-6)
    assert scene.info["clear_share"] == 1.0 and scene.info["n_items"] == 2
    assert scene.info["composite"] == "median"
    assert list(scene.data.band.values) == [*stac.DEFAULT_BANDS, "ndvi", "ndbi", "bsi"]
    assert scene.data.rio.transform() == plan.transform and scene.data.rio.crs == CRS
    assert scene.acquired == date(2020, 6, 2)
    # the GDAL options applied only inside the fetch
    assert not rasterio.env.hasenv() or "GDAL_HTTP_MULTIRANGE" not in rasterio.env.getenv()
    assert [r.item_id for r in scene.refs] == ["S2A_45TXK_20200602_0_L2A",
                                               "S2B_45TXK_20200607_0_L2A"]
    ref = scene.refs[1]
    assert ref.extra["processing_baseline"] == "04.00" and ref.extra["offset"]["red"] == -0.1
    assert ref.release == COLLECTION and ref.acquired == date(2020, 6, 7)
    assert ref.url.endswith(f"/collections/{COLLECTION}/items/S2B_45TXK_20200607_0_L2A")
    assert len(ref.extra["item_sha256"]) == 64 and ref.extra["assets"]["red"].endswith("red.tif")


def test_fetch_reads_only_the_aoi_window(api, plan, tmp_path, catalogue):
    """A 60 x 60 px AOI costs a few requests and a small share of the COG bytes."""
    server, _ = api
    stac.fetch(plan, WINDOW, _source(server), role="before", context=_context(tmp_path))
    cog_paths = [p for p in catalogue["files"] if "0602" in p or "0607" in p]
    total = sum(len(catalogue["files"][p]) for p in cog_paths)
    tiles = sum(_block_bytes(catalogue["files"][p], (300, 360), (300, 360)) for p in cog_paths)
    served = sum(n for p, n in server.bytes_served.items() if p.startswith("/cogs/"))
    requests = server.count("/cogs/")
    print(f"\nCOG requests {requests} for {len(cog_paths)} files; bytes served {served}, "
          f"intersecting tiles {tiles}, whole files {total} ({served / total:.1%})")
    assert requests <= 3 * len(cog_paths)  # HEAD, header (64 KiB), the tile
    assert tiles < served < 0.35 * total


def _block_bytes(body: bytes, rows: tuple[int, int], cols: tuple[int, int]) -> int:
    """Compressed bytes of the full-resolution COG blocks under a pixel window."""
    with MemoryFile(body) as mem, mem.open() as ds:
        bh, bw = ds.block_shapes[0]
        return sum(int(ds.get_tag_item(f"BLOCK_SIZE_{c}_{r}", "TIFF", bidx=1))
                   for r in range(rows[0] // bh, (rows[1] - 1) // bh + 1)
                   for c in range(cols[0] // bw, (cols[1] - 1) // bw + 1))


def test_fetch_second_run_makes_no_request(api, plan, tmp_path):
    """The same job again is served from the cache: zero requests at the server."""
    server, _ = api
    first = stac.fetch(plan, WINDOW, _source(server), role="after", context=_context(tmp_path))
    server.reset_counts()
    second = stac.fetch(plan, WINDOW, _source(server), role="after", context=_context(tmp_path))
    assert server.total_requests == 0 and second.info["from_cache"]
    assert_array_equal(first.data.values, second.data.values)
    offline = stac.fetch(plan, WINDOW, _source(server), role="after",
                         context=_context(tmp_path, offline=True))
    assert server.total_requests == 0 and offline.refs == first.refs


def test_fetch_reports_read_progress(api, plan, tmp_path):
    """progress(done, total) climbs to total while the COG windows are read and composited."""
    server, _ = api
    calls: list[tuple[int, int]] = []
    stac.fetch(plan, WINDOW, _source(server), role="after",
               context=_context(tmp_path, progress=lambda d, t: calls.append((d, t))))
    assert calls and all(0 < d <= t for d, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert calls[-1][0] == calls[-1][1]


def test_fetch_corrupt_cached_window_is_refetched(api, plan, tmp_path):
    """A cached composite whose SHA-256 no longer matches is deleted and read again."""
    server, _ = api
    first = stac.fetch(plan, WINDOW, _source(server), role="after", context=_context(tmp_path))
    tif, _ = window_paths(first.info["cache_key"], context=_context(tmp_path))
    tif.write_bytes(tif.read_bytes()[:-10] + b"0123456789")
    server.reset_counts()
    second = stac.fetch(plan, WINDOW, _source(server), role="after", context=_context(tmp_path))
    # GDAL's in-process /vsicurl/ block cache may answer the re-read without a request.
    assert not second.info["from_cache"] and server.count("/search") == 0
    assert window_paths(first.info["cache_key"], context=_context(tmp_path))[0].exists()
    assert_array_equal(first.data.values, second.data.values)


def test_fetch_clearest_picks_the_clear_date(api, plan, tmp_path, surface):
    """composite = clearest uses the clearest date only (shadow 300 px beats cloud 400 px)."""
    server, _ = api
    scene = stac.fetch(plan, WINDOW, _source(server, composite="clearest"), role="after",
                       context=_context(tmp_path))
    assert [r.item_id for r in scene.refs] == ["S2B_45TXK_20200607_0_L2A"]
    assert scene.info["composite"] == "clearest" and scene.acquired == date(2020, 6, 7)
    assert scene.info["clear_share"] == pytest.approx(1 - 300 / 3600)
    rows, cols = SHADOW[0], SHADOW[1]
    shadow_in_plan = np.s_[:, rows.start - 300:rows.stop - 300, cols.start - 300:cols.stop - 300]
    assert np.isnan(scene.data.values[shadow_in_plan]).all()
    clear = np.ones(plan.shape, bool)
    clear[shadow_in_plan[1:]] = False
    assert_allclose(scene.data.values[:5][:, clear], _expected(surface, plan)[:, clear],
                    atol=1e-6)


def test_fetch_no_items_raises_no_valid_data(api, plan, tmp_path):
    """An empty search names the source, the window and max_cloud."""
    server, _ = api
    window = DateWindow(date(2017, 1, 1), date(2017, 4, 30))
    with pytest.raises(NoValidDataError, match=r"No Sentinel-2 scene in loopback-stac for "
                       r"2017-01-01/2017-04-30 with cloud cover <= 60 % over the AOI: widen"):
        stac.fetch(plan, window, _source(server), role="before", context=_context(tmp_path))


def test_fetch_all_cloudy_raises_with_clear_share(api, plan, tmp_path, catalogue):
    """When every pixel is masked the error reports the clear share."""
    server, _ = api
    scl = np.full((652, 1026), 9, np.uint8)
    t = Affine(10, 0, 598930, 0, -10, 4806210)
    for item_id in ("S2A_45TXK_20200602_0_L2A", "S2B_45TXK_20200607_0_L2A"):
        server.add(f"/cogs/{item_id}/scl.tif", cog_bytes(scl, t, CRS))
    with pytest.raises(NoValidDataError, match=r"cloudy.*clear share 0\.0%"):
        stac.fetch(plan, WINDOW, _source(server), role="before", context=_context(tmp_path))


def test_fetch_offline_miss_lists_what_is_missing(api, plan, tmp_path):
    """Offline without a cached search, then without the cached composite: FetchError."""
    server, _ = api
    with pytest.raises(FetchError, match="offline and not cached"):
        stac.fetch(plan, WINDOW, _source(server), role="before",
                   context=_context(tmp_path, offline=True))
    stac.fetch(plan, WINDOW, _source(server), role="before", context=_context(tmp_path))
    with pytest.raises(FetchError, match=r"offline and the pixels of 2 loopback-stac item\(s\)"
                       r".*S2A_45TXK_20200602_0_L2A"):
        stac.fetch(plan, WINDOW, _source(server, composite="clearest"), role="before",
                   context=_context(tmp_path, offline=True))


def test_fetch_search_500_is_retried(api, plan, tmp_path):
    """A 500 from /search is retried and the fetch succeeds."""
    server, _ = api
    server.fault("/search", "status", status=500, times=1)
    scene = stac.fetch(plan, WINDOW, _source(server), role="before", context=_context(tmp_path))
    assert scene.info["n_items"] == 2 and server.count("/search") == 2


def test_fetch_search_invalid_json_raises(api, plan, tmp_path):
    """A /search answer that is not JSON is a FetchError naming the URL."""
    server, _ = api
    server.fault("/search", "bad_json")
    with pytest.raises(FetchError, match=r"/search\?.*did not return valid JSON"):
        stac.fetch(plan, WINDOW, _source(server), role="before", context=_context(tmp_path))


def test_fetch_server_down_raises_fetch_error(plan, tmp_path):
    """A closed port gives a FetchError naming the API URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"
    source = SourceConfig("down", "stac", {"url": url, "collection": COLLECTION})
    with pytest.raises(FetchError, match=rf"Could not fetch {url}: could not connect"):
        stac.fetch(plan, WINDOW, source, role="before", context=_context(tmp_path))


def test_fetch_planetary_computer_signing(api, plan, tmp_path):
    """With sign = planetary-computer the token URL is asked once and COG URLs carry it."""
    server, _ = api
    token = "st=2020-01-01&se=2099-01-01&sp=rl&sig=c2lnbmF0dXJl%3D"
    server.route("/api/sas/v1/token/" + COLLECTION, lambda r: (
        200, {"Content-Type": "application/json"},
        json.dumps({"msft:expiry": "2099-01-01T00:00:00Z", "token": token}).encode()))
    source = _source(server, sign="planetary-computer",
                     token_url=server.url("/api/sas/v1/token/{collection}"),
                     sign_hosts=["127.0.0.1"])
    scene = stac.fetch(plan, WINDOW, source, role="before", context=_context(tmp_path))
    assert server.count("/api/sas/v1/token/") == 1
    cog_requests = [p for p in server.requests if p.startswith("/cogs/")]
    assert cog_requests and all(p.endswith("?" + token) for p in cog_requests)
    assert all("sig=" not in h for r in scene.refs for h in r.extra["assets"].values())


def test_options_reject_bad_values(api):
    """Bad option values and unknown keys are ConfigErrors naming the key."""
    server, _ = api
    with pytest.raises(ConfigError, match="loopback-stac.max_cloud"):
        stac.StacOptions.from_source(_source(server, max_cloud=150))
    with pytest.raises(ConfigError, match="loopback-stac.composite"):
        stac.StacOptions.from_source(_source(server, composite="mean"))
    with pytest.raises(ConfigError, match="unknown option.*max_clouds"):
        stac.StacOptions.from_source(_source(server, max_clouds=10))
    with pytest.raises(ConfigError, match="loopback-stac.max_cloud: expected a number"):
        stac.StacOptions.from_source(_source(server, max_cloud="sixty"))
    with pytest.raises(ConfigError, match="loopback-stac.bands: expected a list"):
        stac.StacOptions.from_source(_source(server, bands="red"))
    with pytest.raises(ConfigError, match="loopback-stac.indices"):
        stac.StacOptions.from_source(_source(server, bands=["red", "green", "blue"]))


def test_fetch_warns_when_little_is_clear(api, plan, tmp_path):
    """A composite with less than 80 % clear pixels warns."""
    server, _ = api
    t = Affine(10, 0, 598930, 0, -10, 4806210)
    scl = np.full((652, 1026), 4, np.uint8)
    scl[290:360, 290:340] = 8
    for item_id in ("S2A_45TXK_20200602_0_L2A", "S2B_45TXK_20200607_0_L2A"):
        server.add(f"/cogs/{item_id}/scl.tif", cog_bytes(scl, t, CRS))
    with pytest.warns(PipelineWarning, match="clear"):
        scene = stac.fetch(plan, WINDOW, _source(server), role="before",
                           context=_context(tmp_path))
    assert 0 < scene.info["clear_share"] < 0.8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.isnan(scene.data.values[:, 0, 0]).all()


def test_baselines_03_and_04_harmonise_to_equal_reflectance(api, plan, tmp_path, catalogue):
    """Per item, outside cloud and shadow, the 03.01 and 04.00 (DN + 1000) items are equal."""
    profile = PROFILES["sentinel-2"]
    stac_api = StacApi(catalogue["items"]).install(api[0])
    raws = [stac_api._absolute(i) for i in catalogue["items"][:2]]
    items, _ = prepare_items(raws, profile, stac.DEFAULT_BANDS)
    assert [i.offset["red"] for i in items] == [0.0, -0.1]
    with rasterio_env(_context(tmp_path)):
        data, clear = load_items(items, plan, profile, resampling="nearest", chunk_px=2048,
                                 signer=None)
        values, both = data.values, clear.values.all(axis=0)
    assert both.sum() == 3600 - 400 - 300
    assert_allclose(values[0][:, both], values[1][:, both], atol=1e-6)
    assert not np.allclose(values[0][:, ~both], values[1][:, ~both], atol=1e-3)


@pytest.fixture
def landsat(tmp_path) -> Iterator[tuple[LoopbackServer, GridPlan, np.ndarray]]:
    """Two synthetic Landsat C2 L2 items (30 m) with cloud, snow and fill in QA_PIXEL."""
    rng = np.random.default_rng(0)
    t, shape = Affine(30, 0, 600000, 0, -30, 4800000), (64, 64)
    surface = rng.integers(8000, 20000, (5, *shape), dtype=np.uint16)
    qa1, qa2 = np.full(shape, 1 << 6, np.uint16), np.full(shape, 1 << 6, np.uint16)
    qa1[10:20, 10:20] = (1 << 3) | (1 << 1)  # cloud + dilated cloud
    qa2[30:40, 30:40] = 1 << 5  # snow
    qa2[0:5, :] = 1 << 2  # cirrus
    qa1[50:60, 50:60] = qa2[50:60, 50:60] = 1  # fill in both
    files, items = {}, []
    keys = ("red", "green", "blue", "nir08", "swir16")
    for n, qa in enumerate((qa1, qa2)):
        item_id = f"LC08_L2SP_143030_2020060{n + 1}_02_T1"
        dn = surface.copy()
        dn[:, qa == 1] = 0
        assets = {}
        for b, key in enumerate(keys):
            assets[key] = f"/landsat/{item_id}/{key}.TIF"
            files[assets[key]] = cog_bytes(dn[b], t, CRS)
        assets["qa_pixel"] = f"/landsat/{item_id}/qa_pixel.TIF"
        files[assets["qa_pixel"]] = cog_bytes(qa, t, CRS, nodata=1)
        rb = {k: {"data_type": "uint16", "nodata": 0, "scale": 2.75e-05, "offset": -0.2}
              for k in keys}
        rb["qa_pixel"] = {"data_type": "uint16", "nodata": 1}
        items.append(make_item(item_id, datetime(2020, 6, 1 + n, 4, 50, tzinfo=UTC),
                               collection="landsat-c2-l2", crs=CRS,
                               bounds=(600000, 4800000 - 64 * 30, 600000 + 64 * 30, 4800000),
                               shape=shape, assets=assets, cloud_cover=10.0, raster_bands=rb))
    with serve(files) as server:
        StacApi(items).install(server)
        plan = GridPlan(CRS, (600000, 4800000 - 64 * 30, 600000 + 64 * 30, 4800000), 30.0)
        yield server, plan, (surface * 2.75e-05 - 0.2).astype(np.float32)


def test_fetch_landsat_qa_pixel_masking(landsat, tmp_path):
    """Cloud, snow and cirrus are filled from the other item; fill in both stays NaN."""
    server, plan, expected = landsat
    source = SourceConfig("loopback-landsat", "stac",
                          {"url": server.url("/"), "collection": "landsat-c2-l2",
                           "indices": []})
    scene = stac.fetch(plan, WINDOW, source, role="after", context=_context(tmp_path))
    got = scene.data.values
    fill = np.zeros(plan.shape, bool)
    fill[50:60, 50:60] = True
    assert np.isnan(got[:, fill]).all()
    assert_allclose(got[:, ~fill], expected[:, ~fill], atol=1e-6)
    assert scene.info["clear_share"] == pytest.approx(1 - 100 / 64**2)
    assert list(scene.data.band.values) == list(stac.DEFAULT_BANDS)


def test_fetch_cog_failure_is_fetch_error_without_token(api, plan, tmp_path, caplog):
    """A COG answering 500 ends in FetchError naming it, with the SAS token redacted."""
    server, _ = api
    token = "se=2099-01-01&sig=secret"
    server.route("/token/" + COLLECTION, lambda r: (
        200, {"Content-Type": "application/json"}, json.dumps({"token": token}).encode()))
    server.fault("/cogs/S2B_45TXK_20200607_0_L2A/nir.tif", "status", status=500)
    source = _source(server, sign="planetary-computer", sign_hosts=["127.0.0.1"],
                     token_url=server.url("/token/{collection}"))
    # the URL in the message comes from GDAL's log records, seen through the redacting filter
    with caplog.at_level(logging.DEBUG), pytest.raises(
            FetchError, match=r"S2B_45TXK_20200607_0_L2A/nir.tif\?<query removed> failed") as err:
        stac.fetch(plan, WINDOW, source, role="before", context=_context(tmp_path))
    assert "secret" not in str(err.value) and "secret" not in caplog.text


def _serve_search(server: LoopbackServer, features: list) -> None:
    """Answer every /search with these features (no filtering, no paging)."""
    body = json.dumps({"type": "FeatureCollection", "features": features, "links": []}).encode()
    server.route("/search", lambda r: (200, {"Content-Type": "application/geo+json"}, body))


def _set_red(key: str, value: object):
    return lambda item: item["assets"]["red"].__setitem__(key, value) or item


MALFORMED_ITEMS = {
    "not an object": (lambda item: 7, "not a JSON object"),
    "no id": (lambda item: item.pop("id") and item, "without an id"),
    "properties null": (lambda item: item.update(properties=None) or item, "no properties"),
    "assets null": (lambda item: item.update(assets=None) or item, "assets are not a JSON"),
    "no datetime": (lambda item: item["properties"].pop("datetime") and item,
                    "datetime None is not an ISO 8601"),
    "bad datetime": (lambda item: item["properties"].update(datetime="yesterday") or item,
                     "datetime 'yesterday' is not"),
    "no href": (lambda item: item["assets"]["red"].pop("href") and item, "asset red has no href"),
    "file href": (_set_red("href", "file:///etc/hostname"), "'file:///etc/hostname' is not an "
                  "http"),
    "s3 href": (_set_red("href", "s3://bucket/red.tif"), "'s3://bucket/red.tif' is not an http"),
    "bad scale": (_set_red("raster:bands", [{"scale": "x"}]), "unreadable raster:bands"),
}


@pytest.mark.parametrize("case", list(MALFORMED_ITEMS))
def test_fetch_skips_malformed_items(api, plan, tmp_path, caplog, case):
    """A search result that is not a usable item (no id, datetime, assets or href, an href of
    another scheme, a raster:bands scale that is no number) is skipped with a warning naming
    why, and the other items are used; these were TypeError/KeyError/ValueError tracebacks,
    and file:// or s3:// hrefs were handed to GDAL."""
    server, stac_api = api
    bad, good = (stac_api._absolute(i) for i in stac_api.items[:2])
    mutate, reason = MALFORMED_ITEMS[case]
    _serve_search(server, [mutate(bad), good])
    with caplog.at_level(logging.WARNING, "pipeline.fetch.stac_items"), warnings.catch_warnings():
        warnings.simplefilter("ignore", PipelineWarning)
        scene = stac.fetch(plan, WINDOW, _source(server), role="before",
                           context=_context(tmp_path))
    assert [r.item_id for r in scene.refs] == [good["id"]]
    assert scene.info["items_found"] == 1 and reason in scene.info["items_skipped"][0]
    assert any(reason in r.getMessage() for r in caplog.records)


def test_fetch_only_malformed_items_says_why(api, plan, tmp_path):
    """When every item is unusable, NoValidDataError gives the first reason."""
    server, stac_api = api
    items = [stac_api._absolute(i) for i in stac_api.items[:2]]
    for item in items:
        item["assets"]["red"]["href"] = "s3://bucket/red.tif"
    _serve_search(server, items)
    with pytest.raises(NoValidDataError, match=r"2 item\(s\) were found but cannot be used, "
                       r"e\.g\. S2A.*'s3://bucket/red.tif' is not an http\(s\) URL"):
        stac.fetch(plan, WINDOW, _source(server), role="before", context=_context(tmp_path))


def _search(server: LoopbackServer, plan: GridPlan, tmp_path: Path) -> list:
    context = _context(tmp_path)
    options = stac.StacOptions.from_source(_source(server))
    return stac.search_items(plan, WINDOW, options, context=context,
                             client=HttpClient(context, backoff_s=0.01))


@pytest.mark.parametrize("next_href", ["/search?page=1", None])
def test_search_next_link_that_loops_back_ends(api, plan, tmp_path, caplog, next_href):
    """A next link that comes back (to a fixed page, or to the page itself) ends the search
    with each item once; it re-read the same page until max_items = 100 copies."""
    server, stac_api = api
    features = [stac_api._absolute(i) for i in stac_api.items[:2]]

    def looping(request):
        href = server.url(next_href or f"/search?{request.query}")
        body = {"type": "FeatureCollection", "features": features,
                "links": [{"rel": "next", "href": href, "type": "application/geo+json"}]}
        return 200, {"Content-Type": "application/geo+json"}, json.dumps(body).encode()

    server.route("/search", looping)
    with caplog.at_level(logging.WARNING, "pipeline.fetch.stac"):
        raws = _search(server, plan, tmp_path)
    assert [r["id"] for r in raws] == [f["id"] for f in features]
    assert server.count("/search") <= 3
    assert any("came back" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("path, body, message", [
    ("/", b"[]", "answered JSON that is not an object \\(list\\)"),
    ("/", b'"hello"', "answered JSON that is not an object \\(str\\)"),
    ("/", b'{"type": "Feature"}', "could not be searched: Could not open Client"),
    ("/search", b"null", "answered JSON that is not an object \\(NoneType\\)"),
    ("/search", b'{"type": "FeatureCollection", "features": [{}], "links": "x"}',
     "not a STAC FeatureCollection"),
    ("/search", b'{"type": "FeatureCollection", "features": {"a": 1}}',
     "not a STAC FeatureCollection"),
])
def test_search_json_of_the_wrong_shape(api, plan, tmp_path, path, body, message):
    """A landing page or search page that parses but is no STAC document is a FetchError
    naming the URL (these were AttributeError, TypeError or ClientTypeError tracebacks)."""
    server, _ = api
    server.route(path, lambda r: (200, {"Content-Type": "application/json"}, body))
    with pytest.raises(FetchError, match=message):
        _search(server, plan, tmp_path)
