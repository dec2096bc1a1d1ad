"""pipeline.report.rundir: run ids and all-or-nothing run folders.

A run writes everything into ``OUT/<aoi_id>/.<run_id>.partial/`` and, only when the whole run
succeeded, renames that folder to ``OUT/<aoi_id>/<run_id>/`` in one ``os.rename``. Readers of
``OUT`` therefore see complete runs or nothing. On an error inside the ``with`` block the partial
folder is deleted and the error propagates. A finished run folder is never replaced.

A run killed outright (SIGKILL, power loss) cannot clean up: its hidden ``.<run_id>.partial``
folder stays. Such stale folders are left alone (they may help a post-mortem) and ignored:
they are hidden, hold no manifest of a finished run, and :func:`unique_run_dir_name` steps
around their names.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from pipeline.errors import OutputError, PipelineError
from pipeline.files import is_disk_full

__all__ = [
    "new_run_id",
    "unique_run_dir_name",
    "check_out_root",
    "partial_dir_name",
    "staged_run_dir",
]

_SAFE_COMPONENT = re.compile(r"[A-Za-z0-9._-]+")


def new_run_id(now: datetime, params_hash: str) -> str:
    """Run id ``YYYYMMDDTHHMMSSZ-<first 8 of params hash>``, e.g. ``20261125T104622Z-3f2a9c1d``.

    Parameters
    ----------
    now
        Time-zone-aware start time of the run (converted to UTC).
    params_hash
        ``pipeline.model.params_hash(params)``.

    Returns
    -------
    str
        The run id; pass it through :func:`unique_run_dir_name` before use.

    Raises
    ------
    ValueError
        If ``now`` is naive or the hash has characters unsafe in a folder name.
    """
    if now.tzinfo is None:
        raise ValueError(f"Run time {now!r} has no time zone; pass datetime.now(timezone.utc)")
    _check_component(params_hash, "params hash", ValueError)
    stamp = now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{params_hash[:8]}"


def unique_run_dir_name(parent: str | Path, run_id: str) -> str:
    """``run_id``, or ``run_id-2``, ``run_id-3``, ... whichever is free under ``parent``.

    A name is taken when either the finished folder or its ``.partial`` staging folder
    (a run in progress, or a stale one) exists.

    Parameters
    ----------
    parent
        The AOI folder ``OUT/<aoi_id>`` (need not exist yet).
    run_id
        From :func:`new_run_id`.

    Returns
    -------
    str
        A run id whose folders do not exist yet.
    """
    parent = Path(parent)
    candidate, n = run_id, 1
    while (parent / candidate).exists() or (parent / partial_dir_name(candidate)).exists():
        n += 1
        candidate = f"{run_id}-{n}"
    return candidate


def partial_dir_name(run_id: str) -> str:
    """Name of the hidden staging folder of ``run_id``."""
    return f".{run_id}.partial"


def check_out_root(out_root: str | Path) -> Path:
    """Create ``out_root`` if needed and prove it is writable by writing a probe file.

    Parameters
    ----------
    out_root
        The ``--out`` folder.

    Returns
    -------
    Path
        ``out_root``.

    Raises
    ------
    OutputError
        If the folder cannot be created or written, naming it and the fix.
    """
    out_root = Path(out_root)
    try:
        out_root.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".sitewatch-write-test-", dir=out_root)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        fix = ("The disk is full: free some space there or choose another --out."
               if is_disk_full(e) else "Choose another --out or fix its permissions.")
        raise OutputError(
            f"Cannot write to the output folder {out_root}: {e.strerror or e}. {fix}"
        ) from e
    return out_root


@contextlib.contextmanager
def staged_run_dir(out_root: str | Path, aoi_id: str, run_id: str) -> Iterator[Path]:
    """Stage a run folder and publish it atomically when the block succeeds.

    Parameters
    ----------
    out_root
        The ``--out`` folder; created if missing.
    aoi_id
        A single safe path component (``[A-Za-z0-9._-]``, not starting with ``.``).
    run_id
        From :func:`unique_run_dir_name`; the final folder must not exist.

    Yields
    ------
    Path
        ``OUT/<aoi_id>/.<run_id>.partial``: write every output here. On success it becomes
        ``OUT/<aoi_id>/<run_id>``.

    Raises
    ------
    OutputError
        If ``out_root`` is not writable, ``aoi_id`` or ``run_id`` is unsafe, the run folder
        (or its staging folder) already exists, or publishing fails. When publishing fails
        the finished staging folder is kept and named in the message, never deleted.
    """
    _check_component(aoi_id, "AOI id", OutputError)
    _check_component(run_id, "run id", OutputError)
    aoi_dir = check_out_root(out_root) / aoi_id
    final = aoi_dir / run_id
    partial = aoi_dir / partial_dir_name(run_id)
    _make_partial(aoi_dir, final, partial)
    try:
        yield partial
    except BaseException as e:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, PipelineError):
            raise _write_error(e, Path(out_root)) from e
        raise
    _publish(partial, final)


def _write_error(e: OSError, out_root: Path) -> OutputError:
    """OutputError for an OS error while writing a run folder; a full disk is named as such."""
    if is_disk_full(e):
        return OutputError(
            f"The disk holding {out_root} is full (or over quota) while writing the run folder: "
            f"{e.strerror or e}. The unfinished run folder was removed, so nothing partial is "
            "left. Free some space there or pass another --out, then run again."
        )
    return OutputError(
        f"Writing the run folder under {out_root} failed: {e.strerror or e}. The unfinished run "
        "folder was removed. Check that disk, or pass another --out, and run again."
    )


def _make_partial(aoi_dir: Path, final: Path, partial: Path) -> None:
    """Create the staging folder; refuse if the run (or its staging folder) exists."""
    if final.exists():
        raise OutputError(
            f"Run folder {final} already exists; not overwriting evidence. "
            "Use unique_run_dir_name() for a fresh run id."
        )
    if aoi_dir.exists() and not aoi_dir.is_dir():  # mkdir's FileExistsError would blame the run
        raise OutputError(f"{aoi_dir} is a file, not the AOI's folder of run folders; move it "
                          "or choose another --out.")
    try:
        aoi_dir.mkdir(exist_ok=True)
        partial.mkdir()
    except FileExistsError as e:
        raise OutputError(
            f"Staging folder {partial} exists: another run with this id is in progress or was "
            "killed. Use unique_run_dir_name() for a fresh run id."
        ) from e
    except OSError as e:
        raise OutputError(
            f"Cannot create {partial}: {e.strerror or e}. Choose another --out."
        ) from e


def _publish(partial: Path, final: Path) -> None:
    """Rename the staging folder onto the final name; never replace an existing run."""
    # os.rename would silently replace an *empty* existing folder on POSIX, so check first.
    if final.exists():
        raise OutputError(
            f"Run folder {final} appeared during the run; results kept in {partial}. "
            "Move them by hand."
        )
    try:
        os.rename(partial, final)
    except OSError as e:
        raise OutputError(
            f"Cannot publish {partial} as {final}: {e.strerror or e}; results kept in {partial}."
        ) from e
    _fsync_dir(final.parent)


def _fsync_dir(folder: Path) -> None:
    """Flush a folder entry (the rename) to disk where the OS allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _check_component(value: str, what: str, error: type[Exception]) -> None:
    """Raise ``error`` unless ``value`` is one safe, visible path component."""
    if not isinstance(value, str) or not _SAFE_COMPONENT.fullmatch(value) or value.startswith("."):
        raise error(
            f"{what} {value!r} is not a safe folder name: use only letters, digits, '.', '_' "
            "and '-', not starting with '.'"
        )
