"""write_package on one thread or several (Dask's setting): the same files and step records;
the rasters written beside the other steps only with more than one thread; a failure on
either side waits for the other and leaves nothing under OUT."""

from __future__ import annotations

import errno
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dask
import dask.array
import numpy as np
import pytest
import xarray as xr
from pyproj import Transformer
from shapely.geometry import box

from pipeline.errors import OutputError
from pipeline.model import GridPlan
from pipeline.report import originals, package
from pipeline.report.package import WRITE_STEPS, write_package
from pipeline.report.rundir import staged_run_dir
from report.test_chips import _block, _evidence, _pair

DASK_SETTINGS = {
    "one": {"scheduler": "threads", "num_workers": 1},
    "sync": {"scheduler": "synchronous"},
    "two": {"scheduler": "threads", "num_workers": 2},
}


def _grid_da(values: np.ndarray, plan: GridPlan) -> xr.DataArray:
    """A Dask-backed (16 px chunks) DataArray on ``plan``, coordinates at pixel centres."""
    minx, _, _, maxy = plan.bounds
    da = xr.DataArray(dask.array.from_array(values, chunks=16), dims=("y", "x"), coords={
        "y": maxy - (np.arange(plan.height) + 0.5) * plan.res_m,
        "x": minx + (np.arange(plan.width) + 0.5) * plan.res_m})
    return da.rio.write_crs(plan.crs).rio.write_transform(plan.transform)


def _arguments(tmp_path: Path) -> tuple[list[Any], dict[str, Any]]:
    """Positional and keyword arguments of write_package for a small synthetic run."""
    before, after, plan = _pair(tmp_path)
    found = [_evidence("compound-0001", "compound", _block(18, 22, 32, 42), (before, after)),
             _evidence("change-0001", "change", _block(40, 40, 55, 58), (before, after))]
    magnitude = np.random.default_rng(3).uniform(0, 50, (plan.height, plan.width))
    magnitude = magnitude.astype(np.float32)
    magnitude[:4] = np.nan
    mask = np.where(np.isnan(magnitude), 255, magnitude > 40).astype(np.uint8)
    to_lonlat = Transformer.from_crs(plan.crs, "EPSG:4326", always_xy=True)
    lonlat = to_lonlat.transform_bounds(*plan.bounds)
    aoi = {"id": "site", "label": "Site", "geometry": box(*lonlat).__geo_interface__}
    return ([found, _grid_da(mask, plan), _grid_da(magnitude, plan)],
            {"method": "test", "plan": plan, "aoi": aoi,
             "inputs": {"before:0": before, "after:0": after}, "run_id": "run"})


def _gpkg_rows(path: Path) -> list[str]:
    """The GeoPackage's SQL rows, times masked (last_change, update_time: each run's own)."""
    with sqlite3.connect(path) as db:
        return [re.sub(r"\d{4}-\d\d-\d\dT[\d:.]+Z", "<time>", line) for line in db.iterdump()]


def _recording(target: Callable[..., Any], calls: list[tuple[str, str]],
               name: str) -> Callable[..., Any]:
    """``target`` that records its name and its thread's name at each call."""
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        calls.append((name, threading.current_thread().name))
        return target(*args, **kwargs)
    return wrapped


