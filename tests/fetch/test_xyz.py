"""Tests for pipeline.fetch.xyz: zoom choice, tiles from a loopback server onto the grid."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import pytest
from fetch.servers import LoopbackServer, render_tiles, serve, write_synthetic_scene
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.io import MemoryFile

from pipeline.aoi import parse_aoi, plan_grid
from pipeline.errors import ConfigError, FetchError, NoValidDataError, ProvenanceWarning
from pipeline.fetch import xyz
from pipeline.fetch.base import DateWindow, FetchContext, SourceConfig
from pipeline.fetch.cache import cache_paths
from pipeline.fetch.http import HttpClient
from pipeline.fetch.local import read_to_grid
from pipeline.model import GridPlan

REAL_IMAGE = (Path(__file__).resolve().parents[3] / "shared" / "data" / "dabancheng"
              / "dabancheng_2018-10-11.tif")
WINDOW = DateWindow(date(2018, 1, 1), date(2018, 12, 31))


@dataclass
class TileSite:
    """A tile server rendering one raster, and the plan over it."""

    server: LoopbackServer
    raster: Path
    plan: GridPlan
    zoom: int

    def source(self, order: str = "zxy", **options: object) -> SourceConfig:
        """An xyz source entry pointing at the server."""
        path = "/xyz/{z}/{x}/{y}.png" if order == "zxy" else "/esri/tile/{z}/{y}/{x}"
        return SourceConfig("test-tiles", "xyz", {"url": self.server.url(path), "max_zoom": 19,
                                                  **options})

    def tile_path(self, z: int, x: int, y: int) -> str:
        """URL path of a tile in the {z}/{x}/{y} layout."""
        return f"/xyz/{z}/{x}/{y}.png"


def _serve_tiles(raster: Path, plan: GridPlan) -> Iterator[TileSite]:
    """Render the tiles the plan needs at its zoom and serve them under two URL layouts."""
    zoom = xyz.choose_zoom(plan)
    tiles = render_tiles(raster, xyz.tiles_for_plan(plan, zoom))
    files = {}
    for (z, x, y), body in tiles.items():
        files[f"/xyz/{z}/{x}/{y}.png"] = body
        files[f"/esri/tile/{z}/{y}/{x}"] = body
    with serve(files) as server:
        yield TileSite(server, raster, plan, zoom)


@pytest.fixture(scope="module")
def synthetic_raster(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic UTM scene around the Dabancheng site."""
    return write_synthetic_scene(tmp_path_factory.mktemp("xyz") / "synthetic_2018-06-01.tif")


@pytest.fixture
def site(synthetic_raster: Path) -> Iterator[TileSite]:
    """Synthetic tiles for a 400 m AOI on a 4 m grid."""
    plan = plan_grid(parse_aoi("88.29,43.384", radius_m=400), 4.0)
    yield from _serve_tiles(synthetic_raster, plan)


@pytest.fixture
def real_site() -> Iterator[TileSite]:
    """Tiles rendered from the real Dabancheng 2018 image, 500 m AOI on a 5 m grid."""
    if not REAL_IMAGE.exists():
        pytest.skip(f"real image not found at {REAL_IMAGE} (the shared data folder)")
    plan = plan_grid(parse_aoi("88.29,43.384", radius_m=500), 5.0)
    yield from _serve_tiles(REAL_IMAGE, plan)


def _context(tmp_path: Path, **kw: object) -> FetchContext:
    return FetchContext(cache_dir=tmp_path / "cache", **{"timeout_s": 0.5, "max_retries": 1, **kw})


def _fetch(site: TileSite, context: FetchContext, client: HttpClient | None = None,
           **options: object):
    source = site.source(**options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProvenanceWarning)
        return xyz.fetch(site.plan, WINDOW, source, role="after", context=context,
                         client=client or HttpClient(context, backoff_s=0.01))


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    return float(np.corrcoef(a[ok], b[ok])[0, 1])


def test_choose_zoom_examples() -> None:
    """10 m at the equator needs zoom 14 (9.55 m); clamping applies."""
    plan = GridPlan("EPSG:32631", (500000.0, 0.0, 501000.0, 1000.0), 10.0)
    assert xyz.choose_zoom(plan) == 14
    assert xyz.choose_zoom(plan, max_zoom=12) == 12
    assert xyz.choose_zoom(plan, min_zoom=16) == 16


