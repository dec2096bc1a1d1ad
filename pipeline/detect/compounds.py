"""pipeline.detect.compounds: candidate compounds from site-scale construction evidence.

A compound is a block of new construction with a rectilinear outline: texture gain above its
automatic threshold over a connected area of at least ``compound_min_area_m2``. Its outline is
the maximum-evidence rectangle in the site's dominant orientation (``rectfit``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import dask
import numpy as np
import shapely
from affine import Affine
from skimage import filters, measure

from pipeline.detect.blocks import CROP_BATCH_PX, crop_batches
from pipeline.detect.rectfit import (
    dominant_orientation_deg,
    fit_oriented_rectangle,
    snap_sides,
    snap_window,
)
from pipeline.detect.texture import (
    EdgeMaps,
    compute_crops,
    edge_maps,
    grey,
    new_edges,
    texture_gain_from_edges,
)
from pipeline.model import ObjectParams

__all__ = ["CompoundCandidate", "find_compounds", "evidence_threshold", "outline_window",
           "corner_candidate"]


@dataclass(frozen=True)
class CompoundCandidate:
    """A rectilinear block of construction evidence, polygon in the grid CRS."""

    polygon: shapely.Polygon
    orientation_deg: float
    length_m: float
    width_m: float
    evidence_fill: float
    gain_inside: float
    gain_outside: float
    gain_threshold: float
    cell_m: float


def evidence_threshold(gain: np.ndarray, *, floor: float) -> float:
    """Otsu threshold of the valid texture gains, never below ``floor`` (a log ratio).

    The floor keeps an unchanged pair (gains near 0 everywhere) from yielding a threshold
    inside its noise.
    """
    values = gain[np.isfinite(gain)]
    if values.size == 0 or float(values.max()) <= float(values.min()):
        return float(floor)
    return float(max(filters.threshold_otsu(values), floor))


def find_compounds(
    before: Any,
    after: Any,
    *,
    transform: Affine,
    res_m: float,
    params: ObjectParams,
    grey_before: Any = None,
    grey_after: Any = None,
    edges: EdgeMaps | None = None,
) -> tuple[list[CompoundCandidate], np.ndarray, float]:
    """Find compound outlines in a co-registered, normalized ``(band, y, x)`` pair.

    ``before`` and ``after`` may be NumPy or Dask arrays. With Dask, the texture gain is
    reduced chunk by chunk to the cell grid and only crops around each candidate are computed
    (batched), so memory does not grow with the AOI.

    Parameters
    ----------
    grey_before, grey_after
        `texture.grey` of ``before`` and ``after`` when the caller has them already.
    edges
        `texture.edge_maps` of the two grey images when the caller has them already.

    Returns
    -------
    ``(candidates, gain, threshold)``: candidates sorted by evidence (strongest first), the
    texture-gain map on the cell grid, and the threshold applied to it.
    """
    factor = max(1, int(round(params.cell_m / res_m)))
    cell_m = factor * res_m
    if grey_after is None:
        grey_after = grey(after)
    if edges is None:
        edges = edge_maps(grey(before) if grey_before is None else grey_before, grey_after)
    gain = texture_gain_from_edges(edges, factor=factor, sigma_cells=params.site_sigma_m / cell_m,
                                   eps=params.texture_eps)
    threshold = evidence_threshold(gain, floor=math.log1p(params.min_texture_gain))
    evidence = np.isfinite(gain) & (gain > threshold)
    labels = measure.label(evidence, connectivity=2)
    min_cells = params.compound_min_area_m2 / cell_m**2
    margin = int(math.ceil(params.site_gap_m / cell_m))
    search_px = 2 * params.site_sigma_m / res_m
    regions = [r for r in measure.regionprops(labels) if r.area >= min_cells]
    boxes = [_cell_box(r.bbox, margin, gain.shape) for r in regions]
    # the regions of a batch are fitted, then snapped, in parallel on the configured Dask
    # scheduler (each region is independent; the shared maps are bound to the functions, not
    # passed as arguments Dask would walk); results come back in order
    fit = dask.delayed(functools.partial(
        _fit_region, gain, labels, threshold=threshold, factor=factor,
        edges_shape=edges.after.shape, search_px=search_px), pure=False)
    snap = dask.delayed(functools.partial(_snap, search_px=search_px), pure=False)
    found = []
    # a batch of regions at a time: only one batch of crops is held (their number grows
    # with the area)
    for part in crop_batches([(r1 - r0) * (c1 - c0) * factor**2 for r0, c0, r1, c1 in boxes],
                             CROP_BATCH_PX):
        fines = compute_crops([grey_after[r0 * factor:r1 * factor, c0 * factor:c1 * factor]
                               for r0, c0, r1, c1 in (boxes[k] for k in part)])
        fits = dask.compute(*(fit(regions[k], boxes[k], fine)
                              for k, fine in zip(part, fines, strict=True)))
        del fines
        fitted = [f for f in fits if f is not None]
        crops = compute_crops([new_edges(edges, rows, cols) for _, _, (rows, cols) in fitted])
        snapped = dask.compute(*(snap(px, window, crop)
                                 for (_, px, window), crop in zip(fitted, crops, strict=True)))
        # on this thread: rasterio's rasterize, run on several threads at once, warned
        # (NotGeoreferencedWarning) about a dataset without a transform, with equal masks
        cands = [corner_candidate(px, angle, gain, threshold=threshold, transform=transform,
                                  factor=factor, cell_m=cell_m)
                 for (angle, _, _), px in zip(fitted, snapped, strict=True)]
        found += [c for c in cands if c.polygon.area >= params.compound_min_area_m2]
    found.sort(key=lambda c: -(c.gain_inside - c.gain_outside) * c.polygon.area)
    return found, gain, threshold


def outline_window(polygon: shapely.Geometry, transform: Affine, shape: tuple[int, ...], *,
                   margin_px: int) -> tuple[slice, slice, Affine]:
    """The fine-grid window holding ``polygon`` grown by ``margin_px`` pixels, and its transform.

    For work around one outline on a crop, ``arr[..., rows, cols]`` with the returned
    transform, rather than on the whole grid: a lazy (Dask) array is then computed only there
    (several crops at once with `texture.compute_crops`).
    """
    minx, miny, maxx, maxy = polygon.bounds
    inverse = ~transform
    corners = [inverse * (x, y) for x in (minx, maxx) for y in (miny, maxy)]
    cols, rows = [c for c, _ in corners], [r for _, r in corners]
    r0 = max(0, math.floor(min(rows)) - margin_px)
    c0 = max(0, math.floor(min(cols)) - margin_px)
    r1 = min(shape[-2], math.ceil(max(rows)) + margin_px)
    c1 = min(shape[-1], math.ceil(max(cols)) + margin_px)
    r1, c1 = max(r0, r1), max(c0, c1)
    return slice(r0, r1), slice(c0, c1), transform * Affine.translation(c0, r0)


def _cell_box(bbox: tuple[int, ...], margin: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A region's cell bounding box grown by ``margin`` cells, inside ``shape``."""
    r0, c0, r1, c1 = bbox
    return (max(0, r0 - margin), max(0, c0 - margin),
            min(shape[0], r1 + margin), min(shape[1], c1 + margin))


