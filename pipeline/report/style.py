"""pipeline.report.style: QGIS styles (QML) for the findings layers.

``changes.qml`` beside ``changes.geojson`` is picked up by QGIS when the GeoJSON is loaded
(QGIS looks for a ``.qml`` of the same base name), for each of its sublayers: the GeoJSON
mixes polygons, wall lines and tower points, which QGIS opens as one layer per geometry type,
so that style gives each kind the symbol of its geometry (``findings_qml(geometry="any")``).
The GeoPackage carries the same style in its
``layer_styles`` table (see :mod:`pipeline.report.gpkg`), which QGIS applies by default.

The findings style is rule based: compounds by ``grade`` (3 red, 2 orange, 1 yellow, 0 grey),
then features without a grade by ``kind``; every feature is labelled ``kind grade score``.
Filters read fields through ``attribute('name')``, which is NULL for a field the layer lacks,
so a layer without ``grade`` (no compound found) still loads and renders by kind. The AOI
layer has its own outline-only style (:func:`aoi_qml`).
"""

from __future__ import annotations

from xml.sax.saxutils import quoteattr

__all__ = ["GRADE_COLOURS", "KIND_COLOURS", "LABEL_EXPRESSION", "aoi_qml", "findings_qml"]

QGIS_VERSION = "3.22.16-Białowieża"
GRADE_COLOURS = {3: "215,25,28", 2: "253,141,60", 1: "255,221,51", 0: "150,150,150"}
KIND_COLOURS = {"new_building": "44,123,182", "change": "171,95,200", "wall": "230,0,126",
                "watchtower": "230,0,126"}
OTHER_COLOUR = "90,90,90"
KIND_GEOMETRY = {"wall": "line", "watchtower": "point"}  # every other kind is a polygon
GEOMETRY_NAMES = {"polygon": "Polygon", "line": "Line", "point": "Point"}  # geometry_type()
GEOMETRY_CODES = {"point": 0, "line": 1, "polygon": 2}  # QGIS's QgsWkbTypes::GeometryType
LABEL_EXPRESSION = (
    "attribute('kind') || coalesce(' g' || to_string(attribute('grade')), '')"
    " || ' ' || format_number(attribute('score'), 2)"
)
_GRADE_LABELS = {3: "grade 3: walls, fences and towers", 2: "grade 2: walls or fences",
                 1: "grade 1: possible enclosure (footprint)", 0: "grade 0: not an enclosure"}


def findings_qml(*, geometry: str = "polygon", labels: bool = True) -> str:
    """The QML text of the findings style.

    Parameters
    ----------
    geometry
        ``"polygon"``, ``"line"`` or ``"point"``: the symbol type of the layer it styles.
        ``"any"``: for ``changes.geojson``, which mixes the three; each kind gets the symbol
        of its geometry (walls lines, watchtowers points, the rest polygons) and the style
        names no geometry type, so QGIS applies it to each of the file's sublayers (one per
        geometry type, ``changes.geojson|geometrytype=LineString``).
    labels
        Label each feature with its kind, grade and score.

    Returns
    -------
    str
        A QGIS 3 style document (``<qgis>`` root) with symbology and labeling.
    """
    rules, symbols = [], []
    for i, (grade, colour) in enumerate(GRADE_COLOURS.items()):
        rules.append(_rule(f"attribute('grade') = {grade}", _GRADE_LABELS[grade], i))
        symbols.append(_symbol(i, colour, _family(geometry, "compound"), width_mm=0.8))
    ungraded = "attribute('grade') IS NULL"
    for kind, colour in KIND_COLOURS.items():
        i = len(symbols)
        rules.append(_rule(f"{ungraded} AND attribute('kind') = '{kind}'", kind, i))
        symbols.append(_symbol(i, colour, _family(geometry, kind), width_mm=0.4))
    if geometry != "any":
        rules.append(_rule("ELSE", "other", len(symbols)))
        symbols.append(_symbol(len(symbols), OTHER_COLOUR, geometry, width_mm=0.4))
    else:  # one "other" rule per geometry, each with a symbol that can draw it
        known = ", ".join(f"'{k}'" for k in KIND_COLOURS)
        for family, name in GEOMETRY_NAMES.items():
            rules.append(_rule(f"{ungraded} AND coalesce(attribute('kind') NOT IN ({known}), "
                               f"true) AND geometry_type($geometry) = '{name}'", "other",
                               len(symbols)))
            symbols.append(_symbol(len(symbols), OTHER_COLOUR, family, width_mm=0.4))
    layer_type = ("" if geometry == "any" else
                  f"  <layerGeometryType>{GEOMETRY_CODES[geometry]}</layerGeometryType>\n")
    return (
        "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
        f'<qgis version="{QGIS_VERSION}" styleCategories="Symbology|Labeling" '
        f'labelsEnabled="{int(labels)}">\n'
        '  <renderer-v2 type="RuleRenderer" symbollevels="0" enableorderby="0" '
        'forceraster="0">\n'
        '    <rules key="{sitewatch-root}">\n' + "".join(rules) + "    </rules>\n"
        "    <symbols>\n" + "".join(symbols) + "    </symbols>\n"
        "  </renderer-v2>\n" + (_labeling(geometry) if labels else "") + layer_type
        + "</qgis>\n"
    )


