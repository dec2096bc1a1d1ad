"""pipeline.report.validate: RFC 7946 checks for a GeoJSON FeatureCollection.

Findings come back as data, ``(ok, errors, warnings)``, as rio-cogeo's ``cog_validate`` does.
Errors break RFC 7946 or make evidence unusable (wrong axis order, invalid rings, repeated
ids); warnings are allowed by the RFC but suspicious (null geometry, missing id).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from decimal import Decimal
from itertools import chain
from typing import Any

import numpy as np
import shapely
from shapely.geometry import shape

__all__ = ["validate_geojson"]

# Nesting depth of positions inside "coordinates" for each geometry type.
_POSITION_DEPTH = {
    "Point": 0,
    "MultiPoint": 1,
    "LineString": 1,
    "MultiLineString": 2,
    "Polygon": 2,
    "MultiPolygon": 3,
}


def validate_geojson(
    obj: Any, *, max_decimals: int = 7, required_properties: Sequence[str] = ()
) -> tuple[bool, list[str], list[str]]:
    """Check a FeatureCollection against RFC 7946.

    Checked: ``type`` is FeatureCollection; ``features`` is a list of Features, each with a
    ``geometry`` of a known type and a ``properties`` object; no ``crs`` member on any GeoJSON
    object; positions are ``[lon, lat]`` numbers with lon in [-180, 180], lat in [-90, 90] and
    at most ``max_decimals`` decimals; polygon rings are closed with at least 4 positions,
    exteriors counter-clockwise and holes clockwise (signed shoelace area); geometries valid
    per shapely; ``bbox`` members hold 4 numbers; feature ids are unique.

    Parameters
    ----------
    obj
        The parsed GeoJSON (``json.load`` output or an in-memory dict).
    max_decimals
        Most decimals allowed in a coordinate.
    required_properties
        Property names every feature must carry (e.g. ``geojson.CORE_PROPERTIES``).

    Returns
    -------
    tuple
        ``(ok, errors, warnings)``: ``ok`` is True when ``errors`` is empty; both lists hold
        messages naming the offending feature.
    """
    errors: list[str] = []
    warnings: list[str] = []
    if not isinstance(obj, dict):
        return False, [f"top level: expected a JSON object, got {type(obj).__name__}"], []
    if obj.get("type") != "FeatureCollection":
        errors.append(f"top level: type must be 'FeatureCollection', got {obj.get('type')!r}")
    _check_members(obj, "top level", errors)
    features = obj.get("features")
    if not isinstance(features, list):
        errors.append("top level: 'features' must be a list")
        return False, errors, warnings
    seen: dict[Any, int] = {}
    for i, feature in enumerate(features):
        _check_feature(feature, i, seen, max_decimals, required_properties, errors, warnings)
    return not errors, errors, warnings


def _check_feature(
    feature: Any,
    index: int,
    seen: dict[Any, int],
    max_decimals: int,
    required: Sequence[str],
    errors: list[str],
    warnings: list[str],
) -> None:
    """Check one Feature: type, id, properties, geometry."""
    where = f"features[{index}]"
    if not isinstance(feature, dict) or feature.get("type") != "Feature":
        errors.append(f"{where}: must be an object with type 'Feature'")
        return
    if "id" in feature:
        fid = feature["id"]
        where = f"features[{index}] (id {fid!r})"
        if isinstance(fid, bool) or not isinstance(fid, str | int | float):
            errors.append(f"{where}: id must be a string or number")
        elif fid in seen:
            errors.append(f"{where}: id repeats features[{seen[fid]}]; ids must be unique")
        else:
            seen[fid] = index
    else:
        warnings.append(f"{where}: has no id")
    _check_members(feature, where, errors)
    _check_properties(feature, where, required, errors, warnings)
    if "geometry" not in feature:
        errors.append(f"{where}: has no 'geometry' member")
    elif feature["geometry"] is None:
        warnings.append(f"{where}: geometry is null")
    else:
        _check_geometry(feature["geometry"], f"{where}.geometry", max_decimals, errors, warnings)


def _check_properties(
    feature: dict[str, Any],
    where: str,
    required: Sequence[str],
    errors: list[str],
    warnings: list[str],
) -> None:
    """Properties must be present and an object (null is allowed but warned)."""
    if "properties" not in feature:
        errors.append(f"{where}: has no 'properties' member")
        return
    props = feature["properties"]
    if props is None:
        warnings.append(f"{where}: properties is null")
        props = {}
    elif not isinstance(props, dict):
        errors.append(f"{where}: properties must be an object or null")
        return
    missing = [name for name in required if name not in props]
    if missing:
        errors.append(f"{where}: missing properties {missing}")


def _check_members(obj: dict[str, Any], where: str, errors: list[str]) -> None:
    """No ``crs`` member; ``bbox``, if present, is 4 numbers in lon/lat range."""
    if "crs" in obj:
        errors.append(f"{where}: has a 'crs' member; RFC 7946 removed it (coordinates are CRS84)")
    if "bbox" not in obj:
        return
    bbox = obj["bbox"]
    if not (isinstance(bbox, list | tuple) and len(bbox) == 4 and all(map(_is_number, bbox))):
        errors.append(f"{where}: bbox must be [west, south, east, north], got {bbox!r}")
    elif not (_lon_ok(bbox[0]) and _lon_ok(bbox[2]) and _lat_ok(bbox[1]) and _lat_ok(bbox[3])):
        errors.append(f"{where}: bbox {bbox!r} is outside lon [-180, 180] / lat [-90, 90]")
    elif bbox[1] > bbox[3]:
        errors.append(f"{where}: bbox {bbox!r} has south > north")


def _check_geometry(
    geom: Any, where: str, max_decimals: int, errors: list[str], warnings: list[str], depth: int = 0
) -> None:
    """Check one geometry object, recursing into GeometryCollections."""
    if not isinstance(geom, dict):
        errors.append(f"{where}: must be an object")
        return
    _check_members(geom, where, errors)
    gtype = geom.get("type")
    if gtype == "GeometryCollection":
        _check_collection(geom, where, max_decimals, errors, warnings, depth)
        return
    if gtype not in _POSITION_DEPTH:
        errors.append(f"{where}: unknown geometry type {gtype!r}")
        return
    coords: Any = geom.get("coordinates")
    if isinstance(coords, list | tuple) and len(coords) == 0 and gtype != "Point":
        warnings.append(f"{where}: empty {gtype}")
        return
    if not _has_depth(coords, _POSITION_DEPTH[gtype]):
        errors.append(f"{where}: coordinates are not a well-formed {gtype}")
        return
    n_errors = len(errors)
    positions = _positions(coords, _POSITION_DEPTH[gtype])
    _check_positions(positions, where, max_decimals, errors, warnings)
    if gtype in ("Polygon", "MultiPolygon"):
        polygons = [coords] if gtype == "Polygon" else coords
        for j, rings in enumerate(polygons):
            _check_rings(rings, where if gtype == "Polygon" else f"{where} polygon {j}", errors)
    if gtype in ("LineString", "MultiLineString"):
        lines = [coords] if gtype == "LineString" else coords
        if any(len(line) < 2 for line in lines):
            errors.append(f"{where}: a LineString needs at least 2 positions")
    if len(errors) == n_errors:
        _check_validity(geom, where, errors)


def _check_collection(
    geom: dict[str, Any],
    where: str,
    max_decimals: int,
    errors: list[str],
    warnings: list[str],
    depth: int,
) -> None:
    """GeometryCollection: a list of geometries; nesting is discouraged by the RFC."""
    parts = geom.get("geometries")
    if not isinstance(parts, list):
        errors.append(f"{where}: GeometryCollection needs a 'geometries' list")
        return
    if depth > 0:
        warnings.append(f"{where}: nested GeometryCollection (RFC 7946 section 3.1.8)")
    for k, part in enumerate(parts):
        _check_geometry(part, f"{where}.geometries[{k}]", max_decimals, errors, warnings, depth + 1)


def _check_positions(
    positions: list[Sequence[Any]],
    where: str,
    max_decimals: int,
    errors: list[str],
    warnings: list[str],
) -> None:
    """Lon/lat ranges and decimals; one message per rule per geometry."""
    lengths = set(map(len, positions))
    if max(lengths, default=0) > 3:
        warnings.append(f"{where}: positions with more than 3 elements")
    if _all_fine(positions, lengths, max_decimals):
        return
    bad_range = next((p for p in positions if not (_lon_ok(p[0]) and _lat_ok(p[1]))), None)
    if bad_range is not None:
        errors.append(
            f"{where}: position {list(bad_range)} is outside lon [-180, 180] / lat [-90, 90]; "
            "positions are [longitude, latitude] in WGS 84"
        )
    too_fine = next((p for p in positions if max(map(_decimals, p[:2])) > max_decimals), None)
    if too_fine is not None:
        errors.append(f"{where}: position {list(too_fine)} has more than {max_decimals} decimals")


def _all_fine(positions: list[Sequence[Any]], lengths: set[int], max_decimals: int) -> bool:
    """True when every (well-formed) position is in range with at most ``max_decimals``
    decimals, tested on all at once with NumPy; False when one may not be (the caller then
    finds it position by position, the rule that decides).

    ``round(v, m) == v`` holds exactly when ``v``'s shortest repr has at most ``m``
    decimals (1 <= ``m`` <= 15, ``|v|`` <= 180): NumPy's round is ``rint(v * 10**m) / 10**m``,
    the double nearest ``k / 10**m``, whose repr needs no more than ``m`` decimals. (With
    ``m`` = 0 it does not: ``repr(2.0)`` has one decimal.)
    """
    if not positions or not 1 <= max_decimals <= 15:
        return False
    try:
        if len(lengths) == 1:
            xy = np.array(positions, np.float64)[:, :2]
        else:
            xy = np.array([p[:2] for p in positions], np.float64)
    except (OverflowError, TypeError, ValueError):
        return False
    with np.errstate(invalid="ignore", over="ignore"):
        in_range = (np.abs(xy[:, 0]) <= 180.0) & (np.abs(xy[:, 1]) <= 90.0)
        return bool(in_range.all() and (np.round(xy, max_decimals) == xy).all())


def _check_rings(rings: Sequence[Sequence[Any]], where: str, errors: list[str]) -> None:
    """Closed rings of 4+ positions; exterior counter-clockwise, holes clockwise."""
    for k, ring in enumerate(rings):
        name = "exterior ring" if k == 0 else f"interior ring {k}"
        if len(ring) < 4:
            errors.append(f"{where}: {name} has {len(ring)} positions; at least 4 are needed")
            continue
        if list(ring[0][:2]) != list(ring[-1][:2]):
            errors.append(f"{where}: {name} is not closed (first position != last)")
            continue
        area = _signed_area(ring)
        if area == 0:
            errors.append(f"{where}: {name} has zero area")
        elif k == 0 and area < 0:
            errors.append(f"{where}: {name} is clockwise; RFC 7946 wants it counter-clockwise")
        elif k > 0 and area > 0:
            errors.append(f"{where}: {name} is counter-clockwise; RFC 7946 wants holes clockwise")


def _check_validity(geom: dict[str, Any], where: str, errors: list[str]) -> None:
    """Shapely (GEOS) validity: no self-intersections, holes inside shells."""
    flat = dict(geom, coordinates=_truncate(geom["coordinates"], _POSITION_DEPTH[geom["type"]]))
    try:
        parsed = shape(flat)
    except (ValueError, TypeError, shapely.errors.GEOSException) as e:
        errors.append(f"{where}: cannot be parsed as a geometry ({e})")
        return
    if not parsed.is_valid:
        errors.append(f"{where}: invalid geometry ({shapely.is_valid_reason(parsed)})")


def _signed_area(ring: Sequence[Sequence[float]]) -> float:
    """Shoelace signed area; positive for counter-clockwise in lon/lat."""
    total = 0.0
    for (x1, y1, *_), (x2, y2, *_) in zip(ring[:-1], ring[1:], strict=True):
        total += x1 * y2 - x2 * y1
    return total / 2.0


def _has_depth(coords: Any, depth: int) -> bool:
    """True if ``coords`` is nested ``depth`` list levels above positions."""
    if depth == 0:
        return _is_position(coords)
    if depth == 1 and _are_float_positions(coords):
        return True
    return isinstance(coords, list | tuple) and all(_has_depth(c, depth - 1) for c in coords)


def _truncate(coords: Any, depth: int) -> Any:
    """Coordinates with every position cut to [x, y] (shapely rejects 4+ elements); each
    line or ring as a float array, which shapely takes without a point-by-point pass."""
    if depth == 0:
        return list(coords[:2])
    if depth == 1:
        return np.array([p[:2] for p in coords], np.float64).reshape(len(coords), 2)
    return [_truncate(c, depth - 1) for c in coords]


def _are_float_positions(values: Any) -> bool:
    """True when ``values`` is a list of positions made only of finite floats, checked with
    C-level passes (``map``, ``set``, NumPy); False when not, or not only floats (ints), and
    then :func:`_is_position` decides position by position."""
    if not isinstance(values, list | tuple) or not values:
        return False
    if not set(map(type, values)) <= {list, tuple} or min(map(len, values)) < 2:
        return False
    flat = list(chain.from_iterable(values))
    if set(map(type, flat)) != {float}:
        return False
    return bool(np.isfinite(np.array(flat, np.float64)).all())


def _positions(coords: Any, depth: int) -> list[Sequence[Any]]:
    """Every position in a well-formed coordinates array, in order."""
    if depth == 0:
        return [coords]
    if depth == 1:
        return list(coords)
    return list(chain.from_iterable(_positions(c, depth - 1) for c in coords))


def _is_position(value: Any) -> bool:
    """A list of 2 or more finite numbers."""
    return isinstance(value, list | tuple) and len(value) >= 2 and all(map(_is_number, value))


def _is_number(value: Any) -> bool:
    """A finite JSON number (bools are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value)


def _lon_ok(value: float) -> bool:
    """Longitude in [-180, 180]."""
    return -180.0 <= value <= 180.0


def _lat_ok(value: float) -> bool:
    """Latitude in [-90, 90]."""
    return -90.0 <= value <= 90.0


def _decimals(value: float) -> int:
    """Decimals in the shortest repr of a number (what ``json.dumps`` writes)."""
    if isinstance(value, int):
        return 0
    text = repr(float(value))
    point = text.find(".")
    if point >= 0 and "e" not in text:  # plain "123.4567": the digits after the point
        return len(text) - point - 1
    exponent = Decimal(text).as_tuple().exponent  # "1e-07", "1.5e+16"
    return max(0, -int(exponent))
