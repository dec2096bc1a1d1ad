"""pipeline.cli_watch: the ``sitewatch watch`` and ``sitewatch sites`` commands.

Part of the command line (registered on ``pipeline.cli.cli``): parses options, calls
``pipeline.watch``, prints. stdout carries data only (new findings, or the ``--json``
summary); the progress bar and the summary table go to stderr.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

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
from pipeline.config import load_config
from pipeline.errors import AoiError, ConfigError

__all__ = ["watch", "sites"]

_EXIT_CODES = """\b
Exit codes (for cron, systemd, CI):
  0  finished, nothing new
  3  finished with new findings
  4  some sites failed (retried next run; the others ran), no new findings
  5  some sites failed, and others have new findings
  2  configuration error (sites file, config, options); nothing ran
  1  could not start or go on (another run holds the lock, data folder unwritable, Dask
     cluster not started or not reachable)"""


class _ConfigProblem(click.ClickException):
    """A configuration error: exit code 2, like a usage error."""

    exit_code = 2


class _SiteBar:
    """Sites done / due on stderr, for a terminal and without -q."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            self.bar = click.progressbar(length=total, label="sites", file=sys.stderr,
                                         show_pos=True)
            self.bar.__enter__()
        self.bar.update(done - self.bar.pos)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


@click.command(short_help="Check watched sites for new imagery; detect only on what is new.",
               epilog=_EXIT_CODES)
@click.option("--sites", "sites_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Watch file, GeoJSON or GeoPackage [default: aoi.sites of "
                                 "the config, configs/sites.geojson].")
@click.option("--out", "out_root", type=OutFolder(), default=Path("out"), show_default=True,
              help="Data folder: evidence per site, state in watch.db.")
@click.option("--scheduler", default="local", show_default=True,
              envvar="DASK_SCHEDULER_ADDRESS",
              help="'local' (a Dask LocalCluster, one worker per CPU), 'sync' (in this "
                   "process, one task at a time) or a Dask scheduler address such as "
                   "tcp://host:8786 (also read from DASK_SCHEDULER_ADDRESS).")
@click.option("--force", is_flag=True, help="Check every site now, whatever its 'every'.")
@click.option("--offline", is_flag=True, help="Use only the download cache.")
@click.option("--skip-invalid", is_flag=True,
              help="Run the valid sites when some features of the watch file are invalid "
                   "(each counts as a failed site) instead of stopping with exit 2.")
@click.option("--json", "as_json", is_flag=True,
              help="Print a machine-readable summary on stdout instead of the findings.")
@config_opt
@verbose_opt
@quiet_opt
@handle_errors
def watch(sites_path: Path | None, out_root: Path, scheduler: str, force: bool, offline: bool,
          skip_invalid: bool, as_json: bool, config_path: Path | None, verbose: int,
          quiet: int) -> None:
    """Check every due watched site for imagery newer than what was analysed last, and run
    the detection only on what is new, against the last analysed imagery as before.

    Each site of the watch file names its sources (configs/sources.toml), how often it is due
    ('every') and, optionally, the baseline window of its first run ('before'). State (sites,
    imagery seen, runs, findings with stable ids and history) is kept in OUT/watch.db; evidence
    goes to OUT/<site-id>/<run-id>/ as with `sitewatch detect`. A second run with nothing new
    does no detection and writes no file; a killed run is resumed by the next. stdout gets one
    line per new finding (or the --json summary); the table goes to stderr, followed by the
    run's warnings, each distinct one once with its count (none with -q).

    \b
    Examples:
      $ sitewatch watch --out data/
      $ sitewatch watch --sites seeds/sites/aspi_xjdp_facilities.geojson --out data/ --json
      $ sitewatch watch --scheduler tcp://10.0.0.5:8786 --out /shared/sitewatch
      $ sitewatch watch --scheduler sync --force -v
    """
    from pipeline.config import load_sources
    from pipeline.watch import load_watch_sites, run_watch
    from pipeline.watch.pools import check_scheduler
    from pipeline.watch.summary import format_table

    try:
        check_scheduler(scheduler)
        config = load_config(config_path)
        sources = load_sources(sources_path(config.config_path))
        invalid: list[str] | None = [] if skip_invalid else None
        watched = load_watch_sites(sites_path or config.sites_path, sources=sources,
                                   invalid=invalid)
    except (ConfigError, AoiError) as e:
        raise _ConfigProblem(str(e)) from None
    bar = _SiteBar(enabled=quiet == 0 and stderr_is_terminal())
    try:
        summary = run_watch(watched, config=config, sources=sources, out_root=out_root,
                            scheduler=scheduler, force=force, offline=offline, progress=bar,
                            invalid=invalid or ())
    finally:
        bar.close()
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=1))
    else:
        for f in summary.new_findings:
            click.echo(f"{f['id']}\t{f['site']}\t{f['kind']}\tscore {f['score']}\t"
                       f"{(f['area_m2'] or 0) / 1e4:.2f} ha\tat {f['lon']},{f['lat']}\t"
                       f"{f['run_dir']}")
    if quiet == 0:
        click.echo(format_table(summary), err=True)
    sys.exit(summary.exit_code)


