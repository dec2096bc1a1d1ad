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
from typing import Any, Literal, get_args

from affine import Affine

__all__ = [
    "ThresholdMethod",
    "NormalizeMethod",
    "OnExcess",
    "EvidenceKind",
    "EVIDENCE_ORDER",
    "GridPlan",
    "SourceRef",
    "CoregParams",
    "ChangeParams",
    "ObjectParams",
    "WallParams",
    "TowerParams",
    "GradeParams",
    "BuildingModel",
    "BuildingParams",
    "DetectParams",
    "Evidence",
    "CoregResult",
    "params_hash",
]

ThresholdMethod = Literal["otsu", "kittler"]
NormalizeMethod = Literal["histogram", "linear", "none"]
OnExcess = Literal["warn", "raise"]
BuildingModel = Literal["none", "cnn"]
EvidenceKind = Literal["compound", "watchtower", "wall", "new_building", "change"]
#: Order of kinds in detection output (a site first, then its parts, then other change).
EVIDENCE_ORDER: tuple[str, ...] = get_args(EvidenceKind)


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
        """Refuse a non-positive resolution or empty bounds (ValueError)."""
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
    row_min_buildings: int = 3
    row_size_tolerance: float = 0.25
    row_angle_tolerance_deg: float = 10.0


@dataclass(frozen=True)
class WallParams:
    """Tuning of wall, fence and enclosure measures; every length in metres."""

    max_res_m: float = 2.5  # coarser than this, walls are below a pixel: no wall search
    work_res_m: float = 1.0  # finer input is averaged to about this (fine texture is noise)
    max_wall_width_m: float = 2.0  # bright lines (wall tops, fences) are at most this wide
    max_shadow_width_m: float = 4.0  # dark lines (shadows) at most this; roads are wider
    min_contrast: float = 0.15  # new top-hat response, share of the before 2-98 % range
    noise_factor: float = 5.0  # ... and at least this many noise sigmas of the date difference
    max_line_share: float = 0.10  # ... and at most this share of the pixels passes it
    line_average_m: float = 8.0  # the response is averaged along lines of this length
    existing_tolerance_m: float = 1.5  # a before-image line this close to a segment is the same
    min_length_m: float = 30.0  # shorter lines are dropped (pieces of half this may add up)
    min_support: float = 0.5  # ... and so are those with line pixels along less of their length
    max_before_ratio: float = 0.33  # a line this visible in the before image (relative) is old
    min_lineness: float = 0.5  # a segment stands out from its parallels by this x threshold
    gap_m: float = 10.0  # gaps bridged along one line (gates, trees, noise)
    angle_tol_deg: float = 3.0  # collinear pieces differ by at most this angle
    tolerance_m: float = 3.0  # outline-to-wall distance that counts as backed (with 2 px)
    double_gap_min_m: float = 2.0  # an inner fence this far inside the wall ...
    double_gap_max_m: float = 12.0  # ... and at most this far makes a double fence
    double_min_share: float = 0.5  # ... along this share of the wall-backed perimeter
    internal_min_span: float = 0.6  # an internal fence spans this share of the compound


@dataclass(frozen=True)
class TowerParams:
    """Watchtower search; sizes in metres."""

    max_res_m: float = 1.0  # coarser than this a tower is under three pixels: no search
    min_size_m: float = 3.0  # footprint side of the smallest tower
    max_size_m: float = 9.0  # ... and of the largest (a guard house is bigger)
    max_extent_m: float = 22.0  # tower with its shadow; two towers are never closer than half
    search_m: float = 3.0  # how far from the outline (the wall line) a tower's centre may be
    corner_m: float = 12.0  # a tower this close to an outline corner is "at a corner"
    line_length_m: float = 25.0  # thin lines this long and straight are walls, not towers
    min_contrast: float = 0.15  # share of the before image's 2-98 % range
    noise_factor: float = 5.0  # ... and at least this many noise sigmas
    peak_factor: float = 3.0  # without a shadow beside it, a blob needs this times the threshold


@dataclass(frozen=True)
class GradeParams:
    """Thresholds of the grade; resolutions in metres per pixel."""

    min_closure_ratio: float = 0.6  # share of the outline backed by new wall lines
    min_sides_backed: int = 3  # sides with at least half their length on new walls
    min_area_m2: float = 2500.0  # a walled enclosure smaller than this is not a compound
    max_wall_res_m: float = 2.5  # coarser: walls are below a pixel (footprint rules apply)
    max_fence_res_m: float = 1.0  # coarser: fences are not used for grade 2
    max_tower_res_m: float = 1.0  # coarser: watchtowers are not searched
    min_towers: int = 2  # one blob on a wall is not enough for grade 3
    coarse_min_area_m2: float = 10000.0  # a coarse footprint must be at least 1 ha ...
    coarse_min_rectangularity: float = 0.8  # ... and this rectilinear


@dataclass(frozen=True)
class BuildingParams:
    """Where the change mask that new buildings come from is made (opt-in network).

    ``model = "none"``: the change vector analysis of ``change``. ``"cnn"``: the shipped
    siamese U-Net (``models/building_change_cnn.npz``, red-green-blue imagery of
    ``max_res_m`` or finer) and its card's decision rule; ``mirrorings``: its probability
    averaged over each tile and its three mirrorings, as `make eval` scores it (False: one
    pass, a quarter of the CPU).
    """

    model: BuildingModel = "none"
    max_res_m: float = 1.5  # coarser: the network (trained at 0.5 m) is refused
    mirrorings: bool = True


@dataclass(frozen=True)
class DetectParams:
    """All parameters of one detection run; its hash identifies the method in evidence."""

    coreg: CoregParams = field(default_factory=CoregParams)
    change: ChangeParams = field(default_factory=ChangeParams)
    objects: ObjectParams = field(default_factory=ObjectParams)
    walls: WallParams = field(default_factory=WallParams)
    towers: TowerParams = field(default_factory=TowerParams)
    grade: GradeParams = field(default_factory=GradeParams)
    buildings: BuildingParams = field(default_factory=BuildingParams)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of every parameter.

        ``buildings`` is left out while it is the default (no network), so the default
        run's parameters, and their hash, are those of runs made before it existed (a watch
        state does not rerun every site for a section that changes nothing).
        """
        out = dataclasses.asdict(self)
        if self.buildings == BuildingParams():
            del out["buildings"]
        return out


def params_hash(params: DetectParams) -> str:
    """Short SHA-256 of the parameters, stable across runs and machines."""
    blob = json.dumps(params.to_dict(), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class CoregResult:
    """The shift applied to the after image, in pixels of the working grid.

    ``dy, dx`` is the shift that moves *after* onto *before* (``scipy.ndimage.shift`` sign).
    ``peak_ratio`` is the correlation peak over the next-best peak; ``applied`` is False when
    the shift was measured but not trusted (``note`` says why); ``uncertainty_px`` is the
    shift's 95% uncertainty radius in pixels (NaN when it could not be measured).
    """

    dy: float
    dx: float
    error: float
    peak_ratio: float
    applied: bool
    note: str = ""
    uncertainty_px: float = math.nan


@dataclass(frozen=True)
class Evidence:
    """One flagged change. ``geometry`` is a shapely geometry in the grid CRS ``crs``.

    ``measurements`` holds the numbers behind ``score`` (named with units). ``site_id`` is the
    ``id`` of the compound a wall, watchtower or new building belongs to (None outside any
    compound); a compound carries its own ``id`` there, so one filter on ``site_id`` selects
    a whole site.
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
    site_id: str | None = None
