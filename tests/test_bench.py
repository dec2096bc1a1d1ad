"""make bench's scripts: the floor it times against the read (scripts/bench_floor.py; what
it measures has to be right, or its figure means nothing), how bench.py runs and reports it,
the report's picture (scripts/bench_chart.py) and its speed-up verdict."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from _helpers import load_script, write_geotiff
from PIL import Image
from rasterio.transform import from_origin
from scipy import ndimage as ndi


def _write(path: Path, bands: np.ndarray) -> Path:
    return write_geotiff(path, bands, transform=from_origin(500000, 4800000, 0.5, 0.5),
                         nodata=None)


def _ground(size: int, seed: int = 3) -> np.ndarray:
    """Textured 3-band float ground (smooth enough for a sub-pixel shift to be measurable)."""
    rng = np.random.default_rng(seed)
    noise = ndi.gaussian_filter(rng.normal(size=(3, size, size)), sigma=(0, 3, 3))
    return 120 + 40 * noise / noise.std()


@pytest.mark.parametrize("dy, dx", [(0.37, -0.61), (-1.3, 2.25), (0.0, 0.0), (2.6, -0.1)])
def test_shifted_bilinear_matches_scipy_shift(dy, dx):
    """Strip by strip, the floor's shift is scipy's linear shift with edges repeated, top and
    bottom strips included."""
    floor = load_script("bench_floor")
    plane = np.random.default_rng(1).random((40, 33)).astype(np.float32)
    want = ndi.shift(plane, (dy, dx), order=1, mode="nearest")
    got = np.concatenate([floor.shifted_bilinear(plane, dy, dx, slice(r, min(r + 7, 40)))
                          for r in range(0, 40, 7)])
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_floor_finds_the_shift_and_the_changed_block(monkeypatch, tmp_path):
    """On a pair with a known shift, a new bright block and a gain: the shift is found to a
    fifth of a pixel, the block is the change, both COGs were written and then removed."""
    floor = load_script("bench_floor")
    size, shift = 384, (0.4, -0.7)
    ground = _ground(size)
    after = ground.copy()
    after[:, 20:80, 280:370] = 235  # the new building (off the centre the shift is read at)
    after = np.stack([ndi.shift(b * 1.05 + 4, shift, order=1, mode="nearest") for b in after])
    before_path = _write(tmp_path / "before.tif", np.clip(ground, 0, 255).astype(np.uint8))
    after_path = _write(tmp_path / "after.tif", np.clip(after, 0, 255).astype(np.uint8))
    work = tmp_path / "work"
    work.mkdir()
    written: list[str] = []
    real_copy = floor.rasterio.shutil.copy
    monkeypatch.setattr(floor.rasterio.shutil, "copy",
                        lambda src, dst, **kw: (written.append(dst), real_copy(src, dst, **kw)))
    got = floor.floor(before_path, after_path, work, threads=2)
    # plain phase correlation: within a fifth of a pixel here (0.04 px on the bench pairs)
    assert got["shift_px"] == pytest.approx([-shift[0], -shift[1]], abs=0.2)
    assert [Path(p).name for p in written] == ["change_mask.tif", "change_magnitude.tif"]
    assert list(work.iterdir()) == []  # the COGs go with their temporary folder
    block_share = 60 * 90 / size**2
    assert block_share * 0.8 < got["changed_share"] < block_share * 1.3
    assert got["components"] >= 1
    assert [name for name, _ in got["parts"]] == [
        "read+sha256", "coregister", "histograms", "magnitude", "opening", "labels",
        "mask COG", "magnitude COG"]
    # each part is rounded to a millisecond: their sum may pass the total by half of one each
    assert got["seconds"] >= sum(sec for _, sec in got["parts"]) - 0.0005 * len(got["parts"])


def test_floor_of_a_pair_with_no_change_finds_no_shift(tmp_path):
    floor = load_script("bench_floor")
    bands = np.clip(_ground(256, seed=5), 0, 255).astype(np.uint8)
    same = _write(tmp_path / "a.tif", bands)
    got = floor.floor(same, same, tmp_path, threads=1)
    assert got["shift_px"] == [0.0, 0.0]
    assert got["changed_share"] == 0.0


def test_floor_refuses_other_than_8_bit(tmp_path):
    floor = load_script("bench_floor")
    a = _write(tmp_path / "a.tif", np.zeros((3, 64, 64), np.uint16))
    with pytest.raises(ValueError, match="8-bit"):
        floor.floor(a, a, tmp_path)


def test_bench_runs_the_floor_as_a_child_and_shows_it(monkeypatch, tmp_path):
    """bench.py's ``--child floor`` writes the floor's result; its table puts the floor beside
    the read and the detect, with the target of the sizes that have one."""
    bench = load_script("bench")
    bands = np.clip(_ground(256), 0, 255).astype(np.uint8)
    path = _write(tmp_path / "a.tif", bands)
    result = tmp_path / "result.json"
    assert bench.main(["--child", "floor", "--before", str(path), "--after", str(path),
                       "--workdir", str(tmp_path), "--result", str(result), "-q"]) == 0
    data = json.loads(result.read_text())
    assert data["shift_px"] == [0.0, 0.0] and data["seconds"] > 0
    row = {"size": 8192, "read": {"seconds": 2.0}, "detect_ok": True, "detect_s": 50.0,
           "truth": {"shift_px": [0.37, -0.61]},
           "floor": {**data, "seconds": 9.0, "problem": None}}
    table = bench.floor_rows([row, {**row, "size": 4096, "floor": None},
                              {**row, "size": 20000, "floor": {"problem": "stopped: RSS"}}])
    assert table[1][:6] == ["8192", "2.00", "9.0", "4.5", "25.0", "4"]
    assert table[1][-1] == "+0.00, +0.00 (-0.37, +0.61)"
    assert [r[0] for r in table[1:]] == ["8192", "20000"]
    assert table[2][2] == "stopped: RSS" and table[2][5] == "3"
    assert "## Floor" in bench._floor_section([row]) and bench._floor_section([]) == ""


def test_ratio_chart_is_written_whole_and_leaves_out_what_was_not_measured(monkeypatch,
                                                                           tmp_path):
    """The report's picture: a PNG written atomically (nothing else left beside it), one bar
    per measured ratio, a size without a measurement drawing no bar."""
    chart = load_script("bench_chart")
    drawn: list[int] = []  # the bars of each ax.bar call
    import matplotlib.axes

    real = matplotlib.axes.Axes.bar
    monkeypatch.setattr(matplotlib.axes.Axes, "bar",
                        lambda self, x, h, *a, **k: (drawn.append(len(list(h))),
                                                     real(self, x, h, *a, **k))[1])
    out = chart.ratio_chart([4096, 8192, 20000], [23.3, 22.0, float("nan")], [5.1, 4.7, 4.2],
                            {8192: 4.0, 20000: 3.0}, tmp_path / "img" / "r.png")
    assert out == tmp_path / "img" / "r.png"
    assert [p.name for p in out.parent.iterdir()] == ["r.png"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (750, 420)
    assert drawn == [2, 3]  # detect: 20000 left out; floor: all three


def test_bench_docs_with_a_floor_draw_the_chart_they_link(monkeypatch, tmp_path):
    bench = load_script("bench")
    calls = []
    monkeypatch.setattr(bench, "draw_chart", lambda rows, path: calls.append(path))
    row = {"size": 8192, "read": {"seconds": 2.0}, "detect_ok": True, "detect_s": 50.0,
           "truth": {"shift_px": [0.37, -0.61]},
           "floor": {"seconds": 9.0, "cpu_s": 15.0, "peak_mb": 2000.0, "problem": None,
                     "parts": [["read+sha256", 1.0]], "shift_px": [-0.35, 0.65]}}
    section = bench._floor_section([row])
    assert f"]({bench.CHART_NAME})" in section
    # write_docs draws it beside the report (rows' other tables need more; only the call here)
    monkeypatch.setattr(bench, "summary_rows", lambda rows: [["a"], ["b"]])
    for name in ("stage_rows", "part_rows", "finding_rows"):
        monkeypatch.setattr(bench, name, lambda rows: [["a"], ["b"]])
    monkeypatch.setattr(bench, "per_mp_spread", lambda rows: "")
    monkeypatch.setattr(bench, "_allocator_line", lambda rows: "")
    info = {"cpu": "c", "cores": "2", "ram_gb": "1", "os": "o", "python": "p", "versions": "v",
            "gdal_env": "g", "git": "abc"}
    bench.write_docs(tmp_path / "benchmarks.md", [row], info, [])
    assert calls == [tmp_path / bench.CHART_NAME]
    calls.clear()
    bench.write_docs(tmp_path / "benchmarks.md", [{**row, "floor": None}], info, [])
    assert calls == []


@pytest.mark.parametrize("median, shown, verdict", [
    (1.59951, "1.5995", "not met"), (1.5991, "1.599", "not met"), (1.64, "1.64", "met"),
    (1.6, "1.60", "met"), (1.52, "1.52", "not met")])
def test_speedup_summary_prints_the_median_on_its_side_of_the_target(median, shown, verdict):
    """A median just under 1.6 is printed with the decimals that keep it under (1.60 beside
    "not met" reads as the target met); others with two."""
    bench = load_script("bench")
    runs = []
    for pair, (one, two) in enumerate([(18.8, 18.8 / 1.4), (20.9, 11.9), (20.6, 20.6 / median)]):
        for threads, seconds in ((1, one), (2, two)):
            runs.append({"pair": pair, "threads": threads, "seconds": seconds, "problem": None,
                         "ceiling": {"sort": 1.9, "stream": 1.4} if threads == 1 else None})
    text = bench.speedup_summary([{"size": 4096, "speedup": runs}])
    first = text.split("\n")[0]
    assert f"median {shown} of 3 pairs" in first and first.endswith(f": {verdict}.")
