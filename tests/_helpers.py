"""Test helpers: paths to the real data beside the project, small synthetic GeoTIFFs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from affine import Affine

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
DABANCHENG = SHARED_DATA / "dabancheng"


def write_geotiff(path: Path, data: np.ndarray, *, crs: str = "EPSG:32645",
                  transform: Affine | None = None, nodata: float | None = 0) -> Path:
    """Write a (band, y, x) array as a tiled GeoTIFF."""
    transform = transform or Affine(10.0, 0, 600000.0, 0, -10.0, 4805000.0)
    profile = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                   dtype=data.dtype, crs=crs, transform=transform, nodata=nodata,
                   tiled=True, blockxsize=256, blockysize=256)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)
    return path
