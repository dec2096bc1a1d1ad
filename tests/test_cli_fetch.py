"""`sitewatch detect --source` end to end against the loopback Wayback of tests/fetch."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from fetch.test_wayback import FakeWayback

from pipeline.cli import cli

AOI = ["--aoi", "88.29,43.384", "--radius-m", "400"]


def _config(fake: FakeWayback, tmp_path: Path) -> Path:
    """A config whose [sources.test-wayback] points at the loopback server."""
    opts = {**fake.source.options, "res_m": fake.plan.res_m}
    lines = ["[fetch]", f'cache_dir = "{tmp_path / "cache"}"', "timeout_s = 2.0",
             "max_retries = 1", "", "[sources.test-wayback]", 'type = "wayback"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in opts.items()]
    path = tmp_path / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _detect(config: Path, out: Path, *extra: str):
    args = ["detect", *AOI, "--source", "test-wayback", "--config", str(config),
            "--out", str(out), "-q", *extra]
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_detect_from_wayback_records_releases_and_reruns_offline(fake, tmp_path):
    """A Wayback run keeps release and acquisition dates; an offline rerun makes no request."""
    config = _config(fake, tmp_path)
    dates = ["--before-date", "2017-03-01/2017-06-30", "--after-date", "2018-10-01/2018-12-31"]
    first = _detect(config, tmp_path / "out", *dates)
    assert first.exit_code == 0, first.output
    manifest = json.loads(next((tmp_path / "out").glob("*/*/manifest.json")).read_text())
    refs = {i["role"]: i for i in manifest["inputs"]}
    assert refs["before:0"]["acquired"] == "2017-03-02"
    assert "release 4073" in refs["before:0"]["release"]
    assert refs["after:0"]["acquired"] == "2018-10-11"
    # fetched imagery gets chips from the pixels as read (no local file to read again)
    run_dir = next((tmp_path / "out").glob("*/*/manifest.json")).parent
    assert len(list(run_dir.glob("chips/*.png"))) >= 4
    assert "no chips" not in json.dumps(manifest)
    requests = fake.server.total_requests
    second = _detect(config, tmp_path / "out", *dates, "--offline")
    assert second.exit_code == 0, second.output
    assert fake.server.total_requests == requests
    assert len(list((tmp_path / "out").glob("*/*/manifest.json"))) == 2


def test_detect_shows_fetch_progress_on_a_terminal(fake, tmp_path, monkeypatch):
    """On a terminal (and without -q) stderr counts the downloads; stdout stays data only."""
    import pipeline.cli

    monkeypatch.setattr(pipeline.cli, "stderr_is_terminal", lambda: True)
    args = ["detect", *AOI, "--source", "test-wayback", "--config", str(_config(fake, tmp_path)),
            "--out", str(tmp_path / "out"), "--before-date", "2017-03-01/2017-06-30",
            "--after-date", "2018-10-01/2018-12-31"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "[1/6] read" in result.stderr and "fetched 1/" in result.stderr
    assert "fetched" not in result.stdout and "[1/6]" not in result.stdout
    quiet = CliRunner().invoke(cli, [*args, "-q"], catch_exceptions=False)
    assert quiet.exit_code == 0 and "fetched" not in quiet.stderr


def test_detect_from_wayback_same_imagery_stops(fake, tmp_path):
    """Windows that resolve to the same imagery stop with a clear error, not 'no change'."""
    config = _config(fake, tmp_path)
    result = _detect(config, tmp_path / "out", "--before-date", "2017-05-01/2017-06-30",
                     "--after-date", "2018-01-01/2018-02-28")
    assert result.exit_code == 1
    assert "same imagery" in result.stderr
    assert not list((tmp_path / "out").glob("*/*"))


def test_detect_source_needs_dates(fake, tmp_path):
    """--source without a date for a role is a usage error naming the flag."""
    result = _detect(_config(fake, tmp_path), tmp_path / "out", "--before-date", "2017-03-02")
    assert result.exit_code == 2
    assert "--after-date" in result.stderr


def test_detect_source_dates_at_the_calendar_ends(fake, tmp_path):
    """A date of 0001-01-01 or 9999-12-31 is searched +-45 days within the calendar (it was an
    OverflowError traceback): the run compares two different releases."""
    result = _detect(_config(fake, tmp_path), tmp_path / "out", "--before-date", "0001-01-01",
                     "--after-date", "9999-12-31")
    assert result.exit_code == 0, result.output
    manifest = json.loads(next((tmp_path / "out").glob("*/*/manifest.json")).read_text())
    releases = {i["role"]: i["release"] for i in manifest["inputs"]}
    assert releases["before:0"] != releases["after:0"], releases


def test_detect_cache_folder_that_is_a_file(fake, tmp_path):
    """A download cache that is a file (or under one) is exit 1 naming it and the setting to
    change, online and offline (it was a NotADirectoryError traceback)."""
    config = _config(fake, tmp_path)
    (tmp_path / "cache").write_text("not a folder")
    dates = ["--before-date", "2017-03-01/2017-06-30", "--after-date", "2018-10-01/2018-12-31"]
    for extra in ([], ["--offline"]):
        result = CliRunner().invoke(cli, ["detect", *AOI, "--source", "test-wayback", "--config",
                                          str(config), "--out", str(tmp_path / "out"), "-q",
                                          *dates, *extra])
        assert result.exit_code == 1, result.output
        assert f"{tmp_path / 'cache'} is a file" in result.stderr and "cache_dir" in result.stderr
    assert fake.server.total_requests == 0


def stac_detect(server, surface, tmp_path: Path, out: Path) -> Path:
    """`sitewatch detect` from the loopback STAC API over a 3 km AOI, 2020-06-02 against
    2020-06-07 (the fixtures of tests/fetch/test_stac.py); returns the run folder."""
    from fetch.test_stac import COLLECTION
    from pyproj import Transformer

    t = surface["transform"]
    to_lonlat = Transformer.from_crs("EPSG:32645", "EPSG:4326", always_xy=True)
    west, south = to_lonlat.transform(t.c + 2000, t.f - 5000)
    east, north = to_lonlat.transform(t.c + 5000, t.f - 2000)
    config = tmp_path / "config.toml"
    config.write_text(
        f'[fetch]\ncache_dir = "{tmp_path / "cache"}"\ntimeout_s = 2.0\nmax_retries = 1\n\n'
        f'[sources.test-stac]\ntype = "stac"\nurl = "{server.url("/")}"\n'
        f'collection = "{COLLECTION}"\nindices = []\n')
    result = CliRunner().invoke(cli, [
        "detect", "--aoi", f"{west},{south},{east},{north}", "--source", "test-stac",
        "--before-date", "2020-06-01/2020-06-03", "--after-date", "2020-06-06/2020-06-08",
        "--config", str(config), "--out", str(out), "-q"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return next(out.glob("*/*/manifest.json")).parent


def test_detect_from_stac_across_baseline_change_flags_nothing(api, surface, tmp_path):
    """Two S2 dates of one surface, baselines 03.01 and 04.00: a full run reports no compound."""
    server, _ = api
    stac_detect(server, surface, tmp_path, tmp_path / "out")
    fc = json.loads(next((tmp_path / "out").glob("*/*/changes.geojson")).read_text())
    assert [f for f in fc["features"] if f["properties"]["kind"] == "compound"] == []
    manifest = json.loads(next((tmp_path / "out").glob("*/*/manifest.json")).read_text())
    baselines = sorted(i["extra"]["processing_baseline"] for i in manifest["inputs"])
    assert baselines == ["03.01", "04.00"]
