"""pipeline.report.package: every file of an evidence package, except the manifest.

:func:`write_package` writes, each timed as a processing step: the preserved originals
(their SHA-256 checked against the run's), the chips (read from those checked copies, so the
inputs are not hashed twice), the GeoJSON (whose features name their chips), the two COGs,
the GeoPackage and QGIS style, and the review page. Every later file is built from the
FeatureCollection written to ``changes.geojson``, so all carry the same ids and attributes.
The caller writes the manifest last, from what this returns.

The COGs depend on nothing else: with more than one thread (``report.workers``) they are
written on a thread of their own beside the other steps, which run in order; with one, after
the GeoJSON. The step records keep that order (``WRITE_STEPS``) either way; their
``started_utc`` show the overlap. The copied originals are flushed to disk (fsync) on a
thread of their own too, while the chips and later files are written, and before this
returns. A failure on any side waits for the others to stop before it propagates, so nothing
still writes into the run folder when its removal begins.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import xarray as xr

from pipeline.files import atomic_write_text
from pipeline.model import Evidence, GridPlan, SourceRef
from pipeline.report.chipset import chip_targets, write_chips
from pipeline.report.geojson import evidence_to_features, write_geojson
from pipeline.report.gpkg import layer_geometries, write_gpkg
from pipeline.report.html import REPORT_NAME, write_report
from pipeline.report.originals import flush_copies, preserve_originals
from pipeline.report.rasters import write_cog
from pipeline.report.style import aoi_qml, findings_qml
from pipeline.report.workers import dask_threads

__all__ = ["GPKG_NAME", "QML_NAME", "WRITE_STEPS", "Package", "StepLog", "write_gis_layers",
           "write_package"]

log = logging.getLogger(__name__)

GEOJSON_NAME = "changes.geojson"
MASK_NAME = "change_mask.tif"
MAGNITUDE_NAME = "change_magnitude.tif"
GPKG_NAME = "changes.gpkg"
QML_NAME = "changes.qml"
# the package's steps, in the order of their records
WRITE_STEPS = ("write:originals", "write:chips", "write:geojson", "write:rasters",
               "write:gis_layers", "write:report")


class StepLog:
    """Ordered, timed records of the package's writing steps (for the manifest)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.records: list[dict[str, Any]] = []
        self._clock = clock

    @contextmanager
    def step(self, name: str, **details: Any) -> Iterator[dict[str, Any]]:
        """Time the block; ``details`` (and what the block adds to it) go in the record."""
        started = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        start = self._clock()
        yield details
        self.records.append({"name": name, "seconds": round(self._clock() - start, 3),
                             "started_utc": started, "details": details})


@dataclass(frozen=True)
class Package:
    """What :func:`write_package` wrote: output names, originals, and its timed steps."""

    outputs: list[str]
    originals: list[dict[str, Any]]
    steps: list[dict[str, Any]]
    features: dict[str, Any]


def write_package(stage: Path, evidence: Sequence[Evidence], mask: xr.DataArray,
                  magnitude: xr.DataArray, *, method: str, plan: GridPlan,
                  aoi: Mapping[str, Any], inputs: Mapping[str, SourceRef],
                  resampling: str = "bilinear", run_id: str = "",
                  notes: Sequence[str] = (),
                  images: Mapping[str, xr.DataArray] | None = None,
                  cache_dir: str | Path | None = None,
                  after_originals: Callable[[], None] | None = None) -> Package:
    """Write the evidence files of one run into its staging folder.

    Parameters
    ----------
    stage
        The run's staging folder (``report.rundir.staged_run_dir``).
    evidence
        The findings, geometries in the grid CRS.
    mask, magnitude
        The change mask (uint8, 255 nodata) and magnitude (float32, NaN nodata) on the grid.
    method
        The method line stored in every feature.
    plan
        The working grid.
    aoi
        ``{"id", "label", "geometry"}`` (lon/lat GeoJSON geometry).
    inputs
        The source scenes as read, by ``"<role>:<n>"``.
    resampling
        How inputs were warped onto the grid (chips are read the same way).
    run_id, notes
        The run id and warnings, shown on the review page.
    images
        The pixels of both dates on ``plan`` for the chips (see ``chipset.write_chips``);
        None reads them again from the input files (local inputs only).
    cache_dir
        The download cache of the run, from which fetched tiles are preserved.
    after_originals
        Called once the inputs are copied, before the chips: a chunked run deletes its
        scratch files there (deleting them during the copies slowed the copies, from 7 s to
        18 and 30 s at 20000 px, measured).

    Returns
    -------
    Package
        Output names relative to ``stage``, the originals' entries and the step records.
    """
    steps = StepLog()
    threads = dask_threads()

    def rasters() -> None:
        with steps.step("write:rasters"):
            write_cog(mask, stage / MASK_NAME, dtype="uint8", nodata=255, threads=threads,
                      description="change (1), no change (0), nodata (255)")
            write_cog(magnitude, stage / MAGNITUDE_NAME, dtype="float32", nodata=float("nan"),
                      threads=threads, description="change magnitude (CVA, before's units)")

    outputs = [GEOJSON_NAME, MASK_NAME, MAGNITUDE_NAME]
    with _Beside(rasters, on_thread=threads > 1, name="the rasters") as beside:
        with steps.step("write:originals") as info:
            originals = preserve_originals(stage, inputs, cache_dir=cache_dir, durable=False)
            info.update(preserved=sum(o["path"] is not None for o in originals),
                        not_preserved=sum(o["path"] is None for o in originals))
        if after_originals is not None:
            after_originals()
        beside.check()
        # The copies are flushed to disk on a thread of their own while the steps below
        # write on (an fsync waits for the disk: on the 8446 px bench pair the originals step
        # took 1.1 to 3.1 s with its flush, 0.65 s without in one run); before the manifest.
        with _Beside(functools.partial(flush_copies, stage, originals), on_thread=True,
                     name="the originals' flush") as flush:
            with steps.step("write:chips") as info:
                chips = _chips(stage, evidence, info, plan=plan, resampling=resampling,
                               images=images, originals=originals, threads=threads)
                outputs += [p for paths in chips.values() for p in paths.values()]
            beside.check()
            flush.check()
            with steps.step("write:geojson") as info:
                shown = [replace(e, measurements={**e.measurements, **chips[e.id]})
                         if e.id in chips else e for e in evidence]
                fc = evidence_to_features(shown, method=method)
                write_geojson(fc, stage / GEOJSON_NAME)
                info.update(features=len(fc["features"]))
            beside.run_here()
            with steps.step("write:gis_layers"):
                outputs += write_gis_layers(stage, fc, aoi=aoi)
            beside.check()
            with steps.step("write:report"):
                write_report(stage / REPORT_NAME, fc, run_id=run_id, aoi=aoi, inputs=inputs,
                             notes=notes)
                outputs.append(REPORT_NAME)
    records = sorted(steps.records, key=lambda r: WRITE_STEPS.index(r["name"]))
    return Package(outputs=outputs, originals=originals, steps=records, features=fc)


