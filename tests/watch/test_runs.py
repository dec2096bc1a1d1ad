"""Watch runs end to end against the loopback Wayback: incremental, idempotent, crash-safe."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from watch.fake_wayback import FakeWayback, sites_geojson

from pipeline.cli import cli
from pipeline.config import load_config, load_sources
from pipeline.watch import load_watch_sites, run_watch
from pipeline.watch import tasks as watch_tasks
from pipeline.watch.state import WatchState

ROOT = Path(__file__).resolve().parents[2]


def _run(setup: dict[str, Path], out: Path | None = None, *, scheduler: str = "sync",
         sites: Path | None = None, force: bool = True):
    config = load_config(setup["config"])
    sources = load_sources(setup["config"])
    watched = load_watch_sites(sites or setup["sites"], sources=sources)
    return run_watch(watched, config=config, sources=sources, out_root=out or setup["out"],
                     scheduler=scheduler, force=force)


def _findings(out: Path) -> list[tuple]:
    """Every finding's id, kind, area and outline, as the state holds them."""
    with WatchState(out / "watch.db") as state:
        return [(f["id"], f["kind"], f["area_m2"], json.dumps(f["geometry"]), f["times_seen"])
                for f in state.findings()]


def _files(out: Path) -> dict[str, tuple[int, int]]:
    """Every file under OUT with size and modification time; the state database and the lock
    (rewritten by every run, by design) by name only."""
    return {str(p.relative_to(out)): (p.stat().st_size, p.stat().st_mtime_ns)
            if not p.name.startswith(("watch.db", "watch.lock")) else (0, 0)
            for p in out.rglob("*") if p.is_file()}


def _evidence_dirs(out: Path, site: str) -> list[Path]:
    return sorted(p for p in (out / site).iterdir() if not p.name.startswith("."))


def test_first_run_analyses_every_site(setup):
    """Each site gets one analysis (release 1 against 2), an evidence folder and findings."""
    summary = _run(setup)
    assert [s.status for s in summary.sites] == ["ok"] * 3
    assert [s.analyses for s in summary.sites] == [1, 1, 1]
    assert all(s.new_findings for s in summary.sites)
    assert summary.exit_code == 3
    for site in ("alpha", "bravo", "charlie"):
        (run_dir,) = _evidence_dirs(setup["out"], site)
        manifest = json.loads((run_dir / "manifest.json").read_text())
        releases = sorted(i["extra"]["release_number"] for i in manifest["inputs"])
        assert releases == [1, 2]
    ids = [f[0] for f in _findings(setup["out"])]
    assert len(ids) == len(set(ids)) == len(summary.new_findings)


def test_second_run_with_nothing_new_detects_nothing_and_writes_nothing(setup, monkeypatch):
    """A rerun asks the sources, finds nothing newer, runs no detection, writes no file."""
    first = _run(setup)
    before_files = _files(setup["out"])
    before_findings = _findings(setup["out"])

    def no_detection(job):
        raise AssertionError(f"detection ran for {job.site.id}")

    monkeypatch.setattr(watch_tasks, "_detect", no_detection)
    second = _run(setup)
    assert second.exit_code == 0 and second.new_findings == []
    assert [s.status for s in second.sites] == ["ok"] * 3
    assert sum(s.analyses for s in second.sites) == 0
    assert _files(setup["out"]) == before_files
    assert _findings(setup["out"]) == before_findings
    assert len(first.new_findings) == len(before_findings)


def test_newer_release_at_one_site_triggers_exactly_that_site(setup, fake: FakeWayback):
    """Release 3 changes bravo only: bravo alone is analysed, 2 against 3, with new ids."""
    _run(setup)
    known = {f[0] for f in _findings(setup["out"])}
    fake.add_release(3, "2019-05-01", "2019-04-20", ["bravo"])
    summary = _run(setup)
    analysed = {s.site_id: s.analyses for s in summary.sites}
    assert analysed == {"alpha": 0, "bravo": 1, "charlie": 0}
    newest = _evidence_dirs(setup["out"], "bravo")[-1]
    manifest = json.loads((newest / "manifest.json").read_text())
    assert sorted(i["extra"]["release_number"] for i in manifest["inputs"]) == [2, 3]
    assert len(_evidence_dirs(setup["out"], "alpha")) == 1
    after = {f[0] for f in _findings(setup["out"])}
    assert known <= after
    assert summary.new_findings and summary.exit_code == 3
    assert {f["id"] for f in summary.new_findings} == after - known
    assert all(f["site"] == "bravo" for f in summary.new_findings)


