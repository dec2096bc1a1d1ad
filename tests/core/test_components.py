"""Chunked connected components equal the in-memory ones (labels and region properties)."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from numpy.testing import assert_allclose, assert_array_equal
from skimage import measure

from pipeline.core.components import (
    chunk_borders,
    label_regions,
    overlapping_chunks,
    select_by_area,
)


def _assert_same_as_in_memory(mask: np.ndarray, chunks, connectivity: int) -> None:
    """Chunked labels, tables and windows equal skimage's labels and regionprops."""
    regions = label_regions(da.from_array(mask, chunks=chunks), connectivity=connectivity)
    expected = measure.label(mask, connectivity=connectivity)
    assert_array_equal(regions.labels.compute(), expected)
    props = measure.regionprops(expected)
    assert regions.n == len(props)
    if props:
        assert_array_equal(regions.area_px, [p.area for p in props])
        assert_array_equal(regions.bbox, [p.bbox for p in props])
        assert_allclose(regions.centroid, [p.centroid for p in props], rtol=0, atol=1e-9)
        first = [np.ravel_multi_index(tuple(p.coords[0]), mask.shape) for p in props]
        assert_array_equal(regions.first_px, first)


@st.composite
def _masks_and_chunks(draw):
    h = draw(st.integers(1, 16))
    w = draw(st.integers(1, 16))
    density = draw(st.floats(0.0, 1.0))
    seed = draw(st.integers(0, 2**32 - 1))
    mask = np.random.default_rng(seed).random((h, w)) < density
    if draw(st.booleans()):  # also arbitrary masks hypothesis can shrink pixel by pixel
        mask = draw(arrays(bool, (h, w)))
    chunks = (draw(st.integers(1, h)), draw(st.integers(1, w)))
    return mask, chunks


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_masks_and_chunks(), connectivity=st.sampled_from([1, 2]))
def test_label_regions_random_masks_equal_in_memory(case, connectivity):
    """Any mask, any chunk size from 1 to the whole, 4- or 8-connected: same as skimage."""
    mask, chunks = case
    _assert_same_as_in_memory(mask, chunks, connectivity)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), connectivity=st.sampled_from([1, 2]),
       data=st.data())
def test_label_regions_irregular_chunks_equal_in_memory(seed, connectivity, data):
    """Chunks of unequal sizes (as a Dask read of a window gives) change nothing."""
    mask = np.random.default_rng(seed).random((20, 17)) < 0.45
    row_cuts = sorted(set(data.draw(st.lists(st.integers(1, 19), max_size=5))))
    col_cuts = sorted(set(data.draw(st.lists(st.integers(1, 16), max_size=5))))
    chunks = tuple(tuple(np.diff([0, *cuts, n]).tolist())
                   for cuts, n in ((row_cuts, 20), (col_cuts, 17)))
    _assert_same_as_in_memory(mask, chunks, connectivity)


@pytest.mark.parametrize("connectivity", [1, 2])
def test_label_regions_diagonal_across_a_corner(connectivity):
    """Two pixels touching only at a chunk corner are one object 8-connected, two 4-connected."""
    mask = np.zeros((4, 4), bool)
    mask[1, 1] = mask[2, 2] = True  # chunks of 2: the pixels sit in diagonal chunks
    regions = label_regions(da.from_array(mask, chunks=2), connectivity=connectivity)
    assert regions.n == (1 if connectivity == 2 else 2)
    _assert_same_as_in_memory(mask, 2, connectivity)


def test_label_regions_object_over_four_chunks_reported_once():
    """A ring around a chunk corner, spanning four chunks, is one region with its whole area."""
    mask = np.zeros((10, 10), bool)
    mask[2:8, 2:8] = True
    mask[4:6, 4:6] = False  # a hole at the corner where the four chunks meet
    regions = label_regions(da.from_array(mask, chunks=5), connectivity=2)
    assert regions.n == 1
    assert regions.area_px.tolist() == [32]
    assert regions.bbox.tolist() == [[2, 2, 8, 8]]
    _assert_same_as_in_memory(mask, 5, 2)


