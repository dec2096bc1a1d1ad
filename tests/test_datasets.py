"""Tests for pipeline.datasets: LEVIR-CD names, tile rows and the shared-data readers."""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import SHARED_DATA

from pipeline.datasets import (
    IGNORE,
    levir_crop_origin,
    read_levir_crops,
    read_levir_tiles,
    read_nanjing,
    read_png_pairs,
)


def test_levir_crop_origin_parses_and_refuses():
    """'<split>_<tile>_<row>_<col>' gives the tile and origin; other names are refused."""
    assert levir_crop_origin("test_2_0000_0512") == ("test_2", 0, 512)
    with pytest.raises(ValueError, match="not a LEVIR-CD crop name"):
        levir_crop_origin("levircd_test_2_r0256")


def test_read_png_pairs_missing_folder(tmp_path):
    """An empty folder is a clear error naming it."""
    (tmp_path / "A").mkdir()
    with pytest.raises(FileNotFoundError, match="No pairs found"):
        list(read_png_pairs(tmp_path, "levir_cd", 0.5))


@pytest.fixture(scope="module")
def levir():
    """The real LEVIR-CD crops and tiles."""
    if not (SHARED_DATA / "levir_cd").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return read_levir_crops(SHARED_DATA), read_levir_tiles(SHARED_DATA)


def test_real_levir_groups_rows_and_labels(levir):
    """Crops and tiles carry their LEVIR-CD tile as group; test_2's file starts at row 256;
    labels are 0/1 and images float32 RGB of the label's shape."""
    crops, tiles = levir
    assert len(crops) == 9 and len(tiles) == 5
    assert {c.group for c in crops if c.name.startswith("test_2_")} == {"test_2"}
    rows0 = {t.name: t.extra["row0"] for t in tiles}
    assert rows0["levircd_test_2_r0256"] == 256 and rows0["levircd_test_1"] == 0
    assert {t.group for t in tiles} == {"test_1", "test_2", "test_3", "test_4", "test_5"}
    for p in crops + tiles:
        assert p.before.dtype == np.float32 and p.before.shape == (3, *p.label.shape)
        assert set(np.unique(p.label)) <= {0, 1}


def test_real_nanjing_reference_is_sparse():
    """Nanjing's reference has change, no-change and ignored pixels; RGB picks TM 3-2-1."""
    if not (SHARED_DATA / "landsat_nanjing").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    (pair,) = read_nanjing(SHARED_DATA)
    values = set(np.unique(pair.label))
    assert values == {0, 1, IGNORE} and pair.before.shape[0] == 6 and pair.rgb == (2, 1, 0)
