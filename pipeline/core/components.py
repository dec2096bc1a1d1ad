"""pipeline.core.components: connected components of a chunked mask, global across chunk borders.

Each chunk is labelled on its own (`scipy.ndimage.label`, which numbers in raster order). The
labels of foreground pixels that touch across a chunk border (under the same connectivity,
corners included) are merged by a union-find over that small pair table
(`scipy.sparse.csgraph.connected_components`), and the merged components are numbered in the
raster order of their first pixel, which is how an in-memory ``ndimage.label`` or
``skimage.measure.label`` numbers them: the global labels are the in-memory ones. Per-chunk
tables (pixel count, bounding box, coordinate sums, first pixel) are reduced per global label,
so an object spanning a border is one row. Only chunks, their edges and per-label tables are
ever held; the global labels stay a lazy Dask array that maps each chunk's own labels through
a small lookup table, and `Regions.window` reads any window of them. `select_by_area` merges
the same components but reduces only their pixel counts, for filters that need no more.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import dask
import dask.array as da
import numpy as np
from dask.local import get_sync
from scipy import ndimage as ndi
from scipy import sparse
from scipy.sparse import csgraph

__all__ = ["Regions", "chunk_borders", "label_regions", "overlapping_chunks", "select_by_area"]

_NONE = np.iinfo(np.int64).max
# Guards the chunk caches of all Regions (cheap: held only around dict updates).
_RECENT_LOCK = threading.Lock()
_RECENT_BLOCKS = 16  # chunks of local labels kept by Regions.window (memory-mapped when stored)


def _structure(connectivity: int) -> np.ndarray:
    if connectivity not in (1, 2):
        raise ValueError(f"connectivity must be 1 (4-connected) or 2 (8-connected), "
                         f"got {connectivity!r}")
    return ndi.generate_binary_structure(2, connectivity)


def _local_labels(block: np.ndarray, connectivity: int) -> np.ndarray:
    """int32 labels of one chunk on its own, in raster order."""
    labels, _ = ndi.label(block, structure=_structure(connectivity), output=np.int32)
    return labels


def _first_pixels(flat: np.ndarray, n: int) -> np.ndarray:
    """Index in ``flat`` (labels in raster order) of each label's first pixel, labels ``1..n``."""
    # ndimage numbers labels in order of first appearance: a label's first pixel is where it
    # exceeds the running maximum of the pixels before it.
    running = np.maximum.accumulate(flat)
    starts = np.flatnonzero(flat[1:] > running[:-1]) + 1
    if flat.size and flat[0] > 0:
        starts = np.concatenate([[0], starts])
    if len(starts) == n and np.array_equal(flat[starts], np.arange(1, n + 1)):
        return starts
    first = np.full(n + 1, _NONE)  # labels not in raster order: the general (slower) way
    np.minimum.at(first, flat, np.arange(flat.size))
    return first[1:]


@dataclass(frozen=True)
class _ChunkTable:
    """One chunk's labels summarised: per local label ``1..count``, in global coordinates."""

    count: int
    area: np.ndarray  # (count,) int64 pixels
    bbox: np.ndarray  # (count, 4) int64 min_row, min_col, max_row, max_col (exclusive)
    coord_sum: np.ndarray  # (count, 2) float64 sums of rows and of columns
    first: np.ndarray  # (count,) int64 global flat index (row * width + col) of the first pixel
    edges: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # top, bottom, left, right