def _fit_region(
    gain: np.ndarray,
    labels: np.ndarray,
    region: measure._regionprops.RegionProperties,
    box: tuple[int, ...],
    fine: np.ndarray,
    *,
    threshold: float,
    factor: int,
    edges_shape: tuple[int, int],
    search_px: float,
) -> tuple[float, np.ndarray, tuple[slice, slice]] | None:
    """``(orientation, pixel corners, snap window)`` of a region's evidence rectangle (the
    window of the ``edges_shape`` edge maps that `snap_sides` reads for it), or None."""
    r0, c0, r1, c1 = box
    # Evidence above threshold counts up to +1 per cell, below it down to -1.
    crop = np.clip(np.nan_to_num(gain[r0:r1, c0:c1] - threshold, nan=-1.0), -1.0, 1.0)
    other = (labels[r0:r1, c0:c1] > 0) & (labels[r0:r1, c0:c1] != region.label)
    crop = np.where(other, -1.0, crop)
    angle = dominant_orientation_deg(np.nan_to_num(fine, nan=float(np.nanmean(fine))))
    fit = fit_oriented_rectangle(crop, angle)
    if fit is None:
        return None
    _, corners = fit
    # Cell-index corners (cell i spans i-0.5..i+0.5) to pixel corners.
    px = np.column_stack([(corners[:, 0] + 0.5 + r0) * factor, (corners[:, 1] + 0.5 + c0) * factor])
    return angle, px, snap_window(px, edges_shape, search_px=search_px)


