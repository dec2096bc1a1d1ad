#!/usr/bin/env python
"""scripts/bench_fetch.py: requests and bytes a STAC/COG fetch of a small AOI costs.

Prints figures, never asserts them. Issue "make bench": a COG fetch of a small AOI should
transfer at most 1.25x the compressed bytes of the COG blocks that intersect it, and a cached
rerun of the same job should make no network request.

It makes (once, cached under ``--workdir``) a synthetic Sentinel-2 L2A tile as real COGs: two
items (two dates) of one 109.8 km MGRS-like tile in EPSG:32645, each with the Earth Search
assets ``red``, ``green``, ``blue``, ``nir``, ``swir16`` (uint16 DN, baseline 05.10 offset)
and ``scl`` (uint8 classes), DEFLATE with horizontal predictor, 1024 px blocks, internal
overviews, textured (smooth multi-scale ground plus per-pixel sensor noise, so compressed
block sizes are those of real imagery, about 1.2-1.3 bytes per pixel). With ``--fetch-px
5490`` (default) every asset is 5490 x 5490 at 20 m (520 MB, 1.5 min to generate on 2 busy
cores); with ``10980`` red, green, blue and nir are 10980 x 10980 at 10 m as on Earth Search
(1.7 GB, 7 min).

It serves them with the minimal STAC API of ``tests/fetch/stac_server.py`` on the loopback
server of ``tests/fetch/servers.py`` (Range support, per-path counters), and runs
``pipeline.fetch.stac.fetch`` onto a 10 m working grid (the default for STAC sources) for
each AOI: a 1 km square inside one block, a 3 km square across a block corner (4 blocks of
every file), a 1 km square whose corner touches a block corner (the resampling margin's worst
case), and ``--random`` 1 km squares at random places. Per AOI and GDAL option set:

1. a fresh cache: requests (HEAD and ranged GET) and bytes the server sent for the COGs, and
   the STAC JSON requests; the compressed bytes of the full-resolution blocks under the AOI
   (from the TIFF ``BLOCK_OFFSET_x_y`` / ``BLOCK_SIZE_x_y`` metadata); their ratio (target
   <= 1.25); and where the bytes went (header, AOI blocks, other blocks, overviews, padding);
2. the same job again with the warm cache: requests (target 0);
3. the same job with ``offline=True``: requests (0) and whether it succeeded.

Option sets other than ``pipeline`` (the pipeline's own ``gdal_options()``) are applied by
monkeypatching ``pipeline.fetch.stac_load.gdal_options`` in this process only (``--variants``;
random AOIs use the pipeline's options). Each case gets a new server (a new port, so nothing
is served from GDAL's in-process ``/vsicurl/`` cache) and a new fetch cache.

stdout gets the tables, stderr the progress; ``--json PATH`` writes the raw results (what
``scripts/bench.py`` reads to add a section to ``docs/benchmarks.md``).

Examples::

    .venv/bin/python scripts/bench_fetch.py                  # 1-2 min (+1.5 min the first time)
    .venv/bin/python scripts/bench_fetch.py --variants pipeline
    .venv/bin/python scripts/bench_fetch.py --fetch-px 10980 --variants pipeline,ingest-16k
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import mmap
import os
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The loopback HTTP server and STAC API are the test suite's (tests/fetch/servers.py and
# tests/fetch/stac_server.py, imported as ``fetch.servers`` / ``fetch.stac_server`` exactly as
# pytest's ``pythonpath = ["tests"]`` does), so tests/ goes on sys.path: no copy of the server.
if str(PROJECT_ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT / "tests"))
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))
if str(PROJECT_ROOT / "scripts") not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT / "scripts"))

from bench import md_table, text_table  # noqa: E402  (scripts/bench.py, the same tables)

DEFAULT_WORKDIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sitewatch-bench"
TARGET_RATIO = 1.25
TARGET_RERUN_REQUESTS = 0

# --- the synthetic Sentinel-2 tile ----------------------------------------------------------
GENERATOR_VERSION = 1  # bump whenever the files change, so cached tiles are rebuilt
SEED = 20240602
CRS = "EPSG:32645"
TILE_ULX, TILE_ULY = 600000.0, 4900020.0  # an MGRS tile corner of UTM 45N (Dabancheng area)
TILE_M = 109800.0
BLOCK_PX = 1024
PLAN_RES_M = 10.0  # the pipeline's default working resolution for STAC sources
COLLECTION = "sentinel-2-c1-l2a"
TILE_ID = "45TXK"
ASSETS_10M = ("red", "green", "blue", "nir")
ASSETS = (*ASSETS_10M, "swir16", "scl")
# Per band: mean surface reflectance, spread of the ground texture, sensor noise (reflectance).
REFLECTANCE = {"blue": (0.11, 0.020, 0.0020), "green": (0.15, 0.030, 0.0022),
               "red": (0.19, 0.040, 0.0025), "nir": (0.27, 0.045, 0.0030),
               "swir16": (0.33, 0.050, 0.0030)}
OCTAVES_M = ((8000.0, 1.0), (2000.0, 0.7), (400.0, 0.5), (100.0, 0.35), (30.0, 0.25))
DATES = (datetime(2021, 6, 9, 5, 16, 29, tzinfo=UTC), datetime(2021, 6, 14, 5, 16, 31, tzinfo=UTC))
CLOUD_SHARE = (0.12, 0.02)  # of each date's tile
BASELINE = "05.10"
BOA_OFFSET_DN = 1000
WINDOW = (date(2021, 6, 1), date(2021, 6, 30))
# AOIs: (name, centre east and south of the tile's top-left corner in metres, side in m).
# Blocks are 10.24 km (10 m files) or 20.48 km (20 m files): 15360 m is inside one block of
# either; 20480 m is a block corner of both; 19980 puts the AOI's corner on that block corner.
AOIS = (("1 km, inside one block", 15360.0, 15360.0, 1000.0),
        ("3 km, across a block corner", 20480.0, 20480.0, 3000.0),
        ("1 km, corner on a block corner", 19980.0, 19980.0, 1000.0))
RANDOM_SIDE_M = 1000.0

# GDAL option sets tried besides the pipeline's own (a value of None removes the option).
VARIANTS: dict[str, dict[str, Any]] = {
    "pipeline": {},
    "ingest-16k": {"GDAL_INGESTED_BYTES_AT_OPEN": 16384},
    "ingest-off": {"GDAL_INGESTED_BYTES_AT_OPEN": None},
    "no-head": {"CPL_VSIL_CURL_USE_HEAD": "NO"},
    "no-merge": {"GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "NO"},
    "no-multirange": {"GDAL_HTTP_MULTIRANGE": "NO"},
    "ingest-16k+no-head": {"GDAL_INGESTED_BYTES_AT_OPEN": 16384, "CPL_VSIL_CURL_USE_HEAD": "NO"},
}

log = logging.getLogger("bench_fetch")


# --- generating the COGs --------------------------------------------------------------------


def _asset_px(key: str, px: int) -> int:
    """Pixels per side of an asset: 10 m bands at ``px``, swir16 and scl at most 5490 (20 m)."""
    return px if key in ASSETS_10M else min(px, 5490)


def _upsample(lattice: np.ndarray, cell_px: float, n: int) -> np.ndarray:
    """(n, n) bilinear interpolation of ``lattice`` at one node per ``cell_px`` pixels."""
    pos = np.arange(n, dtype=np.float32) / np.float32(cell_px)
    i = np.minimum(pos.astype(np.intp), lattice.shape[0] - 2)
    f = (pos - i).astype(np.float32)
    cols = lattice[:, i] * (1 - f) + lattice[:, i + 1] * f  # (m, n)
    return cols[i] * (1 - f)[:, None] + cols[i + 1] * f[:, None]


def _smooth_field(rng: np.random.Generator, n: int, res_m: float,
                  octaves: tuple[tuple[float, float], ...] = OCTAVES_M) -> np.ndarray:
    """(n, n) float32 multi-scale value noise with unit-ish spread (scales in metres)."""
    out = np.zeros((n, n), np.float32)
    for cell_m, weight in octaves:
        cell_px = max(cell_m / res_m, 1.5)
        lattice = rng.standard_normal((int(math.ceil(n / cell_px)) + 2,) * 2, dtype=np.float32)
        out += np.float32(weight) * _upsample(lattice, cell_px, n)
    return out / np.float32(math.sqrt(sum(w * w for _, w in octaves)))


CLOUD_OCTAVES_M = ((6000.0, 1.0), (1500.0, 0.5), (400.0, 0.25))


def _scl(rng: np.random.Generator, ground: np.ndarray, cloud: np.ndarray, res_m: float,
         share: float) -> np.ndarray:
    """Scene classification: bare soil / vegetation / water, clouds with shadows beside them."""
    scl = np.where(ground > 0.6, 4, 5).astype(np.uint8)  # vegetation, bare soil
    scl[ground < -1.9] = 6  # water
    thr = float(np.quantile(cloud[::8, ::8], 1 - share))
    dense = cloud > thr
    scl[cloud > thr - 0.25] = 8  # cloud, medium probability (edges)
    scl[dense] = 9
    shift = max(1, int(300 / res_m))  # shadows 300 m south-east of clouds
    shadow = np.zeros_like(dense)
    shadow[shift:, shift:] = dense[:-shift, :-shift]
    scl[shadow & (scl < 8)] = 3
    thin = rng.random(scl.shape, dtype=np.float32) < 0.002  # scattered unclassified pixels
    scl[thin & (scl < 8)] = 7
    return scl


def _write_cog(path: Path, data: np.ndarray, res_m: float, *, nodata: int,
               resampling: str) -> None:
    """One band as a Sentinel-2-like COG: DEFLATE, predictor 2, 1024 blocks, overviews."""
    from affine import Affine
    from rasterio.io import MemoryFile
    from rasterio.shutil import copy as rio_copy

    n = data.shape[0]
    profile = {"driver": "GTiff", "width": n, "height": n, "count": 1, "dtype": data.dtype,
               "crs": CRS, "transform": Affine(res_m, 0, TILE_ULX, 0, -res_m, TILE_ULY),
               "nodata": nodata}
    tmp_path = path.with_suffix(".part.tif")
    with MemoryFile() as mem:
        with mem.open(**profile) as ds:
            ds.write(data, 1)
        rio_copy(mem.name, str(tmp_path), driver="COG", blocksize=BLOCK_PX, compress="DEFLATE",
                 predictor="YES" if data.dtype == np.uint16 else "NO",
                 overview_resampling=resampling, num_threads="ALL_CPUS")
    tmp_path.replace(path)


def ensure_tile(workdir: Path, px: int, *, regenerate: bool = False) -> dict[str, Any]:
    """The cached synthetic tile: {"dir", "items" (STAC dicts, server paths), "files"}."""
    tile_dir = workdir / f"s2cog-v{GENERATOR_VERSION}-{px}"
    manifest = tile_dir / "items.json"
    if manifest.exists() and not regenerate:
        items = json.loads(manifest.read_text())
        files = {a["href"]: tile_dir / a["href"].lstrip("/")
                 for i in items for a in i["assets"].values()}
        if all(p.exists() for p in files.values()):
            log.info("reusing the synthetic Sentinel-2 tile in %s", tile_dir)
            return {"dir": tile_dir, "items": items, "files": files}
    from fetch.stac_server import make_item

    manifest.unlink(missing_ok=True)  # items.json is written last: it marks a complete tile
    start = time.perf_counter()
    rng = np.random.default_rng([SEED, px])
    sizes = sorted({_asset_px(k, px) for k in ASSETS}, reverse=True)
    grounds = {sizes[0]: _smooth_field(np.random.default_rng(SEED), sizes[0], TILE_M / sizes[0])}
    for n in sizes[1:]:  # the 20 m ground is the 10 m one averaged 2 x 2: the same landscape
        f = sizes[0] // n
        grounds[n] = grounds[sizes[0]][:n * f, :n * f].reshape(n, f, n, f).mean(axis=(1, 3))
    log.info("ground texture: %.1f s", time.perf_counter() - start)
    items = []
    for d, when in enumerate(DATES):
        item_id = f"S2{'AB'[d]}_{TILE_ID}_{when:%Y%m%d}_0_L2A"
        folder = tile_dir / "cogs" / item_id
        folder.mkdir(parents=True, exist_ok=True)
        n20 = _asset_px("scl", px)
        cloud = _smooth_field(np.random.default_rng([SEED, d, 99]), n20, TILE_M / n20,
                              CLOUD_OCTAVES_M)
        scl = _scl(rng, grounds[n20], cloud, TILE_M / n20, CLOUD_SHARE[d])
        cloud_cover = float(np.isin(scl, (8, 9, 10)).mean() * 100)
        assets, rbands = {}, {}
        for key in ASSETS:
            n = _asset_px(key, px)
            res_m = TILE_M / n
            path = folder / f"{key}.tif"
            if key == "scl":
                _write_cog(path, scl, res_m, nodata=0, resampling="nearest")
                rbands[key] = {"data_type": "uint8", "nodata": 0, "spatial_resolution": res_m}
            else:
                mean, spread, noise = REFLECTANCE[key]
                gain = 1.0 + 0.03 * d  # the second date is a little brighter
                refl = (mean + spread * grounds[n]) * gain
                refl += noise * rng.standard_normal((n, n), dtype=np.float32)
                if n != n20:
                    up = np.repeat(np.repeat(np.isin(scl, (8, 9)), 2, 0), 2, 1)[:n, :n]
                else:
                    up = np.isin(scl, (8, 9))
                refl[up] = 0.55 + 0.05 * refl[up]  # clouds are bright
                dn = np.clip(np.rint(refl * 10000 + BOA_OFFSET_DN), 1, 65535).astype(np.uint16)
                del refl, up
                _write_cog(path, dn, res_m, nodata=0, resampling="average")
                rbands[key] = {"data_type": "uint16", "nodata": 0, "scale": 0.0001,
                               "offset": -0.1, "spatial_resolution": res_m}
            assets[key] = f"/cogs/{item_id}/{key}.tif"
            log.info("%s %s: %d px, %.1f MB (%.0f s so far)", item_id, key, n,
                     path.stat().st_size / 1e6, time.perf_counter() - start)
        n10 = _asset_px("red", px)
        item = make_item(item_id, when, collection=COLLECTION, crs=CRS,
                         bounds=(TILE_ULX, TILE_ULY - TILE_M, TILE_ULX + TILE_M, TILE_ULY),
                         shape=(n10, n10), assets=assets, cloud_cover=round(cloud_cover, 2),
                         raster_bands=rbands,
                         properties={"s2:processing_baseline": BASELINE, "platform":
                                     f"sentinel-2{'ab'[d]}", "constellation": "sentinel-2",
                                     "s2:mgrs_tile": TILE_ID})
        for key, asset in item["assets"].items():  # 20 m assets have their own grid
            n = _asset_px(key, px)
            asset["proj:shape"] = [n, n]
            asset["proj:transform"] = [TILE_M / n, 0.0, TILE_ULX, 0.0, -TILE_M / n, TILE_ULY]
        items.append(item)
    manifest.write_text(json.dumps(items, indent=1))
    files = {a["href"]: tile_dir / a["href"].lstrip("/")
             for i in items for a in i["assets"].values()}
    log.info("synthetic tile generated in %.0f s (%.0f MB) in %s", time.perf_counter() - start,
             sum(p.stat().st_size for p in files.values()) / 1e6, tile_dir)
    return {"dir": tile_dir, "items": items, "files": files}


# --- the COG layout ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where one COG's bytes are: header end, full-res blocks, overview blocks."""

    size: int
    res_m: float
    header_end: int  # first byte of tile data (the header, IFDs and tile indexes come before)
    blocks: dict[tuple[int, int], tuple[int, int]]  # (col, row) -> (offset, size), full res
    overviews: list[tuple[int, int]]  # (offset, size) of every overview block


