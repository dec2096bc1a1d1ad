"""pipeline.watch.runner: one watch run over every due site, on Dask or in process.

The coordinating process holds the lock and is the only writer of the state database. For each
due site it submits a ``list_site`` task; when the listing comes back it records the imagery,
chooses for each source the newest new imagery against the last analysed one, records that
analysis as ``pending`` (committed before any work starts) and submits a ``detect_pair`` task;
when that comes back it records the findings (matched to the site's known ones) in one
transaction. A site with pending analyses left by a killed run resumes them instead of listing.

Where tasks run (``pipeline.watch.pools``): listings on a few threads of this process;
detections on Dask, started at the first one: ``"local"`` a ``LocalCluster`` of one
single-threaded worker process per CPU (at most one per due site), a ``tcp://host:port`` address
that Dask cluster (its workers must see the same data folder and cache paths); ``"sync"`` runs
every task in this process, one after the other (tests, debugging).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from shapely.geometry import shape

from pipeline.aoi import utm_crs
from pipeline.config import RunConfig
from pipeline.errors import PipelineWarning
from pipeline.fetch.base import SourceConfig
from pipeline.model import params_hash
from pipeline.report.rundir import check_out_root
from pipeline.watch.imagery import Imagery, choose_pair
from pipeline.watch.lock import StateLock
from pipeline.watch.pools import TaskPool, check_scheduler, open_pool
from pipeline.watch.sites import WatchSite
from pipeline.watch.state import STATE_NAME, WatchState, utc_text
from pipeline.watch.summary import SiteReport, WatchSummary
from pipeline.watch.tasks import (
    PairJob,
    PairOutcome,
    SiteJob,
    SiteListing,
    detect_pair,
    list_site,
    source_for,
)

__all__ = ["run_watch", "collect_warnings", "LOCK_NAME"]

log = logging.getLogger(__name__)

LOCK_NAME = "watch.lock"
Progress = Callable[[int, int], None]


def run_watch(sites: Sequence[WatchSite], *, config: RunConfig,
              sources: Mapping[str, SourceConfig], out_root: str | Path,
              scheduler: str = "local", force: bool = False, offline: bool = False,
              now: datetime | None = None, progress: Progress | None = None,
              invalid: Sequence[str] = ()) -> WatchSummary:
    """Check every due site for new imagery and detect on what is new.

    Parameters
    ----------
    sites
        From ``watch.sites.load_watch_sites``.
    config
        Detection parameters and fetch settings (cache, timeouts).
    sources
        The configured sources the sites name.
    out_root
        The data folder: evidence in ``<site-id>/<run-id>/``, state in ``watch.db``.
    scheduler
        ``"local"``, ``"sync"`` or a Dask scheduler address (see the module docstring).
    force
        Check every site now, whatever its ``every``.
    offline
        Use only the download cache.
    now
        The run's time (default: the clock); decides which sites are due.
    progress
        Called as ``progress(sites_done, sites_due)``.
    invalid
        Messages of watch-file features that could not be read (``load_watch_sites(...,
        invalid=[])``): each is reported as a failed site.

    Returns
    -------
    WatchSummary

    Raises
    ------
    ConfigError
        ``scheduler`` is not ``"local"``, ``"sync"`` or an address.
    ClusterError
        The Dask cluster could not be started or reached (the run's pending analyses are
        resumed by the next run).
    LockHeldError
        Another run holds the lock.
    OutputError
        ``out_root`` is not writable.
    """
    check_scheduler(scheduler)
    out = check_out_root(out_root)
    now = now or datetime.now(UTC)
    with StateLock(out / LOCK_NAME) as lock, WatchState(out / STATE_NAME) as state:
        if lock.stale_pid is not None:
            log.warning("Took over the lock of watch run pid %d, which is no longer running; "
                        "its unfinished work is resumed.", lock.stale_pid)
        run_id = state.start_run(now, pid=os.getpid(), scheduler=scheduler)
        state.sync_sites(sites, now)
        due = [s for s in sites if force or state.is_due(s, now)]
        log.info("%d of %d site(s) due", len(due), len(sites))
        coordinator = _Coordinator(state, run_id, config, dict(sources), out, offline, now)
        caught: list[dict[str, Any]] = []
        if due:
            with collect_warnings(caught), open_pool(scheduler, len(due)) as pool:
                coordinator.run(due, pool, progress)
        summary = WatchSummary(
            run_id, utc_text(now), utc_text(datetime.now(UTC)), str(state.path), scheduler,
            [coordinator.reports.get(s.id, SiteReport(s.id, s.name)) for s in sites]
            + [SiteReport(f"invalid-{i + 1}", "(invalid feature)", status="failed",
                          errors=[message]) for i, message in enumerate(invalid)],
            coordinator.new_findings, lock.stale_pid, caught)
        state.finish_run(run_id, datetime.now(UTC), summary.to_dict())
    return summary


@contextlib.contextmanager
def collect_warnings(into: list[dict[str, Any]]) -> Iterator[None]:
    """Collect the warnings raised in this process while the block runs (the listings on
    their threads; a detection's own are kept with its site) instead of printing each as it
    comes: ``into`` gets each distinct one once, ``{kind, message, count}``, in order of first
    appearance, for the summary (printed once at the end, not with -q). Deprecation warnings
    are left out, as for detections."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # count every one, not the first per code line
        try:
            yield
        finally:
            counts: dict[tuple[str, str], int] = {}  # dicts keep the first appearance's order
            for w in caught:
                if issubclass(w.category, DeprecationWarning):
                    continue
                kind = "warning" if issubclass(w.category, PipelineWarning) else w.category.__name__
                key = (kind, str(w.message))
                counts[key] = counts.get(key, 0) + 1
            into.extend({"kind": kind, "message": message, "count": count}
                        for (kind, message), count in counts.items())


@dataclass
class _Coordinator:
    """Turns task results into state changes and further tasks."""

    state: WatchState
    run_id: int
    config: RunConfig
    sources: dict[str, SourceConfig]
    out: Path
    offline: bool
    now: datetime
    reports: dict[str, SiteReport] = field(default_factory=dict)
    new_findings: list[dict[str, Any]] = field(default_factory=list)
    _open: dict[str, int] = field(default_factory=dict)
    _sites: dict[str, WatchSite] = field(default_factory=dict)

    def run(self, due: list[WatchSite], pool: TaskPool, progress: Progress | None) -> None:
        """Submit every due site and handle results until no task is left."""
        done = 0
        for site in due:
            self._sites[site.id] = site
            self.reports[site.id] = SiteReport(site.id, site.name, status="ok")
            self._open[site.id] = 0
            pending = self.state.pending(site.id)
            if pending:
                log.info("site %s: resuming %d unfinished analysis(es)", site.id, len(pending))
                for row in pending:
                    self._submit_pair(pool, site, row)
            else:
                self._submit(pool, site.id, list_site, self._site_job(site), heavy=False)
        if progress:
            progress(0, len(due))
        while pool.busy():
            job, result = pool.next_done()
            site_id = job.site.id
            self._open[site_id] -= 1
            if isinstance(result, SiteListing):
                self._on_listing(pool, self._sites[site_id], result)
            elif isinstance(result, PairOutcome):
                self._on_outcome(result)
            else:  # the task itself died (worker killed, unpicklable result): the site failed
                self._fail(site_id, f"task failed: {type(result).__name__}: {result}")
                if isinstance(job, PairJob):
                    self.state.end_analysis(job.analysis_id, self.now, status="failed",
                                            error=str(result))
            if self._open[site_id] == 0:
                report = self.reports[site_id]
                self.state.mark_checked(site_id, datetime.now(UTC),
                                        error="; ".join(report.errors) or None)
                done += 1
                if progress:
                    progress(done, len(due))

    def _submit(self, pool: TaskPool, site_id: str, fn: Callable[[Any], Any], job: Any, *,
                heavy: bool) -> None:
        self._open[site_id] += 1
        pool.submit(fn, job, heavy=heavy)

    def _site_job(self, site: WatchSite) -> SiteJob:
        last = {s.name: self.state.last_analysed(site.id, s.name) for s in site.sources}
        return SiteJob(site, {s.name: self.sources[s.name] for s in site.sources}, self.config,
                       self.offline, self.now.date(), last)

    def _on_listing(self, pool: TaskPool, site: WatchSite, listing: SiteListing) -> None:
        """Record the imagery; record and submit one pending analysis per source with news."""
        report = self.reports[site.id]
        report.seconds += listing.seconds
        for name, error in listing.errors.items():
            self._fail(site.id, f"{name}: {error}")
        for name, listed in listing.listed.items():
            report.new_imagery += self.state.record_listing(site.id, name, listed, self.now)
            last = self.state.last_analysed(site.id, name)
            unusable = self.state.unusable(site.id, name)
            usable = [i for i in listed if i.key not in unusable]
            base, after = choose_pair(usable, last=last, before=site.before)
            if base is None:
                log.info("site %s: %s lists no usable baseline imagery", site.id, name)
                continue
            if after is None:
                if last is None:
                    self.state.set_imagery_status(site.id, name, [base.key], "baseline")
                continue
            row = self.state.add_pending(self.run_id, site.id, name, base, after,
                                         params_hash(self.config.params), self.now)
            if row["status"] == "pending":  # a pair already done is never redone
                self._submit_pair(pool, site, row)

    def _submit_pair(self, pool: TaskPool, site: WatchSite, row: Any) -> None:
        """Submit the detect task of a pending analysis row."""
        item = next((s for s in site.sources if s.name == row["source"]), None)
        if item is None or row["source"] not in self.sources:
            self.state.end_analysis(row["id"], self.now, status="failed",
                                    error="source no longer configured for the site")
            return
        listed = {i.key: i for i in self._known_imagery(site.id, row["source"])}
        if row["before_key"] not in listed or row["after_key"] not in listed:
            self.state.end_analysis(row["id"], self.now, status="failed",
                                    error="its imagery is no longer in the state database")
            self._fail(site.id, f"{row['source']}: analysis {row['id']} lost its imagery")
            return
        stamp = row["started_utc"].replace("-", "").replace(":", "")
        job = PairJob(row["id"], site, source_for(item.res_m, self.sources[item.name]),
                      listed[row["before_key"]], listed[row["after_key"]], self.config,
                      self.out, self.offline, stamp)
        self._submit(pool, site.id, detect_pair, job, heavy=True)

    def _known_imagery(self, site_id: str, source: str) -> list[Imagery]:
        rows = self.state.db.execute("SELECT key, day, label FROM imagery WHERE site_id = ? AND "
                                     "source = ?", (site_id, source))
        return [Imagery(r["key"], date.fromisoformat(r["day"]), r["label"] or "") for r in rows]

    def _on_outcome(self, outcome: PairOutcome) -> None:
        """Record a detection's findings, or why there are none."""
        report = self.reports[outcome.site_id]
        report.seconds += outcome.seconds
        if outcome.status == "done":
            site = self._sites[outcome.site_id]
            new_ids, continued = self.state.complete_analysis(
                outcome.analysis_id, outcome.run_dir or "", outcome.findings, datetime.now(UTC),
                crs=utm_crs(site.aoi))
            report.analyses += 1
            report.adopted += int(outcome.adopted)
            report.run_dirs.append(outcome.run_dir or "")
            report.warnings += outcome.warnings
            report.new_findings += new_ids
            report.continued_findings += continued
            self._note_new(site, outcome, new_ids)
        elif outcome.status == "unusable":
            report.unusable += 1
            self.state.end_analysis(outcome.analysis_id, self.now, status="unusable",
                                    error=outcome.error)
            log.warning("site %s: imagery unusable, skipped for good: %s", outcome.site_id,
                        outcome.error)
        else:
            self.state.end_analysis(outcome.analysis_id, self.now, status="failed",
                                    error=outcome.error)
            self._fail(outcome.site_id, outcome.error or "unknown error")

    def _note_new(self, site: WatchSite, outcome: PairOutcome, new_ids: list[str]) -> None:
        """Add the new findings to the run's list, with a lon/lat point for each."""
        by_feature = {f.feature_id: f for f in outcome.findings}
        rows = self.state.db.execute(
            "SELECT finding_id, feature_id FROM finding_events WHERE analysis_id = ?",
            (outcome.analysis_id,)).fetchall()
        wanted = set(new_ids)
        for row in rows:
            if row["finding_id"] not in wanted or row["feature_id"] not in by_feature:
                continue
            finding = by_feature[row["feature_id"]]
            point = shape(finding.geometry).representative_point()
            self.new_findings.append({
                "id": row["finding_id"], "site": site.name, "kind": finding.kind,
                "score": finding.score, "area_m2": finding.area_m2,
                "lon": round(point.x, 6), "lat": round(point.y, 6),
                "run_dir": outcome.run_dir})

    def _fail(self, site_id: str, error: str) -> None:
        report = self.reports[site_id]
        report.status = "failed"
        report.errors.append(error)
        log.warning("site %s failed (retried next run): %s", site_id, error)
