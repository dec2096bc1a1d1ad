"""`sitewatch watch` and `sitewatch sites import` from the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.config import load_sources
from pipeline.watch import load_watch_sites

SEEDS = Path(__file__).resolve().parents[2] / "seeds" / "sites"


def _watch(setup: dict[str, Path], *extra: str):
    return CliRunner().invoke(cli, ["watch", "--sites", str(setup["sites"]), "--config",
                                    str(setup["config"]), "--out", str(setup["out"]),
                                    "--scheduler", "sync", *extra])


def test_watch_json_on_stdout_and_exit_codes(setup):
    """--json prints only JSON on stdout; exit 3 with new findings, then 0 with nothing new."""
    first = _watch(setup, "--json", "-q")
    assert first.exit_code == 3, first.output
    summary = json.loads(first.stdout)
    assert summary["exit_code"] == 3 and summary["totals"]["analyses"] == 3
    assert {f["site"] for f in summary["new_findings"]} == {"alpha", "bravo", "charlie"}
    assert first.stderr == ""
    second = _watch(setup, "--force")
    assert second.exit_code == 0
    assert second.stdout == ""  # nothing new: no finding lines
    assert "3 of 3 site(s) checked, 0 failed" in second.stderr


def test_watch_bad_sites_file_is_exit_2_naming_the_feature(setup):
    """A configuration error exits 2 with the feature named; nothing is written."""
    data = json.loads(setup["sites"].read_text())
    data["features"][2]["properties"]["every"] = "fortnightly"
    setup["sites"].write_text(json.dumps(data))
    result = _watch(setup)
    assert result.exit_code == 2
    assert "feature 2 ('charlie')" in result.stderr and "'every'" in result.stderr
    assert not setup["out"].exists()


def test_watch_non_utf8_out_or_config_is_exit_2(setup):
    """An OUT or config path that is not UTF-8 is a configuration error before anything runs
    (it was a failed site at every run, 'UnicodeEncodeError', with the state written)."""
    bad = b"\xff".decode("utf-8", "surrogateescape")
    setup["out"] = setup["out"].with_name(f"out{bad}")
    result = _watch(setup)
    assert result.exit_code == 2 and "not a UTF-8 path" in result.stderr, result.output
    assert not setup["out"].exists()
    config = setup["config"].with_name(f"config{bad}.toml")
    config.write_bytes(setup["config"].read_bytes())
    setup["config"] = config
    setup["out"] = setup["out"].with_name("out")
    result = _watch(setup)
    assert result.exit_code == 2 and "not UTF-8" in result.stderr, result.output
    assert not setup["out"].exists()


def test_watch_and_import_huge_every_is_exit_2(setup, tmp_path):
    """An 'every' too long for a timedelta is a configuration error (exit 2), not a traceback."""
    data = json.loads(setup["sites"].read_text())
    data["features"][1]["properties"]["every"] = "P99999999999W"
    setup["sites"].write_text(json.dumps(data))
    result = _watch(setup)
    assert result.exit_code == 2, result.output
    assert "feature 1" in result.stderr and "too long" in result.stderr
    assert not setup["out"].exists()
    result = CliRunner().invoke(cli, ["sites", "import", str(SEEDS / "CampDataset_v1.csv"),
                                      "-o", str(tmp_path / "w.geojson"), "--every", "9" * 20 + "d"])
    assert result.exit_code == 2 and "too long" in result.stderr, result.output
    assert not (tmp_path / "w.geojson").exists()


def test_watch_refuses_while_another_run_holds_the_lock(setup):
    """A second run while the first holds the lock exits 1 naming the holder."""
    setup["out"].mkdir()
    lock = setup["out"] / "watch.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pipeline.watch.lock import StateLock; "
         f"StateLock({str(lock)!r}).acquire(); print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = _watch(setup)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert result.exit_code == 1
    assert f"pid {holder.pid}" in result.stderr and "holds" in result.stderr


def test_watch_lock_that_is_a_folder_or_pipe_is_exit_1(setup):
    """OUT/watch.lock as a folder or a named pipe: exit 1 naming it and the fix (it was an
    IsADirectoryError / ftruncate OSError traceback)."""
    lock = setup["out"] / "watch.lock"
    setup["out"].mkdir()
    for make in (lambda: lock.mkdir(), lambda: os.mkfifo(lock)):
        make()
        result = _watch(setup, "-q")
        assert result.exit_code == 1, result.output
        assert f"{lock} is not a regular file" in result.stderr, result.output
        assert not (setup["out"] / "watch.db").exists()
        if lock.is_dir():
            lock.rmdir()
        else:
            lock.unlink()


def test_sites_import_real_lists(tmp_path):
    """The ASPI list and the OSM outlines become valid watch files with attribution."""
    aspi, osm = SEEDS / "CampDataset_v1.csv", SEEDS / "reedcamps_osm_overpass_2021-03-15.osm"
    out = tmp_path / "both.geojson"
    result = CliRunner().invoke(cli, ["sites", "import", str(aspi), str(osm), "-o", str(out),
                                      "--radius-m", "800", "--every", "P14D"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"490\t{out}"
    sites = load_watch_sites(out, sources=load_sources())
    points = [s for s in sites if s.properties.get("aspi_number") is not None]
    outlines = [s for s in sites if s.properties.get("osm_id")]
    assert len(points) == 380 and len(outlines) == 110
    assert all("ASPI Xinjiang Data Project, 2020" in s.properties["attribution"] for s in points)
    assert all("OpenStreetMap contributors" in s.properties["attribution"] for s in outlines)
    assert {s.aoi.geometry.geom_type for s in outlines} <= {"Polygon", "MultiPolygon"}
    assert len({s.id for s in sites}) == 490
    again = CliRunner().invoke(cli, ["sites", "import", str(aspi), "-o", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.stderr


def test_sites_import_bad_options_pipes_and_folders_are_clean_errors(tmp_path):
    """Options that would make a watch file `watch` refuses (or null radii) are exit 2 before
    anything is written; a pipe as a list is refused (reading it blocked for ever); an output
    in a missing folder is exit 1 naming it (was a FileNotFoundError traceback)."""
    aspi = str(SEEDS / "CampDataset_v1.csv")
    out = tmp_path / "w.geojson"
    pipe = tmp_path / "list.csv"
    os.mkfifo(pipe)
    cases = [(["--radius-m", "nan"], 2, "--radius-m"), (["--radius-m", "0"], 2, "--radius-m"),
             (["--source", ""], 2, "source name"), (["--source", "earth-search@-1"], 2, "'@'"),
             (["--before", "2018-01-01/2017-01-01"], 2, "ends before it starts"),
             (["--before", "2017"], 2, "not a date")]
    for extra, code, phrase in cases:
        result = CliRunner().invoke(cli, ["sites", "import", aspi, "-o", str(out), *extra])
        assert result.exit_code == code and phrase in result.stderr, (extra, result.output)
        assert not out.exists()
    proc = subprocess.run([sys.executable, "-m", "pipeline", "sites", "import", str(pipe), "-o",
                           str(out)], capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 2 and "not a regular file" in proc.stderr, proc.stderr
    missing = tmp_path / "no" / "w.geojson"
    result = CliRunner().invoke(cli, ["sites", "import", aspi, "-o", str(missing)])
    assert result.exit_code == 1 and f"Cannot write {missing}" in result.stderr, result.output
    assert "Traceback" not in result.output


def test_seed_watch_files_are_current(tmp_path):
    """The watch files in seeds/sites are what `sites import` makes from the lists there."""
    for source, made in (("CampDataset_v1.csv", "aspi_xjdp_facilities.geojson"),
                         ("reedcamps_osm_overpass_2021-03-15.osm",
                          "osm_reeducation_camps.geojson")):
        out = tmp_path / made
        result = CliRunner().invoke(cli, ["sites", "import", str(SEEDS / source), "-o", str(out),
                                          "--before", "2017-01-01/2017-12-31"])
        assert result.exit_code == 0, result.output
        assert out.read_text(encoding="utf-8") == (SEEDS / made).read_text(encoding="utf-8")


def test_watch_skip_invalid_runs_the_other_sites(setup):
    """With --skip-invalid a bad feature is a failed site (exit 5 with findings); others run."""
    data = json.loads(setup["sites"].read_text())
    del data["features"][0]["properties"]["radius_m"]
    setup["sites"].write_text(json.dumps(data))
    result = _watch(setup, "--skip-invalid", "--json", "-q")
    assert result.exit_code == 5, result.output
    summary = json.loads(result.stdout)
    status = {s["site_id"]: s["status"] for s in summary["sites"]}
    assert status == {"bravo": "ok", "charlie": "ok", "invalid-1": "failed"}
    assert "feature 0 ('alpha')" in summary["sites"][-1]["errors"][0]


def _warning_listing(monkeypatch):
    """Listings that warn: the same warning at every site, and one naming its site."""
    import warnings

    from pipeline.errors import ProvenanceWarning
    from pipeline.watch import tasks

    def list_imagery(aoi, source, **_):
        warnings.warn("The STAC search returned max_items = 2 items; later ones were left "
                      "out.", ProvenanceWarning, stacklevel=2)
        if aoi.id.endswith("bravo") or "bravo" in aoi.id:
            warnings.warn(f"{aoi.id}: an item without a processing baseline.",
                          ProvenanceWarning, stacklevel=2)
        return []

    monkeypatch.setattr(tasks, "list_imagery", list_imagery)


def test_watch_listing_warnings_once_per_run_quiet_with_q(setup, monkeypatch):
    """A warning every site's listing gives reaches stderr once per run (with its count), each
    distinct one once; -q prints none; --json lists them with their counts."""
    _warning_listing(monkeypatch)
    loud = _watch(setup, "--force")
    assert loud.exit_code == 0, loud.output
    shared = [line for line in loud.stderr.splitlines() if "max_items = 2" in line]
    assert shared == ["warning (3 times): The STAC search returned max_items = 2 items; later "
                      "ones were left out."], loud.stderr
    own = [line for line in loud.stderr.splitlines() if "processing baseline" in line]
    assert len(own) == 1 and own[0].startswith("warning: ") and "bravo" in own[0], loud.stderr
    quiet = _watch(setup, "--force", "-q")
    assert quiet.exit_code == 0 and quiet.stderr == "", quiet.stderr
    data = json.loads(_watch(setup, "--force", "--json", "-q").stdout)
    assert [(w["count"], "max_items" in w["message"]) for w in data["warnings"]] == [
        (3, True), (1, False)]
