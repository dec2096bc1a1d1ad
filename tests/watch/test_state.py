"""The state database, finding ids that persist, and the run lock."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, date, datetime

import pytest
from shapely.geometry import box, mapping

from pipeline.aoi import parse_aoi
from pipeline.watch.findings import Finding, KnownFinding, match_findings
from pipeline.watch.imagery import Imagery, choose_pair
from pipeline.watch.lock import LockHeldError, StateLock
from pipeline.watch.sites import SiteSource, WatchSite
from pipeline.watch.state import WatchState

NOW = datetime(2026, 1, 1, tzinfo=UTC)
CRS = "EPSG:32645"


def _square(lon: float, lat: float, size_deg: float = 0.001) -> dict:
    return mapping(box(lon, lat, lon + size_deg, lat + size_deg))


def _finding(fid: str, kind: str, geometry: dict, score: float = 0.5) -> Finding:
    return Finding(fid, kind, score, 1000.0, geometry)


def test_match_by_overlap_and_kind():
    """Same kind and overlapping: matched; other kind or apart: new; one id per finding."""
    known = [KnownFinding("s-0001", "compound", _square(88.0, 43.0)),
             KnownFinding("s-0002", "new_building", _square(88.01, 43.0))]
    new = [_finding("a", "compound", _square(88.0002, 43.0)),       # 80 % overlap
           _finding("b", "compound", _square(88.0001, 43.0)),       # overlaps s-0001 more
           _finding("c", "compound", _square(88.01, 43.0)),         # right place, other kind
           _finding("d", "new_building", _square(88.05, 43.0))]     # elsewhere
    assert match_findings(new, known, crs=CRS) == [None, "s-0001", None, None]


def _match_every_pair(new, known, *, crs):
    """match_findings with its intersecting pairs found as they were: every new finding
    tested against every known one."""
    from pipeline.watch.findings import _assign, _project, _scored

    new_geoms = [_project(f.geometry, crs=crs) for f in new]
    known_geoms = [_project(k.geometry, crs=crs) for k in known]
    intersecting = [(i, j) for i, geom in enumerate(new_geoms)
                    for j, other in enumerate(known_geoms) if geom.intersects(other)]
    return _assign(_scored(intersecting, new, new_geoms, known, known_geoms), known, len(new))


def test_match_same_as_testing_every_pair():
    """Matched through the spatial index as by testing every pair: many overlapping
    findings of three kinds, ties of score, touching squares, no known or no new ones."""
    import numpy as np

    rng = np.random.default_rng(12)
    kinds = ["compound", "new_building", "change"]

    def squares(n, prefix):
        out = []
        for k in range(n):
            lon, lat = 88.0 + rng.uniform(0, 0.02), 43.0 + rng.uniform(0, 0.02)
            size = float(rng.choice([0.001, 0.002, 0.0005]))
            out.append((f"{prefix}{k}", str(rng.choice(kinds)), _square(lon, lat, size)))
        out.append((f"{prefix}edge", "compound", _square(88.05, 43.05)))  # touching squares
        return out

    known = [KnownFinding(i, kind, g) for i, kind, g in squares(300, "k")]
    new = [_finding(i, kind, g, score=float(rng.choice([0.5, 0.7])))
           for i, kind, g in squares(200, "n")]
    new.append(_finding("touch", "compound", _square(88.051, 43.05)))
    expected = _match_every_pair(new, known, crs=CRS)
    assert match_findings(new, known, crs=CRS) == expected
    assert sum(e is not None for e in expected) > 20
    assert match_findings(new, [], crs=CRS) == [None] * len(new)
    assert match_findings([], known, crs=CRS) == []


def _site() -> WatchSite:
    return WatchSite(parse_aoi("88.29,43.38", radius_m=500), (SiteSource("src"),))


def test_persisting_finding_keeps_its_id_and_gains_history(tmp_path):
    """A finding seen again by a later analysis keeps its id; times_seen and history grow."""
    site = _site()
    older, old, new = (Imagery("1", date(2017, 1, 1)), Imagery("2", date(2018, 1, 1)),
                       Imagery("3", date(2019, 1, 1)))
    with WatchState(tmp_path / "watch.db") as state:
        run = state.start_run(NOW, pid=1, scheduler="sync")
        state.sync_sites([site], NOW)
        state.record_listing(site.id, "src", [older, old, new], NOW)
        first = state.add_pending(run, site.id, "src", older, old, "h", NOW)
        ids, _ = state.complete_analysis(first["id"], "run1", [
            _finding("f1", "compound", _square(88.29, 43.38)),
            _finding("f2", "new_building", _square(88.292, 43.38))], NOW, crs=CRS)
        assert ids == [f"{site.id}-0001", f"{site.id}-0002"]
        assert state.last_analysed(site.id, "src") == old
        second = state.add_pending(run, site.id, "src", old, new, "h", NOW)
        ids2, continued = state.complete_analysis(second["id"], "run2", [
            _finding("g1", "compound", _square(88.2901, 43.38), score=0.9)], NOW, crs=CRS)
        assert ids2 == [] and continued == [f"{site.id}-0001"]
        again = state.complete_analysis(second["id"], "run2", [], NOW, crs=CRS)
        assert again == ([], [])  # recording an analysis twice changes nothing
        compound = state.findings(site.id)[0]
    assert compound["times_seen"] == 2 and compound["score"] == 0.9
    assert [h["run_dir"] for h in compound["history"]] == ["run1", "run2"]


def test_pending_analysis_survives_and_is_found_again(tmp_path):
    """A pending analysis (a killed run's) is still pending when the database is reopened."""
    site = _site()
    a, b = Imagery("1", date(2017, 1, 1)), Imagery("2", date(2018, 1, 1))
    with WatchState(tmp_path / "watch.db") as state:
        run = state.start_run(NOW, pid=1, scheduler="sync")
        state.sync_sites([site], NOW)
        state.record_listing(site.id, "src", [a, b], NOW)
        row = state.add_pending(run, site.id, "src", a, b, "h", NOW)
    with WatchState(tmp_path / "watch.db") as state:
        assert [r["id"] for r in state.pending(site.id)] == [row["id"]]
        assert state.is_due(site, NOW)
        later = state.add_pending(2, site.id, "src", a, b, "h", datetime(2027, 1, 1, tzinfo=UTC))
        assert later["id"] == row["id"] and later["started_utc"] == row["started_utc"]


def test_choose_pair_newest_against_last_or_baseline():
    """After the last analysed, the newest wins; a first run takes the before window's."""
    listed = [Imagery(str(y), date(y, 6, 1)) for y in (2015, 2017, 2019, 2021)]
    assert choose_pair(listed, last=listed[1], before=None) == (listed[1], listed[3])
    assert choose_pair(listed, last=listed[3], before=None) == (listed[3], None)
    from pipeline.fetch.base import DateWindow

    window = DateWindow(date(2017, 1, 1), date(2017, 12, 31))
    assert choose_pair(listed, last=None, before=window) == (listed[1], listed[3])
    assert choose_pair(listed, last=None, before=None) == (listed[0], listed[3])
    early = DateWindow(date(2010, 1, 1), date(2010, 12, 31))
    assert choose_pair(listed, last=None, before=early) == (None, None)


def test_stale_lock_of_dead_process_is_taken_over(tmp_path):
    """A lock file left by a process that died is taken over and its pid reported."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    pid = int(dead.stdout)
    path = tmp_path / "watch.lock"
    path.write_text(f"pid {pid} host elsewhere since 2026-01-01T00:00:00Z\n")
    with StateLock(path) as lock:
        assert lock.stale_pid == pid
        assert path.read_text().startswith(f"pid {os.getpid()} ")
    assert path.read_text() == ""


def test_live_lock_is_refused_with_its_pid(tmp_path):
    """While another process holds the lock, acquiring it fails naming that process."""
    path = tmp_path / "watch.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pipeline.watch.lock import StateLock; "
         f"lock = StateLock({str(path)!r}).acquire(); print('held', flush=True); "
         "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockHeldError, match=f"pid {holder.pid} "):
            StateLock(path).acquire()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    with StateLock(path) as lock:  # released when the holder exited
        assert lock.stale_pid == holder.pid


def test_an_analysis_events_are_found_by_index(tmp_path):
    """The run's new-finding list reads one analysis's events through an index (not a scan
    of the whole history, which grows with every analysis); a state database made before the
    index gains it when opened."""
    path = tmp_path / "watch.db"
    query = "SELECT finding_id, feature_id FROM finding_events WHERE analysis_id = ?"
    with WatchState(path) as state:
        plan = " ".join(str(tuple(r)) for r in
                        state.db.execute("EXPLAIN QUERY PLAN " + query, (1,)).fetchall())
        assert "USING INDEX finding_events_analysis" in plan, plan
        state.db.execute("DROP INDEX finding_events_analysis")  # as made before the index
    with WatchState(path) as state:
        names = {r[0] for r in state.db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index'").fetchall()}
        assert "finding_events_analysis" in names
