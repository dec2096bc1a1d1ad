#!/usr/bin/env python
"""scripts/bench.py: wall time and peak memory of a detect run on a large synthetic pair.

Prints figures, never asserts them. For each ``--size`` it makes (once, cached under
``--workdir``) a synthetic before/after pair of tiled, DEFLATE-compressed uint8 RGB GeoTIFFs
at 0.5 m in EPSG:32645 near Dabancheng, then measures, each in a fresh subprocess so peak
memory is clean:

* the time to read both files fully with rasterio (and, beside it, in 2048-pixel windows);
* the whole ``pipeline.run.run_detect`` on an AOI that is the image's lon/lat bbox, with the
  seconds and the peak resident memory of every stage.
* (``--floor``, the default) the floor, ``scripts/bench_floor.py``: the raster part of the
  evidence done plainly in memory with no detector, against the read, to show how much of
  the ratio targets it takes by itself; the report then shows both ratios per size in a
  picture (``docs/img/benchmarks_ratio.png``, `scripts/bench_chart.py`).

Then (``--fetch``, the default; ``--no-fetch`` skips it) ``scripts/bench_fetch.py`` runs in a
subprocess: the requests and bytes a STAC/COG fetch of a small AOI costs, against the bytes of
the COG blocks under it, and the requests of a cached rerun.

stdout gets the tables; progress goes to stderr; ``docs/benchmarks.md`` gets the same tables
with the date, machine and library versions. Targets (issue "make bench"): detect within 4x
of the read time, peak memory under 2048 MB whatever the AOI size; a COG fetch within 1.25x
of the intersecting blocks' bytes, and 0 requests on a cached rerun.

Examples::

    .venv/bin/python scripts/bench.py --size 1024          # smoke run, about a minute
    .venv/bin/python scripts/bench.py --size 2048,4096,8192 --timeout 900
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORKDIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sitewatch-bench"
DEFAULT_DOCS = PROJECT_ROOT / "docs" / "benchmarks.md"
CHART_NAME = "img/benchmarks_ratio.png"  # beside the report, drawn with its floor section
TARGET_RATIO = 4.0  # issue 2, at 8192
TARGET_RATIO_LARGE = 3.0  # issue 7, at 20000
RATIO_TARGETS = {8192: TARGET_RATIO, 20000: TARGET_RATIO_LARGE}  # size -> detect / read
TARGET_PEAK_MB = 2048.0
TARGET_SPEEDUP = 1.6  # issue 7: 2 cores against 1
SPEEDUP_THREADS = 2  # the speed-up compares this many Dask threads with 1 (issue 7: 2 cores)
SPEEDUP_PAIRS = 3  # pairs of runs (1 thread, 2 threads) whose median speed-up is reported
TARGET_MP_SPREAD = 0.2  # issue 7: time per megapixel at 4k..20k within 20 %
PERF_ENV = ("GDAL_CACHEMAX", "GDAL_NUM_THREADS", "VSI_CACHE", "OMP_NUM_THREADS",
            "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "SITEWATCH_CONFIG")
STAGES = ("read", "coregister", "normalize", "change", "detect", "write")

# --- the synthetic scene --------------------------------------------------------------------
GENERATOR_VERSION = 1  # bump whenever the pixels change, so cached pairs are rebuilt
SEED = 20240601
RES_M = 0.5
CRS = "EPSG:32645"
CENTRE_LONLAT = (88.29, 43.38)
BLOCK_PX = 512
WRITE_PX = 2048
HALO_PX = 4
SHIFT_PX = (0.37, -0.61)  # (dy, dx) the after image's content is moved by
GAIN = (1.08, 1.06, 1.05)  # after = gain * scene + offset, per band
OFFSET = 5.0
NOISE_DN = 2.0  # sensor noise, independent per date
DATES = ("2019-05-02", "2021-06-14")
OCTAVES_PX = ((512, 1.0), (128, 0.6), (32, 0.4), (8, 0.3), (3, 0.15))
TINT = ((1.05, 4.0), (0.98, 0.0), (0.92, -2.0))  # per band: g * a + b
ROAD_RGB = (158, 152, 142)
YARD_RGB = (178, 168, 152)
WALL_RGB = (206, 205, 200)
NEW_ROOFS = ((232, 230, 224), (224, 222, 216), (84, 122, 178), (72, 110, 165), (170, 98, 76))
OLD_ROOFS = ((168, 158, 148), (150, 140, 128), (186, 176, 160))
SHADOW_FACTOR = 0.45

log = logging.getLogger("bench")


@dataclass
class Scene:
    """Everything needed to render any window of the pair; features in global pixel coords."""

    size: int
    origin: tuple[float, float]
    lattices: list[tuple[int, float, np.ndarray]]
    tints: list[np.ndarray]
    layers: dict[str, list[tuple[Any, int]]] = field(default_factory=dict)
    compounds: list[dict[str, Any]] = field(default_factory=list)
    n_new_houses: int = 0


def _origin(size: int) -> tuple[float, float]:
    """(minx, maxy) in CRS of a size x size image centred near CENTRE_LONLAT, whole metres."""
    from pyproj import Transformer

    x, y = Transformer.from_crs("EPSG:4326", CRS, always_xy=True).transform(*CENTRE_LONLAT)
    half = size * RES_M / 2
    return float(round(x - half)), float(round(y + half))


def _rotated_rect(cx: float, cy: float, length: float, width: float, angle_deg: float) -> Any:
    from shapely import affinity
    from shapely.geometry import box

    rect = box(cx - length / 2, cy - width / 2, cx + length / 2, cy + width / 2)
    return affinity.rotate(rect, angle_deg, origin=(cx, cy))


def _compound(rng: np.random.Generator, size: int, taken: list[Any]) -> dict[str, Any] | None:
    """A walled rectangle with rows of blocks (px units) placed clear of ``taken``, or None."""
    from shapely import affinity

    length = min(rng.uniform(480, 1120), 0.45 * size)
    width = length * rng.uniform(0.45, 0.8)
    angle = float(rng.uniform(-25, 25))
    centre = _place(rng, size, math.hypot(length, width) / 2 + 20, taken)
    if centre is None:
        return None
    cx, cy = centre.x, centre.y
    outline = _rotated_rect(cx, cy, length, width, angle)
    bl, bw = rng.uniform(48, 88), rng.uniform(20, 32)  # 24-44 m x 10-16 m blocks
    gap_u, gap_v, margin = 24.0, 36.0, 40.0
    blocks = []
    u = -length / 2 + margin
    while u + bl <= length / 2 - margin:
        v = -width / 2 + margin
        while v + bw <= width / 2 - margin:
            if rng.random() > 0.15:  # some lots stay empty
                blocks.append(_rotated_rect(cx + u + bl / 2, cy + v + bw / 2, bl, bw, 0.0))
            v += bw + gap_v
        u += bl + gap_u
    blocks = [affinity.rotate(b, angle, origin=(cx, cy)) for b in blocks]
    return {"outline": outline, "blocks": blocks, "angle_deg": angle,
            "length_m": length * RES_M, "width_m": width * RES_M}


def _place(rng: np.random.Generator, size: int, radius: float, taken: list[Any]) -> Any:
    """A random centre point whose disc of ``radius`` px fits and avoids ``taken`` shapes."""
    from shapely.geometry import Point

    for _ in range(500):
        p = Point(rng.uniform(radius, size - radius), rng.uniform(radius, size - radius))
        if not any(p.buffer(radius).intersects(t) for t in taken):
            return p
    return None


def _villages(rng: np.random.Generator, size: int, taken: list[Any]) -> list[tuple[Any, int]]:
    """Clusters of old houses present in both dates."""
    houses: list[tuple[Any, int]] = []
    for _ in range(max(1, round(size * size / 4096**2 * 2))):
        centre = _place(rng, size, min(300.0, size / 5), taken)
        if centre is None:
            continue
        taken.append(centre.buffer(min(300.0, size / 5)))
        for _ in range(int(rng.integers(60, 140))):
            r, a = rng.uniform(0, min(280.0, size / 5.5)), rng.uniform(0, 2 * math.pi)
            cx, cy = centre.x + r * math.cos(a), centre.y + r * math.sin(a)
            rect = _rotated_rect(cx, cy, rng.uniform(16, 30), rng.uniform(14, 24),
                                 float(rng.uniform(-10, 10)))
            houses.append((rect, int(rng.integers(len(OLD_ROOFS)))))
    return houses


def _roads(rng: np.random.Generator, size: int) -> list[Any]:
    from shapely.geometry import LineString

    roads = []
    for _ in range(1 + size // 4096):
        y0, y1 = rng.uniform(0, size, 2)
        line = LineString([(-10, y0), (size + 10, y1)])
        roads.append(line.buffer(rng.uniform(12, 20), cap_style=2))
    return roads


def make_scene(size: int, seed: int = SEED) -> Scene:
    """Draw the scene layout for a ``size`` x ``size`` pair (deterministic from ``seed``)."""
    from shapely import affinity

    rng = np.random.default_rng([seed, size])
    lattices = [(cell, w, rng.standard_normal((math.ceil((size + 16) / cell) + 2,) * 2,
                                              dtype=np.float32)) for cell, w in OCTAVES_PX]
    tints = [rng.standard_normal((math.ceil((size + 16) / 256) + 2,) * 2, dtype=np.float32)
             for _ in range(3)]
    scene = Scene(size=size, origin=_origin(size), lattices=lattices, tints=tints)
    roads = _roads(rng, size)
    taken: list[Any] = []  # compounds and houses may sit beside (or over) the roads
    for _ in range(max(1, round(size * size / 2900**2))):
        comp = _compound(rng, size, taken)
        if comp is not None:
            taken.append(comp["outline"].buffer(80))
            scene.compounds.append(comp)
    old_houses = _villages(rng, size, taken)
    new_houses = []
    for _ in range(max(1, round(size * size / 2048**2))):
        centre = _place(rng, size, 60.0, taken)
        if centre is not None:
            house = _rotated_rect(centre.x, centre.y, rng.uniform(28, 44), rng.uniform(24, 36),
                                  float(rng.uniform(-30, 30)))
            taken.append(house.buffer(20))
            new_houses.append((house, int(rng.integers(len(NEW_ROOFS)))))
    scene.n_new_houses = len(new_houses)
    blocks = [(b, int(rng.integers(len(NEW_ROOFS)))) for c in scene.compounds for b in c["blocks"]]
    new_roofs = blocks + new_houses

    def shadows(items: list[tuple[Any, int]], dx: float, dy: float) -> list[tuple[Any, int]]:
        return [(affinity.translate(g, dx, dy), 1) for g, _ in items]

    walls = [(c["outline"].exterior.buffer(1.5), 1) for c in scene.compounds]
    scene.layers = {
        "road": [(g, 1) for g in roads],
        "old_shadow": shadows(old_houses, 4, 6),
        "old_roof": [(g, i + 1) for g, i in old_houses],
        "yard": [(c["outline"], 1) for c in scene.compounds],
        "new_shadow": shadows(new_roofs, 4, 6) + shadows(walls, 2, 3),
        "new_roof": [(g, i + 1) for g, i in new_roofs],
        "wall": walls,
    }
    return scene


def _smooth(f: np.ndarray) -> np.ndarray:
    return f * f * (3.0 - 2.0 * f)


def _value_noise(lattice: np.ndarray, cell: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Smooth value noise at global pixel rows x cols: the same values whatever the window."""
    u, v = (rows + 8.0) / cell, (cols + 8.0) / cell
    i, j = np.floor(u).astype(np.intp), np.floor(v).astype(np.intp)
    fy, fx = _smooth(u - i).astype(np.float32)[:, None], _smooth(v - j).astype(np.float32)[None]
    ii, jj = i[:, None], j[None, :]
    top = lattice[ii, jj] + (lattice[ii, jj + 1] - lattice[ii, jj]) * fx
    bottom = lattice[ii + 1, jj] + (lattice[ii + 1, jj + 1] - lattice[ii + 1, jj]) * fx
    return top + (bottom - top) * fy


