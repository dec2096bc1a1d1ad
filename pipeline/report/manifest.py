"""pipeline.report.manifest: the run manifest (inputs, outputs, software, config, timings).

``manifest.json`` sits in the run folder beside the outputs it lists. It records what went in
(with hashes and how acquisition dates were found), what came out (relative path, SHA-256,
size), the library versions, the resolved config and parameters hash, and the steps taken,
so a run can be reproduced and its evidence checked later with :func:`verify_manifest`.
"""

from __future__ import annotations

import json
import math
import numbers
import platform
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

import pipeline
from pipeline.errors import OutputError
from pipeline.files import atomic_write_text, sha256_file
from pipeline.model import DetectParams, SourceRef, params_hash

__all__ = [
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "DIGEST_NAME",
    "build_manifest",
    "write_manifest_digest",
    "software_versions",
    "write_manifest",
    "verify_manifest",
]

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1

# Distribution names whose versions are recorded (key in the manifest -> PyPI name).
_DISTRIBUTIONS = {
    "numpy": "numpy",
    "scipy": "scipy",
    "rasterio": "rasterio",
    "rioxarray": "rioxarray",
    "pyproj": "pyproj",
    "shapely": "shapely",
    "scikit-image": "scikit-image",
    "xarray": "xarray",
    "dask": "dask",
    "pyogrio": "pyogrio",
    "geopandas": "geopandas",
    "pandas": "pandas",
    "pillow": "pillow",
    "click": "click",
    "requests": "requests",
    "pystac-client": "pystac-client",
    "odc-stac": "odc-stac",
    "lightgbm": "lightgbm",
}
DIGEST_NAME = MANIFEST_NAME + ".sha256"


