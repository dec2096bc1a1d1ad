"""Tests for pipeline.evaluate_detect: the detect path with the network, scored per image."""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import SHARED_DATA

from pipeline.datasets import LabelledPair
from pipeline.evaluate import DETECT_BUILDINGS, DETECT_MASK, fold_for, methods
from pipeline.evaluate_detect import DetectRuns
from pipeline.models import CnnModel, load_cnn, load_cnn_folds

CROP = "test_55_0256_0000"


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """One BLAS thread, as a detect run sets for itself."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _crop() -> LabelledPair:
    from pipeline.datasets import read_levir_crops

    if not (SHARED_DATA / "levir_cd" / "A" / f"{CROP}.png").exists():
        pytest.skip(f"no LEVIR-CD crop {CROP} under {SHARED_DATA}")
    return next(p for p in read_levir_crops(SHARED_DATA) if p.name == CROP)


def test_detect_runs_use_the_fold_that_held_the_image_out():
    """The fold holding the crop out is run (the 'shipped' stand-in has no weights at all);
    both predictions are on the crop's pixels and come from one run."""
    pair = _crop()
    shipped = load_cnn()
    folds = load_cnn_folds(shipped)
    held = fold_for(pair, shipped, folds)
    assert f"levir_cd/{CROP}" in held.card["held_out"]
    empty = CnnModel({}, threshold=0.5, smooth_sigma_px=1.0, min_area_m2=10.0,
                     card={"trained_on": [f"levir_cd/{CROP}"]})
    clock: dict = {}
    runs = DetectRuns(empty, folds, clock, fold_for)
    mask, buildings = runs.mask(pair), runs.buildings(pair)
    assert mask.shape == buildings.shape == pair.label.shape
    assert mask.dtype == buildings.dtype == bool
    assert clock["megapixels"] >= pair.label.size / 1e6 and clock["cpu_seconds"] > 0
    seconds = clock["seconds"]
    runs.buildings(pair)
    assert clock["seconds"] == seconds  # the second prediction reused the run
    # the crop is a quarter new buildings: the network's mask finds some of them, and the
    # building features are mask regions (polygons traced on the mask's pixels)
    label = pair.label == 1
    assert (mask & label).sum() > 0.3 * label.sum()
    assert buildings.any() and (buildings & ~mask).sum() < 0.1 * buildings.sum()


def test_detect_rows_skip_pairs_too_coarse_for_the_network():
    """A 2 m pair (DSIFN's scale) is not applicable: None, and no detect run is made."""
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 255, (3, 32, 32)).astype(np.float32)
    pair = LabelledPair("dsifn", "x", img, img, np.zeros((32, 32), np.uint8), 2.0)
    clock: dict = {}
    scored = methods(None, None, {DETECT_MASK: clock}, cnn=load_cnn(), cnn_folds={})
    assert scored[DETECT_MASK](pair) is None and scored[DETECT_BUILDINGS](pair) is None
    assert DETECT_MASK in methods(None, None, cnn=load_cnn(), cnn_folds={})
    assert DETECT_MASK not in methods(None, None, cnn=load_cnn(), cnn_folds={}, detect=False)
