"""The floor of `make bench`: the least of the work issue 2 names, done plainly.

What the detect ratio targets leave room for: a pass that does only the raster part of what
the evidence needs, with none of the detectors, and sees how it compares with the read alone.
On 8-bit 3-band inputs on the same grid (the bench pairs), with everything held in memory:

1. read both files fully (two threads) and their SHA-256 (the provenance);
2. the shift of after against before by phase correlation (`skimage.registration`) of the
   band means in a central window of at most ``COREG_WINDOW_PX``, Hann-weighted;
3. per band, after histogram-matched to before (a 256-entry lookup table from both
   histograms), moved by that shift (bilinear), and the change magnitude over the bands;
4. an Otsu threshold of the magnitude, a 3 x 3 opening, connected components;
5. ``change_mask.tif`` and ``change_magnitude.tif`` as COGs with the creation options of the
   evidence (`pipeline.report.rasters.cog_options`).

Not done: nodata, the AOI mask, the co-registration's checks, the objects, compounds, walls
and watchtowers, the chips, the GeoJSON, the manifest. Any detect that writes the evidence of
issue 2 does all of this work and more; done here plainly, it is not a proven minimum. Its
memory is not bounded (about 25 bytes a pixel: 10 GB at 20000 px). Work that splits by rows
runs on ``threads`` threads (NumPy, GDAL and hashlib release the GIL).
"""

from __future__ import annotations

import resource
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
import scipy.ndimage as ndi
from skimage.filters import threshold_otsu, window
from skimage.registration import phase_cross_correlation

from pipeline.files import sha256_file
from pipeline.report.rasters import COPY_CONFIG, cog_options

__all__ = ["COREG_WINDOW_PX", "floor", "shifted_bilinear"]

COREG_WINDOW_PX = 1024
STRIP_ROWS = 512
_BINS = 1024


def _read(path: str) -> tuple[np.ndarray, dict[str, Any]]:
    with rasterio.open(path) as src:
        return src.read(), dict(src.profile)


def shifted_bilinear(plane: np.ndarray, dy: float, dx: float, rows: slice) -> np.ndarray:
    """Rows ``rows`` of ``plane`` (float, ``(y, x)``) moved by ``(dy, dx)`` pixels with
    bilinear weights, edges repeated: ``out[y, x] = plane[y - dy, x - dx]``, the convention of
    `scipy.ndimage.shift` and of the shift `phase_cross_correlation` returns."""
    h, w = plane.shape
    iy, ix = int(np.floor(-dy)), int(np.floor(-dx))
    fy, fx = np.float32(-dy - iy), np.float32(-dx - ix)
    src_rows = np.clip(np.arange(rows.start + iy, rows.stop + iy + 1), 0, h - 1)
    pad = abs(ix) + 1
    block = np.pad(plane[src_rows], ((0, 0), (pad, pad)), mode="edge")
    left = block[:, pad + ix:pad + ix + w]
    right = block[:, pad + ix + 1:pad + ix + 1 + w]
    cols = left * (1 - fx) + right * fx
    return cols[:-1] * (1 - fy) + cols[1:] * fy


