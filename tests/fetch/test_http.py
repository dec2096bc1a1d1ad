"""Tests for pipeline.fetch.http: retries, timeouts, body checks and limits, over loopback HTTP."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import requests
from _helpers import run_guarded
from fetch.servers import LoopbackServer, Request, serve, write_synthetic_scene
from hypothesis import given
from hypothesis import strategies as st

from pipeline.errors import FetchError
from pipeline.fetch.base import FetchContext
from pipeline.fetch.cache import cache_paths, fetch_cached
from pipeline.fetch.http import HttpClient, NotFound, check_body, check_url, get_bytes

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 64


def _context(tmp_path: Path, **kw: object) -> FetchContext:
    """A context with tiny timeouts so fault tests stay fast."""
    return FetchContext(cache_dir=tmp_path, **{"timeout_s": 0.3, "max_retries": 2, **kw})


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    """A loopback server with one PNG, one JSON document and one text file."""
    with serve({"/a.png": PNG, "/doc.json": json.dumps({"ok": 1}), "/t.txt": "hello"},
               stall_s=1.0) as s:
        yield s


def _client(tmp_path: Path, **kw: object) -> HttpClient:
    return HttpClient(_context(tmp_path, **kw), backoff_s=0.01)


def test_get_bytes_sends_user_agent_and_counts(server: LoopbackServer, tmp_path: Path) -> None:
    """A plain GET returns the body, sends the context's User-Agent and counts one request."""
    client = _client(tmp_path, user_agent="sitewatch-test/1")
    assert client.get_bytes(server.url("/a.png"), expect="image") == PNG
    assert client.requests_made == 1 and server.count("/a.png") == 1
    assert server.headers_seen[0][1]["User-Agent"] == "sitewatch-test/1"


def test_get_json_parses(server: LoopbackServer, tmp_path: Path) -> None:
    """get_json returns the parsed document; module-level get_bytes works without a client."""
    assert _client(tmp_path).get_json(server.url("/doc.json")) == {"ok": 1}
    assert get_bytes(server.url("/t.txt"), context=_context(tmp_path)) == b"hello"


def test_fetch_retries_500_then_succeeds(server: LoopbackServer, tmp_path: Path) -> None:
    """Two 500s then success: the body arrives after three requests."""
    server.fault("/a.png", "status", status=500, times=2)
    client = _client(tmp_path)
    assert client.get_bytes(server.url("/a.png"), expect="image") == PNG
    assert server.count("/a.png") == 3 and client.requests_made == 3


def test_fetch_gives_up_on_persistent_503(server: LoopbackServer, tmp_path: Path) -> None:
    """A 503 on every attempt ends in FetchError naming the URL, the status and the count."""
    server.fault("/a.png", "status", status=503)
    client = _client(tmp_path, max_retries=4)
    url = server.url("/a.png")
    message = "server answered 503 five times; the source may be down"
    with pytest.raises(FetchError, match=message) as e:
        client.get_bytes(url)
    assert url in str(e.value) and "--offline" in str(e.value)
    assert e.value.__cause__ is not None
    assert server.count("/a.png") == 5


def test_fetch_honours_retry_after(server: LoopbackServer, tmp_path: Path) -> None:
    """A 429 with Retry-After: 1 delays the retry by about a second, not the tiny backoff."""
    server.fault("/a.png", "status", status=429, retry_after="1", times=1)
    client = _client(tmp_path)
    start = time.monotonic()
    assert client.get_bytes(server.url("/a.png")) == PNG
    assert 0.9 <= time.monotonic() - start < 3.0
    assert server.count("/a.png") == 2


def test_fetch_caps_retry_after(server: LoopbackServer, tmp_path: Path) -> None:
    """A Retry-After of 100 s is capped at retry_after_max_s."""
    server.fault("/a.png", "status", status=429, retry_after="100", times=1)
    client = HttpClient(_context(tmp_path), backoff_s=0.01, retry_after_max_s=0.2)
    start = time.monotonic()
    client.get_bytes(server.url("/a.png"))
    assert 0.2 <= time.monotonic() - start < 2.0


