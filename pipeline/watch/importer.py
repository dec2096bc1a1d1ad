"""pipeline.watch.importer: public lists of sites to a watch file.

Two formats are read, both as published:

- the ASPI Xinjiang Data Project facility list (``CampDataset_v1.csv``): one point per
  facility with its tier, security features and building counts; each becomes a point site
  with ``radius_m`` (the points mark a facility, not its extent);
- an OpenStreetMap XML extract (``.osm``, e.g. an Overpass export of ``prison_camp=
  re-education``): each tagged closed way, and each tagged multipolygon relation, becomes a
  polygon site with its OSM id and names.

Every feature keeps where it came from (``source_list``, ``attribution``): the ASPI data are to
be credited "ASPI Xinjiang Data Project, 2020"; OpenStreetMap data are "© OpenStreetMap
contributors", under the ODbL (a watch file made from them is a derivative database and stays
under the ODbL). Names are made unique by appending the list's id.
"""

from __future__ import annotations

import csv
import json
import math
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import shapely
from shapely.geometry import Polygon, mapping

from pipeline.errors import ConfigError

__all__ = ["ASPI_ATTRIBUTION", "OSM_ATTRIBUTION", "read_aspi_csv", "read_osm", "import_sites",
           "watch_collection", "dumps"]

ASPI_ATTRIBUTION = "ASPI Xinjiang Data Project, 2020 (xjdp.aspi.org.au)"
OSM_ATTRIBUTION = "© OpenStreetMap contributors, ODbL 1.0 (openstreetmap.org/copyright)"
_ASPI_FIELDS = {"Tier": "tier", "Watchtowers": "watchtowers", "Interior Fencing":
                "interior_fencing", "External Wall": "external_wall", "Prefecture": "prefecture",
                "County": "county", "Number of Buildings in 2017": "buildings_2017",
                "Number of Buildings in 2018": "buildings_2018", "Number of Buildings in 2019":
                "buildings_2019", "Number of Buildings in 2020": "buildings_2020",
                "Date of Latest Sat Imagery": "latest_imagery"}
_OSM_KEEP = ("name", "name:en", "name:zh-Hans", "alt_name", "amenity", "prison_camp",
             "wikidata", "note")


def read_aspi_csv(path: str | Path, *, radius_m: float = 1000.0) -> list[dict[str, Any]]:
    """Point features of the ASPI facility list.

    Raises
    ------
    ConfigError
        A missing column or a row without valid coordinates (named by its number).
    """
    path = Path(path)
    with open(path, encoding="utf-8-sig", newline="") as fh:
        rows = list(csv.DictReader(fh))
    features = []
    for index, row in enumerate(rows, start=2):  # line 1 is the header
        missing = [k for k in ("Number", "Name_Code", "Lat", "Long") if k not in row]
        if missing:
            raise ConfigError(f"{path} is not the ASPI facility list: no column "
                              f"{', '.join(missing)}.")
        try:
            lon, lat = float(row["Long"]), float(row["Lat"])
        except (TypeError, ValueError):  # TypeError: a short row has None for missing cells
            raise ConfigError(f"{path} line {index} ({row['Name_Code']!r}): coordinates "
                              f"{row['Long']!r}, {row['Lat']!r} are not numbers.") from None
        name = (row["Name_Code"] or "").strip() or f"ASPI {row['Number']}"
        props: dict[str, Any] = {"name": name, "radius_m": radius_m,
                                 "aspi_number": _number(row["Number"])}
        props.update({key: _number(row.get(col, "")) for col, key in _ASPI_FIELDS.items()})
        props["notes"] = (row.get("Notes") or "").strip() or None
        props.update(source_list="ASPI Xinjiang Data Project facility list v1",
                     attribution=ASPI_ATTRIBUTION)
        features.append({"type": "Feature", "properties": props,
                         "geometry": {"type": "Point", "coordinates": [lon, lat]}})
    return features


