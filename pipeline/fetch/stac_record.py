"""pipeline.fetch.stac_record: keep the COG bytes GDAL reads, exactly as the server sent them.

GDAL's ``/vsicurl/`` fetches COG byte ranges itself and exposes neither the requests nor the
bytes, so for the evidence package (``originals/``) the reads are relayed: while a STAC
composite is read, every http(s) asset href handed to odc-stac is replaced by a URL on a
loopback relay (``http://127.0.0.1:<port>/<n>/<file name>``). The relay forwards each request
(method and ``Range`` header) to the real, possibly signed, URL once, without retrying (GDAL's
own retry rules apply, as before), answers GDAL with the server's status, headers and body,
and stores every successful body in the download cache under the key
``<unsigned href>#bytes=<Content-Range>``, with its SHA-256. Nothing is decoded or changed.
A server that answers a range request with the whole file (200) is refused unread: the fetch
fails with a FetchError saying the server ignores Range requests.

Each body is stored (written, fsynced, hashed) *before* GDAL gets it, on purpose: a body the
cache cannot keep is never turned into pixels (GDAL gets a 502 and the read fails with the
cache's message), and once the read returns, :meth:`RangeRecorder.reads` lists every body it
used; answering first would need a join on the pending writes to keep that promise. Measured
here (load about 2), storing costs about 5-45 ms a body from 16 KiB to 4 MiB (the fsyncs of body
and sidecar are a third to half of it), the SHA-256 under 3 ms at 4 MiB: small beside a remote
range request. A range GDAL reads again in the same run is hashed and compared with the first
read, not stored again; different bytes mean the file changed during the read, a FetchError.

:meth:`RangeRecorder.reads` lists them per href (``{url, range, key, sha256, size_bytes,
etag, last_modified}``); the composite's cache entry keeps that list so a rerun served from
the cache preserves the same bytes. Signed URLs (SAS tokens) never reach the cache, the list
or the logs: only the unsigned href is recorded.

Each forwarded request runs under a ``Deadline`` of GDAL's own whole-transfer limit
(``GDAL_HTTP_TIMEOUT``, ``cog_read_limit_s``): GDAL gives up on the relay then anyway, and
without it a server dripping bytes within the per-read timeout kept the relay's thread
reading after GDAL had given up, one more thread for each of GDAL's retries.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import requests

from pipeline.errors import FetchError
from pipeline.fetch.base import FetchContext
from pipeline.fetch.cache import store_body
from pipeline.fetch.deadline import Deadline, DeadlineAdapter, arrived, response_socket
from pipeline.fetch.http import Response

__all__ = ["RangeRecorder", "read_key", "cog_read_limit_s"]

log = logging.getLogger(__name__)

_RELAYED_HEADERS = ("Content-Type", "Content-Range", "Accept-Ranges", "ETag", "Last-Modified")
_ANY_QUERY = re.compile(r"\?[^\s'\"]*")


class _NoQueries(logging.Filter):
    """Drops query strings (SAS tokens) from urllib3's request lines while the relay runs."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "?" in text:
            record.msg, record.args = _ANY_QUERY.sub("?<query removed>", text), ()
        return True


def cog_read_limit_s(context: FetchContext) -> int:
    """Whole seconds one COG read may take in all: GDAL_HTTP_TIMEOUT, and the relay's."""
    return max(1, math.ceil(context.timeout_s))


def read_key(href: str, content_range: str | None) -> str:
    """The cache key of one read: the unsigned href and the byte range the server sent."""
    span = (content_range or "").removeprefix("bytes ").split("/")[0] or "all"
    return f"{href}#bytes={span}"


