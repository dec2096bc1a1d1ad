"""Malformed inputs for the hardening tests: rasters GDAL writes oddly, and crafted headers."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from click.testing import CliRunner, Result

from pipeline.cli import SEED_AFTER, cli

# A 3.5 m grid inside the seeds/ after image (Dabancheng, UTM 45N).
CRS = "EPSG:32645"
ORIGIN = Affine(3.5, 0.0, 603500.0, 0.0, -3.5, 4804500.0)
# A point inside that grid, and the radius that keeps the AOI small and the runs fast.
AOI = "88.2821,43.3830"
RADIUS_M = "150"
_TIFF_WIDTH, _TIFF_HEIGHT, _TIFF_ROWS_PER_STRIP = 256, 257, 278


def write_raster(path: Path, data: np.ndarray, *, dtype: str | None = None,
                 crs: str | None = CRS, transform: Affine = ORIGIN, **options: object) -> Path:
    """Write a (band, y, x) or (y, x) array as a GeoTIFF with any GDAL creation options."""
    arr = np.asarray(data)
    if arr.ndim == 2:
        arr = arr[None]
    profile = dict(driver="GTiff", width=arr.shape[2], height=arr.shape[1], count=arr.shape[0],
                   dtype=dtype or arr.dtype.name, crs=crs, transform=transform, **options)
    with rasterio.open(path, "w", **profile) as dst:
        if arr.size:
            dst.write(arr.astype(profile["dtype"] if dtype != "complex_int16" else "complex64"))
    return path


def huge_header_tiff(path: Path, side_px: int = 1_000_000, *, compress: str | None = None) -> Path:
    """A tiny BigTIFF whose header claims ``side_px`` x ``side_px`` pixels in one strip.

    Without ``compress`` the strip is sparse (no bytes); with it, a real 64 x 64 strip is
    stored: a reader that trusts the header decodes side_px**2 bytes for that one block.
    """
    arr = np.arange(64 * 64, dtype="uint32").reshape(1, 64, 64).astype("uint8")
    options: dict[str, object] = {"BIGTIFF": "YES", "BLOCKYSIZE": 64}
    if compress:
        options["compress"] = compress
    write_raster(path, arr, **options)
    data = bytearray(path.read_bytes())
    if data[:4] != b"II+\x00":
        raise RuntimeError("expected a little-endian BigTIFF")
    ifd = struct.unpack("<Q", data[8:16])[0]
    (count,) = struct.unpack("<Q", data[ifd:ifd + 8])
    patched = 0
    for i in range(count):
        entry = ifd + 8 + 20 * i
        (tag,) = struct.unpack("<H", data[entry:entry + 2])
        if tag in (_TIFF_WIDTH, _TIFF_HEIGHT, _TIFF_ROWS_PER_STRIP):
            # LONG type, one value, stored inline in the entry's 8-byte value field
            data[entry + 2:entry + 20] = struct.pack("<HQQ", 4, 1, side_px)
            patched += 1
    if patched != 3:
        raise RuntimeError(f"patched {patched} of 3 size tags")
    path.write_bytes(bytes(data))
    return path


def invoke(args: list[str]) -> Result:
    """Run the CLI in-process; exceptions other than SystemExit stay in ``result.exception``."""
    return CliRunner().invoke(cli, args, catch_exceptions=True)


def detect_args(before: Path, out: Path, *, after: Path = SEED_AFTER,
                aoi: str = AOI) -> list[str]:
    """``sitewatch detect`` arguments for a small AOI, with dates given."""
    return ["detect", "--aoi", aoi, "--radius-m", RADIUS_M, "--before", str(before),
            "--after", str(after), "--before-date", "2017-03-02", "--after-date", "2018-10-11",
            "--out", str(out), "-q"]


def assert_clean_outcome(result: Result, *, allow_success: bool = True) -> None:
    """Exit 0 (when allowed), or 1/2 with a one-paragraph message and no traceback."""
    text = result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"uncaught {type(result.exception).__name__}: {result.exception}\n"
                             f"{text}") from result.exception
    assert "Traceback" not in text, text
    if result.exit_code == 0 and allow_success:
        return
    assert result.exit_code in (1, 2), (result.exit_code, text)
    error_lines = [line for line in text.splitlines() if line.startswith("Error:")]
    assert error_lines, text
    message = text[text.index("Error:"):].strip()
    assert len(message) > len("Error: ") + 10 and "\n\n" not in message, message


Factory = Callable[[Path], Path]
