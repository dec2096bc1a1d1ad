#!/usr/bin/env python
"""scripts/bench_coreg.py: co-registration shift error and time, ours against AROSICS.

Prints figures, never asserts them. Issue 7 ("Scale"): on a real image shifted by a known
sub-pixel amount, the shift error and the time of ``pipeline.core.coreg.estimate_shift`` side
by side with AROSICS (PyPI ``arosics``), on the same files.

Images: the Dabancheng before image of ``seeds/`` (Sentinel-2 at 3.5 m, 833 x 1823, nodata
edges), a real 0.5 m LEVIR-CD tile (1024 x 1024) from ``../shared/data/levir_cd_tiles/`` when
present, and at ``--large-px`` (8192 by default, 0 skips) a mosaic of the LEVIR-CD tiles of
both dates, each flipped/rotated at random (real texture; no image of that size is at hand).
Each is shifted by each of ``SHIFTS_PX`` (rows, columns) with a Fourier shift (after
reflect-padding, so nothing wraps round); pixels whose shifted source leaves the frame or
touches nodata become nodata. Both dates are written as uint8 GeoTIFFs (nodata 0), and both
methods read the same files; the times exclude reading. Error = distance in pixels between the
measured correction and the true one (ours: ``dy, dx`` moves after onto before; AROSICS: its
``x_shift_px, y_shift_px`` correction of the target, the same sign).

AROSICS runs with its defaults (256 px window at the centre, first band) in its own virtual
environment, through ``scripts/arosics_shift.py`` in a subprocess: it needs GDAL's Python
bindings, which pip cannot build here. ``--setup`` makes that environment the way
FIELD_NOTES.md ("Co-registration, measured") describes, from Debian's python3-gdal; when that
is impossible the reason is printed and only our figures are measured. AROSICS is never a
dependency of Sitewatch.

stdout gets the table; progress goes to stderr; ``--json PATH`` writes the raw results and
``--docs PATH`` replaces this script's section of docs/benchmarks.md (``make bench`` runs this
script after ``scripts/bench.py``, which keeps this section when it rewrites the file).

Examples::

    make bench-coreg                                        # sets up AROSICS, then runs
    .venv/bin/python scripts/bench_coreg.py --large-px 0 --no-docs
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
SEED_BEFORE = PROJECT_ROOT / "seeds" / "dabancheng_2017-03-02.tif"
LEVIR_TILES = SHARED_DATA / "levir_cd_tiles"
DEFAULT_VENV = PROJECT_ROOT.parent / "arosics-venv"
DEFAULT_DOCS = PROJECT_ROOT / "docs" / "benchmarks.md"
DEFAULT_WORKDIR = (Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                   / "sitewatch-bench" / "coreg")
SECTION = "## Co-registration: ours against AROSICS"
# (rows, columns) the after image is moved by; the correction to find is the opposite.
# None lies on the 1/20 px grid of our upsampled peak search (upsample_factor 20), which would
# flatter our figures.
SHIFTS_PX = ((1.37, -0.62), (-0.27, 2.83), (-2.13, -1.71))
AROSICS_PACKAGES = ("arosics", "geoarray", "py_tools_ds")  # pip --no-deps: they pin GDAL >= 3.8
AROSICS_DEPS = ("cmocean", "dill", "folium", "geojson", "geopandas", "joblib", "pandas",
                "packaging", "scikit-image", "shapely", "spectral")
SYSTEM_PINNED = ("numpy", "scipy", "matplotlib", "pyproj")  # keep Debian's, built for its GDAL
SEED = 7

log = logging.getLogger("bench_coreg")


# --- images and shifted pairs -----------------------------------------------------------------
def _read_rgb(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(band, y, x)`` float64 and the valid mask (nodata 0 or absent)."""
    import warnings

    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # LEVIR-CD tiles are PNG
        src = rasterio.open(path)
    with src:
        data = src.read(indexes=[1, 2, 3] if src.count >= 3 else [1]).astype(np.float64)
        nodata = src.nodata
    valid = ~(data == nodata).all(axis=0) if nodata is not None else np.ones(data.shape[1:], bool)
    return data, valid


