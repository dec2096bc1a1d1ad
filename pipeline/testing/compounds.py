"""pipeline.testing.compounds: synthetic walled compounds and look-alikes on real backgrounds.

Scenes are drawn in metres on a fine canvas (at most 0.25 m per pixel), then averaged down to
``res_m``, so a 0.6 m wall is a mixed pixel at 2 m as it is in real imagery. Every structure
has a height and casts a shadow away from the sun. The caller passes the background (ideally a
crop of real 8-bit imagery, already at ``res_m``; see `resample_background`): this module reads
no file. Values are 8-bit digital numbers (0-255). Scene metres run x east and y south from the
frame's top-left corner; returned geometries are in the grid CRS (top-left corner at
``ORIGIN``, north up).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import shapely
from affine import Affine
from rasterio import features
from scipy import ndimage as ndi
from shapely import affinity

__all__ = [
    "Structure", "CompoundTruth", "synthetic_background", "resample_background",
    "render_pair", "make_walled_compound", "make_road_grid", "make_field_boundaries",
    "make_new_roofs", "make_existing_compound",
]

ORIGIN = (500000.0, 4800000.0)
_WALL = (205.0, 200.0, 190.0)
_FENCE = (120.0, 120.0, 115.0)  # mesh and posts read as a faint dark line
_TOWER = (225.0, 222.0, 215.0)
_ROOF = (90.0, 125.0, 185.0)
_ROAD = (75.0, 75.0, 80.0)
_SOIL = (190.0, 175.0, 150.0)


@dataclass(frozen=True)
class Structure:
    """One drawn object: a polygon in scene metres, its height and per-band colour."""

    geometry: shapely.Polygon
    height_m: float
    colour: tuple[float, ...]
    shadow_gain: float = 0.4  # ground in its shadow keeps this share of its brightness
    opacity: float = 1.0  # below 1 the ground shows through (graded soil)
    kind: str = ""  # "roof" for building roofs (recoloured by make_existing_compound)


@dataclass(frozen=True)
class CompoundTruth:
    """What was drawn, in the grid CRS: the wall's centreline ring and the rest.

    ``closure_ratio`` is the built share of the wall ring; ``extra`` holds scene-specific
    items (``"outline"``: the outline a naive detector would call a compound).
    """

    transform: Affine
    res_m: float
    wall_polygon: shapely.Polygon | None = None
    wall_length_m: float = 0.0
    perimeter_m: float = 0.0
    closure_ratio: float = 0.0
    double_fence: bool = False
    internal_fences: tuple[shapely.LineString, ...] = ()
    towers: tuple[shapely.Point, ...] = ()
    towers_at_corner: tuple[bool, ...] = ()
    tower_size_m: float = 0.0
    buildings: tuple[shapely.Polygon, ...] = ()
    extra: dict = field(default_factory=dict)


def synthetic_background(shape: tuple[int, int], *, res_m: float, seed: int = 0) -> np.ndarray:
    """Textured ground with tree-like dark crowns, ``(3, y, x)`` float32 at ``res_m``.

    The fallback when no real imagery is at hand: ground texture at 1-20 m scales and crowns of
    3-8 m, so edge and blob detectors meet clutter at its real size.
    """
    rng = np.random.default_rng(seed)
    fine = ndi.gaussian_filter(rng.standard_normal(shape), max(0.5, 1.0 / res_m))
    coarse = ndi.gaussian_filter(rng.standard_normal(shape), 20.0 / res_m)
    ground = 120 + 8 * fine / fine.std() + 12 * coarse / coarse.std()
    crowns = np.zeros(shape)
    n = int(shape[0] * shape[1] * res_m**2 / 900)  # about one crown per 900 m2
    rows, cols = rng.integers(0, shape[0], n), rng.integers(0, shape[1], n)
    crowns[rows, cols] = 1.0
    crowns = ndi.gaussian_filter(crowns, rng.uniform(1.5, 3.0) / res_m) > 0.02 / res_m
    img = np.where(crowns, 55 + 6 * fine, ground)
    return np.stack([img * 1.05, img, img * 0.85]).astype(np.float32)


def resample_background(image: np.ndarray, *, from_res_m: float, to_res_m: float) -> np.ndarray:
    """Average ``(band, y, x)`` imagery down by a whole factor (``to_res_m / from_res_m``)."""
    factor = int(round(to_res_m / from_res_m))
    if factor < 1 or abs(factor * from_res_m - to_res_m) > 1e-6 * to_res_m:
        raise ValueError(f"to_res_m must be a whole multiple of from_res_m, got {to_res_m} / "
                         f"{from_res_m}")
    img = np.asarray(image, dtype=np.float32)
    b, h, w = img.shape
    h, w = h // factor * factor, w // factor * factor
    return img[:, :h, :w].reshape(b, h // factor, factor, w // factor, factor).mean(axis=(2, 4))


def _shadow(geom: shapely.Polygon, height_m: float, sun: tuple[float, float]) -> shapely.Geometry:
    """Ground shadow of a vertical convex prism: hull of the footprint and its projection."""
    azimuth, elevation = (math.radians(v) for v in sun)
    length = height_m / math.tan(elevation)
    # Scene y runs south; the shadow points away from the sun's azimuth.
    dx, dy = -math.sin(azimuth) * length, math.cos(azimuth) * length
    return shapely.convex_hull(shapely.union(geom, affinity.translate(geom, dx, dy)))


def _coverage(shapes: list, shape_px: tuple[int, int], factor: int, fine_m: float) -> np.ndarray:
    """Share of each output pixel covered by the union of ``shapes`` (scene metres).

    Rasterised on the fine canvas only within the shapes' bounding box, then block-averaged.
    """
    out = np.zeros(shape_px, np.float32)
    shapes = [g for g in shapes if not g.is_empty]
    if not shapes:
        return out
    minx, miny, maxx, maxy = shapely.union_all(shapes).bounds
    coarse_m = fine_m * factor
    r0, c0 = max(int(miny // coarse_m), 0), max(int(minx // coarse_m), 0)
    r1 = min(int(maxy // coarse_m) + 1, shape_px[0])
    c1 = min(int(maxx // coarse_m) + 1, shape_px[1])
    if r1 <= r0 or c1 <= c0:
        return out
    fine = features.rasterize(
        [(g, 1) for g in shapes], out_shape=((r1 - r0) * factor, (c1 - c0) * factor),
        transform=Affine(fine_m, 0, c0 * coarse_m, 0, fine_m, r0 * coarse_m), dtype=np.uint8)
    blocks = fine.reshape(r1 - r0, factor, c1 - c0, factor).sum(axis=(1, 3), dtype=np.int32)
    out[r0:r1, c0:c1] = blocks / float(factor * factor)
    return out


def _paint(img: np.ndarray, s: Structure, part: shapely.Geometry, cover_args: tuple) -> None:
    """Blend structure ``s``'s colour over ``img`` where ``part`` covers it (in place)."""
    cover = _coverage([part] if not part.is_empty else [], *cover_args) * s.opacity
    colour = np.asarray(s.colour[: img.shape[0]], dtype=np.float64)[:, None, None]
    img *= 1 - cover
    img += colour * cover


