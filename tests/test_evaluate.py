"""Tests for pipeline.evaluate: metrics on hand-made arrays, baselines, the held-out checks."""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import SHARED_DATA, random_cnn_weights
from numpy.testing import assert_array_equal

from pipeline.datasets import IGNORE, LabelledPair, read_levir_crops, read_levir_tiles
from pipeline.evaluate import (
    CNN,
    CVA,
    LEARNED,
    POOLED,
    Row,
    check_folds,
    check_held_out,
    cva_otsu,
    fold_for,
    object_counts,
    object_scores,
    pca_kmeans,
    pixel_counts,
    pixel_scores,
    target_status,
)
from pipeline.testing import make_pair

BLOCK = np.s_[20:32, 24:36]


def test_pixel_counts_and_scores_exact():
    """TP/FP/FN/TN and P/R/F1/IoU on a 3 x 3 example; IGNORE pixels are not counted."""
    pred = np.array([[1, 1, 0], [0, 1, 0], [1, 0, 0]], bool)
    label = np.array([[1, 0, 0], [1, 1, IGNORE], [IGNORE, 0, 0]], np.uint8)
    counts = pixel_counts(pred, label)
    assert_array_equal(counts, [2, 1, 1, 3])
    s = pixel_scores(counts)
    assert s == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "iou": 0.5})


def test_pixel_scores_empty_is_zero():
    """No prediction and no change give zeros, not NaN."""
    assert pixel_scores(np.array([0, 0, 0, 9])) == {"precision": 0.0, "recall": 0.0,
                                                    "f1": 0.0, "iou": 0.0}


def test_object_counts_iou_half():
    """A component matches only at IoU >= 0.5; diagonal neighbours are one component."""
    label = np.zeros((8, 12), np.uint8)
    label[1:3, 1:3] = 1           # 4 px, predicted exactly
    label[5:7, 1:5] = 1           # 8 px, predicted by 4 px: IoU 0.5, matched
    label[1:3, 8:10] = 1          # 4 px, predicted by 1 px: IoU 0.25, missed
    pred = np.zeros_like(label, bool)
    pred[1:3, 1:3] = True
    pred[5:7, 1:3] = True
    pred[1, 8] = True
    pred[6, 10] = pred[7, 11] = True  # one 8-connected false component
    counts = object_counts(pred, label)
    assert_array_equal(counts, [4, 2, 3, 2])
    assert object_scores(counts) == pytest.approx({"obj_precision": 0.5, "obj_recall": 2 / 3})


def _iou(mask, block=BLOCK, shape=(64, 64)):
    truth = np.zeros(shape, bool)
    truth[block] = True
    return (mask & truth).sum() / (mask | truth).sum()


@pytest.mark.parametrize("method", [cva_otsu, pca_kmeans])
def test_baselines_find_synthetic_block(method):
    """Both baselines recover a bright new block on a noisy synthetic pair."""
    before, after = make_pair(shape=(64, 64), change=BLOCK, noise=3.0, seed=1)
    mask = method(before.values, after.values)
    assert mask.shape == (64, 64) and mask.dtype == bool
    assert _iou(mask) > 0.7


def test_baselines_no_change_flags_little():
    """On a pair without change and with noise, PCA-KMeans' change cluster is the noisier half
    at most and CVA + Otsu flags some pixels, but neither returns NaN or crashes."""
    before, after = make_pair(shape=(32, 32), change=None, noise=2.0, seed=2)
    for method in (cva_otsu, pca_kmeans):
        mask = method(before.values, after.values)
        assert mask.shape == (32, 32) and 0 < mask.mean() < 1


def _pair(name, rows, row0=0, dataset="levir_cd"):
    z = np.zeros((3, rows, 8), np.float32)
    return LabelledPair(dataset, name, z, z, np.zeros((rows, 8), np.uint8), 0.5,
                        group="_".join(name.removeprefix("levircd_").split("_")[:2]),
                        extra={"row0": row0})


def test_check_held_out_rejects_overlap():
    """A crop whose rows fall inside a training tile of the same LEVIR-CD tile is refused."""
    tile = _pair("levircd_test_2_r0256", 768, row0=256, dataset="levir_cd_tiles")
    assert check_held_out([_pair("test_2_0000_0512", 256)], [tile])  # adjacent: a note
    with pytest.raises(ValueError, match="not held out"):
        check_held_out([_pair("test_2_0256_0000", 256)], [tile])


def test_real_levir_crops_are_held_out():
    """No shipped evaluation crop shares a pixel with a training tile (real data)."""
    if not (SHARED_DATA / "levir_cd").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    notes = check_held_out(read_levir_crops(SHARED_DATA), read_levir_tiles(SHARED_DATA))
    assert len(notes) == 2 and all("test_2_0000" in n for n in notes)


