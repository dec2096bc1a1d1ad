"""Tests of pipeline.detect.objects' per-label sums."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.detect import objects
from pipeline.detect.objects import _label_sums_np


@pytest.mark.parametrize("strip_px", [7, 1 << 20])
def test_label_sums_skip_unlabelled_pixels_to_the_bit(monkeypatch: pytest.MonkeyPatch,
                                                      strip_px: int) -> None:
    """Per-label sums equal those of a bincount over every pixel of each strip (NaN as 0)."""
    monkeypatch.setattr(objects, "_STRIP_PX", strip_px)
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 6, (40, 33)).astype(np.int32)
    labels[rng.random(labels.shape) < 0.6] = 0
    labels[:5] = 0  # whole strips without a label
    values = (rng.standard_normal(labels.shape) * 1e3).astype(np.float32)
    values[rng.random(labels.shape) < 0.1] = np.nan
    n = 7  # labels 6 and 7 have no pixel
    step = max(1, strip_px // labels.shape[1])
    expected = np.zeros(n + 1)
    for r in range(0, labels.shape[0], step):
        expected += np.bincount(labels[r:r + step].ravel(),
                                weights=np.nan_to_num(values[r:r + step]).ravel(),
                                minlength=n + 1)[:n + 1]
    got = _label_sums_np(labels, values, n)
    np.testing.assert_array_equal(got[1:], expected[1:])
    assert got[0] == 0.0 and got[6] == got[7] == 0.0
