"""pipeline.report.rasters: change rasters as Cloud-Optimized GeoTIFFs.

GDAL's COG driver only supports ``CreateCopy``, so the array is first written to a plain tiled
GeoTIFF in a private temporary folder beside the output (a Dask array block by block, so it is
never held whole), then copied to a COG at a temporary name, then renamed onto the final path
(``files.atomic_path``). GDAL's own scratch files (the
overview ``.ovr.tmp``) go to that private folder through ``CPL_TMPDIR``, and the folder is
removed whatever happens, so no stray file is left beside the evidence.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import dask.array
import numpy as np
import rasterio
import rasterio.shutil
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
from rasterio.errors import RasterioError, RasterioIOError
from rasterio.windows import Window

import pipeline
from pipeline.errors import GridError, OutputError
from pipeline.files import atomic_path
from pipeline.report.workers import dask_threads

__all__ = ["BLOCKSIZE", "COPY_CONFIG", "cog_options", "write_cog", "validate_cog"]

BLOCKSIZE = 512
# GDAL's COG driver builds the overviews into a temporary file compressed with ZSTD at
# GTiff's default level 9 (cogdriver.cpp sets only COMPRESS for it), then copies them into
# the COG with the COG's own compression. That temporary file is deleted: level 1 gives the
# same COG byte for byte (md5 of the 4224 and 8446 px bench rasters) and cut the 8446 px
# float32 magnitude's copy from 6.8-7.4 to 5.4-5.5 CPU s. The option only touches ZSTD
# overviews, and the COGs' overviews are DEFLATE.
COPY_CONFIG = {"ZSTD_LEVEL_OVERVIEW": "1"}


def write_cog(
    da: xr.DataArray,
    path: str | Path,
    *,
    dtype: str,
    nodata: float | int,
    overwrite: bool = False,
    description: str | Sequence[str] | None = None,
    tags: Mapping[str, Any] | None = None,
    threads: int | None = None,
) -> Path:
    """Write a georeferenced DataArray as a Cloud-Optimized GeoTIFF, atomically.

    Parameters
    ----------
    da
        Dims ``("y", "x")`` or ``(band, "y", "x")`` with rioxarray georeferencing
        (``da.rio.crs``, ``da.rio.transform()``; coordinates at pixel centres). NumPy- or
        Dask-backed; it is computed here.
    path
        Destination ``.tif``.
    dtype
        Output dtype, e.g. ``"uint8"`` (change mask: 1 change, 0 no change, 255 nodata) or
        ``"float32"`` (change magnitude, NaN nodata).
    nodata
        Nodata value written in the file. NaN in ``da`` becomes ``nodata``. NaN is only
        allowed for float dtypes.
    overwrite
        Replace an existing file; without it an existing file is an error.
    description
        Band description(s), e.g. ``"change (1), no change (0), nodata (255)"``; defaults
        to ``da.attrs["long_name"]`` or ``da.name``.
    tags
        Dataset tags (``GDAL_METADATA``); ``TIFFTAG_SOFTWARE`` is set to the Sitewatch version.
    threads
        GDAL's compression and overview threads (the same bytes with any number); None: as
        many as Dask's (``report.workers.dask_threads``). A Dask-backed ``da`` is computed on Dask's
        configured scheduler.

    Returns
    -------
    Path
        ``path``: DEFLATE-compressed (level 1), 512 px tiles, overviews (NEAREST for integer dtypes,
        AVERAGE for floats), no predictor.

    Raises
    ------
    ValueError
        If the dims, dtype/nodata pair or values do not fit (e.g. 3.5 into uint8).
    GridError
        If ``da`` has no CRS.
    OutputError
        If ``path`` exists and ``overwrite`` is False, or it cannot be written.
    """
    path = Path(path)
    data = _band_array(da)
    crs = da.rio.crs
    if crs is None:
        raise GridError(f"Cannot write {path.name}: the array has no CRS. Use da.rio.write_crs().")
    _check_target(dtype, nodata)
    if isinstance(data, dask.array.Array):
        values = dask.array.map_blocks(_cast, data, dtype, nodata, dtype=np.dtype(dtype))
    else:
        values = _cast(data, dtype, nodata)
    profile = {
        "driver": "GTiff",
        "dtype": dtype,
        "nodata": nodata,
        "count": values.shape[0],
        "height": values.shape[1],
        "width": values.shape[2],
        "crs": crs,
        "transform": da.rio.transform(),
        "tiled": True,
        "blockxsize": BLOCKSIZE,
        "blockysize": BLOCKSIZE,
    }
    descriptions = _descriptions(da, description, values.shape[0])
    all_tags = {**{k: str(v) for k, v in (tags or {}).items()}}
    all_tags["TIFFTAG_SOFTWARE"] = f"sitewatch {pipeline.__version__}"
    with _output_errors(path), atomic_path(path, overwrite=overwrite) as tmp:
        with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as work:
            src_path = Path(work) / "src.tif"
            with rasterio.open(src_path, "w", **profile) as dst:
                if isinstance(values, dask.array.Array):
                    # one computation, each block written to its window as it is ready
                    target: Any = _WindowWriter(dst)
                    try:
                        dask.array.store(values, target, lock=False)  # the writer locks
                    finally:
                        target.close()
                else:
                    dst.write(values)
                dst.descriptions = descriptions
                dst.update_tags(**all_tags)
            n = threads or dask_threads()
            # GDAL_NUM_THREADS: the overviews computed on n threads too (the same bytes; the
            # 8446 px bench magnitude's copy took 2.5-2.9 s on two instead of 3.2 s)
            with rasterio.Env(CPL_TMPDIR=work, GDAL_PAM_ENABLED="NO", GDAL_NUM_THREADS=str(n),
                              **COPY_CONFIG):
                rasterio.shutil.copy(src_path, tmp, driver="COG", **cog_options(dtype, n))
    return path


class _WindowWriter:
    """``dask.array.store`` target writing ``(band, y, x)`` blocks into an open dataset.

    Writes are serialised by a lock, and refused once :meth:`close` ran: when one block fails
    (a lossy cast), Dask raises at once while other threads may still be computing blocks; a
    late block must not reach the dataset after it is closed (GDAL would crash).
    """

    def __init__(self, dst: Any) -> None:
        self.dst = dst
        self.lock = threading.Lock()
        self.closed = False

    def __setitem__(self, key: tuple[slice, ...], block: np.ndarray) -> None:
        bands, rows, cols = key
        indexes = list(range(bands.start + 1, bands.stop + 1))
        with self.lock:
            if self.closed:
                raise RuntimeError("the GeoTIFF is closed: an earlier block failed")
            self.dst.write(block, indexes=indexes, window=Window.from_slices(rows, cols))

    def close(self) -> None:
        """Refuse any later block (waits for a write in progress)."""
        with self.lock:
            self.closed = True


def validate_cog(path: str | Path) -> tuple[bool, list[str], list[str]]:
    """Light structural check of a Cloud-Optimized GeoTIFF.

    Checks that GDAL opens it as a GeoTIFF, reports ``LAYOUT=COG`` in the
    ``IMAGE_STRUCTURE`` domain (the COG driver's ghost header), is tiled, and has internal
    overviews when wider or taller than 512 px (an error here, stricter than rio-cogeo,
    because Sitewatch always writes them). Not a byte-level IFD-order check.

    Parameters
    ----------
    path
        The file to check.

    Returns
    -------
    tuple
        ``(ok, errors, warnings)``.
    """
    errors: list[str] = []
    warnings: list[str] = []
    try:
        with rasterio.open(path) as ds:
            _check_cog(ds, errors, warnings)
    except RasterioIOError as e:
        errors.append(f"{path}: cannot be opened as a raster ({e})")
    return not errors, errors, warnings


def _check_cog(ds: Any, errors: list[str], warnings: list[str]) -> None:
    """COG rules on an open dataset."""
    if ds.driver != "GTiff":
        errors.append(f"{ds.name}: driver is {ds.driver}, not a GeoTIFF")
        return
    if ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") != "COG":
        errors.append(f"{ds.name}: no LAYOUT=COG ghost header; rewrite it with GDAL's COG driver")
    block_h, block_w = ds.block_shapes[0]
    if not ds.profile.get("tiled", False) or block_w >= ds.width > BLOCKSIZE:
        errors.append(f"{ds.name}: not tiled (blocks {block_h}x{block_w})")
    if max(ds.width, ds.height) > BLOCKSIZE and not ds.overviews(1):
        errors.append(f"{ds.name}: {ds.width}x{ds.height} px but no internal overviews")
    if len(ds.files) > 1:
        warnings.append(f"{ds.name}: has sidecar files {ds.files[1:]}")
    if ds.compression is None:
        warnings.append(f"{ds.name}: not compressed")
    if ds.crs is None:
        warnings.append(f"{ds.name}: has no CRS")


def _band_array(da: xr.DataArray) -> Any:
    """``(band, y, x)`` NumPy or Dask array from a 2-D or 3-D DataArray (Dask stays lazy)."""
    if da.ndim not in (2, 3):
        raise ValueError(f"Expected dims (y, x) or (band, y, x), got {da.dims}")
    spatial = (da.rio.y_dim, da.rio.x_dim)
    if tuple(da.dims[-2:]) != spatial:
        raise ValueError(f"The last two dims must be {spatial}, got {da.dims}; transpose first")
    data = da.data if isinstance(da.data, dask.array.Array) else np.asarray(da.values)
    return data[np.newaxis] if data.ndim == 2 else data


def _check_target(dtype: str, nodata: float | int) -> None:
    """Refuse an output dtype that is not numeric, or a nodata value it cannot hold."""
    target = np.dtype(dtype)
    is_float = np.issubdtype(target, np.floating)
    if not is_float and not np.issubdtype(target, np.integer):
        raise ValueError(f"dtype must be an integer or float dtype, got {dtype!r}")
    if not is_float:
        if isinstance(nodata, float) and math.isnan(nodata):
            raise ValueError(f"nodata=nan is not possible with integer dtype {dtype!r}")
        info = np.iinfo(target)
        if not (info.min <= nodata <= info.max and float(nodata).is_integer()):
            raise ValueError(f"nodata {nodata!r} does not fit dtype {dtype!r}")


def _cast(data: np.ndarray, dtype: str, nodata: float | int) -> np.ndarray:
    """Cast to ``dtype`` with NaN (and nodata) mapped to ``nodata``; refuse lossy casts."""
    _check_target(dtype, nodata)
    target = np.dtype(dtype)
    is_float = np.issubdtype(target, np.floating)
    if data.dtype == bool:
        data = data.astype(np.uint8)
    if data.dtype == target and (not is_float or math.isnan(nodata)):
        return data  # nothing to map or check: NaN is the nodata, or integers already fit
    is_nan_able = np.issubdtype(data.dtype, np.floating)
    missing = np.isnan(data) if is_nan_able else np.zeros(data.shape, dtype=bool)
    if is_float:
        out = data.astype(target)
        out[missing] = nodata
        return out
    valid = data[~missing]
    info = np.iinfo(target)
    if valid.size and (valid.min() < info.min or valid.max() > info.max):
        raise ValueError(f"Values span {valid.min()}..{valid.max()}, outside {dtype!r}")
    if is_nan_able and valid.size and not np.all(np.mod(valid, 1) == 0):
        raise ValueError(f"Non-integer values cannot be written as {dtype!r}; round first")
    return np.where(missing, nodata, data).astype(target)


def _descriptions(
    da: xr.DataArray, description: str | Sequence[str] | None, count: int
) -> tuple[str | None, ...]:
    """One description per band."""
    if description is None:
        default = da.attrs.get("long_name") or (str(da.name) if da.name is not None else None)
        return (default,) * count
    if isinstance(description, str):
        return (description,) * count
    if len(description) != count:
        raise ValueError(f"Got {len(description)} band descriptions for {count} bands")
    return tuple(description)


def cog_options(dtype: str, threads: int) -> dict[str, Any]:
    """Creation options for GDAL's COG driver."""
    is_float = np.issubdtype(np.dtype(dtype), np.floating)
    return {
        "BLOCKSIZE": BLOCKSIZE,
        "COMPRESS": "DEFLATE",
        # level 1: measured 3.5x faster than the default 6 on an 8446 px float32 magnitude, for
        # files a few per cent larger; compression is most of the write time of large AOIs
        "LEVEL": 1,
        # no floating-point predictor: on change magnitudes it made the files larger, not
        # smaller (8446 px bench: 293 MB with it, 230 MB without; Dabancheng 3.5 MB vs 2.6 MB)
        # and cost more CPU (6.9 s vs 6.3 s at 8446 px); the pixels are the same either way
        "PREDICTOR": "NO",
        "OVERVIEWS": "AUTO",
        "OVERVIEW_RESAMPLING": "AVERAGE" if is_float else "NEAREST",
        "BIGTIFF": "IF_SAFER",
        # tiles compressed on several threads (same bytes); on all (two) cores measured
        # 8.5 s -> 5.9 s wall for a 4224 px float32 magnitude on the shared 2-core machine
        "NUM_THREADS": str(threads),
    }


@contextlib.contextmanager
def _output_errors(path: Path) -> Iterator[None]:
    """Turn file-system and GDAL write failures into OutputError naming the fix."""
    try:
        yield
    except FileExistsError as e:
        raise OutputError(f"{path} exists; not overwriting evidence. Pass --overwrite.") from e
    except (OSError, RasterioError) as e:
        if isinstance(e, OutputError):
            raise
        raise OutputError(f"Cannot write {path}: {e}. Choose another --out.") from e