def test_label_regions_u_shape_merged_through_a_far_chunk():
    """Two arms that meet only in another chunk row get one label, numbered by the first arm."""
    mask = np.zeros((9, 9), bool)
    mask[0:8, 1] = mask[0:8, 7] = True  # two arms in different chunk columns
    mask[7, 1:8] = True  # joined at the bottom, in the last chunk row
    mask[0, 4] = True  # a separate dot between the arms' tops
    regions = label_regions(da.from_array(mask, chunks=3), connectivity=1)
    assert regions.n == 2
    assert regions.labels.compute()[0, 7] == 1 and regions.labels.compute()[0, 4] == 2
    _assert_same_as_in_memory(mask, 3, 1)


@pytest.mark.parametrize("chunks", [2, 7, 50])
def test_label_regions_window_equals_slice(chunks):
    """Any window read from the regions equals the in-memory labels' slice."""
    mask = np.random.default_rng(3).random((23, 31)) < 0.5
    regions = label_regions(da.from_array(mask, chunks=chunks), connectivity=2)
    expected = measure.label(mask, connectivity=2)
    for rows, cols in [(np.s_[0:23], np.s_[0:31]), (np.s_[5:6], np.s_[2:30]),
                       (np.s_[7:19], np.s_[13:14]), (np.s_[20:40], np.s_[-5:])]:
        assert_array_equal(regions.window(rows, cols), expected[rows, cols])


def test_label_regions_window_reads_only_the_chunks_it_overlaps(monkeypatch):
    """Random windows (on chunk borders, one pixel, empty, clipped at the edges) of uneven
    chunks equal the in-memory labels' slice, and only the chunks a window overlaps are read."""
    from pipeline.core.components import Regions

    rng = np.random.default_rng(8)
    mask = rng.random((61, 47)) < 0.45
    regions = label_regions(da.from_array(mask, chunks=((9, 20, 1, 31), (16, 5, 26))),
                            connectivity=2)
    expected = measure.label(mask, connectivity=2)
    rows_at, cols_at = np.cumsum([0, 9, 20, 1, 31]), np.cumsum([0, 16, 5, 26])
    read: list[tuple[int, int]] = []
    real = Regions._block

    def block(self, index):
        read.append(index)
        return real(self, index)

    monkeypatch.setattr(Regions, "_block", block)
    windows = [(np.s_[9:10], np.s_[21:22]), (np.s_[29:30], np.s_[0:47]), (np.s_[5:5], np.s_[3:9]),
               (np.s_[40:70], np.s_[-3:]), (np.s_[0:61], np.s_[0:47])]
    for _ in range(200):
        r0, c0 = int(rng.integers(0, 62)), int(rng.integers(0, 48))
        windows.append((slice(r0, r0 + int(rng.integers(0, 30))),
                        slice(c0, c0 + int(rng.integers(0, 30)))))
    for rows, cols in windows:
        read.clear()
        assert_array_equal(regions.window(rows, cols), expected[rows, cols])
        (r0, r1, _), (c0, c1, _) = rows.indices(61), cols.indices(47)
        wanted = {(i, j) for i in range(4) for j in range(3)
                  if r0 < min(r1, rows_at[i + 1]) and max(r0, rows_at[i]) < r1
                  and c0 < min(c1, cols_at[j + 1]) and max(c0, cols_at[j]) < c1}
        assert set(read) == wanted, (rows, cols)


def test_overlapping_chunks_are_the_chunks_a_range_overlaps():
    """For any range, even reaching past the borders: the chunks with a part of it, found by
    search; never an index outside the chunks (an empty range inside a chunk may give it)."""
    bounds = chunk_borders(((9, 20, 1, 31), (4,)))[0]
    assert bounds.tolist() == [0, 9, 29, 30, 61]
    for lo in range(-3, 65):
        for hi in range(lo - 2, 66):
            found = list(overlapping_chunks(bounds, lo, hi))
            wanted = [i for i in range(4) if max(lo, bounds[i]) < min(hi, bounds[i + 1])]
            assert all(0 <= i < 4 for i in found), (lo, hi)
            if hi > lo:
                assert found == wanted, (lo, hi)
            else:
                assert len(found) <= 1, (lo, hi)


