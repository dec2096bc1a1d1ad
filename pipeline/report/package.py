"""pipeline.report.package: the files of an evidence package beside the GeoJSON.

Each writer here takes the FeatureCollection already written to ``changes.geojson`` (so every
file carries the same ids and attributes) and returns the names it wrote, relative to the
run folder, for the manifest. Each is timed as its own processing step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.files import atomic_write_text
from pipeline.report.gpkg import layer_geometries, write_gpkg
from pipeline.report.style import findings_qml

__all__ = ["GPKG_NAME", "QML_NAME", "StepLog", "write_gis_layers"]

GEOJSON_NAME = "changes.geojson"
GPKG_NAME = "changes.gpkg"
QML_NAME = "changes.qml"


class StepLog:
    """Ordered, timed records of the package's writing steps (for the manifest)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.records: list[dict[str, Any]] = []
        self._clock = clock

    @contextmanager
    def step(self, name: str, **details: Any) -> Iterator[dict[str, Any]]:
        """Time the block; ``details`` (and what the block adds to it) go in the record."""
        start = self._clock()
        yield details
        self.records.append({"name": name, "seconds": round(self._clock() - start, 3),
                             "details": details})


def write_gis_layers(stage: Path, fc: Mapping[str, Any], *,
                     aoi: Mapping[str, Any] | None) -> list[str]:
    """Write ``changes.gpkg`` (styled layers) and ``changes.qml`` (the GeoJSON's style).

    Returns
    -------
    list of str
        The names written, relative to ``stage``.
    """
    styles = {layer: findings_qml(geometry=family)
              for layer, family in layer_geometries(fc).items()}
    write_gpkg(fc, stage / GPKG_NAME, aoi=aoi, styles=styles)
    atomic_write_text(stage / QML_NAME, findings_qml(geometry="polygon"))
    return [GPKG_NAME, QML_NAME]
