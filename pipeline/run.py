"""pipeline.run: one detect run, from two local images and an AOI to an evidence folder.

The orchestration the CLI calls: plan the grid, read both dates, co-register, normalize,
compute change, detect sites, and write the evidence atomically. Each stage is timed and
recorded in the manifest.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Literal

import dask
import dask.array
import dask.threaded
import numpy as np
import rasterio
import xarray as xr
from threadpoolctl import threadpool_limits

import pipeline
from pipeline.acquire import warn_if_identical
from pipeline.aoi import Aoi, plan_grid
from pipeline.building_model import building_model as load_building_model
from pipeline.building_model import cnn_mask, found_by, network_label
from pipeline.config import RunConfig
from pipeline.core.change import change_magnitude, change_mask
from pipeline.core.components import Regions, label_regions
from pipeline.core.coreg import coregister
from pipeline.core.radiometry import normalize
from pipeline.detect.cnn_change import check_cnn_input
from pipeline.detect.sites import detect_sites
from pipeline.errors import OutputError, PipelineWarning
from pipeline.fetch.base import Scene
from pipeline.fetch.local import (
    chunk_origin,
    common_resolution,
    describe_raster,
    grid_chunks,
    read_to_grid,
)
from pipeline.files import is_disk_full
from pipeline.inputs import check_dates, check_validity, mask_outside, validity
from pipeline.model import (
    EVIDENCE_ORDER,
    CoregResult,
    DetectParams,
    Evidence,
    GridPlan,
    SourceRef,
    params_hash,
)
from pipeline.models import CnnModel
from pipeline.report.manifest import (
    MANIFEST_NAME,
    build_manifest,
    write_manifest,
    write_manifest_digest,
)
from pipeline.report.package import write_package
from pipeline.report.rundir import (
    check_out_root,
    new_run_id,
    staged_run_dir,
    unique_run_dir_name,
)

__all__ = ["DetectResult", "run_detect", "detect_scenes", "read_local_pair", "STEPS"]

log = logging.getLogger(__name__)

STEPS = ("read", "coregister", "normalize", "change", "detect", "write")
# GDAL's block cache during a run, in MB. Its default, 5 % of RAM (1.2 GB on a 24 GB machine),
# filled up while the COG writer built the change magnitude's overviews: 12288 x 12288 float32
# written with peak RSS 1022 MB by default, 331 MB with 128 MB (and no slower). Rasters are
# read and written block by block, so a small cache is enough.
GDAL_CACHE_MB = 128
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
        started = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        start = time.perf_counter()
        yield details
        seconds = time.perf_counter() - start
        self.records.append({"name": name, "seconds": round(seconds, 3), "started_utc": started,
                             "details": details})
        log.info("%s done in %.2f s", name, seconds)


def _method_label(cfg: RunConfig, cnn: CnnModel | None = None) -> str:
    p = cfg.params
    label = (
        f"sitewatch {pipeline.__version__}: phase-correlation coregistration, "
        f"{p.change.normalize} normalization, change vector analysis, "
        f"{p.change.threshold_method} threshold, texture-gain compounds"
    )
    return label if cnn is None else f"{label}; {network_label(cnn)}"


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
    chunks: int | None | Literal["auto"] = "auto",
) -> tuple[GridPlan, Scene, Scene]:
    """Read two local rasters onto the AOI's UTM grid at the coarser input resolution.

    ``chunks`` is passed to `read_to_grid`; ``"auto"`` reads grids above ``CHUNKED_MIN_PX``
    pixels lazily in ``CHUNK_PX`` chunks (see `grid_chunks`) and smaller ones whole.

    Returns
    -------
    ``(plan, before, after)``; each scene's data is ``(band, y, x)`` float32, NumPy-backed, or
    Dask-backed and lazy when chunked.
    """
    paths = (Path(before_path), Path(after_path))
    infos = [describe_raster(p) for p in paths]
    plan = plan_grid(aoi, config.res_m or common_resolution(infos))
    chunk_px = grid_chunks(plan) if chunks == "auto" else chunks
    # chunk borders on the files' tiles when both are on the plan's pixel grid
    origin = chunk_origin(paths, plan, chunk_px) if chunk_px else (0, 0)
    scenes = []
    for path, role, when in zip(paths, ("before", "after"), (before_date, after_date), strict=True):
        # a chunked read is checked for valid pixels by detect_scenes, in its own single pass
        data, ref = read_to_grid(path, plan, role=role, acquired=when, resampling=config.resampling,
                                 chunks=chunk_px, check_nodata=chunk_px is None,
                                 chunk_origin=origin)
        scenes.append(Scene(data=data, refs=[ref], acquired=ref.acquired, info={"path": str(path)}))
    warn_if_identical(scenes[0], scenes[1])
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
    chunks: int | None | Literal["auto"] = "auto",
    building_model: CnnModel | None = None,
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
    chunks
        Chunk size in pixels for a lazy, chunked run (bounded memory), None for an in-memory
        run, ``"auto"`` to chunk grids above ``CHUNKED_MIN_PX`` pixels. Same results.
    building_model
        With ``buildings.model = "cnn"``: the network to use instead of the shipped one
        (`pipeline.models.load_cnn`; e.g. a fold network in `pipeline.evaluate`).

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
                                before_date=before_date, after_date=after_date, chunks=chunks),
        config=config, out_root=out_root, progress=progress, building_model=building_model,
    )


def detect_scenes(
    aoi: Aoi,
    load: Callable[[], tuple[GridPlan, Scene, Scene]],
    *,
    config: RunConfig,
    out_root: str | Path,
    progress: Progress | None = None,
    building_model: CnnModel | None = None,
) -> DetectResult:
    """Load a pair of scenes with ``load``, detect, and write the evidence folder.

    ``load`` runs as the ``read`` step (after the output folder is checked, so a bad ``--out``
    fails before any download). Every later stage is the same for every source. Scenes whose
    data are Dask arrays are processed chunk by chunk, so memory stays bounded (the change
    mask's connected components are merged across chunk borders, `label_regions`, so neither
    the mask nor its labels are held whole; small cell grids are): intermediate rasters read
    more than once (the masked inputs, the normalized after image, the magnitude, the mask,
    chunk labels, the grey images, the wall maps) are kept as one file per chunk in a
    temporary folder (``TMPDIR``; up to about 70 bytes a pixel at its peak, measured), removed
    at the end; the peak goes in the detect step's ``scratch_peak_mb``. NumPy scenes are
    processed in memory (their arrays are masked in place). Both give the same evidence.

    With ``buildings.model = "cnn"`` the change mask (written, and the one new buildings and
    change regions are extracted from) is the network's (``building_model``, else the shipped
    one) on before and the co-registered after, by its card's decision rule
    (`pipeline.detect.cnn_change`); the change vector magnitude and threshold are still
    computed and written, and give the objects' contrast.
    """
    started = datetime.now(UTC)
    out = check_out_root(out_root)
    steps = _Steps(progress)
    params = config.params
    cnn = load_building_model(params.buildings, building_model)
    # One BLAS thread: the run's own work already fills the cores (Dask threads), and OpenBLAS
    # threads spinning beside them made the co-registration's small matrix products (skimage's
    # upsampled DFT) 5x slower in wall time and 7x in CPU on the shared 2-core machine.
    # GDAL's block cache bounded (`GDAL_CACHE_MB`; a GDAL_CACHEMAX the user set wins).
    with (warnings.catch_warnings(record=True) as caught,
          _scratch_folder() as scratch,
          _threaded_scheduler(),
          threadpool_limits(limits=1, user_api="blas"),
          rasterio.Env(GDAL_CACHEMAX=os.environ.get("GDAL_CACHEMAX", GDAL_CACHE_MB))):
        warnings.simplefilter("always")
        with steps.step("read") as info:
            before, after, plan, refs, inputs = _read(load, aoi, info, scratch,
                                                      check=params.buildings if cnn else None)
            before_ref, after_ref = refs
            # chips of fetched imagery come from the pixels as read (local files are read
            # again by the writer): kept for in-memory scenes only, one more array at most
            as_read = ({"before": before, "after": after}
                       if not (before_ref.path and after_ref.path)
                       and not isinstance(before.data, dask.array.Array) else None)
        with steps.step("coregister") as info:
            read_after = after
            after, coreg = coregister(before, after, params=params.coreg)
            info.update(dy_px=coreg.dy, dx_px=coreg.dx, peak_ratio=coreg.peak_ratio,
                        uncertainty_px=(coreg.uncertainty_px
                                        if np.isfinite(coreg.uncertainty_px) else None),
                        applied=coreg.applied, note=coreg.note)
        with steps.step("normalize") as info:
            # the network reads the co-registered after as read, not normalized: kept for it
            raw = (after, read_after) if cnn is not None else None
            after = _normalized(before, after, read_after, method=params.change.normalize,
                                scratch=scratch, keep_read=raw is not None)
            del read_after
            info.update(method=params.change.normalize)
        with steps.step("change") as info:
            magnitude, mask, threshold, changed_share = _change(
                before, after, params=params.change, res_m=plan.res_m, scratch=scratch)
            info.update(threshold=threshold, method=params.change.threshold_method,
                        changed_share=changed_share)
            if raw is not None and cnn is not None:
                mask, info["building_model"] = cnn_mask(
                    before, raw[0], mask, cnn, res_m=plan.res_m, scratch=scratch,
                    flips=params.buildings.mirrorings)
                info["cva_changed_share"] = changed_share
                info["changed_share"] = info["building_model"].pop("changed_share")
                if after.data is not raw[1].data:  # else it is the normalized after
                    scratch.drop(raw[1])
                raw = None
        with steps.step("detect") as info:
            timings: dict[str, float] = {}  # detect sub-steps (objects, compounds, walls, grade)
            changes = _change_pixels(mask, scratch, timings)
            evidence = detect_sites(
                before.data, after.data, changes, magnitude.data, transform=plan.transform,
                crs=plan.crs, threshold=threshold, params=params, before_ref=before_ref,
                after_ref=after_ref, timings=timings, persist=scratch.keep,
                found_by=found_by(cnn),
            )
            info.update({k: sum(e.kind == k for e in evidence) for k in EVIDENCE_ORDER})
            info["seconds_by_part"] = timings
            info["scratch_peak_mb"] = round(scratch.peak_bytes / 2**20, 1)
        del before, after, changes  # only the magnitude and the mask are written from here
        run_id = unique_run_dir_name(out / aoi.id, new_run_id(started, params_hash(params)))
        with steps.step("write"), staged_run_dir(out, aoi.id, run_id) as stage:
            _write_outputs(stage, evidence, mask, magnitude, config=config, run_id=run_id,
                           aoi=aoi, plan=plan, inputs=inputs, steps=steps.records,
                           started=started, caught=caught, images=as_read, cnn=cnn,
                           # the other stored rasters' files are deleted while the chips and
                           # rasters are written (at 8446 px their removal took 1.85-3.1 s
                           # after the write, on this thread)
                           release=functools.partial(scratch.drop_all_but, magnitude, mask))
        del as_read
    shown = [w for w in caught
             if not issubclass(w.category, DeprecationWarning | PendingDeprecationWarning)]
    for w in shown:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return DetectResult(
        run_dir=out / aoi.id / run_id, run_id=run_id, evidence=evidence, coreg=coreg,
        threshold=threshold, grid=plan, steps=steps.records,
        warnings=[str(w.message) for w in shown],
    )


def _normalized(before: xr.DataArray, after: xr.DataArray, read: xr.DataArray, *,
                method: Any, scratch: _Scratch, keep_read: bool = False) -> xr.DataArray:
    """The normalize stage: after (co-registered) matched to before (stored when chunked).

    The after image as read (``read``, stored by the read stage) is then deleted, unless
    ``keep_read`` (the network reads the co-registered after later): from here it is read
    only through the stored result (12 bytes a pixel of scratch for 3 bands).
    """
    after = scratch.keep(normalize(before, after, method=method))
    if after.data is not read.data and not keep_read:
        scratch.drop(read)
    return after


def _change(before: xr.DataArray, after: xr.DataArray, *, params: Any, res_m: float,
            scratch: _Scratch) -> tuple[xr.DataArray, xr.DataArray, float, float]:
    """The change stage: ``(magnitude, mask, threshold, changed share)``.

    Chunked, the magnitude and the mask are stored; the smoothed magnitude (read three times)
    and the size filter's chunk labels, which the mask is computed from, only for the stage.
    """
    magnitude = scratch.keep(change_magnitude(before, after))
    stored: list[Any] = []

    def persist(data: Any) -> Any:
        stored.append(scratch.keep(data))
        return stored[-1]

    mask, threshold = change_mask(magnitude, params=params, res_m=res_m, persist=persist)
    mask, (changed,) = scratch.keep(mask, also=((mask.data == 1).sum(),))
    scratch.drop(*stored)
    return magnitude, mask, threshold, float(changed) / max(1, mask.size)


def _change_pixels(mask: xr.DataArray, scratch: _Scratch,
                   timings: dict[str, float]) -> np.ndarray | Regions:
    """The change mask as `detect_sites` takes it: NumPy whole, or chunked `Regions`.

    Chunked, the change pixels are labelled chunk by chunk and merged across chunk borders
    (`label_regions`; the chunk labels stored), so neither the mask nor its labels are held
    whole: the detector reads the windows it needs. Seconds go to ``timings["label"]``.
    """
    if not isinstance(mask.data, dask.array.Array):
        return np.asarray(mask.data)
    start = time.perf_counter()
    regions = label_regions(mask.data == 1, connectivity=2, persist=scratch.keep)
    timings["label"] = round(time.perf_counter() - start, 3)
    return regions


class _Writes:
    """Chunk writes in flight. When one write of a store fails, Dask raises at once while the
    other threads' writes go on; the store waits for them, so that none creates a file in the
    scratch folder after its removal began (which left a chunk file behind)."""

    def __init__(self) -> None:
        self._count = 0
        self._idle = threading.Condition()

    @contextmanager
    def one(self) -> Iterator[None]:
        with self._idle:
            self._count += 1
        try:
            yield
        finally:
            with self._idle:
                self._count -= 1
                self._idle.notify_all()

    def wait(self, timeout_s: float) -> None:
        """Return when no write is in flight, or after ``timeout_s``."""
        with self._idle:
            self._idle.wait_for(lambda: self._count == 0, timeout_s)


_IN_FLIGHT = _Writes()
_WRITE_WAIT_S = 120.0  # a chunk write is at most a few hundred MB


def _save_block(block: np.ndarray, prefix: str, block_info: dict | None = None) -> np.ndarray:
    """Write one chunk to ``<prefix>-<i>-<j>....npy``; a one-element marker stands for it."""
    index = block_info[0]["chunk-location"] if block_info else (0,) * block.ndim
    with _IN_FLIGHT.one():
        np.save(f"{prefix}-{'-'.join(map(str, index))}.npy", block, allow_pickle=False)
    return np.zeros((1,) * block.ndim, np.uint8)


class _Scratch:
    """Per-run folder holding intermediate Dask arrays, one ``.npy`` file per chunk.

    A chunked run reads its intermediate rasters several times (statistics, threshold, objects,
    texture, the written magnitude): recomputing them would read, shift and map the inputs each
    time; holding them would make memory grow with the AOI. Written with plain file writes,
    they live in the page cache or on disk, not in the process. NumPy data pass through.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.count = 0
        # Dask name of a stored array -> its files' prefix and its bytes
        self.files: dict[str, tuple[str, int]] = {}
        self.peak_bytes = 0  # the most bytes stored at once (chunk files' data, no headers)
        self._deleting: list[threading.Thread] = []  # threads deleting dropped arrays' files

    def keep(self, *items: Any, also: tuple = ()) -> Any:
        """Store the Dask-backed ``items`` (arrays or DataArrays) in one pass over their inputs.

        Returns the items (same types, coords and attrs) now reading their chunks back from
        files; with ``also`` (further Dask results computed in the same pass), ``(items,
        computed also)``. A single item comes back alone.
        """
        arrays = [_data(i) for i in items]
        lazy = [a for a in arrays
                if isinstance(a, dask.array.Array) and a.name not in self.files]
        prefixes = []
        for _ in lazy:
            self.count += 1
            prefixes.append(str(self.folder / f"array{self.count}"))
        # meta given: otherwise Dask calls _save_block on an empty array to learn the
        # output type, which wrote an empty chunk file under the first chunk's name
        writes = [dask.array.map_blocks(_save_block, arr, prefix=prefix, dtype=np.uint8,
                                        chunks=tuple((1,) * len(c) for c in arr.chunks),
                                        meta=np.empty((0,) * arr.ndim, np.uint8))
                  for arr, prefix in zip(lazy, prefixes, strict=True)]
        try:
            computed = dask.compute(*writes, *also)
        except BaseException as e:
            _IN_FLIGHT.wait(_WRITE_WAIT_S)
            if not (isinstance(e, OSError) and is_disk_full(e)):
                raise
            raise OutputError(
                f"The scratch folder {self.folder.parent} is full ({e.strerror}): a chunked "
                "run keeps its intermediate rasters there, up to about 70 bytes a pixel. Free "
                "space there, or point TMPDIR at a disk with room, and run again.") from e
        stored = {}
        for arr, prefix in zip(lazy, prefixes, strict=True):
            stored[id(arr)] = _load_blocks(prefix, arr.chunks, arr.dtype)
            self.files[stored[id(arr)].name] = (prefix, int(arr.nbytes))
        self.peak_bytes = max(self.peak_bytes, sum(n for _, n in self.files.values()))
        out = []
        for item, arr in zip(items, arrays, strict=True):
            data = stored.get(id(arr), arr)
            if isinstance(item, xr.DataArray):
                out.append(item if data is arr else item.copy(data=data, deep=False))
            else:
                out.append(data)
        result = out[0] if len(out) == 1 else out
        return (result, computed[len(writes):]) if also else result

    def drop(self, *items: Any) -> None:
        """Delete the files of stored items no longer needed (others are ignored).

        The files are deleted on a thread of their own (freeing their pages takes seconds
        for large rasters); `wait` joins it.
        """
        self._delete([self.files.pop(_name(item), (None, 0))[0] for item in items])

    def drop_all_but(self, *items: Any) -> None:
        """`drop` every stored array but ``items``; nothing when one of them is a lazy array
        not stored here (it may read the others)."""
        kept = {_name(item) for item in items}
        if any(isinstance(_data(item), dask.array.Array) and _name(item) not in self.files
               for item in items):
            return
        self._delete([self.files.pop(name)[0] for name in list(self.files) if name not in kept])

    def _delete(self, prefixes: list[str | None]) -> None:
        names = [Path(p).name for p in prefixes if p is not None]
        if names:
            thread = threading.Thread(target=_delete_chunks, args=(self.folder, names),
                                      name="sitewatch-scratch-delete", daemon=True)
            thread.start()
            self._deleting.append(thread)

    def wait(self) -> None:
        """Return once the files of dropped arrays are deleted."""
        while self._deleting:
            self._deleting.pop().join()


