"""Tests for pipeline.report.chipread: chip windows equal read_to_grid's values."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import numpy as np
import pytest
from _helpers import write_geotiff
from affine import Affine
from numpy.testing import assert_array_equal

from pipeline.errors import FetchError
from pipeline.fetch import local
from pipeline.fetch.local import read_to_grid
from pipeline.model import GridPlan
from pipeline.report import chipread
from pipeline.report.chipread import GridWindows

CRS = "EPSG:32645"
X0, Y0 = 600_000.0, 4_805_000.0
TILE = 16  # warp tiles of 16 px, so 70 px windows cross several


def _windows(plan: GridPlan, seed: int) -> list[tuple[int, int, int, int]]:
    """Random windows, some at the plan's edges and some of one pixel."""
    rng = np.random.default_rng(seed)
    found = [(0, 0, plan.height, plan.width), (plan.height - 1, plan.width - 1, 1, 1),
             (0, plan.width - 7, 9, 7)]
    for _ in range(12):
        r0, c0 = int(rng.integers(0, plan.height)), int(rng.integers(0, plan.width))
        found.append((r0, c0, int(rng.integers(1, plan.height - r0 + 1)),
                      int(rng.integers(1, plan.width - c0 + 1))))
    return found


def _source(tmp_path: Path, kind: str) -> Path:
    """An input the plan reads directly (uint8, nodata 0, partly off the plan; or float32
    with inf), or one it warps (another resolution and origin)."""
    rng = np.random.default_rng(3)
    if kind == "aligned uint8":
        data = rng.integers(0, 256, (3, 50, 60)).astype(np.uint8)
        data[:, :4, :] = 0  # nodata rows
        return write_geotiff(tmp_path / "a.tif", data, transform=Affine(
            10, 0, X0 + 30, 0, -10, Y0 - 20), nodata=0)
    data = rng.uniform(0, 1000, (3, 64, 61)).astype(np.float32)
    data[0, 5, 5], data[2, 9, 30] = np.inf, -np.inf
    if kind == "aligned float32":
        return write_geotiff(tmp_path / "f.tif", data, transform=Affine(
            10, 0, X0 - 40, 0, -10, Y0 + 30), nodata=None)
    return write_geotiff(tmp_path / "w.tif", data, transform=Affine(
        7.3, 0, X0 - 13.1, 0, -7.3, Y0 + 6.4), nodata=None)


@pytest.mark.parametrize("kind", ["aligned uint8", "aligned float32", "warped float32"])
@pytest.mark.parametrize("resampling", ["bilinear", "nearest"])
def test_windows_equal_read_to_grid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str,
                                    resampling: str) -> None:
    """Every window holds read_to_grid's values (NaN nodata, Inf as NaN), whatever the tile
    cache keeps, and the warped source is really warped."""
    monkeypatch.setattr(local, "WARP_TILE_PX", TILE)
    monkeypatch.setattr(chipread, "WARP_TILE_PX", TILE)
    monkeypatch.setattr(chipread, "TILE_CACHE", 3)  # tiles evicted and warped again
    path = _source(tmp_path, kind)
    plan = GridPlan(CRS, (X0, Y0 - 70 * 10.0, X0 + 75 * 10.0, Y0), 10.0)
    whole = read_to_grid(path, plan, role="before", acquired=date(2017, 3, 2),
                         resampling=resampling)[0].values
    assert np.isnan(whole).any() and np.isfinite(whole).any()
    with GridWindows(path, plan, resampling=resampling) as reader:
        assert (reader._offset is None) == kind.startswith("warped")
        for r0, c0, rows, cols in _windows(plan, seed=len(kind)):
            got = reader.read((r0, c0, rows, cols))
            assert got.dtype == np.float32 and got.shape == (3, rows, cols)
            assert_array_equal(got, whole[:, r0:r0 + rows, c0:c0 + cols])
        assert len(reader._tiles) <= 3


def test_unreadable_input_is_a_fetch_error(tmp_path: Path) -> None:
    """A file that is not a raster fails at opening with the fetcher's message."""
    path = tmp_path / "x.tif"
    path.write_bytes(b"not a tiff")
    plan = GridPlan(CRS, (X0, Y0 - 100.0, X0 + 100.0, Y0), 10.0)
    with pytest.raises(FetchError, match="not a raster"):
        GridWindows(path, plan)
