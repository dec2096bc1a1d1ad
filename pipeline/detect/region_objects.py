"""pipeline.detect.region_objects: change objects from chunked regions, read window by window.

The chunked counterpart of `pipeline.detect.objects.extract_objects`: the change pixels are
labelled chunk by chunk (`pipeline.core.components.label_regions`, 8-connected), so neither the
mask nor its labels are held whole. Each object's shape is measured on its own bounding-box
window of the labels and its mean magnitude and brightness change are summed chunk by chunk.
Same objects, labels and measurements as `extract_objects` on the whole mask.
"""

from __future__ import annotations

import functools
from typing import Any

import dask
import dask.array as da
import numpy as np
from affine import Affine
from skimage import measure

from pipeline.core.components import Regions
from pipeline.detect.blocks import crop_batches
from pipeline.detect.objects import (
    ChangeObject,
    _label_sums_np,
    _polygons_by_label,
    change_object,
)

__all__ = ["objects_from_regions"]

_OBJECT_BATCHES = 16  # tasks measuring the objects: enough to share among threads


def _region_means(regions: Regions, kept: np.ndarray, arrays: list[Any]) -> list[np.ndarray]:
    """Mean of each array (NaN as 0) per kept label ``1..n``, summed chunk by chunk.

    The chunks are summed in the order `objects._label_means` sums them, against the same
    label values, so the means are the same floats.
    """
    n = regions.n
    counts = np.zeros(n + 1)  # pixels per kept label (others are not used)
    counts[1:][kept[1:] > 0] = regions.area_px[kept[1:] > 0]
    labels = regions.relabel(kept)
    parts = []
    for arr in arrays:
        arr = arr if isinstance(arr, da.Array) else da.from_array(np.asarray(arr),
                                                                 chunks=regions.chunks)
        lab = labels if labels.chunks == arr.chunks else labels.rechunk(arr.chunks)
        lab_blocks, arr_blocks = lab.to_delayed(), arr.to_delayed()
        parts.append([dask.delayed(_label_sums_np, pure=False)(lab_blocks[i], arr_blocks[i], n)
                      for i in np.ndindex(*arr.numblocks)])
    computed = dask.compute(*parts)
    with np.errstate(invalid="ignore", divide="ignore"):
        return [(np.sum(sums, axis=0) / counts)[1:] for sums in computed]


def objects_from_regions(
    regions: Regions,
    magnitude: Any,
    brightness_delta: Any,
    *,
    transform: Affine,
    threshold: float,
    min_area_m2: float,
) -> list[ChangeObject]:
    """`extract_objects` on chunked regions of the change pixels (8-connected labels).

    Parameters
    ----------
    regions
        `label_regions` of ``mask == 1`` with ``connectivity=2``, on the working grid.
    magnitude, brightness_delta
        As for `extract_objects` (NumPy or Dask, summed per object chunk by chunk).
    transform, threshold, min_area_m2
        As for `extract_objects`.

    Returns
    -------
    Objects sorted by label, with polygons in the grid CRS; the same as `extract_objects`
    returns for the whole mask.

    Raises
    ------
    ValueError
        If ``regions`` are not 8-connected (objects are 8-connected).
    """
    if regions.connectivity != 2:
        raise ValueError("objects_from_regions needs 8-connected regions (connectivity=2), "
                         f"got connectivity={regions.connectivity}; label with connectivity=2.")
    pixel_m2 = abs(transform.a * transform.e - transform.b * transform.d)
    keep = np.flatnonzero(regions.area_px * pixel_m2 >= min_area_m2) + 1
    if keep.size == 0:
        return []
    kept = np.zeros(regions.n + 1, np.int32)
    kept[keep] = keep
    mean_mag, mean_delta = _region_means(regions, kept, [magnitude, brightness_delta])
    # the objects' windows are read and measured in batches of about equal window area (an
    # object's cost grows with it), in parallel on the configured Dask scheduler (regions
    # read their chunks thread-safely); the order stays the labels'
    labels = keep.tolist()
    boxes = regions.bbox[keep - 1]  # int64
    areas = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).tolist()
    # (bound by partial: a Regions argument would be unpacked, its lazy labels computed whole)
    measure_batch = dask.delayed(functools.partial(_measure_batch, regions, transform=transform),
                                 pure=False)
    limit = -(-sum(areas) // _OBJECT_BATCHES)
    batches = [labels[part.start:part.stop] for part in crop_batches(areas, limit)]
    measured = dask.compute(*(measure_batch(batch) for batch in batches))
    return [change_object(label, polygon, area_m2=float(regions.area_px[label - 1] * pixel_m2),
                          solidity=solidity, mean_magnitude=mean_mag[label - 1],
                          brightness_change=mean_delta[label - 1], threshold=threshold)
            for batch, shapes in zip(batches, measured, strict=True)
            for label, (polygon, solidity) in zip(batch, shapes, strict=True)]


def _measure_batch(regions: Regions, labels: list[int], *, transform: Affine
                   ) -> list[tuple[Any, float]]:
    """``(polygon, solidity)`` of each label, from its bounding-box window of the labels."""
    out = []
    for label in labels:
        r0, c0, r1, c1 = (int(v) for v in regions.bbox[label - 1])
        image = regions.window(slice(r0, r1), slice(c0, c1)) == label
        out.append((_polygons_by_label(image, transform * Affine.translation(c0, r0))[1],
                    float(measure.regionprops(image.astype(np.uint8))[0].solidity)))
    return out
