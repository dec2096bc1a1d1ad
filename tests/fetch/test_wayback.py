"""Tests for pipeline.fetch.wayback: release choice, both dates, same imagery, over loopback HTTP.

The fake Wayback has four releases listed out of date order. At the AOI three imagery versions
exist: release 10 (2014), release 4073 (2017-05-03, acquired 2017-03-02; release 13161 of
2018-01-08 carries the same imagery, as its tilemap says) and release 9203 (2018-11-14,
acquired 2018-10-11). Tiles of 4073 and 9203 are rendered from the real Dabancheng images when
present, else from synthetic scenes.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import pytest
from fetch.servers import LoopbackServer, Request, render_tiles, serve, write_synthetic_scene

from pipeline.aoi import parse_aoi, plan_grid
from pipeline.errors import FetchError, NoValidDataError, ProvenanceWarning
from pipeline.fetch import wayback, xyz
from pipeline.fetch.base import DateWindow, FetchContext, Scene, SourceConfig
from pipeline.fetch.http import HttpClient
from pipeline.fetch.local import read_to_grid
from pipeline.fetch.wayback import Release
from pipeline.model import GridPlan, SourceRef

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "dabancheng"
ESRI_META = "https://metadata.maptiles.arcgis.com/arcgis/rest/services/{}/MapServer"
# Keys deliberately out of date order, as in the real waybackconfig.json.
RELEASES = {
    "13161": ("2018-01-08", "World_Imagery_Metadata_2018_r01"),
    "9203": ("2018-11-14", "World_Imagery_Metadata_2018_r12"),
    "10": ("2014-02-20", "World_Imagery_Metadata_2014_r01"),
    "4073": ("2017-05-03", "World_Imagery_Metadata_2017_r05"),
}
# Which release introduced the imagery each release shows at the AOI.
INTRODUCED = {"9203": "9203", "13161": "4073", "4073": "4073", "10": "10"}
ACQUIRED = {"World_Imagery_Metadata_2017_r05": int(datetime(2017, 3, 2, tzinfo=UTC).timestamp()
                                                   * 1000),
            "World_Imagery_Metadata_2018_r12": "20181011"}


def _window(text: str) -> DateWindow:
    return DateWindow.parse(text)


@dataclass
class FakeWayback:
    """The loopback Wayback, its source entry, plan and the images behind each release."""

    server: LoopbackServer
    source: SourceConfig
    plan: GridPlan
    images: dict[str, Path]

    def context(self, tmp_path: Path, **kw: object) -> FetchContext:
        """A fresh-cache context with tiny timeouts."""
        return FetchContext(cache_dir=tmp_path / "cache", **{"timeout_s": 0.5, "max_retries": 1,
                                                             **kw})

    def fetch(self, window: str, context: FetchContext, role: str = "after") -> Scene:
        """wayback.fetch for a window, provenance warnings silenced."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ProvenanceWarning)
            return wayback.fetch(self.plan, _window(window), self.source, role=role,
                                 context=context, client=HttpClient(context, backoff_s=0.01))


def _config() -> dict:
    """A waybackconfig.json whose URLs point at the real Esri hosts (never contacted)."""
    return {number: {
        "itemID": f"item{number}",
        "itemTitle": f"World Imagery (Wayback {day})",
        "itemURL": "https://wayback.maptiles.arcgis.com/arcgis/rest/services/World_Imagery/WMTS/"
                   f"1.0.0/default028mm/MapServer/tile/{number}/{{level}}/{{row}}/{{col}}",
        "metadataLayerUrl": ESRI_META.format(service),
        "layerIdentifier": f"WB_{number}",
    } for number, (day, service) in RELEASES.items()}


def _metadata(request: Request) -> tuple[int, dict[str, str], bytes]:
    """Metadata layer query: attributes for known services, no feature otherwise."""
    service = request.path.split("/")[2]
    features = []
    if service in ACQUIRED:
        features = [{"attributes": {"SRC_DATE2": ACQUIRED[service], "NICE_DESC": "Maxar",
                                    "SRC_DESC": f"WV02-{service[-3:]}", "SAMP_RES": 0.5,
                                    "SRC_ACC": 4.1}}]
    return 200, {"Content-Type": "application/json"}, json.dumps({"features": features}).encode()