def _rasterize(scene: Scene, name: str, r0: int, c0: int, shape: tuple[int, int]) -> np.ndarray:
    """Burn one layer into a window whose top-left global pixel is (r0, c0); 0 = nothing."""
    from affine import Affine
    from rasterio import features
    from shapely.geometry import box

    window = box(c0, r0, c0 + shape[1], r0 + shape[0])
    items = [(g, v) for g, v in scene.layers[name] if g.intersects(window)]
    if not items:
        return np.zeros(shape, np.uint8)
    return features.rasterize(items, out_shape=shape, transform=Affine.translation(c0, r0),
                              fill=0, dtype="uint8")


def _paint(img: np.ndarray, where: np.ndarray, rgb: Any, alpha: float = 1.0) -> None:
    if where.any():
        colour = np.asarray(rgb, np.float32)
        colour = colour[:, None] if colour.ndim == 1 else colour.T
        img[:, where] = (1 - alpha) * img[:, where] + alpha * colour


def _ground(scene: Scene, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(3, h, w) float32 textured desert ground."""
    total = sum(w * _value_noise(lat, cell, rows, cols) for cell, w, lat in scene.lattices)
    norm = 0.62 * math.sqrt(sum(w * w for _, w, _ in scene.lattices))
    grey = 100.0 + 26.0 * total / norm
    return np.stack([grey * a + b + 4.0 * _value_noise(t, 256, rows, cols)
                     for (a, b), t in zip(TINT, scene.tints, strict=True)])


def render_window(scene: Scene, r0: int, c0: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Both dates of one window as (3, h, w) uint8 (nodata 0 is never produced)."""
    from scipy import ndimage as ndi

    hr0, hc0, hh, hw = r0 - HALO_PX, c0 - HALO_PX, h + 2 * HALO_PX, w + 2 * HALO_PX
    rows = np.arange(hr0, hr0 + hh, dtype=np.float32)
    cols = np.arange(hc0, hc0 + hw, dtype=np.float32)
    before = _ground(scene, rows, cols)
    burn = {name: _rasterize(scene, name, hr0, hc0, (hh, hw)) for name in scene.layers}
    _paint(before, burn["road"] > 0, ROAD_RGB, 0.8)
    before[:, burn["old_shadow"] > 0] *= SHADOW_FACTOR
    roof = burn["old_roof"] > 0
    _paint(before, roof, np.asarray(OLD_ROOFS)[burn["old_roof"][roof] - 1])
    after = before.copy()
    _paint(after, burn["yard"] > 0, YARD_RGB, 0.6)
    after[:, burn["new_shadow"] > 0] *= SHADOW_FACTOR
    roof = burn["new_roof"] > 0
    _paint(after, roof, np.asarray(NEW_ROOFS)[burn["new_roof"][roof] - 1])
    _paint(after, burn["wall"] > 0, WALL_RGB)
    for b in range(3):
        after[b] = ndi.shift(after[b] * GAIN[b] + OFFSET, SHIFT_PX, order=1, mode="nearest")
    rng = np.random.default_rng([SEED, scene.size, r0, c0])
    out = []
    for img in (before, after):
        img = img[:, HALO_PX:-HALO_PX, HALO_PX:-HALO_PX]
        img = img + rng.normal(0.0, NOISE_DN, img.shape).astype(np.float32)
        out.append(np.clip(np.rint(img), 1, 255).astype(np.uint8))
    return out[0], out[1]


def _truth(scene: Scene) -> dict[str, Any]:
    """Compound outlines in map coordinates and the scene's parameters."""
    from shapely import affinity

    x0, y0 = scene.origin
    to_map = (RES_M, 0.0, 0.0, -RES_M, x0, y0)
    return {
        "generator_version": GENERATOR_VERSION, "seed": SEED, "size": scene.size,
        "res_m": RES_M, "crs": CRS, "shift_px": SHIFT_PX, "gain": GAIN, "offset": OFFSET,
        "noise_dn": NOISE_DN, "dates": DATES, "new_isolated_buildings": scene.n_new_houses,
        "compounds": [{"wkt": affinity.affine_transform(c["outline"], to_map).wkt,
                       "buildings": len(c["blocks"]), "angle_deg": c["angle_deg"],
                       "length_m": c["length_m"], "width_m": c["width_m"]}
                      for c in scene.compounds],
    }


def ensure_pair(size: int, workdir: Path, *, regenerate: bool = False) -> dict[str, Any]:
    """Paths of the cached pair for ``size``, generating it window by window when missing."""
    pair_dir = workdir / f"pair-v{GENERATOR_VERSION}-{size}"
    paths = [pair_dir / f"{role}_{day}.tif" for role, day in zip(("before", "after"), DATES,
                                                                  strict=True)]
    truth_path = pair_dir / "truth.json"
    if truth_path.exists() and all(p.exists() for p in paths) and not regenerate:
        log.info("size %d: reusing %s", size, pair_dir)
        return {"before": paths[0], "after": paths[1], "truth": json.loads(truth_path.read_text())}
    import rasterio
    from affine import Affine
    from rasterio.windows import Window

    pair_dir.mkdir(parents=True, exist_ok=True)
    truth_path.unlink(missing_ok=True)  # truth.json is written last: it marks a complete pair
    start = time.perf_counter()
    scene = make_scene(size)
    profile = {"driver": "GTiff", "width": size, "height": size, "count": 3, "dtype": "uint8",
               "crs": CRS,
               "transform": Affine(RES_M, 0, scene.origin[0], 0, -RES_M, scene.origin[1]),
               "nodata": 0, "tiled": True, "blockxsize": BLOCK_PX, "blockysize": BLOCK_PX,
               "compress": "deflate", "interleave": "pixel", "BIGTIFF": "IF_SAFER",
               "NUM_THREADS": "ALL_CPUS"}
    tmp = [p.with_suffix(".part.tif") for p in paths]
    with (rasterio.open(tmp[0], "w", **profile) as dst_b,
          rasterio.open(tmp[1], "w", **profile) as dst_a):
        for dst, day in ((dst_b, DATES[0]), (dst_a, DATES[1])):
            dst.update_tags(ACQUISITION_DATE=day, SOURCE="sitewatch scripts/bench.py synthetic")
        starts = range(0, size, WRITE_PX)
        for k, (r0, c0) in enumerate((r, c) for r in starts for c in starts):
            h, w = min(WRITE_PX, size - r0), min(WRITE_PX, size - c0)
            before, after = render_window(scene, r0, c0, h, w)
            dst_b.write(before, window=Window(c0, r0, w, h))
            dst_a.write(after, window=Window(c0, r0, w, h))
            log.info("size %d: generated window %d/%d", size, k + 1, len(starts) ** 2)
    for src, dst in zip(tmp, paths, strict=True):
        src.replace(dst)
    truth = _truth(scene)
    truth_path.write_text(json.dumps(truth, indent=1))
    log.info("size %d: pair generated in %.1f s (%.0f MB on disk) in %s", size,
             time.perf_counter() - start, sum(p.stat().st_size for p in paths) / 2**20, pair_dir)
    return {"before": paths[0], "after": paths[1], "truth": truth}


def aoi_text(path: Path) -> str:
    """'minlon,minlat,maxlon,maxlat': the image's densified lon/lat bbox, rounded outward."""
    import rasterio
    from rasterio.warp import transform_bounds

    with rasterio.open(path) as src:
        w, s, e, n = transform_bounds(src.crs, "EPSG:4326", *src.bounds, densify_pts=21)
    return ",".join(f"{v:.6f}" for v in (math.floor(w * 1e6) / 1e6, math.floor(s * 1e6) / 1e6,
                                          math.ceil(e * 1e6) / 1e6, math.ceil(n * 1e6) / 1e6))


# --- measuring in a child process -----------------------------------------------------------


def _proc_status_mb(key: str, pid: int | str = "self") -> float:
    """A ``/proc/<pid>/status`` memory field (VmHWM, VmRSS) in MB; 0 if unavailable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _cpu_s() -> float:
    """User + system CPU seconds of this process so far (all its threads)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _load() -> float:
    """The machine's 1-minute load average (other users' work included)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return math.nan


def _reset_hwm() -> bool:
    """Reset VmHWM (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``); False if not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, default=str))
    tmp.replace(path)


