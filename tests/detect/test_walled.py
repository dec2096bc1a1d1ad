"""Tests for pipeline.detect.walled: which assessed outlines stand inside a walled ring."""

from __future__ import annotations

from types import SimpleNamespace

import shapely
from _scenes import background

from pipeline.detect.grade import assess_site
from pipeline.detect.walled import parts_of_rings
from pipeline.testing import make_walled_compound


def _site(box: tuple[float, float, float, float], closure: float, grade: int = 1):
    """What parts_of_rings reads of a `SiteAssessment`: outline, closure, tolerance, grade."""
    return SimpleNamespace(outline=shapely.box(*box), grade=grade,
                           enclosure=SimpleNamespace(closure_ratio=closure, tolerance_m=3.0))


def test_what_stands_inside_a_better_closed_ring_is_a_part():
    """A part along the ring's walls and an inner ring apart from them are parts of the
    ring; the same ring snapped a little inside, a part better closed than the ring, a part
    of a ring of grade 0, an outline reaching out of the ring and one alone are not."""
    ring = _site((0, 0, 400, 250), 0.98)
    sites = [
        ring,
        _site((0, 0, 150, 250), 0.65),  # west part: the ring's wall on three sides
        _site((20, 20, 380, 230), 0.9),  # an inner fence ring, 20 m inside
        _site((0.5, 0.5, 399.5, 249.5), 0.97),  # the same ring
        _site((250, 0, 400, 250), 0.99),  # a part, better closed than the ring
        _site((600, 0, 1000, 250), 0.98, grade=0),  # a ring of grade 0 ...
        _site((600, 0, 750, 250), 0.7),  # ... and its part
        _site((1200, 0, 1350, 250), 0.7),  # alone
        _site((300, 100, 500, 200), 0.7),  # half outside the ring
    ]
    assert parts_of_rings(sites) == {1, 2}
    assert parts_of_rings(sites[1:2]) == set() and parts_of_rings([]) == set()


def test_a_traced_part_of_a_synthetic_compound_is_a_part():
    """The outline of a seed over the west third of a walled compound, traced and assessed,
    is a part of the compound's traced ring."""
    before, after, truth = make_walled_compound(background("synthetic", 0.5), res_m=0.5,
                                                towers=None, buildings=(3, 4))
    x0, y0, x1, y1 = truth.wall_polygon.bounds
    seeds = [truth.wall_polygon.buffer(5.0, join_style="mitre"),
             shapely.box(x0, y0, x0 + 0.35 * (x1 - x0), y1)]
    ring, part = (assess_site(before, after, s, transform=truth.transform, res_m=0.5)
                  for s in seeds)
    assert ring.grade >= 1 and part.grade >= 1
    assert ring.enclosure.closure_ratio > part.enclosure.closure_ratio
    assert parts_of_rings([ring, part]) == {1}
    assert parts_of_rings([part]) == set()


def test_overlaps_same_as_intersecting_every_outline():
    """`walled.overlaps` with its bounding-box test answers as intersecting every other
    outline did: disjoint, touching, nested, crossing, rotated, empty and zero-area outlines."""
    import numpy as np

    from pipeline.detect.walled import overlaps

    def every(outline, others):
        return any(shapely.intersection(outline, o).area >= 0.5 * min(outline.area, o.area)
                   for o in others)

    rng = np.random.default_rng(4)

    def outline():
        pick = rng.random()
        if pick < 0.03:
            return shapely.Polygon()
        if pick < 0.06:  # zero area
            x = float(rng.uniform(0, 1000))
            return shapely.Polygon([(x, 0), (x + 10, 0), (x + 20, 0)])
        x, y = rng.uniform(0, 1000, 2)
        box = shapely.box(x, y, x + rng.uniform(20, 300), y + rng.uniform(20, 300))
        return shapely.affinity.rotate(box, float(rng.choice([0.0, rng.uniform(0, 90)])))

    answers = []
    for _ in range(400):
        kept = [outline() for _ in range(int(rng.integers(0, 12)))]
        kept += [shapely.box(0, 0, 100, 100), shapely.box(100, 0, 200, 100)]  # touching
        candidate = outline() if rng.random() < 0.9 else shapely.box(50, 0, 150, 100)
        answers.append(overlaps(candidate, kept))
        assert answers[-1] == every(candidate, kept)
    assert overlaps(shapely.box(0, 0, 1, 1), []) is False
    assert 50 < sum(answers) < 350  # both answers were checked often