def _chunk_table(block: np.ndarray, row0: int, col0: int, width: int) -> _ChunkTable:
    """One chunk of local labels summarised; ``(row0, col0)`` its origin, ``width`` the grid's."""
    block = np.asarray(block)
    w = block.shape[1]
    edges = (block[0].copy(), block[-1].copy(), block[:, 0].copy(), block[:, -1].copy())
    flat = block.ravel()
    where = np.flatnonzero(flat)  # foreground only: the tables cost nothing for background
    labels = flat[where]
    n = int(labels.max()) if labels.size else 0
    rows, cols = np.divmod(where, w)
    area = np.bincount(labels, minlength=n + 1)[1:].astype(np.int64)
    coord_sum = np.column_stack([np.bincount(labels, weights=rows.astype(np.float64),
                                             minlength=n + 1)[1:],
                                 np.bincount(labels, weights=cols.astype(np.float64),
                                             minlength=n + 1)[1:]]).astype(np.float64)
    coord_sum += area[:, None] * np.array([row0, col0], np.float64)
    bbox = np.empty((n + 1, 4), np.int64)
    bbox[:, :2], bbox[:, 2:] = _NONE, -1
    np.minimum.at(bbox[:, 0], labels, rows)
    np.minimum.at(bbox[:, 1], labels, cols)
    np.maximum.at(bbox[:, 2], labels, rows)
    np.maximum.at(bbox[:, 3], labels, cols)
    bbox = bbox[1:] + np.array([row0, col0, row0 + 1, col0 + 1], np.int64)
    r, c = np.divmod(where[_first_pixels(labels, n)], w)
    first = (r + row0).astype(np.int64) * width + (c + col0)
    return _ChunkTable(n, area, bbox, coord_sum, first, edges)


def _pairs(a: np.ndarray, b: np.ndarray, connectivity: int) -> np.ndarray:
    """Label pairs of two parallel lines of pixels on either side of a border, ``(k, 2)``."""
    found = [np.column_stack([a, b])]
    if connectivity == 2:  # diagonal neighbours, which also link chunks meeting at a corner
        found += [np.column_stack([a[:-1], b[1:]]), np.column_stack([a[1:], b[:-1]])]
    both = np.concatenate(found)
    return both[(both[:, 0] > 0) & (both[:, 1] > 0)]


def _border_pairs(tables: np.ndarray, offsets: np.ndarray, connectivity: int) -> np.ndarray:
    """Provisional-label pairs of foreground pixels connected across any chunk border."""
    nby, nbx = tables.shape

    def edge(i: int, j: int, which: int) -> np.ndarray:
        line = tables[i, j].edges[which].astype(np.int64)
        return np.where(line > 0, line + offsets[i * nbx + j], 0)

    found = [np.zeros((0, 2), np.int64)]
    for i in range(nby - 1):  # horizontal borders: bottom row above, top row below, full width
        above = np.concatenate([edge(i, j, 1) for j in range(nbx)])
        below = np.concatenate([edge(i + 1, j, 0) for j in range(nbx)])
        found.append(_pairs(above, below, connectivity))
    for j in range(nbx - 1):  # vertical borders: right column left of it, left column right
        left = np.concatenate([edge(i, j, 3) for i in range(nby)])
        right = np.concatenate([edge(i, j + 1, 2) for i in range(nby)])
        found.append(_pairs(left, right, connectivity))
    return np.concatenate(found)


