"""greedy_hough (cells, alive mask, sparse vote withdrawal) against the straightforward greedy
Hough it replaced: every pixel measured against every taken line, the remaining pixels
compacted, one dense vote array. The runs must be identical, in the same order, to the bit.
Likewise collinear_groups (pairs measured in batches) and merge_collinear against the
segment-by-segment sweep."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import sparse
from scipy.sparse import csgraph
from skimage import draw

from pipeline.detect.lines import (
    _THETA,
    _Accumulator,
    _Cells,
    _fuse,
    _read_runs,
    _vote_index,
    collinear_groups,
    greedy_hough,
    merge_collinear,
)


def reference_hough(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int], *,
                    min_px: float, near_px: float, gap_px: float, max_lines: int = 3000
                    ) -> tuple[list[tuple[float, float, float, float]], int]:
    """The greedy Hough as first written; also how many lines took the nearest-pixel
    fallback (no pixel within ``near_px``)."""
    offset = int(math.ceil(math.hypot(*shape)))
    votes = np.zeros((2 * offset + 1) * len(_THETA), np.int64)
    np.add.at(votes, _vote_index(np.asarray(rows), np.asarray(cols), offset), 1)
    rows, cols = np.asarray(rows), np.asarray(cols)
    runs: list[tuple[float, float, float, float]] = []
    fallbacks = 0
    for _ in range(max_lines):
        best = int(np.argmax(votes))
        if votes[best] < max(5.0, min_px / 2):
            break
        k_rho, k_theta = divmod(best, len(_THETA))
        cos, sin = math.cos(_THETA[k_theta]), math.sin(_THETA[k_theta])
        dist = np.abs(cols * cos + rows * sin - (k_rho - offset))
        close = dist <= near_px
        if not close.any():
            close = dist <= dist.min()
            fallbacks += 1
        runs += _read_runs(rows[close], cols[close], (cos, sin), gap_px=gap_px, min_px=min_px)
        np.subtract.at(votes, _vote_index(rows[close], cols[close], offset), 1)
        rows, cols = rows[~close], cols[~close]
        if not len(rows):
            break
    return runs, fallbacks


def _lines(rng: np.random.Generator, shape: tuple[int, int], n: int) -> np.ndarray:
    image = np.zeros(shape, bool)
    for _ in range(n):
        r0, r1 = rng.integers(0, shape[0], 2)
        c0, c1 = rng.integers(0, shape[1], 2)
        image[draw.line(int(r0), int(c0), int(r1), int(c1))] = True
    return image


def _grid(shape: tuple[int, int], step: int) -> np.ndarray:
    image = np.zeros(shape, bool)
    image[::step, :] = True
    image[:, ::step] = True
    return image


def _shapes(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    image = np.zeros(shape, bool)
    for _ in range(6):
        r, c = (int(rng.integers(20, s - 20)) for s in shape)
        size = int(rng.integers(5, 18))
        image[draw.circle_perimeter(r, c, size, shape=shape)] = True
        rr, cc = draw.polygon_perimeter([r - size, r - size // 2, r + size, r + 3],
                                        [c, c + size, c + size // 3, c - size], shape=shape)
        image[rr, cc] = True
    for r0 in (5, 8, 10):  # parallel lines closer than near_px: one steals the other's pixels
        image[draw.line(r0, 3, r0 + 40, shape[1] - 3)] = True
    return image


def _noise(rng: np.random.Generator, shape: tuple[int, int], share: float) -> np.ndarray:
    return rng.random(shape) < share


def _cases() -> list[tuple[str, np.ndarray, np.ndarray, tuple[int, int]]]:
    """``(name, rows, cols, shape)`` pixel sets: lines, grids, shapes, noise and mixtures."""
    rng = np.random.default_rng(7)
    out = []
    for shape in [(120, 170), (257, 301), (64, 400)]:
        images = {
            "lines": _lines(rng, shape, 12),
            "grid": _grid(shape, 12),
            "shapes": _shapes(rng, shape),
            "noise": _noise(rng, shape, 0.02),
            "mixed": _lines(rng, shape, 8) | _noise(rng, shape, 0.01) | _grid(shape, 37),
        }
        for name, image in images.items():
            rows, cols = np.nonzero(image)
            out.append((f"{name}{shape}", rows.astype(np.float64), cols.astype(np.float64),
                        shape))
    # Shuffled pixel order (the order reaches _read_runs' sort and fit), and pixels off the
    # integer lattice.
    rows, cols = np.nonzero(_lines(rng, (200, 200), 10) | _noise(rng, (200, 200), 0.01))
    perm = rng.permutation(len(rows))
    out.append(("shuffled", rows[perm].astype(np.float64), cols[perm].astype(np.float64),
                (200, 200)))
    pts = rng.random((600, 2)) * [150, 220]
    t = rng.random(400) * 200
    line = np.column_stack([20 + 0.5 * t + rng.normal(0, 0.4, 400), 10 + t])
    pts = np.vstack([pts, line])
    out.append(("floats", pts[:, 0], pts[:, 1], (150, 220)))
    # A few pixels far apart in a large scene (many empty cells); one pixel; none.
    out.append(("sparse", np.array([5.0, 6.0, 7.0, 8.0, 9.0, 3000.0, 3001.0, 3002.0]),
                np.array([5.0, 5.0, 5.0, 5.0, 5.0, 4000.0, 4001.0, 4002.0]), (3500, 4500)))
    out.append(("single", np.array([3.0]), np.array([4.0]), (10, 10)))
    out.append(("empty", np.zeros(0), np.zeros(0), (10, 10)))
    return out


CASES = _cases()
PARAMS = [(1.5, 3.0, 10.0), (0.3, 2.0, 6.0), (3.0, 1.0, 20.0), (1.0, 10.0, 4.0),
          (40.0, 5.0, 10.0)]  # (near_px, gap_px, min_px)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_greedy_hough_equals_reference(case) -> None:
    _, rows, cols, shape = case
    for near_px, gap_px, min_px in PARAMS:
        got = greedy_hough(rows, cols, shape, min_px=min_px, near_px=near_px, gap_px=gap_px)
        want, _ = reference_hough(rows, cols, shape, min_px=min_px, near_px=near_px,
                                  gap_px=gap_px)
        assert got == want, (near_px, gap_px, min_px)


def test_greedy_hough_equals_reference_when_max_lines_is_reached() -> None:
    rng = np.random.default_rng(3)
    rows, cols = np.nonzero(_lines(rng, (300, 300), 40))
    rows, cols = rows.astype(np.float64), cols.astype(np.float64)
    full, _ = reference_hough(rows, cols, (300, 300), min_px=10, near_px=1.5, gap_px=3)
    for max_lines in (1, 5, 17):
        got = greedy_hough(rows, cols, (300, 300), min_px=10, near_px=1.5, gap_px=3,
                           max_lines=max_lines)
        want, _ = reference_hough(rows, cols, (300, 300), min_px=10, near_px=1.5, gap_px=3,
                                  max_lines=max_lines)
        assert got == want
        assert len(got) < len(full)  # the bound did stop the search


def test_the_cases_take_the_nearest_pixel_fallback() -> None:
    """The rare branch (no pixel within near_px of the best line) is among those compared."""
    fallbacks = sum(reference_hough(rows, cols, shape, min_px=6.0, near_px=0.3, gap_px=2.0)[1]
                    for _, rows, cols, shape in CASES)
    assert fallbacks > 0


def test_cells_list_every_pixel_within_reach() -> None:
    rng = np.random.default_rng(5)
    rows, cols = rng.random(5000) * 700, rng.random(5000) * 500
    cells = _Cells(rows, cols, cell_px=32)
    for _ in range(200):
        theta = rng.uniform(-np.pi / 2, np.pi / 2)
        rho = rng.uniform(-200, 900)
        reach = float(rng.choice([0.5, 1.5, 7.0, 60.0]))
        cos, sin = math.cos(theta), math.sin(theta)
        near = cells.near(cos, sin, rho, reach_px=reach)
        assert len(np.unique(near)) == len(near)  # no pixel listed twice
        within = np.flatnonzero(np.abs(cols * cos + rows * sin - rho) <= reach)
        assert np.isin(within, near).all()
        assert len(near) < len(rows) or reach == 60.0  # the cells do narrow the search


@pytest.mark.parametrize("spread", [50, 10 * _Accumulator.BLOCK])
def test_accumulator_dense_and_sparse_updates_match_numpy(spread: int) -> None:
    """Votes packed in a short range (counted over it) or spread wide (cell by cell); the
    block bounds stay above the votes, and ties go to the first index, as numpy's."""
    rng = np.random.default_rng(spread)
    acc = _Accumulator(12 * _Accumulator.BLOCK + 7)
    dense = np.zeros(acc.size, np.int64)
    for step in range(200):
        start = int(rng.integers(0, acc.size - spread))
        index = start + rng.integers(0, spread, int(rng.integers(1, 300)))
        if step % 7 == 0:  # ties across blocks: the same count in a later and an earlier one
            index = np.concatenate([index, [acc.size - 1] * 3, [start] * 3])
        if step % 2 == 1:  # withdraw a part of the votes cast
            cast = np.repeat(np.flatnonzero(dense), dense[dense > 0])
            index = rng.permutation(cast)[: int(rng.integers(0, len(cast) + 1))]
            acc.add(index, sign=-1)
            np.subtract.at(dense, index, 1)
        else:
            acc.add(index)
            np.add.at(dense, index, 1)
        np.testing.assert_array_equal(acc.values, dense)
        blocks = np.pad(dense, (0, len(acc.padded) - acc.size), constant_values=-1)
        assert (acc.bound >= blocks.reshape(-1, _Accumulator.BLOCK).max(axis=1)).all()
        assert acc.argmax() == int(np.argmax(dense))


