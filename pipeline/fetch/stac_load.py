"""pipeline.fetch.stac_load: read the AOI window of STAC items' COGs and composite them.

odc-stac builds a lazy Dask graph that reads only the blocks of each COG under the working
grid (a ``GeoBox`` equal to the ``GridPlan``: same CRS, transform and shape, x/y at pixel
centres). GDAL options that keep ``/vsicurl/`` to a few requests are set with a
``rasterio.Env`` around the load *and* the computation: odc-stac captures the calling
thread's GDAL options into the graph and restores them in every reading task, so nothing
is configured globally and nothing leaks after the fetch.

The pure kernels (DN -> reflectance, SCL/QA masks, median) live in ``pipeline.core.composite``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Literal

import dask
import dask.callbacks
import numpy as np
import odc.stac
import pystac
import rasterio
import xarray as xr
from odc.geo.geobox import GeoBox
from rasterio.errors import RasterioError

from pipeline.core.composite import (
    QA_PIXEL_MASK_BITS,
    SCL_MASK_CLASSES,
    clear_observations,
    clear_share,
    median_composite,
    qa_pixel_clear,
    scl_clear,
    to_reflectance,
)
from pipeline.errors import FetchError
from pipeline.fetch.base import FetchContext
from pipeline.fetch.stac_items import ItemBands, SensorProfile
from pipeline.fetch.stac_record import cog_read_limit_s
from pipeline.model import GridPlan

__all__ = ["CompositeMethod", "CompositeResult", "gdal_options", "rasterio_env", "geobox_of",
           "load_items", "composite_items"]

log = logging.getLogger(__name__)

CompositeMethod = Literal["median", "clearest"]
_QUERY = re.compile(r"(https?://[^\s'\"?]+)\?[^\s'\"]*")
_FAILED = re.compile(r"Failed to load (\S+?)(?::\d+)? due to")
# Loggers whose records carry asset URLs (GDAL's messages come through rasterio._env).
_URL_LOGGERS = ("rasterio._env", "rasterio._base", "rasterio._io", "odc.loader._rio")


@dataclass(frozen=True)
class CompositeResult:
    """A computed composite: ``data`` (band, y, x) float32 NaN nodata, and how it was made.

    ``reads``: the COG bodies read for it, by unsigned href (``stac_record.RangeRecorder``).
    """

    data: np.ndarray
    used: tuple[str, ...]
    item_clear_share: dict[str, float]
    clear_share: float
    method: CompositeMethod
    reads: Mapping[str, list[dict[str, Any]]] = field(default_factory=dict)


def gdal_options(context: FetchContext) -> dict[str, Any]:
    """GDAL configuration for few, bounded ``/vsicurl/`` requests (see FIELD_NOTES.md)."""
    return {
        "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
        "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.TIF,.TIFF",
        "GDAL_HTTP_MULTIRANGE": "YES",
        "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
        "GDAL_INGESTED_BYTES_AT_OPEN": 65536,
        "GDAL_HTTP_MAX_RETRY": max(0, int(context.max_retries)),
        "GDAL_HTTP_RETRY_DELAY": 0.5,
        # curl's limit on one whole transfer (not per read), so a server that drips bytes
        # cannot hold a read; the relay of stac_record stops its upstream read at the same limit
        "GDAL_HTTP_TIMEOUT": cog_read_limit_s(context),
        "GDAL_HTTP_CONNECTTIMEOUT": max(1, math.ceil(context.timeout_s)),
        "GDAL_HTTP_USERAGENT": context.user_agent,
    }


def geobox_of(plan: GridPlan) -> GeoBox:
    """The odc-geo ``GeoBox`` of a plan: its CRS, shape and exactly its transform."""
    return GeoBox((plan.height, plan.width), plan.transform, plan.crs)


def load_items(items: Sequence[ItemBands], plan: GridPlan, profile: SensorProfile, *,
               resampling: str, chunk_px: int,
               signer: Callable[[str], str] | None) -> tuple[xr.DataArray, xr.DataArray]:
    """Lazy reflectance and clear-view mask of ``items`` on the plan's grid.

    Must run inside ``rasterio.Env(**gdal_options(context))``: odc-stac captures those
    options into the graph.

    Returns
    -------
    tuple
        ``(data, clear)``: reflectance dims ``("time", "band", "y", "x")`` float32 NaN
        nodata, one ``time`` step per item in the given order, ``band`` the canonical names;
        ``clear`` dims ``("time", "y", "x")`` bool (all True when the profile has no mask).
        Both Dask-backed.
    """
    first = items[0]
    bands = list(first.keys)
    keys = [first.keys[b] for b in bands]
    load_keys = keys + ([first.mask_key] if first.mask_key else [])
    stac_cfg = _stac_cfg(first, profile)
    ds = odc.stac.load(
        [pystac.Item.from_dict(dict(i.raw), preserve_dict=True) for i in items],
        bands=load_keys, geobox=geobox_of(plan), groupby=_by_index,
        resampling={**{k: resampling for k in keys}, **({first.mask_key: "nearest"}
                                                        if first.mask_key else {})},
        chunks={"x": chunk_px, "y": chunk_px}, stac_cfg=stac_cfg, patch_url=signer,
        preserve_original_order=True, fail_on_error=True,
    )
    if ds.sizes["time"] != len(items):
        raise FetchError(f"odc-stac returned {ds.sizes['time']} layers for {len(items)} items; "
                         "items must have distinct footprints or ids.")
    dn = xr.concat([ds[k] for k in keys], dim=xr.DataArray(bands, dims="band", name="band"))
    dn = dn.transpose("time", "band", "y", "x")
    coords = {"time": dn["time"], "band": bands}
    per = {name: xr.DataArray([[getattr(i, name)[b] for b in bands] for i in items],
                              dims=("time", "band"), coords=coords)
           for name in ("scale", "offset", "nodata")}
    data = to_reflectance(dn, scale=per["scale"], offset=per["offset"], nodata=per["nodata"])
    if profile.mask == "scl":
        clear = scl_clear(ds[first.mask_key], mask_classes=SCL_MASK_CLASSES)
    elif profile.mask == "qa_pixel":
        clear = qa_pixel_clear(ds[first.mask_key], mask_bits=tuple(QA_PIXEL_MASK_BITS.values()))
    else:
        clear = xr.ones_like(dn.isel(band=0, drop=True), dtype=bool)
    return data, clear.transpose("time", "y", "x")


def composite_items(items: Sequence[ItemBands], data: xr.DataArray, clear: xr.DataArray, *,
                    method: CompositeMethod, middle: date,
                    progress: Callable[[int, int], None] | None = None,
                    url_names: Mapping[str, str] | None = None) -> CompositeResult:
    """Compute the composite (this reads the pixels; run inside the GDAL env).

    ``"median"``: per-pixel median of every clear observation. ``"clearest"``: the date
    whose items give the largest clear share by their mask (ties: closest to ``middle``,
    then earliest), then the median of that date's items (one item, or same-day tiles).
    ``progress(done, total)`` is called as the read-and-composite tasks finish.
    ``url_names`` (``{URL GDAL read: URL to name}``) puts the real asset URLs back into a
    read error's message when GDAL read through a relay.

    Raises
    ------
    FetchError
        A COG could not be read.
    """
    if method == "clearest":
        index = _clearest_date(items, clear, middle, url_names)
        items = [items[i] for i in index]
        data, clear = data.isel(time=index), clear.isel(time=index)
    obs = clear_observations(data, clear)
    composite = median_composite(data, obs)
    per_item = clear_share(obs)
    valid = composite.notnull().all(dim="band")
    result, shares, share = _compute(composite, per_item, valid.mean(), progress=progress,
                                     url_names=url_names)
    item_share = {i.item_id: float(s) for i, s in zip(items, shares, strict=True)}
    used = tuple(i.item_id for i in items if item_share[i.item_id] > 0)
    return CompositeResult(np.asarray(result, np.float32), used, item_share, float(share), method)


def _clearest_date(items: Sequence[ItemBands], clear: xr.DataArray, middle: date,
                   url_names: Mapping[str, str] | None) -> list[int]:
    """Indexes of the items of the date with the largest clear share (by mask only)."""
    dates = sorted({i.acquired for i in items})
    groups = {d: [n for n, i in enumerate(items) if i.acquired == d] for d in dates}
    shares = _compute(*[clear.isel(time=idx).any("time").mean() for idx in groups.values()],
                      url_names=url_names)
    best = max(zip(dates, shares, strict=True),
               key=lambda ds: (float(ds[1]), -abs((ds[0] - middle).days), -ds[0].toordinal()))
    log.info("Clearest date %s: %.1f %% clear by its mask", best[0], 100 * float(best[1]))
    return groups[best[0]]


class _LogRedactor(logging.Filter):
    """Strips query strings (SAS tokens) from GDAL/odc-loader log records; notes failed URLs."""

    def __init__(self) -> None:
        super().__init__()
        self.failed: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        match = _FAILED.search(text)
        if match:
            self.failed.append(_redact(match.group(1)))
        if "?" in text:
            record.msg, record.args = _redact(text), ()
        return True


@contextlib.contextmanager
def _redacted_logs() -> Iterator[_LogRedactor]:
    """Redact the loggers that echo asset URLs, for the duration of a read."""
    redactor = _LogRedactor()
    loggers = [logging.getLogger(name) for name in _URL_LOGGERS]
    for logger in loggers:
        logger.addFilter(redactor)
    try:
        yield redactor
    finally:
        for logger in loggers:
            logger.removeFilter(redactor)


def _redact(text: str) -> str:
    """``text`` with the query string of every URL removed."""
    return _QUERY.sub(r"\1?<query removed>", text)


class _TaskProgress(dask.callbacks.Callback):
    """Reports ``progress(done, total)`` as the tasks of one dask.compute finish."""

    def __init__(self, progress: Callable[[int, int], None]) -> None:
        super().__init__()
        self.report, self.done, self.total = progress, 0, 0

    def _start_state(self, dsk: Any, state: Any) -> None:
        self.total = len(state["ready"]) + len(state["waiting"])

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        self.done += 1
        self.report(self.done, max(self.total, self.done))


def _compute(*arrays: Any, progress: Callable[[int, int], None] | None = None,
             url_names: Mapping[str, str] | None = None) -> tuple[Any, ...]:
    """dask.compute with read failures turned into FetchError naming the (unsigned) URL."""
    watch = _TaskProgress(progress) if progress is not None else contextlib.nullcontext()
    with _redacted_logs() as redactor, watch:
        try:
            return tuple(np.asarray(a) for a in dask.compute(*arrays))
        except (RasterioError, OSError) as e:
            named = [_renamed(u, url_names) for u in dict.fromkeys(redactor.failed)]
            where = f" {', '.join(_redact(u) for u in named)}" if named else ""
            text = _renamed(str(e), url_names)
            raise FetchError(f"Reading COG pixels{where} failed: {_redact(text)}. The server "
                             "may be down or the asset URLs stale; try again later, or use "
                             "--offline with a cache.") from (None if "?" in text else e)


def _renamed(text: str, url_names: Mapping[str, str] | None) -> str:
    """``text`` with each relay URL replaced by the real URL it stands for."""
    for local, real in (url_names or {}).items():
        text = text.replace(local, real)
    return text


def _by_index(item: Any, parsed: Any, index: int) -> int:
    """odc-stac group key: one layer per item, in the order given."""
    return index


def _stac_cfg(first: ItemBands, profile: SensorProfile) -> dict[str, Any]:
    """odc-stac metadata for assets that lack ``raster:bands`` (dtype, nodata)."""
    assets: dict[str, Any] = {"*": {"data_type": "uint16", "nodata": profile.nodata}}
    if first.mask_key:
        assets[first.mask_key] = {"data_type": profile.mask_dtype, "nodata": profile.mask_nodata}
    return {"*": {"assets": assets, "warnings": "ignore"}}


def rasterio_env(context: FetchContext) -> rasterio.Env:
    """``rasterio.Env`` with ``gdal_options(context)``."""
    return rasterio.Env(**gdal_options(context))

