"""Tests for pipeline.detect.convnet: the NumPy siamese U-Net against a plain reference."""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import random_cnn_weights as random_weights
from scipy import ndimage as ndi

from pipeline.detect.convnet import (
    DECODER,
    ENCODER,
    forward,
    predict_change_cnn,
    standardize,
)


def _ref_conv(x, weight, bias):
    """A 3x3 zero-padded cross-correlation, one output and input channel at a time."""
    out = np.zeros((weight.shape[0], *x.shape[1:]), np.float64)
    for o in range(weight.shape[0]):
        for i in range(x.shape[0]):
            out[o] += ndi.correlate(x[i].astype(np.float64), weight[o, i].astype(np.float64),
                                    mode="constant", cval=0.0)
        out[o] += bias[o]
    return out


def _ref_forward(a, b, w):
    """The network written out with the reference convolution, pooling and upsampling."""
    def block(x, name):
        for k in (0, 1):
            x = np.maximum(_ref_conv(x, w[f"{name}.{k}.weight"], w[f"{name}.{k}.bias"]), 0)
        return x

    def pool(x):
        return np.stack([ndi.maximum_filter(ch, size=2, origin=(-1, -1))[::2, ::2] for ch in x])

    def enc(x):
        out = [block(x, ENCODER[0])]
        for name in ENCODER[1:]:
            out.append(block(pool(out[-1]), name))
        return out

    fa, fb = enc(a), enc(b)
    x = np.abs(fa[3] - fb[3])
    for name, lv in zip(DECODER, (2, 1, 0), strict=True):
        up = np.kron(x, np.ones((1, 2, 2)))
        x = block(np.concatenate([up, np.abs(fa[lv] - fb[lv]), fb[lv]]), name)
    return np.einsum("c,cyx->yx", w["out.weight"][0, :, 0, 0], x) + w["out.bias"][0]


def test_forward_equals_plain_reference():
    """Convolutions as nine matrix products equal scipy's correlate, level by level."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(2, 3, 24, 32)).astype(np.float32)
    w = random_weights()
    got = forward(a, b, w)
    want = _ref_forward(a, b, w)
    assert got.shape == (24, 32)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.std(want) > 0.01  # a network that outputs a constant would prove nothing


def test_a_change_moves_the_map_where_it_is():
    """Brightening a square of the after date moves the output more there than far away."""
    rng = np.random.default_rng(2)
    a = rng.normal(size=(3, 32, 32)).astype(np.float32)
    b = a.copy()
    b[:, 8:20, 8:20] += 3.0
    w = random_weights()
    same, changed = forward(a, a, w), forward(a, b, w)
    assert np.abs(changed - same)[8:20, 8:20].mean() > np.abs(changed - same)[24:, 24:].mean()


def test_tiles_equal_whole_image_in_their_centres():
    """Tiled inference with a wide margin gives the whole-image probabilities (the tile
    borders differ only through zero padding beyond the margin)."""
    rng = np.random.default_rng(3)
    a = ndi.gaussian_filter(rng.normal(size=(3, 80, 96)), (0, 2, 2)).astype(np.float32) * 50
    b = a + rng.normal(0, 5, a.shape).astype(np.float32)
    w = random_weights()
    whole = predict_change_cnn(a, b, weights=w, tile_px=128, margin_px=64)
    tiled = predict_change_cnn(a, b, weights=w, tile_px=32, margin_px=64)
    np.testing.assert_allclose(tiled, whole, atol=1e-5)
    coarse = predict_change_cnn(a, b, weights=w, tile_px=32, margin_px=8)
    assert not np.allclose(coarse, whole, atol=1e-5)  # the margin is what makes them equal


def test_probability_map_nodata_and_scale():
    """[0, 1] float32 of the input's shape, NaN where either date is nodata, and the same
    map whatever the images' scale (each date is standardised)."""
    rng = np.random.default_rng(4)
    a = rng.uniform(0, 255, (3, 30, 44)).astype(np.float32)
    b = rng.uniform(0, 255, (3, 30, 44)).astype(np.float32)
    b[:, :5] = np.nan
    w = random_weights()
    prob = predict_change_cnn(a, b, weights=w)
    assert prob.shape == (30, 44) and prob.dtype == np.float32
    assert np.isnan(prob[:5]).all() and np.isfinite(prob[5:]).all()
    assert ((prob[5:] >= 0) & (prob[5:] <= 1)).all()
    rescaled = predict_change_cnn(a / 255.0, b * 40.0 + 7.0, weights=w)
    np.testing.assert_allclose(rescaled, prob, atol=1e-4, equal_nan=True)


def test_standardize_uses_valid_pixels_only():
    rng = np.random.default_rng(5)
    image = rng.normal(10, 3, (3, 20, 20)).astype(np.float32)
    valid = np.ones((20, 20), bool)
    valid[:4] = False
    image[:, :4] = 1e6  # nodata fill must not move the statistics
    out = standardize(image, valid)
    assert np.allclose(out[:, valid].mean(axis=1), 0, atol=1e-5)
    assert np.allclose(out[:, valid].std(axis=1), 1, atol=1e-4)
    assert (out[:, ~valid] == 0).all()
    assert (standardize(image, np.zeros((20, 20), bool)) == 0).all()


