"""Loopback-server fixtures for tests outside tests/fetch (a pytest plugin named in conftest.py).

The fake Wayback (`content`, `fake`) lives in tests/fetch/test_wayback.py and the loopback STAC
API (`surface`, `catalogue`, `api`, `plan`) in tests/fetch/test_stac.py. Registering them here
lets tests/test_cli_fetch.py, tests/hardening and tests/watch request them by name instead of
importing fixture functions into each test module, where a test's argument shadows the import
(ruff F811). A closer definition (tests/watch/conftest.py's own `fake`) still wins.
"""

from __future__ import annotations

from fetch.test_stac import api, catalogue, plan, surface
from fetch.test_wayback import content, fake

__all__ = ["api", "catalogue", "content", "fake", "plan", "surface"]
