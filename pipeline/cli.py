"""pipeline.cli: the ``sitewatch`` command line; thin, the only place that prints.

stdout carries data only (where the evidence went, one line per finding); logs, progress and
warnings go to stderr. Exit codes: 0 success, 1 a pipeline error (message, no traceback unless
``-vv``), 2 a usage error.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any, get_args

import click

from pipeline import __version__
from pipeline.allocator import reuse_freed_memory
from pipeline.cli_options import (
    OutFolder,
    config_opt,
    handle_errors,
    quiet_opt,
    regular_files,
    sources_path,
    stderr_is_terminal,
    verbose_opt,
)
from pipeline.cli_watch import sites, watch
from pipeline.config import PROJECT_ROOT, load_config
from pipeline.model import BuildingModel, EvidenceKind, NormalizeMethod, ThresholdMethod

__all__ = ["main", "cli"]

SEED_BEFORE = PROJECT_ROOT / "seeds" / "dabancheng_2017-03-02.tif"
SEED_AFTER = PROJECT_ROOT / "seeds" / "dabancheng_2018-10-11.tif"
log = logging.getLogger("pipeline")


class _StageBar:
    """Stage progress on stderr, only for a terminal and without -q."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.stage = ""

    def __call__(self, name: str, index: int, total: int) -> None:
        self.stage = f"[{index + 1}/{total}] {name:<12}"
        if self.enabled:
            click.echo(f"\r{self.stage}", err=True, nl=False)

    def fetched(self, done: int, total: int) -> None:
        """Download progress within the read stage (called from the fetch threads)."""
        if self.enabled:
            click.echo(f"\r{self.stage} fetched {done}/{total}", err=True, nl=False)

    def close(self) -> None:
        if self.enabled:
            click.echo("\r" + " " * 48 + "\r", err=True, nl=False)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sitewatch")
def cli() -> None:
    """Sitewatch: find newly built facilities in before/after satellite imagery.

    \b
    Examples:
      $ sitewatch detect                      # the embedded Dabancheng sample
      $ sitewatch detect --aoi 88.28994,43.38385 --radius-m 1500 \\
            --before before.tif --after after.tif --out out/
      $ sitewatch verify out/dabancheng/<run-id>          # re-hash an evidence folder
      $ sitewatch watch --sites configs/sites.geojson --out out/
      $ sitewatch sites import seeds/sites/CampDataset_v1.csv -o aspi.geojson

    Each command has its own --help. Guides: README.md, docs/analyst-guide.md, docs/method.md.
    """


@cli.command(short_help="Detect new construction between two images of an AOI.")
@click.option("--aoi", default="dabancheng", show_default=True,
              help="'lon,lat' (with --radius-m), 'minlon,minlat,maxlon,maxlat', a GeoJSON/"
                   "GeoPackage polygon file, or a site name from configs/sites.geojson.")
@click.option("--before", "before_path", type=click.Path(path_type=Path), default=None,
              help="Before image (GeoTIFF/COG) [default: the seeds/ sample pair].")
@click.option("--after", "after_path", type=click.Path(path_type=Path), default=None,
              help="After image (GeoTIFF/COG) [default: the seeds/ sample pair].")
@click.option("--before-date", default=None,
              help="With a file: its acquisition date (YYYY-MM-DD) when the file has none. With "
                   "--source: the date (searched +-45 days) or window START/END to fetch.")
@click.option("--after-date", default=None,
              help="As --before-date, for the after image.")
@click.option("--source", "source_name", default=None,
              help="Fetch the dates without a file from this entry of configs/sources.toml "
                   "(e.g. earth-search, landsat, esri-wayback).")
@click.option("--offline", is_flag=True,
              help="Use only what is in the download cache; say what is missing.")
@click.option("--radius-m", type=float, default=None,
              help="Radius around a 'lon,lat' AOI in metres [default: aoi.radius_m, 1000].")
@click.option("--out", "out_root", type=OutFolder(), default=Path("out"), show_default=True,
              help="Evidence folder root.")
@click.option("--res-m", type=float, default=None,
              help="Working-grid pixel size in metres [default: the coarser input].")
@click.option("--threshold", type=float, default=None,
              help="Fixed change-magnitude threshold instead of the automatic one.")
@click.option("--threshold-method", type=click.Choice(get_args(ThresholdMethod)), default=None,
              help="Automatic threshold method [default: from config, otsu].")
@click.option("--normalize", "normalize_method", type=click.Choice(get_args(NormalizeMethod)),
              default=None, help="Radiometric normalization [default: from config, histogram].")
@click.option("--building-model", type=click.Choice(get_args(BuildingModel)), default=None,
              help="Change mask of new buildings: 'none' (change vector analysis, any imagery) "
                   "or 'cnn' (the shipped siamese U-Net; red-green-blue, about 1 m or finer) "
                   "[default: from config, none].")