def layout_of(path: Path) -> Layout:
    """Read every block's offset and size from the TIFF metadata domain."""
    import rasterio

    def blocks_of(ds: Any) -> dict[tuple[int, int], tuple[int, int]]:
        bh, bw = ds.block_shapes[0]
        out = {}
        for r in range(math.ceil(ds.height / bh)):
            for c in range(math.ceil(ds.width / bw)):
                off = ds.get_tag_item(f"BLOCK_OFFSET_{c}_{r}", "TIFF", bidx=1)
                size = ds.get_tag_item(f"BLOCK_SIZE_{c}_{r}", "TIFF", bidx=1)
                if off is not None and size is not None:
                    out[(c, r)] = (int(off), int(size))
        return out

    with rasterio.open(path) as ds:
        full = blocks_of(ds)
        n_ovr, res_m = len(ds.overviews(1)), ds.res[0]
    overviews = []
    for level in range(n_ovr):
        with rasterio.open(path, overview_level=level) as ds:
            overviews += list(blocks_of(ds).values())
    data = [o for o, s in [*full.values(), *overviews] if s > 0]
    return Layout(path.stat().st_size, res_m, min(data), full, overviews)


def aoi_blocks(layout: Layout, bounds: tuple[float, float, float, float],
               margin_m: float = 0.0) -> list[tuple[int, int]]:
    """(col, row) of the full-resolution blocks that intersect ``bounds`` grown by a margin."""
    span = BLOCK_PX * layout.res_m
    minx, miny, maxx, maxy = (bounds[0] - margin_m, bounds[1] - margin_m,
                              bounds[2] + margin_m, bounds[3] + margin_m)
    c0, c1 = int((minx - TILE_ULX) // span), int(math.ceil((maxx - TILE_ULX) / span)) - 1
    r0, r1 = int((TILE_ULY - maxy) // span), int(math.ceil((TILE_ULY - miny) / span)) - 1
    return [(c, r) for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)
            if (c, r) in layout.blocks]


def resampled(path: str, layout: Layout) -> bool:
    """True if a file is read with bilinear resampling (not scl, not on the grid's pixels)."""
    return not path.endswith("/scl.tif") and not math.isclose(layout.res_m, PLAN_RES_M)


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> int:
    """Bytes shared by two half-open ranges."""
    return max(0, min(a[1], b[1]) - max(a[0], b[0]))


def attribute(ranges: list[tuple[int, int]], layout: Layout,
              wanted: list[tuple[int, int]]) -> Counter[str]:
    """Split requested byte ranges (inclusive ends) into header / AOI / other / overview / gap."""
    parts = {"header": [(0, layout.header_end)],
             "AOI blocks": [(o, o + s) for k, (o, s) in layout.blocks.items() if k in wanted],
             "other full-res blocks": [(o, o + s) for k, (o, s) in layout.blocks.items()
                                       if k not in wanted],
             "overview blocks": [(o, o + s) for o, s in layout.overviews]}
    out: Counter[str] = Counter()
    for start, end in ranges:
        span = (start, min(end + 1, layout.size))
        total = span[1] - span[0]
        for name, spans in parts.items():
            out[name] += sum(_overlap(span, s) for s in spans)
        out["gaps (block leaders, trailers)"] += total - sum(
            sum(_overlap(span, s) for s in spans) for spans in parts.values())
    return out


# --- one measurement ----------------------------------------------------------------------


@contextlib.contextmanager
def gdal_variant(name: str) -> Iterator[dict[str, Any]]:
    """Patch ``pipeline.fetch.stac_load.gdal_options`` with the variant's overrides."""
    from pipeline.fetch import stac_load

    original = stac_load.gdal_options
    overrides = VARIANTS[name]

    def patched(context: Any) -> dict[str, Any]:
        opts = dict(original(context))
        for key, value in overrides.items():
            if value is None:
                opts.pop(key, None)
            else:
                opts[key] = value
        return opts

    stac_load.gdal_options = patched  # rasterio_env() looks it up at call time
    try:
        yield overrides
    finally:
        stac_load.gdal_options = original


def _instrument_handler() -> None:
    """Patch the test server's handler class, in this process only.

    ``servers.py`` counts requests per path but not their method: HEADs are counted per path
    in ``server.heads`` so that a GET without Range (GDAL's whole-file probe when HEAD is
    disabled) is not mistaken for one. And a client that resets a keep-alive connection (GDAL
    aborting that probe) makes the stdlib print a traceback: it is silenced.
    """
    from fetch import servers

    handler = servers._Handler
    if getattr(handler, "_bench_instrumented", False):
        return
    do_head, handle = handler.do_HEAD, handler.handle

    def counting_do_head(self: Any) -> None:
        with self.state.lock:
            self.state.__dict__.setdefault("heads", Counter())[self.path] += 1
        do_head(self)

    def quiet_handle(self: Any) -> None:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            handle(self)

    handler.do_HEAD, handler.handle = counting_do_head, quiet_handle
    handler._bench_instrumented = True


@contextlib.contextmanager
def serve_tile(tile: dict[str, Any]) -> Iterator[Any]:
    """A loopback server with the STAC API over the tile's items and its COGs (memory-mapped)."""
    from fetch.servers import serve
    from fetch.stac_server import StacApi

    _instrument_handler()
    with contextlib.ExitStack() as stack, serve() as server:
        for url_path, path in tile["files"].items():
            with open(path, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            stack.callback(_close_mmap, mm)
            # Put the mmap in server.files directly (server.add() would copy it to bytes): the
            # handler only takes len() and slices of a body, which an mmap answers from disk.
            server.files[url_path] = (mm, "image/tiff")
        StacApi(tile["items"]).install(server)
        yield server


def _close_mmap(mm: mmap.mmap) -> None:
    """Close an mmap unless a handler thread still writes from it (then GC closes it)."""
    with contextlib.suppress(BufferError):
        mm.close()


def clear_vsicurl_cache() -> bool:
    """Empty GDAL's in-process /vsicurl/ cache (VSICurlClearCache via ctypes); False if not found.

    The GDAL library is the one rasterio loaded (found in /proc/self/maps), never another.
    Each case also gets a new server port, hence new URLs; this guards against a port reused.
    """
    import ctypes

    import rasterio  # noqa: F401  (loads GDAL)

    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return False
    loaded = {line.split()[-1] for line in maps if "libgdal" in line.rsplit("/", 1)[-1]}
    for path in sorted(loaded):
        try:
            ctypes.CDLL(path).VSICurlClearCache()
            return True
        except (OSError, AttributeError):
            continue
    return False


def reset_counts(server: Any) -> None:
    """Forget the server's counters, the HEAD counter of ``_instrument_handler`` included."""
    server.reset_counts()
    with server.lock:
        server.__dict__.pop("heads", None)


def _header(headers: dict[str, str], name: str) -> str | None:
    return next((v for k, v in headers.items() if k.lower() == name.lower()), None)


def counters(server: Any, layouts: dict[str, Layout],
             wanted: dict[str, list[tuple[int, int]]]) -> dict[str, Any]:
    """What the server saw since its last reset: COG and STAC requests, bytes, breakdown."""
    from fetch.servers import _parse_ranges

    with server.lock:
        seen = list(server.headers_seen)
        served = dict(server.bytes_served)
        heads = Counter(server.__dict__.get("heads", {}))
    cog = {"requests": 0, "heads": 0, "whole_gets": 0, "gets": 0, "ranges": 0, "bytes": 0,
           "files": set()}
    stac = {"requests": 0, "bytes": 0}
    parts: Counter[str] = Counter()
    for full_path, headers in seen:
        path = full_path.split("?", 1)[0]
        if path not in layouts:
            stac["requests"] += 1
            continue
        cog["requests"] += 1
        cog["files"].add(path)
        rng = _header(headers, "Range")
        if rng is None:
            if heads[full_path] > 0:
                heads[full_path] -= 1
                cog["heads"] += 1
            else:  # a GET of the whole file (GDAL aborts it after the headers when HEAD is off)
                cog["whole_gets"] += 1
            continue
        cog["gets"] += 1
        ranges = _parse_ranges(rng, layouts[path].size) or []
        cog["ranges"] += len(ranges)
        parts += attribute(ranges, layouts[path], wanted[path])
    for full_path, n in served.items():
        if full_path.split("?", 1)[0] in layouts:
            cog["bytes"] += n
        else:
            stac["bytes"] += n
    cog["files"] = len(cog["files"])
    return {"cog": cog, "stac": stac, "parts": dict(parts),
            "total_requests": cog["requests"] + stac["requests"]}


def run_case(tile: dict[str, Any], layouts: dict[str, Layout],
             aoi: tuple[str, float, float, float], variant: str, scratch: Path) -> dict[str, Any]:
    """Fresh fetch, warm rerun and offline rerun of one AOI with one GDAL option set."""
    from pipeline.fetch import stac
    from pipeline.fetch.base import DateWindow, FetchContext, SourceConfig
    from pipeline.model import GridPlan

    name, east_m, south_m, side_m = aoi
    cx, cy = TILE_ULX + east_m, TILE_ULY - south_m
    bounds = (cx - side_m / 2, cy - side_m / 2, cx + side_m / 2, cy + side_m / 2)
    plan = GridPlan(CRS, bounds, PLAN_RES_M)
    window = DateWindow(*WINDOW)
    wanted = {p: aoi_blocks(lay, bounds) for p, lay in layouts.items()}
    aoi_bytes = sum(lay.blocks[k][1] for p, lay in layouts.items() for k in wanted[p])
    # Resampling reads a margin: for bands resampled bilinearly (resolution other than the
    # grid's) odc-stac/GDAL read up to one source pixel beyond the AOI (measured); bands on the
    # grid's own pixels are read directly, scl with nearest: no margin. "support" counts those.
    support = {p: aoi_blocks(lay, bounds, lay.res_m if resampled(p, lay) else 0.0)
               for p, lay in layouts.items()}
    support_bytes = sum(lay.blocks[k][1] for p, lay in layouts.items() for k in support[p])
    header_bytes = sum(lay.header_end for lay in layouts.values())
    row: dict[str, Any] = {"aoi": name, "offset_m": [east_m, south_m], "side_m": side_m,
                           "variant": variant, "overrides": dict(VARIANTS[variant]),
                           "grid": list(plan.shape), "files": len(layouts),
                           "aoi_blocks": sum(len(v) for v in wanted.values()),
                           "aoi_block_bytes": aoi_bytes, "header_bytes": header_bytes,
                           "support_blocks": sum(len(v) for v in support.values()),
                           "support_block_bytes": support_bytes}
    if not clear_vsicurl_cache():
        log.debug("VSICurlClearCache not found; relying on a new server port per case")
    with (tempfile.TemporaryDirectory(prefix="fetch-", dir=scratch) as tmp,
          serve_tile(tile) as server, gdal_variant(variant), warnings.catch_warnings()):
        warnings.simplefilter("ignore")  # e.g. "only x % clear": not what is measured here
        source = SourceConfig("bench-stac", "stac", {"url": server.url("/"),
                                                     "collection": COLLECTION})
        runs = {}
        for run, offline in (("fresh", False), ("rerun", False), ("offline", True)):
            context = FetchContext(cache_dir=Path(tmp) / "cache", offline=offline,
                                   timeout_s=30.0, max_retries=2)
            reset_counts(server)
            start = time.perf_counter()
            try:
                scene = stac.fetch(plan, window, source, role="after", context=context)
                ok, info = True, scene.info
                clear = float(info["clear_share"])
            except Exception as e:  # noqa: BLE001 (a figure, not a crash: report it)
                ok, info, clear = False, {"error": f"{type(e).__name__}: {e}"}, math.nan
            seconds = time.perf_counter() - start
            runs[run] = {"ok": ok, "seconds": seconds, "clear_share": clear,
                         "from_cache": info.get("from_cache"), "error": info.get("error"),
                         **counters(server, layouts, wanted)}
            log.info("  %-8s %s: %d requests (%d COG, %d STAC), %.2f MB of COG, %.1f s%s", run,
                     variant, runs[run]["total_requests"], runs[run]["cog"]["requests"],
                     runs[run]["stac"]["requests"], runs[run]["cog"]["bytes"] / 1e6, seconds,
                     "" if ok else f" FAILED {info['error']}")
    row["runs"] = runs
    row["ratio"] = runs["fresh"]["cog"]["bytes"] / aoi_bytes if aoi_bytes else math.nan
    row["support_ratio"] = (runs["fresh"]["cog"]["bytes"] / support_bytes if support_bytes
                            else math.nan)
    return row


# --- tables -----------------------------------------------------------------------------------


def _mb(v: float) -> str:
    return f"{v / 1e6:.2f}"


def _met(ok: bool) -> str:
    return "met" if ok else "not met"


def _fixed(rows: list[dict[str, Any]], variant: str | None = "") -> list[dict[str, Any]]:
    """The fixed (not random) AOIs' rows of one option set ("": the pipeline's, else the first
    measured; None: all)."""
    fixed = [r for r in rows if not r.get("random")]
    if variant == "":
        names = [r["variant"] for r in fixed]
        variant = "pipeline" if "pipeline" in names else (names or [None])[0]
    return [r for r in fixed if variant in (None, r["variant"])]


def _ratio(r: dict[str, Any], key: str = "ratio") -> str:
    return f"{r[key]:.3f}" if r["runs"]["fresh"]["ok"] else "failed"


def _reruns(r: dict[str, Any]) -> tuple[str, str, bool]:
    """Rerun and offline request counts (with failures named) and whether both are 0."""
    re_, off = r["runs"]["rerun"], r["runs"]["offline"]
    ok = (re_["ok"] and bool(re_["from_cache"]) and off["ok"]
          and re_["total_requests"] == TARGET_RERUN_REQUESTS and off["total_requests"] == 0)
    return (str(re_["total_requests"]) + ("" if re_["ok"] and re_["from_cache"] else " (failed)"),
            str(off["total_requests"]) + ("" if off["ok"] else f" ({off['error']})"), ok)


def summary_rows(rows: list[dict[str, Any]], variant: str = "") -> list[list[str]]:
    """Per fixed AOI, the pipeline's own options: requests, bytes, ratio, reruns, targets."""
    out = [["AOI", "grid px", "COG files", "AOI blocks", "AOI block MB", "COG requests (HEAD)",
            "COG MB served", "ratio", f"ratio <= {TARGET_RATIO:g}",
            "ratio to blocks incl. resampling margin", "STAC requests", "fetch s",
            "rerun requests", "offline requests", "rerun = 0"]]
    for r in _fixed(rows, variant):
        f = r["runs"]["fresh"]
        rerun, offline, ok = _reruns(r)
        out.append([
            r["aoi"], f"{r['grid'][0]} x {r['grid'][1]}", str(r["files"]), str(r["aoi_blocks"]),
            _mb(r["aoi_block_bytes"]), f"{f['cog']['requests']} ({f['cog']['heads']})",
            _mb(f["cog"]["bytes"]), _ratio(r), _met(f["ok"] and r["ratio"] <= TARGET_RATIO),
            f"{_ratio(r, 'support_ratio')} ({r['support_blocks']} blocks)",
            str(f["stac"]["requests"]), f"{f['seconds']:.1f}", rerun, offline, _met(ok),
        ])
    return out


def random_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    """The 1 km AOIs at random places, one row each, then the median and worst."""
    rand = [r for r in rows if r.get("random")]
    out = [["AOI", "offset E, S (km)", "AOI blocks", "AOI block MB", "COG requests",
            "COG MB served", "ratio", "ratio incl. margin", "clear share", "rerun requests",
            "offline requests"]]
    for r in rand:
        f = r["runs"]["fresh"]
        rerun, offline, _ = _reruns(r)
        out.append([r["aoi"], f"{r['offset_m'][0] / 1000:.2f}, {r['offset_m'][1] / 1000:.2f}",
                    str(r["aoi_blocks"]), _mb(r["aoi_block_bytes"]), str(f["cog"]["requests"]),
                    _mb(f["cog"]["bytes"]), _ratio(r), _ratio(r, "support_ratio"),
                    f"{f['clear_share']:.0%}" if f["ok"] else f["error"][:60], rerun, offline])
    ratios = [r["ratio"] for r in rand if r["runs"]["fresh"]["ok"]]
    if ratios:
        out.append(["median / worst", "", "", "", "", "",
                    f"{float(np.median(ratios)):.3f} / {max(ratios):.3f}", "", "", "", ""])
    return out


PARTS = ("header", "AOI blocks", "other full-res blocks", "overview blocks",
         "gaps (block leaders, trailers)")


def breakdown_rows(rows: list[dict[str, Any]], variant: str = "") -> list[list[str]]:
    """Where the fresh run's requested bytes went, per fixed AOI (MB)."""
    out = [["AOI", "requested MB", *PARTS, "header area of the files"]]
    for r in _fixed(rows, variant):
        p = r["runs"]["fresh"]["parts"]
        out.append([r["aoi"], _mb(sum(p.values())), *(_mb(p.get(k, 0)) for k in PARTS),
                    _mb(r["header_bytes"])])
    return out


def variant_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    """Every option set on every fixed AOI: requests, bytes, ratio, fetch seconds."""
    out = [["options", "AOI", "COG requests", "HEAD", "GET without Range",
            "ranged GET (ranges)", "COG MB served",
            "ratio", "ratio incl. margin", "overview-area MB", "fetch s",
            "rerun requests"]]
    for r in _fixed(rows, None):
        f = r["runs"]["fresh"]
        over = ", ".join(f"{k}={'(unset)' if v is None else v}" for k, v in r["overrides"].items())
        p = f["parts"]
        out.append([
            f"{r['variant']}" + (f" ({over})" if over else ""), r["aoi"],
            str(f["cog"]["requests"]), str(f["cog"]["heads"]), str(f["cog"]["whole_gets"]),
            f"{f['cog']['gets']} ({f['cog']['ranges']})", _mb(f["cog"]["bytes"]),
            _ratio(r), _ratio(r, "support_ratio"),
            _mb(p.get("overview blocks", 0)), f"{f['seconds']:.1f}",
            str(r["runs"]["rerun"]["total_requests"]),
        ])
    return out


def describe_tile(result: dict[str, Any]) -> str:
    """One paragraph on the synthetic inputs."""
    t = result["tile"]
    return (f"Inputs: a synthetic Sentinel-2 L2A tile ({TILE_M / 1000:g} km, {CRS}), 2 items "
            f"x 6 COGs: red, green, blue, nir {t['px_10m']} x {t['px_10m']} px at "
            f"{t['res_10m']:g} m; swir16 and scl {t['px_20m']} x {t['px_20m']} px at "
            f"{TILE_M / t['px_20m']:g} m; uint16 DN / uint8 classes, DEFLATE (predictor 2 for "
            f"DN), {BLOCK_PX} px blocks, internal overviews; textured ground and sensor noise, "
            f"so a full-resolution red/green/blue/nir block is {t['block_mb_10m']:.2f} MB on "
            f"average ({t['bytes_per_px']:.2f} bytes per pixel), an scl block "
            f"{t['scl_block_kb']:.0f} kB, a header {t['header_kb']:.1f} kB; "
            f"{t['total_mb']:.0f} MB in all. Served over loopback HTTP (Range, multi-range) "
            f"with a minimal STAC API; `pipeline.fetch.stac.fetch` onto a {PLAN_RES_M:g} m grid "
            f"(median composite, SCL mask), fresh cache, then the same job with the warm cache, "
            f"then offline.")


def _shown(argv: list[str]) -> list[str]:
    """``argv`` without options that change no figure (--json, --workdir, -q)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--json", "--workdir"):
            skip = True
        elif not arg.startswith(("--json=", "--workdir=", "-q", "--quiet")):
            out.append(arg)
    return out


def markdown_section(result: dict[str, Any]) -> str:
    """The docs/benchmarks.md section (scripts/bench.py puts it after its own)."""
    variants = sorted({r["variant"] for r in result["rows"]})
    command = " ".join(["python scripts/bench_fetch.py", *_shown(result["argv"])])
    text = f"""## COG fetch of a small AOI (STAC)

From `scripts/bench_fetch.py`. Targets: a fetch transfers at most {TARGET_RATIO:g}x the
compressed bytes of the full-resolution COG blocks that intersect the AOI (ratio = COG bytes
the server sent / those block bytes, from the TIFF `BLOCK_OFFSET_x_y` / `BLOCK_SIZE_x_y`
metadata), and a cached rerun of the same job makes {TARGET_RERUN_REQUESTS} requests.
Measured {result['date']} with `{command}`
(rasterio {result['rasterio']}, GDAL {result['gdal']}, odc-stac {result.get('odc_stac', '?')}).

{describe_tile(result)}

{md_table(summary_rows(result['rows']))}

"COG requests (HEAD)": all requests for COG bytes, of which HEADs; "STAC requests": landing
page, conformance and search JSON. "ratio to blocks incl. resampling margin": the same bytes
against the blocks under the AOI grown by one source pixel for the bands resampled bilinearly
(those whose resolution is not the grid's: odc-stac / GDAL read that margin; bands on the
grid's own pixels are read directly, scl with nearest): when an AOI edge lies within a source
pixel of a block border, the neighbouring blocks are read for a pixel's worth of data. Rerun and
offline: the same job again with the warm cache, and with `offline=True`.

Where the fresh fetch's requested bytes went (the pipeline's options): "header" is the bytes
before the first tile of each file (IFDs and tile indexes; "header area of the files" is their
sum over all files, whether read or not); "overview blocks" are mostly the rest of the
`GDAL_INGESTED_BYTES_AT_OPEN` read at open, since a COG stores its smallest overviews right
after the header; "other full-res blocks" are neighbours read for rounding of ranges to
`CPL_VSIL_CURL_CHUNK_SIZE` (16 KiB) or for the resampling margin.

{md_table(breakdown_rows(result['rows']))}
"""
    if any(r.get("random") for r in result["rows"]):
        text += f"""
1 km AOIs at random places of the tile (pipeline options):

{md_table(random_rows(result['rows']))}
"""
    if len(variants) > 1:
        text += f"""
GDAL options tried (monkeypatched over `pipeline.fetch.stac_load.gdal_options()` for the
measurement only). "GET without Range": GDAL's probe of the file size when HEAD is disabled,
a GET of the whole file that it aborts after the headers; the server counts the bytes of such
an answer only when it finished writing it before the abort, so "COG MB served" undercounts
what a real network would carry for them.

{md_table(variant_rows(result['rows']))}
"""
    return text


# --- main -------------------------------------------------------------------------------------


def random_aois(n: int) -> list[tuple[str, float, float, float]]:
    """``n`` 1 km squares at seeded random places of the tile (10 m aligned, 1 km from edges)."""
    rng = np.random.default_rng([SEED, 7])
    lo, hi = 1000.0 + RANDOM_SIDE_M / 2, TILE_M - 1000.0 - RANDOM_SIDE_M / 2
    return [(f"1 km, random #{k + 1}", *(float(v) for v in np.round(rng.uniform(lo, hi, 2), -1)),
             RANDOM_SIDE_M) for k in range(n)]


def tile_stats(tile: dict[str, Any], layouts: dict[str, Layout]) -> dict[str, Any]:
    """Figures describing the generated files."""
    ten = [lay for p, lay in layouts.items() if p.endswith(("/red.tif", "/green.tif",
                                                               "/blue.tif", "/nir.tif"))]
    twenty = [lay for p, lay in layouts.items() if p.endswith("/scl.tif")]
    sizes = [s for lay in ten for (_, s) in lay.blocks.values()]
    n10 = round(TILE_M / ten[0].res_m)
    full = [s for lay in ten for (c, r), (_, s) in lay.blocks.items()
            if (c + 1) * BLOCK_PX <= n10 and (r + 1) * BLOCK_PX <= n10]
    return {"px_10m": n10, "px_20m": round(TILE_M / twenty[0].res_m), "res_10m": ten[0].res_m,
            "block_mb_10m": float(np.mean(sizes)) / 1e6,
            "bytes_per_px": float(np.mean(full)) / BLOCK_PX**2,
            "scl_block_kb": float(np.mean([s for lay in twenty for (_, s) in
                                           lay.blocks.values()])) / 1e3,
            "header_kb": float(np.mean([lay.header_end for lay in layouts.values()])) / 1e3,
            "total_mb": sum(lay.size for lay in layouts.values()) / 1e6}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Generate (or reuse) the tile, measure every AOI x variant; the raw results."""
    import rasterio

    args.workdir.mkdir(parents=True, exist_ok=True)
    tile = ensure_tile(args.workdir, args.fetch_px, regenerate=args.regenerate)
    layouts = {p: layout_of(f) for p, f in tile["files"].items()}
    stats = tile_stats(tile, layouts)
    log.info("tile: %d MB, 10 m-band blocks %.2f MB on average, SCL blocks %.1f kB, headers "
             "%.1f kB", stats["total_mb"], stats["block_mb_10m"], stats["scl_block_kb"],
             stats["header_kb"])
    rows = []
    for variant in args.variants:
        for aoi in AOIS:
            log.info("AOI %s, GDAL options %s", aoi[0], variant)
            rows.append(run_case(tile, layouts, aoi, variant, args.workdir))
    for k, aoi in enumerate(random_aois(args.random)):
        log.info("random AOI %d/%d at %s, pipeline GDAL options", k + 1, args.random, aoi[1:3])
        rows.append(run_case(tile, layouts, aoi, "pipeline", args.workdir) | {"random": True})
    import odc.stac

    return {"argv": args.argv, "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "gdal": rasterio.__gdal_version__, "rasterio": rasterio.__version__,
            "odc_stac": odc.stac.__version__,
            "fetch_px": args.fetch_px, "tile": stats, "rows": rows,
            "targets": {"ratio": TARGET_RATIO, "rerun_requests": TARGET_RERUN_REQUESTS}}


def print_tables(result: dict[str, Any]) -> None:
    """The tables on stdout."""
    print(describe_tile(result))
    print()
    shown = _fixed(result["rows"])
    print(f"COG fetch of a small AOI (GDAL options: {shown[0]['variant'] if shown else '-'}):")
    print(text_table(summary_rows(result["rows"])))
    print()
    print("where the fresh fetch's requested bytes went (MB):")
    print(text_table(breakdown_rows(result["rows"])))
    if any(r.get("random") for r in result["rows"]):
        print()
        print("1 km AOIs at random places (pipeline GDAL options):")
        print(text_table(random_rows(result["rows"])))
    if len({r["variant"] for r in result["rows"]}) > 1:
        print()
        print("GDAL option sets:")
        print(text_table(variant_rows(result["rows"])))


def parse_variants(text: str) -> list[str]:
    """``--variants`` text to a list of option-set names ("all": every one)."""
    names = list(VARIANTS) if text.strip() == "all" else [s.strip() for s in text.split(",")
                                                           if s.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"--variants {text!r}: choose from all, {', '.join(VARIANTS)}")
    return names


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                   help="cache of the generated tile and scratch space")
    p.add_argument("--fetch-px", type=int, choices=(5490, 10980), default=5490,
                   help="pixels per side of the 10 m bands' files (5490: all assets at 20 m)")
    p.add_argument("--variants", type=parse_variants, default=list(VARIANTS),
                   help=f"GDAL option sets to measure: all, or some of {', '.join(VARIANTS)}")
    p.add_argument("--random", type=int, default=8,
                   help="also fetch this many 1 km AOIs at random places (pipeline options)")
    p.add_argument("--regenerate", action="store_true", help="rebuild the cached tile")
    p.add_argument("--json", type=Path, help="write the raw results here")
    p.add_argument("-q", "--quiet", action="count", default=0, help="less progress on stderr")
    args = p.parse_args(argv)
    args.argv = argv
    return args


def main(argv: list[str] | None = None) -> int:
    """Measure, print the tables, optionally write the JSON."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.quiet == 0 else logging.WARNING,
                        stream=sys.stderr, format="bench-fetch: %(message)s")
    args.workdir = args.workdir.expanduser().resolve()
    result = run(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str))
        log.info("raw results in %s", args.json)
    print_tables(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
