"""The writers' thread count follows the configured Dask scheduler."""

from __future__ import annotations

import dask
import pytest
from dask.system import CPU_COUNT

from pipeline.report.workers import dask_threads


@pytest.mark.parametrize(("settings", "expected"), [
    ({"scheduler": "threads", "num_workers": 1}, 1),
    ({"scheduler": "threads", "num_workers": 3}, 3),
    ({"scheduler": "threads"}, CPU_COUNT),
    ({"scheduler": "synchronous", "num_workers": 4}, 1),
    ({"scheduler": "single-threaded"}, 1),
    ({"scheduler": "processes", "num_workers": 2}, 2),
])
def test_dask_threads_follows_the_scheduler(settings: dict[str, object], expected: int) -> None:
    """One thread under the synchronous scheduler, else num_workers, else the CPU count."""
    with dask.config.set(settings):
        assert dask_threads() == expected
