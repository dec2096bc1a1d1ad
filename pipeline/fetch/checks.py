"""pipeline.fetch.checks: what the HTTP client refuses: non-http(s) URLs and redirects, bodies
that are not what the caller expects (an HTML error page served with 200), and how long a
``Retry-After`` asks to wait.
"""

from __future__ import annotations

import email.utils
import json
import logging
import re
from datetime import UTC, datetime
from typing import Literal
from urllib.parse import urljoin, urlsplit

import requests

from pipeline.errors import FetchError

__all__ = ["Expect", "check_url", "check_body", "describe_body", "retry_after_s",
           "redirect_target", "status_hint"]

log = logging.getLogger("pipeline.fetch.http")

Expect = Literal["json", "image", "any"]
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"II+\x00",
                b"MM\x00+")
_TITLE = re.compile(rb"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)


def check_url(url: str) -> str:
    """Return ``url`` if it is an absolute http(s) URL with a host, else raise FetchError."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise FetchError(f"Refusing to fetch {url!r}: only absolute http:// and https:// URLs "
                         "are fetched; check the URL in configs/sources.toml.")
    return url


def check_body(url: str, body: bytes, content_type: str, *, expect: Expect) -> None:
    """Raise FetchError unless ``body`` is what ``expect`` asks for (see ``HttpClient.fetch``)."""
    if expect == "any":
        return
    if expect == "image":
        if _is_image(body):
            return
        raise FetchError(f"{url} did not return an image: got {describe_body(body, content_type)}. "
                         "The server may be failing or the URL template may be wrong.")
    if expect == "json":
        try:
            json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise FetchError(f"{url} did not return valid JSON: got "
                             f"{describe_body(body, content_type)} ({e}).") from e
        except RecursionError as e:  # "[[[[..." deeper than the interpreter's stack
            raise FetchError(f"{url} did not return usable JSON: got "
                             f"{describe_body(body, content_type)}, nested too deeply to "
                             "parse. The server may be failing or the URL may be wrong.") from e
        return
    raise ValueError(f"expect must be 'json', 'image' or 'any', got {expect!r}")


def _is_image(body: bytes) -> bool:
    """True if ``body`` starts like a PNG, JPEG, TIFF/BigTIFF or WebP file."""
    return body.startswith(_IMAGE_MAGIC) or (body[:4] == b"RIFF" and body[8:12] == b"WEBP")


def describe_body(body: bytes, content_type: str) -> str:
    """Short description of an unexpected body for messages (never the whole payload)."""
    kind = content_type.split(";")[0].strip() or "no Content-Type"
    head = body[:1024].lstrip().lower()
    if "html" in kind or head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        title = _TITLE.search(body[:4096])
        named = f", title {title.group(1).decode(errors='replace').strip()[:80]!r}" if title else ""
        return f"an HTML page ({kind}, {len(body)} bytes{named})"
    if not body:
        return f"an empty body ({kind})"
    return f"{len(body)} bytes of {kind} starting {body[:24]!r}"


def retry_after_s(resp: requests.Response) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date), else None."""
    value = resp.headers.get("Retry-After", "").strip()
    if not value:
        return None
    if value.isascii() and value.isdigit():  # not "²": str.isdigit takes any digit
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def redirect_target(url: str, current: str, location: str) -> str:
    """Absolute redirect target, refused unless http(s)."""
    target = urljoin(current, location)
    if urlsplit(target).scheme.lower() not in ("http", "https"):
        raise FetchError(f"Could not fetch {url}: the server redirected to {target!r}, which is "
                         "not an http(s) URL; refusing to follow it.")
    if urlsplit(current).scheme == "https" and urlsplit(target).scheme == "http":
        log.warning("Redirect from https to plain http: %s -> %s", current, target)
    return target


def status_hint(status: int) -> str:
    """What to do about a non-retried 4xx."""
    if status in (401, 403):
        return "The source refused access: it may need a key, or it may be blocking this client."
    if status == 400:
        return "The request was rejected as malformed; check the source's URL template."
    return "Check the URL in configs/sources.toml."
