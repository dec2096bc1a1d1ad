"""End-to-end tests of ``sitewatch detect``: the real default, and every kind of bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import shapely
from _helpers import ROOT, write_geotiff
from affine import Affine
from click.testing import CliRunner

from pipeline.cli import SEED_AFTER, SEED_BEFORE, cli
from pipeline.report.validate import validate_geojson

SEEDS = [str(SEED_BEFORE), str(SEED_AFTER)]


def _run(args: list[str]):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def _run_dirs(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("*/*") if p.is_dir())


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """One run of the embedded default (seeds/ pair, site 'dabancheng')."""
    out = tmp_path_factory.mktemp("out")
    result = _run(["detect", "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    return out, result


def test_detect_default_writes_evidence_folder(default_run):
    """The default run writes the evidence package into out/dabancheng/<run-id>/."""
    out, result = default_run
    (run_dir,) = _run_dirs(out)
    assert run_dir.parent.name == "dabancheng"
    names = {p.name for p in run_dir.iterdir()}
    assert names == {"changes.geojson", "change_mask.tif", "change_magnitude.tif", "manifest.json",
                     "changes.gpkg", "changes.qml", "chips", "originals", "manifest.json.sha256",
                     "report.html"}
    assert result.stdout.splitlines()[0] == f"wrote {run_dir}"
    assert "compound-0001\tcompound" in result.stdout
    assert result.stderr == ""  # -q: no progress, no warning (none is due on this pair)


def test_detect_default_quiet_process_writes_nothing_on_stderr(tmp_path):
    """``sitewatch detect -q`` as its own process (the warnings filters as a user has them,
    not pytest's): findings on stdout, nothing on stderr. Rasterizing outlines on several
    threads at once once made rasterio warn about a dataset without a transform."""
    child = subprocess.run([sys.executable, "-m", "pipeline", "detect", "-q", "--out",
                            str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True,
                           timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert child.returncode == 0, child.stderr[-2000:]
    assert "compound-0001\tcompound" in child.stdout and child.stderr == ""


def test_detect_default_geojson_is_rfc7946(default_run):
    """changes.geojson passes the RFC 7946 validator and carries dates and sources."""
    out, _ = default_run
    fc = json.loads(next(out.glob("*/*/changes.geojson")).read_text())
    ok, errors, _ = validate_geojson(fc)
    assert ok, errors[:5]
    assert all(0 <= f["properties"]["score"] <= 1 for f in fc["features"])
    props = next(f["properties"] for f in fc["features"] if f["properties"]["kind"] == "compound")
    assert props["before_date"] == "2017-03-02" and props["after_date"] == "2018-10-11"
    assert props["id"] == "compound-0001" and props["building_count"] > 10


def test_detect_default_top_compound_matches_label(default_run, dabancheng_dir):
    """The top-scored compound overlaps a hand-drawn outline with IoU >= 0.6."""
    out, _ = default_run
    fc = json.loads(next(out.glob("*/*/changes.geojson")).read_text())
    compounds = [f for f in fc["features"] if f["properties"]["kind"] == "compound"]
    top = max(compounds, key=lambda f: f["properties"]["score"])
    labels = json.loads((dabancheng_dir / "compound_label.geojson").read_text())["features"]
    # IoU in a metric CRS: lon/lat degrees are not equal-area.
    from pyproj import Transformer

    to_utm = Transformer.from_crs("EPSG:4326", "EPSG:32645", always_xy=True)

    def utm(geom):
        return shapely.transform(shapely.geometry.shape(geom),
                                 lambda c: np.column_stack(to_utm.transform(c[:, 0], c[:, 1])))

    found = utm(top["geometry"])
    ious = [found.intersection(utm(f["geometry"])).area / found.union(utm(f["geometry"])).area
            for f in labels]
    assert max(ious) >= 0.6, ious


def test_detect_same_image_reports_no_compound(tmp_path):
    """With after = before there is no compound (and no building)."""
    result = _run(["detect", "--out", str(tmp_path), "-q",
                   "--before", SEEDS[1], "--after", SEEDS[1]])
    assert result.exit_code == 0, result.output
    fc = json.loads(next(tmp_path.glob("*/*/changes.geojson")).read_text())
    assert [f for f in fc["features"] if f["properties"]["kind"] != "change"] == []
    assert "identical" in result.stderr


def test_detect_second_run_never_overwrites(default_run):
    """A second run gets its own folder; the first run's files are unchanged."""
    out, _ = default_run
    first = _run_dirs(out)[0]
    before = {p: p.read_bytes() for p in first.rglob("*") if p.is_file()}
    result = _run(["detect", "--out", str(out), "-q"])
    assert result.exit_code == 0
    assert len(_run_dirs(out)) == 2
    assert {p: p.read_bytes() for p in first.rglob("*") if p.is_file()} == before


def test_console_script_and_module_show_examples():
    """`python -m pipeline detect --help` works and shows examples."""
    proc = subprocess.run([sys.executable, "-m", "pipeline", "detect", "--help"],
                          capture_output=True, text=True, cwd=ROOT, check=False)
    assert proc.returncode == 0
    assert "Examples:" in proc.stdout and "$ sitewatch detect" in proc.stdout


def _nodata_pair(tmp_path: Path) -> tuple[Path, Path]:
    data = np.zeros((3, 64, 64), np.uint8)
    write_geotiff(tmp_path / "empty_2017-01-01.tif", data)
    return tmp_path / "empty_2017-01-01.tif", tmp_path / "empty_2017-01-01.tif"


def _far_pair(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    data = rng.integers(1, 255, (3, 64, 64), dtype=np.uint8)
    a = write_geotiff(tmp_path / "west_2017-01-01.tif", data,
                      transform=Affine(10.0, 0, 600000.0, 0, -10.0, 4805000.0))
    b = write_geotiff(tmp_path / "east_2018-01-01.tif", data,
                      transform=Affine(10.0, 0, 601000.0, 0, -10.0, 4805000.0))
    return a, b


BAD_INPUTS = {
    "aoi out of range": (["--aoi", "200,95"], "outside"),
    "aoi malformed": (["--aoi", "88.3;43.4"], "AOI"),
    "aoi unknown site": (["--aoi", "nosuchsite"], "nosuchsite"),
    "aoi bbox reversed": (["--aoi", "88.3,43.4,88.2,43.3"], "AOI"),
    "aoi outside imagery": (["--aoi", "10.0,50.0", "--before", SEEDS[0], "--after", SEEDS[1]],
                            "does not overlap"),
    "missing file": (["--before", "/nonexistent/a.tif", "--after", SEEDS[1]], "does not exist"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_detect_bad_input_clean_error(case, tmp_path):
    """Each bad input exits non-zero with a clear message, no traceback, no output folder."""
    args, phrase = BAD_INPUTS[case]
    out = tmp_path / "out"
    result = _run(["detect", "--out", str(out), "-q", *args])
    assert result.exit_code != 0
    assert phrase in result.stderr
    assert "Traceback" not in result.output
    assert _run_dirs(out) == [] if out.exists() else True


def test_detect_rejects_non_raster_and_corrupt_files(tmp_path):
    """A text file and a truncated GeoTIFF are FetchErrors with exit 1."""
    text = tmp_path / "notes_2017-01-01.tif"
    text.write_text("not a raster")
    corrupt = tmp_path / "cut_2018-01-01.tif"
    corrupt.write_bytes(SEED_AFTER.read_bytes()[:5000])
    for bad in (text, corrupt):
        result = _run(["detect", "--out", str(tmp_path / "out"), "-q", "--before", str(bad),
                       "--after", SEEDS[1]])
        assert result.exit_code == 1, result.output
        assert str(bad.name) in result.stderr
        assert "Traceback" not in result.output


def test_detect_fifo_input_is_refused_not_read(tmp_path):
    """A named pipe as --before is a clear error at once (GDAL would block on it for ever)."""
    fifo = tmp_path / "pipe_2017-01-01.tif"
    os.mkfifo(fifo)
    proc = subprocess.run([sys.executable, "-m", "pipeline", "detect", "--aoi", "88.2821,43.383",
                           "--radius-m", "150", "--before", str(fifo), "--after", SEEDS[1],
                           "--out", str(tmp_path / "out"), "-q"],
                          capture_output=True, text=True, cwd=ROOT, check=False, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "not a regular file" in proc.stderr and "Traceback" not in proc.stderr
    assert _run_dirs(tmp_path / "out") == []


_NOT_UTF8 = b"\xff".decode("utf-8", "surrogateescape")  # a Latin-1 byte in a UTF-8 locale


def _small_detect(tmp_path, *args):
    return _run(["detect", "--aoi", "88.2821,43.383", "--radius-m", "150", "--before", SEEDS[0],
                 "--after", SEEDS[1], "--out", str(tmp_path / "out"), "-q", *args])


def test_detect_non_utf8_paths_are_refused_before_any_work(tmp_path, monkeypatch):
    """An image, AOI, config or OUT whose name is not UTF-8 (GDAL and the manifest cannot take
    it) is a message naming it, not a traceback after the whole run; nothing is written. An
    empty --out (`make detect OUT=`) is refused too, not a run into the current folder."""
    image = tmp_path / f"b{_NOT_UTF8}_2017-03-02.tif"
    image.write_bytes(SEED_BEFORE.read_bytes())
    config = tmp_path / f"c{_NOT_UTF8}.toml"
    config.write_text((ROOT / "configs" / "default.toml").read_text())
    aoi = tmp_path / f"a{_NOT_UTF8}.geojson"
    aoi.write_text((ROOT / "docs" / "examples" / "dabancheng_facility.geojson").read_text())
    cases = [(["--before", str(image)], 1, "not UTF-8"), (["--config", str(config)], 1,
             "not UTF-8"), (["--aoi", str(aoi)], 1, "not UTF-8"),
             (["--out", str(tmp_path / f"o{_NOT_UTF8}")], 2, "not a UTF-8 path"),
             (["--out", ""], 2, "empty")]
    monkeypatch.chdir(tmp_path)  # where an empty --out wrote before
    for args, code, phrase in cases:
        result = _small_detect(tmp_path, *args)
        assert result.exit_code == code, (args, result.output)
        assert phrase in result.stderr, result.stderr
        assert "Traceback" not in result.output
    assert not (tmp_path / f"o{_NOT_UTF8}").exists() and not list(tmp_path.glob("pt-*"))
    assert _run_dirs(tmp_path / "out") == []


def test_detect_all_nodata_window(tmp_path):
    """An all-nodata window is a NoValidDataError naming the problem."""
    a, b = _nodata_pair(tmp_path)
    result = _run(["detect", "--out", str(tmp_path / "out"), "-q", "--aoi", "88.28,43.37",
                   "--radius-m", "200", "--before", str(a), "--after", str(b)])
    assert result.exit_code == 1
    assert "nodata" in result.stderr.lower() or "no valid" in result.stderr.lower()


def test_detect_pair_without_common_pixels(tmp_path):
    """Before and after that do not overlap inside the AOI are refused clearly."""
    a, b = _far_pair(tmp_path)
    from pyproj import Transformer

    to_lonlat = Transformer.from_crs("EPSG:32645", "EPSG:4326", always_xy=True)
    lon, lat = to_lonlat.transform(600700, 4804700)
    result = _run(["detect", "--out", str(tmp_path / "out"), "-q", "--aoi", f"{lon},{lat}",
                   "--radius-m", "600", "--before", str(a), "--after", str(b)])
    assert result.exit_code == 1
    assert "overlap" in result.stderr


def test_detect_unwritable_out(tmp_path):
    """An OUT that cannot be created (its parent is a file) fails before any work."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = _run(["detect", "--out", str(blocker / "out"), "-q"])
    assert result.exit_code == 1
    assert "--out" in result.stderr


def test_detect_aoi_folder_that_is_a_file(tmp_path):
    """OUT/<aoi-id> being a file is named as such (it was blamed on a staging folder of the
    same run id, with a hint for programmers)."""
    blocker = tmp_path / "out" / "pt-43.383n-88.2821e-r150"
    blocker.parent.mkdir()
    blocker.write_text("x")
    result = _small_detect(tmp_path)
    assert result.exit_code == 1, result.output
    assert f"{blocker} is a file" in result.stderr and "--out" in result.stderr, result.stderr


def test_detect_bad_date_flag_is_usage_error():
    """A malformed --before-date is a usage error (exit 2) with the expected form."""
    result = _run(["detect", "--before-date", "03/02/2017"])
    assert result.exit_code == 2
    assert "YYYY-MM-DD" in result.stderr


def test_verify_passes_then_fails_after_one_byte_changes(default_run, tmp_path):
    """`sitewatch verify` passes on a fresh folder and fails once a byte of the GeoJSON changes."""
    import shutil

    out, _ = default_run
    run_dir = shutil.copytree(_run_dirs(out)[0], tmp_path / "copy")
    assert _run(["verify", str(run_dir)]).exit_code == 0
    geojson = run_dir / "changes.geojson"
    data = bytearray(geojson.read_bytes())
    data[-2] = ord(" ") if data[-2] != ord(" ") else ord("\n")
    geojson.write_bytes(bytes(data))
    result = _run(["verify", str(run_dir)])
    assert result.exit_code == 1
    assert "changes.geojson" in result.stdout


def test_validate_command_flags_rfc7946_errors(default_run, tmp_path):
    """`sitewatch validate` accepts the run's GeoJSON and rejects one with a crs member."""
    out, _ = default_run
    path = next(out.glob("*/*/changes.geojson"))
    assert _run(["validate", str(path)]).exit_code == 0
    bad = json.loads(path.read_text())
    bad["crs"] = {"type": "name", "properties": {"name": "EPSG:4326"}}
    (tmp_path / "bad.geojson").write_text(json.dumps(bad))
    result = _run(["validate", str(tmp_path / "bad.geojson")])
    assert result.exit_code == 1 and "crs" in result.stdout


def test_validate_refuses_a_pipe(tmp_path):
    """`validate` of a named pipe is a usage error at once (reading it blocked for ever)."""
    pipe = tmp_path / "changes.geojson"
    os.mkfifo(pipe)
    proc = subprocess.run([sys.executable, "-m", "pipeline", "validate", str(pipe)],
                          capture_output=True, text=True, cwd=ROOT, check=False, timeout=60)
    assert proc.returncode == 2 and "not a regular file" in proc.stderr, proc.stderr


def test_verify_refuses_a_pipe_for_the_manifest_or_its_digest(tmp_path):
    """A named pipe as manifest.json or manifest.json.sha256 is an error line and exit 1 at
    once (reading it blocked for ever)."""
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        run.mkdir()
    os.mkfifo(runs[0] / "manifest.json")
    (runs[1] / "manifest.json").write_text('{"outputs": []}')
    os.mkfifo(runs[1] / "manifest.json.sha256")
    for run, name in zip(runs, ["manifest.json", "manifest.json.sha256"], strict=True):
        proc = subprocess.run([sys.executable, "-m", "pipeline", "verify", str(run)],
                              capture_output=True, text=True, cwd=ROOT, check=False, timeout=60)
        assert proc.returncode == 1, proc.stderr
        assert f"{name}: not a regular file" in proc.stdout and "Traceback" not in proc.stderr


def test_detect_sigterm_removes_the_unfinished_run_and_scratch(tmp_path):
    """SIGTERM during the write stage (the COGs being written on their own thread) ends like
    Ctrl-C (exit 1, "Aborted!"): the staging folder under OUT and the scratch folder in TMPDIR
    are removed (they were left behind)."""
    import signal
    import time

    out, scratch = tmp_path / "out", tmp_path / "tmp"
    scratch.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "detect", "--out", str(out), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "TMPDIR": str(scratch)})
    deadline = time.monotonic() + 120
    while not list(out.glob("*/.*.partial/originals")) and proc.poll() is None:
        assert time.monotonic() < deadline, "the run never reached its write stage"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "Aborted!" in err, (proc.returncode, err)
    assert list(out.rglob("*.partial")) == [] and _run_dirs(out) == []
    assert list(scratch.iterdir()) == []
