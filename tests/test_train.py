"""Tests for scripts/train.py: seeded augmentation and sampling, deterministic training."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from _helpers import ROOT
from numpy.testing import assert_array_equal

from pipeline.core.features import N_FEATURES
from pipeline.datasets import LabelledPair


@pytest.fixture(scope="module")
def train():
    """scripts/train.py as a module."""
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "scripts" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pair(name: str, seed: int, size: int = 48) -> LabelledPair:
    """A textured pair with two new bright 'roofs' (label 1) in the after date."""
    rng = np.random.default_rng(seed)
    before = rng.uniform(60, 120, (3, size, size)).astype(np.float32)
    after = before + rng.normal(0, 4, before.shape).astype(np.float32)
    label = np.zeros((size, size), np.uint8)
    for y, x in ((8, 8), (28, 26)):
        after[:, y:y + 10, x:x + 12] = 220.0
        label[y:y + 10, x:x + 12] = 1
    return LabelledPair("levir_cd", name, before, after, label, 0.5, group=name)


def test_augment_is_seeded_and_keeps_shapes(train):
    """Copy 0 is the pair itself; an augmented copy is the same for the same seed, differs for
    another, and keeps the image and label on one grid."""
    pair = _pair("a", 1)
    b0, a0, l0 = train.augment(pair, 0, seed=3)
    assert b0 is pair.before and l0 is pair.label
    first = train.augment(pair, 1, seed=3)
    again = train.augment(pair, 1, seed=3)
    other = train.augment(pair, 1, seed=4)
    for x, y in zip(first, again, strict=True):
        assert_array_equal(x, y)
    assert not all(x.shape == y.shape and np.array_equal(x, y)
                   for x, y in zip(first, other, strict=True))
    b, a, lab = first
    assert b.shape == a.shape and b.shape[1:] == lab.shape and set(np.unique(lab)) <= {0, 1}


def test_build_samples_and_fit_are_deterministic(train):
    """The same seed gives the same rows and the same model text; predictions repeat exactly."""
    pairs = [_pair("a", 1), _pair("b", 2)]
    rows1 = train.build_samples(pairs, seed=5, n_copies=2, workers=2)
    rows2 = train.build_samples(pairs, seed=5, n_copies=2, workers=1)
    for name in ("a", "b"):
        assert len(rows1[name]) == 2
        for (x1, y1), (x2, y2) in zip(rows1[name], rows2[name], strict=True):
            assert x1.shape[1] == N_FEATURES
            assert_array_equal(x1, x2)
            assert_array_equal(y1, y2)
    m1 = train.fit(rows1, ["a", "b"], seed=5, n_trees=5)
    m2 = train.fit(rows2, ["b", "a"], seed=5, n_trees=5)
    assert m1.model_to_string() == m2.model_to_string()
    x = rows1["a"][0][0]
    assert_array_equal(m1.predict(x), m2.predict(x))


def test_fit_refuses_one_class(train):
    """Rows of a single class cannot train a balanced model: a clear error."""
    rows = {"a": [(np.zeros((10, N_FEATURES), np.float32), np.zeros(10, np.float32))]}
    with pytest.raises(ValueError, match="one class only"):
        train.fit(rows, ["a"], seed=1, n_trees=2)


def test_sample_caps_each_class(train, monkeypatch):
    """At most N_POSITIVE change and N_NEGATIVE unchanged pixels are kept per copy."""
    monkeypatch.setattr(train, "N_POSITIVE", 5)
    monkeypatch.setattr(train, "N_NEGATIVE", 7)
    label = np.zeros((10, 10), np.uint8)
    label[:3] = 1
    feats = np.arange(N_FEATURES * 100, dtype=np.float32).reshape(N_FEATURES, 10, 10)
    x, y = train._sample(feats, label, np.random.default_rng(0))
    assert (y == 1).sum() == 5 and (y == 0).sum() == 7
    # feature 0 of pixel i is i: change rows are pixels of the first three image rows
    assert (x[y == 1, 0] < 30).all() and (x[y == 0, 0] >= 30).all()
    assert_array_equal(x[:, 1], x[:, 0] + 100)
