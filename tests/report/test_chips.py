"""Tests for pipeline.report.chips (rendering) and pipeline.report.chipset (chip files)."""

from __future__ import annotations

from dataclasses import fields
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _helpers import write_geotiff
from affine import Affine
from numpy.testing import assert_array_equal
from PIL import Image
from shapely.geometry import Polygon, box

from pipeline.errors import FetchError
from pipeline.model import DetectParams, Evidence, GridPlan, SourceRef
from pipeline.report.chips import (
    MIN_WIDTH_PX,
    NODATA_RGB,
    Outline,
    compose_chip,
    nice_length_m,
    stretch_pair,
)
from pipeline.report.chipset import CHIP_KEYS, chip_targets, write_chips

CRS = "EPSG:32645"
RES = 10.0
X0, Y0 = 600_000.0, 4_805_000.0
SITE_FIELD = "site_id" if "site_id" in {f.name for f in fields(Evidence)} else "parent"


def test_stretch_pair_shares_one_stretch() -> None:
    """A brighter after image stays brighter: both dates use one stretch."""
    rng = np.random.default_rng(0)
    before = rng.uniform(0, 100, (3, 20, 20)).astype(np.float32)
    after = before + 50
    b, a = stretch_pair(before, after)
    assert b.shape == a.shape == (20, 20, 3) and b.dtype == np.uint8
    assert a.astype(float).mean() > b.astype(float).mean() + 60
    same_b, same_a = stretch_pair(before, before.copy())
    assert_array_equal(same_b, same_a)


def test_stretch_pair_clips_at_percentiles() -> None:
    """Values at or below the 2nd percentile map to 0, at or above the 98th to 255."""
    values = np.arange(100, dtype=np.float32).reshape(1, 10, 10)
    b, a = stretch_pair(values, values)
    grey = b[..., 0].ravel()
    assert grey[0] == 0 and grey[1] == 0 and grey[-1] == 255 and grey[-2] == 255
    assert 0 < grey[50] < 255
    assert_array_equal(b[..., 0], b[..., 2])  # one band shown as grey


def test_stretch_pair_marks_nodata() -> None:
    """A pixel that is NaN in any band is drawn in the nodata colour."""
    before = np.ones((3, 4, 4), np.float32)
    before[1, 2, 3] = np.nan
    after = np.full((3, 4, 4), 2.0, np.float32)
    b, a = stretch_pair(before, after)
    assert tuple(b[2, 3]) == NODATA_RGB
    assert tuple(a[2, 3]) != NODATA_RGB


@pytest.mark.parametrize(("max_m", "expected"), [(340, 200), (99, 50), (1000, 1000), (1.9, 1)])
def test_nice_length_m_round_lengths(max_m: float, expected: float) -> None:
    """The scale bar takes the largest 1/2/5 x 10^n not above the room it has."""
    assert nice_length_m(max_m) == expected


def test_compose_chip_outline_caption_and_arrow() -> None:
    """The outline is drawn where it lies, the caption band sits below, north turns the arrow."""
    rgb = np.full((100, 200, 3), 50, np.uint8)
    square = Outline(box(20, 20, 60, 60), (255, 230, 0), 2)
    image = compose_chip(rgb, caption=["BEFORE 2017-03-02", "x"], metres_per_px=2.0,
                         outlines=[square])
    pixels = np.asarray(image)
    assert image.width == MIN_WIDTH_PX and image.height > 100
    left = (MIN_WIDTH_PX - 200) // 2
    assert tuple(pixels[40, left + 20]) == (255, 230, 0)  # on the outline's left side
    assert tuple(pixels[40, left + 40]) == (50, 50, 50)  # inside, untouched
    band = pixels[100:]
    assert (band > 200).any()  # caption text, scale bar and arrow are light on dark
    turned = np.asarray(compose_chip(rgb, caption=["BEFORE 2017-03-02", "x"], metres_per_px=2.0,
                                     north_deg=90.0, outlines=[square]))
    assert (turned[100:] != band).any() and (turned[:100] == pixels[:100]).all()


# --- chip files from a synthetic pair --------------------------------------------------------


def _pair(tmp_path: Path) -> tuple[SourceRef, SourceRef, GridPlan]:
    """Two 3-band 60x60 GeoTIFFs on a 10 m UTM grid; the after one has a bright block."""
    rng = np.random.default_rng(1)
    before = rng.uniform(20, 80, (3, 60, 60)).astype(np.float32)
    after = before.copy()
    after[:, 20:30, 25:40] = 240
    transform = Affine(RES, 0, X0, 0, -RES, Y0)
    paths = [write_geotiff(tmp_path / f"{n}.tif", d, transform=transform, nodata=None)
             for n, d in (("before_2017-03-02", before), ("after_2018-10-11", after))]
    from pipeline.files import sha256_file

    refs = [SourceRef("local", p.name, acquired=date.fromisoformat(p.stem.split("_")[1]),
                      path=str(p), sha256=sha256_file(p), res_m=RES) for p in paths]
    plan = GridPlan(CRS, (X0, Y0 - 60 * RES, X0 + 60 * RES, Y0), RES)
    return refs[0], refs[1], plan