def _images(tmp_path: Path) -> dict[str, Path]:
    """The image behind each distinct release: real when available, else synthetic."""
    synthetic = {seed: write_synthetic_scene(tmp_path / f"s{seed}.tif", seed=seed)
                 for seed in (1, 2, 3)}
    before, after = DATA / "dabancheng_2017-03-02.tif", DATA / "dabancheng_2018-10-11.tif"
    real = before.exists() and after.exists()
    return {"10": synthetic[1], "4073": before if real else synthetic[2],
            "9203": after if real else synthetic[3]}


@dataclass(frozen=True)
class Content:
    """Everything the fake serves except routes: static files, plan and images."""

    files: dict[str, bytes | str]
    plan: GridPlan
    zoom: int
    images: dict[str, Path]


@pytest.fixture(scope="module")
def content(tmp_path_factory: pytest.TempPathFactory) -> Content:
    """Render the tiles of every release once per module."""
    images = _images(tmp_path_factory.mktemp("wayback"))
    plan = plan_grid(parse_aoi("88.29,43.384", radius_m=400), 5.0)
    zoom = xyz.choose_zoom(plan)
    centre = wayback.mercantile.tile(*xyz.centre_lonlat(plan), zoom)
    files: dict[str, bytes | str] = {"/config/waybackconfig.json": json.dumps(_config())}
    rendered = {n: render_tiles(images[n], xyz.tiles_for_plan(plan, zoom)) for n in images}
    for number, introduced in INTRODUCED.items():
        files[f"/tilemap/{number}/{zoom}/{centre.y}/{centre.x}"] = json.dumps(
            {"data": [1], "select": [int(introduced)], "valid": True})
        for (z, x, y), body in rendered[introduced].items():
            files[f"/tile/{number}/{z}/{y}/{x}"] = body
    return Content(files, plan, zoom, images)


@pytest.fixture
def fake(content: Content) -> Iterator[FakeWayback]:
    """Serve the release list, tilemaps, metadata and tiles of every release."""
    with serve(content.files) as server:
        for service in {s for _, s in RELEASES.values()}:
            server.route(f"/metadata/{service}/MapServer/{23 - content.zoom}/query", _metadata)
        source = SourceConfig("esri-wayback", "wayback", {
            "config_url": server.url("/config/waybackconfig.json"),
            "tile_url": server.url("/tile/{release}/{z}/{y}/{x}"),
            "tilemap_url": server.url("/tilemap/{release}/{z}/{y}/{x}"),
            "metadata_url": server.url("/metadata/{service}/MapServer"),
        })
        yield FakeWayback(server, source, content.plan, content.images)


def test_parse_releases_sorts_by_title_date() -> None:
    """Releases are dated from their titles and sorted by date, not by number."""
    releases = wayback.parse_releases(_config())
    assert [r.number for r in releases] == [10, 4073, 13161, 9203]
    assert releases[1].released == date(2017, 5, 3)
    assert releases[1].metadata_service == "World_Imagery_Metadata_2017_r05"


def test_parse_releases_skips_undated_and_rejects_empty() -> None:
    """A release without a date in its title is skipped; a list without any is an error."""
    config = _config()
    config["77"] = {"itemTitle": "World Imagery (Wayback beta)"}
    assert 77 not in [r.number for r in wayback.parse_releases(config)]
    with pytest.raises(FetchError, match="no Wayback release"):
        wayback.parse_releases({"1": {"itemTitle": "nothing"}})
    with pytest.raises(FetchError, match="not a Wayback release list"):
        wayback.parse_releases([1, 2])


def test_distinct_releases_follow_tilemap(fake: FakeWayback, tmp_path: Path) -> None:
    """The tilemap walk finds the three imagery versions with one request per version."""
    context = fake.context(tmp_path)
    client = HttpClient(context)
    releases = wayback.list_releases(fake.source.options["config_url"], context=context,
                                     client=client)
    zoom = xyz.choose_zoom(fake.plan)
    tile = wayback.mercantile.tile(*xyz.centre_lonlat(fake.plan), zoom)
    tilemap_url = fake.source.options["tilemap_url"]
    found = wayback.distinct_releases(releases, tile, tilemap_url=tilemap_url, context=context,
                                      client=client)
    assert [r.number for r in found] == [10, 4073, 9203]
    assert fake.server.count("/tilemap/") == 3 and fake.server.count("/tilemap/4073/") == 0


