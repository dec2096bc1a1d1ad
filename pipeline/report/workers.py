"""pipeline.report.workers: the writers use as many threads as the run's Dask scheduler.

A run's parallelism is set in one place, Dask's configuration
(``dask.config.set(scheduler="threads", num_workers=N)``, or the synchronous scheduler for
one thread). The writers' own threads follow the same number: the PNG encoders of the chips,
GDAL's compression threads for the COGs and the rasters written beside the other files. So
one worker means one core for the whole run, not only for its Dask graphs, and a comparison
of one and two workers measures the real gain.
"""

from __future__ import annotations

import dask
import dask.base
import dask.local
from dask.system import CPU_COUNT

__all__ = ["dask_threads"]


def dask_threads() -> int:
    """The number of threads the configured Dask scheduler runs in this process.

    Returns
    -------
    int
        1 for Dask's synchronous scheduler; else the ``num_workers`` setting when given, else
        the CPU count (Dask's default for its thread and process pools). Under a distributed
        client, whose workers live elsewhere, the writers of this process also get the CPU
        count unless ``num_workers`` is set.
    """
    if dask.base.get_scheduler() is dask.local.get_sync:
        return 1
    workers = dask.config.get("num_workers", None)
    return max(1, int(workers)) if workers else max(1, CPU_COUNT)
