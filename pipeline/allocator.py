"""pipeline.allocator: let glibc reuse large freed buffers instead of returning them to the OS.

A detect allocates and frees arrays of tens of megabytes, chunk after chunk. glibc's malloc
serves each allocation above its mmap threshold (dynamic, at most 32 MiB) with a fresh memory
mapping and unmaps it when it is freed, and it returns free memory at the top of its heap
to the OS above its trim threshold. Every new buffer then faults its pages in again, each
zeroed by the kernel. With both thresholds at 1 GiB, freed buffers stay in the heap and the
next chunk's arrays reuse them.

Fewer page faults and less system time on chunked runs, at the cost of memory kept for
reuse: the default run's peak rose by about a quarter, for no gain in time there (figures in
docs/method.md, "Speed").

Set by the entry points (the command line, the benchmark's measuring processes), never by
the library on import: it is a setting of the whole process. Left alone on C libraries
other than glibc, and where the environment already chooses these thresholds
(``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``, or
``glibc.malloc`` in ``GLIBC_TUNABLES``): a user's choice, or Dask's nanny, which starts its
workers with a low trim threshold to hand memory back.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

__all__ = ["THRESHOLD_BYTES", "reuse_freed_memory"]

THRESHOLD_BYTES = 1 << 30
_M_TRIM_THRESHOLD = -1  # glibc malloc.h
_M_MMAP_THRESHOLD = -3
_ENV_CHOICES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def reuse_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds to `THRESHOLD_BYTES` for this process.

    Returns
    -------
    bool
        True when both were set; False on another C library or platform, or when the
        environment already chooses malloc's thresholds (then nothing is changed).
    """
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in _ENV_CHOICES) or (
            "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, THRESHOLD_BYTES))
