"""pipeline.report.geojson: evidence to an RFC 7946 FeatureCollection.

Geometries leave the grid CRS here and only here: they are reprojected to lon/lat WGS 84
(CRS84 axis order: longitude first), oriented by the right-hand rule (exterior rings
counter-clockwise, holes clockwise), rounded to at most 7 decimals (about 1 cm) and checked
again for validity after rounding. The output has no ``crs`` member (RFC 7946 removed it).
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from pyproj import Transformer
from shapely.geometry import GeometryCollection, LineString, MultiPolygon, Polygon, mapping
from shapely.geometry.polygon import orient

from pipeline.errors import OutputError
from pipeline.files import atomic_write_text
from pipeline.model import Evidence, SourceRef, params_hash
from pipeline.report.jsontext import dumps_indented
from pipeline.report.validate import validate_geojson

__all__ = ["CORE_PROPERTIES", "MAX_PRECISION", "evidence_to_features", "write_geojson"]

MAX_PRECISION = 7
CORE_PROPERTIES = (
    "id",
    "kind",
    "score",
    "area_m2",
    "site_id",
    "before_date",
    "after_date",
    "before_release",
    "after_release",
    "before_source",
    "after_source",
    "before_sha256",
    "after_sha256",
    "method",
    "params_hash",
    "params",
)


def evidence_to_features(
    evidence: Sequence[Evidence], *, method: str, precision: int = MAX_PRECISION
) -> dict[str, Any]:
    """Serialise evidence as an RFC 7946 FeatureCollection.

    Parameters
    ----------
    evidence
        Detections; each geometry is in its own grid CRS ``e.crs``.
    method
        Human-readable method line stored in every feature, e.g.
        ``"sitewatch 0.1.0: phase-correlation coreg, histogram normalization, CVA, Otsu"``.
    precision
        Decimals kept in lon/lat coordinates, 0 to 7 (7 decimals is about 1 cm).

    Returns
    -------
    dict
        A FeatureCollection with a top-level ``bbox`` (when there are features) and one
        Feature per evidence, sorted by rounded score descending then id. Feature ``id`` is
        ``e.id``; properties are :data:`CORE_PROPERTIES` plus every measurement (flat).

    Raises
    ------
    ValueError
        If ``precision`` is out of range, ids repeat, a geometry is empty, collapses when
        rounded, or a measurement clashes with a core property or is not a JSON scalar.
    """
    if not (isinstance(precision, int) and 0 <= precision <= MAX_PRECISION):
        raise ValueError(f"precision must be an integer in 0..{MAX_PRECISION}, got {precision!r}")
    # counted once (a count per id grew with the square of the number of findings)
    duplicates = sorted(i for i, n in Counter(e.id for e in evidence).items() if n > 1)
    if duplicates:
        raise ValueError(f"Evidence ids must be unique; repeated: {duplicates}")
    # one properties["params"] dict and hash per distinct parameter set (usually one per
    # run), shared read-only by the features that ran with it: ``asdict`` and the hash cost
    # more than the rest of a feature's properties together
    params: dict[int, tuple[Any, str, dict[str, Any]]] = {}
    for e in evidence:
        if id(e.params) not in params:
            params[id(e.params)] = (e.params, params_hash(e.params),
                                    _to_lists(e.params.to_dict()))
    built = [_feature(e, method=method, precision=precision, params=params[id(e.params)][1:])
             for e in evidence]
    features = sorted((feature for feature, _ in built), key=_sort_key)
    fc: dict[str, Any] = {"type": "FeatureCollection"}
    if features:
        fc["bbox"] = _bbox([geometry for _, geometry in built], precision)
    fc["features"] = features
    return fc


def write_geojson(
    fc: dict[str, Any], path: str | Path, *, overwrite: bool = False, validate: bool = True
) -> Path:
    """Write a FeatureCollection atomically as UTF-8 JSON.

    Parameters
    ----------
    fc
        The FeatureCollection, e.g. from :func:`evidence_to_features`.
    path
        Destination file (``.geojson``).
    overwrite
        Replace an existing file; without it an existing file is an error.
    validate
        Run :func:`~pipeline.report.validate.validate_geojson` first and refuse to write a
        collection with errors.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ValueError
        If ``validate`` finds errors, or ``fc`` holds NaN/inf (JSON has neither).
    OutputError
        If ``path`` exists and ``overwrite`` is False, or the folder is not writable.
    """
    path = Path(path)
    if validate:
        ok, errors, _ = validate_geojson(fc)
        if not ok:
            raise ValueError(
                f"Refusing to write invalid GeoJSON to {path}: {'; '.join(errors[:5])}"
            )
    text = dumps_indented(fc) + "\n"  # json.dumps(..., indent=2)'s text, faster
    try:
        return atomic_write_text(path, text, overwrite=overwrite)
    except FileExistsError as e:
        raise OutputError(f"{path} exists; not overwriting evidence. Pass --overwrite.") from e
    except OSError as e:
        raise OutputError(f"Cannot write {path}: {e}. Choose another --out.") from e


def _feature(e: Evidence, *, method: str, precision: int,
             params: tuple[str, dict[str, Any]]) -> tuple[dict[str, Any], Any]:
    """One Feature dict for one evidence, and its lon/lat geometry; ``params`` is its
    parameters' (hash, dict)."""
    geometry = _lonlat_geometry(e.geometry, e.crs, precision, e.id)
    return {
        "type": "Feature",
        "id": str(e.id),
        "geometry": _geometry_dict(geometry),
        "properties": _properties(e, method, params),
    }, geometry


