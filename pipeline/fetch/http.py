"""pipeline.fetch.http: a small, strict HTTP client for tiles, JSON documents and catalogues.

One ``HttpClient`` wraps a ``requests.Session`` with the run's User-Agent, connect/read
timeouts, a total deadline per request and a request counter. Retries are done with
**tenacity** (not urllib3's ``Retry``, which cannot cap ``Retry-After`` or retry a body cut
off mid-read): connection errors, timeouts, bodies shorter than their ``Content-Length``, 429
and 5xx answers are retried ``FetchContext.max_retries`` times with exponential backoff, or
after the server's
``Retry-After`` (capped at ``RETRY_AFTER_MAX_S``). Other 4xx answers are not retried.
404, 410 and 204 raise ``NotFound``, a ``FetchError`` the caller can treat as nodata.

``timeout_s`` bounds each read, so a server that keeps sending a byte now and then would never
time out; every attempt (its redirect hops included) therefore also runs under a
``pipeline.fetch.deadline.Deadline`` of ``FetchContext.request_deadline_s``, which shuts the
socket down when it expires, while the headers or the body are still arriving. An overrun is
a FetchError at once, not retried: bytes were arriving, only too slowly, and each retry would
cost another whole deadline. So one URL takes at most ``max_retries + 1`` deadlines plus the
backoff waits. Nothing partial is returned, so nothing partial reaches the cache.

Bodies are checked against what the caller expects (``"json"``, ``"image"`` or ``"any"``), so
an HTML error page served with status 200 never reaches a decoder or the cache. Only http and
https URLs are fetched, and redirects to any other scheme are refused.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, TypeVar

import requests
import urllib3.exceptions
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt

from pipeline.errors import FetchError
from pipeline.fetch.base import FetchContext
from pipeline.fetch.checks import (
    Expect,
    check_body,
    check_url,
    describe_body,
    redirect_target,
    retry_after_s,
    status_hint,
)
from pipeline.fetch.deadline import Deadline, DeadlineAdapter, arrived, response_socket

__all__ = ["Expect", "NotFound", "Response", "HttpClient", "get_bytes", "check_url",
           "check_body", "map_concurrent"]

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

BACKOFF_S = 0.5  # first retry delay; doubled each attempt
BACKOFF_MAX_S = 30.0
RETRY_AFTER_MAX_S = 60.0
MAX_REDIRECTS = 10
MAX_BODY_BYTES = 512 << 20
MISSING_STATUS = frozenset({204, 404, 410})
_REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
_CHUNK = 1 << 16
_WORDS = {1: "once", 2: "twice", 3: "three times", 4: "four times", 5: "five times",
          6: "six times", 7: "seven times", 8: "eight times", 9: "nine times", 10: "ten times"}


class NotFound(FetchError):
    """The server says the resource does not exist (404, 410) or is empty (204).

    For tiles this means nodata, not a failure. ``status`` is the HTTP status; ``cached`` is
    True when the answer came from a negative cache entry rather than the network.
    """

    def __init__(self, url: str, status: int, *, cached: bool = False) -> None:
        """Record the URL, the status and whether the answer came from the cache."""
        super().__init__(f"{url} does not exist on the server (HTTP {status}).")
        self.url = url
        self.status = status
        self.cached = cached


@dataclass(frozen=True)
class Response:
    """A successful answer: the body as bytes, already checked against what was expected."""

    url: str
    final_url: str
    status: int
    content: bytes
    content_type: str


class _Retryable(Exception):
    """One failed attempt worth repeating (429/5xx, timeout, dropped connection, cut-off body)."""

    def __init__(self, reason: str, kind: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind
        self.retry_after_s = retry_after_s


class HttpClient:
    """HTTP GET/POST with timeouts, bounded retries, body checks and a request counter.

    Parameters
    ----------
    context
        Supplies ``user_agent``, ``timeout_s`` (connect and each read),
        ``request_deadline_s`` (one whole attempt), ``max_retries`` and ``max_concurrency``.
    session
        A ``requests.Session`` to use (one is created otherwise).
    backoff_s
        First retry delay in seconds, doubled per attempt up to ``BACKOFF_MAX_S``.
    retry_after_max_s
        Longest ``Retry-After`` honoured; longer requests wait this long.
    max_body_bytes
        Bodies larger than this are refused.

    Notes
    -----
    ``requests_made`` counts every HTTP request sent, retries and redirect hops included.
    The client is safe to share between the threads of ``get_many``.
    """

    def __init__(self, context: FetchContext, *, session: requests.Session | None = None,
                 backoff_s: float | None = None, retry_after_max_s: float = RETRY_AFTER_MAX_S,
                 max_body_bytes: int = MAX_BODY_BYTES) -> None:
        """Set up the session, its User-Agent and a connection pool of max_concurrency."""
        self.context = context
        self.backoff_s = BACKOFF_S if backoff_s is None else float(backoff_s)
        self.retry_after_max_s = float(retry_after_max_s)
        self.max_body_bytes = int(max_body_bytes)
        self.session = session or requests.Session()
        self.session.headers["User-Agent"] = context.user_agent
        pool = max(10, int(context.max_concurrency))
        adapter = DeadlineAdapter(pool_connections=pool, pool_maxsize=pool, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self._lock = threading.Lock()
        self._requests = 0

    @property
    def requests_made(self) -> int:
        """Number of HTTP requests sent so far (retries and redirects included)."""
        with self._lock:
            return self._requests

    def fetch(self, url: str, *, expect: Expect = "any", method: str = "GET",
              json_body: Any = None, headers: dict[str, str] | None = None) -> Response:
        """Send one request (with retries) and return the checked answer.

        Parameters
        ----------
        url
            An http(s) URL.
        expect
            ``"json"``: the body must parse as JSON; ``"image"``: it must start like a PNG,
            JPEG, TIFF or WebP file; ``"any"``: no check.
        method
            ``"GET"`` or ``"POST"``.
        json_body
            Sent as a JSON body (POST).
        headers
            Extra request headers.

        Returns
        -------
        Response

        Raises
        ------
        NotFound
            On 404, 410 or 204 (not retried).
        FetchError
            Any other failure, after retries where they make sense; chained to the cause.
            An attempt that outlasts ``context.request_deadline_s`` fails at once.
        """
        check_url(url)
        attempts = max(0, int(self.context.max_retries)) + 1
        retrying = Retrying(stop=stop_after_attempt(attempts), wait=self._wait,
                            retry=retry_if_exception_type(_Retryable), reraise=True,
                            before_sleep=_log_retry(url))
        try:
            response = retrying(self._attempt, url, method, json_body, headers)
        except _Retryable as e:
            raise FetchError(_give_up_message(url, e, attempts, self.context.timeout_s)) from e
        check_body(url, response.content, response.content_type, expect=expect)
        return response

    def get_bytes(self, url: str, *, expect: Expect = "any",
                  headers: dict[str, str] | None = None) -> bytes:
        """GET ``url`` and return its checked body (see ``fetch``)."""
        return self.fetch(url, expect=expect, headers=headers).content

    def get_json(self, url: str, *, headers: dict[str, str] | None = None) -> Any:
        """GET ``url`` and return its body parsed as JSON (see ``fetch``)."""
        return json.loads(self.fetch(url, expect="json", headers=headers).content)

    def post_json(self, url: str, payload: Any, *, headers: dict[str, str] | None = None) -> Any:
        """POST ``payload`` as JSON to ``url`` and return the JSON answer (see ``fetch``)."""
        response = self.fetch(url, expect="json", method="POST", json_body=payload,
                              headers=headers)
        return json.loads(response.content)

    def get_many(self, urls: Iterable[str], *, expect: Expect = "any") -> dict[str, bytes | None]:
        """GET many URLs, at most ``context.max_concurrency`` at a time.

        Returns
        -------
        dict
            URL to body, in the order given (duplicates fetched once); ``None`` for a URL that
            raised ``NotFound``. Any other failure is raised once the running requests end.
        """
        unique = list(dict.fromkeys(urls))

        def one(url: str) -> bytes | None:
            try:
                return self.get_bytes(url, expect=expect)
            except NotFound:
                return None

        bodies = map_concurrent(one, unique, max_workers=self.context.max_concurrency,
                                progress=self.context.progress)
        return dict(zip(unique, bodies, strict=True))

    def close(self) -> None:
        """Close the session's connections."""
        self.session.close()

    def __enter__(self) -> HttpClient:
        """Use as a context manager that closes the session."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the session."""
        self.close()

    def _count(self) -> None:
        """Count one request sent."""
        with self._lock:
            self._requests += 1

    def _wait(self, state: RetryCallState) -> float:
        """Seconds before the next attempt: the capped Retry-After, else exponential backoff."""
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, _Retryable) and error.retry_after_s is not None:
            return min(error.retry_after_s, self.retry_after_max_s)
        return min(self.backoff_s * 2 ** (state.attempt_number - 1), BACKOFF_MAX_S)

    def _attempt(self, url: str, method: str, json_body: Any,
                 headers: dict[str, str] | None) -> Response:
        """One attempt under one deadline, following redirects by hand so each hop's scheme
        is checked."""
        with Deadline(self.context.request_deadline_s) as deadline:
            return self._hops(url, method, json_body, headers, deadline)

    def _hops(self, url: str, method: str, json_body: Any, headers: dict[str, str] | None,
              deadline: Deadline) -> Response:
        """The requests of one attempt: each redirect hop, then the answer read."""
        current = url
        for _ in range(MAX_REDIRECTS + 1):
            self._count()
            timeout = (self.context.timeout_s, self.context.timeout_s)
            try:
                resp = self.session.request(method, current, json=json_body, headers=headers,
                                            timeout=timeout, stream=True, allow_redirects=False)
            except requests.RequestException as e:
                if deadline.expired:
                    raise _overrun(url, deadline, "the status line and headers were still "
                                   "incomplete") from e
                raise _request_failure(url, e, self.context.timeout_s) from e
            with resp:
                deadline.attach(response_socket(resp.raw))
                if deadline.expired:  # http.client takes the end of the stream as the headers' end
                    raise _overrun(url, deadline, "the status line and headers were still "
                                   "incomplete")
                if resp.status_code in _REDIRECT_STATUS and resp.headers.get("Location"):
                    current = redirect_target(url, current, resp.headers["Location"])
                    if resp.status_code == 303:
                        method, json_body = "GET", None
                    continue
                try:
                    return self._read(url, current, resp, deadline)
                finally:
                    # the pool detached the socket on release; one the timer shut down
                    # at the last moment is closed here rather than kept for reuse
                    if deadline.stop():
                        resp.raw.close()
        raise FetchError(f"Could not fetch {url}: more than {MAX_REDIRECTS} redirects; "
                         "check the URL in configs/sources.toml.")

    def _read(self, url: str, final_url: str, resp: requests.Response,
              deadline: Deadline) -> Response:
        """Turn a non-redirect answer into a Response, NotFound, FetchError or _Retryable."""
        status = resp.status_code
        if status in MISSING_STATUS:
            raise NotFound(url, status)
        if status == 429 or 500 <= status < 600:
            reason = f"server answered {status}" + (" (too many requests)" if status == 429 else "")
            raise _Retryable(reason, "status", retry_after_s=retry_after_s(resp))
        if status >= 400 or not 200 <= status < 300:
            snippet = _error_snippet(resp)
            raise FetchError(f"Could not fetch {url}: server answered {status} "
                             f"({resp.reason}); got {snippet}. {status_hint(status)}")
        body = self._read_body(url, resp, deadline)
        return Response(url, final_url, status, body, resp.headers.get("Content-Type", ""))

    def _read_body(self, url: str, resp: requests.Response, deadline: Deadline) -> bytes:
        """Read the whole body, refusing oversized ones and detecting truncation and overrun."""
        chunks, size = [], 0
        declared = resp.headers.get("Content-Length", "")
        try:
            for chunk in resp.iter_content(_CHUNK):
                size += len(chunk)
                if size > self.max_body_bytes:
                    raise FetchError(f"Could not fetch {resp.url}: the body is larger than "
                                     f"{self.max_body_bytes >> 20} MiB; refusing it.")
                chunks.append(chunk)
        except requests.RequestException as e:
            if deadline.expired:
                raise _overrun(url, deadline, arrived(resp, size)) from e
            raise self._body_failure(resp, e, size) from e
        if deadline.expired:  # without a Content-Length the shut-down socket reads as the end
            raise _overrun(url, deadline, arrived(resp, size))
        body = b"".join(chunks)
        identity = resp.headers.get("Content-Encoding", "identity").lower() == "identity"
        if identity and declared.isascii() and declared.isdigit() and int(declared) != len(body):
            raise _Retryable(f"the body was cut off: got {len(body)} of {declared} bytes",
                             "truncated")
        return body

    def _body_failure(self, resp: requests.Response, e: requests.RequestException,
                      size: int) -> Exception:
        """The FetchError or _Retryable for a body read that failed (not by the deadline)."""
        if isinstance(e, requests.exceptions.ContentDecodingError):
            encoding = resp.headers.get("Content-Encoding", "")
            return FetchError(f"Could not fetch {resp.url}: the server labelled the body "
                              f"Content-Encoding {encoding!r} but it does not decode as that "
                              f"({_short(e)}); the server is misconfigured. Try again later, or "
                              "report it to the source.")
        if isinstance(e, requests.exceptions.ChunkedEncodingError):
            # urllib3 drops the chunk it was reading, so ``size`` only counts whole chunks
            got = f" ({size} bytes arrived before the cut)" if size else ""
            return _Retryable(f"the body was cut off mid-read{got}", "truncated")
        if isinstance(e, requests.ConnectionError):
            if isinstance(e.args[0] if e.args else None, urllib3.exceptions.ReadTimeoutError):
                return _Retryable(f"no data within {self.context.timeout_s:g} s", "timeout")
            return _Retryable(f"connection lost ({_short(e)})", "connection")
        return FetchError(f"Could not fetch {resp.url}: {_short(e)}")