def _snap(px: np.ndarray, window: tuple[slice, slice], crop: np.ndarray, *,
          search_px: float) -> np.ndarray:
    """A fitted rectangle's corners ``px`` with its sides snapped onto the new edges of
    ``crop`` (the edge maps' ``window``)."""
    rows, cols = window
    return snap_sides(px, crop, search_px=search_px, origin=(rows.start, cols.start))


def corner_candidate(px: np.ndarray, angle: float, gain: np.ndarray, *, threshold: float,
                     transform: Affine, factor: int, cell_m: float) -> CompoundCandidate:
    """The candidate for four pixel corners ``px`` (``(row, col)``, fractional) at
    ``angle``: polygon in the grid CRS and its texture measures on the ``gain`` cell grid
    (``factor`` pixels, ``cell_m`` metres a cell; ``threshold`` = the evidence threshold)."""
    rows, cols = px[:, 0], px[:, 1]
    # the affine map written out: affine's `@` works on arrays, but is typed for scalar pairs
    xs = transform.a * cols + transform.b * rows + transform.c
    ys = transform.d * cols + transform.e * rows + transform.f
    polygon = shapely.Polygon(np.column_stack([xs, ys]))
    window, inside, ring = _cell_masks(polygon, gain.shape, transform, factor, cell_m)
    g = np.where(np.isfinite(gain[window]), gain[window], np.nan)
    sides = sorted(
        float(np.hypot(xs[i + 1] - xs[i], ys[i + 1] - ys[i])) for i in range(2)
    )
    return CompoundCandidate(
        polygon=polygon,
        orientation_deg=angle,
        length_m=sides[1],
        width_m=sides[0],
        evidence_fill=float(np.mean(g[inside] > threshold)) if inside.any() else 0.0,
        gain_inside=float(np.nanmean(g[inside])) if inside.any() else 0.0,
        gain_outside=float(np.nanmean(g[ring])) if ring.any() else 0.0,
        gain_threshold=threshold,
        cell_m=cell_m,
    )


def _cell_masks(
    polygon: shapely.Polygon,
    shape: tuple[int, int],
    transform: Affine,
    factor: int,
    cell_m: float,
) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
    """Cells whose centre is inside ``polygon``, and a ring of about two cells around it.

    Returns ``(window, inside, ring)``: the masks on ``window``, a part of the cell grid
    that holds every cell of both (so the measures cost the outline's cells, not the
    scene's; its cells in the grid's order). Both are burnt on the whole grid, as uint8.
    """
    from rasterio import features

    cell_transform = transform @ Affine.scale(factor)
    grown = polygon.buffer(2.5 * cell_m, join_style="mitre")
    # The whole grid, so that every cell is decided by GDAL's own arithmetic as before
    # (burnt into uint8: rasterize's default int64 cost 5x the time at 1000 x 1000 cells)
    inside = features.rasterize([polygon], out_shape=shape, transform=cell_transform,
                                dtype=np.uint8)
    outer = features.rasterize([grown], out_shape=shape, transform=cell_transform,
                               dtype=np.uint8)
    window = _cells_window(grown, cell_transform, shape)
    if (np.count_nonzero(outer[window]) != np.count_nonzero(outer)
            or np.count_nonzero(inside[window]) != np.count_nonzero(inside)):
        window = (slice(0, shape[0]), slice(0, shape[1]))  # (not seen) all of the grid
    inside_w, outer_w = inside[window] > 0, outer[window] > 0
    return window, inside_w, outer_w & ~inside_w


def _cells_window(polygon: shapely.Polygon, cell_transform: Affine, shape: tuple[int, int]
                  ) -> tuple[slice, slice]:
    """Rows and columns of the cells within one cell of ``polygon``'s bounds."""
    minx, miny, maxx, maxy = polygon.bounds
    cols, rows = ~cell_transform * (np.array([minx, maxx, minx, maxx]),
                                    np.array([miny, miny, maxy, maxy]))
    r0, c0 = max(0, math.floor(rows.min()) - 1), max(0, math.floor(cols.min()) - 1)
    r1 = min(shape[0], math.ceil(rows.max()) + 1)
    c1 = min(shape[1], math.ceil(cols.max()) + 1)
    return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))