class _Card:
    """A stand-in for a loaded model: only the card matters to the fold checks."""

    def __init__(self, trained_on, held_out):
        self.card = {"trained_on": trained_on, "held_out": held_out}


def test_check_folds_refuses_shared_names():
    """A fold trained on an image it is scored on is refused."""
    crop = _pair("test_55_0256_0000", 256)
    folds = {"x": _Card(["levir_cd/test_55_0256_0000"], ["levir_cd/test_55_0256_0000"])}
    with pytest.raises(ValueError, match="trained on images it is scored on"):
        check_folds(folds, [crop])


@pytest.mark.parametrize("direction", ["crop held out", "tile held out"])
def test_check_folds_refuses_shared_pixels(direction):
    """In either direction, a crop inside a tile on the other side of a fold is refused."""
    tile = _pair("levircd_test_2_r0256", 768, row0=256, dataset="levir_cd_tiles")
    crop = _pair("test_2_0256_0000", 256)
    keys = ["levir_cd/test_2_0256_0000", "levir_cd_tiles/levircd_test_2_r0256"]
    if direction == "tile held out":
        keys = keys[::-1]
    with pytest.raises(ValueError, match="not held out"):
        check_folds({"x": _Card([keys[1]], [keys[0]])}, [tile, crop])


def test_check_folds_notes_adjacent_rows():
    """Adjacent rows of one LEVIR-CD tile are allowed, with a note naming the fold."""
    tile = _pair("levircd_test_2_r0256", 768, row0=256, dataset="levir_cd_tiles")
    crop = _pair("test_2_0000_0512", 256)
    folds = {"tiles": _Card(["levir_cd_tiles/levircd_test_2_r0256"], ["levir_cd/test_2_0000_0512"])}
    notes = check_folds(folds, [tile, crop])
    assert len(notes) == 1 and notes[0].startswith("fold tiles: test_2_0000_0512")


def test_fold_for_picks_the_fold_that_held_the_image_out():
    """A LEVIR image goes to its fold's model; an image no model saw goes to the shipped one;
    an image the shipped model saw and no fold holds out is refused."""
    crop = _pair("test_55_0256_0000", 256)
    other = _pair("dsifn_1", 256, dataset="dsifn")
    fold = _Card(["levir_cd_tiles/levircd_test_1"], ["levir_cd/test_55_0256_0000"])
    shipped = _Card(["levir_cd_tiles/levircd_test_1", "levir_cd/test_55_0256_0000"], [])
    assert fold_for(crop, shipped, {"tiles": fold}) is fold
    assert fold_for(other, shipped, {"tiles": fold}) is shipped
    with pytest.raises(ValueError, match="no fold model"):
        fold_for(crop, shipped, {})


def test_target_status_pooled_and_per_direction():
    """The bar is F1 >= 0.55 and >= CVA + 0.15, stated for the pooled row and each direction."""
    rows = []
    for ds, learned_tp in ((POOLED, 60), ("levir_cd (9 crops)", 40)):
        for method, tp in ((LEARNED, learned_tp), (CVA, 20)):
            r = Row(ds, method)
            r.pixels = np.array([tp, 100 - tp, 100 - tp, 1000])
            rows.append(r)
    status = target_status(rows)
    assert status[0].startswith(f"{POOLED}: {LEARNED}") and "target MET" in status[0]
    assert status[1].startswith(f"levir_cd (9 crops): {LEARNED}") and "NOT MET" in status[1]
    cnn = Row(POOLED, CNN)
    cnn.pixels = np.array([30, 70, 70, 1000])
    status = target_status([*rows, cnn])
    assert status[0].startswith(f"{POOLED}: {CNN}") and "NOT MET: F1 0.300" in status[0]
    assert len(status) == 3


def test_real_folds_are_held_out():
    """The shipped fold models hold out disjoint images covering all 14 LEVIR-CD images, and
    no held-out image shares a pixel, or a tile, with its fold's training data (real data)."""
    if not (SHARED_DATA / "levir_cd").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    from pipeline.models import load_fold_models, load_model

    model = load_model()
    folds = load_fold_models(model)
    pairs = read_levir_crops(SHARED_DATA) + read_levir_tiles(SHARED_DATA)
    held = [k for f in folds.values() for k in f.card["held_out"]]
    assert sorted(held) == sorted(f"{p.dataset}/{p.name}" for p in pairs)
    assert sorted(model.card["trained_on"]) == sorted(held)
    # the folds hold out whole LEVIR-CD tiles: no held-out row is beside a training row
    assert check_folds(folds, pairs) == []