class RangeRecorder:
    """A loopback HTTP relay that keeps every body it passes to GDAL (a context manager).

    Parameters
    ----------
    context
        ``cache_dir`` (where the bodies go), ``user_agent`` and ``timeout_s``.
    signer
        ``href -> signed href`` applied before forwarding (None: unchanged).
    """

    def __init__(self, context: FetchContext, *,
                 signer: Callable[[str], str] | None = None) -> None:
        """Set up the relay; it listens from ``__enter__`` to ``__exit__``."""
        self.context, self.signer = context, signer
        self._hrefs: list[str] = []
        self._index: dict[str, int] = {}
        self._reads: dict[str, list[dict[str, Any]]] = {}
        self._kept: dict[str, str] = {}  # read key -> SHA-256 of the body stored this run
        self._lock = threading.Lock()
        self._session = requests.Session()
        self._session.headers["User-Agent"] = context.user_agent
        self._session.mount("http://", DeadlineAdapter())
        self._session.mount("https://", DeadlineAdapter())
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._port = 0  # the relay's, from __enter__
        self.error: FetchError | None = None  # a body not kept (disk full, file changed)
        self._quiet = _NoQueries()

    def __enter__(self) -> RangeRecorder:
        logging.getLogger("urllib3.connectionpool").addFilter(self._quiet)
        handler = type("_BoundRelay", (_Relay,), {"recorder": self})
        self._server = _QuietServer(("127.0.0.1", 0), handler)
        self._port = int(self._server.server_address[1])
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="sitewatch-cog-relay")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        self._session.close()
        logging.getLogger("urllib3.connectionpool").removeFilter(self._quiet)

    def patch_url(self, href: str) -> str:
        """The relay URL GDAL reads ``href`` through (other schemes: signed, not relayed)."""
        if urlsplit(href).scheme not in ("http", "https") or self._server is None:
            return self._signed(href)
        with self._lock:
            n = self._index.setdefault(href, len(self._hrefs))
            if n == len(self._hrefs):
                self._hrefs.append(href)
        return self._relay_url(n, href)

    def names(self) -> dict[str, str]:
        """``{relay URL: signed href}``, to put real URLs back into GDAL's messages."""
        if self._server is None:
            return {}
        with self._lock:
            hrefs = list(self._hrefs)
        return {self._relay_url(n, h): self._signed(h) for n, h in enumerate(hrefs)}

    def _relay_url(self, n: int, href: str) -> str:
        """``http://127.0.0.1:<port>/<n>/<file name>``: the one way relay URLs are made."""
        name = PurePosixPath(urlsplit(href).path).name or "asset.tif"
        return f"http://127.0.0.1:{self._port}/{n}/{name}"

    def reads(self) -> dict[str, list[dict[str, Any]]]:
        """The bodies stored so far, by unsigned href, in the order they arrived."""
        with self._lock:
            return {href: list(rows) for href, rows in self._reads.items()}

    def _signed(self, href: str) -> str:
        return self.signer(href) if self.signer else href

    def forward(self, n: int, method: str, headers: Mapping[str, str]
                ) -> tuple[int, dict[str, str], bytes]:
        """Send one request of GDAL's to the real URL; store a successful GET's body."""
        if not 0 <= n < len(self._hrefs):
            return 404, {}, b""
        href = self._hrefs[n]
        resp: requests.Response | None = None
        deadline = Deadline(cog_read_limit_s(self.context))
        try:
            with deadline:
                resp = self._session.request(method, self._signed(href), headers=dict(headers),
                                             timeout=self.context.timeout_s, stream=True)
                deadline.attach(response_socket(resp.raw))
                if method == "GET" and "Range" in headers and resp.status_code == 200:
                    resp.close()  # the whole file is coming: never read it into memory or cache
                    self.error = FetchError(
                        f"{href} answered a byte-range request with the whole file (HTTP 200, "
                        f"Content-Length {resp.headers.get('Content-Length', 'unknown')}): the "
                        "server ignores Range requests, so the AOI window of this COG cannot be "
                        "read from it. Use a source whose server supports range requests, or "
                        "download the files and pass them with --before/--after.")
                    return 502, {}, b""
                resp.content  # noqa: B018 (read the body now, inside the error handling)
        except requests.RequestException as e:
            log.debug("COG relay: %s %s failed: %s", method, href, type(e).__name__)
            if not deadline.expired:
                return 502, {}, b""
        if deadline.expired:  # a body cut short by the deadline may look whole: never keep it
            self.error = _overrun(href, headers.get("Range"), deadline, resp)
            return 502, {}, b""
        if resp is None:
            return 502, {}, b""
        out = {k: resp.headers[k] for k in _RELAYED_HEADERS if k in resp.headers}
        if method == "GET" and resp.status_code in (200, 206):
            try:
                self._record(href, resp, out)
            except FetchError as e:  # not kept, so not given to GDAL either
                self.error = e
                return 502, {}, b""
        elif method == "HEAD" and "Content-Length" in resp.headers:
            out["Content-Length"] = resp.headers["Content-Length"]
        return resp.status_code, out, resp.content if method == "GET" else b""

    def _record(self, href: str, resp: requests.Response, headers: dict[str, str]) -> None:
        """Store the body under its read key and list it (a repeated read: compare only)."""
        key = read_key(href, headers.get("Content-Range") if resp.status_code == 206 else None)
        span = key.rsplit("#bytes=", 1)[1]
        with self._lock:
            kept = self._kept.get(key)
        if kept is None:
            stored = store_body(key, Response(key, href, resp.status_code, resp.content,
                                              headers.get("Content-Type", "")),
                                context=self.context)
            digest = stored.sha256
        else:
            digest = hashlib.sha256(resp.content).hexdigest()
        with self._lock:
            first = self._kept.get(key)
            if first is None:  # the first read of this range (two at once: listed once)
                self._kept[key] = digest
                self._reads.setdefault(href, []).append({
                    "url": href, "range": span, "key": key,
                    "sha256": digest, "size_bytes": len(resp.content),
                    "etag": headers.get("ETag"), "last_modified": headers.get("Last-Modified")})
        if first not in (None, digest):
            raise FetchError(
                f"{href} changed while it was being read: bytes {span} came "
                f"back with SHA-256 {digest[:12]}..., earlier in this read {first[:12]}...; the "
                "composite would mix two versions of the file. Run again once the source is "
                "stable.")