def test_due_sites_follow_every(setup, tmp_path):
    """Without --force a site checked within its 'every' is skipped; a failed one is retried."""
    sites = sites_geojson(tmp_path / "weekly.geojson", ["alpha"], every="P7D")
    first = _run(setup, sites=sites, force=False)
    assert first.sites[0].status == "ok"
    second = _run(setup, sites=sites, force=False)
    assert second.sites[0].status == "not due"


def test_failing_site_does_not_stop_the_others(setup, fake: FakeWayback, tmp_path):
    """A site whose source is down fails (exit 4); the others finish; it is retried next run."""
    config = setup["config"]
    config.write_text(config.read_text() + fake.source_toml("broken").replace(
        fake.server.url("/config.json"), fake.server.url("/missing/config.json")))
    data = json.loads(setup["sites"].read_text())
    data["features"][1]["properties"]["sources"] = ["broken"]
    setup["sites"].write_text(json.dumps(data))
    summary = _run(setup, force=False)
    status = {s.site_id: s.status for s in summary.sites}
    assert status == {"alpha": "ok", "bravo": "failed", "charlie": "ok"}
    assert summary.exit_code == 5 and "missing/config.json" in summary.sites[1].errors[0]
    again = _run(setup, force=False)
    assert {s.site_id: s.status for s in again.sites} == {
        "alpha": "not due", "bravo": "failed", "charlie": "not due"}


def _cli_args(setup: dict[str, Path], out: Path, sites: Path) -> list[str]:
    return ["watch", "--sites", str(sites), "--config", str(setup["config"]), "--out", str(out),
            "--scheduler", "sync", "--force", "--json", "-q"]


def _child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def test_sigkilled_run_resumes_to_the_same_findings(setup, tmp_path):
    """A run SIGKILLed once the first evidence folder is published, then rerun, ends with the
    findings of an uninterrupted run."""
    sites = sites_geojson(tmp_path / "two.geojson", ["alpha", "bravo"])
    reference = tmp_path / "reference"
    result = CliRunner().invoke(cli, _cli_args(setup, reference, sites))
    assert result.exit_code == 3, result.output
    out = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, "-m", "pipeline", *_cli_args(setup, out, sites)],
                             env=_child_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(out.glob("*/2*/manifest.json")) and child.poll() is None:
        if time.monotonic() > deadline:
            child.kill()
            pytest.fail("the watch run published nothing within 120 s")
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL
    resumed = CliRunner().invoke(cli, _cli_args(setup, out, sites))
    assert resumed.exit_code in (0, 3), resumed.output
    assert _findings(out) == _findings(reference)
    for site in ("alpha", "bravo"):
        assert len(_evidence_dirs(out, site)) == 1


