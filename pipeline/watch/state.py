"""pipeline.watch.state: the watch state in one SQLite database (``OUT/watch.db``).

Tables (all times UTC ISO 8601):

- ``sites``: each watched site, its geometry (GeoJSON), schedule and last check;
- ``imagery``: every imagery version a source listed for a site, with ``status`` ``seen``,
  ``baseline`` (the first run's before, or a lone first imagery), ``analysed`` or ``unusable``;
- ``runs``: one row per watch run, its summary when it ended;
- ``analyses``: one detection (site, source, before key, after key, parameters hash) with
  ``status`` ``pending`` (recorded before the work starts), ``done``, ``failed``,
  ``unusable``; a pending analysis left by a killed run is resumed by the next;
- ``findings``: one row per finding with a stable id (``<site>-0001``), its latest outline and
  figures, how often it was seen and an analyst ``status`` (``open`` by default);
- ``finding_events``: the history: each analysis that saw a finding, with that run's figures.

The database runs in WAL mode; every change is one transaction (``with state.transaction()``),
so a killed run leaves the state as of its last commit. A write SQLite refuses (a full disk, an
unwritable folder, a file that is not a database) rolls its transaction back and is an
``OutputError`` saying so: the state stays as of the last commit, and the next run resumes
from there.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator, Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from pipeline.errors import OutputError
from pipeline.files import is_disk_full
from pipeline.watch.findings import Finding, KnownFinding, match_findings
from pipeline.watch.imagery import Imagery
from pipeline.watch.sites import WatchSite

__all__ = ["WatchState", "STATE_NAME", "utc_text"]

STATE_NAME = "watch.db"
SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sites (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, geometry TEXT NOT NULL, every_s REAL NOT NULL,
    sources TEXT NOT NULL, notes TEXT, first_seen_utc TEXT NOT NULL,
    last_checked_utc TEXT, last_status TEXT, last_error TEXT, failures INTEGER DEFAULT 0);
CREATE TABLE IF NOT EXISTS imagery (
    site_id TEXT NOT NULL, source TEXT NOT NULL, key TEXT NOT NULL, day TEXT NOT NULL,
    label TEXT, status TEXT NOT NULL DEFAULT 'seen', first_seen_utc TEXT NOT NULL,
    PRIMARY KEY (site_id, source, key));
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, started_utc TEXT NOT NULL, finished_utc TEXT,
    pid INTEGER, scheduler TEXT, status TEXT NOT NULL, summary TEXT);
CREATE TABLE IF NOT EXISTS analyses (
    id INTEGER PRIMARY KEY AUTOINCREMENT, run_id INTEGER NOT NULL, site_id TEXT NOT NULL,
    source TEXT NOT NULL, before_key TEXT NOT NULL, after_key TEXT NOT NULL,
    params_hash TEXT NOT NULL, status TEXT NOT NULL, run_dir TEXT, error TEXT,
    started_utc TEXT NOT NULL, finished_utc TEXT,
    UNIQUE (site_id, source, before_key, after_key, params_hash));
CREATE TABLE IF NOT EXISTS findings (
    id TEXT PRIMARY KEY, site_id TEXT NOT NULL, kind TEXT NOT NULL, geometry TEXT NOT NULL,
    score REAL, area_m2 REAL, first_analysis INTEGER NOT NULL, last_analysis INTEGER NOT NULL,
    first_seen_utc TEXT NOT NULL, last_seen_utc TEXT NOT NULL, times_seen INTEGER NOT NULL,
    status TEXT NOT NULL DEFAULT 'open');
CREATE TABLE IF NOT EXISTS finding_events (
    finding_id TEXT NOT NULL, analysis_id INTEGER NOT NULL, feature_id TEXT, score REAL,
    area_m2 REAL, geometry TEXT NOT NULL, run_dir TEXT, seen_utc TEXT NOT NULL,
    PRIMARY KEY (finding_id, analysis_id));
CREATE INDEX IF NOT EXISTS findings_site ON findings (site_id);
CREATE INDEX IF NOT EXISTS finding_events_analysis ON finding_events (analysis_id);
"""