@pytest.mark.parametrize("window, number, noted", [
    ("2017-01-01/2017-12-31", 4073, False),      # released inside the window
    ("2018-06-01/2018-12-31", 9203, False),
    ("2014-01-01/2018-12-31", 4073, False),      # several inside: nearest the middle
    ("2018-01-01/2018-03-31", 4073, True),       # none inside: the version shown then
    ("2010-01-01/2010-12-31", 10, True),         # before every version: the first, noted
])
def test_pick_release(window: str, number: int, noted: bool) -> None:
    """The version released nearest the middle inside the window, else the one in effect."""
    candidates = [Release(10, date(2014, 2, 20), "a"), Release(4073, date(2017, 5, 3), "b"),
                  Release(9203, date(2018, 11, 14), "c")]
    chosen, note = wayback.pick_release(candidates, _window(window))
    assert chosen.number == number and (note is not None) == noted


def test_pick_release_without_candidates() -> None:
    """No imagery version at all is NoValidDataError."""
    with pytest.raises(NoValidDataError):
        wayback.pick_release([], _window("2017-01-01/2017-12-31"))


def test_fetch_keeps_release_and_acquisition_dates(fake: FakeWayback, tmp_path: Path) -> None:
    """Before and after resolve to distinct releases; both dates are kept apart; pixels match."""
    context = fake.context(tmp_path)
    before = fake.fetch("2017-01-01/2017-12-31", context, role="before")
    after = fake.fetch("2018-06-01/2018-12-31", context)
    (b,), (a,) = before.refs, after.refs
    assert b.release == "2017-05-03 (release 4073)" and b.acquired == date(2017, 3, 2)
    assert a.release == "2018-11-14 (release 9203)" and a.acquired == date(2018, 10, 11)
    assert before.acquired == date(2017, 3, 2) and after.acquired == date(2018, 10, 11)
    assert a.extra["metadata"]["provider"] == "Maxar" and a.res_m == 0.5
    assert a.extra["metadata"]["accuracy_m"] == 4.1 and a.date_source == "metadata"
    assert [c["number"] for c in a.extra["candidates"]] == [10, 4073, 9203]
    assert a.url.endswith("/tile/9203/{z}/{y}/{x}") and a.provider == "esri-wayback"
    wayback.check_distinct(before, after)
    direct, _ = read_to_grid(fake.images["9203"], fake.plan, role="after",
                             acquired=date(2018, 10, 11))
    ok = np.isfinite(after.data.values) & np.isfinite(direct.values)
    assert np.corrcoef(after.data.values[ok], direct.values[ok])[0, 1] > 0.95
    assert fake.server.count("/tile/13161/") == 0


def test_fetch_same_imagery_detected(fake: FakeWayback, tmp_path: Path) -> None:
    """Two windows that fall on the same imagery version are refused by check_distinct."""
    context = fake.context(tmp_path)
    before = fake.fetch("2017-06-01/2017-12-31", context, role="before")
    after = fake.fetch("2018-01-01/2018-03-31", context)
    assert wayback.same_imagery(before.refs[0], after.refs[0])
    with pytest.raises(FetchError, match=r"same imagery \(release 4073, acquired 2017-03-02\): "
                                         r"no change can be measured; widen the windows"):
        wayback.check_distinct(before, after)


def test_fetch_unknown_acquisition_warns(fake: FakeWayback, tmp_path: Path) -> None:
    """Without SRC_DATE2, acquired is None and a ProvenanceWarning says so."""
    context = fake.context(tmp_path)
    with pytest.warns(ProvenanceWarning, match="acquisition date unknown"):
        scene = wayback.fetch(fake.plan, _window("2014-01-01/2014-12-31"), fake.source,
                              role="before", context=context)
    assert scene.acquired is None and scene.refs[0].acquired is None
    assert scene.refs[0].release == "2014-02-20 (release 10)"


def test_fetch_warns_acquisition_outside_window(fake: FakeWayback, tmp_path: Path) -> None:
    """A release inside the window whose imagery was acquired before it is flagged."""
    with pytest.warns(ProvenanceWarning, match="acquired on 2017-03-02, outside the window"):
        wayback.fetch(fake.plan, _window("2017-04-01/2017-06-30"), fake.source, role="before",
                      context=fake.context(tmp_path))