def _evidence(eid: str, kind: str, geometry: Any, refs: tuple[SourceRef, SourceRef],
              site: str | None = None, score: float = 0.8) -> Evidence:
    return Evidence(id=eid, kind=kind, geometry=geometry, crs=CRS,  # type: ignore[arg-type]
                    score=score, area_m2=geometry.area, measurements={"grade": 1},
                    before=refs[0], after=refs[1], params=DetectParams(), **{SITE_FIELD: site})


def _block(r0: int, c0: int, r1: int, c1: int) -> Polygon:
    return box(X0 + c0 * RES, Y0 - r1 * RES, X0 + c1 * RES, Y0 - r0 * RES)


def test_write_chips_four_pngs_per_finding(tmp_path: Path) -> None:
    """A compound gets before/after, plain and outlined, of one size; its building gets none."""
    before, after, plan = _pair(tmp_path)
    site = _evidence("compound-0001", "compound", _block(18, 22, 32, 42), (before, after))
    building = _evidence("new_building-0001", "new_building", _block(20, 25, 30, 40),
                         (before, after), site="compound-0001")
    stage = tmp_path / "run"
    stage.mkdir()
    targets = chip_targets([site, building], plan)
    assert [t.evidence.id for t in targets] == ["compound-0001"]
    chips = write_chips(stage, targets, [site, building], plan=plan)
    assert set(chips) == {"compound-0001"} and set(chips["compound-0001"]) == set(CHIP_KEYS)
    images = {k: np.asarray(Image.open(stage / p)) for k, p in chips["compound-0001"].items()}
    assert len({im.shape for im in images.values()}) == 1
    before_px, after_px = images["chip_before"], images["chip_after"]
    assert after_px.astype(int).sum() > before_px.astype(int).sum()  # the bright block shows
    drawn = (images["chip_after_outlined"] != images["chip_after"]).any(axis=2)
    assert drawn.any()
    rows = np.nonzero(drawn.any(axis=1))[0]
    height = images["chip_after"].shape[0]
    assert rows.max() < height - 60  # outlines only on the picture, not in the caption band
    # the site's outline is yellow, the building inside it cyan
    colours = {tuple(c) for c in images["chip_after_outlined"][drawn]}
    assert (255, 230, 0) in colours and (0, 200, 255) in colours


def test_write_chips_refuses_a_changed_input(tmp_path: Path) -> None:
    """An input whose bytes changed since the run read it is a FetchError, not a chip."""
    before, after, plan = _pair(tmp_path)
    site = _evidence("compound-0001", "compound", _block(18, 22, 32, 42), (before, after))
    with open(after.path, "r+b") as fh:  # type: ignore[arg-type]
        fh.seek(-1, 2)
        last = fh.read(1)
        fh.seek(-1, 2)
        fh.write(bytes([last[0] ^ 1]))
    with pytest.raises(FetchError, match="changed since this run read it"):
        write_chips(tmp_path, chip_targets([site], plan), [site], plan=plan)


def test_write_chips_reads_checked_copies(tmp_path: Path) -> None:
    """Inputs with a checked copy (the preserved originals) are read from the copy, not hashed
    again: chips equal to the input's, even after the input itself changed."""
    import shutil

    before, after, plan = _pair(tmp_path)
    site = _evidence("compound-0001", "compound", _block(18, 22, 32, 42), (before, after))
    (tmp_path / "a").mkdir()
    from_input = write_chips(tmp_path / "a", chip_targets([site], plan), [site], plan=plan)
    copies = {str(Path(str(ref.path))): shutil.copy(str(ref.path), tmp_path / f"c-{ref.item_id}")
              for ref in (before, after)}
    with open(after.path, "r+b") as fh:  # type: ignore[arg-type]
        fh.seek(-1, 2)
        last = fh.read(1)
        fh.seek(-1, 2)
        fh.write(bytes([last[0] ^ 1]))
    (tmp_path / "b").mkdir()
    from_copies = write_chips(tmp_path / "b", chip_targets([site], plan), [site], plan=plan,
                              checked_copies={k: Path(v) for k, v in copies.items()})
    assert from_copies == from_input
    for rel in from_input["compound-0001"].values():
        a, b = Image.open(tmp_path / "a" / rel), Image.open(tmp_path / "b" / rel)
        assert a.info == b.info
        assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FetchError, match="changed since this run read it"):  # not the copy
        write_chips(tmp_path / "b", chip_targets([site], plan), [site], plan=plan,
                    checked_copies={str(Path(str(before.path))): Path(copies[str(Path(
                        str(before.path)))])})


