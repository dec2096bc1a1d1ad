"""Tests for pipeline.core.coreg_consensus (when a shift is applied) and for co-registration on
real pairs that are already registered: no false shift may be applied to them."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage as ndi

from pipeline.core.coreg import coregister, estimate_shift
from pipeline.core.coreg_consensus import AGREE_PX, MIN_WINDOWS, WindowShift, consensus_shift
from pipeline.core.coreg_windows import MIN_WINDOW_PX, select_windows, window_size_px
from pipeline.datasets import DEFAULT_DATA_DIR
from pipeline.errors import PipelineWarning
from pipeline.model import CoregParams
from pipeline.testing import make_da, make_pair

PARAMS = CoregParams()
# a shift this small moves no edge by more than a quarter pixel: not a false-change risk
TOLERANCE_PX = 0.25


def _windows(fine, coarse=None, ratio=8.0):
    """WindowShifts from fine-scale shifts (and coarse ones; the same when None)."""
    coarse = fine if coarse is None else coarse
    return [WindowShift(f[0], f[1], 0.5, ratio, c[0], c[1]) for f, c in zip(fine, coarse,
                                                                            strict=True)]


def test_consensus_applies_agreeing_windows():
    """Five windows agreeing at both scales within 0.05 px: applied, small uncertainty."""
    fine = [(0.52, -0.30), (0.50, -0.32), (0.55, -0.28), (0.50, -0.30), (0.48, -0.31)]
    result = consensus_shift(_windows(fine), PARAMS)
    assert result.applied
    assert (result.dy, result.dx) == (0.50, -0.30)
    assert result.uncertainty_px < 0.1
    assert result.note.startswith("5 of 5 windows agree")


def test_consensus_within_uncertainty_not_applied_without_warning():
    """Windows scattered by about 0.4 px around a 0.3 px shift: estimated, not applied."""
    fine = [(0.3, 0.0), (-0.2, 0.4), (0.8, -0.3), (0.35, 0.5), (0.1, -0.4)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", PipelineWarning)  # the expected case is not a warning
        result = consensus_shift(_windows(fine), PARAMS)
    assert not result.applied
    assert "not applied: within uncertainty" in result.note
    assert result.uncertainty_px >= math.hypot(result.dy, result.dx)


def test_consensus_few_windows_use_student_t():
    """Three windows at 0.1, 0.5 and 0.9 px: the 95% interval of a mean of three is
    t(0.975, 2) = 4.30 standard errors (0.70 px), not 1.96 (0.32 px): 0.5 px is not proven."""
    result = consensus_shift(_windows([(0.1, 0.0), (0.5, 0.0), (0.9, 0.0)]), PARAMS)
    assert not result.applied
    assert result.uncertainty_px == pytest.approx(4.303 * math.sqrt(0.08) / math.sqrt(3), abs=0.01)


def test_consensus_scale_bias_not_applied():
    """Windows agree exactly at each scale but the scales differ by 0.8 px (relief,
    shadows: not a rigid shift): the bias is uncertainty, the 0.5 px shift is not applied."""
    fine = [(0.5, 0.0)] * 5
    coarse = [(0.5, -0.8)] * 5
    result = consensus_shift(_windows(fine, coarse), PARAMS)
    assert not result.applied
    assert result.uncertainty_px >= 0.8
    assert "within uncertainty" in result.note


def test_consensus_one_clear_window_is_not_enough():
    """One clear peak among three windows is not a consensus (the 1.95 px LEVIR-CD case)."""
    windows = [WindowShift(1.9, -0.4, 0.99, 2.9, 1.9, -0.4),
               WindowShift(0.85, -0.5, 0.99, 1.9, 1.0, -1.0),
               WindowShift(1.15, 0.15, 0.99, 1.3, 0.5, -2.5)]
    with pytest.warns(PipelineWarning, match="too few windows"):
        result = consensus_shift(windows, PARAMS)
    assert not result.applied
    # a lone window cannot measure its own uncertainty, even with every window clear
    with pytest.warns(PipelineWarning, match="too few windows"):
        assert not consensus_shift(windows[:1], PARAMS).applied


def test_consensus_minority_of_clear_windows_not_applied():
    """Three clear windows out of seven are not half of them; three of five are."""
    windows = _windows([(1.0, 1.0)] * MIN_WINDOWS) + _windows([(3.0, -2.0)] * 4, ratio=1.2)
    with pytest.warns(PipelineWarning, match="too few windows"):
        assert not consensus_shift(windows, PARAMS).applied
    assert consensus_shift(windows[:5], PARAMS).applied


def test_consensus_two_agreeing_windows_are_not_enough():
    """Two clear windows that agree (a LEVIR-CD crop without change on the AOI grid: two of
    three windows at about -1.4 px) do not prove a shift; a third agreeing one does."""
    fine, coarse = [(0.2, -1.35), (-0.05, -1.5)], [(0.35, -1.9), (0.2, -1.2)]
    weak = WindowShift(0.15, -0.75, 0.99, 1.5, 0.15, -0.15)
    with pytest.warns(PipelineWarning, match="too few windows"):
        assert not consensus_shift(_windows(fine, coarse) + [weak], PARAMS).applied
    assert consensus_shift(_windows([(0.1, -1.4)] * MIN_WINDOWS), PARAMS).applied


def test_consensus_disagreeing_scales_not_applied():
    """A coarse-scale shift more than AGREE_PX from the median: windows disagree."""
    fine = [(2.0, 0.0)] * 4
    coarse = [(2.0, 0.0)] * 3 + [(2.0, -AGREE_PX - 0.2)]
    with pytest.warns(PipelineWarning, match="windows disagree"):
        assert not consensus_shift(_windows(fine, coarse), PARAMS).applied


def test_window_size_leaves_several_windows_on_small_frames():
    """A 256 px frame is measured in 128 px windows, never below MIN_WINDOW_PX."""
    assert window_size_px(256, 256, 512) == (128, 128)
    assert window_size_px(1024, 2048, 512) == (512, 512)
    assert window_size_px(100, 300, 512) == (MIN_WINDOW_PX, MIN_WINDOW_PX)
    assert window_size_px(40, 300, 512) == (40, MIN_WINDOW_PX)
    before, after = make_pair(shape=(256, 256), change=None)
    assert len(select_windows(before, after, None, 512)) >= 4


@pytest.mark.parametrize("shift", [(0.25, 0.0), (-0.15, 0.2), (0.0, -0.6)])
def test_small_synthetic_shifts_still_applied(shift):
    """Known shifts of a fraction of a pixel are recovered within 0.1 px and applied."""
    before, after = make_pair(shape=(192, 192), change=np.s_[40:90, 60:120], shift=shift,
                              noise=1.0)
    result = estimate_shift(before, after, params=PARAMS)
    assert result.applied, result.note
    assert math.hypot(result.dy - shift[0], result.dx - shift[1]) < 0.1


def test_unshifted_synthetic_pair_not_moved():
    """A pair with change but no shift is left as it is."""
    before, after = make_pair(shape=(192, 192), change=np.s_[40:90, 60:120], noise=1.0)
    aligned, result = coregister(before, after, params=PARAMS)
    assert not result.applied or math.hypot(result.dy, result.dx) < TOLERANCE_PX
    assert (aligned is after) == (not result.applied)


# --- real pairs that are registered already (LEVIR-CD, 0.5 m, Google Earth) -----------------


def _levir(folder: str, name: str):
    """The before and after of a LEVIR-CD pair as DataArrays (test-only I/O)."""
    from pipeline.datasets import read_png_pairs

    path = DEFAULT_DATA_DIR / folder
    if not (path / "A" / f"{name}.png").exists():
        pytest.skip(f"LEVIR-CD pair {name} is absent under {path} (the shared data folder)")
    pair = next(p for p in read_png_pairs(path, folder, 0.5) if p.name == name)
    return make_da(pair.before, res_m=0.5), make_da(pair.after, res_m=0.5)


# test_5 got a false 1.95 px shift from one window (of three) with a clear peak; test_3 has
# the clearest peaks of the tiles; test_55 (a crop) got a false 3.5 px shift
@pytest.mark.parametrize("folder, name", [("levir_cd_tiles", "levircd_test_5"),
                                          ("levir_cd_tiles", "levircd_test_3"),
                                          ("levir_cd_tiles", "levircd_test_1"),
                                          ("levir_cd", "test_55_0256_0000"),
                                          ("levir_cd", "train_386_0512_0768")])
@pytest.mark.parametrize("border_px", [0, 3])
def test_registered_real_pair_gets_no_false_shift(folder, name, border_px):
    """A registered real pair with real change (new buildings) is not moved, also with the
    nodata border a detect run's AOI grid adds around it."""
    before, after = _levir(folder, name)
    if border_px:
        before, after = (make_da(np.pad(d.values, ((0, 0), (border_px,) * 2, (border_px,) * 2),
                                        constant_values=np.nan), res_m=0.5)
                         for d in (before, after))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PipelineWarning)
        aligned, result = coregister(before, after, params=PARAMS)
    if result.applied:
        assert math.hypot(result.dy, result.dx) < TOLERANCE_PX, result.note
    else:
        assert aligned is after
        assert "not applied" in result.note


@pytest.mark.parametrize("folder, name", [("levir_cd_tiles", "levircd_test_5"),
                                          ("levir_cd", "test_55_0256_0000")])
def test_registered_real_image_shifted_copy_is_recovered(folder, name):
    """The same real image (1024 or 256 px) against a copy shifted by (0.4, -0.3) px:
    recovered within 0.1 px and applied."""
    before, _ = _levir(folder, name)
    arr = before.values.astype(np.float64)
    moved = np.stack([ndi.shift(band, (0.4, -0.3), order=3, mode="reflect") for band in arr])
    moved[:, :2, :] = np.nan  # shifted in from outside the frame
    moved[:, :, -2:] = np.nan
    result = estimate_shift(before, before.copy(data=moved.astype(np.float32)), params=PARAMS)
    assert result.applied, result.note
    assert math.hypot(result.dy + 0.4, result.dx - 0.3) < 0.1
