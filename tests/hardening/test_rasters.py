"""Malformed rasters through ``sitewatch detect``: a clean error or a result, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from affine import Affine
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hardening._inputs import (
    AOI,
    ORIGIN,
    RADIUS_M,
    assert_clean_outcome,
    detect_args,
    huge_header_tiff,
    invoke,
    write_raster,
)
from pipeline.aoi import parse_aoi, plan_grid
from pipeline.errors import FetchError, PipelineError
from pipeline.fetch.local import describe_raster, read_to_grid

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
        pytest.skip("this GDAL cannot write a 0-pixel raster, so there is no file to refuse")
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


_DTYPES = ["uint8", "int8", "uint16", "int16", "int32", "uint32", "int64", "uint64", "float32",
           "float64"]


@st.composite
def _random_rasters(draw: Any) -> dict[str, Any]:
    dtype = draw(st.sampled_from(_DTYPES))
    bands, height, width = (draw(st.integers(1, 3)), draw(st.integers(1, 40)),
                            draw(st.integers(1, 40)))
    info = np.iinfo(dtype) if "int" in dtype else np.finfo(dtype)
    fill = draw(st.sampled_from(["random", "constant", "extremes", "nan", "inf", "mixed"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    data = rng.uniform(0, 255, (bands, height, width))
    if fill == "constant":
        data[:] = draw(st.floats(0, 255))
    elif fill == "extremes":
        data = rng.choice([float(info.min), float(info.max), 0.0], data.shape)
    elif fill in ("nan", "inf", "mixed") and dtype.startswith("float"):
        special = {"nan": [np.nan], "inf": [np.inf, -np.inf], "mixed": [np.nan, np.inf, 7.0]}
        data[rng.random(data.shape) < draw(st.floats(0, 1))] = rng.choice(special[fill])
    res_m = draw(st.sampled_from([0.3, 3.5, 10.0, 60.0, 2000.0]))
    crs = draw(st.sampled_from(["EPSG:32645", "EPSG:3857", "EPSG:4326"]))
    if crs == "EPSG:4326":
        origin = Affine(res_m / 1e5, 0, 88.2815 - draw(st.floats(0, 0.01)), 0, -res_m / 1e5,
                        43.3835 + draw(st.floats(0, 0.01)))
    elif crs == "EPSG:3857":
        origin = Affine(res_m, 0, 9827900.0 - draw(st.floats(0, 500)), 0, -res_m,
                        5370900.0 + draw(st.floats(0, 500)))
    else:
        origin = Affine(res_m, 0, 603500.0 + draw(st.floats(-300, 300)), 0, -res_m,
                        4804500.0 + draw(st.floats(-300, 300)))
    nodata = draw(st.sampled_from([None, 0, "max"]))
    return {"data": data.astype(dtype) if "int" not in dtype else np.clip(
        np.nan_to_num(data), info.min, info.max).astype(dtype), "crs": crs, "transform": origin,
            # a 64-bit maximum does not survive GDAL's double nodata: rasterio refuses it
            "nodata": (float(info.max) if dtype not in ("int64", "uint64") else None)
            if nodata == "max" else nodata}


@settings(derandomize=True, max_examples=40, deadline=10_000,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(raster=_random_rasters())
def test_read_to_grid_random_rasters(raster: dict[str, Any], tmp_path: Path) -> None:
    """Random dtypes, sizes (down to 1 x 1), values (NaN, Inf, dtype extremes), CRSs and
    resolutions: describe + read give float32 pixels with NaN as the only non-finite value,
    or a PipelineError."""
    path = write_raster(tmp_path / "r.tif", raster["data"], crs=raster["crs"],
                        transform=raster["transform"], nodata=raster["nodata"])
    aoi = parse_aoi(AOI, radius_m=float(RADIUS_M))
    try:
        info = describe_raster(path)
        da, _ = read_to_grid(path, plan_grid(aoi, max(info.res_m, 0.3)), role="before",
                             acquired=date(2017, 3, 2))
    except PipelineError as e:
        event(f"error: {type(e).__name__}")
        assert str(e).strip()
        return
    event("read")
    values = np.asarray(da.values)
    assert values.dtype == np.float32
    assert not np.isinf(values).any()
    assert values.shape[0] == raster["data"].shape[0]