def _reduce(tables: list[_ChunkTable], row_of: np.ndarray, n: int
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Area, bounding box and centroid per global label from the chunk tables."""
    area = np.zeros(n, np.int64)
    np.add.at(area, row_of, np.concatenate([np.zeros(0, np.int64), *(t.area for t in tables)]))
    boxes = np.concatenate([np.zeros((0, 4), np.int64), *(t.bbox for t in tables)])
    bbox = np.empty((n, 4), np.int64)
    bbox[:, :2], bbox[:, 2:] = _NONE, -1
    np.minimum.at(bbox[:, 0], row_of, boxes[:, 0])
    np.minimum.at(bbox[:, 1], row_of, boxes[:, 1])
    np.maximum.at(bbox[:, 2], row_of, boxes[:, 2])
    np.maximum.at(bbox[:, 3], row_of, boxes[:, 3])
    sums = np.zeros((n, 2))
    np.add.at(sums, row_of, np.concatenate([np.zeros((0, 2)), *(t.coord_sum for t in tables)]))
    with np.errstate(invalid="ignore", divide="ignore"):
        return area, bbox, sums / area[:, None]


def chunk_borders(chunks: tuple[tuple[int, ...], ...]) -> list[np.ndarray]:
    """Chunk borders along each axis of Dask ``chunks``: ``0``, then the cumulative sizes."""
    return [np.concatenate([[0], np.cumsum(c)]) for c in chunks]


def overlapping_chunks(bounds: np.ndarray, lo: int, hi: int) -> range:
    """The chunks between ``bounds`` (ascending borders, `chunk_borders`) that overlap
    ``[lo, hi)``: found by search, not by visiting every chunk (a 40 px window of a
    100-chunk grid took 233 us that way, 57 us so). An empty ``[lo, hi)`` inside a chunk
    gives that chunk, whose part is then empty; parts outside the borders give none."""
    return range(max(0, int(np.searchsorted(bounds, lo, "right")) - 1),
                 min(len(bounds) - 1, int(np.searchsorted(bounds, hi, "left"))))


def _relabel_block(block: np.ndarray, luts: dict[tuple[int, ...], np.ndarray],
                   block_info: dict | None = None) -> np.ndarray:
    """One chunk of local labels through its own lookup table."""
    index = tuple(block_info[0]["chunk-location"]) if block_info else (0, 0)
    return luts[index][block]


@dataclass(frozen=True)
class Regions:
    """Connected components of a chunked mask with global labels and per-label properties.

    Label ``k`` (``1..n``) is row ``k - 1`` of the tables, numbered as `scipy.ndimage.label`
    and `skimage.measure.label` number an in-memory image (raster order of first pixels).

    Attributes
    ----------
    area_px
        ``(n,)`` int64 pixel count per label.
    bbox
        ``(n, 4)`` int64 ``(min_row, min_col, max_row, max_col)``, max exclusive (as
        ``regionprops(...).bbox``).
    centroid
        ``(n, 2)`` float64 mean ``(row, col)`` per label.
    first_px
        ``(n,)`` int64 flat index ``row * width + col`` of each label's first pixel.
    connectivity
        1 (4-connected) or 2 (8-connected).
    """

    area_px: np.ndarray
    bbox: np.ndarray
    centroid: np.ndarray
    first_px: np.ndarray
    connectivity: int
    local: da.Array  # each chunk's own int32 labels
    luts: dict[tuple[int, ...], np.ndarray]  # block index -> local label -> global label
    _recent: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def n(self) -> int:
        """Number of regions."""
        return len(self.area_px)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the labelled grid."""
        return tuple(self.local.shape)

    @property
    def chunks(self) -> tuple[tuple[int, ...], ...]:
        """Chunks of the labelled grid (those of the mask)."""
        return tuple(self.local.chunks)

    def relabel(self, values: np.ndarray) -> da.Array:
        """Lazy ``values[label]`` for every pixel (``values[0]`` for the background).

        ``values`` has ``n + 1`` entries; each chunk maps its own labels through one small
        composed lookup table, so no global label array is made.
        """
        values = np.asarray(values)
        if values.shape[:1] != (self.n + 1,):
            raise ValueError(f"relabel needs n + 1 = {self.n + 1} values, got {values.shape}")
        luts = {index: values[lut] for index, lut in self.luts.items()}
        return da.map_blocks(_relabel_block, self.local, luts=luts, dtype=values.dtype)

    @property
    def labels(self) -> da.Array:
        """Lazy int32 global labels (0 background)."""
        return self.relabel(np.arange(self.n + 1, dtype=np.int32))

    def _block(self, index: tuple[int, ...]) -> np.ndarray:
        """One chunk of local labels, computed; the last few are kept (windows cluster).

        Thread-safe: outlines are assessed in parallel threads that read the same regions.
        """
        with _RECENT_LOCK:
            if index in self._recent:
                return self._recent[index]
            if "delayed" not in self._recent:
                self._recent["delayed"] = self.local.to_delayed()
            delayed = self._recent["delayed"][index]
        block = np.asarray(delayed.compute(scheduler=get_sync))
        with _RECENT_LOCK:
            chunks = [k for k in self._recent if k != "delayed"]
            if len(chunks) >= _RECENT_BLOCKS:
                self._recent.pop(chunks[0])
            self._recent[index] = block
        return block

    @functools.cached_property
    def _bounds(self) -> list[np.ndarray]:
        """Chunk borders along each axis (`chunk_borders`), computed once."""
        return chunk_borders(self.chunks)

    def window(self, rows: slice, cols: slice) -> np.ndarray:
        """The global int32 labels of ``[rows, cols]`` (steps of 1), computed.

        Only the chunks the window touches are read (the last few read are kept, so stored
        chunks should be cheap to read, e.g. memory-mapped), and only the window is mapped.
        """
        (r0, r1, _), (c0, c1, _) = rows.indices(self.shape[0]), cols.indices(self.shape[1])
        out = np.zeros((max(0, r1 - r0), max(0, c1 - c0)), np.int32)
        bounds = self._bounds
        for i in overlapping_chunks(bounds[0], r0, r1):
            lo_r, hi_r = max(r0, bounds[0][i]), min(r1, bounds[0][i + 1])
            for j in overlapping_chunks(bounds[1], c0, c1):
                lo_c, hi_c = max(c0, bounds[1][j]), min(c1, bounds[1][j + 1])
                if lo_r >= hi_r or lo_c >= hi_c:
                    continue
                piece = self._block((i, j))[lo_r - bounds[0][i]:hi_r - bounds[0][i],
                                            lo_c - bounds[1][j]:hi_c - bounds[1][j]]
                out[lo_r - r0:hi_r - r0, lo_c - c0:hi_c - c0] = self.luts[i, j][piece]
        return out


def _chunk_labels(mask: Any, connectivity: int,
                  persist: Callable[[da.Array], da.Array] | None) -> da.Array:
    """Each chunk's own int32 labels of a 2-D mask (Dask; NumPy becomes one chunk), persisted."""
    _structure(connectivity)  # a bad connectivity fails before any work
    mask = mask if isinstance(mask, da.Array) else da.from_array(np.asarray(mask))
    if mask.ndim != 2:
        raise ValueError(f"Connected components need a 2-D mask, got shape {mask.shape}")
    local = mask.astype(bool).map_blocks(_local_labels, connectivity=connectivity,
                                         dtype=np.int32)
    return persist(local) if persist is not None else local


def _merge(local: da.Array, summarise: Callable[..., Any], connectivity: int
           ) -> tuple[list[Any], list[tuple[int, ...]], np.ndarray, int, np.ndarray]:
    """Summarise every chunk and merge its labels across chunk borders.

    ``summarise(block, row0, col0, width)`` returns an object with ``count`` and ``edges``.
    Returns ``(summaries, chunk indexes, offsets, n, component)``: provisional label ``p``
    (chunk ``k``'s local label ``l`` is ``offsets[k] + l``) belongs to merged component
    ``component[p - 1]`` of ``n``.
    """
    bounds = [np.concatenate([[0], np.cumsum(c)]) for c in local.chunks]
    width = int(local.shape[1])
    index_list = list(np.ndindex(*local.numblocks))
    delayed = local.to_delayed()
    computed = list(dask.compute(*(dask.delayed(summarise)(
        delayed[index], int(bounds[0][index[0]]), int(bounds[1][index[1]]), width)
        for index in index_list)))
    tables = np.empty(local.numblocks, dtype=object)
    for index, table in zip(index_list, computed, strict=True):
        tables[index] = table
    counts = np.array([t.count for t in computed], np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    total = int(offsets[-1])
    pairs = np.unique(_border_pairs(tables, offsets, connectivity), axis=0) - 1
    graph = sparse.coo_matrix((np.ones(len(pairs), np.int32), (pairs[:, 0], pairs[:, 1])),
                              shape=(total, total))
    n, component = (csgraph.connected_components(graph, directed=False) if total
                    else (0, np.zeros(0, np.int64)))
    return computed, index_list, offsets, n, component


def label_regions(mask: Any, *, connectivity: int = 2,
                  persist: Callable[[da.Array], da.Array] | None = None) -> Regions:
    """Label the connected components of a 2-D boolean mask, chunk by chunk.

    Parameters
    ----------
    mask
        ``(y, x)`` boolean (or 0/1) array, Dask (its chunks are kept) or NumPy (one chunk).
    connectivity
        1: 4-connected (edges); 2: 8-connected (edges and corners), as in skimage.
    persist
        Applied to the per-chunk labels (int32, 4 bytes a pixel), which are read here and
        again by every later read of the labels; a function that computes them once and
        returns them stored (e.g. one file per chunk) avoids labelling again. None keeps
        them lazy (each read labels again).

    Returns
    -------
    Regions
        Per-label tables (computed) and lazy access to the global labels. The tables are
        computed here (one pass over the chunks); the labels stay lazy.
    """
    local = _chunk_labels(mask, connectivity, persist)
    computed, index_list, offsets, n, component = _merge(local, _chunk_table, connectivity)
    first = np.concatenate([np.zeros(0, np.int64), *(t.first for t in computed)])
    first_of = np.full(n, _NONE)
    np.minimum.at(first_of, component, first)
    order = np.argsort(first_of, kind="stable")
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    row_of = rank[component]  # provisional label - 1 -> global label - 1
    area, bbox, centroid = _reduce(computed, row_of, n)
    luts = {index: np.concatenate([[0], row_of[offsets[k]:offsets[k + 1]] + 1]).astype(np.int32)
            for k, index in enumerate(index_list)}
    return Regions(area_px=area, bbox=bbox, centroid=centroid, first_px=first_of[order],
                   connectivity=connectivity, local=local, luts=luts)


@dataclass(frozen=True)
class _ChunkAreas:
    """One chunk's labels summarised by their pixel counts only."""

    count: int
    area: np.ndarray  # (count,) int64 pixels of local labels 1..count
    edges: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # top, bottom, left, right


def _chunk_areas(block: np.ndarray, row0: int, col0: int, width: int) -> _ChunkAreas:
    """Pixel count of each local label: one bincount (the chunk's origin is not needed)."""
    block = np.asarray(block)
    edges = (block[0].copy(), block[-1].copy(), block[:, 0].copy(), block[:, -1].copy())
    area = np.bincount(block.ravel())[1:].astype(np.int64)
    return _ChunkAreas(len(area), area, edges)


def select_by_area(mask: Any, keep: Callable[[np.ndarray], np.ndarray], *,
                   connectivity: int = 2,
                   persist: Callable[[da.Array], da.Array] | None = None) -> da.Array:
    """The pixels of the connected components of ``mask`` whose pixel count ``keep`` accepts.

    The same components as `label_regions` (merged across chunk borders), but only their
    pixel counts are reduced: no bounding boxes, centroids or raster-order numbering, which
    cost most of the labelling where the mask covers most of the grid (e.g. holes).

    Parameters
    ----------
    mask
        ``(y, x)`` boolean (or 0/1) array, Dask (its chunks are kept) or NumPy (one chunk).
    keep
        Maps an int64 array of component pixel counts to a boolean array (True: keep).
    connectivity, persist
        As in `label_regions` (``persist`` gets the per-chunk labels).

    Returns
    -------
    dask.array.Array
        Lazy boolean ``(y, x)``, True on the pixels of the kept components, with ``mask``'s
        chunks. The component counts are computed here (one pass over the chunks).
    """
    local = _chunk_labels(mask, connectivity, persist)
    computed, index_list, offsets, n, component = _merge(local, _chunk_areas, connectivity)
    provisional = np.concatenate([np.zeros(0, np.int64), *(t.area for t in computed)])
    area = np.bincount(component, weights=provisional, minlength=n).astype(np.int64)
    chosen = np.concatenate([[False], np.asarray(keep(area), bool)[component]])
    luts = {index: np.concatenate([[False], chosen[offsets[k] + 1:offsets[k + 1] + 1]])
            for k, index in enumerate(index_list)}
    return da.map_blocks(_relabel_block, local, luts=luts, dtype=bool)
