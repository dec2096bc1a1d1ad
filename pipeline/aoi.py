"""pipeline.aoi: parse an area of interest and plan its UTM working grid.

An AOI is written as ``lon,lat`` (a point buffered by a radius), ``minlon,minlat,maxlon,maxlat``,
a path to a GeoJSON/GeoPackage polygon file, or a site name from a site file. Geometries are kept
in lon/lat (EPSG:4326, x = lon). Point circles are true metric circles: buffered in the point's
UTM zone, then projected back. The working grid is UTM, so AOIs must lie between 80 S and 84 N
and must not cross the antimeridian.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import math
import re
import unicodedata
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyogrio
import pyogrio.errors
import shapely
from pyproj import CRS, Transformer
from pyproj.exceptions import CRSError, ProjError
from shapely.geometry import MultiPolygon, Point, Polygon, box
from shapely.geometry.base import BaseGeometry

from pipeline.errors import AoiError, ConfigError, GridError
from pipeline.files import is_utf8
from pipeline.model import GridPlan

__all__ = ["Aoi", "parse_aoi", "load_sites", "load_site_records", "utm_crs", "plan_grid",
           "aoi_polygon_in"]

LONLAT_CRS = "EPSG:4326"
MAX_RADIUS_M = 100_000.0
# Largest working grid (about 32768 x 32768 px): a 100 km radius at 0.1 m would otherwise plan
# 4 x 10^12 px and run for days; the largest supported inputs (20000 x 20000) fit well below.
MAX_GRID_PX = 1 << 30
# Narrowest working grid: co-registration needs 16 valid pixels and a circle AOI of 5 x 5 px
# has fewer; a --res-m coarser than the AOI (1 x 1 px) planned a grid far larger than the AOI.
MIN_GRID_SIDE_PX = 8
UTM_MIN_LAT = -80.0
UTM_MAX_LAT = 84.0
_CIRCLE_QUAD_SEGS = 16  # 64 segments around the circle
_SEGMENT_DEG = 0.001  # densify lon/lat edges (~100 m) before projecting
_VECTOR_SUFFIXES = (".geojson", ".json", ".gpkg")
_MAX_VECTOR_BYTES = 100 << 20
_OGR = pyogrio.errors
# ShapelyError: GEOS refuses some geometries GDAL reads (a ring of one point).
_VECTOR_ERRORS = (_OGR.DataSourceError, _OGR.DataLayerError, _OGR.GeometryError, _OGR.FieldError,
                  _OGR.CRSError, CRSError, ProjError, OSError, shapely.errors.ShapelyError)


@dataclass(frozen=True)
class Aoi:
    """An area of interest.

    ``id`` is a safe folder name (``[a-z0-9]`` first, then ``[a-z0-9_.-]``, never ``..``);
    ``geometry`` a shapely Polygon/MultiPolygon in lon/lat (EPSG:4326, x = lon);
    ``label`` how the user gave it.
    """

    id: str
    geometry: Polygon | MultiPolygon
    label: str


def parse_aoi(
    text: str, *, radius_m: float = 1000.0, sites: Mapping[str, Aoi] | None = None
) -> Aoi:
    """Parse an AOI given as a point, a bbox, a polygon file or a site name.

    Parameters
    ----------
    text
        ``lon,lat``; ``minlon,minlat,maxlon,maxlat``; a path to a GeoJSON/GeoPackage file of
        polygons (all unioned); or a key of ``sites`` (case-insensitive).
    radius_m
        Radius of the circle around a point, in metres (0 < r <= 100 km).
    sites
        Known sites by name, as returned by :func:`load_sites`.

    Returns
    -------
    Aoi
        Geometry in lon/lat; a site name returns the site's own Aoi.

    Raises
    ------
    AoiError
        The text matches no form or a value is out of range; the message lists the forms.
    """
    sites = sites or {}
    raw = str(text)
    stripped = raw.strip()
    fail = _failer(raw, sites)
    site = _find_site(stripped, sites)
    if site is not None:
        return site
    if not stripped:
        raise fail("it is empty")
    if not is_utf8(stripped):  # GDAL and the evidence files (UTF-8) cannot carry it
        raise fail("it is not UTF-8 text (a file name in another encoding?); rename the file "
                   "to a UTF-8 (e.g. ASCII) name")
    if _is_file(stripped):
        return _aoi_from_file(stripped, stripped, fail)
    if "," in stripped:
        return _aoi_from_numbers(stripped, stripped, radius_m, fail)
    if "/" in stripped or "\\" in stripped or stripped.lower().endswith(_VECTOR_SUFFIXES):
        raise fail(f"the file {stripped} does not exist or is not a regular file")
    close = difflib.get_close_matches(stripped, list(sites), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise fail(f"{stripped!r} is not a known site name, an existing file or coordinates{hint}")


def load_sites(path: str | Path) -> dict[str, Aoi]:
    """Read a site file: one feature per site, with a unique ``name`` property.

    Parameters
    ----------
    path
        GeoJSON or GeoPackage. Each feature is a Polygon/MultiPolygon, or a Point with a
        ``radius_m`` property (metres, > 0, at most 100 km).

    Returns
    -------
    dict
        ``{name: Aoi}`` in file order; ids are derived from the names and unique.

    Raises
    ------
    ConfigError
        The file is missing, unreadable or has no features.
    AoiError
        A feature is invalid; the message names it by index and name.
    """
    return {aoi.label: aoi for _, aoi, _ in load_site_records(path)}


def load_site_records(path: str | Path, *, invalid: list[str] | None = None
                      ) -> list[tuple[int, Aoi, dict[str, Any]]]:
    """Read a site file as :func:`load_sites` does, keeping each feature's properties.

    Parameters
    ----------
    path
        GeoJSON or GeoPackage.
    invalid
        If given, an invalid feature's error message is appended here and the feature
        skipped, instead of raising.

    Returns
    -------
    list
        ``(index, aoi, properties)`` per valid feature in file order (``index`` counts
        every feature from 0); missing GeoPackage values are None.

    Raises
    ------
    ConfigError, AoiError
        As :func:`load_sites` (a feature's AoiError only without ``invalid``).
    """
    path = Path(path)
    if not path.is_file():
        if path.exists():  # a folder, pipe or device: reading a pipe would block
            raise ConfigError(f"Site file {path} is not a regular file (a folder, pipe or "
                              "device); give the path of a GeoJSON or GeoPackage file.")
        raise ConfigError(f"Site file {path} does not exist; check the path or create it.")
    frame = _read_vector(path, ConfigError, f"Site file {path}")
    if len(frame) == 0:
        raise ConfigError(f"Site file {path} has no features; add one feature per site.")
    records = frame.drop(columns="geometry").to_dict("records")
    out: list[tuple[int, Aoi, dict[str, Any]]] = []
    labels: set[str] = set()
    ids: set[str] = set()
    for index, (geom, props) in enumerate(zip(frame.geometry, records, strict=True)):
        try:
            aoi = _site_from_feature(geom, props, f"Site file {path}: feature {index}")
            if aoi.label in labels or aoi.id in ids:
                raise AoiError(
                    f"Site file {path}: feature {index} ('{aoi.label}') repeats a name or "
                    f"folder id ('{aoi.id}') already used by another site; give each site a "
                    "distinct name."
                )
        except AoiError as e:
            if invalid is None:
                raise
            invalid.append(str(e))
            continue
        labels.add(aoi.label)
        ids.add(aoi.id)
        clean = {k: (None if isinstance(v, float) and math.isnan(v) else v)
                 for k, v in props.items()}
        out.append((index, aoi, clean))
    return out


def utm_crs(aoi: Aoi) -> str:
    """Return ``"EPSG:326NN"`` (north) or ``"EPSG:327NN"`` (south) for the AOI centroid's zone.

    The Norway (32V) and Svalbard (31X-37X) zone exceptions are applied, as in MGRS.

    Raises
    ------
    AoiError
        If the centroid lies outside 80 S..84 N, where UTM is not defined.
    """
    centroid = aoi.geometry.centroid
    lon, lat = float(centroid.x), float(centroid.y)
    if not UTM_MIN_LAT <= lat <= UTM_MAX_LAT:
        raise AoiError(f"AOI '{aoi.id}' is centred at latitude {lat:.5f}, outside the UTM range "
                       f"{UTM_MIN_LAT:g}..{UTM_MAX_LAT:g}; pass an explicit projected crs (e.g. "
                       "a polar stereographic EPSG:3413 or EPSG:3031) to plan_grid.")
    return _utm_code(lon, lat)


def plan_grid(aoi: Aoi, res_m: float, *, crs: str | None = None) -> GridPlan:
    """Plan the working grid covering the AOI.

    Parameters
    ----------
    aoi
        The area of interest.
    res_m
        Pixel size in metres.
    crs
        Projected CRS in metres; default the AOI's UTM zone (:func:`utm_crs`).

    Returns
    -------
    GridPlan
        Bounds of the AOI in ``crs`` (densified edges), expanded to whole multiples of ``res_m``.

    Raises
    ------
    GridError
        If ``res_m`` is not a positive number, ``crs`` is unknown, not projected or not metric,
        the grid would exceed ``MAX_GRID_PX`` pixels, or the AOI is fewer than
        ``MIN_GRID_SIDE_PX`` pixels across.
    """
    if not (isinstance(res_m, int | float) and math.isfinite(res_m) and res_m > 0):
        raise GridError(f"Grid resolution must be a positive number of metres, got {res_m!r}.")
    target = _metric_crs(crs) if crs is not None else utm_crs(aoi)
    west, south, east, north = aoi.geometry.bounds
    bounds = _transformer(LONLAT_CRS, target).transform_bounds(west, south, east, north,
                                                               densify_pts=21)
    if not all(math.isfinite(v) for v in bounds):
        raise GridError(f"AOI '{aoi.id}' cannot be projected to {target}; choose another crs.")
    minx, miny, maxx, maxy = (float(v) for v in bounds)
    side_m = min(maxx - minx, maxy - miny)
    if side_m / res_m < MIN_GRID_SIDE_PX:
        raise GridError(
            f"AOI '{aoi.id}' ({maxx - minx:.0f} x {maxy - miny:.0f} m) at {res_m:g} m is fewer "
            f"than {MIN_GRID_SIDE_PX} px across; give a finer resolution (--res-m; at most "
            f"{side_m / MIN_GRID_SIDE_PX:.3g} m here) or a larger AOI."
        )
    plan = GridPlan.snapped(target, (minx, miny, maxx, maxy), float(res_m))
    if plan.width * plan.height > MAX_GRID_PX:
        raise GridError(
            f"AOI '{aoi.id}' at {res_m:g} m is a {plan.width} x {plan.height} px grid "
            f"({plan.width * plan.height / 1e9:.1f} Gpx), beyond the {MAX_GRID_PX / 1e9:.2f} Gpx "
            "one run handles; use a smaller AOI or a coarser --res-m, or split the area."
        )
    return plan


def aoi_polygon_in(aoi: Aoi, crs: str) -> BaseGeometry:
    """Return the AOI geometry reprojected to ``crs`` (edges densified to ~100 m first)."""
    if CRS.from_user_input(crs) == CRS.from_user_input(LONLAT_CRS):
        return aoi.geometry
    dense = shapely.segmentize(aoi.geometry, _SEGMENT_DEG)
    return _reproject(dense, LONLAT_CRS, crs)


Fail = Callable[[str], Exception]


def _failer(text: str, sites: Mapping[str, Aoi]) -> Fail:
    """Return a function building the one-paragraph AoiError for ``text``."""
    shown = text if len(text) <= 80 else text[:77] + "..."
    names = sorted(sites)
    known = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "") if names else "none"

    def fail(problem: str) -> AoiError:
        return AoiError(
            f"AOI {shown!r} is not valid: {_sentence(problem)} Write the AOI as 'lon,lat' (e.g. "
            "'88.28994,43.38385'), 'minlon,minlat,maxlon,maxlat', a path to a GeoJSON/GeoPackage "
            f"polygon, or a site name from the site file (known: {known})."
        )

    return fail


def _find_site(text: str, sites: Mapping[str, Aoi]) -> Aoi | None:
    """Look ``text`` up among the site names, exactly then case-insensitively."""
    if text in sites:
        return sites[text]
    return {name.casefold(): aoi for name, aoi in sites.items()}.get(text.casefold())


def _is_file(text: str) -> bool:
    """True if ``text`` names an existing regular file (never raises)."""
    try:
        return Path(text).expanduser().is_file()
    except (OSError, ValueError, RuntimeError):  # too long, NUL byte, unknown ~user
        return False


def _aoi_from_numbers(text: str, label: str, radius_m: float, fail: Fail) -> Aoi:
    """Parse ``lon,lat`` or ``minlon,minlat,maxlon,maxlat``."""
    values = []
    for part in (p.strip() for p in text.split(",")):
        try:
            values.append(float(part))
        except ValueError:
            raise fail(f"{part!r} is not a number") from None
        if not math.isfinite(values[-1]):
            raise fail(f"{part!r} is not a finite number")
    if len(values) == 2:
        return _point_aoi(values[0], values[1], radius_m, label, fail)
    if len(values) == 4:
        return _bbox_aoi(values, label, fail)
    raise fail(f"expected 2 or 4 comma-separated numbers, got {len(values)}")


def _check_point(lon: float, lat: float, fail: Fail) -> None:
    """Range-check a lon/lat pair, hinting at a lat,lon swap."""
    could_swap = abs(lat) <= 180 and UTM_MIN_LAT <= lon <= UTM_MAX_LAT
    swap = f" (the order is lon,lat: did you mean '{_num(lat)},{_num(lon)}'?)" if could_swap else ""
    if not -180 <= lon <= 180:
        raise fail(f"longitude {_num(lon)} is outside -180..180")
    if not -90 <= lat <= 90:
        raise fail(f"latitude {_num(lat)} is outside -90..90{swap}")
    if not UTM_MIN_LAT <= lat <= UTM_MAX_LAT:
        raise fail(
            f"latitude {_num(lat)} is outside {UTM_MIN_LAT:g}..{UTM_MAX_LAT:g}, where the UTM "
            f"working grid is defined{swap}"
        )


def _point_aoi(lon: float, lat: float, radius_m: float, label: str, fail: Fail) -> Aoi:
    """Build the circle AOI of a point."""
    _check_point(lon, lat, fail)
    geometry = _clean_polygon(_circle(lon, lat, _check_radius(radius_m, fail), fail), fail)
    ident = f"pt-{_coord(lat, 'ns')}-{_coord(lon, 'ew')}-r{_fmt(radius_m)}"
    return Aoi(id=ident, geometry=geometry, label=label)


def _check_radius(radius_m: Any, fail: Fail) -> float:
    """Return the radius as float if it is a number in (0, MAX_RADIUS_M]."""
    if isinstance(radius_m, bool) or not isinstance(radius_m, int | float):
        raise fail(f"radius {radius_m!r} is not a number of metres")
    if not (math.isfinite(radius_m) and 0 < radius_m <= MAX_RADIUS_M):
        raise fail(f"radius {radius_m!r} m must be > 0 and at most {MAX_RADIUS_M:g} m")
    return float(radius_m)


def _bbox_aoi(values: list[float], label: str, fail: Fail) -> Aoi:
    """Build the AOI of a lon/lat box."""
    minlon, minlat, maxlon, maxlat = values
    for lon, lat in ((minlon, minlat), (maxlon, maxlat)):
        if not (-180 <= lon <= 180 and -90 <= lat <= 90):
            _check_point(lon, lat, fail)
    if not (minlon < maxlon and minlat < maxlat):
        raise fail(
            f"minlon {_num(minlon)} must be < maxlon {_num(maxlon)} and minlat {_num(minlat)} "
            f"< maxlat {_num(maxlat)} (the order is minlon,minlat,maxlon,maxlat)"
        )
    geometry = _clean_polygon(box(minlon, minlat, maxlon, maxlat), fail)
    lower = f"{_coord(minlat, 'ns')}-{_coord(minlon, 'ew')}"
    upper = f"{_coord(maxlat, 'ns')}-{_coord(maxlon, 'ew')}"
    return Aoi(id=f"bbox-{lower}-{upper}", geometry=geometry, label=label)


def _aoi_from_file(path_text: str, label: str, fail: Fail) -> Aoi:
    """Union the polygons of a vector file into one AOI."""
    path = Path(path_text).expanduser()
    frame = _read_vector(path, AoiError, f"AOI file {path}")
    if len(frame) == 0:
        raise fail(f"the file {path} has no features")
    for index, geom in enumerate(frame.geometry):
        if geom is None or geom.is_empty or not isinstance(geom, Polygon | MultiPolygon):
            kind = "empty" if geom is None or geom.is_empty else f"a {geom.geom_type}"
            raise fail(f"feature {index} of {path} is {kind}; only polygons are accepted")
    geometry = _clean_polygon(shapely.union_all(list(frame.geometry)), fail)
    return Aoi(id=_slug(path.stem, "file"), geometry=geometry, label=label)


def _site_from_feature(geom: Any, props: Mapping[str, Any], where: str) -> Aoi:
    """Turn one site-file feature into an Aoi (``where`` names the feature in errors)."""
    name = props.get("name")
    if not isinstance(name, str) or not name.strip():
        raise AoiError(f"{where} has no 'name' property; give every feature a unique name.")
    where = f"{where} ('{name}')"

    def fail(problem: str) -> AoiError:
        return AoiError(f"{where}: {_sentence(problem)}")

    if geom is None or geom.is_empty:
        raise fail("it has no geometry; draw a polygon, or a point with a radius_m property")
    if isinstance(geom, Point):
        _check_point(geom.x, geom.y, fail)
        radius = props.get("radius_m")
        if radius is None or (isinstance(radius, float) and math.isnan(radius)):
            raise fail("it is a point without a 'radius_m' property; add one (metres)")
        geometry = _clean_polygon(_circle(geom.x, geom.y, _check_radius(radius, fail), fail), fail)
    elif isinstance(geom, Polygon | MultiPolygon):
        geometry = _clean_polygon(geom, fail)
    else:
        raise fail(f"it is a {geom.geom_type}; use a Polygon, MultiPolygon or Point")
    return Aoi(id=_slug(name, "site"), geometry=geometry, label=name)


def _read_vector(path: Path, error: type[Exception], what: str) -> Any:
    """Read a single-layer vector file into a GeoDataFrame in lon/lat."""
    import geopandas  # imported lazily: heavy, and only needed for files

    try:
        if path.stat().st_size > _MAX_VECTOR_BYTES:
            raise error(f"{what} is larger than {_MAX_VECTOR_BYTES >> 20} MB; simplify it.")
        # Bytes, not the path: pyogrio parses paths as URIs and breaks names holding ';' or '!'.
        data = path.read_bytes()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "File /vsimem/.*extension", RuntimeWarning)
            layers = pyogrio.list_layers(data)
            if len(layers) != 1:
                names = ", ".join(str(layer[0]) for layer in layers)
                raise error(f"{what} has {len(layers)} layers ({names}); keep exactly one layer.")
            frame = geopandas.read_file(data, engine="pyogrio")
        if frame.crs is None:
            raise error(f"{what} has no coordinate reference system; set one, e.g. ogr2ogr "
                        "-a_srs EPSG:4326 out.gpkg in.gpkg.")
        return frame.to_crs(LONLAT_CRS)
    except _VECTOR_ERRORS as e:
        raise error(
            f"{what} is not a vector file GDAL can read (GeoJSON/GeoPackage expected): {e}"
        ) from e


def _clean_polygon(geom: BaseGeometry, fail: Fail) -> Polygon | MultiPolygon:
    """make_valid, keep polygon parts, and check lon/lat and UTM ranges and the antimeridian."""
    parts = shapely.get_parts(shapely.make_valid(geom))
    polys = [p for p in parts if isinstance(p, Polygon | MultiPolygon) and not p.is_empty]
    if not polys:
        raise fail("the geometry is empty or has no polygon area once made valid")
    result = shapely.union_all(polys)
    minx, miny, maxx, maxy = result.bounds
    if not (-180 <= minx and maxx <= 180 and -90 <= miny and maxy <= 90):
        raise fail(
            f"coordinates {tuple(round(v, 6) for v in result.bounds)} are outside lon -180..180 / "
            "lat -90..90 (is the file's CRS declared correctly?)"
        )
    if maxx - minx > 180:
        raise fail("it crosses the antimeridian (180 degrees longitude); split it in two")
    lat = float(result.centroid.y)
    if not UTM_MIN_LAT <= lat <= UTM_MAX_LAT:
        raise fail(
            f"its centre latitude {lat:.5f} is outside {UTM_MIN_LAT:g}..{UTM_MAX_LAT:g}, "
            "where the UTM working grid is defined"
        )
    return result


def _circle(lon: float, lat: float, radius_m: float, fail: Fail) -> Polygon:
    """Metric circle around (lon, lat), buffered in its UTM zone, returned in lon/lat."""
    zone_crs = _utm_code(lon, lat)
    x, y = _transformer(LONLAT_CRS, zone_crs).transform(lon, lat)
    circle = Point(x, y).buffer(radius_m, quad_segs=_CIRCLE_QUAD_SEGS)
    result = _reproject(circle, zone_crs, LONLAT_CRS)
    if result.bounds[2] - result.bounds[0] > 180:
        raise fail(f"a circle of {radius_m:g} m here crosses the antimeridian; move or shrink it")
    return result


def _utm_code(lon: float, lat: float) -> str:
    """EPSG code of the UTM zone holding (lon, lat), with the Norway/Svalbard exceptions."""
    zone = min(int((lon + 180.0) // 6.0) + 1, 60)
    if 56 <= lat < 64 and 3 <= lon < 12:
        zone = 32
    elif 72 <= lat <= 84 and 0 <= lon < 42:
        zone = 31 if lon < 9 else 33 if lon < 21 else 35 if lon < 33 else 37
    return f"EPSG:{(32600 if lat >= 0 else 32700) + zone}"


def _metric_crs(crs: str) -> str:
    """Validate a projected, metre-based CRS and return its authority string."""
    try:
        parsed = CRS.from_user_input(crs)
    except CRSError as e:
        raise GridError(f"Grid CRS {crs!r} is not a known CRS: {e}. Use e.g. 'EPSG:32645'.") from e
    units = parsed.axis_info[0].unit_name if parsed.axis_info else ""
    if not parsed.is_projected or units not in ("metre", "meter"):
        raise GridError(
            f"Grid CRS {crs!r} must be projected in metres (got units {units!r}); "
            "use a UTM code such as 'EPSG:32645', or omit crs."
        )
    auth = parsed.to_authority()
    return f"{auth[0]}:{auth[1]}" if auth else parsed.to_wkt()


@functools.lru_cache(maxsize=64)
def _transformer(src: str, dst: str) -> Transformer:
    """Cached always_xy transformer."""
    return Transformer.from_crs(src, dst, always_xy=True)


def _reproject(geom: BaseGeometry, src: str, dst: str) -> BaseGeometry:
    """Reproject a shapely geometry between CRSs."""
    return shapely.transform(geom, _transformer(src, dst).transform, interleaved=False)


def _coord(value: float, hemispheres: str) -> str:
    """'43.38385n' style coordinate for ids (``hemispheres`` is 'ns' or 'ew')."""
    return _fmt(value) + (hemispheres[0] if value >= 0 else hemispheres[1])


def _sentence(text: str) -> str:
    """End ``text`` with a full stop unless it ends with one or a question mark."""
    return text if text.endswith((".", "?")) else text + "."


def _num(value: float) -> str:
    """Number for messages, without float noise."""
    return f"{value:.10g}"


def _fmt(value: float) -> str:
    """Compact absolute decimal for ids: 43.383850 -> '43.38385', 2000.0 -> '2000'."""
    return f"{abs(value):.6f}".rstrip("0").rstrip(".") or "0"


def _slug(text: str, prefix: str) -> str:
    """Safe folder name: lowercase ASCII [a-z0-9_-], starting with a letter or digit."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9_]+", "-", ascii_text.lower()).strip("-_")[:64].strip("-_")
    if slug:
        return slug
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{prefix}-{digest}"