def _geometry_dict(geom: Any) -> dict[str, Any]:
    """``_to_lists(mapping(geom))``, each ring or line's coordinates turned into lists of
    Python floats by NumPy at once instead of point by point (outlines traced along pixels
    have thousands of points)."""
    kind = type(geom)
    if kind is Polygon:
        return {"type": "Polygon", "coordinates": _rings(geom)}
    if kind is MultiPolygon:
        return {"type": "MultiPolygon", "coordinates": [_rings(p) for p in geom.geoms]}
    if kind is LineString:
        return {"type": "LineString", "coordinates": _positions(geom)}
    return _to_lists(mapping(geom))


def _rings(polygon: Polygon) -> list[list[list[float]]]:
    """A polygon's rings as GeoJSON coordinates (exterior first, as shapely lists them)."""
    return [_positions(polygon.exterior), *(_positions(r) for r in polygon.interiors)]


def _positions(line: Any) -> list[list[float]]:
    """The positions of a line or ring (with z when it has one)."""
    return shapely.get_coordinates(line, include_z=line.has_z).tolist()


def _properties(e: Evidence, method: str, params: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    """Core properties followed by the measurements, sorted by name."""
    props: dict[str, Any] = {
        "id": str(e.id),
        "kind": e.kind,
        "score": _round_fixed(e.score, 4),
        "area_m2": _round_fixed(e.area_m2, 1),
        "site_id": e.site_id,
        "before_date": _iso(e.before.acquired),
        "after_date": _iso(e.after.acquired),
        "before_release": e.before.release,
        "after_release": e.after.release,
        "before_source": _source_label(e.before),
        "after_source": _source_label(e.after),
        "before_sha256": e.before.sha256,
        "after_sha256": e.after.sha256,
        "method": method,
        "params_hash": params[0],
        "params": params[1],
    }
    for key in sorted(e.measurements):
        if key in props:
            raise ValueError(
                f"Evidence {e.id!r}: measurement {key!r} clashes with a core property; rename it."
            )
        props[key] = _json_scalar(e.measurements[key], f"Evidence {e.id!r} measurement {key!r}")
    return props


def _lonlat_geometry(geom: Any, crs: str, precision: int, evidence_id: str) -> Any:
    """Reproject to lon/lat, orient by the right-hand rule, round, and re-validate."""
    if geom is None or geom.is_empty:
        raise ValueError(f"Evidence {evidence_id!r} has an empty geometry")
    lonlat = _orient(shapely.transform(geom, _to_lonlat(crs)))
    rounded = _orient(shapely.transform(lonlat, _rounder(precision)))
    if rounded.is_empty or not rounded.is_valid:
        # Rounding can make a ring touch itself or collapse; snap to the grid with GEOS,
        # which repairs topology, then orient again.
        snapped = shapely.set_precision(lonlat, 10.0**-precision)
        rounded = _orient(shapely.transform(snapped, _rounder(precision)))
    if rounded.is_empty or not rounded.is_valid:
        raise ValueError(
            f"Evidence {evidence_id!r}: geometry collapses at {precision} decimals "
            f"({shapely.is_valid_reason(rounded)}); raise precision."
        )
    return rounded


@functools.lru_cache(maxsize=16)
def _to_lonlat(crs: str) -> Callable[[np.ndarray], np.ndarray]:
    """Coordinate function (N, 2) -> (N, 2) from ``crs`` to lon/lat WGS 84."""
    transformer = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)

    def transform(xy: np.ndarray) -> np.ndarray:
        lon, lat = transformer.transform(xy[:, 0], xy[:, 1], errcheck=True)
        out = np.column_stack([lon, lat])
        if not np.isfinite(out).all():
            raise ValueError(f"Coordinates in {crs} fall outside the lon/lat domain")
        return out

    return transform


