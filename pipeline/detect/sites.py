"""pipeline.detect.sites: change objects and compound outlines to scored ``Evidence``.

Pure: arrays and the grid's georeferencing in, a list of ``Evidence`` out. Scores are in [0, 1]
and every feature carries the measurements behind its score.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import shapely
from affine import Affine

from pipeline.detect.compounds import CompoundCandidate, find_compounds, outline_window
from pipeline.detect.grade import GradeParams, assess_site, grade_site
from pipeline.detect.objects import ChangeObject, extract_objects, is_building_like
from pipeline.detect.texture import compute_crops, grey
from pipeline.model import DetectParams, Evidence, EvidenceKind, ObjectParams, SourceRef

__all__ = ["detect_sites", "building_score", "compound_score"]

# Margin around a compound outline for grading: walls the seed outline misses by up to this
# much are still found (the seed comes from ~10 m texture cells), and towers just outside it.
_GRADE_MARGIN_M = 60.0


def building_score(obj: ChangeObject) -> float:
    """Shape and contrast of a new-building candidate, in [0, 1].

    The mean of its rectangularity, its solidity and its change contrast (mean magnitude over
    the threshold, saturating at twice the threshold).
    """
    contrast = min(1.0, max(0.0, obj.contrast - 1.0))
    return float(np.clip((obj.rectangularity + obj.solidity + contrast) / 3.0, 0.0, 1.0))


def compound_score(
    cand: CompoundCandidate, n_buildings: int, weights: Sequence[float]
) -> tuple[float, dict[str, float]]:
    """Score a compound from texture contrast, evidence fill and new buildings inside.

    Returns the weighted score and its three terms, each in [0, 1]: contrast is the texture
    gain inside minus around the outline over ``log 2`` (twice the edge density saturates);
    fill is the share of the outline's cells above the evidence threshold; buildings
    saturates as ``1 - exp(-n / 5)``.
    """
    terms = {
        "score_contrast": float(np.clip((cand.gain_inside - cand.gain_outside) / math.log(2), 0, 1)),
        "score_fill": float(np.clip(cand.evidence_fill, 0, 1)),
        "score_buildings": float(1.0 - math.exp(-n_buildings / 5.0)),
    }
    w = np.asarray(weights, dtype=float)
    score = float(np.dot(w / w.sum(), list(terms.values())))
    return score, terms


def _grade(before: np.ndarray, after: np.ndarray, cand: CompoundCandidate, *,
           transform: Affine, res_m: float) -> dict[str, Any]:
    """Grade a compound with its reasons and what the resolution could not show.

    Fine imagery (walls resolvable): walls, fences and towers are measured around the outline
    (``grade.assess_site``). Coarse imagery: the footprint rules of ``grade.grade_site``, where
    rectangularity is the share of the outline covered by construction evidence.
    """
    thresholds = GradeParams()
    if res_m <= thresholds.max_wall_res_m:
        # Wall and tower measures need the pixels, but only around this outline: the pair is
        # cropped to the outline plus a margin (computed there only when it is a Dask pair).
        rows, cols, window = outline_window(cand.polygon, transform, before.shape,
                                            margin_px=max(1, round(_GRADE_MARGIN_M / res_m)))
        b, a = compute_crops([before[..., rows, cols], after[..., rows, cols]])
        found = assess_site(b, a, cand.polygon, transform=window, res_m=res_m,
                            grades=thresholds)
        m = dict(found.measurements)
    else:
        m = {"area_m2": float(cand.polygon.area), "rectangularity": cand.evidence_fill}
        grade, reasons, caveats = grade_site(m, resolution_m=res_m, thresholds=thresholds)
        m = {"grade": grade, "grade_reasons": reasons, "grade_caveats": caveats,
             "closure_ratio": None, "wall_length_m": None, "double_fence": None,
             "watchtower_count": None}
    m.pop("area_m2", None)
    m.pop("resolution_m", None)
    m["grade_reasons"] = "; ".join(m["grade_reasons"])
    m["grade_caveats"] = "; ".join(m["grade_caveats"])
    return m


def _change_score(obj: ChangeObject) -> float:
    """Contrast of a change region: 0 at the threshold, 1 at twice the threshold."""
    return float(min(1.0, max(0.0, obj.contrast - 1.0)))


def _compound_measures(cand: CompoundCandidate) -> dict[str, float]:
    return {
        "orientation_deg": cand.orientation_deg,
        "length_m": cand.length_m,
        "width_m": cand.width_m,
        "perimeter_m": float(cand.polygon.length),
        "evidence_fill": cand.evidence_fill,
        "texture_gain_inside": cand.gain_inside,
        "texture_gain_outside": cand.gain_outside,
        "texture_gain_threshold": cand.gain_threshold,
        "cell_m": cand.cell_m,
    }


def _evidence(kind: EvidenceKind, idx: int, geom: shapely.Geometry, score: float,
              measures: dict[str, Any], parent: str | None = None, *, crs: str, res_m: float,
              before: SourceRef, after: SourceRef, params: DetectParams) -> Evidence:
    return Evidence(
        id=f"{kind}-{idx:04d}", kind=kind, geometry=geom, crs=crs,
        score=round(float(score), 4), area_m2=float(geom.area),
        measurements={**measures, "resolution_m": res_m}, before=before, after=after,
        params=params, parent=parent,
    )


def _object_measures(obj: ChangeObject) -> dict[str, float]:
    return {
        "solidity": obj.solidity,
        "rectangularity": obj.rectangularity,
        "elongation": obj.elongation,
        "mean_magnitude": obj.mean_magnitude,
        "contrast": obj.contrast,
        "brightness_change": obj.brightness_change,
    }


def detect_sites(
    before: np.ndarray,
    after: np.ndarray,
    mask: np.ndarray,
    magnitude: np.ndarray,
    *,
    transform: Affine,
    crs: str,
    threshold: float,
    params: DetectParams,
    before_ref: SourceRef,
    after_ref: SourceRef,
) -> list[Evidence]:
    """Turn a change mask and the image pair into compound, building and change evidence.

    Parameters
    ----------
    before, after
        ``(band, y, x)`` float32 stacks on the working grid, after co-registered and
        normalized to before; NaN = nodata.
    mask
        uint8 change mask (1 change, 0 none, 255 nodata) on the same grid.
    magnitude
        float32 change magnitude on the same grid.
    transform, crs
        The working grid's georeferencing; geometries come out in ``crs``.
    threshold
        The magnitude threshold behind ``mask``.
    params
        All detection parameters (``params.objects`` is used here; the whole is recorded).
    before_ref, after_ref
        Provenance attached to every feature.

    Returns
    -------
    Evidence sorted by kind (compounds first) and score, descending.
    """
    op: ObjectParams = params.objects
    res_m = abs(transform.a)
    delta = grey(after) - grey(before)
    objects = extract_objects(
        mask, magnitude, delta, transform=transform, threshold=threshold,
        min_area_m2=min(op.building_min_area_m2, op.change_min_area_m2),
    )
    candidates, _, _ = find_compounds(before, after, transform=transform, res_m=res_m, params=op)

    make = functools.partial(_evidence, crs=crs, res_m=res_m, before=before_ref,
                             after=after_ref, params=params)
    buildings = [o for o in objects if is_building_like(
        o, min_area_m2=op.building_min_area_m2, max_area_m2=op.building_max_area_m2,
        min_solidity=op.building_min_solidity, min_rectangularity=op.building_min_rectangularity,
        max_elongation=op.building_max_elongation)]
    buildings.sort(key=lambda o: (-building_score(o), o.label))
    building_labels = {o.label for o in buildings}

    accepted = []
    claimed: set[int] = set()
    for cand in candidates:  # strongest evidence first claims the buildings inside it
        inside = [b for b in buildings
                  if b.label not in claimed and cand.polygon.contains(b.polygon.centroid)]
        score, terms = compound_score(cand, len(inside), op.score_weights)
        if score < op.min_score or cand.evidence_fill < op.compound_min_fill:
            continue
        claimed.update(b.label for b in inside)
        accepted.append((score, cand, inside, terms))
    accepted.sort(key=lambda t: -t[0])

    found: list[Evidence] = []
    parent_of: dict[int, str] = {}
    for idx, (score, cand, inside, terms) in enumerate(accepted, start=1):
        measures = {**terms, **_compound_measures(cand), "building_count": len(inside),
                    "building_area_m2": float(sum(b.area_m2 for b in inside))}
        measures.update(_grade(before, after, cand, transform=transform, res_m=res_m))
        compound = make("compound", idx, cand.polygon, score, measures)
        parent_of.update({b.label: compound.id for b in inside})
        found.append(compound)
    for idx, b in enumerate(buildings, start=1):
        found.append(make("new_building", idx, b.polygon, building_score(b),
                          _object_measures(b), parent=parent_of.get(b.label)))
    others = [o for o in objects if o.label not in building_labels
              and o.area_m2 >= op.change_min_area_m2]
    others.sort(key=lambda o: (-_change_score(o), o.label))
    for idx, o in enumerate(others, start=1):
        found.append(make("change", idx, o.polygon, _change_score(o), _object_measures(o)))
    order = {"compound": 0, "new_building": 1, "change": 2}
    found.sort(key=lambda e: (order[e.kind], -e.score, e.id))
    return found