@pytest.mark.parametrize("bad", [(1, 16, 16), (3, 16)])
def test_rejects_non_rgb(bad):
    w = random_weights()
    with pytest.raises(ValueError, match="red-green-blue"):
        predict_change_cnn(np.zeros(bad, np.float32), np.zeros(bad, np.float32), weights=w)


def test_rejects_misaligned_tiles():
    w = random_weights()
    img = np.zeros((3, 16, 16), np.float32)
    with pytest.raises(ValueError, match="multiples of 8"):
        predict_change_cnn(img, img, weights=w, tile_px=30)


def test_flip_average_is_mirror_equivariant():
    """Averaged over the four mirrorings, the map of a mirrored pair is the mirrored map (the
    four form a group), which a single pass does not give; and the average lies between
    the single passes' extremes."""
    rng = np.random.default_rng(6)
    a = rng.uniform(0, 255, (3, 40, 48)).astype(np.float32)
    b = a + rng.normal(0, 30, a.shape).astype(np.float32)
    w = random_weights()
    prob = predict_change_cnn(a, b, weights=w)
    mirrored = predict_change_cnn(a[:, :, ::-1], b[:, :, ::-1], weights=w)
    np.testing.assert_allclose(mirrored, prob[:, ::-1], atol=1e-6)
    single = predict_change_cnn(a, b, weights=w, flips=False)
    single_m = predict_change_cnn(a[:, :, ::-1], b[:, :, ::-1], weights=w, flips=False)
    assert not np.allclose(single_m, single[:, ::-1], atol=1e-6)
    passes = [single, single_m[:, ::-1],
              predict_change_cnn(a[:, ::-1], b[:, ::-1], weights=w, flips=False)[::-1],
              predict_change_cnn(a[:, ::-1, ::-1], b[:, ::-1, ::-1], weights=w,
                                 flips=False)[::-1, ::-1]]
    np.testing.assert_allclose(prob, np.mean(passes, axis=0), atol=1e-6)


def test_reflect_fill_on_a_rectangle_is_numpy_reflect_padding():
    """Nodata around a valid rectangle is filled as np.pad's 'reflect' fills it."""
    from pipeline.detect.convnet import _reflect_fill

    rng = np.random.default_rng(8)
    core = rng.normal(size=(3, 20, 17)).astype(np.float32)
    want = np.pad(core, ((0, 0), (5, 3), (4, 6)), mode="reflect")
    x = np.zeros_like(want)
    x[:, 5:25, 4:21] = core
    valid = np.zeros(want.shape[1:], bool)
    valid[5:25, 4:21] = True
    np.testing.assert_array_equal(_reflect_fill(x, valid), want)


def test_reflect_fill_keeps_valid_pixels_and_fills_from_valid_ones():
    """Any mask: valid pixels unchanged; every filled value is one of the valid values."""
    from pipeline.detect.convnet import _reflect_fill

    rng = np.random.default_rng(9)
    x = rng.normal(size=(2, 40, 40)).astype(np.float32)
    yy, xx = np.mgrid[:40, :40]
    valid = (yy - 18) ** 2 + (xx - 22) ** 2 < 15 ** 2  # a disc (a radius AOI)
    got = _reflect_fill(np.where(valid, x, 0), valid)
    np.testing.assert_array_equal(got[:, valid], x[:, valid])
    assert np.isin(got[0, ~valid], x[0, valid]).all()


def test_nodata_around_an_image_the_network_sees_the_image_edge():
    """An image inside a nodata frame (a grid larger than the image): on the image, the same
    probability as the network on the bare image, as it was trained and scored (one tile
    here: tiles placed elsewhere on the grid than on the image would differ at their seams)."""
    w = random_weights(seed=4)
    rng = np.random.default_rng(10)
    a, b = rng.normal(100, 20, (2, 3, 44, 52)).astype(np.float32)
    b[:, 10:20, 30:45] += 50
    bare = predict_change_cnn(a, b, weights=w, flips=False, tile_px=128, margin_px=16)
    for frame in ((3, 13), (11, 0), (0, 9)):  # rows above and columns left of the image
        grid_a = np.full((3, 64, 72), np.nan, np.float32)
        grid_b = grid_a.copy()
        box = np.s_[:, frame[0]:frame[0] + 44, frame[1]:frame[1] + 52]
        grid_a[box], grid_b[box] = a, b
        got = predict_change_cnn(grid_a, grid_b, weights=w, flips=False, tile_px=128,
                                 margin_px=16)
        np.testing.assert_allclose(got[box[1:]], bare, rtol=0, atol=1e-6)
        assert np.isnan(got).sum() == 64 * 72 - 44 * 52