def get_bytes(url: str, *, context: FetchContext, expect: Expect = "any",
              client: HttpClient | None = None) -> bytes:
    """GET one URL with a new (or the given) client; see ``HttpClient.fetch``."""
    if client is not None:
        return client.get_bytes(url, expect=expect)
    with HttpClient(context) as own:
        return own.get_bytes(url, expect=expect)


def map_concurrent(func: Callable[[T], R], items: Iterable[T], *, max_workers: int,
                   progress: Callable[[int, int], None] | None = None) -> list[R]:
    """Apply ``func`` to ``items`` on at most ``max_workers`` threads; results in input order.

    The first exception is raised once running calls end; calls not started are cancelled.
    ``progress(done, total)`` is called after each completed item.
    """
    todo = list(items)
    if not todo:
        return []
    results: list[Any] = [None] * len(todo)
    workers = max(1, min(int(max_workers), len(todo)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sitewatch-fetch") as pool:
        futures = {pool.submit(func, item): i for i, item in enumerate(todo)}
        try:
            for done, future in enumerate(as_completed(futures), start=1):
                results[futures[future]] = future.result()
                if progress is not None:
                    progress(done, len(todo))
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return results


def _request_failure(url: str, e: requests.RequestException, timeout_s: float) -> Exception:
    """The _Retryable (timeout, connection) or FetchError for a request that got no answer."""
    if isinstance(e, requests.Timeout):
        return _Retryable(f"no answer within {timeout_s:g} s", "timeout")
    if isinstance(e, requests.ConnectionError):
        return _Retryable(f"could not connect ({_short(e)})", "connection")
    return FetchError(f"Could not fetch {url}: {e}")


def _overrun(url: str, deadline: Deadline, received: str) -> FetchError:
    """The FetchError for an attempt that outlasted its deadline (not retried)."""
    return FetchError(
        f"Could not fetch {url}: the answer did not complete within the {deadline.seconds:g} s "
        f"deadline for one request ({received} after {deadline.elapsed_s:.1f} s); the server "
        "is sending too slowly or not at all. Raise deadline_s in the [fetch] table of the "
        "config if the source is just slow, or check the server; try again later or use "
        "--offline with a cache.")


def _error_snippet(resp: requests.Response) -> str:
    """The start of an error answer's body, described; never fails (the status is the news)."""
    try:
        head = resp.raw.read(2048, decode_content=True) or b""
    except (urllib3.exceptions.HTTPError, OSError) as e:
        return f"a body that could not be read ({type(e).__name__})"
    return describe_body(head, resp.headers.get("Content-Type", ""))


def _give_up_message(url: str, error: _Retryable, attempts: int, timeout_s: float) -> str:
    """The final message after every attempt failed."""
    times = _WORDS.get(attempts, f"{attempts} times")
    what = f"{error.reason} {times}"
    if error.kind == "timeout":
        return (f"Could not fetch {url}: {what} (timeout {timeout_s:g} s); the source may be slow "
                "or down. Try again later, raise the timeout, or use --offline with a cache.")
    if error.kind == "truncated":
        return (f"Could not fetch {url}: {what}; the connection or the server is unreliable. "
                "Try again later or use --offline with a cache.")
    if error.kind == "connection":
        return (f"Could not fetch {url}: {what}; check the network and the URL, or use "
                "--offline with a cache.")
    return (f"Could not fetch {url}: {what}; the source may be down. Try again later or use "
            "--offline with a cache.")


def _log_retry(url: str) -> Callable[[RetryCallState], None]:
    """tenacity hook logging each retry at INFO."""
    def hook(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        log.info("Retrying %s in %.2f s after attempt %d: %s", url, delay, state.attempt_number,
                 error)
    return hook


def _short(error: Exception) -> str:
    """First line of an exception's text, shortened."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text[:160]