def _levir_images() -> list[np.ndarray]:
    """Every LEVIR-CD tile of both dates, ``(band, y, x)`` float64 (all pixels valid)."""
    paths = [p for date in ("A", "B") for p in sorted((LEVIR_TILES / date).glob("*.png"))]
    return [_read_rgb(p)[0] for p in paths]


def mosaic(tiles: list[np.ndarray], size_px: int, *, seed: int = SEED) -> np.ndarray:
    """A ``size_px`` square of square crops of ``tiles``, each flipped/rotated at random."""
    rng = np.random.default_rng(seed)
    side = min(min(t.shape[1:]) for t in tiles)
    out = np.empty((tiles[0].shape[0], size_px, size_px))
    for y0 in range(0, size_px, side):
        for x0 in range(0, size_px, side):
            tile = tiles[rng.integers(len(tiles))][:, :side, :side]
            tile = np.rot90(tile, k=int(rng.integers(4)), axes=(1, 2))
            tile = tile[:, :, ::-1] if rng.integers(2) else tile
            h, w = min(side, size_px - y0), min(side, size_px - x0)
            out[:, y0:y0 + h, x0:x0 + w] = tile[:, :h, :w]
    return out


def fourier_shift(data: np.ndarray, valid: np.ndarray, dy: float, dx: float,
                  margin_px: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """``data`` moved by ``(dy, dx)`` px, and where the result is valid."""
    from scipy import fft, ndimage

    fill = np.array([np.median(b[valid]) for b in data])[:, None, None]
    filled = np.where(valid, data, fill)
    pad = ((0, 0), (margin_px, margin_px), (margin_px, margin_px))
    padded = np.pad(filled, pad, mode="reflect").astype(np.float32)
    out = np.empty_like(data)
    for i, band in enumerate(padded):
        spec = ndimage.fourier_shift(fft.rfft2(band, workers=2), (dy, dx), n=band.shape[-1])
        moved = fft.irfft2(spec, s=band.shape, workers=2)
        out[i] = moved[margin_px:-margin_px, margin_px:-margin_px]
    # valid only where every contributing pixel was valid and inside the frame
    moved_valid = ndimage.shift(valid.astype(np.float32), (dy, dx), order=1, cval=0.0) > 0.999
    return out, moved_valid


def _write(path: Path, data: np.ndarray, valid: np.ndarray, crs: str, transform: Any) -> None:
    """uint8 GeoTIFF, nodata 0 (valid pixels clipped to 1..255)."""
    import rasterio

    pixels = np.where(valid, np.clip(np.rint(data), 1, 255), 0).astype(np.uint8)
    profile = {"driver": "GTiff", "width": pixels.shape[2], "height": pixels.shape[1],
               "count": pixels.shape[0], "dtype": "uint8", "nodata": 0, "crs": crs,
               "transform": transform, "tiled": True, "blockxsize": 512, "blockysize": 512}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(pixels)


def make_cases(workdir: Path, large_px: int) -> list[dict[str, Any]]:
    """Write every (image, shift) pair under ``workdir``; their descriptions."""
    from affine import Affine

    images: list[tuple[str, np.ndarray, np.ndarray, str, Any]] = []
    import rasterio

    with rasterio.open(SEED_BEFORE) as src:
        crs, transform = src.crs.to_string(), src.transform
    data, valid = _read_rgb(SEED_BEFORE)
    images.append(("Dabancheng S2 3.5 m", data, valid, crs, transform))
    levir = _levir_images() if LEVIR_TILES.exists() else []
    utm = ("EPSG:32645", Affine(0.5, 0, 600000.0, 0, -0.5, 4805000.0))
    if levir:
        first = levir[0]
        images.append(("LEVIR-CD tile 0.5 m", first, np.ones(first.shape[1:], bool), *utm))
    else:
        log.warning("no LEVIR-CD tiles at %s: only the Dabancheng frame is measured", LEVIR_TILES)
    if large_px and levir:
        big = mosaic(levir, large_px)
        images.append((f"LEVIR-CD mosaic {large_px}", big, np.ones(big.shape[1:], bool), *utm))
    cases = []
    for index, (name, data, valid, crs, transform) in enumerate(images):
        ref = workdir / f"img{index}_before.tif"
        _write(ref, data, valid, crs, transform)
        for k, (dy, dx) in enumerate(SHIFTS_PX):
            tgt = workdir / f"img{index}_after{k}.tif"
            _write(tgt, *fourier_shift(data, valid, dy, dx), crs, transform)
            cases.append({"name": f"{index}.{k}", "image": name, "shape": list(data.shape[1:]),
                          "shift_px": [dy, dx], "reference": str(ref), "target": str(tgt),
                          "nodata": 0})
        log.info("wrote %s (%d x %d) and its %d shifted copies", name, *data.shape[1:],
                 len(SHIFTS_PX))
    return cases


# --- our co-registration --------------------------------------------------------------------
def _as_dataarray(path: Path) -> Any:
    """The file as a ``(band, y, x)`` float32 DataArray, NaN nodata, pixel-centre coords."""
    import rasterio
    import xarray as xr

    with rasterio.open(path) as src:
        data = src.read().astype(np.float32)
        t = src.transform
    data[:, (data == 0).all(axis=0)] = np.nan
    ys = t.f + t.e * (np.arange(data.shape[1]) + 0.5)
    xs = t.c + t.a * (np.arange(data.shape[2]) + 0.5)
    return xr.DataArray(data, dims=("band", "y", "x"), coords={"y": ys, "x": xs})


def measure_ours(case: dict[str, Any], repeat: int) -> dict[str, Any]:
    """``estimate_shift`` with the default parameters; the median of ``repeat`` timings."""
    import warnings

    from pipeline.core.coreg import estimate_shift
    from pipeline.model import CoregParams

    before, after = _as_dataarray(Path(case["reference"])), _as_dataarray(Path(case["target"]))
    times, cpu = [], []
    for _ in range(repeat):
        t0, cpu0 = time.perf_counter(), time.process_time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an untrusted shift is reported in the table
            result = estimate_shift(before, after, params=CoregParams())
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - cpu0)
    dy_true, dx_true = case["shift_px"]
    return {"seconds": statistics.median(times), "cpu_seconds": statistics.median(cpu),
            "dy": result.dy, "dx": result.dx,
            "error_px": float(np.hypot(result.dy + dy_true, result.dx + dx_true)),
            "trusted": result.applied, "note": result.note}