def build_manifest(
    *,
    run_id: str,
    run_dir: str | Path,
    aoi: dict[str, Any],
    inputs: Sequence[SourceRef] | Mapping[str, SourceRef],
    outputs: Sequence[str | Path],
    config: dict[str, Any],
    params: DetectParams,
    steps: Sequence[dict[str, Any]],
    started_utc: datetime,
    finished_utc: datetime,
    extra: dict[str, Any] | None = None,
    originals: Sequence[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Assemble the manifest of one run; hashes every output.

    Parameters
    ----------
    run_id
        The run id (folder name), from ``rundir.new_run_id``.
    run_dir
        The folder the outputs are in (the staged ``.partial`` folder is fine: paths are
        stored relative to it).
    aoi
        The area of interest as a JSON-ready dict (id, lon/lat bbox or geometry, ...).
    inputs
        Source scenes. A mapping gives each a role (``{"before": ref, "after": ref}``); in a
        sequence the role is ``ref.extra["role"]`` when set, else null.
    outputs
        Output files inside ``run_dir`` (absolute, or relative to ``run_dir``); not the
        manifest itself.
    config
        The fully resolved configuration as a JSON-ready dict.
    params
        Detection parameters; stored in full and as ``params_hash``.
    steps
        Ordered ``{"name", "seconds", "details"}`` dicts, one per pipeline step.
    started_utc, finished_utc
        Time-zone-aware start and end of the run.
    extra
        More top-level members (e.g. skipped-tile counts); must not clash with the above.
    originals
        The preserved source files (``report.originals.preserve_originals``): each entry's
        ``path`` (relative, or None when not preserved), ``sha256`` and ``size_bytes`` are
        checked by :func:`verify_manifest` like the outputs.

    Returns
    -------
    dict
        JSON-ready manifest; timestamps are ISO 8601 UTC ending in ``Z``.

    Raises
    ------
    ValueError
        If a timestamp is naive, an output is outside ``run_dir`` or missing, a step has no
        name, or ``extra`` clashes with a manifest member.
    """
    run_dir = Path(run_dir)
    manifest: dict[str, Any] = {
        "manifest_version": MANIFEST_VERSION,
        "run_id": run_id,
        "aoi": aoi,
        "inputs": _inputs(inputs),
        "outputs": _outputs(run_dir, outputs),
        "software": software_versions(),
        "config": config,
        "params": params.to_dict(),
        "params_hash": params_hash(params),
        "originals": list(originals or []),
        "steps": [_step(s) for s in steps],
        "started_utc": _utc_iso(started_utc),
        "finished_utc": _utc_iso(finished_utc),
        "duration_s": round((finished_utc - started_utc).total_seconds(), 3),
    }
    clashes = sorted(set(extra or {}) & set(manifest))
    if clashes:
        raise ValueError(f"extra members {clashes} clash with manifest members; rename them")
    manifest.update(extra or {})
    return manifest


def write_manifest(manifest: dict[str, Any], path: str | Path, *, overwrite: bool = False) -> Path:
    """Write the manifest atomically as UTF-8 JSON, sorted keys, indent 2.

    Parameters
    ----------
    manifest
        From :func:`build_manifest`.
    path
        Destination, normally ``<run_dir>/manifest.json``.
    overwrite
        Replace an existing file; without it an existing file is an error.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    OutputError
        If ``path`` exists and ``overwrite`` is False, or it cannot be written.
    ValueError
        If the manifest holds NaN/inf or a value JSON cannot represent.
    """
    path = Path(path)
    text = json.dumps(
        _finite(manifest), sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False,
        default=_jsonable
    )
    try:
        return atomic_write_text(path, text + "\n", overwrite=overwrite)
    except FileExistsError as e:
        raise OutputError(f"{path} exists; not overwriting evidence. Pass --overwrite.") from e
    except OSError as e:
        raise OutputError(f"Cannot write {path}: {e}. Choose another --out.") from e


def verify_manifest(run_dir: str | Path) -> tuple[bool, list[str], list[str]]:
    """Re-hash the outputs a run's manifest lists and report any difference.

    Parameters
    ----------
    run_dir
        A finished run folder holding ``manifest.json``.

    Returns
    -------
    tuple
        ``(ok, errors, warnings)``. Errors: manifest missing or unreadable, the manifest
        changed (when its digest file ``manifest.json.sha256`` is present), an output or a
        preserved original missing, changed (SHA-256 or size differ) or listed outside the
        run folder. Warnings: files in the folder the manifest does not list.
    """
    run_dir = Path(run_dir)
    errors: list[str] = []
    warnings: list[str] = []
    if (run_dir / MANIFEST_NAME).exists() and not (run_dir / MANIFEST_NAME).is_file():
        # a pipe or device: reading it would block
        return False, [f"{run_dir / MANIFEST_NAME}: not a regular file"], []
    try:
        manifest = json.loads((run_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
        entries = list(manifest["outputs"])
        entries += [o for o in manifest.get("originals") or [] if o.get("path")]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        return False, [f"{run_dir / MANIFEST_NAME}: cannot be read as a manifest ({e})"], []
    _verify_digest(run_dir, errors)
    listed = {DIGEST_NAME}
    for entry in entries:
        rel = str(entry.get("path", ""))
        listed.add(rel)
        _verify_entry(run_dir, rel, entry, errors)
    for file in sorted(p for p in run_dir.rglob("*") if p.is_file()):
        rel = file.relative_to(run_dir).as_posix()
        if rel != MANIFEST_NAME and rel not in listed:
            warnings.append(f"{rel}: present but not listed in the manifest")
    return not errors, errors, warnings


def write_manifest_digest(run_dir: str | Path) -> Path:
    """Write ``manifest.json.sha256`` (``sha256sum`` format) so a changed manifest is caught.

    Returns
    -------
    Path
        The digest file; ``sha256sum -c manifest.json.sha256`` in the run folder checks it.
    """
    run_dir = Path(run_dir)
    digest = sha256_file(run_dir / MANIFEST_NAME)
    try:
        return atomic_write_text(run_dir / DIGEST_NAME, f"{digest}  {MANIFEST_NAME}\n")
    except (FileExistsError, OSError) as e:
        raise OutputError(f"Cannot write {run_dir / DIGEST_NAME}: {e}") from e


def _verify_digest(run_dir: Path, errors: list[str]) -> None:
    """Compare the manifest with its digest file, when there is one."""
    path = run_dir / DIGEST_NAME
    if not path.exists():  # runs written before the digest existed
        return
    if not path.is_file():  # a pipe or device: reading it would block
        errors.append(f"{DIGEST_NAME}: not a regular file")
        return
    try:
        recorded = path.read_text(encoding="utf-8").split()[0]
    except (OSError, IndexError, UnicodeDecodeError):
        errors.append(f"{DIGEST_NAME}: unreadable")
        return
    if sha256_file(run_dir / MANIFEST_NAME) != recorded:
        errors.append(f"{MANIFEST_NAME}: changed (SHA-256 differs from {DIGEST_NAME})")


def software_versions() -> dict[str, str | None]:
    """Versions of Python, Sitewatch and the geospatial stack (GDAL, PROJ, GEOS included)."""
    import pyogrio
    import pyproj
    import rasterio
    import shapely

    versions: dict[str, str | None] = {
        "python": platform.python_version(),
        "sitewatch": pipeline.__version__,
        "GDAL": rasterio.__gdal_version__,
        "GDAL (pyogrio)": pyogrio.__gdal_version_string__,
        "PROJ": pyproj.proj_version_str,
        "GEOS": shapely.geos_version_string,
        "platform": platform.platform(),
    }
    for key, dist in _DISTRIBUTIONS.items():
        try:
            versions[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[key] = None
    return versions


def _verify_entry(run_dir: Path, rel: str, entry: dict[str, Any], errors: list[str]) -> None:
    """Check one listed output: inside the folder, present, same size and hash."""
    pure = PurePosixPath(rel)
    if not rel or pure.is_absolute() or ".." in pure.parts:
        errors.append(f"{rel!r}: listed path is not inside the run folder")
        return
    file = run_dir / pure
    if not file.is_file():
        errors.append(f"{rel}: missing")
        return
    if file.stat().st_size != entry.get("size_bytes"):
        errors.append(
            f"{rel}: changed (size {file.stat().st_size}, manifest {entry.get('size_bytes')})"
        )
    elif sha256_file(file) != entry.get("sha256"):
        errors.append(f"{rel}: changed (SHA-256 differs from the manifest)")


def _inputs(inputs: Sequence[SourceRef] | Mapping[str, SourceRef]) -> list[dict[str, Any]]:
    """One dict per input, role first, in the given order, with ``size_bytes``."""
    pairs: list[tuple[str | None, SourceRef]]
    if isinstance(inputs, Mapping):
        pairs = list(inputs.items())
    else:
        pairs = [(ref.extra.get("role"), ref) for ref in inputs]
    return [{"role": role, **ref.to_dict(), "size_bytes": _size(ref)} for role, ref in pairs]


def _size(ref: SourceRef) -> int | None:
    """Size of a local input file (fetched inputs: see their originals' bodies)."""
    try:
        return Path(str(ref.path)).stat().st_size if ref.path else None
    except OSError:
        return None


def _outputs(run_dir: Path, outputs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Relative path, SHA-256 and size of each output, sorted by path."""
    root = run_dir.resolve()
    entries = {}
    for out in outputs:
        file = (run_dir / out).resolve()
        if not file.is_relative_to(root):
            raise ValueError(f"Output {out} is not inside the run folder {run_dir}")
        if not file.is_file():
            raise ValueError(f"Output {out} does not exist; write it before the manifest")
        rel = file.relative_to(root).as_posix()
        entries[rel] = {"path": rel, "sha256": sha256_file(file), "size_bytes": file.stat().st_size}
    return [entries[k] for k in sorted(entries)]


def _step(step: dict[str, Any]) -> dict[str, Any]:
    """Normalise one step record to ``{name, seconds, details}`` (+ ``started_utc``, ``params``)."""
    if not step.get("name"):
        raise ValueError(f"Every step needs a name, got {step!r}")
    seconds = step.get("seconds")
    seconds = round(float(seconds), 3) if seconds is not None and math.isfinite(seconds) else None
    record = {"name": str(step["name"]), "seconds": seconds, "details": step.get("details") or {}}
    for key in ("started_utc", "params"):
        if step.get(key) is not None:
            record[key] = step[key]
    return record


def _utc_iso(moment: datetime) -> str:
    """ISO 8601 in UTC with a ``Z`` suffix, whole seconds."""
    if moment.tzinfo is None:
        raise ValueError(f"Timestamp {moment!r} has no time zone; pass datetime.now(timezone.utc)")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _finite(value: Any) -> Any:
    """Replace NaN and infinities (unknown figures, e.g. a skipped step's score) by null."""
    if isinstance(value, numbers.Real) and not isinstance(value, int) \
            and not math.isfinite(float(value)):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _jsonable(value: Any) -> Any:
    """``json.dumps`` fallback for paths, dates, tuples and NumPy scalars."""
    if isinstance(value, datetime):
        return _utc_iso(value) if value.tzinfo else value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Path | PurePosixPath):
        return str(value)
    if isinstance(value, set | frozenset):
        return sorted(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable: {value!r}")