def _rounder(precision: int) -> Callable[[np.ndarray], np.ndarray]:
    """Coordinate function rounding to ``precision`` decimals."""
    return lambda xy: np.round(xy, precision)


def _orient(geom: Any) -> Any:
    """Exterior rings counter-clockwise, holes clockwise, for any polygonal geometry."""
    if isinstance(geom, Polygon):
        return orient(geom, 1.0)
    if isinstance(geom, MultiPolygon):
        return MultiPolygon([orient(p, 1.0) for p in geom.geoms])
    if isinstance(geom, GeometryCollection):
        return GeometryCollection([_orient(g) for g in geom.geoms])
    return geom


def _to_lists(obj: Any) -> Any:
    """Turn shapely's nested tuples into JSON-style lists of Python floats."""
    if isinstance(obj, dict):
        return {k: _to_lists(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_lists(v) for v in obj]
    if isinstance(obj, np.floating):
        return float(obj)
    return obj


def _bbox(geometries: list[Any], precision: int) -> list[float]:
    """``[west, south, east, north]`` over all (lon/lat) feature geometries."""
    bounds = shapely.total_bounds(geometries)
    return [round(float(v), precision) for v in bounds]


def _sort_key(feature: dict[str, Any]) -> tuple[float, str]:
    """Score descending (null last), then id."""
    score = feature["properties"]["score"]
    return (-score if score is not None else math.inf, feature["id"])


def _source_label(ref: SourceRef) -> str:
    """``provider:item_id``, the string analysts see for an input."""
    return f"{ref.provider}:{ref.item_id}"


def _iso(value: date | None) -> str | None:
    """ISO date or None."""
    return value.isoformat() if value is not None else None


def _round_fixed(value: float | None, decimals: int) -> float | None:
    """Round to fixed decimals; NaN/inf/None become None."""
    if value is None or not math.isfinite(float(value)):
        return None
    return round(float(value), decimals)


def _round_measure(value: float) -> float | None:
    """4 decimals, or 4 significant digits below 1; NaN/inf become None."""
    if not math.isfinite(value):
        return None
    if value == 0 or abs(value) >= 1:
        return round(value, 4)
    return round(value, 3 - math.floor(math.log10(abs(value))))


def _json_scalar(value: Any, where: str) -> Any:
    """A measurement value as a JSON scalar (bool, int, float, str, null)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return _round_measure(float(value))
    if isinstance(value, date):
        return value.isoformat()
    raise ValueError(
        f"{where}: {type(value).__name__} is not a JSON scalar; store a number or string"
    )
