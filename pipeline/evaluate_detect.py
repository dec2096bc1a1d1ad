"""pipeline.evaluate_detect: score ``sitewatch detect --building-model cnn`` on labelled pairs.

`pipeline.evaluate` scores the network itself (four mirrorings, on the bare image). This
module scores what a user gets from a detect run with the network on: each pair is written as
a pair of GeoTIFFs on a made-up UTM grid, run through `pipeline.run.run_detect` (AOI, grid,
co-registration, the network with its four mirrorings (the default ``buildings.mirrorings``),
the card's rule, objects) with the fold network
that never saw it, and two predictions are read back on the image's pixels: the written
``change_mask.tif`` and the ``new_building`` features rasterised. Pairs coarser than the
network's limit (``buildings.max_res_m``: DSIFN, Nanjing) are not applicable (None).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.features import rasterize
from rasterio.warp import transform_bounds

from pipeline.datasets import LabelledPair

__all__ = ["DETECT_MASK", "DETECT_BUILDINGS", "DetectRuns", "write_pair"]

DETECT_MASK = "detect cnn: change mask"
DETECT_BUILDINGS = "detect cnn: new_building"
# LEVIR-CD is in Texas: its pixels are placed in UTM zone 14 (any grid would do; the pair's
# own georeferencing is not published), on whole metres so the grid snaps to the image.
_CRS = "EPSG:32614"
_ORIGIN = (600000.0, 3400000.0)
_DATES = ("2012-01-01", "2016-01-01")


def write_pair(pair: LabelledPair, folder: Path) -> tuple[Path, Path, Affine]:
    """The pair's red, green and blue bands as two uint8 GeoTIFFs named with their dates."""
    transform = Affine(pair.res_m, 0.0, _ORIGIN[0], 0.0, -pair.res_m, _ORIGIN[1])
    paths = []
    for role, day, image in zip(("before", "after"), _DATES, (pair.before, pair.after),
                                strict=True):
        rgb = np.clip(np.round(image[list(pair.rgb)]), 0, 255).astype(np.uint8)
        path = folder / f"{role}_{day}.tif"
        with rasterio.open(path, "w", driver="GTiff", width=rgb.shape[2], height=rgb.shape[1],
                           count=3, dtype="uint8", crs=_CRS, transform=transform,
                           photometric="RGB", tiled=True, blockxsize=256,
                           blockysize=256) as dst:
            dst.write(rgb)
        paths.append(path)
    return paths[0], paths[1], transform


class DetectRuns:
    """One `run_detect` with the network per pair, read back as the two predictions.

    ``mask(pair)`` and ``buildings(pair)`` share the pair's run (the first call makes it).
    ``clock`` gets ``seconds``, ``cpu_seconds`` (whole runs, this process) and
    ``megapixels`` (of the runs' grids).
    """

    def __init__(self, cnn: Any, folds: dict, clock: dict[str, float],
                 fold_for: Callable[[LabelledPair, Any, dict], Any]) -> None:
        self.cnn, self.folds, self.clock, self.fold_for = cnn, folds, clock, fold_for
        self._done: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def mask(self, pair: LabelledPair) -> np.ndarray | None:
        """``change_mask.tif == 1`` on the pair's pixels; None where not applicable."""
        got = self._run(pair)
        return None if got is None else got[0]

    def buildings(self, pair: LabelledPair) -> np.ndarray | None:
        """The ``new_building`` features rasterised on the pair's pixels; None likewise."""
        got = self._run(pair)
        return None if got is None else got[1]

    def _run(self, pair: LabelledPair) -> tuple[np.ndarray, np.ndarray] | None:
        from pipeline.aoi import parse_aoi
        from pipeline.config import load_config
        from pipeline.run import run_detect

        key = f"{pair.dataset}/{pair.name}"
        config = load_config(None, overrides={"buildings.model": "cnn"})
        if pair.res_m > config.params.buildings.max_res_m:
            return None
        if key in self._done:
            return self._done[key]
        use = self.fold_for(pair, self.cnn, self.folds)
        with tempfile.TemporaryDirectory(prefix="sitewatch-eval-") as tmp:
            before, after, transform = write_pair(pair, Path(tmp))
            with rasterio.open(before) as src:
                lonlat = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
            aoi = parse_aoi(",".join(f"{v:.7f}" for v in lonlat))
            t0, c0 = time.perf_counter(), time.process_time()
            result = run_detect(aoi, before, after, config=config, out_root=Path(tmp) / "out",
                                building_model=use)
            self.clock["seconds"] = self.clock.get("seconds", 0.0) + time.perf_counter() - t0
            self.clock["cpu_seconds"] = (self.clock.get("cpu_seconds", 0.0)
                                         + time.process_time() - c0)
            self.clock["megapixels"] = (self.clock.get("megapixels", 0.0)
                                        + result.grid.height * result.grid.width / 1e6)
            with rasterio.open(result.run_dir / "change_mask.tif") as ds:
                window = ds.window(*rasterio.transform.array_bounds(
                    *pair.label.shape, transform)).round_offsets().round_lengths()
                mask = ds.read(1, window=window, boundless=True, fill_value=0) == 1
        shapes = [(e.geometry, 1) for e in result.evidence if e.kind == "new_building"]
        buildings = (rasterize(shapes, out_shape=pair.label.shape, transform=transform,
                               dtype="uint8") == 1 if shapes
                     else np.zeros(pair.label.shape, bool))
        self._done[key] = (mask, buildings)
        return self._done[key]
