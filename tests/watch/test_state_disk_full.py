"""A full disk while writing the watch state (``OUT/watch.db``, SQLite in WAL mode).

The disk fills up through SQLite itself: the state's connection gets ``PRAGMA max_page_count``,
so a write that needs one more page fails with ``SQLITE_FULL``, "database or disk is full" (the
error SQLite gives when the file system returns ENOSPC). The limit is a fraction of the pages an
uninterrupted run of the same sites leaves, so the disk fills at the schema's creation, in the
middle of the run and near its end. Each time the run stops with exit 1 and a one-paragraph
message saying the disk is full (no traceback), the database passes SQLite's integrity check,
no partial evidence folder is left, and the next run (with space again) ends with the findings
of the uninterrupted run.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner
from watch.fake_wayback import sites_geojson
from watch.test_runs import _cli_args, _evidence_dirs, _findings

from pipeline.cli import cli
from pipeline.errors import OutputError
from pipeline.watch.state import STATE_NAME, WatchState

SITES = ["alpha", "bravo"]


def _state_pages(path: Path) -> int:
    with sqlite3.connect(path) as con:
        return int(con.execute("PRAGMA page_count").fetchone()[0])


def _limit_state_pages(monkeypatch: pytest.MonkeyPatch, max_pages: int) -> None:
    """Every connection to a watch.db from now on may grow the database to ``max_pages``."""
    real_connect = sqlite3.connect

    def connect(database, *args, **kwargs):
        con = real_connect(database, *args, **kwargs)
        if Path(database).name == STATE_NAME:
            con.execute(f"PRAGMA max_page_count = {max_pages}")
        return con

    monkeypatch.setattr(sqlite3, "connect", connect)


def test_full_disk_writing_watch_db_stops_cleanly_and_next_run_recovers(
        setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Disk full at 0, 50 and 90% of the state's final size: exit 1 saying the disk is full, an
    intact database, no partial folder; the next run ends with the uninterrupted findings."""
    sites = sites_geojson(tmp_path / "two.geojson", SITES)
    reference = tmp_path / "reference"
    assert CliRunner().invoke(cli, _cli_args(setup, reference, sites)).exit_code == 3
    final_pages = _state_pages(reference / STATE_NAME)
    for fraction in (0.0, 0.5, 0.9):
        out = tmp_path / f"full-{fraction}"
        with monkeypatch.context() as patch:
            _limit_state_pages(patch, max(1, int(fraction * final_pages)))
            full = CliRunner().invoke(cli, _cli_args(setup, out, sites))
        assert full.exit_code == 1, (fraction, full.output)
        assert isinstance(full.exception, SystemExit), fraction  # a message, no traceback
        assert "Cannot write the watch state" in full.stderr, (fraction, full.stderr)
        assert "disk is full" in full.stderr and "Traceback" not in full.output, fraction
        with sqlite3.connect(out / STATE_NAME) as con:
            assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok", fraction
        assert not [p for p in out.rglob("*") if p.name.endswith((".partial", ".tmp"))]
        for site in SITES:
            for run_dir in _evidence_dirs(out, site) if (out / site).exists() else []:
                assert (run_dir / "manifest.json").is_file(), (fraction, run_dir)
        again = CliRunner().invoke(cli, _cli_args(setup, out, sites))
        assert again.exit_code in (0, 3), (fraction, again.output)
        assert _findings(out) == _findings(reference), fraction
        for site in SITES:
            assert len(_evidence_dirs(out, site)) == 1, (fraction, site)


def test_watch_state_that_is_not_a_database_is_an_output_error(tmp_path: Path) -> None:
    """A watch.db that is not SQLite (a stray or damaged file) is an OutputError naming it."""
    path = tmp_path / STATE_NAME
    path.write_bytes(b"not a database, " * 64)
    with pytest.raises(OutputError, match=r"Cannot write the watch state .*watch\.db"):
        WatchState(path)
    assert path.read_bytes() == b"not a database, " * 64
