"""Tests for pipeline.report.rasters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import rioxarray  # noqa: F401
import xarray as xr
from numpy.testing import assert_array_equal

from pipeline.errors import GridError, OutputError
from pipeline.files import sha256_file
from pipeline.report import rasters
from pipeline.report.rasters import validate_cog, write_cog

CRS = "EPSG:32645"
MASK_DESCRIPTION = "change (1), no change (0), nodata (255)"


def _grid_array(values: np.ndarray, res_m: float = 10.0, crs: str | None = CRS) -> xr.DataArray:
    """A (y, x) or (band, y, x) DataArray in UTM 45N with pixel-centre coordinates."""
    height, width = values.shape[-2:]
    x = 604_000.0 + res_m * (np.arange(width) + 0.5)
    y = 4_804_000.0 - res_m * (np.arange(height) + 0.5)
    dims = ("y", "x") if values.ndim == 2 else ("band", "y", "x")
    coords = {"y": y, "x": x}
    if values.ndim == 3:
        coords["band"] = np.arange(1, values.shape[0] + 1)
    da = xr.DataArray(values, dims=dims, coords=coords)
    return da.rio.write_crs(crs) if crs else da


@pytest.fixture
def mask_da() -> xr.DataArray:
    """A float 0/1 change mask with a NaN corner, 40 x 30 px."""
    values = np.zeros((40, 30), dtype="float32")
    values[8:12, 8:12] = 1.0
    values[:3, :3] = np.nan
    return _grid_array(values)


def test_write_cog_uint8_mask(mask_da: xr.DataArray, tmp_path: Path) -> None:
    """The mask is a valid COG with uint8 dtype, nodata 255, NaN -> 255, grid kept."""
    path = write_cog(
        mask_da,
        tmp_path / "change_mask.tif",
        dtype="uint8",
        nodata=255,
        description=MASK_DESCRIPTION,
    )
    with rasterio.open(path) as ds:
        assert ds.dtypes == ("uint8",) and ds.nodata == 255
        assert ds.crs.to_epsg() == 32645
        assert ds.transform == mask_da.rio.transform()
        assert ds.descriptions == (MASK_DESCRIPTION,)
        assert ds.tags()["TIFFTAG_SOFTWARE"].startswith("sitewatch ")
        data = ds.read(1)
    expected = np.where(np.isnan(mask_da.values), 255, mask_da.values).astype("uint8")
    assert_array_equal(data, expected)
    assert validate_cog(path) == (True, [], [])
    assert [p.name for p in tmp_path.iterdir()] == ["change_mask.tif"]


def test_write_cog_float32_magnitude(tmp_path: Path) -> None:
    """A float magnitude larger than one block keeps NaN nodata, values and gets overviews."""
    values = np.random.default_rng(0).random((700, 600)).astype("float32")
    values[:5, :] = np.nan
    da = _grid_array(values)
    path = write_cog(
        da, tmp_path / "change_magnitude.tif", dtype="float32", nodata=np.nan, tags={"units": "1"}
    )
    with rasterio.open(path) as ds:
        assert ds.dtypes == ("float32",) and np.isnan(ds.nodata)
        assert ds.transform == da.rio.transform() and ds.crs.to_epsg() == 32645
        assert ds.overviews(1) and ds.block_shapes[0] == (512, 512)
        assert ds.tags()["units"] == "1"
        assert ds.tags(ns="IMAGE_STRUCTURE")["COMPRESSION"] == "DEFLATE"
        assert_array_equal(ds.read(1), values)
    assert validate_cog(path) == (True, [], [])
    assert [p.name for p in tmp_path.iterdir()] == ["change_magnitude.tif"]


def test_write_cog_multiband(tmp_path: Path) -> None:
    """A (band, y, x) array writes one band per slice with per-band descriptions."""
    values = np.arange(2 * 20 * 10, dtype="float32").reshape(2, 20, 10)
    path = write_cog(
        _grid_array(values),
        tmp_path / "m.tif",
        dtype="float32",
        nodata=np.nan,
        description=["a", "b"],
    )
    with rasterio.open(path) as ds:
        assert ds.count == 2 and ds.descriptions == ("a", "b")
        assert_array_equal(ds.read(), values)


def test_write_cog_reproducible_bytes(mask_da: xr.DataArray, tmp_path: Path) -> None:
    """Writing the same array twice gives byte-identical files."""
    a = write_cog(mask_da, tmp_path / "a.tif", dtype="uint8", nodata=255)
    b = write_cog(mask_da, tmp_path / "b.tif", dtype="uint8", nodata=255)
    assert sha256_file(a) == sha256_file(b)


def test_write_cog_never_overwrites(mask_da: xr.DataArray, tmp_path: Path) -> None:
    """An existing file is kept unless overwrite=True; no temporary file is left."""
    path = tmp_path / "change_mask.tif"
    path.write_bytes(b"old")
    with pytest.raises(OutputError, match="--overwrite"):
        write_cog(mask_da, path, dtype="uint8", nodata=255)
    assert path.read_bytes() == b"old"
    write_cog(mask_da, path, dtype="uint8", nodata=255, overwrite=True)
    assert validate_cog(path)[0]
    assert [p.name for p in tmp_path.iterdir()] == ["change_mask.tif"]


def test_write_cog_failure_leaves_nothing(
    mask_da: xr.DataArray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the COG copy fails, neither the output nor any temporary file remains."""

    def broken_copy(*args: object, **kwargs: object) -> None:
        raise rasterio.errors.RasterioIOError("disk full")

    monkeypatch.setattr(rasters.rasterio.shutil, "copy", broken_copy)
    with pytest.raises(OutputError, match="disk full"):
        write_cog(mask_da, tmp_path / "change_mask.tif", dtype="uint8", nodata=255)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("values", "dtype", "nodata", "match"),
    [
        (np.zeros((4, 4)), "uint8", np.nan, "nodata=nan"),
        (np.zeros((4, 4)), "uint8", 300, "does not fit"),
        (np.full((4, 4), 3.5), "uint8", 255, "Non-integer"),
        (np.full((4, 4), 256.0), "uint8", 255, "outside"),
        (np.zeros((4, 4)), "complex64", 0, "integer or float"),
    ],
)
def test_write_cog_rejects_lossy_casts(
    values: np.ndarray, dtype: str, nodata: float, match: str, tmp_path: Path
) -> None:
    """Casts that would lose or invent data raise ValueError before writing."""
    with pytest.raises(ValueError, match=match):
        write_cog(_grid_array(values), tmp_path / "x.tif", dtype=dtype, nodata=nodata)
    assert list(tmp_path.iterdir()) == []


