"""pipeline.watch.lock: one watch run at a time over a state folder.

The lock is a file (``OUT/watch.lock``) held with ``fcntl.flock`` for the whole run and holding
the owner's pid, host and start time. The kernel drops a flock when its process dies, however it
dies (SIGKILL included), so a lock left by a dead process is free and taken over; its pid is
only reported (``StateLock.stale_pid``). A live holder makes ``acquire`` fail with its pid. The
file itself stays (emptied on release), so a run leaves no new file behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from datetime import UTC, datetime
from pathlib import Path

from pipeline.errors import OutputError, PipelineError

__all__ = ["LockHeldError", "StateLock"]


class LockHeldError(PipelineError, OSError):
    """Another live watch run holds the state lock."""


class StateLock:
    """An exclusive, crash-safe lock on a state folder.

    Examples
    --------
    >>> with StateLock(out / "watch.lock") as lock:   # doctest: +SKIP
    ...     lock.stale_pid   # pid of a dead run whose lock was taken over, or None
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.stale_pid: int | None = None
        self._fd: int | None = None

    def acquire(self) -> StateLock:
        """Take the lock or raise LockHeldError naming the holder.

        Raises
        ------
        LockHeldError
            Another process holds it.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and not self.path.is_file():  # a folder, pipe or device
            raise OutputError(f"The watch lock {self.path} is not a regular file; remove it "
                              "(a run recreates it) or choose another --out.")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise LockHeldError(
                f"Another watch run holds {self.path} ({holder or 'owner unknown'}); wait for it "
                "to finish. A lock whose process has died is taken over automatically."
            ) from None
        previous = _read(fd)
        pid = _pid_of(previous)
        if pid is not None and pid != os.getpid():
            self.stale_pid = pid  # its flock is gone, so it died without releasing
        os.ftruncate(fd, 0)
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        os.pwrite(fd, f"pid {os.getpid()} host {socket.gethostname()} since {stamp}\n".encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Empty the file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> StateLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read(fd: int) -> str:
    """The lock file's text (the holder's description)."""
    try:
        return os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _pid_of(text: str) -> int | None:
    """The pid written in a lock file's text, if any."""
    parts = text.split()
    if len(parts) >= 2 and parts[0] == "pid" and parts[1].isdigit():
        return int(parts[1])
    return None
