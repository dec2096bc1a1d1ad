"""Tests for pipeline.fetch.cache: verified hits, corrupt entries, offline runs, negatives."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from fetch.servers import LoopbackServer, serve

from pipeline.errors import FetchError
from pipeline.fetch import cache
from pipeline.fetch.base import FetchContext
from pipeline.fetch.cache import cache_paths, evict, fetch_cached, fetch_many_cached
from pipeline.fetch.http import HttpClient, NotFound

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(200))


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    """Serves three PNG-looking tiles and one JSON document."""
    files = {f"/t/{i}.png": PNG + bytes([i]) for i in range(3)}
    with serve({**files, "/doc.json": '{"a": 1}'}) as s:
        yield s


@pytest.fixture
def context(tmp_path: Path) -> FetchContext:
    """Online context with a fresh cache folder and tiny timeouts."""
    return FetchContext(cache_dir=tmp_path / "cache", timeout_s=0.5, max_retries=1)


def _client(context: FetchContext) -> HttpClient:
    return HttpClient(context, backoff_s=0.01)


def _urls(server: LoopbackServer) -> list[str]:
    return [server.url(f"/t/{i}.png") for i in range(3)]


def test_fetch_cached_stores_body_and_sidecar(server: LoopbackServer,
                                              context: FetchContext) -> None:
    """A miss is fetched and stored with a sidecar naming URL, hash, size, time and type."""
    url = server.url("/doc.json")
    got = fetch_cached(url, context=context, client=_client(context), expect="json")
    assert not got.from_cache and got.content == b'{"a": 1}'
    body_path, meta_path = cache_paths(url, context=context)
    assert got.path == body_path and body_path.read_bytes() == got.content
    assert body_path.parent.parent.parent.name == "http"
    meta = json.loads(meta_path.read_text())
    assert meta["url"] == url and meta["sha256"] == got.sha256 and meta["size"] == 8
    assert meta["content_type"] == "application/json" and meta["fetched_utc"].endswith("Z")
    assert not list(body_path.parent.glob("*.part"))


def test_second_run_makes_zero_requests(server: LoopbackServer, context: FetchContext) -> None:
    """Rerunning the same fetches, with a new client, sends nothing to the server."""
    urls = _urls(server) + [server.url("/t/missing.png")]
    first = fetch_many_cached(urls, context=context, client=_client(context), expect="image")
    assert first[urls[-1]] is None and server.total_requests == 4
    server.reset_counts()
    client = _client(context)
    second = fetch_many_cached(urls, context=context, client=client, expect="image")
    assert server.total_requests == 0 and client.requests_made == 0
    assert all(second[u].from_cache and second[u].content == first[u].content for u in urls[:3])
    assert second[urls[-1]] is None


def test_corrupt_entry_is_refetched(server: LoopbackServer, context: FetchContext,
                                   caplog: pytest.LogCaptureFixture) -> None:
    """A cached body whose SHA-256 no longer matches is logged, deleted and fetched again."""
    url = _urls(server)[0]
    fetch_cached(url, context=context, client=_client(context), expect="image")
    body_path, _ = cache_paths(url, context=context)
    body_path.write_bytes(PNG + b"tampered")
    server.reset_counts()
    with caplog.at_level(logging.WARNING, logger="pipeline.fetch.cache"):
        got = fetch_cached(url, context=context, client=_client(context), expect="image")
    assert "corrupt" in caplog.text
    assert not got.from_cache and got.content == PNG + bytes([0])
    assert server.total_requests == 1 and body_path.read_bytes() == got.content


def test_corrupt_entry_offline_is_never_used(server: LoopbackServer,
                                             context: FetchContext) -> None:
    """Offline, a corrupt entry is deleted and reported as not cached, not returned."""
    url = _urls(server)[0]
    fetch_cached(url, context=context, client=_client(context))
    cache_paths(url, context=context)[0].write_bytes(b"garbage")
    offline = replace(context, offline=True)
    with pytest.raises(FetchError, match="offline and not cached"):
        fetch_cached(url, context=offline, client=_client(offline))
    assert not cache_paths(url, context=context)[1].exists()


def test_offline_miss_lists_every_missing_url(server: LoopbackServer,
                                              context: FetchContext) -> None:
    """Offline with two of three URLs uncached: one FetchError names both, nothing is sent."""
    urls = _urls(server)
    fetch_cached(urls[0], context=context, client=_client(context))
    server.reset_counts()
    offline = replace(context, offline=True)
    with pytest.raises(FetchError, match="offline and 2 URLs are not cached") as e:
        fetch_many_cached(urls, context=offline, client=_client(offline))
    assert urls[1] in str(e.value) and urls[2] in str(e.value) and urls[0] not in str(e.value)
    assert "run once online first" in str(e.value)
    assert server.total_requests == 0


def test_offline_hit_needs_no_server(context: FetchContext, tmp_path: Path) -> None:
    """Once cached, an entry is served offline after the server is gone."""
    with serve({"/x.png": PNG}) as s:
        url = s.url("/x.png")
        fetch_cached(url, context=context, client=_client(context), expect="image")
    offline = replace(context, offline=True)
    got = fetch_cached(url, context=offline, client=_client(offline), expect="image")
    assert got.from_cache and got.content == PNG


def test_negative_entry_remembered_then_expires(server: LoopbackServer, context: FetchContext,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A 404 is cached as a negative entry for NEGATIVE_TTL_S, then asked again."""
    url = server.url("/t/none.png")
    with pytest.raises(NotFound) as e:
        fetch_cached(url, context=context, client=_client(context))
    assert not e.value.cached
    with pytest.raises(NotFound) as e:
        fetch_cached(url, context=context, client=_client(context))
    assert e.value.cached and server.count("/t/none.png") == 1
    monkeypatch.setattr(cache, "NEGATIVE_TTL_S", 0.0)
    with pytest.raises(NotFound):
        fetch_cached(url, context=context, client=_client(context))
    assert server.count("/t/none.png") == 2
    offline = replace(context, offline=True)
    with pytest.raises(NotFound):  # offline, an expired negative entry still counts
        fetch_cached(url, context=offline, client=_client(offline))