def test_write_cog_requires_crs(tmp_path: Path) -> None:
    """An array without a CRS is a GridError."""
    da = _grid_array(np.zeros((4, 4), dtype="float32"), crs=None)
    with pytest.raises(GridError, match="no CRS"):
        write_cog(da, tmp_path / "x.tif", dtype="float32", nodata=np.nan)


def test_write_cog_rejects_transposed(tmp_path: Path) -> None:
    """(x, y) dims are refused instead of writing a transposed raster."""
    da = _grid_array(np.zeros((4, 6), dtype="float32")).transpose("x", "y")
    with pytest.raises(ValueError, match="dims"):
        write_cog(da, tmp_path / "x.tif", dtype="float32", nodata=np.nan)


def test_validate_cog_flags_plain_geotiff(tmp_path: Path) -> None:
    """A striped, overview-less GeoTIFF larger than 512 px fails validation."""
    path = tmp_path / "plain.tif"
    profile = {"driver": "GTiff", "dtype": "uint8", "count": 1, "width": 600, "height": 600}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.zeros((1, 600, 600), dtype="uint8"))
    ok, errors, warnings = validate_cog(path)
    assert not ok
    assert any("LAYOUT=COG" in e for e in errors)
    assert any("not tiled" in e for e in errors)
    assert any("overviews" in e for e in errors)
    assert any("not compressed" in w for w in warnings)


def test_validate_cog_missing_file(tmp_path: Path) -> None:
    """A missing file is an error, not an exception."""
    ok, errors, _ = validate_cog(tmp_path / "nope.tif")
    assert not ok and "cannot be opened" in errors[0]