class PeakSampler(threading.Thread):
    """Samples RSS every few ms; at each new high notes where the main thread is in pipeline/."""

    def __init__(self, interval_s: float = 0.005) -> None:  # noqa: D107
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.stopped = threading.Event()
        self.main_id = threading.main_thread().ident
        self.high_mb, self.where = 0.0, ""

    def run(self) -> None:
        """Sample until stopped."""
        while not self.stopped.is_set():
            rss = _proc_status_mb("VmRSS")
            if rss > self.high_mb:
                frame = sys._current_frames().get(self.main_id)
                self.high_mb, self.where = rss, _pipeline_frames(frame)
            time.sleep(self.interval_s)

    def take(self) -> tuple[float, str]:
        """The high and its place since the last call; starts a new period."""
        high, where = self.high_mb, self.where
        self.high_mb, self.where = 0.0, ""
        return high, where


def _pipeline_frames(frame: Any, depth: int = 3) -> str:
    """'file:line function' of the innermost ``depth`` frames in pipeline/, innermost first."""
    root = str(PROJECT_ROOT / "pipeline")
    found = []
    while frame is not None and len(found) < depth:
        code = frame.f_code
        if code.co_filename.startswith(root):
            rel = os.path.relpath(code.co_filename, PROJECT_ROOT)
            found.append(f"{rel}:{frame.f_lineno} {code.co_name}")
        frame = frame.f_back
    return " < ".join(found)


class StageMemory:
    """The ``progress`` callback of run_detect: per-stage peak RSS via VmHWM resets."""

    def __init__(self, status_path: Path, sampler: PeakSampler | None = None) -> None:  # noqa: D107
        self.status_path = status_path
        self.sampler = sampler
        self.stages: list[dict[str, Any]] = []
        self.current: dict[str, Any] | None = None
        self.peak_mb = _proc_status_mb("VmHWM")
        self.exact = True

    def __call__(self, name: str, index: int, total: int) -> None:
        """Stage ``name`` starts: close the previous one, reset the high-water mark."""
        self._close()
        self.exact = _reset_hwm() and self.exact
        self.current = {"name": name, "rss_start_mb": round(_proc_status_mb("VmRSS")),
                        "t0": time.perf_counter(), "cpu0": _cpu_s()}
        _write_json(self.status_path, {"stage": name, "stages": self.stages})

    def finish(self) -> None:
        """The run returned: close the last stage."""
        self._close()
        _write_json(self.status_path, {"stage": "done", "stages": self.stages})

    def _close(self) -> None:
        if self.sampler is not None:
            high, where = self.sampler.take()
            if self.current is not None:
                self.current.update(sampled_peak_mb=round(high), peak_at=where)
        if self.current is not None:
            peak = _proc_status_mb("VmHWM")
            self.current["peak_mb"] = round(peak)
            self.current["rss_end_mb"] = round(_proc_status_mb("VmRSS"))
            # replaced by the run's own step timer when the run completes
            self.current["seconds"] = round(time.perf_counter() - self.current.pop("t0"), 3)
            self.current["cpu_s"] = round(_cpu_s() - self.current.pop("cpu0"), 3)
            self.peak_mb = max(self.peak_mb, peak)
            self.stages.append(self.current)
            self.current = None


def child_read(paths: list[str], window_px: int | None) -> dict[str, Any]:
    """Read both files fully (kept in memory), or in windows (discarded); seconds and peak."""
    import rasterio
    from rasterio.windows import Window

    start, cpu = time.perf_counter(), _cpu_s()
    kept, n_px = [], 0
    for path in paths:
        with rasterio.open(path) as src:
            if window_px is None:
                kept.append(src.read())
                n_px += kept[-1].size
                continue
            for r0 in range(0, src.height, window_px):
                for c0 in range(0, src.width, window_px):
                    win = Window(c0, r0, min(window_px, src.width - c0),
                                 min(window_px, src.height - r0))
                    n_px += src.read(window=win).size
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "cpu_s": _cpu_s() - cpu, "values": n_px,
            "peak_mb": _proc_status_mb("VmHWM")}