def test_invalid_body_is_not_cached(server: LoopbackServer, context: FetchContext) -> None:
    """An HTML error page where an image was expected raises and leaves no entry."""
    url = _urls(server)[1]
    server.fault("/t/1.png", "html", times=1)
    with pytest.raises(FetchError, match="HTML page"):
        fetch_cached(url, context=context, client=_client(context), expect="image")
    assert not cache_paths(url, context=context)[1].exists()
    assert fetch_cached(url, context=context, client=_client(context), expect="image").content


def test_validate_hook_keeps_body_out(server: LoopbackServer, context: FetchContext) -> None:
    """A body rejected by ``validate`` is not stored."""
    url = server.url("/doc.json")

    def reject(body: bytes) -> None:
        raise FetchError("service error")

    with pytest.raises(FetchError, match="service error"):
        fetch_cached(url, context=context, client=_client(context), validate=reject)
    assert not cache_paths(url, context=context)[1].exists()


def test_max_age_refetches_when_online(server: LoopbackServer, context: FetchContext) -> None:
    """An entry older than max_age_s is fetched again online, but used as is offline."""
    url = server.url("/doc.json")
    fetch_cached(url, context=context, client=_client(context))
    fetch_cached(url, context=context, client=_client(context), max_age_s=0.0)
    assert server.count("/doc.json") == 2
    offline = replace(context, offline=True)
    assert fetch_cached(url, context=offline, client=_client(offline), max_age_s=0.0).from_cache


def test_body_without_sidecar_is_a_miss(server: LoopbackServer, context: FetchContext) -> None:
    """A body left without its sidecar (a run killed between the two writes) is not used."""
    url = server.url("/doc.json")
    fetch_cached(url, context=context, client=_client(context))
    body_path, meta_path = cache_paths(url, context=context)
    meta_path.unlink()
    body_path.write_bytes(b"partial")
    got = fetch_cached(url, context=context, client=_client(context))
    assert not got.from_cache and got.content == b'{"a": 1}'


def test_evict_removes_entry(server: LoopbackServer, context: FetchContext) -> None:
    """evict deletes both files; a second evict is harmless."""
    url = server.url("/doc.json")
    fetch_cached(url, context=context, client=_client(context))
    evict(url, context=context)
    evict(url, context=context)
    assert not any(p.exists() for p in cache_paths(url, context=context))


def test_cache_root_is_checked_until_found_good(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache root that is a file is refused at every call; one found good is not walked
    again (the walk cost half of cache_paths' time, once per tile)."""
    root = tmp_path / "cache"
    root.write_text("not a folder")
    context = FetchContext(cache_dir=root)
    for _ in range(2):
        with pytest.raises(FetchError, match="is a file"):
            cache_paths("https://example.test/a.png", context=context)
    root.unlink()
    walks: list[Path] = []
    real_exists = Path.exists

    def counting(self: Path, *args: object, **kwargs: object) -> bool:
        walks.append(self)
        return real_exists(self)

    monkeypatch.setattr(Path, "exists", counting)
    first = cache_paths("https://example.test/a.png", context=context)
    walked = len(walks)
    assert walked >= 1
    assert cache_paths("https://example.test/b.png", context=context) != first
    assert len(walks) == walked
