"""pipeline.core.coreg_consensus: when a measured shift is trusted and applied.

Each window gives two measurements of the shift, one on fine detail and one on coarser
detail. A misregistration is a rigid translation: every window and every scale sees the same
shift, within the measuring noise (0.05 px on a shifted copy of a real image). Relief and
shadows seen from another view or sun angle move features by amounts that depend on the
feature and its scale, so the windows and scales of a registered pair disagree (measured on
LEVIR-CD: 0.5 to 4 px). The shift is applied only when

1. at least ``MIN_WINDOWS`` windows, and at least half of them, have a clear correlation
   peak (two windows give a spread with one degree of freedom, and windows may overlap by a
   quarter: two that agree by chance, e.g. on the same displaced roofs, would prove nothing;
   measured on a LEVIR-CD crop with no change: two of three windows at -1.4 px);
2. their measurements, at both scales, lie within ``AGREE_PX`` of the median shift; and
3. the shift is longer than its uncertainty, which adds in quadrature a random part, the
   95% Student-t half-width of the windows' fine-scale mean (``t(0.975, k - 1) * s /
   sqrt(k)``, ``s`` the per-axis standard deviation about the median), and a systematic
   part, the distance between the two scales' mean shifts (a bias no number of windows
   averages away); never less than the measuring step ``1 / upsample_factor``.

Otherwise the shift is reported, with why it was not applied, and the after image is left
as it is: moving it by an unproven shift adds false change at every edge.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np
from scipy import stats

from pipeline.errors import PipelineWarning
from pipeline.model import CoregParams, CoregResult

__all__ = ["AGREE_PX", "CONFIDENCE", "MIN_WINDOWS", "WindowShift", "consensus_shift"]

AGREE_PX = 1.0
CONFIDENCE = 0.95
MIN_WINDOWS = 3


class WindowShift(NamedTuple):
    """One window's measurements: the fine-scale shift with its registration ``error`` and
    ``peak_ratio``, and the coarse-scale shift ``coarse_dy, coarse_dx`` (same sign)."""

    dy: float
    dx: float
    error: float
    peak_ratio: float
    coarse_dy: float
    coarse_dx: float


def _not_applied(dy, dx, error, ratio, note, *, uncertainty=math.nan, warn=True):
    """A result that is reported but not applied; warned unless it is the expected case."""
    if warn:
        warnings.warn(note, PipelineWarning, stacklevel=4)
    return CoregResult(dy, dx, error, ratio, applied=False, note=note,
                       uncertainty_px=uncertainty)


def _uncertainty_px(fine: np.ndarray, coarse: np.ndarray, center: np.ndarray,
                    step_px: float) -> float:
    """Uncertainty radius of ``center`` from ``k`` windows' fine and coarse ``(k, 2)`` shifts."""
    k = len(fine)
    sd = math.sqrt(float(((fine - center) ** 2).sum()) / (2 * (k - 1)))
    random_px = float(stats.t.ppf(0.5 + CONFIDENCE / 2, k - 1)) * sd / math.sqrt(k)
    scale_bias_px = float(np.hypot(*(fine.mean(axis=0) - coarse.mean(axis=0))))
    return max(math.hypot(random_px, scale_bias_px), step_px)


def consensus_shift(windows: list[WindowShift], params: CoregParams) -> CoregResult:
    """Reduce the windows' measurements to one shift, applied only when proven.

    Parameters
    ----------
    windows
        One `WindowShift` per measured window (a window that could not be measured has
        ``peak_ratio`` 0).
    params
        ``min_peak_ratio`` (a clear peak) and ``upsample_factor`` (the measuring step).

    Returns
    -------
    CoregResult
        ``dy, dx`` the median fine-scale shift of the windows with a clear peak (of all
        windows when none has one), ``uncertainty_px`` its uncertainty (NaN when not
        measurable) and ``note`` the reason for ``applied``. Weak peaks, too few clear windows
        and disagreement warn (`PipelineWarning`); a shift within its uncertainty does not
        (that is what a registered pair gives).
    """
    n = len(windows)
    strong = [w for w in windows if w.peak_ratio >= params.min_peak_ratio]
    if not strong:
        best = max(windows, key=lambda w: w.peak_ratio)
        return _not_applied(best.dy, best.dx, best.error, best.peak_ratio,
                            f"weak correlation peak (best ratio {best.peak_ratio:.2f} < "
                            f"{params.min_peak_ratio} in {n} windows), shift not applied")
    k = len(strong)
    fine = np.array([(w.dy, w.dx) for w in strong])
    dy, dx = (float(v) for v in np.median(fine, axis=0))
    error = float(np.median([w.error for w in strong]))
    ratio = float(np.median([w.peak_ratio for w in strong]))
    if k < MIN_WINDOWS or 2 * k < n:
        return _not_applied(dy, dx, error, ratio,
                            f"too few windows with a clear peak ({k} of {n}; at least "
                            f"{MIN_WINDOWS} and half are needed), shift ({dy:.2f}, {dx:.2f}) "
                            "not applied")
    coarse = np.array([(w.coarse_dy, w.coarse_dx) for w in strong])
    center = np.array([dy, dx])
    spread = float(np.hypot(*(np.concatenate([fine, coarse]) - center).T).max())
    if spread > AGREE_PX:
        return _not_applied(dy, dx, error, ratio,
                            f"windows disagree (shifts up to {spread:.2f} px from the median "
                            f"({dy:.2f}, {dx:.2f}) across {k} windows and two feature "
                            "scales), shift not applied")
    uncertainty = _uncertainty_px(fine, coarse, center, 1.0 / params.upsample_factor)
    size = math.hypot(dy, dx)
    if size <= uncertainty:
        return _not_applied(dy, dx, error, ratio,
                            f"estimated ({dy:.2f}, {dx:.2f}) px, not applied: within "
                            f"uncertainty ({size:.2f} <= {uncertainty:.2f} px, {k} windows)",
                            uncertainty=uncertainty, warn=False)
    return CoregResult(dy, dx, error, ratio, applied=True, uncertainty_px=uncertainty,
                       note=f"{k} of {n} windows agree within {spread:.2f} px at two feature "
                            f"scales; shift {size:.2f} px +- {uncertainty:.2f} px")
