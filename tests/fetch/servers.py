"""Loopback HTTP servers for fetcher tests: files with Range support and programmable faults.

``serve()`` starts a ``ThreadingHTTPServer`` on 127.0.0.1 (a free port) in a daemon thread and
stops it on exit::

    with serve({"/tiles/1/0/0.png": png}) as server:
        server.fault("/tiles/1/0/1.png", "status", status=500, times=2)
        client.get_bytes(server.url("/tiles/1/0/0.png"))
        assert server.count("/tiles/") == 1

Bodies come from a dict (``add``), a folder (``root``) or a handler (``route``). Single and
multiple byte ranges are answered with 206 (multipart/byteranges for several), as GDAL's
``/vsicurl/`` needs. Faults apply to one path for ``times`` requests (``None``: always):

- ``"status"``: answer ``status`` (``retry_after`` adds a Retry-After header);
- ``"stall"``: wait ``delay_s`` (default ``stall_s``) before answering;
- ``"truncate"``: announce the full Content-Length but send only the first half;
- ``"html"``: answer 200 with an HTML error page;
- ``"bad_json"``: answer 200 ``application/json`` that does not parse;
- ``"redirect"``: answer 302 to ``location``.

Requests and bytes are counted per path (query string included).
"""

from __future__ import annotations

import collections
import contextlib
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import mercantile
import numpy as np
import rasterio
from pyproj import Transformer
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning
from rasterio.io import MemoryFile
from rasterio.transform import from_bounds, from_origin
from rasterio.warp import reproject

__all__ = ["LoopbackServer", "Fault", "Request", "serve", "render_tiles", "write_synthetic_scene"]

CONTENT_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
                 ".tif": "image/tiff", ".tiff": "image/tiff", ".json": "application/json",
                 ".geojson": "application/geo+json", ".xml": "application/xml",
                 ".html": "text/html"}
HTML_ERROR = (b"<!DOCTYPE html><html><head><title>Service Unavailable</title></head>"
              b"<body><h1>Sorry, we are down for maintenance</h1></body></html>")
BAD_JSON = b'{"data": [1], "select": [13'
_BOUNDARY = "sitewatch-test-boundary"


@dataclass
class Fault:
    """A misbehaviour of one path for ``times`` requests (``None``: every request)."""

    kind: str
    times: int | None = None
    status: int = 500
    retry_after: str | None = None
    delay_s: float | None = None
    location: str | None = None
    used: int = 0


@dataclass(frozen=True)
class Request:
    """What a handler route receives."""

    method: str
    path: str
    query: str
    headers: Mapping[str, str]
    body: bytes


Route = Callable[[Request], tuple[int, dict[str, str], bytes]]


@dataclass
class LoopbackServer:
    """State shared by the handler threads: content, faults and counters."""

    base_url: str = ""
    root: Path | None = None
    stall_s: float = 1.0
    files: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    routes: dict[str, Route] = field(default_factory=dict)
    faults: dict[str, Fault] = field(default_factory=dict)
    requests: collections.Counter[str] = field(default_factory=collections.Counter)
    bytes_served: collections.Counter[str] = field(default_factory=collections.Counter)
    headers_seen: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str) -> str:
        """Absolute URL of ``path`` on this server."""
        return self.base_url + (path if path.startswith("/") else "/" + path)

    def add(self, path: str, body: bytes | str, content_type: str | None = None) -> str:
        """Serve ``body`` at ``path``; return its URL."""
        data = body.encode() if isinstance(body, str) else bytes(body)
        self.files[path] = (data, content_type or _content_type(path))
        return self.url(path)

    def route(self, path: str, handler: Route) -> str:
        """Answer ``path`` (any query) with ``handler(request) -> (status, headers, body)``."""
        self.routes[path] = handler
        return self.url(path)

    def fault(self, path: str, kind: str, **options: Any) -> None:
        """Make ``path`` misbehave (see the module docstring)."""
        if kind not in ("status", "stall", "truncate", "html", "bad_json", "redirect"):
            raise ValueError(f"unknown fault kind {kind!r}")
        self.faults[path] = Fault(kind, **options)

    def count(self, prefix: str = "/") -> int:
        """Requests received for paths starting with ``prefix``."""
        with self.lock:
            return sum(n for p, n in self.requests.items() if p.startswith(prefix))

    @property
    def total_requests(self) -> int:
        """All requests received."""
        return self.count("/")

    def reset_counts(self) -> None:
        """Forget the counters (content and faults stay)."""
        with self.lock:
            self.requests.clear()
            self.bytes_served.clear()
            self.headers_seen.clear()

    def _take_fault(self, full_path: str, path: str) -> Fault | None:
        """The active fault for this request, consuming one use."""
        with self.lock:
            fault = self.faults.get(full_path) or self.faults.get(path)
            if fault is None or (fault.times is not None and fault.used >= fault.times):
                return None
            fault.used += 1
            return fault

    def _lookup(self, path: str) -> tuple[bytes, str] | None:
        """Body and type of a static file, from the dict or the folder."""
        if path in self.files:
            return self.files[path]
        if self.root is None:
            return None
        target = (self.root / path.lstrip("/")).resolve()
        if self.root.resolve() not in target.parents or not target.is_file():
            return None
        return target.read_bytes(), _content_type(path)