def test_write_chips_without_local_file_writes_nothing(tmp_path: Path) -> None:
    """A fetched input (no local path) gives no chips and no chips folder content."""
    before, after, plan = _pair(tmp_path)
    fetched = SourceRef("wayback", "wayback-1 z17", acquired=None, url="http://127.0.0.1/x")
    site = _evidence("compound-0001", "compound", _block(18, 22, 32, 42), (before, fetched))
    notes: list[str] = []
    assert write_chips(tmp_path, chip_targets([site], plan), [site], plan=plan,
                       notes=notes) == {}
    assert len(notes) == 1 and "after image wayback-1 z17 was fetched" in notes[0]
    assert not (tmp_path / "chips").exists()


def test_write_chips_from_pixels_handed_in(tmp_path: Path) -> None:
    """Pixels handed in (a fetched source) give the same chips as reading the files."""
    from pipeline.fetch.local import read_to_grid

    before, after, plan = _pair(tmp_path)
    site = _evidence("compound-0001", "compound", _block(18, 22, 32, 42), (before, after))
    (tmp_path / "a").mkdir()
    from_files = write_chips(tmp_path / "a", chip_targets([site], plan), [site], plan=plan)
    images = {role: read_to_grid(str(ref.path), plan, role=role)[0]
              for role, ref in (("before", before), ("after", after))}
    fetched = SourceRef("wayback", "wayback-1 z17", acquired=None, url="http://127.0.0.1/x")
    handed = _evidence("compound-0001", "compound", site.geometry, (before, fetched))
    (tmp_path / "b").mkdir()
    from_pixels = write_chips(tmp_path / "b", chip_targets([handed], plan), [handed], plan=plan,
                              images=images)
    assert set(from_pixels) == set(from_files) == {"compound-0001"}
    for key in ("chip_before", "chip_after_outlined"):
        a = np.asarray(Image.open(tmp_path / "a" / from_files["compound-0001"][key]))
        b = np.asarray(Image.open(tmp_path / "b" / from_pixels["compound-0001"][key]))
        picture = a.shape[0] - 90  # the caption band differs (source names), not the picture
        assert a.shape == b.shape
        assert_array_equal(a[:picture], b[:picture])


def test_chip_targets_limits_change_regions() -> None:
    """At most max_change change regions, best first; every compound, always first."""
    refs = (SourceRef("local", "a"), SourceRef("local", "b"))
    plan = GridPlan(CRS, (X0, Y0 - 600, X0 + 600, Y0), RES)
    changes = [_evidence(f"change-{i:04d}", "change", _block(i, i, i + 2, i + 2), refs,
                         score=i / 10) for i in range(1, 8)]
    site = _evidence("compound-0001", "compound", _block(1, 1, 9, 9), refs, score=0.1)
    targets = chip_targets([*changes, site], plan, max_change=3)
    assert [t.evidence.id for t in targets] == ["compound-0001", "change-0007", "change-0006",
                                                "change-0005"]
    many = [_evidence(f"compound-{i:04d}", "compound", _block(i, i, i + 9, i + 9), refs,
                      score=i / 100) for i in range(1, 41)]
    assert len(chip_targets([*many, *changes], plan, max_change=3)) == 40 + 3
    row0, col0, rows, cols = targets[0].window
    assert row0 >= 0 and col0 >= 0 and row0 + rows <= plan.height and col0 + cols <= plan.width


def test_site_parts_are_what_each_chip_drew_before(tmp_path: Path) -> None:
    """Grouped once, each site's parts are what the per-chip scan of every finding chose:
    the site's buildings, walls and towers in the findings' order, not the site itself, not
    other sites' parts, nor kinds without a part colour (change regions, compounds)."""
    from pipeline.report.chipset import PART_COLOURS, _site_parts, site_of

    before, after, _ = _pair(tmp_path)
    rng = np.random.default_rng(5)
    sites = [f"compound-{i:04d}" for i in range(1, 6)]
    kinds = ["new_building", "wall", "watchtower", "change", "compound"]
    evidence = [_evidence(site, "compound", _block(0, 0, 10, 10), (before, after), site=site)
                for site in sites]
    for i in range(300):
        kind = str(rng.choice(kinds))
        site = str(rng.choice([*sites, "none"]))
        evidence.append(_evidence(f"{kind}-{i:04d}", kind, _block(1, 1, 5, 5), (before, after),
                                  site=None if site == "none" else site))
    evidence = [evidence[i] for i in rng.permutation(len(evidence))]
    parts = _site_parts(evidence)
    for site in [*sites, "compound-0099"]:
        scanned = [e for e in evidence
                   if site_of(e) == site and e.id != site and e.kind in PART_COLOURS]
        assert [e.id for e in parts.get(site, [])] == [e.id for e in scanned]
    assert sum(len(v) for v in parts.values()) > 100
