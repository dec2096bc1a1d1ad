"""pipeline.fetch.deadline: a wall-clock limit on one HTTP request, headers and body alike.

requests and urllib3 only know a *per-read* timeout: each ``recv`` may take ``timeout_s``,
however many there are, so a server that sends one byte every 0.2 s never times out (40 bytes
at a 0.5 s timeout took 7.8 s; an endless drip hung the run). A check between our own reads
does not help either: http.client's buffered reader loops over ``recv`` inside one call until
it has the whole header line or chunk.

So a :class:`Deadline` arms one ``threading.Timer`` per request. Sockets are attached to it
as they are used: by :class:`DeadlineAdapter`'s connections when they connect and just before
they read the status line and headers (the calling thread's active deadline is kept in a
thread-local), and by the caller for the response's socket. When the timer fires it calls
``shutdown(SHUT_RDWR)`` on them (never ``close``, which would race with the reading thread
over the file descriptor), so the blocked ``recv`` returns at once with end-of-file or an
error; the caller then sees ``expired`` and reports the overrun instead of a cut-off body.
A connection going back to the pool (urllib3 does that as soon as the body's last byte is read)
is detached first, so a timer firing late cannot shut down a connection another request has
taken from the pool meanwhile; one it shut down before that is seen as dropped by urllib3 and
not reused. ``stop()`` cancels and joins the timer, so no timer thread outlives its request.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.poolmanager import PoolManager

__all__ = ["Deadline", "DeadlineAdapter", "arrived", "response_socket"]

_active = threading.local()


class Deadline:
    """A limit of ``seconds`` on one request: at expiry, the attached sockets are shut down.

    Use as a context manager (or ``start()``/``stop()``) in the thread that sends the request;
    while it runs, it is that thread's active deadline, which ``DeadlineAdapter`` connections
    attach their sockets to.
    """

    def __init__(self, seconds: float) -> None:
        """Prepare (not start) a deadline of ``seconds`` (> 0)."""
        self.seconds = float(seconds)
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._expired = False
        self._stopped = False
        self._started = time.monotonic()
        self._previous: Deadline | None = None
        self._timer = threading.Timer(self.seconds, self._expire)
        self._timer.daemon = True
        self._timer.name = "sitewatch-deadline"

    def start(self) -> Deadline:
        """Start the clock and make this the calling thread's active deadline."""
        self._started = time.monotonic()
        self._previous = getattr(_active, "deadline", None)
        _active.deadline = self
        self._timer.start()
        return self

    def stop(self) -> bool:
        """Cancel and join the timer, detach every socket; True if the deadline had expired.

        Call it before the response's connection is released to the pool. Idempotent.
        """
        with self._lock:
            first = not self._stopped
            self._stopped = True
            self._sockets.clear()
            expired = self._expired
        if first:
            self._timer.cancel()
            if self._timer.is_alive() and self._timer is not threading.current_thread():
                self._timer.join()
            if getattr(_active, "deadline", None) is self:
                _active.deadline = self._previous
        return expired

    def __enter__(self) -> Deadline:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def expired(self) -> bool:
        """True once the timer has fired (the attached sockets were shut down)."""
        with self._lock:
            return self._expired

    @property
    def elapsed_s(self) -> float:
        """Seconds since ``start()``."""
        return time.monotonic() - self._started

    def attach(self, sock: socket.socket | None) -> None:
        """Shut ``sock`` down when the deadline expires (at once if it already has)."""
        if sock is None:
            return
        with self._lock:
            if self._stopped:
                return
            if not any(s is sock for s in self._sockets):
                self._sockets.append(sock)
            if self._expired:
                _shutdown(sock)

    def detach(self, sock: socket.socket | None) -> None:
        """Leave ``sock`` alone from now on (its connection goes back to the pool)."""
        with self._lock:
            self._sockets = [s for s in self._sockets if s is not sock]

    def _expire(self) -> None:
        """Timer thread: mark expired and unblock every read on the attached sockets."""
        with self._lock:
            if self._stopped:
                return
            self._expired = True
            for sock in self._sockets:
                _shutdown(sock)


def active_deadline() -> Deadline | None:
    """The calling thread's running deadline, if any."""
    return getattr(_active, "deadline", None)


def response_socket(raw: Any) -> socket.socket | None:
    """The socket under a urllib3 response (``requests.Response.raw``), if it can be found."""
    connection = getattr(raw, "connection", None) or getattr(raw, "_connection", None)
    sock = getattr(connection, "sock", None)
    return sock if isinstance(sock, socket.socket) else None


def arrived(resp: Any, size: int = 0) -> str:
    """How much of an answer (a ``requests.Response``, or None before its headers) had
    arrived when its deadline expired, for the overrun message; ``size``: body bytes counted
    by the caller."""
    if resp is None:
        return "the status line and headers were still incomplete"
    try:  # urllib3 counts the bytes off the wire, a cut-off read's included
        size = max(size, int(resp.raw.tell()))
    except (AttributeError, TypeError, ValueError, OSError):
        pass
    declared = resp.headers.get("Content-Length", "")
    of = f" of {declared}" if declared.isascii() and declared.isdigit() else ""
    return f"the headers and {size}{of} bytes of the body had arrived"


def _shutdown(sock: socket.socket) -> None:
    """``shutdown(SHUT_RDWR)`` at the socket level (for TLS too: SSLSocket's own method would
    drop its SSL object under the reading thread); a socket already closed is left alone."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except (OSError, ValueError):
        pass


class _DeadlineMixin:
    """Attaches the connection's socket to the thread's active deadline before each read."""

    sock: Any

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        deadline = active_deadline()
        if deadline is not None:
            deadline.attach(self.sock)

    def getresponse(self) -> Any:
        deadline = active_deadline()
        if deadline is not None:
            deadline.attach(self.sock)
        return super().getresponse()  # type: ignore[misc]


class _HTTPConnection(_DeadlineMixin, HTTPConnection):
    pass


class _HTTPSConnection(_DeadlineMixin, HTTPSConnection):
    pass


class _PoolMixin:
    """Detaches a connection's socket from the thread's deadline as it goes back to the pool."""

    def _put_conn(self, conn: Any) -> None:
        deadline = active_deadline()
        if deadline is not None and conn is not None:
            deadline.detach(getattr(conn, "sock", None))
        super()._put_conn(conn)  # type: ignore[misc]


class _HTTPPool(_PoolMixin, HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(_PoolMixin, HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


def _use_deadline_pools(manager: PoolManager) -> PoolManager:
    """Make ``manager`` open connections that honour the thread's deadline."""
    manager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
    return manager


class DeadlineAdapter(HTTPAdapter):
    """An ``HTTPAdapter`` whose connections attach their sockets to the active ``Deadline``.

    Without a running deadline they behave exactly like urllib3's own. SOCKS proxies keep
    urllib3's connections (the body is still covered through ``response_socket``).
    """

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        """Create the pool manager, then swap in the deadline-aware pool classes."""
        super().init_poolmanager(*args, **kwargs)
        _use_deadline_pools(self.poolmanager)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> PoolManager:
        """The proxy's pool manager, deadline-aware for http(s) proxies."""
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if not proxy.lower().startswith("socks"):
            _use_deadline_pools(manager)
        return manager