# --- AROSICS in its own environment ---------------------------------------------------------
def _run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)


def _arosics_env() -> dict[str, str]:
    env = dict(os.environ)
    if Path("/usr/share/proj").is_dir():  # Debian's pyproj seen from a venv misses its data
        env.setdefault("PROJ_DATA", "/usr/share/proj")
    return env


def arosics_problem(venv: Path) -> str | None:
    """None when ``venv`` runs AROSICS, else why not."""
    python = venv / "bin" / "python"
    if not python.exists():
        return f"no AROSICS environment at {venv} (make bench-coreg, or --setup, makes it)"
    proc = _run([str(python), "-c", "import arosics"], env=_arosics_env(), cwd="/")
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return f"arosics does not import in {venv}: {last}"
    return None


def setup_arosics(venv: Path) -> str | None:
    """Make the AROSICS environment (FIELD_NOTES.md); None on success, else the reason."""
    system = "/usr/bin/python3"
    probe = _run([system, "-c", "import osgeo.gdal, numpy"])
    if probe.returncode != 0:
        return (f"{system} cannot import GDAL's Python bindings and NumPy; install Debian's "
                "python3-gdal (apt-get install python3-gdal) and run make bench-coreg again")
    steps = [[system, "-m", "venv", "--system-site-packages", str(venv)]]
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    pins = _run([system, "-c", "import importlib.metadata as m\n"
                 f"for n in {SYSTEM_PINNED!r}:\n"
                 "    try: print(f'{n}=={m.version(n)}')\n"
                 "    except m.PackageNotFoundError: pass"]).stdout
    constraints = venv.parent / f".{venv.name}-constraints.txt"
    steps += [[*pip, "--no-deps", *AROSICS_PACKAGES], [*pip, "-c", str(constraints), *AROSICS_DEPS]]
    constraints.write_text(pins)
    for step in steps:
        log.info("AROSICS set-up: %s", " ".join(step))
        proc = _run(step)
        if proc.returncode != 0:
            tail = " ".join(proc.stderr.split())[-300:]
            return f"AROSICS set-up failed at `{' '.join(step[2:5])} ...`: {tail}"
    return arosics_problem(venv)


