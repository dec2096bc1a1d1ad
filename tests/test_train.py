"""Tests for scripts/train.py: seeded augmentation and sampling, deterministic training."""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import assert_folds_hold_out_each_image_once, load_script, roof_pair
from numpy.testing import assert_array_equal

from pipeline.core.features import N_FEATURES
from pipeline.models import DEFAULT_MODEL_PATH, load_fold_models, load_model


@pytest.fixture(scope="module")
def train():
    """scripts/train.py as a module."""
    return load_script("train")


def test_augment_is_seeded_and_keeps_shapes(train):
    """Copy 0 is the pair itself; an augmented copy is the same for the same seed, differs for
    another, and keeps the image and label on one grid."""
    pair = roof_pair("a", 1)
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
    pairs = [roof_pair("a", 1), roof_pair("b", 2)]
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


def test_sample_draws_hard_negatives_by_colour_change(train, monkeypatch):
    """Half the unchanged rows come from the high colour-change end (squared rank), the other
    half uniformly: the sampled negatives' mean colour-change rank is well above the median."""
    monkeypatch.setattr(train, "N_POSITIVE", 10)
    monkeypatch.setattr(train, "N_NEGATIVE", 400)
    label = np.zeros((100, 100), np.uint8)
    label[:2] = 1
    rng = np.random.default_rng(3)
    feats = rng.normal(size=(N_FEATURES, 100, 100)).astype(np.float32)
    change = feats[train.FEATURE_NAMES.index(train.HARD_FEATURE)]
    x, y = train._sample(feats, label, np.random.default_rng(0), hard_share=0.5)
    neg = x[y == 0]
    assert neg.shape[0] == 400 and len({tuple(r) for r in neg}) == 400  # no repeats
    unchanged = np.sort(change[label == 0])
    rank = np.searchsorted(unchanged, neg[:, train.FEATURE_NAMES.index(train.HARD_FEATURE)])
    rank = rank / unchanged.size
    # uniform half: mean rank 1/2; squared-rank half: mean rank 3/4; together about 0.625
    assert 0.58 < rank.mean() < 0.67
    assert (rank > 0.5).mean() > 0.6


def test_hard_negatives_weights_by_squared_rank(train):
    """Drawn without replacement (all positions when n covers them), the top tenth of ranks far
    more often than the bottom tenth (squared-rank weights 0.81 vs 0.003 on average)."""
    rng = np.random.default_rng(1)
    values = rng.permutation(1000).astype(np.float32)
    assert_array_equal(train._hard_negatives(values, 1000, rng), np.arange(1000))
    counts = np.zeros(1000)
    for _ in range(200):
        idx = train._hard_negatives(values, 50, rng)
        assert np.unique(idx).size == 50
        counts[idx] += 1
    by_rank = counts[np.argsort(values)]
    assert by_rank[-100:].sum() > 20 * max(by_rank[:100].sum(), 1)
    assert by_rank[-100:].sum() > by_rank[400:500].sum() > by_rank[:100].sum()


def test_sample_without_hard_share_is_uniform_as_shipped(train, monkeypatch):
    """hard_share 0 (the default) draws exactly the rows of plain uniform sampling, the rule the
    shipped models were trained with."""
    monkeypatch.setattr(train, "N_POSITIVE", 20)
    monkeypatch.setattr(train, "N_NEGATIVE", 50)
    label = np.zeros((30, 30), np.uint8)
    label[:4] = 1
    feats = np.random.default_rng(2).normal(size=(N_FEATURES, 30, 30)).astype(np.float32)
    x, y = train._sample(feats, label, np.random.default_rng(9))
    rng = np.random.default_rng(9)
    flat = label.ravel()
    pos = rng.choice(np.flatnonzero(flat == 1), 20, replace=False)
    neg = rng.choice(np.flatnonzero(flat == 0), 50, replace=False)
    idx = np.sort(np.concatenate([pos, neg]))
    assert_array_equal(x, feats.reshape(N_FEATURES, -1)[:, idx].T)
    assert_array_equal(y, flat[idx])


def test_shipped_model_folds_are_the_networks_and_hold_out_each_image_once():
    """The shipped LightGBM model names four fold models, the network's folds by LEVIR-CD
    tile: each holds out whole tiles it was not trained on, and together every image the
    shipped model was trained on exactly once."""
    if not DEFAULT_MODEL_PATH.exists():
        pytest.skip("no shipped model in models/ (make train)")
    model = load_model()
    folds = load_fold_models(model)
    assert_folds_hold_out_each_image_once(model.card, [f.card for f in folds.values()])
