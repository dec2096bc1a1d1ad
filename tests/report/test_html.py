"""Tests for pipeline.report.html: the review page, as text and in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from pipeline.report.html import map_links

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


class _Refs(HTMLParser):
    """Collects tag names and the src/href of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.src: list[str] = []
        self.href: list[str] = []
        self.section_ids: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append(tag)
        if a.get("src"):
            self.src.append(str(a["src"]))
        if a.get("href"):
            self.href.append(str(a["href"]))
        if tag == "section" and a.get("id"):
            self.section_ids.append(str(a["id"]))


def _page(run_dir: Path) -> tuple[str, _Refs]:
    text = (run_dir / "report.html").read_text(encoding="utf-8")
    refs = _Refs()
    refs.feed(text)
    return text, refs


def test_report_lists_every_feature_and_card(run_dir: Path, fc: dict[str, Any]) -> None:
    """Every feature is in the table; every compound has a card with its four chips."""
    text, refs = _page(run_dir)
    for feature in fc["features"]:
        assert f"<td>{feature['id']}</td>" in text
    compounds = [f for f in fc["features"] if f["properties"]["kind"] == "compound"]
    assert {f["id"] for f in compounds} <= set(refs.section_ids)
    for f in compounds:
        for key in ("chip_before", "chip_after", "chip_before_outlined", "chip_after_outlined"):
            assert f["properties"][key] in refs.src


def test_report_cards_show_place_measurements_and_caveats(run_dir: Path,
                                                          fc: dict[str, Any]) -> None:
    """Each compound's card has its coordinates and map links, measurements and caveats."""
    from html import escape

    from shapely.geometry import shape

    from pipeline.report.html import CAVEATS

    text, _ = _page(run_dir)
    assert "<h2>Caveats</h2>" in text and all(escape(c) in text for c in CAVEATS)
    manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    assert all(escape(w) in text for w in manifest["warnings"])  # the run's own warnings
    compounds = [f for f in fc["features"] if f["properties"]["kind"] == "compound"]
    for f in compounds:
        card = text.split(f'id="{f["id"]}"', 1)[1].split("</section>", 1)[0]
        point = shape(f["geometry"]).representative_point()
        assert f"at {point.y:.6f}, {point.x:.6f} (lat, lon; WGS 84)" in card
        assert all(escape(url) in card for url in map_links(point.x, point.y).values())
        props = f["properties"]
        for key in ("area_m2", "building_count", "before_date", "after_date"):
            assert f"<tr><th>{key}</th><td>" in card, (f["id"], key)
        assert f"<tr><th>building_count</th><td>{props['building_count']}</td>" in card
        if props.get("grade_caveats"):
            assert f'<p class="caveat"><b>caveats:</b> {escape(props["grade_caveats"])}' in card


def test_report_is_self_contained(run_dir: Path) -> None:
    """Images are files inside the package; no external script, style or frame; CSP set."""
    text, refs = _page(run_dir)
    assert refs.src and all(not re.match(r"^[a-z]+:", s) for s in refs.src)
    assert all((run_dir / s).is_file() for s in refs.src)
    assert "link" not in refs.tags and "iframe" not in refs.tags
    assert not re.search(r"<script[^>]+src=", text)
    assert "Content-Security-Policy" in text and "default-src 'none'" in text
    external = [h for h in refs.href if h.startswith("http")]
    assert external and all(h.startswith(("https://www.openstreetmap.org/",
                                          "https://www.google.com/maps/",
                                          "https://www.bing.com/maps")) for h in external)


def test_map_links_put_the_point_in_the_url() -> None:
    """Each viewer link carries latitude and longitude in that viewer's order."""
    links = map_links(88.292021, 43.383247)
    assert "mlat=43.383247&mlon=88.292021" in links["OpenStreetMap"]
    assert "query=43.383247,88.292021" in links["Google Maps"]
    assert "cp=43.383247~88.292021" in links["Bing Maps"]


