"""Tests for pipeline.fetch.local: local GeoTIFFs onto the working grid, errors and provenance."""

from __future__ import annotations

import hashlib
import pickle
import warnings
from datetime import date
from pathlib import Path

import dask.array
import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine
from numpy.testing import assert_array_equal
from pyproj import Transformer
from rasterio.features import rasterize
from rasterio.transform import from_origin
from shapely.geometry import box

from pipeline.errors import ConfigError, FetchError, NoValidDataError, ProvenanceWarning
from pipeline.fetch.local import (
    acquisition_date,
    common_resolution,
    describe_raster,
    read_to_grid,
)
from pipeline.model import GridPlan

UTM = "EPSG:32645"
ORIGIN = (600000.0, 4800000.0)  # top-left corner of the synthetic UTM images
BLOCK_UTM = box(600400.0, 4799400.0, 600500.0, 4799500.0)  # a bright 100 m x 100 m block
REAL_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "dabancheng"


def _write(path: Path, data: np.ndarray, transform: Affine, crs: str | None = UTM,
           nodata: float | None = 0, block: int = 256, **extra: object) -> Path:
    """Write a tiled GeoTIFF of a (bands, rows, cols) array."""
    count, height, width = data.shape
    profile = dict(driver="GTiff", width=width, height=height, count=count, dtype=data.dtype.name,
                   crs=crs, transform=transform, nodata=nodata, tiled=True, blockxsize=block,
                   blockysize=block, compress="deflate", **extra)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def _utm_scene(path: Path, res: float = 2.0, size: int = 512) -> Path:
    """UTM image: background 50, the bright block 200."""
    transform = from_origin(*ORIGIN, res, res)
    bright = rasterize([(BLOCK_UTM, 200)], out_shape=(size, size), transform=transform, fill=50)
    return _write(path, np.stack([bright, bright // 2]).astype(np.uint8), transform)


def _lonlat_scene(path: Path) -> Path:
    """The same scene drawn directly on a lon/lat grid (about 1.1 m x 0.8 m pixels)."""
    to_lonlat = Transformer.from_crs(UTM, "EPSG:4326", always_xy=True).transform
    footprint = shapely.transform(box(ORIGIN[0], ORIGIN[1] - 1024, ORIGIN[0] + 1024, ORIGIN[1]),
                                  to_lonlat, interleaved=False)
    minx, _, _, maxy = footprint.bounds
    res = 1e-5
    transform = from_origin(minx, maxy, res, res)
    shape = (1000, 1400)
    block = shapely.transform(BLOCK_UTM, to_lonlat, interleaved=False)
    bright = rasterize([(block, 200)], out_shape=shape, transform=transform, fill=50)
    return _write(path, np.stack([bright, bright // 2]).astype(np.uint8), transform,
                  crs="EPSG:4326")


def _plan(minx: float, miny: float, maxx: float, maxy: float, res: float = 4.0) -> GridPlan:
    return GridPlan.snapped(UTM, (minx, miny, maxx, maxy), res)


def _centroid(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(mask)
    return np.array([rows.mean(), cols.mean()])


# --- geometry of the read -------------------------------------------------------------------


def test_read_to_grid_two_crs_block_lands_on_same_pixels(tmp_path: Path):
    """A UTM image and a lon/lat image of one scene put the bright block on the same pixels."""
    plan = _plan(600200, 4799200, 600700, 4799700)
    utm, _ = read_to_grid(_utm_scene(tmp_path / "utm_2017-03-02.tif"), plan, role="before")
    geo, _ = read_to_grid(_lonlat_scene(tmp_path / "geo_2018-10-11.tif"), plan, role="after")
    utm_mask, geo_mask = utm.values[0] > 125, geo.values[0] > 125
    assert utm_mask.sum() == pytest.approx(25 * 25, rel=0.1)
    assert np.abs(_centroid(utm_mask) - _centroid(geo_mask)).max() <= 1.0
    assert (utm_mask ^ geo_mask).sum() <= 4 * 25 + 4  # at most one pixel ring differs


def test_read_to_grid_coordinates_are_pixel_centres(tmp_path: Path):
    """x/y are pixel centres of the plan, and rioxarray sees the plan's CRS and transform."""
    plan = _plan(600200, 4799200, 600700, 4799700)
    da, _ = read_to_grid(_utm_scene(tmp_path / "s_2017-03-02.tif"), plan, role="before")
    assert da.dims == ("band", "y", "x") and da.dtype == np.float32
    assert da.x.values[0] == plan.bounds[0] + 2.0 and da.y.values[0] == plan.bounds[3] - 2.0
    assert list(da.band.values) == [1, 2]
    assert da.rio.crs.to_string() == UTM and da.rio.transform() == plan.transform
    assert da.attrs["role"] == "before" and da.attrs["source_path"].endswith("s_2017-03-02.tif")


def test_read_to_grid_nodata_edge_not_blended(tmp_path: Path):
    """Bilinear resampling next to nodata gives NaN or the true value, never a blend with 0."""
    data = np.full((1, 512, 512), 100, np.uint8)
    data[:, :, :200] = 0  # nodata west of x = 600400
    path = _write(tmp_path / "edge_2017-03-02.tif", data, from_origin(*ORIGIN, 2, 2))
    plan = GridPlan(UTM, (600301.0, 4799699.0, 600601.0, 4799999.0), 3.0)
    da, _ = read_to_grid(path, plan, role="before", resampling="bilinear")
    values = da.values[0]
    assert np.nanmin(values) == 100.0 and np.nanmax(values) == 100.0
    centres = da.x.values
    assert np.isnan(values[:, centres < 600398]).all()
    assert not np.isnan(values[:, centres > 600402]).any()


def test_read_to_grid_partial_overlap_nan_outside_footprint(tmp_path: Path):
    """Pixels of the plan beyond the image's east edge are NaN, those inside are valid."""
    path = _utm_scene(tmp_path / "s_2017-03-02.tif")  # image spans x 600000..601024
    plan = _plan(600900, 4799500, 601200, 4799800)
    da, _ = read_to_grid(path, plan, role="before")
    inside, outside = da.x.values < 601022, da.x.values > 601026
    assert not np.isnan(da.values[:, :, inside]).any()
    assert np.isnan(da.values[:, :, outside]).all()


def test_read_to_grid_alpha_excluded_and_masks_nan(tmp_path: Path):
    """An alpha band is not returned as data, and pixels it masks become NaN."""
    data = np.full((4, 256, 256), 90, np.uint8)
    data[3] = 255
    data[3, :, :100] = 0
    path = _write(tmp_path / "rgba_2017-03-02.tif", data, from_origin(*ORIGIN, 2, 2),
                  nodata=None, photometric="RGB", alpha="YES")
    da, ref = read_to_grid(path, _plan(600000, 4799600, 600400, 4800000), role="before")
    assert da.sizes["band"] == 3 and ref.extra["bands"] == 3
    assert np.isnan(da.values[:, :, da.x.values < ORIGIN[0] + 199]).all()
    assert (da.values[:, :, da.x.values > ORIGIN[0] + 201] == 90).all()


# --- no valid data ------------------------------------------------------------------------


def test_read_to_grid_aoi_outside_image_raises(tmp_path: Path):
    """An AOI beside the image raises NoValidDataError saying it does not overlap."""
    path = _utm_scene(tmp_path / "s_2017-03-02.tif")
    with pytest.raises(NoValidDataError, match="does not overlap the after image .*image covers"):
        read_to_grid(path, _plan(610000, 4790000, 610400, 4790400), role="after")


def test_read_to_grid_all_nodata_window_raises(tmp_path: Path):
    """An AOI over the image's nodata part raises NoValidDataError saying all is nodata."""
    data = np.full((1, 512, 512), 100, np.uint8)
    data[:, :, :300] = 0
    path = _write(tmp_path / "s_2017-03-02.tif", data, from_origin(*ORIGIN, 2, 2))
    with pytest.raises(NoValidDataError, match="every pixel there is nodata"):
        read_to_grid(path, _plan(600020, 4799600, 600300, 4799900), role="before")


# --- broken inputs --------------------------------------------------------------------------


def test_describe_raster_missing_file_raises(tmp_path: Path):
    """A missing file is a FetchError telling the user to check the path."""
    with pytest.raises(FetchError, match=r"^Raster \S+nope.tif does not exist; check the path"):
        describe_raster(tmp_path / "nope.tif")


def test_describe_raster_text_file_raises(tmp_path: Path):
    """A text file is a FetchError saying GDAL cannot read it as a raster."""
    path = tmp_path / "notes.tif"
    path.write_text("this is not an image\n")
    with pytest.raises(FetchError, match="is not a raster GDAL can read"):
        describe_raster(path)


def test_describe_raster_truncated_file_raises(tmp_path: Path):
    """A GeoTIFF cut in half is a FetchError naming corruption or truncation."""
    rng = np.random.default_rng(0)
    data = rng.integers(1, 255, (3, 512, 512), dtype=np.uint8)
    path = _write(tmp_path / "t.tif", data, from_origin(*ORIGIN, 2, 2))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(FetchError, match="corrupt or truncated"):
        describe_raster(path)


def test_describe_raster_without_crs_raises(tmp_path: Path):
    """A raster without a CRS is a FetchError suggesting gdal_translate -a_srs."""
    path = _write(tmp_path / "nocrs.tif", np.ones((1, 16, 16), np.uint8),
                  from_origin(*ORIGIN, 2, 2), crs=None)
    with pytest.raises(FetchError, match="no coordinate reference system.*-a_srs"):
        describe_raster(path)


def test_describe_raster_rotated_transform_raises(tmp_path: Path):
    """A rotated geotransform is a FetchError that says so."""
    transform = from_origin(*ORIGIN, 2, 2) @ Affine.rotation(10)
    path = _write(tmp_path / "rot.tif", np.ones((1, 16, 16), np.uint8), transform)
    with pytest.raises(FetchError, match="rotated or sheared"):
        describe_raster(path)


def test_describe_raster_directory_raises(tmp_path: Path):
    """A directory is a FetchError, not a GDAL traceback."""
    with pytest.raises(FetchError, match="is a directory"):
        describe_raster(tmp_path)


def test_read_to_grid_unknown_resampling_raises(tmp_path: Path):
    """An unknown resampling name is a ConfigError listing the valid ones."""
    path = _utm_scene(tmp_path / "s_2017-03-02.tif")
    with pytest.raises(ConfigError, match="bilinear"):
        read_to_grid(path, _plan(600200, 4799200, 600700, 4799700), role="before",
                     resampling="bicubic-ish")


# --- reading only what is needed ------------------------------------------------------------


def test_read_to_grid_small_aoi_decodes_only_its_blocks(tmp_path: Path):
    """With every other tile corrupted, a small AOI in one tile still reads; a far one fails."""
    rng = np.random.default_rng(1)
    data = rng.integers(1, 255, (3, 2048, 2048), dtype=np.uint8)
    path = _write(tmp_path / "big_2017-03-02.tif", data, from_origin(*ORIGIN, 2, 2))
    raw = bytearray(path.read_bytes())
    with rasterio.open(path) as src:
        for row in range(8):
            for col in range(8):
                if (row, col) in ((0, 0), (7, 7)):  # keep the first tile and the probed last
                    continue
                offset = int(src.get_tag_item(f"BLOCK_OFFSET_{col}_{row}", "TIFF", bidx=1))
                size = int(src.get_tag_item(f"BLOCK_SIZE_{col}_{row}", "TIFF", bidx=1))
                raw[offset:offset + size] = b"\xff" * size
    path.write_bytes(bytes(raw))
    # Inside tile (0, 0) (the first 512 m); the first pixel centre is on source pixel (11, 11).
    small = GridPlan(UTM, (600021.0, 4799599.0, 600401.0, 4799979.0), 4.0)
    da, _ = read_to_grid(path, small, role="before", resampling="nearest")
    assert_array_equal(da.values[:, 0, 0], data[:, 11, 11])
    with pytest.raises(FetchError, match="corrupt or truncated"):
        read_to_grid(path, _plan(601500, 4798500, 601900, 4798900), role="before")


# --- dates ----------------------------------------------------------------------------------


def test_acquisition_date_from_filename():
    """The first valid date in the file name is used, skipping impossible ones."""
    assert acquisition_date("x/dabancheng_2017-03-02.tif", {}) == (date(2017, 3, 2), "filename")
    assert acquisition_date("S2_20171302_20180115.tif", {}) == (date(2018, 1, 15), "filename")
    assert acquisition_date("scene_19650101_v2.tif", {}) == (None, None)
    assert acquisition_date("scene_123420170302.tif", {}) == (None, None)


def test_acquisition_date_from_tags():
    """An acquisition tag (any case) wins over nothing and reports 'metadata'."""
    tags = {"acquisition_date": "2016-07-04T05:06:07Z"}
    assert acquisition_date("scene.tif", tags) == (date(2016, 7, 4), "metadata")


def test_acquisition_date_tiff_datetime_warns():
    """TIFFTAG_DATETIME is used only as a last resort, with a ProvenanceWarning."""
    with pytest.warns(ProvenanceWarning, match="creation time"):
        found = acquisition_date("scene.tif", {"TIFFTAG_DATETIME": "2015:06:01 10:00:00"})
    assert found == (date(2015, 6, 1), "metadata")


def test_acquisition_date_metadata_filename_conflict_warns():
    """Disagreeing metadata and file name dates raise a ProvenanceWarning."""
    with pytest.warns(ProvenanceWarning, match="file name 2017-03-02"):
        found = acquisition_date("a_2017-03-02.tif", {"DATE_ACQUIRED": "2017-03-05"})
    assert found == (date(2017, 3, 5), "metadata")


def test_read_to_grid_date_sources(tmp_path: Path):
    """User date beats the file name; a tag is read from the file; sources are recorded."""
    plan = _plan(600200, 4799200, 600700, 4799700)
    named = _utm_scene(tmp_path / "s_2017-03-02.tif")
    _, ref = read_to_grid(named, plan, role="before")
    assert (ref.acquired, ref.date_source) == (date(2017, 3, 2), "filename")
    _, ref = read_to_grid(named, plan, role="before", acquired=date(2017, 3, 1))
    assert (ref.acquired, ref.date_source) == (date(2017, 3, 1), "user")
    tagged = _utm_scene(tmp_path / "tagged.tif")
    with rasterio.open(tagged, "r+") as dst:
        dst.update_tags(ACQUISITION_DATE="2016-05-06")
    _, ref = read_to_grid(tagged, plan, role="after")
    assert (ref.acquired, ref.date_source) == (date(2016, 5, 6), "metadata")


@pytest.mark.parametrize(("role", "flag"), [("before", "--before-date"), ("after", "--after-date")])
def test_read_to_grid_missing_date_names_flag(tmp_path: Path, role: str, flag: str):
    """Without any date the FetchError tells the user which flag to pass, in YYYY-MM-DD."""
    path = _utm_scene(tmp_path / "undated.tif")
    with pytest.raises(FetchError, match=f"Pass {flag} in YYYY-MM-DD form"):
        read_to_grid(path, _plan(600200, 4799200, 600700, 4799700), role=role)


# --- dask, provenance, metadata -------------------------------------------------------------


def test_read_to_grid_dask_equals_numpy(tmp_path: Path):
    """The chunked Dask path gives exactly the NumPy path's values (NaN where NaN)."""
    # Downsampling 1.1 m -> 1.5 m with bilinear: GDAL's kernel depends on the request window,
    # which is what the fixed warp tiles must neutralise. Partial overlap gives NaN edges.
    plan = _plan(599700, 4799000, 600800, 4800100, res=1.5)
    path = _lonlat_scene(tmp_path / "geo_2018-10-11.tif")
    eager, _ = read_to_grid(path, plan, role="after")
    lazy, _ = read_to_grid(path, plan, role="after", chunks=300)
    assert isinstance(lazy.data, dask.array.Array) and lazy.data.chunks[1] == (512, 222)
    assert np.isnan(eager.values).any() and not np.isnan(eager.values).all()
    assert_array_equal(lazy.values, eager.values)
    graph_bytes = len(pickle.dumps(dict(lazy.data.__dask_graph__())))
    assert graph_bytes < 200_000  # tasks carry windows, not pixels


def test_read_to_grid_sourceref_provenance(tmp_path: Path):
    """The SourceRef records the absolute path, file SHA-256, CRS, resolution and bands."""
    path = _utm_scene(tmp_path / "s_2017-03-02.tif")
    _, ref = read_to_grid(path, _plan(600200, 4799200, 600700, 4799700), role="before")
    assert ref.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert ref.provider == "local" and ref.item_id == "s_2017-03-02.tif"
    assert ref.path == str(path.resolve()) and ref.url is None
    assert ref.crs == UTM and ref.res_m == 2.0
    assert ref.extra == {"bands": 2, "dtype": "uint8", "nodata": 0.0}


def test_describe_raster_geographic_resolution_in_metres(tmp_path: Path):
    """A 1e-5 degree raster at 43 N has a nominal pixel of about 1.11 m (the north-south side)."""
    info = describe_raster(_lonlat_scene(tmp_path / "geo.tif"))
    assert info.crs == "EPSG:4326" and info.res_m == pytest.approx(1.11, abs=0.01)
    assert info.bounds_lonlat == pytest.approx(info.bounds)


def test_common_resolution_is_coarsest(tmp_path: Path):
    """The common resolution is the coarsest input, rounded to a millimetre."""
    geo = describe_raster(_lonlat_scene(tmp_path / "geo.tif"))
    utm = describe_raster(_utm_scene(tmp_path / "utm.tif", res=2.5))
    assert common_resolution([geo, utm]) == 2.5
    assert common_resolution([geo]) == round(geo.res_m, 3)


# --- real data ------------------------------------------------------------------------------


def test_read_to_grid_real_dabancheng_partial_overlap():
    """The Dabancheng AOI (2 km radius) at 3.5 m reads with NaN rows beyond the image."""
    from pipeline.aoi import parse_aoi, plan_grid

    path = REAL_DATA / "dabancheng_2017-03-02.tif"
    if not path.is_file():
        pytest.skip(f"real data not found at {path}")
    plan = plan_grid(parse_aoi("88.28994,43.38385", radius_m=2000), 3.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProvenanceWarning)
        da, ref = read_to_grid(path, plan, role="before")
    empty_rows = np.isnan(da.values).all(axis=(0, 2))
    assert empty_rows[0] and empty_rows[-1] and not empty_rows.all()
    assert (ref.acquired, ref.date_source) == (date(2017, 3, 2), "filename")
    assert da.shape == (3, 1162, 1162) and np.nanmax(da.values) <= 255


# --- direct reads of sources already on the grid ----------------------------------------------


def _on_grid_scene(path: Path) -> Path:
    """3-band uint8 UTM image at 2 m: random values (zeros in some bands), a nodata block."""
    rng = np.random.default_rng(4)
    data = rng.integers(0, 256, (3, 300, 280), dtype=np.uint8)
    data[0, 10:20, 10:20] = 0  # 0 in one band only: valid (the warper's unified nodata)
    data[:, 50:60, 50:70] = 0  # 0 in every band: nodata
    return _write(path, data, from_origin(*ORIGIN, 2, 2))


@pytest.mark.parametrize("resampling", ["bilinear", "nearest", "cubic", "average"])
@pytest.mark.parametrize("chunks", [None, 512])
def test_read_to_grid_on_grid_source_equals_warper(tmp_path: Path, monkeypatch, resampling,
                                                   chunks):
    """A source on the plan's pixel grid is read directly, with exactly the warper's values."""
    import pipeline.fetch.local as local

    path = _on_grid_scene(tmp_path / "s_2017-03-02.tif")
    # whole-pixel offset, and beyond the image on the west and south (boundless there)
    plan = GridPlan(UTM, (599960.0, 4799380.0, 600500.0, 4799980.0), 2.0)
    warped_tiles = []
    original = local.warp_tile
    monkeypatch.setattr(local, "warp_tile",
                        lambda *a: warped_tiles.append(a[-1]) or original(*a))
    direct = read_to_grid(path, plan, role="before", resampling=resampling,
                          chunks=chunks)[0].values
    assert not warped_tiles  # read without the warper
    monkeypatch.setattr(local, "grid_offset", lambda src, plan: None)
    warped = read_to_grid(path, plan, role="before", resampling=resampling,
                          chunks=chunks)[0].values
    assert warped_tiles
    assert np.isnan(direct).any() and not np.isnan(direct).all()
    assert_array_equal(direct, warped)


def test_read_to_grid_direct_only_when_on_grid(tmp_path: Path):
    """Fractional offsets, other resolutions, other CRSs and alpha bands use the warper."""
    import pipeline.fetch.local as local

    path = _on_grid_scene(tmp_path / "s_2017-03-02.tif")
    with rasterio.open(path) as src:
        assert local.grid_offset(src, GridPlan(UTM, (600020.0, 4799400.0, 600400.0,
                                                      4799980.0), 2.0)) == (10, 10)
        assert local.grid_offset(src, GridPlan(UTM, (600021.0, 4799401.0, 600401.0,
                                                      4799981.0), 2.0)) is None
        assert local.grid_offset(src, GridPlan(UTM, (600020.0, 4799400.0, 600400.0,
                                                      4799980.0), 4.0)) is None
        assert local.grid_offset(src, GridPlan("EPSG:32644", (600020.0, 4799400.0,
                                                               600400.0, 4799980.0), 2.0)) is None
    data = np.full((4, 64, 64), 90, np.uint8)
    rgba = _write(tmp_path / "rgba_2017-03-02.tif", data, from_origin(*ORIGIN, 2, 2),
                  nodata=None, photometric="RGB", alpha="YES")
    with rasterio.open(rgba) as src:
        assert local.grid_offset(src, GridPlan(UTM, (600000.0, 4799900.0, 600100.0,
                                                      4800000.0), 2.0)) is None


def test_chunk_origin_puts_lazy_chunk_borders_on_source_tiles(tmp_path: Path):
    """Files on the plan's grid with their tiles lined up: the lazy read's chunk borders fall
    on tile borders (each tile decoded by one task), with the same values; the plan's own
    chunk grid when a file needs the warper or the files' tiles do not line up."""
    import pipeline.fetch.local as local

    rng = np.random.default_rng(5)
    data = rng.integers(1, 256, (3, 1100, 1000), dtype=np.uint8)
    a = _write(tmp_path / "a_2017-03-02.tif", data, from_origin(*ORIGIN, 2, 2))  # 256 px tiles
    b = _write(tmp_path / "b_2018-10-11.tif", data[::-1].copy(), from_origin(*ORIGIN, 2, 2),
               block=512)
    # the plan starts 40 columns west and 30 rows north of the images (NaN there)
    plan = GridPlan(UTM, (ORIGIN[0] - 80, ORIGIN[1] - 2200, ORIGIN[0] + 1920, ORIGIN[1] + 60), 2.0)
    origin = local.chunk_origin([str(a), str(b)], plan, 512)
    assert origin == (30, 40)
    eager, _ = read_to_grid(a, plan, role="before")
    lazy, _ = read_to_grid(a, plan, role="before", chunks=512, chunk_origin=origin)
    assert lazy.data.chunks[1:] == ((542, 512, 76), (552, 448))
    for cuts, o in zip(lazy.data.chunks[1:], origin, strict=True):
        assert all((border - o) % 256 == 0 for border in np.cumsum(cuts)[:-1])
    assert np.isnan(eager.values).any()
    assert_array_equal(lazy.values, eager.values)

    coarse = _write(tmp_path / "c_2018-10-11.tif", data[:, ::2, ::2].copy(),
                    from_origin(*ORIGIN, 4, 4))  # needs the warper on a 2 m plan
    shifted = _write(tmp_path / "d_2018-10-11.tif", data, from_origin(ORIGIN[0] + 20, ORIGIN[1],
                                                                      2, 2))
    assert local.chunk_origin([str(a), str(coarse)], plan, 512) == (0, 0)
    assert local.chunk_origin([str(a), str(shifted)], plan, 512) == (0, 0)
    warped, _ = read_to_grid(coarse, plan, role="after", chunks=512, chunk_origin=origin)
    assert warped.data.chunks[1:] == ((512, 512, 106), (512, 488))  # the warper's tile grid


@pytest.mark.parametrize("chunks", [None, 512])
def test_read_to_grid_infinite_float_pixels_are_nan_integer_sources_skip_the_pass(
        tmp_path: Path, monkeypatch, chunks):
    """+-Inf in a float source reads as NaN; an integer source (never Inf) skips that pass."""
    import pipeline.fetch.local as local

    data = np.full((2, 64, 64), 7.5, np.float32)
    data[0, 3, 4], data[1, 5, 6] = np.inf, -np.inf
    path = _write(tmp_path / "f_2017-03-02.tif", data, from_origin(*ORIGIN, 2, 2), nodata=None)
    plan = GridPlan(UTM, (600000.0, 4799872.0, 600128.0, 4800000.0), 2.0)
    calls = []
    original = local.inf_to_nan
    monkeypatch.setattr(local, "inf_to_nan", lambda out: calls.append(1) or original(out))
    values = read_to_grid(path, plan, role="before", chunks=chunks)[0].values
    assert np.isnan(values[0, 3, 4]) and np.isnan(values[1, 5, 6])
    assert np.isfinite(values).sum() == values.size - 2 and calls
    calls.clear()
    ints = _on_grid_scene(tmp_path / "s_2017-03-02.tif")
    read_to_grid(ints, plan, role="before", chunks=chunks)[0].compute()
    assert not calls
