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
from pipeline.fetch.base import Scene
from pipeline.model import CoregResult, Evidence, GridPlan, SourceRef, params_hash
from pipeline.report.geojson import evidence_to_features, write_geojson
from pipeline.report.manifest import build_manifest, write_manifest
from pipeline.report.rasters import write_cog
from pipeline.report.rundir import (
    check_out_root,
    new_run_id,
    staged_run_dir,
    unique_run_dir_name,
)

__all__ = ["DetectResult", "run_detect", "detect_scenes", "read_local_pair", "STEPS"]

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


def _check_overlap(before: xr.DataArray, after: xr.DataArray, before_ref: SourceRef,
                   after_ref: SourceRef) -> None:
    both = np.isfinite(before.values).all(axis=0) & np.isfinite(after.values).all(axis=0)
    if not both.any():
        raise NoValidDataError(
            f"The before image {before_ref.path or before_ref.item_id} and the after image "
            f"{after_ref.path or after_ref.item_id} have no valid pixel in "
            f"common inside the AOI: they do not overlap there. Choose images that both cover "
            f"the AOI, or an AOI where they overlap."
        )


def _check_dates(before: date | None, after: date | None) -> None:
    if before and after and before > after:
        raise FetchError(
            f"The before image is dated {before} and the after image {after}: before is later. "
            f"Swap --before and --after (or fix --before-date/--after-date)."
        )


def _summary_ref(scene: Scene, role: str) -> SourceRef:
    """One SourceRef for a scene: the single input itself, or a summary of a composite."""
    if len(scene.refs) == 1:
        return scene.refs[0]
    first = scene.refs[0]
    return SourceRef(
        provider=first.provider,
        item_id=f"composite of {len(scene.refs)}: " + ", ".join(r.item_id for r in scene.refs),
        acquired=scene.acquired, release=first.release, url=first.url, crs=first.crs,
        res_m=first.res_m, date_source="composite",
        extra={"role": role, "items": [r.item_id for r in scene.refs]},
    )


def read_local_pair(
    aoi: Aoi,
    before_path: str | Path,
    after_path: str | Path,
    *,
    config: RunConfig,
    before_date: date | None = None,
    after_date: date | None = None,
) -> tuple[GridPlan, Scene, Scene]:
    """Read two local rasters onto the AOI's UTM grid at the coarser input resolution.

    Returns
    -------
    ``(plan, before, after)``; each scene's data is NumPy-backed ``(band, y, x)`` float32.
    """
    paths = (Path(before_path), Path(after_path))
    infos = [describe_raster(p) for p in paths]
    plan = plan_grid(aoi, config.res_m or common_resolution(infos))
    scenes = []
    for path, role, when in zip(paths, ("before", "after"), (before_date, after_date), strict=True):
        data, ref = read_to_grid(path, plan, role=role, acquired=when, resampling=config.resampling)
        scenes.append(Scene(data=data, refs=[ref], acquired=ref.acquired, info={"path": str(path)}))
    if scenes[0].refs[0].sha256 == scenes[1].refs[0].sha256:
        warnings.warn(
            f"The before and after files are identical (SHA-256 {scenes[0].refs[0].sha256[:12]}…):"
            " no change can be found. Check that --before and --after name different"
            " acquisitions.", PipelineWarning, stacklevel=2)
    return plan, scenes[0], scenes[1]


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
    return detect_scenes(
        aoi,
        lambda: read_local_pair(aoi, before_path, after_path, config=config,
                                before_date=before_date, after_date=after_date),
        config=config, out_root=out_root, progress=progress,
    )


def detect_scenes(
    aoi: Aoi,
    load: Callable[[], tuple[GridPlan, Scene, Scene]],
    *,
    config: RunConfig,
    out_root: str | Path,
    progress: Progress | None = None,
) -> DetectResult:
    """Load a pair of scenes with ``load``, detect, and write the evidence folder.

    ``load`` runs as the ``read`` step (after the output folder is checked, so a bad ``--out``
    fails before any download). Every later stage is the same for every source.
    """
    started = datetime.now(UTC)
    out = check_out_root(out_root)
    steps = _Steps(progress)
    params = config.params
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with steps.step("read") as info:
            plan, before_scene, after_scene = load()
            before_ref = _summary_ref(before_scene, "before")
            after_ref = _summary_ref(after_scene, "after")
            _check_dates(before_ref.acquired, after_ref.acquired)
            before = _mask_outside(before_scene.data, aoi, plan)
            after = _mask_outside(after_scene.data, aoi, plan)
            _check_overlap(before, after, before_ref, after_ref)
            info.update(grid_crs=plan.crs, res_m=plan.res_m, shape=list(plan.shape),
                        before=before_scene.info, after=after_scene.info)
        with steps.step("coregister") as info:
            after, coreg = coregister(before, after, params=params.coreg)
            info.update(dy_px=coreg.dy, dx_px=coreg.dx, peak_ratio=coreg.peak_ratio,
                        applied=coreg.applied, note=coreg.note)
        with steps.step("normalize") as info:
            after = normalize(before, after, method=params.change.normalize)
            info.update(method=params.change.normalize)
        with steps.step("change") as info:
            magnitude = change_magnitude(before, after)
            mask, threshold = change_mask(magnitude, params=params.change, res_m=plan.res_m)
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
        run_id = unique_run_dir_name(out / aoi.id, new_run_id(started, params_hash(params)))
        inputs = {f"{role}:{i}": ref for role, scene in (("before", before_scene),
                                                           ("after", after_scene))
                  for i, ref in enumerate(scene.refs)}
        with steps.step("write"), staged_run_dir(out, aoi.id, run_id) as stage:
            _write_outputs(stage, evidence, mask, magnitude, config=config, run_id=run_id,
                           aoi=aoi, plan=plan, inputs=inputs, steps=steps.records,
                           started=started, caught=caught)
    shown = [w for w in caught
             if not issubclass(w.category, DeprecationWarning | PendingDeprecationWarning)]
    for w in shown:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return DetectResult(
        run_dir=out / aoi.id / run_id, run_id=run_id, evidence=evidence, coreg=coreg,
        threshold=threshold, grid=plan, steps=steps.records,
        warnings=[str(w.message) for w in shown],
    )


def _write_outputs(stage: Path, evidence: list[Evidence], mask: xr.DataArray,
                   magnitude: xr.DataArray, *, config: RunConfig, run_id: str, aoi: Aoi,
                   plan: GridPlan, inputs: dict[str, SourceRef], steps: list[dict[str, Any]],
                   started: datetime, caught: list[warnings.WarningMessage]) -> None:
    """Write the evidence files and, last, the manifest that hashes them."""
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
        inputs=inputs, outputs=names, config=config.to_dict(), params=config.params,
        steps=steps, started_utc=started, finished_utc=datetime.now(UTC),
        extra={"grid": {"crs": plan.crs, "bounds": list(plan.bounds), "res_m": plan.res_m},
               "warnings": [str(w.message) for w in caught
                            if issubclass(w.category, PipelineWarning)]},
    )
    write_manifest(manifest, stage / "manifest.json")