def _data(item: Any) -> Any:
    """The array of a DataArray, or the item itself."""
    return item.data if isinstance(item, xr.DataArray) else item


def _name(item: Any) -> str:
    """The Dask name of a stored array or DataArray (``""`` for NumPy data)."""
    return str(getattr(_data(item), "name", ""))


def _delete_chunks(folder: Path, names: list[str]) -> None:
    """Delete the chunk files of the stored arrays ``names`` (`_Scratch` file prefixes).

    A file that cannot be deleted is left to the folder's removal at the end of the run,
    which reports it.
    """
    for name in names:
        for path in folder.glob(f"{name}-*.npy"):
            with contextlib.suppress(OSError):
                path.unlink()


class _SchedulerSetting:
    """Dask's threaded scheduler named by its function, and the rechunk method "tasks", for
    runs on the threaded scheduler (none chosen, or "threads") while dask.distributed is not
    imported. Calling it gives the context manager a run is wrapped in.

    Otherwise dask imports dask.distributed to look for an active Client: when it looks the
    scheduler up by name, and in every rechunk with no method configured. No Client can be
    active unless distributed was imported, so the run is the same: the threaded scheduler
    with the ``num_workers`` configured, and "tasks", which dask's rechunk chooses when there
    is no Client. Any other choice is left as is. Importing distributed took 0.77 s here; the
    first window search of the co-registration of a 1024 px run took 0.55 s with the lookup,
    0.25 s without (measured). The run's other Dask calls are written not to import it either
    (the synchronous scheduler named by its function, no Dask array in a delayed call).

    Dask's configuration is global: runs that overlap in threads share one setting, made by
    the first to start and undone by the last to end. Undone by each run, in whatever order
    they ended, a setting could outlive them all (a later run would restore it).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs = 0
        self._setting: Any = None

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._runs == 0:
                self._setting = self._make()
            self._runs += 1
        try:
            yield
        finally:
            with self._lock:
                self._runs -= 1
                if self._runs == 0 and self._setting is not None:
                    self._setting.__exit__(None, None, None)
                    self._setting = None

    @staticmethod
    def _make() -> Any:
        """The setting made (dask.config.set applies it at once), or None to leave it."""
        chosen = dask.config.get("scheduler", None)
        if "distributed" in sys.modules or chosen not in (None, "threads", "threading"):
            return None
        settings: dict[str, Any] = {"scheduler": dask.threaded.get}
        if dask.config.get("array.rechunk.method", None) is None:
            settings["array.rechunk.method"] = "tasks"
        return dask.config.set(settings)


_threaded_scheduler = _SchedulerSetting()


@contextmanager
def _scratch_folder() -> Iterator[_Scratch]:
    """A `_Scratch` in a new temporary folder, removed (with whatever is left in it) once
    its deletions are done."""
    with tempfile.TemporaryDirectory(prefix="sitewatch-scratch-") as folder:
        scratch = _Scratch(Path(folder))
        try:
            yield scratch
        finally:
            scratch.wait()


def _load_block(path: str) -> np.ndarray:
    """One stored chunk, memory-mapped read-only: no copy, pages come from the page cache.

    A plain ``np.load`` copies every chunk into fresh memory at each read (measured: 39 ms for
    a 3 x 2048 x 2048 float32 chunk, against 7 ms to map and sum it).
    """
    return np.asarray(np.load(path, mmap_mode="r"))


def _load_blocks(prefix: str, chunks: tuple[tuple[int, ...], ...], dtype: Any
                 ) -> dask.array.Array:
    """Lazy array of the chunk files `_save_block` wrote (each task reads its own file)."""
    load = dask.delayed(_load_block, pure=True)
    blocks = np.empty(tuple(len(c) for c in chunks), dtype=object)
    for index in np.ndindex(blocks.shape):
        shape = tuple(c[i] for c, i in zip(chunks, index, strict=True))
        path = f"{prefix}-{'-'.join(map(str, index))}.npy"
        blocks[index] = dask.array.from_delayed(load(path), shape, dtype=dtype)
    return dask.array.block(blocks.tolist())


def _read(load: Callable[[], tuple[GridPlan, Scene, Scene]], aoi: Aoi, info: dict[str, Any],
          scratch: _Scratch, *, check: Any = None
          ) -> tuple[xr.DataArray, xr.DataArray, GridPlan, tuple[SourceRef, SourceRef],
                     dict[str, SourceRef]]:
    """The read stage: both scenes masked to the AOI, their provenance, the overlap checked.

    Only the masked arrays are kept (chunked ones in ``scratch``): the scenes are dropped here.
    ``check`` (`BuildingParams` of a run with the network): grid and bands are checked
    before any pixel is processed.
    """
    plan, before_scene, after_scene = load()
    if check is not None:
        for scene in (before_scene, after_scene):
            check_cnn_input(plan.res_m, scene.data.sizes["band"], max_res_m=check.max_res_m)
    refs = (_summary_ref(before_scene, "before"), _summary_ref(after_scene, "after"))
    check_dates(refs[0].acquired, refs[1].acquired)
    inputs = {f"{role}:{i}": ref for role, scene in (("before", before_scene),
                                                       ("after", after_scene))
              for i, ref in enumerate(scene.refs)}
    chunked = isinstance(before_scene.data.data, dask.array.Array)
    info.update(grid_crs=plan.crs, res_m=plan.res_m, shape=list(plan.shape),
                before=before_scene.info, after=after_scene.info,
                chunks=list(before_scene.data.data.chunksize[-2:]) if chunked else None)
    before = mask_outside(before_scene.data, aoi, plan)
    after = mask_outside(after_scene.data, aoi, plan)
    del before_scene, after_scene
    # chunked: the masked inputs are stored and checked in one pass over the files
    (before, after), valid = scratch.keep(before, after, also=validity(before, after))
    check_validity(valid, *refs)
    return before, after, plan, refs, inputs


# The parameter sections (DetectParams) each detection step used, for the manifest's steps.
_STEP_PARAMS = {"coregister": ("coreg",), "normalize": ("change",),
                "change": ("change", "buildings"),
                "detect": ("objects", "walls", "towers", "grade")}


def _with_params(steps: list[dict[str, Any]], params: DetectParams) -> list[dict[str, Any]]:
    """Each step record with the parameters it ran with (``params``), where it has any."""
    sections = params.to_dict()
    # ``buildings`` is only in the parameters when the network is on (`DetectParams.to_dict`)
    return [{**s, "params": {k: sections[k] for k in _STEP_PARAMS[s["name"]] if k in sections}}
            if s.get("name") in _STEP_PARAMS else s for s in steps]


def _write_outputs(stage: Path, evidence: list[Evidence], mask: xr.DataArray,
                   magnitude: xr.DataArray, *, config: RunConfig, run_id: str, aoi: Aoi,
                   plan: GridPlan, inputs: dict[str, SourceRef], steps: list[dict[str, Any]],
                   started: datetime, caught: list[warnings.WarningMessage],
                   images: dict[str, xr.DataArray] | None = None,
                   cnn: CnnModel | None = None,
                   release: Callable[[], None] | None = None) -> None:
    """Write the evidence package and, last, the manifest that hashes it (and its digest).

    ``images`` (``{"before": da, "after": da}`` on ``plan``, as read, before normalization)
    gives the chips their pixels; without it they are read again from the input files, so a
    run from fetched sources gets no chips (the manifest's write:chips step says so).
    ``release`` is called once the inputs are copied (`write_package`'s ``after_originals``).
    """
    aoi_dict = {"id": aoi.id, "label": aoi.label, "geometry": aoi.geometry.__geo_interface__}
    notes = [str(w.message) for w in caught if issubclass(w.category, PipelineWarning)]
    package = write_package(stage, evidence, mask, magnitude, method=_method_label(config, cnn),
                            plan=plan, aoi=aoi_dict, inputs=inputs, resampling=config.resampling,
                            run_id=run_id, notes=notes, images=images,
                            cache_dir=config.cache_dir, after_originals=release)
    manifest = build_manifest(
        run_id=run_id, run_dir=stage, aoi=aoi_dict, inputs=inputs, outputs=package.outputs,
        originals=package.originals, config=config.to_dict(), params=config.params,
        steps=[*_with_params(steps, config.params), *package.steps], started_utc=started,
        finished_utc=datetime.now(UTC),
        extra={"grid": {"crs": plan.crs, "bounds": list(plan.bounds), "res_m": plan.res_m},
               "warnings": notes},
    )
    write_manifest(manifest, stage / MANIFEST_NAME)
    write_manifest_digest(stage)
