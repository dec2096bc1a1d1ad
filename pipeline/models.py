"""pipeline.models: load and save the trained change model shipped in ``models/`` (I/O only).

A model is two files side by side: ``<name>.txt``, a LightGBM text model (readable, stable
across LightGBM versions, no pickle), and ``<name>.json``, its card: feature names, decision
threshold, clean-up parameters, the training data and protocol, and the SHA-256 of the text
model, checked at load. Models are files in the repository; nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ChangeModel", "DEFAULT_MODEL_PATH", "load_model", "save_model"]

DEFAULT_MODEL_PATH = Path(__file__).resolve().parents[1] / "models" / "building_change.json"


@dataclass(frozen=True)
class ChangeModel:
    """A trained pixel classifier with its decision threshold and clean-up parameters."""

    booster: Any
    feature_names: tuple[str, ...]
    threshold: float
    min_area_px: int
    smooth_sigma_px: float = 1.0
    card: dict[str, Any] = field(default_factory=dict, compare=False)

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Probability of change for each row of an ``(n, n_features)`` float32 array."""
        return np.asarray(self.booster.predict(features, num_threads=2), dtype=np.float32)


def save_model(booster: Any, card: dict[str, Any], json_path: str | Path) -> Path:
    """Write ``booster`` as ``<name>.txt`` and ``card`` (plus the text's SHA-256) as ``json_path``."""
    json_path = Path(json_path)
    text_path = json_path.with_suffix(".txt")
    text = booster.model_to_string()
    text_path.write_text(text)
    card = {**card, "model_file": text_path.name,
            "model_sha256": hashlib.sha256(text.encode()).hexdigest()}
    json_path.write_text(json.dumps(card, indent=2, sort_keys=False) + "\n")
    return json_path


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
    text_path = path.parent / card["model_file"]
    text = text_path.read_text()
    digest = hashlib.sha256(text.encode()).hexdigest()
    if digest != card["model_sha256"]:
        raise ValueError(
            f"{text_path} has SHA-256 {digest[:12]}..., its card {path.name} expects "
            f"{card['model_sha256'][:12]}...: the model file was changed. Retrain with "
            "`make train` or restore it from git."
        )
    booster = lightgbm.Booster(model_str=text)
    return ChangeModel(booster=booster, feature_names=tuple(card["feature_names"]),
                       threshold=float(card["threshold"]), min_area_px=int(card["min_area_px"]),
                       smooth_sigma_px=float(card.get("smooth_sigma_px", 1.0)), card=card)
