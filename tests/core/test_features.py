"""Tests for pipeline.core.features: shape, names, NaN handling, radiometric invariance."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose

from pipeline.core.features import FEATURE_NAMES, N_FEATURES, feature_stack, pixel_features
from pipeline.testing import make_pair


def _pair(**kw):
    before, after = make_pair(shape=(48, 40), change=np.s_[10:22, 12:26], noise=2.0, **kw)
    return before.values, after.values


def test_pixel_features_shape_dtype_names():
    """One float32 plane per named feature, finite everywhere without nodata."""
    before, after = _pair()
    feats = pixel_features(before, after)
    assert feats.shape == (N_FEATURES, 48, 40) and feats.dtype == np.float32
    assert len(set(FEATURE_NAMES)) == N_FEATURES
    assert np.isfinite(feats).all()


def test_pixel_features_nan_where_either_date_is_nodata():
    """Nodata in either date gives NaN in every feature there, finite values elsewhere."""
    before, after = _pair(nodata_frac=0.2)
    feats = pixel_features(before, after)
    invalid = ~(np.isfinite(before).all(axis=0) & np.isfinite(after).all(axis=0))
    assert invalid.any()
    assert np.isnan(feats[:, invalid]).all()
    assert np.isfinite(feats[:, ~invalid]).all()


def test_pixel_features_invariant_to_gain_and_offset():
    """Each date is stretched on its own, so a gain and offset of one date change nothing."""
    before, after = _pair()
    assert_allclose(pixel_features(before, after * 1.7 + 12.0), pixel_features(before, after),
                    atol=2e-3)


def test_pixel_features_change_features_light_up_on_change():
    """The colour-change length is larger inside the changed block than outside."""
    before, after = _pair()
    cva = pixel_features(before, after)[FEATURE_NAMES.index("cva_s2")]
    assert cva[12:20, 14:24].mean() > 3 * cva[30:, :].mean()


def test_pixel_features_wrong_shape_raises():
    """Anything but two (3, y, x) arrays of one shape is a ValueError naming the fix."""
    before, after = _pair()
    with pytest.raises(ValueError, match="red, green and blue"):
        pixel_features(before[:2], after[:2])
    with pytest.raises(ValueError, match="same shape|one shape"):
        pixel_features(before, after[:, :20])


def test_feature_stack_keeps_grid():
    """The DataArray wrapper names the features and keeps x/y and the CRS."""
    before, after = make_pair(shape=(32, 32))
    stack = feature_stack(before, after)
    assert stack.dims == ("feature", "y", "x")
    assert list(stack["feature"].values) == list(FEATURE_NAMES)
    assert stack.rio.crs == before.rio.crs
    assert_allclose(stack.x.values, before.x.values)