@click.option("--all-findings", is_flag=True,
              help="Print every finding: walls, watchtowers and 'change' regions too.")
@config_opt
@verbose_opt
@quiet_opt
@handle_errors
def detect(aoi: str, before_path: Path | None, after_path: Path | None,
           before_date: str | None, after_date: str | None, source_name: str | None,
           offline: bool, radius_m: float | None,
           out_root: Path, res_m: float | None, threshold: float | None,
           threshold_method: str | None, normalize_method: str | None,
           building_model: str | None, all_findings: bool,
           config_path: Path | None, verbose: int, quiet: int) -> None:
    """Detect new buildings and compounds between a before and an after image.

    Both images are read for the AOI only, put on the AOI's UTM grid, co-registered and
    radiometrically matched; the change is thresholded and grouped into new buildings and
    compounds. Evidence goes to OUT/<aoi-id>/<run-id>/ (changes.geojson and .gpkg with their
    QGIS style, change_mask.tif, change_magnitude.tif, chips/, report.html, originals/,
    manifest.json); an earlier run is never overwritten. stdout gets the
    run folder and one line per finding.

    \b
    Examples:
      $ sitewatch detect
      $ sitewatch detect --aoi 88.28994,43.38385 --radius-m 2000 \\
            --before seeds/dabancheng_2017-03-02.tif --after seeds/dabancheng_2018-10-11.tif
      $ sitewatch detect --aoi 88.27,43.37,88.31,43.39 --before a.tif --after b.tif \\
            --before-date 2017-03-02 --after-date 2018-10-11 --out evidence/
      $ sitewatch detect --aoi site.geojson --before a.tif --after b.tif --threshold 25
      $ sitewatch detect --aoi site.geojson --before a.tif --after b.tif --building-model cnn
      $ sitewatch detect --aoi 88.28994,43.38385 --radius-m 2000 --source earth-search \\
            --before-date 2017-03-01/2017-05-31 --after-date 2018-09-01/2018-10-31
      $ sitewatch detect --aoi dabancheng --source esri-wayback \\
            --before-date 2017-06-01 --after-date 2019-06-01 --offline
    """
    from pipeline.acquire import acquire_pair, fetch_context
    from pipeline.aoi import load_sites, parse_aoi
    from pipeline.run import detect_scenes

    config = load_config(config_path, overrides={
        "aoi.radius_m": radius_m, "grid.res_m": res_m, "change.threshold": threshold,
        "change.threshold_method": threshold_method, "change.normalize": normalize_method,
        "buildings.model": building_model,
    })
    sites = load_sites(config.sites_path) if config.sites_path.exists() else {}
    area = parse_aoi(aoi, radius_m=config.radius_m, sites=sites)
    before, after = _acquisitions(config, source_name, (before_path, after_path),
                                  (before_date, after_date))
    bar = _StageBar(enabled=quiet == 0 and stderr_is_terminal())
    context = fetch_context(config, offline=offline, progress=bar.fetched)
    try:
        with _sigterm_as_interrupt():
            result = detect_scenes(
                area, lambda: acquire_pair(area, before, after, config=config, context=context),
                config=config, out_root=out_root, progress=bar)
    finally:
        bar.close()
    _print_result(result, all_findings=all_findings)


@cli.command(short_help="Re-hash an evidence folder; fail if anything changed.")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@verbose_opt
@quiet_opt
@handle_errors
def verify(run_dir: Path, verbose: int, quiet: int) -> None:
    """Check every file listed in RUN_DIR/manifest.json against its SHA-256 and size.

    Covers the outputs (GeoJSON, GeoPackage, style, chips, COGs, report.html), the preserved
    originals/ and, through manifest.json.sha256, the manifest itself. Prints one line per
    problem on stdout and exits 1 if any file is missing or changed since the run; files
    that the manifest does not list are reported as warnings.

    \b
    Examples:
      $ sitewatch verify out/dabancheng/20261125T105842Z-1fd56f2f
    """
    from pipeline.report.manifest import verify_manifest

    _report_check(verify_manifest(run_dir), run_dir)