@settings(max_examples=40, deadline=None)
@given(res_m=st.floats(0.3, 500.0), lat=st.floats(-70.0, 70.0))
def test_choose_zoom_is_coarsest_fine_enough(res_m: float, lat: float) -> None:
    """The chosen zoom resolves res_m at the AOI; one zoom coarser would not."""
    zone = 32600 if lat >= 0 else 32700
    from pyproj import Transformer
    x, y = Transformer.from_crs("EPSG:4326", f"EPSG:{zone + 31}", always_xy=True).transform(3, lat)
    plan = GridPlan(f"EPSG:{zone + 31}", (x - 500, y - 500, x + 500, y + 500), res_m)
    zoom = xyz.choose_zoom(plan, max_zoom=30)
    centre_lat = xyz._centre_lat(plan)
    assert xyz.ground_res_m(zoom, centre_lat) <= res_m * (1 + 1e-9) or zoom == 0
    assert zoom == 0 or xyz.ground_res_m(zoom - 1, centre_lat) > res_m * (1 - 1e-9)


def test_fetch_real_image_matches_source(real_site: TileSite, tmp_path: Path) -> None:
    """Tiles of the real image, fetched and warped onto the grid, match the image read directly."""
    scene = _fetch(real_site, _context(tmp_path))
    direct, _ = read_to_grid(real_site.raster, real_site.plan, role="after")
    assert scene.data.shape == (3, *real_site.plan.shape)
    assert list(scene.data.band.values) == ["red", "green", "blue"]
    for band in range(3):
        corr = _correlation(scene.data.values[band], direct.values[band])
        assert corr > 0.99, f"band {band}: correlation {corr:.4f}"
    assert np.isfinite(scene.data.values).all()
    assert np.nanmean(np.abs(scene.data.values - direct.values)) < 2.0
    assert scene.data.rio.crs.to_string() == real_site.plan.crs
    assert scene.data.rio.transform() == real_site.plan.transform


def test_fetch_real_image_zyx_template(real_site: TileSite, tmp_path: Path) -> None:
    """A {z}/{y}/{x} template (Esri's order) gives the same pixels as {z}/{x}/{y}."""
    a = _fetch(real_site, _context(tmp_path / "a"))
    with pytest.warns(ProvenanceWarning):
        b = xyz.fetch(real_site.plan, WINDOW, real_site.source("zyx"), role="after",
                      context=_context(tmp_path / "b"))
    np.testing.assert_array_equal(a.data.values, b.data.values)


def test_fetch_synthetic_matches_source(site: TileSite, tmp_path: Path) -> None:
    """On synthetic gradients the warped tiles track the source closely."""
    scene = _fetch(site, _context(tmp_path))
    direct, _ = read_to_grid(site.raster, site.plan, role="after")
    assert all(_correlation(scene.data.values[b], direct.values[b]) > 0.98 for b in range(3))
    assert scene.data.dtype == np.float32


def test_fetch_provenance(site: TileSite, tmp_path: Path) -> None:
    """One SourceRef: provider, 'name zN', template URL, no dates, tile hashes; a warning."""
    context = _context(tmp_path)
    source = site.source(attribution="Test tiles")
    with pytest.warns(ProvenanceWarning, match="acquisition date unknown"):
        scene = xyz.fetch(site.plan, WINDOW, source, role="after", context=context)
    (ref,) = scene.refs
    assert ref.provider == "test-tiles" and ref.item_id == f"test-tiles z{site.zoom}"
    assert ref.url == source.options["url"] and ref.release is None and ref.acquired is None
    assert scene.acquired is None
    tiles = ref.extra["tiles"]
    assert len(tiles) == scene.info["tiles"] and all(len(t["sha256"]) == 64 for t in tiles)
    assert ref.extra["zoom"] == site.zoom == scene.info["zoom"]
    assert ref.extra["attribution"] == "Test tiles"
    assert scene.info["requests"] == len(tiles) == site.server.total_requests
    assert len(ref.sha256) == 64


def test_fetch_second_run_zero_requests(site: TileSite, tmp_path: Path) -> None:
    """The same fetch again reads only the cache: zero requests, identical pixels."""
    context = _context(tmp_path)
    first = _fetch(site, context)
    site.server.reset_counts()
    second = _fetch(site, context)
    assert site.server.total_requests == 0 and second.info["requests"] == 0
    assert second.info["from_cache"] == second.info["tiles"]
    np.testing.assert_array_equal(first.data.values, second.data.values)
    offline = _fetch(site, _context(tmp_path, offline=True))
    np.testing.assert_array_equal(first.data.values, offline.data.values)


def test_fetch_missing_tile_is_nan(site: TileSite, tmp_path: Path) -> None:
    """A 404 tile leaves NaN where it would be, and is counted, not raised."""
    tiles = xyz.tiles_for_plan(site.plan, site.zoom)
    gone = tiles[0]
    site.server.fault(site.tile_path(gone.z, gone.x, gone.y), "status", status=404)
    full = _fetch(site, _context(tmp_path))
    assert full.info["missing_tiles"] == 1
    assert np.isnan(full.data.values).any() and np.isfinite(full.data.values).any()
    assert any(t["sha256"] is None for t in full.refs[0].extra["tiles"])


