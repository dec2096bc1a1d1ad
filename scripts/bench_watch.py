#!/usr/bin/env python
"""scripts/bench_watch.py: watch throughput over many sites, and the rerun with nothing new.

Prints figures, never asserts them. Issue "watched sites": watch throughput for 200 sites from
cached imagery, and the time of a rerun with nothing new (target: under 5 % of the first run).

It serves the loopback Wayback of ``tests/watch/fake_wayback.py`` with ``--sites`` sites
(points of 250 m radius on a grid 1.6 x 2.2 km apart near Dabancheng; synthetic ground, and
new rows of roofs in the second of two releases; ``--variants`` different patches shared
among the sites) and runs ``pipeline.watch.run_watch`` on the ``--scheduler``:

1. **cold**: a fresh data folder and a fresh download cache (fetches every tile);
2. **first run from cached imagery**: a fresh data folder, the warm cache, ``offline``: every
   site is listed and analysed (the throughput figure, sites per minute);
3. **rerun, nothing new** (``force``, offline): every site is listed again from the cache and
   nothing is detected (the figure to compare with 2);
4. **rerun, nothing new, online**: the same asking the server (the release list is re-read;
   tilemap answers come from the cache).

stdout gets the table; ``--json PATH`` writes the raw figures.

Examples::

    .venv/bin/python scripts/bench_watch.py                       # 200 sites, about 10 min
    .venv/bin/python scripts/bench_watch.py --sites 20 --scheduler sync
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from watch.fake_wayback import build_images, grid_sites, serve_fake, sites_geojson  # noqa: E402

from pipeline.config import load_config, load_sources  # noqa: E402
from pipeline.watch import load_watch_sites, run_watch  # noqa: E402


def _measure(label: str, sites, config, sources, out: Path, *, scheduler: str, offline: bool,
             force: bool) -> dict:
    """One run_watch, timed."""
    start = time.perf_counter()
    summary = run_watch(sites, config=config, sources=sources, out_root=out,
                        scheduler=scheduler, offline=offline, force=force)
    seconds = time.perf_counter() - start
    totals = summary.totals()
    print(f"  {label}: {seconds:.1f} s, {totals}", file=sys.stderr, flush=True)
    return {"label": label, "seconds": round(seconds, 2), "totals": totals,
            "exit_code": summary.exit_code}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=200, help="number of sites [200]")
    parser.add_argument("--variants", type=int, default=4, help="different patches [4]")
    parser.add_argument("--scheduler", default="local", help="local, sync or an address")
    parser.add_argument("--workdir", type=Path, default=None, help="kept if given")
    parser.add_argument("--json", dest="json_path", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="sitewatch-bench-watch-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        results = _run(args, work)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    _print(results, args)
    if args.json_path:
        args.json_path.write_text(json.dumps(results, indent=1))
    return 0


def _run(args: argparse.Namespace, work: Path) -> dict:
    """The four measurements."""
    positions = grid_sites(args.sites)
    print(f"drawing {args.variants} patch(es) for {args.sites} sites ...", file=sys.stderr)
    images = build_images(positions, variants=args.variants)
    gen = serve_fake(images, positions)
    fake = next(gen)
    try:
        config_path = work / "config.toml"
        config_path.write_text(f'[fetch]\ncache_dir = "{work / "cache"}"\ntimeout_s = 30.0\n\n'
                               f"{fake.source_toml()}")
        config, sources = load_config(config_path), load_sources(config_path)
        sites = load_watch_sites(sites_geojson(work / "sites.geojson", sites=positions),
                                 sources=sources)
        runs = [_measure("cold (fetching)", sites, config, sources, work / "cold",
                         scheduler=args.scheduler, offline=False, force=True)]
        requests_cold = fake.server.total_requests
        runs.append(_measure("first run, cached imagery", sites, config, sources,
                             work / "warm", scheduler=args.scheduler, offline=True, force=True))
        runs.append(_measure("rerun, nothing new (offline)", sites, config, sources,
                             work / "warm", scheduler=args.scheduler, offline=True, force=True))
        fake.server.reset_counts()
        runs.append(_measure("rerun, nothing new (online)", sites, config, sources,
                             work / "warm", scheduler=args.scheduler, offline=False, force=True))
        requests_rerun = fake.server.total_requests
    finally:
        gen.close()
    return {"sites": args.sites, "scheduler": args.scheduler, "cpus": os.cpu_count(),
            "runs": runs, "requests_cold": requests_cold,
            "requests_online_rerun": requests_rerun}


def _print(results: dict, args: argparse.Namespace) -> None:
    """The table on stdout."""
    runs = {r["label"]: r for r in results["runs"]}
    first = runs["first run, cached imagery"]["seconds"]
    print(f"watch benchmark: {results['sites']} sites, scheduler {results['scheduler']}, "
          f"{results['cpus']} CPUs")
    print("| run | seconds | sites/min | analyses | new findings | share of first run |")
    print("|---|---|---|---|---|---|")
    for r in results["runs"]:
        t = r["totals"]
        rate = 60 * t["checked"] / r["seconds"] if r["seconds"] else float("nan")
        print(f"| {r['label']} | {r['seconds']:.1f} | {rate:.0f} | {t['analyses']} | "
              f"{t['new_findings']} | {100 * r['seconds'] / first:.1f} % |")
    rerun = runs["rerun, nothing new (offline)"]["seconds"]
    verdict = "met" if rerun < 0.05 * first else "not met"
    print(f"rerun with nothing new: {100 * rerun / first:.1f} % of the first run (target < 5 %: "
          f"{verdict}); requests: cold {results['requests_cold']}, online rerun "
          f"{results['requests_online_rerun']}")


if __name__ == "__main__":
    sys.exit(main())
