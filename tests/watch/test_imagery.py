"""Listing what imagery a source has for a site: STAC (loopback API) and local folders."""

from __future__ import annotations

from datetime import date

import numpy as np
import pytest
from _helpers import write_geotiff
from fetch.test_stac import _context, _source
from rasterio.warp import transform_bounds

from pipeline.aoi import parse_aoi
from pipeline.errors import FetchError
from pipeline.fetch.base import DateWindow, SourceConfig
from pipeline.watch.imagery import Imagery, imagery_key, list_imagery


def _aoi(plan):
    west, south, east, north = transform_bounds(plan.crs, "EPSG:4326", *plan.bounds)
    return parse_aoi(f"{west},{south},{east},{north}")


def test_stac_first_run_lists_dates_in_before_window_and_lookback(api, plan, tmp_path):
    """Items group by date; cloudy ones are left out; the before window is searched too."""
    server, _ = api
    found = list_imagery(_aoi(plan), _source(server), res_m=10.0, context=_context(tmp_path),
                         today=date(2020, 7, 31), since=None,
                         before=DateWindow(date(2020, 6, 1), date(2020, 6, 3)))
    assert [i.key for i in found] == ["2020-06-02", "2020-06-07", "2020-07-15"]
    assert found[0].when == date(2020, 6, 2) and "S2A_45TXK_20200602_0_L2A" in found[0].label


def test_stac_later_run_searches_only_after_the_last_analysed(api, plan, tmp_path):
    """With ``since``, only later dates are searched and listed."""
    server, stac = api
    found = list_imagery(_aoi(plan), _source(server), res_m=10.0, context=_context(tmp_path),
                         today=date(2020, 7, 31), since=date(2020, 6, 7), before=None)
    assert [i.key for i in found] == ["2020-07-15"]
    assert stac.searches and all(s["datetime"].startswith("2020-06-08") for s in stac.searches)


def test_local_folder_lists_dated_geotiffs(tmp_path):
    """A local source lists the site folder's GeoTIFFs by date; the key is the file name."""
    aoi = parse_aoi("88.29,43.38", radius_m=300)
    folder = tmp_path / aoi.id
    folder.mkdir()
    data = np.full((3, 8, 8), 50, np.uint8)
    for name in ("b_2019-06-01.tif", "a_2017-03-02.tif"):
        write_geotiff(folder / name, data)
    (folder / "notes.txt").write_text("ignored")
    source = SourceConfig("mine", "local", {"path": str(tmp_path / "{site}")})
    found = list_imagery(aoi, source, res_m=None, context=None, today=date(2026, 1, 1),
                         since=None, before=None)
    assert found == [Imagery("a_2017-03-02.tif", date(2017, 3, 2), "a_2017-03-02.tif"),
                     Imagery("b_2019-06-01.tif", date(2019, 6, 1), "b_2019-06-01.tif")]
    assert imagery_key("local", {"path": str(folder / "a_2017-03-02.tif")}) == found[0].key
    write_geotiff(folder / "undated.tif", data)
    with pytest.raises(FetchError, match="undated.tif has no acquisition date"):
        list_imagery(aoi, source, res_m=None, context=None, today=date(2026, 1, 1),
                     since=None, before=None)
    with pytest.raises(FetchError, match="does not exist"):
        list_imagery(parse_aoi("88.3,43.4", radius_m=300), source, res_m=None, context=None,
                     today=date(2026, 1, 1), since=None, before=None)


def test_imagery_keys_from_manifest_inputs():
    """The key of a manifest input matches the listing's key for each source type."""
    assert imagery_key("wayback", {"extra": {"release_number": 4073}}) == "4073"
    assert imagery_key("stac", {"acquired": "2020-06-07"}) == "2020-06-07"
    assert imagery_key("xyz", {}) is None
