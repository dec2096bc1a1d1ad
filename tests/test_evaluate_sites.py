"""Tests for pipeline.evaluate_sites: default detect runs on pairs with and without a compound."""

from __future__ import annotations

from datetime import date

import numpy as np
import pytest
import rasterio
from _helpers import SHARED_DATA as DATA
from affine import Affine

from pipeline.datasets import LabelledPair
from pipeline.evaluate_sites import FilePair, compounds_on_negatives, read_puerto_rico
from pipeline.evaluation_doc import _negatives_text
from pipeline.testing import make_walled_compound, synthetic_background


def _pair(name: str, *, compound: bool) -> LabelledPair:
    """A 0.5 m synthetic pair: a new walled compound, or the same image twice (noise only)."""
    background = synthetic_background((640, 640), res_m=0.5, seed=3)
    if compound:
        before, after, _ = make_walled_compound(background, res_m=0.5, towers=None,
                                                buildings=(2, 3))
    else:
        rng = np.random.default_rng(0)
        before = background
        after = background + rng.normal(0.0, 2.0, background.shape).astype(np.float32)
    return LabelledPair("synthetic", name, before, after,
                        np.zeros(before.shape[1:], np.uint8), 0.5)


def test_a_compound_is_counted_and_an_unchanged_pair_gives_none(tmp_path):
    """Every compound a default run reports is counted (the totals are the sums of the
    images'); an unchanged pair reports none."""
    got = compounds_on_negatives([_pair("same", compound=False), _pair("new", compound=True)])
    assert got["images"] == 2
    assert got["per_image"]["synthetic/same"]["compounds"] == 0
    assert got["per_image"]["synthetic/new"]["compounds"] >= 1
    assert got["per_image"]["synthetic/new"]["graded"] >= 1
    assert got["compounds"] == sum(r["compounds"] for r in got["per_image"].values())
    assert got["megapixels"] == pytest.approx(2 * 640 * 640 / 1e6, rel=0.05)


def test_a_file_pair_is_read_with_its_dates(tmp_path):
    """A georeferenced pair of files without dates runs with the dates given."""
    pair = _pair("same", compound=False)
    paths = []
    for role, image in (("pre", pair.before), ("post", pair.after)):
        path = tmp_path / f"{role}.tif"
        with rasterio.open(path, "w", driver="GTiff", width=640, height=640, count=3,
                           dtype="uint8", crs="EPSG:32619",
                           transform=Affine(0.5, 0, 700000.0, 0, -0.5, 2000000.0)) as dst:
            dst.write(np.clip(image, 0, 255).astype(np.uint8))
        paths.append(path)
    got = compounds_on_negatives([FilePair("pr/tile", *paths, date(2017, 9, 1),
                                           date(2017, 10, 1))])
    assert got["images"] == 1 and got["compounds"] == 0


def test_the_real_puerto_rico_tile_is_found():
    """The shared data's Puerto Rico tile pairs a pre- and a post-event file of one name."""
    if not (DATA / "puerto_rico_maria_prepost").is_dir():
        pytest.skip(f"no shared data at {DATA}")
    found = read_puerto_rico(DATA)
    assert found and all(p.before.name == p.after.name and p.before != p.after for p in found)
    assert read_puerto_rico(DATA / "nothing-here") == []


def test_the_paragraph_states_the_counts():
    """docs/evaluation.md says how many compounds were reported on how many images."""
    text = _negatives_text({"images": 15, "megapixels": 6.8, "compounds": 2, "graded": 1,
                            "watchtowers": 0, "new_buildings": 40, "per_image": {}})
    assert "15 images" in text and "**2 compound(s)** (1 of grade 1 or more)" in text
    assert "40 new buildings" in text
    assert "not run" in _negatives_text(None)