@pytest.mark.parametrize("dtype", [np.float64, np.int64])
def test_accumulator_of_pixels_counts_the_vote_index_cells(dtype) -> None:
    rng = np.random.default_rng(9)
    rows = (rng.random(3000) * 90).astype(dtype)
    cols = (rng.random(3000) * 130).astype(dtype)
    offset = int(math.ceil(math.hypot(90, 130)))
    acc = _Accumulator.of_pixels(rows, cols, offset)
    dense = np.zeros(acc.size, np.int64)
    np.add.at(dense, _vote_index(rows, cols, offset), 1)
    np.testing.assert_array_equal(acc.values, dense)
    blocks = np.pad(dense, (0, len(acc.padded) - acc.size), constant_values=-1)
    assert (acc.bound >= blocks.reshape(-1, _Accumulator.BLOCK).max(axis=1)).all()
    assert acc.argmax() == int(np.argmax(dense))


def reference_groups(segs: np.ndarray, *, angle_tol_deg: float, offset_m: float,
                     gap_m: float) -> np.ndarray:
    """collinear_groups as first written: one segment's similar-direction pairs at a time."""
    segs = np.asarray(segs, dtype=np.float64).reshape(-1, 4)
    n = len(segs)
    d = segs[:, 2:] - segs[:, :2]
    length = np.hypot(d[:, 0], d[:, 1])
    u = d / np.maximum(length, 1e-9)[:, None]
    mid = (segs[:, :2] + segs[:, 2:]) / 2
    angle = np.degrees(np.arctan2(u[:, 1], u[:, 0])) % 180.0
    order = np.argsort(angle)
    ext = np.concatenate([order, order[angle[order] < angle_tol_deg]])
    ext_angle = np.concatenate([angle[order], angle[order][angle[order] < angle_tol_deg] + 180])
    pairs_i, pairs_j = [], []
    for k, i in enumerate(order):
        hi = np.searchsorted(ext_angle, angle[i] + angle_tol_deg, side="right")
        j = ext[k + 1:hi]
        if len(j) == 0:
            continue
        rel = mid[j] - mid[i]
        perp_i = np.abs(rel[:, 0] * u[i, 1] - rel[:, 1] * u[i, 0])
        perp_j = np.abs(rel[:, 0] * u[j, 1] - rel[:, 1] * u[j, 0])
        along = np.abs(rel @ u[i])
        gap = along - (length[i] + length[j]) / 2
        ok = (np.maximum(perp_i, perp_j) <= offset_m) & (gap <= gap_m)
        pairs_i.append(np.full(int(ok.sum()), i))
        pairs_j.append(j[ok])
    if not pairs_i:
        return np.arange(n)
    ii, jj = np.concatenate(pairs_i), np.concatenate(pairs_j)
    link = sparse.coo_matrix((np.ones(len(ii)), (ii, jj)), shape=(n, n))
    return csgraph.connected_components(link, directed=False)[1]


