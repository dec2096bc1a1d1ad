"""pipeline.watch.tasks: the work one site needs, as functions a Dask worker runs.

Two tasks per site: ``list_site`` asks each source what imagery exists (cheap, mostly cached);
``detect_pair`` fetches one before/after pair and runs the detect pipeline, writing an evidence
folder under ``OUT/<site-id>/``. Tasks receive only small descriptions (a ``SiteJob`` or
``PairJob``: the site, source settings, dates) and load their own pixels; they return small
results and never touch the state database, which only the coordinating process writes.

A task never raises: an error becomes part of its result, so one failing site cannot stop the
others. Before detecting, ``detect_pair`` looks for an evidence folder that a killed run
already published for the same pair and parameters, and adopts it instead of redoing the work.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
import warnings
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import dask

from pipeline.config import RunConfig
from pipeline.errors import NoValidDataError, PipelineError
from pipeline.fetch.base import SourceConfig
from pipeline.model import params_hash
from pipeline.watch.findings import Finding, findings_from_geojson
from pipeline.watch.imagery import Imagery, acquisition, imagery_key, list_imagery
from pipeline.watch.sites import WatchSite

__all__ = ["SiteJob", "SiteListing", "PairJob", "PairOutcome", "list_site", "detect_pair",
           "source_for"]

log = logging.getLogger(__name__)


def source_for(site_source_res: float | None, source: SourceConfig) -> SourceConfig:
    """The source with the site's resolution override, if any."""
    if site_source_res is None:
        return source
    return SourceConfig(source.name, source.type, {**source.options, "res_m": site_source_res})


@dataclass(frozen=True)
class SiteJob:
    """What ``list_site`` needs: the site, its sources and what was analysed last."""

    site: WatchSite
    sources: dict[str, SourceConfig]
    config: RunConfig
    offline: bool
    today: date
    last: dict[str, Imagery | None] = field(default_factory=dict)


@dataclass(frozen=True)
class SiteListing:
    """Imagery per source (oldest first), or the error that source gave."""

    site_id: str
    listed: dict[str, list[Imagery]]
    errors: dict[str, str]
    seconds: float


@dataclass(frozen=True)
class PairJob:
    """One detection: a site, a source, the two imagery versions and where evidence goes."""

    analysis_id: int
    site: WatchSite
    source: SourceConfig
    before: Imagery
    after: Imagery
    config: RunConfig
    out_root: Path
    offline: bool
    started_stamp: str  # YYYYMMDDTHHMMSSZ of the pending record: older folders are not adopted


@dataclass(frozen=True)
class PairOutcome:
    """What ``detect_pair`` did: ``done`` (with findings), ``unusable`` or ``failed``."""

    analysis_id: int
    site_id: str
    status: str
    run_dir: str | None = None
    findings: list[Finding] = field(default_factory=list)
    adopted: bool = False
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


def list_site(job: SiteJob) -> SiteListing:
    """List each source's imagery for the site; errors are returned per source."""
    from pipeline.acquire import fetch_context, source_res_m

    start = time.perf_counter()
    context = fetch_context(job.config, offline=job.offline)
    listed: dict[str, list[Imagery]] = {}
    errors: dict[str, str] = {}
    for item in job.site.sources:
        source = source_for(item.res_m, job.sources[item.name])
        last = job.last.get(item.name)
        try:
            # no warnings.catch_warnings here: listings run on threads (not thread-safe);
            # runner.collect_warnings gathers their warnings for the run's summary
            res_m = None if source.type == "local" else (job.config.res_m
                                                         or source_res_m(source))
            listed[item.name] = list_imagery(
                job.site.aoi, source, res_m=res_m, context=context, today=job.today,
                since=last.when if last else None, before=job.site.before)
        except Exception as e:  # noqa: BLE001  (a batch never dies of one site: see module doc)
            errors[item.name] = _describe(e)
    return SiteListing(job.site.id, listed, errors, time.perf_counter() - start)


