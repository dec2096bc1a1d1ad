"""Malformed rasters through ``sitewatch detect``: a clean error or a result, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from affine import Affine
from hardening._inputs import (
    ORIGIN,
    assert_clean_outcome,
    detect_args,
    huge_header_tiff,
    invoke,
    write_raster,
)

from pipeline.errors import FetchError
from pipeline.fetch.local import describe_raster

_RNG = np.random.default_rng(7)
_IMAGE = _RNG.integers(1, 255, (3, 200, 200))


def _corrupt(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _truncated(path: Path) -> Path:
    whole = write_raster(path, _IMAGE.astype("uint8"), compress="deflate", tiled=True,
                         blockxsize=64, blockysize=64).read_bytes()
    return _corrupt(path, whole[: len(whole) // 2])


# name -> (factory, expected): a phrase of the error message, "ok" (a run, or a named band
# mismatch with the 3-band after image), or "clean" (either, as long as it is clean)
CASES = {
    "one_bit": (lambda p: write_raster(p, np.repeat(_IMAGE[:1] > 128, 3, 0).astype("uint8"),
                                       NBITS=1), "ok"),
    "int64": (lambda p: write_raster(p, _IMAGE.astype("int64")), "ok"),
    "uint64": (lambda p: write_raster(p, _IMAGE.astype("uint64") * 2**40), "ok"),
    "float64": (lambda p: write_raster(p, _IMAGE.astype("float64")), "ok"),
    "complex64": (lambda p: write_raster(p, _IMAGE.astype("complex64")), "complex pixels"),
    "complex_int16": (lambda p: write_raster(p, _IMAGE, dtype="complex_int16"), "complex pixels"),
    "zero_bands_text": (lambda p: _corrupt(p, b"not a raster at all\n"), "not a raster"),
    "empty_file": (lambda p: _corrupt(p, b""), "not a raster"),
    "tiff_magic_only": (lambda p: _corrupt(p, b"II*\x00\x08\x00\x00\x00"), "not a raster"),
    "truncated": (_truncated, "corrupt or truncated"),
    # one pixel of 1 km covering the whole AOI
    "one_by_one": (lambda p: write_raster(p, _IMAGE[:, :1, :1].astype("uint8"),
                                          transform=Affine(1000.0, 0, 603200.0, 0, -1000.0,
                                                           4805000.0)), "clean"),
    "nan_everywhere": (lambda p: write_raster(p, np.full((3, 200, 200), np.nan, "float32")),
                       "nodata"),
    "inf_everywhere": (lambda p: write_raster(p, np.full((3, 200, 200), np.inf, "float32")),
                       "nodata"),
    "inf_partly": (lambda p: write_raster(
        p, np.where(_IMAGE > 230, np.inf, _IMAGE).astype("float32")), "ok"),
    "minus_inf_partly": (lambda p: write_raster(
        p, np.where(_IMAGE > 230, -np.inf, _IMAGE).astype("float32")), "ok"),
    "nan_partly": (lambda p: write_raster(
        p, np.where(_IMAGE > 240, np.nan, _IMAGE).astype("float32")), "ok"),
    "float64_beyond_float32": (lambda p: write_raster(
        p, np.where(_IMAGE > 230, 1e300, _IMAGE).astype("float64")), "ok"),
    "no_crs": (lambda p: write_raster(p, _IMAGE.astype("uint8"), crs=None),
               "no coordinate reference system"),
    "rotated": (lambda p: write_raster(p, _IMAGE.astype("uint8"),
                                       transform=ORIGIN * Affine.rotation(10)), "rotated"),
    "south_up": (lambda p: write_raster(p, _IMAGE.astype("uint8"), transform=Affine(
        3.5, 0, 603500.0, 0, 3.5, 4804500.0 - 700)), "ok"),
    "huge_header_sparse": (lambda p: huge_header_tiff(p), "corrupt or truncated"),
    "huge_header_deflate": (lambda p: huge_header_tiff(p, compress="deflate"),
                            "corrupt or truncated"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_detect_on_malformed_before_image(name: str, tmp_path: Path) -> None:
    """Each malformed 'before' image ends in a named error or a written run, never a traceback."""
    factory, expected = CASES[name]
    before = factory(tmp_path / f"{name}.tif")
    # a single-band source is compared with a single-band after image of the same kind
    result = invoke(detect_args(before, tmp_path / "out"))
    assert_clean_outcome(result)
    if expected == "clean":
        return
    if expected == "ok":
        if result.exit_code != 0:
            # a different band count than the 3-band after image is a named error too
            assert "bands" in result.output, result.output
        else:
            assert result.stdout.startswith("wrote "), result.output
            assert "RuntimeWarning" not in result.output, result.output
    else:
        assert result.exit_code == 1, result.output
        assert expected in result.output, result.output
        assert not list((tmp_path / "out").glob("*/*")), "a failed run left a folder"


@pytest.mark.parametrize("name", ["complex64", "no_crs", "rotated", "truncated", "empty_file",
                                  "huge_header_deflate"])
def test_describe_raster_rejects(name: str, tmp_path: Path) -> None:
    """The library call names the problem with a FetchError."""
    factory, expected = CASES[name]
    with pytest.raises(FetchError, match=expected.split()[0]):
        describe_raster(factory(tmp_path / f"{name}.tif"))


def test_zero_size_raster_cannot_be_written_or_is_rejected(tmp_path: Path) -> None:
    """GDAL refuses to create a 0 x N GeoTIFF; if one exists it is refused before reading."""
    try:
        path = write_raster(tmp_path / "zero.tif", np.zeros((1, 0, 5), "uint8"))
    except Exception:  # noqa: BLE001  GDAL/rasterio refuse zero sizes with several types
        return
    with pytest.raises(FetchError, match="no pixels|not a raster"):
        describe_raster(path)


_HUGE_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    sys.path[:0] = {paths!r}
    from pathlib import Path
    from hardening._inputs import detect_args, huge_header_tiff, invoke
    limit = {limit}
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    tmp = Path({tmp!r})
    out = []
    for compress in (None, "deflate", "lzw"):
        path = huge_header_tiff(tmp / f"huge_{{compress}}.tif", compress=compress)
        result = invoke(detect_args(path, tmp / "out", after=path))
        exc = result.exception
        out.append({{"size": path.stat().st_size, "code": result.exit_code,
                    "output": result.output,
                    "exception": None if isinstance(exc, SystemExit) else repr(exc)}})
    print(json.dumps(out))
""")


def test_huge_header_fails_within_a_memory_limit(tmp_path: Path) -> None:
    """A few-kB TIFF claiming 10^6 x 10^6 px fails cleanly in a process limited to 3 GB of
    address space: the header is never trusted for an allocation (10^12 bytes)."""
    here = Path(__file__).resolve().parent
    script = _HUGE_SCRIPT.format(paths=[str(here.parent)], limit=3 << 30,
                                 tmp=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = json.loads(proc.stdout.strip().splitlines()[-1])
    for run in runs:
        assert run["size"] < 10_000
        assert run["exception"] is None, run
        assert run["code"] == 1 and "Traceback" not in run["output"], run
        assert "corrupt or truncated" in run["output"], run