def test_fetch_404_raises_notfound_without_retry(server: LoopbackServer, tmp_path: Path) -> None:
    """A 404 raises NotFound (a FetchError) after exactly one request."""
    client = _client(tmp_path)
    with pytest.raises(NotFound) as e:
        client.get_bytes(server.url("/missing.png"))
    assert e.value.status == 404 and isinstance(e.value, FetchError)
    assert client.requests_made == 1


def test_fetch_204_is_notfound(server: LoopbackServer, tmp_path: Path) -> None:
    """A 204 (empty tile) is reported as NotFound too."""
    server.fault("/a.png", "status", status=204)
    with pytest.raises(NotFound):
        _client(tmp_path).get_bytes(server.url("/a.png"), expect="image")


def test_fetch_403_not_retried(server: LoopbackServer, tmp_path: Path) -> None:
    """Other 4xx answers fail at once with a hint, without retries."""
    server.fault("/a.png", "status", status=403)
    with pytest.raises(FetchError, match="403.*refused access") as e:
        _client(tmp_path).get_bytes(server.url("/a.png"))
    assert not isinstance(e.value, NotFound)
    assert server.count("/a.png") == 1


def test_fetch_stall_times_out(server: LoopbackServer, tmp_path: Path) -> None:
    """A server that does not answer within timeout_s fails after the retries, saying timeout."""
    server.fault("/a.png", "stall")
    client = HttpClient(_context(tmp_path, timeout_s=0.2, max_retries=1), backoff_s=0.01)
    start = time.monotonic()
    with pytest.raises(FetchError, match=r"no answer within 0.2 s twice \(timeout"):
        client.get_bytes(server.url("/a.png"))
    assert time.monotonic() - start < 1.5
    assert server.count("/a.png") == 2


def test_fetch_stall_then_answer_succeeds(server: LoopbackServer, tmp_path: Path) -> None:
    """One stalled attempt, then a normal answer: the retry succeeds."""
    server.fault("/a.png", "stall", times=1)
    assert _client(tmp_path, timeout_s=0.2).get_bytes(server.url("/a.png")) == PNG


def test_fetch_truncated_body_fails(server: LoopbackServer, tmp_path: Path) -> None:
    """A body shorter than its Content-Length is a FetchError after the retries."""
    server.fault("/a.png", "truncate")
    with pytest.raises(FetchError, match="cut off") as e:
        _client(tmp_path).get_bytes(server.url("/a.png"), expect="image")
    assert e.value.__cause__ is not None
    assert server.count("/a.png") == 3


def test_fetch_truncated_once_recovers(server: LoopbackServer, tmp_path: Path) -> None:
    """One truncated answer, then a whole one: the whole body is returned."""
    server.fault("/a.png", "truncate", times=1)
    assert _client(tmp_path).get_bytes(server.url("/a.png")) == PNG


def test_fetch_html_instead_of_image(server: LoopbackServer, tmp_path: Path) -> None:
    """An HTML page with status 200 where an image was expected names the URL and the page."""
    server.fault("/a.png", "html")
    url = server.url("/a.png")
    with pytest.raises(FetchError, match="did not return an image: got an HTML page") as e:
        _client(tmp_path).get_bytes(url, expect="image")
    assert url in str(e.value) and "Service Unavailable" in str(e.value)


def test_fetch_html_instead_of_json(server: LoopbackServer, tmp_path: Path) -> None:
    """An HTML page where JSON was expected is a FetchError."""
    server.fault("/doc.json", "html")
    with pytest.raises(FetchError, match="did not return valid JSON: got an HTML page"):
        _client(tmp_path).get_json(server.url("/doc.json"))


def test_fetch_bad_json(server: LoopbackServer, tmp_path: Path) -> None:
    """A body that does not parse as JSON is a FetchError chained to the parser's error."""
    server.fault("/doc.json", "bad_json")
    with pytest.raises(FetchError, match="did not return valid JSON") as e:
        _client(tmp_path).get_json(server.url("/doc.json"))
    assert isinstance(e.value.__cause__, ValueError)


def test_fetch_image_sniffed_by_magic(server: LoopbackServer, tmp_path: Path) -> None:
    """A JPEG served as text/plain is accepted: the magic bytes decide."""
    server.add("/j", JPEG, "text/plain")
    assert _client(tmp_path).get_bytes(server.url("/j"), expect="image") == JPEG