def floor(before: str | Path, after: str | Path, workdir: str | Path, *, threads: int = 2,
          clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Run the floor on two 8-bit rasters of one grid; the COGs go to a folder in ``workdir``
    that is deleted afterwards.

    Returns ``{"seconds", "cpu_s", "parts": [[name, seconds], ...], "shift_px": [dy, dx],
    "threshold", "components", "changed_share", "peak_mb"}``.
    """
    parts: list[list[Any]] = []
    start, cpu0 = clock(), _cpu_s()
    last = start

    def mark(name: str) -> None:
        nonlocal last
        now = clock()
        parts.append([name, round(now - last, 3)])
        last = now

    with ThreadPoolExecutor(threads) as pool, \
            tempfile.TemporaryDirectory(prefix="floor-", dir=workdir) as out:
        hashes = [pool.submit(sha256_file, p) for p in (before, after)]
        (b, profile), (a, _) = pool.map(_read, (str(before), str(after)))
        for h in hashes:
            h.result()
        if b.dtype != np.uint8 or a.dtype != np.uint8 or b.shape != a.shape:
            raise ValueError("the floor takes two 8-bit rasters of one shape (the bench pairs)")
        mark("read+sha256")
        n_bands, height, width = b.shape
        strips = [slice(r, min(r + STRIP_ROWS, height)) for r in range(0, height, STRIP_ROWS)]
        win = min(COREG_WINDOW_PX, height, width)
        r0, c0 = (height - win) // 2, (width - win) // 2
        # a Hann window against the edges' bias towards a whole-pixel shift (without it
        # the 8192 bench pair's (-0.37, 0.61) px came out as (-0.2, 0.3))
        hann = window("hann", (win, win))
        shift, _, _ = phase_cross_correlation(
            *(x[:, r0:r0 + win, c0:c0 + win].mean(axis=0) * hann for x in (b, a)),
            upsample_factor=20)
        dy, dx = (float(v) for v in shift)
        mark("coregister")

        def counts(rows: slice) -> np.ndarray:
            return np.stack([np.bincount(x[i, rows].ravel(), minlength=256)
                             for x in (b, a) for i in range(n_bands)])

        hist = sum(pool.map(counts, strips))
        luts = []
        for i in range(n_bands):
            cdf_b = np.cumsum(hist[i]) / hist[i].sum()
            cdf_a = np.cumsum(hist[n_bands + i]) / hist[n_bands + i].sum()
            luts.append(np.interp(cdf_a, cdf_b, np.arange(256)).astype(np.float32))
        mark("histograms")
        magnitude = np.empty((height, width), np.float32)
        top = float(np.sqrt(n_bands) * 256)
        edges = np.linspace(0.0, top, _BINS + 1)

        reach = abs(int(np.floor(-dy))) + 2  # the rows the shift reads beyond a strip

        def change(rows: slice) -> np.ndarray:
            acc = np.zeros((rows.stop - rows.start, width), np.float32)
            near = slice(max(rows.start - reach, 0), min(rows.stop + reach, height))
            for i in range(n_bands):
                # the table applied to the rows the shift reads, then the shift
                moved = shifted_bilinear(luts[i][a[i, near]], dy, dx,
                                         slice(rows.start - near.start, rows.stop - near.start))
                d = moved - b[i, rows]
                acc += d * d
            np.sqrt(acc, out=magnitude[rows])
            return np.histogram(magnitude[rows], bins=edges)[0]

        # Otsu on the histogram, as the detect's change step does (`core.change`)
        threshold = float(threshold_otsu(hist=(sum(pool.map(change, strips)),
                                               (edges[:-1] + edges[1:]) / 2)))
        mark("magnitude")
        mask = np.empty((height, width), bool)
        square = np.ones((3, 3), bool)

        def opened(rows: slice) -> None:
            lo, hi = max(rows.start - 2, 0), min(rows.stop + 2, height)
            done = ndi.binary_opening(magnitude[lo:hi] > threshold, structure=square)
            mask[rows] = done[rows.start - lo:rows.stop - lo]

        list(pool.map(opened, strips))
        mark("opening")
        _, n_components = ndi.label(mask, structure=square)
        mark("labels")
        grid = {"crs": profile["crs"], "transform": profile["transform"], "width": width,
                "height": height, "count": 1}
        with rasterio.Env(GDAL_NUM_THREADS=str(threads), **COPY_CONFIG):
            for part, name, values, dtype, nodata in (
                    ("mask COG", "change_mask.tif", mask.view(np.uint8), "uint8", 255),
                    ("magnitude COG", "change_magnitude.tif", magnitude, "float32",
                     float("nan"))):
                with rasterio.open(f"/vsimem/floor-{name}", "w", driver="MEM", dtype=dtype,
                                   nodata=nodata, **grid) as mem:
                    mem.write(values, 1)
                    rasterio.shutil.copy(mem, str(Path(out) / name), driver="COG",
                                         **cog_options(dtype, threads))
                mark(part)
        # timed before the temporary folder and its COGs are deleted
        seconds, cpu_s = clock() - start, _cpu_s() - cpu0
    return {"seconds": seconds, "cpu_s": cpu_s, "parts": parts,
            "shift_px": [round(dy, 3), round(dx, 3)], "threshold": round(threshold, 3),
            "components": int(n_components), "changed_share": float(mask.mean()),
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