@click.group(short_help="Make and check watch files.")
def sites() -> None:
    """Watch files: one feature per watched site (see `sitewatch watch`).

    \b
    Examples:
      $ sitewatch sites import seeds/sites/CampDataset_v1.csv -o aspi.geojson
      $ sitewatch sites import --help
    """


@sites.command("import", short_help="Turn ASPI / OpenStreetMap site lists into a watch file.")
@click.argument("lists", nargs=-1, required=True, callback=regular_files,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", "output_path", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="The watch file to write (.geojson).")
@click.option("--radius-m", type=float, default=1000.0, show_default=True,
              help="Radius of the sites given as points.")
@click.option("--source", "source_names", multiple=True, default=("esri-wayback",),
              show_default=True, help="Source(s) each site is checked with (repeatable).")
@click.option("--every", default="P30D", show_default=True, help="How often a site is due.")
@click.option("--before", default=None, help="Baseline window of the first run, START/END.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@verbose_opt
@quiet_opt
@handle_errors
def import_lists(lists: tuple[Path, ...], output_path: Path, radius_m: float,
                 source_names: tuple[str, ...], every: str, before: str | None,
                 overwrite: bool, verbose: int, quiet: int) -> None:
    """Read the ASPI Xinjiang Data Project facility list (.csv) and/or OpenStreetMap extracts
    (.osm) and write one watch file with a feature per site, keeping each list's attribution
    and ids. Points get --radius-m; OSM outlines stay polygons. The result is checked as
    `sitewatch watch` would read it. stdout gets the number of sites and the file.

    \b
    Examples:
      $ sitewatch sites import seeds/sites/CampDataset_v1.csv -o aspi.geojson
      $ sitewatch sites import seeds/sites/reedcamps_osm_overpass_2021-03-15.osm \\
            -o osm.geojson --before 2017-01-01/2017-12-31
    """
    from pipeline.aoi import MAX_RADIUS_M, load_site_records
    from pipeline.fetch.base import DateWindow
    from pipeline.files import atomic_write_text, is_disk_full
    from pipeline.watch.importer import dumps, import_sites
    from pipeline.watch.sites import parse_every, parse_sources

    if not 0 < radius_m <= MAX_RADIUS_M:  # NaN included: the file would hold null radii
        raise click.BadParameter(f"{radius_m!r} is not a radius; give metres, > 0 and at most "
                                 f"{MAX_RADIUS_M:g}.", param_hint="--radius-m")
    try:  # the options as `watch` reads them from every feature
        parse_every(every)
        parse_sources(list(source_names))
        if before is not None:
            DateWindow.parse(before)
        collection = import_sites(lists, radius_m=radius_m, sources=source_names, every=every,
                                  before=before)
    except ValueError as e:  # ConfigError included
        raise _ConfigProblem(str(e)) from None
    if output_path.exists() and not overwrite:
        raise click.BadParameter(f"{output_path} exists; pass --overwrite to replace it.",
                                 param_hint="--output")
    text = dumps(collection)
    with tempfile.TemporaryDirectory() as scratch:  # check it as `watch` reads it, then write
        probe = Path(scratch) / "sites.geojson"
        probe.write_text(text, encoding="utf-8")
        try:
            count = len(load_site_records(probe))
        except (ConfigError, AoiError) as e:
            raise _ConfigProblem(f"The imported list is not a valid watch file: {e}") from None
    try:
        atomic_write_text(output_path, text, overwrite=overwrite)
    except OSError as e:
        fix = ("The disk is full: free some space there or choose another --output."
               if is_disk_full(e) else "Choose another --output, or create its folder.")
        raise click.ClickException(f"Cannot write {output_path}: {e.strerror or e}. {fix}"
                                   ) from None
    click.echo(f"{count}\t{output_path}")
