"""Tests for pipeline.report.jsontext: the same text as json.dumps(indent=2), or its errors."""

from __future__ import annotations

import json
import math
from decimal import Decimal

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.report.jsontext import dumps_indented
from pipeline.report.validate import _decimals


def _reference(obj: object) -> str:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, indent=2)


_SCALARS = (st.none() | st.booleans() | st.integers()
            | st.floats(allow_nan=False, allow_infinity=False) | st.text())
_POSITION = st.lists(st.floats(-180, 180, allow_nan=False), min_size=2, max_size=2)
_JSON = st.recursive(
    _SCALARS | _POSITION | st.lists(_POSITION, max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(_JSON)
def test_dumps_indented_equals_json_dumps(obj):
    """Any JSON-like value (rings of positions included) gets json.dumps' indented text."""
    assert dumps_indented(obj) == _reference(obj)


def test_dumps_indented_geojson_shapes():
    """Features with rings, lines, points, tuples, nested params and Unicode: same text."""
    ring = [[88.2, 43.3], [88.3, 43.3], [88.3, 43.4], [88.2, 43.3]]
    fc = {"type": "FeatureCollection", "bbox": [88.2, 43.3, 88.3, 43.4], "features": [
        {"type": "Feature", "id": "c-1", "geometry": {"type": "Polygon", "coordinates": [ring]},
         "properties": {"name": "Dabanch\u00e9ng \u201cX\u201d", "score": 0.5, "n": 3,
                        "ok": True, "none": None, "params": {"a": (1, 2.5), "b": {}},
                        "empty": []}},
        {"type": "Feature", "id": "w-1",
         "geometry": {"type": "LineString", "coordinates": ring[:2]}, "properties": {}},
        {"type": "Feature", "id": "t-1",
         "geometry": {"type": "Point", "coordinates": [88.25, 43.35]},
         "properties": {"np": np.float64(1e-07), "big": 1.5e16}},
    ]}
    assert dumps_indented(fc) == _reference(fc)


def test_dumps_indented_leaves_other_keys_to_json():
    """Keys json converts (numbers, booleans, None) give json's text."""
    obj = {1: "a", 2.5: [1.0, 2.0], False: None, None: {}}
    assert dumps_indented(obj) == _reference(obj)


@pytest.mark.parametrize("bad", [math.nan, math.inf, [1.0, -math.inf]])
def test_dumps_indented_refuses_non_finite(bad):
    """NaN and infinity raise json's ValueError, as allow_nan=False does."""
    with pytest.raises(ValueError, match="not JSON compliant"):
        dumps_indented({"x": bad})


def test_dumps_indented_refuses_other_objects():
    """An object JSON cannot hold raises json's TypeError."""
    with pytest.raises(TypeError, match="not JSON serializable"):
        dumps_indented({"x": object()})


@settings(max_examples=500, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False) | st.integers())
def test_decimals_equals_decimal_exponent(value):
    """The decimals of a number's repr equal those Decimal reads from it (exponents too)."""
    expected = 0 if isinstance(value, int) else max(0, -Decimal(repr(value)).as_tuple().exponent)
    assert _decimals(value) == expected
