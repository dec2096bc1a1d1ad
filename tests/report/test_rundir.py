"""Tests for pipeline.report.rundir."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from pipeline.errors import OutputError
from pipeline.report.rundir import (
    check_out_root,
    new_run_id,
    partial_dir_name,
    staged_run_dir,
    unique_run_dir_name,
)

NOW = datetime(2026, 11, 25, 10, 46, 22, 123456, tzinfo=UTC)
RUN_ID = "20261125T104622Z-abcdef12"


def _tree(root: Path) -> list[str]:
    """Every path under root, relative, sorted."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def test_new_run_id_format() -> None:
    """The id is the UTC second plus the first 8 characters of the params hash."""
    assert new_run_id(NOW, "abcdef1234567890") == RUN_ID
    other_zone = NOW.astimezone(timezone(timedelta(hours=-5)))
    assert new_run_id(other_zone, "abcdef1234567890") == RUN_ID


@pytest.mark.parametrize(("now", "digest"), [(datetime(2026, 1, 1), "abcdef12"), (NOW, "ab/../cd")])
def test_new_run_id_rejects_bad_input(now: datetime, digest: str) -> None:
    """Naive times and unsafe hashes raise ValueError."""
    with pytest.raises(ValueError):
        new_run_id(now, digest)


def test_unique_run_dir_name_steps_around_existing(tmp_path: Path) -> None:
    """Taken names (finished or partial) get -2, -3, ...; a missing parent is fine."""
    assert unique_run_dir_name(tmp_path / "nope", RUN_ID) == RUN_ID
    (tmp_path / RUN_ID).mkdir()
    assert unique_run_dir_name(tmp_path, RUN_ID) == f"{RUN_ID}-2"
    (tmp_path / partial_dir_name(f"{RUN_ID}-2")).mkdir()
    assert unique_run_dir_name(tmp_path, RUN_ID) == f"{RUN_ID}-3"


def test_staged_run_dir_success_renames(tmp_path: Path) -> None:
    """Writes go to a hidden partial folder that becomes OUT/<aoi>/<run_id> on success."""
    out = tmp_path / "out"
    with staged_run_dir(out, "dabancheng", RUN_ID) as stage:
        assert stage == out / "dabancheng" / f".{RUN_ID}.partial"
        (stage / "evidence.geojson").write_text("{}")
        assert not (out / "dabancheng" / RUN_ID).exists()
    assert _tree(out) == [
        "dabancheng",
        f"dabancheng/{RUN_ID}",
        f"dabancheng/{RUN_ID}/evidence.geojson",
    ]


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_staged_run_dir_exception_removes_partial(tmp_path: Path, error: BaseException) -> None:
    """On an error (or Ctrl-C) the partial folder is deleted and the error propagates."""
    out = tmp_path / "out"
    with pytest.raises(type(error)):
        with staged_run_dir(out, "dabancheng", RUN_ID) as stage:
            (stage / "sub").mkdir()
            (stage / "sub" / "half.tif").write_bytes(b"half")
            raise error
    assert _tree(out) == ["dabancheng"]


def test_staged_run_dir_out_root_under_file(tmp_path: Path) -> None:
    """An out root that cannot be created (its parent is a file) is an OutputError."""
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(OutputError, match=r"file\.txt/out.*--out"):
        with staged_run_dir(blocker / "out", "dabancheng", RUN_ID):
            pytest.fail("the block must not run")
    assert blocker.read_text() == "x"


def test_check_out_root_creates_folder(tmp_path: Path) -> None:
    """A missing out root is created, and the write probe leaves nothing behind."""
    out = check_out_root(tmp_path / "a" / "b")
    assert out.is_dir() and list(out.iterdir()) == []


@pytest.mark.parametrize("aoi_id", ["../x", "..", ".", "a/b", "", ".hidden", "a b", "x\n"])
def test_staged_run_dir_rejects_unsafe_aoi_id(tmp_path: Path, aoi_id: str) -> None:
    """AOI ids that are not a single safe component are refused before anything is made."""
    with pytest.raises(OutputError, match="safe folder name"):
        with staged_run_dir(tmp_path / "out", aoi_id, RUN_ID):
            pytest.fail("the block must not run")
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "x").exists()


def test_staged_run_dir_same_run_id_does_not_clobber(tmp_path: Path) -> None:
    """A second run with a finished run's id is refused and the first run is untouched."""
    out = tmp_path / "out"
    with staged_run_dir(out, "site", RUN_ID) as stage:
        (stage / "evidence.geojson").write_text("first")
    with pytest.raises(OutputError, match="already exists"):
        with staged_run_dir(out, "site", RUN_ID):
            pytest.fail("the block must not run")
    assert (out / "site" / RUN_ID / "evidence.geojson").read_text() == "first"
    second = unique_run_dir_name(out / "site", RUN_ID)
    with staged_run_dir(out, "site", second) as stage:
        (stage / "evidence.geojson").write_text("second")
    assert (out / "site" / RUN_ID / "evidence.geojson").read_text() == "first"
    assert (out / "site" / f"{RUN_ID}-2" / "evidence.geojson").read_text() == "second"


def test_staged_run_dir_concurrent_same_id(tmp_path: Path) -> None:
    """A run whose partial folder is taken (in progress or stale) is refused and left alone."""
    out = tmp_path / "out"
    stale = out / "site" / partial_dir_name(RUN_ID)
    stale.mkdir(parents=True)
    (stale / "left.tif").write_bytes(b"x")
    with pytest.raises(OutputError, match="in progress or was killed"):
        with staged_run_dir(out, "site", RUN_ID):
            pytest.fail("the block must not run")
    assert (stale / "left.tif").read_bytes() == b"x"


def test_staged_run_dir_final_appears_keeps_results(tmp_path: Path) -> None:
    """If the final folder appears during the run, finished results stay in the partial."""
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="results kept"):
        with staged_run_dir(out, "site", RUN_ID) as stage:
            (stage / "evidence.geojson").write_text("mine")
            (out / "site" / RUN_ID).mkdir()
    assert (out / "site" / partial_dir_name(RUN_ID) / "evidence.geojson").read_text() == "mine"
    assert list((out / "site" / RUN_ID).iterdir()) == []
