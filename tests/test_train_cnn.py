"""Tests for scripts/train_cnn.py (needs PyTorch) and the network files (pipeline.models)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _helpers import assert_folds_hold_out_each_image_once, load_script, roof_pair

from pipeline.detect.convnet import forward, predict_change_cnn
from pipeline.models import DEFAULT_CNN_PATH, load_cnn, load_cnn_folds, save_cnn


@pytest.fixture(scope="module")
def train_cnn():
    """scripts/train_cnn.py as a module; skipped where PyTorch is not installed."""
    pytest.importorskip("torch", reason="PyTorch is only needed to train: `make train-cnn`")
    return load_script("train_cnn")


def test_folded_arrays_give_the_torch_network(train_cnn):
    """Folding batch norm into the convolutions and running them in NumPy gives the PyTorch
    network's logits in evaluation mode."""
    import torch

    torch.manual_seed(3)
    net = train_cnn.build_net(4)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    net.eval()
    a, b = torch.randn(2, 1, 3, 40, 56)
    with torch.no_grad():
        want = net(a, b)[0].numpy()
    got = forward(a[0].numpy(), b[0].numpy(), train_cnn.fold_batch_norm(net.state_dict()))
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert want.std() > 1e-3


def test_training_run_writes_a_loadable_model(train_cnn, tmp_path):
    """A short run on synthetic pairs gives finite arrays of every layer, which save, load
    (checked by SHA-256) and predict."""
    pairs = [roof_pair("a", 1), roof_pair("b", 2)]
    weights = train_cnn.train(pairs, seed=1, steps=3, width=2)
    assert all(np.isfinite(w).all() for w in weights.values())
    card = train_cnn.card(pairs, 1, 3, 2, fold="x", held_out=[])
    path = save_cnn(weights, card, tmp_path / "net.json")
    model = load_cnn(path)
    assert set(model.weights) == set(weights)
    assert model.card["trained_on"] == ["levir_cd/a", "levir_cd/b"]
    prob = predict_change_cnn(pairs[0].before, pairs[0].after, weights=model.weights)
    assert prob.shape == (48, 48) and np.isfinite(prob).all()


def test_training_is_seeded(train_cnn):
    """The same seed gives the same arrays; another seed other arrays."""
    pairs = [roof_pair("a", 1)]
    one = train_cnn.train(pairs, seed=5, steps=2, width=2)
    two = train_cnn.train(pairs, seed=5, steps=2, width=2)
    other = train_cnn.train(pairs, seed=6, steps=2, width=2)
    assert all(np.array_equal(one[k], two[k]) for k in one)
    assert not all(np.array_equal(one[k], other[k]) for k in one)


def test_edited_model_file_is_refused(tmp_path):
    """A network whose arrays no longer match their card's SHA-256 is refused with the fix."""
    weights = {"out.weight": np.ones((1, 2, 1, 1), np.float32),
               "out.bias": np.zeros(1, np.float32)}
    path = save_cnn(weights, {"threshold": 0.5, "smooth_sigma_px": 1.0, "min_area_m2": 10.0},
                    tmp_path / "n.json")
    assert load_cnn(path).min_area_at(0.5) == 40
    npz = path.with_suffix(".npz")
    npz.write_bytes(npz.read_bytes()[:-3] + b"xyz")
    with pytest.raises(ValueError, match="make train-cnn"):
        load_cnn(path)


def test_shipped_network_is_small_and_its_folds_hold_out_each_image_once():
    """The shipped network and its four folds are under 3 MB together; each fold's held-out
    images are disjoint from its training images and hold whole LEVIR-CD tiles, and every
    image the shipped model was trained on is held out by exactly one fold."""
    if not DEFAULT_CNN_PATH.exists():
        pytest.skip("no shipped network in models/ (make train-cnn)")
    model = load_cnn()
    folds = load_cnn_folds(model)
    assert len(folds) == 4
    size = sum((DEFAULT_CNN_PATH.parent / m.card["model_file"]).stat().st_size
               for m in (model, *folds.values()))
    assert size < 3 * 1024 * 1024
    assert_folds_hold_out_each_image_once(model.card, [f.card for f in folds.values()])
    card = json.loads(DEFAULT_CNN_PATH.read_text())
    assert card["threshold"] == 0.5 and "dsifn" in card["not_trained_on"]