@pytest.mark.parametrize(("dtype", "nodata"), [("float32", float("nan")), ("uint8", 255)])
def test_write_cog_dask_streams_same_bytes(tmp_path: Path, dtype: str, nodata: float) -> None:
    """A Dask array is written block by block, into the same bytes as its NumPy version."""
    import dask.array

    rng = np.random.default_rng(0)
    values = rng.integers(0, 2, (700, 600)).astype("float32")
    values[:40, :50] = np.nan
    eager = write_cog(_grid_array(values), tmp_path / "eager.tif", dtype=dtype, nodata=nodata)
    lazy_da = _grid_array(values).chunk({"y": 300, "x": 256})
    assert isinstance(lazy_da.data, dask.array.Array)
    lazy = write_cog(lazy_da, tmp_path / "lazy.tif", dtype=dtype, nodata=nodata)
    assert sha256_file(lazy) == sha256_file(eager)
    assert validate_cog(lazy)[0]


def test_write_cog_dask_lossy_cast_leaves_nothing(tmp_path: Path) -> None:
    """A value that does not fit, found while streaming a Dask array, leaves no file behind."""
    values = np.zeros((300, 300), "float32")
    values[290, 290] = 300.0
    with pytest.raises(ValueError, match="outside"):
        write_cog(_grid_array(values).chunk({"y": 100}), tmp_path / "x.tif", dtype="uint8",
                  nodata=255)
    assert list(tmp_path.iterdir()) == []


def test_write_cog_float_numeric_nodata_maps_nan(tmp_path: Path) -> None:
    """NaN becomes a numeric nodata in a float file (no pass-through when there is a mapping)."""
    values = np.arange(12, dtype="float32").reshape(3, 4)
    values[0, 1] = np.nan
    path = write_cog(_grid_array(values), tmp_path / "m.tif", dtype="float32", nodata=-9999.0)
    with rasterio.open(path) as ds:
        got = ds.read(1)
    assert got[0, 1] == -9999.0
    assert_array_equal(np.delete(got.ravel(), 1), np.delete(values.ravel(), 1))


def test_cast_passes_through_what_needs_no_mapping() -> None:
    """A block already in the output dtype with nothing to map is written as it is."""
    floats = np.array([[1.5, np.nan]], np.float32)
    ints = np.array([[0, 1, 255]], np.uint8)
    assert rasters._cast(floats, "float32", np.nan) is floats
    assert rasters._cast(ints, "uint8", 255) is ints
    assert rasters._cast(floats, "float64", np.nan).dtype == np.float64


def test_write_cog_temporary_overview_level_keeps_the_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ZSTD level of GDAL's temporary overview file (COPY_CONFIG) leaves the COG byte for
    byte the same, several overview levels and odd sizes included."""
    rng = np.random.default_rng(3)
    values = rng.gamma(2.0, 3.0, (1391, 1203)).astype("float32")
    values[:100, :70] = np.nan
    fast = write_cog(_grid_array(values), tmp_path / "fast.tif", dtype="float32",
                     nodata=float("nan"))
    assert rasters.COPY_CONFIG == {"ZSTD_LEVEL_OVERVIEW": "1"}
    monkeypatch.setattr(rasters, "COPY_CONFIG", {})
    default = write_cog(_grid_array(values), tmp_path / "default.tif", dtype="float32",
                        nodata=float("nan"))
    with rasterio.open(fast) as ds:
        assert ds.overviews(1) == [2, 4]
    assert sha256_file(fast) == sha256_file(default)
    assert validate_cog(fast)[0]


@pytest.mark.parametrize(("dtype", "nodata"), [("float32", float("nan")), ("uint8", 255)])
def test_write_cog_same_bytes_on_any_number_of_threads(tmp_path: Path, dtype: str,
                                                       nodata: float) -> None:
    """Tiles compressed and overviews computed on one thread or on four: the same file."""
    rng = np.random.default_rng(4)
    values = (rng.gamma(2.0, 3.0, (1391, 1203)) if dtype == "float32"
              else rng.integers(0, 2, (1391, 1203))).astype("float32")
    values[:100, :70] = np.nan
    paths = [write_cog(_grid_array(values), tmp_path / f"{n}.tif", dtype=dtype, nodata=nodata,
                       threads=n) for n in (1, 4)]
    with rasterio.open(paths[1]) as ds:
        assert ds.overviews(1) == [2, 4]
    assert sha256_file(paths[0]) == sha256_file(paths[1])
