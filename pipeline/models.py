"""pipeline.models: load and save the trained change models shipped in ``models/`` (I/O only).

A model is two files side by side: the model itself and ``<name>.json``, its card (decision
threshold, clean-up parameters, the training data and protocol, and the SHA-256 of the model
file, checked at load). The LightGBM pixel classifier is ``<name>.txt``, a LightGBM text model
(readable, stable across LightGBM versions); the siamese U-Net is ``<name>.npz``, its folded
arrays, read without pickle. Models are files in the repository; nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.files import atomic_write_bytes

__all__ = ["ChangeModel", "CnnModel", "DEFAULT_MODEL_PATH", "DEFAULT_CNN_PATH", "load_model",
           "load_fold_models", "save_model", "load_cnn", "load_cnn_folds", "save_cnn"]

DEFAULT_MODEL_PATH = Path(__file__).resolve().parents[1] / "models" / "building_change.json"
DEFAULT_CNN_PATH = DEFAULT_MODEL_PATH.with_name("building_change_cnn.json")


@dataclass(frozen=True)
class ChangeModel:
    """A trained pixel classifier with its decision threshold and clean-up parameters."""

    booster: Any
    feature_names: tuple[str, ...]
    threshold: float
    min_area_px: int
    smooth_sigma_px: float = 1.0
    min_area_m2: float = 0.0
    card: dict[str, Any] = field(default_factory=dict, compare=False)

    def min_area_at(self, res_m: float) -> int:
        """The minimum region size in pixels at ``res_m`` (``min_area_m2`` if set, else px)."""
        if self.min_area_m2 > 0:
            return max(1, round(self.min_area_m2 / (res_m * res_m)))
        return self.min_area_px

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Probability of change for each row of an ``(n, n_features)`` float32 array."""
        return np.asarray(self.booster.predict(features, num_threads=2), dtype=np.float32)


def save_model(booster: Any, card: dict[str, Any], json_path: str | Path) -> Path:
    """Write ``booster`` as ``<name>.txt`` and ``card`` plus the text's SHA-256 as ``json_path``.

    Both files are written atomically and replace earlier versions (a model is rebuilt by
    ``make train``; git keeps the history).
    """
    json_path = Path(json_path)
    text_path = json_path.with_suffix(".txt")
    text = booster.model_to_string()
    atomic_write_bytes(text_path, text.encode(), overwrite=True)
    card = {**card, "model_file": text_path.name,
            "model_sha256": hashlib.sha256(text.encode()).hexdigest()}
    atomic_write_bytes(json_path, (json.dumps(card, indent=2) + "\n").encode(), overwrite=True)
    return json_path


def _checked_bytes(card_path: Path, card: dict[str, Any], command: str) -> bytes:
    """The bytes of the model file named in ``card``, refused unless they hash to its SHA-256."""
    model_path = card_path.parent / card["model_file"]
    data = model_path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != card["model_sha256"]:
        raise ValueError(
            f"{model_path} has SHA-256 {digest[:12]}..., its card {card_path.name} expects "
            f"{card['model_sha256'][:12]}...: the model file was changed. Retrain with "
            f"`{command}` or restore it from git."
        )
    return data


def load_model(path: str | Path = DEFAULT_MODEL_PATH) -> ChangeModel:
    """Load a model card and its LightGBM text model.

    Parameters
    ----------
    path
        The ``.json`` card; the text model named in it sits beside it.

    Returns
    -------
    ChangeModel

    Raises
    ------
    FileNotFoundError
        If either file is missing.
    ValueError
        If the text model does not match the card's SHA-256 (a partial or edited file).
    """
    import lightgbm  # heavy, and only needed here

    path = Path(path)
    card = json.loads(path.read_text())
    text = _checked_bytes(path, card, "make train").decode()
    booster = lightgbm.Booster(model_str=text)
    return ChangeModel(booster=booster, feature_names=tuple(card["feature_names"]),
                       threshold=float(card["threshold"]),
                       min_area_px=int(card.get("min_area_px", 0)),
                       smooth_sigma_px=float(card.get("smooth_sigma_px", 1.0)),
                       min_area_m2=float(card.get("min_area_m2", 0.0)), card=card)


def load_fold_models(model: ChangeModel, path: str | Path = DEFAULT_MODEL_PATH
                     ) -> dict[str, ChangeModel]:
    """The cross-validation fold models named in ``model``'s card, by fold name.

    Each fold model was trained without its fold's held-out images (``held_out`` in its card);
    `pipeline.evaluate` scores them on exactly those images. Empty if the card names none.
    """
    folder = Path(path).parent
    return {name: load_model(folder / card_name)
            for name, card_name in model.card.get("fold_models", {}).items()}


@dataclass(frozen=True)
class CnnModel:
    """The siamese U-Net's folded arrays (`pipeline.detect.convnet`) and its decision rule."""

    weights: dict[str, np.ndarray]
    threshold: float
    smooth_sigma_px: float
    min_area_m2: float
    card: dict[str, Any] = field(default_factory=dict, compare=False)

    def min_area_at(self, res_m: float) -> int:
        """The minimum region size in pixels at ``res_m``."""
        return max(1, round(self.min_area_m2 / (res_m * res_m)))


def _npz_bytes(weights: dict[str, np.ndarray]) -> bytes:
    import io

    buf = io.BytesIO()
    arrays: dict[str, Any] = {k: np.asarray(v, np.float32) for k, v in sorted(weights.items())}
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def save_cnn(weights: dict[str, np.ndarray], card: dict[str, Any], json_path: str | Path
             ) -> Path:
    """Write ``weights`` as ``<name>.npz`` and ``card`` plus the npz's SHA-256 as ``json_path``
    (both atomically; a model is rebuilt by ``make train-cnn``, git keeps the history)."""
    json_path = Path(json_path)
    data = _npz_bytes(weights)
    atomic_write_bytes(json_path.with_suffix(".npz"), data, overwrite=True)
    card = {**card, "model_file": json_path.with_suffix(".npz").name,
            "model_sha256": hashlib.sha256(data).hexdigest()}
    atomic_write_bytes(json_path, (json.dumps(card, indent=2) + "\n").encode(), overwrite=True)
    return json_path


def load_cnn(path: str | Path = DEFAULT_CNN_PATH) -> CnnModel:
    """Load a network card and its ``.npz`` arrays (no pickle), checking the SHA-256.

    Raises
    ------
    FileNotFoundError
        If either file is missing.
    ValueError
        If the arrays do not match the card's SHA-256 (a partial or edited file).
    """
    path = Path(path)
    card = json.loads(path.read_text())
    data = _checked_bytes(path, card, "make train-cnn")
    import io

    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        weights = {k: npz[k].astype(np.float32) for k in npz.files}
    return CnnModel(weights=weights, threshold=float(card["threshold"]),
                    smooth_sigma_px=float(card["smooth_sigma_px"]),
                    min_area_m2=float(card["min_area_m2"]), card=card)


def load_cnn_folds(model: CnnModel, path: str | Path = DEFAULT_CNN_PATH) -> dict[str, CnnModel]:
    """The network's fold models named in its card, by fold name (see `load_fold_models`)."""
    folder = Path(path).parent
    return {name: load_cnn(folder / card_name)
            for name, card_name in model.card.get("fold_models", {}).items()}
