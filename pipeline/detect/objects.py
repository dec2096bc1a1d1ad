"""pipeline.detect.objects: change regions to objects with building-like shape measures.

Pure: a labelled change mask and the grid's transform in, shapely polygons with their
measurements out. Polygons are in the grid CRS (in-memory ``rasterio.features.shapes``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np
import shapely
from affine import Affine
from rasterio import features
from scipy import ndimage as ndi
from skimage import measure

__all__ = ["ChangeObject", "change_object", "extract_objects", "is_building_like"]

_STRIP_PX = 1 << 20  # pixels per strip when summing per label: small float64 temporaries


@dataclass(frozen=True)
class ChangeObject:
    """One connected change region, in grid CRS units (metres)."""

    label: int
    polygon: shapely.Polygon | shapely.MultiPolygon
    area_m2: float
    solidity: float
    rectangularity: float
    elongation: float
    mean_magnitude: float
    contrast: float
    brightness_change: float


def _polygons_by_label(labels: np.ndarray, transform: Affine) -> dict[int, shapely.Geometry]:
    parts: dict[int, list[shapely.Geometry]] = {}
    for geom, value in features.shapes(
        labels.astype(np.int32, copy=False), mask=labels > 0, transform=transform,
        connectivity=8,
    ):
        parts.setdefault(int(value), []).append(shapely.geometry.shape(geom))
    return {k: shapely.union_all(v) if len(v) > 1 else v[0] for k, v in parts.items()}


def _label_sums_np(labels: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Sum of ``values`` (NaN as 0) per label ``1..n``, float64, a strip of rows at a time.

    Element 0 is 0: unlabelled pixels are skipped (each label's pixels are still added in
    raster order, so its sum is the same as over the whole strip).
    """
    sums = np.zeros(n + 1)
    step = max(1, _STRIP_PX // max(1, labels.shape[1]))
    for r in range(0, labels.shape[0], step):
        lab = labels[r:r + step].ravel()
        where = np.flatnonzero(lab)
        if not len(where):
            continue
        weights = np.nan_to_num(np.asarray(values[r:r + step]).ravel()[where])
        sums += np.bincount(lab[where], weights=weights, minlength=n + 1)[:n + 1]
    return sums


def _label_means(labels: np.ndarray, arrays: list[Any], n: int) -> list[np.ndarray]:
    """Mean of each array (NaN as 0) per label ``1..n``; lazy arrays are summed chunk by chunk.

    Each chunk of a Dask array is summed against the matching window of the global
    ``labels``, so no full-size float array is made; all arrays are computed together.
    """
    counts = np.zeros(n + 1)
    step = max(1, _STRIP_PX // max(1, labels.shape[1]))
    for r in range(0, labels.shape[0], step):
        counts += np.bincount(labels[r:r + step].ravel(), minlength=n + 1)[:n + 1]
    sums: list[Any] = []
    lazy = []
    for arr in arrays:
        if not isinstance(arr, da.Array):
            sums.append(_label_sums_np(labels, np.asarray(arr), n))
            continue
        parts = []
        for index in np.ndindex(*arr.numblocks):
            window = tuple(slice(sum(c[:i]), sum(c[:i + 1]))
                           for c, i in zip(arr.chunks, index, strict=True))
            parts.append(dask.delayed(_label_sums_np, pure=False)(
                labels[window], arr.blocks[index], n))
        lazy.append((len(sums), parts))
        sums.append(None)
    if lazy:
        computed = dask.compute(*(parts for _, parts in lazy))
        for (i, _), part_sums in zip(lazy, computed, strict=True):
            sums[i] = np.sum(part_sums, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return [(s / counts)[1:] for s in sums]


def extract_objects(
    mask: np.ndarray,
    magnitude: Any,
    brightness_delta: Any,
    *,
    transform: Affine,
    threshold: float,
    min_area_m2: float,
) -> list[ChangeObject]:
    """Label the change pixels of ``mask`` (1 change, 0 none, 255 nodata) into objects.

    Parameters
    ----------
    mask
        uint8 change mask on the working grid (NumPy).
    magnitude
        Change magnitude on the same grid (NaN = nodata); NumPy, or Dask (then summed per
        object chunk by chunk, never held whole).
    brightness_delta
        After minus before grey level on the same grid (new roofs are often brighter); NumPy
        or Dask.
    transform
        The grid's affine transform; pixel size gives areas in square metres.
    threshold
        The change threshold used for ``mask``; contrast is the mean magnitude over it.
    min_area_m2
        Objects smaller than this are dropped.

    Returns
    -------
    Objects sorted by label, with polygons in the grid CRS.
    """
    pixel_m2 = abs(transform.a * transform.e - transform.b * transform.d)
    # int32 labels in raster order, as skimage's label gives (scipy's is several times faster)
    labels, n_labels = ndi.label(np.asarray(mask) == 1, structure=np.ones((3, 3), bool),
                                 output=np.int32)
    if n_labels == 0:
        return []
    props = measure.regionprops(labels)
    keep = [p for p in props if p.area * pixel_m2 >= min_area_m2]
    if not keep:
        return []
    if len(keep) < len(props):
        kept_labels = np.zeros(n_labels + 1, dtype=np.int32)
        for p in keep:
            kept_labels[p.label] = p.label
        step = max(1, _STRIP_PX // max(1, labels.shape[1]))
        for r in range(0, labels.shape[0], step):  # relabel in place, a strip at a time
            labels[r:r + step] = kept_labels[labels[r:r + step]]
    mean_mag, mean_delta = _label_means(labels, [magnitude, brightness_delta], n_labels)
    polygons = _polygons_by_label(labels, transform)
    return [change_object(p.label, polygons[p.label], area_m2=float(p.area * pixel_m2),
                          solidity=float(p.solidity), mean_magnitude=mean_mag[p.label - 1],
                          brightness_change=mean_delta[p.label - 1], threshold=threshold)
            for p in keep]


def change_object(label: int, poly: shapely.Geometry, *, area_m2: float, solidity: float,
                  mean_magnitude: float, brightness_change: float,
                  threshold: float) -> ChangeObject:
    """One `ChangeObject` from its outline and pixel measurements (shape measures derived)."""
    rect = shapely.minimum_rotated_rectangle(poly)
    rect_area = float(shapely.area(rect)) or 1.0
    sides = _rectangle_sides(rect)
    return ChangeObject(
        label=label,
        polygon=poly,
        area_m2=area_m2,
        solidity=solidity,
        rectangularity=float(min(1.0, shapely.area(poly) / rect_area)),
        elongation=float(sides[1] / sides[0]) if sides[0] > 0 else float("inf"),
        mean_magnitude=float(mean_magnitude),
        contrast=float(mean_magnitude / threshold) if threshold > 0 else 0.0,
        brightness_change=float(brightness_change),
    )


def _rectangle_sides(rect: shapely.Geometry) -> tuple[float, float]:
    coords = np.asarray(shapely.get_coordinates(rect))
    if len(coords) < 4:
        return (0.0, 0.0)
    a = float(np.hypot(*(coords[1] - coords[0])))
    b = float(np.hypot(*(coords[2] - coords[1])))
    return (min(a, b), max(a, b))


def is_building_like(
    obj: ChangeObject,
    *,
    min_area_m2: float,
    max_area_m2: float,
    min_solidity: float,
    min_rectangularity: float,
    max_elongation: float = 10.0,
) -> bool:
    """Whether a change object has the size and compact rectilinear shape of a building."""
    return (
        min_area_m2 <= obj.area_m2 <= max_area_m2
        and obj.solidity >= min_solidity
        and obj.rectangularity >= min_rectangularity
        and obj.elongation <= max_elongation
    )
