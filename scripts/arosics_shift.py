#!/usr/bin/env python3
"""scripts/arosics_shift.py: AROSICS's global shift for image pairs, for scripts/bench_coreg.py.

Runs inside the separate AROSICS virtual environment (``make bench-coreg`` makes it; never a
dependency of Sitewatch), so it imports only the standard library, GDAL's Python bindings,
NumPy and arosics. For each case of the JSON file given as the only argument
(``[{"name", "reference", "target", "nodata"}]``, GeoTIFF paths) it reads both files into
memory, then times ``arosics.COREG(...)`` with its defaults (256 px window at the centre of the
overlap, first band, all CPUs) plus ``calculate_spatial_shifts()``, and prints one JSON object
per case on stdout: ``x_shift_px``, ``y_shift_px`` (AROSICS's correction of the target, in
target pixels, columns and rows), ``reliability_pct``, ``seconds`` (wall), ``cpu_seconds``
(this process's threads and any child processes) and ``read_seconds``.

Debian 12 ships GDAL 3.6 bindings; arosics, geoarray and py_tools_ds want 3.8 for two small
things, added here when missing: ``gdal.config_options`` (a context manager setting GDAL config
options) and ``with`` on GDAL and OGR datasets (FIELD_NOTES.md, "Co-registration, measured").
"""

import contextlib
import io
import json
import resource
import sys
import time

from osgeo import gdal, ogr


def _shim_gdal() -> None:
    """Add the two GDAL >= 3.7/3.8 conveniences arosics uses to older bindings."""
    if not hasattr(gdal, "config_options"):

        @contextlib.contextmanager
        def config_options(options, thread_local=True):
            old = {key: gdal.GetConfigOption(key) for key in options}
            for key, value in options.items():
                gdal.SetConfigOption(key, value)
            try:
                yield
            finally:
                for key, value in old.items():
                    gdal.SetConfigOption(key, value)

        gdal.config_options = config_options
    # leaving the block must finish the file: an OGR data source is closed (GeoJSON is written
    # then), a GDAL dataset flushed (3.6 has no Dataset.Close)
    for cls, finish in ((gdal.Dataset, "FlushCache"), (ogr.DataSource, "Destroy")):
        if not hasattr(cls, "__enter__"):
            cls.__enter__ = lambda self: self
            cls.__exit__ = lambda self, *exc, _finish=finish: getattr(self, _finish)()


def _read(path: str):
    """The file as a GeoArray held in memory (rows, cols, bands)."""
    from geoarray import GeoArray

    ds = gdal.Open(path)
    arr = ds.ReadAsArray()
    if arr.ndim == 3:
        arr = arr.transpose(1, 2, 0)
    geo = GeoArray(arr, geotransform=ds.GetGeoTransform(), projection=ds.GetProjection())
    ds = None
    return geo


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads) and its finished children."""
    own, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def measure(case: dict) -> dict:
    """AROSICS's shift and timing for one case."""
    from arosics import COREG

    t0 = time.perf_counter()
    ref, tgt = _read(case["reference"]), _read(case["target"])
    read_s = time.perf_counter() - t0
    nodata = case.get("nodata")
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    # arosics prints warnings and notes even with q=True: keep stdout for the JSON lines
    with contextlib.redirect_stdout(io.StringIO()) as chatter:
        try:
            coreg = COREG(ref, tgt, nodata=(nodata, nodata), q=True, progress=False,
                          ignore_errors=True)
            coreg.calculate_spatial_shifts()
        except Exception as e:  # an AROSICS failure is a figure of the benchmark, not a crash
            return {"name": case["name"], "seconds": time.perf_counter() - t0,
                    "cpu_seconds": cpu_seconds() - cpu0, "read_seconds": read_s, "success": False,
                    "problem": f"{type(e).__name__}: {e}"[:400]}
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    out = {"name": case["name"], "seconds": seconds, "cpu_seconds": cpu, "read_seconds": read_s,
           "success": bool(coreg.success), "x_shift_px": coreg.x_shift_px,
           "y_shift_px": coreg.y_shift_px, "reliability_pct": coreg.shift_reliability}
    if not coreg.success:
        out["problem"] = " ".join(chatter.getvalue().split())[-400:] or "no shift found"
    return out


def main() -> int:
    """Measure every case of the JSON file named on the command line."""
    _shim_gdal()
    gdal.UseExceptions()
    with open(sys.argv[1]) as fh:
        cases = json.load(fh)
    for case in cases:
        print(json.dumps(measure(case), default=float), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