def test_fetch_follows_http_redirect(server: LoopbackServer, tmp_path: Path) -> None:
    """A redirect to another http path is followed; both hops are counted."""
    server.fault("/old.png", "redirect", location="/a.png")
    client = _client(tmp_path)
    assert client.get_bytes(server.url("/old.png")) == PNG
    assert client.requests_made == 2


def test_fetch_refuses_redirect_to_other_scheme(server: LoopbackServer, tmp_path: Path) -> None:
    """A redirect to file:// is refused."""
    server.fault("/a.png", "redirect", location="file:///etc/passwd")
    with pytest.raises(FetchError, match="not an http"):
        _client(tmp_path).get_bytes(server.url("/a.png"))


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.org/a", "/relative/a.png",
                                 "http:///nohost"])
def test_check_url_refuses_non_http(url: str) -> None:
    """Only absolute http(s) URLs with a host are fetched."""
    with pytest.raises(FetchError, match="only absolute http"):
        check_url(url)


def test_fetch_connection_refused(tmp_path: Path) -> None:
    """A port nobody listens on fails with a connection message after the retries."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(FetchError, match="could not connect"):
        _client(tmp_path, max_retries=1).get_bytes(f"http://127.0.0.1:{port}/a.png")


def test_post_json_roundtrip(server: LoopbackServer, tmp_path: Path) -> None:
    """post_json sends the payload as JSON and parses the answer."""
    def echo(request: Request) -> tuple[int, dict[str, str], bytes]:
        payload = json.loads(request.body)
        return 200, {"Content-Type": "application/json"}, json.dumps({"got": payload}).encode()

    server.route("/search", echo)
    assert _client(tmp_path).post_json(server.url("/search"), {"a": 1}) == {"got": {"a": 1}}


def test_get_many_limits_concurrency_and_maps_missing(server: LoopbackServer,
                                                      tmp_path: Path) -> None:
    """get_many keeps order, maps 404 to None and never exceeds max_concurrency in flight."""
    lock, state = threading.Lock(), {"now": 0, "max": 0}

    def slow(request: Request) -> tuple[int, dict[str, str], bytes]:
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        time.sleep(0.03)
        with lock:
            state["now"] -= 1
        return 200, {"Content-Type": "image/png"}, PNG + request.path.encode()

    urls = [server.route(f"/t/{i}.png", slow) for i in range(12)] + [server.url("/t/none.png")]
    calls: list[tuple[int, int]] = []
    context = _context(tmp_path, max_concurrency=3, progress=lambda d, t: calls.append((d, t)))
    client = HttpClient(context, backoff_s=0.01)
    bodies = client.get_many(urls + urls[:2], expect="image")
    assert list(bodies) == urls
    assert bodies[urls[-1]] is None
    assert all(bodies[u].endswith(f"/t/{i}.png".encode()) for i, u in enumerate(urls[:-1]))
    assert 1 <= state["max"] <= 3
    assert calls[-1] == (13, 13)


def test_get_many_raises_first_failure(server: LoopbackServer, tmp_path: Path) -> None:
    """A failing URL among many raises FetchError."""
    server.fault("/doc.json", "status", status=400)
    with pytest.raises(FetchError, match="400"):
        _client(tmp_path).get_many([server.url("/a.png"), server.url("/doc.json")])


SIGNATURES = (b"\x89PNG", b"\xff\xd8\xff", b"II*", b"MM\x00*", b"II+", b"MM\x00+")


@given(st.binary(max_size=64).filter(
    lambda b: not b.startswith(SIGNATURES) and not (b[:4] == b"RIFF" and b[8:12] == b"WEBP")))
def test_check_body_rejects_non_images(body: bytes) -> None:
    """Any bytes without an image signature fail the image check."""
    with pytest.raises(FetchError, match="did not return an image"):
        check_body("http://x/t.png", body, "image/png", expect="image")


def test_server_answers_byte_ranges(server: LoopbackServer) -> None:
    """The loopback server answers single, suffix and multiple ranges, and 416 past the end."""
    body = server.files["/a.png"][0]
    url = server.url("/a.png")
    one = requests.get(url, headers={"Range": "bytes=2-9"}, timeout=2)
    assert one.status_code == 206 and one.content == body[2:10]
    assert one.headers["Content-Range"] == f"bytes 2-9/{len(body)}"
    tail = requests.get(url, headers={"Range": "bytes=-5"}, timeout=2)
    assert tail.status_code == 206 and tail.content == body[-5:]
    multi = requests.get(url, headers={"Range": "bytes=0-3,10-12"}, timeout=2)
    assert multi.status_code == 206 and "multipart/byteranges" in multi.headers["Content-Type"]
    assert body[0:4] in multi.content and body[10:13] in multi.content
    assert requests.get(url, headers={"Range": "bytes=9999-"}, timeout=2).status_code == 416
    assert requests.head(url, timeout=2).headers["Content-Length"] == str(len(body))


def test_server_serves_geotiff_to_gdal(tmp_path: Path) -> None:
    """GDAL's /vsicurl/ reads a GeoTIFF from the loopback server through range requests."""
    path = write_synthetic_scene(tmp_path / "scene.tif", size_px=300)
    with serve(root=tmp_path) as s, rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"):
        with rasterio.open(s.url("/scene.tif")) as remote, rasterio.open(path) as local:
            np.testing.assert_array_equal(remote.read(), local.read())
        assert any("Range" in headers for _, headers in s.headers_seen)
        assert s.count("/scene.tif") >= 1