def _step_parts(result: Any) -> list[list[Any]]:
    """``[stage, part, seconds]`` of the detect step's parts and the manifest's write steps."""
    parts: list[list[Any]] = []
    for step in result.steps:
        for name, sec in (step.get("details", {}).get("seconds_by_part") or {}).items():
            parts.append([step["name"], name, sec])
    try:
        manifest = json.loads((result.run_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return parts
    for step in manifest.get("steps", []):
        name = str(step.get("name", ""))
        if name.startswith("write:"):
            parts.append(["write", name.removeprefix("write:"), step.get("seconds")])
    return parts


def child_detect(paths: list[str], aoi: str, workdir: Path, status_path: Path,
                 *, peak_stacks: bool = False, threads: int | None = None) -> dict[str, Any]:
    """The whole run_detect on the pair; wall seconds, stages, per-stage peak RSS, findings.

    ``threads``: Dask's threaded scheduler with that many workers (default: one per core).
    """
    import dask

    from pipeline.aoi import parse_aoi
    from pipeline.config import load_config
    from pipeline.run import run_detect

    config = load_config()
    area = parse_aoi(aoi)
    sampler = PeakSampler() if peak_stacks else None
    if sampler is not None:
        sampler.start()
    tracker = StageMemory(status_path, sampler)
    baseline = _proc_status_mb("VmRSS")
    with tempfile.TemporaryDirectory(prefix="detect-out-", dir=workdir) as out_root:
        start, cpu = time.perf_counter(), _cpu_s()
        with dask.config.set(scheduler="threads", num_workers=threads or os.cpu_count()):
            result = run_detect(area, paths[0], paths[1], config=config, out_root=out_root,
                                progress=tracker)
        seconds, cpu = time.perf_counter() - start, _cpu_s() - cpu
        tracker.finish()
        parts = _step_parts(result)
    by_name = {s["name"]: s for s in tracker.stages}
    for step in result.steps:
        if step["name"] in by_name:
            by_name[step["name"]].update(seconds=step["seconds"], details=step.get("details", {}))
    kinds = ("compound", "new_building", "change")
    return {
        "seconds": seconds, "cpu_s": cpu, "parts": parts, "peak_mb": tracker.peak_mb,
        "threads": threads or os.cpu_count(),
        "peak_exact": tracker.exact,
        "baseline_mb": baseline, "stages": tracker.stages, "grid_shape": list(result.grid.shape),
        "counts": {k: sum(e.kind == k for e in result.evidence) for k in kinds},
        "compounds_wkt": [e.geometry.wkt for e in result.evidence if e.kind == "compound"],
        "grades": [e.measurements.get("grade") for e in result.evidence if e.kind == "compound"],
        "watchtowers": sum(e.kind == "watchtower" for e in result.evidence),
        "coreg": {"dy": result.coreg.dy, "dx": result.coreg.dx, "applied": result.coreg.applied,
                  "note": result.coreg.note},
        "threshold": result.threshold, "warnings": result.warnings,
    }


def child_main(args: argparse.Namespace) -> int:
    """Entry point of a measuring subprocess: one measurement, written to --result as JSON.

    The process is set up as the command line sets up its own (`pipeline.allocator`).
    """
    from pipeline.allocator import reuse_freed_memory

    allocator = reuse_freed_memory()
    logging.basicConfig(level=logging.INFO if args.verbose >= 0 else logging.WARNING,
                        stream=sys.stderr,
                        format=f"  [{args.child} %(relativeCreated)6.0f ms] %(name)s: %(message)s")
    paths = [args.before, args.after]
    if args.child == "read":
        out = child_read(paths, None)
    elif args.child == "readwin":
        out = child_read(paths, args.window_px)
    elif args.child == "floor":
        out = _scripts_module("bench_floor").floor(
            *paths, args.workdir, threads=args.threads or os.cpu_count() or 1)
    else:
        out = child_detect(paths, args.aoi, Path(args.workdir), Path(args.status),
                           peak_stacks=args.peak_stacks, threads=args.threads)
    out["allocator_tuned"] = allocator
    _write_json(Path(args.result), out)
    return 0


@dataclass
class Outcome:
    """A finished (or stopped) child measurement."""

    ok: bool
    data: dict[str, Any]
    wall_s: float
    sampled_peak_mb: float
    problem: str | None = None
    last_stage: str | None = None


def run_child(mode: str, pair: dict[str, Any], cfg: argparse.Namespace, aoi: str = "",
              threads: int | None = None) -> Outcome:
    """Run one measurement in a subprocess, stopping it past --timeout or --max-rss-mb.

    ``threads`` (detect only): Dask worker threads, else ``--threads``, else one per core.
    """
    with tempfile.TemporaryDirectory(prefix="child-", dir=cfg.workdir) as tmp:
        result, status = Path(tmp) / "result.json", Path(tmp) / "status.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode,
               "--before", str(pair["before"]), "--after", str(pair["after"]), "--aoi", aoi,
               "--workdir", str(cfg.workdir), "--window-px", str(cfg.window_px),
               "--result", str(result), "--status", str(status)] + ["-q"] * (cfg.verbose < 0)
        cmd += ["--peak-stacks"] * cfg.peak_stacks
        threads = threads or cfg.threads
        cmd += ["--threads", str(threads)] if threads else []
        start = time.perf_counter()
        # the child's stdout goes to our stderr: our stdout carries only the tables
        proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=sys.stderr)
        sampled, problem = 0.0, None
        while True:
            pid, wait_status, _ = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(wait_status)
                break
            rss = _proc_status_mb("VmRSS", proc.pid)
            sampled = max(sampled, rss)
            elapsed = time.perf_counter() - start
            if problem is None and rss > cfg.max_rss_mb:
                problem = f"stopped: RSS {rss:.0f} MB > --max-rss-mb {cfg.max_rss_mb:.0f}"
            elif problem is None and elapsed > cfg.timeout:
                problem = f"stopped: still running after --timeout {cfg.timeout:.0f} s"
            if problem and proc.returncode is None:
                proc.kill()
            time.sleep(0.1)
        wall = time.perf_counter() - start
        last = json.loads(status.read_text()) if status.exists() else {}
        if problem is None and proc.returncode != 0:
            problem = f"failed: exit code {proc.returncode}" + (
                " (killed by a signal; out of memory?)" if proc.returncode < 0 else "")
        data = json.loads(result.read_text()) if result.exists() and problem is None else {}
        if problem:
            data.setdefault("stages", last.get("stages", []))
        return Outcome(problem is None, data, wall, sampled, problem, last.get("stage"))


# --- the benchmark --------------------------------------------------------------------------


def _median_read(mode: str, pair: dict[str, Any], cfg: argparse.Namespace) -> dict[str, Any]:
    runs = [run_child(mode, pair, cfg) for _ in range(cfg.repeat)]
    good = [r.data for r in runs if r.ok]
    if not good:
        return {"seconds": math.nan, "peak_mb": math.nan, "problem": runs[-1].problem}
    return {"seconds": statistics.median(r["seconds"] for r in good),
            "all_seconds": [round(r["seconds"], 3) for r in good],
            "cpu_s": statistics.median(r.get("cpu_s", math.nan) for r in good),
            "peak_mb": max(r["peak_mb"] for r in good)}


def _best_ious(truth: dict[str, Any], found_wkt: list[str]) -> list[float]:
    """For each truth compound, the best IoU with a reported compound (0 if none)."""
    from shapely import wkt

    found = [wkt.loads(w) for w in found_wkt]
    best = []
    for comp in truth["compounds"]:
        t = wkt.loads(comp["wkt"])
        best.append(max((t.intersection(f).area / t.union(f).area for f in found), default=0.0))
    return best


def bench_size(size: int, cfg: argparse.Namespace) -> dict[str, Any]:
    """All measurements for one size."""
    pair = ensure_pair(size, cfg.workdir, regenerate=cfg.regenerate)
    aoi = aoi_text(pair["after"])
    load_start = _load()
    log.info("size %d: reading both inputs fully (%d runs); load %.1f", size, cfg.repeat,
             load_start)
    read = _median_read("read", pair, cfg)
    log.info("size %d: read %.2f s; now in %d-px windows", size, read["seconds"], cfg.window_px)
    readwin = _median_read("readwin", pair, cfg)
    floor = None
    if cfg.floor:
        log.info("size %d: the floor (the raster part of the evidence, plainly done)", size)
        got = run_child("floor", pair, cfg)
        floor = {**got.data, "problem": got.problem}  # data is empty when it failed
    log.info("size %d: detect on AOI %s", size, aoi)
    load_detect = _load()
    det = run_child("detect", pair, cfg, aoi)
    row: dict[str, Any] = {
        "load": [load_start, load_detect, _load()],
        "size": size, "aoi": aoi, "read": read, "readwin": readwin, "detect": det.data,
        "detect_ok": det.ok, "problem": det.problem, "last_stage": det.last_stage,
        "detect_s": det.data.get("seconds", math.nan), "detect_wall_s": det.wall_s,
        "peak_mb": det.data.get("peak_mb", det.sampled_peak_mb),
        "sampled_peak_mb": det.sampled_peak_mb,
        "truth": pair["truth"], "floor": floor,
        "disk_mb": sum(Path(pair[k]).stat().st_size for k in ("before", "after")) / 2**20,
    }
    if size in cfg.speedup:
        row["speedup"] = _speedup(size, pair, cfg, aoi, det)
    if det.ok:
        row["ious"] = _best_ious(pair["truth"], det.data["compounds_wkt"])
        log.info("size %d: detect %.1f s, peak %.0f MB", size, row["detect_s"], row["peak_mb"])
    else:
        log.warning("size %d: detect %s during stage %r (sampled peak %.0f MB, %.0f s)",
                    size, det.problem, det.last_stage, det.sampled_peak_mb, det.wall_s)
    return row


