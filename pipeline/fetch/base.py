"""pipeline.fetch.base: the one interface every imagery source implements.

A source is an entry of ``configs/sources.toml`` (``SourceConfig``); fetching it for an AOI,
a working grid and a date window gives a ``Scene``: pixels on the grid plus provenance.
Adding a source is one module with a ``fetch`` function of the ``Fetch`` signature, registered
in ``pipeline.fetch.registry``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any, Literal, Protocol

import xarray as xr

from pipeline.errors import ConfigError
from pipeline.model import GridPlan, SourceRef

__all__ = ["SourceType", "DateWindow", "SourceConfig", "Scene", "FetchContext", "Fetch",
           "DEADLINE_PER_TIMEOUT", "resolve_deadline_s"]

SourceType = Literal["stac", "xyz", "wayback", "local"]
#: Without a configured deadline_s, one request may take this many times timeout_s in all.
DEADLINE_PER_TIMEOUT = 4.0
_WINDOW = re.compile(r"^\s*(\d{4}-\d{2}-\d{2})\s*(?:/\s*(\d{4}-\d{2}-\d{2})\s*)?$")


@dataclass(frozen=True)
class DateWindow:
    """An inclusive window of acquisition dates, ``start <= end``."""

    start: date
    end: date

    def __post_init__(self) -> None:
        """Refuse a window that ends before it starts (ConfigError)."""
        if self.end < self.start:
            raise ConfigError(f"Date window {self.start}/{self.end} ends before it starts. "
                              f"Write it as START/END, e.g. 2017-01-01/2017-04-30.")

    @classmethod
    def parse(cls, text: str, *, pad_days: int = 0) -> DateWindow:
        """Parse ``YYYY-MM-DD`` (widened by ``pad_days`` each way) or ``YYYY-MM-DD/YYYY-MM-DD``."""
        m = _WINDOW.match(text or "")
        if not m:
            raise ConfigError(f"Date {text!r} is not a date or a window. Write YYYY-MM-DD "
                              f"(e.g. 2017-03-02) or START/END (e.g. 2017-01-01/2017-04-30).")
        try:
            start = date.fromisoformat(m.group(1))
            end = date.fromisoformat(m.group(2)) if m.group(2) else start
        except ValueError as e:
            raise ConfigError(f"Date {text!r} is not a real calendar date: {e}.") from e
        if not m.group(2) and pad_days:
            # clamped to the calendar's ends: 0001-01-01 and 9999-12-31 are parsed, not padded
            start -= timedelta(days=min(pad_days, (start - date.min).days))
            end += timedelta(days=min(pad_days, (date.max - end).days))
        return cls(start, end)

    @property
    def middle(self) -> date:
        """The window's central date."""
        return self.start + (self.end - self.start) / 2

    def __str__(self) -> str:
        """``START/END`` in ISO dates, the form the command line takes."""
        return f"{self.start.isoformat()}/{self.end.isoformat()}"


@dataclass(frozen=True)
class SourceConfig:
    """One entry of ``configs/sources.toml``: its name, type and type-specific options."""

    name: str
    type: SourceType
    options: dict[str, Any] = field(default_factory=dict, hash=False)


@dataclass
class Scene:
    """One date's pixels on the working grid, with where they came from.

    ``data`` has dims ``("band", "y", "x")``, float32, NaN = nodata, x/y at pixel centres, the
    grid's CRS and transform written with rioxarray, and a ``band`` coordinate of band names
    (e.g. ``red``, ``green``, ``blue``, ``nir``, ``swir16``). ``refs`` lists every item, tile
    release or file that contributed; ``acquired`` is the representative acquisition date
    (``None`` when unknown, e.g. a Wayback release without metadata); ``info`` carries
    source-specific figures (clear-pixel share, composite method, zoom, requests made).
    """

    data: xr.DataArray
    refs: list[SourceRef]
    acquired: date | None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FetchContext:
    """What every fetch shares: the on-disk cache, offline mode and progress reporting.

    ``timeout_s`` bounds connecting and each read (a stall); ``deadline_s`` bounds one whole
    request, headers and body, however steadily bytes arrive (``None``: ``request_deadline_s``
    derives it from ``timeout_s``).
    """

    cache_dir: Any  # pathlib.Path of the cache root
    offline: bool = False
    progress: Any = None  # Callable[[int, int], None] | None
    user_agent: str = "sitewatch (+https://github.com/sitewatch/sitewatch)"
    timeout_s: float = 30.0
    max_retries: int = 4
    max_concurrency: int = 4
    deadline_s: float | None = None

    @property
    def request_deadline_s(self) -> float:
        """Seconds one request may take in all: ``deadline_s``, else ``DEADLINE_PER_TIMEOUT``
        times ``timeout_s``."""
        return resolve_deadline_s(self.deadline_s, self.timeout_s)


def resolve_deadline_s(deadline_s: float | None, timeout_s: float) -> float:
    """The configured deadline, or ``DEADLINE_PER_TIMEOUT * timeout_s`` when none is set."""
    return float(deadline_s) if deadline_s is not None else DEADLINE_PER_TIMEOUT * timeout_s


class Fetch(Protocol):
    """The signature of every source module's ``fetch``."""

    def __call__(self, plan: GridPlan, window: DateWindow, source: SourceConfig, *,
                 role: str, context: FetchContext) -> Scene:
        """Bring the imagery of ``window`` from ``source`` onto ``plan``'s grid."""
        ...