def _overrun(href: str, span: str | None, deadline: Deadline,
             resp: requests.Response | None) -> FetchError:
    """The FetchError for a COG read that outlasted GDAL's whole-transfer limit."""
    got = arrived(resp)
    return FetchError(
        f"{href} did not answer the read of {span or 'the file'} within {deadline.seconds:g} s, "
        f"the limit for one COG read ({got}); the server is sending too slowly or not at all. "
        "Raise timeout_s in the [fetch] table of the config if the source is just slow (GDAL "
        "takes it as its whole-transfer limit, GDAL_HTTP_TIMEOUT), or check the server.")


class _QuietServer(ThreadingHTTPServer):
    """Logs a dropped connection (GDAL gave up on a slow answer) instead of printing it."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One DEBUG line instead of socketserver's traceback on stderr."""
        log.debug("COG relay: connection from %s dropped", client_address)


class _Relay(BaseHTTPRequestHandler):
    """Answers GDAL from the recorder (one forwarded request per request)."""

    recorder: RangeRecorder
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        """Silent: the access log would repeat every range request on stderr."""

    def do_GET(self) -> None:  # noqa: N802 (stdlib name)
        """Relay a GET (GDAL's range reads)."""
        self._relay("GET")

    def do_HEAD(self) -> None:  # noqa: N802 (stdlib name)
        """Relay a HEAD (GDAL's size probe)."""
        self._relay("HEAD")

    def _relay(self, method: str) -> None:
        try:
            n = int(self.path.lstrip("/").split("/", 1)[0])
        except ValueError:
            n = -1
        headers = {"Accept-Encoding": "identity"}  # the bytes as stored, never re-encoded
        if self.headers.get("Range"):
            headers["Range"] = self.headers["Range"]
        status, out, body = self.recorder.forward(n, method, headers)
        self.send_response(status)
        for name, value in out.items():
            self.send_header(name, value)
        if method == "GET" or "Content-Length" not in out:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if method == "GET":
            self.wfile.write(body)