def utc_text(when: datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SSZ`` of an aware datetime."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class WatchState:
    """The state database of one data folder; use as a context manager to close it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        except sqlite3.OperationalError as e:  # cannot open the file at all
            raise _state_error(self.path, e) from e
        try:
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            with self.transaction() as db:
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    db.execute(statement)
                db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                           (str(SCHEMA_VERSION),))
        except OutputError:
            self.db.close()
            raise
        except sqlite3.DatabaseError as e:
            self.db.close()
            if not _is_refusal(e):
                raise
            raise _state_error(self.path, e) from e

    def close(self) -> None:
        """Close the connection (WAL content is checkpointed into the file)."""
        self.db.close()

    def __enter__(self) -> WatchState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``); rolled back on any error.

        Raises
        ------
        OutputError
            SQLite refused a write (full disk, unwritable folder, not a database).
        """
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self._rollback()
                raise
            self.db.execute("COMMIT")
        except sqlite3.DatabaseError as e:
            self._rollback()
            if not _is_refusal(e):
                raise
            raise _state_error(self.path, e) from e

    def _rollback(self) -> None:
        # SQLite may already have rolled back (SQLITE_FULL does); a failed rollback leaves
        # the transaction to be discarded when the connection closes
        if self.db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")

    # --- runs -----------------------------------------------------------------------------

    def start_run(self, now: datetime, *, pid: int, scheduler: str) -> int:
        """Record a run; runs left ``running`` by a dead process become ``interrupted``."""
        with self.transaction() as db:
            db.execute("UPDATE runs SET status = 'interrupted' WHERE status = 'running'")
            cur = db.execute("INSERT INTO runs (started_utc, pid, scheduler, status) "
                             "VALUES (?, ?, ?, 'running')", (utc_text(now), pid, scheduler))
            return int(cur.lastrowid or 0)

    def finish_run(self, run_id: int, now: datetime, summary: dict[str, Any]) -> None:
        """Close a run with its summary."""
        with self.transaction() as db:
            db.execute("UPDATE runs SET finished_utc = ?, status = 'done', summary = ? "
                       "WHERE id = ?", (utc_text(now), json.dumps(summary), run_id))

    # --- sites ----------------------------------------------------------------------------

    def sync_sites(self, sites: Sequence[WatchSite], now: datetime) -> None:
        """Insert new sites and update the definition of known ones."""
        with self.transaction() as db:
            for site in sites:
                values = (site.name, json.dumps(site.aoi.geometry.__geo_interface__),
                          site.every.total_seconds(),
                          json.dumps([s.label() for s in site.sources]), site.notes)
                db.execute(
                    "INSERT INTO sites (id, name, geometry, every_s, sources, notes, "
                    "first_seen_utc) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                    "name = excluded.name, geometry = excluded.geometry, every_s = "
                    "excluded.every_s, sources = excluded.sources, notes = excluded.notes",
                    (site.id, *values, utc_text(now)))

    def is_due(self, site: WatchSite, now: datetime) -> bool:
        """Never checked, failed last time, has a pending analysis, or ``every`` has passed."""
        row = self.db.execute("SELECT last_checked_utc, last_status FROM sites WHERE id = ?",
                              (site.id,)).fetchone()
        if row is None or row["last_checked_utc"] is None or row["last_status"] != "ok":
            return True
        if self.pending(site.id):
            return True
        last = datetime.fromisoformat(row["last_checked_utc"].replace("Z", "+00:00"))
        return now - last >= site.every

    def mark_checked(self, site_id: str, now: datetime, *, error: str | None) -> None:
        """Record a site's check: ``ok``, or ``failed`` with the error (retried next run)."""
        with self.transaction() as db:
            db.execute("UPDATE sites SET last_checked_utc = ?, last_status = ?, last_error = ?, "
                       "failures = CASE WHEN ? IS NULL THEN 0 ELSE failures + 1 END "
                       "WHERE id = ?", (utc_text(now), "failed" if error else "ok", error,
                                        error, site_id))

    # --- imagery --------------------------------------------------------------------------

    def last_analysed(self, site_id: str, source: str) -> Imagery | None:
        """The newest imagery already analysed (or taken as baseline) for a site and source."""
        row = self.db.execute(
            "SELECT key, day, label FROM imagery WHERE site_id = ? AND source = ? AND status IN "
            "('analysed', 'baseline') ORDER BY day DESC, key DESC LIMIT 1",
            (site_id, source)).fetchone()
        return Imagery(row["key"], date.fromisoformat(row["day"]), row["label"] or "") \
            if row else None

    def record_listing(self, site_id: str, source: str, listed: Sequence[Imagery],
                       now: datetime) -> int:
        """Remember listed imagery; return how many versions were not known before."""
        with self.transaction() as db:
            before = db.total_changes
            db.executemany(
                "INSERT OR IGNORE INTO imagery (site_id, source, key, day, label, "
                "first_seen_utc) VALUES (?, ?, ?, ?, ?, ?)",
                [(site_id, source, i.key, i.when.isoformat(), i.label, utc_text(now))
                 for i in listed])
            return db.total_changes - before

    def set_imagery_status(self, site_id: str, source: str, keys: Sequence[str],
                           status: str) -> None:
        """Mark imagery ``baseline``, ``analysed`` or ``unusable``."""
        with self.transaction() as db:
            db.executemany("UPDATE imagery SET status = ? WHERE site_id = ? AND source = ? AND "
                           "key = ?", [(status, site_id, source, k) for k in keys])

    def unusable(self, site_id: str, source: str) -> set[str]:
        """Keys of imagery found unusable (no clear pixel), never tried again."""
        rows = self.db.execute("SELECT key FROM imagery WHERE site_id = ? AND source = ? AND "
                               "status = 'unusable'", (site_id, source))
        return {r["key"] for r in rows}

    # --- analyses -------------------------------------------------------------------------

    def pending(self, site_id: str) -> list[sqlite3.Row]:
        """Analyses of a site recorded but never finished (a killed run's work)."""
        return self.db.execute("SELECT * FROM analyses WHERE site_id = ? AND status = "
                               "'pending' ORDER BY id", (site_id,)).fetchall()

    def add_pending(self, run_id: int, site_id: str, source: str, before: Imagery,
                    after: Imagery, params_hash: str, now: datetime) -> sqlite3.Row:
        """Record an analysis before it starts (or return the same one, if recorded).

        A recorded one keeps its first ``started_utc``: evidence folders published since then
        by a killed run are adopted by the next.
        """
        with self.transaction() as db:
            db.execute(
                "INSERT INTO analyses (run_id, site_id, source, before_key, after_key, "
                "params_hash, status, started_utc) VALUES (?, ?, ?, ?, ?, ?, 'pending', ?) "
                "ON CONFLICT DO UPDATE SET run_id = excluded.run_id, status = 'pending', "
                "error = NULL WHERE status != 'done'",
                (run_id, site_id, source, before.key, after.key, params_hash, utc_text(now)))
            return db.execute(
                "SELECT * FROM analyses WHERE site_id = ? AND source = ? AND before_key = ? "
                "AND after_key = ? AND params_hash = ?",
                (site_id, source, before.key, after.key, params_hash)).fetchone()

    def end_analysis(self, analysis_id: int, now: datetime, *, status: str,
                     error: str | None = None) -> None:
        """Close an analysis as ``failed`` or ``unusable`` (the after imagery too, if so)."""
        with self.transaction() as db:
            db.execute("UPDATE analyses SET status = ?, error = ?, finished_utc = ? WHERE id = ?",
                       (status, error, utc_text(now), analysis_id))
            if status == "unusable":
                db.execute("UPDATE imagery SET status = 'unusable' WHERE (site_id, source, key) "
                           "IN (SELECT site_id, source, after_key FROM analyses WHERE id = ?)",
                           (analysis_id,))

    def complete_analysis(self, analysis_id: int, run_dir: str, found: Sequence[Finding],
                          now: datetime, *, crs: str) -> tuple[list[str], list[str]]:
        """Record a finished analysis and its findings in one transaction.

        Returns ``(new finding ids, continued finding ids)``; an analysis already done
        returns two empty lists and changes nothing.
        """
        with self.transaction() as db:
            row = db.execute("SELECT * FROM analyses WHERE id = ?", (analysis_id,)).fetchone()
            if row is None or row["status"] == "done":
                return [], []
            site_id, stamp = row["site_id"], utc_text(now)
            known = [KnownFinding(r["id"], r["kind"], json.loads(r["geometry"])) for r in
                     db.execute("SELECT id, kind, geometry FROM findings WHERE site_id = ?",
                                (site_id,))]
            matches = match_findings(found, known, crs=crs)
            counter = db.execute("SELECT COUNT(*) FROM findings WHERE site_id = ?",
                                 (site_id,)).fetchone()[0]
            new_ids, continued = [], []
            for finding, match in zip(found, matches, strict=True):
                geometry = json.dumps(finding.geometry)
                if match is None:
                    counter += 1
                    match = f"{site_id}-{counter:04d}"
                    db.execute("INSERT INTO findings VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, "
                               "'open')", (match, site_id, finding.kind, geometry, finding.score,
                                           finding.area_m2, analysis_id, analysis_id, stamp,
                                           stamp))
                    new_ids.append(match)
                else:
                    continued.append(match)
                db.execute("UPDATE findings SET geometry = ?, score = ?, area_m2 = ?, "
                           "last_analysis = ?, last_seen_utc = ?, times_seen = times_seen + 1 "
                           "WHERE id = ?", (geometry, finding.score, finding.area_m2,
                                            analysis_id, stamp, match))
                db.execute("INSERT OR IGNORE INTO finding_events VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                           (match, analysis_id, finding.feature_id, finding.score,
                            finding.area_m2, geometry, run_dir, stamp))
            db.execute("UPDATE analyses SET status = 'done', run_dir = ?, finished_utc = ?, "
                       "error = NULL WHERE id = ?", (run_dir, stamp, analysis_id))
            db.execute("UPDATE imagery SET status = 'analysed' WHERE site_id = ? AND source = ? "
                       "AND key IN (?, ?)", (site_id, row["source"], row["before_key"],
                                             row["after_key"]))
            return new_ids, continued

    # --- reading --------------------------------------------------------------------------

    def findings(self, site_id: str | None = None) -> list[dict[str, Any]]:
        """Every finding (of one site), oldest first, with its history."""
        query = "SELECT * FROM findings" + (" WHERE site_id = ?" if site_id else "")
        rows = self.db.execute(query + " ORDER BY site_id, id",
                               (site_id,) if site_id else ()).fetchall()
        out = []
        for r in rows:
            history = self.db.execute("SELECT analysis_id, feature_id, score, run_dir, seen_utc "
                                      "FROM finding_events WHERE finding_id = ? ORDER BY "
                                      "analysis_id", (r["id"],)).fetchall()
            out.append({**dict(r), "geometry": json.loads(r["geometry"]),
                        "history": [dict(h) for h in history]})
        return out

    def count(self, table: str) -> int:
        """Rows in a table (for summaries and tests)."""
        if table not in ("sites", "imagery", "runs", "analyses", "findings", "finding_events"):
            raise ValueError(f"unknown table {table!r}")
        return int(self.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


_REFUSALS = frozenset({sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_READONLY,
                       sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT,
                       sqlite3.SQLITE_PERM})


def _is_refusal(error: sqlite3.DatabaseError) -> bool:
    """Whether SQLite refused because of the file or the disk (full, read-only, I/O, not a
    database), not because of a bug (a constraint, "no such column", a syntax error)."""
    code = getattr(error, "sqlite_errorcode", None)
    if code is None:  # raised by Python's module itself, not by SQLite
        return False
    return code & 0xFF in _REFUSALS  # the primary result code of an extended one


def _state_error(path: Path, error: sqlite3.DatabaseError) -> OutputError:
    """The one-paragraph error for a write SQLite refused, with the fix."""
    if is_disk_full(error):
        fix = "The disk is full: free some space there, or choose another --out"
    else:
        fix = ("Check that the folder is writable and that the file is the watch state of "
               "this data folder, or choose another --out")
    return OutputError(f"Cannot write the watch state {path}: {error}. {fix}. Nothing of the "
                       "unfinished step was recorded; the next run resumes from the last "
                       "completed one.")