def test_write_markdown_states_figures_and_folds(tmp_path):
    """docs/evaluation.md carries every row's figures, the target lines and each fold's
    training images."""
    from pipeline.evaluation_doc import write_markdown

    rows = []
    for method, tp in ((LEARNED, 30), (CVA, 10)):
        r = Row(POOLED, method)
        r.pixels = np.array([tp, 10, 20, 100])
        rows.append(r)
    fold = _Card(["levir_cd_tiles/levircd_test_1"], ["levir_cd/test_55_0256_0000"])
    fold.card.update(model_file="f.txt", model_sha256="ab" * 32)
    shipped = _Card(["levir_cd_tiles/levircd_test_1"], [])
    out = tmp_path / "evaluation.md"
    write_markdown(rows, {"seconds": 3.0, "learned_seconds_per_megapixel": 1.5,
                          "learned_cpu_seconds_per_megapixel": 2.5}, shipped,
                   {"tiles": fold}, out)
    text = out.read_text()
    assert f"| {POOLED} | {LEARNED} | 0 | 0.750 | 0.600 | 0.667 |" in text
    assert f"{LEARNED}: target MET: F1 0.667 vs required >= 0.55 and >= CVA 0.400" in text
    assert "fold `tiles`" in text and "levir_cd_tiles/levircd_test_1" in text
    assert "1.500 s wall and 2.500 s CPU per megapixel" in text


def test_adjacent_groups_and_markdown_name_them(tmp_path):
    """Held-out images whose LEVIR-CD tile is in their fold's training data are found, and
    docs/evaluation.md names them and their tile instead of a fixed count."""
    from pipeline.evaluate import _adjacent_groups
    from pipeline.evaluation_doc import write_markdown

    tile = _pair("levircd_test_2_r0256", 768, row0=256, dataset="levir_cd_tiles")
    near, far = _pair("test_2_0000_0512", 256), _pair("test_55_0256_0000", 256)
    fold = _Card(["levir_cd_tiles/levircd_test_2_r0256"],
                 ["levir_cd/test_2_0000_0512", "levir_cd/test_55_0256_0000"])
    adjacent = _adjacent_groups({"tiles": fold}, [tile, near, far])
    assert adjacent == {"levir_cd/test_2_0000_0512"}
    shipped = _Card(["levir_cd_tiles/levircd_test_2_r0256"], [])
    out = tmp_path / "evaluation.md"
    for facts, phrase in (({"adjacent_images": sorted(adjacent), "adjacent_tiles": ["test_2"]},
                           "leaves out the 1 image that shares a LEVIR-CD tile (test_2) with "
                           "its fold's training data (levir_cd/test_2_0000_0512)"),
                          ({}, "No held-out image shares a LEVIR-CD tile with its fold's "
                           "training data, so there is no stricter row than the pooled one")):
        write_markdown([], facts, shipped, {"tiles": fold}, out)
        assert phrase in " ".join(out.read_text().split())


def test_cnn_method_scores_with_the_fold_that_held_the_image_out():
    """The network's detector uses the fold whose card holds the image out (not the shipped
    network) and its decision rule, and clocks its megapixels."""
    from pipeline.evaluate import methods
    from pipeline.models import CnnModel

    rng = np.random.default_rng(0)
    before = rng.uniform(0, 255, (3, 48, 48)).astype(np.float32)
    after = before.copy()
    after[:, 10:30, 10:30] = 250.0
    pair = LabelledPair("levir_cd", "test_55_0256_0000", before, after,
                        np.zeros((48, 48), np.uint8), 0.5, group="test_55")
    rule = {"threshold": 0.5, "smooth_sigma_px": 0.0, "min_area_m2": 0.25}
    held = CnnModel(random_cnn_weights(seed=1), **rule,
                    card={"held_out": ["levir_cd/test_55_0256_0000"], "trained_on": []})
    never = CnnModel({}, **rule, card={"trained_on": ["levir_cd/test_55_0256_0000"]})
    clocks: dict = {}
    run = methods(None, None, clocks, cnn=never, cnn_folds={"b": held})[CNN]
    mask = run(pair)
    assert mask.shape == (48, 48) and mask.dtype == bool
    from pipeline.detect.convnet import predict_change_cnn
    want = predict_change_cnn(before, after, weights=held.weights) > 0.5
    assert_array_equal(mask, want)
    assert clocks[CNN]["megapixels"] == pytest.approx(48 * 48 / 1e6)
    with pytest.raises(ValueError, match="no fold model"):
        methods(None, None, {}, cnn=never, cnn_folds={})[CNN](pair)