def _family(geometry: str, kind: str) -> str:
    """The symbol family of ``kind`` in a layer of ``geometry`` (``"any"``: the kind's own)."""
    return KIND_GEOMETRY.get(kind, "polygon") if geometry == "any" else geometry


def aoi_qml() -> str:
    """QML of the AOI layer: a dashed black outline, no fill, no labels."""
    options = "".join([_option("color", "0,0,0,0"), _option("style", "no"),
                       _option("outline_color", "0,0,0,255"), _option("outline_style", "dash"),
                       _option("outline_width", "0.6"), _option("outline_width_unit", "MM")])
    return (
        "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
        f'<qgis version="{QGIS_VERSION}" styleCategories="Symbology|Labeling" '
        'labelsEnabled="0">\n'
        '  <renderer-v2 type="singleSymbol" symbollevels="0" enableorderby="0" '
        'forceraster="0">\n    <symbols>\n'
        '      <symbol type="fill" name="0" alpha="1" clip_to_extent="1" force_rhr="0">\n'
        '        <layer class="SimpleFill" enabled="1" pass="0" locked="0">\n'
        f'          <Option type="Map">{options}</Option>\n'
        "        </layer>\n      </symbol>\n    </symbols>\n  </renderer-v2>\n"
        "  <layerGeometryType>2</layerGeometryType>\n</qgis>\n"
    )


def _rule(expression: str, label: str, symbol: int) -> str:
    """One ``<rule>`` element."""
    return (f"      <rule key=\"{{sitewatch-{symbol}}}\" filter={quoteattr(expression)} "
            f"label={quoteattr(label)} symbol=\"{symbol}\"/>\n")


def _option(name: str, value: str) -> str:
    return f'<Option type="QString" name="{name}" value={quoteattr(value)}/>'


def _symbol(name: int, colour: str, geometry: str, *, width_mm: float) -> str:
    """A fill (translucent, solid outline), line or marker symbol in ``colour``."""
    if geometry == "polygon":
        kind, layer_class = "fill", "SimpleFill"
        options = [_option("color", f"{colour},60"), _option("outline_color", f"{colour},255"),
                   _option("outline_width", str(width_mm)), _option("outline_width_unit", "MM"),
                   _option("outline_style", "solid"), _option("style", "solid"),
                   _option("joinstyle", "miter")]
    elif geometry == "line":
        kind, layer_class = "line", "SimpleLine"
        options = [_option("line_color", f"{colour},255"), _option("line_width", str(width_mm)),
                   _option("line_width_unit", "MM"), _option("line_style", "solid")]
    else:
        kind, layer_class = "marker", "SimpleMarker"
        options = [_option("color", f"{colour},255"), _option("name", "triangle"),
                   _option("size", "3"), _option("size_unit", "MM"),
                   _option("outline_color", "0,0,0,255")]
    return (
        f'      <symbol type="{kind}" name="{name}" alpha="1" clip_to_extent="1" force_rhr="0">\n'
        f'        <layer class="{layer_class}" enabled="1" pass="0" locked="0">\n'
        f'          <Option type="Map">{"".join(options)}</Option>\n'
        "        </layer>\n      </symbol>\n"
    )


def _labeling(geometry: str) -> str:
    """Simple labeling with the kind/grade/score expression, white buffer.

    Over the point (the polygon's centroid) for polygons and lines; beside it where points
    may be drawn (``"point"``, ``"any"``), or the label would hide the tower's marker.
    """
    placement, dist = ("0", "1.5") if geometry in ("point", "any") else ("1", "0")
    return (
        '  <labeling type="simple">\n'
        '    <settings calloutType="simple">\n'
        f"      <text-style fieldName={quoteattr(LABEL_EXPRESSION)} isExpression=\"1\" "
        'fontSize="9" fontSizeUnit="Point" textColor="0,0,0,255" textOpacity="1" '
        'fontFamily="Sans Serif" fontWeight="75" namedStyle="Bold" multilineAlign="0">\n'
        '        <text-buffer bufferDraw="1" bufferSize="1" bufferSizeUnits="MM" '
        'bufferColor="255,255,255,255" bufferOpacity="0.8" bufferJoinStyle="128"/>\n'
        "      </text-style>\n"
        f'      <placement placement="{placement}" dist="{dist}" distUnits="MM" priority="5" '
        'centroidInside="1" centroidWhole="0" fitInPolygonOnly="0"/>\n'
        '      <rendering obstacle="1" displayAll="0" limitNumLabels="0" maxNumLabels="2000" '
        'drawLabels="1" scaleVisibility="0" upsidedownLabels="0"/>\n'
        "    </settings>\n"
        "  </labeling>\n"
    )