def _speedup(size: int, pair: dict[str, Any], cfg: argparse.Namespace, aoi: str,
             det: Outcome) -> list[dict[str, Any]]:
    """The same detect with 1 Dask thread and with `SPEEDUP_THREADS` (2, the issue's cores),
    in ``cfg.speedup_pairs`` pairs of runs back to back (``pair``: 0, 1, ...).

    Wall times of one run vary by 15 % or more on the shared machine (measured at 4096: 19.1
    to 23.8 s with 1 thread), so one pair can land on either side of the target; the median
    of the pairs' speed-ups is the figure (`speedup_summary`). The run just made counts as the
    first pair's 2-thread run when it had 2 threads.
    """
    runs: list[dict[str, Any]] = []
    for index in range(max(1, cfg.speedup_pairs)):
        if index or det.data.get("threads") != SPEEDUP_THREADS:
            log.info("size %d: detect again with %d Dask threads (speed-up, pair %d); load %.1f",
                     size, SPEEDUP_THREADS, index + 1, _load())
            det = run_child("detect", pair, cfg, aoi, threads=SPEEDUP_THREADS)
        ceiling = machine_ceiling()
        load = _load()
        log.info("size %d: detect again with 1 Dask thread (speed-up, pair %d); load %.1f; "
                 "machine ceiling: sort %.2f, stream %.2f", size, index + 1, load,
                 ceiling["sort"], ceiling["stream"])
        one = run_child("detect", pair, cfg, aoi, threads=1)
        runs.append({"pair": index, "threads": 1, "seconds": one.data.get("seconds", math.nan),
                     "cpu_s": one.data.get("cpu_s", math.nan), "problem": one.problem,
                     "load": [load, _load()], "ceiling": ceiling,
                     "same_counts": one.data.get("counts") == det.data.get("counts")})
        runs.append({"pair": index, "threads": SPEEDUP_THREADS,
                     "seconds": det.data.get("seconds", math.nan),
                     "cpu_s": det.data.get("cpu_s", math.nan), "problem": det.problem})
    return runs


def machine_ceiling(threads: int = SPEEDUP_THREADS) -> dict[str, float]:
    """This machine's speed-up at this moment for work with no serial part: ``threads``
    threads against 1 on NumPy jobs that release the GIL, one compute-bound (sorting) and
    one memory-bound (scaling large arrays in place). A detect cannot scale better."""
    rng = np.random.default_rng(0)
    arrays = [rng.random(4_000_000) for _ in range(4 * threads)]  # 32 MB each

    def sort(a: np.ndarray) -> None:
        for _ in range(3):
            np.sort(a)

    def stream(a: np.ndarray) -> None:
        for _ in range(20):
            np.multiply(a, 1.0001, out=a)

    found = {}
    for name, job in (("sort", sort), ("stream", stream)):
        start = time.perf_counter()
        for a in arrays:
            job(a)
        alone = time.perf_counter() - start
        with ThreadPoolExecutor(threads) as pool:
            start = time.perf_counter()
            list(pool.map(job, arrays))
            together = time.perf_counter() - start
        found[name] = alone / together
    return found


def _pairs(runs: list[dict[str, Any]]) -> dict[int, dict[int, dict[str, Any]]]:
    """``{pair: {Dask threads: run}}`` (results without pairs are one pair, 0)."""
    pairs: dict[int, dict[int, dict[str, Any]]] = {}
    for run in runs:
        pairs.setdefault(run.get("pair", 0), {})[run["threads"]] = run
    return pairs


def _pair_gains(runs: list[dict[str, Any]]) -> list[float]:
    """Each pair's speed-up: its 1-thread wall seconds / its 2-thread wall seconds."""
    gains = []
    for _, pair in sorted(_pairs(runs).items()):
        one, two = pair.get(1), pair.get(SPEEDUP_THREADS)
        if one and two and not one["problem"] and not two["problem"] and two["seconds"]:
            gains.append(one["seconds"] / two["seconds"])
    return gains


def speedup_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    """Detect with 1 Dask thread and with 2, pair by pair: wall and CPU seconds, speed-up."""
    out = [["size", "pair", "Dask threads", "detect s", "detect CPU s", "speed-up (wall)",
            "same findings", "load at start / end (1 thread)",
            "machine ceiling: sort / stream"]]
    for r in rows:
        runs = r.get("speedup") or []
        pairs = _pairs(runs)
        for run in runs:
            index = run.get("pair", 0)
            base = pairs[index].get(1, {}).get("seconds", math.nan)
            gain = base / run["seconds"] if run["seconds"] else math.nan
            out.append([
                str(r["size"]), str(index + 1), str(run["threads"]),
                _fmt(run["seconds"], 1) if not run["problem"] else run["problem"],
                _fmt(run["cpu_s"], 1), _fmt(gain, 2),
                ("yes" if run.get("same_counts") else "no") if "same_counts" in run else "-",
                " / ".join(_fmt(v, 1) for v in run.get("load", [])) or "-",
                " / ".join(_fmt(run["ceiling"][k], 2) for k in ("sort", "stream"))
                if run.get("ceiling") else "-"])
    return out


def speedup_summary(rows: list[dict[str, Any]]) -> str:
    """The median speed-up of each size's pairs, their range and the target."""
    lines = []
    for r in rows:
        gains = _pair_gains(r.get("speedup") or [])
        if not gains:
            continue
        median = statistics.median(gains)
        # as many decimals as keep the printed median on its side of the target (1.59951
        # printed as 1.60 read as the target met)
        digits = 2
        while digits < 6 and (round(median, digits) >= TARGET_SPEEDUP) != (
                median >= TARGET_SPEEDUP):
            digits += 1
        lines.append(
            f"Speed-up at {r['size']} ({SPEEDUP_THREADS} Dask threads over 1): median "
            f"{median:.{digits}f} of {len(gains)} pair{'s' if len(gains) > 1 else ''} "
            f"({min(gains):.2f}-{max(gains):.2f}); target >= {TARGET_SPEEDUP:g}: "
            f"{_met(median >= TARGET_SPEEDUP)}.")
        # the ceilings of the pairs whose speed-up counts (both runs without a problem)
        ceilings = [pair[1]["ceiling"] for pair in _pairs(r.get("speedup") or []).values()
                    if pair.get(1, {}).get("ceiling") and pair.get(SPEEDUP_THREADS)
                    and not pair[1]["problem"] and not pair[SPEEDUP_THREADS]["problem"]]
        if ceilings:
            parts = []
            for kind in ("sort", "stream"):
                values = [c[kind] for c in ceilings]
                parts.append(f"{kind} median {statistics.median(values):.2f} "
                             f"({min(values):.2f}-{max(values):.2f})")
            lines.append(
                f"The machine's own ceiling measured before each pair's 1-thread run (work with "
                f"no serial part, {SPEEDUP_THREADS} threads over 1): " + ", ".join(parts) + ".")
    return "\n".join(lines)


def per_mp_spread(rows: list[dict[str, Any]]) -> str:
    """Time per megapixel of the working grid across sizes of 4096 and more: max / min."""
    per_mp = {r["size"]: r["detect_s"] / _grid_mp(r) for r in rows
              if r["detect_ok"] and r["size"] >= 4096}
    if len(per_mp) < 2:
        return "Time per megapixel: fewer than two sizes of 4096 or more were measured."
    spread = max(per_mp.values()) / min(per_mp.values())
    listed = ", ".join(f"{k}: {v:.2f} s" for k, v in sorted(per_mp.items()))
    return (f"Detect seconds per megapixel of the working grid ({listed}): max / min = "
            f"{spread:.2f} (target <= {1 + TARGET_MP_SPREAD:.2f}: "
            f"{_met(spread <= 1 + TARGET_MP_SPREAD)}).")


def _grid_mp(r: dict[str, Any]) -> float:
    grid = r["detect"].get("grid_shape") or [r["size"], r["size"]]
    return grid[0] * grid[1] / 1e6