@contextlib.contextmanager
def _socket_server(one: Callable[[socket.socket, threading.Event], None]) -> Iterator[str]:
    """A loopback server that hands each connection to ``one(conn, stop)`` on a thread of its
    own (for answers servers.py cannot send); yields its base URL, and sets ``stop`` at the end."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = listener.accept()
                threading.Thread(target=one, args=(conn, stop), daemon=True).start()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


@contextlib.contextmanager
def _raw_server(answer: bytes, *, hold_s: float = 0.0) -> Iterator[str]:
    """A server that sends ``answer`` verbatim to every request, then holds the connection
    open ``hold_s`` seconds before closing it."""
    def one(conn: socket.socket, stop: threading.Event) -> None:
        with conn:
            conn.settimeout(5)
            with contextlib.suppress(OSError):
                conn.recv(65536)
                conn.sendall(answer)
                stop.wait(hold_s)

    with _socket_server(one) as url:
        yield url


def test_fetch_body_that_does_not_gunzip(server: LoopbackServer, tmp_path: Path) -> None:
    """A body labelled gzip that is not gzip is a FetchError naming the encoding (it was a
    requests ContentDecodingError traceback), and stays out of the cache."""
    server.route("/gz.json", lambda r: (200, {"Content-Type": "application/json",
                                              "Content-Encoding": "gzip"}, b"not gzip at all"))
    url = server.url("/gz.json")
    with pytest.raises(FetchError, match="Content-Encoding 'gzip' but it does not decode"):
        _client(tmp_path).get_json(url)
    context = _context(tmp_path)
    with pytest.raises(FetchError, match="misconfigured"):
        fetch_cached(url, context=context, client=_client(tmp_path), expect="json")
    assert not any(p.is_file() for p in cache_paths(url, context=context))


@pytest.mark.parametrize("answer, hold_s, seen", [
    (b"HTTP/1.1 403 Forbidden\r\nContent-Length: 100\r\n\r\nabc", 2.0, "ReadTimeoutError"),
    (b"HTTP/1.1 403 Forbidden\r\nContent-Length: 100\r\n\r\nabc", 0.0, "ProtocolError"),
    (b"HTTP/1.1 403 Forbidden\r\nContent-Encoding: gzip\r\nContent-Length: 8\r\n\r\nnot gzip",
     0.0, "DecodeError"),
])
def test_fetch_error_status_with_unreadable_body(tmp_path: Path, answer: bytes, hold_s: float,
                                                 seen: str) -> None:
    """A 403 whose body stalls, is cut off or does not decode still ends in the 403 message
    (these were raw urllib3 tracebacks from reading the error page's first bytes)."""
    with _raw_server(answer, hold_s=hold_s) as base:
        start = time.monotonic()
        with pytest.raises(FetchError, match=f"403.*could not be read \\({seen}\\).*refused"):
            _client(tmp_path, timeout_s=0.3).get_bytes(base + "/a.png")
        assert time.monotonic() - start < 1.5


def test_fetch_non_ascii_digits_in_headers(server: LoopbackServer, tmp_path: Path) -> None:
    """A Retry-After or Content-Length of "²" (str.isdigit says yes, float/int say no) is
    ignored, not a ValueError traceback."""
    server.route("/busy.png", lambda r: (503, {"Retry-After": "\u00b2"}, b"busy"))
    with pytest.raises(FetchError, match="server answered 503 twice"):
        _client(tmp_path, max_retries=1).get_bytes(server.url("/busy.png"))
    with _raw_server(b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\nConnection: close\r\n\r\n"
                     + PNG) as base:
        assert _client(tmp_path).get_bytes(base + "/a.png", expect="image") == PNG


def test_fetch_json_nested_too_deeply(server: LoopbackServer, tmp_path: Path) -> None:
    """JSON nested deeper than Python's stack is a FetchError (it was a RecursionError)."""
    server.add("/deep.json", b"[" * 100_000, "application/json")
    with pytest.raises(FetchError, match="nested too deeply"):
        _client(tmp_path).get_json(server.url("/deep.json"))


@contextlib.contextmanager
def _drip_server(head: bytes, body: bytes = b"", *, every_s: float = 0.05,
                 drip_head: bool = False) -> Iterator[tuple[str, dict[str, Any]]]:
    """A server that sends ``head`` then ``body`` one byte every ``every_s`` seconds (the head
    at once unless ``drip_head``), until told to answer normally: ``state["answer"]`` set to
    a whole response. ``state["connections"]`` counts the requests that reached it."""
    state: dict[str, Any] = {"answer": None, "connections": 0}

    def one(conn: socket.socket, stop: threading.Event) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(5)
            conn.recv(65536)
            state["connections"] += 1
            if isinstance(state["answer"], bytes):
                conn.sendall(state["answer"])
                return
            if not drip_head:
                conn.sendall(head)
            for byte in (head if drip_head else b"") + body:
                if stop.wait(every_s):
                    return
                conn.sendall(bytes([byte]))

    with _socket_server(one) as url:
        yield url, state


_WHOLE = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"


@pytest.mark.parametrize("drip_head, received", [
    (False, r"the headers and \d+ of 100000 bytes of the body had arrived after 1\.\d s"),
    (True, r"the status line and headers were still incomplete after 1\.\d s"),
], ids=["body", "headers"])
def test_fetch_drip_ends_at_deadline(tmp_path: Path, drip_head: bool, received: str) -> None:
    """A server that drips its body (or its headers) a byte at a time, each byte well within
    timeout_s, ends in a FetchError at deadline_s naming the URL, the deadline, what arrived
    and the fix; not retried, nothing cached, and the next fetch of the URL succeeds."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"
    if drip_head:
        head = b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 100_000
    cache = tmp_path / "cache"
    context = _context(cache, timeout_s=0.3, deadline_s=1.0, max_retries=2)
    client = HttpClient(context, backoff_s=0.01)
    with _drip_server(head, b"x" * 100_000, drip_head=drip_head) as (base, state):
        url = base + "/slow.bin"
        error, took_s = run_guarded(
            lambda: fetch_cached(url, context=context, client=client, expect="any"), 5.0)
        assert isinstance(error, FetchError), error
        assert 1.0 <= took_s < 2.0
        message = str(error)
        assert url in message and "within the 1 s deadline" in message
        assert re.search(received, message), message
        assert "Raise deadline_s in the [fetch] table" in message and "check the server" in message
        assert state["connections"] == 1  # an overrun is not retried
        assert not [p for p in cache.rglob("*") if p.is_file()]
        assert not [t for t in threading.enumerate() if t.name == "sitewatch-deadline"]
        state["answer"] = _WHOLE
        assert fetch_cached(url, context=context, client=client).content == b"hello"
        assert all(p.is_file() for p in cache_paths(url, context=context))


def test_fetch_deadline_spares_a_slow_but_timely_answer(tmp_path: Path) -> None:
    """A body that drips but ends within deadline_s arrives whole (the deadline, not each
    read, is what grew); deadline_s defaults to 4 x timeout_s."""
    assert _context(tmp_path, timeout_s=0.3).request_deadline_s == pytest.approx(1.2)
    context = _context(tmp_path, timeout_s=0.3, deadline_s=5.0, max_retries=0)
    with _drip_server(b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n", b"y" * 20) as (base, _):
        assert HttpClient(context).get_bytes(base + "/slow.bin") == b"y" * 20
