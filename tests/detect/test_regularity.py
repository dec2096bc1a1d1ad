"""Tests for pipeline.detect.regularity: rows of like blocks, size and orientation spread."""

from __future__ import annotations

import pytest
import shapely
from _scenes import background
from shapely import affinity

from pipeline.detect.regularity import building_layout
from pipeline.testing import make_walled_compound


def _block(x: float, y: float, length: float = 30.0, width: float = 12.0,
           angle: float = 0.0) -> shapely.Polygon:
    box = shapely.box(x - length / 2, y - width / 2, x + length / 2, y + width / 2)
    return affinity.rotate(box, angle, origin=(x, y))


def _grid(rows: int, cols: int, *, angle: float = 0.0, gap: float = 10.0
          ) -> list[shapely.Polygon]:
    blocks = [_block(c * (30.0 + gap), r * (12.0 + gap)) for r in range(rows)
              for c in range(cols)]
    return [affinity.rotate(b, angle, origin=(0, 0)) for b in blocks]


@pytest.mark.parametrize("angle", [0.0, 22.0, 90.0, 135.0])
def test_a_grid_of_like_blocks_is_rows_and_columns(angle):
    """3 rows of 4 like blocks, at any orientation: 3 rows and 4 columns, all in rows."""
    m = building_layout(_grid(3, 4, angle=angle))
    assert m["building_rows"] == 7
    assert m["buildings_in_rows_share"] == 1.0
    assert m["building_size_cv"] == pytest.approx(0.0, abs=1e-9)
    assert m["building_orientation_spread_deg"] == pytest.approx(0.0, abs=1e-3)


def test_an_unlike_block_is_not_in_its_row():
    """A block twice the size of the others in a grid is in no row; its row of three like
    blocks still counts, its column of two does not."""
    blocks = _grid(3, 4)
    blocks[5] = affinity.scale(blocks[5], 1.5, 1.4)  # row 1, column 1
    m = building_layout(blocks)
    assert m["buildings_in_rows_share"] == pytest.approx(11 / 12)
    assert m["building_rows"] == 6  # 3 rows, and 3 of the 4 columns
    assert m["building_size_cv"] > 0.1


def test_scattered_or_turned_blocks_are_not_rows():
    """Like blocks turned every way, and aligned like blocks far apart, are not rows."""
    turned = [_block(40.0 * i, 0.0, angle=37.0 * i) for i in range(8)]
    m = building_layout(turned)
    assert m["building_rows"] == 0 and m["buildings_in_rows_share"] == 0.0
    assert m["building_orientation_spread_deg"] > 30
    apart = [_block(200.0 * i, 0.0) for i in range(5)]  # 170 m between neighbours
    assert building_layout(apart)["building_rows"] == 0
    apart = [_block(0.0, 75.0 * i) for i in range(5)]  # side by side, 63 m between
    assert building_layout(apart)["building_rows"] == 0
    close = [_block(45.0 * i, 0.0) for i in range(5)]  # 15 m between neighbours
    assert building_layout(close)["building_rows"] == 1
    yards = [_block(0.0, 40.0 * i) for i in range(5)]  # side by side, 28 m yards between
    assert building_layout(yards)["building_rows"] == 1


def test_too_few_blocks_and_none():
    """Two like blocks are no row (three make one, by default); no block gives no spread."""
    assert building_layout(_grid(1, 2))["building_rows"] == 0
    assert building_layout(_grid(1, 3))["building_rows"] == 1
    assert building_layout(_grid(1, 2), min_in_row=2)["building_rows"] == 1
    m = building_layout([])
    assert m == {"building_rows": 0, "buildings_in_rows_share": 0.0, "building_size_cv": None,
                 "building_orientation_spread_deg": None}


def test_the_synthetic_compound_blocks_are_rows():
    """The dormitory blocks of a synthetic compound turned 20 degrees: 3 rows of 4 are 3
    rows and 4 columns; 2 rows of 3 are 2 rows (a column of 2 is no row)."""
    for layout, rows in (((3, 4), 7), ((2, 3), 2)):
        _, _, truth = make_walled_compound(background("synthetic", 1.0), res_m=1.0,
                                           buildings=layout, angle_deg=20.0)
        m = building_layout(truth.buildings)
        assert m["building_rows"] == rows and m["buildings_in_rows_share"] == 1.0