@cli.command(short_help="Check a GeoJSON file against RFC 7946.")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                callback=regular_files)
@verbose_opt
@quiet_opt
@handle_errors
def validate(path: Path, verbose: int, quiet: int) -> None:
    """Check PATH (GeoJSON) against the rules of RFC 7946: lon/lat ranges, ring orientation,
    closed rings, valid geometries, no crs member, at most 7 decimals, unique ids.

    Exits 1 when it finds errors (warnings alone exit 0).

    \b
    Examples:
      $ sitewatch validate out/dabancheng/20261125T105842Z-1fd56f2f/changes.geojson
    """
    import json

    from pipeline.report.validate import validate_geojson

    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise click.ClickException(f"{path} is not JSON (or nests too deeply): {e}. Give a "
                                   "GeoJSON file.") from None
    _report_check(validate_geojson(obj), path)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (timeout, systemd, CI) stops the block as Ctrl-C does ("Aborted!", exit 1), so the
    unfinished run folder and the scratch folder in TMPDIR (up to ~70 bytes a pixel) are removed
    on the way out instead of being left behind by the default, immediate exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _report_check(result: tuple[bool, list[str], list[str]], target: Path) -> None:
    """Print a validator's findings on stdout, one per line; exit 1 when it found errors."""
    ok, errors, warns = result
    for line in errors:
        click.echo(f"error\t{line}")
    for line in warns:
        click.echo(f"warning\t{line}")
    click.echo(f"{'ok' if ok else 'FAILED'}\t{target}")
    if not ok:
        sys.exit(1)


def _acquisitions(config: Any, source_name: str | None, paths: tuple[Path | None, Path | None],
                  dates: tuple[str | None, str | None]) -> tuple[Any, Any]:
    """Each role from its file, or from --source and its date; the seeds/ pair by default."""
    from pipeline.acquire import Acquisition
    from pipeline.config import load_sources
    from pipeline.fetch.base import DateWindow

    roles = ("before", "after")
    if source_name is None:
        if (paths[0] is None) != (paths[1] is None):
            raise click.UsageError("Give both --before and --after, or --source to fetch the "
                                   "other date, or neither to use the seeds/ sample pair.")
        if paths[0] is None:
            log.info("No --before/--after: using the embedded sample pair in seeds/")
            paths = (SEED_BEFORE, SEED_AFTER)
        before, after = (Acquisition(role=r, path=p, acquired=_one_date(d, f"--{r}-date"))
                         for r, p, d in zip(roles, paths, dates, strict=True))
        return before, after
    sources_file = sources_path(config.config_path)
    sources = load_sources(sources_file)
    if source_name not in sources:
        raise click.BadParameter(f"{source_name!r} is not a source in {sources_file}; known: "
                                 f"{', '.join(sources)}.", param_hint="--source")
    wants = []
    for role, path, text in zip(roles, paths, dates, strict=True):
        if path is not None:
            acquired = _one_date(text, f"--{role}-date")
            wants.append(Acquisition(role=role, path=path, acquired=acquired))
        elif text is None:
            raise click.UsageError(f"--source {source_name} needs --{role}-date (YYYY-MM-DD or "
                                   f"START/END) for the {role} image.")
        else:
            wants.append(Acquisition(role=role, source=sources[source_name],
                                     window=DateWindow.parse(text, pad_days=45)))
    return wants[0], wants[1]


def _one_date(text: str | None, flag: str) -> date | None:
    if text is None:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a date; write it as YYYY-MM-DD, e.g. "
                                 f"2017-03-02 (a window START/END needs --source)",
                                 param_hint=flag) from None


def _print_result(result: Any, *, all_findings: bool) -> None:
    counts = {k: sum(e.kind == k for e in result.evidence) for k in get_args(EvidenceKind)}
    from pyproj import Transformer

    click.echo(f"wrote {result.run_dir}")
    to_lonlat = Transformer.from_crs(result.grid.crs, "EPSG:4326", always_xy=True)
    for e in result.evidence:
        if e.kind in ("change", "wall", "watchtower") and not all_findings:
            continue
        lon, lat = to_lonlat.transform(e.geometry.centroid.x, e.geometry.centroid.y)
        extra = ""
        if e.kind == "compound":
            m = e.measurements
            extra = (f" {m['length_m']:.0f} x {m['width_m']:.0f} m,"
                     f" {m['building_count']} new buildings, grade {m['grade']}")
        click.echo(f"{e.id}\t{e.kind}\tscore {e.score:.2f}\t{e.area_m2 / 1e4:.2f} ha"
                   f"\tat {lon:.5f},{lat:.5f}{extra}")
    click.echo(f"summary\t{counts['compound']} compound(s), {counts['new_building']} new "
               f"building(s), {counts['change']} other change region(s), {counts['wall']} "
               f"wall segment(s), {counts['watchtower']} watchtower(s); "
               f"shift {result.coreg.dy:+.2f},{result.coreg.dx:+.2f} px "
               f"({'applied' if result.coreg.applied else 'not applied'})")


cli.add_command(watch)
cli.add_command(sites)


def main() -> None:
    """Console-script entry point (the process's allocator set for large arrays first)."""
    reuse_freed_memory()
    cli(prog_name="sitewatch")


if __name__ == "__main__":
    main()