def _met(ok: bool) -> str:
    return "met" if ok else "not met"


def _fmt(v: float, digits: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def summary_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    """The summary table: one row per size, with the targets marked."""
    head = ["size", "grid (y x)", "read s", "read 2048-win s", "detect s", "ratio", "peak MB",
            "read peak MB", f"ratio <= {TARGET_RATIO:g}", f"ratio <= {TARGET_RATIO_LARGE:g}",
            f"peak < {TARGET_PEAK_MB:g} MB", "detect s per MP", "read CPU s", "detect CPU s",
            "CPU ratio", "Dask threads", "load at start / detect / end"]
    out = [head]
    for r in rows:
        ratio = r["detect_s"] / r["read"]["seconds"] if r["detect_ok"] else math.nan
        grid = r["detect"].get("grid_shape")
        peak_txt = _fmt(r["peak_mb"], 0) + ("" if r["detect_ok"] else " (so far)")
        out.append([
            f"{r['size']}", f"{grid[0]} x {grid[1]}" if grid else "-",
            _fmt(r["read"]["seconds"]), _fmt(r["readwin"]["seconds"]),
            _fmt(r["detect_s"], 1) if r["detect_ok"] else r["problem"] or "-",
            _fmt(ratio, 1), peak_txt, _fmt(r["read"]["peak_mb"], 0),
            _met(ratio <= TARGET_RATIO) if r["detect_ok"] else "not met",
            _met(ratio <= TARGET_RATIO_LARGE) if r["detect_ok"] else "not met",
            _met(r["peak_mb"] < TARGET_PEAK_MB),
            _fmt(r["detect_s"] / _grid_mp(r)) if r["detect_ok"] else "-",
            _fmt(r["read"].get("cpu_s", math.nan)), _fmt(r["detect"].get("cpu_s", math.nan), 1),
            _fmt(r["detect"].get("cpu_s", math.nan) / r["read"].get("cpu_s", math.nan), 1),
            str(r["detect"].get("threads", "-")),
            " / ".join(_fmt(v, 1) for v in r.get("load", [])) or "-",
        ])
    return out


def floor_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    """The floor against the read and the detect, one row per size that ran it."""
    out = [["size", "read s", "floor s", "floor / read", "detect / read", "ratio target",
            "floor parts s", "floor CPU s", "floor peak MB", "shift found (truth)"]]
    for r in rows:
        f = r.get("floor")
        if not f:
            continue
        read = r["read"]["seconds"]
        target = RATIO_TARGETS.get(r["size"])
        detect_ratio = _fmt(r["detect_s"] / read, 1) if r["detect_ok"] else "-"
        if f.get("problem"):
            out.append([str(r["size"]), _fmt(read), f["problem"], "-", detect_ratio,
                        f"{target:g}" if target else "-", "-", "-", "-", "-"])
            continue
        truth = r["truth"]["shift_px"]
        out.append([
            str(r["size"]), _fmt(read), _fmt(f["seconds"], 1), _fmt(f["seconds"] / read, 1),
            detect_ratio, f"{target:g}" if target else "-",
            ", ".join(f"{name} {sec:.1f}" for name, sec in f["parts"]),
            _fmt(f["cpu_s"], 1), _fmt(f["peak_mb"], 0),
            f"{f['shift_px'][0]:+.2f}, {f['shift_px'][1]:+.2f} "
            f"({-truth[0]:+.2f}, {-truth[1]:+.2f})"])
    return out


def stage_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    """One row per size and stage: seconds, share of detect, RSS at start / peak / end."""
    with_where = any(s.get("peak_at") for r in rows for s in r["detect"].get("stages", []))
    out = [["size", "stage", "s", "CPU s", "share", "RSS start MB", "peak MB", "RSS end MB"]
           + ["pipeline line at the peak (sampled)"] * with_where]
    for r in rows:
        stages = {s["name"]: s for s in r["detect"].get("stages", [])}
        total = r["detect_s"] if r["detect_ok"] else math.nan
        for name in STAGES:
            s = stages.get(name)
            if s is None:
                if name == r["last_stage"]:
                    out.append([str(r["size"]), name, r["problem"] or "stopped", "-", "-", "-", "-",
                                "-"] + ["-"] * with_where)
                continue
            sec = s.get("seconds", math.nan)
            share = f"{100 * sec / total:.0f} %" if r["detect_ok"] else "-"
            out.append([str(r["size"]), name, _fmt(sec, 1), _fmt(s.get("cpu_s", math.nan), 1),
                        share,
                        str(s["rss_start_mb"]), str(s["peak_mb"]), str(s.get("rss_end_mb", "-"))]
                       + [s.get("peak_at") or "-"] * with_where)
    return out


def part_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    """Seconds of the parts the detect and write steps time themselves (wall, their own clock)."""
    out = [["size", "stage", "part", "s"]]
    for r in rows:
        for stage, part, sec in r["detect"].get("parts", []):
            out.append([str(r["size"]), stage, part, _fmt(sec, 2)])
    return out


def _grades(detect: dict[str, Any]) -> str:
    """``"grade 1: 30, grade 3: 2; 4"``: compounds per grade, then watchtowers reported."""
    if "grades" not in detect:  # results of an earlier bench
        return "-"
    grades = collections.Counter(detect["grades"])
    text = ", ".join(f"grade {g}: {n}" for g, n in sorted(grades.items(), key=str)) or "none"
    return f"{text}; {detect['watchtowers']}"


def finding_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    """What detect reported against the scene's truth (a sanity check of the run)."""
    out = [["size", "compounds: IoU >= 0.5 / truth (best IoUs)", "new buildings (reported / truth)",
            "compound grades; watchtowers (the scene has none)", "other change",
            "shift measured (truth)", "input MB on disk"]]
    for r in rows:
        t, d = r["truth"], r["detect"]
        truth_b = sum(c["buildings"] for c in t["compounds"]) + t["new_isolated_buildings"]
        counts, ious = d.get("counts", {}), r.get("ious", [])
        coreg = d.get("coreg")
        shift = (f"{coreg['dy']:+.2f}, {coreg['dx']:+.2f}"
                 f"{'' if coreg['applied'] else ' (not applied)'}") if coreg else "-"
        out.append([
            str(r["size"]),
            f"{sum(i >= 0.5 for i in ious)} of {len(t['compounds'])}, {counts.get('compound', '-')}"
            f" reported ({' '.join(f'{i:.2f}' for i in ious) or '-'})",
            f"{counts.get('new_building', '-')} / {truth_b}", _grades(d),
            str(counts.get("change", "-")),
            f"{shift} ({-t['shift_px'][0]:+.2f}, {-t['shift_px'][1]:+.2f})", _fmt(r["disk_mb"], 0),
        ])
    return out


def text_table(rows: list[list[str]]) -> str:
    """Aligned plain-text table, header underlined."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def md_table(rows: list[list[str]]) -> str:
    """GitHub markdown table."""
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("---" for _ in rows[0]) + "|")
    return "\n".join(lines)


def machine() -> dict[str, str]:
    """CPU model, cores, RAM, OS, Python and library versions, git state of pipeline/."""
    import rasterio
    import scipy
    import shapely
    import skimage

    cpu = next((line.split(":", 1)[1].strip() for line in _lines("/proc/cpuinfo")
                if line.startswith("model name")), "?")
    versions = {"numpy": np.__version__, "scipy": scipy.__version__,
                "scikit-image": skimage.__version__, "rasterio": rasterio.__version__,
                "GDAL": rasterio.__gdal_version__, "shapely": shapely.__version__}
    for mod in ("xarray", "dask", "rioxarray", "pyproj", "pipeline"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = "missing"

    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=PROJECT_ROOT, capture_output=True, text=True,
                                  check=False).stdout.strip()
        except OSError:
            return "?"

    dirty = git("status", "--porcelain", "--", "pipeline")
    return {"cpu": cpu, "cores": str(os.cpu_count()), "ram_gb": f"{_mem_total_mb() / 1024:.1f}",
            "os": platform.platform(), "python": platform.python_version(),
            "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
            "git": f"{git('rev-parse', '--short', 'HEAD')}"
                   f"{' + uncommitted changes in pipeline/' if dirty else ''}",
            "gdal_env": ", ".join(f"{k}={os.environ[k]}" for k in PERF_ENV if k in os.environ)
                        or "none of " + ", ".join(PERF_ENV) + " set"}


def _allocator_line(rows: list[dict[str, Any]]) -> str:
    """Whether the detect processes raised glibc's malloc thresholds, as `sitewatch` does."""
    from pipeline.allocator import THRESHOLD_BYTES

    seen = {r.get("detect", {}).get("allocator_tuned") for r in rows}
    if seen == {True}:
        return (f"glibc malloc: mmap and trim thresholds raised to {THRESHOLD_BYTES / 2**30:g} "
                "GiB in each measuring process, as the `sitewatch` command does "
                "(`pipeline.allocator`)")
    if seen == {False}:
        return ("glibc malloc: thresholds left as they were (not glibc, or chosen in the "
                "environment)")
    return "glibc malloc: thresholds not recorded for every run (runs before it was recorded)"


def write_docs(
    path: Path, rows: list[dict[str, Any]], info: dict[str, str], argv: list[str],
    fetch: dict[str, Any] | None = None,
) -> None:
    """Write the markdown report (overwrites: it describes the latest run)."""
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = f"""# Benchmarks: `make bench`

Written by `scripts/bench.py` (do not edit by hand; rerun it). Figures are measured, not
asserted. Targets: the whole detect within {TARGET_RATIO:g}x of the time to read both inputs
(issue 2, at 8192; issue 7: within {TARGET_RATIO_LARGE:g}x at 20000), peak memory under
{TARGET_PEAK_MB:g} MB whatever the AOI size, detect seconds per megapixel at 4k to 20k within
{100 * TARGET_MP_SPREAD:.0f} % of each other, and a parallel speed-up of at least
{TARGET_SPEEDUP:g}x on 2 Dask threads over 1.

{_runs_lines(info, now, argv)}
- Machine: {info['cpu']}, {info['cores']} cores, {info['ram_gb']} GB RAM; {info['os']}
- Python {info['python']}; {info['versions']}
- Performance-related environment: {info['gdal_env']}
- {_allocator_line(rows)}

Inputs: synthetic pairs (size x size x 3 uint8, {RES_M} m, {CRS}, tiled {BLOCK_PX},
DEFLATE, nodata 0), textured ground in both dates; in the after date walled compounds with
rows of blocks, isolated new buildings, a shift of {SHIFT_PX} px and gain {GAIN} + {OFFSET}.
Files are in the page cache (just generated or read). The AOI is the image's lon/lat bbox, so
the working grid is a little larger than the image (its corners are nodata). Each figure is
from its own subprocess; read times are medians of the runs; peak = highest VmHWM of the
process (per stage: VmHWM reset at each stage start, so it is the peak during that stage,
everything still held from earlier stages included).

The machine may be shared: "load" is the 1-minute load average (all users) when the size's
read measurements start, when its detect starts and when it ends; on {info['cores']} cores a
load well above {info['cores']} means other work competed for the CPU and the wall times above
are inflated. "CPU s" is the measured process's own user + system CPU time (all its threads),
which depends much less on that competition; "CPU ratio" compares detect's to the read's.
Load average at the start of this run: {info.get('load', '?')}.

## Summary

{md_table(summary_rows(rows))}

{per_mp_spread(rows)}
{_floor_section(rows)}{_speedup_section(rows)}
## Detect stages

Seconds from the run's own step timer; share of the whole detect; resident memory at the
stage's start, its peak during the stage, and at its end.

{md_table(stage_rows(rows))}

## Parts of the detect and write stages

Wall seconds of the parts that the detect step (`detect_sites`) and the evidence package
(manifest steps `write:*`) time themselves. With more than one Dask thread the two COGs
(`write:rasters`) are written on a thread of their own beside the other write steps, so the
write parts add up to more than the write stage.

{md_table(part_rows(rows))}

## What was found (sanity check, not a quality measure)

{md_table(finding_rows(rows))}
"""
    if fetch is not None:
        text += "\n" + fetch_markdown(fetch)
    kept = _other_sections(path, text)
    if kept:  # e.g. the COG fetch section of an earlier run, when this one skipped it
        text += "\n" + kept
    path.parent.mkdir(parents=True, exist_ok=True)
    if any(r.get("floor") for r in rows):  # the floor section links the chart
        draw_chart(rows, path.parent / CHART_NAME)
    path.write_text(text)


def draw_chart(rows: list[dict[str, Any]], path: Path) -> Path:
    """The report's picture (`bench_chart.ratio_chart`): detect / read and floor / read per
    size, the ratio targets marked."""
    def ratio(r: dict[str, Any], seconds: float | None) -> float:
        return seconds / r["read"]["seconds"] if seconds is not None else math.nan

    return _scripts_module("bench_chart").ratio_chart(
        [r["size"] for r in rows],
        [ratio(r, r["detect_s"] if r["detect_ok"] else None) for r in rows],
        [ratio(r, (r.get("floor") or {}).get("seconds")) for r in rows],
        RATIO_TARGETS, path)


def _runs_lines(info: dict[str, Any], now: str, argv: list[str]) -> str:
    """Date, command and code of the run, or of each run rendered together."""
    runs = info.get("runs") or [{"date": now, "argv": argv, "git": info["git"],
                                 "load": info.get("load", "?")}]
    lines = [f"- Date: {r['date']}; command: "
             f"`{' '.join(['python scripts/bench.py', *r['argv']])}`; code: git {r['git']}"
             f"{'; load average at its start: ' + r['load'] if len(runs) > 1 else ''}"
             for r in runs]
    if len(runs) > 1:
        lines.insert(0, f"- Rendered {now} with `--from-results` from {len(runs)} runs:")
    return "\n".join(lines)


def from_results(paths: list[Path]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows and machine info of saved raw results (``results/bench-*.json``), by size.

    A size measured by several of the runs gets the row of the last one listed (a newer
    measurement of that size replaces the older).
    """
    rows: dict[int, dict[str, Any]] = {}
    runs = []
    info: dict[str, Any] = {}
    for path in paths:
        data = json.loads(path.read_text())
        if "info" not in data:
            raise SystemExit(f"{path}: no machine info (saved by an older bench.py); rerun it")
        info = {**data["info"], **info}
        rows.update({r["size"]: r for r in data["rows"]})
        runs.append({"date": data["info"]["date"], "argv": data["argv"],
                     "git": data["info"]["git"], "load": data["info"]["load"]})
    return [rows[k] for k in sorted(rows)], {**info, "runs": runs, "load": "see each run"}


def _sections(text: str) -> dict[str, str]:
    """``## `` sections of a markdown text by heading (each with its heading)."""
    parts = text.split("\n## ")
    return {p.split("\n", 1)[0]: "## " + p for p in parts[1:]}


def _other_sections(path: Path, text: str) -> str:
    """The sections of the existing report that ``text`` does not write again, in order.

    Sections come from separate measurements (`scripts/bench_fetch.py`'s COG fetch): a run
    that does not repeat them keeps them as they were, with their own date.
    """
    try:
        old = path.read_text()
    except OSError:
        return ""
    new = _sections(text)
    kept = [body.rstrip("\n") + "\n" for head, body in _sections(old).items()
            if head not in new and head not in _OWN_SECTIONS]
    return "\n".join(kept)


def _floor_section(rows: list[dict[str, Any]]) -> str:
    if not any(r.get("floor") for r in rows):
        return ""
    return f"""
## Floor: the raster part of the evidence, done plainly

How much of the ratio targets the least of issue 2's work takes by itself, with none of the
detectors. `scripts/bench_floor.py`, in its own process: read both inputs (two threads) and
their SHA-256; the shift by phase correlation on a central window; after histogram-matched to
before band by band and moved by the shift (bilinear); the change magnitude over the bands, an
Otsu threshold, a 3 x 3 opening and connected components; the change mask and magnitude
written as COGs with the evidence's creation options. Everything is held in memory (no 2 GB
bound; about 25 bytes a pixel). It is plain NumPy, SciPy and GDAL, not a proven minimum, but
every detect that writes the evidence of issue 2 does all of it and more: the co-registration's
checks, nodata and the AOI, the building, compound, wall and watchtower detectors, chips,
GeoJSON and manifest. "floor / read" beside "ratio target" shows how much of the target the
floor uses by itself.

{md_table(floor_rows(rows))}

![Detect and floor against the read time, per size, with the targets]({CHART_NAME})
"""


def _speedup_section(rows: list[dict[str, Any]]) -> str:
    if not any(r.get("speedup") for r in rows):
        return ""
    return f"""
## Parallel speed-up

The same detect with one Dask worker thread and with {SPEEDUP_THREADS} (the issue's 2 cores),
in pairs of runs back to back (load from other users affects them differently; CPU seconds
show the work done). A pair's speed-up = its wall seconds with 1 thread / its wall seconds
with {SPEEDUP_THREADS}; one run's wall time varies by 15 % or more here, so the figure is the
median of the pairs. "Machine ceiling" is the same ratio for NumPy work with no serial part
(`machine_ceiling`: sorting, compute-bound; scaling arrays in place, memory-bound), measured
just before the pair's 1-thread run: a detect cannot scale better than the machine does.

{md_table(speedup_rows(rows))}

{speedup_summary(rows)}
"""


# sections this script writes itself (never carried over from an earlier report)
_OWN_SECTIONS = ("Summary", "Floor: the raster part of the evidence, done plainly",
                 "Parallel speed-up", "Detect stages",
                 "Parts of the detect and write stages",
                 "What was found (sanity check, not a quality measure)")


def _lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def _mem_total_mb() -> float:
    """MemTotal from /proc/meminfo in MB; 0 if unknown."""
    return next((int(line.split()[1]) / 1024 for line in _lines("/proc/meminfo")
                 if line.startswith("MemTotal")), 0.0)


def run_fetch_bench(cfg: argparse.Namespace) -> dict[str, Any]:
    """``scripts/bench_fetch.py`` in a subprocess; its JSON results, or {"problem": ...}."""
    with tempfile.TemporaryDirectory(prefix="fetch-", dir=cfg.workdir) as tmp:
        result = Path(tmp) / "fetch.json"
        cmd = [sys.executable, str(Path(__file__).resolve().parent / "bench_fetch.py"),
               "--workdir", str(cfg.workdir), "--json", str(result)]
        cmd += ["--regenerate"] * cfg.regenerate + ["-q"] * (cfg.verbose < 0)
        log.info("COG fetch benchmark: %s", " ".join(cmd[1:]))
        try:  # its stdout is the tables, which we print ourselves from the JSON
            proc = subprocess.run(cmd, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL,
                                  timeout=cfg.timeout, check=False)
        except subprocess.TimeoutExpired:
            return {"problem": f"stopped: still running after --timeout {cfg.timeout:.0f} s"}
        if proc.returncode != 0 or not result.exists():
            return {"problem": f"failed: exit code {proc.returncode}"}
        return json.loads(result.read_text())


def _scripts_module(name: str) -> Any:
    """A module of ``scripts/`` by name (``bench_fetch``, ``bench_floor``, ``bench_chart``)."""
    scripts = str(Path(__file__).resolve().parent)
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    return importlib.import_module(name)


def _bench_fetch() -> Any:
    """The ``scripts/bench_fetch.py`` module (for its tables)."""
    return _scripts_module("bench_fetch")


def fetch_markdown(fetch: dict[str, Any]) -> str:
    """The COG fetch section of docs/benchmarks.md (tables from scripts/bench_fetch.py)."""
    if "problem" in fetch:
        return (f"## COG fetch of a small AOI (STAC)\n\n`scripts/bench_fetch.py` "
                f"{fetch['problem']}; no figures.\n")
    return _bench_fetch().markdown_section(fetch)


def parse_sizes(text: str) -> list[int]:
    """``--size`` text to a list of sizes in pixels."""
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--size {text!r}: expected e.g. 1024 or 2048,4096") from None
    if not sizes or any(s < 256 for s in sizes):
        raise argparse.ArgumentTypeError(f"--size {text!r}: sizes must be >= 256 pixels")
    return sizes


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options (the hidden ``--child`` ones are for measuring subprocesses)."""
    mem_mb = _mem_total_mb() or 16384.0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", type=parse_sizes, default=[8192],
                   help="comma-separated square image sizes in pixels, e.g. 1024 or 2048,4096")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                   help="cache of generated pairs and scratch space for outputs")
    p.add_argument("--repeat", type=int, default=3, help="runs of each read measurement (median)")
    p.add_argument("--window-px", type=int, default=2048, help="window of the windowed read")
    p.add_argument("--timeout", type=float, default=1800.0, help="stop a measurement after s")
    p.add_argument("--max-rss-mb", type=float, default=round(0.8 * mem_mb),
                   help="stop a measurement whose RSS exceeds this")
    p.add_argument("--docs", type=Path, default=DEFAULT_DOCS, help="markdown report path")
    p.add_argument("--no-docs", action="store_true", help="do not write the markdown report")
    p.add_argument("--regenerate", action="store_true",
                   help="rebuild cached pairs (and the fetch benchmark's tile)")
    p.add_argument("--fetch", action=argparse.BooleanOptionalAction, default=True,
                   help="also run scripts/bench_fetch.py (requests and bytes of a STAC/COG "
                        "fetch of a small AOI, and of a cached rerun)")
    p.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the floor (scripts/bench_floor.py: the raster part of the "
                        "evidence done plainly, in memory, about 25 bytes a pixel) against "
                        "the read, once per size")
    p.add_argument("--peak-stacks", action="store_true",
                   help="sample RSS every 5 ms in detect and report the pipeline line at each "
                        "stage's peak (adds a little overhead)")
    p.add_argument("--threads", type=int, default=None,
                   help="Dask worker threads of the detect run (default: one per core)")
    p.add_argument("--speedup", type=parse_sizes, default=[],
                   help="sizes at which detect also runs with 1 Dask thread, for the parallel "
                        "speed-up, e.g. 4096")
    p.add_argument("--speedup-pairs", type=int, default=SPEEDUP_PAIRS,
                   help="pairs of 1-thread and 2-thread runs for the speed-up; the figure is "
                        f"the median of their speed-ups (default {SPEEDUP_PAIRS})")
    p.add_argument("--from-results", default="",
                   help="comma-separated raw results files (results/bench-*.json) to render "
                        "together into --docs, measuring nothing (a size in several: the last "
                        "file's row)")
    p.add_argument("-q", "--quiet", action="count", default=0, help="less progress on stderr")
    for name in ("--child", "--before", "--after", "--aoi", "--result", "--status"):
        p.add_argument(name, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.verbose = -args.quiet
    return args


def main(argv: list[str] | None = None) -> int:
    """Benchmark every ``--size``, print the tables, write the markdown report."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    logging.basicConfig(level=logging.INFO if args.quiet == 0 else logging.WARNING,
                        stream=sys.stderr, format="bench: %(message)s")
    args.workdir = args.workdir.expanduser().resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.from_results:  # render saved runs together, measuring nothing
        rows, info = from_results([Path(p) for p in args.from_results.split(",")])
        print(text_table(summary_rows(rows)))
        write_docs(args.docs, rows, info, argv, None)
        log.info("wrote %s", args.docs)
        return 0
    load_at_start = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    rows = [bench_size(size, args) for size in args.size]
    fetch = run_fetch_bench(args) if args.fetch else None
    results_dir = args.workdir / "results"
    results_dir.mkdir(exist_ok=True)
    raw = results_dir / f"bench-{datetime.now(UTC):%Y%m%dT%H%M%S}.json"
    info = {**machine(), "load": f"{load_at_start} (1, 5, 15 min)",
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}
    raw.write_text(json.dumps({"argv": argv, "rows": rows, "fetch": fetch, "info": info},
                              indent=1, default=str))
    log.info("raw results in %s", raw)
    print(text_table(summary_rows(rows)))
    print(per_mp_spread(rows))
    print()
    if any(r.get("floor") for r in rows):
        print("floor (the raster part of the evidence, done plainly; scripts/bench_floor.py):")
        print(text_table(floor_rows(rows)))
        print()
    if any(r.get("speedup") for r in rows):
        print("parallel speed-up (Dask threads):")
        print(text_table(speedup_rows(rows)))
        print(speedup_summary(rows))
        print()
    print("detect stages (peak: highest RSS during the stage):")
    print(text_table(stage_rows(rows)))
    print()
    print(text_table(part_rows(rows)))
    print()
    print(text_table(finding_rows(rows)))
    if fetch is not None:
        print()
        if "problem" in fetch:
            print(f"COG fetch benchmark: {fetch['problem']}")
        else:
            _bench_fetch().print_tables(fetch)
    if not args.no_docs:
        write_docs(args.docs, rows, {**machine(), "load": f"{load_at_start} (1, 5, 15 min)"},
                   argv, fetch)
        log.info("wrote %s", args.docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
