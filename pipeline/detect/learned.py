"""pipeline.detect.learned: new-building probability from a trained pixel classifier.

A gradient-boosted classifier (trained by ``scripts/train.py``, loaded by
`pipeline.models.load_model`) scores every pixel's feature vector from
`pipeline.core.features`; `change_probability_mask` turns the probability into a cleaned
change mask. Nothing here reads files: the caller passes the loaded model in.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import xarray as xr
from scipy import ndimage as ndi

from pipeline.core.features import FEATURE_NAMES, pixel_features

__all__ = ["PixelModel", "predict_change", "change_probability_mask"]

_CHUNK_PX = 1 << 18


class PixelModel(Protocol):
    """What `predict_change` needs of a model (`pipeline.models.ChangeModel` is one)."""

    feature_names: tuple[str, ...]
    threshold: float
    min_area_px: int
    smooth_sigma_px: float

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Probability of change for each row of an ``(n, n_features)`` float32 array."""
        ...


def _as_rgb(image: np.ndarray | xr.DataArray, name: str) -> np.ndarray:
    """A (3, y, x) float32 array from a NumPy array or a ('band', 'y', 'x') DataArray."""
    if isinstance(image, xr.DataArray):
        image = image.transpose("band", "y", "x").values
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[0] != 3:
        raise ValueError(
            f"'{name}' must be a (3, y, x) red-green-blue image, got shape {arr.shape}. "
            "Select the red, green and blue bands first."
        )
    return arr


def predict_change(
    before: np.ndarray | xr.DataArray,
    after: np.ndarray | xr.DataArray,
    *,
    model: PixelModel,
) -> np.ndarray:
    """Per-pixel probability that a building appeared between ``before`` and ``after``.

    Parameters
    ----------
    before, after
        Red-green-blue images ``(3, y, x)`` (NumPy or a ``("band", "y", "x")`` DataArray) on
        the same grid, any scale, NaN nodata; about 0.3-1 m pixels, as in training.
    model
        A trained model, e.g. from `pipeline.models.load_model`; its feature names must be
        `pipeline.core.features.FEATURE_NAMES`.

    Returns
    -------
    numpy.ndarray
        ``(y, x)`` float32 in [0, 1]; NaN where either date is nodata. Computed.

    Raises
    ------
    ValueError
        If the images are not ``(3, y, x)`` of one shape, or the model was trained on other
        features.
    """
    if tuple(model.feature_names) != FEATURE_NAMES:
        raise ValueError(
            "The model was trained on other features than pipeline.core.features computes "
            f"({len(model.feature_names)} vs {len(FEATURE_NAMES)} names). Retrain it with "
            "`make train`."
        )
    feats = pixel_features(_as_rgb(before, "before"), _as_rgb(after, "after"))
    n, ny, nx = feats.shape
    flat = feats.reshape(n, -1).T
    valid = np.isfinite(flat).all(axis=1)
    prob = np.full(ny * nx, np.nan, np.float32)
    idx = np.flatnonzero(valid)
    for start in range(0, idx.size, _CHUNK_PX):
        sel = idx[start:start + _CHUNK_PX]
        prob[sel] = model.predict_proba(np.ascontiguousarray(flat[sel]))
    return np.clip(prob, 0.0, 1.0).reshape(ny, nx)


def change_probability_mask(
    probability: np.ndarray,
    *,
    threshold: float,
    min_area_px: int = 0,
    smooth_sigma_px: float = 1.0,
) -> np.ndarray:
    """Threshold a change probability into a cleaned mask.

    Parameters
    ----------
    probability
        ``(y, x)`` probabilities, NaN nodata.
    threshold
        Pixels whose (smoothed) probability exceeds it are change; chosen by cross-validation
        on the training tiles and stored with the model.
    min_area_px
        8-connected change regions smaller than this are dropped.
    smooth_sigma_px
        Gaussian smoothing of the probability before thresholding (0 = none).

    Returns
    -------
    numpy.ndarray
        ``(y, x)`` bool, True = change; False at nodata.
    """
    prob = np.asarray(probability, dtype=np.float32)
    valid = np.isfinite(prob)
    filled = np.where(valid, prob, 0.0).astype(np.float32)
    if smooth_sigma_px > 0:
        filled = ndi.gaussian_filter(filled, smooth_sigma_px, mode="reflect")
    mask = valid & (filled > threshold)
    if min_area_px > 1:
        mask = _drop_small(mask, min_area_px)
    return mask


def _drop_small(mask: np.ndarray, min_px: int) -> np.ndarray:
    """Remove 8-connected regions of ``mask`` smaller than ``min_px`` pixels."""
    labels, n = ndi.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_px
    keep[0] = False
    return keep[labels]
