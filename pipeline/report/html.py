"""pipeline.report.html: ``report.html``, one self-contained review page per run.

The page needs no network: images are the package's own chips (relative paths), style and the
before/after slider are a few inline lines, and a Content-Security-Policy forbids loading
anything else. Findings are grouped by grade (then the ungraded kinds), each with its
outlined before and after chips side by side, a slider over the plain chips, its
measurements, its coordinates with links to open the place in OpenStreetMap, Google Maps and
Bing Maps (opening a link sends the coordinates to that service), and its caveats. Every
feature of the GeoJSON is listed in a table at the end.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from shapely.geometry import shape

from pipeline.files import atomic_write_text
from pipeline.model import SourceRef

__all__ = ["REPORT_NAME", "render_report", "write_report", "map_links"]

REPORT_NAME = "report.html"
GRADE_TITLES = {3: "Grade 3: walls, fences and watchtowers", 2: "Grade 2: walls or fences",
                1: "Grade 1: possible enclosure", 0: "Grade 0"}
CAVEATS = (
    "Each finding is a candidate for a person to confirm against the imagery, never proof on "
    "its own. Scores rank candidates; they are not probabilities.",
    "Chips show the source pixels of each date warped onto the working grid, before "
    "co-registration and radiometric normalization, with one display stretch (2-98 % of both "
    "dates together). Magenta pixels have no data.",
    "Dates are acquisition dates where known; a catalogue or Wayback release date is shown as "
    "a release, never as an acquisition date.",
    "Map links open third-party services and send them the coordinates; this page itself "
    "loads nothing from the network.",
)
_SKIP = {"id", "kind", "score", "params", "method", "chip_before", "chip_after",
         "chip_before_outlined", "chip_after_outlined", "grade_caveats", "grade_reasons"}
_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1180px;padding:16px;color:#222}
h1{font-size:22px}h2{border-bottom:2px solid #444;margin-top:32px}h3{margin:4px 0}
.finding{border:1px solid #bbb;border-radius:6px;margin:14px 0;padding:10px}
.pair{display:flex;gap:8px;flex-wrap:wrap}.pair figure{margin:0;flex:1 1 360px}
.pair img,.compare img{width:100%;display:block}
.compare{position:relative;margin-top:8px;max-width:760px;--pos:50%}
.compare .top{position:absolute;top:0;left:0;clip-path:inset(0 calc(100% - var(--pos)) 0 0)}
.compare input{width:100%}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ddd;padding:2px 6px}
.caveat{background:#fff4d6;padding:6px 10px;border-left:4px solid #e0a000}
.muted{color:#666;font-size:12px}
"""
_JS = """
document.querySelectorAll('.compare').forEach(function (box) {
  var range = box.querySelector('input');
  function update() { box.style.setProperty('--pos', range.value + '%'); }
  range.addEventListener('input', update); update();
});
"""
_CSP = ("default-src 'none'; img-src 'self' data: file:; style-src 'unsafe-inline'; "
        "script-src 'unsafe-inline'")


def map_links(lon: float, lat: float) -> dict[str, str]:
    """URLs that open ``lon, lat`` in common map viewers (aerial view where there is one)."""
    return {
        "OpenStreetMap": f"https://www.openstreetmap.org/?mlat={lat:.6f}&mlon={lon:.6f}"
                         f"#map=17/{lat:.6f}/{lon:.6f}",
        "Google Maps": f"https://www.google.com/maps/search/?api=1&query={lat:.6f},{lon:.6f}",
        "Bing Maps": f"https://www.bing.com/maps?cp={lat:.6f}~{lon:.6f}&lvl=17&style=a",
    }


