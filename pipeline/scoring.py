"""pipeline.scoring: change-detection metrics and the two plain baselines (pure).

Pixel precision, recall, F1 and IoU of the change class; object precision and recall between
8-connected components matched at IoU >= 0.5; change vector analysis with Otsu's threshold
(`cva_otsu`) and PCA-KMeans after Celik (2009) (`pca_kmeans`). Used by `pipeline.evaluate`.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

from pipeline.datasets import IGNORE

__all__ = ["OBJECT_IOU", "pixel_counts", "pixel_scores", "object_counts", "object_scores",
           "cva_otsu", "pca_kmeans"]

OBJECT_IOU = 0.5
_EIGHT = np.ones((3, 3), bool)


# --- metrics -------------------------------------------------------------------------------

def pixel_counts(pred: np.ndarray, label: np.ndarray) -> np.ndarray:
    """``[tp, fp, fn, tn]`` of a boolean prediction against a 0/1 label; `IGNORE` pixels skipped."""
    pred = np.asarray(pred, bool)
    scored = label != IGNORE
    truth = label == 1
    return np.array([(pred & truth & scored).sum(), (pred & ~truth & scored).sum(),
                     (~pred & truth & scored).sum(), (~pred & ~truth & scored).sum()], np.int64)


def pixel_scores(counts: np.ndarray) -> dict[str, float]:
    """Precision, recall, F1 and IoU of the change class from ``[tp, fp, fn, tn]``.

    Undefined ratios (no prediction, no change) are 0, not NaN.
    """
    tp, fp, fn = (float(c) for c in counts[:3])
    return {"precision": tp / (tp + fp) if tp + fp else 0.0,
            "recall": tp / (tp + fn) if tp + fn else 0.0,
            "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
            "iou": tp / (tp + fp + fn) if tp + fp + fn else 0.0}


def object_counts(pred: np.ndarray, label: np.ndarray, iou_min: float = OBJECT_IOU) -> np.ndarray:
    """``[n_pred, n_pred_matched, n_true, n_true_matched]`` of 8-connected components.

    A component is matched when a component of the other map overlaps it with IoU >= ``iou_min``
    (for ``iou_min >= 0.5`` such a match is one-to-one).
    """
    pl, n_pred = ndi.label(np.asarray(pred, bool), structure=_EIGHT)
    tl, n_true = ndi.label(label == 1, structure=_EIGHT)
    both = (pl > 0) & (tl > 0)
    pairs, inter = np.unique(pl[both].astype(np.int64) * (n_true + 1) + tl[both],
                             return_counts=True)
    p_idx, t_idx = pairs // (n_true + 1), pairs % (n_true + 1)
    p_area = np.bincount(pl.ravel(), minlength=n_pred + 1)
    t_area = np.bincount(tl.ravel(), minlength=n_true + 1)
    iou = inter / (p_area[p_idx] + t_area[t_idx] - inter)
    ok = iou >= iou_min
    return np.array([n_pred, np.unique(p_idx[ok]).size, n_true, np.unique(t_idx[ok]).size])


def object_scores(counts: np.ndarray) -> dict[str, float]:
    """Object precision and recall from `object_counts` (0 if undefined)."""
    n_pred, m_pred, n_true, m_true = (float(c) for c in counts)
    return {"obj_precision": m_pred / n_pred if n_pred else 0.0,
            "obj_recall": m_true / n_true if n_true else 0.0}


# --- baselines -----------------------------------------------------------------------------

def _cva(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Length of the band-difference vector over sqrt(n bands)."""
    diff = np.asarray(after, np.float64) - np.asarray(before, np.float64)
    return np.sqrt((diff * diff).mean(axis=0))


def cva_otsu(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Change vector analysis on the raw bands, thresholded by Otsu; ``(y, x)`` bool."""
    mag = _cva(before, after)
    valid = np.isfinite(mag)
    return valid & (np.nan_to_num(mag, nan=-np.inf) > threshold_otsu(mag[valid]))


def pca_kmeans(before: np.ndarray, after: np.ndarray, *, block: int = 4,
               var_kept: float = 0.9, n_iter: int = 30) -> np.ndarray:
    """PCA-KMeans (Celik 2009) on the CVA difference image; ``(y, x)`` bool.

    Eigenvectors come from the non-overlapping ``block x block`` blocks of the difference image
    (components up to ``var_kept`` of the variance); every pixel's ``block x block``
    neighbourhood is projected on them and k-means (k=2, Lloyd, initialised from the pixels
    below and above the median difference) splits the pixels; the change cluster is the one
    with the larger mean difference.
    """
    diff = np.nan_to_num(_cva(before, after))
    ny, nx = diff.shape
    h = block
    blocks = diff[: ny // h * h, : nx // h * h].reshape(ny // h, h, nx // h, h)
    vecs = blocks.transpose(0, 2, 1, 3).reshape(-1, h * h)
    mean = vecs.mean(axis=0)
    evals, evecs = np.linalg.eigh(np.cov(vecs - mean, rowvar=False))
    evals, evecs = evals[::-1], evecs[:, ::-1]
    n_comp = int(np.searchsorted(np.cumsum(evals) / max(evals.sum(), 1e-12), var_kept) + 1)
    padded = np.pad(diff, ((h // 2, h - 1 - h // 2), (h // 2, h - 1 - h // 2)), mode="edge")
    hood = np.lib.stride_tricks.sliding_window_view(padded, (h, h)).reshape(ny * nx, h * h)
    feats = (hood - mean) @ evecs[:, :n_comp]
    upper = (diff > np.median(diff)).ravel()
    centres = np.stack([feats[~upper].mean(axis=0) if (~upper).any() else feats.mean(axis=0),
                        feats[upper].mean(axis=0) if upper.any() else feats.mean(axis=0)])
    for _ in range(n_iter):
        dist = ((feats[:, None, :] - centres[None]) ** 2).sum(axis=2)
        assign = dist.argmin(axis=1)
        new = np.stack([feats[assign == k].mean(axis=0) if (assign == k).any() else centres[k]
                        for k in range(2)])
        if np.allclose(new, centres):
            break
        centres = new
    flat = diff.ravel()
    means = [flat[assign == k].mean() if (assign == k).any() else -np.inf for k in range(2)]
    return (assign == int(np.argmax(means))).reshape(ny, nx)
