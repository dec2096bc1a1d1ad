"""pipeline.watch: scheduled, incremental, idempotent batch runs over watched sites.

``sites`` reads the watch file, ``state`` is the SQLite state, ``lock`` keeps runs apart,
``imagery`` lists what sources have, ``tasks`` is the per-site work a Dask worker runs,
``runner`` schedules it, ``summary`` reports it, ``importer`` turns public site lists into
watch files.
"""

from __future__ import annotations

from pipeline.watch.runner import run_watch
from pipeline.watch.sites import WatchSite, load_watch_sites
from pipeline.watch.summary import WatchSummary

__all__ = ["run_watch", "load_watch_sites", "WatchSite", "WatchSummary"]
