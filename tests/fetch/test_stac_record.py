"""Tests for pipeline.fetch.stac_record: the COG bytes GDAL reads are kept as served."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import rasterio
import requests
from _helpers import run_guarded
from fetch.servers import serve
from fetch.test_http import _drip_server
from fetch.test_stac import COLLECTION, WINDOW, _context, _source
from rasterio.errors import RasterioIOError

from pipeline.errors import FetchError
from pipeline.fetch import stac
from pipeline.fetch.base import FetchContext
from pipeline.fetch.cache import cache_paths, store_body
from pipeline.fetch.stac_load import gdal_options
from pipeline.fetch.stac_record import RangeRecorder, read_key


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


def test_fetch_server_ignoring_ranges_is_refused_unread(api, plan, tmp_path, monkeypatch):
    """A COG server that answers range requests with 200 and the whole file is a FetchError
    saying so; the relay never reads the file into memory nor keeps it in the cache (it read
    every whole file, stored it under #bytes=all, then GDAL failed with 'Range downloading not
    supported'). The next run against a server that honours ranges works."""
    monkeypatch.setattr("fetch.servers._parse_ranges", lambda header, size: None)
    server, _ = api
    context = _context(tmp_path)
    with pytest.raises(FetchError, match=r"answered a byte-range request with the whole file "
                       r"\(HTTP 200.*ignores Range requests"):
        stac.fetch(plan, WINDOW, _source(server), role="after", context=context)
    cached = [p for p in (tmp_path / "cache").rglob("*.json") if ".tif#" in p.read_text()]
    assert not cached and not list((tmp_path / "cache").glob("stac/*/*.tif"))
    monkeypatch.undo()
    assert stac.fetch(plan, WINDOW, _source(server), role="after", context=context).refs


def _relay_get(url: str, first: int, last: int) -> requests.Response:
    return requests.get(url, headers={"Range": f"bytes={first}-{last}"}, timeout=5,
                        proxies={"http": "", "https": ""})


def test_relay_urls_one_form_for_patch_url_and_names(tmp_path):
    """Every URL handed to GDAL is a key of names(), a href without a file name included."""
    hrefs = ["https://h.example/x/B04.tif", "http://h.example/", "https://h.example/x/B04.tif"]
    with RangeRecorder(_context(tmp_path)) as relay:
        urls = [relay.patch_url(h) for h in hrefs]
        names = relay.names()
    assert urls[0] == urls[2] and len(set(urls)) == 2
    assert {names[u] for u in urls} == set(hrefs)
    assert relay.patch_url("s3://bucket/B04.tif") == "s3://bucket/B04.tif"  # not relayed


def test_relay_same_range_twice_stored_once_changed_file_refused(tmp_path, monkeypatch):
    """A range read again with the same bytes is answered and listed once, stored once; a
    file that changed between two reads of a range is refused with a FetchError."""
    from pipeline.fetch import stac_record

    stores: list[str] = []

    def counting(key, response, *, context):
        stores.append(key)
        return store_body(key, response, context=context)

    monkeypatch.setattr(stac_record, "store_body", counting)
    data = bytes(range(256)) * 4
    with serve({"/cogs/a.tif": data}) as server, RangeRecorder(_context(tmp_path)) as relay:
        url = relay.patch_url(server.url("/cogs/a.tif"))
        answers = [_relay_get(url, 16, 99) for _ in range(2)]
        assert [(a.status_code, a.content) for a in answers] == [(206, data[16:100])] * 2
        assert relay.error is None
        server.add("/cogs/a.tif", data[::-1])
        changed = _relay_get(url, 16, 99)
    assert stores == [f"{server.url('/cogs/a.tif')}#bytes=16-99"]
    rows = relay.reads()[server.url("/cogs/a.tif")]
    assert [(r["range"], r["sha256"]) for r in rows] == [
        ("16-99", hashlib.sha256(data[16:100]).hexdigest())]
    assert changed.status_code == 502 and changed.content == b""
    assert isinstance(relay.error, FetchError)
    assert "a.tif changed while it was being read: bytes 16-99" in str(relay.error)


def test_relay_drip_ends_at_gdal_limit(tmp_path: Path) -> None:
    """A COG server dripping a range's body, each byte within timeout_s, is cut off by the relay
    at GDAL's whole-transfer limit (1 s): GDAL gets a 502, the error names the href and the
    fix, nothing is cached (the relay's thread kept reading after GDAL gave up)."""
    context = FetchContext(cache_dir=tmp_path / "cache", timeout_s=0.3, max_retries=0)
    head = (b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-99999/200000\r\n"
            b"Content-Length: 100000\r\n\r\n")
    with _drip_server(head, b"x" * 100_000) as (base, _), RangeRecorder(context) as relay:
        href = base + "/cogs/a.tif"
        relay.patch_url(href)
        answer, took_s = run_guarded(lambda: relay.forward(0, "GET", {"Range": "bytes=0-99999"}),
                                  guard_s=5.0)
    assert answer[0] == 502 and 1.0 <= took_s < 2.0
    assert isinstance(relay.error, FetchError)
    assert href in str(relay.error) and "within 1 s" in str(relay.error)
    assert "bytes of the body had arrived" in str(relay.error)
    assert "Raise timeout_s" in str(relay.error) and "check the server" in str(relay.error)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert relay.reads() == {}


def test_gdal_options_bound_a_dripping_cog_read(tmp_path: Path) -> None:
    """GDAL_HTTP_TIMEOUT, as gdal_options sets it, is curl's whole-transfer limit: /vsicurl/
    gives up on a server dripping its headers a byte every 0.05 s after 1 s."""
    context = FetchContext(cache_dir=tmp_path, timeout_s=0.3, max_retries=0)
    head = b"HTTP/1.1 206 Partial Content\r\nX-Pad: " + b"a" * 100_000
    with _drip_server(head, drip_head=True) as (base, _):
        def read() -> Any:
            with rasterio.Env(**gdal_options(context)):
                return rasterio.open("/vsicurl/" + base + "/a.tif").close()
        error, took_s = run_guarded(read, guard_s=5.0)
    assert isinstance(error, RasterioIOError) and "timed out" in str(error)
    assert took_s < 2.0