def _render(background: np.ndarray, structures: list[Structure], *, res_m: float,
            sun: tuple[float, float]) -> np.ndarray:
    """Draw ``structures`` and their shadows over ``background`` (``(band, y, x)`` at res_m).

    Flat structures (height 0: graded ground, roads) first, then the shadows of the raised
    ones on whatever is not raised, then the raised ones, the tallest on top.
    """
    img = np.asarray(background, dtype=np.float64).copy()
    factor = max(1, math.ceil(res_m / 0.25))
    cover_args = (img.shape[1:], factor, res_m / factor)
    for s in (s for s in structures if s.height_m <= 0):
        _paint(img, s, s.geometry, cover_args)
    raised = [s for s in structures if s.height_m > 0]
    if not raised:
        return img
    solid = shapely.union_all([s.geometry for s in raised])
    darkening = np.zeros(img.shape[1:])
    for gain in sorted({s.shadow_gain for s in raised}):
        shadows = [_shadow(s.geometry, s.height_m, sun) for s in raised if s.shadow_gain == gain]
        cover = _coverage([shapely.difference(shapely.union_all(shadows), solid)], *cover_args)
        darkening = np.maximum(darkening, cover * (1 - gain))
    img *= 1 - darkening
    drawn = shapely.Polygon()
    for s in sorted(raised, key=lambda s: s.height_m, reverse=True):
        _paint(img, s, shapely.difference(s.geometry, drawn), cover_args)
        drawn = shapely.union(drawn, s.geometry)
    return img