def measure_arosics(venv: Path, cases: list[dict[str, Any]], repeat: int,
                    timeout_s: float) -> dict[str, dict[str, Any]]:
    """AROSICS's correction per case (median time of ``repeat`` runs), by case name."""
    runs = [c for c in cases for _ in range(repeat)]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(runs, fh)
    try:
        runner = Path(__file__).with_name("arosics_shift.py")
        proc = _run([str(venv / "bin" / "python"), str(runner), fh.name], env=_arosics_env(),
                    cwd="/", timeout=timeout_s)
    finally:
        os.unlink(fh.name)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 and not lines:
        raise RuntimeError(" ".join(proc.stderr.split())[-300:])
    out: dict[str, dict[str, Any]] = {}
    for case in cases:
        mine = [r for r in lines if r["name"] == case["name"]]
        ok = [r for r in mine if r["success"]]
        if not ok:
            out[case["name"]] = {"problem": mine[0].get("problem", "?") if mine else "not run"}
            continue
        dy_true, dx_true = case["shift_px"]
        x, y = ok[0]["x_shift_px"], ok[0]["y_shift_px"]
        out[case["name"]] = {"seconds": statistics.median(r["seconds"] for r in ok),
                             "cpu_seconds": statistics.median(r["cpu_seconds"] for r in ok),
                             "dy": y, "dx": x, "reliability_pct": ok[0]["reliability_pct"],
                             "error_px": float(np.hypot(y + dy_true, x + dx_true))}
    return out


