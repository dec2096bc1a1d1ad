"""Load a run's changes.geojson and changes.gpkg in QGIS and print what QGIS saw, as JSON.

Run by tests/report/test_qgis.py under the system Python (Debian's python3-qgis imports only
there), headless: ``QT_QPA_PLATFORM=offscreen /usr/bin/python3 qgis_probe.py RUN_DIR``.
Imports nothing from the project, so it needs none of the virtual environment's packages.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from qgis.core import (
    Qgis,
    QgsApplication,
    QgsExpressionContextUtils,
    QgsMapRendererCustomPainterJob,
    QgsMapSettings,
    QgsProject,
    QgsProviderRegistry,
    QgsRenderContext,
    QgsVectorLayer,
    QgsWkbTypes,
)
from qgis.PyQt.QtCore import QSize
from qgis.PyQt.QtGui import QColor, QImage, QPainter

RENDER_PX = 400


def rendered_colours(layer: QgsVectorLayer) -> dict[str, int]:
    """Render the layer alone (its style, labels included) on white; count pixels by colour."""
    settings = QgsMapSettings()
    settings.setLayers([layer])
    settings.setDestinationCrs(layer.crs())
    extent = layer.extent()
    settings.setExtent(extent.buffered(max(extent.width(), extent.height(), 1e-3) * 0.2))
    settings.setOutputSize(QSize(RENDER_PX, RENDER_PX))
    image = QImage(QSize(RENDER_PX, RENDER_PX), QImage.Format_ARGB32)
    image.fill(QColor(255, 255, 255))
    painter = QPainter(image)
    job = QgsMapRendererCustomPainterJob(settings, painter)
    job.start()
    job.waitForFinished()
    painter.end()
    counts: dict[str, int] = {}
    for y in range(RENDER_PX):
        for x in range(RENDER_PX):
            c = image.pixelColor(x, y)
            key = f"{c.red()},{c.green()},{c.blue()}"
            counts[key] = counts.get(key, 0) + 1
    return counts


def geojson_sublayers(path: Path) -> list[dict]:
    """The sublayers QGIS offers for the file (one per geometry type), each loaded by its URI."""
    metadata = QgsProviderRegistry.instance().providerMetadata("ogr")
    found = []
    for sub in metadata.querySublayers(str(path), Qgis.SublayerQueryFlag.ResolveGeometryType):
        layer = QgsVectorLayer(sub.uri(), sub.name(), "ogr")
        found.append({"uri": sub.uri(), "type": QgsWkbTypes.displayString(sub.wkbType()),
                      "listed_features": sub.featureCount(), **describe(layer),
                      "kinds": sorted(str(f["kind"]) for f in layer.getFeatures()),
                      "colours": rendered_colours(layer)})
        del layer
    return found


def describe(layer: QgsVectorLayer) -> dict:
    """Validity, count, CRS, renderer, labels and the rule each feature is drawn with."""
    renderer = layer.renderer()
    info = {
        "valid": layer.isValid(),
        "features": layer.featureCount(),
        "crs": layer.crs().authid(),
        "geometry": layer.geometryType(),
        "renderer": renderer.type() if renderer else None,
        "labels": layer.labelsEnabled(),
        "rule_labels": {},
    }
    if renderer is not None and renderer.type() == "RuleRenderer":
        labels = {r.ruleKey(): r.label() for r in renderer.rootRule().descendants()}
        ctx = QgsRenderContext()
        ctx.expressionContext().appendScopes(
            QgsExpressionContextUtils.globalProjectLayerScopes(layer))
        clone = renderer.clone()
        clone.startRender(ctx, layer.fields())
        for feature in layer.getFeatures():
            ctx.expressionContext().setFeature(feature)
            keys = sorted(clone.legendKeysForFeature(feature, ctx))
            info["rule_labels"][str(feature["id"])] = [labels.get(k) for k in keys]
        clone.stopRender(ctx)
    return info


def main(run_dir: Path) -> dict:
    """Open both files, describe every layer, remove the layers, return the description."""
    messages: list[str] = []
    app = QgsApplication([], False)
    app.initQgis()
    app.messageLog().messageReceived.connect(
        lambda msg, tag, level: messages.append(f"{tag}: {msg}")
        if level >= Qgis.Warning else None)
    layers = {"geojson": QgsVectorLayer(str(run_dir / "changes.geojson"), "changes", "ogr")}
    for name in ("findings", "walls", "towers", "buildings", "aoi"):
        uri = f"{run_dir / 'changes.gpkg'}|layername={name}"
        layers[f"gpkg:{name}"] = QgsVectorLayer(uri, name, "ogr")
    result = {"qgis": Qgis.QGIS_VERSION, "layers": {k: describe(v) for k, v in layers.items()},
              "geojson_sublayers": geojson_sublayers(run_dir / "changes.geojson")}
    app.processEvents()
    result["messages"] = messages
    QgsProject.instance().removeAllMapLayers()
    layers.clear()  # QGIS crashes at exit while layers are alive
    app.exitQgis()
    return result


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