def render_pair(background: np.ndarray | tuple[np.ndarray, np.ndarray], before: list[Structure],
                after: list[Structure], *, res_m: float, sun_before: tuple[float, float],
                sun_after: tuple[float, float], noise: float, seed: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Render both dates over a background (one array, or one per date) plus Gaussian noise.

    Returns
    -------
    ``(before, after)`` float32 ``(band, y, x)`` arrays on the background's grid.
    """
    rng = np.random.default_rng(seed)
    bg_b, bg_a = background if isinstance(background, tuple) else (background, background)
    out = []
    for bg, structs, sun in ((bg_b, before, sun_before), (bg_a, after, sun_after)):
        img = _render(bg, structs, res_m=res_m, sun=sun)
        if noise > 0:
            img = img + rng.normal(0.0, noise, img.shape)
        out.append(np.clip(img, 0, 255).astype(np.float32))
    return out[0], out[1]


def _to_grid(geom: shapely.Geometry) -> shapely.Geometry:
    """Scene metres (y south) to the grid CRS (y north) at ``ORIGIN``."""
    return affinity.affine_transform(geom, [1, 0, 0, -1, ORIGIN[0], ORIGIN[1]])


def _transform(res_m: float) -> Affine:
    return Affine(res_m, 0, ORIGIN[0], 0, -res_m, ORIGIN[1])


def _bar(a: tuple[float, float], b: tuple[float, float], width_m: float) -> shapely.Polygon:
    """A straight wall or fence of ``width_m`` from ``a`` to ``b`` (square ends)."""
    return shapely.LineString([a, b]).buffer(width_m / 2, cap_style="square")


def _ring_bars(rect: tuple[float, float, float, float], width_m: float,
               gap_m: float = 0.0) -> list[shapely.Polygon]:
    """Four bars around ``rect``; a gap of ``gap_m`` is left mid-way along the south side."""
    x0, y0, x1, y1 = rect
    xm = (x0 + x1) / 2
    south = ([((x0, y1), (xm - gap_m / 2, y1)), ((xm + gap_m / 2, y1), (x1, y1))] if gap_m > 0
             else [((x1, y1), (x0, y1))])
    ends = [((x0, y0), (x1, y0)), ((x1, y0), (x1, y1)), ((x0, y1), (x0, y0)), *south]
    return [_bar(a, b, width_m) for a, b in ends]


def _building_grid(rect: tuple[float, float, float, float], rows: int, cols: int,
                   size_m: tuple[float, float], avoid: shapely.Geometry) -> list[shapely.Polygon]:
    """``rows x cols`` buildings of ``size_m`` (length, depth) spread evenly over ``rect``."""
    x0, y0, x1, y1 = rect
    out = []
    for i in range(rows):
        for j in range(cols):
            cx, cy = x0 + (j + 0.5) * (x1 - x0) / cols, y0 + (i + 0.5) * (y1 - y0) / rows
            box = shapely.box(cx - size_m[0] / 2, cy - size_m[1] / 2,
                              cx + size_m[0] / 2, cy + size_m[1] / 2)
            if not box.intersects(avoid):
                out.append(box)
    return out


def _fences(rect: tuple[float, float, float, float], n: int) -> list[shapely.LineString]:
    """``n`` fences across ``rect``, parallel to its short side, evenly spaced."""
    x0, y0, x1, y1 = rect
    if (x1 - x0) >= (y1 - y0):
        return [shapely.LineString([(x0 + k * (x1 - x0) / (n + 1), y0),
                                    (x0 + k * (x1 - x0) / (n + 1), y1)]) for k in range(1, n + 1)]
    return [shapely.LineString([(x0, y0 + k * (y1 - y0) / (n + 1)),
                                (x1, y0 + k * (y1 - y0) / (n + 1))]) for k in range(1, n + 1)]


def _tower_spots(rect: tuple[float, float, float, float],
                 towers: str | None) -> list[tuple[tuple[float, float], bool]]:
    """Tower centres and whether each is at a corner."""
    x0, y0, x1, y1 = rect
    corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    spots = [(c, True) for c in corners] if towers else []
    if towers == "corners_and_sides":
        spots += [(((a[0] + b[0]) / 2, (a[1] + b[1]) / 2), False)
                  for a, b in zip(corners, corners[1:] + corners[:1], strict=True)]
    return spots


def _compound_layout(res_m: float, rect: tuple[float, float, float, float], *,
                     wall_width_m: float, wall_height_m: float, wall_gap_m: float,
                     double_fence_gap_m: float | None, internal_fences: int, towers: str | None,
                     tower_size_m: float, buildings: tuple[int, int] | None,
                     building_size_m: tuple[float, float], cleared_margin_m: float | None,
                     angle_deg: float) -> tuple[list[Structure], CompoundTruth]:
    """The structures of a compound (scene metres) and its truth (grid CRS)."""
    x0, y0, x1, y1 = rect
    parts = [] if cleared_margin_m is None else [Structure(
        shapely.box(*rect).buffer(cleared_margin_m, join_style="mitre"), 0.0, _SOIL,
        opacity=0.7)]
    parts += [Structure(b, wall_height_m, _WALL) for b in _ring_bars(rect, wall_width_m,
                                                                    wall_gap_m)]
    if double_fence_gap_m:
        g = double_fence_gap_m
        parts += [Structure(b, 3.0, _FENCE, 0.6)
                  for b in _ring_bars((x0 + g, y0 + g, x1 - g, y1 - g), 0.35)]
    fence_lines = _fences(rect, internal_fences)
    parts += [Structure(ln.buffer(0.2, cap_style="flat"), 3.0, _FENCE, 0.6) for ln in fence_lines]
    spots, h = _tower_spots(rect, towers), tower_size_m / 2
    parts += [Structure(shapely.box(p[0] - h, p[1] - h, p[0] + h, p[1] + h), 10.0, _TOWER)
              for p, _ in spots]
    blocks = []
    if buildings:
        avoid = shapely.union_all([ln.buffer(8) for ln in fence_lines] or [shapely.Polygon()])
        blocks = _building_grid((x0 + 25, y0 + 25, x1 - 25, y1 - 25), *buildings,
                                building_size_m, avoid)
        parts += [Structure(b, 10.0, _ROOF, kind="roof") for b in blocks]
    # Scene y runs south, so a counter-clockwise turn on the map is clockwise here.
    centre = ((x0 + x1) / 2, (y0 + y1) / 2)
    rot = lambda g: affinity.rotate(g, -angle_deg, origin=centre)  # noqa: E731
    parts = [replace(s, geometry=rot(s.geometry)) for s in parts]
    perimeter = 2 * ((x1 - x0) + (y1 - y0))
    return parts, CompoundTruth(
        transform=_transform(res_m), res_m=res_m,
        wall_polygon=_to_grid(rot(shapely.box(*rect))), wall_length_m=perimeter - wall_gap_m,
        perimeter_m=perimeter, closure_ratio=(perimeter - wall_gap_m) / perimeter,
        double_fence=bool(double_fence_gap_m),
        internal_fences=tuple(_to_grid(rot(ln)) for ln in fence_lines),
        towers=tuple(_to_grid(rot(shapely.Point(p))) for p, _ in spots),
        towers_at_corner=tuple(c for _, c in spots), tower_size_m=tower_size_m if spots else 0.0,
        buildings=tuple(_to_grid(rot(b)) for b in blocks))


def make_walled_compound(
    background: np.ndarray | tuple[np.ndarray, np.ndarray], *, res_m: float,
    wall_rect_m: tuple[float, float, float, float] = (40.0, 40.0, 200.0, 160.0),
    wall_width_m: float = 0.6, wall_height_m: float = 4.0, wall_gap_m: float = 0.0,
    double_fence_gap_m: float | None = None, internal_fences: int = 0,
    towers: str | None = "corners", tower_size_m: float = 5.0,
    buildings: tuple[int, int] | None = (2, 3),
    building_size_m: tuple[float, float] = (30.0, 12.0),
    cleared_margin_m: float | None = 10.0, angle_deg: float = 0.0,
    sun_azimuth_deg: float = 150.0, sun_elevation_deg: float = 55.0,
    noise: float = 2.0, seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, CompoundTruth]:
    """A compound built between the dates: outer wall, optional fences, towers and buildings.

    Parameters
    ----------
    background
        ``(band, y, x)`` imagery at ``res_m`` (both dates), or a ``(before, after)`` pair.
    res_m
        Pixel size of the background and the output.
    wall_rect_m
        ``(xmin, ymin, xmax, ymax)`` of the wall's centreline in scene metres (y south).
    wall_width_m, wall_height_m, wall_gap_m
        Wall thickness seen from above, height (sets its shadow), and the length of an unbuilt
        section mid-way along the south wall (0 = closed).
    double_fence_gap_m, internal_fences
        Distance inside the wall of a second ring of fence (3 m tall; None for none), and the
        number of fences across the compound, parallel to its short side.
    towers, tower_size_m
        ``"corners"``, ``"corners_and_sides"`` (also mid-way along each side) or None; side
        of the square watchtowers (10 m tall, light roofs).
    buildings, building_size_m
        ``(rows, cols)`` of dormitory blocks (10 m tall) inside, or None; their
        ``(length, depth)``.
    cleared_margin_m
        Ground graded for the works (soil blended over the background) out to this distance
        beyond the wall; None keeps the background (trees and all) up to the wall.
    angle_deg
        Counter-clockwise rotation of the whole compound about its centre.
    sun_azimuth_deg, sun_elevation_deg
        Sun position (azimuth clockwise from north) at the after date.
    noise, seed
        Standard deviation of the Gaussian noise added to each date, and its seed.

    Returns
    -------
    ``(before, after, truth)``: float32 ``(band, y, x)`` arrays and the drawn geometry.
    """
    parts, truth = _compound_layout(
        res_m, wall_rect_m, wall_width_m=wall_width_m, wall_height_m=wall_height_m,
        wall_gap_m=wall_gap_m, double_fence_gap_m=double_fence_gap_m,
        internal_fences=internal_fences, towers=towers, tower_size_m=tower_size_m,
        buildings=buildings, building_size_m=building_size_m,
        cleared_margin_m=cleared_margin_m, angle_deg=angle_deg)
    sun = (sun_azimuth_deg, sun_elevation_deg)
    before, after = render_pair(background, [], parts, res_m=res_m, sun_before=sun,
                                sun_after=sun, noise=noise, seed=seed)
    return before, after, truth


def make_existing_compound(
    background: np.ndarray | tuple[np.ndarray, np.ndarray], *, res_m: float,
    wall_rect_m: tuple[float, float, float, float] = (40.0, 40.0, 200.0, 160.0),
    towers: str | None = "corners", buildings: tuple[int, int] | None = (3, 4),
    roof_before: tuple[float, ...] = (150.0, 75.0, 60.0),
    roof_after: tuple[float, ...] = (95.0, 130.0, 190.0),
    sun_before: tuple[float, float] = (140.0, 50.0),
    sun_after: tuple[float, float] = (160.0, 58.0), noise: float = 2.0, seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, CompoundTruth]:
    """A walled compound standing at both dates whose roofs change colour (repainted, snow).

    The sun also moves between the dates, so every shadow changes a little: the commonest
    false alarm. ``truth`` describes the (old) compound; nothing in it is new.
    """
    parts, truth = _compound_layout(
        res_m, wall_rect_m, wall_width_m=0.6, wall_height_m=4.0, wall_gap_m=0.0,
        double_fence_gap_m=None, internal_fences=0, towers=towers, tower_size_m=5.0,
        buildings=buildings, building_size_m=(30.0, 12.0), cleared_margin_m=10.0,
        angle_deg=0.0)
    dates = [[replace(s, colour=roof) if s.kind == "roof" else s for s in parts]
             for roof in (roof_before, roof_after)]
    b, a = render_pair(background, dates[0], dates[1], res_m=res_m, sun_before=sun_before,
                       sun_after=sun_after, noise=noise, seed=seed)
    return b, a, replace(truth, extra={"outline": truth.wall_polygon, "existing": True})


def make_road_grid(
    background: np.ndarray | tuple[np.ndarray, np.ndarray], *, res_m: float,
    rect_m: tuple[float, float, float, float] = (40.0, 40.0, 200.0, 160.0),
    spacing_m: float = 60.0, road_width_m: float = 7.0, colour: tuple[float, ...] = _ROAD,
    noise: float = 2.0, seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, CompoundTruth]:
    """New roads (flat: no shadow) on a rectangular grid that closes around ``rect_m``.

    ``truth.extra["outline"]`` is the grid's outer rectangle (centrelines, grid CRS): the
    outline a naive detector would call a walled compound.
    """
    x0, y0, x1, y1 = rect_m
    xs = [*np.arange(x0, x1 - 1e-6, spacing_m), x1]
    ys = [*np.arange(y0, y1 - 1e-6, spacing_m), y1]
    bars = [_bar((x, y0), (x, y1), road_width_m) for x in xs]
    bars += [_bar((x0, y), (x1, y), road_width_m) for y in ys]
    sun = (150.0, 55.0)
    b, a = render_pair(background, [], [Structure(shapely.union_all(bars), 0.0, colour)],
                       res_m=res_m, sun_before=sun, sun_after=sun, noise=noise, seed=seed)
    return b, a, CompoundTruth(transform=_transform(res_m), res_m=res_m,
                               extra={"outline": _to_grid(shapely.box(*rect_m))})


def make_field_boundaries(
    background: np.ndarray | tuple[np.ndarray, np.ndarray], *, res_m: float,
    rect_m: tuple[float, float, float, float] = (20.0, 20.0, 220.0, 180.0),
    parcel_m: tuple[float, float] = (100.0, 80.0), track_width_m: float = 2.5,
    noise: float = 2.0, seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, CompoundTruth]:
    """Fields with earth tracks and a low hedge between them at both dates; crops change tone.

    Each parcel has a tone (ploughed, green, stubble) that changes between the dates, as with
    the seasons, so the contrast of the unchanged tracks changes too.
    ``truth.extra["outline"]`` is one parcel (grid CRS): an outline with no new wall.
    """
    rng = np.random.default_rng(seed + 1)
    x0, y0, x1, y1 = rect_m
    dates: list[list[Structure]] = [[], []]
    tracks = []
    for px in np.arange(x0, x1 - 1e-6, parcel_m[0]):
        for py in np.arange(y0, y1 - 1e-6, parcel_m[1]):
            box = shapely.box(px, py, min(px + parcel_m[0], x1), min(py + parcel_m[1], y1))
            t = rng.uniform(70, 170, size=2)
            dates[0].append(Structure(box, 0.0, (t[0] * 1.05, t[0], t[0] * 0.8), opacity=0.85))
            dates[1].append(Structure(box, 0.0, (t[1] * 0.8, t[1], t[1] * 0.7), opacity=0.85))
            tracks.append(shapely.LineString(box.exterior.coords))
    track = shapely.union_all(tracks).buffer(track_width_m / 2, cap_style="flat")
    hedge = Structure(track, 1.0, (150.0, 140.0, 120.0))
    sun = (150.0, 55.0)
    b, a = render_pair(background, [*dates[0], hedge], [*dates[1], hedge], res_m=res_m,
                       sun_before=sun, sun_after=sun, noise=noise, seed=seed)
    first = shapely.box(x0, y0, x0 + parcel_m[0], y0 + parcel_m[1])
    return b, a, CompoundTruth(transform=_transform(res_m), res_m=res_m,
                               extra={"outline": _to_grid(first)})


def make_new_roofs(
    background: np.ndarray | tuple[np.ndarray, np.ndarray], *, res_m: float,
    rect_m: tuple[float, float, float, float] = (40.0, 40.0, 200.0, 160.0),
    buildings: tuple[int, int] = (3, 4), building_size_m: tuple[float, float] = (30.0, 12.0),
    noise: float = 2.0, seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, CompoundTruth]:
    """Rows of new buildings on graded ground, with no wall, fence or tower around them.

    ``truth.extra["outline"]`` is ``rect_m`` in the grid CRS (the block the rows fill).
    """
    blocks = _building_grid(rect_m, *buildings, building_size_m, shapely.Polygon())
    ground = Structure(shapely.box(*rect_m).buffer(10.0, join_style="mitre"), 0.0, _SOIL,
                       opacity=0.7)
    sun = (150.0, 55.0)
    b, a = render_pair(background, [], [ground, *(Structure(g, 10.0, _ROOF) for g in blocks)],
                       res_m=res_m, sun_before=sun, sun_after=sun, noise=noise, seed=seed)
    return b, a, CompoundTruth(transform=_transform(res_m), res_m=res_m,
                               buildings=tuple(_to_grid(g) for g in blocks),
                               extra={"outline": _to_grid(shapely.box(*rect_m))})