def test_write_package_same_files_on_one_thread_or_two(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """One Dask worker, the synchronous scheduler or two: byte-identical files (the GeoPackage
    row for row), the steps recorded in WRITE_STEPS' order; the rasters are written on the
    caller's thread after the GeoJSON with one thread, on a thread of their own with two."""
    args, kwargs = _arguments(tmp_path)
    calls: list[tuple[str, str]] = []
    for name in ("write_cog", "write_geojson"):
        monkeypatch.setattr(package, name, _recording(getattr(package, name), calls, name))
    files, steps = {}, {}
    caller = threading.current_thread().name
    for mode, settings in DASK_SETTINGS.items():
        stage = tmp_path / mode
        stage.mkdir()
        calls.clear()
        with dask.config.set(settings):
            result = write_package(stage, *args, **kwargs)
        steps[mode] = [s["name"] for s in result.steps]
        files[mode] = {p.relative_to(stage).as_posix(): p.read_bytes()
                       for p in sorted(stage.rglob("*")) if p.is_file()}
        cog_threads = {thread for call, thread in calls if call == "write_cog"}
        if mode == "two":
            assert cog_threads and caller not in cog_threads
        else:
            assert [c for c, _ in calls] == ["write_geojson", "write_cog", "write_cog"]
            assert cog_threads == {caller}
    assert steps["one"] == list(WRITE_STEPS) == steps["sync"] == steps["two"]
    assert len(files["one"]) > 8 and "change_magnitude.tif" in files["one"]
    for mode in ("sync", "two"):
        assert files[mode].keys() == files["one"].keys()
        for rel, data in files["one"].items():
            if rel.endswith(".gpkg"):
                assert _gpkg_rows(tmp_path / mode / rel) == _gpkg_rows(tmp_path / "one" / rel)
            else:
                assert files[mode][rel] == data, rel


def _full_disk(written: list[Path], after: threading.Event | None) -> Callable[..., Any]:
    """A writer that (once ``after`` is set) leaves a partial file in the folder it is
    given, then fails (ENOSPC)."""
    def write(*args: Any, **__: Any) -> Any:
        if after is not None:
            assert after.wait(30)
        target = next(a for a in args if isinstance(a, Path))  # the folder or the file
        folder = target if target.is_dir() else target.parent
        (folder / "partial.bin").write_bytes(b"\x00" * 100)
        written.append(folder / "partial.bin")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return write


def _slow(target: Callable[..., Any], done: list[str], name: str, delay_s: float,
          started: threading.Event | None = None) -> Callable[..., Any]:
    """``target`` that sets ``started``, waits ``delay_s`` and notes its end in ``done``."""
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if started is not None:
            started.set()
        time.sleep(delay_s)
        result = target(*args, **kwargs)
        done.append(name)
        return result
    return wrapped


@pytest.mark.parametrize("failing", ["write_chips", "write_cog"])
def test_write_package_failure_on_one_side_waits_for_the_other(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    """With two threads, the chips (caller's side) or the rasters (their own thread) fail on a
    full disk while the other side is still writing: the error reaches the caller only once
    the other side has stopped, nothing is left under OUT, no writer thread lives on."""
    args, kwargs = _arguments(tmp_path)
    done: list[str] = []
    written: list[Path] = []
    other = "write_cog" if failing == "write_chips" else "write_chips"
    # the rasters fail once the chips are under way (not before, when the caller would stop
    # ahead of them); the chips fail at once, while the rasters wait a while
    chips_started = threading.Event()
    monkeypatch.setattr(package, failing, _full_disk(
        written, chips_started if failing == "write_cog" else None))
    monkeypatch.setattr(package, other, _slow(getattr(package, other), done, other, 0.5,
                                              chips_started))
    out = tmp_path / "out"
    with dask.config.set(DASK_SETTINGS["two"]), pytest.raises(OutputError, match="full"):
        try:
            with staged_run_dir(out, "site", "run") as stage:
                write_package(stage, *args, **kwargs)
        finally:
            finished_at_raise = list(done)
    assert written
    assert other in finished_at_raise  # the other side had finished when the error came
    assert [p for p in out.rglob("*") if p.is_file()] == []
    assert not [t for t in threading.enumerate() if t.name.startswith("sitewatch-")]


def test_write_package_both_sides_fail_the_callers_error_wins(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
        ) -> None:
    """Both sides fail: the caller's step's error propagates, the rasters' one is logged."""
    args, kwargs = _arguments(tmp_path)

    def chips_fail(*_: Any, **__: Any) -> None:
        raise OSError(errno.EIO, "chips failed")

    def cog_fail(*_: Any, **__: Any) -> None:
        time.sleep(0.3)  # fails while the chips' error waits for it
        raise OSError(errno.ENOSPC, "rasters failed")

    monkeypatch.setattr(package, "write_chips", chips_fail)
    monkeypatch.setattr(package, "write_cog", cog_fail)
    with dask.config.set(DASK_SETTINGS["two"]), pytest.raises(OSError, match="chips failed"):
        write_package(tmp_path, *args, **kwargs)
    assert "rasters also failed: [Errno 28] rasters failed" in caplog.text


def test_beside_failure_stops_the_callers_steps_early() -> None:
    """The job on its own thread fails: the caller's next check raises its error (the caller
    stops before its next step), not only the end of the block."""
    def job() -> None:
        raise OSError(errno.ENOSPC, "rasters failed")

    reached_end = []
    with pytest.raises(OSError, match="rasters failed"):
        with package._Beside(job, on_thread=True, name="a job") as beside:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                beside.check()
                time.sleep(0.01)
            reached_end.append(True)
    assert not reached_end


def test_beside_interrupted_while_waiting_waits_for_the_job() -> None:
    """A Ctrl-C (or SIGTERM, which the detect command turns into one) while the caller waits
    for the rasters' thread is raised only once that thread has ended, so nothing writes into
    the staging folder after its removal began (the wait used to end at once)."""
    import signal

    done = threading.Event()

    def job() -> None:
        time.sleep(0.5)
        done.set()

    # a real signal (SIGUSR1 standing in for SIGINT, so pytest's own handler stays out of it)
    previous = signal.signal(signal.SIGUSR1, signal.default_int_handler)
    try:
        threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        with pytest.raises(KeyboardInterrupt), package._Beside(job, on_thread=True, name="a job"):
            pass
        assert done.is_set()
    finally:
        signal.signal(signal.SIGUSR1, previous)


@pytest.mark.parametrize("mode", ["one", "two"])
def test_write_package_flushes_the_copied_originals_beside_the_chips(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """The copied inputs are flushed to disk on a thread of their own, once, and done before
    write_package returns (and so before the manifest), whatever Dask's setting."""
    args, kwargs = _arguments(tmp_path)
    calls: list[tuple[list[Path], str]] = []

    def flush(paths: Any) -> None:
        time.sleep(0.2)  # together longer than the small package's other steps
        calls.append((list(paths), threading.current_thread().name))

    monkeypatch.setattr(originals, "sync_files", flush)
    with dask.config.set(DASK_SETTINGS[mode]):
        result = write_package(tmp_path, *args, **kwargs)
    copies = [tmp_path / o["path"] for o in result.originals if o["how"] == "copy"]
    assert len(copies) == 2
    assert [p for paths, _ in calls for p in paths] == copies  # all done on return
    assert {thread for _, thread in calls} != {threading.current_thread().name}
    assert len({thread for _, thread in calls}) == 1


def test_write_package_failed_flush_leaves_nothing(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A flush that fails (an I/O error of the disk) fails the package: an OutputError naming
    the copy, and nothing under OUT."""
    args, kwargs = _arguments(tmp_path)

    def flush(_: Any) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(originals, "sync_files", flush)
    out = tmp_path / "out"
    with dask.config.set(DASK_SETTINGS["two"]), pytest.raises(
            OutputError, match=r"Cannot preserve the copy before-0_.*Input/output error"):
        with staged_run_dir(out, "site", "run") as stage:
            write_package(stage, *args, **kwargs)
    assert [p for p in out.rglob("*") if p.is_file()] == []
