"""pipeline.acquire: get the before and after scenes for an AOI from files or imagery sources.

Each role (before, after) is either a local file or a configured source with a date window.
The working grid is the AOI's UTM zone at the coarsest resolution among the inputs (never
inventing detail), unless the config fixes ``grid.res_m``. Fetchers are looked up by the
source's ``type``; adding a source type is one module with a ``fetch`` function.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from pipeline.aoi import Aoi, plan_grid
from pipeline.config import RunConfig
from pipeline.errors import ConfigError, FetchError, PipelineWarning
from pipeline.fetch.base import DateWindow, FetchContext, Scene, SourceConfig
from pipeline.fetch.local import common_resolution, describe_raster, grid_chunks, read_to_grid
from pipeline.model import GridPlan

__all__ = ["Acquisition", "fetch_context", "source_res_m", "acquire_pair"]

log = logging.getLogger(__name__)

FETCHERS = {"stac": "pipeline.fetch.stac", "xyz": "pipeline.fetch.xyz",
            "wayback": "pipeline.fetch.wayback"}
_DEFAULT_RES_M = {"stac": 10.0, "xyz": 1.0, "wayback": 1.0}


@dataclass(frozen=True)
class Acquisition:
    """Where one role's pixels come from: a local ``path`` or a ``source`` with a ``window``."""

    role: str
    path: Path | None = None
    acquired: date | None = None
    source: SourceConfig | None = None
    window: DateWindow | None = None

    def __post_init__(self) -> None:
        """Refuse a role with both or neither of a file and a source (ConfigError)."""
        if (self.path is None) == (self.source is None):
            raise ConfigError(f"The {self.role} image needs either a file or a source, not "
                              f"{'both' if self.path else 'neither'}.")
        if self.source is not None and self.window is None:
            raise ConfigError(f"The {self.role} source {self.source.name} needs a date window: "
                              f"pass --{self.role}-date YYYY-MM-DD or START/END.")
        if self.source is not None and self.source.type == "local":
            raise ConfigError(f"Source {self.source.name} is of type local: give the file with "
                              f"--{self.role} PATH instead.")


def fetch_context(config: RunConfig, *, offline: bool = False,
                  progress: object = None) -> FetchContext:
    """The fetch settings of a run: cache folder, offline mode, timeouts, retries."""
    return FetchContext(cache_dir=config.cache_dir, offline=offline, progress=progress,
                        timeout_s=config.timeout_s, deadline_s=config.deadline_s,
                        max_retries=config.max_retries,
                        max_concurrency=config.max_concurrency)


def source_res_m(source: SourceConfig) -> float:
    """A source's working resolution: its ``res_m`` option, else the type's default."""
    value = source.options.get("res_m", _DEFAULT_RES_M.get(source.type))
    if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"sources.{source.name}.res_m: expected a positive number of metres, "
                          f"got {value!r}.")
    return float(value)


def _resolution(wants: tuple[Acquisition, Acquisition], config: RunConfig) -> float:
    if config.res_m:
        return config.res_m
    local = [describe_raster(a.path) for a in wants if a.path is not None]
    values = [source_res_m(a.source) for a in wants if a.source is not None]
    if local:
        values.append(common_resolution(local))
    return max(values)


def _fetch_one(want: Acquisition, plan: GridPlan, config: RunConfig,
               context: FetchContext) -> Scene:
    if want.path is not None:
        # large grids are read lazily in chunks (bounded memory); detect_scenes then checks
        # for valid pixels in its own single pass instead of a second read here
        chunks = grid_chunks(plan)
        data, ref = read_to_grid(want.path, plan, role=want.role, acquired=want.acquired,
                                 resampling=config.resampling, chunks=chunks,
                                 check_nodata=chunks is None)
        return Scene(data=data, refs=[ref], acquired=ref.acquired, info={"path": str(want.path)})
    assert want.source is not None and want.window is not None  # checked in __post_init__
    module = FETCHERS.get(want.source.type)
    if module is None:
        raise ConfigError(f"sources.{want.source.name}.type: no fetcher for "
                          f"{want.source.type!r}; known: {', '.join(FETCHERS)}, local.")
    log.info("fetching %s from %s for %s", want.role, want.source.name, want.window)
    fetch = importlib.import_module(module).fetch
    return fetch(plan, want.window, want.source, role=want.role, context=context)


def _check_distinct(before: Scene, after: Scene) -> None:
    """Stop when both roles resolve to the same imagery: 'no change' would be a lie."""
    for a in before.refs:
        for b in after.refs:
            same_hash = a.sha256 is not None and a.sha256 == b.sha256
            same_item = a.provider == b.provider and a.item_id == b.item_id and a.path is None
            if same_hash or same_item:
                raise FetchError(
                    f"before and after resolve to the same imagery ({a.provider} "
                    f"{a.release or a.item_id}, acquired {a.acquired or 'unknown'}): no change "
                    f"can be measured. Widen the date windows or choose dates further apart.")


def acquire_pair(aoi: Aoi, before: Acquisition, after: Acquisition, *, config: RunConfig,
                 context: FetchContext) -> tuple[GridPlan, Scene, Scene]:
    """Plan the AOI's grid and bring both roles onto it.

    Raises
    ------
    FetchError
        An input cannot be read or fetched, or both roles resolve to the same remote imagery
        (two identical local files only warn: the run then shows that nothing changed).
    NoValidDataError
        No scene or no valid pixel for a role.
    """
    plan = plan_grid(aoi, _resolution((before, after), config))
    scenes = [_fetch_one(want, plan, config, context) for want in (before, after)]
    if before.source is not None or after.source is not None:
        _check_distinct(scenes[0], scenes[1])
    else:
        warn_if_identical(scenes[0], scenes[1])
    return plan, scenes[0], scenes[1]


def warn_if_identical(before: Scene, after: Scene) -> None:
    """Warn (PipelineWarning) when both local scenes come from files with the same SHA-256."""
    sha256 = before.refs[0].sha256
    if sha256 is not None and sha256 == after.refs[0].sha256:
        warnings.warn(
            f"The before and after files are identical (SHA-256 {sha256[:12]}…):"
            " no change can be found. Check that --before and --after name different"
            " acquisitions.", PipelineWarning, stacklevel=3)