def test_run_killed_before_recording_adopts_the_published_folder(setup, tmp_path):
    """Killed between publishing evidence and committing it, the next run adopts that folder
    (no second detection) and records the same findings."""
    sites = sites_geojson(tmp_path / "one.geojson", ["alpha"])
    reference = tmp_path / "reference"
    assert CliRunner().invoke(cli, _cli_args(setup, reference, sites)).exit_code == 3
    out = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import os, signal, sys
        from pipeline.watch import state
        def die(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        state.WatchState.complete_analysis = die
        sys.argv = ["sitewatch", *{_cli_args(setup, out, sites)!r}]
        from pipeline.cli import main
        main()
    """)
    child = subprocess.run([sys.executable, "-c", script], env=_child_env(),
                           capture_output=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
    (published,) = _evidence_dirs(out, "alpha")
    resumed = CliRunner().invoke(cli, _cli_args(setup, out, sites))
    assert resumed.exit_code == 3, resumed.output
    summary = json.loads(resumed.stdout)
    assert summary["totals"]["adopted"] == 1 and summary["sites"][0]["run_dirs"] == [
        str(published)]
    assert _evidence_dirs(out, "alpha") == [published]
    assert [f[:4] for f in _findings(out)] == [f[:4] for f in _findings(reference)]


def test_local_cluster_of_two_processes_matches_in_process(setup, tmp_path):
    """The same job on a LocalCluster of two worker processes gives the same findings."""
    from dask.distributed import Client, LocalCluster

    sites = sites_geojson(tmp_path / "two.geojson", ["alpha", "bravo"])
    _run(setup, tmp_path / "sync", sites=sites)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0", host="127.0.0.1") as cluster:
        address = cluster.scheduler_address
        with Client(cluster) as client:
            summary = _run(setup, tmp_path / "cluster", sites=sites, scheduler=address)
            workers = len(client.scheduler_info()["workers"])
    assert workers == 2
    assert summary.scheduler == address and summary.exit_code == 3
    assert _findings(tmp_path / "cluster") == _findings(tmp_path / "sync")


def test_quiet_local_cluster_run_keeps_stderr_empty(setup, tmp_path):
    """With -q the worker processes' logs and warnings are quiet too: a successful run on the
    default LocalCluster writes findings on stdout and nothing on stderr."""
    sites = sites_geojson(tmp_path / "one.geojson", ["alpha"])
    args = ["watch", "--sites", str(sites), "--config", str(setup["config"]),
            "--out", str(tmp_path / "out"), "--scheduler", "local", "--force", "-q"]
    returncode, stdout, stderr = _run_child(args)
    assert returncode == 3, stderr[-2000:]
    assert stdout.strip() and stderr == ""


def _run_child(args: list[str], timeout: float = 300) -> tuple[int, str, str]:
    """``python -m pipeline *args``'s exit code, stdout and stderr. A child still running after
    ``timeout`` is stopped with SIGABRT, which makes it print every thread's stack
    (PYTHONFAULTHANDLER): the failure then shows where it hung."""
    child = subprocess.Popen([sys.executable, "-m", "pipeline", *args],
                             env={**_child_env(), "PYTHONFAULTHANDLER": "1"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.send_signal(signal.SIGABRT)
        stdout, stderr = child.communicate()
        pytest.fail(f"sitewatch {' '.join(args)} still ran after {timeout} s; its threads "
                    f"were at:\n{stderr[-8000:]}")
    return child.returncode, stdout, stderr


def test_unreachable_scheduler_is_a_clear_error_and_the_next_run_resumes(setup, tmp_path,
                                                                         monkeypatch):
    """A scheduler address where nothing listens stops the run with a ClusterError naming the
    address and the fix (no traceback from the CLI); the analysis it left pending is done by
    the next run, which ends with the findings of an uninterrupted run."""
    import socket

    from pipeline.errors import ClusterError
    from pipeline.watch import pools

    monkeypatch.setattr(pools, "START_TIMEOUT_S", 2)
    with socket.socket() as s:  # a port that was free a moment ago: connections are refused
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    sites = sites_geojson(tmp_path / "one.geojson", ["alpha"])
    out = tmp_path / "out"
    with pytest.raises(ClusterError, match=f"scheduler at {address} could not be reached.*"
                                           "Fix: check that the scheduler is running"):
        _run(setup, out, sites=sites, scheduler=address)
    result = CliRunner().invoke(cli, _cli_args(setup, tmp_path / "cli", sites)
                                + ["--scheduler", address])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"Error: The watch run stopped: the Dask scheduler at {address}" in result.output
    with WatchState(out / "watch.db") as state:
        assert state.pending("alpha")  # left for the next run
    resumed = _run(setup, out, sites=sites)
    assert resumed.exit_code == 3
    _run(setup, tmp_path / "reference", sites=sites)
    assert _findings(out) == _findings(tmp_path / "reference")


def test_local_cluster_that_fails_to_start_is_a_clear_error(setup, tmp_path, monkeypatch):
    """A LocalCluster whose worker processes time out starting (death_timeout) is reported as
    a ClusterError that says to run again or use --scheduler sync."""
    import dask.distributed

    from pipeline.errors import ClusterError

    seen: dict[str, object] = {}

    def failing_cluster(**kwargs: object) -> None:
        seen.update(kwargs)
        raise TimeoutError("Nanny failed to start in 60 seconds")

    monkeypatch.setattr(dask.distributed, "LocalCluster", failing_cluster)
    sites = sites_geojson(tmp_path / "one.geojson", ["alpha"])
    with pytest.raises(ClusterError, match="a Dask LocalCluster could not be started "
                                           r"\(TimeoutError: Nanny failed.*--scheduler sync"):
        _run(setup, tmp_path / "out", sites=sites, scheduler="local")
    assert seen["death_timeout"] == "60s"


@pytest.mark.parametrize("scheduler", ["foo", "http://host:8786", "tcp://host", "",
                                       "tcp://127.0.0.1:99999"])
def test_malformed_scheduler_is_refused_before_the_run_starts(setup, tmp_path, scheduler):
    """A --scheduler that is no address is a configuration error (exit 2): nothing runs."""
    result = CliRunner().invoke(cli, _cli_args(setup, tmp_path / "out", setup["sites"])
                                + ["--scheduler", scheduler])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"--scheduler {scheduler!r} is neither 'local', 'sync' nor a Dask scheduler " \
           "address" in result.output and "tcp://host:port" in result.output
    assert not (tmp_path / "out" / "watch.db").exists()
