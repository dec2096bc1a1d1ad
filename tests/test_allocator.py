"""pipeline.allocator: glibc keeps large freed buffers for reuse; the environment's choice wins."""

from __future__ import annotations

import ctypes
import json
import os
import platform
import subprocess
import sys

import pytest


def _has_mallinfo2() -> bool:
    """glibc 2.33 or later: the statistics the tests read."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    return hasattr(ctypes.CDLL(None), "mallinfo2")


glibc_only = pytest.mark.skipif(not _has_mallinfo2(),
                                reason="the thresholds are glibc malloc's (mallinfo2: 2.33+)")

# A fresh process allocates a 64 MiB buffer (above glibc's largest dynamic mmap threshold,
# 32 MiB) and frees it; glibc's own statistics (mallinfo2) tell where it lived and what stayed.
_CHILD = r"""
import ctypes, json, sys
import numpy as np
from pipeline.allocator import reuse_freed_memory

class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = Info
tuned = reuse_freed_memory() if sys.argv[1] == "tune" else None
buffer = np.ones(1 << 23)
mapped = mallinfo2().hblkhd
del buffer
print(json.dumps({"tuned": tuned, "mapped": mapped, "kept": mallinfo2().fordblks}))
"""
_MIB64 = 1 << 26


def _child(mode: str, **env_extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env.update(env_extra)
    done = subprocess.run([sys.executable, "-c", _CHILD, mode], env=env, capture_output=True,
                          text=True, check=True, timeout=120)
    return json.loads(done.stdout)


@glibc_only
def test_a_large_buffer_comes_from_the_heap_and_stays_there_when_freed():
    plain, tuned = _child("plain"), _child("tune")
    assert plain["tuned"] is None and tuned["tuned"] is True
    # glibc's default: a mapping of its own, unmapped when freed
    assert plain["mapped"] >= _MIB64 and plain["kept"] < _MIB64
    # raised thresholds: from the heap, and kept there for the next buffer
    assert tuned["mapped"] < _MIB64 and tuned["kept"] >= _MIB64


@glibc_only
@pytest.mark.parametrize("env", [{"MALLOC_TRIM_THRESHOLD_": "65536"},  # as Dask's nanny sets
                                 {"MALLOC_MMAP_THRESHOLD_": "131072"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=65536"}])
def test_a_threshold_chosen_in_the_environment_is_left_alone(env):
    got = _child("tune", **env)
    assert got["tuned"] is False
    assert got["mapped"] >= _MIB64 and got["kept"] < _MIB64  # as glibc does with that choice


def test_the_command_line_sets_the_allocator_before_anything_else(monkeypatch):
    import pipeline.cli as cli

    calls = []
    monkeypatch.setattr(cli, "reuse_freed_memory", lambda: calls.append("set") or True)
    monkeypatch.setattr(cli, "cli", lambda **kw: calls.append("cli"))
    cli.main()
    assert calls == ["set", "cli"]