def test_fetch_second_run_zero_requests(fake: FakeWayback, tmp_path: Path) -> None:
    """A rerun reads release list, tilemaps, metadata and tiles from the cache only."""
    context = fake.context(tmp_path)
    first = fake.fetch("2018-06-01/2018-12-31", context)
    assert first.info["requests"] == fake.server.total_requests > 0
    fake.server.reset_counts()
    second = fake.fetch("2018-06-01/2018-12-31", context)
    assert fake.server.total_requests == 0 and second.info["requests"] == 0
    offline = fake.fetch("2018-06-01/2018-12-31", replace(context, offline=True))
    np.testing.assert_array_equal(first.data.values, offline.data.values)
    assert offline.refs[0] == first.refs[0]


def test_fetch_metadata_service_error_not_cached(fake: FakeWayback, tmp_path: Path) -> None:
    """An ArcGIS error document gives acquired None with a warning, and is asked again later."""
    zoom = xyz.choose_zoom(fake.plan)
    path = f"/metadata/World_Imagery_Metadata_2018_r12/MapServer/{23 - zoom}/query"
    error = json.dumps({"error": {"code": 500, "message": "Unable to complete operation."}})
    fake.server.route(path, lambda r: (200, {"Content-Type": "application/json"}, error.encode()))
    context = fake.context(tmp_path)
    with pytest.warns(ProvenanceWarning, match="acquisition date unknown"):
        scene = wayback.fetch(fake.plan, _window("2018-06-01/2018-12-31"), fake.source,
                              role="after", context=context)
    assert scene.acquired is None
    fake.server.route(path, _metadata)
    assert fake.fetch("2018-06-01/2018-12-31", context).acquired == date(2018, 10, 11)


def test_fetch_bad_release_list(fake: FakeWayback, tmp_path: Path) -> None:
    """An HTML page instead of the release list is a FetchError naming the URL."""
    fake.server.fault("/config/waybackconfig.json", "html")
    with pytest.raises(FetchError, match="waybackconfig.json did not return valid JSON"):
        fake.fetch("2018-06-01/2018-12-31", fake.context(tmp_path))


def test_fetch_no_imagery_anywhere(fake: FakeWayback, tmp_path: Path) -> None:
    """When the newest tilemap says there is no imagery, NoValidDataError names the place."""
    zoom = xyz.choose_zoom(fake.plan)
    centre = wayback.mercantile.tile(*xyz.centre_lonlat(fake.plan), zoom)
    fake.server.add(f"/tilemap/9203/{zoom}/{centre.y}/{centre.x}", '{"data": [0]}')
    with pytest.raises(NoValidDataError, match="has no imagery at lon 88.29"):
        fake.fetch("2018-06-01/2018-12-31", fake.context(tmp_path))


def test_fetch_retries_flaky_tilemap(fake: FakeWayback, tmp_path: Path) -> None:
    """A tilemap failing with 503 once is retried and the fetch completes."""
    zoom = xyz.choose_zoom(fake.plan)
    centre = wayback.mercantile.tile(*xyz.centre_lonlat(fake.plan), zoom)
    fake.server.fault(f"/tilemap/9203/{zoom}/{centre.y}/{centre.x}", "status", status=503, times=1)
    assert fake.fetch("2018-06-01/2018-12-31", fake.context(tmp_path)).refs[0].acquired


@pytest.mark.parametrize("a, b, same", [
    (dict(extra={"release_number": 4073}), dict(extra={"release_number": 4073}), True),
    (dict(extra={"release_number": 4073}, item_id="x"),
     dict(extra={"release_number": 9203}, item_id="y"), False),
    (dict(item_id="esri z17"), dict(item_id="esri z17"), True),
    (dict(sha256="ab" * 32, item_id="x"), dict(sha256="ab" * 32, item_id="y"), True),
    (dict(acquired=date(2017, 3, 2), extra={"metadata": {"source": "WV02"}}, item_id="x"),
     dict(acquired=date(2017, 3, 2), extra={"metadata": {"source": "WV02"}}, item_id="y"), True),
    (dict(acquired=date(2017, 3, 2), item_id="x"), dict(acquired=date(2017, 3, 2), item_id="y"),
     False),
])
def test_same_imagery(a: dict, b: dict, same: bool) -> None:
    """Same release, same item, same tiles or same dated source mean the same imagery."""
    base = {"provider": "esri-wayback", "item_id": "i"}
    assert wayback.same_imagery(SourceRef(**{**base, **a}), SourceRef(**{**base, **b})) is same
