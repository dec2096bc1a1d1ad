"""pipeline.watch.findings: give findings that persist across runs the same id.

A finding of a new analysis is the same as a known finding of its site when both are of the same
``kind`` and their outlines overlap: the intersection covers at least ``MIN_OVERLAP`` of the
smaller of the two. Each new finding takes the best-overlapping known one not already taken
(greedy, by overlap then score), so two new findings never share an id. Geometries are compared
in the site's UTM zone (lon/lat areas are not metric).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely
from pyproj import Transformer
from shapely.geometry import shape
from shapely.geometry.base import BaseGeometry

__all__ = ["Finding", "KnownFinding", "MIN_OVERLAP", "TRACKED_KINDS", "match_findings",
           "findings_from_geojson"]

MIN_OVERLAP = 0.5
TRACKED_KINDS = ("compound", "new_building", "wall", "watchtower")


@dataclass(frozen=True)
class Finding:
    """One feature of a run's ``changes.geojson``: lon/lat geometry (GeoJSON dict) and figures."""

    feature_id: str
    kind: str
    score: float | None
    area_m2: float | None
    geometry: dict[str, Any]


@dataclass(frozen=True)
class KnownFinding:
    """A finding already in the state database."""

    id: str
    kind: str
    geometry: dict[str, Any]


def findings_from_geojson(fc: dict[str, Any], *,
                          kinds: Sequence[str] = TRACKED_KINDS) -> list[Finding]:
    """The tracked findings of a FeatureCollection, in file order."""
    out = []
    for feature in fc.get("features", []):
        props = feature.get("properties") or {}
        if props.get("kind") not in kinds or not feature.get("geometry"):
            continue
        out.append(Finding(str(props.get("id", feature.get("id"))), str(props["kind"]),
                           props.get("score"), props.get("area_m2"), feature["geometry"]))
    return out


def match_findings(new: Sequence[Finding], known: Sequence[KnownFinding], *,
                   crs: str) -> list[str | None]:
    """For each new finding, the id of the known finding it continues, or None.

    Parameters
    ----------
    new
        Findings of one analysis.
    known
        The site's findings so far.
    crs
        A metric CRS for the site (its UTM zone).

    Returns
    -------
    list
        One entry per ``new`` finding.
    """
    to_metric = functools.partial(_project, crs=crs)
    new_geoms = [to_metric(f.geometry) for f in new]
    known_geoms = [to_metric(k.geometry) for k in known]
    # the intersecting pairs from a spatial index of the known findings (testing every pair
    # grew with new x known, and the known list grows with every analysis); the pairs are
    # ranked by a total order, so the order they are found in does not matter
    hits = (shapely.STRtree(known_geoms).query(new_geoms, predicate="intersects")
            if new_geoms and known_geoms else np.zeros((2, 0), np.intp))
    pairs = _scored(zip(hits[0].tolist(), hits[1].tolist(), strict=True),
                    new, new_geoms, known, known_geoms)
    return _assign(pairs, known, len(new))


def _scored(intersecting: Iterable[tuple[int, int]], new: Sequence[Finding],
            new_geoms: Sequence[BaseGeometry], known: Sequence[KnownFinding],
            known_geoms: Sequence[BaseGeometry]) -> list[tuple[float, float, int, int]]:
    """``(-overlap, -score, i, j)`` of the intersecting ``(new i, known j)`` pairs of one kind
    whose overlap (shared area over the smaller area) reaches `MIN_OVERLAP`."""
    pairs = []
    for i, j in intersecting:
        finding, geom, other_geom = new[i], new_geoms[i], known_geoms[j]
        if known[j].kind != finding.kind:
            continue
        smaller = min(geom.area, other_geom.area)
        overlap = geom.intersection(other_geom).area / smaller if smaller > 0 else 0.0
        if overlap >= MIN_OVERLAP:
            pairs.append((-overlap, -(finding.score or 0.0), i, j))
    return pairs


def _assign(pairs: list[tuple[float, float, int, int]], known: Sequence[KnownFinding],
            n_new: int) -> list[str | None]:
    """Each new finding's known id from ``(-overlap, -score, new i, known j)`` candidate pairs:
    best overlap first, then score, each known finding continued at most once."""
    result: list[str | None] = [None] * n_new
    taken: set[int] = set()
    for _, _, i, j in sorted(pairs):
        if result[i] is None and j not in taken:
            result[i] = known[j].id
            taken.add(j)
    return result


def _project(geometry: dict[str, Any], *, crs: str) -> BaseGeometry:
    """A lon/lat GeoJSON geometry in ``crs``, made valid."""
    geom = shape(geometry)
    projected = shapely.transform(geom, _transformer(crs).transform, interleaved=False)
    return shapely.make_valid(projected)


@functools.lru_cache(maxsize=64)
def _transformer(crs: str) -> Transformer:
    """Cached lon/lat -> ``crs`` transformer."""
    return Transformer.from_crs("EPSG:4326", crs, always_xy=True)
