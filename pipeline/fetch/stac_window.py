"""pipeline.fetch.stac_window: the on-disk cache of composited STAC AOI windows.

GDAL's ``/vsicurl/`` range reads bypass the HTTP cache, so the composite itself is cached:
a float32 GeoTIFF on the plan's grid plus a JSON sidecar, under ``<cache_dir>/stac/``::

    stac/ab/<key>.tif    the composite, one band per canonical band, NaN nodata
    stac/ab/<key>.json   {key, sha256, size, bands, crs, transform, shape, used items,
                          reads (the COG bodies read for it, kept in the HTTP cache), ...}

The key is the SHA-256 of everything that decides the pixels: collection, item ids with
their asset hrefs (unsigned) and DN scaling, the grid plan, the band list and the composite
parameters (``window_key``). Both files are written atomically, GeoTIFF first; on read the
GeoTIFF's SHA-256 must match the sidecar and its grid must be the plan's, else the entry is
deleted and treated as a miss.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.errors import RasterioError

from pipeline.fetch.base import FetchContext
from pipeline.fetch.stac_items import ItemBands
from pipeline.fetch.stac_load import CompositeResult
from pipeline.files import atomic_path, atomic_write_text, sha256_file
from pipeline.model import GridPlan

__all__ = ["FORMAT_VERSION", "window_key", "window_paths", "read_window", "write_window"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def window_key(items: Sequence[ItemBands], plan: GridPlan, *,
               params: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """SHA-256 key of a composite and the material it hashes.

    Parameters
    ----------
    items
        The candidate items (all of them, also those that turn out cloudy).
    plan
        The working grid.
    params
        Everything else that decides the pixels: collection, bands, composite method, mask
        kind and classes, resampling.

    Returns
    -------
    tuple
        ``(key, material)``.
    """
    material = {
        "format": FORMAT_VERSION,
        "grid": {"crs": plan.crs, "bounds": list(plan.bounds), "res_m": plan.res_m},
        "items": [{"id": i.item_id, "hrefs": dict(sorted(i.hrefs.items())),
                   "scale": dict(i.scale), "offset": dict(i.offset), "nodata": dict(i.nodata)}
                  for i in sorted(items, key=lambda i: i.item_id)],
        "params": dict(params),
    }
    blob = json.dumps(material, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest(), material


def window_paths(key: str, *, context: FetchContext) -> tuple[Path, Path]:
    """``(geotiff_path, sidecar_path)`` of a key."""
    folder = Path(context.cache_dir) / "stac" / key[:2]
    return folder / f"{key}.tif", folder / f"{key}.json"


def read_window(key: str, plan: GridPlan, bands: Sequence[str], *,
                context: FetchContext) -> tuple[CompositeResult, str] | None:
    """The cached composite of ``key`` and its SHA-256, or None (miss, or corrupt: deleted)."""
    tif_path, meta_path = window_paths(key, context=context)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        return _corrupt(key, context, f"unreadable sidecar ({e})")
    if not isinstance(meta, dict) or meta.get("key") != key:
        return _corrupt(key, context, "sidecar names another key")
    try:
        digest = sha256_file(tif_path)
    except OSError as e:
        return _corrupt(key, context, f"GeoTIFF unreadable ({e})")
    if digest != meta.get("sha256"):
        return _corrupt(key, context, f"SHA-256 {digest[:16]}... differs from the sidecar's")
    try:
        with rasterio.open(tif_path) as ds:
            grid_ok = (ds.crs == CRS.from_user_input(plan.crs)
                       and ds.transform.almost_equals(plan.transform)
                       and (ds.height, ds.width) == plan.shape
                       and list(ds.descriptions) == list(bands))
            data = ds.read().astype(np.float32) if grid_ok else None
    except RasterioError as e:
        return _corrupt(key, context, f"GeoTIFF does not open ({e})")
    if data is None:
        return _corrupt(key, context, "its grid or bands differ from the plan")
    result = CompositeResult(data, tuple(meta["used"]), dict(meta["item_clear_share"]),
                             float(meta["clear_share"]), meta["method"],
                             reads=dict(meta.get("reads") or {}))
    log.info("Composite %s... read from the cache (%s)", key[:12], tif_path)
    return result, digest


def write_window(key: str, plan: GridPlan, bands: Sequence[str], result: CompositeResult, *,
                 context: FetchContext, material: Mapping[str, Any]) -> str:
    """Store a composite under ``key``; return the GeoTIFF's SHA-256."""
    tif_path, meta_path = window_paths(key, context=context)
    tif_path.parent.mkdir(parents=True, exist_ok=True)
    profile = dict(driver="GTiff", width=plan.width, height=plan.height, count=len(bands),
                   dtype="float32", crs=plan.crs, transform=plan.transform, nodata=np.nan,
                   compress="deflate", predictor=3)
    if plan.width >= 256 and plan.height >= 256:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    with atomic_path(tif_path, overwrite=True) as tmp:
        with rasterio.open(tmp, "w", **profile) as ds:
            ds.write(result.data.astype(np.float32))
            ds.descriptions = tuple(bands)
            ds.update_tags(SITEWATCH_WINDOW_KEY=key)
    digest = sha256_file(tif_path)
    meta = {"format": FORMAT_VERSION, "key": key, "sha256": digest,
            "size": tif_path.stat().st_size, "bands": list(bands), "crs": plan.crs,
            "transform": list(plan.transform)[:6], "shape": list(plan.shape),
            "used": list(result.used), "item_clear_share": result.item_clear_share,
            "clear_share": result.clear_share, "method": result.method,
            "reads": dict(result.reads),
            "created_utc": datetime.now(UTC).isoformat(), "material": material}
    atomic_write_text(meta_path, json.dumps(meta, indent=1, sort_keys=True), overwrite=True)
    log.info("Composite %s... cached at %s", key[:12], tif_path)
    return digest


def _corrupt(key: str, context: FetchContext, why: str) -> tuple[CompositeResult, str] | None:
    """Log and delete a bad entry; return None (a miss)."""
    log.warning("Cached composite %s is unusable (%s); deleting it", key, why)
    for path in window_paths(key, context=context):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return None
