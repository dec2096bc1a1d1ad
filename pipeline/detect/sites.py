"""pipeline.detect.sites: change objects and compound outlines to scored ``Evidence``.

Pure: arrays and the grid's georeferencing in, a list of ``Evidence`` out. Scores are in [0, 1]
and every feature carries the measurements behind its score.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import dask.array as da
import numpy as np
import shapely
from affine import Affine

from pipeline.core.components import Regions
from pipeline.detect.compounds import CompoundCandidate, corner_candidate, find_compounds
from pipeline.detect.grade import SiteAssessment, site_features
from pipeline.detect.objects import ChangeObject, extract_objects, is_building_like
from pipeline.detect.region_objects import objects_from_regions
from pipeline.detect.regularity import building_layout
from pipeline.detect.texture import grey
from pipeline.detect.towers import outline_orientation_deg
from pipeline.detect.walled import (
    SceneWalls,
    assess_outlines,
    coarse_grade,
    is_fine,
    overlaps,
    parts_of_rings,
    scene_walls,
    site_measures,
    wall_outlines,
)
from pipeline.detect.walls_chunked import Persist
from pipeline.model import (
    EVIDENCE_ORDER,
    DetectParams,
    Evidence,
    EvidenceKind,
    ObjectParams,
    SourceRef,
)

__all__ = ["detect_sites", "building_score", "compound_score"]

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
        "score_contrast": float(np.clip((cand.gain_inside - cand.gain_outside) / math.log(2),
                                        0, 1)),
        "score_fill": float(np.clip(cand.evidence_fill, 0, 1)),
        "score_buildings": float(1.0 - math.exp(-n_buildings / 5.0)),
    }
    w = np.asarray(weights, dtype=float)
    score = float(np.dot(w / w.sum(), list(terms.values())))
    return score, terms


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


def _object_measures(obj: ChangeObject) -> dict[str, float]:
    return {
        "solidity": obj.solidity,
        "rectangularity": obj.rectangularity,
        "elongation": obj.elongation,
        "mean_magnitude": obj.mean_magnitude,
        "contrast": obj.contrast,
        "brightness_change": obj.brightness_change,
    }


@dataclass
class _Site:
    """One accepted compound while it is being assembled."""

    cand: CompoundCandidate
    inside: list[ChangeObject]
    source: str  # "texture" or "walls": what proposed the outline
    grade: dict[str, Any] = field(default_factory=dict)
    assessment: SiteAssessment | None = None


def _greys(before: Any, after: Any, persist: Persist | None) -> tuple[Any, Any]:
    """The grey images of both dates, shared by the objects and the texture search.

    Lazy (Dask) ones are stored once with ``persist`` when given: each would otherwise be
    computed from the band stacks by every reader (the objects' brightness change, the
    texture's scale, edges and crops). Same values either way.
    """
    g_before, g_after = grey(before), grey(after)
    if persist is not None and isinstance(g_before, da.Array):
        g_before, g_after = persist(g_before), persist(g_after)
    return g_before, g_after


@contextmanager
def _timed(timings: dict[str, float] | None, name: str) -> Iterator[None]:
    """Add the seconds spent in the block to ``timings[name]`` (when timings are kept)."""
    start = time.perf_counter()
    yield
    if timings is not None:
        timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - start, 3)


def _outline_candidate(outline: shapely.Polygon, gain: np.ndarray, gain_threshold: float, *,
                       transform: Affine, res_m: float, op: ObjectParams) -> CompoundCandidate:
    """The texture measures of a (traced) rectangular outline on the cell grid."""
    rect = outline if len(outline.exterior.coords) == 5 else \
        shapely.minimum_rotated_rectangle(outline)
    corners = np.asarray(rect.exterior.coords)[:4]
    cols, rows = ~transform * (corners[:, 0], corners[:, 1])
    factor = max(1, int(round(op.cell_m / res_m)))
    return corner_candidate(np.column_stack([rows, cols]),
                            outline_orientation_deg(rect) % 180.0, gain,
                            threshold=gain_threshold, transform=transform, factor=factor,
                            cell_m=factor * res_m)


class _Centroids:
    """Buildings and a spatial index of their centroids, built once for every outline that
    claims buildings (testing every building against every outline grew with their
    product)."""

    def __init__(self, buildings: list[ChangeObject]) -> None:  # noqa: D107
        self.buildings = buildings
        self.tree = shapely.STRtree(
            shapely.centroid(np.array([b.polygon for b in buildings], dtype=object)))

    def inside(self, polygon: shapely.Geometry) -> list[ChangeObject]:
        """The buildings whose centroid ``polygon`` contains, in their order."""
        idx = np.sort(self.tree.query(polygon, predicate="contains"))
        return [self.buildings[i] for i in idx.tolist()]


def _claim(cand: CompoundCandidate, centroids: _Centroids, claimed: set[int]
           ) -> list[ChangeObject]:
    """The buildings not yet claimed whose centroid the candidate's outline contains."""
    return [b for b in centroids.inside(cand.polygon) if b.label not in claimed]


def _fine_sites(sites: list[_Site], buildings: list[ChangeObject], before: Any, after: Any,
                *, transform: Affine, res_m: float, params: DetectParams, scene: SceneWalls,
                gain: np.ndarray, gain_threshold: float) -> list[_Site]:
    """Grade fine-resolution sites on their traced outlines; keep the new enclosures.

    A site whose outline no new wall encloses (grade 0: new roofs, an old compound whose
    roofs or season changed) is not a compound; its buildings stay new buildings of no site.
    An outline inside a better-closed one (`walled.parts_of_rings`) is dropped.
    Where outlines overlap (a texture seed and the wall ring that closes it), the higher
    grade, then the better closed, is kept; each kept site then claims the buildings inside.
    """
    found = assess_outlines(before, after, [s.cand.polygon for s in sites],
                            transform=transform, res_m=res_m, params=params, scene=scene)
    parts = parts_of_rings(found)  # never kept over the ring they stand in
    ranked = sorted((t for k, t in enumerate(zip(sites, found, strict=True)) if k not in parts),
                    key=lambda t: (-t[1].grade, -t[1].enclosure.closure_ratio))
    kept: list[_Site] = []
    claimed: set[int] = set()
    centroids = _Centroids(buildings)
    for site, assessment in ranked:
        if assessment.grade < 1 or overlaps(assessment.outline, [k.cand.polygon for k in kept]):
            continue
        cand = _outline_candidate(assessment.outline, gain, gain_threshold,
                                  transform=transform, res_m=res_m, op=params.objects)
        inside = _claim(cand, centroids, claimed)
        claimed.update(b.label for b in inside)
        kept.append(_Site(cand, inside, site.source,
                          site_measures(assessment, res_m=res_m, params=params), assessment))
    return kept


def _propose(candidates: list[CompoundCandidate], buildings: list[ChangeObject],
             op: ObjectParams) -> list[_Site]:
    """Texture candidates with enough evidence; the strongest first claims its buildings."""
    sites: list[_Site] = []
    claimed: set[int] = set()
    centroids = _Centroids(buildings)
    for cand in candidates:
        inside = _claim(cand, centroids, claimed)
        score, _ = compound_score(cand, len(inside), op.score_weights)
        if score < op.min_score or cand.evidence_fill < op.compound_min_fill:
            continue
        claimed.update(b.label for b in inside)
        sites.append(_Site(cand, inside, "texture"))
    return sites


def _site_evidence(sites: list[_Site], make: Callable[..., Evidence], params: DetectParams
                   ) -> tuple[list[Evidence], dict[int, str]]:
    """Compound, wall and watchtower evidence of the sites, and building label -> site id."""
    scored = []
    for site in sites:
        score, terms = compound_score(site.cand, len(site.inside), params.objects.score_weights)
        if site.assessment is not None:
            # Where walls are resolvable they are evidence too: a walled compound with few
            # buildings has little texture gain, yet its closed wall is strong evidence.
            terms["score_construction"] = score
            terms["score_walls"] = float(np.clip(site.assessment.enclosure.closure_ratio, 0, 1))
            score = (score + terms["score_walls"]) / 2.0
        scored.append((score, terms, site))
    scored.sort(key=lambda t: -t[0])
    found: list[Evidence] = []
    site_of: dict[int, str] = {}
    count = {"wall": 0, "watchtower": 0}
    seen: set[bytes] = set()
    for idx, (score, terms, site) in enumerate(scored, start=1):
        sid = f"compound-{idx:04d}"
        measures = {**terms, **_compound_measures(site.cand), "outline_source": site.source,
                    "building_count": len(site.inside),
                    "building_area_m2": float(sum(b.area_m2 for b in site.inside)),
                    **building_layout([b.polygon for b in site.inside],
                                      min_in_row=params.objects.row_min_buildings,
                                      size_tolerance=params.objects.row_size_tolerance,
                                      angle_tolerance_deg=params.objects.row_angle_tolerance_deg),
                    **site.grade}
        found.append(make("compound", idx, site.cand.polygon, score, measures, sid))
        site_of.update({b.label: sid for b in site.inside})
        parts = site_features(site.assessment, walls=params.walls) if site.assessment else []
        for part in parts:
            key = shapely.to_wkb(part["geometry"])
            if key in seen:  # a wall between two sites belongs to the first
                continue
            seen.add(key)
            count[part["kind"]] += 1
            found.append(make(part["kind"], count[part["kind"]], part["geometry"],
                              part["score"], part["measurements"], sid))
    return found, site_of


def detect_sites(
    before: np.ndarray,
    after: np.ndarray,
    mask: np.ndarray | Regions,
    magnitude: np.ndarray,
    *,
    transform: Affine,
    crs: str,
    threshold: float,
    params: DetectParams,
    before_ref: SourceRef,
    after_ref: SourceRef,
    timings: dict[str, float] | None = None,
    persist: Persist | None = None,
    found_by: dict[str, str] | None = None,
) -> list[Evidence]:
    """Turn a change mask and the image pair into compound, wall, tower, building and change
    evidence.

    A compound's score is `compound_score` (texture contrast, evidence fill, buildings);
    where walls are resolvable it is the mean of that and the closure ratio of its traced
    wall (``score_construction`` and ``score_walls`` in its measurements).

    Compounds are proposed by texture gain (`find_compounds`) and, where walls are resolvable
    (``params.grade.max_wall_res_m`` or finer), also by the outlines new walls close
    (`walled.wall_outlines`; a walled compound with few buildings has little texture gain).
    There a compound must be a new enclosure (grade 1 or more) on its traced outline: new
    roofs without a wall, or an old compound whose roofs or season changed, stay new
    buildings and change. Coarser, compounds are graded from their footprint.

    Parameters
    ----------
    before, after
        ``(band, y, x)`` float32 stacks on the working grid (NumPy or Dask), after
        co-registered and normalized to before; NaN = nodata.
    mask
        uint8 change mask (1 change, 0 none, 255 nodata) on the same grid; or, for a chunked
        run, its change pixels as `Regions` (``label_regions(mask == 1, connectivity=2)``),
        whose objects are read window by window (`objects_from_regions`): same evidence.
    magnitude
        float32 change magnitude on the same grid.
    transform, crs
        The working grid's georeferencing; geometries come out in ``crs``.
    threshold
        The magnitude threshold behind ``mask``.
    params
        All detection parameters (``objects``, ``walls``, ``towers`` and ``grade`` are used;
        the whole is recorded).
    before_ref, after_ref
        Provenance attached to every feature.
    timings
        When given, seconds per sub-step are added to it: ``objects`` (with the grey
        images), ``compounds``, ``walls`` (fine imagery only) and ``grade``.
    persist
        For Dask input: computes a lazy map once and returns it stored (a chunked run's
        scratch files): the two grey images, and wall-grid maps (`walled.scene_walls`); None
        keeps wall-grid maps in memory and the grey images lazy.
    found_by
        Measurements added to every new building and change region, naming what made the
        change mask (e.g. ``{"found_by": "cnn", "model_sha256": ...}``); None adds nothing
        (the change vector analysis of the default run).

    Returns
    -------
    Evidence ordered by kind (``model.EVIDENCE_ORDER``: compounds first) and score,
    descending. Walls, watchtowers and new buildings carry the ``site_id`` of their compound.
    """
    op: ObjectParams = params.objects
    res_m = abs(transform.a)
    with _timed(timings, "objects"):
        grey_before, grey_after = _greys(before, after, persist)
        delta = grey_after - grey_before
        min_area_m2 = min(op.building_min_area_m2, op.change_min_area_m2)
        if isinstance(mask, Regions):  # a chunked run: objects read window by window
            objects = objects_from_regions(mask, magnitude, delta, transform=transform,
                                           threshold=threshold, min_area_m2=min_area_m2)
        else:
            objects = extract_objects(mask, magnitude, delta, transform=transform,
                                      threshold=threshold, min_area_m2=min_area_m2)
        buildings = [o for o in objects if is_building_like(
            o, min_area_m2=op.building_min_area_m2, max_area_m2=op.building_max_area_m2,
            min_solidity=op.building_min_solidity,
            min_rectangularity=op.building_min_rectangularity,
            max_elongation=op.building_max_elongation)]
        buildings.sort(key=lambda o: (-building_score(o), o.label))
    with _timed(timings, "compounds"):
        candidates, gain, gain_threshold = find_compounds(
            before, after, transform=transform, res_m=res_m, params=op,
            grey_before=grey_before, grey_after=grey_after)
        sites = _propose(candidates, buildings, op)
    if is_fine(res_m, params):
        with _timed(timings, "walls"):
            # the walls read only the grey images: the stored ones, not the band stacks again
            scene = scene_walls(grey_before, grey_after, transform=transform, res_m=res_m,
                                params=params, persist=persist)
            sites += [_Site(_outline_candidate(outline, gain, gain_threshold,
                                               transform=transform, res_m=res_m, op=op),
                            [], "walls") for outline in wall_outlines(scene, params=params)]
        with _timed(timings, "grade"):
            sites = _fine_sites(sites, buildings, before, after, transform=transform, res_m=res_m,
                                params=params, scene=scene, gain=gain,
                                gain_threshold=gain_threshold)
    else:
        with _timed(timings, "grade"):
            for site in sites:
                site.grade = coarse_grade(site.cand.polygon, site.cand.evidence_fill,
                                          res_m=res_m, params=params)
    make = functools.partial(_evidence, crs=crs, res_m=res_m, before=before_ref,
                             after=after_ref, params=params)
    found, site_of = _site_evidence(sites, make, params)
    building_labels = {o.label for o in buildings}
    for idx, b in enumerate(buildings, start=1):
        found.append(make("new_building", idx, b.polygon, building_score(b),
                          {**_object_measures(b), **(found_by or {})}, site_of.get(b.label)))
    others = [o for o in objects if o.label not in building_labels
              and o.area_m2 >= op.change_min_area_m2]
    others.sort(key=lambda o: (-_change_score(o), o.label))
    for idx, o in enumerate(others, start=1):
        found.append(make("change", idx, o.polygon, _change_score(o),
                          {**_object_measures(o), **(found_by or {})}))
    found.sort(key=lambda e: (EVIDENCE_ORDER.index(e.kind), -e.score, e.id))
    return found


def _evidence(kind: EvidenceKind, idx: int, geom: shapely.Geometry, score: float,
              measures: dict[str, Any], site_id: str | None = None, *, crs: str, res_m: float,
              before: SourceRef, after: SourceRef, params: DetectParams) -> Evidence:
    return Evidence(
        id=f"{kind}-{idx:04d}", kind=kind, geometry=geom, crs=crs,
        score=round(float(score), 4), area_m2=float(geom.area),
        measurements={**measures, "resolution_m": res_m}, before=before, after=after,
        params=params, site_id=site_id,
    )