def test_label_regions_relabel_maps_every_pixel():
    """relabel(values) gives values[label] per pixel, e.g. a keep-by-size mask."""
    mask = np.random.default_rng(4).random((30, 30)) < 0.5
    regions = label_regions(da.from_array(mask, chunks=8), connectivity=2)
    expected = measure.label(mask, connectivity=2)
    big = np.concatenate([[False], regions.area_px >= 5])
    assert_array_equal(regions.relabel(big).compute(), big[expected])


def test_label_regions_persist_is_applied_once_to_the_chunk_labels():
    """The persist hook receives the per-chunk labels (int32, same shape), once."""
    mask = np.random.default_rng(5).random((12, 12)) < 0.5
    seen = []

    def persist(arr):
        seen.append((arr.shape, arr.dtype))
        return arr.persist()

    regions = label_regions(da.from_array(mask, chunks=5), connectivity=2, persist=persist)
    assert seen == [((12, 12), np.dtype(np.int32))]
    assert_array_equal(regions.labels.compute(), measure.label(mask, connectivity=2))


def test_label_regions_empty_and_full():
    """No foreground: no region; all foreground: one region the size of the grid."""
    empty = label_regions(da.zeros((6, 7), bool, chunks=3))
    assert empty.n == 0
    assert_array_equal(empty.labels.compute(), np.zeros((6, 7), np.int32))
    full = label_regions(da.ones((6, 7), bool, chunks=3), connectivity=1)
    assert full.n == 1 and full.area_px.tolist() == [42]


def test_label_regions_bad_connectivity_names_the_values():
    """A connectivity other than 1 or 2 is a ValueError saying which are allowed."""
    with pytest.raises(ValueError, match="1 \\(4-connected\\) or 2"):
        label_regions(np.ones((3, 3), bool), connectivity=3)


def _select_in_memory(mask: np.ndarray, connectivity: int, lo: int, hi: int) -> np.ndarray:
    """Pixels of the components (skimage labels) whose area lies in ``lo <= area < hi``."""
    labels = measure.label(mask, connectivity=connectivity)
    area = np.bincount(labels.ravel())
    chosen = (area >= lo) & (area < hi)
    chosen[0] = False
    return chosen[labels]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_masks_and_chunks(), connectivity=st.sampled_from([1, 2]),
       lo=st.integers(0, 12), span=st.integers(1, 40))
def test_select_by_area_random_masks_equal_in_memory(case, connectivity, lo, span):
    """Any mask and chunking: the kept pixels are those of in-memory components in range."""
    mask, chunks = case
    got = select_by_area(da.from_array(mask, chunks=chunks),
                         lambda area: (area >= lo) & (area < lo + span),
                         connectivity=connectivity)
    assert got.dtype == bool and got.chunks == da.from_array(mask, chunks=chunks).chunks
    assert_array_equal(got.compute(), _select_in_memory(mask, connectivity, lo, lo + span))


def test_select_by_area_counts_an_object_over_four_chunks_once():
    """A 32-pixel ring over four chunks is kept by ``area >= 32`` and dropped by ``> 32``."""
    mask = np.zeros((10, 10), bool)
    mask[2:8, 2:8] = True
    mask[4:6, 4:6] = False
    seen = []
    kept = select_by_area(da.from_array(mask, chunks=5),
                          lambda area: seen.append(area.tolist()) or area >= 32)
    assert seen == [[32]]
    assert_array_equal(kept.compute(), mask)
    dropped = select_by_area(da.from_array(mask, chunks=5), lambda area: area > 32)
    assert not dropped.compute().any()


def test_select_by_area_persist_gets_the_chunk_labels():
    """The persist hook receives the per-chunk int32 labels once; the result is unchanged."""
    mask = np.random.default_rng(6).random((12, 12)) < 0.5
    seen = []

    def persist(arr):
        seen.append((arr.shape, arr.dtype))
        return arr.persist()

    got = select_by_area(da.from_array(mask, chunks=5), lambda area: area >= 3,
                         connectivity=1, persist=persist)
    assert seen == [((12, 12), np.dtype(np.int32))]
    assert_array_equal(got.compute(), _select_in_memory(mask, 1, 3, 10**9))