def detect_pair(job: PairJob) -> PairOutcome:
    """Adopt a published folder for the pair, or fetch the pair and detect."""
    start = time.perf_counter()
    try:
        run_dir = find_published(job)
        adopted = run_dir is not None
        caught: list[str] = []
        if run_dir is None:
            run_dir, caught = _detect(job)
        fc = json.loads((run_dir / "changes.geojson").read_text(encoding="utf-8"))
        return PairOutcome(job.analysis_id, job.site.id, "done", str(run_dir),
                           findings_from_geojson(fc), adopted=adopted, warnings=caught,
                           seconds=time.perf_counter() - start)
    except NoValidDataError as e:
        return PairOutcome(job.analysis_id, job.site.id, "unusable", error=_describe(e),
                           seconds=time.perf_counter() - start)
    except Exception as e:  # noqa: BLE001  (a batch never dies of one site: see module doc)
        log.debug("site %s failed:\n%s", job.site.id, traceback.format_exc())
        return PairOutcome(job.analysis_id, job.site.id, "failed", error=_describe(e),
                           seconds=time.perf_counter() - start)


def find_published(job: PairJob) -> Path | None:
    """A finished evidence folder of this pair and parameters, written since the job began."""
    site_dir = job.out_root / job.site.id
    if not site_dir.is_dir():
        return None
    wanted = params_hash(job.config.params)
    for run_dir in sorted(site_dir.iterdir(), reverse=True):
        if run_dir.name.startswith(".") or run_dir.name[:16] < job.started_stamp:
            continue
        manifest_path = run_dir / "manifest.json"
        if not manifest_path.is_file() or not (run_dir / "changes.geojson").is_file():
            continue
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("params_hash") == wanted and _pair_of(manifest, job.source.type) == (
                job.before.key, job.after.key):
            log.info("site %s: adopting %s, published by an interrupted run", job.site.id,
                     run_dir)
            return run_dir
    return None


def _pair_of(manifest: dict[str, Any], source_type: str) -> tuple[str | None, str | None]:
    """The (before, after) imagery keys of a manifest's inputs."""
    keys: dict[str, set[str | None]] = {"before": set(), "after": set()}
    for ref in manifest.get("inputs", []):
        role = str(ref.get("role") or "").split(":")[0]
        if role in keys:
            keys[role].add(imagery_key(source_type, ref))
    pair = [next(iter(keys[r])) if len(keys[r]) == 1 else None for r in ("before", "after")]
    return pair[0], pair[1]


def _detect(job: PairJob) -> tuple[Path, list[str]]:
    """Fetch the pair, detect, check the imagery is the one asked for."""
    from pipeline.acquire import acquire_pair, fetch_context
    from pipeline.run import detect_scenes

    aoi, source = job.site.aoi, job.source
    before = acquisition(source, job.before, "before", aoi)
    after = acquisition(source, job.after, "after", aoi)
    context = fetch_context(job.config, offline=job.offline)
    # Inside a Dask worker, chunked arrays run on local threads, not back on the cluster.
    with dask.config.set(scheduler="threads"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = detect_scenes(
            aoi, lambda: acquire_pair(aoi, before, after, config=job.config, context=context),
            config=job.config, out_root=job.out_root)
    manifest = json.loads((result.run_dir / "manifest.json").read_text(encoding="utf-8"))
    got = _pair_of(manifest, source.type)
    if got != (job.before.key, job.after.key):
        raise PipelineError(
            f"{source.name} gave imagery {got[0]} / {got[1]} for the pair {job.before.key} / "
            f"{job.after.key} asked for; the evidence in {result.run_dir} is kept but not "
            "recorded. Check the source's listing.")
    return result.run_dir, sorted({str(w.message) for w in caught
                                   if not issubclass(w.category, DeprecationWarning)})


def _describe(error: BaseException) -> str:
    """One line naming the error (pipeline errors carry their own explanation)."""
    if isinstance(error, PipelineError):
        return str(error)
    return f"{type(error).__name__}: {error}"
