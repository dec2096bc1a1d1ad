"""The NumPy fast paths of the GeoJSON writer and validator give the point-by-point results."""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from shapely.geometry import (
    GeometryCollection,
    LineString,
    MultiPolygon,
    Point,
    Polygon,
    mapping,
)

from pipeline.report import geojson, validate
from pipeline.report.validate import _decimals, validate_geojson

SQUARE = [(88.0, 43.0), (88.001, 43.0), (88.001, 43.001), (88.0, 43.001), (88.0, 43.0)]
HOLE = [(88.0002, 43.0002), (88.0002, 43.0004), (88.0004, 43.0004), (88.0004, 43.0002)]


@pytest.mark.parametrize("geom", [
    Polygon(SQUARE, [HOLE]),
    MultiPolygon([Polygon(SQUARE), Polygon([(x + 0.01, y) for x, y in SQUARE])]),
    LineString(SQUARE[:3]),
    LineString([(88.0, 43.0, 5.0), (88.1, 43.1, 6.0)]),
    Point(88.1, 43.2),
    GeometryCollection([Point(88.1, 43.2), LineString(SQUARE[:2])]),
])
def test_geometry_dict_equals_mapping(geom: Any) -> None:
    """Coordinates converted by NumPy: the same lists of floats, in the same order and text."""
    fast = geojson._geometry_dict(geom)
    slow = geojson._to_lists(mapping(geom))
    assert fast == slow and json.dumps(fast) == json.dumps(slow)


def test_rounding_test_matches_repr_decimals() -> None:
    """``round(v, m) == v`` exactly when the repr of ``v`` has at most ``m`` decimals (m >= 1;
    ``repr(2.0)`` has one decimal, so m = 0 is left to the position-by-position test)."""
    rng = np.random.default_rng(7)
    values = [0.1 + 0.2, 1e-5, 1e-7, 1.5e-7, -0.0, 180.0, -179.9999999, 88.28994, 43.38385]
    for decimals in range(0, 10):
        values += [round(float(v), decimals) for v in rng.uniform(-180, 180, 300)]
    values += [float(v) for v in rng.uniform(-180, 180, 300)]
    for m in range(1, 8):
        for v in values:
            assert (float(np.round(v, m)) == v) == (_decimals(v) <= m), (v, m)


def _collection(coords: list[Any], gtype: str) -> dict[str, Any]:
    return {"type": "FeatureCollection", "features": [
        {"type": "Feature", "id": "a", "properties": {},
         "geometry": {"type": gtype, "coordinates": coords}}]}


_NUMBER = st.one_of(
    st.floats(-200, 200), st.sampled_from([float("nan"), float("inf"), -float("inf")]),
    st.floats(-180, 180).map(lambda v: round(v, 7)),
    st.integers(-200, 200), st.booleans(), st.just("1.5"),
)
_POSITION = st.lists(_NUMBER, min_size=1, max_size=4)


@settings(max_examples=300, deadline=None)
@given(rings=st.lists(st.lists(_POSITION, min_size=0, max_size=7), min_size=1, max_size=3),
       clean=st.booleans(), max_decimals=st.integers(0, 8), seed=st.integers(0, 1 << 30))
def test_validator_fast_paths_give_the_slow_answer(rings: list[Any], clean: bool,
                                                  max_decimals: int, seed: int) -> None:
    """Valid or not (ints, bools, strings, NaN, out of range, too many decimals, short or long
    positions): the same (ok, errors, warnings) as with the fast paths switched off."""
    if clean:  # well-formed rings of rounded floats, which take the fast paths
        rng = random.Random(seed)
        rings = [[[round(rng.uniform(-180, 180), 7), round(rng.uniform(-90, 90), 7)]
                  for _ in range(len(r) + 3)] for r in rings]
        for ring in rings:
            ring.append(list(ring[0]))
    for gtype, coords in (("Polygon", rings), ("LineString", rings[0]),
                          ("MultiPolygon", [rings])):
        fc = _collection(coords, gtype)
        fast = validate_geojson(fc, max_decimals=max_decimals)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(validate, "_all_fine", lambda *a: False)
            mp.setattr(validate, "_are_float_positions", lambda *a: False)
            slow = validate_geojson(fc, max_decimals=max_decimals)
        assert fast == slow


@pytest.mark.parametrize(("gtype", "coords"), [
    ("Polygon", [[[88, 43], [88.5, 43, 7.0], [88.5, 43.5, 1, 2], [88, 43]],
                 [[88.1, 43.1], [88.1, 43.2], [88.2, 43.2], [88.1, 43.1]]]),
    ("MultiPolygon", [[[[0, 0], [1, 0], [1, 1], [0, 0]]], [[[2, 2], [3, 2], [3, 3.5], [2, 2]]]]),
    ("LineString", [[1, 2], [3.25, 4, 5], [6, 7]]),
    ("MultiLineString", [[[1, 2], [3, 4]], [[5, 6], [7, 8.5]]]),
    ("Point", [1.5, 2, 3]),
])
def test_truncated_coordinates_give_the_same_geometry(gtype: str, coords: Any) -> None:
    """Rings and lines handed to shapely as float arrays: the geometry the nested lists of
    [x, y] give (ints, 3 and 4 elements per position, holes)."""
    from shapely.geometry import shape

    depth = validate._POSITION_DEPTH[gtype]

    def as_lists(c: Any, d: int) -> Any:
        return list(c[:2]) if d == 0 else [as_lists(x, d - 1) for x in c]

    fast = shape({"type": gtype, "coordinates": validate._truncate(coords, depth)})
    slow = shape({"type": gtype, "coordinates": as_lists(coords, depth)})
    assert fast.equals_exact(slow, 0) and fast.wkb == slow.wkb
