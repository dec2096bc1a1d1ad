"""Tests for pipeline.fetch.stac_items and pipeline.fetch.signing: asset keys, scaling, signing."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from fetch.servers import serve
from fetch.stac_server import make_item

from pipeline.errors import ConfigError, FetchError, ProvenanceWarning
from pipeline.fetch.base import FetchContext
from pipeline.fetch.http import HttpClient
from pipeline.fetch.signing import make_signer
from pipeline.fetch.stac_items import PROFILES, item_sha256, prepare_items, profile_for

BANDS = ("red", "green", "blue", "nir", "swir16")
S2 = PROFILES["sentinel-2"]


def _item(item_id="A", *, keys=("red", "green", "blue", "nir", "swir16", "scl"), baseline="04.00",
          offset=None, when=datetime(2022, 6, 1, tzinfo=UTC), extra=None):
    rb = {k: {"scale": 0.0001, **({"offset": offset} if offset is not None else {})}
          for k in keys}
    props = {**({"s2:processing_baseline": baseline} if baseline else {}), **(extra or {})}
    return make_item(item_id, when, collection="sentinel-2-l2a", crs="EPSG:32645",
                     bounds=(600000, 4790000, 610000, 4800000), shape=(1000, 1000),
                     assets={k: f"https://example.test/{item_id}/{k}.tif" for k in keys},
                     cloud_cover=1.0, raster_bands=rb, properties=props)


@pytest.mark.parametrize(("baseline", "given", "expected"), [
    ("03.01", None, 0.0),
    ("03.01", -0.1, 0.0),   # metadata claims an offset the baseline does not have
    ("04.00", None, -0.1),  # PC-style: no offset in raster:bands
    ("04.00", 0.0, -0.1),
    ("04.00", -0.1, -0.1),  # c1-style: given, not applied twice
    ("05.10", None, -0.1),
])
def test_prepare_items_offset_follows_baseline(baseline, given, expected):
    """The S2 offset is decided by s2:processing_baseline, not by the earthsearch flag."""
    raw = _item(baseline=baseline, offset=given,
                extra={"earthsearch:boa_offset_applied": baseline >= "04.00"})
    items, skipped = prepare_items([raw], S2, BANDS)
    assert skipped == [] and items[0].offset == {b: pytest.approx(expected) for b in BANDS}
    assert items[0].scale["red"] == 0.0001 and items[0].baseline == baseline


def test_prepare_items_without_baseline_uses_date_and_warns():
    """No baseline: items from 2022-01-25 get the offset, with a ProvenanceWarning."""
    with pytest.warns(ProvenanceWarning, match="no s2:processing_baseline"):
        items, _ = prepare_items([_item(baseline=None)], S2, BANDS)
    assert items[0].offset["red"] == pytest.approx(-0.1)
    with pytest.warns(ProvenanceWarning):
        old, _ = prepare_items([_item(baseline=None, when=datetime(2021, 6, 1, tzinfo=UTC))],
                               S2, BANDS)
    assert old[0].offset["red"] == 0.0


def test_prepare_items_resolves_pc_keys_and_sorts():
    """Planetary Computer keys (B04, SCL) resolve; items sort by datetime; no mask -> skipped."""
    pc_keys = ("B04", "B03", "B02", "B08", "B11", "SCL")
    late = _item("late", keys=pc_keys, when=datetime(2022, 6, 9, tzinfo=UTC))
    early = _item("early", keys=pc_keys, when=datetime(2022, 6, 2, tzinfo=UTC))
    bare = _item("bare", keys=("B04", "B03", "B02", "B08", "B11"))
    items, skipped = prepare_items([late, bare, early], S2, BANDS)
    assert [i.item_id for i in items] == ["early", "late"]
    assert items[0].keys == dict(zip(BANDS, pc_keys[:5], strict=True))
    assert items[0].mask_key == "SCL" and len(skipped) == 1 and "SCL" in skipped[0]


def test_profile_for_overrides_and_errors():
    """Config can rename assets; unknown collections and bad tables are ConfigErrors."""
    profile = profile_for("sentinel-2-l2a", {"assets": {"nir": "B8A"}}, source_name="s")
    assert profile.assets["nir"] == ("B8A",) and profile.assets["red"] == ("red", "B04")
    assert profile_for("landsat-c2-l2", {}, source_name="s").mask == "qa_pixel"
    with pytest.raises(ConfigError, match="sources.s: collection 'modis'"):
        profile_for("modis", {}, source_name="s")
    with pytest.raises(ConfigError, match="sources.s.assets"):
        profile_for("sentinel-2-l2a", {"assets": {"thermal": "B10"}}, source_name="s")


def test_item_sha256_is_canonical():
    """The item hash ignores key order."""
    raw = _item()
    assert item_sha256(raw) == item_sha256(dict(reversed(list(raw.items()))))


def test_planetary_computer_signer_fetches_token_once(tmp_path):
    """The signer asks the token URL once and signs only hrefs on the configured hosts."""
    answer = b'{"msft:expiry": "2099-01-01T00:00:00Z", "token": "sv=1&sig=abc"}'
    with serve({"/token/sentinel-2-l2a": answer}) as server:
        client = HttpClient(FetchContext(cache_dir=tmp_path))
        options = {"token_url": server.url("/token/{collection}"),
                   "sign_hosts": [".blob.core.windows.net"]}
        sign = make_signer("planetary-computer", options, collection="sentinel-2-l2a",
                           client=client, source_name="pc")
        href = "https://sentinel2l2a01.blob.core.windows.net/c/B04.tif"
        assert sign(href) == href + "?sv=1&sig=abc"
        assert sign(href + "?a=1") == href + "?a=1&sv=1&sig=abc"
        assert sign("https://elsewhere.test/B04.tif") == "https://elsewhere.test/B04.tif"
        assert server.count("/token/") == 1


def test_make_signer_errors(tmp_path):
    """Unknown signers are ConfigErrors; a token answer without a token is a FetchError."""
    client = HttpClient(FetchContext(cache_dir=tmp_path))
    assert make_signer(None, {}, collection="c", client=client, source_name="s") is None
    with pytest.raises(ConfigError, match="sources.s.sign: unknown signer 'aws'"):
        make_signer("aws", {}, collection="c", client=client, source_name="s")
    with serve({"/token/c": b'{"expiry": 1}'}) as server:
        sign = make_signer("planetary-computer", {"token_url": server.url("/token/{collection}"),
                                                  "sign_hosts": ["127.0.0.1"]},
                           collection="c", client=client, source_name="s")
        with pytest.raises(FetchError, match="without a 'token'"):
            sign(server.url("/x.tif"))