def read_osm(path: str | Path, *, tag: tuple[str, str] = ("prison_camp", "re-education")
             ) -> list[dict[str, Any]]:
    """Polygon features of the ways and multipolygon relations carrying ``tag``.

    Raises
    ------
    ConfigError
        Not OSM XML, or a tagged way that is not closed (named by its id).
    """
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ConfigError(f"{path} is not OpenStreetMap XML: {e}.") from e
    try:
        nodes = {n.get("id"): (float(n.get("lon", "nan")), float(n.get("lat", "nan")))
                 for n in root.iter("node")}
    except ValueError as e:
        raise ConfigError(f"{path}: a node's lat/lon is not a number ({e}); export the "
                          "OpenStreetMap extract again.") from e
    rings = {w.get("id"): [nodes[nd.get("ref")] for nd in w.iter("nd")
                           if nd.get("ref") in nodes] for w in root.iter("way")}
    features = []
    for element in [*root.iter("way"), *root.iter("relation")]:
        tags = {t.get("k"): t.get("v") for t in element.iter("tag")}
        if tags.get(tag[0]) != tag[1]:
            continue
        kind, osm_id = element.tag, element.get("id")
        if kind == "way":
            geometry = _ring_polygon(rings[osm_id], f"{path}: way {osm_id}")
        else:
            outer = [_ring_polygon(rings[m.get("ref")], f"{path}: relation {osm_id}")
                     for m in element.iter("member")
                     if m.get("type") == "way" and m.get("role") == "outer"
                     and m.get("ref") in rings]
            if not outer:
                continue
            geometry = shapely.union_all(outer)
        name = tags.get("name:en") or tags.get("name") or f"OSM {kind} {osm_id}"
        props = {"name": name, "osm_id": f"{kind}/{osm_id}", "name_local": tags.get("name"),
                 **{k.replace(":", "_"): v for k, v in tags.items()
                    if k in _OSM_KEEP and k != "name"},
                 "source_list": "OpenStreetMap prison_camp=re-education",
                 "attribution": OSM_ATTRIBUTION}
        features.append({"type": "Feature", "properties": props, "geometry": mapping(geometry)})
    return features


def import_sites(paths: Sequence[str | Path], *, radius_m: float = 1000.0,
                 sources: Sequence[str] = ("esri-wayback",), every: str = "P30D",
                 before: str | None = None) -> dict[str, Any]:
    """A watch FeatureCollection from ASPI ``.csv`` and OpenStreetMap ``.osm`` files.

    Raises
    ------
    ConfigError
        An unknown file type or an unreadable list.
    """
    features: list[dict[str, Any]] = []
    for path in map(Path, paths):
        if path.suffix.lower() == ".csv":
            features += read_aspi_csv(path, radius_m=radius_m)
        elif path.suffix.lower() in (".osm", ".xml"):
            features += read_osm(path)
        else:
            raise ConfigError(f"{path}: unknown list format; give the ASPI facility list "
                              "(.csv) or an OpenStreetMap extract (.osm).")
    return watch_collection(features, sources=sources, every=every, before=before)


def watch_collection(features: list[dict[str, Any]], *, sources: Sequence[str], every: str,
                     before: str | None) -> dict[str, Any]:
    """Add the watch properties and make names unique (by appending the list id)."""
    seen: dict[str, int] = {}
    for feature in features:
        props = feature["properties"]
        seen[props["name"].casefold()] = seen.get(props["name"].casefold(), 0) + 1
    for feature in features:
        props = feature["properties"]
        if seen[props["name"].casefold()] > 1:
            # short enough that the folder id (at most 64 characters) keeps the list id
            ident = props.get("osm_id") or props.get("aspi_number")
            props["name"] = f"{props['name'][:40].rstrip()} ({ident})"
        props.update(sources=list(sources), every=every)
        if before:
            props["before"] = before
    return {"type": "FeatureCollection", "features": features}


def dumps(collection: dict[str, Any]) -> str:
    """Compact, one feature per line GeoJSON text (diff-friendly)."""
    lines = [json.dumps(f, ensure_ascii=False) for f in collection["features"]]
    return '{"type": "FeatureCollection", "features": [\n' + ",\n".join(lines) + "\n]}\n"


def _ring_polygon(ring: list[tuple[float, float]], where: str) -> Polygon:
    """A valid polygon of a closed OSM way."""
    if len(ring) < 4 or ring[0] != ring[-1]:
        raise ConfigError(f"{where} is not a closed ring ({len(ring)} nodes); fix it in OSM or "
                          "drop it from the extract.")
    if not all(math.isfinite(v) for point in ring for v in point):
        raise ConfigError(f"{where} has a node without a finite lat/lon; export the "
                          "OpenStreetMap extract again.")
    return shapely.make_valid(Polygon(ring))


def _number(text: str | None) -> int | float | str | None:
    """An int or float when the text is one; None for empty or N/A; the text otherwise."""
    value = (text or "").strip()
    if value in ("", "N/A", "#N/A"):
        return None
    try:
        return int(value)
    except ValueError:
        try:
            return float(value)
        except ValueError:
            return value