_PROBE = """
<script>
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  var box = document.querySelector('.compare');
  var range = box.querySelector('input');
  var top = box.querySelector('.top');
  var before = getComputedStyle(top).clipPath;
  range.value = 20;
  range.dispatchEvent(new Event('input'));
  var result = {
    images: images.length,
    loaded: images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length,
    clipBefore: before,
    clipAfter: getComputedStyle(top).clipPath,
    cards: Array.prototype.map.call(document.querySelectorAll('section.finding'),
                                    function (s) { return s.id; }),
    rows: document.querySelectorAll('#all-features tr').length - 1
  };
  document.body.setAttribute('data-probe', JSON.stringify(result));
});
</script>
"""


def _chromium() -> str:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("Chromium not found; install Debian's chromium (.ci/run does) to run this check")


def _run_chromium(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         f"--user-data-dir={profile}", "--virtual-time-budget=10000", *args],
        capture_output=True, text=True, timeout=120, check=False)


def test_report_in_headless_chromium(run_dir: Path, fc: dict[str, Any], tmp_path: Path) -> None:
    """Chromium shows every card, loads every chip, and the slider moves the clip; screenshot."""
    browser = _chromium()
    copy = Path(shutil.copytree(run_dir, tmp_path / "package"))
    page = copy / "report.html"
    probe = copy / "probe.html"  # beside the page, so relative chip paths resolve alike
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>"),
                     encoding="utf-8")
    proc = _run_chromium(browser, tmp_path / "profile", "--dump-dom", probe.as_uri())
    match = re.search(r'data-probe="([^"]*)"', proc.stdout)
    assert match, proc.stderr[-2000:]
    result = json.loads(match.group(1).replace("&quot;", '"'))
    assert result["images"] > 0 and result["loaded"] == result["images"], result
    compounds = [f["id"] for f in fc["features"] if f["properties"]["kind"] == "compound"]
    assert set(compounds) <= set(result["cards"])
    assert result["rows"] == len(fc["features"])
    assert "50%" in result["clipBefore"] and "80%" in result["clipAfter"], result
    shot = tmp_path / "report.png"
    proc = _run_chromium(browser, tmp_path / "profile", "--window-size=1200,1600",
                         f"--screenshot={shot}", page.as_uri())
    assert shot.is_file() and shot.stat().st_size > 10_000, proc.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _feature(fid: str, kind: str, grade: int | None, score: float, **extra: Any) -> dict:
    ring = [[88.29, 43.38], [88.30, 43.38], [88.30, 43.39], [88.29, 43.38]]
    props = {"id": fid, "kind": kind, "grade": grade, "score": score, "area_m2": 1.0e4,
             "before_date": "2017-03-02", "after_date": None, **extra}
    return {"type": "Feature", "id": fid, "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": props}


def test_render_report_orders_grades_and_escapes_text() -> None:
    """Grade 3 comes before grade 1, then ungraded kinds; property text is escaped."""
    from pipeline.report.html import render_report

    fc = {"type": "FeatureCollection", "features": [
        _feature("compound-0002", "compound", 1, 0.9),
        _feature("change-0001", "change", None, 0.99),
        _feature("compound-0001", "compound", 3, 0.5,
                 grade_reasons="<script>alert(1)</script>"),
    ]}
    page = render_report(fc, run_id="r1", aoi={"id": "x", "label": "<b>site</b>"}, inputs={})
    order = [page.index(f'id="{fid}"') for fid in ("compound-0001", "compound-0002",
                                                    "change-0001")]
    assert order == sorted(order)
    assert page.index("Grade 3:") < page.index("Grade 1:") < page.index("Not graded: change")
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)" in page
    assert "<b>site</b>" not in page
    assert "date unknown" not in page  # no chips here, so no chip captions
    assert page.count("no chips for this finding") == 3