# --- tables and docs ------------------------------------------------------------------------
def _fmt(value: Any, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _seconds(figures: dict[str, Any]) -> str:
    if figures.get("seconds") is None:
        return "-"
    return f"{figures['seconds']:.2f} ({figures['cpu_seconds']:.2f})"


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    """Header plus one row per (image, shift)."""
    rows = [["image", "size (px)", "shift (rows, cols)", "ours error px", "ours s (CPU s)",
             "ours trusted", "AROSICS error px", "AROSICS s (CPU s)", "AROSICS reliability %"]]
    for case in result["cases"]:
        ours, theirs = case["ours"], case.get("arosics") or {}
        problem = theirs.get("problem") or result.get("arosics_problem")
        rows.append([case["image"], " x ".join(map(str, case["shape"])),
                     "{:+.2f}, {:+.2f}".format(*case["shift_px"]),
                     _fmt(ours["error_px"], 3), _seconds(ours),
                     "yes" if ours["trusted"] else f"no ({ours['note']})",
                     "failed" if problem else _fmt(theirs["error_px"], 3),
                     _seconds(theirs),
                     _fmt(theirs.get("reliability_pct"), 0)])
    return rows


def markdown_section(result: dict[str, Any]) -> str:
    """This script's section of docs/benchmarks.md."""
    from bench import md_table

    problems = sorted({c["arosics"]["problem"] for c in result["cases"]
                       if c.get("arosics") and "problem" in c["arosics"]})
    notes = "".join(f"\n- AROSICS failed: {p}" for p in problems)
    shown = [a for i, a in enumerate(result["argv"])
             if not (a.startswith("--json") or result["argv"][i - 1:i] == ["--json"])]
    command = " ".join(["python scripts/bench_coreg.py", *shown])
    if result.get("arosics_problem"):
        notes += f"\n- AROSICS not run: {result['arosics_problem']}"
    return f"""{SECTION}

From `scripts/bench_coreg.py` (`make bench-coreg`), measured {result['date']} with
`{command}`; AROSICS {result.get('arosics_version', '-')}
in its own environment (Debian python3-gdal, see FIELD_NOTES.md), ours at git {result['git']}.
A real image is shifted by a known sub-pixel amount (Fourier shift; pixels shifted in from
outside the frame or from nodata are nodata) and both methods measure the correction on the same
uint8 GeoTIFFs with their defaults. Error: distance in pixels from the true correction. Times
exclude reading the files and are medians of {result['repeat']} runs: wall seconds, and in
brackets the CPU seconds of the measuring process (all threads), which depend much less on
other users of the machine. Ours searches the
correlation peak on a 1/20 px grid (`coreg.upsample_factor`), so its error is at least the
distance to that grid (up to 0.035 px); the shifts are chosen off it. The LEVIR-CD mosaic is
made of the real 0.5 m tiles of both dates, flipped and rotated at random. The machine may be
shared ({result.get('cores', '?')} cores): load average {result['load_start']} at the start,
{result['load_end']} at the end (1, 5, 15 min).{notes}

{md_table(table_rows(result))}
"""


# --- main -----------------------------------------------------------------------------------
def _load() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def _git() -> str:
    proc = _run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT)
    dirty = _run(["git", "status", "--porcelain", "--", "pipeline/core/coreg.py"],
                 cwd=PROJECT_ROOT).stdout.strip()
    return proc.stdout.strip() + (" + uncommitted coreg.py" if dirty else "")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Make the pairs, measure both methods; the raw results."""
    problem = setup_arosics(args.arosics_venv) if args.setup and arosics_problem(
        args.arosics_venv) else arosics_problem(args.arosics_venv)
    if problem:
        log.warning("%s; measuring ours only", problem)
    result: dict[str, Any] = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
                              "argv": args.argv, "repeat": args.repeat, "git": _git(),
                              "cores": os.cpu_count(), "load_start": _load(),
                              "arosics_problem": problem}
    args.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pairs-", dir=args.workdir) as tmp:
        cases = make_cases(Path(tmp), args.large_px)
        for case in cases:
            log.info("ours: %s shift %s", case["image"], case["shift_px"])
            case["ours"] = measure_ours(case, args.repeat)
        if not problem:
            log.info("AROSICS: %d cases x %d runs", len(cases), args.repeat)
            try:
                theirs = measure_arosics(args.arosics_venv, cases, args.repeat, args.timeout)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                result["arosics_problem"] = f"the AROSICS run failed: {e}"
                theirs = {}
            for case in cases:
                case["arosics"] = theirs.get(case["name"])
            version = _run([str(args.arosics_venv / "bin" / "python"), "-c",
                            "import arosics; print(arosics.__version__)"],
                           env=_arosics_env(), cwd="/").stdout.strip()
            result["arosics_version"] = version or "?"
    result["cases"] = [{k: v for k, v in c.items() if k not in ("reference", "target")}
                       for c in cases]
    result["load_end"] = _load()
    return result


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arosics-venv", type=Path, default=DEFAULT_VENV,
                   help="the AROSICS virtual environment (outside the project)")
    p.add_argument("--setup", action="store_true",
                   help="make the AROSICS environment when it is missing or broken")
    p.add_argument("--large-px", type=int, default=8192,
                   help="side of the LEVIR-CD mosaic (0: skip it)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per case (median)")
    p.add_argument("--timeout", type=float, default=1800.0, help="stop AROSICS after s")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="scratch folder")
    p.add_argument("--json", type=Path, default=None, help="write the raw results here")
    p.add_argument("--docs", type=Path, default=DEFAULT_DOCS, help="markdown report to update")
    p.add_argument("--no-docs", action="store_true", help="do not update the markdown report")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    args = p.parse_args(argv)
    args.argv = argv
    return args


def main(argv: list[str] | None = None) -> int:
    """Measure, print the table, write the JSON and the docs section."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        stream=sys.stderr, format="bench_coreg: %(message)s")
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/bench.py's tables
    from bench import text_table
    from doc_section import write_section

    from pipeline.files import atomic_write_text

    result = run(args)
    print(text_table(table_rows(result)))
    if result["arosics_problem"]:
        print(f"AROSICS not measured: {result['arosics_problem']}")
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=1, default=str), overwrite=True)
    if not args.no_docs:
        write_section(args.docs, markdown_section(result))
        log.info("updated %s", args.docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