class _Handler(BaseHTTPRequestHandler):
    """Serves a LoopbackServer's content (HTTP/1.1, keep-alive, Range)."""

    protocol_version = "HTTP/1.1"
    state: LoopbackServer  # set on a subclass per server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        """Stay quiet."""

    def do_GET(self) -> None:
        """Answer GET."""
        self._answer(head=False)

    def do_HEAD(self) -> None:
        """Answer HEAD."""
        self._answer(head=True)

    def do_POST(self) -> None:
        """Answer POST (routes only; static files ignore the body)."""
        self._answer(head=False)

    def _answer(self, *, head: bool) -> None:
        state = self.state
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body_in = self.rfile.read(length) if length else b""
        with state.lock:
            state.requests[self.path] += 1
            state.headers_seen.append((self.path, dict(self.headers)))
        try:
            fault = state._take_fault(self.path, parts.path)
            if fault is not None and self._apply_fault(fault, parts.path, head):
                return
            if parts.path in state.routes:
                request = Request(self.command, parts.path, parts.query, dict(self.headers),
                                  body_in)
                status, headers, body = state.routes[parts.path](request)
                self._send(status, headers, body, head=head)
                return
            found = state._lookup(parts.path)
            if found is None:
                self._send(404, {"Content-Type": "text/plain"}, b"not found", head=head)
                return
            self._send_file(found[0], found[1], head=head)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _apply_fault(self, fault: Fault, path: str, head: bool) -> bool:
        """Misbehave; True if the request is fully answered."""
        state = self.state
        if fault.kind == "status":
            headers = {"Content-Type": "text/plain"}
            if fault.retry_after is not None:
                headers["Retry-After"] = fault.retry_after
            self._send(fault.status, headers, f"status {fault.status}".encode(), head=head)
            return True
        if fault.kind == "stall":
            state.stop.wait(fault.delay_s if fault.delay_s is not None else state.stall_s)
            self.close_connection = True
            return False
        if fault.kind == "html":
            self._send(200, {"Content-Type": "text/html; charset=utf-8"}, HTML_ERROR, head=head)
            return True
        if fault.kind == "bad_json":
            self._send(200, {"Content-Type": "application/json"}, BAD_JSON, head=head)
            return True
        if fault.kind == "redirect":
            self._send(302, {"Location": fault.location or "/"}, b"", head=head)
            return True
        found = state._lookup(path) or (b"x" * 1000, "application/octet-stream")
        self._send_truncated(*found)
        return True

    def _send(self, status: int, headers: dict[str, str], body: bytes, *, head: bool) -> None:
        """Send a complete answer."""
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if status not in (204, 304):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head and status not in (204, 304) and body:
            self.wfile.write(body)
            with self.state.lock:
                self.state.bytes_served[self.path] += len(body)

    def _send_truncated(self, body: bytes, content_type: str) -> None:
        """Announce the whole body, send half, and close the connection."""
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        self.close_connection = True

    def _send_file(self, body: bytes, content_type: str, *, head: bool) -> None:
        """Send a static file, honouring a Range header."""
        ranges = _parse_ranges(self.headers.get("Range"), len(body))
        base = {"Content-Type": content_type, "Accept-Ranges": "bytes"}
        if ranges is None:
            self._send(200, base, body, head=head)
        elif not ranges:
            self._send(416, {"Content-Range": f"bytes */{len(body)}"}, b"", head=head)
        elif len(ranges) == 1:
            start, end = ranges[0]
            headers = {**base, "Content-Range": f"bytes {start}-{end}/{len(body)}"}
            self._send(206, headers, body[start:end + 1], head=head)
        else:
            multipart = _multipart(body, ranges, content_type)
            headers = {"Content-Type": f"multipart/byteranges; boundary={_BOUNDARY}",
                       "Accept-Ranges": "bytes"}
            self._send(206, headers, multipart, head=head)


def _parse_ranges(header: str | None, size: int) -> list[tuple[int, int]] | None:
    """Byte ranges of a Range header as inclusive (start, end); None: no/ignored header."""
    if not header or not header.strip().startswith("bytes="):
        return None
    ranges = []
    for part in header.strip()[len("bytes="):].split(","):
        first, _, last = part.strip().partition("-")
        try:
            if first == "":
                start, end = max(0, size - int(last)), size - 1
            else:
                start, end = int(first), min(int(last) if last else size - 1, size - 1)
        except ValueError:
            return None
        if start <= end and start < size:
            ranges.append((start, end))
    return ranges


