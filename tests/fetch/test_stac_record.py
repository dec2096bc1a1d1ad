"""Tests for pipeline.fetch.stac_record: the COG bytes GDAL reads are kept as served."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from fetch.test_stac import COLLECTION, WINDOW, _context, _source

from pipeline.errors import FetchError
from pipeline.fetch import stac
from pipeline.fetch.cache import cache_paths
from pipeline.fetch.stac_record import read_key


def test_read_key_names_href_and_range() -> None:
    """The key is the unsigned href and the range the server sent (or all of it)."""
    assert read_key("https://h/a.tif", "bytes 0-65535/400000") == "https://h/a.tif#bytes=0-65535"
    assert read_key("https://h/a.tif", None) == "https://h/a.tif#bytes=all"


def test_fetch_keeps_every_body_gdal_read(api, plan, tmp_path, catalogue):
    """Each item's refs list the reads; the cached bodies equal the served bytes at each range."""
    server, _ = api
    context = _context(tmp_path)
    scene = stac.fetch(plan, WINDOW, _source(server), role="after", context=context)
    served = {p: n for p, n in server.bytes_served.items() if p.startswith("/cogs/")}
    kept = 0
    for ref in scene.refs:
        reads = ref.extra["cog_reads"]
        assert {r["url"] for r in reads} == set(ref.extra["assets"].values())
        for read in reads:
            body, _ = cache_paths(read["key"], context=context)
            data = body.read_bytes()
            first, last = (int(v) for v in read["range"].split("-"))
            assert data == catalogue["files"][urlsplit(read["url"]).path][first:last + 1]
            assert hashlib.sha256(data).hexdigest() == read["sha256"]
            assert read["size_bytes"] == len(data)
            kept += len(data)
    # nothing was invented: at most the bytes the server sent for the items' COGs
    assert 0 < kept <= sum(served.values())


def test_fetch_signed_reads_store_no_token(api, plan, tmp_path):
    """With SAS signing, the relay forwards the token but neither cache nor refs hold it."""
    server, _ = api
    token = "se=2099-01-01&sig=secret-signature"
    server.route("/token/" + COLLECTION, lambda r: (
        200, {"Content-Type": "application/json"}, json.dumps({"token": token}).encode()))
    source = _source(server, sign="planetary-computer", sign_hosts=["127.0.0.1"],
                     token_url=server.url("/token/{collection}"))
    scene = stac.fetch(plan, WINDOW, source, role="after", context=_context(tmp_path))
    cog_requests = [p for p in server.requests if p.startswith("/cogs/")]
    assert cog_requests and all(p.endswith("?" + token) for p in cog_requests)
    assert all(r["url"].endswith(".tif") for ref in scene.refs for r in ref.extra["cog_reads"])
    stored = [p.read_bytes() for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert stored and not [b for b in stored if b"secret-signature" in b]


def test_fetch_cog_stall_is_fetch_error_without_traceback(api, plan, tmp_path, capfd):
    """A COG that never answers ends in FetchError; the relay prints nothing on stderr."""
    server, _ = api
    server.fault("/cogs/S2B_45TXK_20200607_0_L2A/red.tif", "stall", delay_s=4.0)
    with pytest.raises(FetchError, match="red.tif"):
        stac.fetch(plan, WINDOW, _source(server), role="after",
                   context=_context(tmp_path, timeout_s=1.0, max_retries=0))
    assert "Traceback" not in capfd.readouterr().err


def test_fetch_cache_disk_error_names_the_cache(api, plan, tmp_path, monkeypatch):
    """A body the cache cannot store stops the read with the cache's message."""
    from pipeline.fetch import stac_record

    def refuse(key, response, *, context):
        raise FetchError(f"Cannot store {key} in the download cache {context.cache_dir}: "
                         "No space left on device.")

    monkeypatch.setattr(stac_record, "store_body", refuse)
    server, _ = api
    with pytest.raises(FetchError, match="Cannot store .*download cache"):
        stac.fetch(plan, WINDOW, _source(server), role="after", context=_context(tmp_path))
    assert not list(Path(tmp_path / "cache").glob("stac/*/*.tif"))