def _chips(stage: Path, evidence: Sequence[Evidence], info: dict[str, Any], *,
           plan: GridPlan, resampling: str, images: Mapping[str, xr.DataArray] | None,
           originals: list[dict[str, Any]], threads: int) -> dict[str, dict[str, str]]:
    """The write:chips step: chips read from the checked copies of the inputs; ``info``
    gets the step's details."""
    skipped: list[str] = []
    targets = chip_targets(evidence, plan)
    checked = {o["source_path"]: stage / o["path"] for o in originals
               if o["how"] in ("copy", "hardlink")}
    chips = write_chips(stage, targets, evidence, plan=plan, resampling=resampling,
                        images=images, notes=skipped, checked_copies=checked, threads=threads)
    n_change = sum(e.kind == "change" for e in evidence)
    info.update(findings=len(chips), files=sum(len(paths) for paths in chips.values()),
                skipped=skipped,
                change_regions_without_chips=n_change - sum(
                    t.evidence.kind == "change" for t in targets),
                pixels="as handed in" if images is not None else "input files")
    return chips


class _Beside:
    """Runs ``job`` on a thread beside the caller's steps, or, with ``on_thread`` False, on
    the caller's thread where it calls :meth:`run_here`.

    Leaving the block waits for the job, then raises its error; an error of the caller's
    steps also waits for it (so neither side writes after the other failed and the folder's
    removal began) and wins, the job's error being logged.
    """

    def __init__(self, job: Callable[[], None], *, on_thread: bool, name: str) -> None:
        self._job = job
        self._name = name  # for the log, when the job fails after the caller's steps did
        self._pool = (ThreadPoolExecutor(1, thread_name_prefix="sitewatch-write")
                      if on_thread else None)
        self._future: Future[None] | None = None

    def __enter__(self) -> _Beside:
        if self._pool is not None:
            self._future = self._pool.submit(self._job)
        return self

    def check(self) -> None:
        """Raise the job's error now if it has already failed (so the caller stops early)."""
        if self._future is not None and self._future.done():
            self._future.result()

    def run_here(self) -> None:
        """Run the job now when it has no thread of its own; else :meth:`check`."""
        if self._pool is None:
            self._job()
        else:
            self.check()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self._pool is None or self._future is None:
            return
        interrupted: KeyboardInterrupt | None = None
        # Ctrl-C or SIGTERM meanwhile must not leave the job writing into a folder being
        # removed: wait on, and raise it once the job has ended. The wait is on the future: an
        # interrupted Thread.join (pool shutdown) takes the thread for stopped on Python 3.11.
        while True:
            try:
                wait_futures([self._future])
                break
            except KeyboardInterrupt as e:
                interrupted = e
        self._pool.shutdown(wait=True)
        if interrupted is not None and error is None:
            raise interrupted
        failed = self._future.exception()
        if error is None and failed is not None:
            raise failed
        if failed is not None and failed is not error:
            log.warning("While writing the package, %s also failed: %s", self._name, failed)


def write_gis_layers(stage: Path, fc: Mapping[str, Any], *,
                     aoi: Mapping[str, Any] | None) -> list[str]:
    """Write ``changes.gpkg`` (styled layers) and ``changes.qml`` (the GeoJSON's style).

    Returns
    -------
    list of str
        The names written, relative to ``stage``.
    """
    styles = {layer: findings_qml(geometry=family)
              for layer, family in layer_geometries(fc).items()}
    if aoi is not None:
        styles["aoi"] = aoi_qml()
    write_gpkg(fc, stage / GPKG_NAME, aoi=aoi, styles=styles)
    atomic_write_text(stage / QML_NAME, findings_qml(geometry="any"))
    return [GPKG_NAME, QML_NAME]
