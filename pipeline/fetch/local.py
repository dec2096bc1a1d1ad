"""pipeline.fetch.local: read local GeoTIFF/COG files onto the working grid with provenance.

A read goes through GDAL's warper (a ``WarpedVRT`` on the plan's grid), so a source in any
CRS and resolution lands on the same pixels, and only the source blocks under the grid are
decoded. Source nodata, masks, alpha and pixels outside the source footprint all become NaN;
the warper leaves invalid source pixels out of the resampling kernel, so edges are not blended.
A source already on the plan's pixel grid (same CRS and resolution, whole-pixel offset, no
mask beyond a nodata value) is read directly instead, with the warper's values: no resampling
happens there, and the warper is several times slower.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

import dask
import dask.array
import numpy as np
import rasterio
import rioxarray  # noqa: F401  (registers the .rio accessor)
import shapely
import xarray as xr
from pyproj import Geod, Transformer
from pyproj.exceptions import ProjError
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.errors import CRSError, RasterioIOError, WarpOperationError
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from rasterio.windows import Window
from shapely.geometry import box

from pipeline.errors import ConfigError, FetchError, GridError, NoValidDataError, ProvenanceWarning
from pipeline.files import is_utf8, sha256_file
from pipeline.model import GridPlan, SourceRef

__all__ = ["RasterInfo", "describe_raster", "acquisition_date", "read_to_grid", "common_resolution",
           "grid_chunks", "chunk_origin", "CHUNK_PX", "CHUNKED_MIN_PX", "WARP_TILE_PX",
           "READ_ERRORS",
           # the building blocks of read_to_grid, shared with readers that must give its
           # values window by window (report.chipread, fetch.xyz)
           "inspect_raster", "resampling_method", "read_window", "grid_offset", "read_direct",
           "warp_tile", "inf_to_nan", "corrupt_message"]

log = logging.getLogger(__name__)

WARP_RESAMPLING = ("nearest", "bilinear", "cubic", "cubic_spline", "lanczos", "average", "mode",
                   "max", "min", "med", "q1", "q3", "sum", "rms")
# Explicit acquisition tags, then (after the file name) TIFF's DateTime, which the TIFF spec
# defines as the file's creation time: often a processing or export date, not the sensing date.
_ACQUISITION_TAGS = ("ACQUISITION_DATE", "DATE_ACQUIRED", "ACQUISITIONDATETIME", "DATETIME")
_CREATION_TAG = "TIFFTAG_DATETIME"
_TAG_DATE = re.compile(r"\s*(\d{4})([-:/_]?)(\d{2})\2(\d{2})(?!\d)")
_NAME_DATE = re.compile(r"(?<!\d)(\d{4})([-_]?)(\d{2})\2(\d{2})(?!\d)")
_EARLIEST = date(1970, 1, 1)
# GDAL adapts its resampling kernel to each warp request's source window (scale when
# downsampling, approximate transformer), so a pixel's value depends on the request it falls
# in. Every read is therefore made of the same fixed tiles of the plan, each warped through
# its own VRT: values are identical whatever the Dask chunking, and reproducible.
WARP_TILE_PX = 512
# Grids above CHUNKED_MIN_PX pixels are read lazily in CHUNK_PX chunks (a multiple of
# WARP_TILE_PX), so memory stays bounded whatever the AOI size; smaller ones are read whole.
CHUNK_PX = 2048
CHUNKED_MIN_PX = 4096 * 4096
# rasterio rejects tolerance=0; a tiny one makes GDAL transform (almost) every pixel exactly.
_WARP_TOLERANCE_PX = 1e-6
# A source whose pixel grid is within this many pixels of the plan's is read without the warper.
_ALIGNED_TOLERANCE_PX = 1e-6
_PROBE_MAX_PX = 4096 * 4096
# what a pixel read of a corrupt or truncated file raises (turn it into corrupt_message)
READ_ERRORS = (RasterioIOError, WarpOperationError)
_GEOD = Geod(ellps="WGS84")


@dataclass(frozen=True)
class RasterInfo:
    """What a raster file holds, read from its header.

    ``crs`` is an authority string (``"EPSG:32645"``) or WKT; ``res_m`` the nominal (coarsest
    axis) pixel size in metres, measured at the raster centre for a geographic CRS; ``bounds``
    is in ``crs``; ``count`` counts all bands including alpha.
    """

    path: str
    crs: str
    res_m: float
    bounds: tuple[float, float, float, float]
    bounds_lonlat: tuple[float, float, float, float]
    width: int
    height: int
    count: int
    dtype: str
    nodata: float | None
    tags: dict[str, str] = field(default_factory=dict, compare=False, hash=False)


def describe_raster(path: str | Path) -> RasterInfo:
    """Read a raster's header, and probe its first and last blocks.

    Parameters
    ----------
    path
        A GeoTIFF/COG (anything GDAL reads with a north-up geotransform and a CRS).

    Returns
    -------
    RasterInfo

    Raises
    ------
    FetchError
        Missing, not a raster, corrupt or truncated, no CRS, rotated/sheared, or zero-size.
    """
    return inspect_raster(path)[0]


def acquisition_date(path: str | Path, tags: dict[str, str]) -> tuple[date | None, str | None]:
    """Find the acquisition date of an image.

    Looked for, in order: the tags ``ACQUISITION_DATE``, ``DATE_ACQUIRED``,
    ``ACQUISITIONDATETIME``, ``datetime`` (any case); the first valid ``YYYY-MM-DD`` or
    ``YYYYMMDD`` in the file name; then ``TIFFTAG_DATETIME``, with a ``ProvenanceWarning``
    because TIFF defines it as the file's creation time. Dates must lie in 1970..today.

    Returns
    -------
    tuple
        ``(date, "metadata" | "filename")``, or ``(None, None)`` when nothing is found.
    """
    upper = {str(k).upper(): str(v) for k, v in tags.items()}
    from_tags = [d for k in _ACQUISITION_TAGS if (d := _parse_date(_TAG_DATE, upper.get(k)))]
    from_name = _parse_date(_NAME_DATE, Path(path).name, search=True)
    if from_tags and from_name and from_tags[0] != from_name:
        _warn(f"{path}: metadata gives acquisition date {from_tags[0]}, the file name {from_name}; "
              "using the metadata.")
    if from_tags:
        return from_tags[0], "metadata"
    if from_name:
        return from_name, "filename"
    created = _parse_date(_TAG_DATE, upper.get(_CREATION_TAG))
    if created is None:
        return None, None
    _warn(f"{path}: taking TIFFTAG_DATETIME {created} as the acquisition date, but TIFF defines "
          "it as the file's creation time, which may be a processing date.")
    return created, "metadata"


def read_to_grid(
    path: str | Path,
    plan: GridPlan,
    *,
    role: str,
    acquired: date | None = None,
    resampling: str = "bilinear",
    chunks: int | None = None,
    check_nodata: bool = True,
    chunk_origin: tuple[int, int] = (0, 0),
) -> tuple[xr.DataArray, SourceRef]:
    """Warp a local raster onto the plan's grid (or read it directly when already on it).

    Parameters
    ----------
    path
        GeoTIFF/COG in any CRS and resolution; it may cover the plan only in part.
    plan
        The working grid.
    role
        ``"before"`` or ``"after"``; used in messages and attrs.
    acquired
        Acquisition date given by the user; wins over metadata and file name.
    resampling
        GDAL warp resampling name (see ``WARP_RESAMPLING``).
    chunks
        Chunk size in pixels for a lazy Dask array whose tasks each open the file and warp
        their own window, rounded up to a multiple of ``WARP_TILE_PX``; ``None`` reads eagerly
        into NumPy. Both give identical values.
    check_nodata
        Raise when every pixel under the plan is nodata. For a lazy read this reads the whole
        window once more; pass False when the caller checks validity on its own pass.
    chunk_origin
        ``(row, col)`` of the lazy read's chunk grid (from :func:`chunk_origin`): the chunk
        borders fall at ``origin + k * chunks``, the first chunk taking the rows or columns
        before them. Used only when the file is read without the warper (warped reads keep
        their tiles' grid); the values are the same either way.

    Returns
    -------
    tuple
        ``(da, ref)``: ``da`` has dims ``("band", "y", "x")``, float32, NaN = nodata (source
        nodata, masks, alpha and outside the footprint), x/y at pixel centres, band 1..n (alpha
        excluded), rioxarray CRS and transform of the plan, attrs ``role``, ``source_path``,
        ``acquired``; ``ref`` is the ``SourceRef`` with the file's SHA-256.

    Raises
    ------
    FetchError
        The file cannot be read, or its acquisition date is unknown.
    NoValidDataError
        The plan lies outside the image, or every pixel under it is nodata (unless
        ``check_nodata`` is False).
    ConfigError
        Unknown ``resampling`` or bad ``chunks``.
    """
    method = resampling_method(resampling)
    if chunks is not None and (type(chunks) is not int or chunks < 1):
        raise ConfigError(f"chunks must be a positive number of pixels or None, got {chunks!r}.")
    info, bands = inspect_raster(path)
    when, date_source = _resolve_date(info, acquired, role)
    if not _overlaps(info, plan):
        raise NoValidDataError(_no_data_message(info, plan, role, outside=True))
    data: np.ndarray | dask.array.Array
    if chunks is None:
        data = read_window(info.path, plan, method, bands, (0, 0, plan.width, plan.height))
        has_data = not bool(np.isnan(data).all())
    else:
        # a warped read keeps its tiles' grid: the origin is for files read directly
        direct = _tile_origin(info.path, plan, chunks) is not None
        origin = chunk_origin if direct else (0, 0)
        data = _read_lazy(info.path, plan, method, bands, chunks, origin)
        # Reads the window once more, but the user gets the error now, not mid-computation.
        has_data = not check_nodata or not bool(dask.array.isnan(data).all().compute())
    if not has_data:
        raise NoValidDataError(_no_data_message(info, plan, role, outside=False))
    da = _to_dataarray(data, plan, role, info.path, when)
    extra = {"bands": len(bands), "dtype": info.dtype, "nodata": _json_nodata(info.nodata)}
    ref = SourceRef(provider="local", item_id=Path(info.path).name, acquired=when,
                    path=info.path, url=None, sha256=sha256_file(info.path), crs=info.crs,
                    res_m=info.res_m, date_source=date_source, extra=extra)
    log.info("Read %s image %s onto %s grid %dx%d at %g m", role, ref.item_id, plan.crs,
             plan.width, plan.height, plan.res_m)
    return da, ref


def grid_chunks(plan: GridPlan) -> int | None:
    """``chunks`` for reading ``plan``: ``CHUNK_PX`` above ``CHUNKED_MIN_PX`` pixels, else None.

    Small grids are fastest in memory; large ones must be chunked for memory to stay bounded.
    """
    return CHUNK_PX if plan.width * plan.height > CHUNKED_MIN_PX else None


def chunk_origin(paths: Sequence[str | Path], plan: GridPlan, chunks: int) -> tuple[int, int]:
    """``(row, col)`` for `read_to_grid`'s ``chunk_origin``: chunk borders on the files' tiles.

    When every file is read without the warper (`grid_offset`) and their tiles line up on
    the plan, a lazy read whose chunk borders fall on tile borders decodes each tile once;
    otherwise the tiles along each border are decoded by both chunks (measured on the 8192
    px bench pair, offset 125 and 127 px from its 512 px tiles: 1.6 CPU s to read a date in
    2048 px chunks, 1.2 s aligned). ``(0, 0)`` (the plan's own chunk grid) when a file needs
    the warper, cannot be opened, or the files' tiles do not line up with each other.
    """
    step = -(-chunks // WARP_TILE_PX) * WARP_TILE_PX
    origins = {_tile_origin(str(path), plan, step) for path in paths}
    found = origins.pop() if len(origins) == 1 else None
    return found if found is not None else (0, 0)


def _tile_origin(path: str, plan: GridPlan, step: int) -> tuple[int, int] | None:
    """``(row, col)`` of the first tile border of ``path`` on the plan (an axis whose tile
    size does not divide ``step`` gives 0); None when the file needs the warper or cannot
    be opened."""
    try:
        with rasterio.open(path) as src:
            offset = grid_offset(src, plan)
            block_rows, block_cols = src.block_shapes[0]
    except READ_ERRORS:
        return None
    if offset is None:
        return None
    row, col = ((-o) % b if step % b == 0 else 0
                for o, b in ((offset[1], block_rows), (offset[0], block_cols)))
    return row, col


def common_resolution(infos: list[RasterInfo]) -> float:
    """Return the coarsest nominal resolution of the inputs in metres, rounded to a millimetre.

    Raises
    ------
    GridError
        If ``infos`` is empty.
    """
    if not infos:
        raise GridError("common_resolution needs at least one raster; got none.")
    return round(max(info.res_m for info in infos), 3)


def inspect_raster(path: str | Path) -> tuple[RasterInfo, list[int]]:
    """Open, validate and describe a raster; also return its data (non-alpha) band indexes.

    Parameters
    ----------
    path
        A GeoTIFF/COG.

    Returns
    -------
    tuple
        ``(info, bands)``: the :class:`RasterInfo` of :func:`describe_raster` and the 1-based
        indexes of the bands read_to_grid reads (all but alpha).

    Raises
    ------
    FetchError
        As :func:`describe_raster`, or the file holds only an alpha band.
    """
    src_path = _existing_file(path)
    try:
        src = rasterio.open(src_path)
    except RasterioIOError as e:
        raise FetchError(
            f"{src_path} is not a raster GDAL can read (GeoTIFF/COG expected): {e}"
        ) from e
    with src:
        _check_georeferencing(src, src_path)
        left, bottom, right, top = src.bounds  # min/max: a south-up raster has bottom > top
        bounds = (min(left, right), min(bottom, top), max(left, right), max(bottom, top))
        try:
            lonlat = tuple(transform_bounds(src.crs, "EPSG:4326", *bounds, densify_pts=21))
            epsg, auth = src.crs.to_epsg(), src.crs.to_authority()
        except (CRSError, ProjError) as e:
            raise FetchError(f"{src_path}: its CRS cannot be transformed to lon/lat: {e}") from e
        crs = f"EPSG:{epsg}" if epsg else f"{auth[0]}:{auth[1]}" if auth else src.crs.to_wkt()
        # GDAL's IMAGERY domain holds the acquisition time of some formats.
        tags = {**src.tags(ns="IMAGERY"), **src.tags()}
        res_m = _nominal_res_m(src, bounds, src_path)
        info = RasterInfo(str(src_path), crs, res_m, bounds, lonlat, src.width, src.height,
                          src.count, src.dtypes[0], src.nodata, tags)
        bands = [i for i, c in zip(src.indexes, src.colorinterp, strict=True)
                 if c != ColorInterp.alpha]
        _probe(src, src_path)
    if not bands:
        raise FetchError(f"{src_path} holds only an alpha band; no image data to read.")
    return info, bands


def _existing_file(path: str | Path) -> Path:
    """Absolute path of an existing regular file, else FetchError."""
    src_path = Path(path).expanduser()
    try:
        exists, is_dir, is_file = src_path.exists(), src_path.is_dir(), src_path.is_file()
    except OSError as e:  # e.g. a name too long for the file system
        raise FetchError(f"Raster path {str(path)[:200]!r} cannot be checked: {e}") from e
    if not exists:
        raise FetchError(f"Raster {src_path} does not exist; check the path.")
    if is_dir:
        raise FetchError(f"Raster {src_path} is a directory; give the path of a GeoTIFF.")
    if not is_file:  # a fifo or device: GDAL would block on it or read it without end
        raise FetchError(f"Raster {src_path} is not a regular file (a pipe, device or socket); "
                         "give the path of a GeoTIFF file.")
    resolved = src_path.resolve()
    if not is_utf8(str(resolved)):
        raise FetchError(f"Raster path {str(resolved)!r} is not UTF-8 (GDAL cannot open it); "
                         "rename the file or the folders on its path to UTF-8 (e.g. ASCII) "
                         "names.")
    return resolved


def _check_georeferencing(src: Any, path: Path) -> None:
    """Reject rasters without pixels, CRS or a north-up geotransform."""
    if src.width == 0 or src.height == 0 or src.count == 0:
        raise FetchError(f"{path} has no pixels ({src.width} x {src.height}, {src.count} bands).")
    if "complex" in src.dtypes[0]:  # complex64/128 and GDAL's complex_int16
        raise FetchError(f"{path} holds complex pixels ({src.dtypes[0]}, e.g. SAR); Sitewatch "
                         "reads optical brightness. Convert it to a real band first, e.g. the "
                         "amplitude with gdal_calc --calc 'abs(A)' --type Float32.")
    if src.crs is None:
        how = ("it has only ground control points; warp it first, e.g. gdalwarp -t_srs EPSG:32645"
               if src.gcps[0] else "georeference it first, e.g. gdal_translate -a_srs EPSG:32645")
        raise FetchError(f"{path} has no coordinate reference system; {how} in.tif out.tif.")
    t = src.transform
    if t.b != 0 or t.d != 0:
        raise FetchError(
            f"{path} has a rotated or sheared geotransform {tuple(t)[:6]}; Sitewatch needs a "
            "north-up grid: warp it first, e.g. gdalwarp in.tif out.tif."
        )
    if t.is_identity:
        raise FetchError(f"{path} has a CRS but no geotransform; georeference it first.")


def _nominal_res_m(src: Any, bounds: tuple[float, ...], path: Path) -> float:
    """Coarser of the two pixel sides in metres (geodesic at the centre if geographic)."""
    xres, yres = abs(src.transform.a), abs(src.transform.e)
    if src.crs.is_geographic:
        cx, cy = (bounds[0] + bounds[2]) / 2, min(max((bounds[1] + bounds[3]) / 2, -89.0), 89.0)
        dx = _GEOD.inv(cx - xres / 2, cy, cx + xres / 2, cy)[2]
        dy = _GEOD.inv(cx, cy - yres / 2, cx, cy + yres / 2)[2]
        return float(max(dx, dy))
    try:
        return float(max(xres, yres) * src.crs.linear_units_factor[1])
    except CRSError as e:
        raise FetchError(f"{path}: the linear unit of its CRS is unknown: {e}") from e


def _probe(src: Any, path: Path) -> None:
    """Decode the first and the last block, which catches most truncated or corrupt files."""
    block_h, block_w = src.block_shapes[0]
    if block_h * block_w > _PROBE_MAX_PX:
        return
    last_row = (src.height - 1) // block_h * block_h
    last_col = (src.width - 1) // block_w * block_w
    try:
        src.read(1, window=Window(0, 0, min(block_w, src.width), min(block_h, src.height)))
        src.read(src.count, window=Window(last_col, last_row, src.width - last_col,
                                          src.height - last_row))
    except READ_ERRORS as e:
        raise FetchError(corrupt_message(path, e)) from e


def corrupt_message(path: str | Path, e: Exception) -> str:
    """The FetchError text for a pixel read of ``path`` that raised ``e`` (a READ_ERRORS)."""
    cause = f" ({e.__cause__})" if e.__cause__ else ""
    return (f"{path} could not be read: {e}{cause}. The file is probably corrupt or truncated; "
            "download or export it again (and check its SHA-256).")


def _parse_date(pattern: re.Pattern[str], text: str | None, *, search: bool = False) -> date | None:
    """First date matched by ``pattern`` in ``text`` that is real and within 1970..today."""
    if not text:
        return None
    matches = pattern.finditer(text) if search else [m for m in [pattern.match(text)] if m]
    for match in matches:
        try:
            found = date(int(match.group(1)), int(match.group(3)), int(match.group(4)))
        except ValueError:
            continue
        if _EARLIEST <= found <= date.today():
            return found
    return None


def _resolve_date(info: RasterInfo, acquired: date | None, role: str) -> tuple[date, str]:
    """The user's date, else the file's, else FetchError naming the CLI flag to pass."""
    if acquired is not None:
        if not isinstance(acquired, date):
            raise ConfigError(f"acquired must be a date, got {acquired!r}.")
        return (acquired.date() if isinstance(acquired, datetime) else acquired), "user"
    when, source = acquisition_date(info.path, info.tags)
    if when is None or source is None:
        flag = f"--{role}-date" if role in ("before", "after") else "--before-date/--after-date"
        raise FetchError(
            f"The acquisition date of the {role} image {info.path} is unknown: no date in its "
            "metadata (ACQUISITION_DATE, DATE_ACQUIRED, TIFFTAG_DATETIME) or its file name. "
            f"Pass {flag} in YYYY-MM-DD form (e.g. {flag} 2017-03-02)."
        )
    return when, source


def resampling_method(name: str) -> Resampling:
    """Resampling enum for a GDAL warp method name (one of ``WARP_RESAMPLING``).

    Raises
    ------
    ConfigError
        The name is not one of ``WARP_RESAMPLING``.
    """
    if name not in WARP_RESAMPLING:
        known = ", ".join(WARP_RESAMPLING)
        raise ConfigError(f"Resampling {name!r} is not known; use one of {known}.")
    return Resampling[name]


def read_window(
    path: str, plan: GridPlan, method: Resampling, bands: list[int], window: tuple[int, ...]
) -> np.ndarray:
    """Read a ``(col, row, width, height)`` window of the plan: directly, or warped tile by tile.

    Opens ``path`` for this window only. Warped windows must be tile-aligned
    (``WARP_TILE_PX``). ``bands`` are 1-based indexes (from :func:`inspect_raster`).

    Returns
    -------
    numpy.ndarray
        ``(band, height, width)`` float32, NaN = nodata: read_to_grid's values there.

    Raises
    ------
    FetchError
        The file cannot be decoded there.
    """
    col0, row0, width, height = window
    try:
        with rasterio.open(path) as src:
            # integer pixels cannot be infinite: the Inf pass is for float sources only
            floats = any(np.issubdtype(np.dtype(d), np.floating) for d in src.dtypes)
            offset = grid_offset(src, plan)
            if offset is not None:
                data = read_direct(src, bands, offset, window)
                return inf_to_nan(data) if floats else data
            out = np.empty((len(bands), height, width), np.float32)
            for row in range(row0, row0 + height, WARP_TILE_PX):
                for col in range(col0, col0 + width, WARP_TILE_PX):
                    w = min(WARP_TILE_PX, col0 + width - col)
                    h = min(WARP_TILE_PX, row0 + height - row)
                    tile = warp_tile(src, plan, method, bands, Window(col, row, w, h))
                    out[:, row - row0:row - row0 + h, col - col0:col - col0 + w] = tile
    except READ_ERRORS as e:
        raise FetchError(corrupt_message(path, e)) from e
    return inf_to_nan(out) if floats else out


def inf_to_nan(out: np.ndarray) -> np.ndarray:
    """Set +-Inf to NaN in place and return ``out``: in a float source Inf is no
    measurement, so it is nodata like NaN."""
    np.copyto(out, np.float32(np.nan), where=np.isinf(out))
    return out


def grid_offset(src: Any, plan: GridPlan) -> tuple[int, int] | None:
    """``(col, row)`` of the plan's first pixel in ``src`` when both share one pixel grid.

    None when the warper is needed: another CRS or resolution, a fractional offset, a
    south-up source, or validity that is not a plain nodata value (alpha, mask bands, float
    nodata), whose handling is left to GDAL. ``src`` is an open rasterio dataset; pass the
    offset to :func:`read_direct`, else read through :func:`warp_tile`.
    """
    t = src.transform
    res = plan.res_m
    if src.crs is None or t.e >= 0 or t.a <= 0:
        return None
    if abs(t.a - res) > 1e-9 * res or abs(-t.e - res) > 1e-9 * res:
        return None
    col, row = (plan.bounds[0] - t.c) / res, (t.f - plan.bounds[3]) / res
    if max(abs(col - round(col)), abs(row - round(row))) > _ALIGNED_TOLERANCE_PX:
        return None
    flags = {tuple(f) for f in src.mask_flag_enums}
    if not flags <= {(MaskFlags.all_valid,), (MaskFlags.nodata,)}:
        return None
    if (MaskFlags.nodata,) in flags and not np.issubdtype(np.dtype(src.dtypes[0]), np.integer):
        return None
    if any(c == ColorInterp.alpha for c in src.colorinterp):
        return None
    try:
        same_crs = src.crs == CRS.from_user_input(plan.crs)
    except CRSError:
        return None
    return (round(col), round(row)) if same_crs else None


def read_direct(
    src: Any, bands: list[int], offset: tuple[int, int], window: tuple[int, ...]
) -> np.ndarray:
    """Read a plan window straight from a source on the same pixel grid; NaN off the image.

    A pixel is nodata when every band holds the nodata value: the warper's rule
    (``UNIFIED_SRC_NODATA``), so both reads give the same values.

    Parameters
    ----------
    src
        The open source dataset.
    bands
        1-based band indexes to read.
    offset
        From :func:`grid_offset` (not None).
    window
        ``(col, row, width, height)`` on the plan.

    Returns
    -------
    numpy.ndarray
        ``(band, height, width)`` float32; +-Inf of a float source is left to
        :func:`inf_to_nan`.
    """
    col0, row0, width, height = window
    c0, r0 = col0 + offset[0], row0 + offset[1]
    c_lo, r_lo = max(c0, 0), max(r0, 0)
    c_hi, r_hi = min(c0 + width, src.width), min(r0 + height, src.height)
    if c_hi <= c_lo or r_hi <= r_lo:
        return np.full((len(bands), height, width), np.nan, np.float32)
    data = src.read(indexes=bands, window=Window(c_lo, r_lo, c_hi - c_lo, r_hi - r_lo))
    rows, cols = slice(r_lo - r0, r_hi - r0), slice(c_lo - c0, c_hi - c0)
    out = np.empty((len(bands), height, width), np.float32)
    # NaN off the image only (boundless), the image's pixels written once
    out[:, :rows.start], out[:, rows.stop:] = np.nan, np.nan
    out[:, rows, :cols.start], out[:, rows, cols.stop:] = np.nan, np.nan
    part = out[:, rows, cols]
    part[...] = data
    if src.nodata is not None:
        # only data bands are read, and there is no alpha band here: they are all the bands
        nodata = data[0] == src.nodata
        for band in data[1:]:
            nodata &= band == src.nodata
        if nodata.any():
            np.copyto(part, np.float32(np.nan), where=nodata)
    return out


def warp_tile(src: Any, plan: GridPlan, method: Resampling, bands: list[int], tile: Window) -> Any:
    """Warp one tile of the plan through a fresh VRT, so its pixels never depend on earlier reads.

    ``tile`` is a window of the plan within one ``WARP_TILE_PX`` tile (read_to_grid's tiles;
    GDAL's values depend on the request's window). Returns ``(band, rows, cols)`` float32,
    NaN = nodata; +-Inf of a float source is left to :func:`inf_to_nan`.
    """
    options: dict[str, Any] = {"src_nodata": src.nodata} if src.nodata is not None else {}
    with WarpedVRT(
        src, crs=plan.crs, transform=plan.transform, width=plan.width, height=plan.height,
        resampling=method, nodata=np.nan, dtype="float32", tolerance=_WARP_TOLERANCE_PX,
        **options,
    ) as vrt:
        # The VRT's nodata is NaN, so invalid pixels read as NaN without a mask pass.
        return vrt.read(indexes=bands, window=tile)


def _read_lazy(
    path: str, plan: GridPlan, method: Resampling, bands: list[int], chunks: int,
    origin: tuple[int, int] = (0, 0),
) -> dask.array.Array:
    """Dask array of the plan whose tasks each warp their own window (nothing big in the graph).

    Chunk borders at ``origin + k * step`` along each axis (`read_to_grid`'s ``chunk_origin``).
    """
    step = -(-chunks // WARP_TILE_PX) * WARP_TILE_PX
    read = dask.delayed(read_window, pure=True)
    row_cuts, col_cuts = (_cuts(n, step, o) for n, o in zip(plan.shape, origin, strict=True))
    rows = []
    for row, row_end in zip(row_cuts[:-1], row_cuts[1:], strict=True):
        height = row_end - row
        blocks = []
        for col, col_end in zip(col_cuts[:-1], col_cuts[1:], strict=True):
            width = col_end - col
            task = read(path, plan, method, bands, (col, row, width, height))
            blocks.append(dask.array.from_delayed(task, (len(bands), height, width), np.float32))
        rows.append(blocks)
    return dask.array.block(rows)


def _cuts(n: int, step: int, origin: int) -> list[int]:
    """Chunk borders along an axis of ``n`` pixels: 0, ``origin + k * step`` (k >= 1), ``n``."""
    return [0, *range(origin % step + step, n, step), n] if n > 0 else [0]


def _to_dataarray(data: Any, plan: GridPlan, role: str, path: str, when: date) -> xr.DataArray:
    """Wrap pixels with pixel-centre coordinates and rioxarray georeferencing."""
    minx, _, _, maxy = plan.bounds
    coords = {"band": np.arange(1, data.shape[0] + 1),
              "y": maxy - (np.arange(plan.height) + 0.5) * plan.res_m,
              "x": minx + (np.arange(plan.width) + 0.5) * plan.res_m}
    attrs = {"role": role, "source_path": path, "acquired": when.isoformat()}
    da = xr.DataArray(data, dims=("band", "y", "x"), coords=coords, name=role, attrs=attrs)
    # inplace: rioxarray's default copies the whole (deep) array at each call
    da.rio.write_crs(plan.crs, inplace=True)
    da.rio.write_transform(plan.transform, inplace=True)
    return da.rio.write_nodata(np.nan, encoded=False, inplace=True)


def _overlaps(info: RasterInfo, plan: GridPlan) -> bool:
    """True if the plan's area overlaps the image footprint (True when it cannot tell)."""
    minx, miny, maxx, maxy = plan.bounds
    outline = shapely.segmentize(box(*plan.bounds), max(maxx - minx, maxy - miny) / 16)
    transformer = Transformer.from_crs(plan.crs, info.crs, always_xy=True)
    try:
        projected = shapely.transform(outline, transformer.transform, interleaved=False)
    except ProjError:
        return True
    if not np.isfinite(shapely.get_coordinates(projected)).all() or not projected.is_valid:
        return True
    return projected.intersection(box(*info.bounds)).area > 0


def _extent(bounds: tuple[float, ...], crs: str = "EPSG:4326") -> str:
    """'lon a..b, lat c..d' for messages, from bounds in ``crs``."""
    if crs != "EPSG:4326":
        bounds = transform_bounds(crs, "EPSG:4326", *bounds, densify_pts=21)
    return f"lon {bounds[0]:.5f}..{bounds[2]:.5f}, lat {bounds[1]:.5f}..{bounds[3]:.5f}"


def _no_data_message(info: RasterInfo, plan: GridPlan, role: str, *, outside: bool) -> str:
    """NoValidDataError text: AOI outside the footprint, or inside it but all nodata."""
    image, aoi = _extent(info.bounds_lonlat), _extent(plan.bounds, plan.crs)
    if outside:
        return (f"The AOI does not overlap the {role} image {info.path}: image covers {image}; "
                f"AOI covers {aoi}; choose an AOI inside the image or another image.")
    return (f"The {role} image {info.path} overlaps the AOI ({aoi}) but every pixel there is "
            f"nodata (nodata value {info.nodata}, masks or alpha); the image covers {image}. "
            "Choose an AOI over the image's valid area or another image.")


def _warn(message: str) -> None:
    """Emit a ProvenanceWarning that tells the user how to override the date."""
    warnings.warn(f"{message} Pass --before-date/--after-date to override.", ProvenanceWarning,
                  stacklevel=3)


def _json_nodata(nodata: float | None) -> float | str | None:
    """Nodata for JSON: NaN is not valid JSON, so it becomes the string 'nan'."""
    return "nan" if nodata is not None and math.isnan(nodata) else nodata