def test_fetch_all_tiles_missing(site: TileSite, tmp_path: Path) -> None:
    """When the server has no tile at all, NoValidDataError says so."""
    source = SourceConfig("empty", "xyz", {"url": site.server.url("/none/{z}/{x}/{y}.png")})
    with pytest.raises(NoValidDataError, match="no tiles for the AOI"):
        xyz.fetch(site.plan, WINDOW, source, role="before", context=_context(tmp_path))


def test_fetch_retries_failing_tile(site: TileSite, tmp_path: Path) -> None:
    """A tile failing with 500 once is retried and the scene is complete."""
    tile = xyz.tiles_for_plan(site.plan, site.zoom)[0]
    site.server.fault(site.tile_path(tile.z, tile.x, tile.y), "status", status=500, times=1)
    scene = _fetch(site, _context(tmp_path))
    assert scene.info["missing_tiles"] == 0
    assert scene.info["requests"] == scene.info["tiles"] + 1


def test_fetch_html_tile_fails(site: TileSite, tmp_path: Path) -> None:
    """An HTML page instead of a tile is a FetchError naming the tile URL."""
    tile = xyz.tiles_for_plan(site.plan, site.zoom)[0]
    path = site.tile_path(tile.z, tile.x, tile.y)
    site.server.fault(path, "html")
    with pytest.raises(FetchError, match="did not return an image") as e:
        _fetch(site, _context(tmp_path))
    assert path in str(e.value)


def test_fetch_undecodable_tile_evicted(site: TileSite, tmp_path: Path) -> None:
    """A body that looks like a PNG but does not decode fails and is removed from the cache."""
    tile = xyz.tiles_for_plan(site.plan, site.zoom)[0]
    path = site.tile_path(tile.z, tile.x, tile.y)
    site.server.add(path, b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    context = _context(tmp_path)
    with pytest.raises(FetchError, match="could not be decoded"):
        _fetch(site, context)
    assert not cache_paths(site.server.url(path), context=context)[1].exists()


def test_fetch_offline_miss(site: TileSite, tmp_path: Path) -> None:
    """Offline with an empty cache: one FetchError listing the tiles, no request."""
    with pytest.raises(FetchError, match=r"offline and \d+ URLs are not cached"):
        _fetch(site, _context(tmp_path, offline=True))
    assert site.server.total_requests == 0


def test_fetch_too_many_tiles(site: TileSite, tmp_path: Path) -> None:
    """More tiles than max_tiles is refused before any request."""
    with pytest.raises(FetchError, match="max_tiles = 1"):
        _fetch(site, _context(tmp_path), max_tiles=1)
    assert site.server.total_requests == 0


@pytest.mark.parametrize("options, key", [
    ({"url": "http://x/{z}/{x}.png"}, "url"),
    ({"url": "http://x/{z}/{x}/{y}", "max_zoom": "19"}, "max_zoom"),
    ({"url": "http://x/{z}/{x}/{y}", "min_zoom": 10, "max_zoom": 5}, "min_zoom"),
])
def test_tile_options_rejects_bad_config(options: dict, key: str) -> None:
    """Bad templates and zoom ranges are ConfigErrors naming the key."""
    with pytest.raises(ConfigError, match=key):
        xyz.tile_options(SourceConfig("bad", "xyz", options))


def test_tiles_for_plan_cover_bounds() -> None:
    """The tiles cover the plan's lon/lat bounds, sorted by row then column."""
    plan = plan_grid(parse_aoi("88.29,43.384", radius_m=400), 4.0)
    tiles = xyz.tiles_for_plan(plan, 15)
    assert tiles == sorted(tiles, key=lambda t: (t.y, t.x))
    import mercantile
    west, north = mercantile.ul(min(t.x for t in tiles), min(t.y for t in tiles), 15)
    assert west < 88.29 - 400 / (111320 * math.cos(math.radians(43.384)))
    assert north > 43.384 + 400 / 111320


def test_fetch_wrong_size_tile_evicted_next_run_recovers(site: TileSite, tmp_path: Path) -> None:
    """A tile of the wrong size (a 1x1 placeholder) fails with the sizes, is not kept in the
    cache, and the next run fetches it anew (it stayed cached and failed every run)."""
    tile = xyz.tiles_for_plan(site.plan, site.zoom)[0]
    path = site.tile_path(tile.z, tile.x, tile.y)
    good, kind = site.server.files[path]
    with MemoryFile() as mem:
        with mem.open(driver="PNG", width=1, height=1, count=3, dtype="uint8") as dst:
            dst.write(np.full((3, 1, 1), 9, np.uint8))
        site.server.add(path, mem.read(), kind)
    context = _context(tmp_path)
    with pytest.raises(FetchError, match="is 1x1 px uint8, expected 256x256"):
        _fetch(site, context)
    assert not any(p.exists() for p in cache_paths(site.server.url(path), context=context))
    site.server.add(path, good, kind)
    assert np.isfinite(_fetch(site, context).data.values).any()