def _multipart(body: bytes, ranges: list[tuple[int, int]], content_type: str) -> bytes:
    """A multipart/byteranges body."""
    out = []
    for start, end in ranges:
        out.append(f"--{_BOUNDARY}\r\nContent-Type: {content_type}\r\n"
                   f"Content-Range: bytes {start}-{end}/{len(body)}\r\n\r\n".encode())
        out.append(body[start:end + 1] + b"\r\n")
    out.append(f"--{_BOUNDARY}--\r\n".encode())
    return b"".join(out)


def _content_type(path: str) -> str:
    """Content type from a path's suffix."""
    return CONTENT_TYPES.get(Path(urlsplit(path).path).suffix.lower(), "application/octet-stream")


@contextlib.contextmanager
def serve(files: Mapping[str, bytes | str] | None = None, *, root: str | Path | None = None,
          stall_s: float = 1.0) -> Iterator[LoopbackServer]:
    """Run a loopback server for the duration of the ``with`` block.

    Parameters
    ----------
    files
        URL path to body.
    root
        A folder served below ``/``.
    stall_s
        Default duration of a ``"stall"`` fault; keep it a little above the client timeout.
    """
    state = LoopbackServer(root=Path(root) if root is not None else None, stall_s=stall_s)
    handler = type("Handler", (_Handler,), {"state": state})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    httpd.block_on_close = False
    state.base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
    for path, body in (files or {}).items():
        state.add(path, body)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              name="loopback-http", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.stop.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


# --- Tile content ---------------------------------------------------------------------------


def render_tiles(raster_path: str | Path, tiles: Iterable[mercantile.Tile], *, tile_size: int = 256,
                 driver: str = "PNG") -> dict[tuple[int, int, int], bytes]:
    """Render web-map tiles ``{(z, x, y): image bytes}`` from an RGB GeoTIFF (nodata 0).

    Each tile is the raster warped (bilinear) onto the tile's EPSG:3857 bounds, as a tile server
    would; PNG tiles are RGBA with alpha 0 where the raster has no data.
    """
    out = {}
    with warnings.catch_warnings(), rasterio.open(raster_path) as src:
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # tiles carry no georeference
        source = src.read()
        for tile in tiles:
            out[(tile.z, tile.x, tile.y)] = _render_tile(src, source, tile, tile_size, driver)
    return out


def _render_tile(src: Any, source: np.ndarray, tile: mercantile.Tile, tile_size: int,
                 driver: str) -> bytes:
    """One tile's image bytes."""
    rgb = np.zeros((3, tile_size, tile_size), np.uint8)
    transform = from_bounds(*mercantile.xy_bounds(tile), tile_size, tile_size)
    reproject(source, rgb, src_transform=src.transform, src_crs=src.crs, src_nodata=0,
              dst_transform=transform, dst_crs="EPSG:3857", dst_nodata=0,
              resampling=Resampling.bilinear)
    alpha = np.where((rgb > 0).any(axis=0), 255, 0).astype(np.uint8)
    bands = np.concatenate([rgb, alpha[None]]) if driver == "PNG" else rgb
    with MemoryFile() as mem:
        with mem.open(driver=driver, width=tile_size, height=tile_size, count=len(bands),
                      dtype="uint8") as dst:
            dst.write(bands)
        return mem.read()


def write_synthetic_scene(path: str | Path, *, centre_lonlat: tuple[float, float] = (88.29, 43.384),
                          size_px: int = 1000, res_m: float = 2.0, seed: int = 0) -> Path:
    """A UTM 45N RGB GeoTIFF (nodata 0) around ``centre_lonlat``: gradients, blocks and noise."""
    cx, cy = Transformer.from_crs("EPSG:4326", "EPSG:32645", always_xy=True).transform(
        *centre_lonlat)
    half = size_px * res_m / 2
    rows, cols = np.mgrid[0:size_px, 0:size_px]
    rng = np.random.default_rng(seed)
    red = 20 + 200 * cols / size_px
    green = 20 + 200 * rows / size_px
    blue = np.where(((rows // 60) + (cols // 60)) % 2 == 0, 60, 200) + rng.normal(0, 5, rows.shape)
    data = np.clip(np.stack([red, green, blue]), 1, 255).astype(np.uint8)
    profile = {"driver": "GTiff", "width": size_px, "height": size_px, "count": 3,
               "dtype": "uint8", "crs": "EPSG:32645", "nodata": 0,
               "transform": from_origin(cx - half, cy + half, res_m, res_m)}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return Path(path)