def reference_merge(segs: np.ndarray, **kw: float) -> np.ndarray:
    """merge_collinear as first written (groups picked out with a mask each)."""
    segs = np.asarray(segs, dtype=np.float64).reshape(-1, 4)
    for _ in range(5):
        if len(segs) < 2:
            return segs
        labels = reference_groups(segs, **kw)
        n_groups = int(labels.max()) + 1
        if n_groups == len(segs):
            return segs
        segs = np.array([_fuse(segs[labels == k]) for k in range(n_groups)])
    return segs


def _segment_sets() -> list[np.ndarray]:
    """Random segments, collinear pieces, a lattice of pieces whose gaps equal gap_m exactly
    (ties decided by the last bits), UTM-sized coordinates, and none."""
    rng = np.random.default_rng(21)
    out = [np.zeros((0, 4))]
    for scale in (10.0, 300.0, 5000.0):
        out.append(rng.random((120, 4)) * scale)
    for angle in (0.0, 0.02, 1.5707, 3.1):
        t = np.sort(rng.random((90, 2)) * 400, axis=1)
        side = rng.normal(0, 1.0, (90, 1)) * [-math.sin(angle), math.cos(angle)]
        u = np.array([math.cos(angle), math.sin(angle)])
        out.append(np.hstack([t[:, :1] * u + side, t[:, 1:] * u + side]))
    lattice = [(x, y, x + 10.0, y) for x in range(0, 200, 20) for y in range(0, 30, 3)]
    lattice += [(x, y, x, y + 10.0) for x in range(0, 30, 2) for y in range(0, 200, 20)]
    out.append(np.array(lattice, float))
    out.append(np.array(lattice, float) * 0.5 + [500000.5, 4800000.5, 500000.5, 4800000.5])
    return out


SEGMENT_SETS = _segment_sets()


@pytest.mark.parametrize("k", range(len(SEGMENT_SETS)))
def test_collinear_groups_and_merge_equal_reference(k: int, monkeypatch) -> None:
    segs = SEGMENT_SETS[k]
    for tol, offset, gap in [(3.0, 2.0, 10.0), (10.0, 5.0, 1e9), (1.0, 0.5, 0.0), (3.0, 1.5, 5.0)]:
        kw = {"angle_tol_deg": tol, "offset_m": offset, "gap_m": gap}
        want = reference_groups(segs, **kw)
        for batch in (1 << 18, 7):  # one batch, and many (a position's pairs never split)
            monkeypatch.setattr("pipeline.detect.lines._PAIR_BATCH", batch)
            got = collinear_groups(segs, **kw)
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)
        merged, expected = merge_collinear(segs, **kw), reference_merge(segs, **kw)
        assert merged.shape == expected.shape
        assert merged.tobytes() == expected.tobytes()
