"""Watch files: properties parsed and validated; errors name the feature and the fix."""

from __future__ import annotations

import json
from datetime import date, timedelta
from pathlib import Path

import geopandas
import pytest
from shapely.geometry import Point

from pipeline.errors import AoiError, ConfigError
from pipeline.fetch.base import SourceConfig
from pipeline.watch.sites import SiteSource, load_watch_sites, parse_every, parse_sources

SOURCES = {"esri-wayback": SourceConfig("esri-wayback", "wayback", {}),
           "earth-search": SourceConfig("earth-search", "stac", {}),
           "esri-world-imagery": SourceConfig("esri-world-imagery", "xyz", {})}


def _write(path: Path, *props: dict) -> Path:
    features = [{"type": "Feature", "geometry": {"type": "Point",
                                                 "coordinates": [88.29 + i * 0.01, 43.38]},
                 "properties": {"radius_m": 500, **p}} for i, p in enumerate(props)]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


@pytest.mark.parametrize("text, expected", [
    ("P30D", timedelta(days=30)), ("PT12H", timedelta(hours=12)), ("P1W", timedelta(weeks=1)),
    ("P1DT6H", timedelta(days=1, hours=6)), ("30d", timedelta(days=30)),
    ("12h", timedelta(hours=12)), ("2w", timedelta(weeks=2)),
])
def test_parse_every_forms(text, expected):
    """ISO 8601 and short durations give the same timedelta."""
    assert parse_every(text) == expected


@pytest.mark.parametrize("text", ["monthly", "P0D", "P", "30", "-3d"])
def test_parse_every_rejects(text):
    """Not a positive duration: ValueError naming the forms."""
    with pytest.raises(ValueError, match="P30D|longer than zero"):
        parse_every(text)


@pytest.mark.parametrize("text", ["P99999999999W", "99999999999999999999d", "P1000000000D"])
def test_parse_every_too_long_is_a_valueerror(text):
    """A duration beyond timedelta's range is a ValueError saying so (was an OverflowError,
    a traceback from `sites import --every` and from `watch` reading such a site file)."""
    with pytest.raises(ValueError, match="too long"):
        parse_every(text)


def test_parse_sources_list_text_and_resolution():
    """A list or comma text of name[@res_m]."""
    assert parse_sources(["esri-wayback", "earth-search@10"]) == (
        SiteSource("esri-wayback"), SiteSource("earth-search", 10.0))
    assert parse_sources("esri-wayback, earth-search@20m") == (
        SiteSource("esri-wayback"), SiteSource("earth-search", 20.0))
    with pytest.raises(ValueError, match="positive number of metres"):
        parse_sources(["earth-search@-5"])


def test_load_watch_sites_reads_properties(tmp_path):
    """Sources, every, before and notes are read; defaults fill the rest."""
    path = _write(tmp_path / "s.geojson",
                  {"name": "a", "sources": ["earth-search@10"], "every": "P7D",
                   "before": "2017-01-01/2017-06-30", "notes": "n"},
                  {"name": "b"})
    a, b = load_watch_sites(path, sources=SOURCES)
    assert a.sources == (SiteSource("earth-search", 10.0),)
    assert a.every == timedelta(days=7) and a.notes == "n"
    assert a.before.start == date(2017, 1, 1) and a.before.end == date(2017, 6, 30)
    assert b.sources == (SiteSource("esri-wayback"),) and b.every == timedelta(days=1)
    assert b.before is None and a.id == "a"


@pytest.mark.parametrize("props, message", [
    ({"name": "bad-every", "every": "sometimes"}, r"feature 1 \('bad-every'\).*'every'"),
    ({"name": "unknown", "sources": ["nope"]}, r"feature 1 \('unknown'\).*'nope' is not config"),
    ({"name": "xyz", "sources": ["esri-world-imagery"]}, r"feature 1 \('xyz'\).*type xyz"),
    ({"name": "before", "before": "2017-13-01"}, r"feature 1 \('before'\).*'before'"),
])
def test_bad_property_names_the_feature(tmp_path, props, message):
    """A bad property is a ConfigError naming the file, feature index and name."""
    path = _write(tmp_path / "s.geojson", {"name": "good"}, props)
    with pytest.raises(ConfigError, match=message):
        load_watch_sites(path, sources=SOURCES)


def test_bad_geometry_names_the_feature(tmp_path):
    """A point without radius (from pipeline.aoi) is named by index and name too."""
    path = tmp_path / "s.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [88.2, 43.3]},
         "properties": {"name": "no-radius"}}]}))
    with pytest.raises(AoiError, match=r"feature 0 \('no-radius'\).*radius_m"):
        load_watch_sites(path, sources=SOURCES)


def test_geopackage_with_text_sources(tmp_path):
    """GeoPackage has no list type: sources as comma text work the same."""
    frame = geopandas.GeoDataFrame(
        {"name": ["g1", "g2"], "radius_m": [400.0, 300.0],
         "sources": ["esri-wayback,earth-search@10", None], "every": ["P14D", None]},
        geometry=[Point(88.29, 43.38), Point(88.30, 43.38)], crs="EPSG:4326")
    path = tmp_path / "sites.gpkg"
    frame.to_file(path, driver="GPKG")
    g1, g2 = load_watch_sites(path, sources=SOURCES)
    assert g1.sources == (SiteSource("esri-wayback"), SiteSource("earth-search", 10.0))
    assert g1.every == timedelta(days=14)
    assert g2.sources == (SiteSource("esri-wayback"),) and g2.every == timedelta(days=1)
