"""Tests for pipeline.detect.learned and the shipped model (pipeline.models)."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from pipeline.core.features import FEATURE_NAMES
from pipeline.datasets import LEVIR_TILE_FOLDS
from pipeline.detect.learned import change_probability_mask, predict_change
from pipeline.models import DEFAULT_MODEL_PATH, ChangeModel, load_fold_models, load_model
from pipeline.testing import make_pair


@pytest.fixture(scope="module")
def model():
    """The model shipped in models/."""
    return load_model()


def test_shipped_models_are_small_and_match_features(model):
    """The shipped model and its four fold models are under 5 MB together, were trained on today's
    feature list, and each fold is trained on a subset of the shipped model's images."""
    folds = load_fold_models(model)
    assert set(folds) == set(LEVIR_TILE_FOLDS)
    size = sum((DEFAULT_MODEL_PATH.parent / m.card["model_file"]).stat().st_size
               for m in (model, *folds.values()))
    assert size < 5 * 1024 * 1024
    for m in (model, *folds.values()):
        assert m.feature_names == FEATURE_NAMES
        assert 0.0 < m.threshold < 1.0
        assert set(m.card["trained_on"]) <= set(model.card["trained_on"])


def test_min_area_at_converts_square_metres():
    """A minimum area in m2 becomes pixels at the image's resolution; px is the fallback."""
    m = ChangeModel(booster=None, feature_names=(), threshold=0.5, min_area_px=7,
                    min_area_m2=10.0)
    assert m.min_area_at(0.5) == 40 and m.min_area_at(1.0) == 10 and m.min_area_at(10.0) == 1
    assert dataclasses.replace(m, min_area_m2=0.0).min_area_at(0.5) == 7


def test_predict_change_probability_map(model):
    """A probability map of the input's (y, x) shape, float32, in [0, 1], NaN at nodata."""
    before, after = make_pair(shape=(40, 56), nodata_frac=0.1, noise=2.0)
    prob = predict_change(before, after, model=model)
    assert prob.shape == (40, 56) and prob.dtype == np.float32
    valid = np.isfinite(before.values).all(axis=0) & np.isfinite(after.values).all(axis=0)
    assert np.isnan(prob[~valid]).all()
    assert ((prob[valid] >= 0) & (prob[valid] <= 1)).all()
    assert_array_equal(predict_change(before.values, after.values, model=model), prob)


def test_predict_change_rejects_other_features(model):
    """A model trained on other features is refused with the fix named."""
    other = dataclasses.replace(model, feature_names=FEATURE_NAMES[:-1])
    before, after = make_pair(shape=(16, 16))
    with pytest.raises(ValueError, match="make train"):
        predict_change(before, after, model=other)


def test_predict_change_rejects_non_rgb(model):
    """Two-band input is a ValueError."""
    before, after = make_pair(shape=(16, 16), bands=2)
    with pytest.raises(ValueError, match="red-green-blue"):
        predict_change(before, after, model=model)


def test_change_probability_mask_threshold_and_min_area():
    """Pixels above the threshold are change; regions below min_area_px are dropped."""
    prob = np.zeros((10, 10), np.float32)
    prob[1:5, 1:5] = 0.9   # 16 px
    prob[7, 7] = 0.95      # 1 px
    prob[0, 9] = np.nan
    mask = change_probability_mask(prob, threshold=0.5, min_area_px=4, smooth_sigma_px=0.0)
    expected = np.zeros((10, 10), bool)
    expected[1:5, 1:5] = True
    assert_array_equal(mask, expected)
    keep_all = change_probability_mask(prob, threshold=0.5, min_area_px=0, smooth_sigma_px=0.0)
    assert keep_all[7, 7] and not keep_all[0, 9]


def test_load_model_refuses_edited_file(tmp_path):
    """A model text that does not match its card's SHA-256 is refused."""
    card = tmp_path / DEFAULT_MODEL_PATH.name
    shutil.copy(DEFAULT_MODEL_PATH, card)
    text = DEFAULT_MODEL_PATH.with_suffix(".txt").read_text()
    (tmp_path / DEFAULT_MODEL_PATH.with_suffix(".txt").name).write_text(text + "\n")
    with pytest.raises(ValueError, match="SHA-256"):
        load_model(card)