def render_report(fc: Mapping[str, Any], *, run_id: str, aoi: Mapping[str, Any],
                  inputs: Mapping[str, SourceRef], notes: Sequence[str] = ()) -> str:
    """The review page as HTML text.

    Parameters
    ----------
    fc
        The run's FeatureCollection (as written to ``changes.geojson``, chip paths included).
    run_id
        The run id, shown in the title.
    aoi
        ``{"id", "label", ...}`` of the area of interest.
    inputs
        The source scenes, by ``"<role>:<n>"``.
    notes
        The run's warnings, shown with the caveats.

    Returns
    -------
    str
        A complete HTML5 document.
    """
    features = list(fc.get("features", []))
    parts = _parts_by_site(features)
    cards = [f for f in features if f["properties"].get("chip_before") or
             f["properties"].get("kind") not in ("new_building", "wall", "watchtower")]
    title = f"Sitewatch evidence: {aoi.get('label') or aoi.get('id')} ({run_id})"
    body = [f"<h1>{_e(title)}</h1>", _sources(inputs), _caveats(notes)]
    for heading, group in _by_grade(cards):
        body.append(f"<h2>{_e(heading)} ({len(group)})</h2>")
        body += [_card(f, parts.get(f["id"], {})) for f in group]
    body.append(_table(features))
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{_CSP}\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        + "\n".join(body) + f"\n<script>{_JS}</script>\n</body></html>\n"
    )


def write_report(path: str | Path, fc: Mapping[str, Any], *, run_id: str,
                 aoi: Mapping[str, Any], inputs: Mapping[str, SourceRef],
                 notes: Sequence[str] = ()) -> Path:
    """Write :func:`render_report` atomically to ``path`` (beside the chips it links)."""
    return atomic_write_text(path, render_report(fc, run_id=run_id, aoi=aoi, inputs=inputs,
                                                 notes=notes))


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _by_grade(features: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Groups in order grade 3, 2, 1, 0, then ungraded findings by kind; best score first."""
    groups: dict[str, list[dict[str, Any]]] = {}
    order: list[str] = [GRADE_TITLES[g] for g in (3, 2, 1, 0)]
    for f in features:
        grade = f["properties"].get("grade")
        key = GRADE_TITLES.get(grade) if isinstance(grade, int) else None
        if key is None:
            key = f"Not graded: {f['properties'].get('kind')}"
            if key not in order:
                order.append(key)
        groups.setdefault(key, []).append(f)
    return [(k, sorted(groups[k], key=_score_key)) for k in order if k in groups]


def _score_key(f: dict[str, Any]) -> tuple[float, str]:
    score = f["properties"].get("score")
    return (-(score if score is not None else -1.0), str(f["id"]))


def _parts_by_site(features: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """``{site id: {kind: count}}`` of the features that name a site other than themselves."""
    out: dict[str, dict[str, int]] = {}
    for f in features:
        p = f["properties"]
        site = p.get("site_id") or p.get("parent")
        if site and site != f["id"]:
            out.setdefault(site, {}).setdefault(p.get("kind"), 0)
            out[site][p.get("kind")] += 1
    return out


def _card(f: dict[str, Any], parts: dict[str, int]) -> str:
    """One finding: heading, chips, slider, place, measurements, caveats."""
    p = f["properties"]
    point = shape(f["geometry"]).representative_point()
    lon, lat = point.x, point.y
    links = " · ".join(f'<a href="{_e(url)}" rel="noreferrer">{_e(name)}</a>'
                       for name, url in map_links(lon, lat).items())
    grade = f" · grade {p['grade']}" if p.get("grade") is not None else ""
    area = f"{p['area_m2'] / 10000:.2f} ha" if p.get("area_m2") is not None else "area unknown"
    parts_text = ", ".join(f"{n} {k}" for k, n in sorted(parts.items()))
    out = [f'<section class="finding" id="{_e(f["id"])}">',
           f"<h3>{_e(f['id'])} · {_e(p.get('kind'))}{grade} · score {_e(p.get('score'))} · "
           f"{area}</h3>",
           f"<p>at {lat:.6f}, {lon:.6f} (lat, lon; WGS 84) · {links}</p>"]
    if parts_text:
        out.append(f"<p>inside: {_e(parts_text)}</p>")
    if p.get("chip_before_outlined") and p.get("chip_after_outlined"):
        out.append(_chips(p))
    else:
        out.append('<p class="muted">no chips for this finding (see the manifest)</p>')
    for key in ("grade_reasons", "grade_caveats"):
        if p.get(key):
            label = "why" if key == "grade_reasons" else "caveats"
            css = ' class="caveat"' if key == "grade_caveats" else ""
            out.append(f"<p{css}><b>{label}:</b> {_e(p[key])}</p>")
    out.append(_measurements(p))
    out.append("</section>")
    return "\n".join(out)


def _chips(p: dict[str, Any]) -> str:
    """Outlined chips side by side, and a slider over the plain pair."""
    before, after = p.get("before_date") or "date unknown", p.get("after_date") or "date unknown"
    fig = ('<figure><img src="{src}" alt="{alt}" loading="eager">'
           "<figcaption>{cap}</figcaption></figure>")
    pair = ('<div class="pair">'
            + fig.format(src=_e(p["chip_before_outlined"]), alt=_e(f"before {before}"),
                         cap=_e(f"before · {before}"))
            + fig.format(src=_e(p["chip_after_outlined"]), alt=_e(f"after {after}"),
                         cap=_e(f"after · {after}")) + "</div>")
    if not (p.get("chip_before") and p.get("chip_after")):
        return pair
    compare = (f'<div class="compare"><img class="base" src="{_e(p["chip_after"])}" '
               f'alt="{_e(f"after {after}")}"><img class="top" src="{_e(p["chip_before"])}" '
               f'alt="{_e(f"before {before}")}">'
               f'<input type="range" min="0" max="100" value="50" '
               f'aria-label="{_e("slide: before (left) / after (right)")}"></div>'
               f'<p class="muted">Slider: before ({_e(before)}) on the left of the handle, '
               f"after ({_e(after)}) on the right.</p>")
    return pair + compare


def _measurements(p: dict[str, Any]) -> str:
    """The feature's scalar properties as a two-column table."""
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(_fmt(v))}</td></tr>"
                   for k, v in p.items() if k not in _SKIP)
    return f"<details><summary>measurements and provenance</summary><table>{rows}</table>" \
           f"<p class='muted'>method: {_e(p.get('method'))}</p></details>"


