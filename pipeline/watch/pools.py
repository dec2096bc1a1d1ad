"""pipeline.watch.pools: where the tasks of a watch run execute.

Listing (asking each source what imagery exists) is light I/O, mostly cache hits: it runs on a
few threads of the coordinating process. Detection is the heavy part: it runs on Dask, and the
cluster (or the connection to one) is set up only when the first detection is submitted, so a
run that finds nothing new never starts one. ``"sync"`` runs every task in this process, one
at a time, in submission order (tests, debugging).

Results come back as ``(job, result)``; a task that raised (a dead worker, a lost connection)
gives ``(job, exception)``, so one failing site never stops the others.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pipeline.errors import ClusterError, ConfigError

__all__ = ["TaskPool", "open_pool", "check_scheduler", "LIST_THREADS", "START_TIMEOUT_S"]

log = logging.getLogger(__name__)

LIST_THREADS = 4
# a local worker process or a remote scheduler that has not answered by then is an error
# (ClusterError), not a weekly run that hangs; sporadic start-up hangs of LocalCluster are
# known upstream (dask/distributed#1628)
START_TIMEOUT_S = 60
Task = Callable[[Any], Any]


class TaskPool:
    """Runs listing tasks on threads and detection tasks on Dask (or all in process)."""

    def __init__(self, scheduler: str, n_sites: int) -> None:
        self.scheduler = scheduler
        self.n_sites = n_sites
        self._inline: deque[tuple[Task, Any]] = deque()
        self._done: queue.Queue[tuple[Any, Any]] = queue.Queue()
        self._futures: set[Any] = set()
        self._threads: ThreadPoolExecutor | None = None
        self._client: Any = None
        self._stack = contextlib.ExitStack()

    def submit(self, fn: Task, job: Any, *, heavy: bool) -> None:
        """Run ``fn(job)``: on Dask if ``heavy``, else on a local thread."""
        if self.scheduler == "sync":
            self._inline.append((fn, job))
            return
        if heavy:
            future = self._dask().submit(fn, job, pure=False)
        else:
            if self._threads is None:
                self._threads = ThreadPoolExecutor(LIST_THREADS, thread_name_prefix="watch-list")
            future = self._threads.submit(fn, job)
        self._futures.add(future)
        future.add_done_callback(lambda f, job=job: self._done.put((job, f)))

    def busy(self) -> bool:
        """Whether a submitted task has not been handed back yet."""
        return bool(self._inline) or bool(self._futures)

    def next_done(self) -> tuple[Any, Any]:
        """The next finished task's ``(job, result or exception)``; blocks until one is."""
        if self._inline:
            fn, job = self._inline.popleft()
            try:
                return job, fn(job)
            except Exception as e:  # noqa: BLE001  (as a dead Dask task: one site fails)
                return job, e
        job, future = self._done.get()
        self._futures.discard(future)
        try:
            return job, future.result()
        except Exception as e:  # noqa: BLE001  (a dead worker fails one site, not the run)
            return job, e

    def close(self) -> None:
        """Stop the threads and the cluster (or the connection to it)."""
        if self._threads is not None:
            self._threads.shutdown(wait=True, cancel_futures=True)
        self._stack.close()

    def _dask(self) -> Any:
        """The Dask client, set up at the first call."""
        if self._client is not None:
            return self._client
        from dask.distributed import Client, LocalCluster

        # the workers log at this process's level: -q quiets them too
        level = logging.getLogger("pipeline").getEffectiveLevel()
        timeout = f"{START_TIMEOUT_S}s"
        try:
            if self.scheduler == "local":
                workers = max(1, min(os.cpu_count() or 1, self.n_sites))
                # ":0": the scheduler's HTTP server runs even without a dashboard; 8787 may
                # be taken. death_timeout bounds each worker process's start.
                cluster = self._stack.enter_context(LocalCluster(
                    n_workers=workers, threads_per_worker=1, processes=True,
                    dashboard_address=":0", host="127.0.0.1", death_timeout=timeout,
                    silence_logs=max(level, logging.WARNING)))
                client = self._stack.enter_context(Client(cluster, timeout=timeout))
                log.info("Dask LocalCluster of %d worker process(es)", workers)
            else:
                client = self._stack.enter_context(Client(self.scheduler, timeout=timeout))
                log.info("Dask cluster at %s", self.scheduler)
            client.register_plugin(_worker_log_level(level), name="sitewatch-log-level")
        except (OSError, TimeoutError, ValueError, TypeError) as e:
            where = ("a Dask LocalCluster could not be started"
                     if self.scheduler == "local" else
                     f"the Dask scheduler at {self.scheduler} could not be reached")
            fix = ("run again (the analyses left pending are resumed), or use --scheduler sync "
                   "to run in this process" if self.scheduler == "local" else
                   "check that the scheduler is running (`dask scheduler`) at that address and "
                   "port, or use --scheduler local")
            raise ClusterError(f"The watch run stopped: {where} ({type(e).__name__}: {e}). "
                               f"Fix: {fix}.") from e
        self._client = client
        return self._client


def check_scheduler(scheduler: str) -> str:
    """``scheduler`` if it is ``"local"``, ``"sync"`` or a Dask address, else a ConfigError."""
    if scheduler in ("local", "sync"):
        return scheduler
    from distributed.comm.addressing import parse_address, parse_host_port
    from distributed.comm.registry import backends

    try:
        scheme, location = parse_address(scheduler, strict=False)
        if scheme not in backends or scheme == "inproc":
            raise ValueError(f"unknown scheme {scheme!r}")
        _, port = parse_host_port(location)
        if not 0 < int(port) < 65536:
            raise ValueError(f"port {port} is out of range 1-65535")
    except ValueError as e:
        raise ConfigError(
            f"--scheduler {scheduler!r} is neither 'local', 'sync' nor a Dask scheduler address "
            f"({e}). Write an address as tcp://host:port, e.g. tcp://10.0.0.5:8786.") from None
    return scheduler


def _worker_log_level(level: int) -> Any:
    """A Dask worker plugin: the worker's ``pipeline`` logs and Python warnings at ``level``."""
    from distributed import WorkerPlugin

    class WorkerLogLevel(WorkerPlugin):
        def setup(self, worker: Any) -> None:
            logging.captureWarnings(True)
            for name in ("pipeline", "py.warnings"):
                logging.getLogger(name).setLevel(level)

    return WorkerLogLevel()


@contextlib.contextmanager
def open_pool(scheduler: str, n_sites: int) -> Iterator[TaskPool]:
    """A TaskPool for ``scheduler`` (``"sync"``, ``"local"`` or an address), closed after."""
    pool = TaskPool(scheduler, n_sites)
    try:
        yield pool
    finally:
        pool.close()
