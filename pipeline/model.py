"""pipeline.model: frozen dataclasses shared between stages.

Nothing here does I/O. Rasters between stages are ``xarray.DataArray`` with rioxarray's
``spatial_ref`` coordinate; these classes describe what has no pixels yet (a grid plan), where
pixels came from (``SourceRef``), how detection is tuned (the ``*Params``) and what it found
(``Evidence``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Literal

from affine import Affine

__all__ = [
    "ThresholdMethod",
    "NormalizeMethod",
    "OnExcess",
    "EvidenceKind",
    "GridPlan",
    "SourceRef",
    "CoregParams",
    "ChangeParams",
    "ObjectParams",
    "DetectParams",
    "Evidence",
    "CoregResult",
    "params_hash",
]

ThresholdMethod = Literal["otsu", "kittler"]
NormalizeMethod = Literal["histogram", "linear", "none"]
OnExcess = Literal["warn", "raise"]
EvidenceKind = Literal["compound", "new_building", "change"]


@dataclass(frozen=True)
class GridPlan:
    """A working grid before any pixel exists (stackstac's ``RasterSpec``).

    ``bounds`` is ``(minx, miny, maxx, maxy)`` in ``crs``, snapped to multiples of ``res_m``.
    Pixel ``(row, col)`` covers ``[minx + col*res, minx + (col+1)*res)`` in x and the matching
    band from ``maxy`` down in y; DataArray coordinates are pixel centres.
    """

    crs: str
    bounds: tuple[float, float, float, float]
    res_m: float

    def __post_init__(self) -> None:
        minx, miny, maxx, maxy = self.bounds
        if not (self.res_m > 0 and math.isfinite(self.res_m)):
            raise ValueError(f"GridPlan.res_m must be a positive number, got {self.res_m!r}")
        if not (maxx > minx and maxy > miny):
            raise ValueError(f"GridPlan.bounds must be (minx, miny, maxx, maxy), got {self.bounds}")

    @property
    def width(self) -> int:
        """Number of columns."""
        return int(round((self.bounds[2] - self.bounds[0]) / self.res_m))

    @property
    def height(self) -> int:
        """Number of rows."""
        return int(round((self.bounds[3] - self.bounds[1]) / self.res_m))

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` in pixels."""
        return (self.height, self.width)

    @property
    def transform(self) -> Affine:
        """Affine transform of the top-left pixel corner, north up."""
        return Affine(self.res_m, 0.0, self.bounds[0], 0.0, -self.res_m, self.bounds[3])

    @classmethod
    def snapped(cls, crs: str, bounds: tuple[float, float, float, float], res_m: float) -> GridPlan:
        """Build a plan whose bounds are expanded outwards to whole multiples of ``res_m``."""
        minx, miny, maxx, maxy = bounds
        return cls(
            crs=crs,
            bounds=(
                math.floor(minx / res_m) * res_m,
                math.floor(miny / res_m) * res_m,
                math.ceil(maxx / res_m) * res_m,
                math.ceil(maxy / res_m) * res_m,
            ),
            res_m=float(res_m),
        )


@dataclass(frozen=True)
class SourceRef:
    """Where one date's pixels came from.

    ``acquired`` is the sensing date when known, else ``None``; a catalogue or Wayback release
    date goes in ``release`` and is never taken for an acquisition date. ``date_source`` says how
    ``acquired`` was found (``"metadata"``, ``"filename"``, ``"user"``, ``"stac"``).
    """

    provider: str
    item_id: str
    acquired: date | None = None
    release: str | None = None
    url: str | None = None
    path: str | None = None
    sha256: str | None = None
    crs: str | None = None
    res_m: float | None = None
    date_source: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (dates as ISO strings)."""
        d = dataclasses.asdict(self)
        d["acquired"] = self.acquired.isoformat() if self.acquired else None
        return d


@dataclass(frozen=True)
class CoregParams:
    """Sub-pixel co-registration of after onto before (phase correlation)."""

    enabled: bool = True
    max_shift_px: float = 8.0
    on_excess: OnExcess = "warn"
    upsample_factor: int = 20
    window_px: int = 512
    min_peak_ratio: float = 2.0


@dataclass(frozen=True)
class ChangeParams:
    """Radiometric normalization, change magnitude, threshold and clean-up."""

    normalize: NormalizeMethod = "histogram"
    threshold_method: ThresholdMethod = "otsu"
    threshold: float | None = None
    smooth_sigma_px: float = 1.0
    opening_radius_px: int = 1
    min_region_area_m2: float = 200.0
    seed: int = 0


@dataclass(frozen=True)
class ObjectParams:
    """Buildings from change regions, and compounds from site-scale construction evidence."""

    building_min_area_m2: float = 100.0
    building_max_area_m2: float = 20000.0
    building_min_solidity: float = 0.6
    building_min_rectangularity: float = 0.5
    building_max_elongation: float = 10.0
    change_min_area_m2: float = 1000.0
    cell_m: float = 10.0
    site_sigma_m: float = 20.0
    site_gap_m: float = 60.0
    texture_eps: float = 0.002
    min_texture_gain: float = 0.25
    compound_min_area_m2: float = 10000.0
    compound_min_fill: float = 0.3
    min_score: float = 0.3
    score_weights: tuple[float, float, float] = (0.4, 0.3, 0.3)


@dataclass(frozen=True)
class DetectParams:
    """All parameters of one detection run; its hash identifies the method in evidence."""

    coreg: CoregParams = field(default_factory=CoregParams)
    change: ChangeParams = field(default_factory=ChangeParams)
    objects: ObjectParams = field(default_factory=ObjectParams)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of every parameter."""
        return dataclasses.asdict(self)


def params_hash(params: DetectParams) -> str:
    """Short SHA-256 of the parameters, stable across runs and machines."""
    blob = json.dumps(params.to_dict(), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class CoregResult:
    """The shift applied to the after image, in pixels of the working grid.

    ``dy, dx`` is the shift that moves *after* onto *before* (``scipy.ndimage.shift`` sign).
    ``peak_ratio`` is the correlation peak over the next-best peak; ``applied`` is False when
    the shift was measured but not trusted.
    """

    dy: float
    dx: float
    error: float
    peak_ratio: float
    applied: bool
    note: str = ""


@dataclass(frozen=True)
class Evidence:
    """One flagged change. ``geometry`` is a shapely geometry in the grid CRS ``crs``.

    ``measurements`` holds the numbers behind ``score`` (named with units); ``parent`` links a
    building to its compound's ``id``.
    """

    id: str
    kind: EvidenceKind
    geometry: Any
    crs: str
    score: float
    area_m2: float
    measurements: dict[str, Any]
    before: SourceRef
    after: SourceRef
    params: DetectParams
    parent: str | None = None
