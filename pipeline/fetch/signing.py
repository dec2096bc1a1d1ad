"""pipeline.fetch.signing: pluggable signing of asset URLs (e.g. Planetary Computer SAS tokens).

A source names a signer with ``sign = "<name>"`` in ``configs/sources.toml``; ``make_signer``
returns a ``Signer`` (``href -> signed href``) that the loader applies to every asset URL just
before reading pixels. Signed URLs carry a secret: they are never logged, cached on disk or
written into provenance; the unsigned href is what provenance and cache keys use.

Planetary Computer (``sign = "planetary-computer"``): ``token_url`` (default
``PC_TOKEN_URL``, ``{collection}`` is filled in) answers ``{"token": "...", "msft:expiry": ...}``;
the token is appended as the query string of hrefs on hosts ending with one of ``sign_hosts``
(default ``.blob.core.windows.net``), so the token never goes to any other host.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from pipeline.errors import ConfigError, FetchError
from pipeline.fetch.http import HttpClient

__all__ = ["Signer", "SIGNERS", "PC_TOKEN_URL", "make_signer"]

log = logging.getLogger(__name__)

Signer = Callable[[str], str]
PC_TOKEN_URL = "https://planetarycomputer.microsoft.com/api/sas/v1/token/{collection}"
PC_SIGN_HOSTS = (".blob.core.windows.net",)
_EXPIRY_MARGIN = timedelta(minutes=5)


class _PlanetaryComputerSigner:
    """Appends a Planetary Computer SAS token, fetched once and renewed before it expires."""

    def __init__(self, token_url: str, hosts: tuple[str, ...], client: HttpClient) -> None:
        self.token_url = token_url
        self.hosts = hosts
        self.client = client
        self._token: str | None = None
        self._expiry: datetime | None = None
        self._lock = threading.Lock()

    def __call__(self, href: str) -> str:
        parts = urlsplit(href)
        host = (parts.hostname or "").lower()
        if not any(host == h.lstrip(".") or host.endswith(h) for h in self.hosts):
            return href
        if "sig=" in parts.query:  # already signed
            return href
        token = self._current_token()
        return f"{href}{'&' if parts.query else '?'}{token}"

    def _current_token(self) -> str:
        with self._lock:
            now = datetime.now(UTC)
            if self._token is None or (self._expiry and self._expiry - _EXPIRY_MARGIN <= now):
                self._token, self._expiry = self._fetch_token()
            return self._token

    def _fetch_token(self) -> tuple[str, datetime | None]:
        answer = self.client.get_json(self.token_url)
        token = answer.get("token") if isinstance(answer, dict) else None
        if not isinstance(token, str) or not token:
            raise FetchError(f"The token endpoint {self.token_url} answered without a 'token' "
                             "field; check token_url in configs/sources.toml.")
        expiry = _parse_expiry(answer.get("msft:expiry"))
        log.info("Got a Planetary Computer token from %s (expires %s)", self.token_url,
                 expiry.isoformat() if expiry else "unknown")
        return token.lstrip("?"), expiry


def _parse_expiry(value: Any) -> datetime | None:
    """The token's expiry as an aware datetime, or None."""
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _planetary_computer(options: Mapping[str, Any], *, collection: str, client: HttpClient,
                        source_name: str) -> Signer:
    template = options.get("token_url", PC_TOKEN_URL)
    hosts = options.get("sign_hosts", PC_SIGN_HOSTS)
    if not isinstance(template, str) or not template.startswith(("http://", "https://")):
        raise ConfigError(f"sources.{source_name}.token_url: expected an http(s) URL with "
                          f"{{collection}}, got {template!r}.")
    if isinstance(hosts, str) or not all(isinstance(h, str) and h for h in hosts):
        raise ConfigError(f"sources.{source_name}.sign_hosts: expected a list of host names "
                          f"or suffixes, got {hosts!r}.")
    return _PlanetaryComputerSigner(template.replace("{collection}", collection),
                                    tuple(h.lower() for h in hosts), client)


SIGNERS: dict[str, Callable[..., Signer]] = {"planetary-computer": _planetary_computer}


def make_signer(name: str | None, options: Mapping[str, Any], *, collection: str,
                client: HttpClient, source_name: str) -> Signer | None:
    """The signer a source names, or None when it names none.

    Parameters
    ----------
    name
        A key of ``SIGNERS`` (``sign`` in the source's options), or None.
    options
        The source's options (``token_url``, ``sign_hosts``).
    collection
        The STAC collection, filled into ``{collection}`` of ``token_url``.
    client
        HTTP client for the token request (made on the first signed href, not before).
    source_name
        For error messages.

    Returns
    -------
    callable or None
        ``href -> signed href``; hrefs on other hosts come back unchanged.

    Raises
    ------
    ConfigError
        Unknown signer or bad options.
    """
    if name is None:
        return None
    if name not in SIGNERS:
        raise ConfigError(f"sources.{source_name}.sign: unknown signer {name!r}; use one of "
                          f"{', '.join(SIGNERS)} or leave it out.")
    return SIGNERS[name](options, collection=collection, client=client, source_name=source_name)