def _fmt(value: Any) -> str:
    if value is None:
        return "unknown"
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _sources(inputs: Mapping[str, SourceRef]) -> str:
    """The input scenes with dates, releases and hashes."""
    rows = []
    for key, ref in inputs.items():
        when = ref.acquired.isoformat() if ref.acquired else "unknown"
        rows.append(f"<tr><td>{_e(key)}</td><td>{_e(ref.provider)}:{_e(ref.item_id)}</td>"
                    f"<td>{_e(when)}</td><td>{_e(ref.release or '')}</td>"
                    f"<td>{_e(f'{ref.res_m:g} m' if ref.res_m else '')}</td>"
                    f"<td><code>{_e(ref.sha256 or '')}</code></td></tr>")
    return ("<h2>Sources</h2><table><tr><th>input</th><th>source</th><th>acquired</th>"
            "<th>release</th><th>resolution</th><th>SHA-256</th></tr>" + "".join(rows)
            + "</table><p class='muted'>Every file of this folder is listed with its SHA-256 in "
            "manifest.json; <code>sitewatch verify</code> re-checks them.</p>")


def _caveats(notes: Sequence[str]) -> str:
    items = "".join(f"<li>{_e(c)}</li>" for c in (*CAVEATS, *notes))
    return f'<h2>Caveats</h2><div class="caveat"><ul>{items}</ul></div>'


def _table(features: list[dict[str, Any]]) -> str:
    """Every feature: id (linked to its card when it has one), kind, score, site, place."""
    rows = []
    for f in features:
        p = f["properties"]
        point = shape(f["geometry"]).representative_point()
        rows.append(f"<tr><td>{_e(f['id'])}</td><td>{_e(p.get('kind'))}</td>"
                    f"<td>{_e(p.get('score'))}</td><td>{_e(_fmt(p.get('area_m2')))}</td>"
                    f"<td>{_e(p.get('site_id') or p.get('parent') or '')}</td>"
                    f"<td>{point.y:.6f}, {point.x:.6f}</td></tr>")
    return (f"<h2>All features ({len(features)})</h2><details open><summary>table</summary>"
            "<table id=\"all-features\"><tr><th>id</th><th>kind</th><th>score</th>"
            "<th>area m²</th><th>site</th><th>lat, lon</th></tr>" + "".join(rows)
            + "</table></details>")
