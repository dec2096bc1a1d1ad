"""pipeline.run: one detect run, from two local images and an AOI to an evidence folder.

The orchestration the CLI calls: plan the grid, read both dates, co-register, normalize,
compute change, detect sites, and write the evidence atomically. Each stage is timed and
recorded in the manifest.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from rasterio import features

import pipeline
from pipeline.aoi import Aoi, aoi_polygon_in, plan_grid
from pipeline.config import RunConfig
from pipeline.core.change import change_magnitude, change_mask
from pipeline.core.coreg import coregister
from pipeline.core.radiometry import normalize
from pipeline.detect.sites import detect_sites
from pipeline.errors import FetchError, NoValidDataError, PipelineWarning
from pipeline.fetch.local import common_resolution, describe_raster, read_to_grid
from pipeline.model import CoregResult, Evidence, GridPlan, params_hash
from pipeline.report.geojson import evidence_to_features, write_geojson
from pipeline.report.manifest import build_manifest, write_manifest
from pipeline.report.rasters import write_cog
from pipeline.report.rundir import check_out_root, new_run_id, staged_run_dir

__all__ = ["DetectResult", "run_detect", "STEPS"]

log = logging.getLogger(__name__)

STEPS = ("read", "coregister", "normalize", "change", "detect", "write")
Progress = Callable[[str, int, int], None]


@dataclass
class DetectResult:
    """What a detect run produced: the evidence, where it was written, and how."""

    run_dir: Path
    run_id: str
    evidence: list[Evidence]
    coreg: CoregResult
    threshold: float
    grid: GridPlan
    steps: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class _Steps:
    """Times each stage, records it for the manifest and reports progress."""

    def __init__(self, progress: Progress | None) -> None:
        self.records: list[dict[str, Any]] = []
        self.progress = progress

    @contextmanager
    def step(self, name: str, **details: Any) -> Iterator[dict[str, Any]]:
        index = STEPS.index(name)
        if self.progress:
            self.progress(name, index, len(STEPS))
        log.info("%s ...", name)
        start = time.perf_counter()
        yield details
        seconds = time.perf_counter() - start
        self.records.append({"name": name, "seconds": round(seconds, 3), "details": details})
        log.info("%s done in %.2f s", name, seconds)


def _method_label(cfg: RunConfig) -> str:
    p = cfg.params
    return (
        f"sitewatch {pipeline.__version__}: phase-correlation coregistration, "
        f"{p.change.normalize} normalization, change vector analysis, "
        f"{p.change.threshold_method} threshold, texture-gain compounds"
    )


def _mask_outside(da: xr.DataArray, aoi: Aoi, plan: GridPlan) -> xr.DataArray:
    """NaN outside the AOI polygon, so nothing beyond it is analysed or reported."""
    outside = features.geometry_mask(
        [aoi_polygon_in(aoi, plan.crs)], out_shape=plan.shape, transform=plan.transform
    )
    return da.where(~xr.DataArray(outside, dims=("y", "x")))


def _check_overlap(before: xr.DataArray, after: xr.DataArray, paths: tuple[Path, Path]) -> None:
    both = np.isfinite(before.values).all(axis=0) & np.isfinite(after.values).all(axis=0)
    if not both.any():
        raise NoValidDataError(
            f"The before image {paths[0]} and the after image {paths[1]} have no valid pixel in "
            f"common inside the AOI: they do not overlap there. Choose images that both cover "
            f"the AOI, or an AOI where they overlap."
        )


def _check_dates(before: date | None, after: date | None) -> None:
    if before and after and before > after:
        raise FetchError(
            f"The before image is dated {before} and the after image {after}: before is later. "
            f"Swap --before and --after (or fix --before-date/--after-date)."
        )


def run_detect(
    aoi: Aoi,
    before_path: str | Path,
    after_path: str | Path,
    *,
    config: RunConfig,
    out_root: str | Path,
    before_date: date | None = None,
    after_date: date | None = None,
    progress: Progress | None = None,
) -> DetectResult:
    """Run the whole detection on two local rasters and write an evidence folder.

    Parameters
    ----------
    aoi
        The area of interest; its UTM zone is the working grid's CRS.
    before_path, after_path
        GeoTIFF/COG files of the two dates (any CRS, resolution, partial overlap).
    config
        Resolved configuration; recorded in the manifest.
    out_root
        Evidence goes to ``out_root/<aoi.id>/<run_id>/``, published atomically.
    before_date, after_date
        Acquisition dates when the files do not carry them.
    progress
        Called as ``progress(step_name, step_index, n_steps)`` before each stage.

    Returns
    -------
    The evidence in memory and where it was written.

    Raises
    ------
    PipelineError
        Any input, grid or output problem, with a message that names the fix. Nothing is left
        under ``out_root`` when a run fails.
    """
    started = datetime.now(UTC)
    paths = (Path(before_path), Path(after_path))
    out = check_out_root(out_root)
    steps = _Steps(progress)
    params = config.params
    caught: list[warnings.WarningMessage] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with steps.step("read") as info:
            infos = [describe_raster(p) for p in paths]
            res_m = config.res_m or common_resolution(infos)
            plan = plan_grid(aoi, res_m)
            before, before_ref = read_to_grid(paths[0], plan, role="before", acquired=before_date,
                                              resampling=config.resampling)
            after, after_ref = read_to_grid(paths[1], plan, role="after", acquired=after_date,
                                            resampling=config.resampling)
            _check_dates(before_ref.acquired, after_ref.acquired)
            if before_ref.sha256 == after_ref.sha256:
                warnings.warn(
                    f"The before and after files are identical (SHA-256 {before_ref.sha256[:12]}…):"
                    " no change can be found. Check that --before and --after name different"
                    " acquisitions.", PipelineWarning, stacklevel=2)
            before = _mask_outside(before, aoi, plan)
            after = _mask_outside(after, aoi, plan)
            _check_overlap(before, after, paths)
            info.update(grid_crs=plan.crs, res_m=res_m, shape=list(plan.shape))
        with steps.step("coregister") as info:
            after, coreg = coregister(before, after, params=params.coreg)
            info.update(dy_px=coreg.dy, dx_px=coreg.dx, peak_ratio=coreg.peak_ratio,
                        applied=coreg.applied, note=coreg.note)
        with steps.step("normalize") as info:
            after = normalize(before, after, method=params.change.normalize)
            info.update(method=params.change.normalize)
        with steps.step("change") as info:
            magnitude = change_magnitude(before, after)
            mask, threshold = change_mask(magnitude, params=params.change, res_m=res_m)
            mask_np = np.asarray(mask.values)
            info.update(threshold=threshold, method=params.change.threshold_method,
                        changed_share=float(np.mean(mask_np == 1)))
        with steps.step("detect") as info:
            evidence = detect_sites(
                np.asarray(before.values), np.asarray(after.values), mask_np,
                np.asarray(magnitude.values), transform=plan.transform, crs=plan.crs,
                threshold=threshold, params=params, before_ref=before_ref, after_ref=after_ref,
            )
            info.update({k: sum(e.kind == k for e in evidence)
                         for k in ("compound", "new_building", "change")})
        run_id = new_run_id(started, params_hash(params))
        with steps.step("write"), staged_run_dir(out, aoi.id, run_id) as stage:
            fc = evidence_to_features(evidence, method=_method_label(config))
            names = ["changes.geojson", "change_mask.tif", "change_magnitude.tif"]
            write_geojson(fc, stage / names[0])
            write_cog(mask, stage / names[1], dtype="uint8", nodata=255,
                      description="change (1), no change (0), nodata (255)")
            write_cog(magnitude, stage / names[2], dtype="float32", nodata=float("nan"),
                      description="change magnitude (CVA, before's units)")
            manifest = build_manifest(
                run_id=run_id, run_dir=stage,
                aoi={"id": aoi.id, "label": aoi.label, "geometry": aoi.geometry.__geo_interface__},
                inputs={"before": before_ref, "after": after_ref}, outputs=names,
                config=config.to_dict(), params=params, steps=steps.records,
                started_utc=started, finished_utc=datetime.now(UTC),
                extra={"grid": {"crs": plan.crs, "bounds": list(plan.bounds), "res_m": plan.res_m},
                       "warnings": [str(w.message) for w in caught
                                    if issubclass(w.category, PipelineWarning)]},
            )
            write_manifest(manifest, stage / "manifest.json")
    caught = [w for w in caught if not issubclass(w.category, DeprecationWarning | PendingDeprecationWarning)]
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return DetectResult(
        run_dir=out / aoi.id / run_id, run_id=run_id, evidence=evidence, coreg=coreg,
        threshold=threshold, grid=plan, steps=steps.records,
        warnings=[str(w.message) for w in caught],
    )
