"""pipeline.building_model: the opt-in network of a detect run (``[buildings] model = "cnn"``).

Loads the shipped siamese U-Net (`pipeline.models.load_cnn`, SHA-256 checked against its
card), turns its change probability into the run's change mask (`pipeline.detect.cnn_change`)
and says what the evidence and the manifest record about it. Used by `pipeline.run`.
"""

from __future__ import annotations

from typing import Any

import dask.array
import xarray as xr

from pipeline.detect.cnn_change import cnn_change_mask, cnn_probability
from pipeline.errors import ConfigError
from pipeline.model import BuildingParams
from pipeline.models import CnnModel, load_cnn

__all__ = ["building_model", "cnn_mask", "found_by", "network_label"]


def building_model(params: BuildingParams, model: CnnModel | None = None) -> CnnModel | None:
    """The network a run uses: None unless ``params.model == "cnn"``; then ``model`` if given
    (e.g. a fold network in `pipeline.evaluate`), else the shipped one.

    Raises
    ------
    ConfigError
        The shipped network is missing or does not match its card's SHA-256.
    """
    if params.model != "cnn":
        return None
    if model is not None:
        return model
    try:
        return load_cnn()
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(
            f"buildings.model = 'cnn': the shipped network cannot be loaded ({e}). Restore "
            "models/building_change_cnn.* from git (or rebuild them with `make train-cnn`), "
            "or run with --building-model none.") from e


def network_label(cnn: CnnModel) -> str:
    """The network's part of the run's method line (file and SHA-256)."""
    return (f"change mask of new buildings from the siamese U-Net {cnn.card['model_file']} "
            f"(sha256 {cnn.card['model_sha256']})")


def cnn_mask(before: xr.DataArray, after: xr.DataArray, mask: xr.DataArray, cnn: CnnModel,
             *, res_m: float, scratch: Any, flips: bool = True
             ) -> tuple[xr.DataArray, dict[str, Any]]:
    """The network's change mask on ``mask``'s grid and chunks, and what the manifest records.

    ``flips``: the probability averaged over each tile and its three mirrorings
    (``[buildings] mirrorings``), else one pass.
    ``after`` is co-registered, not normalized (the network standardises each date itself).
    ``scratch`` is the run's store of intermediate Dask arrays (``keep``/``drop``): chunked,
    inputs not stored yet are stored while the network reads them, the probability is stored
    (the smoothing reads it with overlap), and the mask too.
    """
    min_area_px = cnn.min_area_at(res_m)
    # the network's tasks read their windows of the inputs one by one: a lazy after (the
    # co-registration's shift) is stored first, else each window would compute it again
    inputs = scratch.keep(before, after)
    added = [x for x, y in zip(inputs, (before, after), strict=True) if x.data is not y.data]
    prob = scratch.keep(cnn_probability(inputs[0].data, inputs[1].data, weights=cnn.weights,
                                        flips=flips))
    scratch.drop(*added)
    stored: list[Any] = []

    def persist(data: Any) -> Any:
        stored.append(scratch.keep(data))
        return stored[-1]

    data = cnn_change_mask(prob, threshold=cnn.threshold, smooth_sigma_px=cnn.smooth_sigma_px,
                           min_area_px=min_area_px, persist=persist)
    if isinstance(data, dask.array.Array):
        data = data.rechunk(mask.data.chunks)
    out = mask.copy(data=data, deep=False)
    out.attrs.update({"threshold": cnn.threshold, "source": cnn.card["model_file"]})
    out, (changed,) = scratch.keep(out, also=((out.data == 1).sum(),))
    scratch.drop(prob, *stored)
    card = cnn.card
    return out, {
        "model": "cnn", "model_file": card["model_file"], "model_sha256": card["model_sha256"],
        "card": card.get("name", ""), "decision_rule": card.get("decision_rule", ""),
        "threshold": cnn.threshold, "smooth_sigma_px": cnn.smooth_sigma_px,
        "min_area_m2": cnn.min_area_m2, "min_area_px": min_area_px, "flips": flips,
        "standardisation": "per band and date, over the whole scene's pixels valid in both",
        "input": "before and the co-registered after (not normalized)",
        "nodata_edge": "each tile cut to its valid pixels' bounding box (the network sees the "
                       "image's edge, as in training); nodata left inside it filled by "
                       "reflection across the valid border",
        "changed_share": float(changed) / max(1, out.size),
    }


def found_by(cnn: CnnModel | None) -> dict[str, str] | None:
    """What each new building and change region says found it (None: the default CVA)."""
    if cnn is None:
        return None
    return {"found_by": "cnn", "model_file": cnn.card["model_file"],
            "model_sha256": cnn.card["model_sha256"]}
